//! Virtio devices and their PCI transport.
//!
//! A device model implements `VirtioDevice`; `pci::VirtioPciDevice` wraps it
//! as a virtio 1.x (modern) PCI function: feature negotiation, the status
//! state machine, queue configuration, notifications and MSI-X interrupts.

pub mod iommu;
pub mod mem;
pub mod pci;
pub mod queue_worker;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_ring;
pub mod vdpa;

use std::io;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << 33;

pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_DEVICE_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

/// "No MSI-X vector" in queue_msix_vector / config_msix_vector.
pub const NO_VECTOR: u16 = 0xffff;

/// Where the driver put one virtqueue, as configured through the transport.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueConfig {
    pub index: u16,
    pub size: u16,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

/// The used ring's index lies 2 bytes in (virtio 1.2, 2.7.8).
pub const USED_IDX_OFFSET: u64 = 2;

impl QueueConfig {
    /// The used index the device last published, read from guest memory:
    /// for a ring at guest physical addresses (no IOMMU in between).
    /// `None` where the ring is not in `memory`.
    pub fn used_idx(&self, memory: &vm_memory::GuestMemoryMmap) -> Option<u16> {
        let at = self.device.checked_add(USED_IDX_OFFSET)?;
        let used: u16 = vm_memory::Bytes::read_obj(memory, GuestAddress(at)).ok()?;
        Some(u16::from_le(used))
    }

    /// A ready split queue of at most `max_size` entries on the rings the
    /// driver configured, for a device that serves the queue itself.
    pub fn to_queue(&self, max_size: u16) -> Result<Queue, virtio_queue::Error> {
        let mut queue = Queue::new(max_size)?;
        queue.try_set_size(self.size)?;
        queue.try_set_desc_table_address(GuestAddress(self.desc))?;
        queue.try_set_avail_ring_address(GuestAddress(self.driver))?;
        queue.try_set_used_ring_address(GuestAddress(self.device))?;
        queue.set_ready(true);
        Ok(queue)
    }
}

/// How a device raises interrupts: per queue and for config changes.
pub trait VirtioInterrupt: Send + Sync {
    fn signal_queue(&self, queue: u16) -> io::Result<()>;
    fn signal_config(&self) -> io::Result<()>;
    /// An eventfd whose writes raise `queue`'s interrupt without the VMM
    /// (an irqfd), for backends that signal directly, like vhost.
    fn queue_irqfd(&self, queue: u16) -> Option<EventFd>;
    /// The same for config-change interrupts.
    fn config_irqfd(&self) -> Option<EventFd>;
}

/// Everything a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    /// Features both sides agreed on.
    pub features: u64,
    /// Enabled queues only.
    pub queues: Vec<QueueConfig>,
    /// One eventfd per enabled queue (same order), written on each guest
    /// notification (KVM ioeventfds).
    pub kicks: Vec<EventFd>,
    pub interrupt: std::sync::Arc<dyn VirtioInterrupt>,
}

/// Why a device could not start when the driver set DRIVER_OK; the
/// transport then reports DEVICE_NEEDS_RESET.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The device needs queue `index`, and the driver did not enable it.
    #[error("queue {index} is not enabled")]
    QueueNotEnabled { index: u16 },
    /// The driver configured queue `index` in a way the device cannot use.
    #[error("queue {index}: {source}")]
    Queue {
        index: u16,
        source: virtio_queue::Error,
    },
    /// The device's own backend refused (typed by the device model).
    #[error(transparent)]
    Backend(Box<dyn std::error::Error + Send + Sync>),
}

/// A virtio device model, independent of its transport.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Maximum size of each of the device's queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Features offered to the driver.
    fn features(&self) -> u64;
    fn read_config(&mut self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The transport accepted FEATURES_OK with these driver features: from
    /// now until a reset, they are what was negotiated (the driver may
    /// write config before DRIVER_OK).
    fn features_ok(&mut self, _features: u64) {}
    /// The driver set DRIVER_OK: start serving the queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// The driver reset the device (status 0): stop and forget queue state.
    fn reset(&mut self);
    /// Whether `queue` is served in the VMM (its kicks need an exit handled
    /// here) rather than by an offloaded backend listening on the kick fd.
    fn queue_notify(&mut self, _queue: u16) {}
}
