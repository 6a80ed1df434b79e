//! Device models for the microVM: the buses that route guest accesses, the
//! legacy platform devices (serial console, reset and ACPI power ports) and
//! the signal devices use to end the VM.

pub mod bus;
pub mod dma;
pub mod exit;
pub mod interrupt;
pub mod legacy;
pub mod pci;
pub mod serial;
pub mod virtio;
