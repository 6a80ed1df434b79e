//! The `microvm` command line, parsed into a `VmmConfig`.

use std::path::PathBuf;

use clap::Parser;

use crate::config::{
    self, ConfigError, KernelConfig, MemoryConfig, NetConfig, SerialConfig, VdpaDeviceConfig,
    VmmConfig, DEFAULT_CMDLINE,
};

#[derive(Debug, Parser)]
#[command(
    name = "microvm",
    version,
    about = "Boot a Linux guest kernel directly on KVM, without firmware."
)]
pub struct Cli {
    /// Guest kernel: an uncompressed vmlinux (ELF, PVH entry preferred) or a bzImage.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["restore", "take_over"])]
    pub kernel: Option<PathBuf>,

    /// Restore the VM saved in DIR (microvm-ctl snapshot DIR) instead of
    /// booting a kernel: its vCPUs, memory size and state come from there.
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with_all = ["kernel", "initramfs", "cmdline", "cpus", "memory"]
    )]
    pub restore: Option<PathBuf>,

    /// Take over the running VM of another microvm process (live update):
    /// listen on SOCKET until it is handed over (microvm-ctl update SOCKET
    /// on the old VMM's API), map the same guest memory, and run the VM on.
    #[arg(
        long,
        value_name = "SOCKET",
        conflicts_with_all = ["kernel", "initramfs", "cmdline", "cpus", "memory", "restore"]
    )]
    pub take_over: Option<PathBuf>,

    /// Initramfs (cpio, optionally compressed) handed to the kernel.
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,

    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,

    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value = "1", value_parser = config::parse_cpus)]
    pub cpus: u64,

    /// Guest memory: size=SIZE, with K, M or G suffixes (default 512M).
    #[arg(long, value_name = "size=SIZE", value_parser = config::parse_memory)]
    pub memory: Option<MemoryConfig>,

    /// Serial console (COM1): stdout, file=PATH[,max=SIZE] (at most SIZE
    /// bytes per run, default 64M) or off.
    #[arg(long, value_name = "stdout|file=PATH[,max=SIZE]|off", default_value = "stdout", value_parser = config::parse_serial)]
    pub serial: SerialConfig,

    /// A virtio-net device backed by a vhost-vdpa device (repeatable).
    #[arg(long, value_name = "vdpa=PATH[,mac=MAC][,queues=N][,iotlb-batch=on|off][,iommu=on|off]", value_parser = config::parse_net)]
    pub net: Vec<NetConfig>,

    /// A vhost-vdpa device presented as the type it reports, net or block
    /// (repeatable); readonly=on accepts a read-only disk.
    #[arg(long, value_name = "path=PATH[,iommu=on|off][,iotlb-batch=on|off][,readonly=on|off]", value_parser = config::parse_vdpa)]
    pub vdpa: Vec<VdpaDeviceConfig>,

    /// Serve the control API (HTTP/1.1, JSON) on this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// Seccomp filters on the VMM and vCPU threads.
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = config::parse_on_off, action = clap::ArgAction::Set)]
    pub seccomp: bool,
}

impl Cli {
    /// The configuration, with the vCPU count checked against our own limit
    /// (KVM's limit is checked once KVM is open).
    pub fn into_config(self) -> Result<VmmConfig, ConfigError> {
        let unlimited = config::HostLimits {
            max_vcpus: u64::from(config::MAX_VCPUS),
            memory_bytes: u64::MAX,
        };
        Ok(VmmConfig {
            kernel: KernelConfig {
                path: self.kernel.unwrap_or_default(),
                initramfs: self.initramfs,
                cmdline: self.cmdline,
            },
            vcpus: config::check_vcpus(self.cpus, &unlimited)?,
            memory: self.memory.unwrap_or_default(),
            serial: self.serial,
            seccomp: self.seccomp,
            net: self.net,
            vdpa: self.vdpa,
            api_socket: self.api_socket,
            restore: self.restore,
            take_over: self.take_over,
        })
    }
}

/// Exit status of the binaries when the command line or configuration is refused.
pub const EXIT_BAD_INPUT: u8 = 2;

/// Parses the process arguments; on --help or --version prints and exits 0,
/// on bad input prints one line naming the program and exits 2.
pub fn parse_or_exit<C: Parser>(program: &str) -> Result<C, std::process::ExitCode> {
    match C::try_parse() {
        Ok(cli) => Ok(cli),
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            Err(std::process::ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{program}: {} (see {program} --help)", one_line_error(&e));
            Err(std::process::ExitCode::from(EXIT_BAD_INPUT))
        }
    }
}

