//! The vIOMMU end to end, in the test host: a guest whose virtio-net device
//! sits behind our virtio-iommu (`--net vdpa=...,iommu=on`), over vduse-net
//! on a TAP. Three boots in one test host:
//! - `lazy`: the guest's default DMA mode (invalidations deferred);
//! - `strict`: `iommu.strict=1` (every unmap synced at once);
//! - `passthrough`: `iommu.passthrough=1` (an identity domain), with a
//!   virtio-mem resize.
//!
//! Each pings the test host, sends a TCP stream of known size, then unbinds
//! and rebinds the net driver and pings again. After each phase the test
//! looks at the device's IOTLB (vduse-net's dump and its log of rebuilds)
//! and at the VMM's API.

use e2e::{base64, hex, iotlb_dump, merged};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const BOOT: u64 = 512 * MIB;
/// Every packet is mapped and unmapped through the vIOMMU, which nested
/// emulation makes slow (tens of KiB/s): keep the stream small.
const STREAM_BYTES: u64 = MIB;
const MODES: [&str; 3] = ["lazy", "strict", "passthrough"];

fn guest_script() -> String {
    format!(
        "up() {{ ip link set eth0 up && ip addr add 192.0.2.2/24 dev eth0; }}
up
ping -c 20 -W 2 192.0.2.1
dd if=/dev/zero bs=64k count={blocks} 2>/dev/null | nc 192.0.2.1 5001
echo phase1-done
wait_go
echo 0000:00:01.0 > /sys/bus/pci/drivers/virtio-pci/unbind
echo 0000:00:01.0 > /sys/bus/pci/drivers/virtio-pci/bind
sleep 1
up
ping -c 5 -W 2 192.0.2.1
echo phase2-done
wait_go
",
        blocks = STREAM_BYTES / (64 << 10)
    )
}

fn host_script() -> String {
    let cmd = base64(guest_script().as_bytes());
    format!(
        r#". "$MICROVM_HARNESS"
H_API=/tmp/api.sock
fail() {{ echo "@@section harness-failure"; echo "$1"; h_vmm_stop; h_vduse_stop net0; exit 1; }}
dev=$(h_vduse_start net0 --tap tap0 --iotlb-dump /tmp/iotlb) || fail "vduse-net to start"
ip addr add 192.0.2.1/24 dev tap0
# One line per finished IOTLB rebuild: "iotlb update #N: E entries ... bytes=B".
rebuilds() {{ grep -E "iotlb update #[0-9]+: " /tmp/vduse-net0.err | sed -n "$(($1 + 1)),\$p"; }}
run_vm() {{
  name=$1; extra=$2
  rm -f /tmp/api.sock
  mark=$(grep -cE "iotlb update #[0-9]+: " /tmp/vduse-net0.err)
  microvm-tcp-sink --port 5001 --bytes {bytes} >/tmp/sink.out 2>/tmp/sink.err &
  H_CONSOLE=/tmp/console.log H_VMM_ERR=/tmp/microvm.err h_vmm_start microvm --kernel "$MICROVM_GUEST_KERNEL" \
    --initramfs "$MICROVM_GUEST_INITRAMFS" --cpus 2 \
    --memory size=512M,hotplug=1G --net vdpa="$dev",iommu=on --api-socket /tmp/api.sock \
    --cmdline "console=ttyS0 reboot=k panic=1 quiet $extra microvm.cmd={cmd}"
  h_wait_console phase1-done 300 "$name: the guest to ping and stream" || fail "$name: phase 1"
  sleep 1
  # Rebuilds before drains: every rebuild seen here was counted by then.
  echo "@@section $name-rebuilds-1"; rebuilds $mark
  echo "@@section $name-counters-1"; h_ctl counters
  h_snapshot_between_infos /tmp/iotlb /tmp/iotlb-snap /tmp/info || fail "$name: info"
  echo "@@section $name-iotlb-1"; cat /tmp/iotlb-snap
  echo "@@section $name-info-1"; cat /tmp/info
  echo "@@section $name-sink"; cat /tmp/sink.out
  if [ "$name" = passthrough ]; then
    echo "@@section $name-resize"; h_ctl memory-resize 256M --timeout 120
    echo "@@section $name-iotlb-resized"; cat /tmp/iotlb
    echo "@@section $name-info-resized"; h_ctl info
  fi
  h_go 192.0.2.2 || fail "$name: go"
  h_wait_console phase2-done 180 "$name: the guest to reset its device and ping again" || fail "$name: phase 2"
  sleep 1
  echo "@@section $name-counters-2"; h_ctl counters
  echo "@@section $name-iotlb-2"; cat /tmp/iotlb
  h_go 192.0.2.2 || fail "$name: go"
  st=$(h_vmm_wait 60) || fail "$name: the VMM to exit"; echo "@@section $name-exit"; echo $st
  echo "@@section $name-rebuilds-all"; rebuilds $mark
  echo "@@section $name-stderr"; cat /tmp/microvm.err
  echo "@@section $name-console"; cat /tmp/console.log
}}
run_vm lazy ""
run_vm strict "iommu.strict=1"
run_vm passthrough "iommu.passthrough=1"
h_vduse_stop net0
echo "@@section vduse-log"; tail -50 /tmp/vduse-net0.err
"#,
        bytes = STREAM_BYTES,
    )
}

