//! virtio-mem: memory the guest plugs and unplugs in device blocks, within
//! a region the VMM reserved, to follow the size the host requests.
//!
//! The device keeps which blocks are plugged and answers the driver's
//! requests (PLUG, UNPLUG, UNPLUG_ALL, STATE). What plugging means for the
//! host — mapping the memory for vDPA devices, releasing it afterwards —
//! is the `HotplugBackend`'s: one guest request is one call, so one
//! transaction for the DMA-mapping engine. [`dma::DmaHotplug`] is that
//! backend: one plan per request over every address space that reaches
//! the blocks, above the VMM's KVM slots and memory file.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use vm_memory::{Bytes, GuestMemoryMmap};

use super::queue_worker::{Drain, Parker, QueueHandler, QueueWorker, Serve};

pub mod dma;
use super::*;

pub const VIRTIO_ID_MEM: u32 = 24;
/// The driver must not touch unplugged memory (include/uapi/linux/
/// virtio_mem.h). Offered because it is true here: an unplugged block has
/// no KVM memory slot, whether or not the driver acks the bit.
pub const VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE: u32 = 1;
const QUEUE_SIZE: u16 = 128;

const REQ_PLUG: u16 = 0;
const REQ_UNPLUG: u16 = 1;
const REQ_UNPLUG_ALL: u16 = 2;
const REQ_STATE: u16 = 3;
const RESP_ACK: u16 = 0;
const RESP_NACK: u16 = 1;
/// The host cannot do it now (a device refused the mapping, say): the
/// driver retries later or on the next config change. Linux treats
/// RESP_ERROR ("error in request") as a driver bug and stops using the
/// device ("unknown error, marking device broken"); QEMU answers BUSY too.
const RESP_BUSY: u16 = 2;
const RESP_ERROR: u16 = 3;
const STATE_PLUGGED: u16 = 0;
const STATE_UNPLUGGED: u16 = 1;
const STATE_MIXED: u16 = 2;
/// struct virtio_mem_req and struct virtio_mem_resp.
const REQ_SIZE: usize = 24;
const RESP_SIZE: u32 = 10;

/// Offsets in struct virtio_mem_config.
const CFG_BLOCK_SIZE: usize = 0;
const CFG_ADDR: usize = 16;
const CFG_REGION_SIZE: usize = 24;
const CFG_USABLE_REGION_SIZE: usize = 32;
const CFG_PLUGGED_SIZE: usize = 40;
const CFG_REQUESTED_SIZE: usize = 48;
const CFG_LEN: usize = 56;

/// Why the host could not plug or unplug memory; the guest's request
/// fails with the virtio-mem BUSY status.
#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    /// The memory could not be described to the devices.
    #[error(transparent)]
    Translate(#[from] crate::dma::TranslateError),
    /// A device refused the change; no device or space changed.
    #[error(transparent)]
    Map(#[from] crate::dma::SpaceError),
    /// The guest could not be given (or be denied) the memory; nothing
    /// changed for it or for any device.
    #[error("cannot change the guest's view of its memory: {0}")]
    Guest(Box<dyn std::error::Error + Send + Sync>),
    /// No device reaches the memory any more, but giving it back to the
    /// host failed.
    #[error("cannot release guest memory {gpa:#x} size {size:#x}: {source}")]
    Release {
        gpa: u64,
        size: u64,
        source: io::Error,
    },
}

/// What plugging and unplugging mean on the host side.
pub trait HotplugBackend: Send + Sync {
    /// Makes the ranges (guest address, size) usable; an error fails the
    /// guest's request and must leave nothing half done.
    fn plug(&self, ranges: &[(u64, u64)]) -> Result<(), HotplugError>;
    /// Takes the ranges away; an error fails the guest's request.
    fn unplug(&self, ranges: &[(u64, u64)]) -> Result<(), HotplugError>;
    /// Whether `[gpa, gpa + len)` is guest RAM now. The worker reads a
    /// request and writes its response only there: touching an unplugged
    /// block would make the host allocate it again.
    fn is_ram(&self, gpa: u64, len: u64) -> bool;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResizeError {
    #[error("size {size:#x} is not a multiple of the block size {block:#x}")]
    Unaligned { size: u64, block: u64 },
    #[error("size {size:#x} exceeds the hotplug region of {max:#x}")]
    TooLarge { size: u64, max: u64 },
    #[error("the guest has not started its virtio-mem driver")]
    NoDriver,
}

/// The region's geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemRegion {
    pub addr: u64,
    pub size: u64,
    pub block_size: u64,
}

/// One guest request as the device handled it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    pub kind: &'static str,
    pub ranges: Vec<(u64, u64)>,
    pub result: &'static str,
    pub micros: u64,
}

