//! PCI segment 0, bus 0: the host bridge and up to 31 devices, their
//! configuration space reached through ports 0xCF8/0xCFC or ECAM, and their
//! BARs placed on the MMIO bus while the guest enables memory decoding.

use std::sync::{Arc, Mutex, MutexGuard};

use super::config::{self, PciConfiguration, PciIdentity};
use crate::bus::{Bus, BusDevice, BusError};

pub const SLOTS: usize = 32;
/// ECAM window for bus 0 only: 32 devices x 8 functions x 4 KiB.
pub const ECAM_SIZE: u64 = 1 << 20;
pub const CONFIG_IO_BASE: u16 = 0xcf8;
pub const CONFIG_IO_LEN: u64 = 8;

/// A PCI function the bus can reach.
pub trait PciDevice: Send {
    fn config(&self) -> &PciConfiguration;
    fn config_mut(&mut self) -> &mut PciConfiguration;
    /// Called after the guest wrote `len` bytes of config space at `offset`.
    fn config_written(&mut self, _offset: usize, _len: usize) {}
    fn read_bar(&mut self, index: usize, offset: u64, data: &mut [u8]);
    fn write_bar(&mut self, index: usize, offset: u64, data: &[u8]);
    /// A BAR became reachable at `addr`, or stopped being reachable (`None`).
    fn bar_mapped(&mut self, _index: usize, _addr: Option<u64>) {}
}

pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error("no free PCI slot")]
    NoSlot,
    #[error("cannot map a BAR on the MMIO bus: {0}")]
    Bus(#[from] BusError),
    #[error("no device in PCI slot {0}")]
    EmptySlot(usize),
    #[error(
        "slot {slot}: the saved configuration space is {found} bytes, not {}",
        config::CONFIG_SPACE_SIZE
    )]
    SavedConfigSize { slot: usize, found: usize },
    #[error(
        "slot {slot}: the saved configuration space differs from the device's at {offset:#x} \
         ({saved:#010x}, the device has {current:#010x} in bits the guest cannot write): \
         not the same kind of device"
    )]
    SavedConfigMismatch {
        slot: usize,
        offset: usize,
        saved: u32,
        current: u32,
    },
}

fn lock(device: &SharedPciDevice) -> MutexGuard<'_, dyn PciDevice + 'static> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}

/// The host bridge at 00.0: an identity and nothing else.
struct HostBridge {
    config: PciConfiguration,
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
    fn read_bar(&mut self, _index: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&mut self, _index: usize, _offset: u64, _data: &[u8]) {}
}

/// A BAR's window on the MMIO bus.
struct BarWindow {
    device: SharedPciDevice,
    index: usize,
}

impl BusDevice for BarWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.device).read_bar(self.index, offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.device).write_bar(self.index, offset, data);
    }
}

struct Slot {
    device: SharedPciDevice,
    /// Where each BAR is on the MMIO bus now, if anywhere.
    mapped: [Option<u64>; config::BAR_COUNT],
}

pub struct PciBus {
    slots: Vec<Option<Slot>>,
    mmio: Arc<Bus>,
}

impl PciBus {
    pub fn new(mmio: Arc<Bus>) -> PciBus {
        let bridge = HostBridge {
            config: PciConfiguration::new(PciIdentity {
                vendor_id: 0x8086,
                device_id: 0x0d57,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
                class: 0x06,
                subclass: 0x00,
                prog_if: 0,
                revision: 0,
            }),
        };
        let mut slots: Vec<Option<Slot>> = (0..SLOTS).map(|_| None).collect();
        slots[0] = Some(Slot {
            device: Arc::new(Mutex::new(bridge)),
            mapped: [None; config::BAR_COUNT],
        });
        PciBus { slots, mmio }
    }

    /// Plugs `device` into the first free slot; returns the slot number.
    pub fn add_device(&mut self, device: SharedPciDevice) -> Result<u8, PciError> {
        let slot = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or(PciError::NoSlot)?;
        self.slots[slot] = Some(Slot {
            device,
            mapped: [None; config::BAR_COUNT],
        });
        Ok(slot as u8)
    }

    fn device_at(&self, slot: usize, function: usize) -> Option<&Slot> {
        if function != 0 {
            return None;
        }
        self.slots.get(slot)?.as_ref()
    }

