//! What a snapshot keeps of the vDPA devices: the options each was added
//! with (so a restore builds the same PCI segment) and each device's state,
//! its transport's and where its started queues stood.
//!
//! A restore may name other devices of the same kind (`--net vdpa=PATH`,
//! `--vdpa path=PATH`, one per saved device, in order): only their paths
//! are taken, everything else comes from the snapshot. Without them the
//! saved paths are used.

use devices::virtio::pci::TransportState;
use devices::virtio::vdpa::persist::VdpaSnapshot;
use serde::{Deserialize, Serialize};

use crate::config::{NetConfig, VdpaDeviceConfig};

/// The vDPA devices of a saved VM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDevices {
    /// `--net` devices, then `--vdpa` devices, in the order given: the
    /// order the devices are plugged in.
    pub net: Vec<NetConfig>,
    pub vdpa: Vec<VdpaDeviceConfig>,
    /// One per device, in the same order.
    pub states: Vec<VdpaDeviceState>,
}

/// One vDPA device's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdpaDeviceState {
    /// net0, blk0, ...: the restored device must get the same.
    pub id: String,
    pub transport: TransportState,
    /// Where each started queue stood, and the control queue's state.
    pub device: VdpaSnapshot,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceOptionsError {
    #[error(
        "the snapshot has {saved} {option} device(s) and {given} were given: name each saved \
         device's replacement, in order, or none to reopen the saved paths"
    )]
    Count {
        option: &'static str,
        saved: usize,
        given: usize,
    },
    #[error(
        "{option} {path}: with --restore only the device's path is taken (its other options \
         are in the snapshot); give just {key}=PATH"
    )]
    MoreThanPath {
        option: &'static str,
        path: String,
        key: &'static str,
    },
}

impl SavedDevices {
    /// The `--net` devices to restore: the saved ones, at the paths given
    /// (if any).
    pub fn net_at(&self, given: &[NetConfig]) -> Result<Vec<NetConfig>, DeviceOptionsError> {
        at_paths(&self.net, given, "--net", "vdpa", |saved, given| {
            let only_path = NetConfig {
                vdpa_path: given.vdpa_path.clone(),
                mac: None,
                queue_pairs: 1,
                iotlb_batch: true,
                iommu: false,
            };
            (*given == only_path).then(|| NetConfig {
                vdpa_path: given.vdpa_path.clone(),
                ..saved.clone()
            })
        })
    }

    /// The `--vdpa` devices to restore, likewise.
    pub fn vdpa_at(
        &self,
        given: &[VdpaDeviceConfig],
    ) -> Result<Vec<VdpaDeviceConfig>, DeviceOptionsError> {
        at_paths(&self.vdpa, given, "--vdpa", "path", |saved, given| {
            let only_path = VdpaDeviceConfig {
                path: given.path.clone(),
                iommu: false,
                iotlb_batch: true,
                readonly: false,
            };
            (*given == only_path).then(|| VdpaDeviceConfig {
                path: given.path.clone(),
                ..saved.clone()
            })
        })
    }
}

/// Each saved device at the path given for it; `replace` is None when the
/// given option says more than a path.
fn at_paths<T: Clone + PathOf>(
    saved: &[T],
    given: &[T],
    option: &'static str,
    key: &'static str,
    replace: impl Fn(&T, &T) -> Option<T>,
) -> Result<Vec<T>, DeviceOptionsError> {
    if given.is_empty() {
        return Ok(saved.to_vec());
    }
    if given.len() != saved.len() {
        return Err(DeviceOptionsError::Count {
            option,
            saved: saved.len(),
            given: given.len(),
        });
    }
    saved
        .iter()
        .zip(given)
        .map(|(saved, given)| {
            replace(saved, given).ok_or_else(|| DeviceOptionsError::MoreThanPath {
                option,
                path: given.path().display().to_string(),
                key,
            })
        })
        .collect()
}

trait PathOf {
    fn path(&self) -> &std::path::Path;
}

impl PathOf for NetConfig {
    fn path(&self) -> &std::path::Path {
        &self.vdpa_path
    }
}

impl PathOf for VdpaDeviceConfig {
    fn path(&self) -> &std::path::Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(path: &str) -> NetConfig {
        NetConfig {
            vdpa_path: path.into(),
            mac: None,
            queue_pairs: 1,
            iotlb_batch: true,
            iommu: false,
        }
    }

    fn saved() -> SavedDevices {
        SavedDevices {
            net: vec![NetConfig {
                mac: Some([2, 0, 0, 0, 0, 7]),
                iotlb_batch: false,
                ..net("/dev/vhost-vdpa-0")
            }],
            vdpa: vec![VdpaDeviceConfig {
                path: "/dev/vhost-vdpa-1".into(),
                iommu: false,
                iotlb_batch: true,
                readonly: true,
            }],
            states: Vec::new(),
        }
    }

    #[test]
    fn without_paths_the_saved_devices_are_reopened() {
        let saved = saved();
        assert_eq!(saved.net_at(&[]).unwrap(), saved.net);
        assert_eq!(saved.vdpa_at(&[]).unwrap(), saved.vdpa);
    }

    #[test]
    fn a_path_given_replaces_only_the_path() {
        let saved = saved();
        let restored = saved.net_at(&[net("/dev/vhost-vdpa-5")]).unwrap();
        assert_eq!(
            restored[0].vdpa_path,
            std::path::Path::new("/dev/vhost-vdpa-5")
        );
        assert_eq!(restored[0].mac, Some([2, 0, 0, 0, 0, 7]));
        assert!(!restored[0].iotlb_batch);
        let given = VdpaDeviceConfig {
            path: "/dev/vhost-vdpa-6".into(),
            iommu: false,
            iotlb_batch: true,
            readonly: false,
        };
        let restored = saved.vdpa_at(&[given]).unwrap();
        assert!(restored[0].readonly, "readonly comes from the snapshot");
    }

    #[test]
    fn another_count_or_options_beside_the_path_are_refused() {
        let saved = saved();
        let two = [net("/dev/a"), net("/dev/b")];
        let error = saved.net_at(&two).unwrap_err().to_string();
        assert!(
            error.contains("the snapshot has 1 --net device(s) and 2 were given"),
            "{error}"
        );
        let with_mac = NetConfig {
            mac: Some([2, 0, 0, 0, 0, 1]),
            ..net("/dev/a")
        };
        let error = saved.net_at(&[with_mac]).unwrap_err().to_string();
        assert!(
            error.contains("--net /dev/a: with --restore only the device's path is taken"),
            "{error}"
        );
        assert!(error.ends_with("give just vdpa=PATH"), "{error}");
    }
}
