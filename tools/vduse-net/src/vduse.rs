//! The VDUSE user API of Linux 6.12 (include/uapi/linux/vduse.h): ioctl numbers,
//! the fixed-size structures, the request/response messages read from and written to
//! /dev/vduse/$NAME, and thin wrappers around the control and device nodes.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use thiserror::Error;

/// Path of the VDUSE control node.
pub const CONTROL_PATH: &str = "/dev/vduse/control";
/// VDUSE_API_VERSION.
pub const API_VERSION: u64 = 0;
/// VDUSE_NAME_MAX.
pub const NAME_MAX: usize = 256;

const VDUSE_BASE: u32 = 0x81;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// `_IOC(dir, VDUSE_BASE, nr, size)` as in include/uapi/asm-generic/ioctl.h.
const fn ioc(dir: u32, nr: u32, size: usize) -> u64 {
    ((dir as u64) << 30) | ((size as u64) << 16) | ((VDUSE_BASE as u64) << 8) | nr as u64
}

/// Size of `struct vduse_dev_config` without its flexible `config[]` array.
pub const DEV_CONFIG_HEADER_SIZE: usize = 336;

pub const VDUSE_SET_API_VERSION: u64 = ioc(IOC_WRITE, 0x01, 8);
pub const VDUSE_CREATE_DEV: u64 = ioc(IOC_WRITE, 0x02, DEV_CONFIG_HEADER_SIZE);
pub const VDUSE_DESTROY_DEV: u64 = ioc(IOC_WRITE, 0x03, NAME_MAX);
pub const VDUSE_IOTLB_GET_FD: u64 = ioc(IOC_READ | IOC_WRITE, 0x10, size_of::<IotlbEntry>());
pub const VDUSE_VQ_SETUP: u64 = ioc(IOC_WRITE, 0x14, size_of::<VqConfig>());
pub const VDUSE_VQ_GET_INFO: u64 = ioc(IOC_READ | IOC_WRITE, 0x15, size_of::<VqInfo>());
pub const VDUSE_VQ_SETUP_KICKFD: u64 = ioc(IOC_WRITE, 0x16, size_of::<VqEventfd>());
pub const VDUSE_VQ_INJECT_IRQ: u64 = ioc(IOC_WRITE, 0x17, 4);

/// `struct vduse_iotlb_entry`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IotlbEntry {
    pub offset: u64,
    pub start: u64,
    pub last: u64,
    pub perm: u8,
    pub _pad: [u8; 7],
}

/// `struct vduse_vq_config`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct VqConfig {
    pub index: u32,
    pub max_size: u16,
    pub reserved: [u16; 13],
}

/// `struct vduse_vq_info` (split-ring view of the state union).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct VqInfo {
    pub index: u32,
    pub num: u32,
    pub desc_addr: u64,
    pub driver_addr: u64,
    pub device_addr: u64,
    /// The state union; for a split ring `state[0]` is `split.avail_index`.
    pub state: [u16; 4],
    pub ready: u8,
    pub _pad: [u8; 7],
}

/// `struct vduse_vq_eventfd`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct VqEventfd {
    pub index: u32,
    pub fd: i32,
}

const _: () = assert!(size_of::<IotlbEntry>() == 32);
const _: () = assert!(size_of::<VqConfig>() == 32);
const _: () = assert!(size_of::<VqInfo>() == 48);
const _: () = assert!(size_of::<VqEventfd>() == 8);

/// Size of `struct vduse_dev_request` and of `struct vduse_dev_response`.
pub const MSG_SIZE: usize = 152;
/// Offset of the union inside both messages.
const MSG_UNION: usize = 24;

const VDUSE_GET_VQ_STATE: u32 = 0;
const VDUSE_SET_STATUS: u32 = 1;
const VDUSE_UPDATE_IOTLB: u32 = 2;

pub const VDUSE_REQ_RESULT_OK: u32 = 0;
pub const VDUSE_REQ_RESULT_FAILED: u32 = 1;

/// Errors of the VDUSE layer.
#[derive(Debug, Error)]
pub enum VduseError {
    #[error("{CONTROL_PATH} does not exist: the vduse kernel module is not loaded")]
    ModuleNotLoaded,
    #[error("cannot open {path}: {source}")]
    Open { path: String, source: io::Error },
    #[error("{what} failed: {source}")]
    Ioctl {
        what: &'static str,
        source: io::Error,
    },
    #[error("device name {0:?} is empty, too long or contains a NUL byte")]
    BadName(String),
    #[error("reading a request from the device failed: {0}")]
    Read(io::Error),
    #[error("writing a response to the device failed: {0}")]
    Write(io::Error),
    #[error("short request from the device ({0} bytes)")]
    ShortRequest(usize),
}

