//! The control API's view of the devices: the operations of
//! [`VmControl`], answered from the live devices and address spaces.

use std::sync::{Mutex, MutexGuard};

use devices::dma::{SharedSpaces, TransactionRecord};

use super::device_query::{DeviceQueries, QueueAnswer};
use super::iommu::IommuDevice;
use super::lock;
use super::vdpa::VdpaHandle;
use super::virtio_mem::MemHandle;
use crate::api::control::{
    IommuStatus, LifecycleError, MemoryRequestError, MemoryStatus, RunState, SnapshotReport,
    Transition, UpdateReport, VdpaStatus, VmControl, VmSummary,
};
use crate::lifecycle::Lifecycle;

pub struct ApiView {
    summary: VmSummary,
    devices: Vec<VdpaHandle>,
    queries: DeviceQueries,
    memory: Option<MemHandle>,
    iommu: Option<IommuDevice>,
    spaces: SharedSpaces,
    lifecycle: Lifecycle,
}

fn locked<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn pci_address(slot: u8) -> String {
    format!("0000:00:{slot:02x}.0")
}

impl ApiView {
    pub fn new(
        summary: VmSummary,
        devices: Vec<VdpaHandle>,
        queries: DeviceQueries,
        memory: Option<MemHandle>,
        iommu: Option<IommuDevice>,
        spaces: SharedSpaces,
        lifecycle: Lifecycle,
    ) -> ApiView {
        ApiView {
            summary,
            devices,
            queries,
            memory,
            iommu,
            spaces,
            lifecycle,
        }
    }
}

impl VmControl for ApiView {
    fn summary(&self) -> VmSummary {
        self.summary.clone()
    }

    fn vdpa_devices(&self) -> Vec<VdpaStatus> {
        self.devices
            .iter()
            .map(|net| {
                let address_space = match lock(&self.spaces).space_of(&net.id) {
                    Ok(Some(space)) => space.to_string(),
                    _ => "none".to_string(),
                };
                // Copied under the lock: nothing here waits on the device
                // (VHOST_VDPA_GET_STATUS is answered by the kernel).
                let (info, counters, transport_status, transport, active) = {
                    let pci = locked(&net.pci);
                    (
                        pci.device().info(pci.negotiated_features()),
                        pci.device().counters(),
                        pci.status(),
                        pci.counters(),
                        pci.device().active_queues(),
                    )
                };
                // Asked with no lock held, for a bounded time.
                let mut queues = counters.queues;
                let device_answering = match self.queries.queue_progress(&net.queries, &active) {
                    QueueAnswer::Answered(values) => {
                        for (queue, value) in queues.iter_mut().zip(values) {
                            queue.last_avail_idx = value;
                        }
                        true
                    }
                    QueueAnswer::NotAnswering => false,
                };
                VdpaStatus {
                    id: net.id.clone(),
                    pci_address: pci_address(net.slot),
                    iotlb: info.mappings.clone(),
                    info,
                    transport_status,
                    transport,
                    dma: counters.dma,
                    activations: counters.activations,
                    resets: counters.resets,
                    iotlb_replays: counters.iotlb_replays,
                    pauses: counters.pauses,
                    queues,
                    device_answering,
                    boot_mapping: net.boot_mapping.clone(),
                    address_space,
                }
            })
            .collect()
    }

    fn memory(&self) -> Option<MemoryStatus> {
        let view = self.memory.as_ref()?;
        let state = locked(&view.state);
        Some(MemoryStatus {
            region_addr: state.region.addr,
            region_size: state.region.size,
            block_size: state.region.block_size,
            pci_address: pci_address(view.slot),
            driver_active: state.driver_active,
            requested_size: state.requested_size,
            plugged_size: state.plugged_size(),
            plugged: state.plugged_ranges(),
            requests: state.history.clone(),
            release_failures: view.backend.release_failures(),
        })
    }

    fn iommu(&self) -> Option<IommuStatus> {
        let iommu = self.iommu.as_ref()?;
        let snapshot = iommu.handle.snapshot();
        let mappings = snapshot
            .domains
            .iter()
            .map(|d| (d.id, iommu.handle.mappings(d.id).unwrap_or_default()))
            .collect();
        Some(IommuStatus {
            pci_address: pci_address(iommu.slot),
            counters: iommu.handle.counters(),
            snapshot,
            mappings,
        })
    }

    fn request_memory(&self, size: u64) -> Result<(), MemoryRequestError> {
        let view = self.memory.as_ref().ok_or(MemoryRequestError::NoHotplug)?;
        let mut pci = locked(&view.pci);
        pci.device().request_size(size)?;
        pci.signal_config_change();
        Ok(())
    }

    fn transactions(&self) -> Vec<TransactionRecord> {
        lock(&self.spaces).history()
    }

    fn run_state(&self) -> RunState {
        self.lifecycle.state()
    }

    fn set_run_state(&self, target: RunState) -> Result<Transition, LifecycleError> {
        self.lifecycle.set(target)
    }

    fn snapshot(&self, dir: std::path::PathBuf) -> Result<SnapshotReport, LifecycleError> {
        self.lifecycle.snapshot(dir)
    }

    fn update(&self, socket: std::path::PathBuf) -> Result<UpdateReport, LifecycleError> {
        self.lifecycle.update(socket)
    }

    fn after_answers(&self) {
        self.lifecycle.end_if_handed_over();
    }
}
