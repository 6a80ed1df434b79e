//! The request queue's wire format (include/uapi/linux/virtio_iommu.h, virtio
//! spec "IOMMU device"): parsing what the driver wrote and encoding what the
//! device writes back. Pure functions over bytes; nothing here touches state.

/// `VIRTIO_IOMMU_T_*`.
pub const T_ATTACH: u8 = 1;
pub const T_DETACH: u8 = 2;
pub const T_MAP: u8 = 3;
pub const T_UNMAP: u8 = 4;
pub const T_PROBE: u8 = 5;

/// `VIRTIO_IOMMU_S_*`.
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
pub const S_DEVERR: u8 = 3;
pub const S_INVAL: u8 = 4;
pub const S_RANGE: u8 = 5;
pub const S_NOENT: u8 = 6;
pub const S_FAULT: u8 = 7;
pub const S_NOMEM: u8 = 8;

/// `VIRTIO_IOMMU_ATTACH_F_BYPASS`.
pub const ATTACH_F_BYPASS: u32 = 1 << 0;
/// `VIRTIO_IOMMU_MAP_F_*`.
pub const MAP_F_READ: u32 = 1 << 0;
pub const MAP_F_WRITE: u32 = 1 << 1;
pub const MAP_F_MMIO: u32 = 1 << 2;

/// `VIRTIO_IOMMU_PROBE_T_RESV_MEM` and `VIRTIO_IOMMU_RESV_MEM_T_MSI`.
pub const PROBE_T_RESV_MEM: u16 = 1;
pub const RESV_MEM_T_MSI: u8 = 1;
/// `struct virtio_iommu_probe_resv_mem` without its 4-byte property header.
const RESV_MEM_LEN: u16 = 20;
const PROPERTY_HEAD_LEN: usize = 4;

/// `struct virtio_iommu_req_tail`.
pub const TAIL_LEN: u64 = 4;

/// Device-readable bytes of each request (head + body, without the tail).
const ATTACH_LEN: u64 = 20;
const DETACH_LEN: u64 = 20;
const MAP_LEN: u64 = 36;
const UNMAP_LEN: u64 = 28;
const PROBE_LEN: u64 = 72;
/// The longest device-readable part of any request: the worker reads at
/// most this many bytes (and knows the total length separately).
pub const MAX_READABLE: usize = PROBE_LEN as usize;

/// One request as the driver sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Attach {
        domain: u32,
        endpoint: u32,
        flags: u32,
        /// Whether `reserved` held anything but zeroes (the device must refuse).
        reserved_set: bool,
    },
    Detach {
        domain: u32,
        endpoint: u32,
    },
    Map {
        domain: u32,
        virt_start: u64,
        /// Inclusive.
        virt_end: u64,
        phys_start: u64,
        flags: u32,
    },
    Unmap {
        domain: u32,
        virt_start: u64,
        /// Inclusive.
        virt_end: u64,
    },
    Probe {
        endpoint: u32,
    },
}

/// Which request a counter or record is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RequestKind {
    Attach,
    Detach,
    Map,
    Unmap,
    Probe,
    /// Unknown type or too short to tell.
    Invalid,
}

impl RequestKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::Attach => "attach",
            RequestKind::Detach => "detach",
            RequestKind::Map => "map",
            RequestKind::Unmap => "unmap",
            RequestKind::Probe => "probe",
            RequestKind::Invalid => "invalid",
        }
    }

    pub const ALL: [RequestKind; 6] = [
        RequestKind::Attach,
        RequestKind::Detach,
        RequestKind::Map,
        RequestKind::Unmap,
        RequestKind::Probe,
        RequestKind::Invalid,
    ];
}

impl Request {
    pub fn kind(&self) -> RequestKind {
        match self {
            Request::Attach { .. } => RequestKind::Attach,
            Request::Detach { .. } => RequestKind::Detach,
            Request::Map { .. } => RequestKind::Map,
            Request::Unmap { .. } => RequestKind::Unmap,
            Request::Probe { .. } => RequestKind::Probe,
        }
    }
}

/// The name of a status code, for counters.
pub fn status_name(status: u8) -> &'static str {
    match status {
        S_OK => "ok",
        S_IOERR => "ioerr",
        S_UNSUPP => "unsupp",
        S_DEVERR => "deverr",
        S_INVAL => "inval",
        S_RANGE => "range",
        S_NOENT => "noent",
        S_FAULT => "fault",
        S_NOMEM => "nomem",
        _ => "other",
    }
}

