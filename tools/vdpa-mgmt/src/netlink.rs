//! A minimal generic-netlink client (include/uapi/linux/netlink.h, genetlink.h):
//! message and attribute encoding, parsing of replies from the kernel (which are
//! parsed defensively: a short or inconsistent message is a typed error, never a
//! panic), and a NETLINK_GENERIC socket whose every receive is bounded.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use thiserror::Error;

pub const NLMSG_HDRLEN: usize = 16;
pub const GENL_HDRLEN: usize = 4;
pub const NLA_HDRLEN: usize = 4;

pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLM_F_REQUEST: u16 = 0x01;
pub const NLM_F_MULTI: u16 = 0x02;
pub const NLM_F_ACK: u16 = 0x04;
/// NLM_F_ROOT | NLM_F_MATCH.
pub const NLM_F_DUMP: u16 = 0x300;
/// NLM_F_ACK_TLVS: the error message carries extended-ack attributes.
pub const NLM_F_ACK_TLVS: u16 = 0x200;
/// NLM_F_CAPPED: the echoed request in an error message is only its header.
pub const NLM_F_CAPPED: u16 = 0x100;
pub const NLMSGERR_ATTR_MSG: u16 = 1;

const SOL_NETLINK: libc::c_int = 270;
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;

pub const GENL_ID_CTRL: u16 = 0x10;
pub const CTRL_CMD_GETFAMILY: u8 = 3;
pub const CTRL_ATTR_FAMILY_ID: u16 = 1;
pub const CTRL_ATTR_FAMILY_NAME: u16 = 2;

/// How long one receive may wait for the kernel's answer.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Socket(io::Error),
    #[error("netlink send: {0}")]
    Send(io::Error),
    #[error("netlink receive while {what}: {source}")]
    Recv { what: String, source: io::Error },
    #[error("no answer from the kernel within {secs} s while {what}")]
    Timeout { what: String, secs: u64 },
    #[error("netlink reply truncated ({got} bytes, buffer {buf}) while {what}")]
    Truncated {
        what: String,
        got: usize,
        buf: usize,
    },
    #[error("malformed netlink message: {0}")]
    Malformed(&'static str),
    #[error("request too large to encode: {0}")]
    TooLarge(&'static str),
    #[error("generic netlink family {0:?} not found (is its module loaded?)")]
    NoFamily(String),
    #[error("{what}: {}{}", io::Error::from_raw_os_error(*errno), msg.as_ref().map(|m| format!(" ({m})")).unwrap_or_default())]
    Kernel {
        what: String,
        errno: i32,
        msg: Option<String>,
    },
}

fn align4(n: usize) -> Option<usize> {
    n.checked_add(3).map(|v| v & !3)
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_ne_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
}

/// One netlink attribute to encode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ty: u16,
    pub data: Vec<u8>,
}

impl Attr {
    /// A NUL-terminated string attribute (NLA_STRING / NLA_NUL_STRING).
    pub fn string(ty: u16, s: &str) -> Attr {
        let mut data = s.as_bytes().to_vec();
        data.push(0);
        Attr { ty, data }
    }

    /// A binary attribute (NLA_BINARY, e.g. a MAC address).
    pub fn bytes(ty: u16, b: &[u8]) -> Attr {
        Attr {
            ty,
            data: b.to_vec(),
        }
    }

    /// An NLA_U64 attribute. Its payload is 8 bytes at a 4-byte boundary, which the
    /// kernel accepts for requests (nla_get_u64 copies it).
    pub fn u64(ty: u16, v: u64) -> Attr {
        Attr {
            ty,
            data: v.to_ne_bytes().to_vec(),
        }
    }
}

