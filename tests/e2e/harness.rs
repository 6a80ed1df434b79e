//! The harness itself, end to end: when the vDPA device dies under a
//! running guest, the next step that needs it fails within a minute,
//! names itself, and shows the guest console, the VMM's stderr, the
//! device's log, the threads and the test host's dmesg.

use e2e::host_script::microvm_on;
use e2e::{HostScript, SectionedRun, VduseNet};
use std::sync::OnceLock;

const GUEST_IP: &str = "192.0.2.2";

fn host_script() -> String {
    let guest = "ip link set eth0 up && ip addr add 192.0.2.2/24 dev eth0
ping -c 2 -W 2 192.0.2.1
echo harness-guest-ready
wait_go
echo harness-guest-got-go
";
    let device = VduseNet::on_tap();
    let vm = microvm_on(&device, 1, "256M", "", guest);
    let mut script = HostScript::new();
    script
        .vduse_net(&device)
        .microvm(&vm)
        .wait_console("harness-guest-ready", 180, "the guest to boot and ping")
        .section("killed", "kill -9 \"$(h_get dev_pid.net0)\"; echo killed")
        .sh("t0=$(h_now)")
        .ctl_section("counters", "counters")
        .section("counters-seconds", "echo $(( $(h_now) - t0 ))")
        .sh(&format!(
            "H_GO_TRIES=10 h_go {GUEST_IP} || {{ echo '@@section elapsed'; echo $(( $(h_now) - t0 )); \
             h_step_failed 'the guest to take go after the device died'; }}"
        ))
        .section("unexpected", "echo the guest took go with its device dead");
    script.build()
}

fn run() -> &'static SectionedRun {
    static RUN: OnceLock<SectionedRun> = OnceLock::new();
    RUN.get_or_init(|| SectionedRun::in_test_host("harness", host_script()))
}

#[test]
fn a_dead_device_fails_the_next_step_within_a_minute_and_says_why() {
    let run = run();
    assert_eq!(run.section("killed").trim(), "killed");
    assert!(!run.sections.contains_key("unexpected"), "{}", run.raw);
    assert_eq!(
        run.failed_step(),
        Some("the guest to take go after the device died"),
        "{}",
        run.raw
    );
    let elapsed: u64 = run.section("elapsed").trim().parse().unwrap();
    assert!(elapsed < 60, "the failure took {elapsed} s");
    let stderr = &run.raw.stderr;
    for part in [
        "harness: FAILED: the guest to take 'go 1' on 192.0.2.2:5000",
        "---- guest console",
        "harness-guest-ready",
        "---- VMM stderr",
        "---- device log net0",
        "---- VMM (pid",
        "vcpu0",
        "---- device net0: process",
        "---- test host dmesg",
    ] {
        assert!(
            stderr.contains(part),
            "diagnostics lack '{part}':\n{stderr}"
        );
    }
}

#[test]
fn the_api_answers_promptly_when_the_device_does_not() {
    let run = run();
    let seconds: u64 = run.section("counters-seconds").trim().parse().unwrap();
    assert!(
        seconds <= 5,
        "counters took {seconds} s with the device dead"
    );
    let counters: serde_json::Value = run.json("counters");
    assert_eq!(
        counters["devices"][0]["device_answering"], false,
        "{counters}"
    );
}
