//! Pause and resume, snapshot and restore, and live update of a running
//! microVM whose NIC is a vDPA device, end to end in the test host:
//! vduse-net (a VDUSE device, which has no SUSPEND, so a pause resets it and
//! the resume starts it again where the guest's used rings say) on a TAP,
//! the VM pinging the test host and sending a paced TCP stream across each
//! step. In one test host: pause and resume of an identity-mapped device
//! with 256 MiB plugged through virtio-mem, of a device behind the vIOMMU,
//! and (the debug build, its seccomp filters too) of a two-pair device whose
//! control queue the VMM serves; a snapshot of that two-pair VM with 256 MiB
//! plugged, its VMM killed and the VM restored onto the device by a new one;
//! live updates of a VM with 256 MiB plugged and of a 2 GiB one to a new VMM
//! that maps the same memory; and a
//! snapshot and restore of a VM whose only device is its serial console,
//! with the refusals of bad snapshots.

use e2e::host_script::guest_cmd_arg;
use e2e::host_script::microvm_on;
use e2e::{iotlb_dump, merged, HostScript, MicrovmRun, VduseNet, DEBUG_MICROVM};

/// The stream: 40 pieces of 64 KiB, one every 0.25 s, so it runs about
/// 10 s of guest time and the pause falls in its middle.
const STREAM_PIECES: u32 = 40;
const STREAM_BYTES: u32 = STREAM_PIECES * (64 << 10);
const PINGS: u32 = 40;
/// How long the test host keeps the VM paused, besides its checks.
const PAUSED_SECS: u32 = 3;

/// One VM and its device.
struct Case<'a> {
    label: &'static str,
    device: &'a VduseNet,
    guest_ip: &'static str,
    host_ip: &'static str,
    memory: &'static str,
    /// Appended to `--net`.
    net: &'static str,
    plug: bool,
    debug: bool,
    port: u32,
}

/// The guest: traffic that spans the pause, then its ping summary.
fn guest_script(case: &Case) -> String {
    let Case {
        label,
        guest_ip,
        host_ip,
        port,
        ..
    } = case;
    format!(
        "ip link set eth0 up && ip addr add {guest_ip}/24 dev eth0
ping -c 2 -W 2 {host_ip} >/dev/null
echo {label}-ready
wait_go
ping -i 0.25 -c {PINGS} -W 5 {host_ip} >/tmp/ping.out 2>&1 &
P=$!
(for i in $(seq {STREAM_PIECES}); do dd if=/dev/zero bs=64k count=1 2>/dev/null; sleep 0.25; done) | nc {host_ip} {port}
wait $P
echo \"{label}-ping $(grep 'packets transmitted' /tmp/ping.out)\"
echo {label}-done
wait_go
"
    )
}

/// One VM's story: boot, (plug), start the traffic, pause, look while
/// paused, resume, let the traffic end, look again.
fn scenario(script: &mut HostScript, case: &Case) {
    let Case {
        label,
        device,
        guest_ip,
        port,
        ..
    } = case;
    let mut vm = microvm_on(device, 2, case.memory, case.net, &guest_script(case));
    if case.debug {
        vm.binary = DEBUG_MICROVM;
    }
    let iotlb = device.iotlb_dump.unwrap_or("/dev/null");
    script
        .sh(&format!(
            "timeout 300 microvm-tcp-sink --port {port} --bytes {STREAM_BYTES} >/tmp/sink-{port}.out 2>/tmp/sink-{port}.err &"
        ))
        .microvm(&vm)
        .wait_console(&format!("{label}-ready"), 240, "the guest to boot and ping");
    if case.plug {
        script.ctl_section(&format!("{label}-plug"), "memory-resize 256M --timeout 120");
    }
    script
        .section(&format!("{label}-iotlb-before"), &format!("cat {iotlb}"))
        .go(guest_ip)
        .sh("sleep 3")
        .section(&format!("{label}-pause"), "h_ctl pause 2>&1; echo \"exit=$?\"")
        .ctl_section(&format!("{label}-state-paused"), "state")
        .ctl_section(&format!("{label}-info-paused"), "info")
        .section(&format!("{label}-iotlb-paused"), &format!("cat {iotlb}"))
        .section(
            &format!("{label}-paused-checks"),
            &format!(
                "before=$(wc -l </tmp/console.log)\n\
                 echo \"host-ping $(ping -c {PAUSED_SECS} -W 1 {guest_ip} 2>&1 | grep 'packets transmitted')\"\n\
                 echo \"console-lines-while-paused $(( $(wc -l </tmp/console.log) - before ))\""
            ),
        )
        .section(&format!("{label}-resume"), "h_ctl resume 2>&1; echo \"exit=$?\"")
        .ctl_section(&format!("{label}-state-running"), "state")
        .section(&format!("{label}-pause-again"), "h_ctl pause >/dev/null 2>&1; h_ctl pause 2>&1; h_ctl resume >/dev/null 2>&1; echo \"exit=$?\"")
        .wait_console(&format!("{label}-done"), 180, "the guest's traffic to end after the resume")
        .section(&format!("{label}-sink"), &format!("cat /tmp/sink-{port}.out /tmp/sink-{port}.err"))
        .section(&format!("{label}-iotlb-after"), &format!("cat {iotlb}"))
        .ctl_section(&format!("{label}-counters"), "counters")
        .go(guest_ip)
        .wait_exit(label, 90);
}

