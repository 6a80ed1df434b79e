//! Boots the real guest kernel with `microvm` inside the test host (one
//! boot of the test host for all scenarios) and checks, from the guest's own
//! output, what it saw.

use std::collections::HashMap;
use std::sync::OnceLock;

use e2e::{Assets, MicrovmRun, Outcome, Scenario};

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
    ]
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
