//! A virtio device whose data path is a vDPA device, reached through the
//! kernel's vhost-vdpa (/dev/vhost-vdpa-N): one implementation for every
//! device type, with thin per-type layers ([`net`], [`block`]).
//!
//! The generic part opens and claims the device, reads what it is (device
//! id, features, backend features, config space, queues, groups, address
//! spaces, IOVA range), negotiates the backend features, passes the config
//! space through, starts the vrings and resets the device. The type layer
//! decides which features the guest sees, how many queues it gets, and what
//! (if anything) the VMM puts over the device's config.
//!
//! The VMM only negotiates and configures: queue notifications go from KVM
//! ioeventfds straight to the device (kick fds), interrupts from the device
//! straight to KVM irqfds (call fds), and what memory the device may reach is
//! decided by the DMA-mapping engine, which this device owns and shares with
//! the address spaces (devices/src/dma): a reset's IOTLB replay goes through
//! them too, never beside them.
//!
//! What is known about a device is kept in [`VdpaState`], plain data; the
//! live handles (the vhost descriptor, the engine, the stand-in eventfd) are
//! in [`VdpaDevice`] beside it.
//!
//! Backend features (include/uapi/linux/vhost_types.h), and what this VMM
//! acks of what the kernel offers:
//! - IOTLB_MSG_V2: required; every IOTLB message is a `vhost_msg_v2`.
//! - IOTLB_BATCH: acked unless `iotlb-batch=off`.
//! - IOTLB_PERSIST: acked; the parent then keeps its mappings across a
//!   device reset, so no replay follows a reset. Without it the reset may
//!   drop them (VDPA_RESET_F_CLEAN_MAP) and the device's space is replayed.
//! - IOTLB_ASID: acked only for a net device whose control queue the VMM
//!   shadows (vdpa_sim_net: the control queue alone in group 1, two address
//!   spaces): that group goes to address space 1, which holds only the
//!   VMM's command buffers. Every other group stays in address space 0
//!   (each group's default), where every other message goes.
//! - ENABLE_AFTER_DRIVER_OK: not acked: the VMM enables every vring before
//!   DRIVER_OK, which every parent accepts.
//! - SUSPEND and RESUME: acked together where both are offered: a pause
//!   then suspends the device instead of resetting it ([`pause`]).
//! - DESC_ASID: not acked (nothing here uses it).
//!
//! Mapping models differ per parent (drivers/vhost/vdpa.c): a `dma_map`
//! parent applies each UPDATE/INVALIDATE at once (batching changes nothing
//! at the device; the engine still sends the minimal diff and counts the
//! messages), a `set_map` parent rebuilds at each unbatched message or at
//! BATCH_END, and a PA parent (`use_va=0`) pins every page it is given,
//! charged to RLIMIT_MEMLOCK.

pub mod block;
pub mod net;
pub mod pause;
pub mod persist;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use vhost::vdpa::VhostVdpa;
use vhost::vhost_kern::vdpa::VhostKernVdpa;
use vhost::vhost_kern::vhost_binding;
use vhost::vhost_kern::VhostKernFeatures;
use vhost::VhostBackend;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::ioctl::ioctl_with_ref;

use super::*;
use crate::dma::GuestTranslate;
use crate::dma::{
    DmaCounters, DmaMapper, DmaRange, DmaSpaces, SharedSpaces, VhostVdpaIotlb, DEVICE_ASID,
};
use crate::virtio::queue_worker::{QueueWorker, Serve};
use block::{BlockLayer, BlockOptions};
use net::control_queue::{lock_state, ControlServer, SharedNetState, VringEnable};
use net::ctrl::{control_queue_index, ControlLimits, ControlMode, NetState, SHADOW_ASID};
use net::shadow_cvq::{ShadowCvq, ShadowWiring};
use net::{NetLayer, NetOptions, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ};
use pause::{QueuePosition, Stopped};

pub const VIRTIO_ID_NET: u32 = 1;
pub const VIRTIO_ID_BLOCK: u32 = 2;

pub const VHOST_BACKEND_F_IOTLB_MSG_V2: u64 = 1 << 0x1;
pub const VHOST_BACKEND_F_IOTLB_BATCH: u64 = 1 << 0x2;
pub const VHOST_BACKEND_F_IOTLB_ASID: u64 = 1 << 0x3;
pub const VHOST_BACKEND_F_SUSPEND: u64 = 1 << 0x4;
pub const VHOST_BACKEND_F_RESUME: u64 = 1 << 0x5;
pub const VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK: u64 = 1 << 0x6;
pub const VHOST_BACKEND_F_DESC_ASID: u64 = 1 << 0x7;
pub const VHOST_BACKEND_F_IOTLB_PERSIST: u64 = 1 << 0x8;

pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// How much of a device's config space is read at open (for the type
/// layer's checks; the guest always reads the device's live config).
const PROBED_CONFIG_BYTES: u32 = 256;

/// The device types this VMM presents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    Net,
    Block,
}

impl DeviceKind {
    pub fn from_id(id: u32) -> Option<DeviceKind> {
        match id {
            VIRTIO_ID_NET => Some(DeviceKind::Net),
            VIRTIO_ID_BLOCK => Some(DeviceKind::Block),
            _ => None,
        }
    }

    pub fn id(self) -> u32 {
        match self {
            DeviceKind::Net => VIRTIO_ID_NET,
            DeviceKind::Block => VIRTIO_ID_BLOCK,
        }
    }

    /// "net" or "block", as `info` and the error messages say it.
    pub fn name(self) -> &'static str {
        virtio_type_name(self.id())
    }
}

/// The name of a virtio device type (virtio 1.2, "Device Types").
pub fn virtio_type_name(id: u32) -> &'static str {
    match id {
        1 => "net",
        2 => "block",
        3 => "console",
        4 => "entropy",
        5 => "balloon",
        8 => "scsi",
        9 => "9p",
        16 => "gpu",
        18 => "input",
        19 => "vsock",
        20 => "crypto",
        23 => "iommu",
        24 => "mem",
        25 => "sound",
        26 => "fs",
        27 => "pmem",
        29 => "mac80211-hwsim",
        _ => "unknown",
    }
}

/// Why a vDPA device was refused or failed. Messages name no path: the
/// device manager says which device (and which option) it was.
#[derive(Debug, thiserror::Error)]
pub enum VdpaError {
    #[error("cannot open '{path}': {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("'{0}' is not a vhost-vdpa device")]
    NotVhostVdpa(PathBuf),
    #[error("device type {id} ({name}) is not supported (net, block are)")]
    Unsupported { id: u32, name: &'static str },
    #[error(
        "device type {id} ({name}) is not a network device (type 1); --vdpa path=... presents \
         every supported type"
    )]
    NotNet { id: u32, name: &'static str },
    #[error("the device does not offer {what}, which this VMM needs")]
    Missing { what: &'static str },
    #[error("{what} failed: {source}")]
    Ioctl {
        what: &'static str,
        source: vhost::Error,
    },
    #[error("{requested} queue pairs requested; the device offers {offered}")]
    Queues { requested: u16, offered: u16 },
    #[error(
        "{requested} queue pairs requested, but the device has a control queue of its own that \
         the VMM cannot isolate (it shares a virtqueue group with data queues, the device has one \
         address space, or it is behind the vIOMMU): such a device drives one pair (queues=1)"
    )]
    OwnControlQueue { requested: u16 },
    #[error("the device reports {count} queues; at least 1 and at most {max} are supported")]
    BadQueueCount { count: u32, max: u32 },
    #[error("the guest needs {needed} virtqueues but the device has {has}")]
    TooFewVirtqueues { needed: u16, has: u32 },
    #[error("the device reports a maximum queue size of 0")]
    ZeroQueueSize,
    #[error("the device's config space is {size} bytes; at least {needed} are needed")]
    ConfigTooSmall { size: u32, needed: u32 },
    #[error(
        "the device's IOVA range {first:#x}..={last:#x} cannot hold guest RAM and the hotplug \
         region (guest addresses 0x0..{end:#x}), which it must reach without a vIOMMU"
    )]
    IovaRange { first: u64, last: u64, end: u64 },
    #[error("the block device has capacity 0 (an empty disk)")]
    ZeroCapacity,
    #[error("the block device is read-only (VIRTIO_BLK_F_RO): add readonly=on to accept it")]
    ReadOnly,
    #[error(
        "readonly=on, but the block device is writable: the VMM cannot enforce read-only on a \
         vDPA device (requests bypass it); make the device read-only at its parent, or drop \
         readonly=on"
    )]
    NotReadOnly,
    #[error("readonly= applies to block devices only; this is a {0} device")]
    ReadonlyNotBlock(&'static str),
    #[error("cannot duplicate the vhost-vdpa descriptor: {0}")]
    Dup(std::io::Error),
    #[error("the device refused the features the driver chose")]
    FeaturesRefused,
    #[error("the control queue: {0}")]
    Control(String),
    #[error("pause: {0}")]
    Pause(String),
    #[error("snapshot: {0}")]
    Snapshot(String),
    #[error("restore: {0}")]
    Restore(String),
    #[error("queues= above 1 needs a control queue the VMM serves, which is not built behind the vIOMMU yet: use iommu=off or queues=1")]
    ControlBehindIommu,
}

