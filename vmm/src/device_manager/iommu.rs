//! Bring-up of the virtio-iommu in front of the vDPA devices that asked for
//! it (`--net ...,iommu=on`, `--vdpa ...,iommu=on`): its endpoints are their PCI functions, its
//! input range fits every endpoint's IOVA range, and its worker commits one
//! DMA plan per drain of the request queue.

use std::sync::{Arc, Mutex};

use devices::dma::{GuestTranslate, SharedSpaces};
use devices::virtio::iommu::{
    IommuConfig, IommuEndpoint, IommuError, IommuHandle, IommuPersisted, VirtioIommu,
};
use devices::virtio::pci::VirtioPciDevice;
use devices::virtio::queue_worker::Parker;

use super::pci::{plug_virtio, PciWiring, PlugError, Plugged};
use super::vdpa::VdpaHandle;
use crate::seccomp;
use crate::vstate::memory::GuestRam;
use seccompiler::BpfProgram;

#[derive(Debug, thiserror::Error)]
pub enum IommuSetupError {
    #[error("cannot create the virtio-iommu: {0}")]
    Device(#[from] IommuError),
    #[error(transparent)]
    Plug(#[from] PlugError),
}

/// Domain IDs the guest may use. Linux allocates from the bottom.
const DOMAIN_RANGE: std::ops::RangeInclusive<u32> = 1..=0xffff;

/// Endpoints in no domain reach nothing until the guest's driver attaches
/// them: a device behind the IOMMU never sees all of guest RAM unless the
/// guest asks for it (bypass, identity domain).
const BYPASS_AT_RESET: bool = false;

pub type IommuPciDevice = VirtioPciDevice<VirtioIommu>;

/// The running virtio-iommu, as the device manager keeps it.
#[derive(Clone)]
pub struct IommuDevice {
    pub slot: u8,
    pub pci: Arc<Mutex<IommuPciDevice>>,
    pub handle: IommuHandle,
    /// PCI BDFs of its endpoints, for the VIOT table.
    pub endpoints: Vec<u16>,
    /// Parks the request worker (a pause).
    pub parker: Parker,
}

impl IommuDevice {
    pub fn bdf(&self) -> u16 {
        bdf(self.slot)
    }
}

/// Bus 0, function 0 of `slot`.
pub fn bdf(slot: u8) -> u16 {
    u16::from(slot) << 3
}

/// `endpoints` are the vDPA devices behind the IOMMU (registered in
/// `spaces`, attached nowhere yet). `saved`: the domain model a snapshot
/// saved, put back (each endpoint's device gets its domain in one batch).
pub fn add_virtio_iommu(
    endpoints: &[&VdpaHandle],
    ram: &Arc<GuestRam>,
    spaces: SharedSpaces,
    filter: Option<BpfProgram>,
    wiring: PciWiring<'_>,
    saved: Option<&IommuPersisted>,
) -> Result<IommuDevice, IommuSetupError> {
    // What every endpoint's device can address.
    let (mut first, mut last) = (0u64, u64::MAX);
    for net in endpoints {
        let range = net.iova_range.clone();
        first = first.max(*range.start());
        last = last.min(*range.end());
    }
    let config = IommuConfig {
        endpoints: endpoints
            .iter()
            .map(|net| IommuEndpoint {
                id: u32::from(bdf(net.slot)),
                device: net.id.clone(),
            })
            .collect(),
        input_range: first..=last,
        domain_range: DOMAIN_RANGE,
        bypass: BYPASS_AT_RESET,
    };
    let install = Box::new(move || match filter {
        Some(filter) => seccomp::apply(&filter).map_err(|e| e.to_string()),
        None => Ok(()),
    });
    let translate: Arc<dyn GuestTranslate> = ram.clone();
    let memory = Arc::new(ram.memory.clone());
    let device = match saved {
        None => VirtioIommu::new(config, spaces, translate, memory, install)?,
        Some(saved) => VirtioIommu::restored(config, spaces, translate, memory, install, saved)?,
    };
    let handle = device.handle();
    let parker = device.parker();
    // One vector per queue (request, event), one for configuration changes.
    let Plugged { slot, pci } = plug_virtio(device, 3, wiring)?;
    Ok(IommuDevice {
        slot,
        pci,
        handle,
        endpoints: endpoints.iter().map(|n| bdf(n.slot)).collect(),
        parker,
    })
}
