//! The microVM monitor: turns a `VmmConfig` into a running KVM guest and
//! runs it until the guest powers off or something fails.
//!
//! Bring-up (builder.rs) is a sequence of small steps with explicit
//! inputs: validate → API socket → memory → VM → devices → ACPI → kernel →
//! vCPUs → run.

pub mod api;
pub mod boot;
pub mod builder;
pub mod config;
pub mod console;
pub mod device_manager;
pub mod lifecycle;
pub mod panic_hook;
pub mod seccomp;
pub mod snapshot;
pub mod vstate;

use boot::{acpi, loader as boot_loader};
use config::{ConfigError, VmmConfig};
use devices::bus::BusError;
use vstate::{interrupts, memory, vcpu, vm};

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Vm(#[from] vm::VmError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Boot(#[from] boot_loader::BootError),
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    #[error(transparent)]
    Console(#[from] console::ConsoleError),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error(transparent)]
    Interrupts(#[from] interrupts::InterruptError),
    #[error(transparent)]
    Devices(#[from] device_manager::DeviceError),
    #[error(transparent)]
    Api(#[from] api::ApiError),
    #[error("cannot place a device on the I/O bus: {0}")]
    Bus(#[from] BusError),
    #[error("cannot create an event descriptor: {0}")]
    EventFd(std::io::Error),
    #[error("event loop failed: {0}")]
    EventLoop(String),
    #[error("cannot set up pause and resume: {0}")]
    Lifecycle(std::io::Error),
    #[error("restore: {0}")]
    Restore(#[from] snapshot::SnapshotError),
    #[error("take over: {0}")]
    TakeOver(String),
    #[error("cannot start a thread for vCPU {id}: {source}")]
    Thread { id: u8, source: std::io::Error },
    #[error("{0}")]
    Guest(String),
}

/// How a VM that ran ended without error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestExit {
    PowerOff,
    Reset,
    /// A new VMM took the VM (live update).
    HandedOver,
}

/// Builds the VM described by `config` and runs it to the end.
pub fn run(config: &VmmConfig) -> Result<GuestExit, VmmError> {
    builder::build(config)?.run()
}
