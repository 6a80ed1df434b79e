//! virtio-iommu requests through a real split ring, answered by the
//! device's request handler over a recording vDPA device: after every drain
//! the engine's view and the device's IOTLB agree and no batch is open.

use std::sync::{Arc, Mutex};

use devices::dma::{
    DmaMapper, DmaSpaces, RecordingBackend, SharedDmaDevice, TableTranslate, DEVICE_ASID,
};
use devices::virtio::iommu::{IommuConfig, IommuEndpoint, RequestServer};
use devices::virtio::queue_worker::{Drain, QueueHandler};
use devices::virtio::test_ring::TestRing;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::input::Input;

const MAX_OPS: usize = 96;
const MEMORY: u64 = 0x4_0000;
const RING: u64 = 0x1000;
const BUFFERS: u64 = 0x8000;
const ENDPOINT: u32 = 0x08;
const PAGE: u64 = 0x1000;

/// Request types and flags (include/uapi/linux/virtio_iommu.h).
const T_ATTACH: u8 = 1;
const T_DETACH: u8 = 2;
const T_MAP: u8 = 3;
const T_UNMAP: u8 = 4;
const T_PROBE: u8 = 5;

/// Guest RAM as the translation sees it: two pieces at different host
/// addresses, so maps across the gap split.
const RAM: [(u64, u64, u64); 2] = [
    (0, 0x40_0000, 0x7f00_0000_0000),
    (0x40_0000, 0x40_0000, 0x7e00_0000_0000),
];

fn queue(ring: &TestRing) -> Queue {
    ring.config(0).to_queue(256).expect("a valid ring")
}

/// A request's device-readable part, fields mostly plausible.
fn request(input: &mut Input) -> Vec<u8> {
    let kind = input.pick(&[T_ATTACH, T_DETACH, T_MAP, T_UNMAP, T_PROBE, T_MAP, 0x42]);
    let mut r = vec![kind, 0, 0, 0];
    let domain = if input.bool() {
        1 + u32::from(input.u8() % 3)
    } else {
        input.u32()
    };
    let endpoint = if input.bool() { ENDPOINT } else { input.u32() };
    let page = |input: &mut Input| {
        if input.u8().is_multiple_of(8) {
            input.u64()
        } else {
            PAGE * u64::from(input.u8() % 32)
        }
    };
    match kind {
        T_ATTACH | T_DETACH => {
            r.extend_from_slice(&domain.to_le_bytes());
            r.extend_from_slice(&endpoint.to_le_bytes());
            r.extend_from_slice(&u32::from(input.u8() % 2).to_le_bytes());
            r.extend_from_slice(&[0; 4]);
        }
        T_MAP => {
            let start = page(input);
            let end = start
                .wrapping_add(PAGE * u64::from(1 + input.u8() % 8))
                .wrapping_sub(1);
            r.extend_from_slice(&domain.to_le_bytes());
            r.extend_from_slice(&start.to_le_bytes());
            r.extend_from_slice(&end.to_le_bytes());
            r.extend_from_slice(&page(input).wrapping_add(0x3f_0000).to_le_bytes());
            r.extend_from_slice(&u32::from(input.u8() % 8).to_le_bytes());
        }
        T_UNMAP => {
            let start = page(input);
            let end = if input.bool() {
                u64::MAX
            } else {
                start.wrapping_add(PAGE * 4 - 1)
            };
            r.extend_from_slice(&domain.to_le_bytes());
            r.extend_from_slice(&start.to_le_bytes());
            r.extend_from_slice(&end.to_le_bytes());
            r.extend_from_slice(&[0; 4]);
        }
        T_PROBE => {
            r.extend_from_slice(&endpoint.to_le_bytes());
            r.extend_from_slice(&[0; 64]);
        }
        _ => {
            let len = input.below(80);
            r.extend_from_slice(input.bytes(len));
        }
    }
    if input.u8().is_multiple_of(16) {
        // Truncated or padded.
        let len = input.below(r.len() + 16);
        r.resize(len, 0);
    }
    r
}

