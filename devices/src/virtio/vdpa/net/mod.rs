//! The virtio-net layer over the generic vhost-vdpa device: which of the
//! device's features the guest may see, how many queues it gets, and the
//! MAC the user may put over the device's own.
//!
//! Multiqueue (`queues=N`, N > 1) needs a control queue: the guest sets the
//! number of pairs in use with VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET. For a device
//! without a control queue of its own (VDUSE refuses one for net devices)
//! the VMM serves the guest's ([`control_queue`]) and applies the pair count
//! by enabling the device's data queues; with one pair the control queue
//! and everything that needs it stay hidden (the VMM could honour nothing
//! on it alone). A device whose own control queue is alone in its group
//! and which has a second address space gets it shadowed: the VMM serves
//! the guest's and forwards what it accepts through the device's, in
//! address space 1 with only the VMM's buffers ([`shadow_cvq`]). Another
//! device with a control queue keeps it hidden, and one pair.

pub mod control_queue;
pub mod ctrl;
pub mod shadow_cvq;

use super::super::VIRTIO_F_VERSION_1;
use super::{
    DeviceProbe, VdpaError, VHOST_BACKEND_F_IOTLB_ASID, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};
use ctrl::ControlMode;

pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
pub const VIRTIO_NET_F_MTU: u64 = 1 << 3;
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
pub const VIRTIO_NET_F_GUEST_ECN: u64 = 1 << 9;
pub const VIRTIO_NET_F_GUEST_UFO: u64 = 1 << 10;
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
pub const VIRTIO_NET_F_HOST_ECN: u64 = 1 << 13;
pub const VIRTIO_NET_F_HOST_UFO: u64 = 1 << 14;
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
pub const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << 17;
pub const VIRTIO_NET_F_MQ: u64 = 1 << 22;
pub const VIRTIO_NET_F_CTRL_MAC_ADDR: u64 = 1 << 23;

/// Features the guest may see when the device offers them. Anything else
/// (the control queue and what depends on it, packed rings, features this
/// VMM does not understand) stays hidden. ACCESS_PLATFORM is decided by the
/// device's translation, not here.
pub const GUEST_VISIBLE_FEATURES: u64 = VIRTIO_F_VERSION_1
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

/// Offset of `mac` in struct virtio_net_config.
const CONFIG_MAC: u64 = 0;

/// What the user asked of a net device (`--net`; `--vdpa` asks nothing).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetOptions {
    /// Shown to the guest over the device's own MAC.
    pub mac: Option<[u8; 6]>,
    pub queue_pairs: u16,
}

/// The net layer's state: plain data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetLayer {
    pub mac: Option<[u8; 6]>,
    /// Data queue pairs the guest is offered.
    pub queue_pairs: u16,
    /// Who serves the guest's control queue; `None`: it is not offered.
    pub control: Option<ControlMode>,
}

impl NetLayer {
    /// `can_serve`: the VMM can read the guest's control queue (it lies
    /// at guest physical addresses: no vIOMMU).
    pub fn new(
        options: &NetOptions,
        probe: &DeviceProbe,
        can_serve: bool,
    ) -> Result<NetLayer, VdpaError> {
        let pairs = options.queue_pairs.max(1);
        let offered = offered_pairs(probe);
        let own = probe.device_features & VIRTIO_NET_F_CTRL_VQ != 0;
        let shadow = match own && can_serve {
            true => shadow_mode(probe, pairs, offered),
            false => None,
        };
        let too_many = || VdpaError::Queues {
            requested: pairs,
            offered,
        };
        let control = match (own, shadow) {
            (true, Some(_)) if pairs > offered => return Err(too_many()),
            (true, Some(mode)) => Some(mode),
            (true, None) if pairs == 1 => None,
            (true, None) => return Err(VdpaError::OwnControlQueue { requested: pairs }),
            (false, _) if pairs == 1 => None,
            (false, _) if pairs > offered => return Err(too_many()),
            (false, _) => Some(ControlMode::VmmOnly),
        };
        Ok(NetLayer {
            mac: options.mac,
            queue_pairs: pairs,
            control,
        })
    }

    /// Queues the guest sees: the data queues, and the control queue when
    /// the VMM serves one.
    pub fn queue_count(&self) -> u16 {
        match self.control {
            Some(_) => self.queue_pairs.saturating_mul(2).saturating_add(1),
            None => 2,
        }
    }

    /// What the guest is offered of the device's features (ACCESS_PLATFORM
    /// aside): MAC also when the user gave one, since the VMM answers it.
    pub fn guest_features(&self, device_features: u64) -> u64 {
        let mac = match self.mac {
            Some(_) => VIRTIO_NET_F_MAC,
            None => 0,
        };
        let multiqueue = match self.queue_pairs {
            1 => 0,
            _ => VIRTIO_NET_F_MQ,
        };
        let control = match self.control {
            Some(ControlMode::VmmOnly) => VIRTIO_NET_F_CTRL_VQ | VIRTIO_NET_F_MQ,
            // What the device's control queue applies, as it offers it.
            Some(ControlMode::Shadowed { .. }) => {
                VIRTIO_NET_F_CTRL_VQ | (device_features & (SHADOWED_FEATURES | multiqueue))
            }
            None => 0,
        };
        (device_features & GUEST_VISIBLE_FEATURES) | mac | control
    }

