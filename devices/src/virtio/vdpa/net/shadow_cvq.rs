//! The device's own control queue, driven by the VMM (the shadowed mode):
//! a small split ring and one command buffer in memory of the VMM's own,
//! mapped for the device only in address space 1, which holds nothing of
//! the guest's. The guest's commands are read by the VMM from the guest's
//! control queue ([`super::control_queue`]); what the VMM accepts is
//! copied here, one command in flight at a time, and the device's answer
//! goes back to the guest.
//!
//! The memory is a shared memfd mapping: a VA parent (`use_va`) maps only
//! shared file mappings, a PA parent pins it like guest RAM.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::dma::{DmaRange, Perm};

/// Descriptors in the ring: a command is two (the command, the ack).
pub const SHADOW_QUEUE_SIZE: u16 = 4;
const PAGE: u64 = 4096;
/// Page 0, which the device may only read: the descriptor table (16
/// bytes each), the avail ring, the command.
const DESC: u64 = 0;
const AVAIL: u64 = 64;
const COMMAND: u64 = 256;
/// Page 1, which the device writes: the used ring and the ack byte.
const USED: u64 = PAGE;
const ACK: u64 = PAGE + 64;
const SIZE: u64 = 2 * PAGE;
/// The most bytes a forwarded command may have.
pub const MAX_FORWARDED: usize = (PAGE - COMMAND) as usize;
/// How long the device has to answer one command.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Written into the ack byte before each command: neither OK nor ERR.
const NO_ANSWER: u8 = 0xff;

#[derive(Debug, thiserror::Error)]
pub enum ShadowError {
    #[error("cannot create the buffers of the device's control queue: {0}")]
    Memory(String),
    #[error("a command of {0} bytes does not fit the buffer ({MAX_FORWARDED} bytes)")]
    TooLong(usize),
    #[error("cannot write the VMM's ring: {0}")]
    Ring(#[from] vm_memory::GuestMemoryError),
    #[error("cannot kick the device's control queue: {0}")]
    Kick(std::io::Error),
    #[error("the device did not answer within {0:?}; its control queue is not used again until the driver restarts the device")]
    NoAnswer(Duration),
    #[error("the device's control queue stopped answering earlier; restart the device")]
    Stuck,
    #[error("the device completed the command without writing its ack (used length {0})")]
    NoAck(u32),
    #[error("the device's control queue is not shadowed")]
    NotShadowed,
}

/// Where the ring lies for the device (IOVAs in address space 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShadowRing {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// The ring's positions and counts: plain data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShadowState {
    pub next_avail: u16,
    pub last_used: u16,
    pub forwarded: u64,
    /// Set when the device did not answer: the ring's state is unknown.
    pub stuck: bool,
}

/// What the device is wired with, for whoever starts it.
pub struct ShadowWiring {
    pub ring: ShadowRing,
    /// What address space 1 holds: these ranges, nothing else.
    pub mappings: Vec<DmaRange>,
    pub kick: EventFd,
    pub call: EventFd,
    memory: GuestMemoryMmap,
}

impl ShadowWiring {
    /// Zeroes the ring before the device is started on it (its indexes
    /// start at 0); the worker that forwards is stopped then.
    pub fn clear(&self) -> Result<(), ShadowError> {
        self.memory
            .write_slice(&[0u8; SIZE as usize], GuestAddress(0))?;
        Ok(())
    }
}

/// The VMM's side of the device's control queue.
pub struct ShadowCvq {
    memory: GuestMemoryMmap,
    iova: u64,
    kick: EventFd,
    call: EventFd,
    state: ShadowState,
}

