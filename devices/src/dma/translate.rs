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

/// Guest RAM as a fixed table of `(gpa, size, host)` pieces, for tests and
/// fuzz targets that need a translation without a guest memory manager;
/// anything outside the table is not RAM.
#[cfg(any(test, feature = "test-utils"))]
pub struct TableTranslate(pub &'static [(u64, u64, u64)]);

#[cfg(any(test, feature = "test-utils"))]
impl GuestTranslate for TableTranslate {
    fn translate(
        &self,
        iova: u64,
        gpa: u64,
        size: u64,
        perm: Perm,
    ) -> Result<Vec<DmaRange>, TranslateError> {
        let last = size
            .checked_sub(1)
            .and_then(|s| gpa.checked_add(s))
            .ok_or(TranslateError::Invalid { gpa, size })?;
        let mut ranges = Vec::new();
        let mut at = gpa;
        loop {
            let Some(&(base, len, host)) = self.0.iter().find(|(b, l, _)| at >= *b && at - b < *l)
            else {
                return Err(TranslateError::NotRam { gpa, size });
            };
            let end = (base + len - 1).min(last);
            ranges.push(DmaRange::new(
                iova + (at - gpa),
                end - at + 1,
                host + (at - base),
                perm,
            ));
            if end == last {
                return Ok(ranges);
            }
            at = end + 1;
        }
    }
}
