//! `tools/bench compare` end to end, kept short: the boot scenario once for
//! this project and QEMU 10 (two fresh test hosts). Checks that every field
//! is there for both VMMs, that each ratio is the project's median over the
//! peer's as the run rows give them, and that the docs page and its plot are
//! written from that JSON (no timing is asserted).

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use e2e::repo_root;
use serde_json::Value;

const METRICS: [&str; 6] = [
    "ready_ms",
    "peak_rss_kib",
    "peak_rss_outside_guest_ram_kib",
    "rss_anon_at_ready_kib",
    "device_iotlb_rebuilds",
    "iotlb_messages",
];
const VMMS: [&str; 2] = ["project", "qemu10"];

struct Compare {
    dir: PathBuf,
    records: Vec<Value>,
    stderr: String,
}

fn compare() -> &'static Compare {
    static RUN: OnceLock<Compare> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("microvm-compare-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let jsonl = dir.join("compare.jsonl");
        let output = Command::new(repo_root().join("tools/bench"))
            .args([
                "compare",
                "--runs",
                "1",
                "--peers",
                "qemu10",
                "--scenarios",
                "boot",
            ])
            .args(["--no-assets", "--json-out"])
            .arg(&jsonl)
            .arg("--docs")
            .arg(dir.join("docs"))
            .output()
            .expect("cannot run tools/bench");
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(
            output.status.success(),
            "tools/bench compare failed:\n{stderr}"
        );
        let text = std::fs::read_to_string(&jsonl).expect("the JSON lines file");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(stdout.trim(), text.trim(), "stdout and --json-out differ");
        let records = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        Compare {
            dir,
            records,
            stderr,
        }
    })
}

fn record(kind: &str, key: &str, value: &str) -> &'static Value {
    compare()
        .records
        .iter()
        .find(|r| r["type"] == kind && r[key] == value)
        .unwrap_or_else(|| panic!("no {kind} record with {key}={value}:\n{}", compare().stderr))
}

/// Rounded as the summary rounds medians (0.1).
fn rounded(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

#[test]
fn every_vmm_has_every_boot_field() {
    for vmm in VMMS {
        let run = record("run", "vmm", vmm);
        assert_eq!(run["ok"], true, "{run}");
        assert!(
            run["command"].as_str().is_some_and(|c| !c.is_empty()),
            "{run}"
        );
        for metric in METRICS {
            let v = &run["metrics"][metric];
            assert!(
                v.as_f64().is_some_and(|x| x >= 0.0),
                "{vmm} {metric}: {run}"
            );
        }
        // The device is mapped by ready: at least one rebuild and one message.
        assert!(
            run["metrics"]["device_iotlb_rebuilds"].as_f64() >= Some(1.0),
            "{run}"
        );
        assert!(
            run["metrics"]["iotlb_messages"].as_f64() >= Some(1.0),
            "{run}"
        );
    }
    assert!(record("run", "vmm", "qemu10")["command"]
        .as_str()
        .unwrap_or("")
        .contains("vhost-vdpa,id=n0,vhostdev=/dev/vhost-vdpa-0"));
}

#[test]
fn each_ratio_is_computed_from_the_two_rows() {
    let summary = record("summary", "scenario", "boot");
    let project = &record("run", "vmm", "project")["metrics"];
    let qemu = &record("run", "vmm", "qemu10")["metrics"];
    for metric in METRICS {
        let m = &summary["metrics"][metric];
        let mine = m["values"]["project"]["median"]
            .as_f64()
            .expect("project median");
        let theirs = m["values"]["qemu10"]["median"]
            .as_f64()
            .expect("qemu10 median");
        assert_eq!(mine, rounded(project[metric].as_f64().unwrap()), "{metric}");
        assert_eq!(theirs, rounded(qemu[metric].as_f64().unwrap()), "{metric}");
        let ratio = m["ratios"]["project/qemu10"].as_f64().expect("ratio");
        let expected = (mine / theirs * 1000.0).round() / 1000.0;
        assert!(
            (ratio - expected).abs() < 1e-9,
            "{metric}: {ratio} != {expected}"
        );
    }
}

#[test]
fn docs_are_written_from_the_json() {
    let c = compare();
    let page = std::fs::read_to_string(c.dir.join("docs/comparison.md")).expect("comparison.md");
    assert!(page.contains("## boot"), "{page}");
    assert!(page.contains("| metric | microvm | QEMU 10.0 |"), "{page}");
    assert!(page.contains("VMM start to guest ready [ms]"), "{page}");
    assert!(page.contains("/opt/peers/qemu10/qemu -M pc"), "{page}");
    let png = std::fs::read(c.dir.join("docs/comparison.png")).expect("comparison.png");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");

    // The same page again from the JSON file alone.
    let again = c.dir.join("again");
    let status = Command::new(repo_root().join("tools/bench"))
        .args(["report", "--input"])
        .arg(c.dir.join("compare.jsonl"))
        .arg("--docs")
        .arg(&again)
        .status()
        .expect("cannot run tools/bench report");
    assert!(status.success());
    let page_again = std::fs::read_to_string(again.join("comparison.md")).expect("comparison.md");
    assert_eq!(page, page_again);
}
