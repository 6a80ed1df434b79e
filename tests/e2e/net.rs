//! The vhost-vdpa network path end to end, in the test host: a real VDUSE
//! device (vduse-net on a TAP), the kernel's vhost-vdpa, our VMM and the
//! guest's virtio-net driver. One test-host boot serves every check.

use e2e::host_script::{guest_cmd_arg, microvm_on};
use e2e::{HostScript, MicrovmRun, VduseNet, DEBUG_MICROVM};

const GUEST_IP: &str = "192.0.2.2";
const HOST_IP: &str = "192.0.2.1";
const DEVICE_MAC: &str = "52:54:00:12:34:56";

/// What the guest runs: ping, wait for the host to look, reset the device
/// through driver unbind/bind, ping again, wait again.
fn guest_script() -> String {
    format!(
        "up() {{ ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0; }}
up
echo guest-mac=$(cat /sys/class/net/eth0/address)
ping -c 20 -W 2 {HOST_IP}
echo phase1-done
wait_go
echo 0000:00:01.0 > /sys/bus/pci/drivers/virtio-pci/unbind
echo 0000:00:01.0 > /sys/bus/pci/drivers/virtio-pci/bind
sleep 1
up
ping -c 5 -W 2 {HOST_IP}
echo phase2-done
wait_go
"
    )
}

/// The debug build's guest: the vCPU thread starts the device (duplicating
/// and dropping descriptors), resets and restarts it, the VMM thread ends
/// at poweroff.
fn debug_guest_script() -> String {
    format!(
        "up() {{ ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0; }}
up
ping -c 3 -W 2 {HOST_IP}
echo 0000:00:01.0 > /sys/bus/pci/drivers/virtio-pci/unbind
echo 0000:00:01.0 > /sys/bus/pci/drivers/virtio-pci/bind
sleep 1
up
ping -c 4 -W 2 {HOST_IP}
"
    )
}

/// The host side: device, VMM, and a look at the device and the API at
/// each phase. Sections are printed as `@@section name`.
fn host_script() -> String {
    let device = VduseNet::on_tap();
    let vm = microvm_on(&device, 2, "512M", "", &guest_script());
    let mut debug_vm = MicrovmRun::new(2, "256M");
    debug_vm.binary = DEBUG_MICROVM;
    debug_vm.cmdline_extra = format!("quiet {}", guest_cmd_arg(&debug_guest_script()));
    debug_vm.extra_args = format!(
        "--net vdpa={} --api-socket /tmp/debug-api.sock",
        device.path_var()
    );
    let mut script = HostScript::new();
    script
        .vduse_net(&device)
        .section("vduse-ready", "cat /tmp/vduse-net0.out")
        .microvm(&vm)
        .wait_console("phase1-done", 180, "the guest to boot and ping 20 times")
        .ctl_section("counters-1", "counters")
        .ctl_section("info-1", "info")
        .section("iotlb-1", "cat /tmp/iotlb")
        .sh("kill -USR1 \"$(h_get dev_pid.net0)\"; sleep 0.5")
        .section("vduse-stats-1", "grep 'stats iotlb_updates' /tmp/vduse-net0.err | tail -1")
        .section("bad-request", "printf 'BOGUS\\r\\n\\r\\n' | h_ctl send-raw; echo")
        .section("unknown-path", "printf 'GET /nope HTTP/1.1\\r\\n\\r\\n' | h_ctl send-raw; echo")
        .go(GUEST_IP)
        .wait_console("phase2-done", 120, "the guest to reset its device and ping again")
        .ctl_section("counters-2", "counters")
        .section("iotlb-2", "cat /tmp/iotlb")
        .go(GUEST_IP)
        .wait_exit("microvm", 60)
        .microvm(&debug_vm)
        .wait_exit("debug", 240)
        .section(
            "not-vdpa",
            "microvm --kernel \"$MICROVM_GUEST_KERNEL\" --net vdpa=/dev/null 2>&1; echo \"exit=$?\"\n\
             microvm --kernel \"$MICROVM_GUEST_KERNEL\" --net vdpa=/dev/vhost-vdpa-99 2>&1; echo \"exit=$?\"",
        )
        .stop_devices()
        .section("vduse-log", "sleep 0.5; cat /tmp/vduse-net0.err");
    multiqueue(&mut script);
    script.build()
}

const MQ_GUEST_IP: &str = "192.0.3.2";
const MQ_PAIRS: u32 = 4;
const MQ_STREAM_BYTES: u32 = 2 << 20;

