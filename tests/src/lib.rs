//! Harness for the end-to-end tests.
//!
//! Booting a test host costs tens of seconds, so a test file declares all
//! its scenarios up front; the first test to ask runs them all in one test
//! host, and every test then asserts on its own scenario's framed output.

pub mod host_script;

pub use host_script::{HostScript, VduseNet};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the tools and assets are.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives inside the repository")
        .to_path_buf()
}

/// The built assets, as `tools/testbed paths --json` reports them.
pub struct Assets {
    pub bin_dir: PathBuf,
    pub guest_kernel_release: String,
}

impl Assets {
    pub fn load() -> Assets {
        let output = Command::new(repo_root().join("tools/testbed"))
            .args(["paths", "--json"])
            .output()
            .expect("cannot run tools/testbed");
        assert!(
            output.status.success(),
            "assets are missing; run tools/testbed assets (or tools/test):\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let paths: serde_json::Value =
            serde_json::from_slice(&output.stdout).expect("tools/testbed paths --json is JSON");
        let field = |key: &str| {
            paths[key]
                .as_str()
                .unwrap_or_else(|| panic!("tools/testbed paths --json has no '{key}'"))
                .to_string()
        };
        Assets {
            bin_dir: PathBuf::from(field("static_bin_dir")),
            guest_kernel_release: field("guest_kernel_release"),
        }
    }

    pub fn binary(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }
}

/// One piece of shell run inside the test host, with its output framed.
pub struct Scenario {
    pub name: &'static str,
    pub script: String,
}

/// What one scenario printed and how it ended.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub stdout: String,
    pub stderr: String,
    pub status: Option<i32>,
}

impl Outcome {
    /// The value of `key=` on the guest's `microvm-guest: ready` line.
    pub fn ready_field(&self, key: &str) -> Option<String> {
        let line = self
            .stdout
            .lines()
            .find(|l| l.starts_with("microvm-guest: ready "))?;
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(&format!("{key}=")))
            .map(str::to_string)
    }

    pub fn cmd_exit(&self) -> Option<i32> {
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix("microvm-guest: cmd-exit="))
            .and_then(|s| s.trim().parse().ok())
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "status: {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs every scenario in one test host and returns their outcomes by name,
/// plus the test host's whole output for diagnostics. A scenario's stdout
/// also streams as `@@live` lines while it runs, so a scenario that hangs
/// until the test host's timeout still shows how far it got.
pub fn run_in_test_host(
    scenarios: &[Scenario],
    timeout_secs: u32,
) -> (HashMap<String, Outcome>, String) {
    run_in_test_host_with_peers(scenarios, timeout_secs, &[])
}

/// What a test host carries beyond the project's own binaries and assets.
/// Both exist only in the emulated test host.
#[derive(Debug, Clone, Copy, Default)]
pub struct TestHostExtras<'a> {
    /// QEMU peers (`tools/testbed run --peers`): each is
    /// `/opt/peers/NAME/qemu` in the test host.
    pub peers: &'a [&'a str],
    /// qemu-storage-daemon, a VDUSE block device nobody in this project
    /// wrote (`tools/testbed run --qsd`).
    pub qsd: bool,
}

/// As `run_in_test_host`, with QEMU peers carried in.
pub fn run_in_test_host_with_peers(
    scenarios: &[Scenario],
    timeout_secs: u32,
    peers: &[&str],
) -> (HashMap<String, Outcome>, String) {
    run_in_test_host_with(
        scenarios,
        timeout_secs,
        TestHostExtras { peers, qsd: false },
    )
}

/// As `run_in_test_host`, in a test host that carries `extras`.
pub fn run_in_test_host_with(
    scenarios: &[Scenario],
    timeout_secs: u32,
    extras: TestHostExtras,
) -> (HashMap<String, Outcome>, String) {
    let mut script = String::from(
        "set +e\n\
         scenario() {\n\
           echo \"@@begin $1\"\n\
           { sh -c \"$2\" 2>/tmp/scenario.err </dev/null; echo $? >/tmp/scenario.rc; } \
             | tee /tmp/scenario.out | while IFS= read -r l; do echo \"@@live $l\"; done\n\
           rc=$(cat /tmp/scenario.rc)\n\
           echo \"@@stdout $1\"; cat /tmp/scenario.out\n\
           echo \"@@stderr $1\"; cat /tmp/scenario.err\n\
           echo \"@@end $1 rc=$rc\"\n\
         }\n",
    );
    for scenario in scenarios {
        // Every scenario has the harness (bounded waits, diagnostics).
        let body = format!(". \"$MICROVM_HARNESS\"\n{}", scenario.script);
        script.push_str(&format!(
            "scenario {} {}\n",
            scenario.name,
            shell_quote(&body)
        ));
    }
    let mut log = String::new();
    for attempt in 1..=TEST_HOST_ATTEMPTS {
        let (code, stdout, stderr) = run_testbed(&script, timeout_secs, extras);
        log.push_str(&format!(
            "tools/testbed exited with {code:?} (attempt {attempt})\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n"
        ));
        match code.and_then(lost_test_host) {
            Some(why) if attempt < TEST_HOST_ATTEMPTS => {
                let line = format!(
                    "e2e: {why} (tools/testbed exit {}); its diagnostics are kept; \
                     running it again in a fresh test host\n",
                    code.unwrap_or(-1)
                );
                eprint!("{line}");
                record_lost_test_host(&line, &stderr);
            }
            _ => return (parse_framed(&stdout), log),
        }
    }
    unreachable!("the last attempt returns")
}

