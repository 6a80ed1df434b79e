//! A typed builder for what an end-to-end test runs in the test host.
//!
//! Each step is a call into the test host's harness
//! (`tools/testbed-host/harness.sh`): devices and VMMs are started and waited
//! for there, every wait has a deadline, and a step that fails prints which
//! step it was with the tails of the guest console, the VMM's stderr, the
//! device's log and dmesg, then ends the script with an
//! `@@section harness-failure` naming the step. So a test says what it
//! checks, and not how to poll.

use crate::{base64, shell_quote, MicrovmRun};

/// The section a failed step leaves, holding the step's description.
pub const FAILURE_SECTION: &str = "harness-failure";

/// A vduse-net device in the test host (`h_vduse_start`).
#[derive(Debug, Clone)]
pub struct VduseNet {
    pub name: &'static str,
    /// `--tap IFNAME` with this address on the test host's side, or
    /// `--loopback` when `None`.
    pub tap: Option<(&'static str, &'static str)>,
    pub iotlb_dump: Option<&'static str>,
    pub extra_args: String,
}

impl VduseNet {
    /// vduse-net `net0` on `tap0`, the test host at 192.0.2.1/24, its IOTLB
    /// dumped to /tmp/iotlb: what most tests use.
    pub fn on_tap() -> VduseNet {
        VduseNet {
            name: "net0",
            tap: Some(("tap0", "192.0.2.1/24")),
            iotlb_dump: Some("/tmp/iotlb"),
            extra_args: String::new(),
        }
    }

    fn args(&self) -> String {
        let mut args = match self.tap {
            Some((ifname, _)) => format!("--tap {ifname}"),
            None => "--loopback".to_string(),
        };
        if let Some(dump) = self.iotlb_dump {
            args.push_str(&format!(" --iotlb-dump {dump}"));
        }
        if !self.extra_args.is_empty() {
            args.push(' ');
            args.push_str(&self.extra_args);
        }
        args
    }

    /// The shell variable that holds the device's /dev/vhost-vdpa-N.
    pub fn path_var(&self) -> String {
        format!("\"$dev_{}\"", self.name)
    }
}

/// The test-host script, built step by step.
pub struct HostScript {
    text: String,
}

impl Default for HostScript {
    fn default() -> Self {
        HostScript::new()
    }
}

impl HostScript {
    pub fn new() -> HostScript {
        HostScript {
            text: String::from(
                ". \"$MICROVM_HARNESS\"\n\
                 H_API=/tmp/api.sock\n\
                 h_step_failed() {\n\
                 \x20 echo \"@@section harness-failure\"; echo \"$1\"\n\
                 \x20 h_vmm_stop; for p in \"$H_DIR\"/dev_pid.*; do [ -f \"$p\" ] && kill \"$(cat \"$p\")\" 2>/dev/null; done\n\
                 \x20 exit 1\n\
                 }\n",
            ),
        }
    }

    /// Appends shell as it is (test-specific commands).
    pub fn sh(&mut self, shell: &str) -> &mut Self {
        self.text.push_str(shell);
        if !shell.ends_with('\n') {
            self.text.push('\n');
        }
        self
    }

    /// A step that must succeed, with what it was for.
    fn step(&mut self, command: &str, what: &str) -> &mut Self {
        let what = shell_quote(what);
        self.sh(&format!("{command} || h_step_failed {what}"))
    }

    /// Waits up to `secs` for the shell command `command` to succeed while
    /// the VMM runs (`h_wait_true`).
    pub fn wait_true(&mut self, command: &str, secs: u32, what: &str) -> &mut Self {
        self.step(
            &format!("h_wait_true {secs} {} {command}", shell_quote(what)),
            what,
        )
    }

    /// Waits up to `secs` for the process whose pid `pid` (a shell word)
    /// names to exit.
    pub fn wait_gone(&mut self, pid: &str, secs: u32, what: &str) -> &mut Self {
        self.step(
            &format!("h_wait_on '' '' {secs} {} h_gone {pid}", shell_quote(what)),
            what,
        )
    }

    /// Starts vduse-net and waits until its vhost-vdpa node exists; its path
    /// is then in `device.path_var()`.
    pub fn vduse_net(&mut self, device: &VduseNet) -> &mut Self {
        let start = format!(
            "dev_{name}=$(h_vduse_start {name} {args})",
            name = device.name,
            args = device.args()
        );
        self.step(&start, &format!("vduse-net {} to start", device.name));
        if let Some((ifname, address)) = device.tap {
            self.sh(&format!("ip addr add {address} dev {ifname}"));
        }
        self
    }

