//! Bring-up of the virtio-mem device over the hotplug region: its DMA
//! backend (devices' `virtio::mem::dma`, one plan per guest request) over
//! the KVM slots and memory file of `memory_hotplug`.

use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;

use devices::dma::SharedSpaces;
use devices::virtio::iommu::IommuHandle;
use devices::virtio::mem::{MemRegion, MemState, VirtioMem};
use devices::virtio::pci::VirtioPciDevice;
use devices::virtio::queue_worker::Parker;

use devices::virtio::mem::dma::DmaHotplug;

use super::memory_hotplug::KvmHotplugHost;
use super::pci::{plug_virtio, PciWiring, PlugError, Plugged};
use crate::seccomp;
use crate::vstate::block_slots::{BlockSlots, KvmSlotIoctl, SlotRegion};
use crate::vstate::memory::GuestRam;
use seccompiler::BpfProgram;

#[derive(Debug, thiserror::Error)]
pub enum MemError {
    #[error("virtio-mem needs a hotplug region (--memory ...,hotplug=MAX)")]
    NoRegion,
    #[error(
        "the hotplug region's {blocks} blocks need more KVM memory slots than the {free} left"
    )]
    Slots { blocks: u64, free: u32 },
    #[error("cannot duplicate the hotplug memory file: {0}")]
    File(std::io::Error),
    #[error("cannot start the virtio-mem device: {0}")]
    Worker(std::io::Error),
    #[error(transparent)]
    Plug(#[from] PlugError),
}

pub type MemPciDevice = VirtioPciDevice<VirtioMem>;

/// The running virtio-mem device, as the device manager keeps it.
#[derive(Clone)]
pub struct MemHandle {
    pub region: MemRegion,
    pub slot: u8,
    pub pci: Arc<Mutex<MemPciDevice>>,
    pub state: Arc<Mutex<MemState>>,
    pub backend: Arc<DmaHotplug>,
    /// Parks the request worker (a pause).
    pub parker: Parker,
}

/// Where the plugged blocks' KVM slots come from: slots `first ..
/// first + count` of `vm`.
pub struct SlotSource {
    pub vm: Arc<VmFd>,
    pub first: u32,
    pub count: u32,
}

/// `ram` must have a hotplug region (the caller checks).
pub fn add_virtio_mem(
    ram: Arc<GuestRam>,
    spaces: SharedSpaces,
    iommu: Option<IommuHandle>,
    slots: SlotSource,
    filter: Option<BpfProgram>,
    wiring: PciWiring<'_>,
) -> Result<MemHandle, MemError> {
    let Some(region) = &ram.hotplug else {
        return Err(MemError::NoRegion);
    };
    let geometry = MemRegion {
        addr: region.addr,
        size: region.size,
        block_size: region.block_size,
    };
    // One slot per block, so the configuration check guarantees enough.
    let blocks = region.size / region.block_size;
    if blocks > u64::from(slots.count) {
        return Err(MemError::Slots {
            blocks,
            free: slots.count,
        });
    }
    let slot_region = SlotRegion {
        addr: region.addr,
        size: region.size,
        block_size: region.block_size,
        host_addr: region.host_addr,
    };
    let ioctl = Box::new(KvmSlotIoctl::new(slots.vm, ram.clone()));
    let slots = BlockSlots::new(ioctl as _, slot_region, slots.first, slots.count);
    let file = region.file.try_clone().map_err(MemError::File)?;
    let memory = Arc::new(ram.memory.clone());
    let host = KvmHotplugHost::new(ram.clone(), slots, geometry.addr, file);
    let backend = Arc::new(DmaHotplug::new(Box::new(host), ram.clone(), spaces, iommu));
    let install = Box::new(move || match filter {
        Some(filter) => seccomp::apply(&filter).map_err(|e| e.to_string()),
        None => Ok(()),
    });
    let device =
        VirtioMem::new(geometry, backend.clone(), memory, install).map_err(MemError::Worker)?;
    let state = device.state();
    let parker = device.parker();
    // One vector for the request queue, one for configuration changes.
    let Plugged { pci, slot } = plug_virtio(device, 2, wiring)?;
    Ok(MemHandle {
        region: geometry,
        slot,
        pci,
        state,
        backend,
        parker,
    })
}
