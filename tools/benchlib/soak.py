"""tools/soak: scenarios run again and again, each failure kept with its
diagnostics and put in a class, so a hang rate or a guest-reset rate is a
count and not an impression.

A scenario is a test-host shell snippet built on the harness
(tools/testbed-host/harness.sh): it prints `@@soak ok` when it completed and
`@@soak fail STEP` when a step failed (the harness has then printed the
step, the console, the VMM's stderr, the device's log and dmesg). A run's
outcome is classified from that, the VMM's own last words (a guest triple
fault) and tools/testbed's exit code (a test host that did not come up,
reset, or outlived its timeout)."""

import re

from . import vmms

# tools/testbed's exit codes (see its docstring).
TESTBED_EXITS = {
    101: "test host did not come up",
    102: "test host setup failed",
    103: "timeout (the command outlived tools/testbed --timeout)",
    104: "test host reset or QEMU died",
    105: "QEMU could not be started",
    106: "test host soft-locked (a CPU stuck past tools/testbed --lockup-limit)",
    107: "test host stopped (its userspace heartbeat silent past tools/testbed --silence-limit)",
}
HANG_EXITS = {103}

GUEST_NET = "192.0.2"

_BOOT_GUEST = "true"
_NET_GUEST = f"""ip link set eth0 up && ip addr add {GUEST_NET}.2/24 dev eth0
ping -c 5 -W 2 {GUEST_NET}.1 | tail -2
"""
_HOTPLUG_GUEST = f"""ip link set eth0 up && ip addr add {GUEST_NET}.2/24 dev eth0
ping -c 2 -W 2 {GUEST_NET}.1 >/dev/null
echo soak-guest-ready
wait_go
echo "soak-memtotal $(sed -n 's/^MemTotal: *//p' /proc/meminfo)"
wait_go
"""
# The viommu scenario: the compare command's workload, smaller.
_VIOMMU_GUEST = f"""ip link set eth0 up && ip addr add {GUEST_NET}.2/24 dev eth0
ping -c 3 -W 2 {GUEST_NET}.1 >/dev/null
echo soak-guest-ready
wait_go
dd if=/dev/zero bs=64k count=16 2>/dev/null | nc {GUEST_NET}.1 5001
ping -c 50 -i 0.02 -s 1000 {GUEST_NET}.1 | tail -2
echo soak-guest-done
wait_go
"""
VIOMMU_MODES = {"lazy": "", "strict": "iommu.strict=1"}

GUEST_ENDED = "guest reset or ended early (no panic)"

SCENARIOS = ("demo", "boot", "net", "hotplug", "viommu")
# Test-host vCPUs per scenario: viommu in 2 (the guest's virtio-iommu
# driver spins until each request completes; 2 is where the resets show).
HOST_CPUS = {"viommu": 2}


def _fail(step):
    # The TCP sink goes too: left listening, it would hold the next VM's
    # stream in its backlog and every later run would hang on it.
    return (f'{{ echo "@@soak fail {step}"; h_vmm_stop; '
            '[ -z "$SINK" ] || { kill $SINK; wait $SINK; } 2>/dev/null; exit 0; }')


def _vmm_argv(vmm, scenario, guest_cmd, cmdline_extra=""):
    net = scenario != "boot"
    iommu = scenario == "viommu"
    if vmm.is_qemu:
        machine = "pc" if iommu else vmms.BOOT_MACHINE[vmm.peer]
        return vmms.qemu_argv(vmm, machine, 512, 2, guest_cmd, iommu=iommu, cmdline_extra=cmdline_extra)
    return vmms.project_argv(vmm, 512, 2, guest_cmd, net=net, api=net, iommu=iommu,
                             cmdline_extra=cmdline_extra,
                             hotplug_mib=1024 if scenario == "hotplug" else None)


