//! Memory hotplug with a vDPA device attached, in the test host: the guest
//! (512 MiB, hotplug up to 2 GiB) is resized to 256M, 1G, 2G, 512M and 0
//! through the control API while it pings the test host through vduse-net.
//! After each step: the guest's MemTotal, the IOTLB the device holds, and
//! the messages each guest request cost.

use e2e::host_script::microvm_on;
use e2e::{hex, iotlb_dump, merged, HostScript, VduseNet};

const GUEST_IP: &str = "192.0.2.2";

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const BOOT: u64 = 512 * MIB;
/// (argument to memory-resize, bytes)
const STEPS: [(&str, u64); 5] = [
    ("256M", 256 * MIB),
    ("1G", GIB),
    ("2G", 2 * GIB),
    ("512M", 512 * MIB),
    ("0", 0),
];

fn guest_script() -> String {
    "ip link set eth0 up && ip addr add 192.0.2.2/24 dev eth0
ping 192.0.2.1 >/tmp/ping.log 2>&1 &
PING=$!
(while true; do echo \"memtotal=$(sed -n 's/^MemTotal: *\\([0-9]*\\).*/\\1/p' /proc/meminfo)\"; sleep 0.5; done) &
echo guest-ready
wait_go
kill -INT $PING; sleep 1
tail -3 /tmp/ping.log
# Buffers in hot-plugged memory. Kernel socket buffers never come from
# ZONE_MOVABLE, so new memory joins ZONE_NORMAL for this phase; the
# allocator hands out newly onlined pages last, so boot memory is filled
# before the plug (leaving room to online it) and what it still has free
# is filled after; then the host pings with large packets.
echo online_kernel > /sys/devices/system/memory/auto_online_blocks
mkdir -p /fill && mount -t tmpfs -o size=100% tmpfs /fill
free_kib() { sed -n 's/^MemFree: *\\([0-9]*\\).*/\\1/p' /proc/meminfo; }
dd if=/dev/zero of=/fill/boot bs=1M count=$(( ($(free_kib) - 32768) / 1024 )) 2>/dev/null
left=$(free_kib)
echo fill-done
wait_go
dd if=/dev/zero of=/fill/rest bs=1M count=$(( left / 1024 + 16 )) 2>/dev/null
echo rest-done
wait_go
echo guest-done
"
    .to_string()
}

fn host_script() -> String {
    let device = VduseNet::on_tap();
    let vm = microvm_on(&device, 2, "512M,hotplug=2G", "", &guest_script());
    let mut script = HostScript::new();
    script
        .vduse_net(&device)
        .microvm(&vm)
        .wait_console("memtotal=", 180, "the guest to boot and report MemTotal")
        .sh(
            "memtotal() { grep memtotal= /tmp/console.log | tail -1 | cut -d= -f2; }\n\
             memtotal_is() { [ \"$(memtotal)\" = \"$1\" ]; }\nbase=$(memtotal)",
        )
        .section("base", "echo $base");
    for (arg, bytes) in STEPS {
        let kib = bytes / 1024;
        script
            .ctl_section(
                &format!("resize-{arg}"),
                &format!("memory-resize {arg} --timeout 120"),
            )
            // MemTotal follows the plug a moment later (the guest onlines
            // the blocks after answering); the wait is the test's check.
            .sh(&format!(
                "h_wait_true 30 'the guest MemTotal to follow the resize to {arg}' \
                 memtotal_is $((base + {kib})) || true"
            ))
            .section(&format!("memtotal-{arg}"), "memtotal")
            .ctl_section(&format!("info-{arg}"), "info")
            .section(&format!("iotlb-{arg}"), "cat /tmp/iotlb");
    }
    script
        .ctl_section("counters", "counters")
        .go(GUEST_IP)
        .wait_console("fill-done", 120, "the guest to fill its boot memory")
        .ctl_section("buffers-resize", "memory-resize 512M --timeout 120")
        .go(GUEST_IP)
        .wait_console("rest-done", 120, "the guest to fill the plugged memory")
        .section(
            "buffers-ping",
            &format!("ping -c 300 -i 0.05 -W 2 -s 1400 {GUEST_IP} | tail -2"),
        )
        .sh("kill -USR1 \"$(h_get dev_pid.net0)\"; sleep 1")
        .ctl_section("buffers-info", "info")
        .section(
            "buffers-stats",
            "grep 'stats iotlb_updates' /tmp/vduse-net0.err | tail -1",
        )
        .section(
            "refused",
            "h_ctl memory-resize 3M 2>&1; echo \"exit=$?\"\nh_ctl memory-resize 4G 2>&1; echo \"exit=$?\"",
        )
        .go(GUEST_IP)
        .wait_exit("vm", 60)
        .section("console", "grep -v memtotal= /tmp/console.log")
        .stop_devices();
    script.build()
}

e2e::shared_test_host_run!("hotplug", host_script());

/// The device's IOTLB from vduse-net's dump; every entry read-write.
fn dump_ranges(dump: &str) -> Vec<(u64, u64)> {
    iotlb_dump(dump)
        .into_iter()
        .map(|(range, perm)| {
            assert_eq!(perm, "rw", "{dump}");
            range
        })
        .collect()
}

#[test]
fn every_resize_completes_and_the_guest_memtotal_follows() {
    let base: u64 = section("base").trim().parse().expect("base MemTotal");
    for (arg, bytes) in STEPS {
        let resize = json(&format!("resize-{arg}"));
        assert_eq!(resize["done"], true, "resize to {arg}: {resize}");
        assert_eq!(resize["plugged_size"], bytes, "{resize}");
        let memtotal: u64 = section(&format!("memtotal-{arg}")).trim().parse().unwrap();
        assert_eq!(
            memtotal,
            base + bytes / 1024,
            "MemTotal after resize to {arg}"
        );
    }
}

#[test]
fn after_every_step_the_device_iotlb_is_boot_memory_plus_the_plugged_blocks() {
    for (arg, bytes) in STEPS {
        let info = json(&format!("info-{arg}"));
        let hotplug = &info["memory"]["hotplug"];
        assert_eq!(hotplug["plugged_size"], bytes, "{info}");
        let mut expected = vec![(0, BOOT)];
        for range in hotplug["plugged"].as_array().unwrap() {
            let start = hex(range["guest_addr"].as_str().unwrap());
            expected.push((start, start + range["size"].as_u64().unwrap()));
        }
        let total: u64 = expected.iter().map(|(s, e)| e - s).sum();
        assert_eq!(total, BOOT + bytes);
        assert_eq!(
            merged(dump_ranges(section(&format!("iotlb-{arg}")))),
            merged(expected),
            "device IOTLB after resize to {arg}"
        );
        // The engine's own view agrees with the device.
        let engine: Vec<(u64, u64)> = info["devices"][0]["iotlb"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                let start = hex(m["iova"].as_str().unwrap());
                (start, start + m["size"].as_u64().unwrap())
            })
            .collect();
        assert_eq!(
            merged(engine),
            merged(dump_ranges(section(&format!("iotlb-{arg}"))))
        );
    }
}

