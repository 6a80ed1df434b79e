//! Bring-up of vhost-vdpa devices, net and block alike: open and negotiate
//! with the kernel (the device says what type it is), decide how the device
//! is translated, attach it to its address space, and plug it into the PCI
//! segment. The device manager keeps each as a [`VdpaHandle`], whatever its
//! type, so counters, `info`, reset replay, hotplug and the vIOMMU treat
//! them alike.

use std::ops::RangeInclusive;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use devices::dma::{
    ChangeKind, DeviceReport, IotlbMessage, Plan, SharedDmaDevice, SharedSpaces, SpaceError,
    SpaceId,
};
use devices::virtio::pci::VirtioPciDevice;
use devices::virtio::vdpa::block::BlockOptions;
use devices::virtio::vdpa::net::NetOptions;
use devices::virtio::vdpa::{DeviceKind, Translation, VdpaConfig, VdpaDevice, VdpaError};

use super::device_query::QueriedDevice;
use super::lock;
use super::memlock::MemlockStatus;
use super::pci::{plug_virtio, PciWiring, PlugError, Plugged};
use crate::config::{NetConfig, VdpaDeviceConfig};
use crate::seccomp::{self, FilterFds, ThreadKind};
use crate::vstate::memory::GuestRam;
use devices::dma::GuestTranslate;

#[derive(Debug, thiserror::Error)]
pub enum VdpaSetupError {
    #[error("{option}{}: {source}", path.display())]
    Device {
        option: &'static str,
        path: PathBuf,
        /// Boxed: the errors are large and rare.
        source: Box<VdpaError>,
    },
    #[error("{option}{}: cannot map guest memory: {source}{hint}", path.display())]
    Map {
        option: &'static str,
        path: PathBuf,
        source: Box<SpaceError>,
        /// What the memlock limit has to do with it, when it may.
        hint: String,
    },
    #[error(transparent)]
    Plug(#[from] PlugError),
    #[error("{option}{}: cannot start its control-queue worker: {reason}", path.display())]
    ControlQueue {
        option: &'static str,
        path: PathBuf,
        reason: String,
    },
}

pub type VdpaPciDevice = VirtioPciDevice<VdpaDevice>;

/// A running vDPA device, as the device manager keeps it.
#[derive(Clone)]
pub struct VdpaHandle {
    pub id: String,
    pub kind: DeviceKind,
    pub slot: u8,
    pub pci: Arc<Mutex<VdpaPciDevice>>,
    /// What attaching it sent: boot RAM for an identity device, nothing
    /// for one behind the vIOMMU (the guest decides what it reaches).
    pub boot_mapping: DeviceReport,
    /// Behind the vIOMMU rather than identity-mapped.
    pub behind_iommu: bool,
    /// What the device can address (VHOST_VDPA_GET_IOVA_RANGE).
    pub iova_range: RangeInclusive<u64>,
    /// Where its vhost ioctls go, for the seccomp filters.
    pub control_fd: RawFd,
    /// How the API learns its queues' progress without its lock.
    pub queries: QueriedDevice,
}

/// One device as an option asked for it.
#[derive(Clone, Debug)]
pub struct VdpaRequest {
    /// How the option names the device in messages: "--net vdpa=" or
    /// "--vdpa path=".
    pub option: &'static str,
    pub config: VdpaConfig,
}

fn translation(iommu: bool) -> Translation {
    match iommu {
        true => Translation::Iommu,
        false => Translation::Identity,
    }
}

impl VdpaRequest {
    /// `--net vdpa=PATH,...`: a net device, as before `--vdpa` existed.
    pub fn from_net(config: &NetConfig, identity_end: u64) -> VdpaRequest {
        VdpaRequest {
            option: "--net vdpa=",
            config: VdpaConfig {
                path: config.vdpa_path.clone(),
                translation: translation(config.iommu),
                batching: config.iotlb_batch,
                expect: Some(DeviceKind::Net),
                identity_end,
                net: NetOptions {
                    mac: config.mac,
                    queue_pairs: config.queue_pairs,
                },
                block: None,
            },
        }
    }