    pub fn read_config(&self, slot: usize, function: usize, offset: usize, data: &mut [u8]) {
        match self.device_at(slot, function) {
            Some(s) if offset < config::CONFIG_SPACE_SIZE => {
                lock(&s.device).config().read(offset, data)
            }
            // PCIe extended space of a conventional function reads as zero.
            Some(_) => data.fill(0),
            None => data.fill(0xff),
        }
    }

    pub fn write_config(&mut self, slot: usize, function: usize, offset: usize, data: &[u8]) {
        let Some(device) = self.device_at(slot, function).map(|s| s.device.clone()) else {
            return;
        };
        if offset >= config::CONFIG_SPACE_SIZE {
            return;
        }
        let wanted = {
            let mut guard = lock(&device);
            guard.config_mut().write(offset, data);
            guard.config_written(offset, data.len());
            let config = guard.config();
            let enabled = config.memory_enabled();
            let mut wanted = [None; config::BAR_COUNT];
            for bar in config.bars() {
                wanted[bar.index] = if enabled {
                    config.bar_address(bar.index)
                } else {
                    None
                };
            }
            wanted
        };
        // The device lock is released: a vCPU inside one of its BARs may
        // hold a bus reference, and remapping must not wait on it.
        self.sync_bars(slot, &device, wanted);
    }

    /// Puts back the configuration space a snapshot saved for the device
    /// in `slot`: each register the guest may write is written again as
    /// the guest would (so BARs are mapped where it put them, and the
    /// device hears of its MSI-X enable), the command register last so each
    /// BAR is mapped once. Bits the guest cannot write must be what the
    /// device has: otherwise it is another kind of device, and nothing is
    /// written.
    pub fn restore_config(&mut self, slot: usize, saved: &[u8]) -> Result<(), PciError> {
        let device = self
            .device_at(slot, 0)
            .map(|s| s.device.clone())
            .ok_or(PciError::EmptySlot(slot))?;
        if saved.len() != config::CONFIG_SPACE_SIZE {
            return Err(PciError::SavedConfigSize {
                slot,
                found: saved.len(),
            });
        }
        let dword = |offset: usize| {
            saved
                .get(offset..offset + 4)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u32::from_le_bytes)
        };
        let mut writes = Vec::new();
        {
            let guard = lock(&device);
            let config = guard.config();
            for offset in (0..config::CONFIG_SPACE_SIZE).step_by(4) {
                let mask = config.writable_mask(offset);
                let (saved, current) = (dword(offset), config.u32_at(offset));
                if saved & !mask != current & !mask {
                    return Err(PciError::SavedConfigMismatch {
                        slot,
                        offset,
                        saved,
                        current,
                    });
                }
                if mask != 0 && offset != config::COMMAND {
                    writes.push((offset, saved));
                }
            }
        }
        writes.push((config::COMMAND, dword(config::COMMAND)));
        for (offset, value) in writes {
            self.write_config(slot, 0, offset, &value.to_le_bytes());
        }
        Ok(())
    }

    fn sync_bars(
        &mut self,
        slot: usize,
        device: &SharedPciDevice,
        wanted: [Option<u64>; config::BAR_COUNT],
    ) {
        let sizes: Vec<(usize, u64)> = lock(device)
            .config()
            .bars()
            .map(|b| (b.index, b.size))
            .collect();
        let Some(Some(entry)) = self.slots.get_mut(slot) else {
            return;
        };
        for (index, size) in sizes {
            if entry.mapped[index] == wanted[index] {
                continue;
            }
            if let Some(old) = entry.mapped[index].take() {
                self.mmio.remove(old);
            }
            if let Some(addr) = wanted[index] {
                let window = BarWindow {
                    device: device.clone(),
                    index,
                };
                // A guest that programs overlapping BARs gets neither mapped.
                if self
                    .mmio
                    .insert(addr, size, Arc::new(Mutex::new(window)))
                    .is_ok()
                {
                    entry.mapped[index] = Some(addr);
                }
            }
            let mapped = entry.mapped[index];
            lock(device).bar_mapped(index, mapped);
        }
    }
}

pub type SharedPciBus = Arc<Mutex<PciBus>>;

fn lock_bus(bus: &SharedPciBus) -> MutexGuard<'_, PciBus> {
    bus.lock().unwrap_or_else(|p| p.into_inner())
}

/// Configuration mechanism #1: an address latch at 0xCF8, data at 0xCFC.
pub struct PciConfigIo {
    bus: SharedPciBus,
    address: u32,
}

impl PciConfigIo {
    const ENABLE: u32 = 1 << 31;

