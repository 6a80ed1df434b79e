//! The vdpa generic-netlink family (include/uapi/linux/vdpa.h, drivers/vdpa/vdpa.c):
//! create and delete vdpa devices on a management device, and list the management
//! devices. The numbers below are the 6.12 UAPI header's enums.

use crate::netlink::{self, Attr, GenlSocket, Message, NetlinkError};

pub const VDPA_GENL_NAME: &str = "vdpa";
pub const VDPA_GENL_VERSION: u8 = 1;

pub const VDPA_CMD_MGMTDEV_GET: u8 = 2;
pub const VDPA_CMD_DEV_NEW: u8 = 3;
pub const VDPA_CMD_DEV_DEL: u8 = 4;
pub const VDPA_CMD_DEV_CONFIG_GET: u8 = 6;

pub const VDPA_ATTR_MGMTDEV_BUS_NAME: u16 = 1;
pub const VDPA_ATTR_MGMTDEV_DEV_NAME: u16 = 2;
pub const VDPA_ATTR_MGMTDEV_SUPPORTED_CLASSES: u16 = 3;
pub const VDPA_ATTR_DEV_NAME: u16 = 4;
pub const VDPA_ATTR_DEV_NET_CFG_MACADDR: u16 = 10;
pub const VDPA_ATTR_DEV_MGMTDEV_MAX_VQS: u16 = 15;
pub const VDPA_ATTR_DEV_SUPPORTED_FEATURES: u16 = 16;
pub const VDPA_ATTR_DEV_FEATURES: u16 = 20;

/// What VDPA_CMD_DEV_NEW is asked to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevNew {
    pub mgmtdev: String,
    pub name: String,
    /// VDPA_ATTR_DEV_NET_CFG_MACADDR (net devices; the default is all zeros).
    pub mac: Option<[u8; 6]>,
    /// VDPA_ATTR_DEV_FEATURES: the virtio feature bits the device may offer.
    pub features: Option<u64>,
}

impl DevNew {
    pub fn new(mgmtdev: &str, name: &str) -> DevNew {
        DevNew {
            mgmtdev: mgmtdev.to_string(),
            name: name.to_string(),
            mac: None,
            features: None,
        }
    }

    /// The attributes of the request, in the kernel's attribute order.
    pub fn attrs(&self) -> Vec<Attr> {
        let mut v = vec![
            Attr::string(VDPA_ATTR_MGMTDEV_DEV_NAME, &self.mgmtdev),
            Attr::string(VDPA_ATTR_DEV_NAME, &self.name),
        ];
        if let Some(mac) = self.mac {
            v.push(Attr::bytes(VDPA_ATTR_DEV_NET_CFG_MACADDR, &mac));
        }
        if let Some(f) = self.features {
            v.push(Attr::u64(VDPA_ATTR_DEV_FEATURES, f));
        }
        v
    }
}

/// One management device, as VDPA_CMD_MGMTDEV_GET reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MgmtDev {
    /// The bus ("pci") for devices on a bus; none for vdpasim_* and vduse.
    pub bus: Option<String>,
    pub name: String,
    /// Bit N set: virtio device id N (1 net, 2 block).
    pub classes: u64,
    pub max_vqs: Option<u32>,
    pub supported_features: Option<u64>,
}

impl MgmtDev {
    /// `bus/name` as iproute2's vdpa prints it, or just `name`.
    pub fn handle(&self) -> String {
        match &self.bus {
            Some(b) => format!("{b}/{}", self.name),
            None => self.name.clone(),
        }
    }

    /// The class names (virtio device ids by name where known).
    pub fn class_names(&self) -> Vec<String> {
        (0..64u32)
            .filter(|i| self.classes & (1u64 << i) != 0)
            .map(|i| match i {
                1 => "net".to_string(),
                2 => "block".to_string(),
                n => format!("id{n}"),
            })
            .collect()
    }

