//! `microvm-boot-timer [--runs N] [--marker TEXT] [--guest-ram NAME]... [--on-ready CMD] -- CMD [ARGS...]`
//!
//! Runs CMD N times. For each run prints one JSON line: wall time from spawn
//! to the first output line containing TEXT, wall time to exit, the exit
//! status, and memory: the peak of the process's RSS outside guest memory
//! (its total RSS minus the RSS of the guest-RAM memfd mappings, read from
//! /proc/PID/smaps every few milliseconds), plus the kernel's VmHWM for the
//! whole process including touched guest memory. Subtracting RssShmem
//! instead would also drop the binary's own pages when it runs from a ramfs,
//! as it does in the test host. Guest RAM is recognised by the memfd names
//! given with --guest-ram (default: this project's); QEMU's memfd backend is
//! `memory-backend-memfd`.
//!
//! At the marker it also reads VmRSS and RssAnon (the VMM's own anonymous
//! memory) and, with --on-ready, runs `sh -c CMD` before reading on, with
//! BOOT_TIMER_RUN and BOOT_TIMER_PID set, so a caller can snapshot the
//! VMM's and the device's counters at the same point for every VMM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SAMPLE_INTERVAL: Duration = Duration::from_millis(5);

struct Args {
    runs: u32,
    marker: String,
    guest_ram: Vec<String>,
    on_ready: Option<String>,
    command: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let mut runs = 5;
    let mut marker = "microvm-guest: ready".to_string();
    let mut command = Vec::new();
    let mut guest_ram = Vec::new();
    let mut on_ready = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--runs" => {
                runs = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n| n > 0)
                    .ok_or("--runs takes a positive number")?;
            }
            "--marker" => marker = args.next().ok_or("--marker takes a text")?,
            "--guest-ram" => guest_ram.push(args.next().ok_or("--guest-ram takes a name")?),
            "--on-ready" => on_ready = Some(args.next().ok_or("--on-ready takes a command")?),
            "--" => {
                command.extend(args.by_ref());
            }
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    if command.is_empty() {
        return Err("usage: microvm-boot-timer [--runs N] [--marker TEXT] [--guest-ram NAME]... [--on-ready CMD] -- CMD [ARGS...]".into());
    }
    if guest_ram.is_empty() {
        guest_ram.push(GUEST_RAM_MAPPING.to_string());
    }
    Ok(Args {
        runs,
        marker,
        guest_ram,
        on_ready,
        command,
    })
}

/// Name of this project's guest-RAM memfd as it appears in /proc/PID/smaps.
const GUEST_RAM_MAPPING: &str = "microvm-guest-ram";

/// (RSS outside guest RAM, VmHWM) in KiB.
fn memory_kib(pid: u32, guest_ram: &[String]) -> Option<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm = status.lines().find_map(|l| kib_value(l, "VmHWM:"))?;
    Some((rss_outside_guest_ram(&smaps, guest_ram), hwm))
}

/// (VmRSS, RssAnon) in KiB, now.
fn rss_now_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status.lines().find_map(|l| kib_value(l, "VmRSS:"))?;
    let anon = status.lines().find_map(|l| kib_value(l, "RssAnon:"))?;
    Some((rss, anon))
}

