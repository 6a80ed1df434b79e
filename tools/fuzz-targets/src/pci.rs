//! PCI targets: configuration space and BARs, MSI-X, the virtio-pci
//! transport. The guest reaches all of them with arbitrary offsets, lengths
//! and values.

use std::io;
use std::sync::{Arc, Mutex};

use devices::bus::Bus;
use devices::bus::BusDevice;
use devices::interrupt::{MsiMessage, MsiRouter, MsiVector};
use devices::pci::config::{BAR0, COMMAND, COMMAND_MEMORY_SPACE};
use devices::pci::msix::Msix;
use devices::pci::{
    Bar, PciBus, PciConfigIo, PciConfigMmio, PciConfiguration, PciDevice, PciIdentity,
};
use devices::virtio::pci::{IoEventRegistry, VirtioPciDevice};
use devices::virtio::{
    ActivateError, Activation, QueueConfig, VirtioDevice, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
    VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::input::Input;

/// Operations per input: enough to reach deep states, bounded per run.
const MAX_OPS: usize = 256;

const BAR0_ADDR: u64 = 0xc000_0000;
const BAR0_SIZE: u64 = 0x1000;
const BAR2_ADDR: u64 = 0x1_0000_0000;
const BAR2_SIZE: u64 = 0x4000;

/// A function with a 32-bit and a 64-bit BAR and a partly writable
/// capability, checking that the bus only routes accesses inside a BAR.
struct BarDevice {
    config: PciConfiguration,
}

impl BarDevice {
    fn new() -> BarDevice {
        let mut config = PciConfiguration::new(PciIdentity::virtio_net_for_tests());
        let bars = [
            Bar {
                index: 0,
                addr: BAR0_ADDR,
                size: BAR0_SIZE,
                is_64bit: false,
            },
            Bar {
                index: 2,
                addr: BAR2_ADDR,
                size: BAR2_SIZE,
                is_64bit: true,
            },
        ];
        for bar in bars {
            config.add_memory_bar(bar).expect("valid BAR");
        }
        config
            .add_capability(0x09, &[1, 2, 3, 4, 5, 6], &[0, 0xff, 0, 0x0f, 0, 0xff])
            .expect("room for a capability");
        BarDevice { config }
    }

    fn check_access(&self, index: usize, offset: u64) {
        let size = self
            .config
            .bars()
            .find(|b| b.index == index)
            .unwrap_or_else(|| panic!("access to BAR {index}, which does not exist"))
            .size;
        assert!(
            offset < size,
            "BAR {index} reached at offset {offset:#x} of {size:#x}"
        );
    }
}

impl PciDevice for BarDevice {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
    fn read_bar(&mut self, index: usize, offset: u64, data: &mut [u8]) {
        self.check_access(index, offset);
        data.fill(index as u8);
    }
    fn write_bar(&mut self, index: usize, offset: u64, _data: &[u8]) {
        self.check_access(index, offset);
    }
}

/// PCI configuration space through both access mechanisms and the public
/// API, and BAR accesses on the MMIO bus while the guest moves BARs around.
pub fn pci_config(data: &[u8]) {
    let mut input = Input::new(data);
    let mmio = Arc::new(Bus::new());
    let bus = Arc::new(Mutex::new(PciBus::new(mmio.clone())));
    let device = Arc::new(Mutex::new(BarDevice::new()));
    let slot = bus
        .lock()
        .expect("fresh lock")
        .add_device(device.clone())
        .expect("a free slot");
    let mut io = PciConfigIo::new(bus.clone());
    let mut ecam = PciConfigMmio::new(bus);
    let ecam_base = u64::from(slot) << 15;
    let registers = [
        ecam_base,
        ecam_base + COMMAND as u64,
        ecam_base + BAR0 as u64,
        ecam_base + BAR0 as u64 + 8,
        ecam_base + BAR0 as u64 + 12,
        ecam_base + 0x40,
        ecam_base + 0xfc,
        0,
    ];
    let bar_addresses = [BAR0_ADDR, BAR2_ADDR, 0xd000_0000, 0xfe00_0000, 0];
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        let len = input.access_len();
        let mut buf = vec![0u8; len];
        match input.u8() % 9 {
            0 => ecam.read(input.offset(&registers), &mut buf),
            1 => {
                let offset = input.offset(&registers);
                ecam.write(offset, input.bytes(len));
            }
            2 => {
                // Turn memory decoding on or off, the way BARs get mapped.
                let on = if input.bool() {
                    COMMAND_MEMORY_SPACE
                } else {
                    0
                };
                ecam.write(ecam_base + COMMAND as u64, &on.to_le_bytes());
            }
            3 => {
                let register = u32::from(input.u8()) & 0xfc;
                let address = if input.bool() {
                    0x8000_0000 | (u32::from(slot) << 11) | register
                } else {
                    input.u32()
                };
                io.write(0, &address.to_le_bytes());
            }
            4 => io.read(input.offset(&[0, 4]), &mut buf),
            5 => {
                let offset = input.offset(&[4]);
                io.write(offset, input.bytes(len));
            }
            6 => {
                mmio.read(input.offset(&bar_addresses), &mut buf);
            }
            7 => {
                let addr = input.offset(&bar_addresses);
                mmio.write(addr, input.bytes(len));
            }
            _ => {
                // The configuration space's own API, with any offset.
                let offset = input.offset(&[0, 0x10, 0x40, 0xfc, 0x100]) as usize;
                let mut device = device.lock().expect("not poisoned");
                let config = device.config_mut();
                match input.u8() % 6 {
                    0 => config.read(offset, &mut buf),
                    1 => config.write(offset, input.bytes(len)),
                    2 => {
                        config.u16_at(offset);
                    }
                    3 => {
                        config.u32_at(offset);
                    }
                    // The VMM's own setters ignore the guest's write mask:
                    // keep them off the header, as the VMM does.
                    4 => config.set_u16(offset.max(0x40), 0x1af4),
                    _ => config.set_u32(offset.max(0x40), 0x1041_1af4),
                }
            }
        }
        let device = device.lock().expect("not poisoned");
        let config = device.config();
        assert_eq!(config.u32_at(0), 0x1041_1af4, "identity changed");
        for bar in config.bars() {
            let addr = config.bar_address(bar.index).expect("declared BAR");
            assert_eq!(addr % bar.size, 0, "BAR {} at {addr:#x}", bar.index);
        }
    }
}