    /// One line: `HANDLE supported_classes net max_supported_vqs 3 dev_features 0x...`.
    pub fn line(&self) -> String {
        let mut s = format!("{} supported_classes {}", self.handle(), {
            let c = self.class_names();
            if c.is_empty() {
                "none".to_string()
            } else {
                c.join(",")
            }
        });
        if let Some(v) = self.max_vqs {
            s.push_str(&format!(" max_supported_vqs {v}"));
        }
        if let Some(f) = self.supported_features {
            s.push_str(&format!(" dev_features {f:#x}"));
        }
        s
    }
}

/// Decodes the replies of a VDPA_CMD_MGMTDEV_GET dump (each a VDPA_CMD_MGMTDEV_NEW).
pub fn parse_mgmtdevs(replies: &[Message]) -> Result<Vec<MgmtDev>, NetlinkError> {
    let mut out = Vec::new();
    for m in replies {
        let mut d = MgmtDev::default();
        let mut have_name = false;
        for (ty, data) in m.genl_attrs()? {
            match ty {
                VDPA_ATTR_MGMTDEV_BUS_NAME => d.bus = Some(netlink::attr_str(data)),
                VDPA_ATTR_MGMTDEV_DEV_NAME => {
                    d.name = netlink::attr_str(data);
                    have_name = true;
                }
                VDPA_ATTR_MGMTDEV_SUPPORTED_CLASSES => {
                    d.classes = netlink::attr_u64(data).ok_or(NetlinkError::Malformed(
                        "VDPA_ATTR_MGMTDEV_SUPPORTED_CLASSES is not a u64",
                    ))?
                }
                VDPA_ATTR_DEV_MGMTDEV_MAX_VQS => d.max_vqs = netlink::attr_u32(data),
                VDPA_ATTR_DEV_SUPPORTED_FEATURES => d.supported_features = netlink::attr_u64(data),
                // VDPA_ATTR_PAD (0) aligns u64 values; others are newer than this tool.
                _ => {}
            }
        }
        if !have_name {
            return Err(NetlinkError::Malformed(
                "management device without VDPA_ATTR_MGMTDEV_DEV_NAME",
            ));
        }
        out.push(d);
    }
    Ok(out)
}

/// The VDPA_ATTR_DEV_NET_CFG_MACADDR of a VDPA_CMD_DEV_CONFIG_GET reply.
pub fn parse_config_mac(replies: &[Message]) -> Result<[u8; 6], NetlinkError> {
    for m in replies {
        for (ty, data) in m.genl_attrs()? {
            if ty == VDPA_ATTR_DEV_NET_CFG_MACADDR {
                return data.try_into().map_err(|_| {
                    NetlinkError::Malformed("VDPA_ATTR_DEV_NET_CFG_MACADDR is not six bytes")
                });
            }
        }
    }
    Err(NetlinkError::Malformed(
        "no VDPA_ATTR_DEV_NET_CFG_MACADDR in the device's config (not a net device, or no MAC feature)",
    ))
}

/// A socket on the vdpa family.
pub struct Vdpa {
    sock: GenlSocket,
    family: u16,
}

impl Vdpa {
    pub fn open() -> Result<Vdpa, NetlinkError> {
        let mut sock = GenlSocket::open()?;
        let family = sock.resolve_family(VDPA_GENL_NAME)?;
        Ok(Vdpa { sock, family })
    }

    /// `vdpa dev add name NAME mgmtdev MGMTDEV [mac MAC] [device_features F]`.
    pub fn dev_new(&mut self, d: &DevNew) -> Result<(), NetlinkError> {
        self.sock
            .request(
                &format!("VDPA_CMD_DEV_NEW {} (mgmtdev {})", d.name, d.mgmtdev),
                self.family,
                VDPA_CMD_DEV_NEW,
                VDPA_GENL_VERSION,
                &d.attrs(),
                false,
            )
            .map(|_| ())
    }

