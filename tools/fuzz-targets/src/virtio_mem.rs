//! virtio-mem requests through a real split ring in guest memory, answered
//! by the device's own request handler, against a model of plugged blocks.

use std::sync::{Arc, Mutex};

use devices::dma::TranslateError;
use devices::virtio::mem::{HotplugBackend, HotplugError, MemRegion, MemState, RequestHandler};
use devices::virtio::queue_worker::{Drain, QueueHandler};
use devices::virtio::test_ring::TestRing;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::input::Input;

const MAX_OPS: usize = 128;
const MEMORY: u64 = 0x4_0000;
const RING: u64 = 0x1000;
/// Requests and responses live here, above the ring.
const BUFFERS: u64 = 0x8000;
const REQ_SIZE: u32 = 24;
const RESP_SIZE: u32 = 10;

/// The host side as a model: which blocks are plugged, checked on every
/// call; refuses when told to.
struct ModelBackend {
    region: MemRegion,
    plugged: Mutex<Vec<bool>>,
    refuse: Mutex<bool>,
    /// (plug?, blocks) per accepted call.
    calls: Mutex<Vec<(bool, usize)>>,
}

impl ModelBackend {
    /// The block indices of `ranges`, after checking they are whole blocks
    /// inside the region.
    fn blocks(&self, ranges: &[(u64, u64)]) -> Vec<usize> {
        let region = self.region;
        let mut blocks = Vec::new();
        for &(addr, size) in ranges {
            assert!(
                size > 0 && size % region.block_size == 0,
                "range size {size:#x}"
            );
            let offset = addr
                .checked_sub(region.addr)
                .unwrap_or_else(|| panic!("range {addr:#x} below the region"));
            assert_eq!(offset % region.block_size, 0, "unaligned range {addr:#x}");
            let end = offset.checked_add(size).expect("range wraps");
            assert!(
                end <= region.size,
                "range {addr:#x}+{size:#x} beyond the region"
            );
            blocks
                .extend((offset / region.block_size) as usize..(end / region.block_size) as usize);
        }
        blocks
    }

    fn change(&self, ranges: &[(u64, u64)], plug: bool) -> Result<(), HotplugError> {
        let blocks = self.blocks(ranges);
        let mut plugged = self.plugged.lock().expect("not poisoned");
        for &b in &blocks {
            assert_ne!(plugged[b], plug, "block {b} asked to change to what it is");
        }
        if *self.refuse.lock().expect("not poisoned") {
            let (gpa, size) = ranges.first().copied().unwrap_or_default();
            return Err(TranslateError::NotRam { gpa, size }.into());
        }
        self.calls
            .lock()
            .expect("not poisoned")
            .push((plug, blocks.len()));
        for b in blocks {
            plugged[b] = plug;
        }
        Ok(())
    }

    fn ranges(&self) -> Vec<(u64, u64)> {
        let block = self.region.block_size;
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let plugged = self.plugged.lock().expect("not poisoned");
        for (i, _) in plugged.iter().enumerate().filter(|(_, p)| **p) {
            let addr = self.region.addr + i as u64 * block;
            match ranges.last_mut() {
                Some((start, size)) if *start + *size == addr => *size += block,
                _ => ranges.push((addr, block)),
            }
        }
        ranges
    }
}

impl HotplugBackend for ModelBackend {
    fn plug(&self, ranges: &[(u64, u64)]) -> Result<(), HotplugError> {
        self.change(ranges, true)
    }
    fn unplug(&self, ranges: &[(u64, u64)]) -> Result<(), HotplugError> {
        self.change(ranges, false)
    }
    /// Outside the region everything is RAM (the ring lives there); inside
    /// only plugged blocks are.
    fn is_ram(&self, gpa: u64, len: u64) -> bool {
        let region = self.region;
        let end = gpa.saturating_add(len);
        if end <= region.addr || gpa >= region.addr.saturating_add(region.size) {
            return true;
        }
        let plugged = self.plugged.lock().expect("not poisoned");
        (gpa.max(region.addr)..end.min(region.addr + region.size))
            .step_by(region.block_size as usize)
            .chain(std::iter::once(end.min(region.addr + region.size) - 1))
            .all(|at| plugged[((at - region.addr) / region.block_size) as usize])
    }
}

fn queue(ring: &TestRing) -> Queue {
    ring.config(0).to_queue(256).expect("a valid ring")
}