/// What a descriptor chain holds, as far as parsing needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawRequest {
    /// The first bytes of the device-readable part (at most
    /// [`MAX_READABLE`]).
    pub head: Vec<u8>,
    /// Total length of the device-readable part.
    pub readable_len: u64,
    /// Total length of the device-writable part.
    pub writable_len: u64,
}

/// The outcome of parsing one chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    Request(Request),
    /// Malformed: answer with this status, change nothing.
    Reject(RequestKind, u8),
    /// No room for a status, or an unknown type: the spec says to return
    /// the buffers unwritten (used length 0).
    Unanswerable(RequestKind),
}

fn le32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    if let Some(s) = bytes.get(at..at + 4) {
        b.copy_from_slice(s);
    }
    u32::from_le_bytes(b)
}

fn le64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(s) = bytes.get(at..at + 8) {
        b.copy_from_slice(s);
    }
    u64::from_le_bytes(b)
}

/// Parses one request. `probe_size` is the properties length the device
/// advertises: a PROBE's writable part must be exactly that plus the tail;
/// every other request's writable part is exactly the tail. The readable
/// part must be exactly the request's size: short or oversized buffers get
/// S_INVAL.
pub fn parse(raw: &RawRequest, probe_size: u32) -> Parsed {
    if raw.writable_len < TAIL_LEN {
        let kind = raw
            .head
            .first()
            .map_or(RequestKind::Invalid, |t| kind_of(*t));
        return Parsed::Unanswerable(kind);
    }
    let Some(&ty) = raw.head.first() else {
        return Parsed::Reject(RequestKind::Invalid, S_INVAL);
    };
    let kind = kind_of(ty);
    let (len, writable) = match ty {
        T_ATTACH => (ATTACH_LEN, TAIL_LEN),
        T_DETACH => (DETACH_LEN, TAIL_LEN),
        T_MAP => (MAP_LEN, TAIL_LEN),
        T_UNMAP => (UNMAP_LEN, TAIL_LEN),
        T_PROBE => (PROBE_LEN, u64::from(probe_size) + TAIL_LEN),
        _ => return Parsed::Unanswerable(RequestKind::Invalid),
    };
    if raw.readable_len != len || raw.head.len() as u64 != len || raw.writable_len != writable {
        return Parsed::Reject(kind, S_INVAL);
    }
    let b = raw.head.as_slice();
    Parsed::Request(match ty {
        T_ATTACH => Request::Attach {
            domain: le32(b, 4),
            endpoint: le32(b, 8),
            flags: le32(b, 12),
            reserved_set: le32(b, 16) != 0,
        },
        T_DETACH => Request::Detach {
            domain: le32(b, 4),
            endpoint: le32(b, 8),
        },
        T_MAP => Request::Map {
            domain: le32(b, 4),
            virt_start: le64(b, 8),
            virt_end: le64(b, 16),
            phys_start: le64(b, 24),
            flags: le32(b, 32),
        },
        T_UNMAP => Request::Unmap {
            domain: le32(b, 4),
            virt_start: le64(b, 8),
            virt_end: le64(b, 16),
        },
        _ => Request::Probe {
            endpoint: le32(b, 4),
        },
    })
}

fn kind_of(ty: u8) -> RequestKind {
    match ty {
        T_ATTACH => RequestKind::Attach,
        T_DETACH => RequestKind::Detach,
        T_MAP => RequestKind::Map,
        T_UNMAP => RequestKind::Unmap,
        T_PROBE => RequestKind::Probe,
        _ => RequestKind::Invalid,
    }
}

/// What the device writes into a chain's writable part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Nothing; used length 0.
    Unwritten,
    /// `bytes` at `offset` of the writable part; the used length is
    /// `offset + bytes.len()` (the tail is always last).
    Write { offset: u64, bytes: Vec<u8> },
}

impl Reply {
    /// A status in the tail, the last 4 bytes of the writable part (where
    /// the driver looks for it).
    pub fn status(writable_len: u64, status: u8) -> Reply {
        Reply::Write {
            offset: writable_len.saturating_sub(TAIL_LEN),
            bytes: vec![status, 0, 0, 0],
        }
    }

    /// A successful PROBE: `properties` zero-padded to `probe_size`, then
    /// the tail.
    pub fn probe(properties: &[u8], probe_size: u32) -> Reply {
        let size = probe_size as usize;
        let mut bytes = vec![0u8; size + TAIL_LEN as usize];
        let n = properties.len().min(size);
        bytes[..n].copy_from_slice(&properties[..n]);
        Reply::Write { offset: 0, bytes }
    }

    /// The status written, if any.
    pub fn status_code(&self) -> Option<u8> {
        match self {
            Reply::Unwritten => None,
            Reply::Write { bytes, .. } => bytes.len().checked_sub(4).map(|i| bytes[i]),
        }
    }