    pub fn new(bus: SharedPciBus) -> PciConfigIo {
        PciConfigIo { bus, address: 0 }
    }

    /// (slot, function, register) for the latched address, if enabled and on bus 0.
    fn target(&self, data_offset: u64) -> Option<(usize, usize, usize)> {
        let a = self.address;
        let bus = (a >> 16) & 0xff;
        if a & Self::ENABLE == 0 || bus != 0 {
            return None;
        }
        let register = (a & 0xfc) as usize + data_offset as usize;
        Some((
            ((a >> 11) & 0x1f) as usize,
            ((a >> 8) & 0x7) as usize,
            register,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 => match self.target(offset - 4) {
                Some((slot, function, register)) => {
                    lock_bus(&self.bus).read_config(slot, function, register, data)
                }
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            }
            4..=7 => {
                if let Some((slot, function, register)) = self.target(offset - 4) {
                    lock_bus(&self.bus).write_config(slot, function, register, data);
                }
            }
            _ => {}
        }
    }
}

/// Enhanced configuration access (ECAM) for bus 0, on the MMIO bus.
pub struct PciConfigMmio {
    bus: SharedPciBus,
}

impl PciConfigMmio {
    pub fn new(bus: SharedPciBus) -> PciConfigMmio {
        PciConfigMmio { bus }
    }