fn host_script() -> String {
    let device = VduseNet::on_tap();
    let pairs = VduseNet {
        name: "mq0",
        tap: Some(("tap1", "192.0.3.1/24")),
        iotlb_dump: Some("/tmp/iotlb-mq0"),
        extra_args: "--queues 2 --stats /tmp/mq-stats.json".to_string(),
    };
    let on_tap0 = |label, memory, net, plug, port| Case {
        label,
        device: &device,
        guest_ip: "192.0.2.2",
        host_ip: "192.0.2.1",
        memory,
        net,
        plug,
        debug: false,
        port,
    };
    let mut script = HostScript::new();
    script.vduse_net(&device).vduse_net(&pairs);
    scenario(
        &mut script,
        &on_tap0("plugged", "512M,hotplug=512M", "", true, 5300),
    );
    scenario(
        &mut script,
        &on_tap0("viommu", "512M", ",iommu=on", false, 5301),
    );
    scenario(
        &mut script,
        &Case {
            label: "pairs",
            device: &pairs,
            guest_ip: "192.0.3.2",
            host_ip: "192.0.3.1",
            memory: "512M",
            net: ",queues=2",
            plug: false,
            debug: true,
            port: 5302,
        },
    );
    device_snapshot_scenario(&mut script, &pairs);
    update_scenario(
        &mut script,
        &device,
        "upd256",
        "256M,hotplug=512M",
        5304,
        (true, ""),
    );
    update_scenario(&mut script, &device, "upd2g", "2G", 5305, (false, ""));
    script
        .sh("kill -USR1 \"$(h_get dev_pid.net0)\"; sleep 0.5")
        .stop_devices()
        .section("vduse-log", "sleep 0.5; cat /tmp/vduse-net0.err")
        .section("pairs-log", "cat /tmp/vduse-mq0.err");
    snapshot_scenario(&mut script);
    script.build()
}