fn memfd(name: &std::ffi::CStr) -> std::io::Result<File> {
    // SAFETY: memfd_create reads the NUL-terminated `name`, which outlives
    // the call, and returns a new descriptor or -1; nothing else is touched.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

impl ShadowCvq {
    /// Allocates the buffers, at the first page-aligned IOVA at or above
    /// `iova_first` (address space 1 holds nothing else).
    pub fn new(iova_first: u64) -> Result<(ShadowCvq, ShadowWiring), ShadowError> {
        let fail =
            |what: &str, e: &dyn std::fmt::Display| ShadowError::Memory(format!("{what}: {e}"));
        let iova = iova_first
            .checked_next_multiple_of(PAGE)
            .filter(|iova| iova.checked_add(SIZE).is_some())
            .ok_or_else(|| fail("the IOVA range", &"no room for two pages"))?;
        let file = memfd(c"microvm-shadow-cvq").map_err(|e| fail("memfd_create", &e))?;
        file.set_len(SIZE).map_err(|e| fail("ftruncate", &e))?;
        let region = GuestRegionMmap::from_range(
            GuestAddress(0),
            SIZE as usize,
            Some(FileOffset::new(file, 0)),
        )
        .map_err(|e| fail("mmap", &e))?;
        let host = region.as_ptr() as u64;
        let memory = GuestMemoryMmap::from_regions(vec![region]).map_err(|e| fail("mmap", &e))?;
        let mappings = vec![
            DmaRange::new(iova, PAGE, host, Perm::ReadOnly),
            DmaRange::new(iova + PAGE, PAGE, host + PAGE, Perm::ReadWrite),
        ];
        let eventfd = || EventFd::new(EFD_NONBLOCK).map_err(|e| fail("eventfd", &e));
        let (kick, call) = (eventfd()?, eventfd()?);
        let wiring = ShadowWiring {
            ring: ShadowRing {
                size: SHADOW_QUEUE_SIZE,
                desc: iova + DESC,
                avail: iova + AVAIL,
                used: iova + USED,
            },
            mappings,
            kick: kick.try_clone().map_err(|e| fail("eventfd", &e))?,
            call: call.try_clone().map_err(|e| fail("eventfd", &e))?,
            memory: memory.clone(),
        };
        let cvq = ShadowCvq {
            memory,
            iova,
            kick,
            call,
            state: ShadowState::default(),
        };
        Ok((cvq, wiring))
    }

    pub fn state(&self) -> ShadowState {
        self.state
    }

    /// The device's ring starts over: its base was set to 0 and the ring
    /// cleared ([`ShadowWiring::clear`]) before DRIVER_OK.
    pub fn restart(&mut self) {
        self.state = ShadowState {
            forwarded: self.state.forwarded,
            ..ShadowState::default()
        };
    }

    /// Sends `command` (class, command, data) through the device's
    /// control queue and returns the device's ack byte.
    pub fn forward(&mut self, command: &[u8]) -> Result<u8, ShadowError> {
        if self.state.stuck {
            return Err(ShadowError::Stuck);
        }
        if command.len() > MAX_FORWARDED {
            return Err(ShadowError::TooLong(command.len()));
        }
        let m = &self.memory;
        m.write_slice(command, GuestAddress(COMMAND))?;
        m.write_obj(NO_ANSWER, GuestAddress(ACK))?;
        // Descriptors 0 and 1: one command in flight at a time.
        let len = command.len() as u32;
        self.write_desc(0, self.iova + COMMAND, len, VIRTQ_DESC_F_NEXT, 1)?;
        self.write_desc(1, self.iova + ACK, 1, VIRTQ_DESC_F_WRITE, 0)?;
        let slot = u64::from(self.state.next_avail % SHADOW_QUEUE_SIZE);
        m.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * slot))?;
        // The entry before the index that publishes it.
        fence(Ordering::SeqCst);
        self.state.next_avail = self.state.next_avail.wrapping_add(1);
        m.write_obj(self.state.next_avail, GuestAddress(AVAIL + 2))?;
        fence(Ordering::SeqCst);
        let _ = self.call.read();
        self.kick.write(1).map_err(ShadowError::Kick)?;
        self.wait_used()?;
        fence(Ordering::SeqCst);
        let m = &self.memory;
        let slot = u64::from(self.state.last_used % SHADOW_QUEUE_SIZE);
        let used_len: u32 = m.read_obj(GuestAddress(USED + 4 + 8 * slot + 4))?;
        self.state.last_used = self.state.last_used.wrapping_add(1);
        self.state.forwarded = self.state.forwarded.saturating_add(1);
        if used_len == 0 {
            return Err(ShadowError::NoAck(used_len));
        }
        Ok(m.read_obj(GuestAddress(ACK))?)
    }

    fn write_desc(
        &self,
        index: u64,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<(), ShadowError> {
        let at = DESC + 16 * index;
        let m = &self.memory;
        m.write_obj(addr, GuestAddress(at))?;
        m.write_obj(len, GuestAddress(at + 8))?;
        m.write_obj(flags, GuestAddress(at + 12))?;
        m.write_obj(next, GuestAddress(at + 14))?;
        Ok(())
    }

    /// Until the used index moves: woken by the device's interrupt (its
    /// call eventfd), re-read every 20 ms in case it sends none.
    fn wait_used(&mut self) -> Result<(), ShadowError> {
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        loop {
            let used: u16 = self.memory.read_obj(GuestAddress(USED + 2))?;
            if used != self.state.last_used {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                self.state.stuck = true;
                return Err(ShadowError::NoAnswer(ANSWER_TIMEOUT));
            }
            let mut poll = libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let wait = (deadline - now).min(Duration::from_millis(20));
            // SAFETY: poll reads and writes exactly one pollfd, which
            // `poll` is and outlives the call.
            unsafe { libc::poll(&mut poll, 1, wait.as_millis() as libc::c_int) };
            let _ = self.call.read();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plays the device on the ring in `m` at `iova`: takes the avail
    /// entry, writes `ack`, completes it.
    fn device_answers(m: &GuestMemoryMmap, iova: u64, ack: u8) {
        let avail: u16 = m.read_obj(GuestAddress(AVAIL + 2)).unwrap();
        let head: u16 = m
            .read_obj(GuestAddress(
                AVAIL + 4 + 2 * u64::from((avail - 1) % SHADOW_QUEUE_SIZE),
            ))
            .unwrap();
        assert_eq!(head, 0);
        let ack_iova: u64 = m.read_obj(GuestAddress(DESC + 16)).unwrap();
        m.write_obj(ack, GuestAddress(ack_iova - iova)).unwrap();
        let used: u16 = m.read_obj(GuestAddress(USED + 2)).unwrap();
        let slot = u64::from(used % SHADOW_QUEUE_SIZE);
        m.write_obj(u32::from(head), GuestAddress(USED + 4 + 8 * slot))
            .unwrap();
        m.write_obj(1u32, GuestAddress(USED + 8 + 8 * slot))
            .unwrap();
        m.write_obj(used.wrapping_add(1), GuestAddress(USED + 2))
            .unwrap();
    }

    #[test]
    fn address_space_1_holds_the_ring_and_buffers_only_read_only_where_the_device_reads() {
        let (_cvq, wiring) = ShadowCvq::new(1).unwrap();
        assert_eq!(wiring.ring.desc, PAGE);
        assert_eq!(wiring.mappings.len(), 2);
        assert_eq!(wiring.mappings[0].perm, Perm::ReadOnly);
        assert_eq!(wiring.mappings[0].iova, PAGE);
        assert_eq!(wiring.mappings[1].iova, 2 * PAGE);
        assert_eq!(wiring.mappings.iter().map(|r| r.size).sum::<u64>(), SIZE);
        assert!(ShadowCvq::new(u64::MAX - PAGE).is_err());
    }

    #[test]
    fn a_command_goes_out_as_two_descriptors_and_the_devices_ack_comes_back() {
        let (mut cvq, wiring) = ShadowCvq::new(0).unwrap();
        let command = [1u8, 1, 2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee];
        // The "device" answers from another thread once kicked.
        let memory = cvq.memory.clone();
        let iova = cvq.iova;
        let kick = wiring.kick;
        let device = std::thread::spawn(move || {
            for _ in 0..200 {
                if kick.read().is_ok() {
                    let mut got = vec![0u8; 8];
                    memory.read_slice(&mut got, GuestAddress(COMMAND)).unwrap();
                    device_answers(&memory, iova, 0);
                    return got;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            panic!("never kicked");
        });
        assert_eq!(cvq.forward(&command).unwrap(), 0);
        assert_eq!(device.join().unwrap(), command);
        let len: u32 = cvq.memory.read_obj(GuestAddress(DESC + 8)).unwrap();
        let flags: u16 = cvq.memory.read_obj(GuestAddress(DESC + 12)).unwrap();
        assert_eq!((len, flags), (8, VIRTQ_DESC_F_NEXT));
        assert_eq!(cvq.state().forwarded, 1);
        assert_eq!(cvq.state().last_used, 1);
    }

    #[test]
    fn a_device_that_never_answers_is_not_asked_again() {
        let (mut cvq, _wiring) = ShadowCvq::new(0).unwrap();
        assert!(matches!(
            cvq.forward(&[1, 1]),
            Err(ShadowError::NoAnswer(_))
        ));
        assert!(matches!(cvq.forward(&[1, 1]), Err(ShadowError::Stuck)));
        cvq.restart();
        assert!(!cvq.state().stuck);
        assert!(matches!(
            cvq.forward(&vec![0u8; MAX_FORWARDED + 1]),
            Err(ShadowError::TooLong(_))
        ));
    }
}
