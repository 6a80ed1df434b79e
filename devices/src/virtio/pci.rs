//! The virtio 1.x PCI transport ("modern" only).
//!
//! One 64-bit memory BAR holds, at fixed offsets, the common configuration,
//! the ISR, the device configuration, the notification area (one 4-byte
//! slot per queue, each with a KVM ioeventfd) and the MSI-X table and PBA.

use std::io;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::interrupt::{MsiRouter, MsiVector};
use crate::pci::bus::PciDevice;
use crate::pci::config::{Bar, PciConfiguration, PciIdentity};
use crate::pci::msix::{self, Msix, MsixRestoreError, MsixState};

const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x40;
const VENDOR_CAPABILITY_ID: u8 = 0x09;

const CAP_COMMON_CFG: u8 = 1;
const CAP_NOTIFY_CFG: u8 = 2;
const CAP_ISR_CFG: u8 = 3;
const CAP_DEVICE_CFG: u8 = 4;

pub const BAR_INDEX: usize = 0;
pub const BAR_SIZE: u64 = 0x8000;
const COMMON_OFFSET: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR_OFFSET: u64 = 0x1000;
const ISR_LEN: u64 = 1;
const DEVICE_OFFSET: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x6000;

const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

/// Registers eventfds that KVM signals on guest writes to an address.
pub trait IoEventRegistry: Send + Sync {
    fn register(&self, addr: u64, event: &EventFd) -> io::Result<()>;
    fn unregister(&self, addr: u64, event: &EventFd) -> io::Result<()>;
}