#[derive(Default)]
struct RecordingRouter(Mutex<Vec<(u32, Option<MsiMessage>)>>);

impl MsiRouter for RecordingRouter {
    fn route(&self, gsi: u32, message: Option<MsiMessage>) -> io::Result<()> {
        if let Ok(mut routes) = self.0.lock() {
            routes.push((gsi, message));
        }
        Ok(())
    }
}

fn vectors(count: u32) -> Vec<MsiVector> {
    (0..count)
        .map(|i| MsiVector {
            gsi: 24 + i,
            event: EventFd::new(EFD_NONBLOCK).expect("an eventfd"),
        })
        .collect()
}

const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_MASK: u16 = 1 << 14;

/// The MSI-X table, PBA and message control, against a model: a vector is
/// pending exactly when it was raised while it could not be delivered and
/// has not become deliverable since.
pub fn msix(data: &[u8]) {
    let mut input = Input::new(data);
    let count = 1 + u32::from(input.u8() % 8);
    let mut msix = Msix::new(vectors(count), Arc::new(RecordingRouter::default()));
    let n = count as usize;
    let mut control = 0u16;
    let mut pending = vec![false; n];
    let entry_masked = |msix: &Msix, v: usize| {
        let mut word = [0u8; 4];
        msix.read_table(v as u64 * 16 + 12, &mut word);
        u32::from_le_bytes(word) & 1 != 0
    };
    let deliverable = |msix: &Msix, control: u16, v: usize| {
        control & CONTROL_ENABLE != 0 && control & CONTROL_MASK == 0 && !entry_masked(msix, v)
    };
    let table_offsets: Vec<u64> = (0..n as u64)
        .flat_map(|v| [v * 16, v * 16 + 8, v * 16 + 12])
        .collect();
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        let len = input.access_len();
        let mut buf = vec![0u8; len];
        match input.u8() % 6 {
            0 => {
                let offset = input.offset(&table_offsets);
                msix.write_table(offset, input.bytes(len));
            }
            1 => {
                // Mask or unmask one entry, as drivers do.
                let v = input.below(n) as u64;
                msix.write_table(v * 16 + 12, &u32::from(input.bool()).to_le_bytes());
            }
            2 => {
                control = input.pick(&[
                    0,
                    CONTROL_ENABLE,
                    CONTROL_ENABLE | CONTROL_MASK,
                    CONTROL_MASK,
                ]);
                msix.set_control(control);
            }
            3 => {
                let v = if input.bool() {
                    input.below(n)
                } else {
                    usize::from(input.u16())
                };
                msix.notify(v);
                if v < n && !deliverable(&msix, control, v) {
                    pending[v] = true;
                }
            }
            4 => msix.read_table(input.offset(&table_offsets), &mut buf),
            _ => msix.read_pba(input.offset(&[0, 8]), &mut buf),
        }
        let mut pba = vec![0u8; n.div_ceil(64) * 8];
        msix.read_pba(0, &mut pba);
        for (v, pending) in pending.iter_mut().enumerate() {
            if deliverable(&msix, control, v) {
                // It fired when it became deliverable.
                *pending = false;
            }
            let bit = pba[v / 8] >> (v % 8) & 1 != 0;
            assert_eq!(
                bit, *pending,
                "PBA bit of vector {v} (control {control:#x})"
            );
        }
    }
}

