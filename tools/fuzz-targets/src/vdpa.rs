//! What a vDPA device reports at open (id, features, backend features, its
//! config space, queue counts, IOVA range) against the generic device's
//! negotiation and its net and block layers: device-controlled input.

use devices::virtio::vdpa::block::BlockOptions;
use devices::virtio::vdpa::net::ctrl::ControlMode;
use devices::virtio::vdpa::net::{NetLayer, NetOptions, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MAC};
use devices::virtio::vdpa::{
    negotiate, DeviceKind, DeviceProbe, Layer, Translation, VdpaConfig, VHOST_BACKEND_F_IOTLB_ASID,
    VHOST_BACKEND_F_IOTLB_BATCH, VHOST_BACKEND_F_IOTLB_MSG_V2, VHOST_BACKEND_F_IOTLB_PERSIST,
    VHOST_BACKEND_F_RESUME, VHOST_BACKEND_F_SUSPEND,
};
use devices::virtio::VIRTIO_F_ACCESS_PLATFORM;

use crate::input::Input;

/// The user's options, what the device reported, and a config read.
fn decode(data: &[u8]) -> (VdpaConfig, DeviceProbe, u64, usize) {
    let mut input = Input::new(data);
    let config = VdpaConfig {
        path: "/dev/vhost-vdpa-0".into(),
        translation: input.pick(&[Translation::Identity, Translation::Iommu]),
        batching: input.bool(),
        expect: input.pick(&[None, Some(DeviceKind::Net)]),
        identity_end: input.u64(),
        net: NetOptions {
            mac: input.bool().then_some([2, 0, 0, 0, 0, 1]),
            queue_pairs: u16::from(input.u8() % 3),
        },
        block: input.bool().then(|| BlockOptions {
            readonly: input.bool(),
        }),
    };
    let device_id = match input.u8() % 4 {
        0 => 1,
        1 => 2,
        _ => input.u32(),
    };
    let probe = DeviceProbe {
        device_id,
        device_features: input.u64(),
        backend_features: input.u64(),
        iova_first: input.u64(),
        iova_last: input.u64(),
        config_size: input.u32(),
        queue_max_size: input.u16(),
        virtqueues: input.bool().then(|| input.u32()),
        groups: input.bool().then(|| input.u32()),
        address_spaces: input.bool().then(|| input.u32()),
        config: {
            let len = input.below(80);
            input.bytes(len).to_vec()
        },
        // Last, so the seeds written before it decode as they did.
        vring_groups: {
            let len = input.below(5);
            (0..len).map(|_| input.u32() % 3).collect()
        },
    };
    let (offset, len) = (input.u64(), input.below(16));
    (config, probe, offset, len)
}

pub fn vdpa_negotiate(data: &[u8]) {
    let (config, probe, offset, len) = decode(data);
    let Ok(state) = negotiate(&config, &probe) else {
        return;
    };
    // Nothing acked that the kernel did not offer or the VMM does not handle.
    let suspend = VHOST_BACKEND_F_SUSPEND | VHOST_BACKEND_F_RESUME;
    let handled = VHOST_BACKEND_F_IOTLB_MSG_V2
        | VHOST_BACKEND_F_IOTLB_BATCH
        | VHOST_BACKEND_F_IOTLB_PERSIST
        | VHOST_BACKEND_F_IOTLB_ASID
        | suspend;
    assert_eq!(
        state.backend_features & !(probe.backend_features & handled),
        0
    );
    // SUSPEND and RESUME together or neither (a pause then resets).
    let acked = state.backend_features & suspend;
    assert!(acked == 0 || acked == suspend);
    assert!(state.queue_count >= 1);
    // The guest sees only what the device offers, the VMM's own MAC, and
    // a control queue where the VMM serves it alone; ACCESS_PLATFORM only
    // behind the vIOMMU.
    let guest = state.guest_features();
    let vmm_serves = matches!(
        &state.layer,
        Layer::Net(NetLayer {
            control: Some(ControlMode::VmmOnly),
            ..
        })
    );
    let from_vmm = VIRTIO_NET_F_MAC | if vmm_serves { VIRTIO_NET_F_CTRL_VQ } else { 0 };
    assert_eq!(guest & !(probe.device_features | from_vmm), 0);
    if config.translation == Translation::Identity {
        assert_eq!(guest & VIRTIO_F_ACCESS_PLATFORM, 0);
    }
    // The device is told nothing it did not offer.
    assert_eq!(
        state.device_features_for(u64::MAX) & !probe.device_features,
        0
    );
    if let Layer::Block(block) = state.layer {
        assert!(block.capacity > 0);
    }
    // A config read anywhere stays inside the device's config space.
    let mut buf = vec![0u8; len];
    state.read_config(offset, &mut buf, |at, b| {
        let end = u64::from(at) + b.len() as u64;
        assert!(end <= u64::from(state.config_size));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seeds_reach_a_negotiated_net_and_block_device() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/corpus/vdpa_negotiate/");
        for (file, kind) in [
            ("sim-net-ctrl-vq", DeviceKind::Net),
            ("blk-mq-readonly-iommu", DeviceKind::Block),
        ] {
            let data = std::fs::read(format!("{dir}{file}")).unwrap();
            let (config, probe, _, _) = decode(&data);
            let state = negotiate(&config, &probe).unwrap();
            assert_eq!(state.kind, kind, "{file}");
        }
    }
}
