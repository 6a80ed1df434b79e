//! A minimal generic-netlink client (include/uapi/linux/netlink.h, genetlink.h) and the
//! two vdpa commands this device needs (include/uapi/linux/vdpa.h).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use thiserror::Error;

const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;
const NLA_HDRLEN: usize = 4;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x01;
const NLM_F_ACK: u16 = 0x04;
/// NLM_F_ACK_TLVS: the error message carries extended-ack attributes.
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;

const SOL_NETLINK: libc::c_int = 270;
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

pub const VDPA_GENL_NAME: &str = "vdpa";
const VDPA_GENL_VERSION: u8 = 1;
const VDPA_CMD_DEV_NEW: u8 = 3;
const VDPA_CMD_DEV_DEL: u8 = 4;
const VDPA_ATTR_MGMTDEV_DEV_NAME: u16 = 2;
const VDPA_ATTR_DEV_NAME: u16 = 4;

#[derive(Debug, Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Socket(io::Error),
    #[error("netlink send: {0}")]
    Send(io::Error),
    #[error("netlink receive: {0}")]
    Recv(io::Error),
    #[error("malformed netlink message: {0}")]
    Malformed(&'static str),
    #[error("generic netlink family {0:?} not found (is the module loaded?)")]
    NoFamily(String),
    #[error("{what}: {}{}", io::Error::from_raw_os_error(*errno), msg.as_ref().map(|m| format!(" ({m})")).unwrap_or_default())]
    Kernel {
        what: String,
        errno: i32,
        msg: Option<String>,
    },
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
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
}

/// Encodes a generic netlink request: nlmsghdr, genlmsghdr, attributes.
pub fn encode_genl(
    family: u16,
    flags: u16,
    seq: u32,
    cmd: u8,
    version: u8,
    attrs: &[Attr],
) -> Vec<u8> {
    let mut b = vec![0u8; NLMSG_HDRLEN + GENL_HDRLEN];
    b[4..6].copy_from_slice(&family.to_ne_bytes());
    b[6..8].copy_from_slice(&flags.to_ne_bytes());
    b[8..12].copy_from_slice(&seq.to_ne_bytes());
    // nlmsg_pid 0: the kernel assigns the port.
    b[16] = cmd;
    b[17] = version;
    for a in attrs {
        let len = NLA_HDRLEN + a.data.len();
        b.extend_from_slice(&(len as u16).to_ne_bytes());
        b.extend_from_slice(&a.ty.to_ne_bytes());
        b.extend_from_slice(&a.data);
        b.resize(align4(b.len()), 0);
    }
    let total = b.len() as u32;
    b[0..4].copy_from_slice(&total.to_ne_bytes());
    b
}

/// A received netlink message (header fields and payload after the nlmsghdr).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    pub payload: Vec<u8>,
}

/// Splits a datagram into netlink messages.
pub fn parse_messages(mut b: &[u8]) -> Result<Vec<Message>, NetlinkError> {
    let mut out = Vec::new();
    while b.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize;
        if len < NLMSG_HDRLEN || len > b.len() {
            return Err(NetlinkError::Malformed("bad nlmsg_len"));
        }
        out.push(Message {
            ty: u16::from_ne_bytes([b[4], b[5]]),
            flags: u16::from_ne_bytes([b[6], b[7]]),
            seq: u32::from_ne_bytes(b[8..12].try_into().unwrap()),
            payload: b[NLMSG_HDRLEN..len].to_vec(),
        });
        b = &b[align4(len).min(b.len())..];
    }
    Ok(out)
}

/// Splits an attribute stream into (type, data) pairs.
pub fn parse_attrs(mut b: &[u8]) -> Result<Vec<(u16, &[u8])>, NetlinkError> {
    let mut out = Vec::new();
    while b.len() >= NLA_HDRLEN {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        // Strip NLA_F_NESTED / NLA_F_NET_BYTEORDER.
        let ty = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < NLA_HDRLEN || len > b.len() {
            return Err(NetlinkError::Malformed("bad nla_len"));
        }
        out.push((ty, &b[NLA_HDRLEN..len]));
        b = &b[align4(len).min(b.len())..];
    }
    Ok(out)
}

/// Decodes the payload of an NLMSG_ERROR: (negative errno or 0, extack message).
/// The socket asks for capped acks, so the echoed request is only its header.
pub fn parse_error(msg: &Message) -> Result<(i32, Option<String>), NetlinkError> {
    let p = &msg.payload;
    if p.len() < 4 {
        return Err(NetlinkError::Malformed("short nlmsgerr"));
    }
    let error = i32::from_ne_bytes(p[0..4].try_into().unwrap());
    let mut text = None;
    if msg.flags & NLM_F_ACK_TLVS != 0 && p.len() >= 4 + NLMSG_HDRLEN {
        for (ty, data) in parse_attrs(&p[4 + NLMSG_HDRLEN..])? {
            if ty == NLMSGERR_ATTR_MSG {
                let end = data.iter().position(|&c| c == 0).unwrap_or(data.len());
                text = Some(String::from_utf8_lossy(&data[..end]).into_owned());
            }
        }
    }
    Ok((error, text))
}

