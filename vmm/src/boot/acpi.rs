//! ACPI tables for a hardware-reduced platform: RSDP, XSDT, FADT, DSDT, MADT.
//!
//! Hardware-reduced means no PM timer, no GPE blocks and no legacy PIC: the
//! guest powers off through the FADT sleep control register and resets
//! through the FADT reset register, both served by `devices::legacy::AcpiPm`.
//! Linux drops the 8259 PIC on such platforms, so every legacy IRQ we use
//! must be routed explicitly with an interrupt source override.

use acpi_tables::{aml, fadt, gas, mcfg::MCFG, rsdp::Rsdp, sdt::Sdt, xsdt::XSDT, Aml};
use devices::legacy::{AcpiPm, SERIAL_COM1_BASE, SERIAL_COM1_IRQ};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::vstate::memory::{layout, pci_layout};

const OEM_ID: [u8; 6] = *b"MICRVM";
const OEM_TABLE_ID: [u8; 8] = *b"MICROVM ";
const OEM_REVISION: u32 = 1;

pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Sleep type value of \_S5 that the sleep control register must receive.
pub const S5_SLEEP_TYPE: u8 = 5;

/// IA-PC boot architecture flags: no VGA, no CMOS RTC (time comes from kvm-clock).
const IAPC_BOOT_ARCH_NO_VGA: u16 = 1 << 2;
const IAPC_BOOT_ARCH_NO_CMOS_RTC: u16 = 1 << 5;

const MADT_LOCAL_APIC: u8 = 0;
const MADT_IO_APIC: u8 = 1;
const MADT_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
const MADT_ENABLED: u32 = 1;
/// ISA interrupts: edge triggered, active high.
const MPS_INTI_EDGE_HIGH: u16 = 0b0101;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables ({size} bytes) do not fit in the reserved area of {room} bytes")]
    TooLarge { size: usize, room: u64 },
    #[error("cannot write ACPI tables into guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
}

/// Writes the tables for `vcpus` CPUs into guest memory, followed by
/// `device_tables` (whole tables the device manager built to describe its
/// devices, such as the VIOT); returns the RSDP address.
pub fn write_tables(
    memory: &GuestMemoryMmap,
    vcpus: u8,
    device_tables: &[Vec<u8>],
) -> Result<GuestAddress, AcpiError> {
    let mut writer = TableWriter::new(memory);
    let rsdp_addr = writer.reserve(Rsdp::len());
    let dsdt = writer.write(&dsdt())?;
    let fadt = writer.write(&fadt(dsdt))?;
    let madt = writer.write(&madt(vcpus))?;
    let mcfg = writer.write(&mcfg())?;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt);
    xsdt.add_entry(madt);
    xsdt.add_entry(mcfg);
    for table in device_tables {
        let addr = writer.reserve(table.len());
        writer.write_bytes(addr, table)?;
        xsdt.add_entry(addr);
    }
    let xsdt = writer.write(&xsdt)?;
    writer.write_at(rsdp_addr, &Rsdp::new(OEM_ID, xsdt))?;
    Ok(GuestAddress(rsdp_addr))
}

/// Lays tables out one after another in the reserved ACPI area.
struct TableWriter<'a> {
    memory: &'a GuestMemoryMmap,
    next: u64,
}

impl<'a> TableWriter<'a> {
    fn new(memory: &'a GuestMemoryMmap) -> Self {
        TableWriter {
            memory,
            next: layout::ACPI_START,
        }
    }

    fn reserve(&mut self, len: usize) -> u64 {
        let addr = self.next;
        // Tables are 8-byte aligned so 64-bit fields are naturally aligned.
        self.next = (addr + len as u64 + 7) & !7;
        addr
    }

    fn write(&mut self, table: &dyn Aml) -> Result<u64, AcpiError> {
        let bytes = to_bytes(table);
        let addr = self.reserve(bytes.len());
        self.write_bytes(addr, &bytes)?;
        Ok(addr)
    }

    fn write_at(&mut self, addr: u64, table: &dyn Aml) -> Result<(), AcpiError> {
        self.write_bytes(addr, &to_bytes(table))
    }