def vm_snippet(scenario, vmm, tag="vm"):
    """The shell that runs one VM of `scenario` in a test host whose
    vduse-net (when the scenario has a net device) already runs; prints
    `@@soak ok` or `@@soak fail STEP` (then the harness's diagnostics are on
    stderr). `tag` names the VM's console and stderr files."""
    guest = {"boot": _BOOT_GUEST, "net": _NET_GUEST, "hotplug": _HOTPLUG_GUEST}
    lines = [f"H_CONSOLE=/tmp/{tag}.console H_VMM_ERR=/tmp/{tag}.err",
             f"rm -f {vmms.API_SOCKET} {vmms.QMP_SOCKET}"]
    if scenario == "viommu":
        for mode, extra in VIOMMU_MODES.items():
            argv = vmms.shell(_vmm_argv(vmm, scenario, _VIOMMU_GUEST, extra))
            lines += [
                f"rm -f {vmms.API_SOCKET} {vmms.QMP_SOCKET}",
                f"H_CONSOLE=/tmp/{tag}-{mode}.console H_VMM_ERR=/tmp/{tag}-{mode}.err",
                "microvm-tcp-sink --port 5001 --bytes 1048576 >/tmp/sink.out 2>/tmp/sink.err &",
                "SINK=$!",
                f"h_vmm_start {argv}",
                "h_wait_console soak-guest-ready 300 'the guest to boot and reach the test host' || "
                + _fail(f"{mode}: boot and link"),
                f"h_go {GUEST_NET}.2 || " + _fail(f"{mode}: go"),
                "h_wait_console soak-guest-done 300 'the guest to stream and ping' || "
                + _fail(f"{mode}: stream and ping"),
                f"h_go {GUEST_NET}.2 || " + _fail(f"{mode}: go"),
                "st=$(h_vmm_wait 60) || " + _fail(f"{mode}: poweroff"),
                "kill $SINK 2>/dev/null; wait $SINK 2>/dev/null",
            ]
        lines.append('echo "@@soak ok"')
        return "\n".join(lines) + "\n"
    argv = vmms.shell(_vmm_argv(vmm, scenario, guest[scenario]))
    lines.append(f"h_vmm_start {argv}")
    lines.append("h_wait_console 'microvm-guest: ready' 300 'the guest to boot to its ready line' || "
                 + _fail("boot"))
    if scenario == "net":
        lines.append("h_wait_console 'packets transmitted' 60 'the guest to ping the test host' || "
                     + _fail("ping"))
        lines.append(f"grep -q ' 0% packet loss' \"$(h_get console)\" || {{ h_fail 'pings to be answered'; "
                     + 'echo "@@soak fail ping loss"; h_vmm_stop; exit 0; }')
    if scenario == "hotplug":
        lines += [
            "h_wait_console soak-guest-ready 60 'the guest to reach the test host' || " + _fail("link"),
            "H_CTL_TIMEOUT=90 h_ctl memory-resize 256M --timeout 60 >/tmp/resize.out || "
            + _fail("memory-resize 256M"),
            f"h_go {GUEST_NET}.2 || " + _fail("go after plug"),
            "h_wait_console soak-memtotal 60 'the guest to show MemTotal after the plug' || "
            + _fail("MemTotal after plug"),
            "H_CTL_TIMEOUT=90 h_ctl memory-resize 0 --timeout 60 >/tmp/resize.out || "
            + _fail("memory-resize 0"),
            f"h_go {GUEST_NET}.2 || " + _fail("go after unplug"),
        ]
    lines.append("st=$(h_vmm_wait 60) || " + _fail("poweroff"))
    lines.append('[ "$st" = 0 ] || { echo "@@soak fail exit status $st"; exit 0; }')
    lines.append('echo "@@soak ok"')
    return "\n".join(lines) + "\n"


def host_script(scenario, vmm, iterations):
    """One test host that runs `iterations` VMs of `scenario` in a row,
    each framed by `@@soak-iter K`."""
    lines = ['. "$MICROVM_HARNESS"']
    if scenario != "boot":
        lines += ["dev=$(h_vduse_start net0 --tap tap0) || { echo '@@soak-iter 0'; "
                  "echo '@@soak fail vduse-net start'; exit 0; }",
                  f"ip addr add {GUEST_NET}.1/24 dev tap0"]
    for k in range(iterations):
        lines.append(f"echo '@@soak-iter {k}'")
        # Each VM in a subshell: a failed step ends that VM only.
        lines.append("(\n" + vm_snippet(scenario, vmm, f"vm{k}") + ")")
    return "\n".join(lines) + "\n"


