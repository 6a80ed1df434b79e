//! Guest physical memory: where RAM sits in the guest's address space, and
//! the host memory behind it.
//!
//! All RAM comes from one memfd mapped MAP_SHARED. vhost-vdpa devices that map
//! by virtual address (VDUSE) can only reach file-backed shared memory, and a
//! single file lets later features (hotplug, hole punching) work on offsets.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use devices::dma::{DmaRange, GuestTranslate, Perm, TranslateError};

use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

/// 32-bit device MMIO lives in [3 GiB, 4 GiB): PCI BARs and ECAM, IOAPIC, LAPIC.
pub const MMIO_HOLE_START: u64 = 3 << 30;
pub const MMIO_HOLE_END: u64 = 4 << 30;

/// Where PCI lives in the guest's physical address space.
pub mod pci_layout {
    /// Window for 32-bit BARs, at the start of the MMIO hole.
    pub const MEM32_START: u64 = super::MMIO_HOLE_START;
    pub const MEM32_SIZE: u64 = 512 << 20;
    /// ECAM for bus 0 (reserved in the e820 map, described by MCFG).
    pub const ECAM_START: u64 = 0xe000_0000;
    pub const ECAM_SIZE: u64 = devices::pci::bus::ECAM_SIZE;
    /// Window for 64-bit BARs: 256 GiB up, far above any RAM or hotplug
    /// area this VMM places, and below the 40 physical address bits that
    /// even emulated CPUs offer.
    pub const MEM64_START: u64 = 256 << 30;
    pub const MEM64_SIZE: u64 = 64 << 30;
}

/// Fixed guest-physical addresses of the boot structures, all in the first
/// MiB, which the e820 map reports as RAM (below EBDA) or reserved.
pub mod layout {
    /// Global descriptor table used to enter protected or long mode.
    pub const GDT: u64 = 0x500;
    /// An empty interrupt descriptor table.
    pub const IDT: u64 = 0x520;
    /// PVH `hvm_start_info`, followed by its memory map and module list.
    pub const PVH_START_INFO: u64 = 0x6000;
    pub const PVH_MODLIST: u64 = 0x6040;
    pub const PVH_MEMMAP: u64 = 0x6100;
    /// Linux boot protocol "zero page" (struct boot_params).
    pub const ZERO_PAGE: u64 = 0x7000;
    /// Stack for the 64-bit Linux boot entry.
    pub const BOOT_STACK: u64 = 0x8ff0;
    /// Identity page tables for the 64-bit entry: PML4, PDPT, 4 PDs (4 GiB).
    pub const PML4: u64 = 0x9000;
    pub const PDPT: u64 = 0xa000;
    pub const PD: u64 = 0xb000;
    /// Kernel command line (x86 COMMAND_LINE_SIZE is 2048).
    pub const CMDLINE: u64 = 0x2_0000;
    pub const CMDLINE_MAX: usize = 0x800;
    /// Extended BIOS data area onwards is not RAM for the guest.
    pub const EBDA_START: u64 = 0x9_fc00;
    /// ACPI tables live here; the RSDP first, where a legacy scan finds it.
    pub const ACPI_START: u64 = 0xe_0000;
    pub const ACPI_END: u64 = 0x10_0000;
    /// Kernels are loaded at or above 1 MiB ("high memory").
    pub const HIMEM_START: u64 = 0x10_0000;
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot create the guest memory file (memfd): {0}")]
    Memfd(std::io::Error),
    #[error("cannot size the guest memory file to {size} bytes: {source}")]
    Resize { size: u64, source: std::io::Error },
    #[error("cannot map guest memory: {0}")]
    Map(vm_memory::mmap::FromRangesError),
}

/// One contiguous range of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRange {
    pub start: u64,
    pub size: u64,
}

impl RamRange {
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.size)
    }
}

/// Splits `size` bytes of RAM around the MMIO hole below 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<RamRange> {
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![RamRange {
        start: 0,
        size: low,
    }];
    if size > low {
        ranges.push(RamRange {
            start: MMIO_HOLE_END,
            size: size - low,
        });
    }
    ranges
}

/// Where the hotplug region starts above `boot` bytes of RAM.
pub fn hotplug_start(boot: u64) -> Option<u64> {
    let top = ram_ranges(boot).last().map_or(0, RamRange::end);
    top.max(MMIO_HOLE_END)
        .checked_next_multiple_of(HOTPLUG_ALIGN)
}

/// The first guest-physical address above all RAM, boot and hotplug;
/// `None` if it does not fit in 64 bits. Everything below it must stay
/// clear of device windows.
pub fn ram_end(boot: u64, hotplug: u64) -> Option<u64> {
    match hotplug {
        0 => ram_ranges(boot).last().map(RamRange::end),
        size => hotplug_start(boot)?.checked_add(size),
    }
}