pub fn virtio_iommu(data: &[u8]) {
    run(data);
}

/// The recording device, for the seed test below; `None` if the
/// configuration was refused.
type Recorder = Arc<Mutex<DmaMapper<RecordingBackend>>>;

fn run(data: &[u8]) -> Option<Recorder> {
    let mut input = Input::new(data);
    let Ok(memory) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEMORY as usize)])
    else {
        panic!("cannot create guest memory");
    };
    let (first, last) = input.pick(&[(0, (1u64 << 39) - 1), (0, 0xf_ffff), (0x10_0000, u64::MAX)]);
    let device_range = first..=last;
    let recorder = Arc::new(Mutex::new(DmaMapper::new(
        RecordingBackend::new(),
        device_range,
        input.bool(),
    )));
    let shared: SharedDmaDevice = recorder.clone();
    let spaces = DmaSpaces::new().shared();
    if spaces
        .lock()
        .expect("not poisoned")
        .register("net0", shared)
        .is_err()
    {
        panic!("cannot register the device");
    }
    let config = IommuConfig {
        endpoints: vec![IommuEndpoint {
            id: ENDPOINT,
            device: "net0".into(),
        }],
        input_range: {
            let (first, last) =
                input.pick(&[(0, (1u64 << 39) - 1), (0x1000, 0xf_ffff), (0, u64::MAX)]);
            first..=last
        },
        domain_range: 1..=(1 + u32::from(input.u8() % 8)),
        bypass: input.bool(),
    };
    let memory = Arc::new(memory);
    let Ok((mut server, handle)) = RequestServer::new(
        &config,
        spaces,
        Arc::new(TableTranslate(&RAM)),
        memory.clone(),
    ) else {
        // A configuration the device refuses (an input range the device
        // cannot reach, say) is not a finding.
        return None;
    };
    let mut ring = TestRing::new(RING, input.pick(&[4u16, 16, 64]));
    let mut queue = queue(&ring);
    let mut next = 0u64;
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 8 {
            0..=2 => {
                let at = BUFFERS + (next % 256) * 0x100;
                next += 1;
                let bytes = request(&mut input);
                let _ = memory.write_slice(&bytes, GuestAddress(at));
                let writable = if input.u8().is_multiple_of(8) {
                    u32::from(input.u8())
                } else if bytes.first() == Some(&T_PROBE) {
                    128 + 4
                } else {
                    4
                };
                ring.add_chain(
                    &memory,
                    &[(at, bytes.len() as u32, false), (at + 0xa0, writable, true)],
                );
            }
            3 => {
                let addr = input.offset(&[RING, RING + 0x1000, RING + 0x2000, BUFFERS]);
                let len = input.access_len();
                let _ = memory.write_slice(input.bytes(len), GuestAddress(addr));
            }
            4 => server.set_bypass(input.bool()),
            5 if input.u8().is_multiple_of(4) => server.reset(),
            _ => {
                let mut drain = Drain::new(&mut queue, &memory);
                server.serve(&mut drain);
                let device = recorder.lock().expect("not poisoned");
                assert!(!device.backend().in_batch(), "a batch left open");
                assert_eq!(
                    device.mappings(DEVICE_ASID),
                    device.backend().device_iotlb(DEVICE_ASID),
                    "the engine and the device disagree"
                );
            }
        }
    }
    handle.snapshot();
    handle.counters();
    Some(recorder)
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::dma::{DmaRange, Perm};

    #[test]
    fn the_seed_attaches_and_maps_through_the_device() {
        let seed =
            std::fs::read(crate::runner::corpus_dir("virtio_iommu").join("attach-map-drain"))
                .expect("the seed");
        let recorder = run(&seed).expect("an accepted configuration");
        let device = recorder.lock().unwrap();
        assert_eq!(
            device.backend().device_iotlb(DEVICE_ASID),
            vec![DmaRange::new(
                0x1000,
                0x1000,
                0x7f00_0000_0000 + 0x3f_1000 + 0x1000,
                Perm::ReadWrite
            )],
            "the fuzz input reaches MAP"
        );
    }
}