/// The number of `name:   123 kB`, if `line` is that field.
fn kib_value(line: &str, name: &str) -> Option<u64> {
    line.strip_prefix(name)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Sums the `Rss:` of every mapping except those of guest RAM (memfds named
/// in `guest_ram`).
fn rss_outside_guest_ram(smaps: &str, guest_ram: &[String]) -> u64 {
    let mut total = 0;
    let mut in_guest_ram = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        let is_mapping_header =
            first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
        if is_mapping_header {
            in_guest_ram = guest_ram
                .iter()
                .any(|name| line.contains(&format!("/memfd:{name}")));
        } else if !in_guest_ram {
            total += kib_value(line, "Rss:").unwrap_or(0);
        }
    }
    total
}

fn run_once(args: &Args, index: u32) -> Result<String, String> {
    let start = Instant::now();
    let mut child = Command::new(&args.command[0])
        .args(&args.command[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", args.command[0]))?;
    let pid = child.id();

    let done = Arc::new(AtomicBool::new(false));
    let peak_private = Arc::new(AtomicU64::new(0));
    let peak_hwm = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (done, peak_private, peak_hwm) = (done.clone(), peak_private.clone(), peak_hwm.clone());
        let guest_ram = args.guest_ram.clone();
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Some((private, hwm)) = memory_kib(pid, &guest_ram) {
                    peak_private.fetch_max(private, Ordering::Relaxed);
                    peak_hwm.fetch_max(hwm, Ordering::Relaxed);
                }
                std::thread::sleep(SAMPLE_INTERVAL);
            }
        })
    };

    let mut ready_ms = None;
    let mut at_ready = None;
    let mut hook_status = None;
    let stdout = child.stdout.take().ok_or("no stdout pipe")?;
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if ready_ms.is_none() && line.contains(&args.marker) {
            ready_ms = Some(start.elapsed().as_secs_f64() * 1000.0);
            at_ready = rss_now_kib(pid);
            if let Some(hook) = &args.on_ready {
                hook_status = Some(run_hook(hook, index, pid));
            }
        }
    }
    let status = child.wait().map_err(|e| format!("wait failed: {e}"))?;
    let exit_ms = start.elapsed().as_secs_f64() * 1000.0;
    done.store(true, Ordering::Relaxed);
    let _ = sampler.join();

    let ready = ready_ms.map_or("null".to_string(), |ms| format!("{ms:.1}"));
    let (rss, anon) = at_ready.map_or(("null".to_string(), "null".to_string()), |(r, a)| {
        (r.to_string(), a.to_string())
    });
    Ok(format!(
        "{{\"run\":{index},\"ready_ms\":{ready},\"exit_ms\":{exit_ms:.1},\"exit_status\":{},\"peak_rss_private_kib\":{},\"peak_hwm_kib\":{},\"rss_at_ready_kib\":{rss},\"rss_anon_at_ready_kib\":{anon},\"on_ready_status\":{}}}",
        status.code().map_or("null".to_string(), |c| c.to_string()),
        peak_private.load(Ordering::Relaxed),
        peak_hwm.load(Ordering::Relaxed),
        hook_status.flatten().map_or("null".to_string(), |c| c.to_string()),
    ))
}

/// Runs the --on-ready hook to completion; its exit status, if it ran.
fn run_hook(hook: &str, index: u32, pid: u32) -> Option<i32> {
    let status = Command::new("sh")
        .args(["-c", hook])
        .env("BOOT_TIMER_RUN", index.to_string())
        .env("BOOT_TIMER_PID", pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status();
    match status {
        Ok(s) => s.code(),
        Err(e) => {
            eprintln!("microvm-boot-timer: cannot run the --on-ready hook: {e}");
            None
        }
    }
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("microvm-boot-timer: {e}");
            std::process::exit(2);
        }
    };
    for index in 0..args.runs {
        match run_once(&args, index) {
            Ok(line) => println!("{line}"),
            Err(e) => {
                eprintln!("microvm-boot-timer: {e}");
                std::process::exit(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_ram_mappings_are_left_out_of_the_vmm_rss() {
        let smaps = "\
55d000000000-55d000100000 r-xp 00000000 00:02 12 /opt/microvm/bin/microvm
Size:               1024 kB
Rss:                 900 kB
7f0000000000-7f0010000000 rw-s 00000000 00:01 3 /memfd:microvm-guest-ram (deleted)
Size:             262144 kB
Rss:               26000 kB
7f0020000000-7f0020021000 rw-p 00000000 00:00 0
Size:                132 kB
Rss:                 140 kB
";
        assert_eq!(
            rss_outside_guest_ram(smaps, &[GUEST_RAM_MAPPING.to_string()]),
            1040
        );
        // QEMU's memfd backend is another name; the project's is then counted.
        assert_eq!(
            rss_outside_guest_ram(smaps, &["memory-backend-memfd".to_string()]),
            27040
        );
    }
}