/// Guest-physical room for memory plugged at run time, with its own memfd
/// so that unplugged blocks can be released (hole punched).
pub struct HotplugRegion {
    pub addr: u64,
    pub size: u64,
    pub block_size: u64,
    pub file: File,
    /// The VMM's mapping of the region's first byte.
    pub host_addr: u64,
}

/// Hotplug regions start on a 1 GiB boundary above all boot RAM.
const HOTPLUG_ALIGN: u64 = 1 << 30;

/// Guest memory and the files behind it: the one place that knows which
/// guest physical addresses are RAM now and where they live on the host.
pub struct GuestRam {
    pub memory: GuestMemoryMmap,
    /// Boot RAM only (the e820 map and the boot DMA mapping).
    pub ranges: Vec<RamRange>,
    /// The memfd behind boot RAM, its ranges one after the other (what a
    /// live update hands over).
    pub boot_file: File,
    pub hotplug: Option<HotplugRegion>,
    /// Plugged parts of the hotplug region: start -> end (exclusive),
    /// disjoint and merged.
    plugged: Mutex<BTreeMap<u64, u64>>,
}

impl GuestRam {
    /// Creates `size` bytes of guest RAM, backed by one shared memfd, and,
    /// with `hotplug` = (size, block), an empty region for virtio-mem.
    pub fn with_hotplug(size: u64, hotplug: Option<(u64, u64)>) -> Result<GuestRam, MemoryError> {
        let ram = GuestRam::new(size)?;
        match hotplug {
            None => Ok(ram),
            Some((hotplug_size, block_size)) => {
                let file = create_memfd("microvm-hotplug-ram")?;
                file.set_len(hotplug_size)
                    .map_err(|source| MemoryError::Resize {
                        size: hotplug_size,
                        source,
                    })?;
                ram.with_hotplug_file(hotplug_size, block_size, file)
            }
        }
    }

    /// Adds a hotplug region of `hotplug_size` bytes in blocks of
    /// `block_size` over `file`, which holds it (a new memfd, or the one a
    /// live update handed over).
    pub fn with_hotplug_file(
        mut self,
        hotplug_size: u64,
        block_size: u64,
        file: File,
    ) -> Result<GuestRam, MemoryError> {
        let ram = &mut self;
        let length = file.metadata().map_err(MemoryError::Memfd)?.len();
        if length < hotplug_size {
            return Err(MemoryError::Resize {
                size: hotplug_size,
                source: std::io::Error::other(format!("the file holds only {length} bytes")),
            });
        }
        let top = ram.ranges.iter().map(RamRange::end).max().unwrap_or(0);
        let addr = top.max(MMIO_HOLE_END).next_multiple_of(HOTPLUG_ALIGN);
        let region = GuestRegionMmap::from_range(
            GuestAddress(addr),
            hotplug_size as usize,
            Some(FileOffset::new(
                file.try_clone().map_err(MemoryError::Memfd)?,
                0,
            )),
        )
        .map_err(MemoryError::Map)?;
        let host_addr = region.as_ptr() as u64;
        ram.memory = ram
            .memory
            .insert_region(Arc::new(region))
            .map_err(|e| MemoryError::Map(e.into()))?;
        ram.hotplug = Some(HotplugRegion {
            addr,
            size: hotplug_size,
            block_size,
            file,
            host_addr,
        });
        Ok(self)
    }

    /// Creates `size` bytes of guest RAM, backed by one shared memfd.
    pub fn new(size: u64) -> Result<GuestRam, MemoryError> {
        let file = create_memfd("microvm-guest-ram")?;
        file.set_len(size)
            .map_err(|source| MemoryError::Resize { size, source })?;
        GuestRam::from_file(file, size)
    }

    /// Guest RAM of `size` bytes over `file`, which holds it already (a
    /// live update hands the memfd over: nothing is copied). The file must
    /// be at least `size` bytes long.
    pub fn from_file(file: File, size: u64) -> Result<GuestRam, MemoryError> {
        let length = file.metadata().map_err(MemoryError::Memfd)?.len();
        if length < size {
            return Err(MemoryError::Resize {
                size,
                source: std::io::Error::other(format!("the file holds only {length} bytes")),
            });
        }
        let ranges = ram_ranges(size);
        let mut offset = 0;
        let mut regions = Vec::with_capacity(ranges.len());
        for range in &ranges {
            let file = file.try_clone().map_err(MemoryError::Memfd)?;
            regions.push((
                GuestAddress(range.start),
                range.size as usize,
                Some(FileOffset::new(file, offset)),
            ));
            offset += range.size;
        }
        let memory = GuestMemoryMmap::from_ranges_with_files(regions).map_err(MemoryError::Map)?;
        Ok(GuestRam {
            memory,
            ranges,
            boot_file: file,
            hotplug: None,
            plugged: Mutex::new(BTreeMap::new()),
        })
    }