#[test]
fn each_guest_request_is_one_batch_with_one_message_per_changed_range() {
    let counters = json("counters");
    let transactions = counters["memory_hotplug"]["transactions"]
        .as_array()
        .unwrap()
        .clone();
    assert!(!transactions.is_empty(), "{counters}");
    for t in &transactions {
        assert!(t["error"].is_null(), "{t}");
        let device = &t["devices"][0];
        assert_eq!(device["batched"], true, "{t}");
        let (updates, invalidates) = (
            device["iotlb_update"].as_u64().unwrap(),
            device["iotlb_invalidate"].as_u64().unwrap(),
        );
        assert_eq!(
            device["messages"].as_u64().unwrap(),
            updates + invalidates + 2,
            "one BEGIN/END pair: {t}"
        );
        match t["kind"].as_str().unwrap() {
            // The guest plugs and unplugs whole 128 MiB memory blocks here,
            // one contiguous range per request.
            "plug" => assert_eq!(
                (updates, invalidates),
                (t["ranges_added"].as_array().unwrap().len() as u64, 0),
                "{t}"
            ),
            _ => assert_eq!(
                (updates, invalidates),
                (0, t["ranges_removed"].as_array().unwrap().len() as u64),
                "{t}"
            ),
        }
    }
    // Overall: the boot batch plus one batch per guest request, all closed.
    let net = &counters["devices"][0];
    assert_eq!(net["batch_begin"], net["batch_end"]);
    assert_eq!(
        net["batch_begin"].as_u64().unwrap(),
        1 + transactions.len() as u64,
        "{counters}"
    );
}

#[test]
fn a_ping_running_through_the_whole_sequence_loses_nothing() {
    let console = section("console");
    let summary = console
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary:\n{console}"));
    assert!(summary.contains(" 0% packet loss"), "{summary}");
    assert_eq!(section("vm-exit").trim(), "0", "{}", section("vm-stderr"));
}

#[test]
fn resizes_the_device_cannot_honour_are_refused() {
    let text = section("refused");
    assert!(
        text.contains("is not a multiple of the block size"),
        "{text}"
    );
    assert!(text.contains("exceeds the hotplug region"), "{text}");
    assert_eq!(text.matches("exit=1").count(), 2, "{text}");
}

#[test]
fn network_buffers_placed_in_hot_plugged_memory_work() {
    let resize = json("buffers-resize");
    assert_eq!(resize["done"], true, "{resize}");
    let ping = section("buffers-ping");
    assert!(
        ping.contains("300 packets received, 0% packet loss"),
        "{ping}"
    );
    let info = json("buffers-info");
    let plugged: Vec<(u64, u64)> = info["memory"]["hotplug"]["plugged"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let start = hex(r["guest_addr"].as_str().unwrap());
            (start, start + r["size"].as_u64().unwrap())
        })
        .collect();
    assert!(!plugged.is_empty(), "{info}");
    // vduse-net counts, per IOTLB entry, the buffers it read (tx) and wrote
    // (rx): "ranges=[first-last:txN,rxM ...]".
    let stats = section("buffers-stats");
    let ranges = stats
        .split("ranges=[")
        .nth(1)
        .and_then(|r| r.split(']').next())
        .unwrap_or_else(|| panic!("no per-range statistics: {stats}"));
    let used_in_plugged: u64 = ranges
        .split_whitespace()
        .filter_map(|entry| {
            let (span, uses) = entry.split_once(':')?;
            let (first, _) = span.split_once('-')?;
            let first = hex(first);
            plugged
                .iter()
                .any(|&(s, e)| (s..e).contains(&first))
                .then(|| {
                    uses.split(',')
                        .filter_map(|u| {
                            u.trim_start_matches(|c: char| c.is_alphabetic())
                                .parse::<u64>()
                                .ok()
                        })
                        .sum::<u64>()
                })
        })
        .sum();
    assert!(
        used_in_plugged > 0,
        "no buffer came from plugged memory: {stats}"
    );
}