#[derive(Debug)]
pub struct MemState {
    pub region: MemRegion,
    plugged: Vec<bool>,
    pub requested_size: u64,
    pub driver_active: bool,
    pub history: Vec<RequestRecord>,
}

/// How many records `history` keeps.
const HISTORY_LEN: usize = 64;

impl MemState {
    pub fn new(region: MemRegion) -> MemState {
        MemState {
            region,
            plugged: vec![false; (region.size / region.block_size) as usize],
            requested_size: 0,
            driver_active: false,
            history: Vec::new(),
        }
    }

    pub fn plugged_size(&self) -> u64 {
        self.plugged.iter().filter(|p| **p).count() as u64 * self.region.block_size
    }

    /// Plugged blocks as maximal contiguous ranges (guest address, size).
    pub fn plugged_ranges(&self) -> Vec<(u64, u64)> {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let block = self.region.block_size;
        for (i, _) in self.plugged.iter().enumerate().filter(|(_, p)| **p) {
            let addr = self.region.addr + i as u64 * block;
            match ranges.last_mut() {
                Some((start, size)) if *start + *size == addr => *size += block,
                _ => ranges.push((addr, block)),
            }
        }
        ranges
    }

    /// Block indices of [addr, addr + n blocks), if aligned and inside.
    fn blocks(&self, addr: u64, nb_blocks: u16) -> Option<std::ops::Range<usize>> {
        let region = self.region;
        let offset = addr.checked_sub(region.addr)?;
        if nb_blocks == 0 || offset % region.block_size != 0 {
            return None;
        }
        let first = (offset / region.block_size) as usize;
        let end = first.checked_add(usize::from(nb_blocks))?;
        (end <= self.plugged.len()).then_some(first..end)
    }

    fn record(&mut self, record: RequestRecord) {
        if self.history.len() == HISTORY_LEN {
            self.history.remove(0);
        }
        self.history.push(record);
    }
}

/// Handles one request; returns (response type, state) for the driver.
fn handle_request(
    state: &mut MemState,
    backend: &dyn HotplugBackend,
    request: &[u8; REQ_SIZE],
) -> (u16, u16) {
    let started = Instant::now();
    let kind = u16::from_le_bytes([request[0], request[1]]);
    let addr = u64::from_le_bytes(request[8..16].try_into().unwrap_or([0; 8]));
    let nb_blocks = u16::from_le_bytes([request[16], request[17]]);
    let block = state.region.block_size;
    let (name, ranges, response, device_state) = match kind {
        REQ_PLUG | REQ_UNPLUG => {
            let plug = kind == REQ_PLUG;
            let name = if plug { "plug" } else { "unplug" };
            let Some(blocks) = state.blocks(addr, nb_blocks) else {
                return finish(state, name, vec![], RESP_ERROR, 0, started);
            };
            let ranges = vec![(addr, u64::from(nb_blocks) * block)];
            // PLUG needs every block unplugged, UNPLUG every block plugged.
            if state.plugged[blocks.clone()].contains(&plug) {
                return finish(state, name, ranges, RESP_ERROR, 0, started);
            }
            if plug && state.plugged_size() + u64::from(nb_blocks) * block > state.requested_size {
                return finish(state, name, ranges, RESP_NACK, 0, started);
            }
            let result = if plug {
                backend.plug(&ranges)
            } else {
                backend.unplug(&ranges)
            };
            if result.is_err() {
                return finish(state, name, ranges, RESP_BUSY, 0, started);
            }
            state.plugged[blocks].fill(plug);
            (name, ranges, RESP_ACK, 0)
        }
        REQ_UNPLUG_ALL => {
            let ranges = state.plugged_ranges();
            if !ranges.is_empty() && backend.unplug(&ranges).is_err() {
                return finish(state, "unplug_all", ranges, RESP_BUSY, 0, started);
            }
            state.plugged.fill(false);
            ("unplug_all", ranges, RESP_ACK, 0)
        }
        REQ_STATE => {
            let Some(blocks) = state.blocks(addr, nb_blocks) else {
                return (RESP_ERROR, 0);
            };
            let slice = &state.plugged[blocks];
            let device_state = if slice.iter().all(|p| *p) {
                STATE_PLUGGED
            } else if slice.iter().all(|p| !*p) {
                STATE_UNPLUGGED
            } else {
                STATE_MIXED
            };
            return (RESP_ACK, device_state);
        }
        _ => return finish(state, "unknown", vec![], RESP_ERROR, 0, started),
    };
    finish(state, name, ranges, response, device_state, started)
}

