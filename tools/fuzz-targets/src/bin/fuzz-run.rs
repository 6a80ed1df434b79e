//! The stable fuzz loop for one target, from the command line:
//!   fuzz-run list
//!   fuzz-run NAME [SECS] [--seed N]   corpus + random inputs for SECS (default 60)
//!   fuzz-run NAME --input FILE        one input: raw bytes, or hex as a finding prints it

use std::process::ExitCode;
use std::time::Duration;

use fuzz_targets::runner::{parse_hex, run_bounded, run_one};

const USAGE: &str = "usage: fuzz-run list | NAME [SECS] [--seed N] | NAME --input FILE";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None | Some("-h" | "--help") => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Some("list") => {
            for t in fuzz_targets::TARGETS {
                println!("{:<12} {}", t.name, t.about);
            }
            ExitCode::SUCCESS
        }
        Some(name) => {
            let Some(target) = fuzz_targets::find(name) else {
                eprintln!(
                    "fuzz-run: unknown target {name:?}; known: {}",
                    fuzz_targets::names().join(", ")
                );
                return ExitCode::from(2);
            };
            run(target, &args[1..])
        }
    }
}

fn run(target: &'static fuzz_targets::Target, args: &[String]) -> ExitCode {
    let mut secs = 60;
    let mut seed = 1;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match (arg.as_str(), it.clone().next()) {
            ("--input", Some(path)) => {
                let data = match std::fs::read(path) {
                    Ok(d) => d,
                    Err(e) => {
                        eprintln!("fuzz-run: {path}: {e}");
                        return ExitCode::from(2);
                    }
                };
                let data = std::str::from_utf8(&data)
                    .ok()
                    .and_then(parse_hex)
                    .unwrap_or(data);
                return match run_one(target, &data) {
                    Ok(()) => {
                        println!("fuzz-run: {} survives the input", target.name);
                        ExitCode::SUCCESS
                    }
                    Err(message) => {
                        eprintln!("fuzz-run: {} panicked: {message}", target.name);
                        ExitCode::FAILURE
                    }
                };
            }
            ("--seed", Some(n)) if n.parse::<u64>().is_ok() => {
                seed = n.parse().unwrap_or(1);
                it.next();
            }
            (n, _) if n.parse::<u64>().is_ok() => secs = n.parse().unwrap_or(60),
            _ => {
                eprintln!("fuzz-run: {USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    match run_bounded(target, Duration::from_secs(secs), seed) {
        Ok(summary) => {
            println!(
                "fuzz-run {}: {} corpus inputs, {} random inputs in {secs} s, no finding",
                target.name, summary.corpus_inputs, summary.random_inputs
            );
            ExitCode::SUCCESS
        }
        Err(finding) => {
            eprintln!("{finding}");
            ExitCode::FAILURE
        }
    }
}
