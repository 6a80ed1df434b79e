//! Pause and resume of a running microVM whose NIC is a vDPA device, end to
//! end in the test host: vduse-net (a VDUSE device, which has no SUSPEND, so
//! a pause resets it and the resume starts it again where the guest's used
//! rings say) on a TAP, the VM pinging the test host and sending a paced TCP
//! stream across the pause. Twice in one test host: an identity-mapped device
//! with 256 MiB plugged through virtio-mem, and a device behind the vIOMMU.

use e2e::host_script::microvm_on;
use e2e::{iotlb_dump, merged, HostScript, VduseNet};

const GUEST_IP: &str = "192.0.2.2";
const HOST_IP: &str = "192.0.2.1";
/// The stream: 40 pieces of 64 KiB, one every 0.25 s, so it runs about
/// 10 s of guest time and the pause falls in its middle.
const STREAM_PIECES: u32 = 40;
const STREAM_BYTES: u32 = STREAM_PIECES * (64 << 10);
const PINGS: u32 = 40;
/// How long the test host keeps the VM paused, besides its checks.
const PAUSED_SECS: u32 = 3;

/// The guest: traffic that spans the pause, then its ping summary.
fn guest_script(label: &str, port: u32) -> String {
    format!(
        "ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0
ping -c 2 -W 2 {HOST_IP} >/dev/null
echo {label}-ready
wait_go
ping -i 0.25 -c {PINGS} -W 5 {HOST_IP} >/tmp/ping.out 2>&1 &
P=$!
(for i in $(seq {STREAM_PIECES}); do dd if=/dev/zero bs=64k count=1 2>/dev/null; sleep 0.25; done) | nc {HOST_IP} {port}
wait $P
echo \"{label}-ping $(grep 'packets transmitted' /tmp/ping.out)\"
echo {label}-done
wait_go
"
    )
}

/// One VM's story: boot, (plug), start the traffic, pause, look while
/// paused, resume, let the traffic end, look again.
fn scenario(
    script: &mut HostScript,
    device: &VduseNet,
    label: &str,
    memory: &'static str,
    net: &str,
    plug: bool,
) {
    let port = if plug { 5300 } else { 5301 };
    let vm = microvm_on(device, 2, memory, net, &guest_script(label, port));
    script
        .sh(&format!(
            "timeout 300 microvm-tcp-sink --port {port} --bytes {STREAM_BYTES} >/tmp/sink-{port}.out 2>/tmp/sink-{port}.err &"
        ))
        .microvm(&vm)
        .wait_console(&format!("{label}-ready"), 240, "the guest to boot and ping");
    if plug {
        script.ctl_section(&format!("{label}-plug"), "memory-resize 256M --timeout 120");
    }
    script
        .section(&format!("{label}-iotlb-before"), "cat /tmp/iotlb")
        .go(GUEST_IP)
        .sh("sleep 3")
        .section(&format!("{label}-pause"), "h_ctl pause 2>&1; echo \"exit=$?\"")
        .ctl_section(&format!("{label}-state-paused"), "state")
        .ctl_section(&format!("{label}-info-paused"), "info")
        .section(&format!("{label}-iotlb-paused"), "cat /tmp/iotlb")
        .section(
            &format!("{label}-paused-checks"),
            &format!(
                "before=$(wc -l </tmp/console.log)\n\
                 echo \"host-ping $(ping -c {PAUSED_SECS} -W 1 {GUEST_IP} 2>&1 | grep 'packets transmitted')\"\n\
                 echo \"console-lines-while-paused $(( $(wc -l </tmp/console.log) - before ))\""
            ),
        )
        .section(&format!("{label}-resume"), "h_ctl resume 2>&1; echo \"exit=$?\"")
        .ctl_section(&format!("{label}-state-running"), "state")
        .section(&format!("{label}-pause-again"), "h_ctl pause >/dev/null 2>&1; h_ctl pause 2>&1; h_ctl resume >/dev/null 2>&1; echo \"exit=$?\"")
        .wait_console(&format!("{label}-done"), 180, "the guest's traffic to end after the resume")
        .section(&format!("{label}-sink"), &format!("cat /tmp/sink-{port}.out /tmp/sink-{port}.err"))
        .section(&format!("{label}-iotlb-after"), "cat /tmp/iotlb")
        .ctl_section(&format!("{label}-counters"), "counters")
        .go(GUEST_IP)
        .wait_exit(label, 60);
}

fn host_script() -> String {
    let device = VduseNet::on_tap();
    let mut script = HostScript::new();
    script.vduse_net(&device);
    scenario(
        &mut script,
        &device,
        "plugged",
        "512M,hotplug=512M",
        "",
        true,
    );
    scenario(&mut script, &device, "viommu", "512M", ",iommu=on", false);
    script
        .sh("kill -USR1 \"$(h_get dev_pid.net0)\"; sleep 0.5")
        .stop_devices()
        .section("vduse-log", "sleep 0.5; cat /tmp/vduse-net0.err");
    script.build()
}

e2e::shared_test_host_run!("lifecycle", host_script());

/// `busybox ping`'s "N packets transmitted, M packets received" line.
fn ping_counts(line: &str) -> (u32, u32) {
    let number = |word: &str| -> u32 {
        let before: Vec<&str> = line
            .split(word)
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        before
            .last()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no '{word}' count in: {line}"))
    };
    (number("packets transmitted"), number("packets received"))
}