_FAILED_RE = re.compile(r"^harness: FAILED: (.*)$", re.M)
_SOAK_RE = re.compile(r"^@@soak (ok|fail ?(.*))$", re.M)


def _short(step):
    """A harness step without its parenthesised details, for grouping."""
    return re.sub(r"\s*\(.*\)$", "", step).strip()


def classify(output, testbed_status=None):
    """(ok, cause, hang) of one VM's or one demo's output. `cause` is None
    when it completed; `hang` says whether it was a wait that ran out."""
    soak = _SOAK_RE.findall(output)
    failed = _FAILED_RE.findall(output)
    triple = "triple-faulted" in output
    panic = "Kernel panic" in output
    if soak and soak[-1][0] == "ok" and not failed:
        return True, None, False
    # A test host that was lost (it panicked, reset or never came up) says
    # so itself, and its own kernel's panic is not the guest's.
    if testbed_status in TESTBED_EXITS and testbed_status not in HANG_EXITS:
        return False, TESTBED_EXITS[testbed_status], False
    if panic:
        return False, "guest kernel panic", False
    # microvm says when its guest triple-faults; QEMU (-no-reboot) just
    # exits. Either way the VM ended on its own with no panic: the signature
    # of the emulated test host's guest resets (see the README).
    if triple or any("the VMM exited" in step for step in failed):
        return False, GUEST_ENDED, False
    if failed:
        step = failed[0]
        hang = "within" in step or "still running" in step or "tries)" in step
        return False, _short(step), hang
    if testbed_status in TESTBED_EXITS:
        return False, TESTBED_EXITS[testbed_status], testbed_status in HANG_EXITS
    if soak and soak[-1][1]:
        return False, soak[-1][1], False
    if testbed_status not in (None, 0):
        return False, f"exit status {testbed_status}", False
    return False, "no result (the run printed no @@soak line)", False


def iterations(output):
    """{K: text} of a shared test host's output, split at `@@soak-iter K`."""
    out, current, text = {}, None, []
    for line in output.splitlines():
        if line.startswith("@@soak-iter "):
            if current is not None:
                out[current] = "\n".join(text) + "\n"
            current, text = int(line.split()[1]), []
        elif current is not None:
            text.append(line)
    if current is not None:
        out[current] = "\n".join(text) + "\n"
    return out


def shared_outcomes(text, status, count):
    """[(ok, cause, hang, text)] of the runs one shared test host of `count`
    runs took to a result, in order. The last run reached carries the test
    host's exit status; a host that ended early is not asked for the runs it
    never reached (the caller gives them a new host). A host that reached
    none still accounts for one run, so a caller's loop always advances."""
    per = iterations(text)
    if not per:
        reason = TESTBED_EXITS.get(status) or f"exit {status}"
        return [(False, "not reached: " + reason, status in HANG_EXITS, text)]
    out = []
    last = max(per)
    for k in range(min(last + 1, count)):
        part = per.get(k, "")
        ok, cause, hang = classify(part, status if k == last else None)
        out.append((ok, cause, hang, part))
    return out


def summary(records):
    """Per (scenario, vmm, host): runs, failures, hangs and causes."""
    groups = {}
    for r in records:
        key = (r["scenario"], r["vmm"], r["host"])
        g = groups.setdefault(key, {"summary": True, "scenario": key[0], "vmm": key[1], "host": key[2],
                                    "runs": 0, "ok": 0, "failures": 0, "hangs": 0, "causes": {}})
        g["runs"] += 1
        if r["ok"]:
            g["ok"] += 1
        else:
            g["failures"] += 1
            g["hangs"] += 1 if r["hang"] else 0
            g["causes"][r["cause"]] = g["causes"].get(r["cause"], 0) + 1
    return list(groups.values())
