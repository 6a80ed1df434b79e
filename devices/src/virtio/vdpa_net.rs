//! virtio-net whose data path is a vDPA device, reached through the kernel's
//! vhost-vdpa (/dev/vhost-vdpa-N).
//!
//! The VMM only negotiates and configures: queue notifications go from KVM
//! ioeventfds straight to the device (kick fds), interrupts from the device
//! straight to KVM irqfds (call fds), and what memory the device may reach is
//! decided by the DMA-mapping engine, which this device owns and shares with
//! whoever changes guest memory.

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
use crate::dma::{DmaCounters, DmaMapper, DmaRange, DmaSpaces, SharedSpaces, VhostVdpaIotlb};

pub const VIRTIO_ID_NET: u32 = 1;

const VHOST_BACKEND_F_IOTLB_MSG_V2: u64 = 1 << 0x1;
const VHOST_BACKEND_F_IOTLB_BATCH: u64 = 1 << 0x2;
const VHOST_BACKEND_F_IOTLB_PERSIST: u64 = 1 << 0x8;

const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
const VIRTIO_NET_F_MTU: u64 = 1 << 3;
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
const VIRTIO_NET_F_GUEST_ECN: u64 = 1 << 9;
const VIRTIO_NET_F_GUEST_UFO: u64 = 1 << 10;
const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
const VIRTIO_NET_F_HOST_ECN: u64 = 1 << 13;
const VIRTIO_NET_F_HOST_UFO: u64 = 1 << 14;
const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << 17;
const VIRTIO_NET_F_MQ: u64 = 1 << 22;
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Features the guest may see when the device offers them. Anything else
/// (packed rings, features this VMM does not understand) stays hidden.
/// ACCESS_PLATFORM is decided by [`Translation`]: offered behind a vIOMMU,
/// hidden (and acked towards the device on the guest's behalf) otherwise.
const GUEST_VISIBLE_FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_MTU
    | VIRTIO_NET_F_MAC
    | VIRTIO_NET_F_GUEST_TSO4
    | VIRTIO_NET_F_GUEST_TSO6
    | VIRTIO_NET_F_GUEST_ECN
    | VIRTIO_NET_F_GUEST_UFO
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_HOST_TSO6
    | VIRTIO_NET_F_HOST_ECN
    | VIRTIO_NET_F_HOST_UFO
    | VIRTIO_NET_F_MRG_RXBUF
    | VIRTIO_NET_F_STATUS
    | VIRTIO_RING_F_INDIRECT_DESC
    | VIRTIO_RING_F_EVENT_IDX;

/// Offset of `mac` and `max_virtqueue_pairs` in struct virtio_net_config.
const CONFIG_MAC: u64 = 0;
const CONFIG_MAX_VQ_PAIRS: u64 = 8;

