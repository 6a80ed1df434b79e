"""The scenarios every VMM runs in the test host: a shell script per run, and
a parser from its `@@section` output to the run's metrics. tools/bench boot
and tools/bench compare share them."""

import json
import re

from . import vmms
from .vmms import Vmm

READY = "microvm-guest: ready"


class ScenarioError(Exception):
    """A run that did not complete; the message says why. `guest_reset`: the
    VM ended on its own before it was done, with no kernel panic on its
    console (the signature of the emulated test host's guest triple faults,
    see the README; a caller may retry such a run and must report it)."""

    def __init__(self, message, guest_reset=False):
        super().__init__(message)
        self.guest_reset = guest_reset


GUEST_CRASH_MARKERS = ("Kernel panic", "Oops", "BUG:", "general protection fault")


def _quoted_heredoc(section, text):
    """Prints `text` verbatim under `@@section section`."""
    return f"echo '@@section {section}'\ncat <<'@@END_OF_TEXT'\n{text}\n@@END_OF_TEXT\n"


# The harness (tools/testbed-host/harness.sh) starts and waits for vduse-net;
# its log is /tmp/vduse-net0.err.
VDUSE_START = """. "$MICROVM_HARNESS"
h_vduse_start net0 --loopback --iotlb-dump /tmp/iotlb >/dev/null
echo '@@section vduse-ready'; cat /tmp/vduse-net0.out
"""
# Each IOTLB rebuild reaches vduse-net as one VDUSE_UPDATE_IOTLB request,
# which it logs as "iotlb update #N [first,last]".
REBUILDS = "grep -cE 'iotlb update #[0-9]+ \\[' /tmp/vduse-net0.err"
RANGES = "grep -c '^0x' /tmp/iotlb"
VDUSE_STOP = """h_vduse_stop net0
echo '@@section vduse-log'; grep -v '^vduse-net:   iotlb 0x' /tmp/vduse-net0.err | tail -40
"""


# ---------------------------------------------------------------- boot

BOOT_GUEST_CMD = "sleep 2"   # keeps the guest up while counters are read at ready


def boot_argv(vmm: Vmm, memory_mib, cpus, net=True):
    if vmm.is_qemu:
        return vmms.qemu_argv(vmm, vmms.BOOT_MACHINE[vmm.peer], memory_mib, cpus, BOOT_GUEST_CMD)
    return vmms.project_argv(vmm, memory_mib, cpus, BOOT_GUEST_CMD if net else None, net=net, api=net)


def boot_script(vmm: Vmm, memory_mib, cpus, runs=1, net=True):
    """The guest boots `runs` times under microvm-boot-timer; at the ready
    line the device's rebuilds and the VMM's IOTLB messages are read."""
    argv = boot_argv(vmm, memory_mib, cpus, net)
    hook = "n=$BOOT_TIMER_RUN\n"
    if net:
        hook += f"{REBUILDS} > /tmp/ready.$n.rebuilds\n"
        hook += vmms.message_snapshot(vmm, "/tmp/ready.$n.messages") + "\n"
    guest_ram = " ".join(f"--guest-ram {name}" for name in vmms.GUEST_RAM_MEMFDS)
    script = VDUSE_START if net else ""
    script += f"cat > /tmp/on-ready.sh <<'@@END_OF_HOOK'\n{hook}@@END_OF_HOOK\n"
    script += _quoted_heredoc("command", vmms.shell(argv))
    script += (f"microvm-boot-timer --runs {runs} {guest_ram} --on-ready 'sh /tmp/on-ready.sh' -- "
               f"{vmms.shell(argv)} >/tmp/timer.json 2>/tmp/vmm.err\n")
    script += "echo '@@section timer'; cat /tmp/timer.json\n"
    if net:
        script += (f"for n in $(seq 0 {runs - 1}); do echo \"@@section rebuilds-$n\"; cat /tmp/ready.$n.rebuilds; "
                   "echo \"@@section messages-$n\"; cat /tmp/ready.$n.messages; done\n")
    script += "echo '@@section vmm-stderr'; tail -30 /tmp/vmm.err\n"
    if net:
        script += VDUSE_STOP
    return script, vmms.shell(argv)


def _tail(text, lines=12):
    return "\n".join((text or "").strip().splitlines()[-lines:])


def parse_boot(run, runs=1, net=True):
    """[metrics per boot] of a boot_script run; ScenarioError if any failed."""
    timer = [json.loads(l) for l in (run.section("timer") or "").splitlines() if l.startswith("{")]
    if len(timer) != runs:
        raise ScenarioError(f"{len(timer)} of {runs} boots reported (test host exit {run.status}); "
                            f"VMM stderr: {_tail(run.section('vmm-stderr'))}")
    out = []
    for n, t in enumerate(timer):
        if t["ready_ms"] is None or t["exit_status"] != 0:
            raise ScenarioError(f"boot {n}: ready line {'seen' if t['ready_ms'] else 'never seen'}, "
                                f"exit status {t['exit_status']}; VMM stderr: {_tail(run.section('vmm-stderr'))}")
        m = {
            "ready_ms": t["ready_ms"],
            "exit_ms": t["exit_ms"],
            "peak_rss_kib": t["peak_hwm_kib"],
            "peak_rss_outside_guest_ram_kib": t["peak_rss_private_kib"],
            "rss_at_ready_kib": t["rss_at_ready_kib"],
            "rss_anon_at_ready_kib": t["rss_anon_at_ready_kib"],
        }
        if net:
            try:
                m["device_iotlb_rebuilds"] = int(run.section(f"rebuilds-{n}").strip())
                messages = vmms.parse_messages(run.section(f"messages-{n}"))
            except (ValueError, KeyError, AttributeError, json.JSONDecodeError) as e:
                raise ScenarioError(f"boot {n}: counters at ready unreadable ({e}): "
                                    f"{run.section(f'messages-{n}')!r}")
            m["iotlb_messages"] = messages.pop("total")
            m["iotlb_messages_by_kind"] = messages
        out.append(m)
    return out