    /// Boot RAM as a device reaches it without a vIOMMU: IOVA = guest
    /// physical address. Hotplug memory joins block by block as plugged.
    pub fn boot_dma_ranges(&self) -> Result<Vec<DmaRange>, TranslateError> {
        let mut out = Vec::new();
        for range in &self.ranges {
            out.extend(self.translate(range.start, range.start, range.size, Perm::ReadWrite)?);
        }
        Ok(out)
    }

    fn lock_plugged(&self) -> MutexGuard<'_, BTreeMap<u64, u64>> {
        self.plugged.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks `[gpa, gpa + size)` of the hotplug region as RAM (plugged) or
    /// not. Parts outside the region are ignored.
    pub fn set_plugged(&self, gpa: u64, size: u64, plugged: bool) {
        let Some(region) = &self.hotplug else {
            return;
        };
        let start = gpa.max(region.addr);
        let end = gpa
            .saturating_add(size)
            .min(region.addr.saturating_add(region.size));
        if start >= end {
            return;
        }
        let mut set = self.lock_plugged();
        // Cut [start, end) out, keeping what lies outside it.
        let touching: Vec<(u64, u64)> = set
            .range(..=end)
            .filter(|(_, e)| **e >= start)
            .map(|(s, e)| (*s, *e))
            .collect();
        let (mut merged_start, mut merged_end) = (start, end);
        for (s, e) in touching {
            set.remove(&s);
            if plugged {
                merged_start = merged_start.min(s);
                merged_end = merged_end.max(e);
            } else {
                if s < start {
                    set.insert(s, start);
                }
                if e > end {
                    set.insert(end, e);
                }
            }
        }
        if plugged {
            set.insert(merged_start, merged_end);
        }
    }

    /// Whether every byte of `[start, end)` is guest RAM now.
    fn is_ram(&self, start: u64, end: u64) -> bool {
        let plugged = self.lock_plugged();
        let mut ram: Vec<(u64, u64)> = self.ranges.iter().map(|r| (r.start, r.end())).collect();
        ram.extend(plugged.iter().map(|(s, e)| (*s, *e)));
        ram.sort_unstable();
        let mut cursor = start;
        for (s, e) in ram {
            if s > cursor {
                break;
            }
            if e > cursor {
                cursor = e;
            }
            if cursor >= end {
                return true;
            }
        }
        cursor >= end
    }

    /// The highest RAM address below the MMIO hole, exclusive.
    pub fn low_ram_end(&self) -> u64 {
        self.ranges[0].end()
    }
}

impl GuestTranslate for GuestRam {
    fn translate(
        &self,
        iova: u64,
        gpa: u64,
        size: u64,
        perm: Perm,
    ) -> Result<Vec<DmaRange>, TranslateError> {
        let invalid = TranslateError::Invalid { gpa, size };
        let end = gpa.checked_add(size).filter(|_| size > 0).ok_or(invalid)?;
        iova.checked_add(size - 1).ok_or(invalid)?;
        if !self.is_ram(gpa, end) {
            return Err(TranslateError::NotRam { gpa, size });
        }
        let mut out: Vec<DmaRange> = Vec::new();
        let mut cursor = gpa;
        while cursor < end {
            let not_ram = TranslateError::NotRam { gpa, size };
            let region = self
                .memory
                .find_region(GuestAddress(cursor))
                .ok_or(not_ram)?;
            let offset = cursor - region.start_addr().0;
            let piece = (region.len() - offset).min(end - cursor);
            let host = region.as_ptr() as u64 + offset;
            let at = iova + (cursor - gpa);
            match out.last_mut() {
                Some(prev) if prev.host_addr + prev.size == host => prev.size += piece,
                _ => out.push(DmaRange::new(at, piece, host, perm)),
            }
            cursor += piece;
        }
        Ok(out)
    }
}

