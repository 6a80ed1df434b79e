//! virtio-iommu (virtio 1.x device 23): the guest decides what each
//! endpoint behind it may reach, and those decisions travel the one mapping
//! path (address spaces in `crate::dma`) as one batch per request drain.
//!
//! - `request`: the wire format, parsed and encoded as pure functions;
//! - `domains`: the model of domains, endpoints and mappings, and what each
//!   request changes;
//! - `state`: the batching rule (one plan per drain), commit and rollback,
//!   bypass, reset, memory unplug, counters;
//! - this file: the device as the PCI transport sees it (features, config
//!   space) and the worker thread that serves the request queue.
//!
//! Endpoints in a translated domain are attached to that domain's own
//! address space; endpoints in an identity (bypass) domain, or in no domain
//! while the global bypass bit is set, are attached to the identity space;
//! endpoints in no domain with bypass off are attached to nothing.

mod domains;
pub mod persist;
mod request;
mod state;
#[cfg(test)]
mod tests;

use std::io;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::queue_worker::{Chain, Drain, Parker, QueueHandler, QueueWorker, Serve};
use super::*;
use crate::dma::{DeviceReport, DmaSpaces, GuestTranslate, Plan, SharedSpaces, SpaceError};

pub use domains::{DomainInfo, DomainKind, EndpointInfo, Mapping, GRANULE};
pub use persist::IommuPersisted;
pub use request::RequestKind;
pub use state::{IommuCounters, IommuSnapshot};

use domains::Limits;
use request::{RawRequest, Reply, MAX_READABLE};
use state::IommuState;

pub const VIRTIO_ID_IOMMU: u32 = 23;

/// Feature bits (include/uapi/linux/virtio_iommu.h).
pub const VIRTIO_IOMMU_F_INPUT_RANGE: u64 = 1 << 0;
pub const VIRTIO_IOMMU_F_DOMAIN_RANGE: u64 = 1 << 1;
pub const VIRTIO_IOMMU_F_MAP_UNMAP: u64 = 1 << 2;
pub const VIRTIO_IOMMU_F_PROBE: u64 = 1 << 4;
pub const VIRTIO_IOMMU_F_BYPASS_CONFIG: u64 = 1 << 6;

/// The x86 MSI window: endpoints' interrupt writes go there, so the guest
/// must neither map nor allocate IOVAs in it (PROBE reports it).
pub const MSI_WINDOW: RangeInclusive<u64> = 0xfee0_0000..=0xfeef_ffff;

/// Requests the driver can queue before it must wait (each takes two
/// descriptors without indirect descriptors): bounds one drain.
const QUEUE_SIZE: u16 = 1024;
const REQUEST_QUEUE: u16 = 0;
/// Most mappings the guest may hold at once over all domains (a busy
/// Linux net device in lazy mode holds thousands).
const MAX_MAPPINGS: usize = 1 << 18;
/// Bytes of PROBE properties: room for the one RESV_MEM property and more.
const PROBE_SIZE: u32 = 128;

/// Offsets in struct virtio_iommu_config.
const CFG_PAGE_SIZE_MASK: usize = 0;
const CFG_INPUT_START: usize = 8;
const CFG_INPUT_END: usize = 16;
const CFG_DOMAIN_START: usize = 24;
const CFG_DOMAIN_END: usize = 28;
const CFG_PROBE_SIZE: usize = 32;
const CFG_BYPASS: usize = 36;
const CFG_LEN: usize = 40;

/// One endpoint behind the IOMMU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IommuEndpoint {
    /// The endpoint ID the guest uses: the PCI BDF (bus << 8 | dev << 3 |
    /// fn) on segment 0, as the VIOT table says.
    pub id: u32,
    /// The DMA device's name in [`DmaSpaces`] (registered by the caller).
    pub device: String,
}

