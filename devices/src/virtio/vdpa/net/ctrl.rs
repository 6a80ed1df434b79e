//! The virtio-net control queue's commands (virtio 1.2, 5.1.6.5), as plain
//! data: parsing what the guest wrote, deciding the answer, and the net
//! state the answers leave ([`NetState`], saved and restored with the VM).
//!
//! Nothing here touches a device: [`NetState::plan`] says what a command
//! needs done ([`Effect`]) or why it is refused ([`Refusal`]); the caller
//! applies the effect to the device and only then [`NetState::commit`]s it,
//! so a command the device refused leaves the state as it was.

use std::collections::BTreeSet;

use super::{VIRTIO_NET_F_CTRL_MAC_ADDR, VIRTIO_NET_F_MQ};

pub const VIRTIO_NET_F_CTRL_GUEST_OFFLOADS: u64 = 1 << 2;
pub const VIRTIO_NET_F_CTRL_RX: u64 = 1 << 18;
pub const VIRTIO_NET_F_CTRL_VLAN: u64 = 1 << 19;
pub const VIRTIO_NET_F_CTRL_RX_EXTRA: u64 = 1 << 20;
pub const VIRTIO_NET_F_GUEST_ANNOUNCE: u64 = 1 << 21;

/// The answers (the `ack` byte).
pub const VIRTIO_NET_OK: u8 = 0;
pub const VIRTIO_NET_ERR: u8 = 1;

const CLASS_RX: u8 = 0;
const CLASS_MAC: u8 = 1;
const CLASS_VLAN: u8 = 2;
const CLASS_ANNOUNCE: u8 = 3;
const CLASS_MQ: u8 = 4;
const CLASS_GUEST_OFFLOADS: u8 = 5;
const CLASS_NOTF_COAL: u8 = 6;

/// The spec's bound on virtqueue pairs (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX).
pub const MAX_QUEUE_PAIRS: u16 = 0x8000;
/// VLAN ids are 12 bits.
const VLAN_IDS: u16 = 4096;
/// Most addresses one MAC table may hold: far above what a driver sends
/// (Linux sends its unicast and multicast lists), and it bounds the state.
pub const MAX_TABLE_ENTRIES: u32 = 256;
/// Most bytes of one command the VMM reads: two full MAC tables and the
/// header fit.
pub const MAX_COMMAND_BYTES: usize = 2 + 2 * (4 + 6 * MAX_TABLE_ENTRIES as usize);

pub type Mac = [u8; 6];

/// Which receive-filter switch a `VIRTIO_NET_CTRL_RX` command turns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxSwitch {
    Promisc,
    AllMulti,
    AllUni,
    NoMulti,
    NoUni,
    NoBcast,
}

/// One command the guest sent, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Rx {
        switch: RxSwitch,
        on: bool,
    },
    MacTable {
        unicast: Vec<Mac>,
        multicast: Vec<Mac>,
    },
    MacAddr(Mac),
    VlanAdd(u16),
    VlanDel(u16),
    AnnounceAck,
    QueuePairs(u16),
    GuestOffloads(u64),
}

/// Why a command could not be parsed: the guest gets VIRTIO_NET_ERR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("{got} bytes; the command needs {needed}")]
    Short { needed: usize, got: usize },
    #[error("{extra} bytes after the command's data")]
    Trailing { extra: usize },
    #[error("unknown class {0}")]
    UnknownClass(u8),
    #[error("unknown command {command} of class {class}")]
    UnknownCommand { class: u8, command: u8 },
    #[error("command {command} of class {class} is not supported by this VMM")]
    Unsupported { class: u8, command: u8 },
    #[error("an on/off switch of {0}")]
    BadSwitch(u8),
    #[error("VLAN id {0} (ids are below 4096)")]
    BadVlan(u16),
    #[error("a MAC table of {0} entries (at most {MAX_TABLE_ENTRIES})")]
    TableTooLarge(u32),
    #[error("more than {MAX_COMMAND_BYTES} bytes")]
    TooLong,
}

