//! A TAP back end (/dev/net/tun, IFF_TAP | IFF_NO_PI): raw Ethernet frames, no
//! virtio-net header on the tap side.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use thiserror::Error;

const TUNSETIFF: u64 = 0x4004_54ca; // _IOW('T', 202, int)
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
// include/uapi/linux/if_tun.h
const IFF_MULTI_QUEUE: i16 = 0x0100;
const IFF_ATTACH_QUEUE: i16 = 0x0200;
const IFF_DETACH_QUEUE: i16 = 0x0400;
/// _IOW('T', 217, int)
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;
const IFNAMSIZ: usize = 16;

#[derive(Debug, Error)]
pub enum TapError {
    #[error("tap interface name {0:?} is empty or longer than 15 bytes")]
    BadName(String),
    #[error("cannot open /dev/net/tun: {0} (is the tun module loaded?)")]
    Open(io::Error),
    #[error("{what} on tap {name}: {source}")]
    Ioctl {
        what: &'static str,
        name: String,
        source: io::Error,
    },
}

/// `struct ifreq` with the `ifr_flags` member of the union (40 bytes on 64-bit Linux).
#[repr(C)]
struct IfReqFlags {
    name: [u8; IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

const _: () = assert!(size_of::<IfReqFlags>() == 40);

fn ifreq(name: &str) -> Result<IfReqFlags, TapError> {
    let b = name.as_bytes();
    if b.is_empty() || b.len() >= IFNAMSIZ || b.contains(&0) {
        return Err(TapError::BadName(name.to_string()));
    }
    let mut r = IfReqFlags {
        name: [0; IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    };
    r.name[..b.len()].copy_from_slice(b);
    Ok(r)
}

pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Creates (or attaches to) TAP interface `name` and brings it up.
    pub fn create(name: &str) -> Result<Tap, TapError> {
        Tap::open(name, IFF_TAP | IFF_NO_PI)
    }

    /// `queues` queues of the multiqueue TAP interface `name` (one
    /// descriptor each; the kernel steers each flow to one of the attached
    /// queues), brought up.
    pub fn create_multi(name: &str, queues: u16) -> Result<Vec<Tap>, TapError> {
        let first = Tap::open(name, IFF_TAP | IFF_NO_PI | IFF_MULTI_QUEUE)?;
        let name = first.name.clone();
        let mut taps = vec![first];
        for _ in 1..queues {
            taps.push(Tap::open(&name, IFF_TAP | IFF_NO_PI | IFF_MULTI_QUEUE)?);
        }
        Ok(taps)
    }

    /// Attaches this queue to its interface, or detaches it (TUNSETQUEUE):
    /// a detached queue gets no frames.
    pub fn set_attached(&self, attached: bool) -> Result<(), TapError> {
        let mut req = ifreq(&self.name)?;
        req.flags = if attached {
            IFF_ATTACH_QUEUE
        } else {
            IFF_DETACH_QUEUE
        };
        // SAFETY: TUNSETQUEUE reads a `struct ifreq` (its flags); `req` is a
        // live 40-byte ifreq that outlives the call.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETQUEUE as _,
                &mut req as *mut IfReqFlags,
            )
        };
        if ret < 0 {
            return Err(TapError::Ioctl {
                what: "TUNSETQUEUE",
                name: self.name.clone(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn open(name: &str, flags: i16) -> Result<Tap, TapError> {
        let mut req = ifreq(name)?;
        req.flags = flags;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        let ioctl_err = |what| TapError::Ioctl {
            what,
            name: name.to_string(),
            source: io::Error::last_os_error(),
        };
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` is a live 40-byte
        // ifreq with the name and flags filled in.
        let ret = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                TUNSETIFF as _,
                &mut req as *mut IfReqFlags,
            )
        };
        if ret < 0 {
            return Err(ioctl_err("TUNSETIFF"));
        }
        let end = req.name.iter().position(|&c| c == 0).unwrap_or(IFNAMSIZ);
        let name = String::from_utf8_lossy(&req.name[..end]).into_owned();
        set_up(&name)?;
        Ok(Tap { file, name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame; `None` when none is queued.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self.file.read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes one frame (a full frame per write on a tap).
    pub fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        self.file.write(frame).map(|_| ())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Sets IFF_UP on interface `name` (SIOCGIFFLAGS / SIOCSIFFLAGS on an AF_INET socket).
fn set_up(name: &str) -> Result<(), TapError> {
    let err = |what| TapError::Ioctl {
        what,
        name: name.to_string(),
        source: io::Error::last_os_error(),
    };
    // SAFETY: plain socket(2) call with constant arguments.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(err("socket"));
    }
    // SAFETY: `raw` is a new descriptor owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFFLAGS reads the name from and writes ifr_flags into a live ifreq.
    if unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCGIFFLAGS as _,
            &mut req as *mut IfReqFlags,
        )
    } < 0
    {
        return Err(err("SIOCGIFFLAGS"));
    }
    req.flags |= libc::IFF_UP as i16;
    // SAFETY: SIOCSIFFLAGS reads a live ifreq with the name and the new flags.
    if unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCSIFFLAGS as _,
            &req as *const IfReqFlags,
        )
    } < 0
    {
        return Err(err("SIOCSIFFLAGS"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_names() {
        assert!(ifreq("tap0").is_ok());
        assert_eq!(&ifreq("tap0").unwrap().name[..5], b"tap0\0");
        assert!(ifreq("").is_err());
        assert!(ifreq("0123456789abcdef").is_err());
    }
}
