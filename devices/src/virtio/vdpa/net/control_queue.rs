//! The guest's control queue, served in the VMM on a queue worker (see
//! `queue_worker`): each chain is read only where the guest has RAM now,
//! parsed and decided by [`super::ctrl`], its effect applied to the device
//! (queue pairs: VHOST_VDPA_SET_VRING_ENABLE on the data queues), and the
//! answer written into the chain's ack byte. The net state the answers
//! leave is shared with `info` behind a lock held only between requests.

use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use vhost::vhost_kern::vhost_binding;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::ctrl::{
    data_queue_enables, parse, Command, ControlLimits, Effect, NetState, Refusal,
    MAX_COMMAND_BYTES, VIRTIO_NET_ERR, VIRTIO_NET_OK,
};
use super::shadow_cvq::{ShadowCvq, ShadowError};
use crate::dma::{GuestTranslate, Perm};
use crate::virtio::queue_worker::{Chain, Drain, QueueHandler};

/// What the server applies commands to: the device's data queues, and
/// (shadowed mode) the device's own control queue.
pub trait DataQueues: Send + 'static {
    fn set_enabled(&mut self, index: u16, on: bool) -> io::Result<()>;
    /// Sends a command through the device's own control queue; its ack.
    fn forward(&mut self, command: &[u8]) -> Result<u8, ShadowError>;
    /// The device was started again: its control queue starts over.
    fn restart(&mut self);
}

/// VHOST_VDPA_SET_VRING_ENABLE on the device's control descriptor, by
/// number: the worker's seccomp filter binds the ioctl to it. It stays
/// open for the VM's life. `shadow`: the device's own control queue, in
/// the shadowed mode.
pub struct VringEnable {
    pub fd: RawFd,
    pub shadow: Option<ShadowCvq>,
}

impl DataQueues for VringEnable {
    fn forward(&mut self, command: &[u8]) -> Result<u8, ShadowError> {
        match &mut self.shadow {
            Some(shadow) => shadow.forward(command),
            None => Err(ShadowError::NotShadowed),
        }
    }

    fn restart(&mut self) {
        if let Some(shadow) = &mut self.shadow {
            shadow.restart();
        }
    }

    fn set_enabled(&mut self, index: u16, on: bool) -> io::Result<()> {
        let state = vhost_binding::vhost_vring_state {
            index: u32::from(index),
            num: u32::from(on),
        };
        // SAFETY: VHOST_VDPA_SET_VRING_ENABLE reads exactly one
        // vhost_vring_state, which `state` is and outlives the call; the
        // kernel keeps no pointer to it. On a descriptor that is not a
        // vhost-vdpa device the ioctl fails with an errno.
        let ret = unsafe {
            libc::ioctl(
                self.fd,
                vhost_binding::VHOST_VDPA_SET_VRING_ENABLE() as _,
                &state as *const vhost_binding::vhost_vring_state,
            )
        };
        match ret {
            0.. => Ok(()),
            _ => Err(io::Error::last_os_error()),
        }
    }
}

/// The net state, shared between the worker and whoever reports it.
pub type SharedNetState = Arc<Mutex<NetState>>;

pub fn lock_state(state: &SharedNetState) -> MutexGuard<'_, NetState> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// The control queue's handler.
pub struct ControlServer<Q> {
    state: SharedNetState,
    /// Set at each activation; `None` before the first (nothing is served).
    limits: Option<ControlLimits>,
    queues: Q,
    translate: Arc<dyn GuestTranslate>,
    /// The first refusal is logged; the rest are only counted.
    logged: bool,
}

impl<Q: DataQueues> ControlServer<Q> {
    pub fn new(state: SharedNetState, queues: Q, translate: Arc<dyn GuestTranslate>) -> Self {
        ControlServer {
            state,
            limits: None,
            queues,
            translate,
            logged: false,
        }
    }

    /// What the driver negotiated at DRIVER_OK: the state starts over
    /// (one pair, virtio's defaults) and only the first pair is enabled,
    /// which the caller has arranged on the device.
    pub fn activate(&mut self, limits: ControlLimits) {
        lock_state(&self.state).reset();
        self.queues.restart();
        self.limits = Some(limits);
    }

    /// As [`ControlServer::activate`], for a device a snapshot saved as
    /// started: the state is the saved one (its queue pairs are what the
    /// caller enabled on the device).
    pub fn activate_restored(&mut self, limits: ControlLimits, state: NetState) {
        *lock_state(&self.state) = state;
        self.queues.restart();
        self.limits = Some(limits);
    }