/// Multiqueue: vduse-net with four pairs and no control queue, a 4-vCPU
/// guest given `queues=4`: the VMM serves its control queue, the guest
/// sets four pairs, and one TCP stream per vCPU (each sent from its own
/// CPU, so from its own TX queue; the TAP steers each flow's answers to
/// the queue it came from) must arrive whole.
fn multiqueue(script: &mut HostScript) {
    let device = VduseNet {
        name: "mq0",
        tap: Some(("tap1", "192.0.3.1/24")),
        iotlb_dump: None,
        extra_args: format!("--queues {MQ_PAIRS} --stats /tmp/mq-stats.json"),
    };
    let streams: String = (0..MQ_PAIRS)
        .map(|c| {
            format!(
                "taskset -c {c} sh -c 'dd if=/dev/zero bs=64k count={} 2>/dev/null | nc 192.0.3.1 {}' &\n",
                MQ_STREAM_BYTES / (64 << 10),
                5100 + c
            )
        })
        .collect();
    let guest = format!(
        "ip link set eth0 up && ip addr add {MQ_GUEST_IP}/24 dev eth0
ping -c 2 -W 2 192.0.3.1 >/dev/null
echo mq-queues=$(ls /sys/class/net/eth0/queues | tr '\\n' ' ')
echo mq-ready
wait_go
{streams}wait
echo mq-streams-done
wait_go
"
    );
    let vm = microvm_on(
        &device,
        MQ_PAIRS,
        "512M",
        &format!(",queues={MQ_PAIRS}"),
        &guest,
    );
    let sinks: String = (0..MQ_PAIRS)
        .map(|c| {
            let port = 5100 + c;
            format!(
                "microvm-tcp-sink --port {port} --bytes {MQ_STREAM_BYTES} >/tmp/sink-{port}.out 2>/tmp/sink-{port}.err &\n"
            )
        })
        .collect();
    script
        .vduse_net(&device)
        .sh(&sinks)
        .microvm(&vm)
        .wait_console(
            "mq-ready",
            300,
            "the 4-vCPU guest to boot and ping on four pairs",
        )
        .ctl_section("mq-info", "info")
        .go(MQ_GUEST_IP)
        .wait_console(
            "mq-streams-done",
            300,
            "the guest's four TCP streams to end",
        )
        // vduse-net writes its stats about once a second.
        .sh("sleep 2")
        .section("mq-stats", "cat /tmp/mq-stats.json")
        .section("mq-sinks", "cat /tmp/sink-51*.out")
        .go(MQ_GUEST_IP)
        .wait_exit("mq", 60)
        .stop_devices();
}

e2e::shared_test_host_run!("vdpa_net", host_script());

fn ping_summary(console: &str, transmitted: u32) -> &str {
    console
        .lines()
        .find(|l| l.starts_with(&format!("{transmitted} packets transmitted")))
        .unwrap_or_else(|| panic!("no ping summary for {transmitted} packets:\n{console}"))
}

#[test]
fn guest_pings_the_test_host_through_the_vdpa_device_without_loss() {
    let console = section("microvm-console");
    assert!(
        section("vduse-ready").contains("ready at /dev/vhost-vdpa-0"),
        "{}",
        run().raw
    );
    let summary = ping_summary(console, 20);
    assert!(
        summary.contains("20 packets received, 0% packet loss"),
        "{summary}"
    );
    assert_eq!(
        section("microvm-exit").trim(),
        "0",
        "{}",
        section("microvm-stderr")
    );
}

#[test]
fn guest_mac_comes_from_the_device_config_space() {
    assert!(
        section("microvm-console").contains(&format!("guest-mac={DEVICE_MAC}")),
        "{}",
        section("microvm-console")
    );
}

#[test]
fn boot_memory_reaches_the_device_in_one_batch() {
    let counters = json("counters-1");
    let net = &counters["devices"][0];
    let begin = net["batch_begin"].as_u64().unwrap();
    assert!(begin >= 1, "{counters}");
    assert_eq!(net["batch_end"], net["batch_begin"], "{counters}");
    assert!(net["iotlb_update"].as_u64().unwrap() >= 1, "{counters}");
    assert_eq!(
        net["boot_mapping"]["updates"], 1,
        "512 MiB of RAM is one host-contiguous range"
    );
    assert_eq!(net["boot_mapping"]["batched"], true);
    assert_eq!(net["bytes_mapped"], 512u64 << 20);
    // While the guest ran, the device had rebuilt its IOTLB exactly once:
    // the boot mapping, one batch. (It rebuilds again when the VMM exits
    // and the kernel unmaps everything.)
    let stats = section("vduse-stats-1");
    assert!(stats.contains("iotlb_updates=1 "), "{stats}");
}

