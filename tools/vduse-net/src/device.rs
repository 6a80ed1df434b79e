//! The device proper: answers the kernel's VDUSE requests (GET_VQ_STATE, SET_STATUS,
//! UPDATE_IOTLB), keeps the IOTLB view current, starts and stops the virtqueues with
//! the driver's status, and moves frames between the queues and the back end.
//!
//! Fault injection (`--fail-iotlb N`): the Nth VDUSE_UPDATE_IOTLB request is answered
//! with VDUSE_REQ_RESULT_FAILED and the device keeps its previous IOTLB view. What the
//! kernel does with that (Linux 6.12, read in drivers/vdpa/vdpa_user/vduse_dev.c,
//! iova_domain.c and drivers/vhost/vdpa.c):
//! - `vduse_dev_msg_sync` turns any result other than VDUSE_REQ_RESULT_OK into -EIO.
//! - `vduse_vdpa_set_map` has already replaced its domain with vhost-vdpa's new IOTLB;
//!   on the error it calls `vduse_domain_clear_map`, which deletes every range of that
//!   IOTLB from the domain: VDUSE's own table is then empty (not the previous one)
//!   until the next set_map succeeds, and VDUSE_IOTLB_GET_FD finds nothing meanwhile.
//! - vhost-vdpa's map path (`vhost_vdpa_map`, an UPDATE outside a batch) deletes the
//!   new range from its IOTLB and fails the VMM's write with that error (EIO), so the
//!   VMM can undo its transaction; the next message's set_map rebuilds VDUSE's domain
//!   from vhost-vdpa's IOTLB, which is the previous state again.
//! - The unmap path (`vhost_vdpa_unmap`) and BATCH_END ignore set_map's result: a
//!   refusal of an INVALIDATE or of a whole batch is lost, and the VMM sees success.
//!   A refusal reaches the VMM only for an unbatched UPDATE (the VMM's
//!   `--net vdpa=PATH,iotlb-batch=off`).

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::iotlb::Iotlb;
use crate::log;
use crate::net::{NetQueue, Stats, NUM_QUEUES, RX_QUEUE, TX_QUEUE, VIRTIO_CONFIG_S_DRIVER_OK};
use crate::tap::Tap;
use crate::vduse::{encode_response, Device, RequestKind, VduseError};

/// Frames waiting for RX buffers (loopback); beyond this, new frames are dropped.
const PENDING_RX_MAX: usize = 256;
/// Most changed IOTLB entries listed for one update.
const LOG_ENTRIES_MAX: usize = 64;

pub enum Backend {
    Tap(Tap),
    Loopback,
}

struct RunningQueue {
    q: NetQueue,
    kick: EventFd,
}

/// A queue the driver had not enabled at DRIVER_OK. Newer VMMs (QEMU 10) enable the
/// vrings after DRIVER_OK, and VDUSE does not tell the device when a vring becomes
/// ready (it only flips the flag VDUSE_VQ_GET_INFO reports), so the queue gets its kick
/// eventfd now and is re-read when a kick arrives: VDUSE forwards kicks only to ready
/// queues, so the first kick means the driver has enabled it.
struct WaitingQueue {
    kick: EventFd,
}

pub struct Server {
    dev: Device,
    iotlb: Iotlb,
    dump: Option<PathBuf>,
    iotlb_updates: u64,
    /// The VDUSE_UPDATE_IOTLB request to refuse (1-based), if any.
    fail_iotlb: Option<u64>,
    status: u8,
    queues: [Option<RunningQueue>; NUM_QUEUES as usize],
    waiting: [Option<WaitingQueue>; NUM_QUEUES as usize],
    saved_avail: [u16; NUM_QUEUES as usize],
    backend: Backend,
    pending_rx: VecDeque<Vec<u8>>,
    stats: Stats,
    last_error: Option<String>,
    /// The most entries, and bytes, the IOTLB held after any update.
    iotlb_entries_max: usize,
    iotlb_bytes_max: u64,
}

fn queue_name(i: u16) -> &'static str {
    if i == RX_QUEUE {
        "rx"
    } else {
        "tx"
    }
}

impl Server {
    pub fn new(
        dev: Device,
        backend: Backend,
        dump: Option<PathBuf>,
        fail_iotlb: Option<u64>,
    ) -> Server {
        Server {
            dev,
            iotlb: Iotlb::new(),
            dump,
            iotlb_updates: 0,
            fail_iotlb,
            status: 0,
            queues: [None, None],
            waiting: [None, None],
            saved_avail: [0; NUM_QUEUES as usize],
            backend,
            pending_rx: VecDeque::new(),
            stats: Stats::default(),
            last_error: None,
            iotlb_entries_max: 0,
            iotlb_bytes_max: 0,
        }
    }