/// A VM whose NIC is a two-pair vduse-net whose control queue the VMM
/// serves, saved while its traffic runs: paused, snapshotted, its VMM
/// killed, and restored by a new VMM onto the device (named again by its
/// path), which opens it anew, starts its queues where the guest's rings
/// stood with both pairs enabled, and serves the control queue on from
/// where it was; the guest's traffic goes on.
fn device_snapshot_scenario(script: &mut HostScript, device: &VduseNet) {
    let case = Case {
        label: "snapnet",
        device,
        guest_ip: "192.0.3.2",
        host_ip: "192.0.3.1",
        memory: "256M,hotplug=512M",
        net: ",queues=2",
        plug: false,
        debug: false,
        port: 5303,
    };
    let (label, port) = (case.label, case.port);
    let vm = microvm_on(device, 2, case.memory, case.net, &guest_script(&case));
    let iotlb = device.iotlb_dump.unwrap_or("/dev/null");
    script
        .sh(&format!(
            "timeout 300 microvm-tcp-sink --port {port} --bytes {STREAM_BYTES} >/tmp/sink-{port}.out 2>/tmp/sink-{port}.err &"
        ))
        .microvm(&vm)
        .wait_console(&format!("{label}-ready"), 240, "the guest to boot and ping")
        .ctl_section(&format!("{label}-plug"), "memory-resize 256M --timeout 120")
        .section(&format!("{label}-iotlb-before"), &format!("cat {iotlb}"))
        .go(case.guest_ip)
        .sh("sleep 3")
        .section(&format!("{label}-pause"), "h_ctl pause 2>&1; echo \"exit=$?\"")
        .section(&format!("{label}-take"), "h_ctl snapshot /tmp/snapnet 2>&1; echo \"exit=$?\"")
        .sh("h_vmm_stop; mv /tmp/console.log /tmp/console-snapnet.log; mv /tmp/microvm.err /tmp/microvm-snapnet.err")
        .section(&format!("{label}-stderr-before"), "cat /tmp/microvm-snapnet.err")
        .section(
            &format!("{label}-restore-extra"),
            &format!(
                "timeout 30 microvm --restore /tmp/snapnet --net vdpa={},mac=02:00:00:00:00:09 2>&1 </dev/null; echo \"exit=$?\"",
                device.path_var()
            ),
        )
        .sh(&format!(
            "wc -l </tmp/vduse-{name}.err >/tmp/devlog-lines\nrm -f \"$H_API\"\nH_CONSOLE=/tmp/console.log H_VMM_ERR=/tmp/microvm.err h_vmm_start microvm --restore /tmp/snapnet --net vdpa={} --api-socket \"$H_API\"",
            device.path_var(),
            name = device.name,
        ))
        .wait_true(
            "microvm-ctl --socket \"$H_API\" state >/dev/null 2>&1",
            120,
            "the restored VMM's API",
        )
        .section(&format!("{label}-iotlb-after"), &format!("cat {iotlb}"))
        .ctl_section(&format!("{label}-info"), "info")
        .ctl_section(&format!("{label}-counters"), "counters")
        .wait_console(&format!("{label}-done"), 180, "the restored guest's traffic to end")
        .section(&format!("{label}-sink"), &format!("cat /tmp/sink-{port}.out /tmp/sink-{port}.err"))
        .ctl_section(&format!("{label}-plug-after"), "memory-resize 512M --timeout 120")
        .section(
            &format!("{label}-devlog"),
            &format!("tail -n +$(( $(cat /tmp/devlog-lines) + 1 )) /tmp/vduse-{}.err", device.name),
        )
        .go(case.guest_ip)
        .wait_exit(label, 90);
}

/// The inode of the running VMM's guest-RAM memfd.
const MEMFD_INODE: &str = "for f in /proc/$(h_get vmm_pid)/fd/*; do case \"$(readlink \"$f\")\" in *microvm-guest-ram*) stat -L -c %i \"$f\"; break;; esac; done";