BOOT_METRICS = [
    # (key, label, unit, lower is better)
    ("ready_ms", "VMM start to guest ready", "ms"),
    ("peak_rss_kib", "peak RSS (VmHWM, guest RAM touched included)", "KiB"),
    ("peak_rss_outside_guest_ram_kib", "peak RSS outside guest RAM", "KiB"),
    ("rss_anon_at_ready_kib", "RssAnon at ready (the VMM's own memory)", "KiB"),
    ("device_iotlb_rebuilds", "device IOTLB rebuilds at ready (vduse-net)", "count"),
    ("iotlb_messages", "IOTLB messages at ready", "count"),
]


# ---------------------------------------------------------------- hotplug

HOTPLUG_BOOT_MIB = 256
HOTPLUG_MAX_MIB = 1024
MIB = 1 << 20
# (name, what, the project's memory-resize argument, QEMU's QMP steps)
HOTPLUG_STEPS = [
    ("plug1", "plug 128 MiB", "128M", [
        {"execute": "object-add", "arguments": {"qom-type": "memory-backend-memfd", "id": "dimm1mem",
                                                "size": 128 * MIB, "share": True}},
        {"execute": "device_add", "arguments": {"driver": "pc-dimm", "id": "dimm1", "memdev": "dimm1mem"}},
    ]),
    ("plug2", "plug 256 MiB more", "384M", [
        {"execute": "object-add", "arguments": {"qom-type": "memory-backend-memfd", "id": "dimm2mem",
                                                "size": 256 * MIB, "share": True}},
        {"execute": "device_add", "arguments": {"driver": "pc-dimm", "id": "dimm2", "memdev": "dimm2mem"}},
    ]),
    ("unplug", "unplug all 384 MiB", "0", [
        {"execute": "device_del", "arguments": {"id": "dimm2"}},
        {"execute": "device_del", "arguments": {"id": "dimm1"}},
        "event:DEVICE_DELETED",
        "event:DEVICE_DELETED",
    ]),
]
HOTPLUG_GUEST_CMD = "sleep 3600"
QMP_TIMEOUT = 15


def _wait_ready(log):
    return (f"h_wait_console '{READY}' 300 'the guest to boot to its ready line'\n"
            f"echo '@@section ready'; grep -c '{READY}' {log}\n")


def _snapshot(vmm, n):
    return (f"echo '@@section rebuilds-{n}'; {REBUILDS}\n"
            f"echo '@@section ranges-{n}'; {RANGES}\n"
            f"{vmms.message_snapshot(vmm, '/tmp/messages')}\n"
            f"echo '@@section messages-{n}'; cat /tmp/messages\n")


def hotplug_argv(vmm, virtio_mem=False):
    if not vmm.is_qemu:
        return vmms.project_argv(vmm, HOTPLUG_BOOT_MIB, 1, HOTPLUG_GUEST_CMD, hotplug_mib=HOTPLUG_MAX_MIB)
    extra = []
    if virtio_mem:
        extra = ["-object", f"memory-backend-memfd,id=vmem0mem,size={HOTPLUG_MAX_MIB}M,share=on",
                 "-device", "virtio-mem-pci,id=vmem0,memdev=vmem0mem,block-size=2M,requested-size=0"]
    return vmms.qemu_argv(vmm, "pc", HOTPLUG_BOOT_MIB, 1, HOTPLUG_GUEST_CMD,
                          maxmem_mib=HOTPLUG_BOOT_MIB + 2 * HOTPLUG_MAX_MIB, extra=extra)