/// A test host lost to the emulated platform (not to the command) is worth
/// more runs: TCG with nested SVM resets, Oopses at live-patched text and
/// stops now and then (TESTBED.md). One CI run lost two test hosts in a
/// row at the same step (the host's CPU spinning in free_unref_page with
/// interrupts off as vduse-net destroyed its device; 0 of 4 runs after),
/// hence three attempts. A command that timed out in a live test host (103)
/// is the command's failure and is not retried.
const TEST_HOST_ATTEMPTS: u32 = 3;
/// Heartbeat silence that makes a test host lost (its init beats every 5 s).
const SILENCE_LIMIT_SECS: u32 = 120;

fn lost_test_host(code: i32) -> Option<&'static str> {
    match code {
        101 => Some("the test host did not come up"),
        104 => Some("the test host reset or QEMU died"),
        106 => Some("the test host's kernel soft-locked"),
        107 => Some("the test host stopped (no heartbeat from its userspace)"),
        _ => None,
    }
}

/// Every lost test host is listed in target/e2e-logs/lost-test-hosts.log,
/// which tools/test prints at its end, so a retried run is never silent.
fn record_lost_test_host(line: &str, stderr: &str) {
    let dir = repo_root().join("target/e2e-logs");
    let tail: Vec<&str> = stderr.lines().rev().take(40).collect();
    let entry = format!(
        "{line}{}\n\n",
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
    let written = std::fs::create_dir_all(&dir).and_then(|_| {
        use std::io::Write;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("lost-test-hosts.log"))?
            .write_all(entry.as_bytes())
    });
    if let Err(e) = written {
        eprintln!("e2e: cannot record the lost test host: {e}");
    }
}

fn run_testbed(
    script: &str,
    timeout_secs: u32,
    extras: TestHostExtras,
) -> (Option<i32>, String, String) {
    let mut command = Command::new(repo_root().join("tools/testbed"));
    command.args([
        "run",
        "--timeout",
        &timeout_secs.to_string(),
        "--silence-limit",
        &SILENCE_LIMIT_SECS.to_string(),
    ]);
    if extras.peers.is_empty() && !extras.qsd {
        command.args(["--host", "auto"]);
    } else {
        command.args(["--host", "emulated"]);
    }
    if !extras.peers.is_empty() {
        command.args(["--peers", &extras.peers.join(",")]);
    }
    if extras.qsd {
        command.arg("--qsd");
    }
    let output = command
        .arg("--")
        .args(["sh", "-c", script])
        .output()
        .expect("cannot run tools/testbed");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn parse_framed(stdout: &str) -> HashMap<String, Outcome> {
    enum Part {
        None,
        Stdout,
        Stderr,
    }
    let mut outcomes: HashMap<String, Outcome> = HashMap::new();
    let mut current: Option<String> = None;
    let mut part = Part::None;
    for line in stdout.lines() {
        if let Some(name) = line.strip_prefix("@@begin ") {
            current = Some(name.to_string());
            outcomes.insert(name.to_string(), Outcome::default());
            part = Part::None;
        } else if line.starts_with("@@stdout ") {
            part = Part::Stdout;
        } else if line.starts_with("@@stderr ") {
            part = Part::Stderr;
        } else if let Some(rest) = line.strip_prefix("@@end ") {
            if let Some((name, rc)) = rest.split_once(" rc=") {
                if let Some(outcome) = outcomes.get_mut(name) {
                    outcome.status = rc.trim().parse().ok();
                }
            }
            current = None;
            part = Part::None;
        } else if let Some(outcome) = current.as_ref().and_then(|n| outcomes.get_mut(n)) {
            let target = match part {
                Part::Stdout => &mut outcome.stdout,
                Part::Stderr => &mut outcome.stderr,
                Part::None => continue,
            };
            target.push_str(line);
            target.push('\n');
        }
    }
    outcomes
}

/// One scenario run in its own test host whose output is split into
/// `@@section NAME` sections, for tests that check one long story.
pub struct SectionedRun {
    pub sections: HashMap<String, String>,
    pub raw: Outcome,
}

impl SectionedRun {
    pub fn in_test_host(name: &'static str, script: String) -> SectionedRun {
        SectionedRun::in_test_host_with_peers(name, script, &[])
    }

    /// As `in_test_host`, with QEMU peers carried in.
    pub fn in_test_host_with_peers(
        name: &'static str,
        script: String,
        peers: &[&str],
    ) -> SectionedRun {
        SectionedRun::in_test_host_with(name, script, TestHostExtras { peers, qsd: false })
    }

    /// As `in_test_host`, in a test host that carries `extras`.
    pub fn in_test_host_with(
        name: &'static str,
        script: String,
        extras: TestHostExtras,
    ) -> SectionedRun {
        let (outcomes, log) = run_in_test_host_with(&[Scenario { name, script }], 1500, extras);
        // The whole run is kept on disk too: the test that started the run
        // may pass (and cargo then hides its output) while another fails.
        let dir = repo_root().join("target/e2e-logs");
        let path = dir.join(format!("{name}.log"));
        match std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&path, &log)) {
            Ok(()) => eprintln!("e2e: the whole test-host run is in {}", path.display()),
            Err(e) => eprintln!("e2e: cannot keep the run in {}: {e}", path.display()),
        }
        eprintln!("{log}");
        let raw = outcomes
            .get(name)
            .cloned()
            .unwrap_or_else(|| panic!("scenario {name} did not run:\n{log}"));
        SectionedRun {
            sections: sections(&raw.stdout),
            raw,
        }
    }

    pub fn section(&self, name: &str) -> &str {
        if let Some(step) = self.sections.get(host_script::FAILURE_SECTION) {
            if !self.sections.contains_key(name) {
                panic!(
                    "the test host run failed at a step before section {name}: {}\
                     (the harness's diagnostics are in its stderr below)\n{}",
                    step.trim(),
                    self.raw
                );
            }
        }
        self.sections
            .get(name)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("no section {name}\n{}", self.raw))
    }

    /// The step that failed, if one did.
    pub fn failed_step(&self) -> Option<&str> {
        self.sections
            .get(host_script::FAILURE_SECTION)
            .map(|s| s.trim())
    }

    pub fn json(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(self.section(name))
            .unwrap_or_else(|e| panic!("section {name} is not JSON ({e}):\n{}", self.section(name)))
    }
}

