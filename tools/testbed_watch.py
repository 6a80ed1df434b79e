"""The emulated test host's watchdog: a heartbeat from its userspace, and what
QEMU's monitor says about its CPUs once the heartbeat stops.

The test host's init writes a line to its second serial port every few
seconds (tools/testbed-host/init) and, whenever the set of loaded modules
changes, the whole of /proc/modules. A test host whose userspace stops for
--silence-limit seconds is dead to every test: the console reader then asks
QEMU's human monitor where each CPU is (RIP and the kernel text addresses on
its stack, sampled a few times) and names them with the test host kernel's
System.map (the test host boots with nokaslr) and the module load addresses.
That is the evidence for "the emulated test host stopped", as strong as a
backtrace, printed before QEMU is killed.
"""

import bisect
import re
import socket
import time

HEARTBEAT_PERIOD_S = 5
# "<name> <size> <refs> <deps> <state> 0x<base>" (/proc/modules as root).
MODULE_RE = re.compile(r"^(\S+) (\d+) \d+ \S+ \S+ 0x([0-9a-f]+)")
RIP_RE = re.compile(r"\bRIP=([0-9a-f]{16})")
CPU_RE = re.compile(r"CPU #(\d+):")
WORD_RE = re.compile(r"0x([0-9a-f]{16})\b")
PROMPT = b"(qemu) "
# The lines of `info lapic` that say whether a timer or interrupt is due.
LAPIC_RE = re.compile(r"^(LVTT|Timer|ISR|IRR|SPIV|ESR)\b")
# No kernel function is this long: an address further past a symbol is data.
MAX_FUNCTION_BYTES = 0x10000
ANSI_RE = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


class Heartbeat:
    """Follows the heartbeat file (the test host's /dev/ttyS1) as it grows."""

    def __init__(self, path):
        self.path = path
        self.size = 0
        self.last_beat = None     # time.time() of the last growth, None until the first
        self.text = ""            # everything read so far

    def poll(self, now):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.size)
                data = f.read()
        except OSError:
            return
        if data:
            self.size += len(data)
            self.text += data.decode(errors="replace").replace("\r", "")
            self.last_beat = now

    def silent_for(self, now):
        return None if self.last_beat is None else now - self.last_beat

    def modules(self):
        """[(base, size, name)] from the last /proc/modules dump in the file."""
        last = self.text.rfind("modules-begin\n")
        if last < 0:
            return []
        end = self.text.find("modules-end", last)
        block = self.text[last:end if end >= 0 else len(self.text)]
        mods = []
        for line in block.splitlines():
            m = MODULE_RE.match(line)
            if m and int(m.group(3), 16):
                mods.append((int(m.group(3), 16), int(m.group(2)), m.group(1)))
        return sorted(mods)


class Symbols:
    """Names kernel addresses from System.map text symbols and module ranges."""

    def __init__(self, system_map_text, modules):
        pairs = []
        for line in system_map_text.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1] in "TtWw":
                try:
                    pairs.append((int(parts[0], 16), parts[2]))
                except ValueError:
                    continue
        pairs.sort()
        self.addrs = [a for a, _ in pairs]
        self.names = [n for _, n in pairs]
        self.text_end = self.addrs[-1] if self.addrs else 0
        self.modules = modules

    def name(self, addr):
        """'func+0x12' (or 'module+0x340'), or None if addr is not kernel text."""
        for base, size, mod in self.modules:
            if base <= addr < base + size:
                return "[%s]+0x%x" % (mod, addr - base)
        if not self.addrs or addr < self.addrs[0] or addr > self.text_end:
            return None
        i = bisect.bisect_right(self.addrs, addr) - 1
        off = addr - self.addrs[i]
        # Past the last symbol of a text section (into data): not code.
        if off > MAX_FUNCTION_BYTES:
            return None
        return "%s+0x%x" % (self.names[i], off)


class Monitor:
    """A QEMU human-monitor connection (-monitor unix:PATH,server=on,wait=off)."""

    def __init__(self, path, timeout=5.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
            self._until_prompt()
        except BaseException:
            self.sock.close()
            raise

    def _until_prompt(self):
        buf = b""
        deadline = time.time() + self.sock.gettimeout()
        while not buf.endswith(PROMPT):
            if time.time() > deadline:
                raise TimeoutError("no monitor prompt")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the monitor closed its socket")
            buf += chunk
        return ANSI_RE.sub(b"", buf[:-len(PROMPT)]).decode(errors="replace")

    def cmd(self, line):
        self.sock.sendall(line.encode() + b"\n")
        out = self._until_prompt()
        # The monitor echoes the command first.
        lines = out.replace("\r", "").split("\n")
        if lines and line in lines[0]:
            lines = lines[1:]
        return "\n".join(lines)

    def close(self):
        self.sock.close()


def cpu_report(monitor, symbols, samples=3, interval=1.0, stack_words=64):
    """Lines saying where each CPU is, from `samples` looks `interval` apart."""
    cpus = [int(c) for c in CPU_RE.findall(monitor.cmd("info cpus"))] or [0]
    seen = {c: [] for c in cpus}
    stacks = {}
    lapics = {}
    for k in range(samples):
        for c in cpus:
            monitor.cmd("cpu %d" % c)
            regs = monitor.cmd("info registers")
            rip = RIP_RE.search(regs)
            seen[c].append(int(rip.group(1), 16) if rip else None)
            if k == samples - 1:
                stacks[c] = monitor.cmd("x/%dgx $esp" % stack_words)
                # Its timer and pending interrupts: one stop found the only
                # CPU idle in halt, nothing woken for 240 s.
                lapics[c] = monitor.cmd("info lapic")
        if k + 1 < samples:
            time.sleep(interval)
    lines = []
    for c in cpus:
        rips = seen[c]
        named = ["%016x %s" % (r, symbols.name(r) or "(not kernel text)") if r is not None else "?"
                 for r in rips]
        lines.append("CPU %d: RIP %s" % (c, "; ".join(named)))
        frames = []
        for line in stacks.get(c, "").splitlines():
            _, _, words = line.partition(":")
            for w in WORD_RE.findall(words):
                n = symbols.name(int(w, 16))
                if n and (not frames or frames[-1] != n):
                    frames.append(n)
        lines.append("CPU %d: kernel text on its stack (innermost first): %s"
                     % (c, ", ".join(frames[:16]) or "none"))
        for line in lapics.get(c, "").splitlines():
            if LAPIC_RE.match(line.strip()):
                lines.append("CPU %d: lapic %s" % (c, " ".join(line.split())))
    return lines


def dead_host_report(monitor_path, system_map_text, modules):
    """What QEMU's monitor says about a silent test host, as lines; never raises."""
    try:
        monitor = Monitor(monitor_path)
    except (OSError, TimeoutError, ConnectionError) as e:
        return ["QEMU's monitor did not answer (%s): QEMU itself is stuck" % e]
    try:
        return cpu_report(monitor, Symbols(system_map_text, modules))
    except (OSError, TimeoutError, ConnectionError) as e:
        return ["QEMU's monitor stopped answering (%s): QEMU itself is stuck" % e]
    finally:
        monitor.close()