/// Live update of a VM whose NIC is vduse-net, with its traffic running: a
/// new VMM started with `--take-over` on the same API socket path, the old
/// one told `update`; the old one exits, the new one maps the same memfd,
/// opens the device anew and runs the VM on.
fn update_scenario(
    script: &mut HostScript,
    device: &VduseNet,
    label: &'static str,
    memory: &'static str,
    port: u32,
    (plug, net): (bool, &'static str),
) {
    let case = Case {
        label,
        device,
        guest_ip: "192.0.2.2",
        host_ip: "192.0.2.1",
        memory,
        net,
        plug: false,
        debug: false,
        port,
    };
    let vm = microvm_on(device, 2, memory, net, &guest_script(&case));
    let iotlb = device.iotlb_dump.unwrap_or("/dev/null");
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
        .section(&format!("{label}-iotlb-before"), &format!("cat {iotlb}"))
        .section(&format!("{label}-memfd-before"), MEMFD_INODE)
        .go(case.guest_ip)
        .sh("sleep 3")
        .sh(&format!(
            "old=$(h_get vmm_pid); mv /tmp/console.log /tmp/console-{label}-old.log; mv /tmp/microvm.err /tmp/microvm-{label}-old.err; rm -f /tmp/up.sock\n\
             H_CONSOLE=/tmp/console.log H_VMM_ERR=/tmp/microvm.err h_vmm_start microvm --take-over /tmp/up.sock --api-socket \"$H_API\""
        ))
        .wait_true("test -S /tmp/up.sock", 30, "the new VMM to listen for the handover")
        .section(&format!("{label}-update"), "h_ctl update /tmp/up.sock 2>&1; echo \"exit=$?\"")
        .wait_gone("\"$old\"", 15, "the old VMM to exit after the handover")
        .wait_true(
            "test -s \"$H_DIR/vmm_status\"",
            5,
            "the old VMM's exit status",
        )
        .section(
            &format!("{label}-old"),
            &format!(
                "echo \"old-status=$(cat \"$H_DIR/vmm_status\")\"; rm -f \"$H_DIR/vmm_status\"\n\
                 cat /tmp/microvm-{label}-old.err"
            ),
        )
        .wait_true(
            "grep -q 'took over the VM' /tmp/microvm.err",
            60,
            "the new VMM to take the VM over",
        )
        .section(&format!("{label}-took-over"), "cat /tmp/microvm.err")
        .section(&format!("{label}-memfd-after"), MEMFD_INODE)
        .wait_console(&format!("{label}-done"), 180, "the guest's traffic to end after the live update")
        .section(&format!("{label}-sink"), &format!("cat /tmp/sink-{port}.out /tmp/sink-{port}.err"))
        .section(&format!("{label}-iotlb-after"), &format!("cat {iotlb}"))
        .ctl_section(&format!("{label}-counters"), "counters")
        .ctl_section(&format!("{label}-info"), "info");
    if plug {
        script.ctl_section(
            &format!("{label}-plug-after"),
            "memory-resize 512M --timeout 120",
        );
    }
    script.go(case.guest_ip).wait_exit(label, 90);
}

/// Ticks the guest prints, a quarter second apart, with its uptime.
const TICKS: u32 = 80;

/// A VM with no device but its console counts; it is paused, saved, its
/// VMM killed, and a new VMM restores it from the snapshot and it counts on.
/// Refusals on the way: a snapshot of a running VM, into a directory that
/// exists, and restores of a corrupted state file and of a short memory file.
fn snapshot_scenario(script: &mut HostScript) {
    let guest = format!(
        "i=0; while [ $i -lt {TICKS} ]; do i=$((i+1)); echo \"tick $i $(cut -d' ' -f1 /proc/uptime)\"; sleep 0.25; done; echo snap-guest-done"
    );
    let mut vm = MicrovmRun::new(2, "256M");
    vm.cmdline_extra = format!("quiet {}", guest_cmd_arg(&guest));
    vm.extra_args = "--api-socket \"$H_API\"".to_string();
    script
        .sh("H_API=/tmp/api-snap.sock")
        .microvm(&vm)
        .wait_console("^tick 8 ", 240, "the guest to boot and count")
        .section("snap-running", "h_ctl snapshot /tmp/snap 2>&1; echo \"exit=$?\"")
        .section("snap-pause", "h_ctl pause 2>&1; echo \"exit=$?\"")
        .section("snap-take", "h_ctl snapshot /tmp/snap 2>&1; echo \"exit=$?\"")
        .section("snap-again", "h_ctl snapshot /tmp/snap 2>&1; echo \"exit=$?\"")
        .section("snap-files", "ls /tmp/snap; stat -c '%n %s' /tmp/snap/memory; head -n 1 /tmp/snap/state")
        .section("snap-before", "grep '^tick' /tmp/console.log | tail -n 1")
        .sh("h_vmm_stop; mv /tmp/console.log /tmp/console-before.log; mv /tmp/microvm.err /tmp/microvm-before.err")
        .section("snap-stderr", "cat /tmp/microvm-before.err")
        // Refused before any guest runs; bounded all the same.
        .section(
            "restore-corrupt",
            "mkdir /tmp/bad && cp /tmp/snap/memory /tmp/bad/ && sed 's/\"regs\"/\"regz\"/' /tmp/snap/state >/tmp/bad/state\n\
             cmp -s /tmp/snap/state /tmp/bad/state && echo 'not corrupted'\n\
             timeout 30 microvm --restore /tmp/bad 2>&1 </dev/null; echo \"exit=$?\"",
        )
        .section(
            "restore-short",
            "mkdir /tmp/short && cp /tmp/snap/state /tmp/short/ && head -c 268431360 /tmp/snap/memory >/tmp/short/memory\n\
             timeout 30 microvm --restore /tmp/short 2>&1 </dev/null; echo \"exit=$?\"",
        )
        .sh(
            "rm -f \"$H_API\"\nH_CONSOLE=/tmp/console.log H_VMM_ERR=/tmp/microvm.err h_vmm_start microvm --restore /tmp/snap --api-socket \"$H_API\"",
        )
        .wait_console("snap-guest-done", 120, "the restored guest to count on to the end")
        .wait_exit("restored", 60);
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
    check_traffic(label, 1, "the pause");
}

/// The traffic a VM sent across `what`: the stream arrived whole, and
/// at most `lost` of its pings (those in flight when it stopped) did not
/// come back; the guest then powered off (the VMM exited 0).
fn check_traffic(label: &str, lost: u32, what: &str) {
    let sink = section(&format!("{label}-sink"));
    assert!(
        sink.contains(&format!("\"bytes\":{STREAM_BYTES}")),
        "stream cut by {what}:\n{sink}"
    );
    let console = section(&format!("{label}-console"));
    let (sent, received) = ping_counts(console_line(console, &format!("{label}-ping")));
    assert_eq!(sent, PINGS);
    assert!(
        received + lost >= PINGS,
        "{received} of {PINGS} pings came back across {what}"
    );
    assert_eq!(
        section(&format!("{label}-exit")).trim(),
        "0",
        "{}",
        section(&format!("{label}-stderr"))
    );
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
fn the_debug_build_pauses_and_resumes_a_two_pair_device_and_enables_both_pairs_again() {
    check_pause_and_resume("pairs");
    let info = json("pairs-info-paused");
    assert_eq!(
        info["devices"][0]["control_queue"]["queue_pairs"], 2,
        "{info}"
    );
    // Each of the four data queues stopped by the pause and the second one
    // and started again by the resume from where the guest's rings stood.
    let log = section("pairs-log");
    for queue in ["queue 2 (rx1) started", "queue 3 (tx1) started"] {
        let starts = log.lines().filter(|l| l.contains(queue)).count();
        assert!(starts >= 3, "{queue}: {starts} times\n{log}");
    }
}

/// (tick, uptime) of a `tick N UPTIME` line.
fn tick(line: &str) -> (u32, f64) {
    let mut words = line.split_whitespace().skip(1);
    let n = words.next().and_then(|w| w.parse().ok());
    let up = words.next().and_then(|w| w.parse().ok());
    n.zip(up)
        .unwrap_or_else(|| panic!("not a tick line: {line}"))
}

#[test]
fn a_vm_saved_while_paused_goes_on_in_a_new_vmm_from_where_it_was() {
    let running = section("snap-running");
    assert!(
        running.contains("the VM must be paused first") && !running.contains("exit=0"),
        "{running}"
    );
    assert!(section("snap-pause").contains("exit=0"));
    let taken = section("snap-take");
    assert!(taken.contains("exit=0"), "{taken}");
    assert!(taken.contains("\"memory_bytes\": 268435456"), "{taken}");
    let again = section("snap-again");
    assert!(
        again.contains("cannot create the snapshot directory") && !again.contains("exit=0"),
        "{again}"
    );
    let files = section("snap-files");
    assert!(files.contains("/tmp/snap/memory 268435456"), "{files}");
    assert!(
        files.contains("{\"magic\":\"microvm-snapshot\",\"version\":1,\"arch\":\"x86_64\""),
        "{files}"
    );

    // Each bad snapshot is refused with one line saying what is wrong.
    let corrupt = section("restore-corrupt");
    assert!(
        corrupt.contains("microvm: restore: /tmp/bad/state: corrupted"),
        "{corrupt}"
    );
    assert!(!corrupt.contains("exit=0"));
    let short = section("restore-short");
    assert!(
        short.contains("the memory file is 268431360 bytes; the state says guest RAM is 268435456"),
        "{short}"
    );
    assert!(!short.contains("exit=0"));

    // The restored guest counts on from the tick it was saved at, with its
    // uptime going on from where it was.
    let (saved_tick, saved_uptime) = tick(section("snap-before").trim());
    let console = section("restored-console");
    let (first_tick, first_uptime) = tick(
        console
            .lines()
            .find(|l| l.starts_with("tick "))
            .unwrap_or_else(|| panic!("the restored guest printed no tick:\n{console}")),
    );
    assert_eq!(first_tick, saved_tick + 1, "{console}");
    assert!(
        first_uptime >= saved_uptime,
        "uptime {saved_uptime} then {first_uptime}"
    );
    assert!(console.contains(&format!("tick {TICKS} ")), "{console}");
    assert_eq!(
        section("restored-exit").trim(),
        "0",
        "{}",
        section("restored-stderr")
    );
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

#[test]
fn a_vm_with_a_vdpa_nic_saved_mid_stream_goes_on_in_a_new_vmm_with_its_traffic_whole() {
    let take = section("snapnet-take");
    assert!(section("snapnet-pause").contains("exit=0"));
    assert!(take.contains("exit=0"), "{take}");
    // Only the path may be given again; the rest is the snapshot's.
    let extra = section("snapnet-restore-extra");
    assert!(
        extra.contains("with --restore only the device's path is taken")
            && !extra.contains("exit=0"),
        "{extra}"
    );

    // The stream opened before the snapshot arrived whole after the
    // restore, and the pings went on: the guest was frozen while no VMM
    // ran, so at most the ones in flight at the pause were lost.
    check_traffic("snapnet", 2, "the snapshot and restore");

    // The new VMM's device reaches what the old one's did: its IOTLB (the
    // device's own dump) after the restore equals the one before.
    let before = reach(section("snapnet-iotlb-before"));
    assert!(!before.is_empty());
    assert_eq!(before, reach(section("snapnet-iotlb-after")));
    // Started once, by the restore, not by a driver that started over,
    // with both pairs the guest had in use enabled again, from where the
    // guest's rings stood.
    let info = json("snapnet-info");
    assert_eq!(info["state"], "running", "{info}");
    let restored = section("snapnet-stderr");
    assert!(
        restored.contains("IOTLBs sent (net0: 1 batch, 2 updates)"),
        "boot RAM and the plugged blocks, one batch:\n{restored}"
    );
    check_plugged_memory_went_along("snapnet");
    assert_eq!(
        info["devices"][0]["control_queue"]["queue_pairs"], 2,
        "{info}"
    );
    let log = section("snapnet-devlog");
    for queue in ["queue 2 (rx1) started", "queue 3 (tx1) started"] {
        assert!(
            log.contains(queue),
            "{queue} not started by the restore:\n{log}"
        );
    }
    assert!(
        log.lines()
            .any(|l| l.contains("queue 1 (tx) started") && !l.ends_with("avail 0")),
        "the restore started the first pair over from 0:\n{log}"
    );
    let counters = json("snapnet-counters");
    let device = &counters["devices"][0];
    assert_eq!(device["activations"], 1, "{counters}");
    assert_eq!(device["resets"], 0, "{counters}");
    // Its whole IOTLB went in one batch when it was attached, before any
    // vCPU ran, and nothing was replayed.
    assert_eq!(device["batch_begin"], 1, "{counters}");
    assert_eq!(device["batch_end"], 1, "{counters}");
    assert_eq!(device["iotlb_replays"], 0, "{counters}");
}

/// What a device's IOTLB dump lets it reach: merged ranges, each with its
/// permissions. (A new VMM sends plugged blocks with boot RAM, merged,
/// where the old one sent one entry per plug.)
fn reach(dump: &str) -> Vec<((u64, u64), String)> {
    let entries = iotlb_dump(dump);
    let mut perms: Vec<String> = entries.iter().map(|(_, p)| p.clone()).collect();
    perms.sort();
    perms.dedup();
    perms
        .into_iter()
        .flat_map(|perm| {
            let ranges = entries
                .iter()
                .filter(|(_, p)| *p == perm)
                .map(|(r, _)| *r)
                .collect();
            merged(ranges).into_iter().map(move |r| (r, perm.clone()))
        })
        .collect()
}

/// The 256 MiB plugged through virtio-mem before the snapshot or update
/// are plugged in the new VMM, and its device serves the guest on: a
/// second resize to 512 MiB is done by the guest.
fn check_plugged_memory_went_along(label: &str) {
    let plug = section(&format!("{label}-plug"));
    assert!(plug.contains("\"plugged_size\": 268435456"), "{plug}");
    let info = json(&format!("{label}-info"));
    assert_eq!(
        info["memory"]["hotplug"]["plugged_size"], 268435456u64,
        "{info}"
    );
    assert_eq!(info["memory"]["hotplug"]["driver_active"], true, "{info}");
    let after = section(&format!("{label}-plug-after"));
    assert!(
        after.contains("\"plugged_size\": 536870912") && after.contains("\"done\": true"),
        "the restored virtio-mem did not serve a new resize:\n{after}"
    );
}

/// The downtime the new VMM reported, in ms.
fn check_live_update(label: &str) -> u64 {
    let update = section(&format!("{label}-update"));
    assert!(
        update.contains("exit=0") && update.contains("\"handed_over\": true"),
        "{update}"
    );
    let old = section(&format!("{label}-old"));
    assert!(old.contains("old-status=0"), "{old}");
    assert!(old.contains("the VM was handed over to a new VMM"), "{old}");
    // The new VMM maps the very memfd the old one had: nothing was copied.
    let before = section(&format!("{label}-memfd-before")).trim();
    assert!(!before.is_empty(), "no guest-RAM memfd in the old VMM");
    assert_eq!(before, section(&format!("{label}-memfd-after")).trim());

    let took = section(&format!("{label}-took-over"));
    let line = took
        .lines()
        .find(|l| l.contains("took over the VM"))
        .unwrap_or_else(|| panic!("the new VMM did not take over:\n{took}"));
    let downtime: u64 = line
        .split("downtime ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no downtime in: {line}"));

    // The traffic went on: the stream whole, the pings but for those in
    // flight at the pause.
    check_traffic(label, 2, "the live update");
    // The new VMM sent the device everything it may reach as one batch
    // before the VM ran; it reaches what it did, and nothing was sent since.
    assert!(line.contains("IOTLBs sent (net0: 1 batch, "), "{line}");
    let counters = json(&format!("{label}-counters"));
    let device = &counters["devices"][0];
    assert_eq!(device["activations"], 1, "{counters}");
    assert_eq!(device["resets"], 0, "{counters}");
    assert_eq!(
        reach(section(&format!("{label}-iotlb-before"))),
        reach(section(&format!("{label}-iotlb-after")))
    );
    assert_eq!(device["batch_begin"], 1, "{counters}");
    eprintln!("{label}: {line}");
    downtime
}

#[test]
fn a_live_update_hands_the_vm_to_a_new_vmm_without_copying_memory_or_cutting_its_traffic() {
    // 256 MiB with 256 MiB plugged, and 2 GiB: both identity-mapped. (A
    // 2 GiB guest behind the vIOMMU passed here once, its domain replayed as
    // one batch; in CI the emulated test host's kernel then stalled twice in
    // free_unref_page during that scenario, so it is left out until a
    // smaller one is shown to hold.)
    let small = check_live_update("upd256");
    check_plugged_memory_went_along("upd256");
    let large = check_live_update("upd2g");
    eprintln!("live update downtime: 256 MiB {small} ms, 2 GiB {large} ms");
    // Copying 2 GiB would take seconds here; mapping it does not.
    assert!(
        large <= 4 * small.max(250),
        "downtime grew with memory: 256 MiB {small} ms, 2 GiB {large} ms"
    );
}