/// Splits a scenario's output into `@@section NAME` sections.
pub fn sections(stdout: &str) -> HashMap<String, String> {
    let mut sections = HashMap::new();
    let mut current: Option<(String, String)> = None;
    for line in stdout.lines() {
        if let Some(name) = line.strip_prefix("@@section ") {
            if let Some((name, text)) = current.take() {
                sections.insert(name, text);
            }
            current = Some((name.trim().to_string(), String::new()));
        } else if let Some((_, text)) = current.as_mut() {
            text.push_str(line);
            text.push('\n');
        }
    }
    if let Some((name, text)) = current {
        sections.insert(name, text);
    }
    sections
}

/// Quotes `text` for a POSIX shell.
pub fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// A `0x`-prefixed hexadecimal number from a log or the API.
pub fn hex(text: &str) -> u64 {
    u64::from_str_radix(text.trim().trim_start_matches("0x"), 16)
        .unwrap_or_else(|_| panic!("not hex: {text}"))
}

/// Sorts [start, end) ranges and merges the adjacent ones.
pub fn merged(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (start, end) in ranges {
        match out.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => out.push((start, end)),
        }
    }
    out
}

/// vduse-net's `--iotlb-dump` file (`<first> <last> rw|ro|wo` per line) as
/// ([start, end), permission).
pub fn iotlb_dump(dump: &str) -> Vec<((u64, u64), String)> {
    dump.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(fields.len(), 3, "malformed dump line: {line}");
            ((hex(fields[0]), hex(fields[1]) + 1), fields[2].to_string())
        })
        .collect()
}

