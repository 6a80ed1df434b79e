//! The DMA-mapping engine: the one place that decides what a vDPA device may
//! reach.
//!
//! Every source of change (boot memory, memory hotplug/unplug, virtio-iommu
//! maps) describes its change as a [`Transaction`] — `begin`, `add`, `remove`,
//! `commit`. The [`DmaMapper`] keeps the device's current IOTLB per address
//! space (ASID), turns the transaction into the smallest correct set of IOTLB
//! messages and emits them through an [`IotlbBackend`], bracketed by one
//! BATCH_BEGIN … BATCH_END when the device acked `VHOST_BACKEND_F_IOTLB_BATCH`.
//!
//! Above the engine, [`DmaSpaces`] keeps the address spaces (the identity
//! space, IOVA = guest physical address, and one translated space per vIOMMU
//! domain) and the devices attached to each: a source commits one [`Plan`],
//! and every affected device gets one transaction, all or nothing. Data
//! flows one way: source → address space → engine → backend.
//!
//! The diff respects how the kernel treats the messages
//! (drivers/vhost/vdpa.c, drivers/vhost/iotlb.c):
//! - an UPDATE that overlaps any existing entry is refused (`-EEXIST`), so the
//!   engine never sends one over a live entry;
//! - an INVALIDATE removes every entry that intersects its range *whole*
//!   (`vhost_iotlb_del_range`), so the engine only invalidates spans that
//!   contain nothing it wants to keep, and re-sends the surviving pieces of a
//!   partly removed entry;
//! - devices with `set_map` (VDUSE) rebuild their whole IOTLB at BATCH_END, so
//!   a transaction is one batch.

mod backend;
mod engine;
pub(crate) mod interval;
mod space;
mod translate;
mod vhost_vdpa;

#[cfg(any(test, feature = "test-utils"))]
pub use backend::RecordingBackend;
pub use backend::{errno_meaning, BackendError, IotlbBackend, IotlbMessage};
pub use engine::{CommitReport, DmaCounters, DmaError, DmaMapper, RollbackFailure, Transaction};
pub use space::{
    Change, ChangeKind, DeviceReport, DmaDevice, DmaSpaces, Plan, SharedDmaDevice, SharedSpaces,
    SpaceError, SpaceId, TransactionRecord, DEVICE_ASID,
};
#[cfg(any(test, feature = "test-utils"))]
pub use translate::TableTranslate;
pub use translate::{GuestTranslate, TranslateError};
pub use vhost_vdpa::{
    VhostIotlbMsg, VhostMsgV2, VhostVdpaIotlb, VHOST_IOTLB_BATCH_BEGIN, VHOST_IOTLB_BATCH_END,
    VHOST_IOTLB_INVALIDATE, VHOST_IOTLB_MSG_V2, VHOST_IOTLB_UPDATE, VHOST_MSG_V2_SIZE,
};

/// Access the device gets to a range; the values are the kernel's
/// `VHOST_ACCESS_RO/WO/RW`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Perm {
    /// The device may only read (guest → device buffers).
    ReadOnly,
    /// The device may only write (device → guest buffers).
    WriteOnly,
    /// The device may read and write.
    ReadWrite,
}

impl Perm {
    /// The `perm` byte of `struct vhost_iotlb_msg`.
    pub fn to_vhost(self) -> u8 {
        match self {
            Perm::ReadOnly => VHOST_ACCESS_RO,
            Perm::WriteOnly => VHOST_ACCESS_WO,
            Perm::ReadWrite => VHOST_ACCESS_RW,
        }
    }

    /// Inverse of [`Perm::to_vhost`]; `None` for values the kernel rejects.
    pub fn from_vhost(value: u8) -> Option<Perm> {
        match value {
            VHOST_ACCESS_RO => Some(Perm::ReadOnly),
            VHOST_ACCESS_WO => Some(Perm::WriteOnly),
            VHOST_ACCESS_RW => Some(Perm::ReadWrite),
            _ => None,
        }
    }
}

/// `VHOST_ACCESS_RO` from include/uapi/linux/vhost_types.h.
pub const VHOST_ACCESS_RO: u8 = 0x1;
/// `VHOST_ACCESS_WO` from include/uapi/linux/vhost_types.h.
pub const VHOST_ACCESS_WO: u8 = 0x2;
/// `VHOST_ACCESS_RW` from include/uapi/linux/vhost_types.h.
pub const VHOST_ACCESS_RW: u8 = 0x3;

/// One mapping as the device sees it: `size` bytes of IOVA starting at `iova`
/// reach the VMM's virtual memory starting at `host_addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DmaRange {
    /// Device address (guest physical address without a vIOMMU, guest IOVA
    /// behind one).
    pub iova: u64,
    /// Length in bytes; never zero in a valid range.
    pub size: u64,
    /// VMM virtual address backing `iova`.
    pub host_addr: u64,
    pub perm: Perm,
}

impl DmaRange {
    pub fn new(iova: u64, size: u64, host_addr: u64, perm: Perm) -> Self {
        DmaRange {
            iova,
            size,
            host_addr,
            perm,
        }
    }

    /// Last IOVA covered (inclusive), `None` for an empty range or one that
    /// would run past 2^64-1. Inclusive ends keep a range that ends at the top
    /// of the address space representable.
    pub fn last_iova(&self) -> Option<u64> {
        inclusive_last(self.iova, self.size)
    }
}

/// `start + size - 1` without overflow; `None` if `size` is zero or the range
/// does not fit below 2^64.
pub(crate) fn inclusive_last(start: u64, size: u64) -> Option<u64> {
    if size == 0 {
        return None;
    }
    start.checked_add(size - 1)
}

#[cfg(test)]
mod space_tests;
#[cfg(test)]
mod tests;