def hotplug_script(vmm: Vmm):
    """The same plug/plug/unplug sequence: virtio-mem for this project; for
    QEMU first virtio-mem (expected to be refused next to vhost-vdpa), then
    DIMMs, its best alternative. After each step: the device's rebuilds, the
    ranges it maps, the VMM's messages; each step timed by microvm-time."""
    commands = {}
    script = VDUSE_START
    if vmm.is_qemu:
        vmem = vmms.shell(hotplug_argv(vmm, virtio_mem=True))
        commands["virtio-mem"] = vmem
        script += _quoted_heredoc("virtio-mem-command", vmem)
        script += f"timeout 60 {vmem} >/dev/null 2>/tmp/vmem.err; st=$?; echo '@@section virtio-mem-status'; echo $st\n"
        script += "echo '@@section virtio-mem-stderr'; cat /tmp/vmem.err\n"
        script += f"rm -f {vmms.QEMU_TRACE_LOG} {vmms.QMP_SOCKET}\n"
    argv = vmms.shell(hotplug_argv(vmm))
    commands["hotplug"] = argv
    script += _quoted_heredoc("command", argv)
    script += f"h_vmm_start {argv}\n"
    script += _wait_ready("/tmp/console.log")
    script += _snapshot(vmm, 0)
    for n, (name, _what, size, qmp_steps) in enumerate(HOTPLUG_STEPS, 1):
        if vmm.is_qemu:
            args = " ".join(vmms.shlex.quote(s if isinstance(s, str) else json.dumps(s)) for s in qmp_steps)
            client = f"microvm-qmp --socket {vmms.QMP_SOCKET} --timeout {QMP_TIMEOUT} {args}"
        else:
            client = f"microvm-ctl --socket {vmms.API_SOCKET} memory-resize {size} --timeout 120"
        commands[name] = client
        script += f"microvm-time --out /tmp/time.{n} -- {client} >/tmp/reply.{n} 2>&1\n"
        script += f"echo '@@section time-{n}'; cat /tmp/time.{n}\necho '@@section reply-{n}'; cat /tmp/reply.{n}\n"
        script += _snapshot(vmm, n)
    if vmm.is_qemu:
        script += f"microvm-qmp --socket {vmms.QMP_SOCKET} '{{\"execute\":\"quit\"}}' >/dev/null 2>&1\n"
    script += "h_vmm_stop\n"
    script += "echo '@@section vmm-stderr'; tail -30 /tmp/vmm.err\n"
    script += "echo '@@section console-tail'; tail -15 /tmp/console.log\n"
    script += VDUSE_STOP
    return script, commands


def parse_hotplug(run, vmm: Vmm):
    """(metrics, notes): per step its time, and the device's rebuilds and the
    VMM's messages during it, plus the ranges mapped after it."""
    notes = {}
    if vmm.is_qemu:
        status = (run.section("virtio-mem-status") or "").strip()
        stderr = (run.section("virtio-mem-stderr") or "").strip()
        if status in ("124", "137", "143"):
            notes["virtio_mem"] = "accepted: QEMU started with virtio-mem-pci next to vhost-vdpa (not measured)"
        else:
            notes["virtio_mem"] = f"refused (exit {status}): {_tail(stderr, 3)}"
    if (run.section("ready") or "").strip() in ("", "0"):
        raise ScenarioError(f"the guest never printed its ready line (test host exit {run.status}); "
                            f"VMM stderr: {_tail(run.section('vmm-stderr'))}")

    def snap(n):
        try:
            return (int(run.section(f"rebuilds-{n}").strip()), int(run.section(f"ranges-{n}").strip()),
                    vmms.parse_messages(run.section(f"messages-{n}"))["total"])
        except (ValueError, KeyError, AttributeError, json.JSONDecodeError) as e:
            raise ScenarioError(f"counters after step {n} unreadable ({e})")

    metrics = {}
    before = snap(0)
    metrics["ranges_at_ready"] = before[1]
    for n, (name, _what, _size, _qmp) in enumerate(HOTPLUG_STEPS, 1):
        after = snap(n)
        try:
            timing = json.loads(run.section(f"time-{n}"))
        except (TypeError, json.JSONDecodeError):
            raise ScenarioError(f"step {name} was not timed")
        reply = (run.section(f"reply-{n}") or "").strip()
        done, why = _step_completed(vmm, reply, timing)
        metrics[f"{name}_ms"] = timing["wall_ms"] if done else None
        metrics[f"{name}_rebuilds"] = after[0] - before[0]
        metrics[f"{name}_ranges"] = after[1]
        metrics[f"{name}_messages"] = after[2] - before[2]
        if not done:
            notes[name] = why
        before = after
    return metrics, notes


def _step_completed(vmm, reply, timing):
    if not vmm.is_qemu:
        if timing["status"] == 0:
            return True, None
        return False, f"memory-resize failed: {_tail(reply, 3)}"
    for line in reply.splitlines():
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            return False, f"QMP client: {line}"
        if "reply" in msg and "error" in msg["reply"]:
            return False, f"QMP error: {msg['reply']['error'].get('desc')}"
        if msg.get("timeout"):
            return False, (f"no {msg['event']} within {QMP_TIMEOUT} s: the guest did not release the "
                           "DIMM (the project's guest kernel has no ACPI memory hotplug driver; "
                           "it is built for virtio-mem)")
    if timing["status"] != 0:
        return False, f"QMP client failed: {_tail(reply, 3)}"
    return True, None


HOTPLUG_METRICS = [("ranges_at_ready", "device map ranges at ready", "count")] + [
    m for name, what, _s, _q in HOTPLUG_STEPS for m in (
        (f"{name}_ms", f"{what}: time to complete", "ms"),
        (f"{name}_rebuilds", f"{what}: device IOTLB rebuilds", "count"),
        (f"{name}_messages", f"{what}: IOTLB messages", "count"),
        (f"{name}_ranges", f"{what}: device map ranges after", "count"),
    )]


# ---------------------------------------------------------------- viommu

VIOMMU_MEMORY_MIB = 512
VIOMMU_CPUS = 1
# The guest's two ways of driving the IOMMU: lazy (Linux's default, unmaps
# flushed per flush-queue period) and strict (a sync after every unmap).
VIOMMU_MODES = {"lazy": "", "strict": "iommu.strict=1"}
VIOMMU_TCP = "192.0.2"