/// Features the fuzzed device offers.
const OFFERED: u64 = VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM | 0b101;

#[derive(Default)]
struct Activations {
    /// The queues of the running activation, if any.
    active: Option<Vec<QueueConfig>>,
    count: usize,
}

struct FuzzDevice {
    activations: Arc<Mutex<Activations>>,
    refuse: bool,
}

impl VirtioDevice for FuzzDevice {
    fn device_type(&self) -> u32 {
        1
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![256, 64]
    }
    fn features(&self) -> u64 {
        OFFERED
    }
    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        assert!(offset < 0x1000, "device config read at {offset:#x}");
        data.fill(0x5a);
    }
    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        assert!(offset < 0x1000, "device config write at {offset:#x}");
    }
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        assert_eq!(
            activation.features & !OFFERED,
            0,
            "activated with features never offered: {:#x}",
            activation.features
        );
        assert_ne!(
            activation.features & VIRTIO_F_VERSION_1,
            0,
            "activated without VERSION_1"
        );
        assert_eq!(activation.queues.len(), activation.kicks.len());
        if self.refuse {
            return Err(ActivateError::QueueNotEnabled { index: 0 });
        }
        let mut activations = self.activations.lock().expect("not poisoned");
        assert!(
            activations.active.is_none(),
            "activated twice without a reset"
        );
        activations.active = Some(activation.queues);
        activations.count += 1;
        Ok(())
    }
    fn reset(&mut self) {
        self.activations.lock().expect("not poisoned").active = None;
    }
}

struct NoRouting;
impl MsiRouter for NoRouting {
    fn route(&self, _gsi: u32, _message: Option<MsiMessage>) -> io::Result<()> {
        Ok(())
    }
}

struct NoIoEvents;
impl IoEventRegistry for NoIoEvents {
    fn register(&self, _addr: u64, _event: &EventFd) -> io::Result<()> {
        Ok(())
    }
    fn unregister(&self, _addr: u64, _event: &EventFd) -> io::Result<()> {
        Ok(())
    }
}

const COMMON_REGISTERS: [u64; 18] = [
    0x00, 0x04, 0x08, 0x0c, 0x10, 0x12, 0x14, 0x16, 0x18, 0x1a, 0x1c, 0x1e, 0x20, 0x24, 0x28, 0x2c,
    0x30, 0x34,
];

fn read_bar(pci: &mut VirtioPciDevice<FuzzDevice>, offset: u64, len: usize) -> u64 {
    let mut bytes = [0u8; 8];
    pci.read_bar(0, offset, &mut bytes[..len]);
    u64::from_le_bytes(bytes)
}

