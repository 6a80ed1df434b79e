//! `microvm`: the launcher. Parses the command line, runs the VM, and turns
//! the outcome into an exit status with a one-line reason on failure.

use std::process::ExitCode;

use vmm::config::cli::{Cli, EXIT_BAD_INPUT};
use vmm::GuestExit;

/// Exit statuses: 0 the guest powered off or reset; 1 the VM failed;
/// 2 the command line or configuration was refused.
const EXIT_VM_FAILED: u8 = 1;

fn main() -> ExitCode {
    // Before any seccomp filter: a panic on any thread then says what and
    // where, instead of dying on a syscall the default hook needs.
    vmm::panic_hook::install();
    let cli = match vmm::config::cli::parse_or_exit::<Cli>("microvm") {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let config = match cli.into_config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("microvm: {e}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    match vmm::run(&config) {
        Ok(GuestExit::PowerOff) => ExitCode::SUCCESS,
        Ok(GuestExit::Reset) => {
            eprintln!("microvm: guest requested a reset; the microVM ends");
            ExitCode::SUCCESS
        }
        Ok(GuestExit::HandedOver) => {
            eprintln!("microvm: the VM was handed over to a new VMM; this one ends");
            ExitCode::SUCCESS
        }
        Err(vmm::VmmError::Config(e)) => {
            eprintln!("microvm: {e}");
            ExitCode::from(EXIT_BAD_INPUT)
        }
        Err(e) => {
            eprintln!("microvm: {e}");
            ExitCode::from(EXIT_VM_FAILED)
        }
    }
}
