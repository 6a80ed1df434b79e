//! A driver's side of a split virtqueue in guest memory, for tests and fuzz
//! targets that drive devices through real rings (compiled for tests and
//! with the `test-utils` feature only).

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};

use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{QueueConfig, VirtioInterrupt};

const DESC_SIZE: u64 = 16;
pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;

/// A split ring at fixed addresses: descriptor table, then the available
/// ring, then the used ring, each on its own 4 KiB page.
pub struct TestRing {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
}

impl TestRing {
    /// A ring of `size` entries (a power of two, at most 256) at `base`.
    pub fn new(base: u64, size: u16) -> TestRing {
        TestRing {
            size,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            next_desc: 0,
        }
    }

    /// Bytes of guest memory the ring occupies from its base.
    pub const SPAN: u64 = 0x3000;

    pub fn config(&self, index: u16) -> QueueConfig {
        QueueConfig {
            index,
            size: self.size,
            desc: self.desc,
            driver: self.avail,
            device: self.used,
        }
    }

    /// Writes descriptor `index` as given (no chaining added).
    pub fn write_desc(
        &self,
        memory: &GuestMemoryMmap,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let mut raw = [0u8; DESC_SIZE as usize];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        let at = self.desc + u64::from(index % self.size) * DESC_SIZE;
        memory
            .write_slice(&raw, GuestAddress(at))
            .expect("descriptor table in memory");
    }

    /// Adds a chain of (addr, len, device-writable) buffers and makes it
    /// available; returns its head.
    pub fn add_chain(&mut self, memory: &GuestMemoryMmap, buffers: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in buffers.iter().enumerate() {
            let index = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let last = i + 1 == buffers.len();
            let flags =
                if writable { DESC_F_WRITE } else { 0 } | if last { 0 } else { DESC_F_NEXT };
            self.write_desc(memory, index, addr, len, flags, self.next_desc);
        }
        self.make_available(memory, head);
        head
    }

    /// Writes `buffers` as an indirect descriptor table at `table` and makes
    /// available one ring descriptor that refers to it; returns its head.
    pub fn add_indirect_chain(
        &mut self,
        memory: &GuestMemoryMmap,
        table: u64,
        buffers: &[(u64, u32, bool)],
    ) -> u16 {
        for (i, &(addr, len, writable)) in buffers.iter().enumerate() {
            let last = i + 1 == buffers.len();
            let flags =
                if writable { DESC_F_WRITE } else { 0 } | if last { 0 } else { DESC_F_NEXT };
            let mut raw = [0u8; DESC_SIZE as usize];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&(i as u16 + 1).to_le_bytes());
            memory
                .write_slice(&raw, GuestAddress(table + i as u64 * DESC_SIZE))
                .expect("indirect table in memory");
        }
        let head = self.next_desc;
        self.next_desc = (self.next_desc + 1) % self.size;
        let len = buffers.len() as u32 * DESC_SIZE as u32;
        self.write_desc(memory, head, table, len, DESC_F_INDIRECT, 0);
        self.make_available(memory, head);
        head
    }

    /// A ready queue on this ring, as the transport would build it.
    pub fn queue(&self) -> Queue {
        self.config(0)
            .to_queue(self.size)
            .expect("a valid test ring")
    }

    /// Puts `head` in the next slot of the available ring.
    pub fn make_available(&self, memory: &GuestMemoryMmap, head: u16) {
        let idx = self.avail_idx(memory);
        let slot = self.avail + 4 + u64::from(idx % self.size) * 2;
        memory
            .write_obj(head.to_le(), GuestAddress(slot))
            .expect("avail ring in memory");
        memory
            .write_obj(idx.wrapping_add(1).to_le(), GuestAddress(self.avail + 2))
            .expect("avail ring in memory");
    }

    pub fn avail_idx(&self, memory: &GuestMemoryMmap) -> u16 {
        u16::from_le(
            memory
                .read_obj(GuestAddress(self.avail + 2))
                .expect("avail ring in memory"),
        )
    }

    /// How many used entries the device has written.
    pub fn used_idx(&self, memory: &GuestMemoryMmap) -> u16 {
        u16::from_le(
            memory
                .read_obj(GuestAddress(self.used + 2))
                .expect("used ring in memory"),
        )
    }

    /// The used entry `n`: (head, written length).
    pub fn used_entry(&self, memory: &GuestMemoryMmap, n: u16) -> (u32, u32) {
        let at = self.used + 4 + u64::from(n % self.size) * 8;
        let id: u32 = memory
            .read_obj(GuestAddress(at))
            .expect("used ring in memory");
        let len: u32 = memory
            .read_obj(GuestAddress(at + 4))
            .expect("used ring in memory");
        (u32::from_le(id), u32::from_le(len))
    }
}

/// Counts the queue interrupts a device raises; it offers no irqfds.
#[derive(Default)]
pub struct CountingInterrupt(AtomicUsize);

impl CountingInterrupt {
    pub fn queue_interrupts(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl VirtioInterrupt for CountingInterrupt {
    fn signal_queue(&self, _queue: u16) -> io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn signal_config(&self) -> io::Result<()> {
        Ok(())
    }
    fn queue_irqfd(&self, _queue: u16) -> Option<EventFd> {
        None
    }
    fn config_irqfd(&self) -> Option<EventFd> {
        None
    }
}