/// Reads little-endian fields off the front of a command's data.
struct Fields<'a> {
    rest: &'a [u8],
    /// Bytes consumed so far, header included, for the error message.
    at: usize,
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ParseError> {
        let needed = self.at.saturating_add(n);
        let Some((head, rest)) = self.rest.split_at_checked(n) else {
            return Err(ParseError::Short {
                needed,
                got: self.at.saturating_add(self.rest.len()),
            });
        };
        self.rest = rest;
        self.at = needed;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, ParseError> {
        Ok(self.take(1)?.first().copied().unwrap_or(0))
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ParseError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u16(&mut self) -> Result<u16, ParseError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, ParseError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, ParseError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn table(&mut self) -> Result<Vec<Mac>, ParseError> {
        let entries = self.u32()?;
        if entries > MAX_TABLE_ENTRIES {
            return Err(ParseError::TableTooLarge(entries));
        }
        (0..entries).map(|_| self.array::<6>()).collect()
    }

    fn end(self) -> Result<(), ParseError> {
        match self.rest.len() {
            0 => Ok(()),
            extra => Err(ParseError::Trailing { extra }),
        }
    }
}

/// Parses a command: `bytes` are the chain's device-readable bytes (class,
/// command, data), without the ack byte.
pub fn parse(bytes: &[u8]) -> Result<Command, ParseError> {
    if bytes.len() > MAX_COMMAND_BYTES {
        return Err(ParseError::TooLong);
    }
    let mut fields = Fields { rest: bytes, at: 0 };
    let class = fields.u8()?;
    let command = fields.u8()?;
    let unknown = ParseError::UnknownCommand { class, command };
    let parsed = match class {
        CLASS_RX => {
            let switch = match command {
                0 => RxSwitch::Promisc,
                1 => RxSwitch::AllMulti,
                2 => RxSwitch::AllUni,
                3 => RxSwitch::NoMulti,
                4 => RxSwitch::NoUni,
                5 => RxSwitch::NoBcast,
                _ => return Err(unknown),
            };
            let on = match fields.u8()? {
                0 => false,
                1 => true,
                other => return Err(ParseError::BadSwitch(other)),
            };
            Command::Rx { switch, on }
        }
        CLASS_MAC => match command {
            0 => {
                let unicast = fields.table()?;
                let multicast = fields.table()?;
                Command::MacTable { unicast, multicast }
            }
            1 => Command::MacAddr(fields.array()?),
            _ => return Err(unknown),
        },
        CLASS_VLAN => {
            let id = fields.u16()?;
            if id >= VLAN_IDS {
                return Err(ParseError::BadVlan(id));
            }
            match command {
                0 => Command::VlanAdd(id),
                1 => Command::VlanDel(id),
                _ => return Err(unknown),
            }
        }
        CLASS_ANNOUNCE => match command {
            0 => Command::AnnounceAck,
            _ => return Err(unknown),
        },
        CLASS_MQ => match command {
            0 => Command::QueuePairs(fields.u16()?),
            // RSS_CONFIG and HASH_CONFIG: their features are never offered.
            1 | 2 => return Err(ParseError::Unsupported { class, command }),
            _ => return Err(unknown),
        },
        CLASS_GUEST_OFFLOADS => match command {
            0 => Command::GuestOffloads(fields.u64()?),
            _ => return Err(unknown),
        },
        CLASS_NOTF_COAL => match command {
            0..=3 => return Err(ParseError::Unsupported { class, command }),
            _ => return Err(unknown),
        },
        _ => return Err(ParseError::UnknownClass(class)),
    };
    fields.end()?;
    Ok(parsed)
}

/// Who serves the guest's control queue, and so what can be honoured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlMode {
    /// The device has no control queue: the VMM answers alone, and honours
    /// only what it can apply itself (the queue pairs, by enabling and
    /// disabling the device's data queues).
    VmmOnly,
    /// The device has a control queue in a virtqueue group of its own,
    /// and a second address space: the VMM puts that group in ASID 1,
    /// where only the VMM's own command buffers are mapped, and forwards
    /// each command it accepts through it; the device's answer is the
    /// guest's.
    Shadowed {
        /// The device's control queue (its index on the device).
        device_queue: u16,
        /// Its virtqueue group.
        group: u32,
    },
}

