//! Direct kernel boot: loads a vmlinux (ELF) or bzImage with linux-loader,
//! places the command line and initramfs, and writes the boot structures the
//! chosen entry expects (PVH start info, or the Linux zero page).

use std::fs::File;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{self, BzImage, KernelLoader, KernelLoaderResult};
use linux_loader::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::config::KernelConfig;
use crate::vstate::memory::{layout, pci_layout, GuestRam, MMIO_HOLE_END};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// The 64-bit entry of a bzImage sits 0x200 past its protected-mode start.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open {what} '{path}': {source}")]
    Open {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("'{0}' is not a Linux kernel (neither an ELF vmlinux nor a bzImage)")]
    NotAKernel(String),
    #[error("cannot load kernel '{path}': {reason}")]
    Load { path: String, reason: String },
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    #[error("initramfs of {size} bytes does not fit in guest memory below {limit:#x} (kernel ends at {kernel_end:#x}); give the guest more memory")]
    InitramfsTooLarge {
        size: u64,
        limit: u64,
        kernel_end: u64,
    },
    #[error("cannot copy the initramfs into guest memory: {0}")]
    InitramfsCopy(String),
    #[error("cannot write boot structures into guest memory: {0}")]
    Structures(String),
}

/// How the boot vCPU must be set up to enter the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// 32-bit protected mode, paging off, %ebx = start info (Xen PVH ABI).
    Pvh { start_info: GuestAddress },
    /// 64-bit long mode with identity paging, %rsi = zero page.
    Linux64 { zero_page: GuestAddress },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootEntry {
    pub entry: GuestAddress,
    pub protocol: BootProtocol,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct E820Entry {
    addr: u64,
    size: u64,
    kind: u32,
}

/// Loads the kernel and everything it needs; returns where to start it.
pub fn load(
    ram: &GuestRam,
    kernel: &KernelConfig,
    rsdp: GuestAddress,
) -> Result<BootEntry, BootError> {
    let loaded = load_kernel_image(ram, &kernel.path)?;
    let cmdline = Cmdline::try_from(&kernel.cmdline, layout::CMDLINE_MAX)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    loader::load_cmdline(&ram.memory, GuestAddress(layout::CMDLINE), &cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_size = kernel.cmdline.len() as u32 + 1;

    let initrd_limit = match &loaded.image {
        LoadedImage::BzImage(hdr) => u64::from(hdr.initrd_addr_max) + 1,
        _ => u64::from(u32::MAX) + 1,
    };
    let initramfs = match &kernel.initramfs {
        Some(path) => Some(load_initramfs(ram, path, loaded.kernel_end, initrd_limit)?),
        None => None,
    };
    let e820 = e820_map(ram);

    match loaded.image {
        LoadedImage::Pvh(entry) => {
            write_pvh_start_info(ram, &e820, rsdp, initramfs)?;
            Ok(BootEntry {
                entry,
                protocol: BootProtocol::Pvh {
                    start_info: GuestAddress(layout::PVH_START_INFO),
                },
            })
        }
        LoadedImage::Elf64(entry) => {
            write_zero_page(ram, None, &e820, rsdp, cmdline_size, initramfs)?;
            Ok(BootEntry {
                entry,
                protocol: BootProtocol::Linux64 {
                    zero_page: GuestAddress(layout::ZERO_PAGE),
                },
            })
        }
        LoadedImage::BzImage(hdr) => {
            write_zero_page(ram, Some(hdr), &e820, rsdp, cmdline_size, initramfs)?;
            Ok(BootEntry {
                entry: loaded.load_addr.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
                protocol: BootProtocol::Linux64 {
                    zero_page: GuestAddress(layout::ZERO_PAGE),
                },
            })
        }
    }
}

enum LoadedImage {
    /// ELF with a PVH note: the entry is the note's 32-bit entry.
    Pvh(GuestAddress),
    /// ELF without a PVH note: its 64-bit entry point.
    Elf64(GuestAddress),
    BzImage(setup_header),
}

struct LoadedKernel {
    image: LoadedImage,
    load_addr: GuestAddress,
    kernel_end: u64,
}

fn load_kernel_image(ram: &GuestRam, path: &Path) -> Result<LoadedKernel, BootError> {
    let display = path.display().to_string();
    let mut file = File::open(path).map_err(|source| BootError::Open {
        what: "kernel",
        path: display.clone(),
        source,
    })?;
    let load_error = |e: loader::Error| BootError::Load {
        path: display.clone(),
        reason: describe_loader_error(&e),
    };
    let himem = Some(GuestAddress(layout::HIMEM_START));
    match Elf::load(&ram.memory, None, &mut file, himem) {
        Ok(result) => {
            let image = match result.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(entry) => LoadedImage::Pvh(entry),
                _ => LoadedImage::Elf64(result.kernel_load),
            };
            return Ok(loaded(image, &result));
        }
        // Not ELF (or too short to be): try the bzImage format next.
        Err(loader::Error::Elf(
            loader::elf::Error::InvalidElfMagicNumber | loader::elf::Error::ReadElfHeader,
        )) => {}
        Err(e) => return Err(load_error(e)),
    }
    match BzImage::load(&ram.memory, None, &mut file, himem) {
        Ok(result) => match result.setup_header {
            Some(hdr) => Ok(loaded(LoadedImage::BzImage(hdr), &result)),
            None => Err(BootError::NotAKernel(display)),
        },
        Err(loader::Error::Bzimage(
            loader::bzimage::Error::InvalidBzImage
            | loader::bzimage::Error::ReadBzImageHeader
            | loader::bzimage::Error::Underflow,
        )) => Err(BootError::NotAKernel(display)),
        Err(e) => Err(load_error(e)),
    }
}

fn loaded(image: LoadedImage, result: &KernelLoaderResult) -> LoadedKernel {
    LoadedKernel {
        image,
        load_addr: result.kernel_load,
        kernel_end: result.kernel_end,
    }
}

fn describe_loader_error(error: &loader::Error) -> String {
    match error {
        loader::Error::MemoryOverflow
        | loader::Error::Elf(loader::elf::Error::ReadKernelImage)
        | loader::Error::Bzimage(loader::bzimage::Error::ReadBzImageCompressedKernel) => {
            "the kernel does not fit in guest memory (or the file is truncated)".to_string()
        }
        other => other.to_string(),
    }
}

/// Copies the initramfs as high as it may go below `limit`, page aligned,
/// and checks that it does not overlap the kernel.
fn load_initramfs(
    ram: &GuestRam,
    path: &Path,
    kernel_end: u64,
    limit: u64,
) -> Result<(GuestAddress, u64), BootError> {
    let mut file = File::open(path).map_err(|source| BootError::Open {
        what: "initramfs",
        path: path.display().to_string(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| BootError::Open {
            what: "initramfs",
            path: path.display().to_string(),
            source,
        })?
        .len();
    let top = ram.low_ram_end().min(limit);
    let start = top
        .checked_sub(size)
        .map(|s| s & !(PAGE_SIZE - 1))
        .filter(|&s| s >= kernel_end.max(layout::HIMEM_START))
        .ok_or(BootError::InitramfsTooLarge {
            size,
            limit: top,
            kernel_end,
        })?;
    ram.memory
        .read_exact_volatile_from(GuestAddress(start), &mut file, size as usize)
        .map_err(|e| BootError::InitramfsCopy(e.to_string()))?;
    Ok((GuestAddress(start), size))
}

/// The guest's view of memory: RAM, except the EBDA/BIOS area where the
/// ACPI tables live and the MMIO hole.
fn e820_map(ram: &GuestRam) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: layout::EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: layout::ACPI_START,
            size: layout::ACPI_END - layout::ACPI_START,
            kind: E820_RESERVED,
        },
        E820Entry {
            addr: layout::HIMEM_START,
            size: ram.low_ram_end() - layout::HIMEM_START,
            kind: E820_RAM,
        },
        // Linux uses ECAM only where the firmware reserved it.
        E820Entry {
            addr: pci_layout::ECAM_START,
            size: pci_layout::ECAM_SIZE,
            kind: E820_RESERVED,
        },
    ];
    for range in ram.ranges.iter().filter(|r| r.start >= MMIO_HOLE_END) {
        map.push(E820Entry {
            addr: range.start,
            size: range.size,
            kind: E820_RAM,
        });
    }
    map
}

