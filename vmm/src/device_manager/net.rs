//! Bring-up of virtio-net devices backed by vhost-vdpa: open and negotiate
//! with the kernel, map the guest's RAM for the device as one transaction,
//! and plug the device into the PCI segment.

use std::sync::{Arc, Mutex};

use devices::dma::{CommitReport, DmaError, DmaMapper, VhostVdpaIotlb};
use devices::virtio::pci::VirtioPciDevice;
use devices::virtio::vdpa_net::{VdpaError, VdpaNet, VdpaNetConfig};
use vm_memory::GuestMemoryMmap;

use crate::config::NetConfig;
use crate::device_manager::pci::{plug_virtio, PciWiring, PlugError, Plugged};
use crate::vstate::memory::GuestRam;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Vdpa(#[from] VdpaError),
    #[error("cannot map guest memory for {path}: {source}")]
    Map { path: String, source: DmaError },
    #[error(transparent)]
    Plug(#[from] PlugError),
}

pub type NetPciDevice = VirtioPciDevice<VdpaNet>;

/// A running vDPA net device, as the control API sees it.
pub struct NetHandle {
    pub slot: u8,
    pub pci: Arc<Mutex<NetPciDevice>>,
    pub mapper: Arc<Mutex<DmaMapper<VhostVdpaIotlb>>>,
    pub boot_mapping: CommitReport,
}

pub fn add_vdpa_net(
    config: &NetConfig,
    ram: &GuestRam,
    memory: Arc<GuestMemoryMmap>,
    wiring: PciWiring<'_>,
) -> Result<NetHandle, NetError> {
    let device = VdpaNet::open(
        &VdpaNetConfig {
            path: config.vdpa_path.clone(),
            mac: config.mac,
            queue_pairs: config.queue_pairs,
        },
        memory,
    )?;
    let mapper = device.mapper();
    let boot_mapping = map_guest_ram(&mapper, ram).map_err(|source| NetError::Map {
        path: config.vdpa_path.display().to_string(),
        source,
    })?;
    // One vector per queue, one for configuration changes.
    let vectors = device.queue_max_sizes_len() + 1;
    let Plugged { pci, slot } = plug_virtio(device, vectors, wiring)?;
    Ok(NetHandle {
        slot,
        pci,
        mapper,
        boot_mapping,
    })
}

/// Boot memory reaches the device as one transaction: one batch.
fn map_guest_ram(
    mapper: &Mutex<DmaMapper<VhostVdpaIotlb>>,
    ram: &GuestRam,
) -> Result<CommitReport, DmaError> {
    let mut mapper = mapper.lock().unwrap_or_else(|p| p.into_inner());
    let mut transaction = mapper.begin(0);
    for range in ram.dma_ranges() {
        transaction.add(range);
    }
    mapper.commit(transaction)
}