#[test]
fn the_device_iotlb_is_exactly_guest_ram() {
    assert_eq!(section("iotlb-1").trim(), "0x0 0x1fffffff rw");
    let info = json("info-1");
    let iotlb = &info["devices"][0]["iotlb"];
    assert_eq!(iotlb.as_array().map(Vec::len), Some(1), "{info}");
    assert_eq!(iotlb[0]["iova"], "0x0");
    assert_eq!(iotlb[0]["size"], 512u64 << 20);
    assert_eq!(info["memory"]["regions"][0]["size"], 512u64 << 20);
    assert_eq!(info["devices"][0]["path"], "/dev/vhost-vdpa-0");
}

#[test]
fn the_api_answers_bad_requests_with_http_errors_and_keeps_running() {
    assert!(
        section("bad-request").starts_with("HTTP/1.1 400"),
        "{}",
        section("bad-request")
    );
    assert!(section("bad-request").contains("\"error\""));
    assert!(
        section("unknown-path").starts_with("HTTP/1.1 404"),
        "{}",
        section("unknown-path")
    );
    // ... and the VM went on to its second phase.
    assert!(
        section("microvm-console").contains("phase2-done"),
        "{}",
        section("microvm-console")
    );
}

#[test]
fn after_a_device_reset_the_guest_pings_again() {
    let summary = ping_summary(section("microvm-console"), 5);
    assert!(
        summary.contains("5 packets received, 0% packet loss"),
        "{summary}"
    );
    let counters = json("counters-2");
    let net = &counters["devices"][0];
    assert_eq!(net["activations"], 2, "{counters}");
    assert!(net["resets"].as_u64().unwrap() >= 1, "{counters}");
    // VDUSE offers no IOTLB_PERSIST, so the reset was followed by a replay,
    // and the replay went through the address spaces: it is in the history.
    let replays = counters["dma_transactions"]
        .as_array()
        .expect("a transaction history")
        .iter()
        .filter(|t| t["kind"] == "replay")
        .count();
    assert!(
        replays >= 1,
        "no replay transaction after the reset: {counters}"
    );
    assert_eq!(
        section("iotlb-2").trim(),
        "0x0 0x1fffffff rw",
        "the mapping survived the reset"
    );
}

#[test]
fn a_path_that_is_not_a_vhost_vdpa_net_device_is_refused() {
    let text = section("not-vdpa");
    assert!(
        text.contains("'/dev/null' is not a vhost-vdpa device"),
        "{text}"
    );
    assert!(text.contains("cannot open '/dev/vhost-vdpa-99'"), "{text}");
    assert_eq!(text.matches("exit=1").count(), 2, "{text}");
}

#[test]
fn the_debug_build_runs_the_net_device_through_a_reset_under_its_seccomp_filters() {
    let console = section("debug-console");
    assert_eq!(
        section("debug-exit").trim(),
        "0",
        "{}\n{console}",
        section("debug-stderr")
    );
    assert!(!section("debug-stderr").contains("seccomp"));
    assert!(
        ping_summary(console, 3).contains("3 packets received, 0% packet loss"),
        "{console}"
    );
    assert!(
        ping_summary(console, 4).contains("4 packets received, 0% packet loss"),
        "{console}"
    );
}

#[test]
fn multiqueue_the_guest_sets_four_pairs_through_the_vmms_control_queue() {
    let console = section("mq-console");
    assert!(
        console.contains("mq-queues=rx-0 rx-1 rx-2 rx-3 tx-0 tx-1 tx-2 tx-3"),
        "{console}"
    );
    let info = json("mq-info");
    let control = &info["devices"][0]["control_queue"];
    assert_eq!(
        control["mode"], "served by the VMM alone (the device has no control queue)",
        "{info}"
    );
    assert_eq!(control["queue_pairs"], MQ_PAIRS, "{info}");
    assert_eq!(control["refused"], 0, "{info}");
    assert_eq!(info["devices"][0]["queues"], 2 * MQ_PAIRS + 1, "{info}");
}

#[test]
fn multiqueue_every_stream_arrives_and_every_pair_carries_traffic() {
    let sinks = section("mq-sinks");
    let arrived: Vec<u64> = sinks
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["bytes"].as_u64())
        .collect();
    assert_eq!(
        arrived,
        vec![u64::from(MQ_STREAM_BYTES); MQ_PAIRS as usize],
        "{sinks}\n{}",
        section("mq-console")
    );
    let stats: serde_json::Value = json("mq-stats");
    let queues = stats["queues"].as_array().expect("per-queue stats");
    assert_eq!(queues.len(), 2 * MQ_PAIRS as usize, "{stats}");
    for queue in queues {
        assert!(
            queue["frames"].as_u64().unwrap_or(0) > 0,
            "queue {} carried nothing: {stats}",
            queue["name"]
        );
    }
    assert_eq!(section("mq-exit").trim(), "0", "{}", section("mq-stderr"));
}