    pub fn used_len(&self) -> u64 {
        match self {
            Reply::Unwritten => 0,
            Reply::Write { offset, bytes } => offset.saturating_add(bytes.len() as u64),
        }
    }
}

/// A RESV_MEM property of `subtype` over [start, end] (inclusive).
pub fn resv_mem_property(subtype: u8, start: u64, end: u64) -> Vec<u8> {
    let mut p = Vec::with_capacity(PROPERTY_HEAD_LEN + usize::from(RESV_MEM_LEN));
    p.extend_from_slice(&PROBE_T_RESV_MEM.to_le_bytes());
    p.extend_from_slice(&RESV_MEM_LEN.to_le_bytes());
    p.extend_from_slice(&[subtype, 0, 0, 0]);
    p.extend_from_slice(&start.to_le_bytes());
    p.extend_from_slice(&end.to_le_bytes());
    p
}

/// Encoders for tests (the driver's side of the wire format).
#[cfg(test)]
pub mod encode {
    use super::*;

    fn raw(bytes: Vec<u8>, writable_len: u64) -> RawRequest {
        RawRequest {
            readable_len: bytes.len() as u64,
            head: bytes,
            writable_len,
        }
    }

    fn head(ty: u8) -> Vec<u8> {
        vec![ty, 0, 0, 0]
    }

    pub fn attach(domain: u32, endpoint: u32, flags: u32) -> RawRequest {
        let mut b = head(T_ATTACH);
        b.extend_from_slice(&domain.to_le_bytes());
        b.extend_from_slice(&endpoint.to_le_bytes());
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        raw(b, TAIL_LEN)
    }

    pub fn detach(domain: u32, endpoint: u32) -> RawRequest {
        let mut b = head(T_DETACH);
        b.extend_from_slice(&domain.to_le_bytes());
        b.extend_from_slice(&endpoint.to_le_bytes());
        b.extend_from_slice(&[0; 8]);
        raw(b, TAIL_LEN)
    }

    pub fn map(domain: u32, virt_start: u64, virt_end: u64, phys: u64, flags: u32) -> RawRequest {
        let mut b = head(T_MAP);
        b.extend_from_slice(&domain.to_le_bytes());
        b.extend_from_slice(&virt_start.to_le_bytes());
        b.extend_from_slice(&virt_end.to_le_bytes());
        b.extend_from_slice(&phys.to_le_bytes());
        b.extend_from_slice(&flags.to_le_bytes());
        raw(b, TAIL_LEN)
    }

    pub fn unmap(domain: u32, virt_start: u64, virt_end: u64) -> RawRequest {
        let mut b = head(T_UNMAP);
        b.extend_from_slice(&domain.to_le_bytes());
        b.extend_from_slice(&virt_start.to_le_bytes());
        b.extend_from_slice(&virt_end.to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        raw(b, TAIL_LEN)
    }

    pub fn probe(endpoint: u32, probe_size: u32) -> RawRequest {
        let mut b = head(T_PROBE);
        b.extend_from_slice(&endpoint.to_le_bytes());
        b.extend_from_slice(&[0; 64]);
        raw(b, u64::from(probe_size) + TAIL_LEN)
    }
}

#[cfg(test)]
mod tests {
    use super::encode::*;
    use super::*;

    const PROBE_SIZE: u32 = 128;

    #[test]
    fn every_request_type_parses_at_its_spec_offsets() {
        assert_eq!(
            parse(&attach(7, 0x10, ATTACH_F_BYPASS), PROBE_SIZE),
            Parsed::Request(Request::Attach {
                domain: 7,
                endpoint: 0x10,
                flags: ATTACH_F_BYPASS,
                reserved_set: false
            })
        );
        assert_eq!(
            parse(&detach(7, 0x10), PROBE_SIZE),
            Parsed::Request(Request::Detach {
                domain: 7,
                endpoint: 0x10
            })
        );
        assert_eq!(
            parse(&map(3, 0x1000, 0x1fff, 0xa000, MAP_F_READ), PROBE_SIZE),
            Parsed::Request(Request::Map {
                domain: 3,
                virt_start: 0x1000,
                virt_end: 0x1fff,
                phys_start: 0xa000,
                flags: MAP_F_READ
            })
        );
        assert_eq!(
            parse(&unmap(3, 0x1000, 0x1fff), PROBE_SIZE),
            Parsed::Request(Request::Unmap {
                domain: 3,
                virt_start: 0x1000,
                virt_end: 0x1fff
            })
        );
        assert_eq!(
            parse(&probe(0x18, PROBE_SIZE), PROBE_SIZE),
            Parsed::Request(Request::Probe { endpoint: 0x18 })
        );
    }