e2e::shared_test_host_run!("viommu", host_script());

/// (entries, bytes) after each rebuild vduse-net logged.
fn rebuilds(name: &str) -> Vec<(u64, u64)> {
    section(name)
        .lines()
        .map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let entries = words
                .iter()
                .position(|w| *w == "entries")
                .and_then(|i| i.checked_sub(1))
                .and_then(|i| words.get(i))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no entry count in: {line}"));
            let bytes = words
                .iter()
                .find_map(|w| w.strip_prefix("bytes="))
                .map(hex)
                .unwrap_or_else(|| panic!("no byte count in: {line}"));
            (entries, bytes)
        })
        .collect()
}

fn requests(counters: &Value, kind: &str) -> u64 {
    counters["iommu"]["requests"][kind]
        .as_object()
        .map_or(0, |by_status| {
            by_status.values().filter_map(Value::as_u64).sum()
        })
}

fn ping_ok(console: &str, count: u32) -> bool {
    console.lines().any(|l| {
        l.starts_with(&format!(
            "{count} packets transmitted, {count} packets received, 0% packet loss"
        ))
    })
}

/// The guest's mappings in its domains, as [start, end) ranges.
fn domain_ranges(info: &Value) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for domain in info["iommu"]["domains"].as_array().into_iter().flatten() {
        for m in domain["mappings"].as_array().into_iter().flatten() {
            let start = hex(m["iova"].as_str().unwrap_or("0"));
            out.push((start, start + m["size"].as_u64().unwrap_or(0)));
        }
    }
    merged(out)
}

fn inside(range: (u64, u64), union: &[(u64, u64)]) -> bool {
    union.iter().any(|&(s, e)| s <= range.0 && range.1 <= e)
}

#[test]
fn the_guest_pings_and_streams_through_the_vdpa_device_behind_the_iommu() {
    for mode in MODES {
        let console = section(&format!("{mode}-console"));
        assert!(ping_ok(console, 20), "{mode}: first ping:\n{console}");
        let sink: Value = serde_json::from_str(section(&format!("{mode}-sink")))
            .unwrap_or_else(|e| panic!("{mode}: sink output ({e}):\n{}", run().raw));
        assert_eq!(sink["bytes"], STREAM_BYTES, "{mode}: stream: {sink}");
        assert_eq!(
            section(&format!("{mode}-exit")).trim(),
            "0",
            "{mode}: {}",
            section(&format!("{mode}-stderr"))
        );
    }
}

#[test]
fn after_driver_unbind_and_bind_the_guest_still_pings() {
    for mode in MODES {
        let console = section(&format!("{mode}-console"));
        assert!(ping_ok(console, 5), "{mode}: ping after rebind:\n{console}");
    }
}

