//! Where the engine's IOTLB messages go: the trait, a message type for logs
//! and errors, and a recording backend for tests (public so tests in other
//! crates can check what a device would have received).

#[cfg(any(test, feature = "test-utils"))]
use std::collections::BTreeMap;
use std::fmt;
use std::io;

#[cfg_attr(not(any(test, feature = "test-utils")), allow(unused_imports))]
use super::{inclusive_last, DmaRange};

/// Why a backend refused a message.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// write(2) failed; the device's errno is in the `io::Error`
    /// (the kernel reports any refused IOTLB message as `EFAULT`).
    #[error("the write to the vhost-vdpa device failed with {}", explain_io(.0))]
    Io(#[source] io::Error),
    /// The device took only part of the message, so it did not process it.
    #[error("short write of the IOTLB message: {written} of {expected} bytes")]
    ShortWrite { written: usize, expected: usize },
}

impl BackendError {
    /// The errno behind the failure, when there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            BackendError::Io(e) => e.raw_os_error(),
            BackendError::ShortWrite { .. } => None,
        }
    }
}

/// What an errno from a write(2) of an IOTLB message to /dev/vhost-vdpa-N
/// means, from drivers/vhost/vhost.c (`vhost_chr_write_iter`) and
/// drivers/vhost/vdpa.c: its name and the kernel's reasons. In 6.12 every
/// refusal of a well-formed message comes back as EFAULT, whatever the
/// handler's own errno was (ENOMEM, EEXIST, EINVAL); other kernels and
/// parents may pass the handler's errno through, so those are explained
/// too.
pub fn errno_meaning(errno: i32) -> Option<(&'static str, &'static str)> {
    let meaning = match errno {
        libc::EFAULT => (
            "EFAULT",
            "vhost-vdpa refused the message; it reports every refusal so: the range overlaps a \
             mapping or lies outside the IOVA range, the memory is not a shared file mapping a \
             VA device can map, a PA device could not pin it (RLIMIT_MEMLOCK), or the parent's \
             map call failed",
        ),
        libc::ENOMEM => (
            "ENOMEM",
            "pinning accounting: a PA device pins every page it is given and charges it to \
             RLIMIT_MEMLOCK, and this one would pass the limit (or the kernel ran out of memory)",
        ),
        libc::EINVAL => (
            "EINVAL",
            "the kernel rejected the message itself: an unknown type, a size of 0, an address \
             space (ASID) the device does not have, or a batch of another address space open",
        ),
        libc::EOPNOTSUPP => (
            "EOPNOTSUPP",
            "the parent device does not support this operation",
        ),
        // The kernel-internal ENOTSUPP, which can leak to userspace.
        524 => (
            "ENOTSUPP",
            "the parent device does not support this operation",
        ),
        libc::EEXIST => (
            "EEXIST",
            "the range overlaps a mapping the device already holds",
        ),
        libc::EPERM => (
            "EPERM",
            "this process is not the device's owner (VHOST_SET_OWNER was made by another)",
        ),
        libc::EBADF => ("EBADF", "the descriptor is not open for writing"),
        libc::EIO => ("EIO", "the parent device failed"),
        _ => return None,
    };
    Some(meaning)
}

/// An I/O error as "NAME (what it means)" when the errno is known.
fn explain_io(error: &io::Error) -> String {
    match error.raw_os_error().and_then(errno_meaning) {
        Some((name, meaning)) => format!("{name}: {meaning}"),
        None => error.to_string(),
    }
}

/// Receives the engine's IOTLB messages for one device. Each call is one
/// message; an error means the device did not apply it.
pub trait IotlbBackend: Send {
    fn batch_begin(&mut self, asid: u32) -> Result<(), BackendError>;
    fn update(&mut self, asid: u32, range: &DmaRange) -> Result<(), BackendError>;
    fn invalidate(&mut self, asid: u32, iova: u64, size: u64) -> Result<(), BackendError>;
    fn batch_end(&mut self, asid: u32) -> Result<(), BackendError>;
}

/// One IOTLB message, as sent (or attempted). Used in error reports and by
/// the recording backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IotlbMessage {
    BatchBegin { asid: u32 },
    Update { asid: u32, range: DmaRange },
    Invalidate { asid: u32, iova: u64, size: u64 },
    BatchEnd { asid: u32 },
}

impl IotlbMessage {
    /// Hands the message to `backend`.
    pub fn send<B: IotlbBackend + ?Sized>(&self, backend: &mut B) -> Result<(), BackendError> {
        match *self {
            IotlbMessage::BatchBegin { asid } => backend.batch_begin(asid),
            IotlbMessage::Update { asid, ref range } => backend.update(asid, range),
            IotlbMessage::Invalidate { asid, iova, size } => backend.invalidate(asid, iova, size),
            IotlbMessage::BatchEnd { asid } => backend.batch_end(asid),
        }
    }
}

