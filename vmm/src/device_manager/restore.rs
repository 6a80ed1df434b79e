//! Putting the devices of a new VM back as a snapshot (or a live update)
//! saved them, once guest memory holds what it did and before any vCPU
//! runs. Each device was opened and attached anew when it was added: its
//! IOTLB went out then, as one batch (boot RAM and the plugged blocks in the
//! identity space; a vIOMMU domain replayed when the virtio-iommu was
//! added). Here each PCI function gets its registers and MSI-X table back,
//! its device is started where its queues stood, and its config space is
//! replayed through the bus (BARs mapped where the guest put them, MSI-X
//! vectors routed).

use std::sync::Mutex;

use devices::virtio::pci::{TransportState, VirtioPciDevice};
use devices::virtio::{ActivateError, Activation, VirtioDevice};

use super::DeviceManager;
use crate::snapshot::vdpa::VdpaDeviceState;
use crate::snapshot::{SavedHotplug, SavedIommu, SnapshotError};

fn failed(id: &str) -> impl Fn(String) -> SnapshotError + '_ {
    move |reason| SnapshotError::Device {
        id: id.to_string(),
        reason,
    }
}

/// Both or neither: a device the snapshot has must exist here, and the
/// other way round.
fn paired<'a, S, H>(
    saved: Option<&'a S>,
    live: Option<&'a H>,
    what: &str,
) -> Result<Option<(&'a S, &'a H)>, String> {
    match (saved, live) {
        (None, None) => Ok(None),
        (Some(saved), Some(live)) => Ok(Some((saved, live))),
        _ => Err(format!("the snapshot and the VM disagree on {what}")),
    }
}

impl DeviceManager {
    /// Puts one PCI function back: registers and MSI-X table, the device
    /// started by `start` (with what the driver had started it with), then
    /// its config space through the bus.
    fn restore_function<D: VirtioDevice>(
        &self,
        pci: &Mutex<VirtioPciDevice<D>>,
        slot: u8,
        transport: &TransportState,
        start: impl FnOnce(&mut D, Activation) -> Result<(), ActivateError>,
    ) -> Result<(), String> {
        pci.lock()
            .unwrap_or_else(|p| p.into_inner())
            .restore(transport, start)
            .map_err(|e| e.to_string())?;
        self.segment
            .bus
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .restore_config(usize::from(slot), &transport.config_space)
            .map_err(|e| e.to_string())
    }

    /// Each vDPA device: started on the driver's rings where its queues
    /// stood (and the control queue the VMM serves, from where it was).
    pub fn restore_vdpa(&self, states: &[VdpaDeviceState]) -> Result<(), SnapshotError> {
        if states.len() != self.vdpa.len() {
            return Err(failed("vDPA devices")(format!(
                "the snapshot has {} device states for {} devices",
                states.len(),
                self.vdpa.len()
            )));
        }
        for (handle, saved) in self.vdpa.iter().zip(states) {
            let failed = failed(&handle.id);
            if handle.id != saved.id {
                return Err(failed(format!(
                    "the snapshot's device here is {}: not the same kind of device",
                    saved.id
                )));
            }
            self.restore_function(
                &handle.pci,
                handle.slot,
                &saved.transport,
                |device, activation| {
                    device
                        .restore_started(activation, &saved.device)
                        .map_err(|e| ActivateError::Backend(Box::new(e)))
                },
            )
            .map_err(failed)?;
        }
        Ok(())
    }

    /// The virtio-iommu: its request queue served on from where it stood
    /// (its domain model was put back when it was added).
    pub fn restore_virtio_iommu(&self, saved: Option<&SavedIommu>) -> Result<(), SnapshotError> {
        let failed = failed("virtio-iommu");
        let Some((saved, handle)) =
            paired(saved, self.iommu.as_ref(), "a vIOMMU").map_err(&failed)?
        else {
            return Ok(());
        };
        self.restore_function(
            &handle.pci,
            handle.slot,
            &saved.transport,
            |device, activation| device.restore_started(activation, &saved.device),
        )
        .map_err(failed)
    }

    /// virtio-mem: each plugged block's memory slot (the blocks are RAM and
    /// in the identity space since [`DeviceManager::new`]), the plugged
    /// bitmap and requested size, and the request queue served on from
    /// where it stood.
    pub fn restore_virtio_mem(&self, saved: Option<&SavedHotplug>) -> Result<(), SnapshotError> {
        let failed = failed("virtio-mem");
        let Some((saved, handle)) =
            paired(saved, self.hotplug.as_ref(), "a hotplug region").map_err(&failed)?
        else {
            return Ok(());
        };
        handle
            .backend
            .restore_slots(&saved.device.plugged)
            .map_err(|e| failed(e.to_string()))?;
        handle
            .pci
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .device()
            .restore(&saved.device)
            .map_err(|e| failed(e.to_string()))?;
        self.restore_function(
            &handle.pci,
            handle.slot,
            &saved.transport,
            |device, activation| device.restore_started(activation, &saved.device),
        )
        .map_err(failed)
    }

    /// What each vDPA device was sent so far, for a restore's report:
    /// "net0: 1 batch, 2 updates; ...".
    pub fn iotlb_summary(&self) -> String {
        let each: Vec<String> = self
            .vdpa
            .iter()
            .map(|d| {
                let pci = d.pci.lock().unwrap_or_else(|p| p.into_inner());
                let dma = pci.device().counters().dma;
                let plural = if dma.batch_begin == 1 { "" } else { "es" };
                format!(
                    "{}: {} batch{plural}, {} updates",
                    d.id, dma.batch_begin, dma.iotlb_update
                )
            })
            .collect();
        match each.is_empty() {
            true => "no vDPA device".into(),
            false => each.join("; "),
        }
    }
}