/// PCI class codes by virtio device type.
fn class_of(device_type: u32) -> (u8, u8) {
    match device_type {
        1 => (0x02, 0x00), // network controller, ethernet
        _ => (0xff, 0x00), // unassigned class
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct QueueRegisters {
    size: u16,
    max_size: u16,
    msix_vector: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

/// Interrupts of one virtio-pci function, shared with its device.
struct PciInterrupt {
    msix: Arc<Mutex<Msix>>,
    queue_vectors: Mutex<Vec<u16>>,
    config_vector: Mutex<u16>,
    isr: Mutex<u8>,
}

impl PciInterrupt {
    fn notify_vector(&self, vector: u16, isr_bit: u8) -> io::Result<()> {
        *self.isr.lock().unwrap_or_else(|p| p.into_inner()) |= isr_bit;
        if vector != NO_VECTOR {
            self.msix
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .notify(usize::from(vector));
        }
        Ok(())
    }

    fn irqfd(&self, vector: u16) -> Option<EventFd> {
        if vector == NO_VECTOR {
            return None;
        }
        let msix = self.msix.lock().unwrap_or_else(|p| p.into_inner());
        msix.vector(usize::from(vector))?.event.try_clone().ok()
    }
}

impl VirtioInterrupt for PciInterrupt {
    fn signal_queue(&self, queue: u16) -> io::Result<()> {
        let vector = self
            .queue_vectors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(usize::from(queue))
            .copied()
            .unwrap_or(NO_VECTOR);
        self.notify_vector(vector, ISR_QUEUE)
    }

    fn signal_config(&self) -> io::Result<()> {
        let vector = *self.config_vector.lock().unwrap_or_else(|p| p.into_inner());
        self.notify_vector(vector, ISR_CONFIG)
    }

    fn queue_irqfd(&self, queue: u16) -> Option<EventFd> {
        let vector = *self
            .queue_vectors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(usize::from(queue))?;
        self.irqfd(vector)
    }

    fn config_irqfd(&self) -> Option<EventFd> {
        let vector = *self.config_vector.lock().unwrap_or_else(|p| p.into_inner());
        self.irqfd(vector)
    }
}

/// Statistics the control API reports for a virtio-pci function.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransportCounters {
    pub activations: u64,
    pub resets: u64,
    pub activation_failures: u64,
    pub config_interrupts: u64,
}

pub struct VirtioPciDevice<D: VirtioDevice> {
    config: PciConfiguration,
    device: D,
    interrupt: Arc<PciInterrupt>,
    msix: Arc<Mutex<Msix>>,
    msix_cap_offset: usize,
    ioevents: Arc<dyn IoEventRegistry>,
    notify_events: Vec<EventFd>,
    notify_base: Option<u64>,
    queues: Vec<QueueRegisters>,
    queue_select: u16,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    active: bool,
    counters: TransportCounters,
}

/// One queue's registers as the driver left them (a snapshot).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    pub size: u16,
    pub msix_vector: u16,
    pub enabled: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

/// A virtio-pci function as the driver left it: plain data, apart from the
/// device model behind it and the live handles (eventfds, routes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    /// The whole PCI configuration space: BARs where the guest put them,
    /// the command register, MSI-X enable. The bus puts it back
    /// (`PciBus::restore_config`), after [`VirtioPciDevice::restore`].
    pub config_space: Vec<u8>,
    pub msix: MsixState,
    pub queues: Vec<QueueState>,
    pub queue_select: u16,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub status: u8,
    pub config_generation: u8,
    pub config_vector: u16,
    pub isr: u8,
    /// The device was started (DRIVER_OK accepted) and not reset since.
    pub active: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportRestoreError {
    #[error("the saved function is virtio device type {saved}; this one is {found}")]
    DeviceType { saved: u32, found: u32 },
    #[error("the saved function has {saved} queues; this device has {found}")]
    QueueCount { saved: usize, found: usize },
    #[error("queue {index}: saved size {size} is not a power of two up to the device's {max}")]
    QueueSize { index: usize, size: u16, max: u16 },
    #[error("MSI-X vector {vector} is beyond the function's {count}")]
    Vector { vector: u16, count: usize },
    #[error(
        "the guest negotiated features {negotiated:#x}; this device offers {offered:#x} \
         (missing {missing:#x})"
    )]
    FewerFeatures {
        negotiated: u64,
        offered: u64,
        missing: u64,
    },
    #[error("the saved status {status:#x} does not match a {} device", if *active { "started" } else { "stopped" })]
    Status { status: u8, active: bool },
    #[error(transparent)]
    Msix(#[from] MsixRestoreError),
    #[error("starting the device where it was: {0}")]
    Start(#[source] ActivateError),
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot set up the PCI function: {0}")]
    Config(#[from] crate::pci::config::ConfigError),
    #[error("cannot create an eventfd: {0}")]
    EventFd(io::Error),
}

impl<D: VirtioDevice> VirtioPciDevice<D> {
    /// Wraps `device` with `vectors` MSI-X vectors (one per queue plus one for
    /// config changes is what drivers ask for) and a BAR at `bar_addr`.
    pub fn new(
        device: D,
        vectors: Vec<MsiVector>,
        router: Arc<dyn MsiRouter>,
        ioevents: Arc<dyn IoEventRegistry>,
        bar_addr: u64,
    ) -> Result<VirtioPciDevice<D>, TransportError> {
        let device_type = device.device_type();
        let (class, subclass) = class_of(device_type);
        let mut config = PciConfiguration::new(PciIdentity {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: VIRTIO_PCI_DEVICE_ID_BASE + device_type as u16,
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: VIRTIO_PCI_SUBSYSTEM_ID,
            class,
            subclass,
            prog_if: 0,
            revision: 1,
        });
        config.add_memory_bar(Bar {
            index: BAR_INDEX,
            addr: bar_addr,
            size: BAR_SIZE,
            is_64bit: true,
        })?;
        let queues: Vec<QueueRegisters> = device
            .queue_max_sizes()
            .into_iter()
            .map(|max| QueueRegisters {
                size: max,
                max_size: max,
                msix_vector: NO_VECTOR,
                ..Default::default()
            })
            .collect();
        let queue_count = queues.len() as u32;
        add_virtio_cap(&mut config, CAP_COMMON_CFG, COMMON_OFFSET, COMMON_LEN, None)?;
        add_virtio_cap(
            &mut config,
            CAP_NOTIFY_CFG,
            NOTIFY_OFFSET,
            u64::from(queue_count * NOTIFY_MULTIPLIER),
            Some(NOTIFY_MULTIPLIER),
        )?;
        add_virtio_cap(&mut config, CAP_ISR_CFG, ISR_OFFSET, ISR_LEN, None)?;
        add_virtio_cap(&mut config, CAP_DEVICE_CFG, DEVICE_OFFSET, DEVICE_LEN, None)?;
        let msix = Msix::new(vectors, router);
        let (body, writable) = msix.capability(
            BAR_INDEX as u8,
            MSIX_TABLE_OFFSET as u32,
            MSIX_PBA_OFFSET as u32,
        );
        let msix_cap_offset = config.add_capability(msix::CAPABILITY_ID, &body, &writable)?;
        let msix = Arc::new(Mutex::new(msix));
        let notify_events = (0..queue_count)
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(TransportError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VirtioPciDevice {
            config,
            interrupt: Arc::new(PciInterrupt {
                msix: msix.clone(),
                queue_vectors: Mutex::new(vec![NO_VECTOR; queues.len()]),
                config_vector: Mutex::new(NO_VECTOR),
                isr: Mutex::new(0),
            }),
            device,
            msix,
            msix_cap_offset,
            ioevents,
            notify_events,
            notify_base: None,
            queues,
            queue_select: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            active: false,
            counters: TransportCounters::default(),
        })
    }

    pub fn status(&self) -> u8 {
        self.status
    }

    pub fn negotiated_features(&self) -> u64 {
        self.driver_features
    }

    pub fn counters(&self) -> TransportCounters {
        self.counters
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device model, for what the VMM does to it behind the driver's
    /// back (a pause stops and restarts its backend; the transport's
    /// registers, and so what the driver sees, do not change).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The function as the driver left it (a snapshot; the device model
    /// keeps its own).
    pub fn state(&self) -> TransportState {
        let interrupt = &self.interrupt;
        TransportState {
            device_type: self.device.device_type(),
            config_space: self.config.bytes().to_vec(),
            msix: self.msix.lock().unwrap_or_else(|p| p.into_inner()).state(),
            queues: self
                .queues
                .iter()
                .map(|q| QueueState {
                    size: q.size,
                    msix_vector: q.msix_vector,
                    enabled: q.enabled,
                    desc: q.desc,
                    driver: q.driver,
                    device: q.device,
                })
                .collect(),
            queue_select: self.queue_select,
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            status: self.status,
            config_generation: self.config_generation,
            config_vector: *interrupt
                .config_vector
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
            isr: *interrupt.isr.lock().unwrap_or_else(|p| p.into_inner()),
            active: self.active,
        }
    }

    /// Puts back what a snapshot saved of a new, never-driven function:
    /// every register, the MSI-X table, and, when the device was started,
    /// `start` with what the driver had started it with (the device model
    /// starts where its own saved state says). Everything is checked
    /// before anything changes: a device type, queue count, size or vector
    /// this function cannot have, or features the device does not offer,
    /// is refused. Config space is the bus's to put back, after this.
    pub fn restore(
        &mut self,
        state: &TransportState,
        start: impl FnOnce(&mut D, Activation) -> Result<(), ActivateError>,
    ) -> Result<(), TransportRestoreError> {
        let found = self.device.device_type();
        if state.device_type != found {
            return Err(TransportRestoreError::DeviceType {
                saved: state.device_type,
                found,
            });
        }
        if state.queues.len() != self.queues.len() {
            return Err(TransportRestoreError::QueueCount {
                saved: state.queues.len(),
                found: self.queues.len(),
            });
        }
        for (index, (saved, queue)) in state.queues.iter().zip(&self.queues).enumerate() {
            if !saved.size.is_power_of_two() || saved.size > queue.max_size {
                return Err(TransportRestoreError::QueueSize {
                    index,
                    size: saved.size,
                    max: queue.max_size,
                });
            }
        }
        let count = self
            .msix
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .vector_count();
        let vectors = state.queues.iter().map(|q| q.msix_vector);
        for vector in vectors.chain([state.config_vector]) {
            if vector != NO_VECTOR && usize::from(vector) >= count {
                return Err(TransportRestoreError::Vector { vector, count });
            }
        }
        let offered = self.device.features();
        let missing = state.driver_features & !offered;
        if missing != 0 {
            return Err(TransportRestoreError::FewerFeatures {
                negotiated: state.driver_features,
                offered,
                missing,
            });
        }
        let started = state.status & STATUS_DRIVER_OK != 0 && state.status & STATUS_FAILED == 0;
        if state.active && !started {
            return Err(TransportRestoreError::Status {
                status: state.status,
                active: state.active,
            });
        }
        self.msix
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .restore(&state.msix)?;
        for (queue, saved) in self.queues.iter_mut().zip(&state.queues) {
            queue.size = saved.size;
            queue.msix_vector = saved.msix_vector;
            queue.enabled = saved.enabled;
            queue.desc = saved.desc;
            queue.driver = saved.driver;
            queue.device = saved.device;
        }
        *self
            .interrupt
            .queue_vectors
            .lock()
            .unwrap_or_else(|p| p.into_inner()) =
            self.queues.iter().map(|q| q.msix_vector).collect();
        *self
            .interrupt
            .config_vector
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = state.config_vector;
        *self.interrupt.isr.lock().unwrap_or_else(|p| p.into_inner()) = state.isr;
        self.queue_select = state.queue_select;
        self.device_feature_select = state.device_feature_select;
        self.driver_feature_select = state.driver_feature_select;
        self.driver_features = state.driver_features;
        self.status = state.status;
        self.config_generation = state.config_generation;
        if state.status & STATUS_FEATURES_OK != 0 {
            self.device.features_ok(self.driver_features);
        }
        if state.active {
            let activation = self
                .activation()
                .map_err(|e| TransportRestoreError::Start(ActivateError::Backend(Box::new(e))))?;
            start(&mut self.device, activation).map_err(TransportRestoreError::Start)?;
            self.active = true;
            self.counters.activations += 1;
        }
        Ok(())
    }

    /// Tells the driver the device configuration changed.
    pub fn signal_config_change(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.counters.config_interrupts += 1;
        let _ = self.interrupt.signal_config();
    }

    fn selected_queue(&mut self) -> Option<&mut QueueRegisters> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn read_common(&mut self, offset: u64, data: &mut [u8]) {
        let queue = self.queues.get(usize::from(self.queue_select)).copied();
        let value: u64 = match offset {
            0x00 => u64::from(self.device_feature_select),
            0x04 => match self.device_feature_select {
                0 => self.device.features() & 0xffff_ffff,
                1 => self.device.features() >> 32,
                _ => 0,
            },
            0x08 => u64::from(self.driver_feature_select),
            0x0c => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(
                *self
                    .interrupt
                    .config_vector
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()),
            ),
            0x12 => self.queues.len() as u64,
            0x14 => u64::from(self.status),
            0x15 => u64::from(self.config_generation),
            0x16 => u64::from(self.queue_select),
            0x18 => queue.map_or(0, |q| u64::from(q.size)),
            0x1a => queue.map_or(u64::from(NO_VECTOR), |q| u64::from(q.msix_vector)),
            0x1c => queue.map_or(0, |q| u64::from(q.enabled)),
            0x1e => u64::from(self.queue_select), // notify offset = queue index
            0x20 => queue.map_or(0, |q| q.desc),
            0x24 => queue.map_or(0, |q| q.desc >> 32),
            0x28 => queue.map_or(0, |q| q.driver),
            0x2c => queue.map_or(0, |q| q.driver >> 32),
            0x30 => queue.map_or(0, |q| q.device),
            0x34 => queue.map_or(0, |q| q.device >> 32),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let len = data.len().min(8);
        data[..len].copy_from_slice(&bytes[..len]);
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 8];
        let len = data.len().min(8);
        bytes[..len].copy_from_slice(&data[..len]);
        let value = u64::from_le_bytes(bytes);
        // Queue layout is fixed once the driver is running, features once
        // the driver set FEATURES_OK (§3.1.1) or gave up (FAILED).
        let configuring = self.status & STATUS_DRIVER_OK == 0;
        let negotiating =
            self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED) == 0;
        match offset {
            0x00 => self.device_feature_select = value as u32,
            0x08 => self.driver_feature_select = value as u32,
            0x0c if negotiating => match self.driver_feature_select {
                0 => {
                    self.driver_features =
                        (self.driver_features & !0xffff_ffff) | (value & 0xffff_ffff)
                }
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (value << 32),
                _ => {}
            },
            0x10 => {
                let vector = self.valid_vector(value as u16);
                *self
                    .interrupt
                    .config_vector
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = vector;
            }
            0x14 => self.write_status(value as u8),
            0x16 => self.queue_select = value as u16,
            0x18 if configuring => {
                if let Some(q) = self.selected_queue() {
                    // Split queues: a power of two no larger than the maximum.
                    let size = value as u16;
                    q.size = if size.is_power_of_two() && size <= q.max_size {
                        size
                    } else {
                        q.size
                    };
                }
            }
            0x1a => {
                let vector = self.valid_vector(value as u16);
                let select = usize::from(self.queue_select);
                if let Some(q) = self.selected_queue() {
                    q.msix_vector = vector;
                    let mut vectors = self
                        .interrupt
                        .queue_vectors
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    vectors[select] = vector;
                }
            }
            0x1c if configuring => {
                if let Some(q) = self.selected_queue() {
                    q.enabled = value == 1;
                }
            }
            0x20 | 0x24 | 0x28 | 0x2c | 0x30 | 0x34 if configuring => {
                let high = offset % 8 == 4;
                if let Some(q) = self.selected_queue() {
                    let field = match offset & !7 {
                        0x20 => &mut q.desc,
                        0x28 => &mut q.driver,
                        _ => &mut q.device,
                    };
                    *field = set_half(*field, high && data.len() == 4, value, data.len());
                }
            }
            _ => {}
        }
    }

    /// A vector the guest may use: within the table, or NO_VECTOR.
    fn valid_vector(&self, vector: u16) -> u16 {
        let count = self
            .msix
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .vector_count();
        if usize::from(vector) < count {
            vector
        } else {
            NO_VECTOR
        }
    }

    /// The driver wrote `written` to device_status. Virtio 1.2 §2.1.1 and
    /// §3.1.1: 0 resets; otherwise the driver only adds bits, in the order
    /// ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK. FEATURES_OK is not kept
    /// when the features are invalid (the spec's way to refuse them); any
    /// other step the spec does not allow leaves the status as it was plus
    /// DEVICE_NEEDS_RESET, so the transport never reports a state the device
    /// is not in (a driver that clears DRIVER_OK cannot re-arm queues).
    fn write_status(&mut self, written: u8) {
        if written == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // DEVICE_NEEDS_RESET is the device's bit; the driver's copy is ignored.
        let mut status = (written & !STATUS_DEVICE_NEEDS_RESET) | (old & STATUS_DEVICE_NEEDS_RESET);
        if old & STATUS_FAILED != 0 {
            // After FAILED, only a reset is allowed (§2.1.1).
            return;
        }
        let cleared = old & !status;
        let added = status & !old;
        let requires = |bit: u8, before: u8| added & bit == 0 || status & before == before;
        let in_order = requires(STATUS_DRIVER, STATUS_ACKNOWLEDGE)
            && requires(STATUS_FEATURES_OK, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
            && requires(
                STATUS_DRIVER_OK,
                STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
            );
        if cleared != 0 || !in_order {
            return self.needs_reset();
        }
        if added & STATUS_FEATURES_OK != 0 && !self.features_acceptable() {
            status &= !STATUS_FEATURES_OK;
            if status & STATUS_DRIVER_OK != 0 {
                return self.needs_reset();
            }
        }
        self.status = status;
        if added & status & STATUS_FEATURES_OK != 0 {
            self.device.features_ok(self.driver_features);
        }
        if added & STATUS_FAILED != 0 {
            if self.active {
                self.device.reset();
                self.active = false;
            }
            return;
        }
        if added & STATUS_DRIVER_OK != 0 {
            self.activate();
        }
    }

    /// The driver may only accept what was offered; VERSION_1 is mandatory
    /// for a modern-only device.
    fn features_acceptable(&self) -> bool {
        let offered = self.device.features();
        self.driver_features & !offered == 0 && self.driver_features & VIRTIO_F_VERSION_1 != 0
    }

    /// What the device starts with: the enabled queues, their kick fds,
    /// the negotiated features and the interrupts.
    fn activation(&self) -> io::Result<Activation> {
        let mut queues = Vec::new();
        let mut kicks = Vec::new();
        for (index, q) in self.queues.iter().enumerate().filter(|(_, q)| q.enabled) {
            queues.push(QueueConfig {
                index: index as u16,
                size: q.size,
                desc: q.desc,
                driver: q.driver,
                device: q.device,
            });
            let kick = self
                .notify_events
                .get(index)
                .ok_or_else(|| io::Error::other("no notify event for the queue"))?;
            kicks.push(kick.try_clone()?);
        }
        Ok(Activation {
            features: self.driver_features,
            queues,
            kicks,
            interrupt: self.interrupt.clone(),
        })
    }

    fn activate(&mut self) {
        let Ok(activation) = self.activation() else {
            return self.fail_activation();
        };
        match self.device.activate(activation) {
            Ok(()) => {
                self.active = true;
                self.counters.activations += 1;
            }
            Err(_) => self.fail_activation(),
        }
    }

    /// The device could not start: tell the driver it needs a reset.
    fn fail_activation(&mut self) {
        self.counters.activation_failures += 1;
        self.needs_reset();
    }

    /// Sets DEVICE_NEEDS_RESET and tells the driver, once (§2.1.2).
    fn needs_reset(&mut self) {
        if self.status & STATUS_DEVICE_NEEDS_RESET == 0 {
            self.status |= STATUS_DEVICE_NEEDS_RESET;
            self.signal_config_change();
        }
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        self.counters.resets += 1;
        self.status = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        for q in &mut self.queues {
            *q = QueueRegisters {
                size: q.max_size,
                max_size: q.max_size,
                msix_vector: NO_VECTOR,
                ..Default::default()
            };
        }
        *self
            .interrupt
            .queue_vectors
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = vec![NO_VECTOR; self.queues.len()];
        *self
            .interrupt
            .config_vector
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = NO_VECTOR;
        *self.interrupt.isr.lock().unwrap_or_else(|p| p.into_inner()) = 0;
    }

    fn move_notify_events(&mut self, bar_addr: Option<u64>) {
        if let Some(old) = self.notify_base.take() {
            for (i, event) in self.notify_events.iter().enumerate() {
                if let Some(addr) = notify_address(old, i) {
                    let _ = self.ioevents.unregister(addr, event);
                }
            }
        }
        // A BAR so high that its notify addresses wrap cannot be mapped by
        // the bus either: register nothing rather than overflow.
        let queues = self.notify_events.len();
        let Some(base) = bar_addr
            .and_then(|bar| bar.checked_add(NOTIFY_OFFSET))
            .filter(|&base| queues == 0 || notify_address(base, queues - 1).is_some())
        else {
            return;
        };
        let mut all = true;
        for (i, event) in self.notify_events.iter().enumerate() {
            all &= notify_address(base, i)
                .is_some_and(|addr| self.ioevents.register(addr, event).is_ok());
        }
        // Without ioeventfds the notify writes exit to us and are forwarded.
        if all {
            self.notify_base = Some(base);
        }
    }
}

/// Where queue `queue`'s notifications land when the notify area starts at
/// `base`; `None` past the end of the address space.
fn notify_address(base: u64, queue: usize) -> Option<u64> {
    u64::try_from(queue)
        .ok()?
        .checked_mul(u64::from(NOTIFY_MULTIPLIER))
        .and_then(|offset| base.checked_add(offset))
}

/// Updates the 32-bit half (or the whole, for 8-byte writes) of a 64-bit register.
fn set_half(current: u64, high: bool, value: u64, len: usize) -> u64 {
    if len == 8 {
        value
    } else if high {
        (current & 0xffff_ffff) | ((value & 0xffff_ffff) << 32)
    } else {
        (current & !0xffff_ffff) | (value & 0xffff_ffff)
    }
}

fn add_virtio_cap(
    config: &mut PciConfiguration,
    cfg_type: u8,
    offset: u64,
    length: u64,
    notify_multiplier: Option<u32>,
) -> Result<(), crate::pci::config::ConfigError> {
    // struct virtio_pci_cap after cap_vndr and cap_next.
    let cap_len: u8 = if notify_multiplier.is_some() { 20 } else { 16 };
    let mut body = vec![cap_len, cfg_type, BAR_INDEX as u8, 0, 0, 0];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(multiplier) = notify_multiplier {
        body.extend_from_slice(&multiplier.to_le_bytes());
    }
    let writable = vec![0u8; body.len()];
    config.add_capability(VENDOR_CAPABILITY_ID, &body, &writable)?;
    Ok(())
}

impl<D: VirtioDevice> PciDevice for VirtioPciDevice<D> {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }

    fn config_written(&mut self, offset: usize, len: usize) {
        // Message control is the upper half of the MSI-X capability's first dword.
        let control = self.msix_cap_offset.saturating_add(2);
        if offset <= control.saturating_add(1) && offset.saturating_add(len) > control {
            let value = self.config.u16_at(control);
            self.msix
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .set_control(value);
        }
    }

    fn read_bar(&mut self, _index: usize, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_LEN => self.read_common(o - COMMON_OFFSET, data),
            o if o == ISR_OFFSET => {
                // Reading the ISR acknowledges it.
                let isr = std::mem::take(
                    &mut *self.interrupt.isr.lock().unwrap_or_else(|p| p.into_inner()),
                );
                data.fill(0);
                if let Some(first) = data.first_mut() {
                    *first = isr;
                }
            }
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_LEN).contains(&o) => {
                self.device.read_config(o - DEVICE_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => self
                .msix
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .read_table(o - MSIX_TABLE_OFFSET, data),
            o if o >= MSIX_PBA_OFFSET => self
                .msix
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .read_pba(o - MSIX_PBA_OFFSET, data),
            _ => data.fill(0),
        }
    }

    fn write_bar(&mut self, _index: usize, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_LEN => self.write_common(o - COMMON_OFFSET, data),
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_LEN).contains(&o) => {
                self.device.write_config(o - DEVICE_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..MSIX_TABLE_OFFSET).contains(&o) => {
                // Only reached when no ioeventfd caught the write.
                let queue = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER)) as u16;
                if let Some(event) = self.notify_events.get(usize::from(queue)) {
                    let _ = event.write(1);
                }
                self.device.queue_notify(queue);
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => self
                .msix
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .write_table(o - MSIX_TABLE_OFFSET, data),
            _ => {}
        }
    }

    fn bar_mapped(&mut self, index: usize, addr: Option<u64>) {
        if index == BAR_INDEX {
            self.move_notify_events(addr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::MsiMessage;

    #[derive(Default)]
    struct Recorded {
        activations: Vec<(u64, Vec<QueueConfig>, usize)>,
        resets: u32,
        notified: Vec<u16>,
        config_writes: Vec<(u64, Vec<u8>)>,
    }

    struct FakeDevice {
        recorded: Arc<Mutex<Recorded>>,
        fail_activation: bool,
    }

    const FAKE_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM | 0b101;

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            1
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![256, 256]
        }
        fn features(&self) -> u64 {
            FAKE_FEATURES
        }
        fn read_config(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(0xa0 + offset as u8);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.recorded
                .lock()
                .unwrap()
                .config_writes
                .push((offset, data.to_vec()));
        }
        fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
            if self.fail_activation {
                return Err(ActivateError::QueueNotEnabled { index: 0 });
            }
            let irqfd = activation.interrupt.queue_irqfd(0).is_some();
            self.recorded.lock().unwrap().activations.push((
                activation.features,
                activation.queues,
                activation.kicks.len() + usize::from(irqfd) * 100,
            ));
            Ok(())
        }
        fn reset(&mut self) {
            self.recorded.lock().unwrap().resets += 1;
        }
        fn queue_notify(&mut self, queue: u16) {
            self.recorded.lock().unwrap().notified.push(queue);
        }
    }

    struct NoRouting;
    impl MsiRouter for NoRouting {
        fn route(&self, _gsi: u32, _message: Option<MsiMessage>) -> io::Result<()> {
            Ok(())
        }
    }

    #[derive(Default)]
    struct Registry(Mutex<Vec<(bool, u64)>>);
    impl IoEventRegistry for Registry {
        fn register(&self, addr: u64, _event: &EventFd) -> io::Result<()> {
            self.0.lock().unwrap().push((true, addr));
            Ok(())
        }
        fn unregister(&self, addr: u64, _event: &EventFd) -> io::Result<()> {
            self.0.lock().unwrap().push((false, addr));
            Ok(())
        }
    }

    fn transport(
        fail_activation: bool,
    ) -> (
        VirtioPciDevice<FakeDevice>,
        Arc<Mutex<Recorded>>,
        Arc<Registry>,
    ) {
        let recorded = Arc::new(Mutex::new(Recorded::default()));
        let device = FakeDevice {
            recorded: recorded.clone(),
            fail_activation,
        };
        let vectors = (0..3)
            .map(|i| MsiVector {
                gsi: 24 + i,
                event: EventFd::new(EFD_NONBLOCK).unwrap(),
            })
            .collect();
        let registry = Arc::new(Registry::default());
        let pci = VirtioPciDevice::new(
            device,
            vectors,
            Arc::new(NoRouting),
            registry.clone(),
            0x1_0000_0000,
        )
        .unwrap();
        (pci, recorded, registry)
    }

    fn write(pci: &mut VirtioPciDevice<FakeDevice>, offset: u64, value: u64, len: usize) {
        pci.write_bar(0, offset, &value.to_le_bytes()[..len]);
    }

    fn read(pci: &mut VirtioPciDevice<FakeDevice>, offset: u64, len: usize) -> u64 {
        let mut bytes = [0u8; 8];
        pci.read_bar(0, offset, &mut bytes[..len]);
        u64::from_le_bytes(bytes)
    }

    /// What Linux's virtio_pci_modern does, up to DRIVER_OK.
    fn drive_to_ok(pci: &mut VirtioPciDevice<FakeDevice>, features: u64) -> u8 {
        write(pci, 0x00, 1, 4);
        assert_eq!(read(pci, 0x04, 4), FAKE_FEATURES >> 32);
        let status = drive_to_features_ok(pci, features);
        if status & STATUS_FEATURES_OK == 0 {
            return status;
        }
        finish_to_ok(pci)
    }

    /// From FEATURES_OK: queues and vectors, then DRIVER_OK.
    fn finish_to_ok(pci: &mut VirtioPciDevice<FakeDevice>) -> u8 {
        write(pci, 0x10, 2, 2); // config vector
        for queue in 0..2u64 {
            write(pci, 0x16, queue, 2);
            assert_eq!(read(pci, 0x18, 2), 256);
            write(pci, 0x18, 128, 2);
            write(pci, 0x1a, queue, 2);
            write(pci, 0x20, 0x10_0000 + queue * 0x1000, 8);
            write(pci, 0x28, 0x20_0000 + queue * 0x1000, 4);
            write(pci, 0x2c, 0, 4);
            write(pci, 0x30, 0x30_0000 + queue * 0x1000, 8);
            write(pci, 0x1c, 1, 2);
        }
        write(
            pci,
            0x14,
            u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK),
            1,
        );
        read(pci, 0x14, 1) as u8
    }

    #[test]
    fn a_driver_that_accepts_offered_features_activates_the_device() {
        let (mut pci, recorded, _) = transport(false);
        assert_eq!(read(&mut pci, 0x12, 2), 2, "num_queues");
        let status = drive_to_ok(&mut pci, VIRTIO_F_VERSION_1 | 0b1);
        assert_ne!(status & STATUS_DRIVER_OK, 0);
        let recorded = recorded.lock().unwrap();
        let (features, queues, kicks) = &recorded.activations[0];
        assert_eq!(*features, VIRTIO_F_VERSION_1 | 0b1);
        assert_eq!(queues.len(), 2);
        assert_eq!(
            queues[1],
            QueueConfig {
                index: 1,
                size: 128,
                desc: 0x10_1000,
                driver: 0x20_1000,
                device: 0x30_1000
            }
        );
        assert_eq!(
            *kicks,
            2 + 100,
            "a kick fd per queue and an irqfd for queue 0"
        );
    }

    #[test]
    fn a_saved_transport_starts_a_new_device_on_the_same_rings_and_reads_back_equal() {
        let (mut pci, _, _) = transport(false);
        drive_to_ok(&mut pci, VIRTIO_F_VERSION_1 | 0b1);
        write(&mut pci, 0x16, 1, 2); // queue_select left at 1
        let saved = pci.state();
        assert!(saved.active);

        let (mut copy, recorded, _) = transport(false);
        let mut started = None;
        copy.restore(&saved, |_, activation| {
            started = Some((activation.features, activation.queues.clone()));
            Ok(())
        })
        .unwrap();
        assert_eq!(copy.state(), saved);
        let (features, queues) = started.expect("the device was started");
        assert_eq!(features, VIRTIO_F_VERSION_1 | 0b1);
        assert_eq!(queues[1].desc, 0x10_1000);
        assert!(
            recorded.lock().unwrap().activations.is_empty(),
            "started by the restore's own path, not as a new activation"
        );
        assert_eq!(read(&mut copy, 0x18, 2), 128, "queue 1's size");
        assert_eq!(copy.counters().activations, 1);
    }

    #[test]
    fn a_saved_transport_the_device_cannot_take_changes_nothing() {
        let (mut pci, _, _) = transport(false);
        drive_to_ok(&mut pci, VIRTIO_F_VERSION_1 | 0b1);
        let good = pci.state();
        let never = |_: &mut FakeDevice, _: Activation| -> Result<(), ActivateError> {
            panic!("started a device it refused")
        };
        let cases: Vec<(TransportState, &str)> = vec![
            (
                TransportState {
                    driver_features: good.driver_features | 0b10,
                    ..good.clone()
                },
                "missing 0x2",
            ),
            (
                TransportState {
                    device_type: 2,
                    ..good.clone()
                },
                "virtio device type 2",
            ),
            (
                TransportState {
                    queues: good.queues[..1].to_vec(),
                    ..good.clone()
                },
                "1 queues",
            ),
            (
                TransportState {
                    config_vector: 3,
                    ..good.clone()
                },
                "vector 3",
            ),
            (
                TransportState {
                    status: STATUS_ACKNOWLEDGE,
                    ..good.clone()
                },
                "does not match a started device",
            ),
        ];
        for (state, expected) in cases {
            let (mut copy, _, _) = transport(false);
            let fresh = copy.state();
            let error = copy.restore(&state, never).unwrap_err().to_string();
            assert!(error.contains(expected), "{error}");
            assert_eq!(copy.state(), fresh, "{expected}");
        }
        let mut big = good.clone();
        big.queues[0].size = 512;
        let (mut copy, _, _) = transport(false);
        let error = copy.restore(&big, never).unwrap_err().to_string();
        assert!(error.contains("saved size 512"), "{error}");
        // A device that cannot start where it was fails the restore.
        let (mut copy, _, _) = transport(false);
        let error = copy
            .restore(&good, |_, _| {
                Err(ActivateError::QueueNotEnabled { index: 0 })
            })
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("starting the device where it was"),
            "{error}"
        );
    }

    #[test]
    fn features_beyond_the_offer_or_without_version_1_are_refused() {
        let (mut pci, recorded, _) = transport(false);
        let status = drive_to_ok(&mut pci, VIRTIO_F_VERSION_1 | 0b10);
        assert_eq!(status & STATUS_FEATURES_OK, 0);
        let (mut pci, _, _) = transport(false);
        assert_eq!(drive_to_ok(&mut pci, 0b1) & STATUS_FEATURES_OK, 0);
        assert!(recorded.lock().unwrap().activations.is_empty());
    }

    /// Status after the driver's steps up to FEATURES_OK with `features`.
    fn drive_to_features_ok(pci: &mut VirtioPciDevice<FakeDevice>, features: u64) -> u8 {
        write(pci, 0x14, 0, 1);
        write(pci, 0x14, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER), 1);
        write(pci, 0x08, 0, 4);
        write(pci, 0x0c, features & 0xffff_ffff, 4);
        write(pci, 0x08, 1, 4);
        write(pci, 0x0c, features >> 32, 4);
        write(pci, 0x14, u64::from(UP_TO_FEATURES_OK), 1);
        read(pci, 0x14, 1) as u8
    }

    const UP_TO_FEATURES_OK: u8 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;

    fn driver_features(pci: &mut VirtioPciDevice<FakeDevice>) -> u64 {
        write(pci, 0x08, 0, 4);
        let low = read(pci, 0x0c, 4);
        write(pci, 0x08, 1, 4);
        low | (read(pci, 0x0c, 4) << 32)
    }

    #[test]
    fn driver_features_are_frozen_at_features_ok() {
        let (mut pci, recorded, _) = transport(false);
        let accepted = VIRTIO_F_VERSION_1 | 0b1;
        assert_eq!(drive_to_features_ok(&mut pci, accepted), UP_TO_FEATURES_OK);
        // Dropping VERSION_1 and adding a bit never offered, after FEATURES_OK.
        write(&mut pci, 0x08, 0, 4);
        write(&mut pci, 0x0c, 0b110, 4);
        write(&mut pci, 0x08, 1, 4);
        write(&mut pci, 0x0c, 0, 4);
        assert_eq!(driver_features(&mut pci), accepted);
        let status = finish_to_ok(&mut pci);
        assert_ne!(status & STATUS_DRIVER_OK, 0);
        assert_eq!(recorded.lock().unwrap().activations[0].0, accepted);
        assert_eq!(pci.negotiated_features(), accepted);
    }

    #[test]
    fn features_ok_is_refused_for_invalid_features_and_driver_ok_cannot_skip_it() {
        let (mut pci, recorded, _) = transport(false);
        let status = drive_to_features_ok(&mut pci, VIRTIO_F_VERSION_1 | 0b10);
        assert_eq!(status & STATUS_FEATURES_OK, 0, "unoffered bit 1");
        let status = drive_to_features_ok(&mut pci, 0b1);
        assert_eq!(status & STATUS_FEATURES_OK, 0, "no VERSION_1");
        // DRIVER_OK written without FEATURES_OK is not a way in.
        write(
            &mut pci,
            0x14,
            u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK),
            1,
        );
        let status = read(&mut pci, 0x14, 1) as u8;
        assert_eq!(status & STATUS_DRIVER_OK, 0);
        assert_ne!(status & STATUS_DEVICE_NEEDS_RESET, 0);
        assert!(recorded.lock().unwrap().activations.is_empty());
    }

    #[test]
    fn clearing_driver_ok_cannot_move_a_running_device_to_new_rings() {
        let (mut pci, recorded, _) = transport(false);
        let all = drive_to_ok(&mut pci, VIRTIO_F_VERSION_1);
        // Status written non-zero without DRIVER_OK, new rings, DRIVER_OK again.
        write(&mut pci, 0x14, u64::from(UP_TO_FEATURES_OK), 1);
        write(&mut pci, 0x16, 0, 2);
        write(&mut pci, 0x20, 0xdead_0000, 8);
        write(&mut pci, 0x14, u64::from(all), 1);
        let status = read(&mut pci, 0x14, 1) as u8;
        assert_ne!(status & STATUS_DEVICE_NEEDS_RESET, 0, "{status:#x}");
        let recorded = recorded.lock().unwrap();
        assert_eq!(recorded.activations.len(), 1);
        let active_desc = recorded.activations[0].1[0].desc;
        assert_eq!(
            read(&mut pci, 0x20, 8),
            active_desc,
            "the transport reports the rings the device uses"
        );
    }

    #[test]
    fn a_driver_may_not_clear_status_bits_or_skip_steps() {
        let (mut pci, _, _) = transport(false);
        write(&mut pci, 0x14, u64::from(STATUS_DRIVER), 1);
        let status = read(&mut pci, 0x14, 1) as u8;
        assert_eq!(
            status, STATUS_DEVICE_NEEDS_RESET,
            "DRIVER before ACKNOWLEDGE"
        );
        // Only a reset clears the condition.
        write(&mut pci, 0x14, 0, 1);
        assert_eq!(
            drive_to_features_ok(&mut pci, VIRTIO_F_VERSION_1),
            UP_TO_FEATURES_OK
        );
        write(&mut pci, 0x14, u64::from(STATUS_ACKNOWLEDGE), 1);
        assert_eq!(
            read(&mut pci, 0x14, 1) as u8,
            UP_TO_FEATURES_OK | STATUS_DEVICE_NEEDS_RESET,
            "bits the driver cleared stay set"
        );
        write(&mut pci, 0x14, 0, 1);
        assert_eq!(read(&mut pci, 0x14, 1), 0);
    }

    #[test]
    fn failed_activation_asks_the_driver_for_a_reset() {
        let (mut pci, _, _) = transport(true);
        let status = drive_to_ok(&mut pci, VIRTIO_F_VERSION_1);
        assert_ne!(status & STATUS_DEVICE_NEEDS_RESET, 0);
        assert_eq!(pci.counters().activation_failures, 1);
        assert_eq!(read(&mut pci, ISR_OFFSET, 1) as u8 & ISR_CONFIG, ISR_CONFIG);
        assert_eq!(
            read(&mut pci, ISR_OFFSET, 1),
            0,
            "reading the ISR clears it"
        );
    }

    #[test]
    fn reset_stops_the_device_and_restores_defaults() {
        let (mut pci, recorded, _) = transport(false);
        drive_to_ok(&mut pci, VIRTIO_F_VERSION_1);
        write(&mut pci, 0x14, 0, 1);
        assert_eq!(recorded.lock().unwrap().resets, 1);
        assert_eq!(read(&mut pci, 0x14, 1), 0);
        write(&mut pci, 0x16, 1, 2);
        assert_eq!(read(&mut pci, 0x18, 2), 256);
        assert_eq!(read(&mut pci, 0x1c, 2), 0);
        assert_eq!(read(&mut pci, 0x1a, 2), u64::from(NO_VECTOR));
        // The device can be brought up again.
        drive_to_ok(&mut pci, VIRTIO_F_VERSION_1);
        assert_eq!(recorded.lock().unwrap().activations.len(), 2);
    }

    #[test]
    fn queue_layout_is_frozen_after_driver_ok() {
        let (mut pci, _, _) = transport(false);
        drive_to_ok(&mut pci, VIRTIO_F_VERSION_1);
        write(&mut pci, 0x16, 0, 2);
        write(&mut pci, 0x20, 0xdead_0000, 8);
        assert_eq!(read(&mut pci, 0x20, 8), 0x10_0000);
    }

    #[test]
    fn device_config_and_notifications_reach_the_device() {
        let (mut pci, recorded, registry) = transport(false);
        assert_eq!(read(&mut pci, DEVICE_OFFSET + 2, 1), 0xa2);
        write(&mut pci, DEVICE_OFFSET + 6, 0x55, 1);
        write(&mut pci, NOTIFY_OFFSET + 4, 1, 2);
        let recorded = recorded.lock().unwrap();
        assert_eq!(recorded.config_writes, vec![(6, vec![0x55])]);
        assert_eq!(recorded.notified, vec![1]);
        assert_eq!(pci.notify_events[1].read().unwrap(), 1);
        drop(recorded);
        pci.bar_mapped(0, Some(0x1_0000_0000));
        pci.bar_mapped(0, Some(0x2_0000_0000));
        let events = registry.0.lock().unwrap().clone();
        assert_eq!(
            events,
            vec![
                (true, 0x1_0000_3000),
                (true, 0x1_0000_3004),
                (false, 0x1_0000_3000),
                (false, 0x1_0000_3004),
                (true, 0x2_0000_3000),
                (true, 0x2_0000_3004)
            ]
        );
    }

    #[test]
    fn a_bar_reported_at_the_top_of_the_address_space_registers_no_notify_events() {
        // The bus never maps a BAR that wraps, but `bar_mapped` is public and
        // the fuzz target found `bar + NOTIFY_OFFSET` overflowing here.
        let (mut pci, _, registry) = transport(false);
        pci.bar_mapped(0, Some(0xffff_ffff_ffff_f000));
        assert_eq!(registry.0.lock().unwrap().clone(), vec![]);
        // The last notify address may not wrap either.
        let last_fits = u64::MAX - NOTIFY_OFFSET - 3;
        pci.bar_mapped(0, Some(last_fits & !0xfff));
        pci.bar_mapped(0, None);
        let events = registry.0.lock().unwrap().clone();
        assert_eq!(events.len(), 4, "{events:x?}");
        assert!(events.iter().all(|(_, addr)| *addr >= last_fits & !0xfff));
    }

    #[test]
    fn huge_offsets_through_the_bar_and_config_space_change_nothing() {
        let (mut pci, recorded, _) = transport(false);
        for offset in [BAR_SIZE, u64::MAX - 7, u64::MAX] {
            let mut data = [0xaau8; 8];
            pci.read_bar(0, offset, &mut data);
            pci.write_bar(0, offset, &[0xff; 8]);
        }
        pci.config_written(usize::MAX, usize::MAX);
        pci.config_mut().write(usize::MAX, &[0xff; 4]);
        let mut data = [0u8; 4];
        pci.config().read(usize::MAX - 1, &mut data);
        assert_eq!(data, [0xff; 4]);
        assert_eq!(pci.status(), 0);
        assert!(recorded.lock().unwrap().config_writes.is_empty());
        // Empty accesses (found by the virtio_pci fuzz target on the ISR).
        for offset in [
            0,
            ISR_OFFSET,
            DEVICE_OFFSET,
            NOTIFY_OFFSET,
            MSIX_TABLE_OFFSET,
        ] {
            pci.read_bar(0, offset, &mut []);
            pci.write_bar(0, offset, &[]);
        }
    }

    #[test]
    fn capabilities_describe_the_bar_layout() {
        let (pci, _, _) = transport(false);
        let config = pci.config();
        let mut offset = usize::from(config.u16_at(crate::pci::config::CAPABILITIES_POINTER) as u8);
        let mut found = Vec::new();
        while offset != 0 {
            let mut header = [0u8; 4];
            config.read(offset, &mut header);
            if header[0] == VENDOR_CAPABILITY_ID {
                let bar_offset = config.u32_at(offset + 8);
                found.push((header[3], bar_offset));
            } else {
                found.push((header[0], 0));
            }
            offset = usize::from(header[1]);
        }
        assert_eq!(
            found,
            vec![
                (CAP_COMMON_CFG, 0),
                (CAP_NOTIFY_CFG, 0x3000),
                (CAP_ISR_CFG, 0x1000),
                (CAP_DEVICE_CFG, 0x2000),
                (msix::CAPABILITY_ID, 0)
            ]
        );
    }
}
