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
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::iotlb::Iotlb;
use crate::log;
use crate::net::{queue_name, NetQueue, Stats, VIRTIO_CONFIG_S_DRIVER_OK};
use crate::tap::Tap;
use crate::vduse::{encode_response, Device, RequestKind, VduseError};

/// Frames waiting for RX buffers (loopback); beyond this, new frames are dropped.
const PENDING_RX_MAX: usize = 256;
/// Most changed IOTLB entries listed for one update.
const LOG_ENTRIES_MAX: usize = 64;

/// Where frames go: one TAP queue per queue pair, or each pair's TX
/// looped back to its own RX.
pub enum Backend {
    Tap(Vec<Tap>),
    Loopback,
}

/// How often vduse-net writes `--stats`.
const STATS_EVERY: Duration = Duration::from_secs(1);

struct RunningQueue {
    q: NetQueue,
    kick: EventFd,
}

/// A queue the driver had not enabled at DRIVER_OK, or disabled since. Newer VMMs
/// (QEMU 10) enable the vrings after DRIVER_OK, and a VMM serving a multiqueue guest's
/// control queue enables and disables the pairs in use; VDUSE does not tell the device
/// when a vring's readiness changes (it only flips the flag VDUSE_VQ_GET_INFO reports),
/// so the queue keeps its kick eventfd and is re-read when a kick arrives (VDUSE
/// forwards kicks only to ready queues) and on every tick (an RX queue whose buffers
/// were posted while it was disabled gets no new kick).
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
    pairs: u16,
    queues: Vec<Option<RunningQueue>>,
    waiting: Vec<Option<WaitingQueue>>,
    saved_avail: Vec<u16>,
    /// Where a queue the driver disabled stopped: it resumes there.
    resume_avail: Vec<Option<u16>>,
    backend: Backend,
    /// Whether each pair's TAP queue is attached (multiqueue only).
    tap_attached: Vec<bool>,
    /// Frames waiting for each pair's RX buffers.
    pending_rx: Vec<VecDeque<Vec<u8>>>,
    stats: Stats,
    /// Frames and bytes per queue, for `--stats`.
    queue_frames: Vec<u64>,
    queue_bytes: Vec<u64>,
    stats_path: Option<PathBuf>,
    stats_written: Option<Instant>,
    last_error: Option<String>,
    /// The most entries, and bytes, the IOTLB held after any update.
    iotlb_entries_max: usize,
    iotlb_bytes_max: u64,
}

