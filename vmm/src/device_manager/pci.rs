//! The guest's PCI segment: bus 0 reachable through 0xCF8/0xCFC and ECAM,
//! and the allocator that places device BARs in the 64-bit window.

use std::sync::{Arc, Mutex};

use devices::bus::{Bus, BusError};
use devices::pci::bus::{PciError, CONFIG_IO_BASE, CONFIG_IO_LEN};
use devices::pci::{PciBus, PciConfigIo, PciConfigMmio, SharedPciBus, SharedPciDevice};
use devices::virtio::pci::{TransportError, VirtioPciDevice, BAR_SIZE};
use devices::virtio::VirtioDevice;

use crate::vstate::interrupts::{InterruptError, KvmIoEvents, KvmMsiRouter};
use crate::vstate::memory::pci_layout;

#[derive(Debug, thiserror::Error)]
pub enum PciSetupError {
    #[error("cannot place PCI configuration access: {0}")]
    Bus(#[from] BusError),
    #[error(transparent)]
    Pci(#[from] PciError),
    #[error("the 64-bit PCI window is full")]
    WindowFull,
}

pub struct PciSegment {
    pub bus: SharedPciBus,
    next_mem64: u64,
}

impl PciSegment {
    /// Puts the host bridge's config access on the I/O and MMIO buses.
    pub fn new(io_bus: &Bus, mmio_bus: &Arc<Bus>) -> Result<PciSegment, PciSetupError> {
        let bus = Arc::new(Mutex::new(PciBus::new(mmio_bus.clone())));
        io_bus.insert(
            u64::from(CONFIG_IO_BASE),
            CONFIG_IO_LEN,
            Arc::new(Mutex::new(PciConfigIo::new(bus.clone()))),
        )?;
        mmio_bus.insert(
            pci_layout::ECAM_START,
            pci_layout::ECAM_SIZE,
            Arc::new(Mutex::new(PciConfigMmio::new(bus.clone()))),
        )?;
        Ok(PciSegment {
            bus,
            next_mem64: pci_layout::MEM64_START,
        })
    }

    /// A naturally aligned address for a 64-bit BAR of `size` bytes.
    pub fn allocate_mem64(&mut self, size: u64) -> Result<u64, PciSetupError> {
        let addr = self.next_mem64.next_multiple_of(size);
        let end = addr.checked_add(size).ok_or(PciSetupError::WindowFull)?;
        if end > pci_layout::MEM64_START + pci_layout::MEM64_SIZE {
            return Err(PciSetupError::WindowFull);
        }
        self.next_mem64 = end;
        Ok(addr)
    }

    pub fn add_device(&self, device: SharedPciDevice) -> Result<u8, PciSetupError> {
        let mut bus = self.bus.lock().unwrap_or_else(|p| p.into_inner());
        Ok(bus.add_device(device)?)
    }
}

/// Wiring shared by every PCI device.
pub struct PciWiring<'a> {
    pub segment: &'a mut PciSegment,
    pub router: &'a Arc<KvmMsiRouter>,
    pub ioevents: &'a Arc<KvmIoEvents>,
}

#[derive(Debug, thiserror::Error)]
pub enum PlugError {
    #[error(transparent)]
    Interrupts(#[from] InterruptError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Pci(#[from] PciSetupError),
}

/// A virtio-pci function on the segment.
pub struct Plugged<D: VirtioDevice> {
    pub pci: Arc<Mutex<VirtioPciDevice<D>>>,
    pub slot: u8,
}

/// Wraps `device` as a virtio-pci function with `vectors` MSI-X vectors
/// and plugs it into the segment.
pub fn plug_virtio<D: VirtioDevice + 'static>(
    device: D,
    vectors: usize,
    wiring: PciWiring<'_>,
) -> Result<Plugged<D>, PlugError> {
    let vectors = wiring.router.allocate_vectors(vectors)?;
    let bar = wiring.segment.allocate_mem64(BAR_SIZE)?;
    let pci = Arc::new(Mutex::new(VirtioPciDevice::new(
        device,
        vectors,
        wiring.router.clone(),
        wiring.ioevents.clone(),
        bar,
    )?));
    let slot = wiring.segment.add_device(pci.clone())?;
    Ok(Plugged { pci, slot })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_are_aligned_and_stay_in_the_window() {
        let io = Bus::new();
        let mmio = Arc::new(Bus::new());
        let mut segment = PciSegment::new(&io, &mmio).unwrap();
        let a = segment.allocate_mem64(0x8000).unwrap();
        let b = segment.allocate_mem64(0x10_0000).unwrap();
        assert_eq!(a, pci_layout::MEM64_START);
        assert_eq!(b % 0x10_0000, 0);
        assert!(b >= a + 0x8000);
        assert!(matches!(
            segment.allocate_mem64(pci_layout::MEM64_SIZE),
            Err(PciSetupError::WindowFull)
        ));
    }
}
