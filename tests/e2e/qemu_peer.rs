//! vduse-net serves every real vhost-vdpa client, not only this project's
//! VMM: QEMU 10 (carried into the test host by tools/testbed --peers)
//! enables the vrings after DRIVER_OK, which VDUSE does not report to the
//! device; vduse-net must pick the queues up later. The guest pings the test
//! host through vduse-net on a TAP with QEMU 10 as the VMM.

use std::sync::OnceLock;

use e2e::{base64, SectionedRun};

const GUEST_IP: &str = "192.0.2.2";
const HOST_IP: &str = "192.0.2.1";

fn host_script() -> String {
    let guest = format!(
        "ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0
ping -c 10 -W 2 {HOST_IP}
"
    );
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=1 quiet microvm.cmd={}",
        base64(guest.as_bytes())
    );
    // pc: QEMU 10's microvm,acpi=on hangs the guest at ACPI init here (see
    // tools/benchlib/vmms.py); guest RAM is a shared memfd, as VDUSE needs.
    format!(
        r#"echo "@@section version"; cat /opt/peers/qemu10/version
. "$MICROVM_HARNESS"
dev=$(h_vduse_start net0 --tap tap0) || {{ echo "@@section harness-failure"; echo "vduse-net to start"; exit 1; }}
ip addr add {HOST_IP}/24 dev tap0
H_CONSOLE=/tmp/console.log H_VMM_ERR=/tmp/qemu.err h_vmm_start /opt/peers/qemu10/qemu -M pc,memory-backend=mem0 -accel kvm -cpu host -smp 1 -m 256M \
  -object memory-backend-memfd,id=mem0,size=256M,share=on -nodefaults -no-user-config \
  -display none -serial stdio -no-reboot \
  -kernel "$MICROVM_GUEST_KERNEL" -initrd "$MICROVM_GUEST_INITRAMFS" -append '{cmdline}' \
  -netdev vhost-vdpa,id=n0,vhostdev="$dev" -device virtio-net-pci,netdev=n0,romfile= </dev/null
st=$(h_vmm_wait 180); echo "@@section qemu-exit"; echo $st
echo "@@section qemu-stderr"; cat /tmp/qemu.err
echo "@@section console"; cat /tmp/console.log
h_vduse_stop net0
echo "@@section vduse-log"; grep -v '^vduse-net:   iotlb 0x' /tmp/vduse-net0.err
"#
    )
}

fn run() -> &'static SectionedRun {
    static RUN: OnceLock<SectionedRun> = OnceLock::new();
    RUN.get_or_init(|| {
        SectionedRun::in_test_host_with_peers("qemu10_net", host_script(), &["qemu10"])
    })
}

#[test]
fn qemu_10_guest_pings_through_vduse_net_without_loss() {
    let run = run();
    assert!(
        run.section("version").contains("QEMU emulator version 10."),
        "{}",
        run.raw
    );
    let console = run.section("console");
    let summary = console
        .lines()
        .find(|l| l.starts_with("10 packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary:\n{}", run.raw));
    assert!(
        summary.contains("10 packets received, 0% packet loss"),
        "{summary}\n{}",
        run.section("vduse-log")
    );
    assert_eq!(
        run.section("qemu-exit").trim(),
        "0",
        "{}",
        run.section("qemu-stderr")
    );
}

#[test]
fn vduse_net_starts_the_queues_qemu_10_enables_after_driver_ok() {
    let log = run().section("vduse-log");
    for queue in ["queue 0 (rx)", "queue 1 (tx)"] {
        assert!(
            log.contains(&format!("{queue} not ready at DRIVER_OK")),
            "{queue} was ready at DRIVER_OK: this no longer tests the late start\n{log}"
        );
        assert!(
            log.contains(&format!("{queue} enabled after DRIVER_OK")),
            "{queue} never started\n{log}"
        );
    }
}