/// A NETLINK_GENERIC socket.
pub struct GenlSocket {
    fd: OwnedFd,
    seq: u32,
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
        Ok(GenlSocket { fd, seq: 1 })
    }

    /// Sends one request with NLM_F_ACK and returns the replies before the ACK.
    /// A non-zero error in the ACK becomes [`NetlinkError::Kernel`].
    pub fn request(
        &mut self,
        what: &str,
        family: u16,
        cmd: u8,
        version: u8,
        attrs: &[Attr],
    ) -> Result<Vec<Message>, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let msg = encode_genl(family, NLM_F_REQUEST | NLM_F_ACK, seq, cmd, version, attrs);
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
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            // SAFETY: recv writes at most `buf.len()` bytes into `buf`, which we own.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(NetlinkError::Recv(e));
            }
            for m in parse_messages(&buf[..n as usize])? {
                if m.seq != seq {
                    continue;
                }
                match m.ty {
                    NLMSG_ERROR => {
                        let (errno, msg) = parse_error(&m)?;
                        if errno == 0 {
                            return Ok(replies);
                        }
                        return Err(NetlinkError::Kernel {
                            what: what.to_string(),
                            errno: -errno,
                            msg,
                        });
                    }
                    NLMSG_DONE => return Ok(replies),
                    _ => replies.push(m),
                }
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
        if m.payload.len() < GENL_HDRLEN {
            continue;
        }
        let attrs = parse_attrs(&m.payload[GENL_HDRLEN..]).ok()?;
        for (ty, data) in attrs {
            if ty == CTRL_ATTR_FAMILY_ID && data.len() >= 2 {
                return Some(u16::from_ne_bytes([data[0], data[1]]));
            }
        }
    }
    None
}

/// The attributes of VDPA_CMD_DEV_NEW.
pub fn dev_new_attrs(mgmtdev: &str, name: &str) -> Vec<Attr> {
    vec![
        Attr::string(VDPA_ATTR_MGMTDEV_DEV_NAME, mgmtdev),
        Attr::string(VDPA_ATTR_DEV_NAME, name),
    ]
}

/// `vdpa dev add name NAME mgmtdev MGMTDEV`.
pub fn vdpa_dev_new(mgmtdev: &str, name: &str) -> Result<(), NetlinkError> {
    let mut sock = GenlSocket::open()?;
    let family = sock.resolve_family(VDPA_GENL_NAME)?;
    sock.request(
        &format!("VDPA_CMD_DEV_NEW {name} (mgmtdev {mgmtdev})"),
        family,
        VDPA_CMD_DEV_NEW,
        VDPA_GENL_VERSION,
        &dev_new_attrs(mgmtdev, name),
    )
    .map(|_| ())
}

/// `vdpa dev del NAME`.
pub fn vdpa_dev_del(name: &str) -> Result<(), NetlinkError> {
    let mut sock = GenlSocket::open()?;
    let family = sock.resolve_family(VDPA_GENL_NAME)?;
    sock.request(
        &format!("VDPA_CMD_DEV_DEL {name}"),
        family,
        VDPA_CMD_DEV_DEL,
        VDPA_GENL_VERSION,
        &[Attr::string(VDPA_ATTR_DEV_NAME, name)],
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_dev_new() {
        let b = encode_genl(
            0x1a,
            NLM_F_REQUEST | NLM_F_ACK,
            9,
            3,
            1,
            &dev_new_attrs("vduse", "net0"),
        );
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
        let attrs = parse_attrs(&m[0].payload[GENL_HDRLEN..]).unwrap();
        assert_eq!(attrs, vec![(2, &b"vduse\0"[..]), (4, &b"net0\0"[..])]);
    }

    fn error_msg(seq: u32, errno: i32, text: Option<&str>) -> Vec<u8> {
        let mut payload = errno.to_ne_bytes().to_vec();
        payload.extend_from_slice(&[0u8; NLMSG_HDRLEN]);
        let mut flags = 0;
        if let Some(t) = text {
            flags |= NLM_F_ACK_TLVS;
            let mut data = t.as_bytes().to_vec();
            data.push(0);
            payload.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
            payload.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
            payload.extend_from_slice(&data);
            payload.resize(align4(payload.len()), 0);
        }
        let mut b = ((NLMSG_HDRLEN + payload.len()) as u32)
            .to_ne_bytes()
            .to_vec();
        b.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        b.extend_from_slice(&flags.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&payload);
        b
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
    fn malformed() {
        assert!(parse_messages(&[40, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(parse_attrs(&[2, 0, 1, 0]).is_err());
    }
}