fn finish(
    state: &mut MemState,
    kind: &'static str,
    ranges: Vec<(u64, u64)>,
    response: u16,
    device_state: u16,
    started: Instant,
) -> (u16, u16) {
    state.record(RequestRecord {
        kind,
        ranges,
        result: match response {
            RESP_ACK => "ack",
            RESP_NACK => "nack",
            _ => "error",
        },
        micros: started.elapsed().as_micros() as u64,
    });
    (response, device_state)
}

pub struct VirtioMem {
    state: Arc<Mutex<MemState>>,
    /// Serves the request queue (see `queue_worker`).
    worker: QueueWorker<RequestHandler>,
    /// The request queue the driver started (until its reset), and guest
    /// memory, where a snapshot reads how far the worker got.
    started: Option<QueueConfig>,
    memory: Arc<GuestMemoryMmap>,
}

/// What a snapshot keeps of virtio-mem besides its transport (plain data).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemSnapshot {
    /// Plugged blocks, as (guest address, size) ranges.
    pub plugged: Vec<(u64, u64)>,
    pub requested_size: u64,
    /// Where the request queue stands (its used index: the worker, parked
    /// between requests, has answered every request before it), if the
    /// driver started it.
    pub queue_position: Option<u16>,
}

#[derive(Debug, thiserror::Error)]
pub enum MemRestoreError {
    #[error(
        "plugged range {gpa:#x}+{size:#x} is not whole blocks of {block:#x} inside the region \
         {addr:#x}+{region:#x}"
    )]
    Range {
        gpa: u64,
        size: u64,
        addr: u64,
        region: u64,
        block: u64,
    },
    #[error("requested size {size:#x} is not whole blocks inside the {region:#x}-byte region")]
    RequestedSize { size: u64, region: u64 },
    #[error("the request queue was started but the snapshot has no position for it")]
    NoPosition,
}

impl MemState {
    /// Puts back the plugged blocks and the requested size a snapshot
    /// saved; nothing changes if any is outside this region.
    pub fn restore(&mut self, saved: &MemSnapshot) -> Result<(), MemRestoreError> {
        let region = self.region;
        let mut blocks = Vec::new();
        for &(gpa, size) in &saved.plugged {
            let count = u16::try_from(size / region.block_size.max(1)).unwrap_or(0);
            let whole = size.is_multiple_of(region.block_size.max(1));
            match self.blocks(gpa, count).filter(|_| whole) {
                Some(range) => blocks.push(range),
                None => {
                    return Err(MemRestoreError::Range {
                        gpa,
                        size,
                        addr: region.addr,
                        region: region.size,
                        block: region.block_size,
                    })
                }
            }
        }
        let size = saved.requested_size;
        if size > region.size || !size.is_multiple_of(region.block_size.max(1)) {
            return Err(MemRestoreError::RequestedSize {
                size,
                region: region.size,
            });
        }
        self.plugged.fill(false);
        for range in blocks {
            if let Some(bits) = self.plugged.get_mut(range) {
                bits.fill(true);
            }
        }
        self.requested_size = size;
        Ok(())
    }
}

impl VirtioMem {
    /// Creates the device and its worker thread ("virtio-mem"). The worker
    /// is started here, not when the guest starts the driver: that happens
    /// on a vCPU thread, whose seccomp filter does not allow creating
    /// threads. `on_start` runs first on the worker (to install its filter).
    pub fn new(
        region: MemRegion,
        backend: Arc<dyn HotplugBackend>,
        memory: Arc<GuestMemoryMmap>,
        on_start: Box<dyn FnOnce() -> Result<(), String> + Send>,
    ) -> io::Result<VirtioMem> {
        let state = Arc::new(Mutex::new(MemState::new(region)));
        let handler = RequestHandler::new(state.clone(), backend);
        let worker = QueueWorker::spawn("virtio-mem", memory.clone(), handler, on_start)?;
        Ok(VirtioMem {
            state,
            worker,
            started: None,
            memory,
        })
    }

    /// The device's state while the VM is paused (its worker parked).
    pub fn snapshot(&self) -> MemSnapshot {
        let queue_position = self.started.and_then(|queue| queue.used_idx(&self.memory));
        let state = self.lock();
        MemSnapshot {
            plugged: state.plugged_ranges(),
            requested_size: state.requested_size,
            queue_position,
        }
    }

    /// Puts back the plugged blocks and requested size a snapshot saved
    /// (the caller gave them their memory slots).
    pub fn restore(&self, saved: &MemSnapshot) -> Result<(), MemRestoreError> {
        self.lock().restore(saved)
    }