/// Encodes a generic netlink request: nlmsghdr, genlmsghdr, attributes.
pub fn encode_genl(
    family: u16,
    flags: u16,
    seq: u32,
    cmd: u8,
    version: u8,
    attrs: &[Attr],
) -> Result<Vec<u8>, NetlinkError> {
    let mut b = vec![0u8; NLMSG_HDRLEN + GENL_HDRLEN];
    b[4..6].copy_from_slice(&family.to_ne_bytes());
    b[6..8].copy_from_slice(&flags.to_ne_bytes());
    b[8..12].copy_from_slice(&seq.to_ne_bytes());
    // nlmsg_pid 0: the kernel assigns the port.
    b[16] = cmd;
    b[17] = version;
    for a in attrs {
        let len = u16::try_from(NLA_HDRLEN + a.data.len())
            .map_err(|_| NetlinkError::TooLarge("attribute longer than 65535 bytes"))?;
        b.extend_from_slice(&len.to_ne_bytes());
        b.extend_from_slice(&a.ty.to_ne_bytes());
        b.extend_from_slice(&a.data);
        let padded = align4(b.len()).ok_or(NetlinkError::TooLarge("message length"))?;
        b.resize(padded, 0);
    }
    let total = u32::try_from(b.len()).map_err(|_| NetlinkError::TooLarge("message length"))?;
    b[0..4].copy_from_slice(&total.to_ne_bytes());
    Ok(b)
}

/// A received netlink message (header fields and payload after the nlmsghdr).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    pub payload: Vec<u8>,
}

impl Message {
    /// The attributes after the genlmsghdr of a generic netlink message.
    pub fn genl_attrs(&self) -> Result<Vec<(u16, &[u8])>, NetlinkError> {
        let rest = self
            .payload
            .get(GENL_HDRLEN..)
            .ok_or(NetlinkError::Malformed(
                "generic netlink message shorter than its header",
            ))?;
        parse_attrs(rest)
    }
}

/// Splits a datagram into netlink messages. Bytes after the last whole message that
/// cannot hold a header are an error too: the kernel never sends them.
pub fn parse_messages(mut b: &[u8]) -> Result<Vec<Message>, NetlinkError> {
    let mut out = Vec::new();
    while !b.is_empty() {
        if b.len() < NLMSG_HDRLEN {
            return Err(NetlinkError::Malformed(
                "trailing bytes shorter than a nlmsghdr",
            ));
        }
        let len = u32_at(b, 0).ok_or(NetlinkError::Malformed("short nlmsghdr"))? as usize;
        if len < NLMSG_HDRLEN || len > b.len() {
            return Err(NetlinkError::Malformed("bad nlmsg_len"));
        }
        out.push(Message {
            ty: u16_at(b, 4).ok_or(NetlinkError::Malformed("short nlmsghdr"))?,
            flags: u16_at(b, 6).ok_or(NetlinkError::Malformed("short nlmsghdr"))?,
            seq: u32_at(b, 8).ok_or(NetlinkError::Malformed("short nlmsghdr"))?,
            payload: b
                .get(NLMSG_HDRLEN..len)
                .ok_or(NetlinkError::Malformed("bad nlmsg_len"))?
                .to_vec(),
        });
        let next = align4(len).map_or(b.len(), |n| n.min(b.len()));
        b = b.get(next..).unwrap_or_default();
    }
    Ok(out)
}

/// Splits an attribute stream into (type, data) pairs; NLA_F_NESTED and
/// NLA_F_NET_BYTEORDER are stripped from the type.
pub fn parse_attrs(mut b: &[u8]) -> Result<Vec<(u16, &[u8])>, NetlinkError> {
    let mut out = Vec::new();
    while !b.is_empty() {
        if b.len() < NLA_HDRLEN {
            return Err(NetlinkError::Malformed(
                "trailing bytes shorter than an nlattr",
            ));
        }
        let len = u16_at(b, 0).ok_or(NetlinkError::Malformed("short nlattr"))? as usize;
        let ty = u16_at(b, 2).ok_or(NetlinkError::Malformed("short nlattr"))? & 0x3fff;
        if len < NLA_HDRLEN || len > b.len() {
            return Err(NetlinkError::Malformed("bad nla_len"));
        }
        out.push((
            ty,
            b.get(NLA_HDRLEN..len)
                .ok_or(NetlinkError::Malformed("bad nla_len"))?,
        ));
        let next = align4(len).map_or(b.len(), |n| n.min(b.len()));
        b = b.get(next..).unwrap_or_default();
    }
    Ok(out)
}

/// A NUL-terminated (or unterminated) string attribute's text.
pub fn attr_str(data: &[u8]) -> String {
    let end = data.iter().position(|&c| c == 0).unwrap_or(data.len());
    String::from_utf8_lossy(data.get(..end).unwrap_or_default()).into_owned()
}