    fn write_bytes(&self, addr: u64, bytes: &[u8]) -> Result<(), AcpiError> {
        let room = layout::ACPI_END - layout::ACPI_START;
        if addr + bytes.len() as u64 > layout::ACPI_END {
            return Err(AcpiError::TooLarge {
                size: (addr - layout::ACPI_START) as usize + bytes.len(),
                room,
            });
        }
        self.memory
            .write_slice(bytes, GuestAddress(addr))
            .map_err(AcpiError::Write)
    }
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

fn dsdt() -> Sdt {
    let s5 = aml::Name::new("_S5_".into(), &aml::Package::new(vec![&S5_SLEEP_TYPE]));
    // COM1, so kernels with ACPI PNP bind the 8250 with its IRQ from here.
    let com1_io = aml::IO::new(SERIAL_COM1_BASE, SERIAL_COM1_BASE, 1, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, SERIAL_COM1_IRQ);
    let com1_resources = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let crs = aml::Name::new("_CRS".into(), &com1_resources);
    let com1 = aml::Device::new("_SB_.COM1".into(), vec![&hid, &uid, &crs]);
    let mut body = Vec::new();
    s5.to_aml_bytes(&mut body);
    com1.to_aml_bytes(&mut body);
    pci_host_bridge(&mut body);
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&body);
    dsdt
}

/// PCI0: segment 0, bus 0, config through 0xCF8 (and ECAM via MCFG), and
/// the two BAR windows the VMM allocates from.
fn pci_host_bridge(body: &mut Vec<u8>) {
    let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let config_io = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let mem32 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        pci_layout::MEM32_START as u32,
        (pci_layout::MEM32_START + pci_layout::MEM32_SIZE - 1) as u32,
        None,
    );
    let mem64 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::PreFetchable,
        true,
        pci_layout::MEM64_START,
        pci_layout::MEM64_START + pci_layout::MEM64_SIZE - 1,
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&bus, &config_io, &mem32, &mem64]);
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08"));
    let cid = aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03"));
    let adr = aml::Name::new("_ADR".into(), &aml::ZERO);
    let seg = aml::Name::new("_SEG".into(), &aml::ZERO);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
    let crs = aml::Name::new("_CRS".into(), &crs);
    aml::Device::new(
        "_SB_.PCI0".into(),
        vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs],
    )
    .to_aml_bytes(body);
}

fn mcfg() -> MCFG {
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(pci_layout::ECAM_START, 0, 0, 0);
    mcfg
}

fn io_register(port: u16) -> gas::GAS {
    gas::GAS::new(
        gas::AddressSpace::SystemIo,
        8,
        0,
        gas::AccessSize::ByteAccess,
        u64::from(port),
    )
}

fn fadt(dsdt: u64) -> fadt::FADT {
    let mut builder = fadt::FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt)
        .flag(fadt::Flags::HwReducedAcpi)
        .flag(fadt::Flags::ResetRegSup)
        .flag(fadt::Flags::PwrButton)
        .flag(fadt::Flags::SlpButton);
    builder.iapc_boot_arch = (IAPC_BOOT_ARCH_NO_VGA | IAPC_BOOT_ARCH_NO_CMOS_RTC).into();
    builder.reset_reg = io_register(AcpiPm::RESET_PORT);
    builder.reset_value = AcpiPm::RESET_VALUE;
    builder.sleep_control_reg = io_register(AcpiPm::SLEEP_CONTROL_PORT);
    builder.sleep_status_reg = io_register(AcpiPm::SLEEP_STATUS_PORT);
    builder.hypervisor_vendor_identity = u64::from_le_bytes(*b"MICROVM ").into();
    builder.finalize()
}

/// The MADT, written by hand: the crate's MADT cannot express interrupt
/// source overrides, which this platform needs (see the module comment).
fn madt(vcpus: u8) -> Sdt {
    let mut madt = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    madt.write_u32(36, LAPIC_ADDR);
    madt.write_u32(40, 0); // no PCAT_COMPAT: there is no 8259 for the guest to use
    for id in 0..vcpus {
        let mut entry = vec![MADT_LOCAL_APIC, 8, id, id];
        entry.extend_from_slice(&MADT_ENABLED.to_le_bytes());
        madt.append_slice(&entry);
    }
    let mut ioapic = vec![MADT_IO_APIC, 12, 0, 0];
    ioapic.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    madt.append_slice(&ioapic);
    madt.append_slice(&interrupt_source_override(SERIAL_COM1_IRQ));
    madt
}

/// VIOT header: node count, offset of the first node, reserved.
const VIOT_HEADER_LEN: u32 = 48;
const VIOT_NODE_PCI_RANGE: u8 = 1;
const VIOT_NODE_VIRTIO_IOMMU_PCI: u8 = 3;
const VIOT_PCI_RANGE_LEN: u16 = 24;
const VIOT_VIRTIO_IOMMU_PCI_LEN: u16 = 16;

