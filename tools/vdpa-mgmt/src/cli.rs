//! The command line of `vdpa-mgmt`, and the parsing of its values.

use clap::{Parser, Subcommand};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ValueError {
    #[error("MAC address {0:?}: want six hex bytes separated by ':' (52:54:00:aa:bb:cc)")]
    Mac(String),
    #[error("feature bits {0:?}: want a hexadecimal u64 (0x...)")]
    Features(String),
    #[error("timeout {0:?}: want seconds, 0 < S <= 3600")]
    Timeout(String),
}

/// `52:54:00:aa:bb:cc` -> bytes.
pub fn parse_mac(s: &str) -> Result<[u8; 6], ValueError> {
    let err = || ValueError::Mac(s.to_string());
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next().ok_or_else(err)?;
        if p.is_empty() || p.len() > 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(err());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| err())?;
    }
    if parts.next().is_some() {
        return Err(err());
    }
    Ok(mac)
}

/// `0x300010020` or `300010020` (hex) -> bits.
pub fn parse_features(s: &str) -> Result<u64, ValueError> {
    let digits = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(ValueError::Features(s.to_string()));
    }
    u64::from_str_radix(digits, 16).map_err(|_| ValueError::Features(s.to_string()))
}

/// Seconds, 0 < S <= 3600 (fractions allowed).
pub fn parse_timeout(s: &str) -> Result<std::time::Duration, ValueError> {
    let v: f64 = s.parse().map_err(|_| ValueError::Timeout(s.to_string()))?;
    if !(v > 0.0 && v <= 3600.0) {
        return Err(ValueError::Timeout(s.to_string()));
    }
    Ok(std::time::Duration::from_secs_f64(v))
}

#[derive(Debug, Parser)]
#[command(
    name = "vdpa-mgmt",
    about = "Create and delete vdpa devices over the kernel's vdpa generic-netlink family"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// vdpa devices.
    Dev {
        #[command(subcommand)]
        cmd: DevCmd,
    },
    /// Management devices (parents that can create vdpa devices).
    Mgmtdev {
        #[command(subcommand)]
        cmd: MgmtdevCmd,
    },
}

#[derive(Debug, Subcommand)]
pub enum DevCmd {
    /// VDPA_CMD_DEV_NEW: create device NAME on management device MGMTDEV.
    Add {
        #[arg(long)]
        mgmtdev: String,
        #[arg(long)]
        name: String,
        /// VDPA_ATTR_DEV_NET_CFG_MACADDR (net devices).
        #[arg(long, value_parser = parse_mac)]
        mac: Option<[u8; 6]>,
        /// VDPA_ATTR_DEV_FEATURES: virtio feature bits the device may offer (hex).
        #[arg(long, value_parser = parse_features)]
        features: Option<u64>,
    },
    /// VDPA_CMD_DEV_DEL: delete device NAME.
    Del { name: String },
    /// VDPA_CMD_DEV_CONFIG_GET: the MAC address in net device NAME's own config.
    Mac { name: String },
    /// Wait for the vhost-vdpa node of device NAME and print it (/dev/vhost-vdpa-K).
    Node {
        name: String,
        /// Seconds to wait.
        #[arg(long, default_value = "10", value_parser = parse_timeout)]
        timeout: std::time::Duration,
    },
}

#[derive(Debug, Subcommand)]
pub enum MgmtdevCmd {
    /// VDPA_CMD_MGMTDEV_GET (dump): one line per management device, its handle first.
    List,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn mac() {
        assert_eq!(
            parse_mac("52:54:00:aa:BB:cc"),
            Ok([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc])
        );
        for bad in [
            "",
            "52:54:00:aa:bb",
            "52:54:00:aa:bb:cc:dd",
            "52:54:00:aa:bb:",
            "52:54:00:aa:bb:1cc",
            "g2:54:00:aa:bb:cc",
            "+2:54:00:aa:bb:cc",
        ] {
            assert_eq!(
                parse_mac(bad),
                Err(ValueError::Mac(bad.to_string())),
                "{bad}"
            );
        }
    }

    #[test]
    fn features() {
        assert_eq!(parse_features("0x300010020"), Ok(0x3_0001_0020));
        assert_eq!(parse_features("ffffffffffffffff"), Ok(u64::MAX));
        for bad in ["", "0x", "0x1_0", "+1", "0x10000000000000000", "12z"] {
            assert!(parse_features(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn timeout() {
        assert_eq!(parse_timeout("2.5"), Ok(Duration::from_millis(2500)));
        for bad in ["0", "-1", "nan", "inf", "3601", "x"] {
            assert!(parse_timeout(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn command_lines() {
        let c = Cli::try_parse_from([
            "vdpa-mgmt",
            "dev",
            "add",
            "--mgmtdev",
            "vdpasim_net",
            "--name",
            "sim0",
            "--mac",
            "52:54:00:aa:bb:cc",
            "--features",
            "0x30001002f",
        ])
        .unwrap();
        match c.cmd {
            Cmd::Dev {
                cmd:
                    DevCmd::Add {
                        mgmtdev,
                        name,
                        mac,
                        features,
                    },
            } => {
                assert_eq!((mgmtdev.as_str(), name.as_str()), ("vdpasim_net", "sim0"));
                assert_eq!(mac, Some([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]));
                assert_eq!(features, Some(0x3_0001_002f));
            }
            c => panic!("unexpected {c:?}"),
        }
        assert!(Cli::try_parse_from(["vdpa-mgmt", "dev", "add", "--name", "x"]).is_err());
        assert!(Cli::try_parse_from([
            "vdpa-mgmt",
            "dev",
            "add",
            "--mgmtdev",
            "m",
            "--name",
            "x",
            "--mac",
            "zz"
        ])
        .is_err());
        let c =
            Cli::try_parse_from(["vdpa-mgmt", "dev", "node", "sim0", "--timeout", "3"]).unwrap();
        assert!(
            matches!(c.cmd, Cmd::Dev { cmd: DevCmd::Node { timeout, .. } } if timeout == Duration::from_secs(3))
        );
        assert!(Cli::try_parse_from(["vdpa-mgmt", "mgmtdev", "list"]).is_ok());
        assert!(Cli::try_parse_from(["vdpa-mgmt", "dev", "del"]).is_err());
    }
}
