//! MSI delivery: devices raise an interrupt by writing an eventfd that KVM
//! injects (an irqfd); where that interrupt lands is a routing entry the
//! VMM keeps in sync with what the guest programmed.

use std::io;

use vmm_sys_util::eventfd::EventFd;

/// An MSI message as the guest programmed it into an MSI-X table entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// Owns the guest's interrupt routing (KVM GSI routing in the VMM).
pub trait MsiRouter: Send + Sync {
    /// Points `gsi` at `message`, or removes its route when `None` (masked).
    fn route(&self, gsi: u32, message: Option<MsiMessage>) -> io::Result<()>;
}

/// One interrupt vector of a device: a GSI and the irqfd that raises it.
pub struct MsiVector {
    pub gsi: u32,
    pub event: EventFd,
}

impl MsiVector {
    pub fn trigger(&self) -> io::Result<()> {
        self.event.write(1)
    }
}
