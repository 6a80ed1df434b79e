//! A vDPA device that refuses a mapping, end to end: vduse-net answers one
//! VDUSE_UPDATE_IOTLB request with an error (`--fail-iotlb N`) while the
//! guest plugs memory through virtio-mem, with the VMM's IOTLB batching off
//! (`iotlb-batch=off`): inside a batch the kernel ignores the device's
//! answer at BATCH_END, so a refusal reaches the VMM only unbatched.
//!
//! N is found by a first, fault-free run of the same story: boot, plug
//! 128 MiB, count the device's IOTLB updates. The second run refuses the
//! update after that, which is the one for the next plug. The VMM answers
//! the guest's request VIRTIO_MEM_RESP_BUSY: with RESP_ERROR a Linux guest
//! marks its virtio-mem device broken and never plugs again.

use e2e::host_script::microvm_on;
use e2e::{hex, iotlb_dump, merged, HostScript, VduseNet};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const BOOT: u64 = 512 * MIB;
const GUEST_IP: &str = "192.0.2.2";

fn guest_script() -> String {
    "ip link set eth0 up && ip addr add 192.0.2.2/24 dev eth0
(while true; do echo \"memtotal=$(sed -n 's/^MemTotal: *\\([0-9]*\\).*/\\1/p' /proc/meminfo)\"; sleep 0.5; done) &
echo guest-ready
wait_go
echo guest-done
"
    .to_string()
}

fn host_script() -> String {
    let device = VduseNet::on_tap();
    let refusing = VduseNet {
        extra_args: "--fail-iotlb $((K+1))".to_string(),
        ..VduseNet::on_tap()
    };
    let vm = microvm_on(
        &device,
        1,
        "512M,hotplug=1G",
        ",iotlb-batch=off",
        &guest_script(),
    );
    let updates = "grep -c 'iotlb update #[0-9]* \\[' /tmp/vduse-net0.err";
    let mut script = HostScript::new();
    // Run 1, no fault: how many IOTLB updates up to and including the first plug.
    script
        .vduse_net(&device)
        .microvm(&vm)
        .wait_console("memtotal=", 180, "the guest to boot (calibration run)")
        .ctl_section("calibration-plug", "memory-resize 128M --timeout 120")
        .sh(&format!("K=$({updates})"))
        .section("calibration", "echo $K")
        .go(GUEST_IP)
        .wait_exit("calibration", 60)
        .sh("h_vduse_stop net0");
    // Run 2: the update after those K is refused.
    script
        .vduse_net(&refusing)
        .microvm(&vm)
        .wait_console("memtotal=", 180, "the guest to boot (refusal run)")
        .ctl_section("first-plug", "memory-resize 128M --timeout 120")
        .section("iotlb-before", "cat /tmp/iotlb")
        .section(
            "refused-plug",
            "h_ctl memory-resize 256M --timeout 20 2>&1; echo \"exit=$?\"",
        )
        .sh("sleep 1")
        .section(
            "device-log",
            "grep -E 'iotlb update #[0-9]+ (\\[|refused)' /tmp/vduse-net0.err | tail -4",
        )
        .section("iotlb-after", "cat /tmp/iotlb")
        .ctl_section("info-after", "info")
        .ctl_section("counters-after", "counters")
        .section(
            "ping",
            &format!("ping -c 5 -i 0.2 -W 2 {GUEST_IP} | tail -2"),
        )
        .section(
            "next-plug",
            "h_ctl memory-resize 256M --timeout 120 2>&1; echo \"exit=$?\"",
        )
        .section("iotlb-next", "cat /tmp/iotlb")
        .ctl_section("info-next", "info")
        .go(GUEST_IP)
        .wait_exit("vm", 60)
        .section("console", "grep -v memtotal= /tmp/console.log")
        .stop_devices();
    script.build()
}

e2e::shared_test_host_run!("fault_injection", host_script());

/// vduse-net's dump as merged [start, end).
fn dump_ranges(dump: &str) -> Vec<(u64, u64)> {
    merged(
        iotlb_dump(dump)
            .into_iter()
            .map(|(range, _)| range)
            .collect(),
    )
}

/// Boot RAM plus the plugged ranges `info` reports, merged.
fn expected_iotlb(info: &Value) -> Vec<(u64, u64)> {
    let mut expected = vec![(0, BOOT)];
    for range in info["memory"]["hotplug"]["plugged"].as_array().unwrap() {
        let start = hex(range["guest_addr"].as_str().unwrap());
        expected.push((start, start + range["size"].as_u64().unwrap()));
    }
    merged(expected)
}

/// The text before the `exit=` line of a section, and the exit status.
fn output_and_exit(name: &str) -> (&'static str, String) {
    let text = section(name);
    let (output, exit) = text.rsplit_once("exit=").unwrap_or((text, ""));
    (output, exit.trim().to_string())
}

#[test]
fn the_refused_update_is_the_next_plug_and_the_device_says_so() {
    let calibration: u64 = section("calibration").trim().parse().expect("a count");
    let first = json("first-plug");
    assert_eq!(first["done"], true, "{first}");
    let log = section("device-log");
    assert!(
        log.contains(&format!("iotlb update #{} refused", calibration + 1)),
        "{log}"
    );
}

#[test]
fn the_guest_request_fails_and_nothing_is_left_half_mapped() {
    let info = json("info-after");
    let hotplug = &info["memory"]["hotplug"];
    assert_eq!(hotplug["plugged_size"], 128 * MIB, "{info}");
    // The device holds exactly boot RAM plus the block plugged before.
    let expected = expected_iotlb(&info);
    assert_eq!(
        expected.iter().map(|(s, e)| e - s).sum::<u64>(),
        BOOT + 128 * MIB
    );
    assert_eq!(dump_ranges(section("iotlb-after")), expected);
    assert_eq!(dump_ranges(section("iotlb-before")), expected);
    // The engine's view agrees.
    let engine: Vec<(u64, u64)> = info["devices"][0]["iotlb"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let start = hex(m["iova"].as_str().unwrap());
            (start, start + m["size"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(merged(engine), expected);
    // The guest's request failed (answered BUSY, recorded as an error).
    let counters = json("counters-after");
    let requests = counters["memory_hotplug"]["guest_requests"]
        .as_array()
        .unwrap_or_else(|| panic!("no request history: {counters}"));
    assert!(
        requests
            .iter()
            .any(|r| r["kind"] == "plug" && r["result"] == "error"),
        "{counters}"
    );
    let (output, exit) = output_and_exit("refused-plug");
    assert_ne!(exit, "0", "the resize cannot complete: {output}");
}

#[test]
fn the_vm_keeps_running_and_the_next_plug_succeeds() {
    let ping = section("ping");
    assert!(ping.contains(" 0% packet loss"), "{ping}");
    let (output, exit) = output_and_exit("next-plug");
    assert_eq!(exit, "0", "{output}\nconsole:\n{}", section("console"));
    let next: Value =
        serde_json::from_str(output.trim()).unwrap_or_else(|e| panic!("{e}: {output}"));
    assert_eq!(next["done"], true, "{next}");
    assert_eq!(next["plugged_size"], 256 * MIB, "{next}");
    let info = json("info-next");
    assert_eq!(dump_ranges(section("iotlb-next")), expected_iotlb(&info));
    assert_eq!(section("vm-exit").trim(), "0", "{}", section("vm-stderr"));
}
