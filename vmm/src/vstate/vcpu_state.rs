//! A vCPU's architectural state as KVM holds it, as plain data: saved from
//! a parked vCPU (its thread, outside KVM_RUN) and given to a fresh vCPU
//! before it first runs.
//!
//! What is saved, and the order it is put back in, follow what KVM needs:
//! CPUID first (it decides which MSRs and XSAVE features exist), then the
//! special registers, the registers, XSAVE and XCRs, the MSRs, the local
//! APIC (after the APIC base MSR), the TSC deadline (KVM drops a deadline
//! written while the APIC timer is not in TSC-deadline mode, so only after
//! the APIC: a restored guest whose timer was armed would otherwise wait
//! forever), the pending events and the MP state last.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

/// IA32_TSC_DEADLINE: put back after the local APIC.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// The most XSAVE state `kvm_xsave` holds; a host whose guests need more
/// (AMX) needs KVM_GET_XSAVE2, which is not used here yet.
pub const XSAVE_LEGACY_SIZE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("vCPU {id}: cannot {what}: {source}")]
    Ioctl {
        id: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {id}: KVM took {set} of {wanted} MSRs")]
    PartialMsrs { id: u8, set: usize, wanted: usize },
    #[error("vCPU {id}: {count} CPUID entries, more than KVM takes ({max})")]
    TooManyCpuidEntries { id: u8, count: usize, max: usize },
    #[error(
        "vCPU {id}: this host's guests need {size} bytes of XSAVE state; only {XSAVE_LEGACY_SIZE} \
         can be saved and restored yet"
    )]
    XsaveTooLarge { id: u8, size: usize },
}

/// One vCPU's state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub sregs: kvm_sregs,
    pub regs: kvm_regs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub msrs: Vec<kvm_msr_entry>,
    pub lapic: kvm_lapic_state,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
}

/// What saving needs to know of the host, asked once when the vCPU is
/// made (the vCPU thread cannot ask KVM's system descriptor).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SaveContext {
    /// KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores.
    pub msr_indices: Vec<u32>,
    /// KVM_CAP_XSAVE2's size (0 where KVM does not report it).
    pub xsave_size: usize,
}

impl VcpuState {
    /// Reads vCPU `id`'s state. Call only while it is outside KVM_RUN.
    pub fn save(id: u8, fd: &VcpuFd, context: &SaveContext) -> Result<VcpuState, VcpuStateError> {
        let fail = |what| move |source| VcpuStateError::Ioctl { id, what, source };
        if context.xsave_size > XSAVE_LEGACY_SIZE {
            return Err(VcpuStateError::XsaveTooLarge {
                id,
                size: context.xsave_size,
            });
        }
        Ok(VcpuState {
            id,
            cpuid: fd
                .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                .map_err(fail("read CPUID"))?
                .as_slice()
                .to_vec(),
            sregs: fd.get_sregs().map_err(fail("read special registers"))?,
            regs: fd.get_regs().map_err(fail("read registers"))?,
            xsave: fd.get_xsave().map_err(fail("read XSAVE state"))?,
            xcrs: fd.get_xcrs().map_err(fail("read XCRs"))?,
            msrs: save_msrs(id, fd, &context.msr_indices)?,
            lapic: fd.get_lapic().map_err(fail("read the local APIC"))?,
            events: fd.get_vcpu_events().map_err(fail("read pending events"))?,
            mp_state: fd.get_mp_state().map_err(fail("read the MP state"))?,
        })
    }

    /// Gives a vCPU that has not run yet this state.
    pub fn restore(&self, fd: &VcpuFd, context: &SaveContext) -> Result<(), VcpuStateError> {
        let id = self.id;
        let fail = |what| move |source| VcpuStateError::Ioctl { id, what, source };
        if context.xsave_size > XSAVE_LEGACY_SIZE {
            return Err(VcpuStateError::XsaveTooLarge {
                id,
                size: context.xsave_size,
            });
        }
        let cpuid =
            CpuId::from_entries(&self.cpuid).map_err(|_| VcpuStateError::TooManyCpuidEntries {
                id,
                count: self.cpuid.len(),
                max: KVM_MAX_CPUID_ENTRIES,
            })?;
        fd.set_cpuid2(&cpuid).map_err(fail("set CPUID"))?;
        fd.set_sregs(&self.sregs)
            .map_err(fail("set special registers"))?;
        fd.set_regs(&self.regs).map_err(fail("set registers"))?;
        // SAFETY: KVM_SET_XSAVE reads one `kvm_xsave` (4 KiB); KVM reads
        // past it only when the guest's XSAVE state is larger (KVM_CAP_XSAVE2
        // above 4096, AMX), which is refused above.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(fail("set XSAVE state"))?;
        fd.set_xcrs(&self.xcrs).map_err(fail("set XCRs"))?;
        let (deadline, msrs): (Vec<kvm_msr_entry>, Vec<kvm_msr_entry>) = self
            .msrs
            .iter()
            .partition(|m| m.index == MSR_IA32_TSC_DEADLINE);
        set_msrs(id, fd, &msrs)?;
        fd.set_lapic(&self.lapic)
            .map_err(fail("set the local APIC"))?;
        set_msrs(id, fd, &deadline)?;
        fd.set_vcpu_events(&self.events)
            .map_err(fail("set pending events"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(fail("set the MP state"))
    }
}

/// Sets every one of `entries`, or says how many KVM took.
fn set_msrs(id: u8, fd: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), VcpuStateError> {
    if entries.is_empty() {
        return Ok(());
    }
    let msrs = Msrs::from_entries(entries).map_err(|_| VcpuStateError::PartialMsrs {
        id,
        set: 0,
        wanted: entries.len(),
    })?;
    let set = fd.set_msrs(&msrs).map_err(|source| VcpuStateError::Ioctl {
        id,
        what: "set MSRs",
        source,
    })?;
    match set == entries.len() {
        true => Ok(()),
        false => Err(VcpuStateError::PartialMsrs {
            id,
            set,
            wanted: entries.len(),
        }),
    }
}

/// Every MSR of `indices` KVM can read on this vCPU. KVM_GET_MSRS stops at
/// the first MSR it refuses and says how many it read: that one is left
/// out (it is not the guest's to have) and the rest are read on.
fn save_msrs(id: u8, fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuStateError> {
    let mut saved = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError::PartialMsrs {
            id,
            set: 0,
            wanted: entries.len(),
        })?;
        let read = fd
            .get_msrs(&mut msrs)
            .map_err(|source| VcpuStateError::Ioctl {
                id,
                what: "read MSRs",
                source,
            })?;
        saved.extend(msrs.as_slice().iter().take(read).copied());
        // Skip the refused one (if any) and go on after it.
        rest = rest.get(read.saturating_add(1)..).unwrap_or_default();
    }
    Ok(saved)
}
