//! KVM memory slots for plugged virtio-mem blocks.
//!
//! The hotplug region has no KVM slot at boot: the guest reaches a block
//! only while it is plugged. Each plugged block gets a slot of its own, of
//! exactly one device block, so plugging or unplugging one block never
//! touches a neighbour the guest is using (slots are never split or
//! merged). Slot numbers come from a free list reserved when the VM is
//! built; a guest access to a block without a slot is an MMIO exit.

use std::collections::BTreeMap;
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;

use crate::vstate::memory::GuestRam;

/// The one ioctl this module needs, so tests can record it.
pub trait SlotIoctl: Send {
    /// Gives KVM slot `slot` as `[gpa, gpa + size)` backed by the host
    /// mapping at `host`; `size` 0 deletes the slot.
    fn set_slot(&self, slot: u32, gpa: u64, size: u64, host: u64) -> Result<(), kvm_ioctls::Error>;
}

impl SlotIoctl for Box<dyn SlotIoctl> {
    fn set_slot(&self, slot: u32, gpa: u64, size: u64, host: u64) -> Result<(), kvm_ioctls::Error> {
        self.as_ref().set_slot(slot, gpa, size, host)
    }
}

/// KVM_SET_USER_MEMORY_REGION on the VM, for the hotplug region of `ram`.
pub struct KvmSlotIoctl {
    vm: Arc<VmFd>,
    /// Keeps the region's mapping alive as long as KVM may use it.
    ram: Arc<GuestRam>,
}

impl KvmSlotIoctl {
    pub fn new(vm: Arc<VmFd>, ram: Arc<GuestRam>) -> KvmSlotIoctl {
        KvmSlotIoctl { vm, ram }
    }
}

impl SlotIoctl for KvmSlotIoctl {
    fn set_slot(&self, slot: u32, gpa: u64, size: u64, host: u64) -> Result<(), kvm_ioctls::Error> {
        let inside = self.ram.hotplug.as_ref().is_some_and(|region| {
            let end = host
                .checked_sub(region.host_addr)
                .and_then(|offset| offset.checked_add(size));
            matches!(end, Some(end) if end <= region.size)
        });
        if size > 0 && !inside {
            return Err(kvm_ioctls::Error::new(libc::EINVAL));
        }
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host,
        };
        // SAFETY: a slot of size > 0 lies inside the hotplug region's
        // mapping (checked above), which `self.ram` keeps alive for as long
        // as this handle — and so the VM's use of the slot — exists; a size
        // of 0 deletes the slot and maps nothing. Slot numbers come from
        // `BlockSlots`' free list, disjoint from the boot RAM slots.
        unsafe { self.vm.set_user_memory_region(region) }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("range {gpa:#x} size {size:#x} is not whole blocks of the hotplug region")]
    Range { gpa: u64, size: u64 },
    #[error("the block at {gpa:#x} already has a KVM slot")]
    Mapped { gpa: u64 },
    #[error("the block at {gpa:#x} has no KVM slot")]
    NotMapped { gpa: u64 },
    #[error("no free KVM memory slot for the block at {gpa:#x}")]
    Exhausted { gpa: u64 },
    #[error("KVM refused slot {slot} for the block at {gpa:#x}: {source}")]
    Kvm {
        slot: u32,
        gpa: u64,
        source: kvm_ioctls::Error,
    },
}

/// The hotplug region as this module sees it.
#[derive(Clone, Copy, Debug)]
pub struct SlotRegion {
    pub addr: u64,
    pub size: u64,
    pub block_size: u64,
    /// The VMM's mapping of the region's first byte.
    pub host_addr: u64,
}

/// Which plugged blocks have which KVM slot.
pub struct BlockSlots<S: SlotIoctl> {
    ioctl: S,
    region: SlotRegion,
    /// Unused slot numbers; the lowest is taken first.
    free: Vec<u32>,
    /// Block index -> slot.
    mapped: BTreeMap<u64, u32>,
}

impl<S: SlotIoctl> BlockSlots<S> {
    /// Slots `first .. first + count` are this region's to use.
    pub fn new(ioctl: S, region: SlotRegion, first: u32, count: u32) -> BlockSlots<S> {
        let end = first.saturating_add(count);
        BlockSlots {
            ioctl,
            region,
            free: (first..end).rev().collect(),
            mapped: BTreeMap::new(),
        }
    }

    /// Blocks that have a slot now.
    pub fn mapped_blocks(&self) -> usize {
        self.mapped.len()
    }

    /// Block indices of the ranges, checked against the region.
    fn blocks(&self, ranges: &[(u64, u64)]) -> Result<Vec<u64>, SlotError> {
        let SlotRegion {
            addr,
            size,
            block_size,
            ..
        } = self.region;
        let mut blocks = Vec::new();
        for &(gpa, len) in ranges {
            let bad = SlotError::Range { gpa, size: len };
            let offset = gpa.checked_sub(addr).ok_or(bad)?;
            let end = offset
                .checked_add(len)
                .ok_or(SlotError::Range { gpa, size: len })?;
            if len == 0 || end > size || offset % block_size != 0 || len % block_size != 0 {
                return Err(SlotError::Range { gpa, size: len });
            }
            blocks.extend(offset / block_size..end / block_size);
        }
        Ok(blocks)
    }

