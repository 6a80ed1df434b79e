//! PCI: configuration space, the bus with its config access mechanisms,
//! and MSI-X.

pub mod bus;
pub mod config;
pub mod msix;

pub use bus::{PciBus, PciConfigIo, PciConfigMmio, PciDevice, SharedPciBus, SharedPciDevice};
pub use config::{Bar, PciConfiguration, PciIdentity};