    #[test]
    fn attach_reserved_bytes_are_reported() {
        let mut raw = attach(1, 2, 0);
        raw.head[19] = 1;
        assert!(matches!(
            parse(&raw, PROBE_SIZE),
            Parsed::Request(Request::Attach {
                reserved_set: true,
                ..
            })
        ));
    }

    #[test]
    fn short_and_oversized_buffers_are_invalid() {
        for raw in [
            attach(1, 2, 0),
            detach(1, 2),
            map(1, 0, 0xfff, 0, 1),
            unmap(1, 0, 0xfff),
            probe(1, PROBE_SIZE),
        ] {
            let kind = match parse(&raw, PROBE_SIZE) {
                Parsed::Request(r) => r.kind(),
                other => panic!("{other:?}"),
            };
            let mut short = raw.clone();
            short.head.pop();
            short.readable_len -= 1;
            assert_eq!(parse(&short, PROBE_SIZE), Parsed::Reject(kind, S_INVAL));
            // Longer than the request: the worker reads only the request's
            // size but knows the total.
            let mut long = raw.clone();
            long.readable_len += 8;
            assert_eq!(parse(&long, PROBE_SIZE), Parsed::Reject(kind, S_INVAL));
            let mut wide = raw.clone();
            wide.writable_len += 4;
            assert_eq!(parse(&wide, PROBE_SIZE), Parsed::Reject(kind, S_INVAL));
            let mut narrow = raw.clone();
            narrow.writable_len = TAIL_LEN + 1;
            // For a PROBE: properties shorter than probe_size.
            assert_eq!(parse(&narrow, PROBE_SIZE), Parsed::Reject(kind, S_INVAL));
            let mut no_tail = raw.clone();
            no_tail.writable_len = TAIL_LEN - 1;
            assert_eq!(
                parse(&no_tail, PROBE_SIZE),
                Parsed::Unanswerable(kind),
                "no room for the tail: returned unwritten"
            );
        }
    }

    #[test]
    fn unknown_types_and_empty_requests() {
        let mut raw = attach(1, 2, 0);
        raw.head[0] = 9;
        assert_eq!(
            parse(&raw, PROBE_SIZE),
            Parsed::Unanswerable(RequestKind::Invalid),
            "the spec says: do not write, used length 0"
        );
        let empty = RawRequest {
            head: vec![],
            readable_len: 0,
            writable_len: TAIL_LEN,
        };
        assert_eq!(
            parse(&empty, PROBE_SIZE),
            Parsed::Reject(RequestKind::Invalid, S_INVAL)
        );
    }

    #[test]
    fn replies_put_the_status_in_the_last_four_bytes() {
        let reply = Reply::status(4, S_RANGE);
        assert_eq!(
            reply,
            Reply::Write {
                offset: 0,
                bytes: vec![S_RANGE, 0, 0, 0]
            }
        );
        assert_eq!(reply.used_len(), 4);
        assert_eq!(reply.status_code(), Some(S_RANGE));
        let wide = Reply::status(12, S_INVAL);
        assert_eq!(wide.used_len(), 12);
        assert_eq!(Reply::Unwritten.used_len(), 0);
        assert_eq!(Reply::Unwritten.status_code(), None);
    }

    #[test]
    fn probe_reply_holds_the_msi_window_then_zeroes_then_the_tail() {
        let property = resv_mem_property(RESV_MEM_T_MSI, 0xfee0_0000, 0xfeef_ffff);
        let reply = Reply::probe(&property, PROBE_SIZE);
        let Reply::Write { offset: 0, bytes } = &reply else {
            panic!("{reply:?}");
        };
        assert_eq!(bytes.len(), PROBE_SIZE as usize + 4);
        assert_eq!(&bytes[0..2], &1u16.to_le_bytes(), "type RESV_MEM");
        assert_eq!(&bytes[2..4], &20u16.to_le_bytes(), "length w/o header");
        assert_eq!(bytes[4], RESV_MEM_T_MSI);
        assert_eq!(&bytes[5..8], &[0, 0, 0]);
        assert_eq!(&bytes[8..16], &0xfee0_0000u64.to_le_bytes());
        assert_eq!(&bytes[16..24], &0xfeef_ffffu64.to_le_bytes());
        assert!(bytes[24..].iter().all(|b| *b == 0), "padding and S_OK tail");
        assert_eq!(reply.status_code(), Some(S_OK));
    }
}