    /// Applies `command`'s effect to the device, then the state: the answer.
    fn answer(&mut self, bytes: Option<&[u8]>) -> u8 {
        let outcome = self.decide(bytes);
        let mut state = lock_state(&self.state);
        state.commands = state.commands.saturating_add(1);
        match outcome {
            Ok(()) => VIRTIO_NET_OK,
            Err(why) => {
                state.refused = state.refused.saturating_add(1);
                if !self.logged {
                    self.logged = true;
                    eprintln!("microvm: control queue: a command was refused ({why}); further refusals are only counted");
                }
                VIRTIO_NET_ERR
            }
        }
    }

    fn decide(&mut self, bytes: Option<&[u8]>) -> Result<(), String> {
        let bytes = bytes.ok_or("its buffers are not guest RAM")?;
        let limits = self.limits.ok_or("the device is not started")?;
        let command: Command = parse(bytes).map_err(|e| e.to_string())?;
        let effect = lock_state(&self.state)
            .plan(&command, &limits)
            .map_err(|e| e.to_string())?;
        if effect == Effect::Forward {
            let ack = self
                .queues
                .forward(bytes)
                .map_err(|e| format!("forwarding it to the device failed: {e}"))?;
            if ack != VIRTIO_NET_OK {
                return Err(Refusal::DeviceRefused.to_string());
            }
        }
        self.apply(effect, limits.max_pairs)
            .map_err(|e| format!("the device refused it: {e}"))?;
        lock_state(&self.state).commit(command);
        Ok(())
    }

    /// Enables the data queues of the new pair count and disables the
    /// rest; on a refusal, puts back what was changed.
    fn apply(&mut self, effect: Effect, max_pairs: u16) -> io::Result<()> {
        let Effect::QueuePairs { from, to } = effect else {
            return Ok(());
        };
        let was: Vec<(u16, bool)> = data_queue_enables(from, max_pairs).collect();
        let mut done: Vec<(u16, bool)> = Vec::new();
        for ((index, on), (_, before)) in data_queue_enables(to, max_pairs).zip(was) {
            if on == before {
                continue;
            }
            if let Err(e) = self.queues.set_enabled(index, on) {
                for (index, on) in done.into_iter().rev() {
                    let _ = self.queues.set_enabled(index, !on);
                }
                return Err(e);
            }
            done.push((index, on));
        }
        Ok(())
    }
}

/// Whether `[addr, addr + len)` is guest RAM now.
fn is_ram(translate: &dyn GuestTranslate, addr: u64, len: u64) -> bool {
    len == 0 || translate.translate(addr, addr, len, Perm::ReadOnly).is_ok()
}

/// A chain's command bytes (`None` when they are not all guest RAM; at
/// most one byte more than a command may have, so a longer one is seen as
/// too long) and where its ack goes (the first writable byte, `None` when
/// there is none or it is not RAM).
fn read_command(
    chain: &Chain,
    memory: &GuestMemoryMmap,
    translate: &dyn GuestTranslate,
) -> (Option<Vec<u8>>, Option<GuestAddress>) {
    let Ok(segments) = chain.segments() else {
        return (None, None);
    };
    let mut bytes = Vec::new();
    let mut readable = true;
    let mut ack = None;
    let mut seen_writable = false;
    for segment in segments {
        if segment.writable {
            if !seen_writable && segment.len > 0 {
                ack = is_ram(translate, segment.addr.0, 1).then_some(segment.addr);
            }
            seen_writable = true;
            continue;
        }
        // The command's bytes come before the ack (virtio 1.2, 2.7.4.2).
        if seen_writable {
            readable = false;
        }
        let room = (MAX_COMMAND_BYTES + 1).saturating_sub(bytes.len());
        let take = room.min(usize::try_from(segment.len).unwrap_or(usize::MAX));
        if take == 0 || !readable {
            continue;
        }
        let mut part = vec![0u8; take];
        readable = is_ram(translate, segment.addr.0, take as u64)
            && memory.read_slice(&mut part, segment.addr).is_ok();
        bytes.extend_from_slice(&part);
    }
    (readable.then_some(bytes), ack)
}

