//! The real backend: one `struct vhost_msg_v2` per message, written to an
//! open /dev/vhost-vdpa-N (drivers/vhost/vhost.c, `vhost_chr_write_iter`).
//!
//! The layout is defined here from include/uapi/linux/vhost_types.h rather
//! than taken from the `vhost` crate, whose bindings predate the `asid` field
//! (it is still called `reserved` there). Messages are encoded field by field
//! into a zeroed byte buffer, so no padding byte is ever uninitialised and no
//! `unsafe` is needed.

use std::fs::File;
use std::io::{self, Write};
use std::mem::{offset_of, size_of};

use super::backend::{BackendError, IotlbBackend};
use super::DmaRange;

/// `VHOST_IOTLB_MSG_V2`: the `type` of a `struct vhost_msg_v2`.
pub const VHOST_IOTLB_MSG_V2: u32 = 0x2;
/// `VHOST_IOTLB_UPDATE`.
pub const VHOST_IOTLB_UPDATE: u8 = 2;
/// `VHOST_IOTLB_INVALIDATE`.
pub const VHOST_IOTLB_INVALIDATE: u8 = 3;
/// `VHOST_IOTLB_BATCH_BEGIN`.
pub const VHOST_IOTLB_BATCH_BEGIN: u8 = 5;
/// `VHOST_IOTLB_BATCH_END`.
pub const VHOST_IOTLB_BATCH_END: u8 = 6;

/// `struct vhost_iotlb_msg`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VhostIotlbMsg {
    pub iova: u64,
    pub size: u64,
    pub uaddr: u64,
    pub perm: u8,
    pub type_: u8,
}

/// `struct vhost_msg_v2`. The kernel's union of `iotlb` and `__u8
/// padding[64]` is modelled as `iotlb` followed by the rest of the 64 bytes,
/// which is the only member userspace writes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VhostMsgV2 {
    pub type_: u32,
    pub asid: u32,
    pub iotlb: VhostIotlbMsg,
    _padding: [u8; UNION_SIZE - size_of::<VhostIotlbMsg>()],
}

/// Size of the union in `struct vhost_msg_v2` (`__u8 padding[64]`).
const UNION_SIZE: usize = 64;
/// `sizeof(struct vhost_msg_v2)` on every Linux ABI: two `__u32`, then the
/// 8-aligned 64-byte union.
pub const VHOST_MSG_V2_SIZE: usize = 72;

// The layout must be the kernel's, byte for byte.
const _: () = assert!(size_of::<VhostIotlbMsg>() == 32);
const _: () = assert!(size_of::<VhostMsgV2>() == VHOST_MSG_V2_SIZE);
const _: () = assert!(offset_of!(VhostMsgV2, asid) == 4);
const _: () = assert!(offset_of!(VhostMsgV2, iotlb) == 8);
const _: () = assert!(offset_of!(VhostIotlbMsg, size) == 8);
const _: () = assert!(offset_of!(VhostIotlbMsg, uaddr) == 16);
const _: () = assert!(offset_of!(VhostIotlbMsg, perm) == 24);
const _: () = assert!(offset_of!(VhostIotlbMsg, type_) == 25);

const IOTLB: usize = offset_of!(VhostMsgV2, iotlb);

impl VhostMsgV2 {
    pub fn new(asid: u32, iotlb: VhostIotlbMsg) -> Self {
        VhostMsgV2 {
            type_: VHOST_IOTLB_MSG_V2,
            asid,
            iotlb,
            _padding: [0; UNION_SIZE - size_of::<VhostIotlbMsg>()],
        }
    }

    /// The bytes write(2) hands to the kernel (native endianness, padding
    /// zeroed).
    pub fn to_bytes(&self) -> [u8; VHOST_MSG_V2_SIZE] {
        let mut b = [0u8; VHOST_MSG_V2_SIZE];
        put(
            &mut b,
            offset_of!(VhostMsgV2, type_),
            &self.type_.to_ne_bytes(),
        );
        put(
            &mut b,
            offset_of!(VhostMsgV2, asid),
            &self.asid.to_ne_bytes(),
        );
        let m = &self.iotlb;
        put(
            &mut b,
            IOTLB + offset_of!(VhostIotlbMsg, iova),
            &m.iova.to_ne_bytes(),
        );
        put(
            &mut b,
            IOTLB + offset_of!(VhostIotlbMsg, size),
            &m.size.to_ne_bytes(),
        );
        put(
            &mut b,
            IOTLB + offset_of!(VhostIotlbMsg, uaddr),
            &m.uaddr.to_ne_bytes(),
        );
        b[IOTLB + offset_of!(VhostIotlbMsg, perm)] = m.perm;
        b[IOTLB + offset_of!(VhostIotlbMsg, type_)] = m.type_;
        b
    }