    /// Puts the user's MAC, and the pairs offered, over what the device's
    /// config space said.
    pub fn overlay_config(&self, offset: u64, data: &mut [u8]) {
        if let Some(mac) = self.mac {
            overlay(offset, data, CONFIG_MAC, &mac);
        }
        let pairs_offered = match self.control {
            Some(ControlMode::VmmOnly) => true,
            Some(ControlMode::Shadowed { .. }) => self.queue_pairs > 1,
            None => false,
        };
        if pairs_offered {
            overlay(
                offset,
                data,
                CONFIG_MAX_VQ_PAIRS as u64,
                &self.queue_pairs.to_le_bytes(),
            );
        }
    }
}

/// Writes the bytes of the field `value` at config offset `field` into the
/// guest's read of `data` at `offset`, where they overlap.
fn overlay(offset: u64, data: &mut [u8], field: u64, value: &[u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        let at = u64::try_from(i).ok().and_then(|i| offset.checked_add(i));
        if let Some(m) = at.and_then(|at| at.checked_sub(field)) {
            if let Some(v) = usize::try_from(m).ok().and_then(|m| value.get(m)) {
                *byte = *v;
            }
        }
    }
}

/// What a shadowed control queue may offer the guest, where the device
/// does: the commands the VMM parses and forwards.
const SHADOWED_FEATURES: u64 = VIRTIO_NET_F_CTRL_MAC_ADDR
    | ctrl::VIRTIO_NET_F_CTRL_RX
    | ctrl::VIRTIO_NET_F_CTRL_RX_EXTRA
    | ctrl::VIRTIO_NET_F_CTRL_VLAN;

/// The shadowed mode, where the device allows it: its control queue (at
/// the index it has with the pairs the guest gets) in a virtqueue group
/// no data queue is in, a second address space, and IOTLB messages that
/// name one (VHOST_BACKEND_F_IOTLB_ASID).
fn shadow_mode(probe: &DeviceProbe, pairs: u16, offered: u16) -> Option<ControlMode> {
    if probe.address_spaces? < 2 || probe.backend_features & VHOST_BACKEND_F_IOTLB_ASID == 0 {
        return None;
    }
    let device_queue = match pairs {
        1 => 2,
        _ => offered.checked_mul(2)?,
    };
    let group = *probe.vring_groups.get(usize::from(device_queue))?;
    let data = probe.vring_groups.get(..usize::from(device_queue))?;
    match data.iter().all(|&g| g != group) {
        true => Some(ControlMode::Shadowed {
            device_queue,
            group,
        }),
        false => None,
    }
}

/// Offset of `max_virtqueue_pairs` in struct virtio_net_config.
const CONFIG_MAX_VQ_PAIRS: usize = 8;