    /// Starts serving the request queue a snapshot saved as started, from
    /// where it stood.
    pub fn restore_started(
        &mut self,
        activation: Activation,
        saved: &MemSnapshot,
    ) -> Result<(), ActivateError> {
        let position = saved
            .queue_position
            .ok_or_else(|| ActivateError::Backend(Box::new(MemRestoreError::NoPosition)))?;
        self.start(activation, Some(position))
    }

    fn start(
        &mut self,
        activation: Activation,
        position: Option<u16>,
    ) -> Result<(), ActivateError> {
        let (Some(config), Some(kick)) = (
            activation.queues.first().copied(),
            activation.kicks.into_iter().next(),
        ) else {
            return Err(ActivateError::QueueNotEnabled { index: 0 });
        };
        let queue_error = |source| ActivateError::Queue { index: 0, source };
        let mut queue = config.to_queue(QUEUE_SIZE).map_err(queue_error)?;
        if let Some(position) = position {
            virtio_queue::QueueT::set_next_avail(&mut queue, position);
            virtio_queue::QueueT::set_next_used(&mut queue, position);
        }
        // Active before the worker starts: its first drain holds the state
        // lock for as long as a plug takes, and this thread (a vCPU) must
        // not wait for that.
        self.lock().driver_active = true;
        let served = self.worker.serve(Serve {
            queue,
            index: 0,
            kick,
            interrupt: activation.interrupt,
        });
        if let Err(e) = served {
            self.lock().driver_active = false;
            return Err(ActivateError::Backend(Box::new(e)));
        }
        self.started = Some(config);
        Ok(())
    }

    /// Shared with the control API.
    pub fn state(&self) -> Arc<Mutex<MemState>> {
        self.state.clone()
    }

    /// Parks the worker between two requests (a pause).
    pub fn parker(&self) -> Parker {
        self.worker.parker()
    }

    fn lock(&self) -> MutexGuard<'_, MemState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the size the guest should plug, replacing any earlier target;
    /// the caller signals the config change to the driver.
    pub fn request_size(&self, size: u64) -> Result<(), ResizeError> {
        let mut state = self.lock();
        let region = state.region;
        if !size.is_multiple_of(region.block_size) {
            return Err(ResizeError::Unaligned {
                size,
                block: region.block_size,
            });
        }
        if size > region.size {
            return Err(ResizeError::TooLarge {
                size,
                max: region.size,
            });
        }
        if !state.driver_active {
            return Err(ResizeError::NoDriver);
        }
        // A target the guest has not reached yet is simply replaced: the
        // driver re-reads requested_size on the config change and works
        // towards the newest one.
        state.requested_size = size;
        Ok(())
    }
}

/// Answers the driver's requests: what the worker runs on each kick, and
/// what tests and fuzz targets drive directly through a `Drain`.
pub struct RequestHandler {
    state: Arc<Mutex<MemState>>,
    backend: Arc<dyn HotplugBackend>,
}

impl RequestHandler {
    pub fn new(state: Arc<Mutex<MemState>>, backend: Arc<dyn HotplugBackend>) -> RequestHandler {
        RequestHandler { state, backend }
    }
}

impl QueueHandler for RequestHandler {
    fn serve(&mut self, drain: &mut Drain<'_>) {
        serve_requests(drain, &self.state, self.backend.as_ref())
    }
}

/// Answers every request the driver queued (one kick's worth).
fn serve_requests(drain: &mut Drain<'_>, state: &Mutex<MemState>, backend: &dyn HotplugBackend) {
    let memory = drain.memory();
    while let Some(chain) = drain.next_chain() {
        let head = chain.head_index();
        let mut request = [0u8; REQ_SIZE];
        let mut response_addr = None;
        let mut have_request = false;
        // A malformed chain (see `queue_worker`) is returned unwritten.
        for descriptor in chain.segments().unwrap_or_default() {
            let addr = descriptor.addr;
            if descriptor.writable {
                if descriptor.len >= RESP_SIZE && backend.is_ram(addr.0, u64::from(RESP_SIZE)) {
                    response_addr.get_or_insert(addr);
                }
            } else if !have_request
                && descriptor.len as usize >= REQ_SIZE
                && backend.is_ram(addr.0, REQ_SIZE as u64)
            {
                have_request = memory.read_slice(&mut request, addr).is_ok();
            }
        }
        let mut written = 0;
        if let (true, Some(addr)) = (have_request, response_addr) {
            let (response, device_state) = {
                let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
                handle_request(&mut state, backend, &request)
            };
            let mut bytes = [0u8; RESP_SIZE as usize];
            bytes[0..2].copy_from_slice(&response.to_le_bytes());
            bytes[8..10].copy_from_slice(&device_state.to_le_bytes());
            if memory.write_slice(&bytes, addr).is_ok() {
                written = RESP_SIZE;
            }
        }
        drain.add_used(head, written);
    }
}