/// A request the kernel sends to the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    GetVqState { index: u32 },
    SetStatus { status: u8 },
    UpdateIotlb { start: u64, last: u64 },
    Unknown(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub id: u32,
    pub kind: RequestKind,
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_ne_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

impl Request {
    /// Decodes a `struct vduse_dev_request`.
    pub fn decode(b: &[u8; MSG_SIZE]) -> Request {
        let ty = u32_at(b, 0);
        let id = u32_at(b, 4);
        let kind = match ty {
            VDUSE_GET_VQ_STATE => RequestKind::GetVqState {
                index: u32_at(b, MSG_UNION),
            },
            VDUSE_SET_STATUS => RequestKind::SetStatus {
                status: b[MSG_UNION],
            },
            VDUSE_UPDATE_IOTLB => RequestKind::UpdateIotlb {
                start: u64_at(b, MSG_UNION),
                last: u64_at(b, MSG_UNION + 8),
            },
            other => RequestKind::Unknown(other),
        };
        Request { id, kind }
    }
}

/// Encodes a `struct vduse_dev_response`. `vq_state` is `(index, split.avail_index)`.
pub fn encode_response(id: u32, ok: bool, vq_state: Option<(u32, u16)>) -> [u8; MSG_SIZE] {
    let mut b = [0u8; MSG_SIZE];
    b[0..4].copy_from_slice(&id.to_ne_bytes());
    let result = if ok {
        VDUSE_REQ_RESULT_OK
    } else {
        VDUSE_REQ_RESULT_FAILED
    };
    b[4..8].copy_from_slice(&result.to_ne_bytes());
    if let Some((index, avail)) = vq_state {
        b[MSG_UNION..MSG_UNION + 4].copy_from_slice(&index.to_ne_bytes());
        b[MSG_UNION + 4..MSG_UNION + 6].copy_from_slice(&avail.to_ne_bytes());
    }
    b
}

/// Encodes `struct vduse_dev_config` followed by the config space.
pub fn encode_dev_config(
    name: &str,
    device_id: u32,
    features: u64,
    vq_num: u32,
    vq_align: u32,
    config: &[u8],
) -> Result<Vec<u8>, VduseError> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= NAME_MAX || bytes.contains(&0) {
        return Err(VduseError::BadName(name.to_string()));
    }
    let mut b = vec![0u8; DEV_CONFIG_HEADER_SIZE + config.len()];
    b[..bytes.len()].copy_from_slice(bytes);
    // vendor_id at 256 stays 0.
    b[260..264].copy_from_slice(&device_id.to_ne_bytes());
    b[264..272].copy_from_slice(&features.to_ne_bytes());
    b[272..276].copy_from_slice(&vq_num.to_ne_bytes());
    b[276..280].copy_from_slice(&vq_align.to_ne_bytes());
    // reserved[13] at 280..332 stays 0.
    b[332..336].copy_from_slice(&(config.len() as u32).to_ne_bytes());
    b[DEV_CONFIG_HEADER_SIZE..].copy_from_slice(config);
    Ok(b)
}

fn name_buf(name: &str) -> Result<[u8; NAME_MAX], VduseError> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= NAME_MAX || bytes.contains(&0) {
        return Err(VduseError::BadName(name.to_string()));
    }
    let mut b = [0u8; NAME_MAX];
    b[..bytes.len()].copy_from_slice(bytes);
    Ok(b)
}

fn check(ret: libc::c_int, what: &'static str) -> Result<libc::c_int, VduseError> {
    if ret < 0 {
        Err(VduseError::Ioctl {
            what,
            source: io::Error::last_os_error(),
        })
    } else {
        Ok(ret)
    }
}

/// /dev/vduse/control.
pub struct Control {
    file: File,
}