    /// Writes the (empty) dump so readers find the file from the start.
    pub fn write_initial_dump(&self) {
        self.write_dump();
    }

    pub fn device_fd(&self) -> RawFd {
        self.dev.as_raw_fd()
    }

    /// The kick eventfds of the running and the waiting queues, with their queue index.
    pub fn kick_fds(&self) -> Vec<(u16, RawFd)> {
        let running = self
            .queues
            .iter()
            .enumerate()
            .filter_map(|(i, q)| q.as_ref().map(|q| (i as u16, q.kick.as_raw_fd())));
        let waiting = self
            .waiting
            .iter()
            .enumerate()
            .filter_map(|(i, w)| w.as_ref().map(|w| (i as u16, w.kick.as_raw_fd())));
        running.chain(waiting).collect()
    }

    /// The tap fd when the server wants to read from it: always while the queues are
    /// stopped (frames are then dropped), otherwise only while no frame waits for an RX
    /// buffer (the tap's own queue holds the rest).
    pub fn tap_fd(&self) -> Option<RawFd> {
        match &self.backend {
            Backend::Tap(t) if self.pending_rx.is_empty() || !self.running() => Some(t.as_raw_fd()),
            _ => None,
        }
    }

    pub fn stats_line(&self) -> String {
        let bytes = self.iotlb.bytes();
        format!(
            "stats iotlb_updates={} iotlb_entries={} iotlb_bytes={bytes:#x} \
             iotlb_entries_max={} iotlb_bytes_max={:#x} {}",
            self.iotlb_updates,
            self.iotlb.len(),
            self.iotlb_entries_max,
            self.iotlb_bytes_max,
            self.stats.summary()
        )
    }

    fn running(&self) -> bool {
        self.queues.iter().any(Option::is_some)
    }

    fn error_once(&mut self, msg: String) {
        if self.last_error.as_deref() != Some(msg.as_str()) {
            log(&msg);
            self.last_error = Some(msg);
        }
    }

    /// Answers every pending request. An error here is fatal (the device node failed).
    pub fn handle_requests(&mut self) -> Result<(), VduseError> {
        while let Some(req) = self.dev.read_request()? {
            let (ok, vq_state) = match req.kind {
                RequestKind::GetVqState { index } => {
                    let avail = self.vq_state(index);
                    log(&format!("get vq state {index}: avail index {avail}"));
                    (true, Some((index, avail)))
                }
                RequestKind::SetStatus { status } => (self.set_status(status), None),
                RequestKind::UpdateIotlb { start, last } => (self.update_iotlb(start, last), None),
                RequestKind::Unknown(ty) => {
                    log(&format!("unknown request type {ty}"));
                    (false, None)
                }
            };
            self.dev
                .write_response(&encode_response(req.id, ok, vq_state))?;
            if let RequestKind::UpdateIotlb { .. } = req.kind {
                // Mappings changed: buffers may have become reachable.
                self.serve_all();
            }
        }
        Ok(())
    }

    fn vq_state(&self, index: u32) -> u16 {
        let Some(i) = usize::try_from(index)
            .ok()
            .filter(|&i| i < NUM_QUEUES as usize)
        else {
            return 0;
        };
        match &self.queues[i] {
            Some(rq) => rq.q.next_avail(),
            None => self.saved_avail[i],
        }
    }

    fn set_status(&mut self, status: u8) -> bool {
        log(&format!("set status {status:#04x}"));
        let was_ok = self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0;
        let now_ok = status & VIRTIO_CONFIG_S_DRIVER_OK != 0;
        if status == 0 {
            self.stop_queues();
            self.saved_avail = [0; NUM_QUEUES as usize];
            self.last_error = None;
            log("reset");
        } else if now_ok && !was_ok {
            if let Err(e) = self.start_queues() {
                log(&format!("cannot start queues: {e}"));
                self.stop_queues();
                return false;
            }
        } else if !now_ok && was_ok {
            self.stop_queues();
        }
        self.status = status;
        true
    }