/// Standard base64, as the guest's `microvm.cmd=` expects.
pub fn base64(input: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The debug build of `microvm` in the test host (debug assertions on, as
/// a plain `cargo build` makes it): seccomp filters must hold for it too.
pub const DEBUG_MICROVM: &str = "\"$MICROVM_DEBUG_BIN_DIR/microvm\"";

/// A `microvm` invocation against the guest assets of the test host.
pub struct MicrovmRun {
    /// The VMM binary as a shell word: `microvm` (release, on PATH) or
    /// `DEBUG_MICROVM`.
    pub binary: &'static str,
    pub kernel_var: &'static str,
    /// The test host's variable naming the initramfs; `None` boots without
    /// one (a guest whose root file system is a disk).
    pub initramfs_var: Option<&'static str>,
    pub cpus: u32,
    pub memory: &'static str,
    pub cmdline_extra: String,
    pub guest_cmd: Option<String>,
    pub extra_args: String,
}

impl MicrovmRun {
    pub fn new(cpus: u32, memory: &'static str) -> MicrovmRun {
        MicrovmRun {
            binary: "microvm",
            kernel_var: "MICROVM_GUEST_KERNEL",
            initramfs_var: Some("MICROVM_GUEST_INITRAMFS"),
            cpus,
            memory,
            cmdline_extra: String::new(),
            guest_cmd: None,
            extra_args: String::new(),
        }
    }

    pub fn script(&self) -> String {
        let mut cmdline = String::from("console=ttyS0 reboot=k panic=1");
        if !self.cmdline_extra.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&self.cmdline_extra);
        }
        if let Some(cmd) = &self.guest_cmd {
            cmdline.push_str(&format!(" microvm.cmd={}", base64(cmd.as_bytes())));
        }
        let initramfs = self
            .initramfs_var
            .map(|var| format!(" --initramfs \"${var}\""))
            .unwrap_or_default();
        format!(
            "{} --kernel \"${}\"{} --cpus {} --memory size={} --cmdline {} {}",
            self.binary,
            self.kernel_var,
            initramfs,
            self.cpus,
            self.memory,
            shell_quote(&cmdline),
            self.extra_args
        )
    }
}

/// Declares the one test-host run an e2e file's tests share, started by the
/// first test that asks, and `section`/`json` to read it.
#[macro_export]
macro_rules! shared_test_host_run {
    ($name:expr, $script:expr) => {
        fn run() -> &'static $crate::SectionedRun {
            static RUN: ::std::sync::OnceLock<$crate::SectionedRun> = ::std::sync::OnceLock::new();
            RUN.get_or_init(|| $crate::SectionedRun::in_test_host($name, $script))
        }

        #[allow(dead_code)]
        fn section(name: &str) -> &'static str {
            run().section(name)
        }

        #[allow(dead_code)]
        fn json(name: &str) -> ::serde_json::Value {
            run().json(name)
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"echo hi; exit 7"), "ZWNobyBoaTsgZXhpdCA3");
    }

    #[test]
    fn framed_output_is_split_per_scenario() {
        let out = "noise\n@@begin a\n@@live line1\n@@stdout a\nline1\n@@stderr a\nerr\n@@end a rc=3\n@@begin b\n@@stdout b\n@@stderr b\n@@end b rc=0\n";
        let outcomes = parse_framed(out);
        assert_eq!(outcomes["a"].stdout, "line1\n");
        assert_eq!(outcomes["a"].stderr, "err\n");
        assert_eq!(outcomes["a"].status, Some(3));
        assert_eq!(outcomes["b"].status, Some(0));
    }

    #[test]
    fn sections_split_on_markers_only() {
        let s = sections("noise\n@@section a\nx\n--- not a marker\n@@section b\ny\n");
        assert_eq!(s["a"], "x\n--- not a marker\n");
        assert_eq!(s["b"], "y\n");
    }

    #[test]
    fn sections_match_the_bench_library_on_the_shared_fixture() {
        // tools/benchlib/tests/test_parsers.py reads the same fixture.
        let fixtures = repo_root().join("tests/fixtures");
        let text = std::fs::read_to_string(fixtures.join("sections.txt")).unwrap();
        let expected: HashMap<String, String> =
            serde_json::from_str(&std::fs::read_to_string(fixtures.join("sections.json")).unwrap())
                .unwrap();
        assert_eq!(sections(&text), expected);
    }

    /// Every wait in a test host goes through the harness: no e2e file has
    /// a hand-written polling loop or an nc without a bound on the host side.
    #[test]
    fn e2e_files_have_no_hand_written_host_polling_loops() {
        let dir = repo_root().join("tests/e2e");
        let mut offenders = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            for (n, line) in text.lines().enumerate() {
                let code = line.trim_start();
                if code.starts_with("//") {
                    continue;
                }
                if code.contains("until ")
                    || code.contains("echo go | nc")
                    || code.contains("wait $MV")
                {
                    offenders.push(format!("{}:{}: {}", path.display(), n + 1, code));
                }
            }
        }
        assert!(offenders.is_empty(), "{}", offenders.join("\n"));
    }

    #[test]
    fn shell_quote_survives_single_quotes() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn ready_fields_are_parsed() {
        let outcome = Outcome {
            stdout: "x\nmicrovm-guest: ready cpus=2 mem_total_kib=480000 kernel=6.12.1\nmicrovm-guest: cmd-exit=7\n".into(),
            ..Default::default()
        };
        assert_eq!(outcome.ready_field("cpus").as_deref(), Some("2"));
        assert_eq!(outcome.ready_field("kernel").as_deref(), Some("6.12.1"));
        assert_eq!(outcome.cmd_exit(), Some(7));
    }
}
