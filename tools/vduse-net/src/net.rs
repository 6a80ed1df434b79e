//! The virtio-net side: feature bits, config space, and moving frames between split
//! virtqueues and byte buffers. Guest memory is touched only through [`Iotlb`] after
//! [`Iotlb::check`] allowed the access.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use thiserror::Error;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::iotlb::{AccessError, Iotlb};

pub const VIRTIO_ID_NET: u32 = 1;
pub const VIRTIO_NET_F_MTU: u64 = 1 << 3;
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
pub const VIRTIO_NET_F_MQ: u64 = 1 << 22;
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << 33;
pub const DEVICE_FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_F_ACCESS_PLATFORM
    | VIRTIO_NET_F_MAC
    | VIRTIO_NET_F_STATUS
    | VIRTIO_NET_F_MTU;

/// What the device offers with `pairs` queue pairs: MQ from two on (and
/// never a control queue, which VDUSE refuses for net devices: the VMM
/// serves the guest's and enables the pairs in use).
pub fn device_features(pairs: u16) -> u64 {
    match pairs {
        0 | 1 => DEVICE_FEATURES,
        _ => DEVICE_FEATURES | VIRTIO_NET_F_MQ,
    }
}

/// Most queue pairs `--queues` takes.
pub const MAX_PAIRS: u16 = 8;

/// The name of queue `i` in logs and stats: rx, tx (the first pair), rx1,
/// tx1, ...
pub fn queue_name(i: u16) -> String {
    let kind = if i.is_multiple_of(2) { "rx" } else { "tx" };
    match i / 2 {
        0 => kind.to_string(),
        pair => format!("{kind}{pair}"),
    }
}

pub const VIRTIO_CONFIG_S_DRIVER_OK: u8 = 4;
const VIRTIO_NET_S_LINK_UP: u16 = 1;

pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
pub const NUM_QUEUES: u16 = 2;
pub const QUEUE_MAX_SIZE: u16 = 256;
pub const MTU: u16 = 1500;
/// `struct virtio_net_hdr_v1` (VERSION_1 always uses the 12-byte header).
pub const NET_HDR_LEN: usize = 12;
/// Largest frame accepted from the guest (no GSO is offered): MTU + Ethernet + VLAN.
pub const MAX_FRAME: usize = MTU as usize + 18;