/// The VIOT (Virtual I/O Translation table, revision 0): a virtio-iommu
/// on PCI segment 0 at `iommu_bdf`, translating the PCI functions at
/// `endpoints` (BDFs on segment 0). Each endpoint gets a one-function PCI
/// range node whose endpoint ID is its BDF, the ID the guest then uses in
/// ATTACH and PROBE. Written by hand: the crate's VIOT says revision 1.
/// The bytes go to `write_tables` as one of the device tables.
pub fn viot(iommu_bdf: u16, endpoints: &[u16]) -> Vec<u8> {
    let mut viot = Sdt::new(
        *b"VIOT",
        VIOT_HEADER_LEN,
        0,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    // The IOMMU node first, then one node per endpoint.
    let nodes = u16::try_from(endpoints.len().saturating_add(1)).unwrap_or(u16::MAX);
    let iommu_node = VIOT_HEADER_LEN as u16;
    viot.write_u16(36, nodes);
    viot.write_u16(38, iommu_node);
    let mut iommu = vec![VIOT_NODE_VIRTIO_IOMMU_PCI, 0];
    iommu.extend_from_slice(&VIOT_VIRTIO_IOMMU_PCI_LEN.to_le_bytes());
    iommu.extend_from_slice(&0u16.to_le_bytes()); // segment
    iommu.extend_from_slice(&iommu_bdf.to_le_bytes());
    iommu.extend_from_slice(&[0; 8]);
    viot.append_slice(&iommu);
    for bdf in endpoints.iter().take(usize::from(nodes) - 1) {
        let mut range = vec![VIOT_NODE_PCI_RANGE, 0];
        range.extend_from_slice(&VIOT_PCI_RANGE_LEN.to_le_bytes());
        range.extend_from_slice(&u32::from(*bdf).to_le_bytes()); // endpoint start
        range.extend_from_slice(&0u16.to_le_bytes()); // segment start
        range.extend_from_slice(&0u16.to_le_bytes()); // segment end
        range.extend_from_slice(&bdf.to_le_bytes()); // BDF start
        range.extend_from_slice(&bdf.to_le_bytes()); // BDF end
        range.extend_from_slice(&iommu_node.to_le_bytes()); // output node
        range.extend_from_slice(&[0; 6]);
        viot.append_slice(&range);
    }
    viot.as_slice().to_vec()
}

/// Routes ISA IRQ `irq` to the IOAPIC pin of the same number, edge/high.
fn interrupt_source_override(irq: u32) -> Vec<u8> {
    let mut iso = vec![MADT_INTERRUPT_SOURCE_OVERRIDE, 10, 0, irq as u8];
    iso.extend_from_slice(&irq.to_le_bytes()); // GSI == ISA IRQ
    iso.extend_from_slice(&MPS_INTI_EDGE_HIGH.to_le_bytes());
    iso
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::GuestRam;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)) == 0
    }

    fn read_table(memory: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let len: u32 = memory.read_obj(GuestAddress(addr + 4)).unwrap();
        let mut bytes = vec![0u8; len as usize];
        memory.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
        bytes
    }

    #[test]
    fn tables_chain_from_rsdp_with_valid_checksums() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let rsdp = write_tables(&ram.memory, 4, &[]).unwrap();
        assert_eq!(rsdp.0, layout::ACPI_START);
        let mut rsdp_bytes = [0u8; 36];
        ram.memory.read_slice(&mut rsdp_bytes, rsdp).unwrap();
        assert_eq!(&rsdp_bytes[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp_bytes[..20]) && checksum_ok(&rsdp_bytes));
        let xsdt_addr = u64::from_le_bytes(rsdp_bytes[24..32].try_into().unwrap());
        let xsdt = read_table(&ram.memory, xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(checksum_ok(&xsdt));
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let signatures: Vec<Vec<u8>> = entries
            .iter()
            .map(|&a| {
                let table = read_table(&ram.memory, a);
                assert!(checksum_ok(&table), "bad checksum at {a:#x}");
                table[..4].to_vec()
            })
            .collect();
        assert_eq!(
            signatures,
            vec![b"FACP".to_vec(), b"APIC".to_vec(), b"MCFG".to_vec()]
        );
    }

    #[test]
    fn madt_lists_every_vcpu_the_ioapic_and_the_serial_override() {
        let madt = madt(3);
        let bytes = madt.as_slice();
        assert!(checksum_ok(bytes));
        let mut lapics = Vec::new();
        let mut overrides = Vec::new();
        let mut ioapics = 0;
        let mut offset = 44;
        while offset < bytes.len() {
            let (kind, len) = (bytes[offset], bytes[offset + 1] as usize);
            match kind {
                MADT_LOCAL_APIC => lapics.push(bytes[offset + 3]),
                MADT_IO_APIC => ioapics += 1,
                MADT_INTERRUPT_SOURCE_OVERRIDE => overrides.push(bytes[offset + 3]),
                other => panic!("unexpected MADT entry {other}"),
            }
            offset += len;
        }
        assert_eq!(lapics, vec![0, 1, 2]);
        assert_eq!(ioapics, 1);
        assert_eq!(overrides, vec![SERIAL_COM1_IRQ as u8]);
    }

    #[test]
    fn fadt_is_hardware_reduced_with_sleep_and_reset_registers() {
        let bytes = to_bytes(&fadt(0x1234));
        assert_eq!(&bytes[..4], b"FACP");
        assert!(checksum_ok(&bytes));
        let flags = u32::from_le_bytes(bytes[112..116].try_into().unwrap());
        assert_ne!(flags & fadt::Flags::HwReducedAcpi as u32, 0);
        assert_ne!(flags & fadt::Flags::ResetRegSup as u32, 0);
        // X_DSDT at offset 140.
        assert_eq!(
            u64::from_le_bytes(bytes[140..148].try_into().unwrap()),
            0x1234
        );
        // SLEEP_CONTROL_REG (GAS at 244): system I/O at our port.
        assert_eq!(bytes[244], gas::AddressSpace::SystemIo as u8);
        let port = u64::from_le_bytes(bytes[248..256].try_into().unwrap());
        assert_eq!(port, u64::from(AcpiPm::SLEEP_CONTROL_PORT));
    }

    #[test]
    fn viot_describes_the_iommu_and_each_endpoint_at_spec_offsets() {
        // IOMMU at 00:03.0, endpoints at 00:02.0 and 00:05.1.
        let (iommu, ep0, ep1) = (3 << 3, 2 << 3, (5 << 3) | 1);
        let viot = viot(iommu, &[ep0, ep1]);
        let b = viot.as_slice();
        // It chains from the XSDT like any device table.
        let ram = GuestRam::new(64 << 20).unwrap();
        let rsdp = write_tables(&ram.memory, 1, std::slice::from_ref(&viot)).unwrap();
        let mut rsdp_bytes = [0u8; 36];
        ram.memory.read_slice(&mut rsdp_bytes, rsdp).unwrap();
        let xsdt = read_table(
            &ram.memory,
            u64::from_le_bytes(rsdp_bytes[24..32].try_into().unwrap()),
        );
        let last = u64::from_le_bytes(xsdt[xsdt.len() - 8..].try_into().unwrap());
        assert_eq!(read_table(&ram.memory, last), viot);
        let u16_at = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        assert_eq!(&b[..4], b"VIOT");
        assert_eq!(u32_at(4) as usize, b.len());
        assert_eq!(b.len(), 48 + 16 + 2 * 24);
        assert_eq!(b[8], 0, "revision 0");
        assert!(checksum_ok(b));
        assert_eq!(u16_at(36), 3, "node count");
        assert_eq!(u16_at(38), 48, "first node offset");
        assert!(b[40..48].iter().all(|x| *x == 0), "reserved");
        // struct acpi_viot_virtio_iommu_pci
        assert_eq!(&b[48..52], &[3, 0, 16, 0]);
        assert_eq!(u16_at(52), 0, "segment");
        assert_eq!(u16_at(54), iommu);
        assert!(b[56..64].iter().all(|x| *x == 0));
        // struct acpi_viot_pci_range, one per endpoint
        for (i, ep) in [ep0, ep1].into_iter().enumerate() {
            let n = 64 + 24 * i;
            assert_eq!(&b[n..n + 4], &[1, 0, 24, 0]);
            assert_eq!(u32_at(n + 4), u32::from(ep), "endpoint ID = BDF");
            assert_eq!((u16_at(n + 8), u16_at(n + 10)), (0, 0), "segment 0");
            assert_eq!((u16_at(n + 12), u16_at(n + 14)), (ep, ep));
            assert_eq!(u16_at(n + 16), 48, "output node: the IOMMU");
            assert!(b[n + 18..n + 24].iter().all(|x| *x == 0));
        }
    }

    #[test]
    fn dsdt_declares_s5_and_com1() {
        let dsdt = dsdt();
        let bytes = dsdt.as_slice();
        assert!(checksum_ok(bytes));
        let find = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        assert!(find(b"_S5_"));
        assert!(find(b"COM1"));
        assert!(find(b"PCI0"));
    }
}
