//! Bring-up of virtio-net devices backed by vhost-vdpa: open and negotiate
//! with the kernel, decide how the device is translated, attach it to its
//! address space, and plug it into the PCI segment.

use std::ops::RangeInclusive;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use devices::dma::{
    ChangeKind, DeviceReport, Plan, SharedDmaDevice, SharedSpaces, SpaceError, SpaceId,
};
use devices::virtio::pci::VirtioPciDevice;
use devices::virtio::vdpa_net::{Translation, VdpaError, VdpaNet, VdpaNetConfig};

use super::device_query::QueriedDevice;
use super::lock;
use super::pci::{plug_virtio, PciWiring, PlugError, Plugged};
use crate::config::NetConfig;
use crate::vstate::memory::GuestRam;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Vdpa(#[from] VdpaError),
    #[error("cannot map guest memory for {path}: {source}")]
    Map { path: String, source: SpaceError },
    #[error(transparent)]
    Plug(#[from] PlugError),
}

pub type NetPciDevice = VirtioPciDevice<VdpaNet>;

/// A running vDPA net device, as the device manager keeps it.
#[derive(Clone)]
pub struct NetHandle {
    pub id: String,
    pub slot: u8,
    pub pci: Arc<Mutex<NetPciDevice>>,
    /// What attaching it sent: boot RAM for an identity device, nothing
    /// for one behind the vIOMMU (the guest decides what it reaches).
    pub boot_mapping: DeviceReport,
    /// Behind the vIOMMU rather than identity-mapped.
    pub behind_iommu: bool,
    /// What the device can address (VHOST_VDPA_GET_IOVA_RANGE).
    pub iova_range: RangeInclusive<u64>,
    /// Where its vhost ioctls go, for the seccomp filters.
    pub control_fd: RawFd,
    /// How the API learns its queues' progress without its lock.
    pub queries: QueriedDevice,
}

pub fn add_vdpa_net(
    id: &str,
    config: &NetConfig,
    ram: &GuestRam,
    spaces: &SharedSpaces,
    wiring: PciWiring<'_>,
) -> Result<NetHandle, NetError> {
    // The one decision of how this device is translated.
    let translation = match config.iommu {
        true => Translation::Iommu,
        false => Translation::Identity,
    };
    let mut device = VdpaNet::open(
        &VdpaNetConfig {
            path: config.vdpa_path.clone(),
            mac: config.mac,
            queue_pairs: config.queue_pairs,
            translation,
            batching: config.iotlb_batch,
        },
        Arc::new(ram.memory.clone()),
    )?;
    let map_error = |source| NetError::Map {
        path: config.vdpa_path.display().to_string(),
        source,
    };
    let mapper = device.mapper();
    let iova_range = lock_mapper(&mapper).iova_range();
    let mapper: SharedDmaDevice = mapper;
    let boot_mapping = {
        let mut spaces = lock(spaces);
        spaces.register(id, mapper).map_err(map_error)?;
        let mut plan = Plan::new(ChangeKind::Attach);
        if translation == Translation::Identity {
            plan.attach(id, Some(SpaceId::IDENTITY));
        }
        let reports = spaces.commit(plan).map_err(map_error)?;
        reports.into_iter().next().unwrap_or_else(|| DeviceReport {
            device: id.to_string(),
            updates: 0,
            invalidates: 0,
            batched: false,
            micros_to_end: 0,
        })
    };
    // A reset's IOTLB replay goes through the spaces, like every change.
    device.replay_through(spaces.clone(), id);
    // One vector per queue, one for configuration changes.
    let vectors = device.queue_max_sizes_len() + 1;
    let control_fd = device.control_fd();
    let queries = QueriedDevice::new(Arc::new(device.vring_base_reader()));
    let Plugged { pci, slot } = plug_virtio(device, vectors, wiring)?;
    Ok(NetHandle {
        id: id.to_string(),
        slot,
        pci,
        boot_mapping,
        behind_iommu: translation == Translation::Iommu,
        iova_range,
        control_fd,
        queries,
    })
}

fn lock_mapper<T>(mapper: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mapper.lock().unwrap_or_else(|p| p.into_inner())
}