/// What the VMM decides when it creates the IOMMU.
#[derive(Clone, Debug)]
pub struct IommuConfig {
    pub endpoints: Vec<IommuEndpoint>,
    /// IOVAs the guest may map: inside every endpoint's device IOVA range.
    /// Rounded inwards to the 4 KiB granule.
    pub input_range: RangeInclusive<u64>,
    /// Domain IDs the guest may use.
    pub domain_range: RangeInclusive<u32>,
    /// Initial (and device-reset) value of the bypass bit: whether
    /// endpoints in no domain reach all guest RAM (identity) or nothing.
    pub bypass: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum IommuError {
    #[error("the IOMMU input range {start:#x}..={end:#x} holds no whole 4 KiB page")]
    EmptyInputRange { start: u64, end: u64 },
    #[error("the IOMMU domain range {start}..={end} is empty")]
    EmptyDomainRange { start: u32, end: u32 },
    #[error("endpoint {0:#x} is listed twice")]
    DuplicateEndpoint(u32),
    #[error("cannot attach the IOMMU's endpoints: {0}")]
    Attach(#[source] SpaceError),
    #[error("cannot start the virtio-iommu worker: {0}")]
    Io(#[source] io::Error),
    #[error("cannot put back the saved domains: {0}")]
    Restore(#[source] persist::IommuRestoreError),
}

fn limits(config: &IommuConfig) -> Result<Limits, IommuError> {
    let (start, end) = (*config.input_range.start(), *config.input_range.end());
    let empty = IommuError::EmptyInputRange { start, end };
    let first = start
        .checked_next_multiple_of(GRANULE)
        .ok_or(IommuError::EmptyInputRange { start, end })?;
    // The last byte of the last whole page.
    let last = match end.checked_add(1) {
        Some(limit) => (limit - limit % GRANULE).checked_sub(1),
        None => Some(u64::MAX),
    };
    let last = last.filter(|l| *l > first).ok_or(empty)?;
    let domains = config.domain_range.clone();
    if domains.is_empty() {
        return Err(IommuError::EmptyDomainRange {
            start: *domains.start(),
            end: *domains.end(),
        });
    }
    Ok(Limits {
        input_range: first..=last,
        domain_range: domains,
        reserved: vec![MSI_WINDOW],
        max_mappings: MAX_MAPPINGS,
        // Nothing is negotiated until the driver sets FEATURES_OK.
        map_unmap: false,
        bypass_config: false,
        probe: false,
    })
}

/// The IOMMU's state as the VMM and the control API reach it.
#[derive(Clone)]
pub struct IommuHandle {
    state: Arc<Mutex<IommuState>>,
}

impl IommuHandle {
    fn lock(&self) -> MutexGuard<'_, IommuState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn counters(&self) -> IommuCounters {
        self.lock().counters()
    }

    pub fn snapshot(&self) -> IommuSnapshot {
        self.lock().snapshot()
    }

    /// A domain's mappings, by virt_start; `None` if it does not exist.
    pub fn mappings(&self, domain: u32) -> Option<Vec<Mapping>> {
        self.lock().mappings(domain)
    }

    /// Memory unplug's part in the vIOMMU. Call it with the spaces locked
    /// (spaces first, then the IOMMU: the order every path takes), while
    /// building the unplug's one plan: adds to `plan` the removal of every
    /// domain mapping that reaches `ranges` (gpa, size). The returned cut
    /// holds the IOMMU until the unplug is decided, so no drain sees a
    /// model that is neither before nor after it; the model loses those
    /// mappings only through [`GuestRangeCut::committed`].
    pub fn unmap_guest_ranges(&self, ranges: &[(u64, u64)], plan: &mut Plan) -> GuestRangeCut<'_> {
        let state = self.lock();
        let cut = state.unmap_guest_ranges(ranges, plan);
        GuestRangeCut { state, cut }
    }
}

/// The domain mappings an unplug's plan removes, while that plan is
/// decided. Dropped without [`GuestRangeCut::committed`], the IOMMU's
/// model stays as it was.
pub struct GuestRangeCut<'a> {
    state: MutexGuard<'a, IommuState>,
    cut: Vec<(u32, Mapping)>,
}

impl GuestRangeCut<'_> {
    /// How many domain mappings the plan removes.
    pub fn len(&self) -> usize {
        self.cut.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cut.is_empty()
    }

    /// The unplug stands: the mappings leave the model. Returns how many.
    pub fn committed(mut self, reports: &[DeviceReport]) -> usize {
        self.state.unmap_guest_ranges_done(&self.cut, Some(reports));
        self.cut.len()
    }