# Bounds per VM and guest mode. In the test host a guest is ready within
# ~15 s and a 1 MiB window takes 15-60 s; the bounds only stop a wedged guest
# from holding the test host until its own timeout (which would lose every
# section of the run). They add up (viommu_host_timeout), so a test host that
# outlives them has stopped itself.
VIOMMU_READY_LIMIT_S = 120
VIOMMU_WINDOW_LIMIT_S_PER_MIB = 300
VIOMMU_GO_TRIES = 24
VIOMMU_GO_TRY_S = 5           # each try's own limit; tries are 0.2 s apart
VIOMMU_POWEROFF_LIMIT_S = 60


def viommu_window_limit(transfer_mib):
    return VIOMMU_WINDOW_LIMIT_S_PER_MIB * max(1, transfer_mib)


def viommu_host_timeout(vmm_count, transfer_mib):
    """The test host timeout of viommu_script: every bounded step of every VM,
    plus the test host's own start."""
    snapshots = 2 * 20  # the VMM's counters before and after (microvm-ctl waits 15 s at most)
    go = VIOMMU_GO_TRIES * (VIOMMU_GO_TRY_S + 1)  # + the pause and the liveness check, rounded up
    per_mode = (VIOMMU_READY_LIMIT_S + 2 * go + viommu_window_limit(transfer_mib)
                + VIOMMU_POWEROFF_LIMIT_S + snapshots)
    return 120 + vmm_count * len(VIOMMU_MODES) * per_mode

# The guest brings its link up, says it is ready, waits for the host's go,
# then sends a TCP stream and a ping burst, says done, and waits for the
# host's second go before it powers off (which ends every VMM here).
VIOMMU_GUEST = """ip link set eth0 up && ip addr add {net}.2/24 dev eth0
ping -c 3 {net}.1 >/dev/null
echo viommu-ready
wait_go
dd if=/dev/zero bs=64k count={blocks} 2>/dev/null | nc {net}.1 5001
ping -c {pings} -i 0.02 -s 1000 {net}.1 | tail -2
echo viommu-done
wait_go
"""

VIOMMU_HOST_START = f""". "$MICROVM_HARNESS"
h_vduse_start net0 --tap tap0 >/dev/null
echo '@@section vduse-ready'; cat /tmp/vduse-net0.out
ip addr add {VIOMMU_TCP}.1/24 dev tap0
# Finished rebuilds only: vduse-net logs "iotlb update #N: E entries ..." once one is served.
rebuilds() {{ grep -cE 'iotlb update #[0-9]+: ' /tmp/vduse-net0.err; }}
now() {{ cut -d' ' -f1 /proc/uptime; }}
# wait_for PATTERN SECONDS: until the console shows PATTERN, the VMM exits or time runs out.
wait_for() {{ h_wait_console "$1" "$2" "the guest to print $1"; }}
# go: the host's signal to the guest, each try and the number of tries bounded.
go() {{ H_GO_TRIES={VIOMMU_GO_TRIES} H_GO_TRY_S={VIOMMU_GO_TRY_S} h_go {VIOMMU_TCP}.2; }}
vmm_alive() {{ h_alive "$(h_vmm_pid)"; }}
"""


def viommu_argv(vmm, mode, guest_cmd):
    extra = VIOMMU_MODES[mode]
    if vmm.is_qemu:
        return vmms.qemu_argv(vmm, "pc", VIOMMU_MEMORY_MIB, VIOMMU_CPUS, guest_cmd, iommu=True,
                              cmdline_extra=extra)
    return vmms.project_argv(vmm, VIOMMU_MEMORY_MIB, VIOMMU_CPUS, guest_cmd, iommu=True,
                             cmdline_extra=extra)


