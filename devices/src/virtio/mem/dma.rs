//! What a guest PLUG or UNPLUG means for DMA: one plan on every address
//! space that reaches the blocks (the identity space, and on unplug the
//! vIOMMU's translated domains too), so each device sees one batch per
//! request, all or nothing across devices and spaces.
//!
//! The VMM keeps only what needs KVM and the memory file ([`HotplugHost`]:
//! the blocks' KVM slots, whether they are RAM, releasing them); the order
//! of the steps and the plans are decided here:
//! - PLUG: KVM slots; then, under the address-space lock, the blocks become
//!   RAM and every identity device maps them. A refusal makes them not RAM
//!   again before the lock is let go (so no vIOMMU MAP, which translates
//!   under that lock, ever saw them as RAM), then the slots go.
//! - UNPLUG: under the address-space lock (and the vIOMMU's, taken after
//!   it), one plan takes the blocks out of the identity space and every
//!   domain mapping into them out of its space; then they stop being RAM
//!   and lose their slots. If KVM refuses, the plan is undone and the
//!   vIOMMU's model never changed. Only then is the memory released.
//!
//! If that release fails, the unplug still stands: the memory is out of
//! every device and no longer guest RAM; only the host keeps the pages.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, MutexGuard};

use super::{HotplugBackend, HotplugError};
use crate::dma::{
    Change, ChangeKind, DmaSpaces, GuestTranslate, Perm, Plan, SharedSpaces, SpaceId,
};
use crate::virtio::iommu::IommuHandle;

/// The VMM's side of memory hotplug: what needs KVM or the memory file.
/// Each call is all or nothing for its ranges (guest address, size).
pub trait HotplugHost: Send + Sync {
    /// Gives each block its KVM slot.
    fn add_slots(&self, ranges: &[(u64, u64)]) -> Result<(), HotplugError>;
    /// Deletes the blocks' KVM slots.
    fn remove_slots(&self, ranges: &[(u64, u64)]) -> Result<(), HotplugError>;
    /// Whether the blocks are guest RAM, as [`GuestTranslate`] answers.
    fn set_ram(&self, ranges: &[(u64, u64)], ram: bool);
    /// Gives the blocks' memory back to the host (no device or guest
    /// reaches it any more).
    fn release(&self, ranges: &[(u64, u64)]) -> Result<(), HotplugError>;
}

/// The [`HotplugBackend`] of the virtio-mem device.
pub struct DmaHotplug {
    host: Box<dyn HotplugHost>,
    translate: Arc<dyn GuestTranslate>,
    spaces: SharedSpaces,
    /// Domains of the vIOMMU may map hotplug memory too.
    iommu: Option<IommuHandle>,
    release_failures: AtomicU64,
}

impl DmaHotplug {
    pub fn new(
        host: Box<dyn HotplugHost>,
        translate: Arc<dyn GuestTranslate>,
        spaces: SharedSpaces,
        iommu: Option<IommuHandle>,
    ) -> Self {
        DmaHotplug {
            host,
            translate,
            spaces,
            iommu,
            release_failures: AtomicU64::new(0),
        }
    }

    /// Gives blocks a snapshot saved as plugged their memory slots again,
    /// in a new VM before it runs: they are RAM and in the identity space
    /// already (both are set up with boot RAM, so each device's IOTLB goes
    /// out in one batch), so no plan is made here.
    pub fn restore_slots(&self, ranges: &[(u64, u64)]) -> Result<(), HotplugError> {
        self.host.add_slots(ranges)
    }

    /// Unplugs whose memory could not be given back to the host.
    pub fn release_failures(&self) -> u64 {
        self.release_failures.load(Ordering::Relaxed)
    }

    fn spaces(&self) -> MutexGuard<'_, DmaSpaces> {
        self.spaces.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Maps `ranges` for every identity device, as one plan; the caller
    /// holds the spaces and made the ranges RAM.
    fn map_identity(
        &self,
        spaces: &mut DmaSpaces,
        ranges: &[(u64, u64)],
    ) -> Result<(), HotplugError> {
        let mut change = Change::new();
        for &(gpa, size) in ranges {
            for range in self.translate.translate(gpa, gpa, size, Perm::ReadWrite)? {
                change.add(range);
            }
        }
        let mut plan = Plan::new(ChangeKind::Plug);
        plan.change(SpaceId::IDENTITY, change);
        spaces.commit(plan)?;
        Ok(())
    }

    /// The unplug's steps that need the address spaces held: one plan out
    /// of every space, then not RAM and no slots; undone whole on failure.
    fn unplug_held(
        &self,
        spaces: &mut DmaSpaces,
        ranges: &[(u64, u64)],
    ) -> Result<(), HotplugError> {
        let mut plan = Plan::new(ChangeKind::Unplug);
        let mut change = Change::new();
        for &(gpa, size) in ranges {
            change.remove(gpa, size);
        }
        plan.change(SpaceId::IDENTITY, change);
        let cut = self
            .iommu
            .as_ref()
            .map(|iommu| iommu.unmap_guest_ranges(ranges, &mut plan));
        let (reports, undo) = match spaces.commit_undoable(plan) {
            Ok(done) => done,
            Err(e) => {
                if let Some(cut) = cut {
                    cut.refused();
                }
                return Err(e.into());
            }
        };
        self.host.set_ram(ranges, false);
        if let Err(e) = self.host.remove_slots(ranges) {
            // The guest keeps the blocks: so do the devices, and the
            // vIOMMU's model never lost them.
            self.host.set_ram(ranges, true);
            if let Err(again) = spaces.commit(undo) {
                eprintln!("microvm: unplug failed and devices lost the memory: {again}");
            }
            if let Some(cut) = cut {
                cut.refused();
            }
            return Err(e);
        }
        if let Some(cut) = cut {
            cut.committed(&reports);
        }
        Ok(())
    }
}

impl HotplugBackend for DmaHotplug {
    fn plug(&self, ranges: &[(u64, u64)]) -> Result<(), HotplugError> {
        // The guest's KVM slots first: if KVM refuses, no device was told.
        self.host.add_slots(ranges)?;
        let result = {
            let mut spaces = self.spaces();
            // RAM only while the spaces are held, so a vIOMMU MAP sees the
            // blocks as RAM only once the plug stands.
            self.host.set_ram(ranges, true);
            let result = self.map_identity(&mut spaces, ranges);
            if result.is_err() {
                self.host.set_ram(ranges, false);
            }
            result
        };
        if result.is_err() {
            if let Err(e) = self.host.remove_slots(ranges) {
                eprintln!("microvm: a failed plug leaves guest memory slots behind: {e}");
            }
        }
        result
    }

    fn unplug(&self, ranges: &[(u64, u64)]) -> Result<(), HotplugError> {
        {
            let mut spaces = self.spaces();
            self.unplug_held(&mut spaces, ranges)?;
        }
        // Only now can neither a device nor the guest reach the memory.
        if let Err(e) = self.host.release(ranges) {
            self.release_failures.fetch_add(1, Ordering::Relaxed);
            eprintln!("microvm: unplugged memory stays allocated on the host: {e}");
        }
        Ok(())
    }

    fn is_ram(&self, gpa: u64, len: u64) -> bool {
        self.translate
            .translate(gpa, gpa, len, Perm::ReadOnly)
            .is_ok()
    }
}
