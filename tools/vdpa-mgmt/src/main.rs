//! vdpa-mgmt: create and delete vdpa devices, list management devices, and wait for
//! a device's /dev/vhost-vdpa-K (see the library's documentation).
//!
//!   vdpa-mgmt dev add --mgmtdev M --name N [--mac MAC] [--features HEX]
//!   vdpa-mgmt dev del N
//!   vdpa-mgmt dev mac N                    the MAC in the device's own config
//!   vdpa-mgmt dev node N [--timeout S]     prints /dev/vhost-vdpa-K
//!   vdpa-mgmt mgmtdev list                 one line per management device
//!
//! Errors are one line on stderr, `vdpa-mgmt: ...`, and exit status 1.

use std::io::Write;
use std::process::ExitCode;

mod cli;

use clap::Parser;
use cli::{Cli, Cmd, DevCmd, MgmtdevCmd};
use vdpa_mgmt::node;
use vdpa_mgmt::vdpa::{DevNew, Vdpa};

fn run(cli: Cli) -> Result<Vec<String>, String> {
    match cli.cmd {
        Cmd::Dev {
            cmd:
                DevCmd::Add {
                    mgmtdev,
                    name,
                    mac,
                    features,
                },
        } => {
            let d = DevNew {
                mgmtdev,
                name,
                mac,
                features,
            };
            Vdpa::open()
                .and_then(|mut v| v.dev_new(&d))
                .map_err(|e| e.to_string())?;
            Ok(Vec::new())
        }
        Cmd::Dev {
            cmd: DevCmd::Del { name },
        } => {
            Vdpa::open()
                .and_then(|mut v| v.dev_del(&name))
                .map_err(|e| e.to_string())?;
            Ok(Vec::new())
        }
        Cmd::Dev {
            cmd: DevCmd::Mac { name },
        } => {
            let mac = Vdpa::open()
                .and_then(|mut v| v.dev_config_mac(&name))
                .map_err(|e| e.to_string())?;
            Ok(vec![mac
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")])
        }
        Cmd::Dev {
            cmd: DevCmd::Node { name, timeout },
        } => {
            let p = node::wait_vhost_node(&name, timeout).map_err(|e| e.to_string())?;
            Ok(vec![p.display().to_string()])
        }
        Cmd::Mgmtdev {
            cmd: MgmtdevCmd::List,
        } => {
            let devs = Vdpa::open()
                .and_then(|mut v| v.mgmtdevs())
                .map_err(|e| e.to_string())?;
            Ok(devs.iter().map(|d| d.line()).collect())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(lines) => {
            let mut out = std::io::stdout().lock();
            for l in lines {
                if writeln!(out, "{l}").is_err() {
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr().lock(), "vdpa-mgmt: {e}");
            ExitCode::FAILURE
        }
    }
}