impl fmt::Display for IotlbMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IotlbMessage::BatchBegin { asid } => write!(f, "BATCH_BEGIN asid {asid}"),
            IotlbMessage::Update { asid, range } => write!(
                f,
                "UPDATE asid {asid} iova {:#x} size {:#x} uaddr {:#x} perm {:?}",
                range.iova, range.size, range.host_addr, range.perm
            ),
            IotlbMessage::Invalidate { asid, iova, size } => {
                write!(f, "INVALIDATE asid {asid} iova {iova:#x} size {size:#x}")
            }
            IotlbMessage::BatchEnd { asid } => write!(f, "BATCH_END asid {asid}"),
        }
    }
}

/// A backend that records every message and behaves like the kernel's
/// vhost-vdpa IOTLB: an UPDATE overlapping an existing entry is refused with
/// `EEXIST`, an INVALIDATE removes every intersecting entry whole, a message
/// for another ASID inside an open batch is refused with `EINVAL`. Tests can
/// make the Nth message fail.
#[cfg(any(test, feature = "test-utils"))]
#[derive(Debug, Default)]
pub struct RecordingBackend {
    messages: Vec<IotlbMessage>,
    refused: Vec<IotlbMessage>,
    fail_countdown: Option<usize>,
    iotlb: BTreeMap<u32, BTreeMap<u64, DmaRange>>,
    batch_asid: Option<u32>,
}

#[cfg(any(test, feature = "test-utils"))]
impl RecordingBackend {
    pub fn new() -> Self {
        Self::default()
    }

    /// The messages the device accepted, in order.
    pub fn messages(&self) -> &[IotlbMessage] {
        &self.messages
    }

    /// Returns the accepted messages and forgets them (the simulated IOTLB is
    /// kept).
    pub fn take_messages(&mut self) -> Vec<IotlbMessage> {
        std::mem::take(&mut self.messages)
    }

    /// The messages the device refused, in order.
    pub fn refused(&self) -> &[IotlbMessage] {
        &self.refused
    }

    /// Makes the `n`th message from now (1-based) fail with `EFAULT`, the
    /// errno the kernel reports for a refused IOTLB message.
    pub fn fail_nth(&mut self, n: usize) {
        self.fail_countdown = Some(n);
    }

    /// The entries the simulated device holds for `asid`, sorted by IOVA.
    pub fn device_iotlb(&self, asid: u32) -> Vec<DmaRange> {
        self.iotlb
            .get(&asid)
            .map(|m| m.values().copied().collect())
            .unwrap_or_default()
    }

    /// Whether a batch is open on the simulated device.
    pub fn in_batch(&self) -> bool {
        self.batch_asid.is_some()
    }

    fn process(&mut self, msg: IotlbMessage) -> Result<(), BackendError> {
        let result = self.apply(&msg);
        match result {
            Ok(()) => self.messages.push(msg),
            Err(_) => self.refused.push(msg),
        }
        result
    }