    fn block_gpa(&self, block: u64) -> u64 {
        self.region.addr + block * self.region.block_size
    }

    /// Gives each block of `ranges` its slot; all or nothing.
    pub fn map(&mut self, ranges: &[(u64, u64)]) -> Result<(), SlotError> {
        let blocks = self.blocks(ranges)?;
        if let Some(&block) = blocks.iter().find(|b| self.mapped.contains_key(b)) {
            return Err(SlotError::Mapped {
                gpa: self.block_gpa(block),
            });
        }
        let mut done = Vec::with_capacity(blocks.len());
        for block in blocks {
            if let Err(e) = self.map_block(block) {
                self.undo(&done, false);
                return Err(e);
            }
            done.push(block);
        }
        Ok(())
    }

    /// Deletes the slot of each block of `ranges`; all or nothing.
    pub fn unmap(&mut self, ranges: &[(u64, u64)]) -> Result<(), SlotError> {
        let blocks = self.blocks(ranges)?;
        if let Some(&block) = blocks.iter().find(|b| !self.mapped.contains_key(b)) {
            return Err(SlotError::NotMapped {
                gpa: self.block_gpa(block),
            });
        }
        let mut done = Vec::with_capacity(blocks.len());
        for block in blocks {
            if let Err(e) = self.unmap_block(block) {
                self.undo(&done, true);
                return Err(e);
            }
            done.push(block);
        }
        Ok(())
    }

    fn map_block(&mut self, block: u64) -> Result<(), SlotError> {
        let gpa = self.block_gpa(block);
        let slot = self.free.pop().ok_or(SlotError::Exhausted { gpa })?;
        let offset = block * self.region.block_size;
        let host = self.region.host_addr + offset;
        match self.ioctl.set_slot(slot, gpa, self.region.block_size, host) {
            Ok(()) => {
                self.mapped.insert(block, slot);
                Ok(())
            }
            Err(source) => {
                self.free.push(slot);
                Err(SlotError::Kvm { slot, gpa, source })
            }
        }
    }

    fn unmap_block(&mut self, block: u64) -> Result<(), SlotError> {
        let gpa = self.block_gpa(block);
        let Some(&slot) = self.mapped.get(&block) else {
            return Err(SlotError::NotMapped { gpa });
        };
        self.ioctl
            .set_slot(slot, gpa, 0, 0)
            .map_err(|source| SlotError::Kvm { slot, gpa, source })?;
        self.mapped.remove(&block);
        self.free.push(slot);
        Ok(())
    }

    /// Puts back what a failed request already changed. A failure here is
    /// only logged: the bookkeeping stays true to what KVM holds.
    fn undo(&mut self, blocks: &[u64], remap: bool) {
        for &block in blocks.iter().rev() {
            let result = match remap {
                true => self.map_block(block),
                false => self.unmap_block(block),
            };
            if let Err(e) = result {
                eprintln!("microvm: cannot roll back a KVM slot change: {e}");
            }
        }
    }
}