/// How the device's IOVAs relate to guest addresses; decided once, where
/// the device is wired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Translation {
    /// IOVA = guest physical address; the device reaches all guest RAM and
    /// follows memory hotplug. The guest is not offered ACCESS_PLATFORM.
    Identity,
    /// Behind the vIOMMU: IOVAs are the guest's, the device reaches only
    /// what the guest mapped. The guest is offered ACCESS_PLATFORM.
    Iommu,
}

/// What the user asked of one vDPA device.
#[derive(Clone, Debug)]
pub struct VdpaConfig {
    pub path: PathBuf,
    pub translation: Translation,
    /// Ack VHOST_BACKEND_F_IOTLB_BATCH when offered. Off sends one message
    /// per change, as peers do: a baseline, and the way a device's refusal
    /// reaches the VMM (the kernel ignores a refusal at BATCH_END).
    pub batching: bool,
    /// The type the option asked for (`--net`: net), or `None` for
    /// whatever supported type the device is (`--vdpa`).
    pub expect: Option<DeviceKind>,
    /// An identity-mapped device must reach guest addresses
    /// `0..identity_end` (boot RAM and the hotplug region); 0 checks nothing.
    pub identity_end: u64,
    pub net: NetOptions,
    /// `None`: no block options were given.
    pub block: Option<BlockOptions>,
}

impl VdpaConfig {
    /// A net device as `--net vdpa=PATH` asks for it.
    pub fn net(path: PathBuf, translation: Translation, batching: bool) -> VdpaConfig {
        VdpaConfig {
            path,
            translation,
            batching,
            expect: Some(DeviceKind::Net),
            identity_end: 0,
            net: NetOptions {
                mac: None,
                queue_pairs: 1,
            },
            block: None,
        }
    }
}

/// What a device reported when it was opened: plain data, so negotiation
/// is a pure function of it ([`negotiate`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceProbe {
    pub device_id: u32,
    pub device_features: u64,
    pub backend_features: u64,
    pub iova_first: u64,
    pub iova_last: u64,
    pub config_size: u32,
    /// The first bytes of the config space (at most 256).
    pub config: Vec<u8>,
    /// VHOST_VDPA_GET_VRING_NUM: the largest queue the device takes.
    pub queue_max_size: u16,
    /// VHOST_VDPA_GET_VQS_COUNT, GET_GROUP_NUM, GET_AS_NUM where the
    /// kernel answers them.
    pub virtqueues: Option<u32>,
    pub groups: Option<u32>,
    pub address_spaces: Option<u32>,
    /// VHOST_VDPA_GET_VRING_GROUP of each virtqueue, by index (empty where
    /// the kernel does not answer).
    pub vring_groups: Vec<u32>,
}

/// The per-type layer of a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layer {
    Net(NetLayer),
    Block(BlockLayer),
}

/// Everything known about one vDPA device: plain data, apart from its live
/// handles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VdpaState {
    pub kind: DeviceKind,
    pub layer: Layer,
    pub device_features: u64,
    pub backend_features_offered: u64,
    pub backend_features: u64,
    /// What the VMM last set on the device (VHOST_SET_FEATURES); 0 before
    /// the first start.
    pub device_features_acked: u64,
    pub iova_first: u64,
    pub iova_last: u64,
    pub config_size: u32,
    pub queue_max_size: u16,
    /// Queues the guest sees.
    pub queue_count: u16,
    pub virtqueues: Option<u32>,
    pub groups: Option<u32>,
    pub address_spaces: Option<u32>,
    pub translation: Translation,
    /// The queues the driver started (empty before DRIVER_OK and after a
    /// reset).
    pub active: Vec<QueueConfig>,
    pub activations: u64,
    pub resets: u64,
    pub iotlb_replays: u64,
    /// How the device was stopped, while the VM is paused.
    pub stopped: Option<Stopped>,
    pub pauses: u64,
}

/// Decides, from what the device reported and what the user asked, whether
/// and how the device is presented: its type layer, the backend features to
/// ack, the queues. Every refusal here happens before the guest exists.
pub fn negotiate(config: &VdpaConfig, probe: &DeviceProbe) -> Result<VdpaState, VdpaError> {
    let id = probe.device_id;
    let name = virtio_type_name(id);
    let kind = match (DeviceKind::from_id(id), config.expect) {
        (Some(DeviceKind::Net), _) => DeviceKind::Net,
        (_, Some(DeviceKind::Net)) => return Err(VdpaError::NotNet { id, name }),
        (Some(kind), _) => kind,
        (None, _) => return Err(VdpaError::Unsupported { id, name }),
    };
    let features = probe.device_features;
    if features & VIRTIO_F_VERSION_1 == 0 {
        return Err(VdpaError::Missing {
            what: "VIRTIO_F_VERSION_1",
        });
    }
    if features & VIRTIO_F_ACCESS_PLATFORM == 0 {
        return Err(VdpaError::Missing {
            what: "VIRTIO_F_ACCESS_PLATFORM (its DMA must go through the IOTLB)",
        });
    }
    if probe.backend_features & VHOST_BACKEND_F_IOTLB_MSG_V2 == 0 {
        return Err(VdpaError::Missing {
            what: "VHOST_BACKEND_F_IOTLB_MSG_V2",
        });
    }
    let layer = match kind {
        DeviceKind::Net => {
            if config.block.is_some_and(|b| b.readonly) {
                return Err(VdpaError::ReadonlyNotBlock(kind.name()));
            }
            let can_serve = config.translation == Translation::Identity;
            Layer::Net(NetLayer::new(&config.net, probe, can_serve)?)
        }
        DeviceKind::Block => {
            Layer::Block(BlockLayer::new(&config.block.unwrap_or_default(), probe)?)
        }
    };
    let queue_count = match &layer {
        Layer::Net(net) => net.queue_count(),
        Layer::Block(block) => block.queues,
    };
    // The VMM reads the control queue's rings at guest physical
    // addresses; behind the vIOMMU they would be IOVAs.
    if matches!(&layer, Layer::Net(net) if net.control.is_some())
        && config.translation == Translation::Iommu
    {
        return Err(VdpaError::ControlBehindIommu);
    }
    // A control queue the VMM serves alone is not the device's.
    let device_queues = match &layer {
        Layer::Net(NetLayer {
            control: Some(ControlMode::VmmOnly),
            ..
        }) => queue_count.saturating_sub(1),
        _ => queue_count,
    };
    if let Some(has) = probe.virtqueues {
        if has < u32::from(device_queues) {
            return Err(VdpaError::TooFewVirtqueues {
                needed: device_queues,
                has,
            });
        }
    }
    if probe.queue_max_size == 0 {
        return Err(VdpaError::ZeroQueueSize);
    }
    let reaches = |end: u64| {
        probe.iova_first == 0
            && end
                .checked_sub(1)
                .is_none_or(|last| probe.iova_last >= last)
    };
    if config.translation == Translation::Identity
        && config.identity_end > 0
        && !reaches(config.identity_end)
    {
        return Err(VdpaError::IovaRange {
            first: probe.iova_first,
            last: probe.iova_last,
            end: config.identity_end,
        });
    }
    let batch = match config.batching {
        true => VHOST_BACKEND_F_IOTLB_BATCH,
        false => 0,
    };
    let asid = match &layer {
        Layer::Net(NetLayer {
            control: Some(ControlMode::Shadowed { .. }),
            ..
        }) => VHOST_BACKEND_F_IOTLB_ASID,
        _ => 0,
    };
    // SUSPEND is of use only with RESUME (else a pause resets the device).
    let suspend = VHOST_BACKEND_F_SUSPEND | VHOST_BACKEND_F_RESUME;
    let suspend = match probe.backend_features & suspend == suspend {
        true => suspend,
        false => 0,
    };
    let wanted =
        VHOST_BACKEND_F_IOTLB_MSG_V2 | batch | VHOST_BACKEND_F_IOTLB_PERSIST | asid | suspend;
    Ok(VdpaState {
        kind,
        layer,
        device_features: features,
        backend_features_offered: probe.backend_features,
        backend_features: probe.backend_features & wanted,
        device_features_acked: 0,
        iova_first: probe.iova_first,
        iova_last: probe.iova_last,
        config_size: probe.config_size,
        queue_max_size: probe.queue_max_size,
        queue_count,
        virtqueues: probe.virtqueues,
        groups: probe.groups,
        address_spaces: probe.address_spaces,
        translation: config.translation,
        active: Vec::new(),
        activations: 0,
        resets: 0,
        iotlb_replays: 0,
        stopped: None,
        pauses: 0,
    })
}

