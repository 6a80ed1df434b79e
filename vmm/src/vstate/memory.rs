//! Guest physical memory: where RAM sits in the guest's address space, and
//! the host memory behind it.
//!
//! All RAM comes from one memfd mapped MAP_SHARED. vhost-vdpa devices that map
//! by virtual address (VDUSE) can only reach file-backed shared memory, and a
//! single file lets later features (hotplug, hole punching) work on offsets.

use std::fs::File;
use std::os::fd::FromRawFd;

use devices::dma::{DmaRange, Perm};
use std::sync::Arc;

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

/// Guest memory and the files behind it.
pub struct GuestRam {
    pub memory: GuestMemoryMmap,
    /// Boot RAM only (the e820 map and the boot DMA mapping).
    pub ranges: Vec<RamRange>,
    pub hotplug: Option<HotplugRegion>,
}

impl GuestRam {
    /// Creates `size` bytes of guest RAM, backed by one shared memfd, and,
    /// with `hotplug` = (size, block), an empty region for virtio-mem.
    pub fn with_hotplug(size: u64, hotplug: Option<(u64, u64)>) -> Result<GuestRam, MemoryError> {
        let mut ram = GuestRam::new(size)?;
        let Some((hotplug_size, block_size)) = hotplug else {
            return Ok(ram);
        };
        let top = ram.ranges.iter().map(RamRange::end).max().unwrap_or(0);
        let addr = top.max(MMIO_HOLE_END).next_multiple_of(HOTPLUG_ALIGN);
        debug_assert_eq!(Some(addr), hotplug_start(size));
        let file = create_memfd("microvm-hotplug-ram")?;
        file.set_len(hotplug_size)
            .map_err(|source| MemoryError::Resize {
                size: hotplug_size,
                source,
            })?;
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
        Ok(ram)
    }

    /// Creates `size` bytes of guest RAM, backed by one shared memfd.
    pub fn new(size: u64) -> Result<GuestRam, MemoryError> {
        let file = create_memfd("microvm-guest-ram")?;
        file.set_len(size)
            .map_err(|source| MemoryError::Resize { size, source })?;
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
            hotplug: None,
        })
    }

    /// Every RAM region as the device sees it without a vIOMMU: IOVA is the
    /// guest physical address, reaching the VMM's mapping of it.
    /// Boot RAM only: hotplug memory is mapped block by block as plugged.
    pub fn dma_ranges(&self) -> Vec<DmaRange> {
        self.memory
            .iter()
            .filter(|region| self.ranges.iter().any(|r| r.start == region.start_addr().0))
            .map(|region| {
                DmaRange::new(
                    region.start_addr().0,
                    region.len(),
                    region.as_ptr() as u64,
                    Perm::ReadWrite,
                )
            })
            .collect()
    }

    /// The highest RAM address below the MMIO hole, exclusive.
    pub fn low_ram_end(&self) -> u64 {
        self.ranges[0].end()
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
}