    /// Inverse of [`VhostMsgV2::to_bytes`] (padding ignored); for tests and
    /// for tools that read messages back.
    pub fn from_bytes(b: &[u8; VHOST_MSG_V2_SIZE]) -> Self {
        let iotlb = VhostIotlbMsg {
            iova: u64::from_ne_bytes(get(b, IOTLB + offset_of!(VhostIotlbMsg, iova))),
            size: u64::from_ne_bytes(get(b, IOTLB + offset_of!(VhostIotlbMsg, size))),
            uaddr: u64::from_ne_bytes(get(b, IOTLB + offset_of!(VhostIotlbMsg, uaddr))),
            perm: b[IOTLB + offset_of!(VhostIotlbMsg, perm)],
            type_: b[IOTLB + offset_of!(VhostIotlbMsg, type_)],
        };
        VhostMsgV2 {
            type_: u32::from_ne_bytes(get(b, offset_of!(VhostMsgV2, type_))),
            asid: u32::from_ne_bytes(get(b, offset_of!(VhostMsgV2, asid))),
            ..VhostMsgV2::new(0, iotlb)
        }
    }
}

fn put(buf: &mut [u8], offset: usize, bytes: &[u8]) {
    buf[offset..offset + bytes.len()].copy_from_slice(bytes);
}

fn get<const N: usize>(buf: &[u8], offset: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&buf[offset..offset + N]);
    out
}

/// Sends IOTLB messages to a vhost-vdpa device through write(2) on its file
/// (or, in tests, on any writable file).
#[derive(Debug)]
pub struct VhostVdpaIotlb {
    file: File,
}

impl VhostVdpaIotlb {
    pub fn new(file: File) -> Self {
        VhostVdpaIotlb { file }
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn into_file(self) -> File {
        self.file
    }

    /// Writes one message; the kernel processes a message per write and
    /// returns its full size on success, so anything else is a failure.
    fn write_msg(&mut self, asid: u32, iotlb: VhostIotlbMsg) -> Result<(), BackendError> {
        let bytes = VhostMsgV2::new(asid, iotlb).to_bytes();
        loop {
            match self.file.write(&bytes) {
                Ok(n) if n == bytes.len() => return Ok(()),
                Ok(n) => {
                    return Err(BackendError::ShortWrite {
                        written: n,
                        expected: bytes.len(),
                    })
                }
                // Nothing was consumed; the same message may be sent again.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(BackendError::Io(e)),
            }
        }
    }
}

impl IotlbBackend for VhostVdpaIotlb {
    fn batch_begin(&mut self, asid: u32) -> Result<(), BackendError> {
        self.write_msg(
            asid,
            VhostIotlbMsg {
                type_: VHOST_IOTLB_BATCH_BEGIN,
                ..Default::default()
            },
        )
    }

    fn update(&mut self, asid: u32, range: &DmaRange) -> Result<(), BackendError> {
        self.write_msg(
            asid,
            VhostIotlbMsg {
                iova: range.iova,
                size: range.size,
                uaddr: range.host_addr,
                perm: range.perm.to_vhost(),
                type_: VHOST_IOTLB_UPDATE,
            },
        )
    }

    fn invalidate(&mut self, asid: u32, iova: u64, size: u64) -> Result<(), BackendError> {
        self.write_msg(
            asid,
            VhostIotlbMsg {
                iova,
                size,
                type_: VHOST_IOTLB_INVALIDATE,
                ..Default::default()
            },
        )
    }