/// The virtio-pci transport: common configuration, status, ISR, device
/// config, notifications, MSI-X, driven like a (possibly hostile) driver.
/// Checked: a device is only activated with offered features including
/// VERSION_1, DRIVER_OK never shows without FEATURES_OK, and while the
/// device runs the transport reports the rings the device got.
pub fn virtio_pci(data: &[u8]) {
    let mut input = Input::new(data);
    let activations = Arc::new(Mutex::new(Activations::default()));
    let device = FuzzDevice {
        activations: activations.clone(),
        refuse: input.u8() == 0xff,
    };
    let Ok(mut pci) = VirtioPciDevice::new(
        device,
        vectors(3),
        Arc::new(NoRouting),
        Arc::new(NoIoEvents),
        0x1_0000_0000,
    ) else {
        panic!("the transport could not be created");
    };
    let statuses: [u64; 8] = [0, 1, 3, 0xb, 0xf, 0x7, 0x80, 0x4b];
    let regions = [
        0x0, 0x1000, 0x2000, 0x3000, 0x3004, 0x4000, 0x4010, 0x6000, 0x7ff8,
    ];
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        let len = input.access_len();
        match input.u8() % 8 {
            0 | 1 => {
                let offset = input.pick(&COMMON_REGISTERS);
                let value = if offset == 0x14 && input.bool() {
                    input.pick(&statuses)
                } else {
                    input.u64()
                };
                pci.write_bar(0, offset, &value.to_le_bytes()[..len.min(8)]);
            }
            2 => {
                // Features, the way a driver writes them: select, then value.
                let select = u64::from(input.u8() % 3);
                pci.write_bar(0, 0x08, &select.to_le_bytes()[..4]);
                let value = if input.bool() {
                    OFFERED >> (32 * select.min(1))
                } else {
                    input.u64()
                };
                pci.write_bar(0, 0x0c, &value.to_le_bytes()[..4]);
            }
            3 => {
                let offset = input.offset(&regions);
                let mut buf = vec![0u8; len];
                pci.read_bar(0, offset, &mut buf);
            }
            4 => {
                let offset = input.offset(&regions);
                pci.write_bar(0, offset, input.bytes(len));
            }
            5 => {
                let offset = input.offset(&[0x40, 0x50, 0x60, 0x70, 0x04]) as usize;
                let bytes = input.bytes(len);
                pci.config_mut().write(offset, bytes);
                pci.config_written(offset, bytes.len());
            }
            6 => {
                let addr = if input.bool() {
                    Some(input.u64() & !0xfff)
                } else {
                    None
                };
                pci.bar_mapped(0, addr);
            }
            _ => {
                let offset = input.offset(&COMMON_REGISTERS);
                read_bar(&mut pci, offset, len.min(8));
            }
        }
        let status = pci.status();
        assert!(
            status & STATUS_DRIVER_OK == 0 || status & STATUS_FEATURES_OK != 0,
            "DRIVER_OK without FEATURES_OK: {status:#x}"
        );
        let active = activations.lock().expect("not poisoned").active.clone();
        if let Some(queues) = active {
            assert_ne!(
                status & STATUS_DRIVER_OK,
                0,
                "running device, status {status:#x}"
            );
            let select = read_bar(&mut pci, 0x16, 2);
            for queue in &queues {
                pci.write_bar(0, 0x16, &queue.index.to_le_bytes());
                let reported = QueueConfig {
                    index: queue.index,
                    size: read_bar(&mut pci, 0x18, 2) as u16,
                    desc: read_bar(&mut pci, 0x20, 8),
                    driver: read_bar(&mut pci, 0x28, 8),
                    device: read_bar(&mut pci, 0x30, 8),
                };
                assert_eq!(&reported, queue, "the transport reports other rings");
                assert_eq!(
                    read_bar(&mut pci, 0x1c, 2),
                    1,
                    "queue {} enabled",
                    queue.index
                );
            }
            pci.write_bar(0, 0x16, &select.to_le_bytes()[..2]);
        }
    }
}
