//! Every registered fuzz target, for a bounded time, over its corpus plus
//! seeded random inputs: none may panic. FUZZ_SECS sets the time per target
//! (default 2), FUZZ_SEED the seed (default: fixed, so CI runs are
//! reproducible; a finding prints its input).

use std::time::Duration;

use fuzz_targets::runner::run_bounded;
use fuzz_targets::TARGETS;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn every_target_survives_its_corpus_and_random_inputs() {
    let budget = Duration::from_secs(env_u64("FUZZ_SECS", 2));
    let seed = env_u64("FUZZ_SEED", 0x6d69_6372_6f76_6d21);
    let mut findings = Vec::new();
    for target in TARGETS {
        match run_bounded(target, budget, seed) {
            Ok(summary) => eprintln!(
                "fuzz {}: {} corpus inputs, {} random inputs, no finding",
                target.name, summary.corpus_inputs, summary.random_inputs
            ),
            Err(finding) => findings.push(finding.to_string()),
        }
    }
    assert!(findings.is_empty(), "{}", findings.join("\n\n"));
}

#[test]
fn every_target_has_a_corpus() {
    for target in TARGETS {
        assert!(
            !fuzz_targets::runner::corpus(target).is_empty(),
            "no seed inputs for {} (none in {}, none in code)",
            target.name,
            fuzz_targets::runner::corpus_dir(target.name).display()
        );
    }
}