    fn batch_end(&mut self, asid: u32) -> Result<(), BackendError> {
        self.write_msg(
            asid,
            VhostIotlbMsg {
                type_: VHOST_IOTLB_BATCH_END,
                ..Default::default()
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::fd::{FromRawFd, OwnedFd};

    use super::*;
    use crate::dma::Perm;

    /// A pipe as (read end, write end).
    fn pipe() -> (File, File) {
        let mut fds = [0i32; 2];
        // SAFETY: `fds` is a valid, writable array of two c_ints, which is
        // what pipe2(2) fills in; the return value is checked.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(rc, 0, "pipe2: {}", io::Error::last_os_error());
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by
        // nobody else; each is wrapped exactly once.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        (File::from(r), File::from(w))
    }

    fn read_msg(r: &mut File) -> [u8; VHOST_MSG_V2_SIZE] {
        let mut b = [0u8; VHOST_MSG_V2_SIZE];
        r.read_exact(&mut b).unwrap();
        b
    }

    #[test]
    fn vhost_msg_v2_has_the_kernel_size() {
        // sizeof(struct vhost_msg_v2) on x86_64 and aarch64 Linux.
        assert_eq!(size_of::<VhostMsgV2>(), 72);
        assert_eq!(size_of::<VhostIotlbMsg>(), 32);
        // The `vhost` crate's generated binding agrees.
        assert_eq!(
            size_of::<vhost::vhost_kern::vhost_binding::vhost_msg_v2>(),
            VHOST_MSG_V2_SIZE
        );
    }

    #[test]
    fn messages_written_to_a_pipe_decode_to_the_kernel_layout() {
        let (mut r, w) = pipe();
        let mut backend = VhostVdpaIotlb::new(w);
        let range = DmaRange::new(0x1_0000_0000, 0x20_0000, 0x7f00_dead_0000, Perm::ReadOnly);
        backend.batch_begin(3).unwrap();
        backend.update(3, &range).unwrap();
        backend.invalidate(3, 0x4000, 0x2000).unwrap();
        backend.batch_end(3).unwrap();

        let begin = read_msg(&mut r);
        let update = read_msg(&mut r);
        let invalidate = read_msg(&mut r);
        let end = read_msg(&mut r);

        // Raw bytes of the UPDATE, field by field at the kernel's offsets.
        assert_eq!(&update[0..4], &2u32.to_ne_bytes()); // VHOST_IOTLB_MSG_V2
        assert_eq!(&update[4..8], &3u32.to_ne_bytes()); // asid
        assert_eq!(&update[8..16], &0x1_0000_0000u64.to_ne_bytes()); // iova
        assert_eq!(&update[16..24], &0x20_0000u64.to_ne_bytes()); // size
        assert_eq!(&update[24..32], &0x7f00_dead_0000u64.to_ne_bytes()); // uaddr
        assert_eq!(update[32], 1); // VHOST_ACCESS_RO
        assert_eq!(update[33], 2); // VHOST_IOTLB_UPDATE
        assert!(update[34..].iter().all(|&b| b == 0), "padding is zeroed");

        let update = VhostMsgV2::from_bytes(&update);
        assert_eq!(Perm::from_vhost(update.iotlb.perm), Some(Perm::ReadOnly));

        let begin = VhostMsgV2::from_bytes(&begin);
        assert_eq!(begin.type_, VHOST_IOTLB_MSG_V2);
        assert_eq!(begin.asid, 3);
        assert_eq!(begin.iotlb.type_, VHOST_IOTLB_BATCH_BEGIN);

        let invalidate = VhostMsgV2::from_bytes(&invalidate);
        assert_eq!(
            invalidate.iotlb,
            VhostIotlbMsg {
                iova: 0x4000,
                size: 0x2000,
                uaddr: 0,
                perm: 0,
                type_: VHOST_IOTLB_INVALIDATE,
            }
        );
        assert_eq!(
            VhostMsgV2::from_bytes(&end).iotlb.type_,
            VHOST_IOTLB_BATCH_END
        );
    }

    #[test]
    fn write_error_carries_the_errno() {
        let (r, w) = pipe();
        drop(r);
        // Writing to a pipe without reader: EPIPE (SIGPIPE is ignored by the
        // Rust runtime).
        let mut backend = VhostVdpaIotlb::new(w);
        let err = backend.batch_begin(0).unwrap_err();
        assert_eq!(err.errno(), Some(libc::EPIPE));
    }

    #[test]
    fn read_only_file_is_an_error_not_a_panic() {
        let (r, _w) = pipe();
        let mut backend = VhostVdpaIotlb::new(r);
        let err = backend.batch_end(0).unwrap_err();
        assert_eq!(err.errno(), Some(libc::EBADF));
    }
}
