//! Guest physical → host translation, as every source of DMA changes needs
//! it. The guest memory manager implements it (one place knows where guest
//! RAM lives); sources only describe guest addresses.

use super::{DmaRange, Perm};

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    /// Empty, or runs past 2^64 - 1.
    #[error("guest range {gpa:#x} size {size:#x} is empty or wraps")]
    Invalid { gpa: u64, size: u64 },
    /// Part of the range is not guest RAM now (MMIO, a hole, hotplug memory
    /// that is not plugged).
    #[error("guest range {gpa:#x} size {size:#x} is not guest RAM")]
    NotRam { gpa: u64, size: u64 },
}

/// Where guest RAM is on the host.
pub trait GuestTranslate: Send + Sync {
    /// The mappings that make `[iova, iova + size)` reach the guest RAM at
    /// `[gpa, gpa + size)` with `perm`: one per host-contiguous piece, in
    /// IOVA order. Refused unless every byte is guest RAM now.
    fn translate(
        &self,
        iova: u64,
        gpa: u64,
        size: u64,
        perm: Perm,
    ) -> Result<Vec<DmaRange>, TranslateError>;
}