impl Server {
    pub fn new(
        dev: Device,
        backend: Backend,
        pairs: u16,
        dump: Option<PathBuf>,
        fail_iotlb: Option<u64>,
        stats_path: Option<PathBuf>,
    ) -> Server {
        let pairs = pairs.max(1);
        let queues = usize::from(pairs) * 2;
        Server {
            pairs,
            queues: (0..queues).map(|_| None).collect(),
            waiting: (0..queues).map(|_| None).collect(),
            saved_avail: vec![0; queues],
            resume_avail: vec![None; queues],
            tap_attached: vec![true; usize::from(pairs)],
            pending_rx: (0..pairs).map(|_| VecDeque::new()).collect(),
            queue_frames: vec![0; queues],
            queue_bytes: vec![0; queues],
            stats_path,
            stats_written: None,
            dev,
            iotlb: Iotlb::new(),
            dump,
            iotlb_updates: 0,
            fail_iotlb,
            status: 0,
            backend,
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

    /// The tap fds the server wants to read from, with their pair: always while the
    /// pair's RX queue is stopped (frames are then dropped), otherwise only while no
    /// frame waits for an RX buffer (the tap's own queue holds the rest).
    pub fn tap_fds(&self) -> Vec<(u16, RawFd)> {
        let Backend::Tap(taps) = &self.backend else {
            return Vec::new();
        };
        (0..self.pairs)
            .zip(taps)
            .filter(|(pair, _)| !self.rx_running(*pair) || self.pending(*pair).is_empty())
            .map(|(pair, tap)| (pair, tap.as_raw_fd()))
            .collect()
    }

    fn rx_running(&self, pair: u16) -> bool {
        let rx = usize::from(pair) * 2;
        self.queues.get(rx).is_some_and(Option::is_some)
    }

    fn pending(&self, pair: u16) -> &VecDeque<Vec<u8>> {
        static EMPTY: VecDeque<Vec<u8>> = VecDeque::new();
        self.pending_rx.get(usize::from(pair)).unwrap_or(&EMPTY)
    }

    /// Called about every 100 ms: starts the queues the driver enabled, stops those
    /// it disabled, attaches each pair's TAP queue only while the pair runs, and
    /// writes `--stats` once a second.
    pub fn on_tick(&mut self) {
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.stop_disabled();
            if self.waiting.iter().any(Option::is_some) {
                self.start_waiting();
                self.serve_all();
            }
            self.follow_pairs_on_tap();
        }
        let due = self
            .stats_written
            .is_none_or(|t| t.elapsed() >= STATS_EVERY);
        if due {
            self.write_stats();
        }
    }

    /// Stops every running queue whose vring the driver disabled, keeping where it
    /// was; it keeps its kick and waits to be enabled again.
    fn stop_disabled(&mut self) {
        for i in 0..self.queue_count() {
            let running = self.queues.get(usize::from(i)).is_some_and(Option::is_some);
            if !running {
                continue;
            }
            let ready = match self.dev.vq_get_info(u32::from(i)) {
                Ok(info) => info.ready != 0,
                Err(e) => {
                    self.error_once(format!("queue {i}: {e}"));
                    continue;
                }
            };
            if ready {
                continue;
            }
            let Some(rq) = self.queues.get_mut(usize::from(i)).and_then(Option::take) else {
                continue;
            };
            if let Some(slot) = self.resume_avail.get_mut(usize::from(i)) {
                *slot = Some(rq.q.next_avail());
            }
            if let Some(slot) = self.waiting.get_mut(usize::from(i)) {
                *slot = Some(WaitingQueue { kick: rq.kick });
            }
            if i.is_multiple_of(2) {
                if let Some(p) = self.pending_rx.get_mut(usize::from(i / 2)) {
                    p.clear();
                }
            }
            log(&format!(
                "queue {i} ({}) disabled by the driver; stopped at avail {}",
                queue_name(i),
                rq.q.next_avail()
            ));
        }
    }

    /// With several TAP queues, a pair whose queues are stopped has its TAP queue
    /// detached, so the kernel steers its flows to the pairs that run.
    fn follow_pairs_on_tap(&mut self) {
        let Backend::Tap(taps) = &self.backend else {
            return;
        };
        if taps.len() < 2 {
            return;
        }
        let mut changes = Vec::new();
        for (pair, attached) in (0..self.pairs).zip(&self.tap_attached) {
            let first = usize::from(pair) * 2;
            let runs = self
                .queues
                .get(first..first + 2)
                .is_some_and(|q| q.iter().any(Option::is_some));
            if runs != *attached {
                changes.push((pair, runs));
            }
        }
        let results: Vec<_> = changes
            .into_iter()
            .filter_map(|(pair, attach)| {
                let tap = taps.get(usize::from(pair))?;
                Some((pair, attach, tap.set_attached(attach)))
            })
            .collect();
        for (pair, attach, result) in results {
            match result {
                Ok(()) => {
                    if let Some(a) = self.tap_attached.get_mut(usize::from(pair)) {
                        *a = attach;
                    }
                    let what = if attach { "attached" } else { "detached" };
                    log(&format!("pair {pair}: tap queue {what}"));
                }
                Err(e) => self.error_once(format!("pair {pair}: {e}")),
            }
        }
    }

    fn queue_count(&self) -> u16 {
        self.pairs.saturating_mul(2)
    }

    /// `--stats`: frames and bytes per queue, and whether it runs, as one JSON
    /// object, replaced whole (a reader never sees half of it).
    pub fn write_stats(&mut self) {
        self.stats_written = Some(Instant::now());
        let Some(path) = self.stats_path.clone() else {
            return;
        };
        let queues: Vec<String> = (0..self.queue_count())
            .map(|i| {
                let at = usize::from(i);
                format!(
                    "{{\"index\":{i},\"name\":\"{}\",\"frames\":{},\"bytes\":{},\"ready\":{}}}",
                    queue_name(i),
                    self.queue_frames.get(at).copied().unwrap_or(0),
                    self.queue_bytes.get(at).copied().unwrap_or(0),
                    self.queues.get(at).is_some_and(Option::is_some)
                )
            })
            .collect();
        let text = format!("{{\"queues\":[{}]}}\n", queues.join(","));
        let tmp = path.with_extension("tmp");
        let written = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            self.error_once(format!("cannot write {}: {e}", path.display()));
        }
    }