/// `struct virtio_net_config` (24 bytes, little endian) with MAC, LINK_UP,
/// max_virtqueue_pairs and MTU.
pub fn net_config(mac: [u8; 6], pairs: u16) -> Vec<u8> {
    let mut c = vec![0u8; 24];
    c[0..6].copy_from_slice(&mac);
    c[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
    c[8..10].copy_from_slice(&pairs.max(1).to_le_bytes()); // max_virtqueue_pairs
    c[10..12].copy_from_slice(&MTU.to_le_bytes());
    c[12..16].copy_from_slice(&u32::MAX.to_le_bytes()); // speed unknown
    c[16] = 0xff; // duplex unknown
    c
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(mac)
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ChainError {
    #[error(transparent)]
    Access(#[from] AccessError),
    #[error("guest memory access at {0:#x} failed")]
    Memory(u64),
    #[error("TX chain has a device-writable descriptor")]
    WritableInTx,
    #[error("RX chain has a device-readable descriptor")]
    ReadableInRx,
    #[error("TX chain shorter than the virtio-net header ({0} bytes)")]
    ShortTx(usize),
    #[error("TX frame too long ({0} bytes)")]
    LongTx(usize),
    #[error("RX buffers too small: {need} bytes needed, {have} offered")]
    SmallRx { need: usize, have: usize },
    #[error("queue rings are not readable/writable through the IOTLB: {0}")]
    Rings(AccessError),
}

/// Per-IOTLB-entry use of buffers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RangeUse {
    pub tx_bufs: u64,
    pub rx_bufs: u64,
}

/// Traffic counters.
#[derive(Debug, Default)]
pub struct Stats {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_errors: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    pub rx_errors: u64,
    /// Keyed by the (start, last) of the IOTLB entry a buffer descriptor pointed into.
    pub ranges: BTreeMap<(u64, u64), RangeUse>,
    /// Lowest and highest buffer IOVA seen.
    pub lowest: Option<u64>,
    pub highest: Option<u64>,
}

impl Stats {
    fn note_buffer(&mut self, iotlb: &Iotlb, addr: u64, len: u64, tx: bool) {
        self.lowest = Some(self.lowest.map_or(addr, |l| l.min(addr)));
        // check() accepted [addr, addr + len) without wrapping; an empty
        // buffer counts as its first byte.
        let end = addr.saturating_add(len.saturating_sub(1));
        self.highest = Some(self.highest.map_or(end, |h| h.max(end)));
        if let Some(e) = iotlb.entry_of(addr) {
            let u = self.ranges.entry((e.start, e.last)).or_default();
            if tx {
                u.tx_bufs += 1;
            } else {
                u.rx_bufs += 1;
            }
        }
    }

    /// One-line summary.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "tx_frames={} tx_bytes={} tx_errors={} rx_frames={} rx_bytes={} rx_dropped={} rx_errors={}",
            self.tx_frames,
            self.tx_bytes,
            self.tx_errors,
            self.rx_frames,
            self.rx_bytes,
            self.rx_dropped,
            self.rx_errors
        );
        if let (Some(l), Some(h)) = (self.lowest, self.highest) {
            let _ = write!(s, " buffer_iova=[{l:#x},{h:#x}]");
        }
        s.push_str(" ranges=[");
        let mut first = true;
        for ((start, last), u) in &self.ranges {
            if !first {
                s.push(' ');
            }
            first = false;
            let _ = write!(s, "{start:#x}-{last:#x}:tx{},rx{}", u.tx_bufs, u.rx_bufs);
        }
        s.push(']');
        s
    }
}

/// Checks that the rings of `q` are readable (descriptor table, avail ring) and
/// writable (used ring) through the IOTLB. virtio-queue writes the used ring itself, so
/// this must hold before it is asked to.
pub fn check_rings(q: &Queue, iotlb: &Iotlb) -> Result<(), ChainError> {
    let n = u64::from(q.size());
    iotlb
        .check(q.desc_table(), 16 * n, false)
        .and_then(|_| iotlb.check(q.avail_ring(), 6 + 2 * n, false))
        .and_then(|_| iotlb.check(q.used_ring(), 6 + 8 * n, true))
        .map_err(ChainError::Rings)
}

fn descriptors(chain: DescriptorChain<&GuestMemoryMmap>) -> Vec<Descriptor> {
    chain.collect()
}

/// Reads a TX chain: returns the Ethernet frame (virtio-net header stripped).
pub fn read_tx_chain(
    chain: DescriptorChain<&GuestMemoryMmap>,
    iotlb: &Iotlb,
    stats: &mut Stats,
) -> Result<Vec<u8>, ChainError> {
    let mem = iotlb
        .memory()
        .ok_or(ChainError::Access(AccessError::Unmapped(0)))?;
    let mut data = Vec::new();
    for d in descriptors(chain) {
        if d.is_write_only() {
            return Err(ChainError::WritableInTx);
        }
        let (addr, len) = (d.addr().0, u64::from(d.len()));
        if data.len() + len as usize > NET_HDR_LEN + MAX_FRAME {
            return Err(ChainError::LongTx(data.len() + len as usize));
        }
        iotlb.check(addr, len, false)?;
        stats.note_buffer(iotlb, addr, len, true);
        let at = data.len();
        data.resize(at + len as usize, 0);
        mem.read_slice(&mut data[at..], GuestAddress(addr))
            .map_err(|_| ChainError::Memory(addr))?;
    }
    if data.len() < NET_HDR_LEN {
        return Err(ChainError::ShortTx(data.len()));
    }
    data.drain(..NET_HDR_LEN);
    Ok(data)
}