/// clap's errors span several lines (what is wrong, then usage and tips);
/// keeps what is wrong, on one line, for both binaries.
pub fn one_line_error(error: &clap::Error) -> String {
    let message = error.to_string();
    let text = message.strip_prefix("error: ").unwrap_or(&message);
    text.lines()
        .take_while(|line| !line.is_empty() && !line.starts_with("Usage:"))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Size;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("microvm").chain(args.iter().copied()))
    }

    #[test]
    fn restore_needs_no_kernel_and_takes_no_boot_options() {
        let config = parse(&["--restore", "/snap", "--api-socket", "/a"])
            .unwrap()
            .into_config()
            .unwrap();
        assert_eq!(config.restore, Some("/snap".into()));
        assert!(parse(&[]).is_err(), "a kernel or a snapshot is needed");
        for conflict in [
            &["--kernel", "/k"][..],
            &["--cpus", "2"],
            &["--memory", "size=1G"],
            &["--cmdline", "x"],
            &["--initramfs", "/i"],
        ] {
            let mut args = vec!["--restore", "/snap"];
            args.extend_from_slice(conflict);
            assert!(parse(&args).is_err(), "{conflict:?} with --restore");
            let mut args = vec!["--take-over", "/up.sock"];
            args.extend_from_slice(conflict);
            assert!(parse(&args).is_err(), "{conflict:?} with --take-over");
        }
        let config = parse(&["--take-over", "/up.sock"])
            .unwrap()
            .into_config()
            .unwrap();
        assert_eq!(config.take_over, Some("/up.sock".into()));
        assert!(parse(&["--take-over", "/up.sock", "--restore", "/snap"]).is_err());
    }

    #[test]
    fn defaults_are_sensible() {
        let config = parse(&["--kernel", "/k"]).unwrap().into_config().unwrap();
        assert_eq!(config.vcpus, 1);
        assert_eq!(config.memory.size, Size(512 << 20));
        assert_eq!(config.serial, SerialConfig::Stdout);
        assert!(config.seccomp);
        assert_eq!(config.kernel.cmdline, DEFAULT_CMDLINE);
    }

    #[test]
    fn every_option_is_understood() {
        let config = parse(&[
            "--kernel",
            "/k",
            "--initramfs",
            "/i",
            "--cmdline",
            "console=ttyS0 x=1",
            "--cpus",
            "2",
            "--memory",
            "size=1G",
            "--serial",
            "file=/tmp/s",
            "--seccomp",
            "off",
        ])
        .unwrap()
        .into_config()
        .unwrap();
        assert_eq!(config.vcpus, 2);
        assert_eq!(config.memory.size, Size(1 << 30));
        assert_eq!(config.kernel.initramfs, Some("/i".into()));
        assert_eq!(
            config.serial,
            SerialConfig::File {
                path: "/tmp/s".into(),
                max: Size(crate::config::DEFAULT_SERIAL_FILE_MAX)
            }
        );
        assert!(!config.seccomp);
    }

    #[test]
    fn vdpa_devices_repeat_and_keep_their_order() {
        let config = parse(&[
            "--kernel",
            "/k",
            "--vdpa",
            "path=/dev/vhost-vdpa-1,readonly=on",
            "--net",
            "vdpa=/dev/vhost-vdpa-0",
            "--vdpa",
            "path=/dev/vhost-vdpa-2,iommu=on",
        ])
        .unwrap()
        .into_config()
        .unwrap();
        let paths: Vec<PathBuf> = config.vdpa.iter().map(|v| v.path.clone()).collect();
        assert_eq!(
            paths,
            vec![
                PathBuf::from("/dev/vhost-vdpa-1"),
                PathBuf::from("/dev/vhost-vdpa-2")
            ]
        );
        assert!(config.vdpa[0].readonly && !config.vdpa[0].iommu);
        assert!(config.vdpa[1].iommu);
        assert_eq!(config.net.len(), 1);
        let error = parse(&["--kernel", "/k", "--vdpa", "path=/a,bogus=1"]).unwrap_err();
        assert!(
            one_line_error(&error).contains("malformed vdpa option 'path=/a,bogus=1'"),
            "{}",
            one_line_error(&error)
        );
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(parse(&[]).is_err(), "--kernel is required");
        assert!(parse(&["--kernel", "/k", "--bogus"]).is_err());
        assert!(parse(&["--kernel", "/k", "--memory", "size=12X"]).is_err());
        assert!(parse(&["--kernel", "/k", "--cpus", "-1"]).is_err());
        for bad in ["+2", " 2", "2 ", "0x2", ""] {
            assert!(
                parse(&["--kernel", "/k", "--cpus", bad]).is_err(),
                "--cpus {bad:?} was accepted"
            );
        }
        assert!(parse(&["--kernel", "/k", "--seccomp", "maybe"]).is_err());
        let zero = parse(&["--kernel", "/k", "--cpus", "0"])
            .unwrap()
            .into_config();
        assert_eq!(zero, Err(ConfigError::NoVcpus));
        let many = parse(&["--kernel", "/k", "--cpus", "100000"])
            .unwrap()
            .into_config();
        assert!(matches!(many, Err(ConfigError::TooManyVcpus { .. })));
    }
}
