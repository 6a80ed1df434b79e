//! vDPA parents this project did not write, in one test host: the kernel's
//! vdpa_sim_net (set_map and dma_map, VA and PA), vdpa_sim_blk, and
//! qemu-storage-daemon's VDUSE block export, each presented to the guest
//! through `--vdpa path=...` as whatever device type it reports.
//!
//! vdpa_sim_net has no far end: it loops a frame back to its RX queue when
//! the frame is broadcast, multicast or addressed to its own MAC. So the
//! guest checks that its ARP broadcasts come back (rx_packets grows) and
//! that unicast frames to another MAC do not, before and after each change
//! (memory hotplug, a device reset). The guest drives itself: the host has
//! no network path to it, so the guest waits for what the host does (a
//! plug shows as MemTotal growing) with bounded loops of its own.

use e2e::host_script::guest_cmd_arg;
use e2e::{HostScript, MicrovmRun, SectionedRun, TestHostExtras};
use std::sync::OnceLock;

const SIM_MAC: &str = "52:54:00:aa:bb:cc";
/// A MAC that is not the device's. vdpa_sim_net (6.12) compares a frame's
/// destination with its own MAC by strncmp, which stops at the first zero
/// byte: any MAC starting 52:54:00 counts as its own. This one differs in
/// the first byte.
const OTHER_MAC: &str = "02:11:22:33:44:55";
/// The MAC the guest sets through the control queue: no zero byte (the
/// simulator's strncmp), and a first byte unlike the device's.
const NEW_MAC: &str = "02:aa:bb:cc:dd:ee";
const MIB: u64 = 1 << 20;
/// vdpa_sim_blk's RAM disk, in 512-byte sectors.
const SIM_BLK_SECTORS: u64 = 128 * MIB / 512;
/// The qemu-storage-daemon data disk's backing file.
const QSD_DISK_MIB: u64 = 64;
/// What the guest writes to each disk: 1 MiB of a known text at 4 KiB
/// block 256.
const PATTERN_CMD: &str = "yes microvm-block-pattern | head -c 1048576";
const PATTERN_BLOCK: u64 = 256;
/// Written by the guest into its disk-backed root file system.
const ROOT_MARKER: &str = "written-by-a-guest-booted-from-vdpa-blk";