/// The 12-byte header put in front of every received frame: no offloads,
/// num_buffers = 1.
pub fn rx_header() -> [u8; NET_HDR_LEN] {
    let mut h = [0u8; NET_HDR_LEN];
    h[10..12].copy_from_slice(&1u16.to_le_bytes());
    h
}

/// Writes header + frame into an RX chain; returns the number of bytes written.
pub fn write_rx_chain(
    chain: DescriptorChain<&GuestMemoryMmap>,
    iotlb: &Iotlb,
    frame: &[u8],
    stats: &mut Stats,
) -> Result<u32, ChainError> {
    let mem = iotlb
        .memory()
        .ok_or(ChainError::Access(AccessError::Unmapped(0)))?;
    let descs = descriptors(chain);
    let need = NET_HDR_LEN + frame.len();
    let mut have = 0usize;
    for d in &descs {
        if !d.is_write_only() {
            return Err(ChainError::ReadableInRx);
        }
        have = have.saturating_add(d.len() as usize);
    }
    if have < need {
        return Err(ChainError::SmallRx { need, have });
    }
    let header = rx_header();
    let mut src = header.iter().chain(frame.iter()).copied();
    let mut written = 0usize;
    let mut chunk = Vec::new();
    for d in descs {
        if written == need {
            break;
        }
        let n = (d.len() as usize).min(need - written);
        let addr = d.addr().0;
        iotlb.check(addr, n as u64, true)?;
        stats.note_buffer(iotlb, addr, n as u64, false);
        chunk.clear();
        chunk.extend(src.by_ref().take(n));
        mem.write_slice(&chunk, GuestAddress(addr))
            .map_err(|_| ChainError::Memory(addr))?;
        written += n;
    }
    Ok(written as u32)
}

/// One running virtqueue.
pub struct NetQueue {
    pub queue: Queue,
}

/// What serving a queue did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Served {
    /// Chains returned to the used ring.
    pub used: usize,
    /// The driver wants an interrupt.
    pub notify: bool,
}

impl NetQueue {
    /// A queue at the given ring addresses, starting at `avail_index`.
    pub fn new(
        size: u16,
        desc: u64,
        driver: u64,
        device: u64,
        avail_index: u16,
    ) -> Result<NetQueue, virtio_queue::Error> {
        let mut queue = Queue::new(QUEUE_MAX_SIZE)?;
        queue.try_set_size(size)?;
        queue.try_set_desc_table_address(GuestAddress(desc))?;
        queue.try_set_avail_ring_address(GuestAddress(driver))?;
        queue.try_set_used_ring_address(GuestAddress(device))?;
        queue.set_next_avail(avail_index);
        queue.set_next_used(avail_index);
        queue.set_ready(true);
        Ok(NetQueue { queue })
    }

