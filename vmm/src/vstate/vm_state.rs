//! The VM-wide state KVM holds, as plain data: the in-kernel interrupt
//! controllers (the two 8259s and the IOAPIC) and the kvmclock. Saved while
//! every vCPU is parked, put back into a fresh VM before any vCPU runs.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    #[error("cannot {what}: {source}")]
    Ioctl {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub clock: kvm_clock_data,
}

fn chip(id: u32) -> kvm_irqchip {
    kvm_irqchip {
        chip_id: id,
        ..Default::default()
    }
}

impl VmState {
    pub fn save(fd: &VmFd) -> Result<VmState, VmStateError> {
        let fail = |what| move |source| VmStateError::Ioctl { what, source };
        let mut state = VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER),
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE),
            ioapic: chip(KVM_IRQCHIP_IOAPIC),
            clock: fd.get_clock().map_err(fail("read the kvmclock"))?,
        };
        fd.get_irqchip(&mut state.pic_master)
            .map_err(fail("read the master PIC"))?;
        fd.get_irqchip(&mut state.pic_slave)
            .map_err(fail("read the slave PIC"))?;
        fd.get_irqchip(&mut state.ioapic)
            .map_err(fail("read the IOAPIC"))?;
        Ok(state)
    }

    /// Puts the state into a VM whose in-kernel irqchip exists and whose
    /// vCPUs have not run.
    pub fn restore(&self, fd: &VmFd) -> Result<(), VmStateError> {
        let fail = |what| move |source| VmStateError::Ioctl { what, source };
        fd.set_irqchip(&self.pic_master)
            .map_err(fail("set the master PIC"))?;
        fd.set_irqchip(&self.pic_slave)
            .map_err(fail("set the slave PIC"))?;
        fd.set_irqchip(&self.ioapic)
            .map_err(fail("set the IOAPIC"))?;
        // The guest's clock goes on from where it was saved; the rest of
        // what KVM_GET_CLOCK reported (its flags, the host's realtime then)
        // described the old host.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        fd.set_clock(&clock).map_err(fail("set the kvmclock"))
    }
}