def viommu_script(vmm_list, transfer_mib, pings):
    """One test host: vduse-net on a TAP, then for each VMM and guest mode one
    VM that streams `transfer_mib` MiB of TCP and `pings` pings to the test
    host. Around the window (host's go → guest's viommu-done): the device's
    rebuilds, the VMM's IOTLB messages and vIOMMU requests, the clock.
    Sections are named VMM-MODE-*. Returns (script, {vmm id: {mode: command}})."""
    guest = VIOMMU_GUEST.format(net=VIOMMU_TCP, blocks=transfer_mib * 16, pings=pings)
    script = VIOMMU_HOST_START
    commands = {}
    for vmm in vmm_list:
        commands[vmm.id] = {}
        for mode in VIOMMU_MODES:
            tag = f"{vmm.id}-{mode}"
            argv = vmms.shell(viommu_argv(vmm, mode, guest))
            commands[vmm.id][mode] = argv
            script += _quoted_heredoc(f"{tag}-command", argv)
            script += (f"rm -f {vmms.API_SOCKET} {vmms.QMP_SOCKET} {vmms.QEMU_TRACE_LOG}; : >/tmp/console.log\n"
                       f"microvm-tcp-sink --port 5001 --bytes {transfer_mib << 20} >/tmp/sink.out 2>/tmp/sink.err &\n"
                       "SINK=$!\n"
                       f"h_vmm_start {argv}\n"
                       f"wait_for viommu-ready {VIOMMU_READY_LIMIT_S}; echo '@@section {tag}-ready'; grep -c viommu-ready /tmp/console.log\n"
                       # No window for a guest that never got its link up.
                       "if grep -q viommu-ready /tmp/console.log; then\n"
                       f"{vmms.message_snapshot(vmm, '/tmp/before')}\n"
                       "r0=$(rebuilds); t0=$(now)\n"
                       "go\n"
                       f"wait_for viommu-done {viommu_window_limit(transfer_mib)}\n"
                       "t1=$(now); r1=$(rebuilds)\n"
                       f"{vmms.message_snapshot(vmm, '/tmp/after')}\n"
                       f"echo '@@section {tag}-window'; echo \"$t0 $t1 $r0 $r1\"\n"
                       f"echo '@@section {tag}-before'; cat /tmp/before\n"
                       f"echo '@@section {tag}-after'; cat /tmp/after\n"
                       f"echo '@@section {tag}-sink'; cat /tmp/sink.out\n"
                       f"echo '@@section {tag}-ping'; grep -E 'packets transmitted|round-trip' /tmp/console.log\n"
                       # Done: the second go lets the guest power off.
                       "if grep -q viommu-done /tmp/console.log; then go; n=0\n"
                       f"  while vmm_alive && [ $n -lt {VIOMMU_POWEROFF_LIMIT_S * 5} ]; do n=$((n+1)); sleep 0.2; done\n"
                       "fi\nfi\n"
                       # Whether the VM ended on its own before it was done (a guest
                       # reset or poweroff) rather than hanging until a limit.
                       f"grep -q viommu-done /tmp/console.log || vmm_alive || echo '@@section {tag}-ended-early'\n"
                       "h_vmm_stop; st=$(h_get vmm_status)\n"
                       "kill $SINK 2>/dev/null; wait $SINK 2>/dev/null\n"
                       f"echo '@@section {tag}-exit'; echo $st\n"
                       f"echo '@@section {tag}-vmm-stderr'; grep -v 'Fail to invalidate device iotlb' /tmp/vmm.err | tail -20\n"
                       f"echo '@@section {tag}-console-tail'; tail -8 /tmp/console.log\n"
                       # A VM that did not finish: what the device and the test host's
                       # kernel said last (a device marked broken, a kernel warning).
                       "grep -q viommu-done /tmp/console.log || { "
                       f"echo '@@section {tag}-device-log'; grep -v '^vduse-net:   ' /tmp/vduse-net0.err | tail -6; "
                       "dmesg | tail -4; }\n")
    script += VDUSE_STOP
    return script, commands


def parse_viommu(run, vmm: Vmm, transfer_mib):
    """Per guest mode, over the window: throughput, the vIOMMU's MAP/UNMAP
    requests, the device's IOTLB rebuilds (vduse-net) and requests per
    rebuild (how many requests each device batch carried), the VMM's IOTLB
    messages, ping round trip. ScenarioError if a mode did not complete."""
    metrics = {}
    for mode in VIOMMU_MODES:
        tag = f"{vmm.id}-{mode}"
        stderr = _tail(run.section(f"{tag}-vmm-stderr"), 6)
        console = run.section(f"{tag}-console-tail") or ""
        last_words = (f"console: {_tail(console, 4)}; device and test host: "
                      f"{_tail(run.section(f'{tag}-device-log'), 10)}")
        # The VM ended on its own before it was done: whatever the counters
        # say after that is no window.
        ended_early = run.section(f"{tag}-ended-early") is not None
        guest_reset = ended_early and not any(m in console for m in GUEST_CRASH_MARKERS)
        if (run.section(f"{tag}-ready") or "").strip() in ("", "0"):
            raise ScenarioError(f"{mode}: the guest never reported its link ready (test host exit "
                                f"{run.status}); VMM stderr: {stderr}; {last_words}", guest_reset)
        if ended_early or not (run.section(f"{tag}-after") or "").strip():
            raise ScenarioError(f"{mode}: the VM ended inside the window (VMM exit "
                                f"{(run.section(f'{tag}-exit') or '?').strip()}); VMM stderr: {stderr}; "
                                f"{last_words}", guest_reset)
        try:
            t0, t1, r0, r1 = run.section(f"{tag}-window").split()
            seconds = float(t1) - float(t0)
            rebuilds = int(r1) - int(r0)
            before, after = run.section(f"{tag}-before"), run.section(f"{tag}-after")
            requests = vmms.parse_iommu_requests(after) - vmms.parse_iommu_requests(before)
            messages = vmms.parse_messages(after)["total"] - vmms.parse_messages(before)["total"]
            sink = json.loads(run.section(f"{tag}-sink"))
        except (ValueError, KeyError, AttributeError, TypeError, json.JSONDecodeError) as e:
            raise ScenarioError(f"{mode}: counters around the window unreadable ({e}); VMM stderr: {stderr}")
        if sink.get("bytes") != transfer_mib << 20 or not sink.get("seconds"):
            raise ScenarioError(f"{mode}: the TCP stream did not arrive complete ({sink}); VMM stderr: {stderr}")
        ping = run.section(f"{tag}-ping") or ""
        loss = re.search(r"(\d+)% packet loss", ping)
        rtt = re.search(r"= [0-9.]+/([0-9.]+)/", ping)
        if seconds <= 0 or requests <= 0 or not loss:
            raise ScenarioError(f"{mode}: no window, no vIOMMU request or no ping summary "
                                f"(window {seconds:.2f} s, {requests} requests, ping {ping.strip()!r})")
        metrics.update({
            f"{mode}_tcp_kib_per_s": round(sink["bytes"] / sink["seconds"] / 1024, 1),
            f"{mode}_window_s": round(seconds, 2),
            f"{mode}_requests": requests,
            f"{mode}_device_rebuilds": rebuilds,
            f"{mode}_rebuilds_per_s": round(rebuilds / seconds, 1),
            f"{mode}_requests_per_rebuild": round(requests / rebuilds, 2) if rebuilds else None,
            f"{mode}_iotlb_messages": messages,
            f"{mode}_ping_loss_pct": int(loss.group(1)),
            f"{mode}_ping_avg_ms": float(rtt.group(1)) if rtt else None,
        })
    return metrics


