"""The VMMs compared and the exact command lines they run in the test host.

Every VMM boots the same guest (the project's kernel and initramfs, as the
test host holds them), with the same vCPUs and memory, and the same vDPA
device: vduse-net at /dev/vhost-vdpa-0. Guest RAM is a shared memfd for all
of them (VDUSE is a VA device and needs file-backed shared memory)."""

import base64
import shlex
from dataclasses import dataclass
from typing import Optional

GUEST = "/opt/microvm/guest"
KERNEL = GUEST + "/vmlinux"
INITRD = GUEST + "/initramfs.img"
BASE_CMDLINE = "console=ttyS0 reboot=k panic=1 quiet"
VDPA = "/dev/vhost-vdpa-0"
API_SOCKET = "/tmp/api.sock"
QMP_SOCKET = "/tmp/qmp.sock"
QEMU_TRACE_LOG = "/tmp/qemu-trace.log"
# QEMU's trace events for the vhost_msg_v2 records it writes to the vhost-vdpa
# fd (hw/virtio/vhost-vdpa.c): one event per write.
QEMU_IOTLB_EVENTS = {
    "vhost_vdpa_dma_map": "iotlb_update",
    "vhost_vdpa_dma_unmap": "iotlb_invalidate",
    "vhost_vdpa_listener_begin_batch": "batch_begin",
    "vhost_vdpa_listener_commit": "batch_end",
}
# QEMU's trace events for the guest's virtio-iommu requests
# (hw/virtio/trace-events): one event per MAP or UNMAP it serves.
QEMU_IOMMU_EVENTS = {"virtio_iommu_map": "map", "virtio_iommu_unmap": "unmap"}
# memfd names of guest RAM, left out of "RSS outside guest RAM".
GUEST_RAM_MEMFDS = ["microvm-guest-ram", "memory-backend-memfd"]


@dataclass(frozen=True)
class Vmm:
    id: str                     # project, project-unbatched, qemu10, qemu72
    label: str
    peer: Optional[str] = None  # tools/testbed peer carried in, for QEMU
    iotlb_batch: bool = True

    @property
    def is_qemu(self):
        return self.peer is not None


PROJECT = Vmm("project", "microvm")
PROJECT_UNBATCHED = Vmm("project-unbatched", "microvm, iotlb-batch=off", iotlb_batch=False)
PEERS = {
    "qemu10": Vmm("qemu10", "QEMU 10.0", peer="qemu10"),
    "qemu72": Vmm("qemu72", "QEMU 7.2", peer="qemu72"),
}

# The machine type each peer boots with: microvm where it carries the PCI
# vhost-vdpa device and the guest boots on it, else pc (q35 has reset the
# emulated test host in earlier tries).
BOOT_MACHINE = {"qemu72": "microvm", "qemu10": "pc"}
BOOT_MACHINE_WHY = {
    "qemu72": "microvm,pcie=on,acpi=on: boots the guest with the PCI vhost-vdpa device",
    "qemu10": ("pc: with -M microvm,pcie=on,acpi=on the guest hangs right after "
               "'ACPI: Core revision 20240827' (no progress in 90 s, in the test host); with "
               "acpi=off it boots but cannot discover the PCIe host bridge, so the vhost-vdpa "
               "device would be missing. q35 has reset the emulated test host before; pc boots."),
}


def guest_cmdline(guest_cmd, extra=""):
    return (BASE_CMDLINE + (f" {extra}" if extra else "") + " microvm.cmd="
            + base64.b64encode(guest_cmd.encode()).decode())


def project_argv(vmm, memory_mib, cpus, guest_cmd=None, hotplug_mib=None, net=True, api=True,
                 iommu=False, cmdline_extra="", vdpa=VDPA):
    memory = f"size={memory_mib}M" + (f",hotplug={hotplug_mib}M" if hotplug_mib else "")
    argv = ["microvm", "--kernel", KERNEL, "--initramfs", INITRD, "--cpus", str(cpus),
            "--memory", memory]
    if net:
        argv += ["--net", f"vdpa={vdpa}" + (",iommu=on" if iommu else "")
                 + ("" if vmm.iotlb_batch else ",iotlb-batch=off")]
    if api:
        argv += ["--api-socket", API_SOCKET]
    cmdline = guest_cmdline(guest_cmd, cmdline_extra) if guest_cmd is not None else BASE_CMDLINE
    return argv + ["--cmdline", cmdline, "--serial", "stdout"]


# microvm carries the PCI vhost-vdpa device with pcie=on (a GPEX host bridge);
# DIMM hotplug needs ACPI memory hotplug, which microvm lacks: pc has it.
MACHINES = {
    "microvm": "microvm,pcie=on,acpi=on,memory-backend=mem0",
    "pc": "pc,memory-backend=mem0",
}


# The guest's virtio-net without a control queue and what needs one (Linux
# refuses CTRL_RX, CTRL_VLAN, CTRL_MAC_ADDR, MQ, GUEST_ANNOUNCE without it):
# what this project's net layer shows the guest of a device offering
# CTRL_VQ. QEMU 10 needs it behind a vIOMMU on such a device (vdpa_sim_net):
# it shadows the control queue (SVQ), refuses "SVQ can not work while IOMMU
# enable" and falls back to userspace virtio, where no frame reaches the
# device.
QEMU_NO_CTRL_VQ = (",ctrl_vq=off,ctrl_rx=off,ctrl_vlan=off,ctrl_rx_extra=off,ctrl_mac_addr=off,"
                   "ctrl_guest_offloads=off,mq=off,guest_announce=off")