    fn start_queues(&mut self) -> Result<(), VduseError> {
        for i in 0..NUM_QUEUES {
            let kick = EventFd::new(EFD_NONBLOCK).map_err(|source| VduseError::Ioctl {
                what: "eventfd",
                source,
            })?;
            self.dev
                .vq_setup_kickfd(u32::from(i), Some(kick.as_raw_fd()))?;
            if !self.try_start(i, kick)? {
                log(&format!(
                    "queue {i} ({}) not ready at DRIVER_OK; served once the driver enables it",
                    queue_name(i)
                ));
            }
        }
        self.serve_all();
        Ok(())
    }

    /// Reads queue `i`'s state and starts it if the driver has enabled it; otherwise
    /// keeps `kick` and waits. Returns whether the queue runs.
    fn try_start(&mut self, i: u16, kick: EventFd) -> Result<bool, VduseError> {
        let info = self.dev.vq_get_info(u32::from(i))?;
        if info.ready == 0 {
            self.waiting[i as usize] = Some(WaitingQueue { kick });
            return Ok(false);
        }
        let num = u16::try_from(info.num).unwrap_or(0);
        let q = match NetQueue::new(
            num,
            info.desc_addr,
            info.driver_addr,
            info.device_addr,
            info.state[0],
        ) {
            Ok(q) => q,
            Err(e) => {
                log(&format!(
                    "queue {i} ({}): invalid parameters (num {}): {e}; not served",
                    queue_name(i),
                    info.num
                ));
                let _ = self.dev.vq_setup_kickfd(u32::from(i), None);
                return Ok(false);
            }
        };
        log(&format!(
            "queue {i} ({}) started: num {} desc {:#x} driver {:#x} device {:#x} avail {}",
            queue_name(i),
            info.num,
            info.desc_addr,
            info.driver_addr,
            info.device_addr,
            info.state[0]
        ));
        self.queues[i as usize] = Some(RunningQueue { q, kick });
        Ok(true)
    }

    /// Re-reads every waiting queue; starts those the driver has enabled since.
    fn start_waiting(&mut self) {
        for i in 0..NUM_QUEUES {
            let Some(w) = self.waiting[i as usize].take() else {
                continue;
            };
            let _ = w.kick.read();
            match self.try_start(i, w.kick) {
                Ok(true) => log(&format!(
                    "queue {i} ({}) enabled after DRIVER_OK",
                    queue_name(i)
                )),
                Ok(false) => {}
                Err(e) => self.error_once(format!("queue {i}: {e}")),
            }
        }
    }

    fn stop_queues(&mut self) {
        for i in 0..NUM_QUEUES {
            if let Some(rq) = self.queues[i as usize].take() {
                self.saved_avail[i as usize] = rq.q.next_avail();
                // The kernel may already have dropped the eventfd on reset; a failure to
                // deassign is harmless.
                let _ = self.dev.vq_setup_kickfd(u32::from(i), None);
                log(&format!("queue {i} ({}) stopped", queue_name(i)));
            } else if self.waiting[i as usize].take().is_some() {
                let _ = self.dev.vq_setup_kickfd(u32::from(i), None);
            }
        }
        self.pending_rx.clear();
    }

    fn update_iotlb(&mut self, start: u64, last: u64) -> bool {
        self.iotlb_updates += 1;
        log(&format!(
            "iotlb update #{} [{start:#x},{last:#x}]",
            self.iotlb_updates
        ));
        if refuses(self.fail_iotlb, self.iotlb_updates) {
            // The previous view stays, as the VMM's undo expects.
            log(&format!(
                "iotlb update #{} refused (--fail-iotlb)",
                self.iotlb_updates
            ));
            return false;
        }
        let change = match self.iotlb.refresh(&self.dev, start, last) {
            Ok(c) => c,
            Err(e) => {
                log(&format!("iotlb update #{} failed: {e}", self.iotlb_updates));
                return false;
            }
        };
        for w in &change.warnings {
            log(w);
        }
        let bytes = self.iotlb.bytes();
        self.iotlb_entries_max = self.iotlb_entries_max.max(self.iotlb.len());
        self.iotlb_bytes_max = self.iotlb_bytes_max.max(bytes);
        // One line per rebuild with what the device holds now, then the
        // entries that changed (not the whole table: behind a vIOMMU the
        // device rebuilds often, and the dump file has the table).
        log(&format!(
            "iotlb update #{}: {} entries (+{} -{} ={}) bytes={bytes:#x}",
            self.iotlb_updates,
            self.iotlb.len(),
            change.added.len(),
            change.removed.len(),
            change.kept
        ));
        let changed = change
            .removed
            .iter()
            .map(|e| ('-', e))
            .chain(change.added.iter().map(|e| ('+', e)));
        for (n, (sign, e)) in changed.enumerate() {
            if n == LOG_ENTRIES_MAX {
                log(&format!(
                    "  ... {} more changed entries",
                    change.added.len() + change.removed.len() - LOG_ENTRIES_MAX
                ));
                break;
            }
            log(&format!(
                "  {sign}iotlb {:#x} {:#x} {} offset {:#x}",
                e.start,
                e.last,
                e.perm.as_str(),
                e.offset
            ));
        }
        if !change.is_empty() {
            self.write_dump();
        }
        true
    }