impl<Q: DataQueues> QueueHandler for ControlServer<Q> {
    fn serve(&mut self, drain: &mut Drain<'_>) {
        while let Some(chain) = drain.next_chain() {
            let memory = drain.memory();
            let (bytes, ack) = read_command(&chain, memory, self.translate.as_ref());
            let Some(ack) = ack else {
                // No room for an answer: returned unanswered, not served.
                drain.add_used(chain.head_index(), 0);
                continue;
            };
            let status = self.answer(bytes.as_deref());
            let written = match memory.write_obj(status, ack) {
                Ok(()) => 1,
                Err(_) => 0,
            };
            drain.add_used(chain.head_index(), written);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::ctrl::ControlMode;
    use super::super::VIRTIO_NET_F_MQ;
    use super::*;
    use crate::dma::TableTranslate;
    use crate::virtio::test_ring::TestRing;

    /// Records each enable; refuses the `fail_at`-th call. Forwarded
    /// commands are recorded and answered with `ack`.
    #[derive(Default)]
    struct Recording {
        calls: Arc<Mutex<Vec<(u16, bool)>>>,
        fail_at: Option<usize>,
        forwarded: Arc<Mutex<Vec<Vec<u8>>>>,
        ack: u8,
    }

    impl DataQueues for Recording {
        fn set_enabled(&mut self, index: u16, on: bool) -> io::Result<()> {
            let mut calls = self.calls.lock().unwrap();
            if self.fail_at == Some(calls.len()) {
                calls.push((u16::MAX, false));
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            calls.push((index, on));
            Ok(())
        }

        fn forward(&mut self, command: &[u8]) -> Result<u8, ShadowError> {
            self.forwarded.lock().unwrap().push(command.to_vec());
            Ok(self.ack)
        }

        fn restart(&mut self) {}
    }

    const RAM: &[(u64, u64, u64)] = &[(0, 1 << 20, 0)];
    const RING: u64 = 0x1_0000;
    const CMD: u64 = 0x2_0000;
    const ACK: u64 = 0x3_0000;

    struct Bench {
        memory: GuestMemoryMmap,
        ring: TestRing,
        server: ControlServer<Recording>,
        calls: Arc<Mutex<Vec<(u16, bool)>>>,
        state: SharedNetState,
    }

    fn bench(fail_at: Option<usize>) -> Bench {
        let queues = Recording {
            fail_at,
            ..Recording::default()
        };
        bench_with(queues, VIRTIO_NET_F_MQ, ControlMode::VmmOnly)
    }

    fn bench_with(queues: Recording, negotiated: u64, mode: ControlMode) -> Bench {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let calls = queues.calls.clone();
        let state = SharedNetState::default();
        let mut server = ControlServer::new(state.clone(), queues, Arc::new(TableTranslate(RAM)));
        server.activate(ControlLimits {
            negotiated,
            max_pairs: 4,
            mode,
        });
        Bench {
            memory,
            ring: TestRing::new(RING, 16),
            server,
            calls,
            state,
        }
    }

    #[test]
    fn shadowed_commands_go_to_the_devices_control_queue_and_its_answer_decides() {
        use super::super::ctrl::VIRTIO_NET_F_CTRL_RX;
        use super::super::VIRTIO_NET_F_CTRL_MAC_ADDR;
        let shadowed = ControlMode::Shadowed {
            device_queue: 2,
            group: 1,
        };
        let negotiated = VIRTIO_NET_F_CTRL_MAC_ADDR | VIRTIO_NET_F_CTRL_RX;
        let forwarded = Arc::new(Mutex::new(Vec::new()));
        let ok = Recording {
            forwarded: forwarded.clone(),
            ack: VIRTIO_NET_OK,
            ..Recording::default()
        };
        let mut b = bench_with(ok, negotiated, shadowed);
        let mac = [1u8, 1, 0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee];
        assert_eq!(b.send(&mac), (VIRTIO_NET_OK, 1));
        assert_eq!(
            lock_state(&b.state).mac,
            Some([0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee])
        );
        // Malformed or not negotiated: refused by the VMM, never forwarded.
        assert_eq!(b.send(&[1, 1, 0x02]), (VIRTIO_NET_ERR, 1));
        assert_eq!(b.send(&[4, 0, 2, 0]), (VIRTIO_NET_ERR, 1));
        assert_eq!(b.send(&[0, 0, 1]), (VIRTIO_NET_OK, 1));
        assert_eq!(*forwarded.lock().unwrap(), [mac.to_vec(), vec![0, 0, 1]]);
        assert!(b.calls.lock().unwrap().is_empty());

        // The device says ERR: so does the guest's answer, and the state
        // keeps what it had.
        let refusing = Recording {
            ack: VIRTIO_NET_ERR,
            ..Recording::default()
        };
        let mut b = bench_with(refusing, negotiated, shadowed);
        assert_eq!(b.send(&mac), (VIRTIO_NET_ERR, 1));
        assert_eq!(lock_state(&b.state).mac, None);
        assert_eq!(lock_state(&b.state).refused, 1);
    }

    impl Bench {
        /// Sends `command` as a header+data buffer and a 1-byte ack; the
        /// answer and the used length.
        fn send(&mut self, command: &[u8]) -> (u8, u32) {
            self.memory.write_slice(command, GuestAddress(CMD)).unwrap();
            self.memory.write_obj(0xaau8, GuestAddress(ACK)).unwrap();
            let len = command.len() as u32;
            let head = self
                .ring
                .add_chain(&self.memory, &[(CMD, len, false), (ACK, 1, true)]);
            let (ack, used) = self.drain(head);
            (ack, used)
        }

        fn drain(&mut self, head: u16) -> (u8, u32) {
            let mut queue = self.ring.queue();
            // The queue starts where the previous drains left it.
            let used_before = self.ring.used_idx(&self.memory);
            queue.set_next_avail(used_before);
            queue.set_next_used(used_before);
            let mut drain = Drain::new(&mut queue, &self.memory);
            self.server.serve(&mut drain);
            let (id, used) = self.ring.used_entry(&self.memory, used_before);
            assert_eq!(id, u32::from(head));
            (self.memory.read_obj(GuestAddress(ACK)).unwrap(), used)
        }
    }

    use virtio_queue::QueueT;

    #[test]
    fn queue_pairs_enable_and_disable_the_data_queues() {
        let mut b = bench(None);
        assert_eq!(b.send(&[4, 0, 3, 0]), (VIRTIO_NET_OK, 1));
        assert_eq!(
            *b.calls.lock().unwrap(),
            [(2, true), (3, true), (4, true), (5, true)]
        );
        assert_eq!(lock_state(&b.state).queue_pairs, 3);
        b.calls.lock().unwrap().clear();
        assert_eq!(b.send(&[4, 0, 1, 0]), (VIRTIO_NET_OK, 1));
        assert_eq!(
            *b.calls.lock().unwrap(),
            [(2, false), (3, false), (4, false), (5, false)]
        );
        // Pairs 0 and above the maximum are refused; nothing changes.
        b.calls.lock().unwrap().clear();
        assert_eq!(b.send(&[4, 0, 0, 0]), (VIRTIO_NET_ERR, 1));
        assert_eq!(b.send(&[4, 0, 5, 0]), (VIRTIO_NET_ERR, 1));
        assert!(b.calls.lock().unwrap().is_empty());
        let state = lock_state(&b.state).clone();
        assert_eq!(
            (state.queue_pairs, state.commands, state.refused),
            (1, 4, 2)
        );
    }

    #[test]
    fn a_refused_enable_is_undone_and_answered_err() {
        // The third call (queue 4 on) fails: queues 2 and 3 go back off.
        let mut b = bench(Some(2));
        assert_eq!(b.send(&[4, 0, 3, 0]), (VIRTIO_NET_ERR, 1));
        assert_eq!(
            *b.calls.lock().unwrap(),
            [
                (2, true),
                (3, true),
                (u16::MAX, false),
                (3, false),
                (2, false)
            ]
        );
        assert_eq!(lock_state(&b.state).queue_pairs, 1);
    }

    #[test]
    fn malformed_and_unhonoured_commands_get_err_and_the_queue_goes_on() {
        let mut b = bench(None);
        for bad in [
            &[][..],
            &[4],
            &[4, 0, 1],
            &[9, 9],
            &[1, 1, 0x52, 0x54, 0, 1, 2, 3], // a MAC: the device cannot take it
            &[0, 0, 1],                      // promisc: not negotiated
        ] {
            assert_eq!(b.send(bad), (VIRTIO_NET_ERR, 1), "{bad:?}");
        }
        assert_eq!(b.send(&[4, 0, 2, 0]), (VIRTIO_NET_OK, 1));
        assert!(lock_state(&b.state).mac.is_none());
    }

    #[test]
    fn a_command_split_across_buffers_is_read_whole() {
        let mut b = bench(None);
        b.memory.write_slice(&[4, 0], GuestAddress(CMD)).unwrap();
        b.memory
            .write_slice(&[2, 0], GuestAddress(CMD + 0x100))
            .unwrap();
        let head = b.ring.add_chain(
            &b.memory,
            &[(CMD, 2, false), (CMD + 0x100, 2, false), (ACK, 1, true)],
        );
        assert_eq!(b.drain(head), (VIRTIO_NET_OK, 1));
    }

    #[test]
    fn buffers_outside_ram_or_without_an_ack_are_not_served() {
        let mut b = bench(None);
        // The command outside guest RAM: ERR, nothing applied.
        let head = b
            .ring
            .add_chain(&b.memory, &[(2 << 20, 4, false), (ACK, 1, true)]);
        assert_eq!(b.drain(head), (VIRTIO_NET_ERR, 1));
        // No writable byte: returned with nothing written.
        b.memory
            .write_slice(&[4, 0, 2, 0], GuestAddress(CMD))
            .unwrap();
        b.memory.write_obj(0xaau8, GuestAddress(ACK)).unwrap();
        let head = b.ring.add_chain(&b.memory, &[(CMD, 4, false)]);
        assert_eq!(b.drain(head), (0xaa, 0));
        // The ack outside RAM: the same.
        let head = b
            .ring
            .add_chain(&b.memory, &[(CMD, 4, false), (2 << 20, 1, true)]);
        assert_eq!(b.drain(head).1, 0);
        assert!(b.calls.lock().unwrap().is_empty());
        assert_eq!(lock_state(&b.state).queue_pairs, 1);
    }
}
