//! What the guest finds at its first instruction: the kernel, its command
//! line and initramfs (loader), and the ACPI tables that describe the
//! platform and its devices.

pub mod acpi;
pub mod loader;