/// A recording stand-in for KVM, for this module's tests and its users'.
#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use std::sync::Mutex;

    /// (slot, gpa, size, host) per call.
    pub type Call = (u32, u64, u64, u64);

    /// Records every call; fails the calls whose number (from 1) is listed.
    #[derive(Clone, Default)]
    pub struct RecordingSlots {
        pub calls: Arc<Mutex<Vec<Call>>>,
        pub fail: Arc<Mutex<Vec<usize>>>,
    }

    impl SlotIoctl for RecordingSlots {
        fn set_slot(
            &self,
            slot: u32,
            gpa: u64,
            size: u64,
            host: u64,
        ) -> Result<(), kvm_ioctls::Error> {
            let mut calls = self.calls.lock().unwrap();
            calls.push((slot, gpa, size, host));
            match self.fail.lock().unwrap().contains(&calls.len()) {
                true => Err(kvm_ioctls::Error::new(libc::ENOMEM)),
                false => Ok(()),
            }
        }
    }

    impl RecordingSlots {
        pub fn calls(&self) -> Vec<Call> {
            self.calls.lock().unwrap().clone()
        }
        pub fn clear(&self) {
            self.calls.lock().unwrap().clear();
            self.fail.lock().unwrap().clear();
        }
        /// Fails the `n`th call from now.
        pub fn fail_nth(&self, n: usize) {
            let done = self.calls.lock().unwrap().len();
            self.fail.lock().unwrap().push(done + n);
        }
        /// KVM's view after the calls so far: slot -> (gpa, size, host).
        pub fn held(&self) -> BTreeMap<u32, (u64, u64, u64)> {
            let mut held = BTreeMap::new();
            let fail = self.fail.lock().unwrap().clone();
            for (i, (slot, gpa, size, host)) in self.calls().into_iter().enumerate() {
                if fail.contains(&(i + 1)) {
                    continue;
                }
                match size {
                    0 => held.remove(&slot),
                    _ => held.insert(slot, (gpa, size, host)),
                };
            }
            held
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use fake::RecordingSlots as Recorder;

    const MIB: u64 = 1 << 20;
    const BASE: u64 = 4 << 30;
    const HOST: u64 = 0x7f00_0000_0000;
    const BLOCK: u64 = 2 * MIB;

    fn slots(count: u32) -> (BlockSlots<Recorder>, Recorder) {
        let recorder = Recorder::default();
        let region = SlotRegion {
            addr: BASE,
            size: 8 * BLOCK,
            block_size: BLOCK,
            host_addr: HOST,
        };
        (
            BlockSlots::new(recorder.clone(), region, 2, count),
            recorder,
        )
    }

    #[test]
    fn each_plugged_block_gets_one_slot_of_one_block() {
        let (mut slots, kvm) = slots(8);
        slots.map(&[(BASE + 2 * BLOCK, 2 * BLOCK)]).unwrap();
        assert_eq!(
            kvm.calls(),
            vec![
                (2, BASE + 2 * BLOCK, BLOCK, HOST + 2 * BLOCK),
                (3, BASE + 3 * BLOCK, BLOCK, HOST + 3 * BLOCK),
            ]
        );
        assert_eq!(slots.mapped_blocks(), 2);
    }

    #[test]
    fn unplugging_one_block_touches_only_its_own_slot() {
        let (mut slots, kvm) = slots(8);
        slots.map(&[(BASE, 3 * BLOCK)]).unwrap();
        kvm.clear();
        slots.unmap(&[(BASE + BLOCK, BLOCK)]).unwrap();
        assert_eq!(
            kvm.calls(),
            vec![(3, BASE + BLOCK, 0, 0)],
            "one delete only"
        );
        // The freed number is reused by the next plug.
        kvm.clear();
        slots.map(&[(BASE + 5 * BLOCK, BLOCK)]).unwrap();
        assert_eq!(kvm.calls()[0].0, 3);
    }

    #[test]
    fn a_refused_slot_rolls_back_the_slots_of_the_same_request() {
        let (mut slots, kvm) = slots(8);
        slots.map(&[(BASE, BLOCK)]).unwrap();
        // The third block of the next request is refused.
        kvm.fail_nth(3);
        let error = slots
            .map(&[(BASE + 2 * BLOCK, 2 * BLOCK), (BASE + 6 * BLOCK, BLOCK)])
            .unwrap_err();
        assert!(matches!(error, SlotError::Kvm { gpa, .. } if gpa == BASE + 6 * BLOCK));
        assert_eq!(
            kvm.held(),
            BTreeMap::from([(2, (BASE, BLOCK, HOST))]),
            "only the earlier plug stays"
        );
        assert_eq!(slots.mapped_blocks(), 1);
        // Nothing leaked: the request goes through on a second try.
        slots
            .map(&[(BASE + 2 * BLOCK, 2 * BLOCK), (BASE + 6 * BLOCK, BLOCK)])
            .unwrap();
        assert_eq!(kvm.held().len(), 4);
    }

    #[test]
    fn a_refused_delete_puts_back_the_slots_already_deleted() {
        let (mut slots, kvm) = slots(8);
        slots.map(&[(BASE, 2 * BLOCK)]).unwrap();
        kvm.fail_nth(2);
        assert!(slots.unmap(&[(BASE, 2 * BLOCK)]).is_err());
        assert_eq!(kvm.held().len(), 2, "both blocks still reachable");
        assert_eq!(slots.mapped_blocks(), 2);
        slots.unmap(&[(BASE, 2 * BLOCK)]).unwrap();
        assert!(kvm.held().is_empty());
    }

    #[test]
    fn bad_ranges_are_refused_before_any_ioctl() {
        let (mut slots, kvm) = slots(8);
        for range in [
            (BASE - BLOCK, BLOCK),
            (BASE + 1, BLOCK),
            (BASE, BLOCK + 1),
            (BASE, 0),
            (BASE + 7 * BLOCK, 2 * BLOCK),
            (u64::MAX - BLOCK, BLOCK),
            (BASE, u64::MAX),
        ] {
            assert!(
                matches!(slots.map(&[range]), Err(SlotError::Range { .. })),
                "{range:x?}"
            );
        }
        assert!(matches!(
            slots.unmap(&[(BASE, BLOCK)]),
            Err(SlotError::NotMapped { .. })
        ));
        slots.map(&[(BASE, BLOCK)]).unwrap();
        assert!(matches!(
            slots.map(&[(BASE + BLOCK, BLOCK), (BASE, BLOCK)]),
            Err(SlotError::Mapped { gpa }) if gpa == BASE
        ));
        assert_eq!(kvm.calls().len(), 1);
    }

    #[test]
    fn running_out_of_slot_numbers_fails_cleanly() {
        let (mut slots, kvm) = slots(2);
        assert!(matches!(
            slots.map(&[(BASE, 3 * BLOCK)]),
            Err(SlotError::Exhausted { gpa }) if gpa == BASE + 2 * BLOCK
        ));
        assert!(kvm.held().is_empty());
        slots.map(&[(BASE, 2 * BLOCK)]).unwrap();
    }
}