def qemu_argv(vmm, machine, memory_mib, cpus, guest_cmd, maxmem_mib=None, extra=(), iommu=False,
              cmdline_extra="", vdpa=VDPA, no_ctrl_vq=False):
    """`iommu`: the net device behind a virtio-iommu-pci (which pc carries, with
    an ACPI VIOT), with the IOMMU's MAP/UNMAP trace events on too.
    `no_ctrl_vq`: the guest gets no control queue (QEMU_NO_CTRL_VQ)."""
    memory = f"{memory_mib}M" + (f",slots=4,maxmem={maxmem_mib}M" if maxmem_mib else "")
    argv = [f"/opt/peers/{vmm.peer}/qemu", "-M", MACHINES[machine], "-accel", "kvm",
            "-cpu", "host", "-smp", str(cpus), "-m", memory,
            "-object", f"memory-backend-memfd,id=mem0,size={memory_mib}M,share=on",
            "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
            "-no-reboot", "-kernel", KERNEL, "-initrd", INITRD,
            "-append", guest_cmdline(guest_cmd, cmdline_extra)]
    if iommu:
        argv += ["-device", "virtio-iommu-pci"]
    argv += ["-netdev", f"vhost-vdpa,id=n0,vhostdev={vdpa}",
             "-device", "virtio-net-pci,netdev=n0,romfile="
             + (",iommu_platform=on,disable-legacy=on" if iommu else "")
             + (QEMU_NO_CTRL_VQ if no_ctrl_vq else ""),
             "-qmp", f"unix:{QMP_SOCKET},server=on,wait=off", "-D", QEMU_TRACE_LOG]
    for event in list(QEMU_IOTLB_EVENTS) + (list(QEMU_IOMMU_EVENTS) if iommu else []):
        argv += ["-trace", event]
    return argv + list(extra)


def shell(argv):
    return shlex.join(argv)


def message_snapshot(vmm, path, unbatched=False):
    """Shell that writes the IOTLB messages the VMM has sent so far to `path`:
    this project's `counters` (read with parse_messages); for QEMU one JSON
    object counted from its trace events (one event per write to the
    vhost-vdpa fd). `unbatched`: for QEMU also the UPDATE/INVALIDATE messages
    sent outside a BATCH_BEGIN … BATCH_END bracket (key "unbatched", by the
    shell function of QEMU_UNBATCHED_FN, which the script must define)."""
    if not vmm.is_qemu:
        return f"microvm-ctl --socket {API_SOCKET} counters > {path}"
    events = {**QEMU_IOTLB_EVENTS, **QEMU_IOMMU_EVENTS}
    parts = [f"\\\"{key}\\\":$(cat {QEMU_TRACE_LOG} 2>/dev/null | grep -c '{event} ')"
             for event, key in events.items()]
    if unbatched:
        parts.append("\\\"unbatched\\\":$(qemu_unbatched)")
    return f"echo \"{{{','.join(parts)}}}\" > {path}"


# The kernel's vhost-vdpa keeps one "in batch" flag per device: set by
# BATCH_BEGIN, cleared by BATCH_END; an UPDATE or INVALIDATE while it is
# clear reaches a set_map parent as a rebuild of its own. This walks QEMU's
# trace log in order, as the kernel sees the writes, and prints how many
# UPDATE/INVALIDATE messages came while no batch was open.
QEMU_UNBATCHED_AWK = ("/vhost_vdpa_listener_begin_batch /{b=1; next} "
                      "/vhost_vdpa_listener_commit /{b=0; next} "
                      "/vhost_vdpa_dma_(map|unmap) /{if (!b) u++} "
                      "END{print u+0}")
QEMU_UNBATCHED_FN = (f"qemu_unbatched() {{ if [ -f {QEMU_TRACE_LOG} ]; then "
                     f"awk '{QEMU_UNBATCHED_AWK}' {QEMU_TRACE_LOG}; else echo 0; fi; }}\n")


MESSAGE_KEYS = ("iotlb_update", "iotlb_invalidate", "batch_begin", "batch_end")


def parse_iommu_requests(text):
    """MAP + UNMAP requests the vIOMMU has served so far, from a
    message_snapshot file: this project's `counters` → iommu → requests (every
    status), or QEMU's virtio_iommu_map/unmap trace events."""
    import json
    data, _end = json.JSONDecoder().raw_decode(text.lstrip())
    if "iommu" in data:
        by_type = data["iommu"]["requests"]
        return sum(int(n) for kind in ("map", "unmap") for n in by_type.get(kind, {}).values())
    return int(data["map"]) + int(data["unmap"])


def parse_messages(text):
    """{iotlb_update, iotlb_invalidate, batch_begin, batch_end, total} from a
    message_snapshot file (either form)."""
    import json
    # The first JSON value: whatever follows it (a shell's job notice) is not ours.
    data, _end = json.JSONDecoder().raw_decode(text.lstrip())
    if "devices" in data:
        devices = data["devices"]
        if len(devices) != 1:
            raise ValueError(f"expected one vDPA device in counters, got {len(devices)}")
        data = devices[0]
    counts = {k: int(data[k]) for k in MESSAGE_KEYS}
    counts["total"] = sum(counts.values())
    return counts


def parse_unbatched(text):
    """UPDATE + INVALIDATE messages sent outside a batch so far, from a
    message_snapshot(..., unbatched=True) file. QEMU: its "unbatched" key (the
    trace log walked in order). This project: its engine brackets every
    non-empty transaction with BATCH_BEGIN … BATCH_END when the device acked
    IOTLB_BATCH and never otherwise (devices/src/dma/engine.rs), so either
    every message is in a batch (batch_begin > 0) or none is."""
    import json
    data, _end = json.JSONDecoder().raw_decode(text.lstrip())
    if "devices" not in data:
        return int(data["unbatched"])
    counts = parse_messages(text)
    if counts["batch_begin"] > 0:
        return 0
    return counts["iotlb_update"] + counts["iotlb_invalidate"]
