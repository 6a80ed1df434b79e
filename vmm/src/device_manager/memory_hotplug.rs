//! The VMM's side of memory hotplug: what needs KVM and the memory file.
//! Which spaces and devices a PLUG or UNPLUG reaches, and in what order
//! the steps run, is decided in devices (`virtio::mem::dma`); here each
//! plugged block gets its own KVM slot (`block_slots`), RAM-ness is kept
//! in the guest memory manager, and unplugged memory is released (hole
//! punched in its memfd).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use devices::virtio::mem::dma::HotplugHost;
use devices::virtio::mem::HotplugError;

use crate::vstate::block_slots::{BlockSlots, SlotIoctl};
use crate::vstate::memory::GuestRam;

/// The KVM slots of the plugged blocks.
pub type GuestSlots = BlockSlots<Box<dyn SlotIoctl>>;

pub struct KvmHotplugHost {
    ram: Arc<GuestRam>,
    slots: Mutex<GuestSlots>,
    /// The hotplug region's first guest address and its memfd.
    region_addr: u64,
    file: File,
}

impl KvmHotplugHost {
    pub fn new(ram: Arc<GuestRam>, slots: GuestSlots, region_addr: u64, file: File) -> Self {
        KvmHotplugHost {
            ram,
            slots: Mutex::new(slots),
            region_addr,
            file,
        }
    }

    fn slots(&self) -> MutexGuard<'_, GuestSlots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl HotplugHost for KvmHotplugHost {
    fn add_slots(&self, ranges: &[(u64, u64)]) -> Result<(), HotplugError> {
        self.slots()
            .map(ranges)
            .map_err(|e| HotplugError::Guest(Box::new(e)))
    }

    fn remove_slots(&self, ranges: &[(u64, u64)]) -> Result<(), HotplugError> {
        self.slots()
            .unmap(ranges)
            .map_err(|e| HotplugError::Guest(Box::new(e)))
    }

    fn set_ram(&self, ranges: &[(u64, u64)], ram: bool) {
        for &(gpa, size) in ranges {
            self.ram.set_plugged(gpa, size, ram);
        }
    }