    /// The unplug was refused or undone: the model stays, the refusal is
    /// counted.
    pub fn refused(mut self) {
        self.state.unmap_guest_ranges_done(&self.cut, None);
    }
}

/// What the worker needs to serve requests: the request queue's handler
/// (see `queue_worker`), which also applies resets and the bypass bit.
struct Context {
    /// For drains run on the caller's thread (tests); the worker hands each
    /// drain its own guest memory.
    #[cfg_attr(not(test), allow(dead_code))]
    memory: Arc<GuestMemoryMmap>,
    spaces: SharedSpaces,
    translate: Arc<dyn GuestTranslate>,
    state: Arc<Mutex<IommuState>>,
}

impl Context {
    /// Spaces first, then the IOMMU state: the order every path takes.
    fn with_state<T>(&self, f: impl FnOnce(&mut DmaSpaces, &mut IommuState) -> T) -> T {
        let mut spaces = self.spaces.lock().unwrap_or_else(|p| p.into_inner());
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut spaces, &mut state)
    }
}

impl QueueHandler for Context {
    fn serve(&mut self, drain: &mut Drain<'_>) {
        serve_drain(drain, self)
    }
}

pub struct VirtioIommu {
    handle: IommuHandle,
    config: [u8; CFG_LEN],
    /// The thread serving the request queue.
    worker: QueueWorker<Context>,
    /// The request queue the driver started (until its reset), and guest
    /// memory, where a snapshot reads how far the worker got.
    started: Option<QueueConfig>,
    memory: Arc<GuestMemoryMmap>,
}

impl VirtioIommu {
    /// Creates the device, attaches every endpoint's device where the
    /// initial bypass bit says (identity or nothing), and starts its worker
    /// thread ("virtio-iommu"), which runs `on_start` first (to install its
    /// seccomp filter). The endpoints' devices must be registered in
    /// `spaces` already.
    pub fn new(
        config: IommuConfig,
        spaces: SharedSpaces,
        translate: Arc<dyn GuestTranslate>,
        memory: Arc<GuestMemoryMmap>,
        on_start: Box<dyn FnOnce() -> Result<(), String> + Send>,
    ) -> Result<VirtioIommu, IommuError> {
        VirtioIommu::build(config, spaces, translate, memory, on_start, None)
    }

    /// As [`VirtioIommu::new`], with the domain model a snapshot saved put
    /// back instead of the endpoints' first placement: one plan, which
    /// sends each endpoint's device its whole domain as one batch.
    pub fn restored(
        config: IommuConfig,
        spaces: SharedSpaces,
        translate: Arc<dyn GuestTranslate>,
        memory: Arc<GuestMemoryMmap>,
        on_start: Box<dyn FnOnce() -> Result<(), String> + Send>,
        saved: &IommuPersisted,
    ) -> Result<VirtioIommu, IommuError> {
        VirtioIommu::build(config, spaces, translate, memory, on_start, Some(saved))
    }

    fn build(
        config: IommuConfig,
        spaces: SharedSpaces,
        translate: Arc<dyn GuestTranslate>,
        memory: Arc<GuestMemoryMmap>,
        on_start: Box<dyn FnOnce() -> Result<(), String> + Send>,
        saved: Option<&IommuPersisted>,
    ) -> Result<VirtioIommu, IommuError> {
        let (state, config_bytes) = new_state(&config, &spaces, translate.as_ref(), saved)?;
        let context = Context {
            memory: memory.clone(),
            spaces,
            translate,
            state: state.clone(),
        };
        let worker = QueueWorker::spawn("virtio-iommu", memory.clone(), context, on_start)
            .map_err(IommuError::Io)?;
        Ok(VirtioIommu {
            handle: IommuHandle { state },
            config: config_bytes,
            worker,
            started: None,
            memory,
        })
    }

    /// The device's state while the VM is paused (its worker parked).
    pub fn snapshot(&self) -> IommuPersisted {
        let queue_position = self.started.and_then(|queue| queue.used_idx(&self.memory));
        IommuPersisted {
            queue_position,
            ..self.handle.lock().persisted()
        }
    }