/// Queue pairs the device says it has: max_virtqueue_pairs with MQ.
fn offered_pairs(probe: &DeviceProbe) -> u16 {
    if probe.device_features & VIRTIO_NET_F_MQ == 0 {
        return 1;
    }
    probe
        .config
        .get(CONFIG_MAX_VQ_PAIRS..CONFIG_MAX_VQ_PAIRS + 2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .unwrap_or(1)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::VIRTIO_F_ACCESS_PLATFORM;

    /// vdpa_sim_net's features in 6.12 (TESTBED.md §7).
    const VDPA_SIM_NET: u64 = VIRTIO_F_VERSION_1
        | VIRTIO_F_ACCESS_PLATFORM
        | (1 << 31) // VIRTIO_NET_F_ANY_LAYOUT
        | VIRTIO_NET_F_MAC
        | VIRTIO_NET_F_STATUS
        | VIRTIO_NET_F_MTU
        | VIRTIO_NET_F_CTRL_VQ
        | VIRTIO_NET_F_CTRL_MAC_ADDR;

    #[test]
    fn the_control_queue_and_what_needs_it_stay_hidden() {
        let layer = NetLayer {
            mac: None,
            queue_pairs: 1,
            control: None,
        };
        let offered = VDPA_SIM_NET | VIRTIO_NET_F_MQ | (1 << 34); // + RING_PACKED
        let guest = layer.guest_features(offered);
        assert_eq!(
            guest,
            VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_MTU
        );
        assert_eq!(guest & VIRTIO_NET_F_CTRL_VQ, 0);
        assert_eq!(guest & VIRTIO_NET_F_CTRL_MAC_ADDR, 0);
        assert_eq!(guest & VIRTIO_F_ACCESS_PLATFORM, 0, "decided elsewhere");
    }

    #[test]
    fn a_user_mac_is_offered_and_read_over_the_devices_own() {
        let mac = [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc];
        let layer = NetLayer {
            mac: Some(mac),
            queue_pairs: 1,
            control: None,
        };
        let guest = layer.guest_features(VIRTIO_F_VERSION_1);
        assert_eq!(guest, VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC);
        // The whole config: MAC replaced, status (offset 6) kept.
        let mut config = [0xee_u8; 8];
        layer.overlay_config(0, &mut config);
        assert_eq!(config, [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc, 0xee, 0xee]);
        // A read of bytes 4..6 sees the MAC's last two bytes.
        let mut part = [0u8; 4];
        layer.overlay_config(4, &mut part);
        assert_eq!(part, [0xbb, 0xcc, 0, 0]);
        // A read past the MAC is untouched; an offset near u64::MAX too.
        let mut status = [7u8; 2];
        layer.overlay_config(6, &mut status);
        assert_eq!(status, [7, 7]);
        layer.overlay_config(u64::MAX, &mut status);
        assert_eq!(status, [7, 7]);
    }

    #[test]
    fn a_device_with_its_own_control_queue_drives_one_pair() {
        let mut config = vec![0u8; 12];
        config[CONFIG_MAX_VQ_PAIRS] = 4;
        let probe = DeviceProbe {
            device_features: VDPA_SIM_NET | VIRTIO_NET_F_MQ,
            config,
            ..DeviceProbe::default()
        };
        let options = NetOptions {
            mac: None,
            queue_pairs: 2,
        };
        let error = NetLayer::new(&options, &probe, true).unwrap_err();
        assert!(
            matches!(error, VdpaError::OwnControlQueue { requested: 2 }),
            "{error:?}"
        );
        let one = NetOptions {
            queue_pairs: 1,
            ..options
        };
        assert_eq!(
            NetLayer::new(&one, &probe, true).unwrap(),
            NetLayer {
                mac: None,
                queue_pairs: 1,
                control: None
            }
        );
    }

    /// vduse-net --queues 4: MQ, four pairs, no control queue.
    fn vduse_net(pairs: u16) -> DeviceProbe {
        let mut config = vec![0u8; 12];
        config[CONFIG_MAX_VQ_PAIRS..CONFIG_MAX_VQ_PAIRS + 2].copy_from_slice(&pairs.to_le_bytes());
        DeviceProbe {
            device_features: VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_MQ,
            config,
            ..DeviceProbe::default()
        }
    }

    #[test]
    fn multiqueue_on_a_device_without_a_control_queue_is_served_by_the_vmm() {
        let three = NetOptions {
            mac: None,
            queue_pairs: 3,
        };
        let layer = NetLayer::new(&three, &vduse_net(4), true).unwrap();
        assert_eq!(layer.control, Some(ControlMode::VmmOnly));
        assert_eq!(layer.queue_count(), 7, "three pairs and the control queue");
        let guest = layer.guest_features(vduse_net(4).device_features);
        assert_eq!(
            guest & (VIRTIO_NET_F_CTRL_VQ | VIRTIO_NET_F_MQ),
            VIRTIO_NET_F_CTRL_VQ | VIRTIO_NET_F_MQ
        );
        // The guest reads the pairs it was given, not the device's four.
        let mut config = [0u8; 12];
        config[CONFIG_MAX_VQ_PAIRS] = 4;
        layer.overlay_config(0, &mut config);
        assert_eq!(
            &config[CONFIG_MAX_VQ_PAIRS..CONFIG_MAX_VQ_PAIRS + 2],
            &[3, 0]
        );
        let mut high = [0u8; 1];
        layer.overlay_config(9, &mut high);
        assert_eq!(high, [0]);

        // More than the device has, or a device without MQ: refused.
        let five = NetOptions {
            queue_pairs: 5,
            ..three.clone()
        };
        let error = NetLayer::new(&five, &vduse_net(4), true).unwrap_err();
        assert!(
            matches!(
                error,
                VdpaError::Queues {
                    requested: 5,
                    offered: 4
                }
            ),
            "{error:?}"
        );
        let no_mq = DeviceProbe {
            device_features: VIRTIO_F_VERSION_1,
            ..vduse_net(4)
        };
        let error = NetLayer::new(&three, &no_mq, true).unwrap_err();
        assert!(
            matches!(
                error,
                VdpaError::Queues {
                    requested: 3,
                    offered: 1
                }
            ),
            "{error:?}"
        );
        // One pair: no control queue, two queues, as before.
        let one = NetOptions {
            queue_pairs: 1,
            ..three
        };
        let layer = NetLayer::new(&one, &vduse_net(4), true).unwrap();
        assert_eq!((layer.control, layer.queue_count()), (None, 2));
        assert_eq!(
            layer.guest_features(vduse_net(4).device_features) & VIRTIO_NET_F_MQ,
            0
        );
    }
}
