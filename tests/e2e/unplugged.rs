//! Unplugged virtio-mem memory is not backed for the guest: when the guest
//! writes to blocks it never plugged, or to blocks it just unplugged, the
//! VMM's memory does not grow.
//!
//! Measured from outside the VMM: the Rss of the VMM's mapping of the
//! hotplug region (its own memfd, so its own VMA in /proc/PID/smaps). The
//! guest writes one byte per 4 KiB page over 1 MiB with busybox `devmem`.
//! /dev/mem refuses the region while the virtio-mem driver holds it
//! (STRICT_DEVMEM, which virtio-mem needs), so the guest unbinds the driver
//! first; nothing is plugged then, so the driver lets the region go.
//! Control: guest writes to plugged memory (a tmpfs file, which the guest
//! puts in the movable zone the plugged memory joined) do raise the Rss.
//!
//! The host drives the guest through a small command loop over the network
//! (vduse-net + TAP): each command's output comes back on the console.

use e2e::{base64, hex};

const KIB: u64 = 1024;
/// Pages the guest writes in each probe (one byte each): 1 MiB.
const PAGES: u64 = 256;
/// Where, in the 1 GiB region, the never-plugged probe writes: far above
/// the 128 MiB the guest plugs (the test checks it stayed unplugged).
const NEVER_PLUGGED_OFFSET: u64 = 768 << 20;

fn guest_script() -> String {
    "ip link set eth0 up && ip addr add 192.0.2.2/24 dev eth0
mkdir -p /fill && mount -t tmpfs tmpfs /fill
echo guest-ready
n=0
while true; do
  nc -l -p 5000 >/tmp/cmd 2>/dev/null
  n=$((n+1))
  sh /tmp/cmd >/tmp/out 2>&1; rc=$?
  sed \"s/^/out$n: /\" /tmp/out
  echo \"cmd-done $n rc=$rc\"
  [ -e /tmp/stop ] && break
done
"
    .to_string()
}

/// Guest commands.
const UNBIND: &str = "d=$(basename $(ls -d /sys/bus/virtio/drivers/virtio_mem/virtio*)) && echo $d >/tmp/vmdev && echo $d >/sys/bus/virtio/drivers/virtio_mem/unbind && echo unbound $d";
const BIND: &str =
    "echo $(cat /tmp/vmdev) >/sys/bus/virtio/drivers/virtio_mem/bind && echo bound $(cat /tmp/vmdev)";

/// One byte per page over `PAGES` pages from the guest physical address
/// that replaces `%s` (a printf format, filled in by the host script).
fn write_pages() -> String {
    format!(
        "a=%s; i=0; while [ $i -lt {PAGES} ]; do devmem $((a + i * 4096)) 8 0x5a || exit 1; i=$((i+1)); done; echo wrote {PAGES} pages at $a"
    )
}

fn host_script() -> String {
    let cmd = base64(guest_script().as_bytes());
    format!(
        r#". "$MICROVM_HARNESS"
fail() {{ echo "@@section harness-failure"; echo "$1"; h_vmm_stop; h_vduse_stop net0; exit 1; }}
dev=$(h_vduse_start net0 --tap tap0) || fail "vduse-net to start"
ip addr add 192.0.2.1/24 dev tap0
H_CONSOLE=/tmp/console.log H_VMM_ERR=/tmp/microvm.err h_vmm_start microvm --kernel "$MICROVM_GUEST_KERNEL" --initramfs "$MICROVM_GUEST_INITRAMFS" --cpus 1 \
  --memory size=256M,hotplug=1G --net vdpa="$dev" --api-socket /tmp/api.sock \
  --cmdline "console=ttyS0 reboot=k panic=1 quiet microvm.cmd={cmd}"
MV=$(h_vmm_pid)
h_wait_console guest-ready 180 "the guest to boot" || fail "the guest to boot"
n=0
# Runs one shell command in the guest and prints its output and status.
guest() {{
  n=$((n+1))
  printf '%s\n' "$1" >/tmp/cmd.$n
  h_send 192.0.2.2 5000 /tmp/cmd.$n || fail "guest command $n to be taken"
  h_wait_console "^cmd-done $n " 180 "guest command $n to finish" || fail "guest command $n to finish"
  tr -d '\r' </tmp/console.log | sed -n "s/^out$n: //p; /^cmd-done $n /p"
}}
# Rss (KiB) of the VMM's mapping of the hotplug region.
rss() {{ awk '/microvm-hotplug-ram/ {{f=1; next}} f && /^Rss:/ {{print $2; exit}}' /proc/$MV/smaps; }}
info() {{ h_ctl info; }}
flat() {{ tr -d ' \n'; }}
A=$(info | flat | grep -o '"region":{{[^}}]*}}' | grep -o '0x[0-9a-f]*')
echo "@@section region"; echo $A
echo "@@section smaps"; grep -A6 microvm-hotplug-ram /proc/$MV/smaps

# (b) never-plugged blocks
echo "@@section unbind-1"; guest '{unbind}'
R0=$(rss)
echo "@@section write-never-plugged"; guest "$(printf '{write}' $((A + {never_offset})))"
R1=$(rss)
echo "@@section never-plugged"; echo "$R0 $R1"
echo "@@section bind-1"; guest '{bind}'

# (a) control: plugged memory the guest writes
echo "@@section plug"; H_API=/tmp/api.sock h_ctl memory-resize 128M --timeout 120
echo "@@section info-plugged"; info
P=$(info | flat | grep -o '"plugged":\[{{[^}}]*}}' | grep -o '0x[0-9a-f]*')
R2=$(rss)
echo "@@section fill"; guest 'dd if=/dev/zero of=/fill/a bs=1M count=8 2>&1 | tail -1; grep -E "MemFree|MemTotal" /proc/meminfo'
R3=$(rss)
echo "@@section control"; echo "$R2 $R3"

# (c) just-unplugged blocks
echo "@@section rm"; guest 'rm /fill/a; echo removed'
echo "@@section unplug"; H_API=/tmp/api.sock h_ctl memory-resize 0 --timeout 120
echo "@@section unbind-2"; guest '{unbind}'
R4=$(rss)
echo "@@section write-unplugged"; guest "$(printf '{write}' $P)"
R5=$(rss)
echo "@@section unplugged"; echo "$R4 $R5 $P"
echo "@@section alive"; guest 'echo alive; {bind}'
echo "@@section replug"; H_API=/tmp/api.sock h_ctl memory-resize 128M --timeout 120
echo "@@section ping"; ping -c 3 -i 0.2 192.0.2.2 | tail -2
echo "@@section counters"; H_API=/tmp/api.sock h_ctl counters
guest 'touch /tmp/stop' >/dev/null
st=$(h_vmm_wait 60) || fail "the VMM to exit"; echo "@@section exit"; echo $st
echo "@@section stderr"; cat /tmp/microvm.err
echo "@@section console"; tr -d '\r' </tmp/console.log | grep -v '^out[0-9]*: '
h_vduse_stop net0
"#,
        unbind = UNBIND,
        bind = BIND,
        write = write_pages(),
        never_offset = NEVER_PLUGGED_OFFSET,
    )
}

