//! Boots the real guest kernel with `microvm` inside the test host (one
//! boot of the test host for all scenarios) and checks, from the guest's own
//! output, what it saw.

use std::collections::HashMap;
use std::sync::OnceLock;

use e2e::{base64, Assets, MicrovmRun, Outcome, Scenario, DEBUG_MICROVM};

const MIB: u64 = 1024;

fn scenarios() -> Vec<Scenario> {
    let mut one_cpu = MicrovmRun::new(1, "256M");
    one_cpu.cmdline_extra = "microvm.test=one-cpu".into();
    one_cpu.guest_cmd = Some("cat /proc/cmdline".into());

    let mut two_cpus = MicrovmRun::new(2, "512M");
    two_cpus.guest_cmd = Some("echo hello-from-the-guest; exit 7".into());

    let mut bzimage = MicrovmRun::new(2, "256M");
    bzimage.kernel_var = "MICROVM_GUEST_BZIMAGE";

    let mut serial_file = MicrovmRun::new(1, "256M");
    serial_file.extra_args = "--serial file=/tmp/serial.log".into();

    let mut reboot = MicrovmRun::new(1, "256M");
    reboot.guest_cmd = Some("reboot -f".into());

    let mut debug_two_cpus = MicrovmRun::new(2, "512M");
    debug_two_cpus.binary = DEBUG_MICROVM;
    debug_two_cpus.guest_cmd = Some("echo hello-from-the-guest; exit 7".into());

    vec![
        Scenario {
            name: "one_cpu",
            script: one_cpu.script(),
        },
        Scenario {
            name: "two_cpus",
            script: two_cpus.script(),
        },
        Scenario {
            name: "bzimage",
            script: bzimage.script(),
        },
        Scenario {
            name: "serial_file",
            script: format!(
                "{} && echo '--- serial.log' && cat /tmp/serial.log",
                serial_file.script()
            ),
        },
        Scenario {
            name: "reboot",
            script: reboot.script(),
        },
        Scenario {
            name: "debug_two_cpus",
            script: debug_two_cpus.script(),
        },
        Scenario {
            name: "debug_api_hotplug",
            script: debug_api_hotplug_script(),
        },
    ]
}

/// The debug build with the API and a hotplug worker: every thread kind
/// runs under its filter while the API is used and memory is plugged.
/// The first resize (130M) cannot be reached exactly (the guest plugs in
/// 4 MiB sub-blocks) and must end at its timeout saying where it stopped;
/// the next one (192M) must not be refused because of it.
fn debug_api_hotplug_script() -> String {
    let guest = "base=$(sed -n 's/^MemTotal: *\\([0-9]*\\).*/\\1/p' /proc/meminfo)
i=0
while [ $i -lt 240 ]; do
  now=$(sed -n 's/^MemTotal: *\\([0-9]*\\).*/\\1/p' /proc/meminfo)
  [ $((now - base)) -ge $((180 * 1024)) ] && break
  sleep 0.5; i=$((i+1))
done
echo guest-memtotal-grew-by=$((now - base))";
    let cmd = base64(guest.as_bytes());
    format!(
        r#"H_CONSOLE=/tmp/debug-console.log H_VMM_ERR=/tmp/debug-microvm.err h_vmm_start {DEBUG_MICROVM} \
  --kernel "$MICROVM_GUEST_KERNEL" --initramfs "$MICROVM_GUEST_INITRAMFS" --cpus 2 \
  --memory size=256M,hotplug=256M --api-socket /tmp/debug-api.sock \
  --cmdline "console=ttyS0 reboot=k panic=1 microvm.cmd={cmd}"
h_wait_console "microvm-guest: ready" 240 "the debug build's guest to boot"
ls -l /tmp/debug-api.sock | cut -c1-10 | sed 's/^/socket-mode=/'
microvm-ctl --socket /tmp/debug-api.sock info >/dev/null; echo "info-exit=$?"
printf 'GET / HTTP/1.1
Content-Length: +5

hello' | microvm-ctl --socket /tmp/debug-api.sock send-raw | head -1
echo
microvm-ctl --socket /tmp/debug-api.sock memory-resize 130M --timeout 10 >/tmp/r1.out 2>/tmp/r1.err; echo "resize-130M-exit=$?"
cat /tmp/r1.err
microvm-ctl --socket /tmp/debug-api.sock memory-resize 192M --timeout 120 >/tmp/r2.out 2>/tmp/r2.err; echo "resize-192M-exit=$?"
grep '"done"' /tmp/r2.out; cat /tmp/r2.err
microvm-ctl --socket /tmp/debug-api.sock counters >/dev/null; echo "counters-exit=$?"
echo "microvm-exit=$(h_vmm_wait 120)"
echo "--- microvm stderr"; cat /tmp/debug-microvm.err
echo "--- console"; cat /tmp/debug-console.log
"#
    )
}

struct Run {
    outcomes: HashMap<String, Outcome>,
    log: String,
    release: String,
}

fn run() -> &'static Run {
    static RUN: OnceLock<Run> = OnceLock::new();
    RUN.get_or_init(|| {
        let assets = Assets::load();
        let (outcomes, log) = e2e::run_in_test_host(&scenarios(), 1500);
        eprintln!("{log}");
        Run {
            outcomes,
            log,
            release: assets.guest_kernel_release,
        }
    })
}