#[test]
fn translated_modes_never_give_the_device_all_of_guest_ram() {
    for mode in ["lazy", "strict"] {
        let all = rebuilds(&format!("{mode}-rebuilds-all"));
        assert!(!all.is_empty(), "{mode}: no rebuilds seen");
        for (entries, bytes) in &all {
            assert!(
                *bytes < BOOT,
                "{mode}: the device held {bytes:#x} bytes in {entries} entries"
            );
        }
    }
}

#[test]
fn the_device_holds_only_what_the_guest_mapped() {
    for mode in ["lazy", "strict"] {
        let info = json(&format!("{mode}-info-1"));
        let mapped = domain_ranges(&info);
        assert!(
            !mapped.is_empty(),
            "{mode}: the guest mapped nothing: {info}"
        );
        let dump = iotlb_dump(section(&format!("{mode}-iotlb-1")));
        assert!(!dump.is_empty(), "{mode}: empty device IOTLB");
        for (range, perm) in &dump {
            assert!(
                inside(*range, &mapped),
                "{mode}: device entry {range:x?} {perm} is not a guest mapping {mapped:x?}"
            );
        }
        // The engine's view is what the device holds.
        let engine: Vec<(u64, u64)> = info["devices"][0]["iotlb"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                let start = hex(m["iova"].as_str().unwrap());
                (start, start + m["size"].as_u64().unwrap())
            })
            .collect();
        let device: Vec<(u64, u64)> = dump.iter().map(|(r, _)| *r).collect();
        assert_eq!(merged(engine), merged(device), "{mode}");
        assert_ne!(
            info["devices"][0]["address_space"], "identity",
            "{mode}: {info}"
        );
    }
}

#[test]
fn device_rebuilds_never_exceed_drains_and_lazy_mode_batches_requests() {
    for mode in ["lazy", "strict"] {
        let counters = json(&format!("{mode}-counters-1"));
        let rebuilt = rebuilds(&format!("{mode}-rebuilds-1")).len() as u64;
        let drains = counters["iommu"]["drains"].as_u64().unwrap();
        let maps = requests(&counters, "map");
        let unmaps = requests(&counters, "unmap");
        eprintln!(
            "{mode}: {maps} MAP + {unmaps} UNMAP requests in {drains} drains; \
             {rebuilt} device IOTLB rebuilds"
        );
        assert!(maps > 0, "{mode}: {counters}");
        assert!(
            rebuilt <= drains,
            "{mode}: {rebuilt} rebuilds > {drains} drains"
        );
        if mode == "lazy" {
            assert!(
                rebuilt < maps + unmaps,
                "lazy: {rebuilt} rebuilds, {maps} MAPs + {unmaps} UNMAPs"
            );
        }
        let net = &counters["devices"][0];
        assert_eq!(net["batch_begin"], net["batch_end"], "{mode}");
    }
}

#[test]
fn passthrough_gives_the_device_all_guest_ram_and_follows_hotplug() {
    let boot: Vec<(u64, u64)> = iotlb_dump(section("passthrough-iotlb-1"))
        .into_iter()
        .map(|(r, _)| r)
        .collect();
    assert_eq!(
        merged(boot),
        vec![(0, BOOT)],
        "{}",
        section("passthrough-info-1")
    );
    let resize = json("passthrough-resize");
    assert_eq!(resize["done"], true, "{resize}");
    let info = json("passthrough-info-resized");
    let mut expected = vec![(0, BOOT)];
    for range in info["memory"]["hotplug"]["plugged"].as_array().unwrap() {
        let start = hex(range["guest_addr"].as_str().unwrap());
        expected.push((start, start + range["size"].as_u64().unwrap()));
    }
    let resized: Vec<(u64, u64)> = iotlb_dump(section("passthrough-iotlb-resized"))
        .into_iter()
        .map(|(r, _)| r)
        .collect();
    assert_eq!(merged(resized), merged(expected), "{info}");
    assert_eq!(info["devices"][0]["address_space"], "identity", "{info}");
}