/// An NLA_U32 attribute's value, if it has exactly 4 bytes.
pub fn attr_u32(data: &[u8]) -> Option<u32> {
    let b: [u8; 4] = data.try_into().ok()?;
    Some(u32::from_ne_bytes(b))
}

/// An NLA_U64 attribute's value, if it has exactly 8 bytes.
pub fn attr_u64(data: &[u8]) -> Option<u64> {
    let b: [u8; 8] = data.try_into().ok()?;
    Some(u64::from_ne_bytes(b))
}

/// Decodes the payload of an NLMSG_ERROR: (negative errno or 0, extack message).
/// With NLM_F_CAPPED the echoed request is only its header; otherwise it is the
/// whole request, whose length its own header gives.
pub fn parse_error(msg: &Message) -> Result<(i32, Option<String>), NetlinkError> {
    let p = &msg.payload;
    let error = u32_at(p, 0).ok_or(NetlinkError::Malformed("short nlmsgerr"))? as i32;
    let mut text = None;
    if msg.flags & NLM_F_ACK_TLVS != 0 {
        let echoed = if msg.flags & NLM_F_CAPPED != 0 {
            NLMSG_HDRLEN
        } else {
            let len = u32_at(p, 4).ok_or(NetlinkError::Malformed("short nlmsgerr"))? as usize;
            align4(len).ok_or(NetlinkError::Malformed("bad echoed nlmsg_len"))?
        };
        let tlvs = 4usize
            .checked_add(echoed)
            .and_then(|at| p.get(at..))
            .ok_or(NetlinkError::Malformed(
                "nlmsgerr shorter than its echoed request",
            ))?;
        for (ty, data) in parse_attrs(tlvs)? {
            if ty == NLMSGERR_ATTR_MSG {
                text = Some(attr_str(data));
            }
        }
    }
    Ok((error, text))
}

/// Decodes the payload of an NLMSG_DONE: 0 or a negative errno (a dump that failed).
pub fn parse_done(msg: &Message) -> i32 {
    u32_at(&msg.payload, 0).map_or(0, |v| v as i32)
}

/// What one request's replies came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// More replies may follow.
    More,
    /// The request is finished (ACK or NLMSG_DONE).
    Done,
}

/// Collects the replies of one request from a received datagram: messages of other
/// sequence numbers are skipped; an error ACK or a failed DONE is a Kernel error.
pub fn collect(
    what: &str,
    seq: u32,
    dgram: &[u8],
    replies: &mut Vec<Message>,
) -> Result<Step, NetlinkError> {
    for m in parse_messages(dgram)? {
        if m.seq != seq {
            continue;
        }
        match m.ty {
            NLMSG_ERROR => {
                let (errno, msg) = parse_error(&m)?;
                if errno == 0 {
                    return Ok(Step::Done);
                }
                return Err(NetlinkError::Kernel {
                    what: what.to_string(),
                    errno: errno.checked_neg().unwrap_or(i32::MAX),
                    msg,
                });
            }
            NLMSG_DONE => {
                let errno = parse_done(&m);
                if errno < 0 {
                    return Err(NetlinkError::Kernel {
                        what: what.to_string(),
                        errno: errno.checked_neg().unwrap_or(i32::MAX),
                        msg: None,
                    });
                }
                return Ok(Step::Done);
            }
            _ => replies.push(m),
        }
    }
    Ok(Step::More)
}

/// A NETLINK_GENERIC socket.
pub struct GenlSocket {
    fd: OwnedFd,
    seq: u32,
    timeout: Duration,
}