/// The address space a shadowed control queue's group is put in.
pub const SHADOW_ASID: u32 = 1;

impl ControlMode {
    pub fn name(self) -> &'static str {
        match self {
            ControlMode::VmmOnly => "served by the VMM alone (the device has no control queue)",
            ControlMode::Shadowed { .. } => {
                "shadowed: read by the VMM, forwarded through the device's own control queue in address space 1"
            }
        }
    }
}

/// What the guest negotiated and the device can do, for deciding answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlLimits {
    pub negotiated: u64,
    /// The device's data queue pairs (1 without multiqueue).
    pub max_pairs: u16,
    pub mode: ControlMode,
}

/// Why a well-formed command gets VIRTIO_NET_ERR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("it needs {0}, which was not negotiated")]
    NotNegotiated(&'static str),
    #[error("{requested} queue pairs (1 to {max})")]
    QueuePairs { requested: u16, max: u16 },
    #[error("the device cannot apply it (it has no control queue), so the VMM refuses it")]
    DeviceCannot,
    #[error("the device's own control queue answered ERR")]
    DeviceRefused,
}

/// What must be done to the device before a command's answer is OK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Nothing: the state alone changes.
    None,
    /// Enable the data queues of pairs `0..to` and disable the rest of
    /// `0..max`.
    QueuePairs { from: u16, to: u16 },
    /// Send the command through the device's own control queue; its
    /// answer decides.
    Forward,
}

/// The receive filter as the driver set it (virtio's defaults after
/// reset: promiscuous, everything else off).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RxFilter {
    pub promisc: bool,
    pub allmulti: bool,
    pub alluni: bool,
    pub nomulti: bool,
    pub nouni: bool,
    pub nobcast: bool,
}

impl Default for RxFilter {
    fn default() -> RxFilter {
        RxFilter {
            promisc: true,
            allmulti: false,
            alluni: false,
            nomulti: false,
            nouni: false,
            nobcast: false,
        }
    }
}

/// The net device's state that the control queue sets: plain data.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetState {
    /// Data queue pairs in use (1 until the driver sets more).
    pub queue_pairs: u16,
    /// The MAC the driver set, if it set one.
    pub mac: Option<Mac>,
    pub rx: RxFilter,
    pub unicast: Vec<Mac>,
    pub multicast: Vec<Mac>,
    pub vlans: BTreeSet<u16>,
    pub guest_offloads: Option<u64>,
    /// Commands answered, and of them refused (for `counters`).
    pub commands: u64,
    pub refused: u64,
}

impl Default for NetState {
    fn default() -> NetState {
        NetState {
            queue_pairs: 1,
            mac: None,
            rx: RxFilter::default(),
            unicast: Vec::new(),
            multicast: Vec::new(),
            vlans: BTreeSet::new(),
            guest_offloads: None,
            commands: 0,
            refused: 0,
        }
    }
}

/// The feature a command needs, with its name.
fn needs(command: &Command) -> (u64, &'static str) {
    match command {
        Command::Rx {
            switch: RxSwitch::Promisc | RxSwitch::AllMulti,
            ..
        } => (VIRTIO_NET_F_CTRL_RX, "VIRTIO_NET_F_CTRL_RX"),
        Command::Rx { .. } => (VIRTIO_NET_F_CTRL_RX_EXTRA, "VIRTIO_NET_F_CTRL_RX_EXTRA"),
        Command::MacTable { .. } => (VIRTIO_NET_F_CTRL_RX, "VIRTIO_NET_F_CTRL_RX"),
        Command::MacAddr(_) => (VIRTIO_NET_F_CTRL_MAC_ADDR, "VIRTIO_NET_F_CTRL_MAC_ADDR"),
        Command::VlanAdd(_) | Command::VlanDel(_) => {
            (VIRTIO_NET_F_CTRL_VLAN, "VIRTIO_NET_F_CTRL_VLAN")
        }
        Command::AnnounceAck => (VIRTIO_NET_F_GUEST_ANNOUNCE, "VIRTIO_NET_F_GUEST_ANNOUNCE"),
        Command::QueuePairs(_) => (VIRTIO_NET_F_MQ, "VIRTIO_NET_F_MQ"),
        Command::GuestOffloads(_) => (
            VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
            "VIRTIO_NET_F_CTRL_GUEST_OFFLOADS",
        ),
    }
}