    /// Starts serving the request queue a snapshot saved as started, from
    /// where it stood.
    pub fn restore_started(
        &mut self,
        activation: Activation,
        saved: &IommuPersisted,
    ) -> Result<(), ActivateError> {
        let position = saved.queue_position.ok_or(ActivateError::QueueNotEnabled {
            index: REQUEST_QUEUE,
        })?;
        self.start(activation, Some(position))
    }

    /// Shared with the VMM (memory unplug) and the control API.
    pub fn handle(&self) -> IommuHandle {
        self.handle.clone()
    }

    /// Parks the worker between two drains (a pause).
    pub fn parker(&self) -> Parker {
        self.worker.parker()
    }
}

/// The IOMMU's state for `config`, its endpoints placed in `spaces`, and
/// the read-only part of its config space.
fn new_state(
    config: &IommuConfig,
    spaces: &SharedSpaces,
    translate: &dyn GuestTranslate,
    saved: Option<&IommuPersisted>,
) -> Result<(Arc<Mutex<IommuState>>, [u8; CFG_LEN]), IommuError> {
    let limits = limits(config)?;
    let mut endpoints: Vec<(u32, String)> = Vec::new();
    for e in &config.endpoints {
        if endpoints.iter().any(|(id, _)| *id == e.id) {
            return Err(IommuError::DuplicateEndpoint(e.id));
        }
        endpoints.push((e.id, e.device.clone()));
    }
    let config_bytes = config_space(&limits);
    let mut state = IommuState::new(&endpoints, config.bypass, limits, PROBE_SIZE);
    {
        let mut spaces = spaces.lock().unwrap_or_else(|p| p.into_inner());
        match saved {
            None => state
                .place_endpoints(&mut spaces)
                .map_err(IommuError::Attach)?,
            Some(saved) => state
                .restore(saved, &mut spaces, translate)
                .map_err(IommuError::Restore)?,
        }
    }
    Ok((Arc::new(Mutex::new(state)), config_bytes))
}

/// The request queue's handler without a transport or a worker thread,
/// for fuzz targets that drive it through a `Drain` (test-utils feature).
/// It acks every feature, as a Linux driver does.
#[cfg(feature = "test-utils")]
pub struct RequestServer(Context);

#[cfg(feature = "test-utils")]
impl RequestServer {
    pub fn new(
        config: &IommuConfig,
        spaces: SharedSpaces,
        translate: Arc<dyn GuestTranslate>,
        memory: Arc<GuestMemoryMmap>,
    ) -> Result<(RequestServer, IommuHandle), IommuError> {
        let (state, _) = new_state(config, &spaces, translate.as_ref(), None)?;
        let handle = IommuHandle { state };
        handle.lock().set_acked(true, true, true);
        let context = Context {
            memory,
            spaces,
            translate,
            state: handle.state.clone(),
        };
        Ok((RequestServer(context), handle))
    }

    /// What a device reset does to the state, then the driver's new
    /// negotiation (every feature again).
    pub fn reset(&mut self) {
        let _ = self.0.with_state(|spaces, state| {
            let reset = state.reset(spaces);
            state.set_acked(true, true, true);
            reset
        });
    }

    /// What the driver's write of the bypass bit does.
    pub fn set_bypass(&mut self, bypass: bool) {
        let _ = self
            .0
            .with_state(|spaces, state| state.write_bypass(spaces, bypass));
    }
}

#[cfg(feature = "test-utils")]
impl QueueHandler for RequestServer {
    fn serve(&mut self, drain: &mut Drain<'_>) {
        serve_drain(drain, &self.0)
    }
}

/// The read-only part of the config space; `bypass` is filled on read.
fn config_space(limits: &Limits) -> [u8; CFG_LEN] {
    let mut c = [0u8; CFG_LEN];
    c[CFG_PAGE_SIZE_MASK..CFG_PAGE_SIZE_MASK + 8].copy_from_slice(&(!(GRANULE - 1)).to_le_bytes());
    c[CFG_INPUT_START..CFG_INPUT_START + 8]
        .copy_from_slice(&limits.input_range.start().to_le_bytes());
    c[CFG_INPUT_END..CFG_INPUT_END + 8].copy_from_slice(&limits.input_range.end().to_le_bytes());
    c[CFG_DOMAIN_START..CFG_DOMAIN_START + 4]
        .copy_from_slice(&limits.domain_range.start().to_le_bytes());
    c[CFG_DOMAIN_END..CFG_DOMAIN_END + 4].copy_from_slice(&limits.domain_range.end().to_le_bytes());
    c[CFG_PROBE_SIZE..CFG_PROBE_SIZE + 4].copy_from_slice(&PROBE_SIZE.to_le_bytes());
    c
}