#[derive(Debug, thiserror::Error)]
pub enum VdpaError {
    #[error("cannot open '{path}': {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("'{0}' is not a vhost-vdpa device")]
    NotVhostVdpa(PathBuf),
    #[error("'{path}' is a vDPA device of virtio type {id}, not a network device (type 1)")]
    NotNet { path: PathBuf, id: u32 },
    #[error("vhost-vdpa device '{path}' does not offer {what}, which this VMM needs")]
    Missing { path: PathBuf, what: &'static str },
    #[error("vhost-vdpa device '{path}': {what} failed: {source}")]
    Ioctl {
        path: PathBuf,
        what: &'static str,
        source: vhost::Error,
    },
    #[error("{requested} queue pairs requested for '{path}' (it offers {offered}); this VMM drives one pair: multiqueue needs the control queue, not modelled yet")]
    Queues {
        path: PathBuf,
        requested: u16,
        offered: u16,
    },
    #[error("cannot duplicate the vhost-vdpa descriptor: {0}")]
    Dup(std::io::Error),
    #[error("vhost-vdpa device '{path}' refused the features the driver chose")]
    FeaturesRefused { path: PathBuf },
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

#[derive(Clone, Debug)]
pub struct VdpaNetConfig {
    pub path: PathBuf,
    pub mac: Option<[u8; 6]>,
    pub queue_pairs: u16,
    pub translation: Translation,
    /// Ack VHOST_BACKEND_F_IOTLB_BATCH when offered. Off sends one message
    /// per change, as peers do: a baseline, and the way a device's refusal
    /// reaches the VMM (the kernel ignores a refusal at BATCH_END).
    pub batching: bool,
}

/// What was negotiated with the kernel, for `info`.
#[derive(Clone, Debug)]
pub struct VdpaNetInfo {
    pub path: PathBuf,
    pub device_features: u64,
    pub guest_features: u64,
    pub backend_features: u64,
    pub iova_first: u64,
    pub iova_last: u64,
    pub queue_max_size: u16,
    pub queues: u16,
    pub status: u8,
    pub mappings: Vec<DmaRange>,
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
pub struct VdpaNetCounters {
    pub dma: DmaCounters,
    pub activations: u64,
    pub resets: u64,
    pub iotlb_replays: u64,
    pub queues: Vec<QueueReport>,
}

type Mapper = DmaMapper<VhostVdpaIotlb>;

pub struct VdpaNet {
    path: PathBuf,
    vhost: VhostKernVdpa<Arc<GuestMemoryMmap>>,
    mapper: Arc<Mutex<Mapper>>,
    device_features: u64,
    backend_features: u64,
    iova_first: u64,
    iova_last: u64,
    config_size: u32,
    queue_max_size: u16,
    queue_count: u16,
    mac: Option<[u8; 6]>,
    translation: Translation,
    active: Vec<QueueConfig>,
    activations: u64,
    resets: u64,
    iotlb_replays: u64,
    /// The address spaces and this device's name there: a reset's IOTLB
    /// replay goes through them (see [`VdpaNet::replay_through`]).
    spaces: Option<(SharedSpaces, String)>,
    /// Stand-in call fd for queues the guest left without a vector.
    no_interrupt: EventFd,
}

impl VdpaNet {
    /// Opens and claims the device, checks it is a vhost-vdpa net device
    /// and negotiates the backend features.
    pub fn open(
        config: &VdpaNetConfig,
        memory: Arc<GuestMemoryMmap>,
    ) -> Result<VdpaNet, VdpaError> {
        let path = config.path.clone();
        let text = path.to_string_lossy().into_owned();
        let ioctl = |what: &'static str| {
            let path = path.clone();
            move |source| VdpaError::Ioctl { path, what, source }
        };
        let mut vhost = VhostKernVdpa::new(&text, memory).map_err(|e| match e {
            vhost::Error::VhostOpen(source) => VdpaError::Open {
                path: path.clone(),
                source,
            },
            _ => VdpaError::NotVhostVdpa(path.clone()),
        })?;
        // Anything that is not a vhost device refuses its first vhost ioctl.
        vhost
            .set_owner()
            .map_err(|_| VdpaError::NotVhostVdpa(path.clone()))?;
        let id = vhost
            .get_device_id()
            .map_err(|_| VdpaError::NotVhostVdpa(path.clone()))?;
        if id != VIRTIO_ID_NET {
            return Err(VdpaError::NotNet { path, id });
        }
        let device_features = vhost.get_features().map_err(ioctl("VHOST_GET_FEATURES"))?;
        if device_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(VdpaError::Missing {
                path,
                what: "VIRTIO_F_VERSION_1",
            });
        }
        let offered_backend = vhost
            .get_backend_features()
            .map_err(ioctl("VHOST_GET_BACKEND_FEATURES"))?;
        if offered_backend & VHOST_BACKEND_F_IOTLB_MSG_V2 == 0 {
            return Err(VdpaError::Missing {
                path,
                what: "VHOST_BACKEND_F_IOTLB_MSG_V2",
            });
        }
        let batch = match config.batching {
            true => VHOST_BACKEND_F_IOTLB_BATCH,
            false => 0,
        };
        let backend_features = offered_backend
            & (VHOST_BACKEND_F_IOTLB_MSG_V2 | batch | VHOST_BACKEND_F_IOTLB_PERSIST);
        vhost
            .set_backend_features(backend_features)
            .map_err(ioctl("VHOST_SET_BACKEND_FEATURES"))?;
        vhost.set_backend_features_acked(backend_features);
        let range = vhost
            .get_iova_range()
            .map_err(ioctl("VHOST_VDPA_GET_IOVA_RANGE"))?;
        let config_size = vhost
            .get_config_size()
            .map_err(ioctl("VHOST_VDPA_GET_CONFIG_SIZE"))?;
        let queue_max_size = vhost
            .get_vring_num()
            .map_err(ioctl("VHOST_VDPA_GET_VRING_NUM"))?;

        let offered_pairs = if device_features & VIRTIO_NET_F_MQ != 0
            && device_features & VIRTIO_NET_F_CTRL_VQ != 0
        {
            let mut pairs = [0u8; 2];
            vhost
                .get_config(CONFIG_MAX_VQ_PAIRS as u32, &mut pairs)
                .map_err(ioctl("VHOST_VDPA_GET_CONFIG"))?;
            u16::from_le_bytes(pairs).max(1)
        } else {
            1
        };
        // Multiqueue also needs the control queue, which this VMM does not
        // model yet: refuse rather than pretend.
        if config.queue_pairs != 1 {
            return Err(VdpaError::Queues {
                path,
                requested: config.queue_pairs,
                offered: offered_pairs,
            });
        }

        // The engine writes IOTLB messages on its own descriptor.
        // SAFETY: dup(2) on a descriptor we own; the result is checked and
        // owned by the File from here on.
        let fd = unsafe { libc::dup(vhost.as_raw_fd()) };
        if fd < 0 {
            return Err(VdpaError::Dup(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let iotlb_file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let batching = backend_features & VHOST_BACKEND_F_IOTLB_BATCH != 0;
        let mapper = DmaMapper::new(
            VhostVdpaIotlb::new(iotlb_file),
            range.first..=range.last,
            batching,
        );
        Ok(VdpaNet {
            path,
            vhost,
            mapper: Arc::new(Mutex::new(mapper)),
            device_features,
            backend_features,
            iova_first: range.first,
            iova_last: range.last,
            config_size,
            queue_max_size,
            queue_count: 2 * config.queue_pairs,
            mac: config.mac,
            translation: config.translation,
            active: Vec::new(),
            activations: 0,
            resets: 0,
            iotlb_replays: 0,
            spaces: None,
            no_interrupt: EventFd::new(EFD_NONBLOCK).map_err(VdpaError::Dup)?,
        })
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
        self.active.iter().map(|q| q.index).collect()
    }

    /// How many queues the guest will see.
    pub fn queue_max_sizes_len(&self) -> usize {
        usize::from(self.queue_count)
    }

    fn lock_mapper(&self) -> MutexGuard<'_, Mapper> {
        self.mapper.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn info(&self, guest_features: u64) -> VdpaNetInfo {
        VdpaNetInfo {
            path: self.path.clone(),
            device_features: self.device_features,
            guest_features,
            backend_features: self.backend_features,
            iova_first: self.iova_first,
            iova_last: self.iova_last,
            queue_max_size: self.queue_max_size,
            queues: self.queue_count,
            status: self.vhost.get_status().unwrap_or(0),
            mappings: self.lock_mapper().mappings(0),
        }
    }

    pub fn counters(&self) -> VdpaNetCounters {
        let queues = self
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
        VdpaNetCounters {
            dma: self.lock_mapper().counters(),
            activations: self.activations,
            resets: self.resets,
            iotlb_replays: self.iotlb_replays,
            queues,
        }
    }

    pub fn translation(&self) -> Translation {
        self.translation
    }

    fn start(&mut self, activation: &Activation) -> Result<(), VdpaError> {
        let fail = |what: &'static str, source: vhost::Error| VdpaError::Ioctl {
            path: self.path.clone(),
            what,
            source,
        };
        let base = STATUS_ACKNOWLEDGE | STATUS_DRIVER;
        self.vhost
            .set_status(base)
            .map_err(|e| fail("set status", e))?;
        let platform = self.device_features & VIRTIO_F_ACCESS_PLATFORM;
        self.vhost
            .set_features(activation.features | platform)
            .map_err(|e| fail("VHOST_SET_FEATURES", e))?;
        self.vhost
            .set_status(base | STATUS_FEATURES_OK)
            .map_err(|e| fail("set FEATURES_OK", e))?;
        let status = self.vhost.get_status().map_err(|e| fail("get status", e))?;
        if status & STATUS_FEATURES_OK == 0 {
            return Err(VdpaError::FeaturesRefused {
                path: self.path.clone(),
            });
        }
        for (queue, kick) in activation.queues.iter().zip(&activation.kicks) {
            let index = usize::from(queue.index);
            self.vhost
                .set_vring_num(index, queue.size)
                .map_err(|e| fail("VHOST_SET_VRING_NUM", e))?;
            set_vring_iova(&self.vhost, queue).map_err(|e| fail("VHOST_SET_VRING_ADDR", e))?;
            self.vhost
                .set_vring_base(index, 0)
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
        for queue in &activation.queues {
            self.vhost
                .set_vring_enable(usize::from(queue.index), true)
                .map_err(|e| fail("VHOST_VDPA_SET_VRING_ENABLE", e))?;
        }
        self.vhost
            .set_status(base | STATUS_FEATURES_OK | STATUS_DRIVER_OK)
            .map_err(|e| fail("set DRIVER_OK", e))?;
        self.active = activation.queues.clone();
        Ok(())
    }
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

impl VirtioDevice for VdpaNet {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.queue_max_size; usize::from(self.queue_count)]
    }

    fn features(&self) -> u64 {
        let mac = if self.mac.is_some() {
            VIRTIO_NET_F_MAC
        } else {
            0
        };
        let platform = match self.translation {
            Translation::Identity => 0,
            Translation::Iommu => VIRTIO_F_ACCESS_PLATFORM,
        };
        (self.device_features & (GUEST_VISIBLE_FEATURES | platform)) | mac
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let end = offset.checked_add(data.len() as u64);
        if end.is_some_and(|end| end <= u64::from(self.config_size)) {
            // A failed read leaves zeros; the guest sees an odd config, not a crash.
            let _ = self.vhost.get_config(offset as u32, data);
        }
        if let Some(mac) = self.mac {
            for (i, byte) in data.iter_mut().enumerate() {
                let at = offset.checked_add(i as u64);
                if let Some(m) = at.and_then(|at| at.checked_sub(CONFIG_MAC)) {
                    if let Some(value) = usize::try_from(m).ok().and_then(|m| mac.get(m)) {
                        *byte = *value;
                    }
                }
            }
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let end = offset.checked_add(data.len() as u64);
        if end.is_some_and(|end| end <= u64::from(self.config_size)) {
            let _ = self.vhost.set_config(offset as u32, data);
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        match self.start(&activation) {
            Ok(()) => {
                self.activations += 1;
                Ok(())
            }
            Err(error) => {
                let _ = self.vhost.set_status(0);
                Err(ActivateError::Backend(Box::new(error)))
            }
        }
    }

    fn reset(&mut self) {
        let _ = self.vhost.set_status(0);
        self.active.clear();
        self.resets += 1;
        // Without IOTLB_PERSIST a parent may drop its mappings on reset
        // (VDPA_RESET_F_CLEAN_MAP); put back exactly what its space holds.
        let persist = self.backend_features & VHOST_BACKEND_F_IOTLB_PERSIST != 0;
        if !persist && replay_after_reset(self.spaces.as_ref()) {
            self.iotlb_replays += 1;
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