impl VdpaState {
    /// The features the guest is offered: the type layer's choice of the
    /// device's, and ACCESS_PLATFORM only behind the vIOMMU.
    pub fn guest_features(&self) -> u64 {
        let platform = match self.translation {
            Translation::Identity => 0,
            Translation::Iommu => VIRTIO_F_ACCESS_PLATFORM,
        };
        let layer = match &self.layer {
            Layer::Net(net) => net.guest_features(self.device_features),
            Layer::Block(block) => block.guest_features(self.device_features),
        };
        layer | (self.device_features & platform)
    }

    /// What the device is told when the guest agreed on `negotiated`: only
    /// bits the device offered (a MAC the VMM answers is not the device's),
    /// and always ACCESS_PLATFORM, since the device's DMA goes through the
    /// IOTLB whether or not the guest knows it.
    pub fn device_features_for(&self, negotiated: u64) -> u64 {
        (negotiated & self.device_features) | (self.device_features & VIRTIO_F_ACCESS_PLATFORM)
    }

    /// A guest read of the config space: the device's bytes (read by
    /// `read`, at an offset that fits), then the layer's overlay. Outside
    /// the device's config space, zeros.
    pub fn read_config(&self, offset: u64, data: &mut [u8], read: impl FnOnce(u32, &mut [u8])) {
        data.fill(0);
        if let Some(at) = self.config_offset(offset, data.len()) {
            read(at, data);
        }
        if let Layer::Net(net) = &self.layer {
            net.overlay_config(offset, data);
        }
    }

    /// `offset` as the kernel takes it, when `len` bytes from it lie in the
    /// device's config space.
    pub fn config_offset(&self, offset: u64, len: usize) -> Option<u32> {
        let end = offset.checked_add(u64::try_from(len).ok()?)?;
        match end <= u64::from(self.config_size) {
            true => u32::try_from(offset).ok(),
            false => None,
        }
    }
}

/// What was negotiated with the kernel, for `info`.
#[derive(Clone, Debug)]
pub struct VdpaInfo {
    pub path: PathBuf,
    pub kind: DeviceKind,
    pub device_id: u32,
    /// What the device offers.
    pub device_features: u64,
    /// What the VMM set on the device at the last start (0 before).
    pub device_features_acked: u64,
    /// What the guest was offered, and what it agreed on.
    pub guest_features_offered: u64,
    pub guest_features: u64,
    pub backend_features_offered: u64,
    pub backend_features: u64,
    pub iova_first: u64,
    pub iova_last: u64,
    pub queue_max_size: u16,
    pub queues: u16,
    pub virtqueues: Option<u32>,
    pub groups: Option<u32>,
    pub address_spaces: Option<u32>,
    pub status: u8,
    pub mappings: Vec<DmaRange>,
    /// What a block device's config said at open.
    pub block: Option<BlockLayer>,
    /// A net device's control queue, where the VMM serves it.
    pub control: Option<ControlReport>,
    /// How the device was stopped, while the VM is paused.
    pub stopped: Option<Stopped>,
}

/// Per-queue state the device reports: where the ring is and how far the
/// device has consumed the avail ring (VHOST_GET_VRING_BASE; `None` when
/// the device was not asked or did not answer in time).
#[derive(Clone, Copy, Debug, Default)]
pub struct QueueReport {
    pub index: u16,
    pub size: u16,
    pub last_avail_idx: Option<u32>,
}

/// Reads a queue's last_avail_idx (VHOST_GET_VRING_BASE) on a vhost-vdpa
/// control descriptor, by number: the seccomp filters bind the ioctl to
/// that number, so a dup would not do. The descriptor stays open for the
/// VM's life (the device is dropped only when the VM ends).
#[derive(Clone, Copy, Debug)]
pub struct VringBaseReader {
    fd: std::os::fd::RawFd,
}