VIOMMU_METRICS = [m for mode in VIOMMU_MODES for m in (
    (f"{mode}_tcp_kib_per_s", f"{mode}: TCP throughput, guest to test host", "KiB/s"),
    (f"{mode}_window_s", f"{mode}: window (stream and pings)", "s"),
    (f"{mode}_requests", f"{mode}: vIOMMU MAP+UNMAP requests in the window", "count"),
    (f"{mode}_device_rebuilds", f"{mode}: device IOTLB rebuilds in the window (vduse-net)", "count"),
    (f"{mode}_rebuilds_per_s", f"{mode}: device IOTLB rebuilds per second", "1/s"),
    (f"{mode}_requests_per_rebuild", f"{mode}: vIOMMU requests per device rebuild (per batch the device sees)", "count"),
    (f"{mode}_iotlb_messages", f"{mode}: IOTLB messages in the window", "count"),
    (f"{mode}_ping_avg_ms", f"{mode}: ping round trip, average", "ms"),
    (f"{mode}_ping_loss_pct", f"{mode}: ping loss", "%"),
)]


# ---------------------------------------------------------------- parents

# The vDPA parents the `parents` scenario puts under each VMM, side by side.
# model: how the parent applies IOTLB messages. A set_map parent rebuilds its
# whole IOTLB per BATCH_END and per UPDATE/INVALIDATE outside a batch; a
# dma_map parent gets one dma_map/dma_unmap call per UPDATE/INVALIDATE and
# ignores the batch brackets (the kernel's vhost-vdpa only calls set_map at
# BATCH_END).
PARENTS = {
    "vduse": {"label": "vduse-net (VDUSE, set_map)", "model": "set_map"},
    "vdpa_sim_setmap": {"label": "vdpa_sim_net, set_map", "model": "set_map", "load": ""},
    "vdpa_sim_dmamap": {"label": "vdpa_sim_net, dma_map (batch_mapping=0)", "model": "dma_map",
                        "load": "batch_mapping=0"},
}
SIM_MAC = "52:54:00:aa:bb:cc"
PARENTS_BOOT_MIB = 256
PARENTS_PINGS = 50
# The guest drives itself (vdpa_sim_net has no far end and the host no way to
# reach the guest): it says ready and waits PARENTS_SETTLE_S while the host
# reads the VMM's counters, sends its frames, says done and waits again for
# the host's second reading. Frames: 3 broadcast ARP requests and a burst of
# pings to the broadcast address, every one looped back to RX by every
# parent (vduse-net --loopback loops all), which the guest counts.
PARENTS_SETTLE_S = 8
PARENTS_GUEST = """for f in /proc/sys/net/ipv6/conf/*/disable_ipv6; do echo 1 > $f; done
ip link set eth0 up && ip addr add 192.0.2.2/24 dev eth0
rx() {{ cat /sys/class/net/eth0/statistics/rx_packets; }}
sleep 1
echo parents-ready
sleep {settle}
a=$(rx)
arping -c 3 -w 4 -I eth0 192.0.2.9 >/dev/null 2>&1
ping -c {pings} -i 0.02 -w 6 -s 1000 192.0.2.255 >/dev/null 2>&1
sleep 2
echo "parents-done rx=$(($(rx) - a))"
sleep {settle}
"""
PARENTS_BOOT_GUEST = f"sleep {PARENTS_SETTLE_S}"
PARENTS_READY_LIMIT_S = 180
PARENTS_WINDOW_LIMIT_S = 180
PARENTS_EXIT_LIMIT_S = 60
# The device node as the script knows it: each parent's node is created in
# the test host, so the command lines name it by a shell variable.
DEV_PLACEHOLDER = "__VDPA_NODE__"


def parents_host_timeout(parent_count):
    per_vm = PARENTS_READY_LIMIT_S + PARENTS_WINDOW_LIMIT_S + PARENTS_EXIT_LIMIT_S + 2 * 20
    return 120 + parent_count * (60 + 3 * per_vm)


def device_updates(counts, unbatched, model):
    """What the parent did with the messages `counts` (parse_messages of the
    VMM's counters or trace), `unbatched` of them UPDATE/INVALIDATE outside a
    batch: a set_map parent rebuilds its IOTLB once per BATCH_END and once per
    unbatched UPDATE/INVALIDATE; a dma_map parent makes one call per
    UPDATE/INVALIDATE (an INVALIDATE over several of its mappings makes one
    dma_unmap per mapping: the count is a floor there)."""
    if model == "set_map":
        return counts["batch_end"] + unbatched
    if model == "dma_map":
        return counts["iotlb_update"] + counts["iotlb_invalidate"]
    raise ValueError(f"unknown mapping model {model!r}")