impl GenlSocket {
    pub fn open() -> Result<GenlSocket, NetlinkError> {
        // SAFETY: plain socket(2) call with constant arguments; no memory is passed.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if raw < 0 {
            return Err(NetlinkError::Socket(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a new descriptor owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        for opt in [NETLINK_CAP_ACK, NETLINK_EXT_ACK] {
            let one: libc::c_int = 1;
            // SAFETY: setsockopt reads sizeof(int) bytes from a live local. Failure is
            // harmless (older kernels): we then get acks without extended messages.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    SOL_NETLINK,
                    opt,
                    &one as *const libc::c_int as *const libc::c_void,
                    size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
        let tv = libc::timeval {
            tv_sec: RECV_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: setsockopt reads a timeval from a live local.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(NetlinkError::Socket(io::Error::last_os_error()));
        }
        Ok(GenlSocket {
            fd,
            seq: 1,
            timeout: RECV_TIMEOUT,
        })
    }

    /// Sends one request with NLM_F_ACK (and NLM_F_DUMP if `dump`) and returns its
    /// replies up to the ACK or NLMSG_DONE. A non-zero error in the ACK becomes
    /// [`NetlinkError::Kernel`].
    pub fn request(
        &mut self,
        what: &str,
        family: u16,
        cmd: u8,
        version: u8,
        attrs: &[Attr],
        dump: bool,
    ) -> Result<Vec<Message>, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let flags = NLM_F_REQUEST | NLM_F_ACK | if dump { NLM_F_DUMP } else { 0 };
        let msg = encode_genl(family, flags, seq, cmd, version, attrs)?;
        // SAFETY: an all-zero sockaddr_nl is valid; we then fill in the family.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: sendto reads `msg.len()` bytes from `msg` and a sockaddr_nl from `addr`,
        // both live for the call.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr() as *const libc::c_void,
                msg.len(),
                0,
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(NetlinkError::Send(io::Error::last_os_error()));
        }
        let mut replies = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: recv writes at most `buf.len()` bytes into `buf`, which we own.
            // MSG_TRUNC makes it return the datagram's real length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                        return Err(NetlinkError::Timeout {
                            what: what.to_string(),
                            secs: self.timeout.as_secs(),
                        })
                    }
                    _ => {
                        return Err(NetlinkError::Recv {
                            what: what.to_string(),
                            source: e,
                        })
                    }
                }
            }
            let got = n as usize;
            if got > buf.len() {
                return Err(NetlinkError::Truncated {
                    what: what.to_string(),
                    got,
                    buf: buf.len(),
                });
            }
            let dgram = buf.get(..got).unwrap_or_default();
            if collect(what, seq, dgram, &mut replies)? == Step::Done {
                return Ok(replies);
            }
        }
    }

    /// Resolves a generic netlink family name to its id (CTRL_CMD_GETFAMILY).
    pub fn resolve_family(&mut self, name: &str) -> Result<u16, NetlinkError> {
        let attrs = [Attr::string(CTRL_ATTR_FAMILY_NAME, name)];
        let replies = self
            .request(
                &format!("resolving generic netlink family {name:?}"),
                GENL_ID_CTRL,
                CTRL_CMD_GETFAMILY,
                1,
                &attrs,
                false,
            )
            .map_err(|e| match e {
                NetlinkError::Kernel { errno, .. } if errno == libc::ENOENT => {
                    NetlinkError::NoFamily(name.to_string())
                }
                e => e,
            })?;
        family_id_from_replies(&replies).ok_or_else(|| NetlinkError::NoFamily(name.to_string()))
    }
}

