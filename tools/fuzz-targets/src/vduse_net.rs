//! vduse-net, the test device: IOTLB entries as the kernel could report
//! them (odd ones included), queues at any address, descriptor chains of
//! any shape, and raw VDUSE requests. The device must refuse what it cannot
//! reach, never panic.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::FromRawFd;

use vduse_net::iotlb::{Entry, Iotlb, IotlbError, IotlbSource, Perm};
use vduse_net::net::{NetQueue, Stats};
use vduse_net::vduse::{Request, MSG_SIZE};
use vm_memory::{Bytes, GuestAddress};

use crate::input::Input;

const MAX_OPS: usize = 48;
/// Size of the memfd behind every entry.
const FILE_SIZE: u64 = 0x10_0000;

/// Entries over one memfd, answered the way VDUSE_IOTLB_GET_FD does: the
/// first entry (by start) that overlaps the asked range.
struct FuzzSource {
    file: File,
    entries: Vec<Entry>,
}

impl IotlbSource for FuzzSource {
    fn first_mapping(&self, start: u64, last: u64) -> Result<Option<(Entry, File)>, IotlbError> {
        let mut entries = self.entries.clone();
        entries.sort_by_key(|e| e.start);
        let Some(entry) = entries
            .into_iter()
            .find(|e| e.last >= start && e.start <= last)
        else {
            return Ok(None);
        };
        match self.file.try_clone() {
            Ok(file) => Ok(Some((entry, file))),
            Err(_) => Ok(None),
        }
    }
}

fn memfd() -> File {
    // SAFETY: memfd_create reads a NUL-terminated name from a static C string
    // and returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"fuzz-vduse-net".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(FILE_SIZE).expect("sizing the memfd");
    file
}

fn entry(input: &mut Input) -> Entry {
    let start = input.pick(&[
        0u64,
        0x1000,
        0x10_0000,
        0x20_0000,
        u64::MAX - 0xfff,
        u64::MAX,
    ]);
    let start = if input.u8().is_multiple_of(8) {
        input.u64()
    } else {
        start
    };
    let last = match input.u8() % 6 {
        0 => u64::MAX,
        1 => start.wrapping_sub(1),
        2 => input.u64(),
        _ => start.wrapping_add(0x1000 * (1 + u64::from(input.u8() % 64)) - 1),
    };
    let offset = if input.u8().is_multiple_of(8) {
        input.u64()
    } else {
        0x1000 * u64::from(input.u8() % 128)
    };
    let perm = input.pick(&[Perm::Rw, Perm::Rw, Perm::Ro, Perm::Wo]);
    Entry {
        start,
        last,
        offset,
        perm,
    }
}

pub fn vduse_net(data: &[u8]) {
    let mut input = Input::new(data);
    // Raw requests decode to something, whatever the bytes.
    let mut raw = [0u8; MSG_SIZE];
    let len = usize::from(input_len(&mut input));
    let head = input.bytes(len);
    raw[..head.len()].copy_from_slice(head);
    Request::decode(&raw);

    let entries = (0..input.u8() % 6).map(|_| entry(&mut input)).collect();
    let source = FuzzSource {
        file: memfd(),
        entries,
    };
    let mut iotlb = Iotlb::new();
    let (start, last) = if input.bool() {
        (0, u64::MAX)
    } else {
        (input.u64(), input.u64())
    };
    let _ = iotlb.refresh(&source, start, last);
    let mut stats = Stats::default();
    let places = [0u64, 0x1000, 0x10_0000, 0x20_0000, u64::MAX - 0xfff];
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 5 {
            0 => {
                // The driver writes into mapped memory (rings, descriptors).
                let addr = input.offset(&places);
                let len = input.access_len() * 4;
                let bytes = input.bytes(len);
                // Only where the driver may write: the device maps read-only
                // entries read-only, and a write there would fault.
                if let (Some(memory), Ok(())) =
                    (iotlb.memory(), iotlb.check(addr, bytes.len() as u64, true))
                {
                    let _ = memory.write_slice(bytes, GuestAddress(addr));
                }
            }
            1 | 2 => {
                let size = input.pick(&[1u16, 2, 4, 8, 16, 256, 0, 3]);
                let (desc, driver, device) = (
                    input.offset(&places),
                    input.offset(&places),
                    input.offset(&places),
                );
                let Ok(mut queue) = NetQueue::new(size, desc, driver, device, input.u16()) else {
                    continue;
                };
                if input.bool() {
                    let _ = queue.drain_tx(&iotlb, &mut stats, |_| {}, |_| {});
                } else {
                    let mut frames: VecDeque<Vec<u8>> = (0..input.u8() % 4)
                        .map(|i| vec![i; usize::from(input.u16() % 1600)])
                        .collect();
                    let _ = queue.fill_rx(&iotlb, &mut stats, &mut frames, |_| {});
                }
            }
            3 => {
                let (addr, len) = (input.offset(&places), input.u64());
                let _ = iotlb.check(addr, len, input.bool());
                iotlb.entry_of(addr);
            }
            _ => {
                let (start, last) = (input.offset(&places), input.offset(&places));
                let _ = iotlb.refresh(&source, start, last);
            }
        }
    }
    stats.summary();
    iotlb.dump();
}

/// How many bytes of the input form the raw request (at most MSG_SIZE).
fn input_len(input: &mut Input) -> u8 {
    input.u8() % (MSG_SIZE as u8 + 1)
}