def parents_argv(vmm, phase, guest_cmd, parent):
    """phase: boot (identity-mapped device, no vIOMMU) or a VIOMMU_MODES key.
    QEMU behind the vIOMMU on vdpa_sim_net (which offers CTRL_VQ) hides the
    control queue from the guest, as this project does (vmms.QEMU_NO_CTRL_VQ:
    with it, QEMU 10 cannot start vhost there); at boot it keeps its
    default and shadows the control queue in the device's second address
    space."""
    if phase == "boot":
        if vmm.is_qemu:
            return vmms.qemu_argv(vmm, vmms.BOOT_MACHINE[vmm.peer], PARENTS_BOOT_MIB, 1, guest_cmd,
                                  vdpa=DEV_PLACEHOLDER)
        return vmms.project_argv(vmm, PARENTS_BOOT_MIB, 1, guest_cmd, vdpa=DEV_PLACEHOLDER)
    extra = VIOMMU_MODES[phase]
    if vmm.is_qemu:
        return vmms.qemu_argv(vmm, "pc", VIOMMU_MEMORY_MIB, VIOMMU_CPUS, guest_cmd, iommu=True,
                              cmdline_extra=extra, vdpa=DEV_PLACEHOLDER,
                              no_ctrl_vq=parent != "vduse")
    return vmms.project_argv(vmm, VIOMMU_MEMORY_MIB, VIOMMU_CPUS, guest_cmd, iommu=True,
                             cmdline_extra=extra, vdpa=DEV_PLACEHOLDER)


PARENTS_PHASES = ["boot"] + list(VIOMMU_MODES)


def _parent_setup(parent):
    if parent == "vduse":
        return "dev=$(h_vduse_start net0 --loopback) || h_fail 'vduse-net to start'\n"
    return (f"h_parent_load vdpa_sim_net {PARENTS[parent]['load']} || h_fail 'vdpa_sim_net ({parent}) to load'\n"
            f"dev=$(h_vdpa_add vdpasim_net sim0 --mac {SIM_MAC}) || h_fail 'a vdpasim_net device ({parent})'\n")


def _parent_teardown(parent):
    if parent == "vduse":
        return "h_vduse_stop net0\n"
    return "h_vdpa_del sim0\n"


def parents_script(vmm: Vmm, parents, pings=PARENTS_PINGS):
    """One test host, one VMM: for each parent in turn, its device, then a VM
    read at its ready line (boot) and a VM behind the vIOMMU per guest mode
    whose frames are counted around a window. Sections PARENT-PHASE-*.
    Returns (script, {parent: {phase: command}})."""
    guest = PARENTS_GUEST.format(settle=PARENTS_SETTLE_S, pings=pings)
    script = ('. "$MICROVM_HARNESS"\n' + vmms.QEMU_UNBATCHED_FN +
              "rebuilds() { n=$(grep -cE 'iotlb update #[0-9]+: ' /tmp/vduse-net0.err 2>/dev/null); echo ${n:-0}; }\n")
    commands = {}
    for parent in parents:
        commands[parent] = {}
        script += _parent_setup(parent)
        script += f"echo '@@section {parent}-node'; echo \"$dev\"\n"
        for phase in PARENTS_PHASES:
            tag = f"{parent}-{phase}"
            argv = vmms.shell(parents_argv(vmm, phase, PARENTS_BOOT_GUEST if phase == "boot" else guest, parent))
            commands[parent][phase] = argv.replace(DEV_PLACEHOLDER, "/dev/vhost-vdpa-N")
            run_argv = argv.replace(DEV_PLACEHOLDER, '"$dev"')
            ready, done = (READY, None) if phase == "boot" else ("parents-ready", "parents-done")
            script += _quoted_heredoc(f"{tag}-command", commands[parent][phase])
            script += (f"rm -f {vmms.API_SOCKET} {vmms.QMP_SOCKET} {vmms.QEMU_TRACE_LOG}\n"
                       f"h_vmm_start {run_argv}\n"
                       f"h_wait_console '{ready}' {PARENTS_READY_LIMIT_S} 'the {tag} guest to say {ready}'\n"
                       f"echo '@@section {tag}-ready'; grep -c '{ready}' /tmp/console.log\n"
                       f"{vmms.message_snapshot(vmm, '/tmp/before', unbatched=True)}\n"
                       "r0=$(rebuilds)\n")
            if done:
                script += f"h_wait_console '{done}' {PARENTS_WINDOW_LIMIT_S} 'the {tag} guest to say {done}'\n"
                script += (f"{vmms.message_snapshot(vmm, '/tmp/after', unbatched=True)}\n"
                           "r1=$(rebuilds)\n"
                           f"echo '@@section {tag}-before'; cat /tmp/before\n"
                           f"echo '@@section {tag}-after'; cat /tmp/after\n"
                           f"echo '@@section {tag}-rebuilds'; echo \"$r0 $r1\"\n"
                           f"echo '@@section {tag}-done'; grep -m1 '{done}' /tmp/console.log\n")
            else:
                # At ready: everything since the VMM started.
                script += (f"echo '@@section {tag}-after'; cat /tmp/before\n"
                           f"echo '@@section {tag}-rebuilds'; echo \"0 $r0\"\n")
            script += (f"st=$(h_vmm_wait {PARENTS_EXIT_LIMIT_S}) || st=timeout\n"
                       f"echo '@@section {tag}-exit'; echo $st\n"
                       f"echo '@@section {tag}-vmm-stderr'; grep -v 'Fail to invalidate device iotlb' /tmp/vmm.err | tail -12\n"
                       f"echo '@@section {tag}-console-tail'; tail -6 /tmp/console.log\n")
        script += _parent_teardown(parent)
    if any(p != "vduse" for p in parents):
        script += "h_parent_unload\n"
    return script, commands