impl NetState {
    /// What `command` needs done, or why it is refused; changes nothing.
    pub fn plan(&self, command: &Command, limits: &ControlLimits) -> Result<Effect, Refusal> {
        let (feature, name) = needs(command);
        if limits.negotiated & feature == 0 {
            return Err(Refusal::NotNegotiated(name));
        }
        if let Command::QueuePairs(pairs) = command {
            if *pairs == 0 || *pairs > limits.max_pairs || *pairs > MAX_QUEUE_PAIRS {
                return Err(Refusal::QueuePairs {
                    requested: *pairs,
                    max: limits.max_pairs,
                });
            }
        }
        match (command, limits.mode) {
            // The device's own control queue applies everything it was
            // offered, the pair count included.
            (_, ControlMode::Shadowed { .. }) => Ok(Effect::Forward),
            (Command::QueuePairs(pairs), ControlMode::VmmOnly) => Ok(Effect::QueuePairs {
                from: self.queue_pairs,
                to: *pairs,
            }),
            // The VMM does not filter frames and cannot change the
            // device's MAC: an OK would be a lie.
            (_, ControlMode::VmmOnly) => Err(Refusal::DeviceCannot),
        }
    }

    /// Records `command` as applied (after its effect succeeded).
    pub fn commit(&mut self, command: Command) {
        match command {
            Command::Rx { switch, on } => {
                let flag = match switch {
                    RxSwitch::Promisc => &mut self.rx.promisc,
                    RxSwitch::AllMulti => &mut self.rx.allmulti,
                    RxSwitch::AllUni => &mut self.rx.alluni,
                    RxSwitch::NoMulti => &mut self.rx.nomulti,
                    RxSwitch::NoUni => &mut self.rx.nouni,
                    RxSwitch::NoBcast => &mut self.rx.nobcast,
                };
                *flag = on;
            }
            Command::MacTable { unicast, multicast } => {
                self.unicast = unicast;
                self.multicast = multicast;
            }
            Command::MacAddr(mac) => self.mac = Some(mac),
            Command::VlanAdd(id) => {
                self.vlans.insert(id);
            }
            Command::VlanDel(id) => {
                self.vlans.remove(&id);
            }
            Command::AnnounceAck => {}
            Command::QueuePairs(pairs) => self.queue_pairs = pairs,
            Command::GuestOffloads(offloads) => self.guest_offloads = Some(offloads),
        }
    }

    /// Back to the state after a device reset, keeping the counts.
    pub fn reset(&mut self) {
        *self = NetState {
            commands: self.commands,
            refused: self.refused,
            ..NetState::default()
        };
    }
}

/// Which of the device's data queues pair count `pairs` enables, of
/// `max_pairs`: (queue index, enabled), rx then tx of each pair.
pub fn data_queue_enables(pairs: u16, max_pairs: u16) -> impl Iterator<Item = (u16, bool)> {
    (0..max_pairs).flat_map(move |pair| {
        let on = pair < pairs;
        let rx = pair.saturating_mul(2);
        [(rx, on), (rx.saturating_add(1), on)]
    })
}

