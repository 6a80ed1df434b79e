//! A fake VM for the API's tests: a summary, and optionally hotplug
//! memory whose driver accepts every target but never plugs.

use std::sync::Mutex;

use devices::dma::TransactionRecord;
use devices::virtio::mem::ResizeError;

use super::control::{
    IommuStatus, LifecycleError, MemoryRequestError, MemoryStatus, RunState, Transition,
    VdpaStatus, VmControl, VmSummary,
};

/// A VM that never changes by itself.
pub struct StillVm {
    hotplug: Option<(u64, u64)>,
    requested: Mutex<u64>,
    /// Pause and resume only flip this: the fake has no vCPUs or devices.
    state: Mutex<RunState>,
}

impl StillVm {
    /// Without hotplug memory.
    pub fn new() -> StillVm {
        StillVm {
            hotplug: None,
            requested: Mutex::new(0),
            state: Mutex::new(RunState::Running),
        }
    }

    /// With a hotplug region of `size` bytes in `block` units.
    pub fn with_hotplug(size: u64, block: u64) -> StillVm {
        StillVm {
            hotplug: Some((size, block)),
            requested: Mutex::new(0),
            state: Mutex::new(RunState::Running),
        }
    }
}

impl Default for StillVm {
    fn default() -> StillVm {
        StillVm::new()
    }
}

impl VmControl for StillVm {
    fn summary(&self) -> VmSummary {
        VmSummary {
            vcpus: 1,
            memory_bytes: 256 << 20,
            ram: vec![(0, 256 << 20)],
        }
    }

    fn vdpa_devices(&self) -> Vec<VdpaStatus> {
        vec![]
    }

    fn memory(&self) -> Option<MemoryStatus> {
        let (size, block) = self.hotplug?;
        Some(MemoryStatus {
            region_addr: 4 << 30,
            region_size: size,
            block_size: block,
            pci_address: "0000:00:02.0".to_string(),
            driver_active: true,
            requested_size: *self.requested.lock().unwrap_or_else(|p| p.into_inner()),
            plugged_size: 0,
            plugged: vec![],
            requests: vec![],
            release_failures: 0,
        })
    }

    fn iommu(&self) -> Option<IommuStatus> {
        None
    }

    fn request_memory(&self, size: u64) -> Result<(), MemoryRequestError> {
        let (max, block) = self.hotplug.ok_or(MemoryRequestError::NoHotplug)?;
        if !size.is_multiple_of(block) {
            return Err(ResizeError::Unaligned { size, block }.into());
        }
        if size > max {
            return Err(ResizeError::TooLarge { size, max }.into());
        }
        *self.requested.lock().unwrap_or_else(|p| p.into_inner()) = size;
        Ok(())
    }

    fn transactions(&self) -> Vec<TransactionRecord> {
        vec![]
    }

    fn run_state(&self) -> RunState {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_run_state(&self, target: RunState) -> Result<Transition, LifecycleError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let changed = *state != target;
        *state = target;
        Ok(Transition {
            state: target,
            changed,
            vcpus: std::time::Duration::ZERO,
            workers: std::time::Duration::ZERO,
            devices: std::time::Duration::ZERO,
            device_methods: Vec::new(),
        })
    }

    /// A fake VM has nothing to save: paused, it says so; running, it is
    /// refused like a real one.
    fn snapshot(
        &self,
        _dir: std::path::PathBuf,
    ) -> Result<super::control::SnapshotReport, LifecycleError> {
        match self.run_state() {
            RunState::Paused => Err(LifecycleError::Gone),
            RunState::Running => Err(crate::snapshot::SnapshotError::NotPaused.into()),
        }
    }

    /// Nobody takes a fake VM.
    fn update(
        &self,
        socket: std::path::PathBuf,
    ) -> Result<super::control::UpdateReport, LifecycleError> {
        Err(crate::snapshot::handoff::HandoffError::Gone(socket).into())
    }
}
