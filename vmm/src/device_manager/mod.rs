//! The VM's devices and how they are wired: the PCI segment and its
//! interrupt plumbing, vDPA net devices, virtio-mem, and the address spaces
//! that decide what each DMA-capable device may reach.
//!
//! The manager keeps devices by id and PCI address; the control API gets a
//! narrow handle ([`crate::api::VmHandle`]) built from it, not the devices.

pub mod api_view;
pub mod device_query;
pub mod iommu;
pub mod memory_hotplug;
pub mod net;
pub mod pci;
pub mod virtio_mem;

use std::os::fd::AsRawFd;
use std::sync::Arc;

use devices::bus::Bus;
use devices::dma::{
    Change, ChangeKind, DmaSpaces, Plan, SharedSpaces, SpaceError, SpaceId, TranslateError,
};
use seccompiler::BpfProgram;

use crate::api::control::VmSummary;
use crate::config::NetConfig;
use crate::seccomp::{self, FilterFds, SeccompError, ThreadKind};
use crate::vstate::interrupts::{KvmIoEvents, KvmMsiRouter};
use crate::vstate::memory::GuestRam;
use crate::vstate::vm::Vm;
use api_view::ApiView;
use device_query::DeviceQueries;
use iommu::{IommuDevice, IommuSetupError};
use net::{NetError, NetHandle};
use pci::{PciSegment, PciSetupError, PciWiring};
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
    Net(#[from] NetError),
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
    pub nets: Vec<NetHandle>,
    pub hotplug: Option<MemHandle>,
    pub iommu: Option<IommuDevice>,
}

impl DeviceManager {
    /// Puts the PCI segment on the buses and fills the identity address
    /// space with boot RAM (no device is attached yet: nothing is sent).
    pub fn new(
        io_bus: &Bus,
        mmio_bus: &Arc<Bus>,
        vm: &Vm,
        ram: Arc<GuestRam>,
        (boot_slots, max_slots): (u32, u32),
        use_seccomp: bool,
    ) -> Result<DeviceManager, DeviceError> {
        let segment = PciSegment::new(io_bus, mmio_bus)?;
        let router = KvmMsiRouter::new(vm.fd.clone())?;
        let ioevents = KvmIoEvents::new(vm.fd.clone());
        let spaces = DmaSpaces::new().shared();
        let mut boot = Change::new();
        for range in ram.boot_dma_ranges()? {
            boot.add(range);
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
            nets: Vec::new(),
            hotplug: None,
            iommu: None,
        })
    }

    /// The descriptors the seccomp filters bind ioctls to: the VM and
    /// every vhost-vdpa device added so far.
    pub fn filter_fds(&self) -> FilterFds {
        FilterFds::new(
            self.vm.as_raw_fd(),
            self.nets.iter().map(|n| n.control_fd).collect(),
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

    /// Opens the vhost-vdpa device, attaches it to its address space (one
    /// transaction: all of boot RAM for an identity device) and plugs it.
    pub fn add_vdpa_net(&mut self, config: &NetConfig) -> Result<(), DeviceError> {
        let id = format!("net{}", self.nets.len());
        let (ram, spaces) = (self.ram.clone(), self.spaces.clone());
        let handle = net::add_vdpa_net(&id, config, &ram, &spaces, self.wiring())?;
        self.nets.push(handle);
        Ok(())
    }

    /// The virtio-iommu in front of the vDPA devices that asked for one,
    /// if any did. Call after every net device was added.
    pub fn add_virtio_iommu(&mut self) -> Result<(), DeviceError> {
        let nets = self.nets.clone();
        let endpoints: Vec<&NetHandle> = nets.iter().filter(|n| n.behind_iommu).collect();
        if endpoints.is_empty() {
            return Ok(());
        }
        let filter = self.worker_filter(ThreadKind::IommuWorker)?;
        let (ram, spaces) = (self.ram.clone(), self.spaces.clone());
        let device = iommu::add_virtio_iommu(&endpoints, &ram, spaces, filter, self.wiring())?;
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
    /// state through `queries`.
    pub fn api_view(&self, summary: VmSummary, queries: DeviceQueries) -> ApiView {
        ApiView::new(
            summary,
            self.nets.clone(),
            queries,
            self.hotplug.clone(),
            self.iommu.clone(),
            self.spaces.clone(),
        )
    }
}

pub(crate) fn lock(spaces: &SharedSpaces) -> std::sync::MutexGuard<'_, DmaSpaces> {
    spaces.lock().unwrap_or_else(|p| p.into_inner())
}