    /// Starts a VMM in the background: its console goes to /tmp/console.log,
    /// its stderr to /tmp/microvm.err.
    pub fn microvm(&mut self, run: &MicrovmRun) -> &mut Self {
        self.sh(&format!(
            "rm -f \"$H_API\"\nH_CONSOLE=/tmp/console.log H_VMM_ERR=/tmp/microvm.err h_vmm_start {}",
            run.script()
        ))
    }

    /// Waits up to `secs` for a console line matching `pattern` (grep -E).
    pub fn wait_console(&mut self, pattern: &str, secs: u32, what: &str) -> &mut Self {
        let command = format!(
            "h_wait_console {} {secs} {}",
            shell_quote(pattern),
            shell_quote(what)
        );
        self.step(&command, what)
    }

    /// Releases the guest's `wait_go` at `address` (h_go: a fresh token, bounded tries).
    pub fn go(&mut self, address: &str) -> &mut Self {
        self.step(
            &format!("h_go {address}"),
            &format!("the guest at {address} to take 'go'"),
        )
    }

    /// A section holding a shell command's output (whatever its status).
    pub fn section(&mut self, name: &str, command: &str) -> &mut Self {
        self.sh(&format!("echo '@@section {name}'\n{command}"))
    }

    /// A section holding what `microvm-ctl ARGS` printed on stdout (bounded;
    /// its own failures, such as a refused request, are the test's to check).
    pub fn ctl_section(&mut self, name: &str, args: &str) -> &mut Self {
        self.section(name, &format!("h_ctl {args}"))
    }

    /// Waits up to `secs` for the VMM to exit; its status goes to section
    /// `PREFIX-exit`, its stderr to `PREFIX-stderr`, its console to
    /// `PREFIX-console`.
    pub fn wait_exit(&mut self, prefix: &str, secs: u32) -> &mut Self {
        self.step(
            &format!("st=$(h_vmm_wait {secs})"),
            &format!("the VMM ({prefix}) to exit after the guest powered off"),
        );
        self.section(&format!("{prefix}-exit"), "echo \"$st\"")
            .section(&format!("{prefix}-stderr"), "cat /tmp/microvm.err")
            .section(&format!("{prefix}-console"), "cat /tmp/console.log")
    }

    /// Ends every device the harness started.
    pub fn stop_devices(&mut self) -> &mut Self {
        self.sh("for p in \"$H_DIR\"/dev_pid.*; do [ -f \"$p\" ] && kill \"$(cat \"$p\")\" 2>/dev/null; done; true")
    }

    pub fn build(&self) -> String {
        self.text.clone()
    }
}

/// A microVM (release build) whose one net device is `device`, with the API
/// on `$H_API` and a quiet guest that runs `guest_cmd`; `net_options` are
/// appended to the `--net` value (e.g. `,iommu=on`).
pub fn microvm_on(
    device: &VduseNet,
    cpus: u32,
    memory: &'static str,
    net_options: &str,
    guest_cmd: &str,
) -> MicrovmRun {
    let mut vm = MicrovmRun::new(cpus, memory);
    vm.cmdline_extra = format!("quiet {}", guest_cmd_arg(guest_cmd));
    vm.extra_args = format!(
        "--net vdpa={}{net_options} --api-socket \"$H_API\"",
        device.path_var()
    );
    vm
}

/// A guest command line's `microvm.cmd=` for a shell command.
pub fn guest_cmd_arg(command: &str) -> String {
    format!("microvm.cmd={}", base64(command.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_wait_is_a_bounded_harness_call() {
        let mut script = HostScript::new();
        script
            .vduse_net(&VduseNet::on_tap())
            .microvm(&MicrovmRun::new(1, "256M"))
            .wait_console("microvm-guest: ready", 120, "the guest to boot")
            .go("192.0.2.2")
            .ctl_section("counters", "counters")
            .wait_exit("vm", 60);
        let text = script.build();
        assert!(!text.contains("until"), "{text}");
        assert!(!text.contains("| nc") && !text.contains("nc 192"), "{text}");
        assert!(text.contains("h_wait_console 'microvm-guest: ready' 120 "));
        assert!(text.contains("h_go 192.0.2.2 || h_step_failed"));
        assert!(text.contains("h_vmm_wait 60"));
        assert!(text.starts_with(". \"$MICROVM_HARNESS\""));
    }

    #[test]
    fn the_device_path_comes_from_the_device() {
        let mut script = HostScript::new();
        let device = VduseNet::on_tap();
        script.vduse_net(&device);
        assert!(script
            .build()
            .contains("dev_net0=$(h_vduse_start net0 --tap tap0 --iotlb-dump /tmp/iotlb)"));
        assert_eq!(device.path_var(), "\"$dev_net0\"");
    }
}
