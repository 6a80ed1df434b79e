//! Devices of the VM and how they are wired: the PCI segment, vDPA net
//! devices, virtio-mem and what memory hotplug means for DMA.

pub mod memory_hotplug;
pub mod net;
pub mod pci;
pub mod virtio_mem;
