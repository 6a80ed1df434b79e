//! The virtio-blk layer over the generic vhost-vdpa device (virtio device
//! type 2): the guest reads the device's own config space (capacity,
//! blk_size, seg_max, geometry, topology, num_queues, discard and
//! write-zeroes limits: passed through, nothing invented), gets as many
//! queues as the device has, and sees the features a Linux virtio-blk
//! driver over vhost-vdpa can use.
//!
//! Requests go from the guest's rings straight to the device; the VMM never
//! sees them. So a read-only device is only honoured, never enforced here:
//! a device offering VIRTIO_BLK_F_RO is refused unless the user says
//! `readonly=on`, and `readonly=on` on a writable device is refused too
//! (the VMM cannot keep a guest from writing to it).

use super::super::VIRTIO_F_VERSION_1;
use super::{DeviceProbe, VdpaError, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

pub const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_GEOMETRY: u64 = 1 << 4;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
pub const VIRTIO_BLK_F_TOPOLOGY: u64 = 1 << 10;
pub const VIRTIO_BLK_F_CONFIG_WCE: u64 = 1 << 11;
pub const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;
pub const VIRTIO_BLK_F_SECURE_ERASE: u64 = 1 << 16;
pub const VIRTIO_BLK_F_ZONED: u64 = 1 << 17;

/// What the guest may see when the device offers it. Hidden: RO unless the
/// user accepted it, ZONED (its config and report-zones path are untested
/// here), LIFETIME, the legacy BARRIER/SCSI bits, packed rings and anything
/// this VMM does not know.
pub const GUEST_VISIBLE_FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_BLK_F_SIZE_MAX
    | VIRTIO_BLK_F_SEG_MAX
    | VIRTIO_BLK_F_GEOMETRY
    | VIRTIO_BLK_F_BLK_SIZE
    | VIRTIO_BLK_F_FLUSH
    | VIRTIO_BLK_F_TOPOLOGY
    | VIRTIO_BLK_F_CONFIG_WCE
    | VIRTIO_BLK_F_MQ
    | VIRTIO_BLK_F_DISCARD
    | VIRTIO_BLK_F_WRITE_ZEROES
    | VIRTIO_BLK_F_SECURE_ERASE
    | VIRTIO_RING_F_INDIRECT_DESC
    | VIRTIO_RING_F_EVENT_IDX;

/// Offsets in struct virtio_blk_config (include/uapi/linux/virtio_blk.h).
const CONFIG_CAPACITY: usize = 0;
const CONFIG_SIZE_MAX: usize = 8;
const CONFIG_SEG_MAX: usize = 12;
const CONFIG_BLK_SIZE: usize = 20;
const CONFIG_NUM_QUEUES: usize = 34;

/// The most request queues a block device gets (one MSI-X vector each).
pub const MAX_QUEUES: u16 = 64;

/// What the user asked of a block device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockOptions {
    /// The user accepts a read-only device.
    pub readonly: bool,
}

/// The block layer's state: what the device's config said at open (for
/// `info`; the guest always reads the device's live config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockLayer {
    /// In 512-byte sectors.
    pub capacity: u64,
    pub size_max: Option<u32>,
    pub seg_max: Option<u32>,
    pub blk_size: Option<u32>,
    pub queues: u16,
    pub readonly: bool,
}

