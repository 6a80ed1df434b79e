"""Runs one shell script in a fresh test host (tools/testbed run) and splits
its output into `@@section NAME` sections; retries a run that lost the test
host (it did not come up, or it reset: TCG's nested SVM has done that)."""

import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
TESTBED = REPO / "tools" / "testbed"

# tools/testbed's exit codes for a test host that was lost, not a failing command.
LOST = {101: "the test host did not come up", 104: "the test host reset or QEMU died",
        106: "the test host soft-locked", 107: "the test host stopped (no heartbeat)"}


def log(message):
    print(f"bench: {message}", file=sys.stderr, flush=True)


class Run:
    def __init__(self, stdout, status, retries, lost, stderr=""):
        self.stdout = stdout
        self.stderr = stderr      # the test host's and tools/testbed's own words
        self.status = status
        self.retries = retries
        self.lost = lost          # reasons of the lost attempts, in order
        self.sections = sections(stdout)

    def section(self, name, default=None):
        return self.sections.get(name, default)


# tools/testbed's exit code for a command that outlived --timeout.
TIMED_OUT = 103


def run(script, peers=(), timeout=900, host="emulated", retries=2, memory=None, keep=None, cpus=None,
        bounded=False):
    """Runs `script` with `sh -c` in a fresh test host; up to `retries` more
    attempts while the test host is lost. `bounded`: every step of `script`
    has its own limit and they add up to less than `timeout`, so a timeout
    means the test host itself stopped, and counts as lost too. `keep`: a
    file for the raw output of every attempt, for diagnosis."""
    lost_codes = {**LOST, TIMED_OUT: "the test host stopped (the bounded script outlived its timeout)"} \
        if bounded else LOST
    lost = []
    while True:
        cmd = [str(TESTBED), "run", "--host", host, "--timeout", str(timeout)]
        if peers:
            cmd += ["--peers", ",".join(peers)]
        if memory:
            cmd += ["--memory", str(memory)]
        if cpus:
            cmd += ["--cpus", str(cpus)]
        result = run_teeing_stderr(cmd + ["--", "sh", "-c", script])
        if keep:
            with open(keep, "a") as f:
                f.write(f"=== attempt {len(lost) + 1}: tools/testbed exit {result.returncode}\n"
                        f"--- stdout\n{result.stdout}--- stderr\n{result.stderr}")
        if result.returncode in lost_codes and len(lost) < retries:
            lost.append(lost_codes[result.returncode])
            log(f"{lost_codes[result.returncode]} (attempt {len(lost)}); retrying in a fresh test host")
            continue
        if result.returncode in lost_codes:
            lost.append(lost_codes[result.returncode])
        return Run(result.stdout, result.returncode,
                   len(lost) - (1 if result.returncode in lost_codes else 0), lost, result.stderr)


def run_teeing_stderr(cmd, live=None):
    """subprocess.run(cmd) with stdout captured and stderr both shown live
    (on `live`, default sys.stderr: the progress of a long run) and kept (a
    failure's diagnostics belong in the raw log too)."""
    live = live or sys.stderr
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace")
    kept = []

    def tee():
        for line in proc.stderr:
            kept.append(line)
            live.write(line)
            live.flush()

    reader = threading.Thread(target=tee, daemon=True)
    reader.start()
    stdout = proc.stdout.read()
    proc.wait()
    reader.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, "".join(kept))


def sections(stdout):
    """{name: text} of the `@@section NAME` markers (as tests/src/lib.rs)."""
    out, name, text = {}, None, []
    for line in stdout.splitlines():
        if line.startswith("@@section "):
            if name is not None:
                out[name] = "\n".join(text) + ("\n" if text else "")
            name, text = line[len("@@section "):].strip(), []
        elif name is not None:
            text.append(line)
    if name is not None:
        out[name] = "\n".join(text) + ("\n" if text else "")
    return out