fn create_memfd(name: &str) -> Result<File, MemoryError> {
    let name = std::ffi::CString::new(name).expect("static name has no NUL");
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call;
    // memfd_create has no other memory arguments.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn small_memory_is_one_low_range() {
        assert_eq!(
            ram_ranges(512 << 20),
            vec![RamRange {
                start: 0,
                size: 512 << 20
            }]
        );
    }

    #[test]
    fn large_memory_skips_the_mmio_hole() {
        let ranges = ram_ranges(5 << 30);
        assert_eq!(ranges.len(), 2);
        assert_eq!(ranges[0].end(), MMIO_HOLE_START);
        assert_eq!(ranges[1].start, MMIO_HOLE_END);
        assert_eq!(ranges[0].size + ranges[1].size, 5 << 30);
    }

    #[test]
    fn guest_ram_is_shared_file_memory() {
        let ram = GuestRam::new(64 << 20).unwrap();
        ram.memory
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        let value: u32 = ram.memory.read_obj(GuestAddress(0x1000)).unwrap();
        assert_eq!(value, 0xdead_beef);
        let region = ram.memory.iter().next().unwrap();
        assert!(region.file_offset().is_some(), "RAM must be file-backed");
        assert_eq!(
            region.flags() & libc::MAP_SHARED,
            libc::MAP_SHARED,
            "RAM must be mapped shared"
        );
    }

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn rw(ram: &GuestRam, gpa: u64, size: u64) -> Result<Vec<DmaRange>, TranslateError> {
        ram.translate(gpa, gpa, size, Perm::ReadWrite)
    }

    #[test]
    fn boot_ram_translates_to_its_mapping() {
        let ram = GuestRam::new(64 * MIB).unwrap();
        let host = ram.memory.iter().next().unwrap().as_ptr() as u64;
        assert_eq!(
            rw(&ram, 0x1000, 0x2000).unwrap(),
            vec![DmaRange::new(
                0x1000,
                0x2000,
                host + 0x1000,
                Perm::ReadWrite
            )]
        );
        // IOVA and GPA differ behind a vIOMMU.
        assert_eq!(
            ram.translate(0xfff0_0000, 0x1000, 0x1000, Perm::ReadOnly)
                .unwrap(),
            vec![DmaRange::new(
                0xfff0_0000,
                0x1000,
                host + 0x1000,
                Perm::ReadOnly
            )]
        );
        assert_eq!(ram.boot_dma_ranges().unwrap().len(), 1);
    }

    #[test]
    fn what_is_not_ram_is_refused() {
        let ram = GuestRam::new(64 * MIB).unwrap();
        let not_ram = |gpa, size| Err(TranslateError::NotRam { gpa, size });
        assert_eq!(rw(&ram, 64 * MIB, 0x1000), not_ram(64 * MIB, 0x1000));
        assert_eq!(
            rw(&ram, 64 * MIB - 0x1000, 0x2000),
            not_ram(64 * MIB - 0x1000, 0x2000)
        );
        assert_eq!(
            rw(&ram, MMIO_HOLE_START, 0x1000),
            not_ram(MMIO_HOLE_START, 0x1000)
        );
        assert_eq!(
            rw(&ram, 0, 0),
            Err(TranslateError::Invalid { gpa: 0, size: 0 })
        );
        assert_eq!(
            rw(&ram, u64::MAX, 2),
            Err(TranslateError::Invalid {
                gpa: u64::MAX,
                size: 2
            })
        );
    }

    #[test]
    fn hotplug_memory_is_ram_only_while_plugged() {
        let ram = GuestRam::with_hotplug(64 * MIB, Some((GIB, 2 * MIB))).unwrap();
        let region = ram.hotplug.as_ref().unwrap();
        let (addr, host) = (region.addr, region.host_addr);
        assert!(rw(&ram, addr, 4 * MIB).is_err(), "not plugged yet");
        ram.set_plugged(addr, 4 * MIB, true);
        assert_eq!(
            rw(&ram, addr, 4 * MIB).unwrap(),
            vec![DmaRange::new(addr, 4 * MIB, host, Perm::ReadWrite)]
        );
        assert!(rw(&ram, addr, 6 * MIB).is_err(), "only 4 MiB plugged");
        ram.set_plugged(addr + 4 * MIB, 2 * MIB, true);
        assert!(rw(&ram, addr, 6 * MIB).is_ok(), "adjacent plugs merge");
        ram.set_plugged(addr + 2 * MIB, 2 * MIB, false);
        assert!(rw(&ram, addr, 2 * MIB).is_ok());
        assert!(rw(&ram, addr + 2 * MIB, 2 * MIB).is_err(), "unplugged");
        assert!(rw(&ram, addr + 4 * MIB, 2 * MIB).is_ok());
        assert_eq!(ram.boot_dma_ranges().unwrap().len(), 1, "boot RAM only");
    }

    #[test]
    fn ranges_split_where_host_memory_is_not_contiguous() {
        // 5 GiB: [4 GiB, 6 GiB) high RAM, and hotplug right above at 6 GiB,
        // guest-contiguous but in another mapping.
        let ram = GuestRam::with_hotplug(5 * GIB, Some((GIB, 2 * MIB))).unwrap();
        let region = ram.hotplug.as_ref().unwrap();
        assert_eq!(region.addr, 6 * GIB);
        ram.set_plugged(6 * GIB, 2 * MIB, true);
        let pieces = rw(&ram, 6 * GIB - 2 * MIB, 4 * MIB).unwrap();
        assert_eq!(pieces.len(), 2);
        assert_eq!(pieces[0].iova, 6 * GIB - 2 * MIB);
        assert_eq!(pieces[1].iova, 6 * GIB);
        assert_eq!(pieces[1].host_addr, region.host_addr);
    }
}