    /// `--vdpa path=PATH,...`: whatever supported type the device is.
    pub fn from_vdpa(config: &VdpaDeviceConfig, identity_end: u64) -> VdpaRequest {
        VdpaRequest {
            option: "--vdpa ",
            config: VdpaConfig {
                path: config.path.clone(),
                translation: translation(config.iommu),
                batching: config.iotlb_batch,
                expect: None,
                identity_end,
                net: NetOptions {
                    mac: None,
                    queue_pairs: 1,
                },
                block: config.readonly.then_some(BlockOptions { readonly: true }),
            },
        }
    }
}

/// Opens the device and plugs it; `name` gives its id from its type (the
/// device says what it is only once it is open).
pub fn add_vdpa(
    request: &VdpaRequest,
    name: impl FnOnce(DeviceKind) -> String,
    ram: &Arc<GuestRam>,
    seccomp_fds: Option<FilterFds>,
    spaces: &SharedSpaces,
    memlock: &MemlockStatus,
    wiring: PciWiring<'_>,
) -> Result<VdpaHandle, VdpaSetupError> {
    let config = &request.config;
    let mut device = VdpaDevice::open(config, Arc::new(ram.memory.clone())).map_err(|source| {
        VdpaSetupError::Device {
            option: request.option,
            path: config.path.clone(),
            source: Box::new(source),
        }
    })?;
    let kind = device.kind();
    let id = name(kind);
    if device.wants_control_queue() {
        serve_control_queue(&mut device, ram, seccomp_fds).map_err(|reason| {
            VdpaSetupError::ControlQueue {
                option: request.option,
                path: config.path.clone(),
                reason,
            }
        })?;
    }
    let map_error = |source: SpaceError| VdpaSetupError::Map {
        option: request.option,
        path: config.path.clone(),
        hint: memlock_hint(&source, memlock),
        source: Box::new(source),
    };
    let mapper = device.mapper();
    let iova_range = lock_mapper(&mapper).iova_range();
    let mapper: SharedDmaDevice = mapper;
    let boot_mapping = {
        let mut spaces = lock(spaces);
        spaces.register(&id, mapper).map_err(map_error)?;
        let mut plan = Plan::new(ChangeKind::Attach);
        if config.translation == Translation::Identity {
            plan.attach(&id, Some(SpaceId::IDENTITY));
        }
        let reports = spaces.commit(plan).map_err(map_error)?;
        reports.into_iter().next().unwrap_or_else(|| DeviceReport {
            device: id.clone(),
            updates: 0,
            invalidates: 0,
            batched: false,
            micros_to_end: 0,
        })
    };
    // A reset's IOTLB replay goes through the spaces, like every change.
    device.replay_through(spaces.clone(), &id);
    // One vector per queue, one for configuration changes.
    let vectors = device.queue_max_sizes_len() + 1;
    let control_fd = device.control_fd();
    let queries = QueriedDevice::new(Arc::new(device.vring_base_reader()));
    let Plugged { pci, slot } = plug_virtio(device, vectors, wiring)?;
    Ok(VdpaHandle {
        id,
        kind,
        slot,
        pci,
        boot_mapping,
        behind_iommu: config.translation == Translation::Iommu,
        iova_range,
        control_fd,
        queries,
    })
}

/// Starts the worker of the guest's control queue, under a filter that
/// lets it enable vrings on its own device (when seccomp is on).
fn serve_control_queue(
    device: &mut VdpaDevice,
    ram: &Arc<GuestRam>,
    seccomp_fds: Option<FilterFds>,
) -> Result<(), String> {
    let filter = match seccomp_fds {
        Some(mut fds) => {
            fds.vhost.push(device.control_fd());
            Some(seccomp::filter(ThreadKind::NetControlWorker, &fds).map_err(|e| e.to_string())?)
        }
        None => None,
    };
    let install = Box::new(move || match filter {
        Some(filter) => seccomp::apply(&filter).map_err(|e| e.to_string()),
        None => Ok(()),
    });
    let translate: Arc<dyn GuestTranslate> = ram.clone();
    device
        .serve_control_queue(Arc::new(ram.memory.clone()), translate, install)
        .map_err(|e| e.to_string())
}

/// When an UPDATE was refused and the memlock limit is below what a PA
/// device would pin, says so: that is the likely reason (the 6.12 kernel
/// reports pinning over the limit as EFAULT, others as ENOMEM).
fn memlock_hint(error: &SpaceError, memlock: &MemlockStatus) -> String {
    let Some(dma) = error.dma_error() else {
        return String::new();
    };
    let refused_update = match dma {
        devices::dma::DmaError::Backend { message, source }
        | devices::dma::DmaError::RollbackFailed {
            message, source, ..
        } => {
            matches!(message, IotlbMessage::Update { .. })
                && matches!(source.errno(), Some(libc::EFAULT | libc::ENOMEM))
        }
        _ => false,
    };
    match (refused_update, memlock.shortfall()) {
        (true, Some(text)) => format!("; {text}"),
        _ => String::new(),
    }
}

fn lock_mapper<T>(mapper: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mapper.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::dma::{BackendError, DmaError, DmaRange, Perm};

    fn refused(message: IotlbMessage, errno: i32) -> SpaceError {
        SpaceError::Device {
            device: "net0".into(),
            source: Box::new(DmaError::Backend {
                message,
                source: BackendError::Io(std::io::Error::from_raw_os_error(errno)),
            }),
            restore_failed: vec![],
        }
    }

    const LOW: MemlockStatus = MemlockStatus {
        limit: 8 << 20,
        needed: 512 << 20,
        refused: None,
    };

    #[test]
    fn a_refusal_names_the_option_and_the_device() {
        let error = VdpaSetupError::Device {
            option: "--vdpa ",
            path: "/dev/vhost-vdpa-0".into(),
            source: Box::new(VdpaError::Unsupported {
                id: 3,
                name: "console",
            }),
        };
        assert_eq!(
            error.to_string(),
            "--vdpa /dev/vhost-vdpa-0: device type 3 (console) is not supported (net, block are)"
        );
        let error = VdpaSetupError::Device {
            option: "--net vdpa=",
            path: "/dev/null".into(),
            source: Box::new(VdpaError::NotVhostVdpa("/dev/null".into())),
        };
        assert_eq!(
            error.to_string(),
            "--net vdpa=/dev/null: '/dev/null' is not a vhost-vdpa device"
        );
    }

    #[test]
    fn a_refused_update_under_a_low_memlock_limit_names_the_limit_and_the_amount() {
        let update = IotlbMessage::Update {
            asid: 0,
            range: DmaRange::new(0, 512 << 20, 0x7f00_0000_0000, Perm::ReadWrite),
        };
        let source = refused(update, libc::EFAULT);
        let hint = memlock_hint(&source, &LOW);
        assert!(
            hint.starts_with("; RLIMIT_MEMLOCK is 8M, below the 512M"),
            "{hint}"
        );
        let error = VdpaSetupError::Map {
            option: "--vdpa ",
            path: "/dev/vhost-vdpa-0".into(),
            source: Box::new(source),
            hint,
        };
        let text = error.to_string();
        assert!(
            text.starts_with("--vdpa /dev/vhost-vdpa-0: cannot map guest memory: device 'net0'"),
            "{text}"
        );
        assert!(
            text.contains("failed with EFAULT: vhost-vdpa refused the message"),
            "{text}"
        );
        assert!(text.contains("RLIMIT_MEMLOCK is 8M"), "{text}");
        assert!(!text.contains('\n'), "{text}");
        assert!(memlock_hint(&refused(update, libc::ENOMEM), &LOW).contains("RLIMIT_MEMLOCK"));

        // Nothing to say when the limit is high enough, for an INVALIDATE,
        // or for an errno pinning does not cause.
        let enough = MemlockStatus {
            limit: u64::MAX,
            ..LOW
        };
        assert_eq!(memlock_hint(&refused(update, libc::EFAULT), &enough), "");
        let invalidate = IotlbMessage::Invalidate {
            asid: 0,
            iova: 0,
            size: 4096,
        };
        assert_eq!(memlock_hint(&refused(invalidate, libc::EFAULT), &LOW), "");
        assert_eq!(memlock_hint(&refused(update, libc::EINVAL), &LOW), "");
        assert_eq!(memlock_hint(&SpaceError::NoDevice("x".into()), &LOW), "");
    }

    #[test]
    fn both_options_ask_for_what_they_say() {
        let net = NetConfig {
            vdpa_path: "/dev/vhost-vdpa-0".into(),
            mac: Some([2, 0, 0, 0, 0, 1]),
            queue_pairs: 1,
            iotlb_batch: false,
            iommu: true,
        };
        let request = VdpaRequest::from_net(&net, 1 << 30);
        assert_eq!(request.config.expect, Some(DeviceKind::Net));
        assert_eq!(request.config.translation, Translation::Iommu);
        assert!(!request.config.batching);
        assert_eq!(request.config.net.mac, net.mac);
        assert_eq!(request.config.identity_end, 1 << 30);
        let vdpa = VdpaDeviceConfig {
            path: "/dev/vhost-vdpa-1".into(),
            iommu: false,
            iotlb_batch: true,
            readonly: true,
        };
        let request = VdpaRequest::from_vdpa(&vdpa, 1 << 30);
        assert_eq!(request.config.expect, None, "any supported type");
        assert_eq!(request.config.translation, Translation::Identity);
        assert_eq!(request.config.block, Some(BlockOptions { readonly: true }));
        let writable = VdpaDeviceConfig {
            readonly: false,
            ..vdpa
        };
        assert_eq!(VdpaRequest::from_vdpa(&writable, 0).config.block, None);
    }
}