impl VirtioDevice for VirtioIommu {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_IOMMU
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        // The event queue: the device reports no faults, so its size barely
        // matters.
        vec![QUEUE_SIZE, 64]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | VIRTIO_IOMMU_F_INPUT_RANGE
            | VIRTIO_IOMMU_F_DOMAIN_RANGE
            | VIRTIO_IOMMU_F_MAP_UNMAP
            | VIRTIO_IOMMU_F_PROBE
            | VIRTIO_IOMMU_F_BYPASS_CONFIG
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        let mut config = self.config;
        config[CFG_BYPASS] = u8::from(self.handle.lock().bypass());
        let bytes = usize::try_from(offset)
            .ok()
            .and_then(|start| config.get(start..start.checked_add(data.len())?));
        match bytes {
            Some(bytes) => data.copy_from_slice(bytes),
            None => data.fill(0),
        }
    }

    fn features_ok(&mut self, features: u64) {
        self.handle.lock().set_acked(
            features & VIRTIO_IOMMU_F_MAP_UNMAP != 0,
            features & VIRTIO_IOMMU_F_BYPASS_CONFIG != 0,
            features & VIRTIO_IOMMU_F_PROBE != 0,
        );
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `bypass` is writable, and only after BYPASS_CONFIG was
        // negotiated (checked on the worker); bits 1-7 carry nothing.
        let Some(at) = (CFG_BYPASS as u64).checked_sub(offset) else {
            return;
        };
        if let Some(value) = usize::try_from(at).ok().and_then(|i| data.get(i)) {
            let bypass = value & 1 != 0;
            // On the worker, in order with the requests. It fails only if the
            // worker never started, and then no request is served either.
            let _ = self.worker.call(move |context: &mut Context| {
                let _ = context.with_state(|spaces, state| state.write_bypass(spaces, bypass));
            });
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.start(activation, None)
    }

    fn reset(&mut self) {
        // Returns once the worker let go of the old ring and every domain
        // is gone. Both fail only if the worker never started.
        let _ = self.worker.stop();
        self.started = None;
        let _ = self.worker.call(|context: &mut Context| {
            let _ = context.with_state(|spaces, state| state.reset(spaces));
        });
    }
}

impl VirtioIommu {
    /// Serves the request queue the driver started: from its start, or
    /// (`position`) from where a snapshot saw it.
    fn start(
        &mut self,
        activation: Activation,
        position: Option<u16>,
    ) -> Result<(), ActivateError> {
        let request_queue = activation
            .queues
            .iter()
            .position(|q| q.index == REQUEST_QUEUE);
        let (Some(config), Some(kick)) = (
            request_queue
                .and_then(|p| activation.queues.get(p))
                .copied(),
            request_queue.and_then(|p| activation.kicks.into_iter().nth(p)),
        ) else {
            return Err(ActivateError::QueueNotEnabled {
                index: REQUEST_QUEUE,
            });
        };
        let queue_error = |source| ActivateError::Queue {
            index: REQUEST_QUEUE,
            source,
        };
        let mut queue = config.to_queue(QUEUE_SIZE).map_err(queue_error)?;
        if let Some(position) = position {
            virtio_queue::QueueT::set_next_avail(&mut queue, position);
            virtio_queue::QueueT::set_next_used(&mut queue, position);
        }
        self.features_ok(activation.features);
        self.worker
            .serve(Serve {
                queue,
                index: REQUEST_QUEUE,
                kick,
                interrupt: activation.interrupt,
            })
            .map_err(|e| ActivateError::Backend(Box::new(e)))?;
        self.started = Some(config);
        Ok(())
    }
}