impl VirtioDevice for VirtioMem {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_MEM
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | 1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        let state = self.lock();
        let mut config = [0u8; CFG_LEN];
        let mut put =
            |at: usize, value: u64| config[at..at + 8].copy_from_slice(&value.to_le_bytes());
        put(CFG_BLOCK_SIZE, state.region.block_size);
        put(CFG_ADDR, state.region.addr);
        put(CFG_REGION_SIZE, state.region.size);
        put(CFG_USABLE_REGION_SIZE, state.region.size);
        put(CFG_PLUGGED_SIZE, state.plugged_size());
        put(CFG_REQUESTED_SIZE, state.requested_size);
        let start = offset as usize;
        match config.get(start..start + data.len()) {
            Some(bytes) => data.copy_from_slice(bytes),
            None => data.fill(0),
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The configuration is read-only for the driver.
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.start(activation, None)
    }

    fn reset(&mut self) {
        // Returns once the worker has let go of the old ring. It fails only
        // if the worker never started (its seccomp filter failed), and then
        // nothing serves the ring anyway.
        let _ = self.worker.stop();
        // Plugged memory stays plugged across a driver reset; the driver
        // finds it with STATE or releases it with UNPLUG_ALL.
        self.lock().driver_active = false;
        self.started = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (plug?, ranges) per backend call.
    type Call = (bool, Vec<(u64, u64)>);

    #[derive(Default)]
    struct RecordingBackend {
        calls: Mutex<Vec<Call>>,
        fail: Mutex<bool>,
    }

    impl HotplugBackend for RecordingBackend {
        fn plug(&self, ranges: &[(u64, u64)]) -> Result<(), HotplugError> {
            self.calls.lock().unwrap().push((true, ranges.to_vec()));
            if *self.fail.lock().unwrap() {
                let (gpa, size) = ranges[0];
                return Err(crate::dma::TranslateError::NotRam { gpa, size }.into());
            }
            Ok(())
        }
        fn unplug(&self, ranges: &[(u64, u64)]) -> Result<(), HotplugError> {
            self.calls.lock().unwrap().push((false, ranges.to_vec()));
            Ok(())
        }
        fn is_ram(&self, gpa: u64, len: u64) -> bool {
            // Everything but [UNPLUGGED, UNPLUGGED + 1 MiB).
            gpa.saturating_add(len) <= UNPLUGGED || gpa >= UNPLUGGED + (1 << 20)
        }
    }

    /// Guest memory the recording backend says is not RAM.
    const UNPLUGGED: u64 = 0x8_0000;

    const BASE: u64 = 4 << 30;
    const BLOCK: u64 = 2 << 20;

    fn state() -> MemState {
        let mut state = MemState::new(MemRegion {
            addr: BASE,
            size: 64 * BLOCK,
            block_size: BLOCK,
        });
        state.requested_size = 16 * BLOCK;
        state
    }

    #[test]
    fn plugged_blocks_and_the_requested_size_go_to_a_new_device_and_foreign_ones_are_refused() {
        let mut saved_from = state();
        saved_from.plugged[1..4].fill(true);
        saved_from.plugged[9] = true;
        let saved = MemSnapshot {
            plugged: saved_from.plugged_ranges(),
            requested_size: saved_from.requested_size,
            queue_position: Some(7),
        };
        assert_eq!(
            saved.plugged,
            vec![(BASE + BLOCK, 3 * BLOCK), (BASE + 9 * BLOCK, BLOCK)]
        );
        let mut copy = state();
        copy.requested_size = 0;
        copy.restore(&saved).unwrap();
        assert_eq!(copy.plugged_ranges(), saved.plugged);
        assert_eq!(copy.requested_size, 16 * BLOCK);

        let bad = [
            (vec![(BASE + 1, BLOCK)], 0, "not whole blocks"),
            (vec![(BASE - BLOCK, BLOCK)], 0, "not whole blocks"),
            (vec![(BASE + 63 * BLOCK, 2 * BLOCK)], 0, "not whole blocks"),
            (vec![(BASE, BLOCK + 1)], 0, "not whole blocks"),
            (vec![], 65 * BLOCK, "requested size"),
            (vec![], BLOCK + 1, "requested size"),
        ];
        for (plugged, requested_size, expected) in bad {
            let mut fresh = state();
            let error = fresh
                .restore(&MemSnapshot {
                    plugged,
                    requested_size,
                    queue_position: None,
                })
                .unwrap_err()
                .to_string();
            assert!(error.contains(expected), "{error}");
            assert!(fresh.plugged_ranges().is_empty(), "nothing changed");
            assert_eq!(fresh.requested_size, 16 * BLOCK);
        }
    }

    fn req(kind: u16, addr: u64, nb_blocks: u16) -> [u8; REQ_SIZE] {
        let mut r = [0u8; REQ_SIZE];
        r[0..2].copy_from_slice(&kind.to_le_bytes());
        r[8..16].copy_from_slice(&addr.to_le_bytes());
        r[16..18].copy_from_slice(&nb_blocks.to_le_bytes());
        r
    }

    #[test]
    fn plug_and_unplug_change_state_and_call_the_backend_once_each() {
        let backend = RecordingBackend::default();
        let mut s = state();
        assert_eq!(
            handle_request(&mut s, &backend, &req(REQ_PLUG, BASE, 8)),
            (RESP_ACK, 0)
        );
        assert_eq!(s.plugged_size(), 8 * BLOCK);
        assert_eq!(
            handle_request(&mut s, &backend, &req(REQ_UNPLUG, BASE + 2 * BLOCK, 2)),
            (RESP_ACK, 0)
        );
        assert_eq!(
            s.plugged_ranges(),
            vec![(BASE, 2 * BLOCK), (BASE + 4 * BLOCK, 4 * BLOCK)]
        );
        assert_eq!(
            *backend.calls.lock().unwrap(),
            vec![
                (true, vec![(BASE, 8 * BLOCK)]),
                (false, vec![(BASE + 2 * BLOCK, 2 * BLOCK)])
            ]
        );
        assert_eq!(s.history.len(), 2);
        assert_eq!(s.history[0].kind, "plug");
    }

    #[test]
    fn invalid_requests_get_errors_and_change_nothing() {
        let backend = RecordingBackend::default();
        let mut s = state();
        let error = (RESP_ERROR, 0);
        assert_eq!(
            handle_request(&mut s, &backend, &req(REQ_PLUG, BASE + 1, 1)),
            error,
            "unaligned"
        );
        assert_eq!(
            handle_request(&mut s, &backend, &req(REQ_PLUG, BASE - BLOCK, 1)),
            error,
            "below"
        );
        assert_eq!(
            handle_request(&mut s, &backend, &req(REQ_PLUG, BASE + 63 * BLOCK, 2)),
            error,
            "beyond"
        );
        assert_eq!(
            handle_request(&mut s, &backend, &req(REQ_PLUG, BASE, 0)),
            error,
            "empty"
        );
        assert_eq!(
            handle_request(&mut s, &backend, &req(REQ_UNPLUG, BASE, 1)),
            error,
            "not plugged"
        );
        assert_eq!(
            handle_request(&mut s, &backend, &req(9, BASE, 1)),
            error,
            "unknown type"
        );
        handle_request(&mut s, &backend, &req(REQ_PLUG, BASE, 1));
        assert_eq!(
            handle_request(&mut s, &backend, &req(REQ_PLUG, BASE, 2)),
            error,
            "already plugged"
        );
        assert_eq!(backend.calls.lock().unwrap().len(), 1);
    }

    #[test]
    fn plugging_beyond_the_requested_size_is_nacked() {
        let backend = RecordingBackend::default();
        let mut s = state();
        assert_eq!(
            handle_request(&mut s, &backend, &req(REQ_PLUG, BASE, 17)),
            (RESP_NACK, 0)
        );
        assert_eq!(s.plugged_size(), 0);
    }

    #[test]
    fn a_refused_backend_fails_the_request_and_leaves_blocks_unplugged() {
        let backend = RecordingBackend::default();
        *backend.fail.lock().unwrap() = true;
        let mut s = state();
        assert_eq!(
            handle_request(&mut s, &backend, &req(REQ_PLUG, BASE, 4)),
            (RESP_BUSY, 0),
            "a host-side failure is BUSY, so the driver retries"
        );
        assert_eq!(s.plugged_size(), 0);
        assert_eq!(s.history[0].result, "error");
    }

    #[test]
    fn unplug_all_and_state() {
        let backend = RecordingBackend::default();
        let mut s = state();
        handle_request(&mut s, &backend, &req(REQ_PLUG, BASE, 2));
        handle_request(&mut s, &backend, &req(REQ_PLUG, BASE + 4 * BLOCK, 2));
        assert_eq!(
            handle_request(&mut s, &backend, &req(REQ_STATE, BASE, 2)),
            (RESP_ACK, STATE_PLUGGED)
        );
        assert_eq!(
            handle_request(&mut s, &backend, &req(REQ_STATE, BASE, 4)),
            (RESP_ACK, STATE_MIXED)
        );
        assert_eq!(
            handle_request(&mut s, &backend, &req(REQ_STATE, BASE + 2 * BLOCK, 2)),
            (RESP_ACK, STATE_UNPLUGGED)
        );
        assert_eq!(
            handle_request(&mut s, &backend, &req(REQ_UNPLUG_ALL, 0, 0)),
            (RESP_ACK, 0)
        );
        assert_eq!(s.plugged_size(), 0);
        assert_eq!(
            backend.calls.lock().unwrap().last().unwrap(),
            &(
                false,
                vec![(BASE, 2 * BLOCK), (BASE + 4 * BLOCK, 2 * BLOCK)]
            )
        );
    }

    #[test]
    fn resize_requests_are_checked() {
        let memory = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let region = MemRegion {
            addr: BASE,
            size: 64 * BLOCK,
            block_size: BLOCK,
        };
        let device = VirtioMem::new(
            region,
            Arc::new(RecordingBackend::default()),
            memory,
            Box::new(|| Ok(())),
        )
        .unwrap();
        assert_eq!(device.request_size(4 * BLOCK), Err(ResizeError::NoDriver));
        device.lock().driver_active = true;
        assert!(matches!(
            device.request_size(BLOCK + 1),
            Err(ResizeError::Unaligned { .. })
        ));
        assert!(matches!(
            device.request_size(65 * BLOCK),
            Err(ResizeError::TooLarge { .. })
        ));
        device.request_size(4 * BLOCK).unwrap();
        // The guest has not reached 4 blocks: a new target replaces it.
        device.request_size(8 * BLOCK).unwrap();
        assert_eq!(device.lock().requested_size, 8 * BLOCK);
        device.request_size(0).unwrap();
        assert_eq!(device.lock().requested_size, 0);
        // Bit 1 of the device features, next to VERSION_1.
        assert_eq!(device.features(), VIRTIO_F_VERSION_1 | 0b10);
    }

    #[test]
    fn buffers_in_unplugged_memory_are_neither_read_nor_written() {
        use super::super::test_ring::TestRing;
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let state = Mutex::new(state());
        let backend = RecordingBackend::default();
        let plug = req(REQ_PLUG, BASE, 1);
        memory.write_slice(&plug, GuestAddress(0x10000)).unwrap();
        memory
            .write_slice(&plug, GuestAddress(UNPLUGGED + 0x100))
            .unwrap();
        memory
            .write_slice(&[0xee; 16], GuestAddress(UNPLUGGED))
            .unwrap();
        let mut ring = TestRing::new(0x1000, 16);
        let request = REQ_SIZE as u32;
        // Response in unplugged memory; request there; both in RAM.
        ring.add_chain(
            &memory,
            &[(0x10000, request, false), (UNPLUGGED, RESP_SIZE, true)],
        );
        ring.add_chain(
            &memory,
            &[
                (UNPLUGGED + 0x100, request, false),
                (0x10080, RESP_SIZE, true),
            ],
        );
        ring.add_chain(
            &memory,
            &[(0x10000, request, false), (0x10100, RESP_SIZE, true)],
        );
        let config = ring.config(0);
        let mut queue = Queue::new(QUEUE_SIZE).unwrap();
        queue.try_set_size(config.size).unwrap();
        queue
            .try_set_desc_table_address(GuestAddress(config.desc))
            .unwrap();
        queue
            .try_set_avail_ring_address(GuestAddress(config.driver))
            .unwrap();
        queue
            .try_set_used_ring_address(GuestAddress(config.device))
            .unwrap();
        queue.set_ready(true);
        serve_requests(&mut Drain::new(&mut queue, &memory), &state, &backend);
        let used: Vec<u32> = (0..3).map(|n| ring.used_entry(&memory, n).1).collect();
        assert_eq!(used, vec![0, 0, RESP_SIZE], "only the third was answered");
        let mut untouched = [0u8; 16];
        memory
            .read_slice(&mut untouched, GuestAddress(UNPLUGGED))
            .unwrap();
        assert_eq!(untouched, [0xee; 16]);
        assert_eq!(backend.calls.lock().unwrap().len(), 1, "one plug served");
    }

    #[test]
    fn chains_with_an_indirect_descriptor_or_too_many_are_returned_unwritten() {
        use super::super::queue_worker::MAX_CHAIN_DESCRIPTORS;
        use super::super::test_ring::TestRing;
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let state = Mutex::new(state());
        let backend = RecordingBackend::default();
        let plug = req(REQ_PLUG, BASE, 1);
        memory.write_slice(&plug, GuestAddress(0x10000)).unwrap();
        memory
            .write_slice(&[0xee; 32], GuestAddress(0x10100))
            .unwrap();
        let request = REQ_SIZE as u32;
        let mut ring = TestRing::new(0x1000, 32);
        // The PLUG behind an indirect table (never offered, never followed).
        ring.add_indirect_chain(
            &memory,
            0x8000,
            &[(0x10000, request, false), (0x10100, RESP_SIZE, true)],
        );
        // The PLUG followed by more descriptors than a chain may have.
        let mut long = vec![(0x10000, request, false)];
        long.extend((0..MAX_CHAIN_DESCRIPTORS as u64).map(|i| (0x10200 + 0x10 * i, 1, true)));
        long.push((0x10100 + 0x10, RESP_SIZE, true));
        ring.add_chain(&memory, &long);
        let mut queue = ring.queue();
        serve_requests(&mut Drain::new(&mut queue, &memory), &state, &backend);
        assert_eq!(ring.used_idx(&memory), 2);
        let used: Vec<u32> = (0..2).map(|n| ring.used_entry(&memory, n).1).collect();
        assert_eq!(used, vec![0, 0]);
        let mut untouched = [0u8; 32];
        memory
            .read_slice(&mut untouched, GuestAddress(0x10100))
            .unwrap();
        assert_eq!(untouched, [0xee; 32]);
        assert!(backend.calls.lock().unwrap().is_empty(), "nothing plugged");
    }

    /// Counts plug calls; each one waits for the test to let it finish.
    struct BlockingBackend {
        entered: Mutex<std::sync::mpsc::Sender<()>>,
        release: Mutex<std::sync::mpsc::Receiver<()>>,
        plugs: std::sync::atomic::AtomicUsize,
    }

    impl HotplugBackend for BlockingBackend {
        fn plug(&self, _ranges: &[(u64, u64)]) -> Result<(), HotplugError> {
            self.plugs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = self.entered.lock().unwrap().send(());
            let _ = self.release.lock().unwrap().recv();
            Ok(())
        }
        fn unplug(&self, _ranges: &[(u64, u64)]) -> Result<(), HotplugError> {
            Ok(())
        }
        fn is_ram(&self, _gpa: u64, _len: u64) -> bool {
            true
        }
    }

    #[test]
    fn reset_returns_only_once_the_worker_let_go_of_the_ring() {
        use super::super::test_ring::{CountingInterrupt, TestRing};
        use std::sync::atomic::Ordering;
        use std::sync::mpsc::channel;
        use std::time::Duration;
        use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

        let memory = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let (entered_tx, entered) = channel();
        let (release, release_rx) = channel();
        let backend = Arc::new(BlockingBackend {
            entered: Mutex::new(entered_tx),
            release: Mutex::new(release_rx),
            plugs: Default::default(),
        });
        let region = MemRegion {
            addr: BASE,
            size: 64 * BLOCK,
            block_size: BLOCK,
        };
        let mut device =
            VirtioMem::new(region, backend.clone(), memory.clone(), Box::new(|| Ok(()))).unwrap();
        device.lock().requested_size = 16 * BLOCK;
        // Three PLUG requests queued at once.
        let mut ring = TestRing::new(0x1000, 16);
        for i in 0..3u64 {
            let at = 0x10000 + i * 0x100;
            memory
                .write_slice(&req(REQ_PLUG, BASE + i * BLOCK, 1), GuestAddress(at))
                .unwrap();
            ring.add_chain(
                &memory,
                &[(at, REQ_SIZE as u32, false), (at + 0x80, RESP_SIZE, true)],
            );
        }
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        device
            .activate(Activation {
                features: VIRTIO_F_VERSION_1,
                queues: vec![ring.config(0)],
                kicks: vec![kick.try_clone().unwrap()],
                interrupt: Arc::new(CountingInterrupt::default()),
            })
            .unwrap();
        kick.write(1).unwrap();
        entered
            .recv_timeout(Duration::from_secs(5))
            .expect("the worker takes the first request");

        // The guest resets the device while the first plug is in flight.
        let (returned_tx, returned) = channel();
        let resetting = std::thread::spawn(move || {
            device.reset();
            returned_tx.send(()).unwrap();
            device
        });
        assert!(
            returned.recv_timeout(Duration::from_millis(300)).is_err(),
            "reset returned while the worker was still inside a request"
        );
        release.send(()).unwrap();
        let device = resetting.join().unwrap();

        // The request in flight completed before reset returned; the other
        // two are left alone, and nothing moves on the old ring any more,
        // even when plugs would no longer block and the guest kicks again.
        let used_at_reset = ring.used_idx(&memory);
        for _ in 0..2 {
            let _ = release.send(());
        }
        kick.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(used_at_reset, 1);
        assert_eq!(backend.plugs.load(Ordering::SeqCst), 1);
        let after_reset = (ring.used_idx(&memory), device.lock().plugged_size());
        assert_eq!(after_reset, (1, BLOCK));
    }
}