    fn target(offset: u64) -> (usize, usize, usize) {
        (
            ((offset >> 15) & 0x1f) as usize,
            ((offset >> 12) & 0x7) as usize,
            (offset & 0xfff) as usize,
        )
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (slot, function, register) = Self::target(offset);
        lock_bus(&self.bus).read_config(slot, function, register, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (slot, function, register) = Self::target(offset);
        lock_bus(&self.bus).write_config(slot, function, register, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::{Bar, BAR0, COMMAND, COMMAND_MEMORY_SPACE};

    struct TestDevice {
        config: PciConfiguration,
        last_write: Option<(usize, u64, Vec<u8>)>,
        mapped: Vec<(usize, Option<u64>)>,
    }

    impl PciDevice for TestDevice {
        fn config(&self) -> &PciConfiguration {
            &self.config
        }
        fn config_mut(&mut self) -> &mut PciConfiguration {
            &mut self.config
        }
        fn read_bar(&mut self, index: usize, offset: u64, data: &mut [u8]) {
            data.fill((index as u8) << 4 | offset as u8);
        }
        fn write_bar(&mut self, index: usize, offset: u64, data: &[u8]) {
            self.last_write = Some((index, offset, data.to_vec()));
        }
        fn bar_mapped(&mut self, index: usize, addr: Option<u64>) {
            self.mapped.push((index, addr));
        }
    }

    fn test_device() -> Arc<Mutex<TestDevice>> {
        let mut config = PciConfiguration::new(PciIdentity::virtio_net_for_tests());
        config
            .add_memory_bar(Bar {
                index: 0,
                addr: 0xc000_0000,
                size: 0x4000,
                is_64bit: false,
            })
            .unwrap();
        Arc::new(Mutex::new(TestDevice {
            config,
            last_write: None,
            mapped: vec![],
        }))
    }

    fn setup() -> (SharedPciBus, Arc<Bus>, Arc<Mutex<TestDevice>>) {
        let mmio = Arc::new(Bus::new());
        let bus = Arc::new(Mutex::new(PciBus::new(mmio.clone())));
        let device = test_device();
        assert_eq!(bus.lock().unwrap().add_device(device.clone()).unwrap(), 1);
        (bus, mmio, device)
    }

    fn cf8(slot: u32, register: u32) -> [u8; 4] {
        (0x8000_0000 | (slot << 11) | register).to_le_bytes()
    }

    #[test]
    fn config_io_reaches_the_host_bridge_and_devices() {
        let (bus, _mmio, _device) = setup();
        let mut io = PciConfigIo::new(bus);
        let mut data = [0u8; 4];
        io.write(0, &cf8(0, 0));
        io.read(4, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x0d57_8086);
        io.write(0, &cf8(1, 0));
        io.read(4, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x1041_1af4);
        let mut word = [0u8; 2];
        io.read(6, &mut word);
        assert_eq!(u16::from_le_bytes(word), 0x1041, "byte lanes of 0xCFC");
        io.write(0, &cf8(7, 0));
        io.read(4, &mut data);
        assert_eq!(data, [0xff; 4], "empty slots read as ones");
    }

    #[test]
    fn ecam_addresses_slot_function_and_register() {
        let (bus, _mmio, _device) = setup();
        let mut ecam = PciConfigMmio::new(bus);
        let mut data = [0u8; 4];
        ecam.read(1 << 15, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x1041_1af4);
        ecam.read((1 << 15) | (1 << 12), &mut data);
        assert_eq!(data, [0xff; 4], "function 1 does not exist");
        ecam.read((1 << 15) | 0x100, &mut data);
        assert_eq!(data, [0; 4], "no extended capabilities");
    }

    #[test]
    fn bars_are_mapped_only_while_memory_decoding_is_on_and_follow_moves() {
        let (bus, mmio, device) = setup();
        let mut ecam = PciConfigMmio::new(bus);
        let dev = 1 << 15;
        let mut data = [0u8; 1];
        assert!(
            !mmio.read(0xc000_0010, &mut data),
            "not mapped before decode is on"
        );
        ecam.write(dev + COMMAND as u64, &COMMAND_MEMORY_SPACE.to_le_bytes());
        assert!(mmio.read(0xc000_0010, &mut data));
        assert_eq!(data, [0x10]);
        // Sizing with decode off does not disturb the mapping's target...
        ecam.write(dev + COMMAND as u64, &0u16.to_le_bytes());
        ecam.write(dev + BAR0 as u64, &[0xff; 4]);
        ecam.write(dev + BAR0 as u64, &0xd000_0000u32.to_le_bytes());
        assert!(!mmio.read(0xc000_0010, &mut data));
        // ... and the BAR reappears where the guest put it.
        ecam.write(dev + COMMAND as u64, &COMMAND_MEMORY_SPACE.to_le_bytes());
        assert!(mmio.write(0xd000_0004, &[7]));
        assert_eq!(device.lock().unwrap().last_write, Some((0, 4, vec![7])));
        assert_eq!(
            device.lock().unwrap().mapped,
            vec![(0, Some(0xc000_0000)), (0, None), (0, Some(0xd000_0000))]
        );
    }

    #[test]
    fn a_saved_config_space_maps_bars_where_the_guest_put_them_in_a_new_bus() {
        let (bus, _mmio, _device) = setup();
        let mut ecam = PciConfigMmio::new(bus.clone());
        let dev = 1 << 15;
        ecam.write(dev + BAR0 as u64, &0xd000_0000u32.to_le_bytes());
        ecam.write(dev + COMMAND as u64, &COMMAND_MEMORY_SPACE.to_le_bytes());
        let saved = lock_bus(&bus).slots[1]
            .as_ref()
            .map(|s| lock(&s.device).config().bytes().to_vec())
            .unwrap();

        let (bus, mmio, device) = setup();
        lock_bus(&bus).restore_config(1, &saved).unwrap();
        let mut data = [0u8; 1];
        assert!(
            mmio.read(0xd000_0010, &mut data),
            "mapped at the saved address"
        );
        assert!(!mmio.read(0xc000_0010, &mut data));
        assert_eq!(
            device.lock().unwrap().mapped,
            vec![(0, Some(0xd000_0000))],
            "mapped once, at the command register"
        );
    }

    #[test]
    fn a_saved_config_space_of_another_device_or_size_or_slot_is_refused() {
        let (bus, mmio, device) = setup();
        let mut saved = device.lock().unwrap().config().bytes().to_vec();
        saved[COMMAND] = COMMAND_MEMORY_SPACE as u8;
        let mut other = saved.clone();
        other[2] ^= 1; // another device ID
        let error = lock_bus(&bus).restore_config(1, &other).unwrap_err();
        assert!(
            matches!(error, PciError::SavedConfigMismatch { offset: 0, .. }),
            "{error}"
        );
        assert!(error.to_string().contains("not the same kind of device"));
        let mut data = [0u8; 1];
        assert!(!mmio.read(0xc000_0010, &mut data), "nothing was written");
        assert!(matches!(
            lock_bus(&bus).restore_config(1, &saved[..64]),
            Err(PciError::SavedConfigSize { found: 64, .. })
        ));
        assert!(matches!(
            lock_bus(&bus).restore_config(9, &saved),
            Err(PciError::EmptySlot(9))
        ));
        lock_bus(&bus).restore_config(1, &saved).unwrap();
        assert!(mmio.read(0xc000_0010, &mut data));
    }
}