/// The control queue's index: after every data queue when multiqueue was
/// negotiated, else after the first pair (virtio 1.2, 5.1.2).
pub fn control_queue_index(negotiated: u64, max_pairs: u16) -> u16 {
    match negotiated & VIRTIO_NET_F_MQ {
        0 => 2,
        _ => max_pairs.saturating_mul(2),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VMM_ONLY: ControlLimits = ControlLimits {
        negotiated: VIRTIO_NET_F_MQ,
        max_pairs: 4,
        mode: ControlMode::VmmOnly,
    };

    fn everything() -> ControlLimits {
        ControlLimits {
            negotiated: VIRTIO_NET_F_MQ
                | VIRTIO_NET_F_CTRL_RX
                | VIRTIO_NET_F_CTRL_RX_EXTRA
                | VIRTIO_NET_F_CTRL_VLAN
                | VIRTIO_NET_F_CTRL_MAC_ADDR
                | VIRTIO_NET_F_GUEST_ANNOUNCE
                | VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
            ..VMM_ONLY
        }
    }

    fn table(macs: &[Mac]) -> Vec<u8> {
        let mut out = (macs.len() as u32).to_le_bytes().to_vec();
        for mac in macs {
            out.extend_from_slice(mac);
        }
        out
    }

    const A: Mac = [0x52, 0x54, 0, 1, 2, 3];
    const B: Mac = [0x01, 0, 0x5e, 0, 0, 1];

    #[test]
    fn every_command_parses() {
        let cases: Vec<(Vec<u8>, Command)> = vec![
            (
                vec![0, 0, 1],
                Command::Rx {
                    switch: RxSwitch::Promisc,
                    on: true,
                },
            ),
            (
                vec![0, 5, 0],
                Command::Rx {
                    switch: RxSwitch::NoBcast,
                    on: false,
                },
            ),
            (
                [vec![1, 0], table(&[A]), table(&[B, B])].concat(),
                Command::MacTable {
                    unicast: vec![A],
                    multicast: vec![B, B],
                },
            ),
            ([vec![1, 1], A.to_vec()].concat(), Command::MacAddr(A)),
            (vec![2, 0, 0xff, 0x0f], Command::VlanAdd(4095)),
            (vec![2, 1, 7, 0], Command::VlanDel(7)),
            (vec![3, 0], Command::AnnounceAck),
            (vec![4, 0, 4, 0], Command::QueuePairs(4)),
            (
                [vec![5, 0], 0x1234u64.to_le_bytes().to_vec()].concat(),
                Command::GuestOffloads(0x1234),
            ),
        ];
        for (bytes, command) in cases {
            assert_eq!(parse(&bytes), Ok(command), "{bytes:?}");
        }
    }

    #[test]
    fn malformed_commands_are_refused_with_why() {
        let cases: Vec<(Vec<u8>, ParseError)> = vec![
            (vec![], ParseError::Short { needed: 1, got: 0 }),
            (vec![4], ParseError::Short { needed: 2, got: 1 }),
            (vec![4, 0, 1], ParseError::Short { needed: 4, got: 3 }),
            (vec![4, 0, 1, 0, 0], ParseError::Trailing { extra: 1 }),
            (vec![1, 1, 1, 2, 3], ParseError::Short { needed: 8, got: 5 }),
            (vec![9, 0], ParseError::UnknownClass(9)),
            (
                vec![0, 6, 1],
                ParseError::UnknownCommand {
                    class: 0,
                    command: 6,
                },
            ),
            (
                vec![4, 1, 0, 0],
                ParseError::Unsupported {
                    class: 4,
                    command: 1,
                },
            ),
            (
                vec![6, 0],
                ParseError::Unsupported {
                    class: 6,
                    command: 0,
                },
            ),
            (vec![0, 0, 2], ParseError::BadSwitch(2)),
            (vec![2, 0, 0, 0x10], ParseError::BadVlan(4096)),
            (
                [vec![1, 0], (MAX_TABLE_ENTRIES + 1).to_le_bytes().to_vec()].concat(),
                ParseError::TableTooLarge(MAX_TABLE_ENTRIES + 1),
            ),
            // A table that claims more entries than it brings.
            (
                [vec![1, 0], 2u32.to_le_bytes().to_vec(), A.to_vec()].concat(),
                ParseError::Short {
                    needed: 18,
                    got: 12,
                },
            ),
            (vec![0; MAX_COMMAND_BYTES + 1], ParseError::TooLong),
        ];
        for (bytes, error) in cases {
            assert_eq!(parse(&bytes), Err(error), "{bytes:?}");
        }
    }

    #[test]
    fn queue_pairs_from_one_to_the_devices_maximum() {
        let mut state = NetState::default();
        for bad in [0, 5, MAX_QUEUE_PAIRS, u16::MAX] {
            assert_eq!(
                state.plan(&Command::QueuePairs(bad), &VMM_ONLY),
                Err(Refusal::QueuePairs {
                    requested: bad,
                    max: 4
                })
            );
        }
        assert_eq!(
            state.plan(&Command::QueuePairs(4), &VMM_ONLY),
            Ok(Effect::QueuePairs { from: 1, to: 4 })
        );
        state.commit(Command::QueuePairs(4));
        assert_eq!(state.queue_pairs, 4);
        assert_eq!(
            state.plan(&Command::QueuePairs(1), &VMM_ONLY),
            Ok(Effect::QueuePairs { from: 4, to: 1 })
        );
        let no_mq = ControlLimits {
            negotiated: 0,
            ..VMM_ONLY
        };
        assert_eq!(
            state.plan(&Command::QueuePairs(1), &no_mq),
            Err(Refusal::NotNegotiated("VIRTIO_NET_F_MQ"))
        );
    }

    #[test]
    fn without_a_device_control_queue_only_queue_pairs_are_honoured() {
        let state = NetState::default();
        for command in [
            Command::MacAddr(A),
            Command::Rx {
                switch: RxSwitch::Promisc,
                on: false,
            },
            Command::MacTable {
                unicast: vec![],
                multicast: vec![B],
            },
            Command::VlanAdd(1),
            Command::GuestOffloads(0),
            Command::AnnounceAck,
        ] {
            // Not negotiated: refused as such.
            assert!(
                matches!(
                    state.plan(&command, &VMM_ONLY),
                    Err(Refusal::NotNegotiated(_))
                ),
                "{command:?}"
            );
            // Negotiated, but the device cannot apply it: never a silent OK.
            assert_eq!(
                state.plan(&command, &everything()),
                Err(Refusal::DeviceCannot),
                "{command:?}"
            );
        }
    }

    #[test]
    fn the_state_after_each_command() {
        let mut state = NetState::default();
        assert!(state.rx.promisc, "promiscuous after reset");
        state.commit(Command::Rx {
            switch: RxSwitch::Promisc,
            on: false,
        });
        state.commit(Command::Rx {
            switch: RxSwitch::AllMulti,
            on: true,
        });
        state.commit(Command::MacAddr(A));
        state.commit(Command::MacTable {
            unicast: vec![A],
            multicast: vec![B],
        });
        state.commit(Command::VlanAdd(10));
        state.commit(Command::VlanAdd(20));
        state.commit(Command::VlanDel(10));
        state.commit(Command::GuestOffloads(3));
        state.commit(Command::QueuePairs(2));
        state.commands = 9;
        let expected = NetState {
            queue_pairs: 2,
            mac: Some(A),
            rx: RxFilter {
                promisc: false,
                allmulti: true,
                ..RxFilter::default()
            },
            unicast: vec![A],
            multicast: vec![B],
            vlans: [20].into_iter().collect(),
            guest_offloads: Some(3),
            commands: 9,
            refused: 0,
        };
        assert_eq!(state, expected);
        state.reset();
        assert_eq!(
            state,
            NetState {
                commands: 9,
                ..NetState::default()
            }
        );
    }

    #[test]
    fn queue_layout() {
        let enables: Vec<_> = data_queue_enables(2, 3).collect();
        assert_eq!(
            enables,
            [
                (0, true),
                (1, true),
                (2, true),
                (3, true),
                (4, false),
                (5, false)
            ]
        );
        assert_eq!(control_queue_index(VIRTIO_NET_F_MQ, 4), 8);
        assert_eq!(control_queue_index(0, 4), 2);
    }
}
