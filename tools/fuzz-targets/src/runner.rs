//! The stable-toolchain fuzz loop: a target's corpus, then seeded random
//! inputs and mutations of the corpus, until a deadline. Not coverage guided
//! (that is what tools/fuzz and libFuzzer are for), but it runs everywhere,
//! in CI on every change.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::Target;

/// The corpus directory of `target` in the source tree.
pub fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

/// The corpus of `target`: its files, sorted by name, then the seeds kept
/// in code.
pub fn corpus(target: &Target) -> Vec<(String, Vec<u8>)> {
    let mut inputs: Vec<(String, Vec<u8>)> = std::fs::read_dir(corpus_dir(target.name))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_file())
        .filter_map(|e| {
            let data = std::fs::read(e.path()).ok()?;
            Some((e.file_name().to_string_lossy().into_owned(), data))
        })
        .collect();
    inputs.sort();
    inputs.extend(
        target
            .seeds
            .iter()
            .enumerate()
            .map(|(i, seed)| (format!("seed #{i}"), seed.to_vec())),
    );
    inputs
}

/// What a run did.
#[derive(Debug, Default)]
pub struct Summary {
    pub corpus_inputs: usize,
    pub random_inputs: u64,
}

/// An input that made the target panic.
#[derive(Debug)]
pub struct Finding {
    pub target: &'static str,
    /// "corpus FILE" or "random #N (seed S)".
    pub origin: String,
    pub input: Vec<u8>,
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fuzz target {} panicked on {} ({} bytes): {}\ninput (hex): {}",
            self.target,
            self.origin,
            self.input.len(),
            self.message,
            hex(&self.input)
        )
    }
}

pub fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs `target` once on `input`; the panic message if it panicked.
pub fn run_one(target: &Target, input: &[u8]) -> Result<(), String> {
    catch_unwind(AssertUnwindSafe(|| (target.run)(input))).map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "non-string panic".into())
    })
}

/// A small deterministic generator (xorshift64*), so a failing random input
/// is reproducible from its seed and number.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

/// A new input: fresh random bytes, or a corpus entry mutated.
fn generate(rng: &mut Rng, corpus: &[(String, Vec<u8>)]) -> Vec<u8> {
    if corpus.is_empty() || rng.below(4) == 0 {
        let len = rng.below(512);
        return (0..len).map(|_| rng.next_u64() as u8).collect();
    }
    let mut data = corpus[rng.below(corpus.len())].1.clone();
    for _ in 0..=rng.below(8) {
        match rng.below(6) {
            0 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
            1 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] = [0, 0xff, 0x7f, 0x80, 1][rng.below(5)];
            }
            2 => {
                let i = rng.below(data.len() + 1);
                let extra: Vec<u8> = (0..rng.below(16)).map(|_| rng.next_u64() as u8).collect();
                data.splice(i..i, extra);
            }
            3 if !data.is_empty() => {
                let i = rng.below(data.len());
                let end = (i + rng.below(16)).min(data.len());
                data.drain(i..end);
            }
            4 => {
                // Splice in part of another corpus entry.
                let other = &corpus[rng.below(corpus.len())].1;
                if !other.is_empty() {
                    let from = rng.below(other.len());
                    let to = (from + rng.below(64)).min(other.len());
                    let at = rng.below(data.len() + 1);
                    data.splice(at..at, other[from..to].iter().copied());
                }
            }
            _ => {
                let i = rng.below(data.len() + 1);
                data.truncate(i);
            }
        }
    }
    data
}

/// Runs `target` over its corpus, then on generated inputs until `budget`
/// has passed. Stops at the first finding.
pub fn run_bounded(
    target: &'static Target,
    budget: Duration,
    seed: u64,
) -> Result<Summary, Finding> {
    let started = Instant::now();
    let corpus = corpus(target);
    let mut summary = Summary::default();
    for (name, data) in &corpus {
        run_one(target, data).map_err(|message| Finding {
            target: target.name,
            origin: format!("corpus {name}"),
            input: data.clone(),
            message,
        })?;
        summary.corpus_inputs += 1;
    }
    let mut rng = Rng::new(seed);
    while started.elapsed() < budget {
        let data = generate(&mut rng, &corpus);
        summary.random_inputs += 1;
        run_one(target, &data).map_err(|message| Finding {
            target: target.name,
            origin: format!("random #{} (seed {seed})", summary.random_inputs),
            input: data,
            message,
        })?;
    }
    Ok(summary)
}

/// Parses hex (whitespace ignored), as `Finding` prints inputs.
pub fn parse_hex(text: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
        .collect()
}