    /// `vdpa dev del NAME`.
    pub fn dev_del(&mut self, name: &str) -> Result<(), NetlinkError> {
        self.sock
            .request(
                &format!("VDPA_CMD_DEV_DEL {name}"),
                self.family,
                VDPA_CMD_DEV_DEL,
                VDPA_GENL_VERSION,
                &[Attr::string(VDPA_ATTR_DEV_NAME, name)],
                false,
            )
            .map(|_| ())
    }

    /// `vdpa dev config show NAME`, its MAC address: what the device itself
    /// holds, whoever drives it.
    pub fn dev_config_mac(&mut self, name: &str) -> Result<[u8; 6], NetlinkError> {
        let replies = self.sock.request(
            &format!("VDPA_CMD_DEV_CONFIG_GET {name}"),
            self.family,
            VDPA_CMD_DEV_CONFIG_GET,
            VDPA_GENL_VERSION,
            &[Attr::string(VDPA_ATTR_DEV_NAME, name)],
            false,
        )?;
        parse_config_mac(&replies)
    }

    /// `vdpa mgmtdev show`.
    pub fn mgmtdevs(&mut self) -> Result<Vec<MgmtDev>, NetlinkError> {
        let replies = self.sock.request(
            "VDPA_CMD_MGMTDEV_GET (dump)",
            self.family,
            VDPA_CMD_MGMTDEV_GET,
            VDPA_GENL_VERSION,
            &[],
            true,
        )?;
        parse_mgmtdevs(&replies)
    }
}

/// `vdpa dev add name NAME mgmtdev MGMTDEV` on a socket of its own.
pub fn vdpa_dev_new(mgmtdev: &str, name: &str) -> Result<(), NetlinkError> {
    Vdpa::open()?.dev_new(&DevNew::new(mgmtdev, name))
}

