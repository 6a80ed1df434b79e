//! Bring-up of the virtio-mem device over the hotplug region, with the
//! backend that turns each guest request into DMA transactions.

use std::sync::{Arc, Mutex};

use devices::virtio::mem::{MemRegion, MemState, VirtioMem};
use devices::virtio::pci::VirtioPciDevice;
use vm_memory::GuestMemoryMmap;

use crate::device_manager::memory_hotplug::DmaHotplug;
use crate::device_manager::net::NetHandle;
use crate::device_manager::pci::{plug_virtio, PciWiring, PlugError, Plugged};
use crate::seccomp::{self, ThreadKind};
use crate::vstate::memory::HotplugRegion;

#[derive(Debug, thiserror::Error)]
pub enum MemError {
    #[error("cannot duplicate the hotplug memory file: {0}")]
    File(std::io::Error),
    #[error("cannot start the virtio-mem device: {0}")]
    Worker(std::io::Error),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error(transparent)]
    Plug(#[from] PlugError),
}

pub type MemPciDevice = VirtioPciDevice<VirtioMem>;

/// The running virtio-mem device, as the control API sees it.
pub struct MemHandle {
    pub region: MemRegion,
    pub slot: u8,
    pub pci: Arc<Mutex<MemPciDevice>>,
    pub state: Arc<Mutex<MemState>>,
    pub backend: Arc<DmaHotplug>,
}

pub fn add_virtio_mem(
    region: &HotplugRegion,
    nets: &[NetHandle],
    memory: Arc<GuestMemoryMmap>,
    use_seccomp: bool,
    wiring: PciWiring<'_>,
) -> Result<MemHandle, MemError> {
    let mappers = nets
        .iter()
        .enumerate()
        .map(|(i, net)| (format!("net{i}"), net.mapper.clone()))
        .collect();
    let file = region.file.try_clone().map_err(MemError::File)?;
    let backend = Arc::new(DmaHotplug::new(
        region.addr,
        region.host_addr,
        file,
        mappers,
    ));
    let geometry = MemRegion {
        addr: region.addr,
        size: region.size,
        block_size: region.block_size,
    };
    let filter = match use_seccomp {
        true => Some(seccomp::filter(ThreadKind::Hotplug)?),
        false => None,
    };
    let install = Box::new(move || match filter {
        Some(filter) => seccomp::apply(&filter).map_err(|e| e.to_string()),
        None => Ok(()),
    });
    let device =
        VirtioMem::new(geometry, backend.clone(), memory, install).map_err(MemError::Worker)?;
    let state = device.state();
    // One vector for the request queue, one for configuration changes.
    let Plugged { pci, slot } = plug_virtio(device, 2, wiring)?;
    Ok(MemHandle {
        region: geometry,
        slot,
        pci,
        state,
        backend,
    })
}
