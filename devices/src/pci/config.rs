//! A PCI type-0 configuration space: header registers, BARs with their
//! size probing, and a capability list that devices append to.

/// Standard header offsets.
pub const VENDOR_ID: usize = 0x00;
pub const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const REVISION_ID: usize = 0x08;
pub const CLASS_PROG_IF: usize = 0x09;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const SUBSYSTEM_ID: usize = 0x2e;
pub const CAPABILITIES_POINTER: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;
pub const INTERRUPT_PIN: usize = 0x3d;

pub const COMMAND_IO_SPACE: u16 = 1 << 0;
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const STATUS_CAPABILITIES_LIST: u16 = 1 << 4;

pub const CONFIG_SPACE_SIZE: usize = 256;
pub const BAR_COUNT: usize = 6;
const FIRST_CAPABILITY: usize = 0x40;
const BAR_MEM64: u32 = 0b100;
const BAR_PREFETCHABLE: u32 = 0b1000;

/// A memory BAR as the VMM allocated it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    pub index: usize,
    pub addr: u64,
    pub size: u64,
    pub is_64bit: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("BAR {0} is invalid or already used")]
    BadBar(usize),
    #[error("BAR size {0:#x} is not a power of two of at least 16 bytes")]
    BadBarSize(u64),
    #[error("no room left for a capability of {0} bytes")]
    NoCapabilitySpace(usize),
}

/// Identity of a PCI function.
#[derive(Clone, Copy, Debug)]
pub struct PciIdentity {
    pub vendor_id: u16,
    pub device_id: u16,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
    pub class: u8,
    pub subclass: u8,
    pub prog_if: u8,
    pub revision: u8,
}

impl PciIdentity {
    /// A virtio-net function (vendor 0x1af4, device 0x1041), for tests and
    /// fuzz targets that need some identity.
    #[cfg(any(test, feature = "test-utils"))]
    pub fn virtio_net_for_tests() -> PciIdentity {
        PciIdentity {
            vendor_id: 0x1af4,
            device_id: 0x1041,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 1,
            class: 0x02,
            subclass: 0,
            prog_if: 0,
            revision: 1,
        }
    }
}

pub struct PciConfiguration {
    bytes: [u8; CONFIG_SPACE_SIZE],
    /// Bits of each dword the guest may change.
    writable: [u32; CONFIG_SPACE_SIZE / 4],
    bars: [Option<Bar>; BAR_COUNT],
    next_capability: usize,
    last_capability: Option<usize>,
}

impl PciConfiguration {
    pub fn new(identity: PciIdentity) -> PciConfiguration {
        let mut config = PciConfiguration {
            bytes: [0; CONFIG_SPACE_SIZE],
            writable: [0; CONFIG_SPACE_SIZE / 4],
            bars: [None; BAR_COUNT],
            next_capability: FIRST_CAPABILITY,
            last_capability: None,
        };
        config.set_u16(VENDOR_ID, identity.vendor_id);
        config.set_u16(DEVICE_ID, identity.device_id);
        config.set_u16(SUBSYSTEM_VENDOR_ID, identity.subsystem_vendor_id);
        config.set_u16(SUBSYSTEM_ID, identity.subsystem_id);
        config.bytes[REVISION_ID] = identity.revision;
        config.bytes[CLASS_PROG_IF] = identity.prog_if;
        config.bytes[CLASS_PROG_IF + 1] = identity.subclass;
        config.bytes[CLASS_PROG_IF + 2] = identity.class;
        config.bytes[HEADER_TYPE] = 0;
        // Command: I/O, memory, bus master, INTx disable are the guest's to set.
        let command_bits =
            COMMAND_IO_SPACE | COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;
        config.writable[COMMAND / 4] = u32::from(command_bits);
        config.writable[INTERRUPT_LINE / 4] = 0xff;
        config
    }

    /// Declares a memory BAR at `addr` of `size` bytes (a power of two).
    pub fn add_memory_bar(&mut self, bar: Bar) -> Result<(), ConfigError> {
        let span = if bar.is_64bit { 2 } else { 1 };
        let slots = bar
            .index
            .checked_add(span)
            .filter(|end| *end <= BAR_COUNT)
            .map(|end| bar.index..end)
            .ok_or(ConfigError::BadBar(bar.index))?;
        if slots
            .clone()
            .any(|i| self.bars[i].is_some() || self.is_upper_half(i))
        {
            return Err(ConfigError::BadBar(bar.index));
        }
        if !bar.size.is_power_of_two() || bar.size < 16 || (!bar.is_64bit && bar.size > 1 << 31) {
            return Err(ConfigError::BadBarSize(bar.size));
        }
        let offset = BAR0 + bar.index * 4;
        let flags = if bar.is_64bit {
            BAR_MEM64 | BAR_PREFETCHABLE
        } else {
            0
        };
        let mask = !(bar.size - 1);
        self.set_u32(offset, (bar.addr as u32 & mask as u32) | flags);
        self.writable[offset / 4] = mask as u32;
        if bar.is_64bit {
            self.set_u32(offset + 4, (bar.addr >> 32) as u32);
            self.writable[offset / 4 + 1] = (mask >> 32) as u32;
        }
        self.bars[bar.index] = Some(bar);
        Ok(())
    }

