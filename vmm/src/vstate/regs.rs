//! Register state for entering the kernel: the GDT, segment registers and
//! control registers of either PVH's 32-bit protected mode or the Linux
//! 64-bit boot protocol, plus the identity page tables the latter needs.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use crate::boot::loader::{BootEntry, BootProtocol};
use crate::vstate::memory::layout;

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_RESERVED: u64 = 1 << 1;

const PAGE_PRESENT_RW: u64 = 0x3;
const PAGE_2M: u64 = 0x80;
/// Four page directories of 2 MiB pages identity-map the first 4 GiB.
const IDENTITY_MAPPED_GIB: u64 = 4;

/// GDT entries (access/flags in the 0xF0FF layout of bits 40..55).
const GDT_CODE64: u16 = 0xa09b;
const GDT_CODE32: u16 = 0xc09b;
const GDT_DATA: u16 = 0xc093;
const GDT_TSS64: u16 = 0x808b;
const GDT_TSS32: u16 = 0x008b;

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (flags as u64, base as u64, limit as u64);
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// Decodes a GDT entry into the segment KVM loads for selector `index * 8`.
fn segment(entry: u64, index: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let granular = bit(55) == 1;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let present = bit(47);
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if granular {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot write boot page tables or GDT into guest memory: {0}")]
    Write(GuestMemoryError),
}

/// General-purpose registers at the kernel entry.
pub fn boot_regs(boot: &BootEntry) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: boot.entry.0,
        ..Default::default()
    };
    match boot.protocol {
        BootProtocol::Pvh { start_info } => regs.rbx = start_info.0,
        BootProtocol::Linux64 { zero_page } => {
            regs.rsp = layout::BOOT_STACK;
            regs.rbp = layout::BOOT_STACK;
            regs.rsi = zero_page.0;
        }
    }
    regs
}

/// Writes the GDT (and, for 64-bit entry, page tables) and returns the
/// special registers that go with them.
pub fn boot_sregs(
    memory: &GuestMemoryMmap,
    boot: &BootEntry,
    mut sregs: kvm_sregs,
) -> Result<kvm_sregs, RegsError> {
    let long_mode = matches!(boot.protocol, BootProtocol::Linux64 { .. });
    let gdt = if long_mode {
        [
            0,
            gdt_entry(GDT_CODE64, 0, 0xfffff),
            gdt_entry(GDT_DATA, 0, 0xfffff),
            gdt_entry(GDT_TSS64, 0, 0xfffff),
        ]
    } else {
        [
            0,
            gdt_entry(GDT_CODE32, 0, 0xfffff),
            gdt_entry(GDT_DATA, 0, 0xfffff),
            gdt_entry(GDT_TSS32, 0, 0x67),
        ]
    };
    for (i, entry) in gdt.iter().enumerate() {
        memory
            .write_obj(*entry, GuestAddress(layout::GDT + i as u64 * 8))
            .map_err(RegsError::Write)?;
    }
    memory
        .write_obj(0u64, GuestAddress(layout::IDT))
        .map_err(RegsError::Write)?;

    let code = segment(gdt[1], 1);
    let data = segment(gdt[2], 2);
    sregs.gdt.base = layout::GDT;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = layout::IDT;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(gdt[3], 3);

    if long_mode {
        write_identity_page_tables(memory)?;
        sregs.cr3 = layout::PML4;
        sregs.cr4 |= CR4_PAE;
        sregs.cr0 |= CR0_PE | CR0_PG | CR0_ET;
        sregs.efer |= EFER_LME | EFER_LMA;
    } else {
        sregs.cr0 = CR0_PE | CR0_ET;
        sregs.cr4 = 0;
        sregs.efer = 0;
    }
    Ok(sregs)
}

fn write_identity_page_tables(memory: &GuestMemoryMmap) -> Result<(), RegsError> {
    let write = |value: u64, addr: u64| {
        memory
            .write_obj(value, GuestAddress(addr))
            .map_err(RegsError::Write)
    };
    write(layout::PDPT | PAGE_PRESENT_RW, layout::PML4)?;
    for gib in 0..IDENTITY_MAPPED_GIB {
        let pd = layout::PD + gib * 0x1000;
        write(pd | PAGE_PRESENT_RW, layout::PDPT + gib * 8)?;
        for i in 0..512u64 {
            let addr = ((gib * 512 + i) << 21) | PAGE_PRESENT_RW | PAGE_2M;
            write(addr, pd + i * 8)?;
        }
    }
    Ok(())
}

/// x87 and SSE state as after FINIT with default MXCSR.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::GuestRam;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code64 = segment(gdt_entry(GDT_CODE64, 0, 0xfffff), 1);
        assert_eq!(
            (code64.base, code64.limit, code64.selector),
            (0, 0xffff_ffff, 8)
        );
        assert_eq!(
            (code64.l, code64.db, code64.present, code64.s),
            (1, 0, 1, 1)
        );
        let code32 = segment(gdt_entry(GDT_CODE32, 0, 0xfffff), 1);
        assert_eq!((code32.l, code32.db, code32.type_), (0, 1, 0xb));
        let data = segment(gdt_entry(GDT_DATA, 0, 0xfffff), 2);
        assert_eq!((data.type_, data.selector, data.unusable), (3, 16, 0));
    }

    fn entry(protocol: BootProtocol) -> BootEntry {
        BootEntry {
            entry: GuestAddress(0x100_0000),
            protocol,
        }
    }

    #[test]
    fn pvh_entry_is_32_bit_protected_mode_without_paging() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let boot = entry(BootProtocol::Pvh {
            start_info: GuestAddress(layout::PVH_START_INFO),
        });
        let sregs = boot_sregs(&ram.memory, &boot, kvm_sregs::default()).unwrap();
        assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE);
        assert_eq!(sregs.efer, 0);
        assert_eq!(sregs.cs.db, 1);
        let regs = boot_regs(&boot);
        assert_eq!((regs.rip, regs.rbx), (0x100_0000, layout::PVH_START_INFO));
    }

    #[test]
    fn linux64_entry_is_long_mode_with_identity_paging() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let boot = entry(BootProtocol::Linux64 {
            zero_page: GuestAddress(layout::ZERO_PAGE),
        });
        let sregs = boot_sregs(&ram.memory, &boot, kvm_sregs::default()).unwrap();
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_ne!(sregs.cr0 & CR0_PG, 0);
        assert_eq!(sregs.cs.l, 1);
        assert_eq!(boot_regs(&boot).rsi, layout::ZERO_PAGE);
        // 3 GiB + 2 MiB is mapped to itself by the last page directory.
        let pde: u64 = ram
            .memory
            .read_obj(GuestAddress(layout::PD + 3 * 0x1000 + 8))
            .unwrap();
        assert_eq!(pde & !0xfff, (3 << 30) + (2 << 20));
    }
}