/// Shell functions every net guest uses (the kernel command line that
/// carries them holds at most 2047 bytes, so no comments in the shell):
/// - `loop_check LABEL`: 3 ARP requests (broadcast: the simulator loops
///   them back), then 3 pings to 192.0.2.9, a static neighbour at another
///   MAC (no ARP), which must never come back. The simulator loops frames
///   from a kernel worker: 2 s let the last one arrive before counting.
///   IPv6 is off on every interface (its router and neighbour
///   solicitations are multicast and would come back at random moments).
/// - `reset_device`: driver unbind and bind of the NIC's PCI function.
/// - `wait_plug`: the host plugs memory when it sees `hotplug-wait`; the
///   guest waits (bounded) for MemTotal to grow.
fn guest_net_prelude() -> String {
    format!(
        "for f in /proc/sys/net/ipv6/conf/*/disable_ipv6; do echo 1 > $f; done
up() {{ ip link set eth0 up; ip addr add 192.0.2.2/24 dev eth0; arp -s 192.0.2.9 {OTHER_MAC}; }}
up
rx() {{ cat /sys/class/net/eth0/statistics/rx_packets; }}
mt() {{ sed -n 's/^MemTotal: *\\([0-9]*\\).*/\\1/p' /proc/meminfo; }}
loop_check() {{
a=$(rx); arping -c 3 -w 4 -I eth0 192.0.2.9 >/dev/null 2>&1; sleep 2; b=$(rx)
ping -c 3 -W 1 192.0.2.9 >/dev/null 2>&1; sleep 2; c=$(rx)
echo \"sim-rx $1 broadcast=$((b - a)) other=$((c - b))\"
}}
reset_device() {{
p=$(basename \"$(dirname \"$(readlink -f /sys/class/net/eth0/device)\")\")
echo $p > /sys/bus/pci/drivers/virtio-pci/unbind
echo $p > /sys/bus/pci/drivers/virtio-pci/bind
for i in $(seq 50); do [ -e /sys/class/net/eth0 ] && break; sleep 0.2; done
up
}}
wait_plug() {{
m0=$(mt); echo \"hotplug-wait memtotal=$m0\"
for i in $(seq 120); do [ \"$(mt)\" -gt $m0 ] && break; sleep 1; done
echo \"memtotal-after=$(mt)\"
}}
echo guest-mac=$(cat /sys/class/net/eth0/address)
"
    )
}

/// A microVM on one `--vdpa` device, API on `api`.
fn vm(
    memory: &'static str,
    device_var: &str,
    vdpa_options: &str,
    api: &str,
    guest: &str,
) -> MicrovmRun {
    let mut vm = MicrovmRun::new(1, memory);
    vm.cmdline_extra = format!("quiet {}", guest_cmd_arg(guest));
    vm.extra_args = format!("--vdpa path=\"${device_var}\"{vdpa_options} --api-socket {api}");
    vm
}

fn net_guest() -> String {
    format!(
        "{}loop_check boot
wait_plug
loop_check plugged
reset_device
loop_check reset
echo pause-point
sleep 10
loop_check resumed
echo guest-done
sleep 8",
        guest_net_prelude()
    )
}

/// The guest sets a new MAC with `ip link set eth0 address`: through the
/// control queue the VMM shadows, the command reaches vdpa_sim_net's own
/// control queue, whose address space (1) holds only the VMM's buffers.
/// `mc LABEL` counts what comes back of 3 pings to a static neighbour at
/// the new MAC and 3 to one at the old: the simulator loops back only
/// frames to the MAC in its config. The neighbours are set again each time:
/// a MAC change flushes even permanent ARP entries, and the broadcast ARP
/// requests that follow would loop back whatever the filter.
fn mac_guest() -> String {
    format!(
        "for f in /proc/sys/net/ipv6/conf/*/disable_ipv6; do echo 1 > $f; done
ip link set eth0 up; ip addr add 192.0.2.2/24 dev eth0
rx() {{ cat /sys/class/net/eth0/statistics/rx_packets; }}
mc() {{
arp -s 192.0.2.7 {SIM_MAC}; arp -s 192.0.2.8 {NEW_MAC}
a=$(rx); ping -c 3 -W 1 192.0.2.8 >/dev/null 2>&1; sleep 2; b=$(rx)
ping -c 3 -W 1 192.0.2.7 >/dev/null 2>&1; sleep 2; c=$(rx)
echo \"sim-mac $1 new=$((b - a)) old=$((c - b))\"
}}
mc before
ip link set eth0 address {NEW_MAC} && echo mac-set=ok || echo mac-set=failed
echo guest-mac=$(cat /sys/class/net/eth0/address)
mc after
echo guest-done
sleep 8"
    )
}

fn mac_scenario(script: &mut HostScript) {
    let api = "/tmp/api-mac.sock";
    let run = vm("256M", "dev_mac", "", api, &mac_guest());
    script
        .sh(&format!(
            "dev_mac=$(h_vdpa_add vdpasim_net sim0 --mac {SIM_MAC}) || h_step_failed 'a vdpasim_net device (mac)'"
        ))
        .section("mac-device-before", "vdpa-mgmt dev mac sim0")
        .sh(&format!("H_API={api}"))
        .microvm(&run)
        .wait_console("guest-done", 240, "the guest to change its MAC")
        .section("mac-device-after", "vdpa-mgmt dev mac sim0")
        .ctl_section("mac-info", "info")
        .section(
            "mac-maps",
            "grep microvm-shadow-cvq /proc/$(h_vmm_pid)/maps",
        )
        .wait_exit("mac", 60)
        .sh("h_vdpa_del sim0");
}

/// The net scenario on one vdpa_sim_net mode (the guest stays up 8 s
/// after `guest-done` for the host's last look at the VMM): loopback before and after a
/// plug of 128 MiB and after a device reset.
fn net_scenario(script: &mut HostScript, label: &str, load_args: &str, vdpa_options: &str) {
    let guest = net_guest();
    let api = format!("/tmp/api-{label}.sock");
    let run = vm("256M,hotplug=256M", "dev_sim", vdpa_options, &api, &guest);
    script
        .sh(&format!(
            "h_parent_load vdpa_sim_net {load_args} || h_step_failed 'vdpa_sim_net ({label}) to load'"
        ))
        .sh(&format!(
            "dev_sim=$(h_vdpa_add vdpasim_net sim0 --mac {SIM_MAC}) || h_step_failed 'a vdpasim_net device ({label})'"
        ))
        .section(&format!("{label}-node"), "echo \"$dev_sim\"")
        .sh(&format!("H_API={api}"))
        .microvm(&run)
        .wait_console("hotplug-wait", 240, &format!("the {label} guest to boot and loop frames"))
        .ctl_section(&format!("{label}-counters-boot"), "counters")
        .sh("vmm_pid=$(h_vmm_pid)")
        .section(
            &format!("{label}-pinned-boot"),
            "grep -E '^Vm(Pin|Lck):' /proc/$vmm_pid/status",
        )
        .ctl_section(
            &format!("{label}-resize"),
            "memory-resize 128M --timeout 120",
        )
        .wait_console("memtotal-after=", 180, &format!("the {label} guest to see the plug"))
        .ctl_section(&format!("{label}-info-plugged"), "info")
        .section(
            &format!("{label}-pinned-plugged"),
            "grep -E '^Vm(Pin|Lck):' /proc/$vmm_pid/status",
        )
        .wait_console("pause-point", 180, &format!("the {label} guest to reset its device"))
        // The VM paused while the guest sleeps: vdpa_sim suspends.
        .section(&format!("{label}-pause"), "h_ctl pause 2>&1; echo \"exit=$?\"")
        .ctl_section(&format!("{label}-info-paused"), "info")
        .section(
            &format!("{label}-paused-console"),
            "before=$(wc -l </tmp/console.log); sleep 2; echo \"lines $(( $(wc -l </tmp/console.log) - before ))\"",
        )
        .section(&format!("{label}-resume"), "h_ctl resume 2>&1; echo \"exit=$?\"")
        .wait_console("guest-done", 180, &format!("the {label} guest to loop frames after the resume"))
        .ctl_section(&format!("{label}-counters-end"), "counters")
        .wait_exit(label, 60)
        .sh("h_vdpa_del sim0");
}

fn block_guest() -> String {
    format!(
        "pattern() {{ {PATTERN_CMD}; }}
want=$(pattern | md5sum | cut -d' ' -f1)
for d in /sys/block/vd*; do
  n=${{d##*/}}; size=$(cat $d/size)
  echo \"disk $n sectors=$size ro=$(cat $d/ro)\"
  pattern | dd of=/dev/$n bs=4096 seek={PATTERN_BLOCK} conv=fsync 2>/dev/null || echo \"disk $n write-failed\"
  blockdev --flushbufs /dev/$n
  got=$(dd if=/dev/$n bs=4096 skip={PATTERN_BLOCK} count=256 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  [ \"$got\" = \"$want\" ] && echo \"disk $n readback=ok\" || echo \"disk $n readback=bad got=$got want=$want\"
done
echo guest-done
# The host reads the VMM's info now: stay up a little.
sleep 8"
    )
}

fn root_guest() -> String {
    format!("grep ' / ' /proc/mounts; echo {ROOT_MARKER} > /root/marker; sync; echo guest-done")
}

fn host_script() -> String {
    let mut script = HostScript::new();
    // --- net on vdpa_sim_net: set_map/VA, dma_map/VA behind the vIOMMU,
    // dma_map/PA (pinning: the VMM raises RLIMIT_MEMLOCK).
    net_scenario(&mut script, "setmap", "", "");
    mac_scenario(&mut script);
    net_scenario(&mut script, "dmamap-viommu", "batch_mapping=0", ",iommu=on");
    net_scenario(&mut script, "pa", "batch_mapping=0 use_va=0", "");
    script.sh("h_parent_unload || h_step_failed 'the vdpa_sim_net parent to unload'");

    // --- block: vdpa_sim_blk behind the vIOMMU, and a qemu-storage-daemon
    // VDUSE disk over a file of the test host, in one guest.
    let mut blk = MicrovmRun::new(1, "256M");
    blk.cmdline_extra = format!("quiet {}", guest_cmd_arg(&block_guest()));
    blk.extra_args = "--vdpa path=\"$dev_simblk\",iommu=on --vdpa path=\"$dev_qsd\" \
                      --api-socket /tmp/api-blk.sock"
        .to_string();
    script
        .sh("h_parent_load vdpa_sim_blk || h_step_failed 'vdpa_sim_blk to load'")
        .sh("dev_simblk=$(h_vdpa_add vdpasim_blk simblk0) || h_step_failed 'a vdpasim_blk device'")
        .sh(&format!(
            "dd if=/dev/zero of=/tmp/data.img bs=1M count={QSD_DISK_MIB} 2>/dev/null\n\
             dev_qsd=$(h_qsd_start data /tmp/data.img writable) || h_step_failed 'qemu-storage-daemon to export /tmp/data.img'"
        ))
        .section("blk-nodes", "echo \"simblk=$dev_simblk qsd=$dev_qsd\"")
        .sh("H_API=/tmp/api-blk.sock")
        .microvm(&blk)
        .wait_console("guest-done", 240, "the block guest to write and read its disks")
        .ctl_section("blk-info", "info")
        .wait_exit("blk", 60)
        .sh("h_qsd_stop data")
        .section(
            "blk-host-file",
            &format!(
                "echo \"want=$({PATTERN_CMD} | md5sum | cut -d' ' -f1)\"\n\
                 echo \"file=$(dd if=/tmp/data.img bs=4096 skip={PATTERN_BLOCK} count=256 2>/dev/null | md5sum | cut -d' ' -f1)\""
            ),
        );

    // --- a read-only export is refused before the guest starts.
    script
        .sh("dev_ro=$(h_qsd_start ro /tmp/data.img) || h_step_failed 'a read-only qemu-storage-daemon export'")
        .section(
            "blk-readonly",
            "microvm --kernel \"$MICROVM_GUEST_KERNEL\" --vdpa path=\"$dev_ro\" 2>&1; echo \"exit=$?\"",
        )
        .sh("h_qsd_stop ro");

    // --- a guest whose root file system is a qemu-storage-daemon disk.
    let mut root = MicrovmRun::new(1, "256M");
    root.initramfs_var = None;
    root.cmdline_extra = format!(
        "quiet root=/dev/vda rw init=/init {}",
        guest_cmd_arg(&root_guest())
    );
    root.extra_args = "--vdpa path=\"$dev_root\" --api-socket /tmp/api-root.sock".to_string();
    script
        .sh(
            "gunzip -c \"$MICROVM_GUEST_ROOTFS\" > /tmp/root.ext4 || h_step_failed 'the guest root file system image'\n\
             dev_root=$(h_qsd_start root /tmp/root.ext4 writable) || h_step_failed 'qemu-storage-daemon to export the root image'",
        )
        .sh("H_API=/tmp/api-root.sock")
        .microvm(&root)
        .wait_console("guest-done", 240, "the guest to boot from its vDPA root disk")
        .wait_exit("root", 60)
        .sh("h_qsd_stop root")
        .section(
            "root-image",
            &format!("grep -c {ROOT_MARKER} /tmp/root.ext4"),
        )
        .sh("h_parent_unload");
    script.build()
}

/// The guests' commands travel on the kernel command line, which the VMM
/// refuses above 2047 bytes: checked here without a test host.
#[test]
fn every_guest_command_fits_on_the_kernel_command_line() {
    for (name, guest) in [
        ("net", net_guest()),
        ("mac", mac_guest()),
        ("block", block_guest()),
        ("root", root_guest()),
    ] {
        let cmdline = format!(
            "console=ttyS0 reboot=k panic=1 quiet root=/dev/vda rw init=/init {}",
            guest_cmd_arg(&guest)
        );
        assert!(
            cmdline.len() <= 2047,
            "the {name} guest's command line is {} bytes",
            cmdline.len()
        );
    }
}

fn run() -> &'static SectionedRun {
    static RUN: OnceLock<SectionedRun> = OnceLock::new();
    RUN.get_or_init(|| {
        SectionedRun::in_test_host_with(
            "parents",
            host_script(),
            TestHostExtras {
                peers: &[],
                qsd: true,
            },
        )
    })
}

fn section(name: &str) -> &'static str {
    run().section(name)
}

fn json(name: &str) -> serde_json::Value {
    run().json(name)
}

/// The two counts `keys` of the guest's console line `CHECK LABEL k=v ...`.
fn console_counts(console: &str, check: &str, label: &str, keys: [&str; 2]) -> (u64, u64) {
    let line = console
        .lines()
        .find(|l| l.starts_with(&format!("{check} {label} ")))
        .unwrap_or_else(|| panic!("no {check} check {label}:\n{console}"));
    let field = |key: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {line}"))
    };
    (field(keys[0]), field(keys[1]))
}

/// (broadcast, other) frames that came back in the guest's check `label`.
fn loopback(console: &str, label: &str) -> (u64, u64) {
    console_counts(console, "sim-rx", label, ["broadcast", "other"])
}

/// Bytes a device's IOTLB holds, from its `info` entry.
fn iotlb_bytes(device: &serde_json::Value) -> u64 {
    device["iotlb"]
        .as_array()
        .unwrap_or_else(|| panic!("no iotlb entries: {device}"))
        .iter()
        .map(|e| e["size"].as_u64().unwrap_or(0))
        .sum()
}

fn kib_field(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {text}"))
}

fn assert_net_scenario(label: &str) {
    let console = section(&format!("{label}-console"));
    assert_eq!(
        section(&format!("{label}-exit")).trim(),
        "0",
        "{}\n{console}",
        section(&format!("{label}-stderr"))
    );
    assert!(
        console.contains(&format!("guest-mac={SIM_MAC}")),
        "the MAC given at vdpa dev add reaches the guest:\n{console}"
    );
    for check in ["boot", "plugged", "reset", "resumed"] {
        let (broadcast, other) = loopback(console, check);
        assert!(
            broadcast >= 3,
            "{label}/{check}: the guest's 3 ARP broadcasts came back {broadcast} times:\n{console}"
        );
        assert_eq!(
            other, 0,
            "{label}/{check}: frames to another MAC must not come back:\n{console}"
        );
    }
    let before: u64 = console
        .lines()
        .find_map(|l| l.strip_prefix("hotplug-wait memtotal="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{console}"));
    let after: u64 = console
        .lines()
        .find_map(|l| l.strip_prefix("memtotal-after="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{console}"));
    assert_eq!(
        after - before,
        128 * 1024,
        "{label}: MemTotal grew by the plug"
    );
    // The plugged block reached the device: its IOTLB holds more than
    // boot memory.
    let info = json(&format!("{label}-info-plugged"));
    assert_eq!(
        info["memory"]["hotplug"]["plugged_size"],
        128 * MIB,
        "{info}"
    );
    let counters = json(&format!("{label}-counters-end"));
    let device = &counters["devices"][0];
    assert!(
        device["resets"].as_u64().unwrap_or(0) >= 1,
        "{label}: the guest reset the device: {counters}"
    );
    // vdpa_sim keeps its IOTLB across a reset (IOTLB_PERSIST, bit 8): the
    // VMM acks it and replays nothing, and the frames after the reset
    // above came back through the mappings that persisted.
    let acked = e2e::hex(
        info["devices"][0]["backend_features"]
            .as_str()
            .unwrap_or_else(|| panic!("{info}")),
    );
    assert_ne!(acked & (1 << 8), 0, "{label}: IOTLB_PERSIST acked: {info}");
    assert_eq!(device["iotlb_replays"], 0, "{label}: {counters}");
    assert_pause_by_suspend(label, &acked);
}

/// The pause suspended the device (vdpa_sim offers SUSPEND and RESUME,
/// bits 4 and 5, and the VMM acks both), nothing ran while paused, and the
/// device looped frames again after the resume ("resumed" check above).
fn assert_pause_by_suspend(label: &str, acked: &u64) {
    assert_eq!(acked & 0x30, 0x30, "{label}: SUSPEND and RESUME acked");
    let pause = section(&format!("{label}-pause"));
    assert!(pause.contains("exit=0"), "{label}: pause:\n{pause}");
    assert!(
        pause.contains("\"stopped_by\": \"suspend\""),
        "{label}: pause:\n{pause}"
    );
    let info = json(&format!("{label}-info-paused"));
    assert_eq!(info["state"], "paused", "{info}");
    assert_eq!(info["devices"][0]["stopped"]["by"], "suspend", "{info}");
    assert_eq!(
        section(&format!("{label}-paused-console")).trim(),
        "lines 0",
        "{label}: the guest printed while paused"
    );
    let resume = section(&format!("{label}-resume"));
    assert!(
        resume.contains("exit=0") && resume.contains("\"running\""),
        "{label}: resume:\n{resume}"
    );
    let counters = json(&format!("{label}-counters-end"));
    assert_eq!(counters["devices"][0]["pauses"], 1, "{label}: {counters}");
    // SUSPEND kept the rings: no reset, no replay for the pause.
    assert_eq!(
        counters["devices"][0]["iotlb_replays"], 0,
        "{label}: {counters}"
    );
}

/// (new, old): frames to the new and the old MAC that came back in the
/// guest's check `label`.
fn mac_loopback(console: &str, label: &str) -> (u64, u64) {
    console_counts(console, "sim-mac", label, ["new", "old"])
}

#[test]
fn vdpa_sim_net_takes_the_guests_mac_through_its_own_control_queue_in_address_space_1() {
    let console = section("mac-console");
    assert_eq!(
        section("mac-exit").trim(),
        "0",
        "{}\n{console}",
        section("mac-stderr")
    );
    assert!(console.contains("mac-set=ok"), "{console}");
    assert!(
        console.contains(&format!("guest-mac={NEW_MAC}")),
        "{console}"
    );
    // The device's own config (read over vdpa netlink, not through the
    // VMM) holds the new MAC, and its filter moved with it.
    assert_eq!(section("mac-device-before").trim(), SIM_MAC);
    assert_eq!(section("mac-device-after").trim(), NEW_MAC);
    let (new, old) = mac_loopback(console, "before");
    assert!(
        old >= 3 && new == 0,
        "before: new={new} old={old}\n{console}"
    );
    let (new, old) = mac_loopback(console, "after");
    assert!(
        new >= 3 && old == 0,
        "after: new={new} old={old}\n{console}"
    );

    let info = json("mac-info");
    let device = &info["devices"][0];
    let control = &device["control_queue"];
    assert!(
        control["mode"]
            .as_str()
            .unwrap_or("")
            .starts_with("shadowed"),
        "{control}"
    );
    assert_eq!(control["mac"], NEW_MAC, "{control}");
    assert_eq!(control["refused"], 0, "{control}");
    assert!(control["commands"].as_u64().unwrap_or(0) >= 1, "{control}");
    // ASID 1 holds the VMM's ring and command buffer, two pages of its
    // memfd, and nothing else; the guest's space (ASID 0) holds boot RAM.
    let asid1 = control["address_space_1"]
        .as_array()
        .unwrap_or_else(|| panic!("{control}"));
    assert_eq!(asid1.len(), 2, "{control}");
    let maps = section("mac-maps");
    let (start, end) = maps
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().next())
        .and_then(|r| r.split_once('-'))
        .map(|(a, b)| (e2e::hex(a), e2e::hex(b)))
        .unwrap_or_else(|| panic!("no memfd:microvm-shadow-cvq in the VMM's maps: {maps}"));
    for range in asid1 {
        let host = e2e::hex(
            range["host_addr"]
                .as_str()
                .unwrap_or_else(|| panic!("{range}")),
        );
        let size = range["size"].as_u64().unwrap_or(0);
        assert!(
            host >= start && host + size <= end,
            "{range} lies in the VMM's buffers {start:#x}-{end:#x}"
        );
    }
    assert_eq!(iotlb_bytes(device), 256 * MIB, "{device}");
    // What the guest's driver offered itself: the control queue and MAC
    // change, no multiqueue.
    let features = e2e::hex(device["guest_features"].as_str().unwrap_or("0"));
    assert_ne!(features & (1 << 17), 0, "CTRL_VQ: {device}");
    assert_ne!(features & (1 << 23), 0, "CTRL_MAC_ADDR: {device}");
}

#[test]
fn vdpa_sim_net_in_set_map_mode_loops_frames_through_hotplug_reset_and_a_pause_by_suspend() {
    assert!(section("setmap-node")
        .trim()
        .starts_with("/dev/vhost-vdpa-"));
    assert_net_scenario("setmap");
    let info = json("setmap-info-plugged");
    let total = iotlb_bytes(&info["devices"][0]);
    assert_eq!(
        total,
        256 * MIB + 128 * MIB,
        "boot RAM and the plug: {info}"
    );
}

#[test]
fn vdpa_sim_net_in_dma_map_mode_behind_the_viommu_loops_frames() {
    assert_net_scenario("dmamap-viommu");
    // The device reaches only what the guest's driver mapped: a small
    // part of guest RAM.
    let info = json("dmamap-viommu-info-plugged");
    let total = iotlb_bytes(&info["devices"][0]);
    assert!(
        total > 0 && total < 64 * MIB,
        "behind the vIOMMU the device holds {total} bytes: {info}"
    );
}

#[test]
fn vdpa_sim_net_in_pa_mode_pins_guest_ram_under_a_raised_memlock_limit() {
    assert_net_scenario("pa");
    // The test host's default RLIMIT_MEMLOCK is 8 MiB; the PA parent pins
    // every page it is given and charges it to the VMM.
    let boot = kib_field(section("pa-pinned-boot"), "VmPin");
    assert!(boot >= 256 * 1024, "boot RAM pinned: {boot} KiB");
    let plugged = kib_field(section("pa-pinned-plugged"), "VmPin");
    assert!(
        plugged >= (256 + 128) * 1024,
        "boot RAM and the plug pinned: {plugged} KiB"
    );
    // In VA mode nothing is pinned.
    assert_eq!(kib_field(section("setmap-pinned-boot"), "VmPin"), 0);
}

#[test]
fn the_engine_sends_the_same_boot_messages_to_set_map_and_dma_map_parents() {
    let setmap = json("setmap-counters-boot");
    let pa = json("pa-counters-boot");
    assert!(
        setmap["devices"][0]["iotlb_update"].as_u64().unwrap_or(0) >= 1,
        "{setmap}"
    );
    assert_eq!(
        setmap["devices"][0]["iotlb_update"], pa["devices"][0]["iotlb_update"],
        "the same RAM is the same diff whatever the parent applies it with:\n{setmap}\n{pa}"
    );
}

#[test]
fn the_guest_writes_and_reads_back_a_vdpa_sim_blk_disk_and_a_qsd_disk() {
    let console = section("blk-console");
    assert_eq!(
        section("blk-exit").trim(),
        "0",
        "{}\n{console}",
        section("blk-stderr")
    );
    let disks: Vec<&str> = console.lines().filter(|l| l.starts_with("disk ")).collect();
    let sim = format!("sectors={SIM_BLK_SECTORS} ");
    let qsd = format!("sectors={} ", QSD_DISK_MIB * MIB / 512);
    assert!(
        disks.iter().any(|l| l.contains(&sim)),
        "the vdpa_sim_blk disk is there: {disks:?}"
    );
    assert!(
        disks.iter().any(|l| l.contains(&qsd)),
        "the qemu-storage-daemon disk is there: {disks:?}"
    );
    assert_eq!(
        disks.iter().filter(|l| l.ends_with("readback=ok")).count(),
        2,
        "{console}"
    );
    assert!(!console.contains("write-failed"), "{console}");
}

#[test]
fn the_host_file_behind_the_qsd_disk_holds_what_the_guest_wrote() {
    let text = section("blk-host-file");
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}: {text}"))
            .to_string()
    };
    assert_eq!(value("file"), value("want"), "{text}");
}

#[test]
fn behind_the_viommu_a_block_device_reaches_only_what_the_guest_mapped() {
    let info = json("blk-info");
    let devices = info["devices"].as_array().expect("devices");
    let translated: Vec<_> = devices
        .iter()
        .filter(|d| d["address_space"].as_str() != Some("identity"))
        .collect();
    assert_eq!(translated.len(), 1, "the vdpa_sim_blk disk: {info}");
    let total = iotlb_bytes(translated[0]);
    assert!(total < 64 * MIB, "{total} bytes mapped: {info}");
}

#[test]
fn a_read_only_block_device_is_refused_before_the_guest_starts() {
    let text = section("blk-readonly");
    assert!(text.contains("exit=1"), "{text}");
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("microvm:")).collect();
    assert_eq!(lines.len(), 1, "one line: {text}");
    assert!(lines[0].contains("read-only"), "{text}");
}

#[test]
fn a_guest_boots_its_root_file_system_from_a_vdpa_block_device() {
    let console = section("root-console");
    assert_eq!(
        section("root-exit").trim(),
        "0",
        "{}\n{console}",
        section("root-stderr")
    );
    assert!(
        console
            .lines()
            .any(|l| l.starts_with("/dev/root / ext4 rw") || l.starts_with("/dev/vda / ext4 rw")),
        "{console}"
    );
    assert!(console.contains("microvm-guest: cmd-exit=0"), "{console}");
    let count: u64 = section("root-image").trim().parse().unwrap_or(0);
    assert!(count >= 1, "the marker is in the image after poweroff");
}
