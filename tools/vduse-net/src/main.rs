//! vduse-net: a virtio-net device in userspace, attached to the kernel's vdpa bus through
//! VDUSE and bound to vhost_vdpa, so a VMM can drive it through /dev/vhost-vdpa-N.
//! The device lives in the library (src/lib.rs); this is its command line.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use vduse_net::app::{self, BackendConfig, Config};
use vduse_net::{log, net, vduse};

/// The default MAC: locally administered, QEMU's prefix.
const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

const USAGE: &str = "usage: vduse-net --name NAME [--mac MAC] (--tap IFNAME | --loopback) \
     [--queues N] [--stats PATH] [--iotlb-dump PATH] [--fail-iotlb N]";

#[derive(Debug, PartialEq, Eq)]
enum Cli {
    Run(Config),
    Help,
}

fn parse_args(args: &[String]) -> Result<Cli, String> {
    let mut name = None;
    let mut mac = None;
    let mut backend = None;
    let mut dump = None;
    let mut fail_iotlb = None;
    let mut queues = 1;
    let mut stats = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |flag: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match a.as_str() {
            "-h" | "--help" => return Ok(Cli::Help),
            "--name" => name = Some(value("--name")?),
            "--mac" => {
                let v = value("--mac")?;
                mac = Some(net::parse_mac(&v).ok_or_else(|| format!("bad MAC address {v:?}"))?);
            }
            "--tap" => {
                if backend.is_some() {
                    return Err("give exactly one of --tap and --loopback".into());
                }
                backend = Some(BackendConfig::Tap(value("--tap")?));
            }
            "--loopback" => {
                if backend.is_some() {
                    return Err("give exactly one of --tap and --loopback".into());
                }
                backend = Some(BackendConfig::Loopback);
            }
            "--iotlb-dump" => dump = Some(PathBuf::from(value("--iotlb-dump")?)),
            "--stats" => stats = Some(PathBuf::from(value("--stats")?)),
            "--queues" => {
                let v = value("--queues")?;
                queues = Some(&v)
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse::<u16>().ok())
                    .filter(|n| (1..=net::MAX_PAIRS).contains(n))
                    .ok_or_else(|| {
                        format!(
                            "--queues takes 1 to {} queue pairs, not {v:?}",
                            net::MAX_PAIRS
                        )
                    })?;
            }
            "--fail-iotlb" => {
                let v = value("--fail-iotlb")?;
                let n = v.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| {
                    format!("--fail-iotlb takes a request number from 1, not {v:?}")
                })?;
                fail_iotlb = Some(n);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let name: String = name.ok_or("--name is required")?;
    if name.is_empty() || name.len() >= vduse::NAME_MAX || name.contains(['/', '\0']) {
        return Err(format!("bad device name {name:?}"));
    }
    Ok(Cli::Run(Config {
        name,
        mac: mac.unwrap_or(DEFAULT_MAC),
        backend: backend.ok_or("one of --tap IFNAME or --loopback is required")?,
        iotlb_dump: dump,
        fail_iotlb,
        queues,
        stats,
    }))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = match parse_args(&args) {
        Ok(Cli::Run(cfg)) => cfg,
        Ok(Cli::Help) => {
            let _ = writeln!(std::io::stdout(), "{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            log(&e);
            log(USAGE);
            return ExitCode::from(2);
        }
    };
    match app::run(cfg) {
        Ok(()) => {
            log("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            log(&e.to_string());
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn cli() {
        assert_eq!(
            parse_args(&args("--name net0 --loopback --iotlb-dump /tmp/d")),
            Ok(Cli::Run(Config {
                name: "net0".into(),
                mac: DEFAULT_MAC,
                backend: BackendConfig::Loopback,
                iotlb_dump: Some("/tmp/d".into()),
                fail_iotlb: None,
                queues: 1,
                stats: None,
            }))
        );
        assert_eq!(
            parse_args(&args("--tap tap0 --name n --mac 02:00:00:00:00:01")),
            Ok(Cli::Run(Config {
                name: "n".into(),
                mac: [2, 0, 0, 0, 0, 1],
                backend: BackendConfig::Tap("tap0".into()),
                iotlb_dump: None,
                fail_iotlb: None,
                queues: 1,
                stats: None,
            }))
        );
        assert_eq!(
            parse_args(&args("--name n --loopback --fail-iotlb 3")),
            Ok(Cli::Run(Config {
                name: "n".into(),
                mac: DEFAULT_MAC,
                backend: BackendConfig::Loopback,
                iotlb_dump: None,
                fail_iotlb: Some(3),
                queues: 1,
                stats: None,
            }))
        );
        assert_eq!(
            parse_args(&args("--name n --loopback --queues 4 --stats /tmp/s.json")),
            Ok(Cli::Run(Config {
                name: "n".into(),
                mac: DEFAULT_MAC,
                backend: BackendConfig::Loopback,
                iotlb_dump: None,
                fail_iotlb: None,
                queues: 4,
                stats: Some("/tmp/s.json".into()),
            }))
        );
        for bad in ["0", "9", "+2", "-1", "two", ""] {
            let line = format!("--name n --loopback --queues {bad}");
            assert!(parse_args(&args(&line)).is_err(), "{line}");
        }
        assert!(parse_args(&args("--name n --loopback --queues")).is_err());
        assert!(parse_args(&args("--name n --loopback --fail-iotlb 0")).is_err());
        assert!(parse_args(&args("--name n --loopback --fail-iotlb -1")).is_err());
        assert!(parse_args(&args("--name n --loopback --fail-iotlb")).is_err());
        assert_eq!(parse_args(&args("--help")), Ok(Cli::Help));
        assert!(parse_args(&args("--name n")).is_err());
        assert!(parse_args(&args("--loopback")).is_err());
        assert!(parse_args(&args("--name n --loopback --tap t")).is_err());
        assert!(parse_args(&args("--name n --loopback --mac zz")).is_err());
        assert!(parse_args(&args("--name a/b --loopback")).is_err());
        assert!(parse_args(&args("--name n --loopback --bogus")).is_err());
        assert!(parse_args(&args("--name")).is_err());
    }
}