def parse_parents(run, vmm: Vmm, parents):
    """Per parent and phase: the VMM's IOTLB messages and the device IOTLB
    updates they mean on that parent (device_updates), at the boot VM's
    ready line and, behind the vIOMMU, over the window of each guest mode,
    with the guest's MAP/UNMAP requests and the frames that came back.
    vduse-net also counts its rebuilds itself (`rebuilds_counted`), a check
    of the derivation. Phases that failed are left out and named in the
    returned errors: (metrics, {tag: reason})."""
    metrics, errors = {}, {}
    for parent in parents:
        model = PARENTS[parent]["model"]
        for phase in PARENTS_PHASES:
            tag = f"{parent}-{phase}"
            stderr = _tail(run.section(f"{tag}-vmm-stderr"), 4)
            try:
                if (run.section(f"{tag}-ready") or "").strip() in ("", "0"):
                    raise ScenarioError(f"the guest never got ready; VMM stderr: {stderr}; console: "
                                        f"{_tail(run.section(f'{tag}-console-tail'), 3)}")
                after_text = run.section(f"{tag}-after")
                if not (after_text or "").strip():
                    raise ScenarioError(f"no counters after the window; VMM stderr: {stderr}")
                try:
                    after = vmms.parse_messages(after_text)
                    after_unbatched = vmms.parse_unbatched(after_text)
                    r0, r1 = (int(x) for x in run.section(f"{tag}-rebuilds").split())
                    if phase == "boot":
                        before = dict.fromkeys(after, 0)
                        before_unbatched, requests = 0, None
                    else:
                        before_text = run.section(f"{tag}-before")
                        before = vmms.parse_messages(before_text)
                        before_unbatched = vmms.parse_unbatched(before_text)
                        requests = vmms.parse_iommu_requests(after_text) - vmms.parse_iommu_requests(before_text)
                except (ValueError, KeyError, AttributeError, TypeError, json.JSONDecodeError) as e:
                    raise ScenarioError(f"counters unreadable ({e}); VMM stderr: {stderr}")
                delta = {k: after[k] - before[k] for k in after}
                updates = device_updates(delta, after_unbatched - before_unbatched, model)
                m = {"iotlb_messages": delta["total"], "device_updates": updates}
                if parent == "vduse":
                    m["rebuilds_counted"] = r1 - r0
                if phase != "boot":
                    done = re.search(r"parents-done rx=(\d+)", run.section(f"{tag}-done") or "")
                    if not done:
                        raise ScenarioError(f"the guest never said it was done; VMM stderr: {stderr}")
                    if requests is None or requests <= 0:
                        raise ScenarioError(f"no vIOMMU request in the window ({requests})")
                    if int(done.group(1)) == 0:
                        raise ScenarioError("no frame came back: the device never reached the guest's "
                                            f"buffers; VMM stderr: {stderr}")
                    m.update({
                        "requests": requests,
                        "rx_looped": int(done.group(1)),
                        "messages_per_request": round(delta["total"] / requests, 2),
                        "requests_per_update": round(requests / updates, 2) if updates else None,
                    })
                metrics.update({f"{parent}_{phase}_{k}": v for k, v in m.items()})
            except ScenarioError as e:
                errors[tag] = str(e)
    return metrics, errors


def parents_rows():
    """[(suffix, label, unit)]: the rows of the side-by-side table, one per
    phase and metric, the same for every parent (a parent lacking a row's
    metric shows a dash)."""
    out = []
    for phase in PARENTS_PHASES:
        where = "at ready" if phase == "boot" else "in the window"
        out += [(f"{phase}_iotlb_messages", f"{phase}: IOTLB messages {where}", "count"),
                (f"{phase}_device_updates", f"{phase}: device IOTLB updates {where} (set_map: rebuilds; "
                                            "dma_map: map/unmap calls), derived", "count"),
                (f"{phase}_rebuilds_counted", f"{phase}: rebuilds counted by vduse-net {where}", "count")]
        if phase != "boot":
            out += [(f"{phase}_requests", f"{phase}: guest MAP+UNMAP requests in the window", "count"),
                    (f"{phase}_messages_per_request", f"{phase}: IOTLB messages per request", "count"),
                    (f"{phase}_requests_per_update", f"{phase}: requests per device update", "count"),
                    (f"{phase}_rx_looped", f"{phase}: frames the device looped back to the guest", "count")]
    return out


def parents_metrics(parents):
    """(key, label, unit) per parent and row: the summary's metric list."""
    out = []
    for parent in parents:
        model = PARENTS[parent]["model"]
        for suffix, label, unit in parents_rows():
            if suffix.endswith("_rebuilds_counted") and parent != "vduse":
                continue
            if suffix.endswith("_device_updates"):
                what = "device IOTLB rebuilds" if model == "set_map" else "device map/unmap calls"
                label = label.split(": ")[0] + f": {what} (derived)"
            out.append((f"{parent}_{suffix}", label, unit))
    return out