/// Finds CTRL_ATTR_FAMILY_ID in CTRL_CMD_NEWFAMILY replies.
pub fn family_id_from_replies(replies: &[Message]) -> Option<u16> {
    for m in replies {
        let Ok(attrs) = m.genl_attrs() else { continue };
        for (ty, data) in attrs {
            if ty == CTRL_ATTR_FAMILY_ID {
                if let Ok(b) = <[u8; 2]>::try_from(data) {
                    return Some(u16::from_ne_bytes(b));
                }
            }
        }
    }
    None
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An NLMSG_ERROR as the kernel sends it with NETLINK_CAP_ACK and NETLINK_EXT_ACK.
    pub(crate) fn error_msg(seq: u32, errno: i32, text: Option<&str>) -> Vec<u8> {
        let mut payload = errno.to_ne_bytes().to_vec();
        payload.extend_from_slice(&[0u8; NLMSG_HDRLEN]);
        let mut flags = NLM_F_CAPPED;
        if let Some(t) = text {
            flags |= NLM_F_ACK_TLVS;
            let mut data = t.as_bytes().to_vec();
            data.push(0);
            payload.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
            payload.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
            payload.extend_from_slice(&data);
            payload.resize(align4(payload.len()).unwrap(), 0);
        }
        raw_msg(NLMSG_ERROR, flags, seq, &payload)
    }

    pub(crate) fn raw_msg(ty: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut b = ((NLMSG_HDRLEN + payload.len()) as u32)
            .to_ne_bytes()
            .to_vec();
        b.extend_from_slice(&ty.to_ne_bytes());
        b.extend_from_slice(&flags.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(payload);
        b.resize(align4(b.len()).unwrap(), 0);
        b
    }

    #[test]
    fn encode_two_string_attrs() {
        let attrs = [Attr::string(2, "vduse"), Attr::string(4, "net0")];
        let b = encode_genl(0x1a, NLM_F_REQUEST | NLM_F_ACK, 9, 3, 1, &attrs).unwrap();
        // header 16 + genl 4 + attr(4+6 -> 12) + attr(4+5 -> 12)
        assert_eq!(b.len(), 44);
        assert_eq!(u32::from_ne_bytes(b[0..4].try_into().unwrap()), 44);
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), 0x1a);
        assert_eq!(u16::from_ne_bytes([b[6], b[7]]), 5);
        assert_eq!(u32::from_ne_bytes(b[8..12].try_into().unwrap()), 9);
        assert_eq!(&b[16..20], &[3, 1, 0, 0]);
        // First attribute: len 10, type 2, "vduse\0", 2 bytes padding.
        assert_eq!(&b[20..24], &[10, 0, 2, 0]);
        assert_eq!(&b[24..30], b"vduse\0");
        assert_eq!(&b[30..32], &[0, 0]);
        // Second attribute: len 9, type 4, "net0\0", 3 bytes padding.
        assert_eq!(&b[32..36], &[9, 0, 4, 0]);
        assert_eq!(&b[36..41], b"net0\0");

        let m = parse_messages(&b).unwrap();
        assert_eq!(m.len(), 1);
        let attrs = m[0].genl_attrs().unwrap();
        assert_eq!(attrs, vec![(2, &b"vduse\0"[..]), (4, &b"net0\0"[..])]);
    }

    #[test]
    fn oversized_attribute_is_refused() {
        let big = Attr::bytes(1, &vec![0u8; 70_000]);
        assert!(matches!(
            encode_genl(0x1a, 0, 1, 1, 1, &[big]),
            Err(NetlinkError::TooLarge(_))
        ));
    }

    #[test]
    fn decode_ack_and_errors() {
        let mut dgram = error_msg(3, 0, None);
        dgram.extend(error_msg(
            4,
            -libc::ENODEV,
            Some("Fail to find the specified mgmt device"),
        ));
        let msgs = parse_messages(&dgram).unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(parse_error(&msgs[0]).unwrap(), (0, None));
        assert_eq!(msgs[1].seq, 4);
        assert_eq!(
            parse_error(&msgs[1]).unwrap(),
            (
                -libc::ENODEV,
                Some("Fail to find the specified mgmt device".to_string())
            )
        );
    }

    #[test]
    fn uncapped_error_skips_the_whole_echoed_request() {
        // Without NETLINK_CAP_ACK the kernel echoes the whole request (here 24 bytes).
        let request = encode_genl(0x1a, NLM_F_REQUEST, 7, 3, 1, &[Attr::string(4, "x")]).unwrap();
        let mut payload = (-libc::EEXIST).to_ne_bytes().to_vec();
        payload.extend_from_slice(&request);
        payload.extend_from_slice(&[8, 0, 1, 0, b'd', b'u', b'p', 0]);
        let m = parse_messages(&raw_msg(NLMSG_ERROR, NLM_F_ACK_TLVS, 7, &payload)).unwrap();
        assert_eq!(
            parse_error(&m[0]).unwrap(),
            (-libc::EEXIST, Some("dup".to_string()))
        );
    }

    #[test]
    fn collect_stops_at_ack_done_and_reports_errors() {
        let mut replies = Vec::new();
        let data = raw_msg(0x1a, NLM_F_MULTI, 5, &[1, 1, 0, 0]);
        // Another request's message is skipped.
        let other = raw_msg(0x1a, 0, 4, &[1, 1, 0, 0]);
        let mut dgram = other.clone();
        dgram.extend(&data);
        assert_eq!(collect("t", 5, &dgram, &mut replies).unwrap(), Step::More);
        assert_eq!(replies.len(), 1);
        let done = raw_msg(NLMSG_DONE, NLM_F_MULTI, 5, &0i32.to_ne_bytes());
        assert_eq!(collect("t", 5, &done, &mut replies).unwrap(), Step::Done);
        let failed = raw_msg(NLMSG_DONE, NLM_F_MULTI, 5, &(-libc::EMSGSIZE).to_ne_bytes());
        match collect("dumping", 5, &failed, &mut replies) {
            Err(NetlinkError::Kernel { errno, what, .. }) => {
                assert_eq!(errno, libc::EMSGSIZE);
                assert_eq!(what, "dumping");
            }
            r => panic!("unexpected {r:?}"),
        }
        let err = error_msg(
            5,
            -libc::EOPNOTSUPP,
            Some("Some provided attributes are not supported: 0x100000"),
        );
        let e = collect("VDPA_CMD_DEV_NEW sim0", 5, &err, &mut replies).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "VDPA_CMD_DEV_NEW sim0: {} (Some provided attributes are not supported: 0x100000)",
                io::Error::from_raw_os_error(libc::EOPNOTSUPP)
            )
        );
        assert_eq!(
            collect("t", 5, &error_msg(5, 0, None), &mut replies).unwrap(),
            Step::Done
        );
    }

    #[test]
    fn family_id() {
        // CTRL_CMD_NEWFAMILY reply: genl header, FAMILY_ID u16 (padded), FAMILY_NAME.
        let mut payload = vec![1u8, 2, 0, 0];
        payload.extend_from_slice(&[6, 0, 1, 0, 0x1b, 0, 0, 0]);
        payload.extend_from_slice(&[9, 0, 2, 0, b'v', b'd', b'p', b'a', 0, 0, 0, 0]);
        let m = Message {
            ty: GENL_ID_CTRL,
            flags: 0,
            seq: 1,
            payload,
        };
        assert_eq!(family_id_from_replies(&[m]), Some(0x1b));
        assert_eq!(family_id_from_replies(&[]), None);
    }

    #[test]
    fn truncated_and_malformed_replies() {
        // nlmsg_len beyond the datagram (a reply cut short).
        assert!(parse_messages(&[40, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
        // nlmsg_len below the header size.
        assert!(parse_messages(&[8, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
        // Trailing bytes that cannot be a header.
        let mut b = error_msg(1, 0, None);
        b.extend_from_slice(&[1, 2, 3]);
        assert!(parse_messages(&b).is_err());
        // nla_len below 4, beyond the data, and a dangling attribute header.
        assert!(parse_attrs(&[2, 0, 1, 0]).is_err());
        assert!(parse_attrs(&[12, 0, 1, 0, 0, 0]).is_err());
        assert!(parse_attrs(&[8, 0, 1, 0, 1, 2, 3, 4, 5]).is_err());
        // An error message shorter than its errno, or than its echoed header.
        let short = Message {
            ty: NLMSG_ERROR,
            flags: 0,
            seq: 1,
            payload: vec![0, 0],
        };
        assert!(parse_error(&short).is_err());
        let cut = Message {
            ty: NLMSG_ERROR,
            flags: NLM_F_ACK_TLVS | NLM_F_CAPPED,
            seq: 1,
            payload: vec![0xea, 0xff, 0xff, 0xff, 0, 0],
        };
        assert!(parse_error(&cut).is_err());
        // A generic netlink message without its genlmsghdr.
        let bare = Message {
            ty: 0x1a,
            flags: 0,
            seq: 1,
            payload: vec![1],
        };
        assert!(bare.genl_attrs().is_err());
        // Typed attribute values want their exact size.
        assert_eq!(attr_u32(&[1, 0, 0]), None);
        assert_eq!(attr_u64(&[1, 0, 0, 0, 0, 0, 0, 0]), Some(1));
        assert_eq!(attr_str(b"vduse\0\0"), "vduse");
        assert_eq!(attr_str(b"abc"), "abc");
    }
}