impl Control {
    pub fn open() -> Result<Control, VduseError> {
        if !Path::new(CONTROL_PATH).exists() {
            return Err(VduseError::ModuleNotLoaded);
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(CONTROL_PATH)
            .map_err(|source| VduseError::Open {
                path: CONTROL_PATH.into(),
                source,
            })?;
        Ok(Control { file })
    }

    pub fn set_api_version(&self, version: u64) -> Result<(), VduseError> {
        // SAFETY: VDUSE_SET_API_VERSION reads one u64 from the pointer, which points to a
        // live local u64 for the duration of the call.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                VDUSE_SET_API_VERSION as _,
                &version as *const u64,
            )
        };
        check(ret, "VDUSE_SET_API_VERSION").map(|_| ())
    }

    /// VDUSE_CREATE_DEV with a buffer from [`encode_dev_config`].
    pub fn create_dev(&self, config: &[u8]) -> Result<(), VduseError> {
        assert!(config.len() >= DEV_CONFIG_HEADER_SIZE);
        let config_size = u32_at(config, 332) as usize;
        assert_eq!(config.len(), DEV_CONFIG_HEADER_SIZE + config_size);
        // SAFETY: the kernel copies DEV_CONFIG_HEADER_SIZE bytes and then `config_size`
        // bytes after them; the buffer holds exactly that many bytes (asserted above) and
        // outlives the call. The kernel does not write to it.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                VDUSE_CREATE_DEV as _,
                config.as_ptr(),
            )
        };
        check(ret, "VDUSE_CREATE_DEV").map(|_| ())
    }

    pub fn destroy_dev(&self, name: &str) -> Result<(), VduseError> {
        let buf = name_buf(name)?;
        // SAFETY: the kernel reads NAME_MAX bytes from the pointer; `buf` is exactly that
        // long and lives for the duration of the call.
        let ret =
            unsafe { libc::ioctl(self.file.as_raw_fd(), VDUSE_DESTROY_DEV as _, buf.as_ptr()) };
        check(ret, "VDUSE_DESTROY_DEV").map(|_| ())
    }
}

/// /dev/vduse/$NAME, opened non-blocking.
pub struct Device {
    file: File,
}

impl Device {
    /// Opens /dev/vduse/NAME, waiting up to `timeout` for devtmpfs to create it.
    pub fn open(name: &str, timeout: Duration) -> Result<Device, VduseError> {
        let path = format!("/dev/vduse/{name}");
        let deadline = Instant::now() + timeout;
        loop {
            match OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
                .open(&path)
            {
                Ok(file) => return Ok(Device { file }),
                Err(e) if e.kind() == io::ErrorKind::NotFound && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(source) => return Err(VduseError::Open { path, source }),
            }
        }
    }