fn console_line<'a>(console: &'a str, prefix: &str) -> &'a str {
    console
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no console line '{prefix}':\n{console}"))
}

fn check_pause_and_resume(label: &str) {
    let pause = section(&format!("{label}-pause"));
    assert!(pause.contains("exit=0"), "pause refused:\n{pause}");
    let answer: serde_json::Value = serde_json::from_str(
        pause
            .trim_end()
            .rsplit_once('\n')
            .map_or("", |(json, _)| json),
    )
    .unwrap_or_else(|e| panic!("pause answer is not JSON ({e}):\n{pause}"));
    assert_eq!(answer["state"], "paused");
    assert_eq!(answer["changed"], true);
    // vduse-net has no SUSPEND: the pause reset it.
    assert_eq!(answer["devices"][0]["stopped_by"], "reset", "{answer}");
    assert_eq!(json(&format!("{label}-state-paused"))["state"], "paused");
    let info = json(&format!("{label}-info-paused"));
    assert_eq!(info["state"], "paused");

    let paused = section(&format!("{label}-paused-checks"));
    let (sent, answered) = ping_counts(console_line(paused, "host-ping"));
    assert_eq!(sent, PAUSED_SECS);
    assert_eq!(answered, 0, "a paused VM answered pings:\n{paused}");
    assert_eq!(
        console_line(paused, "console-lines-while-paused")
            .split_whitespace()
            .last(),
        Some("0"),
        "the guest printed while paused:\n{paused}"
    );

    let resume = section(&format!("{label}-resume"));
    assert!(
        resume.contains("exit=0") && resume.contains("\"running\""),
        "resume:\n{resume}"
    );
    assert_eq!(json(&format!("{label}-state-running"))["state"], "running");
    // A second pause of a paused VM changes nothing, and resume undoes both.
    let again = section(&format!("{label}-pause-again"));
    assert!(
        again.contains("\"changed\": false") && again.contains("exit=0"),
        "{again}"
    );

    // The traffic that spanned the pause: the stream arrived whole, pings
    // came back but for at most the one in flight at the pause.
    let sink = section(&format!("{label}-sink"));
    assert!(
        sink.contains(&format!("\"bytes\":{STREAM_BYTES}")),
        "stream cut by the pause:\n{sink}"
    );
    let console = section(&format!("{label}-console"));
    let (sent, received) = ping_counts(console_line(console, &format!("{label}-ping")));
    assert_eq!(sent, PINGS);
    assert!(
        received + 1 >= PINGS,
        "{received} of {PINGS} pings came back across the pause"
    );
    assert_eq!(section(&format!("{label}-exit")).trim(), "0");
}

/// The device's IOTLB (vduse-net's own dump) while paused is what the
/// VMM's engine says the device holds: the reset did not change it, and it
/// is what the resume replays.
fn check_iotlb_while_paused(label: &str) {
    let device = iotlb_dump(section(&format!("{label}-iotlb-paused")));
    assert!(!device.is_empty());
    let info = json(&format!("{label}-info-paused"));
    let engine: Vec<(u64, u64)> = info["devices"][0]["iotlb"]
        .as_array()
        .unwrap_or_else(|| panic!("no iotlb in {info}"))
        .iter()
        .map(|e| {
            let start = e2e::hex(e["iova"].as_str().unwrap_or_default());
            (start, start + e["size"].as_u64().unwrap_or(0))
        })
        .collect();
    assert_eq!(
        merged(device.into_iter().map(|(r, _)| r).collect()),
        merged(engine)
    );
}

#[test]
fn an_identity_device_with_plugged_memory_pauses_and_resumes_with_its_traffic_whole() {
    check_pause_and_resume("plugged");
    assert!(
        section("plugged-plug").contains("\"plugged_size\": 268435456"),
        "{}",
        section("plugged-plug")
    );
    check_iotlb_while_paused("plugged");
    // Nothing maps or unmaps without a vIOMMU: what the device reached
    // before the pause it reaches after the traffic, the resume's replay
    // included.
    let before = iotlb_dump(section("plugged-iotlb-before"));
    assert_eq!(before, iotlb_dump(section("plugged-iotlb-after")));
    // The plugged block is in the device's IOTLB before and after.
    let after = iotlb_dump(section("plugged-iotlb-after"));
    let reach: u64 = after.iter().map(|((first, end), _)| end - first).sum();
    assert!(
        reach >= (512 + 256) << 20,
        "the device reaches {reach} bytes"
    );
}

#[test]
fn a_device_behind_the_viommu_pauses_and_resumes_with_its_traffic_whole() {
    check_pause_and_resume("viommu");
    check_iotlb_while_paused("viommu");
}

#[test]
fn the_device_was_reset_at_the_pause_and_started_again_where_the_rings_stood() {
    let log = section("vduse-log");
    // Two VMs, each: started by the driver, reset by the pause, started
    // again by the resume (its queues from nonzero positions), reset by the
    // second pause, started again, and reset when the guest powers off.
    let resets = log.lines().filter(|l| l.ends_with(": reset")).count();
    assert!(resets >= 6, "{resets} resets:\n{log}");
    let resumed_from = log
        .lines()
        .filter(|l| l.contains("queue 1 (tx) started") && !l.ends_with("avail 0"))
        .count();
    assert!(
        resumed_from >= 2,
        "no queue restarted past position 0:\n{log}"
    );
}