fn le32(config: &[u8], at: usize) -> Option<u32> {
    let bytes = config.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

impl BlockLayer {
    pub fn new(options: &BlockOptions, probe: &DeviceProbe) -> Result<BlockLayer, VdpaError> {
        let features = probe.device_features;
        let has = |bit: u64| features & bit != 0;
        let capacity = probe
            .config
            .get(CONFIG_CAPACITY..CONFIG_CAPACITY + 8)
            .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            .ok_or(VdpaError::ConfigTooSmall {
                size: probe.config_size,
                needed: 8,
            })?;
        if capacity == 0 {
            return Err(VdpaError::ZeroCapacity);
        }
        match (has(VIRTIO_BLK_F_RO), options.readonly) {
            (true, false) => return Err(VdpaError::ReadOnly),
            (false, true) => return Err(VdpaError::NotReadOnly),
            _ => {}
        }
        let queues = match has(VIRTIO_BLK_F_MQ) {
            false => 1,
            true => {
                let at = CONFIG_NUM_QUEUES;
                let raw = probe
                    .config
                    .get(at..at + 2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]))
                    .ok_or(VdpaError::ConfigTooSmall {
                        size: probe.config_size,
                        needed: 36,
                    })?;
                if raw == 0 || raw > MAX_QUEUES {
                    return Err(VdpaError::BadQueueCount {
                        count: u32::from(raw),
                        max: u32::from(MAX_QUEUES),
                    });
                }
                raw
            }
        };
        let field = |bit: u64, at: usize| match has(bit) {
            true => le32(&probe.config, at),
            false => None,
        };
        Ok(BlockLayer {
            capacity,
            size_max: field(VIRTIO_BLK_F_SIZE_MAX, CONFIG_SIZE_MAX),
            seg_max: field(VIRTIO_BLK_F_SEG_MAX, CONFIG_SEG_MAX),
            blk_size: field(VIRTIO_BLK_F_BLK_SIZE, CONFIG_BLK_SIZE),
            queues,
            readonly: options.readonly,
        })
    }

    /// What the guest is offered of the device's features (ACCESS_PLATFORM
    /// aside).
    pub fn guest_features(&self, device_features: u64) -> u64 {
        let ro = match self.readonly {
            true => VIRTIO_BLK_F_RO,
            false => 0,
        };
        device_features & (GUEST_VISIBLE_FEATURES | ro)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::VIRTIO_F_ACCESS_PLATFORM;

    /// A virtio_blk_config as vdpa_sim_blk fills it (128 MiB, seg_max,
    /// blk_size 512, one queue).
    fn sim_blk_config() -> Vec<u8> {
        let mut config = vec![0u8; 60];
        config[0..8].copy_from_slice(&(128u64 << 11).to_le_bytes());
        config[CONFIG_SIZE_MAX..CONFIG_SIZE_MAX + 4].copy_from_slice(&4096u32.to_le_bytes());
        config[CONFIG_SEG_MAX..CONFIG_SEG_MAX + 4].copy_from_slice(&32u32.to_le_bytes());
        config[CONFIG_BLK_SIZE..CONFIG_BLK_SIZE + 4].copy_from_slice(&512u32.to_le_bytes());
        config[CONFIG_NUM_QUEUES..CONFIG_NUM_QUEUES + 2].copy_from_slice(&1u16.to_le_bytes());
        config
    }

    const SIM_BLK: u64 = VIRTIO_F_VERSION_1
        | VIRTIO_F_ACCESS_PLATFORM
        | VIRTIO_BLK_F_SIZE_MAX
        | VIRTIO_BLK_F_SEG_MAX
        | VIRTIO_BLK_F_BLK_SIZE
        | VIRTIO_BLK_F_FLUSH
        | VIRTIO_BLK_F_DISCARD
        | VIRTIO_BLK_F_WRITE_ZEROES;

    fn probe(features: u64, config: Vec<u8>) -> DeviceProbe {
        DeviceProbe {
            device_id: 2,
            device_features: features,
            config_size: config.len() as u32,
            config,
            ..DeviceProbe::default()
        }
    }

    #[test]
    fn the_devices_config_is_what_the_layer_reports() {
        let layer =
            BlockLayer::new(&BlockOptions::default(), &probe(SIM_BLK, sim_blk_config())).unwrap();
        assert_eq!(
            layer,
            BlockLayer {
                capacity: 128 << 11,
                size_max: Some(4096),
                seg_max: Some(32),
                blk_size: Some(512),
                queues: 1,
                readonly: false,
            }
        );
        // A field whose feature is not offered is not read.
        let bare = BlockLayer::new(
            &BlockOptions::default(),
            &probe(VIRTIO_F_VERSION_1, sim_blk_config()),
        )
        .unwrap();
        assert_eq!(
            (bare.seg_max, bare.blk_size, bare.size_max),
            (None, None, None)
        );
    }

    #[test]
    fn the_queue_count_comes_from_num_queues_with_mq() {
        let mut config = sim_blk_config();
        config[CONFIG_NUM_QUEUES] = 4;
        let mq = BlockLayer::new(
            &BlockOptions::default(),
            &probe(SIM_BLK | VIRTIO_BLK_F_MQ, config.clone()),
        )
        .unwrap();
        assert_eq!(mq.queues, 4);
        // Without MQ num_queues means nothing: one queue.
        let single = BlockLayer::new(&BlockOptions::default(), &probe(SIM_BLK, config)).unwrap();
        assert_eq!(single.queues, 1);
        for bad in [0u16, MAX_QUEUES + 1, u16::MAX] {
            let mut config = sim_blk_config();
            config[CONFIG_NUM_QUEUES..CONFIG_NUM_QUEUES + 2].copy_from_slice(&bad.to_le_bytes());
            let error = BlockLayer::new(
                &BlockOptions::default(),
                &probe(SIM_BLK | VIRTIO_BLK_F_MQ, config),
            )
            .unwrap_err();
            assert!(matches!(error, VdpaError::BadQueueCount { .. }), "{bad}");
        }
        // MQ with a config too short to hold num_queues.
        let error = BlockLayer::new(
            &BlockOptions::default(),
            &probe(SIM_BLK | VIRTIO_BLK_F_MQ, sim_blk_config()[..20].to_vec()),
        )
        .unwrap_err();
        assert!(matches!(
            error,
            VdpaError::ConfigTooSmall { needed: 36, .. }
        ));
    }

    #[test]
    fn an_empty_or_read_only_disk_is_refused_unless_accepted() {
        let mut empty = sim_blk_config();
        empty[0..8].fill(0);
        let error = BlockLayer::new(&BlockOptions::default(), &probe(SIM_BLK, empty)).unwrap_err();
        assert!(matches!(error, VdpaError::ZeroCapacity));
        let short = BlockLayer::new(&BlockOptions::default(), &probe(SIM_BLK, vec![1, 2, 3]));
        assert!(matches!(
            short,
            Err(VdpaError::ConfigTooSmall { needed: 8, .. })
        ));

        let ro = SIM_BLK | VIRTIO_BLK_F_RO;
        let error =
            BlockLayer::new(&BlockOptions::default(), &probe(ro, sim_blk_config())).unwrap_err();
        assert!(matches!(error, VdpaError::ReadOnly));
        let accepted = BlockOptions { readonly: true };
        let layer = BlockLayer::new(&accepted, &probe(ro, sim_blk_config())).unwrap();
        assert_ne!(layer.guest_features(ro) & VIRTIO_BLK_F_RO, 0);
        // readonly=on cannot make a writable device read-only.
        let error = BlockLayer::new(&accepted, &probe(SIM_BLK, sim_blk_config())).unwrap_err();
        assert!(matches!(error, VdpaError::NotReadOnly));
    }

    #[test]
    fn features_are_masked_to_what_the_guest_driver_can_use() {
        let layer =
            BlockLayer::new(&BlockOptions::default(), &probe(SIM_BLK, sim_blk_config())).unwrap();
        let offered = SIM_BLK
            | VIRTIO_BLK_F_ZONED
            | (1 << 15) // LIFETIME
            | (1 << 0) // legacy BARRIER
            | (1 << 34); // RING_PACKED
        assert_eq!(
            layer.guest_features(offered),
            SIM_BLK & !VIRTIO_F_ACCESS_PLATFORM
        );
        // RO is never offered to the guest of a writable device.
        assert_eq!(
            layer.guest_features(offered | VIRTIO_BLK_F_RO) & VIRTIO_BLK_F_RO,
            0
        );
    }
}