    pub fn vq_setup(&self, index: u32, max_size: u16) -> Result<(), VduseError> {
        let cfg = VqConfig {
            index,
            max_size,
            ..Default::default()
        };
        // SAFETY: the kernel reads a `struct vduse_vq_config`, which `VqConfig` matches
        // (size asserted at compile time); the reference is valid during the call.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                VDUSE_VQ_SETUP as _,
                &cfg as *const VqConfig,
            )
        };
        check(ret, "VDUSE_VQ_SETUP").map(|_| ())
    }

    pub fn vq_get_info(&self, index: u32) -> Result<VqInfo, VduseError> {
        let mut info = VqInfo {
            index,
            ..Default::default()
        };
        // SAFETY: the kernel reads and writes a `struct vduse_vq_info`, which `VqInfo`
        // matches in size and layout; `info` is a live, exclusively borrowed local.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                VDUSE_VQ_GET_INFO as _,
                &mut info as *mut VqInfo,
            )
        };
        check(ret, "VDUSE_VQ_GET_INFO")?;
        Ok(info)
    }

    /// Assigns (`Some(fd)`) or deassigns (`None`) the kick eventfd of a queue.
    pub fn vq_setup_kickfd(&self, index: u32, fd: Option<RawFd>) -> Result<(), VduseError> {
        let ev = VqEventfd {
            index,
            fd: fd.unwrap_or(-1),
        };
        // SAFETY: the kernel reads a `struct vduse_vq_eventfd` (matched by `VqEventfd`)
        // from a live local; it takes its own reference on the eventfd.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                VDUSE_VQ_SETUP_KICKFD as _,
                &ev as *const VqEventfd,
            )
        };
        check(ret, "VDUSE_VQ_SETUP_KICKFD").map(|_| ())
    }

    pub fn vq_inject_irq(&self, index: u32) -> Result<(), VduseError> {
        // SAFETY: the kernel reads one u32 from a live local.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                VDUSE_VQ_INJECT_IRQ as _,
                &index as *const u32,
            )
        };
        check(ret, "VDUSE_VQ_INJECT_IRQ").map(|_| ())
    }

    /// VDUSE_IOTLB_GET_FD: the first mapping that overlaps `[start, last]`, with a new fd
    /// for its backing file. `None` when there is none.
    pub fn iotlb_get_fd(
        &self,
        start: u64,
        last: u64,
    ) -> Result<Option<(IotlbEntry, File)>, VduseError> {
        let mut entry = IotlbEntry {
            start,
            last,
            ..Default::default()
        };
        // SAFETY: the kernel reads and writes a `struct vduse_iotlb_entry`, matched by
        // `IotlbEntry`; `entry` is a live, exclusively borrowed local.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                VDUSE_IOTLB_GET_FD as _,
                &mut entry as *mut IotlbEntry,
            )
        };
        if ret < 0 {
            let e = io::Error::last_os_error();
            // EINVAL: no mapping in the range (or no domain yet).
            if e.raw_os_error() == Some(libc::EINVAL) {
                return Ok(None);
            }
            return Err(VduseError::Ioctl {
                what: "VDUSE_IOTLB_GET_FD",
                source: e,
            });
        }
        // SAFETY: on success the ioctl returns a new file descriptor that this process owns
        // and nothing else refers to; File takes over closing it.
        let file = unsafe { File::from_raw_fd(ret) };
        Ok(Some((entry, file)))
    }

    /// Reads one request; `None` when none is pending.
    pub fn read_request(&mut self) -> Result<Option<Request>, VduseError> {
        let mut b = [0u8; MSG_SIZE];
        match self.file.read(&mut b) {
            Ok(n) if n == MSG_SIZE => Ok(Some(Request::decode(&b))),
            Ok(n) => Err(VduseError::ShortRequest(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(VduseError::Read(e)),
        }
    }

    pub fn write_response(&mut self, resp: &[u8; MSG_SIZE]) -> Result<(), VduseError> {
        self.file.write_all(resp).map_err(VduseError::Write)
    }
}

impl AsRawFd for Device {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers() {
        // Values worked out by hand from _IOW/_IOWR(0x81, nr, size).
        assert_eq!(VDUSE_SET_API_VERSION, 0x4008_8101);
        assert_eq!(VDUSE_CREATE_DEV, 0x4150_8102);
        assert_eq!(VDUSE_DESTROY_DEV, 0x4100_8103);
        assert_eq!(VDUSE_IOTLB_GET_FD, 0xc020_8110);
        assert_eq!(VDUSE_VQ_SETUP, 0x4020_8114);
        assert_eq!(VDUSE_VQ_GET_INFO, 0xc030_8115);
        assert_eq!(VDUSE_VQ_SETUP_KICKFD, 0x4008_8116);
        assert_eq!(VDUSE_VQ_INJECT_IRQ, 0x4004_8117);
    }

    #[test]
    fn decode_requests() {
        let mut b = [0u8; MSG_SIZE];
        b[0..4].copy_from_slice(&2u32.to_ne_bytes());
        b[4..8].copy_from_slice(&7u32.to_ne_bytes());
        b[24..32].copy_from_slice(&0x1000u64.to_ne_bytes());
        b[32..40].copy_from_slice(&u64::MAX.to_ne_bytes());
        assert_eq!(
            Request::decode(&b),
            Request {
                id: 7,
                kind: RequestKind::UpdateIotlb {
                    start: 0x1000,
                    last: u64::MAX
                }
            }
        );
        b[0..4].copy_from_slice(&1u32.to_ne_bytes());
        b[24] = 0xf;
        assert_eq!(
            Request::decode(&b).kind,
            RequestKind::SetStatus { status: 0xf }
        );
        b[0..4].copy_from_slice(&0u32.to_ne_bytes());
        b[24..28].copy_from_slice(&1u32.to_ne_bytes());
        assert_eq!(
            Request::decode(&b).kind,
            RequestKind::GetVqState { index: 1 }
        );
        b[0..4].copy_from_slice(&9u32.to_ne_bytes());
        assert_eq!(Request::decode(&b).kind, RequestKind::Unknown(9));
    }

    #[test]
    fn encode_responses() {
        let r = encode_response(5, true, Some((1, 0x1234)));
        assert_eq!(u32_at(&r, 0), 5);
        assert_eq!(u32_at(&r, 4), VDUSE_REQ_RESULT_OK);
        assert!(r[8..24].iter().all(|&x| x == 0), "reserved must be zero");
        assert_eq!(u32_at(&r, 24), 1);
        assert_eq!(u16::from_ne_bytes([r[28], r[29]]), 0x1234);
        let r = encode_response(6, false, None);
        assert_eq!(u32_at(&r, 4), VDUSE_REQ_RESULT_FAILED);
    }

    #[test]
    fn dev_config_layout() {
        let b = encode_dev_config("net0", 1, 0x3_0001_0020, 2, 4096, &[1, 2, 3]).unwrap();
        assert_eq!(b.len(), DEV_CONFIG_HEADER_SIZE + 3);
        assert_eq!(&b[..5], b"net0\0");
        assert_eq!(u32_at(&b, 260), 1);
        assert_eq!(u64_at(&b, 264), 0x3_0001_0020);
        assert_eq!(u32_at(&b, 272), 2);
        assert_eq!(u32_at(&b, 276), 4096);
        assert_eq!(u32_at(&b, 332), 3);
        assert_eq!(&b[336..], &[1, 2, 3]);
        assert!(encode_dev_config("", 1, 0, 2, 4096, &[]).is_err());
        assert!(encode_dev_config(&"x".repeat(256), 1, 0, 2, 4096, &[]).is_err());
    }
}