    fn release(&self, ranges: &[(u64, u64)]) -> Result<(), HotplugError> {
        for &(gpa, size) in ranges {
            let failed = |source| HotplugError::Release { gpa, size, source };
            let offset = gpa
                .checked_sub(self.region_addr)
                .and_then(|o| libc::off_t::try_from(o).ok());
            let (Some(offset), Ok(len)) = (offset, libc::off_t::try_from(size)) else {
                return Err(failed(std::io::Error::from_raw_os_error(libc::EINVAL)));
            };
            // SAFETY: fallocate on a memfd we own; punching a hole only drops
            // page contents (reads see zeros), the mapping stays valid.
            let ret = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                )
            };
            if ret != 0 {
                return Err(failed(std::io::Error::last_os_error()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device_manager::lock;
    use crate::vstate::block_slots::fake::RecordingSlots;
    use crate::vstate::block_slots::SlotRegion;
    use devices::dma::{Change, ChangeKind, GuestTranslate, Perm, Plan, SharedSpaces, SpaceId};
    use devices::dma::{DmaMapper, DmaSpaces, RecordingBackend, SharedDmaDevice};
    use devices::virtio::mem::dma::DmaHotplug;
    use devices::virtio::mem::HotplugBackend;
    use std::io::{Read, Seek, SeekFrom};
    use std::sync::Mutex;

    const MIB: u64 = 1 << 20;

    type Recorder = Arc<Mutex<DmaMapper<RecordingBackend>>>;

    /// KVM slots over the region of `ram`, recorded: 32 slots from 1.
    fn slots(ram: &GuestRam) -> (GuestSlots, RecordingSlots) {
        let region = ram.hotplug.as_ref().unwrap();
        let kvm = RecordingSlots::default();
        let slot_region = SlotRegion {
            addr: region.addr,
            size: region.size,
            block_size: region.block_size,
            host_addr: region.host_addr,
        };
        let ioctl: Box<dyn SlotIoctl> = Box::new(kvm.clone());
        (BlockSlots::new(ioctl, slot_region, 1, 32), kvm)
    }

    /// 64 MiB of boot RAM, 64 MiB of hotplug room, and `n` recording
    /// devices attached to the identity space.
    fn setup(n: usize) -> (DmaHotplug, Arc<GuestRam>, SharedSpaces, Vec<Recorder>) {
        let (hotplug, ram, spaces, devices, _) = setup_with_kvm(n);
        (hotplug, ram, spaces, devices)
    }

    fn setup_with_kvm(
        n: usize,
    ) -> (
        DmaHotplug,
        Arc<GuestRam>,
        SharedSpaces,
        Vec<Recorder>,
        RecordingSlots,
    ) {
        let ram = Arc::new(GuestRam::with_hotplug(64 * MIB, Some((64 * MIB, 2 * MIB))).unwrap());
        let mut spaces = DmaSpaces::new();
        let mut boot = Change::new();
        for range in ram.boot_dma_ranges().unwrap() {
            boot.add(range);
        }
        let mut plan = Plan::new(ChangeKind::BootMemory);
        plan.change(SpaceId::IDENTITY, boot);
        let mut devices = Vec::new();
        for i in 0..n {
            let device: Recorder = Arc::new(Mutex::new(DmaMapper::new(
                RecordingBackend::new(),
                0..=u64::MAX,
                true,
            )));
            let shared: SharedDmaDevice = device.clone();
            spaces.register(&format!("net{i}"), shared).unwrap();
            plan.attach(&format!("net{i}"), Some(SpaceId::IDENTITY));
            devices.push(device);
        }
        spaces.commit(plan).unwrap();
        let spaces = spaces.shared();
        let region = ram.hotplug.as_ref().unwrap();
        let (slots, kvm) = slots(&ram);
        let host = KvmHotplugHost::new(
            ram.clone(),
            slots,
            region.addr,
            region.file.try_clone().unwrap(),
        );
        let hotplug = DmaHotplug::new(Box::new(host), ram.clone(), spaces.clone(), None);
        (hotplug, ram, spaces, devices, kvm)
    }

    fn held(device: &Recorder) -> Vec<(u64, u64)> {
        let device = device.lock().unwrap();
        let ranges = device.backend().device_iotlb(0);
        ranges.iter().map(|r| (r.iova, r.size)).collect()
    }

    #[test]
    fn plug_and_unplug_reach_every_device_as_one_batch_each() {
        let (hotplug, ram, spaces, devices) = setup(2);
        let addr = ram.hotplug.as_ref().unwrap().addr;
        hotplug.plug(&[(addr, 4 * MIB)]).unwrap();
        for device in &devices {
            assert_eq!(held(device), vec![(0, 64 * MIB), (addr, 4 * MIB)]);
        }
        hotplug.unplug(&[(addr, 2 * MIB)]).unwrap();
        for device in &devices {
            assert_eq!(held(device), vec![(0, 64 * MIB), (addr + 2 * MIB, 2 * MIB)]);
            let counters = device.lock().unwrap().counters();
            assert_eq!(counters.batch_begin, 3, "boot, plug, unplug");
        }
        let kinds: Vec<ChangeKind> = lock(&spaces).history().iter().map(|t| t.kind).collect();
        assert_eq!(
            kinds,
            vec![ChangeKind::BootMemory, ChangeKind::Plug, ChangeKind::Unplug]
        );
    }

    #[test]
    fn a_refusing_device_fails_the_plug_and_leaves_both_devices_as_before() {
        let (hotplug, ram, spaces, devices) = setup(2);
        let addr = ram.hotplug.as_ref().unwrap().addr;
        // net1 refuses its UPDATE after net0 already took it.
        devices[1].lock().unwrap().backend_mut().fail_nth(2);
        let error = hotplug.plug(&[(addr, 4 * MIB)]).unwrap_err();
        assert!(matches!(error, HotplugError::Map(_)), "{error}");
        for device in &devices {
            assert_eq!(held(device), vec![(0, 64 * MIB)]);
        }
        assert_eq!(
            lock(&spaces).mappings(SpaceId::IDENTITY).unwrap().len(),
            1,
            "the space is as before"
        );
        assert!(
            ram.translate(addr, addr, 4 * MIB, Perm::ReadWrite).is_err(),
            "the memory is not RAM after a failed plug"
        );
        // The next plug goes through on both.
        hotplug.plug(&[(addr, 4 * MIB)]).unwrap();
        for device in &devices {
            assert_eq!(held(device), vec![(0, 64 * MIB), (addr, 4 * MIB)]);
        }
    }

    const BLOCK: u64 = 2 * MIB;

    #[test]
    fn plugged_blocks_get_a_kvm_slot_each_and_lose_it_on_unplug() {
        let (hotplug, ram, _spaces, devices, kvm) = setup_with_kvm(1);
        let region = ram.hotplug.as_ref().unwrap();
        let (addr, host) = (region.addr, region.host_addr);
        hotplug.plug(&[(addr, 2 * BLOCK)]).unwrap();
        assert_eq!(
            kvm.calls(),
            vec![
                (1, addr, BLOCK, host),
                (2, addr + BLOCK, BLOCK, host + BLOCK)
            ]
        );
        kvm.clear();
        hotplug.unplug(&[(addr + BLOCK, BLOCK)]).unwrap();
        assert_eq!(
            kvm.calls(),
            vec![(2, addr + BLOCK, 0, 0)],
            "its own slot only"
        );
        assert_eq!(held(&devices[0]), vec![(0, 64 * MIB), (addr, BLOCK)]);
    }

    #[test]
    fn a_slot_kvm_refuses_fails_the_plug_before_any_device_is_told() {
        let (hotplug, ram, _spaces, devices, kvm) = setup_with_kvm(1);
        let addr = ram.hotplug.as_ref().unwrap().addr;
        kvm.fail_nth(2);
        let error = hotplug.plug(&[(addr, 2 * BLOCK)]).unwrap_err();
        assert!(matches!(error, HotplugError::Guest(_)), "{error}");
        assert!(
            kvm.held().is_empty(),
            "the first block's slot is gone again"
        );
        assert_eq!(
            devices[0].lock().unwrap().counters().batch_begin,
            1,
            "boot only"
        );
        assert!(ram.translate(addr, addr, BLOCK, Perm::ReadWrite).is_err());
        hotplug.plug(&[(addr, 2 * BLOCK)]).unwrap();
        assert_eq!(kvm.held().len(), 2);
    }

    #[test]
    fn a_device_refusing_the_plug_takes_the_new_slots_away_again() {
        let (hotplug, ram, _spaces, devices, kvm) = setup_with_kvm(1);
        let addr = ram.hotplug.as_ref().unwrap().addr;
        devices[0].lock().unwrap().backend_mut().fail_nth(1);
        assert!(hotplug.plug(&[(addr, 2 * BLOCK)]).is_err());
        assert!(kvm.held().is_empty(), "{:?}", kvm.calls());
        assert_eq!(held(&devices[0]), vec![(0, 64 * MIB)]);
    }

    #[test]
    fn unplug_unmaps_devices_then_deletes_slots_then_releases() {
        let (hotplug, ram, _spaces, devices, kvm) = setup_with_kvm(1);
        let region = ram.hotplug.as_ref().unwrap();
        hotplug.plug(&[(region.addr, BLOCK)]).unwrap();
        // SAFETY: test-only write through the region's own live mapping.
        unsafe { std::ptr::write_bytes(region.host_addr as *mut u8, 0xaa, 4096) };
        // A device refusing the unplug: the slot and the memory stay.
        devices[0].lock().unwrap().backend_mut().fail_nth(1);
        assert!(hotplug.unplug(&[(region.addr, BLOCK)]).is_err());
        assert_eq!(kvm.held().len(), 1, "the guest keeps the block");
        // KVM refusing the delete: devices get the block back, nothing is
        // released, the guest's request fails.
        kvm.fail_nth(1);
        let error = hotplug.unplug(&[(region.addr, BLOCK)]).unwrap_err();
        assert!(matches!(error, HotplugError::Guest(_)), "{error}");
        assert_eq!(held(&devices[0]), vec![(0, 64 * MIB), (region.addr, BLOCK)]);
        assert_eq!(kvm.held().len(), 1);
        // SAFETY: reading back through the same live mapping.
        let byte = unsafe { std::ptr::read(region.host_addr as *const u8) };
        assert_eq!(byte, 0xaa, "not released while the guest can reach it");
        // Then it goes through.
        hotplug.unplug(&[(region.addr, BLOCK)]).unwrap();
        assert!(kvm.held().is_empty());
        // SAFETY: as above; the hole reads as zeros.
        let byte = unsafe { std::ptr::read(region.host_addr as *const u8) };
        assert_eq!(byte, 0);
    }

    #[test]
    fn memory_outside_the_region_is_refused_before_anything_is_sent() {
        let (hotplug, _ram, _spaces, devices, kvm) = setup_with_kvm(1);
        let error = hotplug.plug(&[(64 * MIB, 2 * MIB)]).unwrap_err();
        assert!(matches!(error, HotplugError::Guest(_)), "{error}");
        assert_eq!(devices[0].lock().unwrap().counters().batch_begin, 1);
        assert!(kvm.calls().is_empty());
    }

    #[test]
    fn a_failed_release_still_unplugs_everywhere_and_is_counted() {
        let (_, ram, spaces, devices) = setup(1);
        let region = ram.hotplug.as_ref().unwrap();
        // A read-only descriptor: fallocate fails with EBADF.
        let read_only = File::open(format!("/proc/self/fd/{}", region.file.as_raw_fd())).unwrap();
        let host = KvmHotplugHost::new(ram.clone(), slots(&ram).0, region.addr, read_only);
        let hotplug = DmaHotplug::new(Box::new(host), ram.clone(), spaces, None);
        hotplug.plug(&[(region.addr, 2 * MIB)]).unwrap();
        hotplug.unplug(&[(region.addr, 2 * MIB)]).unwrap();
        assert_eq!(hotplug.release_failures(), 1);
        assert_eq!(held(&devices[0]), vec![(0, 64 * MIB)], "out of the device");
        assert!(
            ram.translate(region.addr, region.addr, 2 * MIB, Perm::ReadWrite)
                .is_err(),
            "no longer guest RAM"
        );
    }

    #[test]
    fn released_memory_reads_as_zeros() {
        let (hotplug, ram, _spaces, _devices) = setup(0);
        let region = ram.hotplug.as_ref().unwrap();
        let mut file = region.file.try_clone().unwrap();
        let len = 3 * BLOCK as usize;
        // SAFETY: test-only write through the region's own live mapping,
        // inside its 64 MiB.
        unsafe { std::ptr::write_bytes(region.host_addr as *mut u8, 0xaa, len) };
        hotplug.plug(&[(region.addr, 3 * BLOCK)]).unwrap();
        hotplug.unplug(&[(region.addr + BLOCK, BLOCK)]).unwrap();
        let mut bytes = vec![0u8; len];
        file.seek(SeekFrom::Start(0)).unwrap();
        file.read_exact(&mut bytes).unwrap();
        let block = BLOCK as usize;
        assert!(bytes[..block].iter().all(|b| *b == 0xaa));
        assert!(
            bytes[block..2 * block].iter().all(|b| *b == 0),
            "the unplugged block was released"
        );
        assert!(bytes[2 * block..].iter().all(|b| *b == 0xaa));
    }
}