    fn apply(&mut self, msg: &IotlbMessage) -> Result<(), BackendError> {
        if let Some(n) = self.fail_countdown.as_mut() {
            // `fail_nth(0)` means the next message, like `fail_nth(1)`.
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.fail_countdown = None;
                return Err(errno(libc::EFAULT));
            }
        }
        let asid = match *msg {
            IotlbMessage::BatchBegin { asid }
            | IotlbMessage::Update { asid, .. }
            | IotlbMessage::Invalidate { asid, .. }
            | IotlbMessage::BatchEnd { asid } => asid,
        };
        if self.batch_asid.is_some_and(|b| b != asid) {
            return Err(errno(libc::EINVAL));
        }
        match *msg {
            IotlbMessage::BatchBegin { asid } => self.batch_asid = Some(asid),
            IotlbMessage::BatchEnd { .. } => self.batch_asid = None,
            IotlbMessage::Update { asid, range } => {
                let last = range.last_iova().ok_or(errno(libc::EINVAL))?;
                let table = self.iotlb.entry(asid).or_default();
                if intersecting(table, range.iova, last).next().is_some() {
                    return Err(errno(libc::EEXIST));
                }
                table.insert(range.iova, range);
            }
            IotlbMessage::Invalidate { asid, iova, size } => {
                // The kernel computes `iova + size - 1` unchecked; a size of
                // zero would wrap, which the engine never sends.
                let last = inclusive_last(iova, size).ok_or(errno(libc::EINVAL))?;
                if let Some(table) = self.iotlb.get_mut(&asid) {
                    let doomed: Vec<u64> = intersecting(table, iova, last).collect();
                    for key in doomed {
                        table.remove(&key);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Keys of the entries of `table` that intersect `[start, last]`.
#[cfg(any(test, feature = "test-utils"))]
fn intersecting(
    table: &BTreeMap<u64, DmaRange>,
    start: u64,
    last: u64,
) -> impl Iterator<Item = u64> + '_ {
    table
        .range(..=last)
        .rev()
        .take_while(move |(_, r)| r.last_iova().is_some_and(|l| l >= start))
        .map(|(k, _)| *k)
}

#[cfg(any(test, feature = "test-utils"))]
fn errno(code: i32) -> BackendError {
    BackendError::Io(io::Error::from_raw_os_error(code))
}

#[cfg(any(test, feature = "test-utils"))]
impl IotlbBackend for RecordingBackend {
    fn batch_begin(&mut self, asid: u32) -> Result<(), BackendError> {
        self.process(IotlbMessage::BatchBegin { asid })
    }

    fn update(&mut self, asid: u32, range: &DmaRange) -> Result<(), BackendError> {
        self.process(IotlbMessage::Update {
            asid,
            range: *range,
        })
    }

    fn invalidate(&mut self, asid: u32, iova: u64, size: u64) -> Result<(), BackendError> {
        self.process(IotlbMessage::Invalidate { asid, iova, size })
    }

    fn batch_end(&mut self, asid: u32) -> Result<(), BackendError> {
        self.process(IotlbMessage::BatchEnd { asid })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::Perm;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_refused_write_says_which_errno_came_back_and_what_it_means() {
        let error = |errno| BackendError::Io(io::Error::from_raw_os_error(errno)).to_string();
        let efault = error(libc::EFAULT);
        assert!(efault.starts_with("the write to the vhost-vdpa device failed with EFAULT: "));
        assert!(efault.contains("RLIMIT_MEMLOCK"), "{efault}");
        assert!(efault.contains("shared file mapping"), "{efault}");
        assert!(error(libc::ENOMEM).contains("ENOMEM: pinning accounting"));
        assert!(error(libc::EINVAL).contains("EINVAL: the kernel rejected the message"));
        for unsupported in [libc::EOPNOTSUPP, 524] {
            assert!(
                error(unsupported).contains("the parent device does not support"),
                "{unsupported}"
            );
        }
        // An errno with no particular meaning here keeps the OS's text.
        assert!(error(libc::ENOSPC).contains("No space left on device"));
        // One line each.
        for errno in [libc::EFAULT, libc::ENOMEM, libc::EINVAL, libc::EPERM] {
            assert!(!error(errno).contains('\n'));
        }
        let short = BackendError::ShortWrite {
            written: 8,
            expected: 72,
        };
        assert_eq!(short.errno(), None);
    }

    #[test]
    fn recording_backend_refuses_overlapping_update_like_the_kernel() {
        let mut b = RecordingBackend::new();
        let r = DmaRange::new(0, 4 * MIB, 0x1000_0000, Perm::ReadWrite);
        b.update(0, &r).unwrap();
        let overlap = DmaRange::new(2 * MIB, 4 * MIB, 0x2000_0000, Perm::ReadWrite);
        let err = b.update(0, &overlap).unwrap_err();
        assert_eq!(err.errno(), Some(libc::EEXIST));
        assert_eq!(
            b.refused(),
            &[IotlbMessage::Update {
                asid: 0,
                range: overlap
            }]
        );
        assert_eq!(b.device_iotlb(0), vec![r]);
    }

    #[test]
    fn recording_backend_invalidate_removes_intersecting_entries_whole() {
        let mut b = RecordingBackend::new();
        let a = DmaRange::new(0, 2 * MIB, 0x1000_0000, Perm::ReadWrite);
        let c = DmaRange::new(2 * MIB, 2 * MIB, 0x3000_0000, Perm::ReadWrite);
        let d = DmaRange::new(8 * MIB, 2 * MIB, 0x4000_0000, Perm::ReadWrite);
        b.update(0, &a).unwrap();
        b.update(0, &c).unwrap();
        b.update(0, &d).unwrap();
        // One byte of `a` and one byte of `c`: both go, `d` stays.
        b.invalidate(0, 2 * MIB - 1, 2).unwrap();
        assert_eq!(b.device_iotlb(0), vec![d]);
    }

    #[test]
    fn recording_backend_fails_the_nth_message() {
        let mut b = RecordingBackend::new();
        b.fail_nth(2);
        b.batch_begin(1).unwrap();
        let err = b.invalidate(1, 0, MIB).unwrap_err();
        assert_eq!(err.errno(), Some(libc::EFAULT));
        b.batch_end(1).unwrap();
        assert_eq!(
            b.messages(),
            &[
                IotlbMessage::BatchBegin { asid: 1 },
                IotlbMessage::BatchEnd { asid: 1 }
            ]
        );
    }

    #[test]
    fn recording_backend_refuses_other_asid_inside_a_batch() {
        let mut b = RecordingBackend::new();
        b.batch_begin(1).unwrap();
        let err = b.invalidate(2, 0, MIB).unwrap_err();
        assert_eq!(err.errno(), Some(libc::EINVAL));
        assert!(b.in_batch());
    }
}
