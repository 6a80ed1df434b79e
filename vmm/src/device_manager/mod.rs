//! The VM's devices and how they are wired: the PCI segment and its
//! interrupt plumbing, vDPA devices (net and block), virtio-mem, and the address spaces
//! that decide what each DMA-capable device may reach.
//!
//! The manager keeps devices by id and PCI address; the control API gets a
//! narrow handle ([`crate::api::VmHandle`]) built from it, not the devices.

pub mod api_view;
pub mod device_query;
pub mod iommu;
pub mod memlock;
pub mod memory_hotplug;
pub mod pci;
pub mod restore;
pub mod vdpa;
pub mod virtio_mem;

use std::os::fd::AsRawFd;
use std::sync::Arc;

use devices::bus::Bus;
use devices::dma::{
    Change, ChangeKind, DmaSpaces, GuestTranslate, Plan, SharedSpaces, SpaceError, SpaceId,
    TranslateError,
};
use devices::virtio::vdpa::DeviceKind;
use seccompiler::BpfProgram;

use crate::api::control::VmSummary;
use crate::config::{NetConfig, VdpaDeviceConfig};
use crate::lifecycle::{Lifecycle, PauseTargets, SnapshotSources};
use crate::seccomp::{self, FilterFds, SeccompError, ThreadKind};
use crate::snapshot::vdpa::SavedDevices;
use crate::vstate::interrupts::{KvmIoEvents, KvmMsiRouter};
use crate::vstate::memory::GuestRam;
use crate::vstate::vcpu::SavedVcpu;
use crate::vstate::vcpu_gate::VcpuGate;
use crate::vstate::vm::Vm;
use api_view::ApiView;
use device_query::DeviceQueries;
use devices::serial::SerialDevice;
use devices::virtio::iommu::IommuPersisted;
use iommu::{IommuDevice, IommuSetupError};
use memlock::MemlockStatus;
use pci::{PciSegment, PciSetupError, PciWiring};
use vdpa::{VdpaHandle, VdpaRequest, VdpaSetupError};
use virtio_mem::{MemError, MemHandle};

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(transparent)]
    Pci(#[from] PciSetupError),
    #[error(transparent)]
    Interrupts(#[from] crate::vstate::interrupts::InterruptError),
    #[error("cannot describe boot memory for DMA: {0}")]
    BootMemory(#[from] TranslateError),
    #[error("cannot set up DMA address spaces: {0}")]
    Spaces(#[from] SpaceError),
    #[error(transparent)]
    Vdpa(#[from] VdpaSetupError),
    #[error(transparent)]
    Hotplug(#[from] MemError),
    #[error(transparent)]
    Iommu(#[from] IommuSetupError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error(transparent)]
    DeviceQuery(#[from] device_query::QueryError),
}

pub struct DeviceManager {
    segment: PciSegment,
    vm: Arc<kvm_ioctls::VmFd>,
    /// KVM memory slots boot RAM took (slots 0..n) and KVM's limit: the
    /// plugged hotplug blocks take theirs from what is left.
    boot_slots: u32,
    max_slots: u32,
    router: Arc<KvmMsiRouter>,
    ioevents: Arc<KvmIoEvents>,
    ram: Arc<GuestRam>,
    spaces: SharedSpaces,
    use_seccomp: bool,
    /// Every vDPA device, net and block, in PCI order.
    pub vdpa: Vec<VdpaHandle>,
    pub hotplug: Option<MemHandle>,
    pub iommu: Option<IommuDevice>,
}

impl DeviceManager {
    /// Puts the PCI segment on the buses and fills the identity address
    /// space with boot RAM and `plugged` hotplug blocks (a restored VM's;
    /// no device is attached yet: nothing is sent).
    pub fn new(
        io_bus: &Bus,
        mmio_bus: &Arc<Bus>,
        vm: &Vm,
        ram: Arc<GuestRam>,
        (boot_slots, max_slots): (u32, u32),
        use_seccomp: bool,
        plugged: &[(u64, u64)],
    ) -> Result<DeviceManager, DeviceError> {
        let segment = PciSegment::new(io_bus, mmio_bus)?;
        let router = KvmMsiRouter::new(vm.fd.clone())?;
        let ioevents = KvmIoEvents::new(vm.fd.clone());
        let spaces = DmaSpaces::new().shared();
        let mut boot = Change::new();
        for range in ram.boot_dma_ranges()? {
            boot.add(range);
        }
        // A restored VM's plugged blocks are RAM from the start, and in the
        // identity space with boot RAM: a device attached later gets both
        // in one batch. (Their memory slots come with virtio-mem.)
        for &(gpa, size) in plugged {
            ram.set_plugged(gpa, size, true);
            for range in ram.translate(gpa, gpa, size, devices::dma::Perm::ReadWrite)? {
                boot.add(range);
            }
        }
        let mut plan = Plan::new(ChangeKind::BootMemory);
        plan.change(SpaceId::IDENTITY, boot);
        lock(&spaces).commit(plan)?;
        Ok(DeviceManager {
            segment,
            vm: vm.fd.clone(),
            boot_slots,
            max_slots,
            router,
            ioevents,
            ram,
            spaces,
            use_seccomp,
            vdpa: Vec::new(),
            hotplug: None,
            iommu: None,
        })
    }

    /// The descriptors the seccomp filters bind ioctls to: the VM and
    /// every vhost-vdpa device added so far.
    pub fn filter_fds(&self) -> FilterFds {
        FilterFds::new(
            self.vm.as_raw_fd(),
            self.vdpa.iter().map(|n| n.control_fd).collect(),
        )
    }

    /// A device worker's filter, when seccomp is on. Workers start with
    /// their device, once the VM exists.
    fn worker_filter(&self, kind: ThreadKind) -> Result<Option<BpfProgram>, SeccompError> {
        match self.use_seccomp {
            true => seccomp::filter(kind, &self.filter_fds()).map(Some),
            false => Ok(None),
        }
    }

    fn wiring(&mut self) -> PciWiring<'_> {
        PciWiring {
            segment: &mut self.segment,
            router: &self.router,
            ioevents: &self.ioevents,
        }
    }

    /// The end of the guest addresses an identity-mapped device must
    /// reach: boot RAM and the whole hotplug region.
    pub fn identity_end(&self) -> u64 {
        let boot = self.ram.ranges.last().map_or(0, |r| r.end());
        let hotplug = self
            .ram
            .hotplug
            .as_ref()
            .map_or(0, |h| h.addr.saturating_add(h.size));
        boot.max(hotplug)
    }

    /// Opens the vhost-vdpa device, whatever its type, attaches it to its
    /// address space (one transaction: all of boot RAM for an identity
    /// device) and plugs it. Its id says its type: net0, net1, blk0, ...
    pub fn add_vdpa(
        &mut self,
        request: &VdpaRequest,
        memlock: &MemlockStatus,
    ) -> Result<(), DeviceError> {
        let (ram, spaces) = (self.ram.clone(), self.spaces.clone());
        let existing: Vec<DeviceKind> = self.vdpa.iter().map(|d| d.kind).collect();
        let name = move |kind: DeviceKind| {
            let n = existing.iter().filter(|k| **k == kind).count();
            match kind {
                DeviceKind::Net => format!("net{n}"),
                DeviceKind::Block => format!("blk{n}"),
            }
        };
        let seccomp_fds = self.use_seccomp.then(|| self.filter_fds());
        let handle = vdpa::add_vdpa(
            request,
            name,
            &ram,
            seccomp_fds,
            &spaces,
            memlock,
            self.wiring(),
        )?;
        self.vdpa.push(handle);
        Ok(())
    }

    /// The virtio-iommu in front of the vDPA devices that asked for one,
    /// if any did, with the domain model a snapshot `saved`, if any. Call
    /// after every vDPA device was added.
    pub fn add_virtio_iommu(&mut self, saved: Option<&IommuPersisted>) -> Result<(), DeviceError> {
        let devices = self.vdpa.clone();
        let endpoints: Vec<&VdpaHandle> = devices.iter().filter(|n| n.behind_iommu).collect();
        if endpoints.is_empty() {
            return Ok(());
        }
        let filter = self.worker_filter(ThreadKind::IommuWorker)?;
        let (ram, spaces) = (self.ram.clone(), self.spaces.clone());
        let device =
            iommu::add_virtio_iommu(&endpoints, &ram, spaces, filter, self.wiring(), saved)?;
        self.iommu = Some(device);
        Ok(())
    }

    /// The virtio-mem device over the hotplug region, if there is one. Call
    /// after the IOMMU: unplug must take memory out of its domains too.
    pub fn add_virtio_mem(&mut self) -> Result<(), DeviceError> {
        if self.ram.hotplug.is_none() {
            return Ok(());
        }
        let filter = self.worker_filter(ThreadKind::MemoryWorker)?;
        let (ram, spaces) = (self.ram.clone(), self.spaces.clone());
        let iommu = self.iommu.as_ref().map(|i| i.handle.clone());
        let slots = virtio_mem::SlotSource {
            vm: self.vm.clone(),
            first: self.boot_slots,
            count: self.max_slots.saturating_sub(self.boot_slots),
        };
        self.hotplug = Some(virtio_mem::add_virtio_mem(
            ram,
            spaces,
            iommu,
            slots,
            filter,
            self.wiring(),
        )?);
        Ok(())
    }

    /// ACPI tables that describe the devices: the VIOT when there is a
    /// vIOMMU (how the guest finds it and its endpoints).
    pub fn acpi_tables(&self) -> Vec<Vec<u8>> {
        match &self.iommu {
            Some(iommu) => vec![crate::boot::acpi::viot(iommu.bdf(), &iommu.endpoints)],
            None => Vec::new(),
        }
    }

    /// The narrow handle the control API gets; it asks the devices' queue
    /// state through `queries`, and pauses and resumes through `lifecycle`.
    pub fn api_view(
        &self,
        summary: VmSummary,
        queries: DeviceQueries,
        lifecycle: Lifecycle,
    ) -> ApiView {
        ApiView::new(
            summary,
            self.vdpa.clone(),
            queries,
            self.hotplug.clone(),
            self.iommu.clone(),
            self.spaces.clone(),
            lifecycle,
        )
    }

    /// What a pause stops, besides the vCPUs at `gate`: every device
    /// worker (the guest's requests to the VMM) and every vDPA device; and
    /// what a snapshot saves (the VM, guest RAM, `serial`), or which devices
    /// it cannot save yet. `net` and `vdpa` are the options the vDPA
    /// devices were added with.
    pub fn pause_targets(
        &self,
        gate: Arc<VcpuGate<SavedVcpu>>,
        serial: Arc<std::sync::Mutex<SerialDevice>>,
        (net, vdpa): (&[NetConfig], &[VdpaDeviceConfig]),
    ) -> PauseTargets {
        let control = self.vdpa.iter().filter_map(|d| {
            let pci = d.pci.lock().unwrap_or_else(|p| p.into_inner());
            pci.device().control_parker()
        });
        let workers = (self.hotplug.iter().map(|m| m.parker.clone()))
            .chain(self.iommu.iter().map(|i| i.parker.clone()))
            .chain(control)
            .collect();
        PauseTargets {
            gate,
            workers,
            vdpa: self
                .vdpa
                .iter()
                .map(|d| (d.id.clone(), d.pci.clone()))
                .collect(),
            saved: SnapshotSources {
                vm: self.vm.clone(),
                ram: self.ram.clone(),
                serial,
                unsaved: self.unsaved(),
                devices: SavedDevices {
                    net: net.to_vec(),
                    vdpa: vdpa.to_vec(),
                    states: Vec::new(),
                },
                hotplug: self
                    .hotplug
                    .as_ref()
                    .map(|m| (m.region.size, m.region.block_size, m.pci.clone())),
                iommu: self.iommu.as_ref().map(|i| i.pci.clone()),
            },
        }
    }
}

impl DeviceManager {
    /// The devices a snapshot cannot save yet, each with why.
    fn unsaved(&self) -> Vec<String> {
        self.vdpa
            .iter()
            .filter_map(|d| {
                let pci = d.pci.lock().unwrap_or_else(|p| p.into_inner());
                let reason = pci.device().snapshot_refusal();
                reason.map(|r| format!("{} ({r})", d.id))
            })
            .collect()
    }
}

pub(crate) fn lock(spaces: &SharedSpaces) -> std::sync::MutexGuard<'_, DmaSpaces> {
    spaces.lock().unwrap_or_else(|p| p.into_inner())
}