impl VringBaseReader {
    pub fn last_avail_idx(&self, queue: u16) -> std::io::Result<u32> {
        let mut state = vhost_binding::vhost_vring_state {
            index: u32::from(queue),
            num: 0,
        };
        // SAFETY: VHOST_GET_VRING_BASE reads and writes exactly one
        // vhost_vring_state, which `state` is and outlives the call. The
        // ioctl touches no other memory; on a descriptor that is not (or
        // no longer) a vhost device it fails with an errno.
        let ret = unsafe {
            libc::ioctl(
                self.fd,
                vhost_binding::VHOST_GET_VRING_BASE() as _,
                &mut state as *mut vhost_binding::vhost_vring_state,
            )
        };
        match ret {
            0.. => Ok(state.num),
            _ => Err(std::io::Error::last_os_error()),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct VdpaCounters {
    pub dma: DmaCounters,
    pub activations: u64,
    pub resets: u64,
    pub iotlb_replays: u64,
    pub pauses: u64,
    pub queues: Vec<QueueReport>,
}

type Mapper = DmaMapper<VhostVdpaIotlb>;

/// A live vDPA device: its state and the handles that reach the kernel.
pub struct VdpaDevice {
    path: PathBuf,
    state: VdpaState,
    vhost: VhostKernVdpa<Arc<GuestMemoryMmap>>,
    mapper: Arc<Mutex<Mapper>>,
    /// The address spaces and this device's name there: a reset's IOTLB
    /// replay goes through them (see [`VdpaDevice::replay_through`]).
    spaces: Option<(SharedSpaces, String)>,
    /// Stand-in call fd for queues the guest left without a vector.
    no_interrupt: EventFd,
    /// The guest's control queue, where the VMM serves it.
    control: Option<ControlQueue>,
    /// The device's own control queue, where the VMM shadows it.
    shadow: Option<ShadowWiring>,
    /// What the driver started the device with (until its reset): a
    /// resume after a reset starts it again with the same.
    activation: Option<Activation>,
    /// Guest memory, where a pause reads the rings' used indexes.
    memory: Arc<GuestMemoryMmap>,
}

/// The VMM-served control queue: its worker and the net state it keeps.
struct ControlQueue {
    mode: ControlMode,
    worker: QueueWorker<ControlServer<VringEnable>>,
    state: SharedNetState,
}

/// What `info` says of a net device's control queue.
#[derive(Clone, Debug)]
pub struct ControlReport {
    pub mode: &'static str,
    pub state: NetState,
    /// Shadowed: what the device's address space 1 holds (the VMM's own
    /// ring and command buffers, nothing of the guest's).
    pub address_space_1: Option<Vec<DmaRange>>,
}

/// Asks the kernel what the device is (before anything is negotiated).
fn probe_device(vhost: &VhostKernVdpa<Arc<GuestMemoryMmap>>) -> Result<DeviceProbe, VdpaError> {
    let ioctl = |what: &'static str| move |source| VdpaError::Ioctl { what, source };
    let device_id = vhost
        .get_device_id()
        .map_err(ioctl("VHOST_VDPA_GET_DEVICE_ID"))?;
    let device_features = vhost.get_features().map_err(ioctl("VHOST_GET_FEATURES"))?;
    let backend_features = vhost
        .get_backend_features()
        .map_err(ioctl("VHOST_GET_BACKEND_FEATURES"))?;
    let range = vhost
        .get_iova_range()
        .map_err(ioctl("VHOST_VDPA_GET_IOVA_RANGE"))?;
    let config_size = vhost
        .get_config_size()
        .map_err(ioctl("VHOST_VDPA_GET_CONFIG_SIZE"))?;
    let mut config = vec![0u8; config_size.min(PROBED_CONFIG_BYTES) as usize];
    if !config.is_empty() {
        vhost
            .get_config(0, &mut config)
            .map_err(ioctl("VHOST_VDPA_GET_CONFIG"))?;
    }
    let queue_max_size = vhost
        .get_vring_num()
        .map_err(ioctl("VHOST_VDPA_GET_VRING_NUM"))?;
    Ok(DeviceProbe {
        device_id,
        device_features,
        backend_features,
        iova_first: range.first,
        iova_last: range.last,
        config_size,
        config,
        queue_max_size,
        // Older kernels lack these; they only add checks and `info`.
        virtqueues: vhost.get_vqs_count().ok(),
        groups: vhost.get_group_num().ok(),
        address_spaces: vhost.get_as_num().ok(),
        vring_groups: vring_groups(vhost),
    })
}

/// Each virtqueue's group, while the kernel answers (at most 64 asked).
fn vring_groups(vhost: &VhostKernVdpa<Arc<GuestMemoryMmap>>) -> Vec<u32> {
    let count = vhost.get_vqs_count().unwrap_or(0).min(64);
    (0..count)
        .map_while(|index| vhost.get_vring_group(index).ok())
        .collect()
}

impl VdpaDevice {
    /// Opens and claims the device, reads what it is, decides how it is
    /// presented ([`negotiate`]) and acks the backend features.
    pub fn open(
        config: &VdpaConfig,
        memory: Arc<GuestMemoryMmap>,
    ) -> Result<VdpaDevice, VdpaError> {
        let path = config.path.clone();
        let text = path.to_string_lossy().into_owned();
        let mut vhost = VhostKernVdpa::new(&text, memory.clone()).map_err(|e| match e {
            vhost::Error::VhostOpen(source) => VdpaError::Open {
                path: path.clone(),
                source,
            },
            _ => VdpaError::NotVhostVdpa(path.clone()),
        })?;
        // Anything that is not a vhost device refuses its first vhost ioctls.
        vhost
            .set_owner()
            .map_err(|_| VdpaError::NotVhostVdpa(path.clone()))?;
        vhost
            .get_device_id()
            .map_err(|_| VdpaError::NotVhostVdpa(path.clone()))?;
        let probe = probe_device(&vhost)?;
        let state = negotiate(config, &probe)?;
        vhost
            .set_backend_features(state.backend_features)
            .map_err(|source| VdpaError::Ioctl {
                what: "VHOST_SET_BACKEND_FEATURES",
                source,
            })?;
        vhost.set_backend_features_acked(state.backend_features);

        // The engine writes IOTLB messages on its own descriptor.
        // SAFETY: dup(2) on a descriptor we own; the result is checked and
        // owned by the File from here on.
        let fd = unsafe { libc::dup(vhost.as_raw_fd()) };
        if fd < 0 {
            return Err(VdpaError::Dup(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let iotlb_file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let batching = state.backend_features & VHOST_BACKEND_F_IOTLB_BATCH != 0;
        let mapper = DmaMapper::new(
            VhostVdpaIotlb::new(iotlb_file),
            state.iova_first..=state.iova_last,
            batching,
        );
        Ok(VdpaDevice {
            path,
            state,
            vhost,
            mapper: Arc::new(Mutex::new(mapper)),
            spaces: None,
            no_interrupt: EventFd::new(EFD_NONBLOCK).map_err(VdpaError::Dup)?,
            control: None,
            shadow: None,
            activation: None,
            memory,
        })
    }

    /// Whether the guest gets a control queue the VMM serves (call
    /// [`VdpaDevice::serve_control_queue`] before the guest runs).
    pub fn wants_control_queue(&self) -> bool {
        matches!(&self.state.layer, Layer::Net(net) if net.control.is_some())
    }

    /// Starts the worker that serves the guest's control queue (on the
    /// VMM thread: vCPU threads may not create threads). `on_start` runs
    /// first on it (its seccomp filter). Buffers are read and written only
    /// where `translate` says the guest has RAM now.
    pub fn serve_control_queue(
        &mut self,
        memory: Arc<GuestMemoryMmap>,
        translate: Arc<dyn GuestTranslate>,
        on_start: Box<dyn FnOnce() -> Result<(), String> + Send>,
    ) -> std::io::Result<()> {
        let Layer::Net(NetLayer {
            control: Some(mode),
            ..
        }) = self.state.layer
        else {
            return Ok(());
        };
        let state = SharedNetState::default();
        let shadow = match mode {
            ControlMode::Shadowed { .. } => Some(self.map_shadow_queue()?),
            ControlMode::VmmOnly => None,
        };
        let queues = VringEnable {
            fd: self.vhost.as_raw_fd(),
            shadow,
        };
        let server = ControlServer::new(state.clone(), queues, translate);
        let worker = QueueWorker::spawn("net-control", memory, server, on_start)?;
        self.control = Some(ControlQueue {
            mode,
            worker,
            state,
        });
        Ok(())
    }

    /// Allocates the VMM's side of the device's control queue and maps it,
    /// alone, in address space 1: one transaction of the engine, before
    /// the guest runs.
    fn map_shadow_queue(&mut self) -> std::io::Result<ShadowCvq> {
        let (cvq, wiring) = ShadowCvq::new(self.state.iova_first).map_err(std::io::Error::other)?;
        {
            let mut mapper = self.lock_mapper();
            let mut txn = mapper.begin(SHADOW_ASID);
            for range in &wiring.mappings {
                txn.add(*range);
            }
            mapper.commit(txn).map_err(|e| {
                std::io::Error::other(format!(
                    "mapping the VMM's control-queue buffers in address space {SHADOW_ASID}: {e}"
                ))
            })?;
        }
        self.shadow = Some(wiring);
        Ok(cvq)
    }

    /// The control queue's mode and the net state, where the VMM serves it.
    pub fn control_report(&self) -> Option<ControlReport> {
        self.control.as_ref().map(|c| ControlReport {
            mode: c.mode.name(),
            state: lock_state(&c.state).clone(),
            address_space_1: self
                .shadow
                .as_ref()
                .map(|_| self.lock_mapper().mappings(SHADOW_ASID)),
        })
    }

    /// The index of the control queue the VMM serves under `features`, if
    /// the guest negotiated it, and the device's data queue pairs.
    fn control_queue(&self, features: u64) -> Option<(u16, u16)> {
        let Layer::Net(net) = &self.state.layer else {
            return None;
        };
        self.control.as_ref()?;
        if features & VIRTIO_NET_F_CTRL_VQ == 0 {
            return None;
        }
        let pairs = match features & VIRTIO_NET_F_MQ {
            0 => 1,
            _ => net.queue_pairs,
        };
        Some((control_queue_index(features, net.queue_pairs), pairs))
    }

    /// What is known about the device (plain data).
    /// The worker of the guest's control queue, where the VMM serves it: a
    /// pause parks it between two commands.
    pub fn control_parker(&self) -> Option<crate::virtio::queue_worker::Parker> {
        self.control.as_ref().map(|c| c.worker.parker())
    }

    pub fn state(&self) -> &VdpaState {
        &self.state
    }

    pub fn kind(&self) -> DeviceKind {
        self.state.kind
    }

    /// The engine that decides what this device may reach; memory changes
    /// are committed to it as transactions.
    pub fn mapper(&self) -> Arc<Mutex<DmaMapper<VhostVdpaIotlb>>> {
        self.mapper.clone()
    }

    /// Where the device was registered as `id`: a reset's IOTLB replay is
    /// then one transaction of the address spaces, in order with every
    /// other plan and kept in their history.
    pub fn replay_through(&mut self, spaces: SharedSpaces, id: &str) {
        self.spaces = Some((spaces, id.to_string()));
    }

    /// The descriptor every vhost ioctl goes to (the seccomp filters bind
    /// those ioctls to it). IOTLB messages go through a dup of it.
    pub fn control_fd(&self) -> std::os::fd::RawFd {
        self.vhost.as_raw_fd()
    }

    /// What reads the queues' progress without this device: asking is a
    /// round trip to the device (VDUSE: to its userspace process), so it
    /// must not happen under the device's lock.
    pub fn vring_base_reader(&self) -> VringBaseReader {
        VringBaseReader {
            fd: self.vhost.as_raw_fd(),
        }
    }

    /// The indexes of the queues the driver started (empty before
    /// DRIVER_OK and after a reset).
    pub fn active_queues(&self) -> Vec<u16> {
        self.state.active.iter().map(|q| q.index).collect()
    }

    /// How many queues the guest will see.
    pub fn queue_max_sizes_len(&self) -> usize {
        usize::from(self.state.queue_count)
    }

    fn lock_mapper(&self) -> MutexGuard<'_, Mapper> {
        self.mapper.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn info(&self, guest_features: u64) -> VdpaInfo {
        let state = &self.state;
        // Before the mapper's lock below, which the report takes too (a
        // guard in the struct expression lives until its end).
        let control = self.control_report();
        let mappings = self.lock_mapper().mappings(0);
        VdpaInfo {
            path: self.path.clone(),
            kind: state.kind,
            device_id: state.kind.id(),
            device_features: state.device_features,
            device_features_acked: state.device_features_acked,
            guest_features_offered: state.guest_features(),
            guest_features,
            backend_features_offered: state.backend_features_offered,
            backend_features: state.backend_features,
            iova_first: state.iova_first,
            iova_last: state.iova_last,
            queue_max_size: state.queue_max_size,
            queues: state.queue_count,
            virtqueues: state.virtqueues,
            groups: state.groups,
            address_spaces: state.address_spaces,
            status: self.vhost.get_status().unwrap_or(0),
            mappings,
            block: match &state.layer {
                Layer::Block(block) => Some(*block),
                Layer::Net(_) => None,
            },
            control,
            stopped: state.stopped.clone(),
        }
    }

    pub fn counters(&self) -> VdpaCounters {
        let queues = self
            .state
            .active
            .iter()
            .map(|q| QueueReport {
                index: q.index,
                size: q.size,
                // Asked of the device by whoever holds a `VringBaseReader`,
                // never under the lock this device is kept behind.
                last_avail_idx: None,
            })
            .collect();
        VdpaCounters {
            dma: self.lock_mapper().counters(),
            activations: self.state.activations,
            resets: self.state.resets,
            iotlb_replays: self.state.iotlb_replays,
            pauses: self.state.pauses,
            queues,
        }
    }

    pub fn translation(&self) -> Translation {
        self.state.translation
    }

    fn start(&mut self, activation: &Activation) -> Result<(), VdpaError> {
        let control = self.bring_up(activation, &[], 1)?;
        if let Some((index, max_pairs)) = control {
            self.serve_control(activation, index, max_pairs, None)?;
        }
        Ok(())
    }

    /// Takes the device from reset to DRIVER_OK on the driver's rings: each
    /// data queue from its position in `positions` (0 where none is given),
    /// the first `pairs` queue pairs enabled where the VMM serves the
    /// control queue. Returns the guest's control queue (index, most pairs)
    /// where the VMM serves it.
    fn bring_up(
        &mut self,
        activation: &Activation,
        positions: &[QueuePosition],
        pairs: u16,
    ) -> Result<Option<(u16, u16)>, VdpaError> {
        let fail = |what: &'static str, source: vhost::Error| VdpaError::Ioctl { what, source };
        let base = STATUS_ACKNOWLEDGE | STATUS_DRIVER;
        self.vhost
            .set_status(base)
            .map_err(|e| fail("set status", e))?;
        let features = self.state.device_features_for(activation.features);
        self.vhost
            .set_features(features)
            .map_err(|e| fail("VHOST_SET_FEATURES", e))?;
        self.state.device_features_acked = features;
        self.vhost
            .set_status(base | STATUS_FEATURES_OK)
            .map_err(|e| fail("set FEATURES_OK", e))?;
        let status = self.vhost.get_status().map_err(|e| fail("get status", e))?;
        if status & STATUS_FEATURES_OK == 0 {
            return Err(VdpaError::FeaturesRefused);
        }
        let control = self.control_queue(activation.features);
        let is_control = |q: &QueueConfig| control.is_some_and(|(index, _)| q.index == index);
        let data: Vec<(&QueueConfig, &EventFd)> = activation
            .queues
            .iter()
            .zip(&activation.kicks)
            .filter(|(q, _)| !is_control(q))
            .collect();
        for &(queue, kick) in &data {
            let index = usize::from(queue.index);
            self.vhost
                .set_vring_num(index, queue.size)
                .map_err(|e| fail("VHOST_SET_VRING_NUM", e))?;
            set_vring_iova(&self.vhost, queue).map_err(|e| fail("VHOST_SET_VRING_ADDR", e))?;
            let base = positions
                .iter()
                .find(|p| p.index == queue.index)
                .map_or(0, |p| p.used_idx);
            self.vhost
                .set_vring_base(index, base)
                .map_err(|e| fail("VHOST_SET_VRING_BASE", e))?;
            self.vhost
                .set_vring_kick(index, kick)
                .map_err(|e| fail("VHOST_SET_VRING_KICK", e))?;
            let call = activation.interrupt.queue_irqfd(queue.index);
            self.vhost
                .set_vring_call(index, call.as_ref().unwrap_or(&self.no_interrupt))
                .map_err(|e| fail("VHOST_SET_VRING_CALL", e))?;
        }
        if let Some(config_call) = activation.interrupt.config_irqfd() {
            self.vhost
                .set_config_call(&config_call)
                .map_err(|e| fail("VHOST_VDPA_SET_CONFIG_CALL", e))?;
        }
        // Every vring is enabled before DRIVER_OK, which every parent
        // accepts (ENABLE_AFTER_DRIVER_OK is not needed, so not acked);
        // with a control queue, only the first pair's until the guest asks
        // for more (the device must not use the others before).
        let shadowed = matches!(
            &self.state.layer,
            Layer::Net(NetLayer {
                control: Some(ControlMode::Shadowed { .. }),
                ..
            })
        );
        if shadowed && activation.features & VIRTIO_NET_F_CTRL_VQ != 0 {
            self.start_shadow_queue(features)?;
        }
        for &(queue, _) in &data {
            // The device's own control queue keeps the pairs in use.
            let on = control.is_none() || shadowed || queue.index < pairs.saturating_mul(2);
            self.vhost
                .set_vring_enable(usize::from(queue.index), on)
                .map_err(|e| fail("VHOST_VDPA_SET_VRING_ENABLE", e))?;
        }
        self.vhost
            .set_status(base | STATUS_FEATURES_OK | STATUS_DRIVER_OK)
            .map_err(|e| fail("set DRIVER_OK", e))?;
        self.state.active = data.iter().map(|(q, _)| **q).collect();
        Ok(control)
    }

    /// Puts the device's control-queue group in address space 1 and gives
    /// the queue the VMM's ring there (before DRIVER_OK). A reset put the
    /// group back in address space 0; without IOTLB_PERSIST it may also
    /// have dropped address space 1, which is then sent again.
    fn start_shadow_queue(&mut self, device_features: u64) -> Result<(), VdpaError> {
        let fail = |what: &'static str, source: vhost::Error| VdpaError::Ioctl { what, source };
        let Layer::Net(NetLayer {
            control:
                Some(ControlMode::Shadowed {
                    device_queue,
                    group,
                }),
            ..
        }) = self.state.layer
        else {
            return Ok(());
        };
        let Some(wiring) = &self.shadow else {
            return Err(VdpaError::Control(
                "the device's control queue has no buffers".into(),
            ));
        };
        // With MQ the device's control queue follows all its pairs, else
        // the first (which `shadow_mode` chose by the pairs offered).
        let multiqueue = device_features & VIRTIO_NET_F_MQ != 0;
        if multiqueue != (device_queue != 2) {
            return Err(VdpaError::Control(format!(
                "the driver {} multiqueue, which moves the device's control queue from {device_queue}",
                if multiqueue { "took" } else { "declined" }
            )));
        }
        set_group_asid(&self.vhost, group, SHADOW_ASID)
            .map_err(|e| fail("VHOST_VDPA_SET_GROUP_ASID", e))?;
        let persist = self.state.backend_features & VHOST_BACKEND_F_IOTLB_PERSIST != 0;
        if !persist && self.state.resets > 0 {
            self.lock_mapper()
                .replay(SHADOW_ASID)
                .map_err(|e| VdpaError::Control(format!("address space 1 again: {e}")))?;
        }
        wiring
            .clear()
            .map_err(|e| VdpaError::Control(e.to_string()))?;
        let index = usize::from(device_queue);
        let ring = wiring.ring;
        self.vhost
            .set_vring_num(index, ring.size)
            .map_err(|e| fail("VHOST_SET_VRING_NUM", e))?;
        let queue = QueueConfig {
            index: device_queue,
            size: ring.size,
            desc: ring.desc,
            driver: ring.avail,
            device: ring.used,
        };
        set_vring_iova(&self.vhost, &queue).map_err(|e| fail("VHOST_SET_VRING_ADDR", e))?;
        self.vhost
            .set_vring_base(index, 0)
            .map_err(|e| fail("VHOST_SET_VRING_BASE", e))?;
        self.vhost
            .set_vring_kick(index, &wiring.kick)
            .map_err(|e| fail("VHOST_SET_VRING_KICK", e))?;
        self.vhost
            .set_vring_call(index, &wiring.call)
            .map_err(|e| fail("VHOST_SET_VRING_CALL", e))?;
        self.vhost
            .set_vring_enable(index, true)
            .map_err(|e| fail("VHOST_VDPA_SET_VRING_ENABLE", e))
    }

    /// Hands the guest's control queue to the worker, once the device runs:
    /// from the ring's start with the state reset, or (`restored`) from a
    /// saved position with a saved state.
    fn serve_control(
        &mut self,
        activation: &Activation,
        index: u16,
        max_pairs: u16,
        restored: Option<(u16, NetState)>,
    ) -> Result<(), VdpaError> {
        let Some(control) = &self.control else {
            return Ok(());
        };
        let position = activation.queues.iter().position(|q| q.index == index);
        let Some((queue, kick)) = position.and_then(|p| {
            let queue = activation.queues.get(p)?;
            Some((queue, activation.kicks.get(p)?))
        }) else {
            // The driver negotiated the control queue but did not enable
            // it: it cannot send commands, so one pair stays in use.
            return Ok(());
        };
        let gone = |e: crate::virtio::queue_worker::WorkerError| VdpaError::Control(e.to_string());
        let mut ring = queue
            .to_queue(self.state.queue_max_size)
            .map_err(|e| VdpaError::Control(format!("queue {index}: {e}")))?;
        let kick = kick.try_clone().map_err(VdpaError::Dup)?;
        let limits = ControlLimits {
            negotiated: activation.features,
            max_pairs,
            mode: control.mode,
        };
        match restored {
            None => control
                .worker
                .call(move |server| server.activate(limits))
                .map_err(gone)?,
            Some((position, state)) => {
                // Every command the guest had made available up to the
                // used index was answered: the worker goes on from there.
                virtio_queue::QueueT::set_next_avail(&mut ring, position);
                virtio_queue::QueueT::set_next_used(&mut ring, position);
                control
                    .worker
                    .call(move |server| server.activate_restored(limits, state))
                    .map_err(gone)?
            }
        }
        control
            .worker
            .serve(Serve {
                queue: ring,
                index,
                kick,
                interrupt: activation.interrupt.clone(),
            })
            .map_err(gone)
    }
}

/// VHOST_VDPA_SET_GROUP_ASID. (The vhost crate's `set_group_asid`, 0.18,
/// sends VHOST_VDPA_GET_VRING_GROUP instead: the seccomp filter caught it.)
fn set_group_asid(
    vhost: &VhostKernVdpa<Arc<GuestMemoryMmap>>,
    group: u32,
    asid: u32,
) -> Result<(), vhost::Error> {
    let state = vhost_binding::vhost_vring_state {
        index: group,
        num: asid,
    };
    // SAFETY: VHOST_VDPA_SET_GROUP_ASID on our open vhost-vdpa descriptor
    // reads one `struct vhost_vring_state`, which `state` is and which
    // outlives the call; the kernel keeps no pointer to it.
    let ret = unsafe { ioctl_with_ref(vhost, vhost_binding::VHOST_VDPA_SET_GROUP_ASID(), &state) };
    if ret < 0 {
        return Err(vhost::Error::IoctlError(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Hands the device the ring addresses the driver wrote: IOVAs, which are
/// guest physical addresses only without a vIOMMU. (The vhost crate's
/// `set_vring_addr` insists they lie in guest RAM, which guest IOVAs behind
/// an IOMMU need not.)
fn set_vring_iova(
    vhost: &VhostKernVdpa<Arc<GuestMemoryMmap>>,
    queue: &QueueConfig,
) -> Result<(), vhost::Error> {
    let addr = vhost_binding::vhost_vring_addr {
        index: u32::from(queue.index),
        flags: 0,
        desc_user_addr: queue.desc,
        used_user_addr: queue.device,
        avail_user_addr: queue.driver,
        log_guest_addr: 0,
    };
    // SAFETY: VHOST_SET_VRING_ADDR on our open vhost-vdpa descriptor reads
    // one `struct vhost_vring_addr`, which `addr` is and which outlives the
    // call; the kernel keeps no pointer to it.
    let ret = unsafe { ioctl_with_ref(vhost, vhost_binding::VHOST_SET_VRING_ADDR(), &addr) };
    if ret < 0 {
        return Err(vhost::Error::IoctlError(std::io::Error::last_os_error()));
    }
    Ok(())
}

impl VirtioDevice for VdpaDevice {
    fn device_type(&self) -> u32 {
        self.state.kind.id()
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.state.queue_max_size; usize::from(self.state.queue_count)]
    }

    fn features(&self) -> u64 {
        self.state.guest_features()
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        let vhost = &self.vhost;
        self.state.read_config(offset, data, |at, buf| {
            // A failed read leaves zeros; the guest sees an odd config,
            // not a crash.
            let _ = vhost.get_config(at, buf);
        });
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if let Some(at) = self.state.config_offset(offset, data.len()) {
            let _ = self.vhost.set_config(at, data);
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        match self.start(&activation) {
            Ok(()) => {
                self.state.activations += 1;
                self.activation = Some(activation);
                Ok(())
            }
            Err(error) => {
                let _ = self.vhost.set_status(0);
                Err(ActivateError::Backend(Box::new(error)))
            }
        }
    }

    fn reset(&mut self) {
        // The control queue first: no enable may reach the device after
        // its reset, nor the worker touch the old rings.
        if let Some(control) = &self.control {
            let _ = control.worker.stop();
        }
        let _ = self.vhost.set_status(0);
        self.state.active.clear();
        self.activation = None;
        self.state.resets += 1;
        // Without IOTLB_PERSIST a parent may drop its mappings on reset
        // (VDPA_RESET_F_CLEAN_MAP); put back exactly what its space holds.
        let persist = self.state.backend_features & VHOST_BACKEND_F_IOTLB_PERSIST != 0;
        if !persist && replay_after_reset(self.spaces.as_ref()) {
            self.state.iotlb_replays += 1;
        }
    }
}

/// Sends a reset device its space again through the address spaces;
/// whether it was sent. A device in no address space holds nothing.
fn replay_after_reset(spaces: Option<&(SharedSpaces, String)>) -> bool {
    let Some((spaces, id)) = spaces else {
        return false;
    };
    let mut spaces = spaces.lock().unwrap_or_else(|p| p.into_inner());
    DmaSpaces::replay(&mut spaces, id).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::{
        Change, ChangeKind, IotlbMessage, Perm, Plan, RecordingBackend, SharedDmaDevice, SpaceId,
        DEVICE_ASID,
    };

    use block::{VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH};
    use net::{VIRTIO_NET_F_CTRL_MAC_ADDR, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MAC};

    const BASE: u64 = VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM;
    /// What the 6.12 kernel offers over vdpa_sim: MSG_V2, BATCH, ASID,
    /// SUSPEND, RESUME, ENABLE_AFTER_DRIVER_OK, IOTLB_PERSIST.
    const SIM_BACKEND: u64 = VHOST_BACKEND_F_IOTLB_MSG_V2
        | VHOST_BACKEND_F_IOTLB_BATCH
        | VHOST_BACKEND_F_IOTLB_ASID
        | VHOST_BACKEND_F_SUSPEND
        | VHOST_BACKEND_F_RESUME
        | VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK
        | VHOST_BACKEND_F_IOTLB_PERSIST;

    /// vdpa_sim_net: control queue in its own group and address space.
    fn sim_net() -> DeviceProbe {
        DeviceProbe {
            device_id: VIRTIO_ID_NET,
            device_features: BASE
                | VIRTIO_NET_F_MAC
                | VIRTIO_NET_F_CTRL_VQ
                | VIRTIO_NET_F_CTRL_MAC_ADDR,
            backend_features: SIM_BACKEND,
            iova_first: 0,
            iova_last: u64::MAX,
            config_size: 12,
            config: vec![0x52, 0x54, 0, 0xaa, 0xbb, 0xcc, 1, 0, 0, 0, 0xdc, 5],
            queue_max_size: 256,
            virtqueues: Some(3),
            groups: Some(2),
            address_spaces: Some(2),
            // Not asked (an older kernel): the control queue stays hidden.
            vring_groups: Vec::new(),
        }
    }

    /// vdpa_sim_net as 6.12 reports it: rx and tx in group 0, the control
    /// queue alone in group 1.
    fn sim_net_grouped() -> DeviceProbe {
        DeviceProbe {
            vring_groups: vec![0, 0, 1],
            ..sim_net()
        }
    }

    #[test]
    fn a_control_queue_alone_in_its_group_is_shadowed_in_address_space_1() {
        let state = negotiate(&any_type(), &sim_net_grouped()).unwrap();
        let Layer::Net(net) = &state.layer else {
            panic!("not net")
        };
        assert_eq!(
            net.control,
            Some(ControlMode::Shadowed {
                device_queue: 2,
                group: 1
            })
        );
        assert_eq!(state.queue_count, 3, "one pair and the control queue");
        assert_ne!(state.backend_features & VHOST_BACKEND_F_IOTLB_ASID, 0);
        let guest = state.guest_features();
        assert_eq!(
            guest & (VIRTIO_NET_F_CTRL_VQ | VIRTIO_NET_F_CTRL_MAC_ADDR | VIRTIO_NET_F_MQ),
            VIRTIO_NET_F_CTRL_VQ | VIRTIO_NET_F_CTRL_MAC_ADDR
        );
        // The device is told of its control queue too.
        assert_ne!(state.device_features_for(guest) & VIRTIO_NET_F_CTRL_VQ, 0);
        // Its config is the device's: no pairs put over it with one pair.
        let probe = sim_net_grouped();
        let mut data = [0u8; 12];
        state.read_config(0, &mut data, |at, buf| {
            let at = at as usize;
            buf.copy_from_slice(&probe.config[at..at + buf.len()]);
        });
        assert_eq!(data.as_slice(), probe.config.as_slice());

        // Not where the group is shared, there is one address space, the
        // kernel cannot name one, or behind the vIOMMU (the VMM could not
        // read the guest's queue): hidden, as before.
        for probe in [
            DeviceProbe {
                vring_groups: vec![0, 0, 0],
                ..sim_net()
            },
            DeviceProbe {
                address_spaces: Some(1),
                ..sim_net_grouped()
            },
            DeviceProbe {
                backend_features: SIM_BACKEND & !VHOST_BACKEND_F_IOTLB_ASID,
                ..sim_net_grouped()
            },
        ] {
            let state = negotiate(&any_type(), &probe).unwrap();
            assert_eq!(state.queue_count, 2, "{probe:?}");
            assert_eq!(state.backend_features & VHOST_BACKEND_F_IOTLB_ASID, 0);
        }
        let behind = VdpaConfig {
            translation: Translation::Iommu,
            ..any_type()
        };
        assert_eq!(
            negotiate(&behind, &sim_net_grouped()).unwrap().queue_count,
            2
        );
        // More pairs than the device has are refused.
        let two = VdpaConfig {
            net: NetOptions {
                mac: None,
                queue_pairs: 2,
            },
            ..any_type()
        };
        assert!(matches!(
            negotiate(&two, &sim_net_grouped()),
            Err(VdpaError::Queues {
                requested: 2,
                offered: 1
            })
        ));
    }

    fn sim_blk() -> DeviceProbe {
        let mut config = vec![0u8; 60];
        config[0..8].copy_from_slice(&(128u64 << 11).to_le_bytes());
        config[20..24].copy_from_slice(&512u32.to_le_bytes());
        DeviceProbe {
            device_id: VIRTIO_ID_BLOCK,
            device_features: BASE | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH,
            config_size: 60,
            config,
            virtqueues: Some(1),
            groups: Some(1),
            address_spaces: Some(1),
            ..sim_net()
        }
    }

    /// `--vdpa path=...`: any supported type, identity-mapped, 1 GiB of
    /// guest addresses to reach.
    fn any_type() -> VdpaConfig {
        VdpaConfig {
            expect: None,
            identity_end: 1 << 30,
            ..VdpaConfig::net("/dev/vhost-vdpa-0".into(), Translation::Identity, true)
        }
    }

    #[test]
    fn the_device_type_comes_from_the_device() {
        let net = negotiate(&any_type(), &sim_net()).unwrap();
        assert_eq!(net.kind, DeviceKind::Net);
        assert_eq!(
            net.queue_count, 2,
            "one pair; the control queue is not shown"
        );
        let blk = negotiate(&any_type(), &sim_blk()).unwrap();
        assert_eq!(blk.kind, DeviceKind::Block);
        assert_eq!(blk.queue_count, 1);
        assert!(matches!(blk.layer, Layer::Block(b) if b.blk_size == Some(512)));

        let console = DeviceProbe {
            device_id: 3,
            ..sim_net()
        };
        let error = negotiate(&any_type(), &console).unwrap_err();
        assert_eq!(
            error.to_string(),
            "device type 3 (console) is not supported (net, block are)"
        );
        let error = negotiate(
            &any_type(),
            &DeviceProbe {
                device_id: 999,
                ..sim_net()
            },
        );
        assert!(matches!(
            error,
            Err(VdpaError::Unsupported {
                id: 999,
                name: "unknown"
            })
        ));

        // --net asks for a net device, and says so of a disk.
        let as_net = VdpaConfig {
            expect: Some(DeviceKind::Net),
            ..any_type()
        };
        let error = negotiate(&as_net, &sim_blk()).unwrap_err();
        assert!(
            matches!(
                error,
                VdpaError::NotNet {
                    id: 2,
                    name: "block"
                }
            ),
            "{error}"
        );
        assert!(negotiate(&as_net, &sim_net()).is_ok());
    }

    #[test]
    fn a_device_without_version_1_access_platform_or_msg_v2_is_refused() {
        for (features, backend, what) in [
            (VIRTIO_F_ACCESS_PLATFORM, SIM_BACKEND, "VIRTIO_F_VERSION_1"),
            (VIRTIO_F_VERSION_1, SIM_BACKEND, "VIRTIO_F_ACCESS_PLATFORM"),
            (
                BASE,
                VHOST_BACKEND_F_IOTLB_BATCH,
                "VHOST_BACKEND_F_IOTLB_MSG_V2",
            ),
        ] {
            let probe = DeviceProbe {
                device_features: features,
                backend_features: backend,
                ..sim_net()
            };
            let error = negotiate(&any_type(), &probe).unwrap_err();
            assert!(error.to_string().contains(what), "{error}");
        }
    }

    #[test]
    fn only_the_backend_features_the_vmm_handles_are_acked() {
        let state = negotiate(&any_type(), &sim_net()).unwrap();
        assert_eq!(state.backend_features_offered, SIM_BACKEND);
        // SUSPEND and RESUME together: a pause suspends the device.
        let suspend = VHOST_BACKEND_F_SUSPEND | VHOST_BACKEND_F_RESUME;
        assert_eq!(
            state.backend_features,
            VHOST_BACKEND_F_IOTLB_MSG_V2
                | VHOST_BACKEND_F_IOTLB_BATCH
                | VHOST_BACKEND_F_IOTLB_PERSIST
                | suspend
        );
        let unbatched = VdpaConfig {
            batching: false,
            ..any_type()
        };
        let state = negotiate(&unbatched, &sim_net()).unwrap();
        assert_eq!(
            state.backend_features,
            VHOST_BACKEND_F_IOTLB_MSG_V2 | VHOST_BACKEND_F_IOTLB_PERSIST | suspend
        );
        // SUSPEND without RESUME (VDUSE 7.3) is of no use to a pause: a
        // device that cannot go on where it stopped is reset instead.
        let suspend_only = DeviceProbe {
            backend_features: SIM_BACKEND & !VHOST_BACKEND_F_RESUME,
            ..sim_net()
        };
        let state = negotiate(&any_type(), &suspend_only).unwrap();
        assert_eq!(state.backend_features & suspend, 0);
        // VDUSE 6.12: MSG_V2, BATCH, ASID; nothing acked that is not offered.
        let vduse = DeviceProbe {
            backend_features: 0xe,
            ..sim_net()
        };
        let state = negotiate(&any_type(), &vduse).unwrap();
        assert_eq!(
            state.backend_features,
            VHOST_BACKEND_F_IOTLB_MSG_V2 | VHOST_BACKEND_F_IOTLB_BATCH
        );
        assert_eq!((state.groups, state.address_spaces), (Some(2), Some(2)));
    }

    #[test]
    fn an_identity_device_must_reach_all_guest_ram_and_the_hotplug_region() {
        let narrow = DeviceProbe {
            iova_last: (1 << 30) - 2,
            ..sim_net()
        };
        let error = negotiate(&any_type(), &narrow).unwrap_err();
        assert!(
            matches!(error, VdpaError::IovaRange { end, .. } if end == 1 << 30),
            "{error}"
        );
        assert!(error.to_string().contains("0x0..=0x3ffffffe"), "{error}");
        let exact = DeviceProbe {
            iova_last: (1 << 30) - 1,
            ..sim_net()
        };
        assert!(negotiate(&any_type(), &exact).is_ok());
        let offset = DeviceProbe {
            iova_first: 0x1000,
            ..sim_net()
        };
        assert!(matches!(
            negotiate(&any_type(), &offset),
            Err(VdpaError::IovaRange { .. })
        ));
        // Behind the vIOMMU the guest picks IOVAs inside the range.
        let behind = VdpaConfig {
            translation: Translation::Iommu,
            ..any_type()
        };
        assert!(negotiate(&behind, &narrow).is_ok());
    }

    #[test]
    fn queues_the_device_cannot_hold_are_refused() {
        let one = DeviceProbe {
            virtqueues: Some(1),
            ..sim_net()
        };
        let error = negotiate(&any_type(), &one).unwrap_err();
        assert!(matches!(
            error,
            VdpaError::TooFewVirtqueues { needed: 2, has: 1 }
        ));
        let unknown = DeviceProbe {
            virtqueues: None,
            ..sim_net()
        };
        assert!(negotiate(&any_type(), &unknown).is_ok());
        let empty = DeviceProbe {
            queue_max_size: 0,
            ..sim_net()
        };
        assert!(matches!(
            negotiate(&any_type(), &empty),
            Err(VdpaError::ZeroQueueSize)
        ));
    }

    #[test]
    fn readonly_is_for_block_devices_only() {
        let readonly = VdpaConfig {
            block: Some(BlockOptions { readonly: true }),
            ..any_type()
        };
        let error = negotiate(&readonly, &sim_net()).unwrap_err();
        assert!(
            matches!(error, VdpaError::ReadonlyNotBlock("net")),
            "{error}"
        );
    }

    #[test]
    fn access_platform_reaches_the_guest_only_behind_the_viommu_and_the_device_always() {
        let identity = negotiate(&any_type(), &sim_net()).unwrap();
        let guest = identity.guest_features();
        assert_eq!(guest, VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC);
        assert_eq!(guest & VIRTIO_NET_F_CTRL_VQ, 0);
        assert_eq!(
            identity.device_features_for(guest),
            guest | VIRTIO_F_ACCESS_PLATFORM
        );

        let behind = VdpaConfig {
            translation: Translation::Iommu,
            ..any_type()
        };
        let iommu = negotiate(&behind, &sim_net()).unwrap();
        assert_ne!(iommu.guest_features() & VIRTIO_F_ACCESS_PLATFORM, 0);

        // A user MAC on a device without one: the guest sees MAC, the
        // device is not told of a feature it never offered.
        let no_mac = DeviceProbe {
            device_features: BASE,
            ..sim_net()
        };
        let with_mac = VdpaConfig {
            net: NetOptions {
                mac: Some([2, 0, 0, 0, 0, 1]),
                queue_pairs: 1,
            },
            ..any_type()
        };
        let state = negotiate(&with_mac, &no_mac).unwrap();
        let guest = state.guest_features();
        assert_ne!(guest & VIRTIO_NET_F_MAC, 0);
        assert_eq!(
            state.device_features_for(guest),
            VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM
        );
    }

    #[test]
    fn a_block_devices_config_is_passed_through() {
        let probe = sim_blk();
        let state = negotiate(&any_type(), &probe).unwrap();
        let device = probe.config.clone();
        let read = |offset: u64, len: usize| {
            let mut data = vec![0xff; len];
            state.read_config(offset, &mut data, |at, buf| {
                let at = at as usize;
                buf.copy_from_slice(&device[at..at + buf.len()]);
            });
            data
        };
        assert_eq!(
            read(0, 8),
            (128u64 << 11).to_le_bytes().to_vec(),
            "capacity"
        );
        assert_eq!(read(20, 4), 512u32.to_le_bytes().to_vec(), "blk_size");
        assert_eq!(read(0, 60), device, "all of it, untouched");
        // Past the end of the device's config: zeros, the device not asked.
        assert_eq!(read(58, 4), vec![0; 4]);
        assert_eq!(read(u64::MAX, 2), vec![0; 2]);
        assert_eq!(state.config_offset(u64::from(u32::MAX) + 1, 0), None);
    }

    #[test]
    fn a_net_devices_config_is_passed_through_under_the_users_mac() {
        let with_mac = VdpaConfig {
            net: NetOptions {
                mac: Some([2, 0, 0, 0, 0, 1]),
                queue_pairs: 1,
            },
            ..any_type()
        };
        let probe = sim_net();
        let state = negotiate(&with_mac, &probe).unwrap();
        let mut data = [0u8; 12];
        state.read_config(0, &mut data, |at, buf| {
            let at = at as usize;
            buf.copy_from_slice(&probe.config[at..at + buf.len()]);
        });
        assert_eq!(data, [2, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0xdc, 5]);
    }

    #[test]
    fn a_reset_replay_is_one_transaction_of_the_spaces_and_is_recorded() {
        let device = Arc::new(Mutex::new(DmaMapper::new(
            RecordingBackend::new(),
            0..=u64::MAX,
            true,
        )));
        let mut spaces = DmaSpaces::new();
        let shared: SharedDmaDevice = device.clone();
        spaces.register("net0", shared).unwrap();
        let ram = DmaRange::new(0, 1 << 30, 0x7f00_0000_0000, Perm::ReadWrite);
        let mut change = Change::new();
        change.add(ram);
        let mut plan = Plan::new(ChangeKind::BootMemory);
        plan.change(SpaceId::IDENTITY, change)
            .attach("net0", Some(SpaceId::IDENTITY));
        spaces.commit(plan).unwrap();
        device.lock().unwrap().backend_mut().take_messages();
        let spaces = spaces.shared();
        let wired = (spaces.clone(), "net0".to_string());

        assert!(replay_after_reset(Some(&wired)));
        let asid = DEVICE_ASID;
        assert_eq!(
            device.lock().unwrap().backend_mut().take_messages(),
            vec![
                IotlbMessage::BatchBegin { asid },
                IotlbMessage::Invalidate {
                    asid,
                    iova: 0,
                    size: 1 << 30
                },
                IotlbMessage::Update { asid, range: ram },
                IotlbMessage::BatchEnd { asid },
            ]
        );
        let history = spaces.lock().unwrap().history();
        let last = history.last().unwrap();
        assert_eq!(last.kind, ChangeKind::Replay);
        assert_eq!(last.added, vec![(0, 1 << 30)]);
        assert_eq!(last.devices.len(), 1);
        assert_eq!(last.devices[0].messages(), 4);

        // A refusal is recorded too, and the replay is not counted.
        device.lock().unwrap().backend_mut().fail_nth(2);
        assert!(!replay_after_reset(Some(&wired)));
        let history = spaces.lock().unwrap().history();
        assert!(history.last().unwrap().error.is_some());
        assert!(!replay_after_reset(None), "no spaces, nothing to replay");
    }
}