    fn is_upper_half(&self, index: usize) -> bool {
        index
            .checked_sub(1)
            .and_then(|lower| self.bars.get(lower))
            .is_some_and(|b| b.is_some_and(|b| b.is_64bit))
    }

    pub fn bars(&self) -> impl Iterator<Item = &Bar> {
        self.bars.iter().flatten()
    }

    /// The address the guest currently programmed into `index`.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bars.get(index)?.as_ref()?;
        // index < BAR_COUNT, so the register is inside the header.
        let offset = BAR0 + index * 4;
        let low = u64::from(self.u32_at(offset) & !0xf);
        let high = if bar.is_64bit {
            u64::from(self.u32_at(offset + 4))
        } else {
            0
        };
        Some((high << 32) | low)
    }

    pub fn memory_enabled(&self) -> bool {
        self.u16_at(COMMAND) & COMMAND_MEMORY_SPACE != 0
    }

    /// Appends a capability whose body (after ID and next pointer) is
    /// `body`; `writable` marks which bytes of the body the guest may write.
    /// Returns the capability's offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, ConfigError> {
        let len = body.len().saturating_add(2);
        let offset = self.next_capability;
        let end = offset
            .checked_add(len)
            .filter(|end| *end <= CONFIG_SPACE_SIZE)
            .ok_or(ConfigError::NoCapabilitySpace(len))?;
        self.bytes[offset] = id;
        self.bytes[offset + 1] = 0;
        self.bytes[offset + 2..end].copy_from_slice(body);
        for (i, mask) in writable.iter().enumerate().take(body.len()) {
            let at = offset + 2 + i;
            self.writable[at / 4] |= u32::from(*mask) << ((at % 4) * 8);
        }
        match self.last_capability {
            Some(previous) => self.bytes[previous + 1] = offset as u8,
            None => {
                self.bytes[CAPABILITIES_POINTER] = offset as u8;
                let status = self.u16_at(STATUS) | STATUS_CAPABILITIES_LIST;
                self.set_u16(STATUS, status);
            }
        }
        self.last_capability = Some(offset);
        self.next_capability = (end + 3) & !3;
        Ok(offset)
    }

    /// The config bytes [offset, offset + len), if all inside.
    fn range(offset: usize, len: usize) -> Option<std::ops::Range<usize>> {
        let end = offset.checked_add(len)?;
        (end <= CONFIG_SPACE_SIZE).then_some(offset..end)
    }

    /// Reads `data.len()` (1, 2 or 4) bytes at `offset`; out of range reads as ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        match Self::range(offset, data.len()).and_then(|r| self.bytes.get(r)) {
            Some(bytes) => data.copy_from_slice(bytes),
            None => data.fill(0xff),
        }
    }

    /// Writes what the guest may write; read-only bits keep their value.
    /// Bytes beyond the config space are dropped.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, byte) in data.iter().enumerate() {
            let Some(at) = offset.checked_add(i).filter(|at| *at < CONFIG_SPACE_SIZE) else {
                return;
            };
            let mask = (self.writable[at / 4] >> ((at % 4) * 8)) as u8;
            self.bytes[at] = (self.bytes[at] & !mask) | (byte & mask);
        }
    }

    /// The whole configuration space as it is now (what a snapshot keeps).
    pub fn bytes(&self) -> &[u8; CONFIG_SPACE_SIZE] {
        &self.bytes
    }

    /// The bits of the dword at `offset` (a multiple of 4) the guest may
    /// write; none beyond the config space.
    pub fn writable_mask(&self, offset: usize) -> u32 {
        self.writable.get(offset / 4).copied().unwrap_or(0)
    }

    /// The 16-bit register at `offset`; all ones beyond the config space.
    pub fn u16_at(&self, offset: usize) -> u16 {
        let mut b = [0u8; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    /// The 32-bit register at `offset`; all ones beyond the config space.
    pub fn u32_at(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Sets a register regardless of the guest's write mask; a register
    /// beyond the config space is ignored.
    pub fn set_u16(&mut self, offset: usize, value: u16) {
        self.set_bytes(offset, &value.to_le_bytes());
    }

    /// See `set_u16`.
    pub fn set_u32(&mut self, offset: usize, value: u32) {
        self.set_bytes(offset, &value.to_le_bytes());
    }

    fn set_bytes(&mut self, offset: usize, value: &[u8]) {
        if let Some(bytes) = Self::range(offset, value.len()).and_then(|r| self.bytes.get_mut(r)) {
            bytes.copy_from_slice(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> PciIdentity {
        PciIdentity::virtio_net_for_tests()
    }

    fn read_u32(config: &PciConfiguration, offset: usize) -> u32 {
        let mut data = [0u8; 4];
        config.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn header_reports_identity_and_ignores_read_only_writes() {
        let mut config = PciConfiguration::new(identity());
        assert_eq!(read_u32(&config, 0), 0x1041_1af4);
        config.write(VENDOR_ID, &[0, 0]);
        assert_eq!(config.u16_at(VENDOR_ID), 0x1af4);
        config.write(COMMAND, &COMMAND_MEMORY_SPACE.to_le_bytes());
        assert!(config.memory_enabled());
    }

    #[test]
    fn bar_sizing_returns_the_size_mask_and_keeps_flags() {
        let mut config = PciConfiguration::new(identity());
        let bar = Bar {
            index: 0,
            addr: 0x8_0000_0000,
            size: 0x4000,
            is_64bit: true,
        };
        config.add_memory_bar(bar).unwrap();
        assert_eq!(config.bar_address(0), Some(0x8_0000_0000));
        // The guest probes the size by writing all ones.
        config.write(BAR0, &[0xff; 4]);
        config.write(BAR0 + 4, &[0xff; 4]);
        assert_eq!(
            read_u32(&config, BAR0),
            0xffff_c000 | BAR_MEM64 | BAR_PREFETCHABLE
        );
        assert_eq!(read_u32(&config, BAR0 + 4), 0xffff_ffff);
        // ... then programs an address.
        config.write(BAR0, &0xfe00_0000u32.to_le_bytes());
        config.write(BAR0 + 4, &0u32.to_le_bytes());
        assert_eq!(config.bar_address(0), Some(0xfe00_0000));
    }

    #[test]
    fn bars_may_not_overlap_or_have_odd_sizes() {
        let mut config = PciConfiguration::new(identity());
        config
            .add_memory_bar(Bar {
                index: 0,
                addr: 0,
                size: 0x1000,
                is_64bit: true,
            })
            .unwrap();
        assert!(config
            .add_memory_bar(Bar {
                index: 1,
                addr: 0,
                size: 0x1000,
                is_64bit: false
            })
            .is_err());
        assert!(config
            .add_memory_bar(Bar {
                index: 2,
                addr: 0,
                size: 0x1001,
                is_64bit: false
            })
            .is_err());
        assert!(config
            .add_memory_bar(Bar {
                index: 5,
                addr: 0,
                size: 0x1000,
                is_64bit: true
            })
            .is_err());
    }

    #[test]
    fn huge_offsets_read_as_ones_and_write_nothing() {
        let mut config = PciConfiguration::new(identity());
        let before = config.bytes;
        for offset in [
            CONFIG_SPACE_SIZE - 1,
            CONFIG_SPACE_SIZE,
            usize::MAX - 1,
            usize::MAX,
        ] {
            let mut data = [0u8; 4];
            config.read(offset, &mut data);
            assert_eq!(data, [0xff; 4], "read at {offset:#x}");
            config.write(offset, &[0; 4]);
            config.set_u32(offset, 0);
            config.set_u16(offset, 0);
            assert_eq!(config.u32_at(offset), u32::MAX);
            assert_eq!(config.u16_at(offset), u16::MAX);
        }
        assert_eq!(config.bytes, before);
    }

    #[test]
    fn huge_bar_indices_and_capabilities_are_refused() {
        let mut config = PciConfiguration::new(identity());
        let bar = |index| Bar {
            index,
            addr: 0,
            size: 0x1000,
            is_64bit: true,
        };
        assert_eq!(
            config.add_memory_bar(bar(usize::MAX)),
            Err(ConfigError::BadBar(usize::MAX))
        );
        assert_eq!(config.bar_address(usize::MAX), None);
        assert!(config.add_capability(0x09, &[0; 300], &[]).is_err());
    }

    #[test]
    fn capabilities_chain_from_the_pointer() {
        let mut config = PciConfiguration::new(identity());
        let first = config
            .add_capability(0x09, &[1, 2, 3], &[0, 0, 0xff])
            .unwrap();
        let second = config.add_capability(0x11, &[0; 10], &[0; 10]).unwrap();
        assert_eq!(config.bytes[CAPABILITIES_POINTER] as usize, first);
        assert_eq!(config.bytes[first + 1] as usize, second);
        assert_eq!(config.bytes[second + 1], 0);
        assert_ne!(config.u16_at(STATUS) & STATUS_CAPABILITIES_LIST, 0);
        config.write(first + 2, &[9, 9, 9]);
        assert_eq!(&config.bytes[first + 2..first + 5], &[1, 2, 9]);
    }
}