/// One drain: every available chain, one plan, then every reply.
fn serve_drain(drain: &mut Drain<'_>, context: &Context) {
    let started = Instant::now();
    let memory = drain.memory();
    let mut heads = Vec::new();
    let mut requests = Vec::new();
    let mut writable = Vec::new();
    while let Some(chain) = drain.next_chain() {
        heads.push(chain.head_index());
        let (request, segments) = read_chain(&chain, memory, context.translate.as_ref());
        requests.push(request);
        writable.push(segments);
    }
    if requests.is_empty() {
        return;
    }
    let replies = context.with_state(|spaces, state| {
        state.drain(spaces, context.translate.as_ref(), &requests, started)
    });
    for ((head, reply), segments) in heads.into_iter().zip(replies).zip(writable) {
        let used = match &reply {
            Reply::Write { offset, bytes }
                if write_at(
                    memory,
                    context.translate.as_ref(),
                    &segments,
                    *offset,
                    bytes,
                ) =>
            {
                u32::try_from(reply.used_len()).unwrap_or(u32::MAX)
            }
            _ => 0,
        };
        drain.add_used(head, used);
    }
}

/// One drain of `queue` on the caller's thread, and its interrupt (tests).
#[cfg(test)]
fn serve_queue(queue: &mut Queue, context: &Context, interrupt: &dyn VirtioInterrupt) {
    let memory = context.memory.clone();
    let mut drain = Drain::new(queue, &memory);
    serve_drain(&mut drain, context);
    if drain.used() {
        let _ = interrupt.signal_queue(REQUEST_QUEUE);
    }
}

/// Whether the driver's buffer is guest RAM now: the worker touches no
/// other memory (an unplugged block would be allocated again).
fn is_ram(translate: &dyn GuestTranslate, addr: u64, len: usize) -> bool {
    let perm = crate::dma::Perm::ReadOnly;
    len == 0 || translate.translate(addr, addr, len as u64, perm).is_ok()
}

/// A chain's request bytes (at most [`MAX_READABLE`] are read, and only
/// from guest RAM) and its writable segments. A malformed chain (see
/// `queue_worker`) reads as a request with no room for a status, which is
/// returned unwritten.
fn read_chain(
    chain: &Chain,
    memory: &GuestMemoryMmap,
    translate: &dyn GuestTranslate,
) -> (RawRequest, Vec<(GuestAddress, u32)>) {
    let mut request = RawRequest::default();
    let mut segments = Vec::new();
    let Ok(descriptors) = chain.segments() else {
        return (request, segments);
    };
    let mut readable_ok = true;
    for descriptor in descriptors {
        let len = descriptor.len;
        if descriptor.writable {
            request.writable_len = request.writable_len.saturating_add(u64::from(len));
            segments.push((descriptor.addr, len));
            continue;
        }
        request.readable_len = request.readable_len.saturating_add(u64::from(len));
        let room = MAX_READABLE.saturating_sub(request.head.len());
        let take = room.min(len as usize);
        if take > 0 && readable_ok {
            let mut bytes = vec![0u8; take];
            readable_ok = is_ram(translate, descriptor.addr.0, take)
                && memory.read_slice(&mut bytes, descriptor.addr).is_ok();
            request.head.extend_from_slice(&bytes);
        }
    }
    if !readable_ok {
        // An unreadable request cannot be parsed: make it short.
        request.head.clear();
    }
    (request, segments)
}

/// Writes `bytes` at `offset` of the writable part made of `segments`.
fn write_at(
    memory: &GuestMemoryMmap,
    translate: &dyn GuestTranslate,
    segments: &[(GuestAddress, u32)],
    offset: u64,
    bytes: &[u8],
) -> bool {
    let mut skip = offset;
    let mut rest = bytes;
    for (addr, len) in segments {
        if rest.is_empty() {
            break;
        }
        let len = u64::from(*len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let room = (len - skip) as usize;
        let n = room.min(rest.len());
        let Some(at) = addr.0.checked_add(skip) else {
            return false;
        };
        if !is_ram(translate, at, n) || memory.write_slice(&rest[..n], GuestAddress(at)).is_err() {
            return false;
        }
        rest = &rest[n..];
        skip = 0;
    }
    rest.is_empty()
}
