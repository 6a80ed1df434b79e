//! The KVM virtual machine: its file descriptors, in-kernel interrupt
//! controllers and the guest memory slots.

use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::memory::GuestRam;

/// KVM needs three pages for the TSS of real-mode emulation on Intel; put
/// them just below the BIOS area at the top of the 32-bit space.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (is KVM available and accessible?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    KvmVersion(i32),
    #[error("cannot create the VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("cannot set up the in-kernel interrupt controllers: {0}")]
    IrqChip(kvm_ioctls::Error),
    #[error("cannot set the TSS address: {0}")]
    Tss(kvm_ioctls::Error),
    #[error("cannot register guest memory with KVM: {0}")]
    MemorySlot(kvm_ioctls::Error),
    #[error("cannot connect an interrupt to GSI {gsi}: {source}")]
    Irqfd { gsi: u32, source: kvm_ioctls::Error },
}

pub struct Vm {
    pub kvm: Kvm,
    /// Shared with the interrupt router and ioeventfd registry, which vCPU
    /// threads use when the guest reprograms devices.
    pub fd: Arc<VmFd>,
}

impl Vm {
    pub fn open_kvm() -> Result<Kvm, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(VmError::KvmVersion(version));
        }
        Ok(kvm)
    }

    /// Creates a VM with an in-kernel IOAPIC and local APICs.
    pub fn new(kvm: Kvm) -> Result<Vm, VmError> {
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        fd.set_tss_address(KVM_TSS_ADDRESS).map_err(VmError::Tss)?;
        fd.create_irq_chip().map_err(VmError::IrqChip)?;
        Ok(Vm {
            kvm,
            fd: Arc::new(fd),
        })
    }

    /// Largest vCPU count KVM accepts for one VM.
    pub fn max_vcpus(kvm: &Kvm) -> u64 {
        kvm.get_max_vcpus() as u64
    }

    pub fn supports_tsc_deadline(&self) -> bool {
        self.kvm.check_extension(Cap::TscDeadlineTimer)
    }

    /// How many memory slots KVM gives one VM (KVM_CAP_NR_MEMSLOTS).
    pub fn max_memslots(kvm: &Kvm) -> u64 {
        kvm.get_nr_memslots() as u64
    }

    /// Gives KVM the boot RAM regions, one slot each, from slot 0; returns
    /// how many slots that took. The hotplug region gets no slot here: its
    /// blocks get theirs when plugged (`block_slots`), from the next number.
    pub fn register_memory(&self, ram: &GuestRam) -> Result<u32, VmError> {
        let hotplug = ram.hotplug.as_ref().map(|h| h.addr);
        let boot = ram
            .memory
            .iter()
            .filter(|region| Some(region.start_addr().0) != hotplug);
        let mut slots = 0;
        for (slot, region) in boot.enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| VmError::MemorySlot(kvm_ioctls::Error::new(libc::EFAULT)))?;
            let descriptor = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping owned by `ram.memory`, which
            // the VMM keeps for the whole life of the VM; the slot numbers are
            // distinct and the guest ranges do not overlap (GuestMemoryMmap
            // refuses overlapping regions).
            unsafe { self.fd.set_user_memory_region(descriptor) }.map_err(VmError::MemorySlot)?;
            slots += 1;
        }
        Ok(slots)
    }

    /// Makes every write to `event` raise GSI `gsi` in the guest.
    pub fn connect_irq(&self, event: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(event, gsi)
            .map_err(|source| VmError::Irqfd { gsi, source })
    }
}