/// `vdpa dev del NAME` on a socket of its own.
pub fn vdpa_dev_del(name: &str) -> Result<(), NetlinkError> {
    Vdpa::open()?.dev_del(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::tests::raw_msg;
    use crate::netlink::{encode_genl, parse_messages, NLM_F_ACK, NLM_F_MULTI, NLM_F_REQUEST};

    #[test]
    fn dev_new_attribute_layout() {
        let mut d = DevNew::new("vdpasim_net", "sim0");
        d.mac = Some([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
        d.features = Some(0x3_0001_0020);
        let b = encode_genl(
            0x1b,
            NLM_F_REQUEST | NLM_F_ACK,
            2,
            VDPA_CMD_DEV_NEW,
            1,
            &d.attrs(),
        )
        .unwrap();
        // 20 header bytes; "vdpasim_net\0" 4+12; "sim0\0" 4+5 -> 12; MAC 4+6 -> 12; u64 4+8.
        assert_eq!(b.len(), 20 + 16 + 12 + 12 + 12);
        assert_eq!(&b[16..18], &[VDPA_CMD_DEV_NEW, 1]);
        assert_eq!(&b[20..24], &[16, 0, 2, 0]);
        assert_eq!(&b[24..36], b"vdpasim_net\0");
        assert_eq!(&b[36..40], &[9, 0, 4, 0]);
        assert_eq!(&b[48..52], &[10, 0, 10, 0]);
        assert_eq!(&b[52..58], &[0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
        assert_eq!(&b[58..60], &[0, 0]);
        assert_eq!(&b[60..64], &[12, 0, 20, 0]);
        assert_eq!(
            u64::from_ne_bytes(b[64..72].try_into().unwrap()),
            0x3_0001_0020
        );
        // Without the optional attributes only the two names are sent.
        assert_eq!(DevNew::new("vduse", "blk0").attrs().len(), 2);
    }

    fn mgmtdev_reply(seq: u32, bus: Option<&str>, name: &str, classes: u64) -> Vec<u8> {
        let mut p = vec![1u8, 1, 0, 0];
        let mut put = |ty: u16, data: &[u8]| {
            p.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
            p.extend_from_slice(&ty.to_ne_bytes());
            p.extend_from_slice(data);
            while p.len() % 4 != 0 {
                p.push(0);
            }
        };
        if let Some(b) = bus {
            put(VDPA_ATTR_MGMTDEV_BUS_NAME, format!("{b}\0").as_bytes());
        }
        put(VDPA_ATTR_MGMTDEV_DEV_NAME, format!("{name}\0").as_bytes());
        // nla_put_u64_64bit pads with a VDPA_ATTR_PAD (0) attribute where needed.
        put(0, &[]);
        put(VDPA_ATTR_MGMTDEV_SUPPORTED_CLASSES, &classes.to_ne_bytes());
        put(VDPA_ATTR_DEV_MGMTDEV_MAX_VQS, &3u32.to_ne_bytes());
        put(
            VDPA_ATTR_DEV_SUPPORTED_FEATURES,
            &0x1_0000_0020u64.to_ne_bytes(),
        );
        raw_msg(0x1b, NLM_F_MULTI, seq, &p)
    }

    #[test]
    fn mgmtdev_dump_is_parsed() {
        let mut dgram = mgmtdev_reply(3, None, "vdpasim_net", 1 << 1);
        dgram.extend(mgmtdev_reply(
            3,
            Some("pci"),
            "0000:00:04.0",
            (1 << 1) | (1 << 2),
        ));
        let msgs = parse_messages(&dgram).unwrap();
        let devs = parse_mgmtdevs(&msgs).unwrap();
        assert_eq!(devs.len(), 2);
        assert_eq!(devs[0].handle(), "vdpasim_net");
        assert_eq!(
            devs[0].line(),
            "vdpasim_net supported_classes net max_supported_vqs 3 dev_features 0x100000020"
        );
        assert_eq!(devs[1].handle(), "pci/0000:00:04.0");
        assert_eq!(devs[1].class_names(), vec!["net", "block"]);
    }

    #[test]
    fn the_mac_of_a_config_reply_is_read_and_a_short_or_missing_one_refused() {
        // genl header; VDPA_ATTR_DEV_NAME "sim0"; VDPA_ATTR_DEV_NET_CFG_MACADDR.
        let mut p = vec![6u8, 1, 0, 0, 9, 0, 4, 0, b's', b'i', b'm', b'0', 0, 0, 0, 0];
        p.extend_from_slice(&[10, 0, 10, 0, 2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0, 0]);
        let m = parse_messages(&raw_msg(0x1b, 0, 4, &p)).unwrap();
        assert_eq!(
            parse_config_mac(&m).unwrap(),
            [2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]
        );
        let short = vec![6u8, 1, 0, 0, 8, 0, 10, 0, 2, 0xaa, 0xbb, 0xcc];
        let m = parse_messages(&raw_msg(0x1b, 0, 4, &short)).unwrap();
        assert!(parse_config_mac(&m).is_err());
        let none = vec![6u8, 1, 0, 0, 9, 0, 4, 0, b's', b'i', b'm', b'0', 0, 0, 0, 0];
        let m = parse_messages(&raw_msg(0x1b, 0, 4, &none)).unwrap();
        assert!(parse_config_mac(&m).is_err());
    }

    #[test]
    fn mgmtdev_reply_without_name_or_with_bad_classes_is_refused() {
        let p = vec![1u8, 1, 0, 0, 12, 0, 3, 0, 1, 0, 0, 0, 0, 0, 0, 0];
        let m = parse_messages(&raw_msg(0x1b, NLM_F_MULTI, 3, &p)).unwrap();
        assert!(parse_mgmtdevs(&m).is_err());
        let p = vec![
            1u8, 1, 0, 0, 8, 0, 2, 0, b'v', b'd', 0, 0, 8, 0, 3, 0, 1, 0, 0, 0,
        ];
        let m = parse_messages(&raw_msg(0x1b, NLM_F_MULTI, 3, &p)).unwrap();
        assert!(parse_mgmtdevs(&m).is_err());
    }
}