e2e::shared_test_host_run!("unplugged", host_script());

/// Two or more whitespace-separated numbers of a section.
fn numbers(name: &str) -> Vec<u64> {
    section(name)
        .split_whitespace()
        .map(|w| match w.strip_prefix("0x") {
            Some(_) => hex(w),
            None => w
                .parse()
                .unwrap_or_else(|_| panic!("{name}: not a number: {w}\n{}", run().raw)),
        })
        .collect()
}

/// Rss growth in KiB between the two measures of a section, after the
/// guest wrote `what`.
fn growth(name: &str, what: &str) -> u64 {
    let figures = numbers(name);
    assert!(figures.len() >= 2, "{name}: {figures:?}\n{}", run().raw);
    let growth = figures[1].saturating_sub(figures[0]);
    eprintln!(
        "{name}: hotplug region Rss {} KiB -> {} KiB (+{growth} KiB) after writing {what}",
        figures[0], figures[1]
    );
    growth
}

fn assert_command_ok(name: &str) {
    let text = section(name);
    assert!(text.contains(" rc=0"), "{name}: {text}\n{}", run().raw);
}

#[test]
fn the_hotplug_region_is_its_own_mapping() {
    let smaps = section("smaps");
    assert!(smaps.contains("Rss:"), "{smaps}");
    assert!(
        hex(section("region").trim()) >= 4 << 30,
        "{}",
        section("region")
    );
}

#[test]
fn writes_to_never_plugged_blocks_do_not_grow_the_vmm() {
    assert_command_ok("unbind-1");
    assert_command_ok("write-never-plugged");
    let growth = growth("never-plugged", "1 byte in each of 256 pages");
    assert!(
        growth < 64,
        "the guest's writes to never-plugged blocks raised the VMM's memory by {growth} KiB"
    );
    // The probe stayed outside what the guest plugged later.
    let region = hex(section("region").trim());
    let probe = region + NEVER_PLUGGED_OFFSET;
    let info: serde_json::Value = serde_json::from_str(section("info-plugged")).unwrap();
    for range in info["memory"]["hotplug"]["plugged"].as_array().unwrap() {
        let start = hex(range["guest_addr"].as_str().unwrap());
        let end = start + range["size"].as_u64().unwrap();
        assert!(
            probe + PAGES * 4096 <= start || probe >= end,
            "probe inside {range}"
        );
    }
}

#[test]
fn control_writes_to_plugged_memory_do_grow_the_vmm() {
    let plug: serde_json::Value = serde_json::from_str(section("plug")).unwrap();
    assert_eq!(plug["done"], true, "{plug}");
    assert_command_ok("fill");
    let growth = growth("control", "an 8 MiB tmpfs file");
    assert!(
        growth >= PAGES * 4096 / KIB,
        "8 MiB written to plugged memory raised the Rss by only {growth} KiB: the meter does not see the guest's writes"
    );
}

#[test]
fn writes_to_just_unplugged_blocks_do_not_grow_the_vmm_and_the_guest_goes_on() {
    let unplug: serde_json::Value = serde_json::from_str(section("unplug")).unwrap();
    assert_eq!(unplug["done"], true, "{unplug}");
    assert_command_ok("unbind-2");
    assert_command_ok("write-unplugged");
    let figures = numbers("unplugged");
    assert_eq!(figures.len(), 3, "the just-unplugged address is known");
    let growth = growth("unplugged", "1 byte in each of 256 pages");
    assert!(
        growth < 64,
        "the guest's writes to unplugged blocks raised the VMM's memory by {growth} KiB"
    );
    let alive = section("alive");
    assert!(
        alive.contains("alive") && alive.contains(" rc=0"),
        "{alive}"
    );
    let replug: serde_json::Value = serde_json::from_str(section("replug")).unwrap();
    assert_eq!(replug["done"], true, "a later plug succeeds: {replug}");
    assert!(
        section("ping").contains(" 0% packet loss"),
        "{}",
        section("ping")
    );
}

#[test]
fn the_vmm_ends_cleanly() {
    assert_eq!(section("exit").trim(), "0", "{}", section("stderr"));
    assert!(
        !section("stderr").contains("seccomp"),
        "{}",
        section("stderr")
    );
}