fn write_pvh_start_info(
    ram: &GuestRam,
    e820: &[E820Entry],
    rsdp: GuestAddress,
    initramfs: Option<(GuestAddress, u64)>,
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let module = initramfs.map(|(addr, size)| hvm_modlist_entry {
        paddr: addr.raw_value(),
        size,
        ..Default::default()
    });
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: layout::CMDLINE,
        rsdp_paddr: rsdp.raw_value(),
        memmap_paddr: layout::PVH_MEMMAP,
        memmap_entries: memmap.len() as u32,
        nr_modules: u32::from(module.is_some()),
        modlist_paddr: if module.is_some() {
            layout::PVH_MODLIST
        } else {
            0
        },
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(layout::PVH_START_INFO));
    if let Some(module) = module {
        params.set_modules(&[module], GuestAddress(layout::PVH_MODLIST));
    }
    params.set_sections(&memmap, GuestAddress(layout::PVH_MEMMAP));
    PvhBootConfigurator::write_bootparams(&params, &ram.memory)
        .map_err(|e| BootError::Structures(e.to_string()))
}

fn write_zero_page(
    ram: &GuestRam,
    header: Option<setup_header>,
    e820: &[E820Entry],
    rsdp: GuestAddress,
    cmdline_size: u32,
    initramfs: Option<(GuestAddress, u64)>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = layout::CMDLINE as u32;
    params.hdr.cmdline_size = cmdline_size;
    if let Some((addr, size)) = initramfs {
        params.hdr.ramdisk_image = addr.raw_value() as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = rsdp.raw_value();
    for (slot, entry) in params.e820_table.iter_mut().zip(e820) {
        slot.addr = entry.addr;
        slot.size = entry.size;
        slot.r#type = entry.kind;
    }
    params.e820_entries = e820.len() as u8;
    ram.memory
        .write_obj(params, GuestAddress(layout::ZERO_PAGE))
        .map_err(|e| BootError::Structures(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_CMDLINE;
    use std::io::Write;

    fn kernel_config(path: &Path) -> KernelConfig {
        KernelConfig {
            path: path.to_path_buf(),
            initramfs: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
        }
    }

    #[test]
    fn a_file_that_is_not_a_kernel_is_named_as_such() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let file = vmm_sys_util::tempfile::TempFile::new().unwrap();
        file.as_file().write_all(&[0x5a; 8192]).unwrap();
        let error = load(&ram, &kernel_config(file.as_path()), GuestAddress(0)).unwrap_err();
        assert!(matches!(error, BootError::NotAKernel(_)), "{error}");
        assert!(error.to_string().contains("is not a Linux kernel"));
    }

    #[test]
    fn an_empty_file_is_not_a_kernel() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let file = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let error = load(&ram, &kernel_config(file.as_path()), GuestAddress(0)).unwrap_err();
        assert!(matches!(error, BootError::NotAKernel(_)), "{error}");
    }

    #[test]
    fn e820_reserves_acpi_area_and_covers_all_ram() {
        let ram = GuestRam::new(256 << 20).unwrap();
        let map = e820_map(&ram);
        let ram_bytes: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        // Everything but the 384 KiB legacy area between EBDA and 1 MiB.
        assert_eq!(
            ram_bytes,
            (256 << 20) - (layout::HIMEM_START - layout::EBDA_START)
        );
        assert!(map
            .iter()
            .any(|e| e.kind == E820_RESERVED && e.addr == layout::ACPI_START));
    }

    #[test]
    fn initramfs_goes_to_the_top_of_low_memory() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let file = vmm_sys_util::tempfile::TempFile::new().unwrap();
        file.as_file().write_all(&[7u8; 10000]).unwrap();
        let (addr, size) =
            load_initramfs(&ram, file.as_path(), 32 << 20, u64::from(u32::MAX)).unwrap();
        assert_eq!(size, 10000);
        assert_eq!(addr.raw_value() % PAGE_SIZE, 0);
        assert!(addr.raw_value() + size <= 64 << 20);
        assert!(addr.raw_value() + size + PAGE_SIZE > 64 << 20);
        let byte: u8 = ram.memory.read_obj(addr).unwrap();
        assert_eq!(byte, 7);
    }

    #[test]
    fn initramfs_that_would_overlap_the_kernel_is_refused() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let file = vmm_sys_util::tempfile::TempFile::new().unwrap();
        file.as_file().write_all(&vec![0u8; 8 << 20]).unwrap();
        let error =
            load_initramfs(&ram, file.as_path(), 60 << 20, u64::from(u32::MAX)).unwrap_err();
        assert!(matches!(error, BootError::InitramfsTooLarge { .. }));
    }
}
