//! What the control API may see and do: a narrow interface the device
//! manager implements ([`crate::device_manager::ApiView`]). The API never
//! holds the devices themselves, so routes can be tested with a fake VM.

use devices::dma::{DeviceReport, DmaCounters, DmaRange, TransactionRecord};
use devices::virtio::iommu::{IommuCounters, IommuSnapshot, Mapping};
use devices::virtio::mem::{RequestRecord, ResizeError};
use devices::virtio::pci::TransportCounters;
use devices::virtio::vdpa::{QueueReport, VdpaInfo};

pub use crate::lifecycle::UpdateReport;
pub use crate::lifecycle::{LifecycleError, RunState, Transition};
pub use crate::snapshot::SnapshotReport;
use std::path::PathBuf;

/// The VM as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmSummary {
    pub vcpus: u8,
    pub memory_bytes: u64,
    /// Boot RAM as (guest address, size).
    pub ram: Vec<(u64, u64)>,
}

/// One vDPA device (net or block), now.
#[derive(Clone, Debug)]
pub struct VdpaStatus {
    pub id: String,
    pub pci_address: String,
    pub info: VdpaInfo,
    pub transport_status: u8,
    pub transport: TransportCounters,
    pub dma: DmaCounters,
    pub activations: u64,
    pub resets: u64,
    pub iotlb_replays: u64,
    /// Pauses that stopped the device (a VM pause while it ran).
    pub pauses: u64,
    pub queues: Vec<QueueReport>,
    /// Whether the device answered the queue-state question in time (a
    /// VDUSE device whose process is dead or wedged does not).
    pub device_answering: bool,
    /// What attaching the device sent.
    pub boot_mapping: DeviceReport,
    /// Where the device's IOVAs lead ("identity", or a vIOMMU domain).
    pub address_space: String,
    /// What the device holds, as its engine tracks it.
    pub iotlb: Vec<DmaRange>,
}

/// The virtio-mem device, now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryStatus {
    pub region_addr: u64,
    pub region_size: u64,
    pub block_size: u64,
    pub pci_address: String,
    pub driver_active: bool,
    pub requested_size: u64,
    pub plugged_size: u64,
    pub plugged: Vec<(u64, u64)>,
    pub requests: Vec<RequestRecord>,
    /// Unplugs whose memory the host could not take back (the unplug
    /// itself stood).
    pub release_failures: u64,
}

/// The virtio-iommu, now.
#[derive(Clone, Debug)]
pub struct IommuStatus {
    pub pci_address: String,
    pub snapshot: IommuSnapshot,
    pub counters: IommuCounters,
    /// Each domain's mappings as the guest made them, by domain id.
    pub mappings: Vec<(u32, Vec<Mapping>)>,
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryRequestError {
    #[error("this VM has no hotplug memory (start it with --memory size=SIZE,hotplug=MAX)")]
    NoHotplug,
    #[error(transparent)]
    Resize(#[from] ResizeError),
}

/// The operations the control API serves.
pub trait VmControl: Send + Sync {
    fn summary(&self) -> VmSummary;
    fn vdpa_devices(&self) -> Vec<VdpaStatus>;
    fn memory(&self) -> Option<MemoryStatus>;
    fn iommu(&self) -> Option<IommuStatus>;
    /// Asks the guest to plug or unplug until `size` is plugged.
    fn request_memory(&self, size: u64) -> Result<(), MemoryRequestError>;
    /// Every DMA transaction still in the history, oldest first.
    fn transactions(&self) -> Vec<TransactionRecord>;
    /// Whether the VM runs or is paused.
    fn run_state(&self) -> RunState;
    /// Pauses or resumes the VM (see [`crate::lifecycle`]).
    fn set_run_state(&self, target: RunState) -> Result<Transition, LifecycleError>;
    /// Saves the paused VM into `dir`, which must not exist.
    fn snapshot(&self, dir: PathBuf) -> Result<SnapshotReport, LifecycleError>;
    /// Hands the VM to the new VMM listening on `socket` (live update).
    fn update(&self, socket: PathBuf) -> Result<UpdateReport, LifecycleError>;
    /// Called whenever no answer is left to send: a VMM that handed its VM
    /// over ends then.
    fn after_answers(&self) {}
}