    fn write_dump(&self) {
        if let Some(path) = &self.dump {
            if let Err(e) = self.iotlb.write_dump(path) {
                log(&e.to_string());
            }
        }
    }

    /// A kick eventfd fired.
    pub fn on_kick(&mut self, index: u16) {
        if let Some(rq) = self.queues.get(usize::from(index)).and_then(Option::as_ref) {
            let _ = rq.kick.read();
        }
        if self.waiting.iter().any(Option::is_some) {
            self.start_waiting();
        }
        if index == TX_QUEUE {
            self.serve_tx();
        }
        // TX may have produced loopback frames; an RX kick means new buffers.
        self.serve_rx();
    }

    fn serve_all(&mut self) {
        self.serve_tx();
        self.serve_rx();
    }

    fn inject(&mut self, index: u16) {
        if let Err(e) = self.dev.vq_inject_irq(u32::from(index)) {
            self.error_once(format!("queue {index}: {e}"));
        }
    }

    fn serve_tx(&mut self) {
        let Some(rq) = self.queues[TX_QUEUE as usize].as_mut() else {
            return;
        };
        let mut frames = Vec::new();
        let mut errors = Vec::new();
        let r = rq.q.drain_tx(
            &self.iotlb,
            &mut self.stats,
            |f| frames.push(f),
            |e| errors.push(e),
        );
        for e in errors {
            log(&e);
        }
        match r {
            Ok(served) => {
                if served.notify {
                    self.inject(TX_QUEUE);
                }
            }
            Err(e) => self.error_once(format!("tx queue: {e}")),
        }
        for f in frames {
            match &mut self.backend {
                Backend::Loopback => {
                    if self.pending_rx.len() < PENDING_RX_MAX {
                        self.pending_rx.push_back(f);
                    } else {
                        self.stats.rx_dropped += 1;
                    }
                }
                Backend::Tap(t) => {
                    if let Err(e) = t.write_frame(&f) {
                        self.stats.tx_errors += 1;
                        self.error_once(format!("tap write: {e}"));
                    }
                }
            }
        }
    }

    fn serve_rx(&mut self) {
        let Some(rq) = self.queues[RX_QUEUE as usize].as_mut() else {
            return;
        };
        let mut errors = Vec::new();
        let r =
            rq.q.fill_rx(&self.iotlb, &mut self.stats, &mut self.pending_rx, |e| {
                errors.push(e)
            });
        for e in errors {
            log(&e);
        }
        match r {
            Ok(served) => {
                if served.notify {
                    self.inject(RX_QUEUE);
                }
            }
            Err(e) => self.error_once(format!("rx queue: {e}")),
        }
    }

    /// The tap is readable.
    pub fn on_tap(&mut self) {
        if self.waiting[RX_QUEUE as usize].is_some() {
            self.start_waiting();
        }
        let mut buf = vec![0u8; 65536];
        for _ in 0..64 {
            let running = self.queues[RX_QUEUE as usize].is_some();
            if running && !self.pending_rx.is_empty() {
                break;
            }
            let Backend::Tap(t) = &mut self.backend else {
                return;
            };
            match t.read_frame(&mut buf) {
                Ok(Some(n)) => {
                    if running {
                        self.pending_rx.push_back(buf[..n].to_vec());
                        self.serve_rx();
                    } else {
                        self.stats.rx_dropped += 1;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    self.error_once(format!("tap read: {e}"));
                    break;
                }
            }
        }
    }
}

/// Whether request number `count` (1-based) is the one `--fail-iotlb` names.
fn refuses(fail_iotlb: Option<u64>, count: u64) -> bool {
    fail_iotlb == Some(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_named_request_is_refused() {
        let refused: Vec<u64> = (1..=5).filter(|n| refuses(Some(3), *n)).collect();
        assert_eq!(refused, vec![3]);
        assert!((1..=5).all(|n| !refuses(None, n)));
    }
}