    fn count(&mut self, queue: u16, frames: u64, bytes: u64) {
        if let Some(f) = self.queue_frames.get_mut(usize::from(queue)) {
            *f = f.saturating_add(frames);
        }
        if let Some(b) = self.queue_bytes.get_mut(usize::from(queue)) {
            *b = b.saturating_add(bytes);
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
            .filter(|&i| i < self.queues.len())
        else {
            return 0;
        };
        match self.queues.get(i).and_then(Option::as_ref) {
            Some(rq) => rq.q.next_avail(),
            None => self
                .resume_avail
                .get(i)
                .copied()
                .flatten()
                .or_else(|| self.saved_avail.get(i).copied())
                .unwrap_or(0),
        }
    }

    fn set_status(&mut self, status: u8) -> bool {
        log(&format!("set status {status:#04x}"));
        let was_ok = self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0;
        let now_ok = status & VIRTIO_CONFIG_S_DRIVER_OK != 0;
        if status == 0 {
            self.stop_queues();
            self.saved_avail.iter_mut().for_each(|a| *a = 0);
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
        for i in 0..self.queue_count() {
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
            if let Some(slot) = self.waiting.get_mut(usize::from(i)) {
                *slot = Some(WaitingQueue { kick });
            }
            return Ok(false);
        }
        let num = u16::try_from(info.num).unwrap_or(0);
        // A queue the driver disabled and enabled again goes on where it stopped.
        let avail = self
            .resume_avail
            .get_mut(usize::from(i))
            .and_then(Option::take)
            .unwrap_or(info.state[0]);
        let q = match NetQueue::new(
            num,
            info.desc_addr,
            info.driver_addr,
            info.device_addr,
            avail,
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
            avail
        ));
        if let Some(slot) = self.queues.get_mut(usize::from(i)) {
            *slot = Some(RunningQueue { q, kick });
        }
        Ok(true)
    }

    /// Re-reads every waiting queue; starts those the driver has enabled since.
    fn start_waiting(&mut self) {
        for i in 0..self.queue_count() {
            let Some(w) = self.waiting.get_mut(usize::from(i)).and_then(Option::take) else {
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
        for i in 0..self.queue_count() {
            let at = usize::from(i);
            if let Some(slot) = self.resume_avail.get_mut(at) {
                *slot = None;
            }
            if let Some(rq) = self.queues.get_mut(at).and_then(Option::take) {
                if let Some(slot) = self.saved_avail.get_mut(at) {
                    *slot = rq.q.next_avail();
                }
                // The kernel may already have dropped the eventfd on reset; a failure to
                // deassign is harmless.
                let _ = self.dev.vq_setup_kickfd(u32::from(i), None);
                log(&format!("queue {i} ({}) stopped", queue_name(i)));
            } else if self.waiting.get_mut(at).and_then(Option::take).is_some() {
                let _ = self.dev.vq_setup_kickfd(u32::from(i), None);
            }
        }
        self.pending_rx.iter_mut().for_each(VecDeque::clear);
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
        let pair = index / 2;
        if !index.is_multiple_of(2) {
            self.serve_tx(pair);
        }
        // TX may have produced loopback frames; an RX kick means new buffers.
        self.serve_rx(pair);
    }

    fn serve_all(&mut self) {
        for pair in 0..self.pairs {
            self.serve_tx(pair);
            self.serve_rx(pair);
        }
    }

    fn inject(&mut self, index: u16) {
        if let Err(e) = self.dev.vq_inject_irq(u32::from(index)) {
            self.error_once(format!("queue {index}: {e}"));
        }
    }

    fn serve_tx(&mut self, pair: u16) {
        let index = pair.saturating_mul(2).saturating_add(1);
        let Some(rq) = self
            .queues
            .get_mut(usize::from(index))
            .and_then(Option::as_mut)
        else {
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
                    self.inject(index);
                }
            }
            Err(e) => self.error_once(format!("{} queue: {e}", queue_name(index))),
        }
        let bytes: usize = frames.iter().map(Vec::len).sum();
        self.count(index, frames.len() as u64, bytes as u64);
        for f in frames {
            match &mut self.backend {
                Backend::Loopback => match self.pending_rx.get_mut(usize::from(pair)) {
                    Some(p) if p.len() < PENDING_RX_MAX => p.push_back(f),
                    _ => self.stats.rx_dropped += 1,
                },
                Backend::Tap(taps) => {
                    let Some(t) = taps.get_mut(usize::from(pair)) else {
                        continue;
                    };
                    if let Err(e) = t.write_frame(&f) {
                        self.stats.tx_errors += 1;
                        self.error_once(format!("tap write: {e}"));
                    }
                }
            }
        }
    }

    fn serve_rx(&mut self, pair: u16) {
        let index = pair.saturating_mul(2);
        let Some(rq) = self
            .queues
            .get_mut(usize::from(index))
            .and_then(Option::as_mut)
        else {
            return;
        };
        let Some(pending) = self.pending_rx.get_mut(usize::from(pair)) else {
            return;
        };
        let mut errors = Vec::new();
        let (frames_before, bytes_before) = (pending.len(), self.stats.rx_bytes);
        let r =
            rq.q.fill_rx(&self.iotlb, &mut self.stats, pending, |e| errors.push(e));
        let delivered = frames_before.saturating_sub(pending.len()) as u64;
        let bytes = self.stats.rx_bytes.saturating_sub(bytes_before);
        for e in errors {
            log(&e);
        }
        self.count(index, delivered, bytes);
        match r {
            Ok(served) => {
                if served.notify {
                    self.inject(index);
                }
            }
            Err(e) => self.error_once(format!("{} queue: {e}", queue_name(index))),
        }
    }

    /// Pair `pair`'s tap queue is readable.
    pub fn on_tap(&mut self, pair: u16) {
        let rx = usize::from(pair) * 2;
        if self.waiting.get(rx).is_some_and(Option::is_some) {
            self.start_waiting();
        }
        let mut buf = vec![0u8; 65536];
        for _ in 0..64 {
            let running = self.rx_running(pair);
            if running && !self.pending(pair).is_empty() {
                break;
            }
            let Backend::Tap(taps) = &mut self.backend else {
                return;
            };
            let Some(t) = taps.get_mut(usize::from(pair)) else {
                return;
            };
            match t.read_frame(&mut buf) {
                Ok(Some(n)) => {
                    let frame = buf.get(..n).unwrap_or_default().to_vec();
                    match self.pending_rx.get_mut(usize::from(pair)) {
                        Some(p) if running => {
                            p.push_back(frame);
                            self.serve_rx(pair);
                        }
                        _ => self.stats.rx_dropped += 1,
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
