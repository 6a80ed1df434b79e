//! `microvm-boot-timer --runs N --marker TEXT -- CMD [ARGS...]`
//!
//! Runs CMD N times. For each run prints one JSON line: wall time from spawn
//! to the first output line containing TEXT, wall time to exit, the exit
//! status, and memory: the peak of the process's RSS outside guest memory
//! (its total RSS minus the RSS of the guest-RAM memfd mappings, read from
//! /proc/PID/smaps every few milliseconds), plus the kernel's VmHWM for the
//! whole process including touched guest memory. Subtracting RssShmem
//! instead would also drop the binary's own pages when it runs from a ramfs,
//! as it does in the test host.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SAMPLE_INTERVAL: Duration = Duration::from_millis(5);

struct Args {
    runs: u32,
    marker: String,
    command: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let mut runs = 5;
    let mut marker = "microvm-guest: ready".to_string();
    let mut command = Vec::new();
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
            "--" => {
                command.extend(args.by_ref());
            }
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    if command.is_empty() {
        return Err("usage: microvm-boot-timer [--runs N] [--marker TEXT] -- CMD [ARGS...]".into());
    }
    Ok(Args {
        runs,
        marker,
        command,
    })
}

/// Name of the VMM's guest-RAM memfd as it appears in /proc/PID/smaps.
const GUEST_RAM_MAPPING: &str = "memfd:microvm-guest-ram";

/// (RSS outside guest RAM, VmHWM) in KiB.
fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm = status.lines().find_map(|l| kib_value(l, "VmHWM:"))?;
    Some((rss_outside_guest_ram(&smaps), hwm))
}

/// The number of `name:   123 kB`, if `line` is that field.
fn kib_value(line: &str, name: &str) -> Option<u64> {
    line.strip_prefix(name)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Sums the `Rss:` of every mapping except those of guest RAM.
fn rss_outside_guest_ram(smaps: &str) -> u64 {
    let mut total = 0;
    let mut in_guest_ram = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        let is_mapping_header =
            first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
        if is_mapping_header {
            in_guest_ram = line.contains(GUEST_RAM_MAPPING);
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
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Some((private, hwm)) = memory_kib(pid) {
                    peak_private.fetch_max(private, Ordering::Relaxed);
                    peak_hwm.fetch_max(hwm, Ordering::Relaxed);
                }
                std::thread::sleep(SAMPLE_INTERVAL);
            }
        })
    };

    let mut ready_ms = None;
    let stdout = child.stdout.take().ok_or("no stdout pipe")?;
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if ready_ms.is_none() && line.contains(&args.marker) {
            ready_ms = Some(start.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let status = child.wait().map_err(|e| format!("wait failed: {e}"))?;
    let exit_ms = start.elapsed().as_secs_f64() * 1000.0;
    done.store(true, Ordering::Relaxed);
    let _ = sampler.join();

    let ready = ready_ms.map_or("null".to_string(), |ms| format!("{ms:.1}"));
    Ok(format!(
        "{{\"run\":{index},\"ready_ms\":{ready},\"exit_ms\":{exit_ms:.1},\"exit_status\":{},\"peak_rss_private_kib\":{},\"peak_hwm_kib\":{}}}",
        status.code().map_or("null".to_string(), |c| c.to_string()),
        peak_private.load(Ordering::Relaxed),
        peak_hwm.load(Ordering::Relaxed),
    ))
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
        assert_eq!(rss_outside_guest_ram(smaps), 1040);
    }
}