fn outcome(name: &str) -> &'static Outcome {
    let run = run();
    run.outcomes.get(name).unwrap_or_else(|| {
        panic!(
            "scenario {name} did not run; test host output:\n{}",
            run.log
        )
    })
}

fn assert_booted(name: &str, cpus: u32, mem_low_mib: u64, mem_high_mib: u64) -> &'static Outcome {
    let outcome = outcome(name);
    assert_eq!(
        outcome.status,
        Some(0),
        "{name}: microvm must exit 0 after poweroff\n{outcome}"
    );
    let field = |key| {
        outcome
            .ready_field(key)
            .unwrap_or_else(|| panic!("{name}: no ready line with {key}=\n{outcome}"))
    };
    assert_eq!(
        field("cpus"),
        cpus.to_string(),
        "{name}: CPU count\n{outcome}"
    );
    let mem_kib: u64 = field("mem_total_kib")
        .parse()
        .expect("MemTotal is a number");
    assert!(
        (mem_low_mib * MIB..=mem_high_mib * MIB).contains(&mem_kib),
        "{name}: MemTotal {mem_kib} KiB outside [{mem_low_mib}, {mem_high_mib}] MiB\n{outcome}"
    );
    assert_eq!(
        field("kernel"),
        run().release,
        "{name}: kernel release\n{outcome}"
    );
    outcome
}

#[test]
fn one_vcpu_guest_sees_its_cpu_memory_and_command_line() {
    let outcome = assert_booted("one_cpu", 1, 200, 256);
    let cmdline = outcome
        .stdout
        .lines()
        .find(|l| l.contains("microvm.test=one-cpu"))
        .unwrap_or_else(|| panic!("guest did not print its command line\n{outcome}"));
    assert!(cmdline.contains("console=ttyS0"), "{cmdline}");
    assert_eq!(outcome.cmd_exit(), Some(0), "{outcome}");
}

#[test]
fn two_vcpu_guest_runs_a_command_and_reports_its_exit_status() {
    let outcome = assert_booted("two_cpus", 2, 400, 512);
    assert!(outcome.stdout.contains("hello-from-the-guest"), "{outcome}");
    assert_eq!(outcome.cmd_exit(), Some(7), "{outcome}");
}

#[test]
fn bzimage_boots_through_the_64_bit_entry() {
    assert_booted("bzimage", 2, 200, 256);
}

#[test]
fn serial_file_receives_the_console_and_stdout_stays_quiet() {
    let outcome = outcome("serial_file");
    assert_eq!(outcome.status, Some(0), "{outcome}");
    let (before, log) = outcome
        .stdout
        .split_once("--- serial.log\n")
        .unwrap_or_else(|| panic!("no serial log\n{outcome}"));
    assert!(
        !before.contains("microvm-guest"),
        "console leaked to stdout\n{outcome}"
    );
    assert!(log.contains("microvm-guest: ready cpus=1"), "{outcome}");
}

#[test]
fn guest_reboot_ends_the_vmm_with_status_zero() {
    let outcome = outcome("reboot");
    assert!(outcome.ready_field("cpus").is_some(), "{outcome}");
    assert_eq!(outcome.status, Some(0), "{outcome}");
    assert!(outcome.stderr.contains("reset"), "{outcome}");
    assert_eq!(
        outcome.cmd_exit(),
        None,
        "reboot -f does not return\n{outcome}"
    );
}

#[test]
fn the_debug_build_boots_and_powers_off_under_its_seccomp_filters() {
    let outcome = assert_booted("debug_two_cpus", 2, 400, 512);
    assert!(outcome.stdout.contains("hello-from-the-guest"), "{outcome}");
    assert_eq!(outcome.cmd_exit(), Some(7), "{outcome}");
    assert!(!outcome.stderr.contains("seccomp"), "{outcome}");
}

fn debug_api_hotplug() -> &'static Outcome {
    let outcome = outcome("debug_api_hotplug");
    assert!(
        outcome.stdout.contains("microvm-exit=0"),
        "the debug VMM must survive the API and hotplug and exit 0 at poweroff\n{outcome}"
    );
    assert!(!outcome.stdout.contains("seccomp refused"), "{outcome}");
    outcome
}

#[test]
fn the_debug_build_serves_the_api_and_plugs_memory_under_its_seccomp_filters() {
    let outcome = debug_api_hotplug();
    let out = &outcome.stdout;
    assert!(out.contains("socket-mode=srw-------"), "{outcome}");
    assert!(out.contains("info-exit=0"), "{outcome}");
    assert!(
        out.contains("HTTP/1.1 400"),
        "Content-Length: +5\n{outcome}"
    );
    assert!(out.contains("counters-exit=0"), "{outcome}");
    assert!(
        out.contains("guest-memtotal-grew-by="),
        "the guest saw its memory grow\n{outcome}"
    );
}

#[test]
fn a_resize_the_guest_cannot_reach_ends_at_its_timeout_and_the_next_one_proceeds() {
    let outcome = debug_api_hotplug();
    let out = &outcome.stdout;
    assert!(out.contains("resize-130M-exit=1"), "{outcome}");
    assert!(
        out.contains("did not reach the requested size: timed out after 10000 ms with 134217728 of the 136314880 requested bytes plugged"),
        "{outcome}"
    );
    assert!(out.contains("resize-192M-exit=0"), "{outcome}");
    assert!(out.contains("\"done\": true"), "{outcome}");
}