fn request(kind: u16, addr: u64, nb_blocks: u16) -> [u8; REQ_SIZE as usize] {
    let mut r = [0u8; REQ_SIZE as usize];
    r[0..2].copy_from_slice(&kind.to_le_bytes());
    r[8..16].copy_from_slice(&addr.to_le_bytes());
    r[16..18].copy_from_slice(&nb_blocks.to_le_bytes());
    r
}

pub fn virtio_mem(data: &[u8]) {
    run(data);
}

/// Runs the target; returns every plug and unplug the host side accepted,
/// as (plug?, block count), for the seed test below.
fn run(data: &[u8]) -> Vec<(bool, usize)> {
    let mut input = Input::new(data);
    let Ok(memory) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEMORY as usize)])
    else {
        panic!("cannot create guest memory");
    };
    let block = input.pick(&[2u64 << 20, 4 << 20, 128 << 20]);
    let region = MemRegion {
        addr: 4 << 30,
        size: block * (1 + u64::from(input.u8() % 64)),
        block_size: block,
    };
    let state = Arc::new(Mutex::new(MemState::new(region)));
    let backend = Arc::new(ModelBackend {
        region,
        plugged: Mutex::new(vec![false; (region.size / block) as usize]),
        refuse: Mutex::new(false),
        calls: Mutex::new(Vec::new()),
    });
    let mut handler = RequestHandler::new(state.clone(), backend.clone());
    let mut ring = TestRing::new(RING, input.pick(&[1u16, 2, 4, 8, 16, 32]));
    let mut queue = queue(&ring);
    let mut next_buffer = 0u64;
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 8 {
            0 | 1 => {
                // A request as a driver would queue it, with fuzzed fields.
                let kind = input.pick(&[0u16, 1, 2, 3, 0, 1, 9]);
                let addr = if input.bool() {
                    region.addr + block * u64::from(input.u8()) + u64::from(input.u8() % 2)
                } else {
                    input.u64()
                };
                let nb_blocks = if input.bool() {
                    u16::from(input.u8() % 8)
                } else {
                    input.u16()
                };
                let at = BUFFERS + (next_buffer % 256) * 0x40;
                next_buffer += 1;
                let _ = memory.write_slice(&request(kind, addr, nb_blocks), GuestAddress(at));
                let (req_len, resp_len) = if input.u8().is_multiple_of(4) {
                    (u32::from(input.u8()), u32::from(input.u8()))
                } else {
                    (REQ_SIZE, RESP_SIZE)
                };
                let mut chain = vec![(at, req_len, false), (at + 0x20, resp_len, true)];
                if input.u8().is_multiple_of(8) {
                    chain.reverse();
                }
                ring.add_chain(&memory, &chain);
            }
            2 => {
                // A raw descriptor: any address, length, flags and next.
                let index = input.u16();
                let addr = input.offset(&[BUFFERS, MEMORY - 8, RING, 0]);
                let (len, flags, next) = (input.u32(), u16::from(input.u8()) & 7, input.u16());
                ring.write_desc(&memory, index, addr, len, flags, next);
                if input.bool() {
                    ring.make_available(&memory, input.u16());
                }
            }
            3 => {
                // The driver scribbles over its own rings or buffers.
                let addr = input.offset(&[RING, RING + 0x1000, RING + 0x2000, BUFFERS]);
                let len = input.access_len();
                let _ = memory.write_slice(input.bytes(len), GuestAddress(addr));
            }
            4 => {
                let size = block * u64::from(input.u8() % 80);
                state.lock().expect("not poisoned").requested_size = size;
            }
            5 => *backend.refuse.lock().expect("not poisoned") = input.bool(),
            _ => {
                // The device's own count: the driver may scribble over the
                // used ring in memory.
                let before = queue.next_used();
                let mut drain = Drain::new(&mut queue, &memory);
                handler.serve(&mut drain);
                let used = queue.next_used().wrapping_sub(before);
                assert!(used <= ring.size, "{used} used entries in one drain");
                let state = state.lock().expect("not poisoned");
                assert_eq!(
                    state.plugged_ranges(),
                    backend.ranges(),
                    "device and host disagree"
                );
            }
        }
    }
    let calls = backend.calls.lock().expect("not poisoned").clone();
    calls
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_plugs_and_unplugs_through_the_ring() {
        let seed = std::fs::read(crate::runner::corpus_dir("virtio_mem").join("plug-then-unplug"))
            .expect("the seed");
        assert_eq!(run(&seed), vec![(true, 4), (false, 2)]);
    }
}