    /// Takes every available TX chain, hands each frame to `sink`, returns the chains.
    pub fn drain_tx(
        &mut self,
        iotlb: &Iotlb,
        stats: &mut Stats,
        mut sink: impl FnMut(Vec<u8>),
        mut log: impl FnMut(String),
    ) -> Result<Served, ChainError> {
        let Some(mem) = iotlb.memory() else {
            return Err(ChainError::Rings(AccessError::Unmapped(
                self.queue.desc_table(),
            )));
        };
        check_rings(&self.queue, iotlb)?;
        let mut served = Served::default();
        while let Some(chain) = self.queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match read_tx_chain(chain, iotlb, stats) {
                Ok(frame) => {
                    stats.tx_frames += 1;
                    stats.tx_bytes += frame.len() as u64;
                    sink(frame);
                }
                Err(e) => {
                    stats.tx_errors += 1;
                    log(format!("tx chain {head}: {e}"));
                }
            }
            self.queue
                .add_used(mem, head, 0)
                .map_err(|_| ChainError::Memory(self.queue.used_ring()))?;
            served.used += 1;
        }
        if served.used > 0 {
            served.notify = self.queue.needs_notification(mem).unwrap_or(true);
        }
        Ok(served)
    }

    /// Delivers frames from the front of `frames` while RX buffers last. Frames that
    /// fit no buffer are dropped (and logged); the rest stay in `frames`.
    pub fn fill_rx(
        &mut self,
        iotlb: &Iotlb,
        stats: &mut Stats,
        frames: &mut std::collections::VecDeque<Vec<u8>>,
        mut log: impl FnMut(String),
    ) -> Result<Served, ChainError> {
        let mut served = Served::default();
        if frames.is_empty() {
            return Ok(served);
        }
        let Some(mem) = iotlb.memory() else {
            return Err(ChainError::Rings(AccessError::Unmapped(
                self.queue.desc_table(),
            )));
        };
        check_rings(&self.queue, iotlb)?;
        while !frames.is_empty() {
            let Some(chain) = self.queue.pop_descriptor_chain(mem) else {
                break;
            };
            let frame = frames.pop_front().expect("not empty");
            let head = chain.head_index();
            let len = match write_rx_chain(chain, iotlb, &frame, stats) {
                Ok(n) => {
                    stats.rx_frames += 1;
                    stats.rx_bytes += frame.len() as u64;
                    n
                }
                Err(e) => {
                    stats.rx_errors += 1;
                    log(format!("rx chain {head}: {e}; frame dropped"));
                    0
                }
            };
            self.queue
                .add_used(mem, head, len)
                .map_err(|_| ChainError::Memory(self.queue.used_ring()))?;
            served.used += 1;
        }
        if served.used > 0 {
            served.notify = self.queue.needs_notification(mem).unwrap_or(true);
        }
        Ok(served)
    }

    /// Index of the next avail entry the device will read (for GET_VQ_STATE).
    pub fn next_avail(&self) -> u16 {
        self.queue.next_avail()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iotlb::tests::{entry, FakeSource};
    use crate::iotlb::Perm;
    use std::collections::VecDeque;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryBackend;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    /// Rings at IOVA 0x1000.., buffers at 0x10_0000.. (RW), 0x20_0000.. (RO).
    fn setup() -> (FakeSource, Iotlb) {
        let src = FakeSource::new(
            0x40_0000,
            vec![
                entry(0x0, 0xf_ffff, 0, Perm::Rw),
                entry(0x10_0000, 0x1f_ffff, 0x10_0000, Perm::Rw),
                entry(0x20_0000, 0x20_ffff, 0x20_0000, Perm::Ro),
            ],
        );
        let mut t = Iotlb::new();
        t.refresh(&src, 0, u64::MAX).unwrap();
        (src, t)
    }

    fn raw(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    fn queue_of(m: &MockSplitQueue<GuestMemoryMmap>) -> NetQueue {
        NetQueue::new(
            16,
            m.desc_table_addr().0,
            m.avail_addr().0,
            m.used_addr().0,
            0,
        )
        .unwrap()
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("52:54:00:12:34:56"),
            Some([0x52, 0x54, 0, 0x12, 0x34, 0x56])
        );
        assert_eq!(parse_mac("52:54:00:12:34"), None);
        assert_eq!(parse_mac("52:54:00:12:34:56:78"), None);
        assert_eq!(parse_mac("52:54:00:12:34:5g"), None);
        assert_eq!(parse_mac("52:54:00:12:34:"), None);
        assert_eq!(parse_mac("052:54:00:12:34:56"), None);
    }

    #[test]
    fn config_space() {
        let c = net_config([1, 2, 3, 4, 5, 6], 1);
        assert_eq!(c.len(), 24);
        assert_eq!(&c[..6], &[1, 2, 3, 4, 5, 6]);
        assert_eq!(&c[6..8], &[1, 0]);
        assert_eq!(&c[8..10], &[1, 0], "one pair");
        assert_eq!(&c[10..12], &1500u16.to_le_bytes());
        assert_eq!(&net_config([0; 6], 4)[8..10], &[4, 0]);
    }

    #[test]
    fn multiqueue_offers_mq_and_names_every_queue() {
        assert_eq!(device_features(1), DEVICE_FEATURES);
        assert_eq!(device_features(1) & VIRTIO_NET_F_MQ, 0);
        assert_eq!(device_features(4), DEVICE_FEATURES | VIRTIO_NET_F_MQ);
        let names: Vec<String> = (0..6).map(queue_name).collect();
        assert_eq!(names, ["rx", "tx", "rx1", "tx1", "rx2", "tx2"]);
    }

    #[test]
    fn tx_chain_split_over_descriptors() {
        let (src, t) = setup();
        let mem = t.memory().unwrap();
        let m = MockSplitQueue::create(mem, GuestAddress(0x1000), 16);
        let mut frame = vec![0u8; NET_HDR_LEN];
        frame.extend((0..100u8).collect::<Vec<_>>());
        mem.write_slice(&frame[..20], GuestAddress(0x10_0000))
            .unwrap();
        // 0x20_0000 is mapped read-only here: the driver side writes it through the file.
        use std::os::unix::fs::FileExt;
        src.file.write_all_at(&frame[20..], 0x20_0000).unwrap();
        m.add_desc_chains(&[raw(0x10_0000, 20, F_NEXT), raw(0x20_0000, 92, 0)], 0)
            .unwrap();
        // add_desc_chains needs `next` set.
        let d0 = Descriptor::new(0x10_0000, 20, F_NEXT, 1);
        m.desc_table().store(0, RawDescriptor::from(d0)).unwrap();

        let mut q = queue_of(&m);
        let mut stats = Stats::default();
        let mut out = Vec::new();
        let served = q
            .drain_tx(&t, &mut stats, |f| out.push(f), |e| panic!("{e}"))
            .unwrap();
        assert_eq!(served.used, 1);
        assert!(served.notify);
        assert_eq!(out, vec![(0..100u8).collect::<Vec<_>>()]);
        assert_eq!(stats.tx_frames, 1);
        assert_eq!(stats.tx_bytes, 100);
        assert_eq!(
            stats.ranges.get(&(0x10_0000, 0x1f_ffff)),
            Some(&RangeUse {
                tx_bufs: 1,
                rx_bufs: 0
            })
        );
        assert_eq!(
            stats.ranges.get(&(0x20_0000, 0x20_ffff)).unwrap().tx_bufs,
            1
        );
        assert_eq!(m.used().idx().load(), 1);
        assert!(stats.summary().contains("0x100000-0x1fffff:tx1,rx0"));
    }

    #[test]
    fn tx_from_unmapped_iova_is_refused() {
        let (_src, t) = setup();
        let mem = t.memory().unwrap();
        let m = MockSplitQueue::create(mem, GuestAddress(0x1000), 16);
        // 0x30_0000 is not in the IOTLB.
        m.add_desc_chains(&[raw(0x30_0000, 64, 0)], 0).unwrap();
        let mut q = queue_of(&m);
        let mut stats = Stats::default();
        let mut errors = Vec::new();
        let served = q
            .drain_tx(&t, &mut stats, |_| panic!("no frame"), |e| errors.push(e))
            .unwrap();
        assert_eq!(served.used, 1);
        assert_eq!(stats.tx_errors, 1);
        assert!(errors[0].contains("not covered"), "{errors:?}");
    }

    #[test]
    fn rx_delivery_and_permissions() {
        let (_src, t) = setup();
        let mem = t.memory().unwrap();
        let m = MockSplitQueue::create(mem, GuestAddress(0x1000), 16);
        // Chain 0: two writable buffers (8 + 100 bytes). Chain 1: writable buffer in the
        // read-only entry. Chain 2: too small.
        m.add_desc_chains(
            &[
                raw(0x10_0000, 8, F_WRITE | F_NEXT),
                raw(0x18_0000, 100, F_WRITE),
                raw(0x20_0000, 100, F_WRITE),
                raw(0x10_1000, 10, F_WRITE),
            ],
            0,
        )
        .unwrap();
        m.desc_table()
            .store(
                0,
                RawDescriptor::from(Descriptor::new(0x10_0000, 8, F_WRITE | F_NEXT, 1)),
            )
            .unwrap();
        let mut q = queue_of(&m);
        let mut stats = Stats::default();
        let mut frames: VecDeque<Vec<u8>> = vec![
            vec![0xaa; 60],
            vec![0xbb; 60],
            vec![0xcc; 60],
            vec![0xdd; 60],
        ]
        .into();
        let mut log = Vec::new();
        let served = q
            .fill_rx(&t, &mut stats, &mut frames, |e| log.push(e))
            .unwrap();
        assert_eq!(served.used, 3);
        assert_eq!(frames.len(), 1, "no fourth buffer: last frame waits");
        assert_eq!(stats.rx_frames, 1);
        assert_eq!(stats.rx_errors, 2);
        assert!(log[0].contains("permission"), "{log:?}");
        assert!(log[1].contains("too small"), "{log:?}");

        let mut got = [0u8; 72];
        mem.read_slice(&mut got[..8], GuestAddress(0x10_0000))
            .unwrap();
        mem.read_slice(&mut got[8..], GuestAddress(0x18_0000))
            .unwrap();
        assert_eq!(&got[..12], &rx_header());
        assert!(got[12..].iter().all(|&b| b == 0xaa));
        // Used ring: first element len 72.
        let used_len: u32 = mem.read_obj(GuestAddress(m.used_addr().0 + 4 + 4)).unwrap();
        assert_eq!(used_len, 72);
        // Nothing was written into the read-only entry.
        let mut ro = [0u8; 4];
        mem.read_slice(&mut ro, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(ro, [0; 4]);
        assert!(mem.address_in_range(GuestAddress(0x20_0000)));
    }

    #[test]
    fn empty_descriptors_at_the_top_of_the_address_space_are_harmless() {
        let (_src, t) = setup();
        let mem = t.memory().unwrap();
        let tx = MockSplitQueue::create(mem, GuestAddress(0x1000), 16);
        tx.add_desc_chains(&[raw(u64::MAX, 0, 0)], 0).unwrap();
        let mut stats = Stats::default();
        let mut errors = Vec::new();
        let served = queue_of(&tx)
            .drain_tx(&t, &mut stats, |_| panic!("no frame"), |e| errors.push(e))
            .unwrap();
        assert_eq!((served.used, stats.tx_errors), (1, 1), "{errors:?}");
        assert_eq!(stats.highest, Some(u64::MAX));
        let rx = MockSplitQueue::create(mem, GuestAddress(0x4000), 16);
        rx.add_desc_chains(&[raw(u64::MAX, 0, F_WRITE)], 0).unwrap();
        let mut frames: VecDeque<Vec<u8>> = vec![vec![0xaa; 60]].into();
        let served = queue_of(&rx)
            .fill_rx(&t, &mut stats, &mut frames, |e| errors.push(e))
            .unwrap();
        assert_eq!((served.used, stats.rx_errors), (1, 1), "{errors:?}");
    }

    #[test]
    fn rings_must_be_mapped() {
        let (src, mut t) = setup();
        let mem = t.memory().unwrap().clone();
        let m = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        let mut q = queue_of(&m);
        // Make the ring area read-only: the used ring is then not writable.
        *src.entries.borrow_mut() = vec![entry(0x0, 0xf_ffff, 0, Perm::Ro)];
        t.refresh(&src, 0, u64::MAX).unwrap();
        let mut stats = Stats::default();
        let r = q.drain_tx(&t, &mut stats, |_| {}, |_| {});
        assert!(
            matches!(r, Err(ChainError::Rings(AccessError::Permission(_)))),
            "{r:?}"
        );
    }
}
