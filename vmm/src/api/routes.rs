//! What the API answers, built from the VM's live state.

use std::time::{Duration, Instant};

use devices::dma::{ChangeKind, DmaRange, Perm, TransactionRecord};
use serde_json::{json, Value};

use super::control::{
    LifecycleError, MemoryRequestError, RunState, Transition, VdpaStatus, VmControl,
};
use super::http::{Request, Response};
use crate::config::parse_size;
use crate::snapshot::SnapshotError;
use devices::virtio::mem::ResizeError;
use devices::virtio::vdpa::pause::Stopped;
use devices::virtio::vdpa::DeviceKind;

/// How long PUT /memory waits for the guest by default.
const DEFAULT_RESIZE_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest PUT /memory may wait (`timeout_ms` above it is refused):
/// a client cannot hold its connection, or the request, open for longer.
pub const MAX_RESIZE_TIMEOUT: Duration = Duration::from_secs(600);

/// The most entries `info` lists per domain, per device IOTLB and of the
/// plugged ranges, so a guest that maps page by page cannot make the answer
/// huge; `*_omitted` says how many more there are.
pub const MAX_LISTED: usize = 1024;

/// Everything the API may look at or do.
pub type ApiState = dyn VmControl;

/// What a request leads to: an answer now, or a resize to watch until the
/// guest gets there or its deadline passes.
#[derive(Debug)]
pub enum Outcome {
    Answer(Response),
    Resize(PendingResize),
}

pub fn handle(state: &ApiState, request: &Request) -> Outcome {
    let answer = match (request.method.as_str(), request.path.as_str()) {
        ("GET", "/info") => Response::json(200, &info(state)),
        ("GET", "/counters") => Response::json(200, &counters(state)),
        ("PUT", "/memory") => return start_resize(state, &request.body),
        ("GET", "/vm") => Response::json(200, &json!({ "state": state.run_state().name() })),
        ("PUT", "/vm") => set_run_state(state, &request.body),
        ("PUT", "/snapshot") => snapshot(state, &request.body),
        ("PUT", "/update") => update(state, &request.body),
        (_, "/info" | "/counters" | "/memory" | "/vm" | "/snapshot" | "/update") => {
            Response::error(
                405,
                format!("{} is not allowed on {}", request.method, request.path),
            )
        }
        (_, path) => Response::error(404, format!("no such resource: {path}")),
    };
    Outcome::Answer(answer)
}

/// PUT /update {"socket": PATH}: hands the VM to the new VMM listening on
/// PATH (`microvm --take-over PATH`), which maps the same guest memory; this
/// VMM ends once the answer is sent. On a refusal the VM runs on here.
fn update(state: &ApiState, body: &[u8]) -> Response {
    let request: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return Response::error(400, format!("body is not JSON: {e}")),
    };
    let Some(socket) = request["socket"].as_str().filter(|s| !s.is_empty()) else {
        return Response::error(
            400,
            "socket must be the path where the new VMM (microvm --take-over PATH) listens",
        );
    };
    match state.update(socket.into()) {
        Ok(report) => Response::json(
            200,
            &json!({
                "handed_over": true,
                "socket": report.socket.display().to_string(),
                "state_bytes": report.state_bytes,
                "took_us": u64::try_from(report.took.as_micros()).unwrap_or(u64::MAX),
            }),
        ),
        Err(error) => {
            let status = match &error {
                LifecycleError::Snapshot(SnapshotError::DevicesNotSaved(_)) => 501,
                LifecycleError::HandedOver => 409,
                LifecycleError::NoAnswer(_) => 504,
                _ => 500,
            };
            Response::error(
                status,
                format!(
                    "cannot hand the VM over: {error}; it is {} here",
                    state.run_state().name()
                ),
            )
        }
    }
}

fn hex(value: u64) -> String {
    format!("{value:#x}")
}

fn perm(perm: Perm) -> &'static str {
    match perm {
        Perm::ReadOnly => "ro",
        Perm::WriteOnly => "wo",
        Perm::ReadWrite => "rw",
    }
}

fn mapping(range: &DmaRange) -> Value {
    json!({ "iova": hex(range.iova), "size": range.size, "perm": perm(range.perm) })
}

fn info(state: &ApiState) -> Value {
    let summary = state.summary();
    let devices: Vec<Value> = state.vdpa_devices().iter().map(net_info).collect();
    json!({
        "state": state.run_state().name(),
        "vcpus": summary.vcpus,
        "memory": {
            "size": summary.memory_bytes,
            "regions": ranges(&summary.ram),
            "hotplug": hotplug_info(state),
        },
        "devices": devices,
        "iommu": iommu_info(state),
    })
}

fn iommu_info(state: &ApiState) -> Value {
    let Some(iommu) = state.iommu() else {
        return Value::Null;
    };
    let snapshot = &iommu.snapshot;
    let domains: Vec<Value> = snapshot
        .domains
        .iter()
        .map(|d| {
            let list = iommu
                .mappings
                .iter()
                .find(|(id, _)| *id == d.id)
                .map_or(&[][..], |(_, list)| list.as_slice());
            let (mappings, omitted) = listed(list, |m| {
                json!({
                    "iova": hex(m.virt_start),
                    "size": m.size(),
                    "phys": hex(m.phys_start),
                    "flags": m.flags,
                })
            });
            json!({
                "id": d.id,
                "kind": d.kind.as_str(),
                "address_space": d.space.to_string(),
                "endpoints": d.endpoints,
                "mapping_count": d.mappings,
                "mappings": mappings,
                "mappings_omitted": omitted,
            })
        })
        .collect();
    let endpoints: Vec<Value> = snapshot
        .endpoints
        .iter()
        .map(|e| {
            json!({
                "id": e.id,
                "device": e.device,
                "domain": e.domain,
                "address_space": e.space.map_or("none".to_string(), |s| s.to_string()),
            })
        })
        .collect();
    json!({
        "pci_address": iommu.pci_address,
        "bypass": snapshot.bypass,
        "domains": domains,
        "endpoints": endpoints,
    })
}

fn iommu_counters(state: &ApiState) -> Value {
    let Some(iommu) = state.iommu() else {
        return Value::Null;
    };
    let c = &iommu.counters;
    json!({
        "requests": c.requests_by_type(),
        "drains": c.drains,
        "largest_drain": c.largest_drain,
        "plans_committed": c.plans_committed,
        "plans_refused": c.plans_refused,
        "device_batches": c.device_batches,
        "largest_batch": c.largest_batch,
    })
}

/// Who serves a net device's control queue, and the net state it keeps.
fn control_queue(info: &devices::virtio::vdpa::VdpaInfo) -> Value {
    let Some(control) = &info.control else {
        return match info.kind {
            DeviceKind::Net => json!({ "mode": "not offered to the guest" }),
            DeviceKind::Block => Value::Null,
        };
    };
    let state = &control.state;
    let mac = |m: &[u8; 6]| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    json!({
        "mode": control.mode,
        "queue_pairs": state.queue_pairs,
        "mac": state.mac.as_ref().map(mac),
        "rx": {
            "promisc": state.rx.promisc,
            "allmulti": state.rx.allmulti,
            "alluni": state.rx.alluni,
            "nomulti": state.rx.nomulti,
            "nouni": state.rx.nouni,
            "nobcast": state.rx.nobcast,
        },
        "unicast": state.unicast.iter().map(mac).collect::<Vec<_>>(),
        "multicast": state.multicast.iter().map(mac).collect::<Vec<_>>(),
        "vlans": state.vlans,
        "guest_offloads": state.guest_offloads.map(hex),
        "commands": state.commands,
        "refused": state.refused,
        // Shadowed: everything the device's address space 1 holds, with
        // the VMM addresses behind it (the VMM's own buffers).
        "address_space_1": control.address_space_1.as_ref().map(|ranges| {
            ranges
                .iter()
                .map(|r| json!({
                    "iova": hex(r.iova),
                    "size": r.size,
                    "perm": perm(r.perm),
                    "host_addr": hex(r.host_addr),
                }))
                .collect::<Vec<_>>()
        }),
    })
}

fn stopped(stopped: &Stopped) -> Value {
    let positions: Vec<Value> = match stopped {
        Stopped::Reset { positions } => positions
            .iter()
            .map(|p| json!({ "queue": p.index, "used_idx": p.used_idx }))
            .collect(),
        _ => Vec::new(),
    };
    json!({ "by": stopped.method(), "positions": positions })
}

fn net_info(net: &VdpaStatus) -> Value {
    let info = &net.info;
    let (iotlb, iotlb_omitted) = listed(&net.iotlb, mapping);
    let block = info.block.map(|b| {
        json!({
            "capacity_sectors": b.capacity,
            "capacity_bytes": b.capacity.saturating_mul(512),
            "blk_size": b.blk_size,
            "seg_max": b.seg_max,
            "size_max": b.size_max,
            "readonly": b.readonly,
        })
    });
    json!({
        "id": net.id,
        "type": info.kind.name(),
        "device_id": info.device_id,
        "kind": format!("virtio-{}", match info.kind {
            DeviceKind::Net => "net",
            DeviceKind::Block => "blk",
        }),
        "backend": "vhost-vdpa",
        "path": info.path.display().to_string(),
        "pci_address": net.pci_address,
        "device_status": info.status,
        "transport_status": net.transport_status,
        // What the device offers, and what the VMM set on it at the last
        // start (0x0 before the guest's driver started it).
        "device_features": hex(info.device_features),
        "device_features_acked": hex(info.device_features_acked),
        // What the guest was offered, and what it agreed on.
        "guest_features_offered": hex(info.guest_features_offered),
        "guest_features": hex(info.guest_features),
        "backend_features_offered": hex(info.backend_features_offered),
        "backend_features": hex(info.backend_features),
        "virtqueues": info.virtqueues,
        "groups": info.groups,
        "address_spaces": info.address_spaces,
        "iova_range": { "first": hex(info.iova_first), "last": hex(info.iova_last) },
        // While the VM is paused: how the device was stopped, and where
        // each queue will start again after a reset.
        "stopped": info.stopped.as_ref().map(stopped),
        "queues": info.queues,
        "queue_max_size": info.queue_max_size,
        "block": block,
        "control_queue": control_queue(info),
        "address_space": net.address_space,
        "iotlb": iotlb,
        "iotlb_omitted": iotlb_omitted,
    })
}

fn hotplug_info(state: &ApiState) -> Value {
    let Some(memory) = state.memory() else {
        return Value::Null;
    };
    let (plugged, plugged_omitted) = listed(&memory.plugged, |&(addr, size)| range(addr, size));
    json!({
        "region": { "guest_addr": hex(memory.region_addr), "size": memory.region_size },
        "block_size": memory.block_size,
        "pci_address": memory.pci_address,
        "driver_active": memory.driver_active,
        "requested_size": memory.requested_size,
        "plugged_size": memory.plugged_size,
        "plugged": plugged,
        "plugged_omitted": plugged_omitted,
        "release_failures": memory.release_failures,
    })
}

fn is_hotplug(t: &TransactionRecord) -> bool {
    matches!(t.kind, ChangeKind::Plug | ChangeKind::Unplug)
}

fn hotplug_counters(state: &ApiState) -> Value {
    let Some(memory) = state.memory() else {
        return Value::Null;
    };
    let requests: Vec<Value> = memory
        .requests
        .iter()
        .map(|r| json!({ "kind": r.kind, "ranges": ranges(&r.ranges), "result": r.result, "micros": r.micros }))
        .collect();
    let transactions: Vec<Value> = state
        .transactions()
        .iter()
        .filter(|t| is_hotplug(t))
        .map(transaction)
        .collect();
    json!({ "guest_requests": requests, "transactions": transactions })
}

/// One transaction as the devices saw it: what changed, what each was
/// sent, and how long from the request to its END message.
fn transaction(t: &TransactionRecord) -> Value {
    let devices: Vec<Value> = t
        .devices
        .iter()
        .map(|d| {
            json!({
                "id": d.device,
                "iotlb_update": d.updates,
                "iotlb_invalidate": d.invalidates,
                "batched": d.batched,
                "messages": d.messages(),
                "micros_to_end": d.micros_to_end,
            })
        })
        .collect();
    let moves: Vec<Value> = t
        .moves
        .iter()
        .map(|(device, space)| {
            json!({ "device": device, "to": space.map_or("none".to_string(), |s| s.to_string()) })
        })
        .collect();
    json!({
        "sequence": t.sequence,
        "kind": t.kind.as_str(),
        "ranges_added": ranges(&t.added),
        "ranges_removed": ranges(&t.removed),
        "moves": moves,
        "error": t.error,
        "devices": devices,
    })
}

fn range(addr: u64, size: u64) -> Value {
    json!({ "guest_addr": hex(addr), "size": size })
}

fn ranges(list: &[(u64, u64)]) -> Vec<Value> {
    list.iter().map(|&(addr, size)| range(addr, size)).collect()
}

/// The first `MAX_LISTED` of `items`, shown, and how many were left out.
fn listed<T>(items: &[T], show: impl Fn(&T) -> Value) -> (Vec<Value>, usize) {
    let shown = items.iter().take(MAX_LISTED).map(show).collect();
    (shown, items.len().saturating_sub(MAX_LISTED))
}

/// A resize the guest is working on, watched by the client that asked.
#[derive(Debug)]
pub struct PendingResize {
    size: u64,
    started: Instant,
    deadline: Instant,
    /// The first transaction sequence number that belongs to this resize.
    first_transaction: u64,
}

impl PendingResize {
    pub fn deadline(&self) -> Instant {
        self.deadline
    }
}

/// PUT /vm {"state": "paused"|"running"}: pauses or resumes the VM, and
/// answers once it is done with what each step took (or, refused, with
/// why; the VM is then as it was).
fn set_run_state(state: &ApiState, body: &[u8]) -> Response {
    let request: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return Response::error(400, format!("body is not JSON: {e}")),
    };
    let Some(target) = request["state"].as_str().and_then(RunState::from_name) else {
        return Response::error(400, "state must be \"paused\" or \"running\"");
    };
    match state.set_run_state(target) {
        Ok(done) => Response::json(200, &transition(&done)),
        Err(error) => Response::error(
            match error {
                LifecycleError::NoAnswer(_) => 504,
                _ => 500,
            },
            format!(
                "cannot set the VM {}: {error}; it is {}",
                target.name(),
                state.run_state().name()
            ),
        ),
    }
}

/// PUT /snapshot {"dir": PATH}: saves the paused VM into PATH, a directory
/// the VMM creates (it must not exist). The VM stays paused either way.
fn snapshot(state: &ApiState, body: &[u8]) -> Response {
    let request: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return Response::error(400, format!("body is not JSON: {e}")),
    };
    let Some(dir) = request["dir"].as_str().filter(|d| !d.is_empty()) else {
        return Response::error(400, "dir must be the path of a directory to create");
    };
    let started = std::time::Instant::now();
    match state.snapshot(dir.into()) {
        Ok(report) => Response::json(
            200,
            &json!({
                "dir": report.dir.display().to_string(),
                "state_bytes": report.state_bytes,
                "memory_bytes": report.memory_bytes,
                "took_us": u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            }),
        ),
        Err(error) => {
            let status = match &error {
                LifecycleError::Snapshot(SnapshotError::NotPaused) => 409,
                LifecycleError::Snapshot(SnapshotError::DevicesNotSaved(_)) => 501,
                LifecycleError::NoAnswer(_) => 504,
                _ => 500,
            };
            Response::error(
                status,
                format!(
                    "cannot save the VM: {error}; it is {}",
                    state.run_state().name()
                ),
            )
        }
    }
}

fn transition(done: &Transition) -> Value {
    let micros = |d: std::time::Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    let devices: Vec<Value> = done
        .device_methods
        .iter()
        .map(|(id, method)| json!({ "id": id, "stopped_by": method }))
        .collect();
    json!({
        "state": done.state.name(),
        "changed": done.changed,
        "took_us": micros(done.total()),
        "vcpus_us": micros(done.vcpus),
        "workers_us": micros(done.workers),
        "devices_us": micros(done.devices),
        "devices": devices,
    })
}

/// PUT /memory {"requested_size": SIZE[, "timeout_ms": N]}: asks the guest to
/// plug or unplug until SIZE of hotplug memory is plugged. A new target
/// replaces one the guest has not reached yet.
fn start_resize(state: &ApiState, body: &[u8]) -> Outcome {
    let refuse =
        |status, reason: &dyn std::fmt::Display| Outcome::Answer(Response::error(status, reason));
    let request: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return refuse(400, &format!("body is not JSON: {e}")),
    };
    let size = match &request["requested_size"] {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => parse_size(s).ok().map(|s| s.0),
        _ => None,
    };
    let Some(size) = size else {
        return refuse(
            400,
            &"requested_size must be a byte count or a size like \"512M\"",
        );
    };
    let timeout = match &request["timeout_ms"] {
        Value::Null => DEFAULT_RESIZE_TIMEOUT,
        value => match value.as_u64().map(Duration::from_millis) {
            Some(timeout) if timeout <= MAX_RESIZE_TIMEOUT => timeout,
            _ => {
                return refuse(
                    400,
                    &format!(
                        "timeout_ms must be a whole number of milliseconds, at most {}",
                        MAX_RESIZE_TIMEOUT.as_millis()
                    ),
                )
            }
        },
    };
    if state.memory().is_none() {
        return refuse(409, &MemoryRequestError::NoHotplug);
    }
    let started = Instant::now();
    let first_transaction = state.transactions().last().map_or(0, |t| t.sequence) + 1;
    if let Err(e) = state.request_memory(size) {
        let status = match e {
            MemoryRequestError::NoHotplug | MemoryRequestError::Resize(ResizeError::NoDriver) => {
                409
            }
            MemoryRequestError::Resize(_) => 400,
        };
        return refuse(status, &e);
    }
    Outcome::Resize(PendingResize {
        size,
        started,
        deadline: started + timeout,
        first_transaction,
    })
}

/// The answer to `pending` once the guest has reached its size, when its
/// deadline has passed (`now`), or when `superseded_by` a newer target.
pub fn poll_resize(
    state: &ApiState,
    pending: &PendingResize,
    now: Instant,
    superseded_by: Option<u64>,
) -> Option<Response> {
    let plugged = state.memory().map_or(0, |m| m.plugged_size);
    let done = plugged == pending.size;
    let stopped = if done {
        Value::Null
    } else if let Some(newer) = superseded_by {
        json!(format!(
            "replaced by a newer request for {newer} bytes; {plugged} of the {} requested were plugged then",
            pending.size
        ))
    } else if now >= pending.deadline {
        json!(format!(
            "timed out after {} ms with {plugged} of the {} requested bytes plugged; the guest \
             may refuse, or plug in coarser steps than the block size; the target stays until \
             a new request replaces it",
            (pending.deadline - pending.started).as_millis(),
            pending.size
        ))
    } else {
        return None;
    };
    let transactions: Vec<Value> = state
        .transactions()
        .iter()
        .filter(|t| t.sequence >= pending.first_transaction && is_hotplug(t))
        .map(transaction)
        .collect();
    Some(Response::json(
        200,
        &json!({
            "requested_size": pending.size,
            "plugged_size": plugged,
            "done": done,
            "stopped": stopped,
            "elapsed_ms": now.saturating_duration_since(pending.started).as_millis() as u64,
            "transactions": transactions,
        }),
    ))
}

/// The target size `pending` asked for.
pub fn resize_target(pending: &PendingResize) -> u64 {
    pending.size
}

fn counters(state: &ApiState) -> Value {
    let devices: Vec<Value> = state.vdpa_devices().iter().map(net_counters).collect();
    let history: Vec<Value> = state.transactions().iter().map(transaction).collect();
    json!({
        "devices": devices,
        "memory_hotplug": hotplug_counters(state),
        "iommu": iommu_counters(state),
        "dma_transactions": history,
    })
}

fn net_counters(net: &VdpaStatus) -> Value {
    let dma = &net.dma;
    let queues: Vec<Value> = net
        .queues
        .iter()
        .map(|q| json!({ "index": q.index, "size": q.size, "last_avail_idx": q.last_avail_idx }))
        .collect();
    json!({
        "id": net.id,
        "iotlb_update": dma.iotlb_update,
        "iotlb_invalidate": dma.iotlb_invalidate,
        "batch_begin": dma.batch_begin,
        "batch_end": dma.batch_end,
        "bytes_mapped": dma.bytes_mapped,
        "transactions": dma.transactions,
        "failed_transactions": dma.failed_transactions,
        "boot_mapping": {
            "updates": net.boot_mapping.updates,
            "invalidates": net.boot_mapping.invalidates,
            "batched": net.boot_mapping.batched,
        },
        "activations": net.transport.activations,
        "resets": net.transport.resets,
        "activation_failures": net.transport.activation_failures,
        "iotlb_replays": net.iotlb_replays,
        "pauses": net.pauses,
        // false: the device did not tell its queues' progress within the
        // API's bound (their last_avail_idx is then null).
        "device_answering": net.device_answering,
        "queues": queues,
        "interrupts": {
            "config_raised_by_vmm": net.transport.config_interrupts,
            "queue": "delivered by KVM irqfds straight from the device; the VMM does not see them",
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::control::{IommuStatus, MemoryStatus, VmSummary};
    use crate::api::http;
    use devices::dma::DeviceReport;
    use devices::dma::SpaceId;
    use devices::virtio::iommu::{DomainInfo, DomainKind, IommuCounters, IommuSnapshot, Mapping};
    use devices::virtio::vdpa::block::BlockLayer;
    use devices::virtio::vdpa::VdpaInfo;

    /// A VM whose guest mapped `mappings` separate pages in one domain and
    /// plugged `plugged` separate blocks.
    struct FragmentedVm {
        mappings: u64,
        plugged: u64,
    }

    impl VmControl for FragmentedVm {
        fn summary(&self) -> VmSummary {
            VmSummary {
                vcpus: 1,
                memory_bytes: 1 << 30,
                ram: vec![(0, 1 << 30)],
            }
        }
        fn vdpa_devices(&self) -> Vec<VdpaStatus> {
            vec![]
        }
        fn memory(&self) -> Option<MemoryStatus> {
            Some(MemoryStatus {
                region_addr: 1 << 32,
                region_size: 1 << 40,
                block_size: 2 << 20,
                pci_address: "0000:00:03.0".into(),
                driver_active: true,
                requested_size: 0,
                plugged_size: self.plugged * (2 << 20),
                plugged: (0..self.plugged)
                    .map(|i| ((1 << 32) + i * (4 << 20), 2 << 20))
                    .collect(),
                requests: vec![],
                release_failures: 0,
            })
        }
        fn iommu(&self) -> Option<IommuStatus> {
            let count = usize::try_from(self.mappings).unwrap();
            let mappings = (0..self.mappings)
                .map(|i| Mapping {
                    virt_start: i * 0x2000,
                    virt_end: i * 0x2000 + 0xfff,
                    phys_start: i * 0x1000,
                    flags: 3,
                })
                .collect();
            Some(IommuStatus {
                pci_address: "0000:00:04.0".into(),
                snapshot: IommuSnapshot {
                    bypass: false,
                    domains: vec![DomainInfo {
                        id: 1,
                        kind: DomainKind::Translated,
                        space: SpaceId::IDENTITY,
                        endpoints: vec![8],
                        mappings: count,
                    }],
                    endpoints: vec![],
                },
                counters: IommuCounters::default(),
                mappings: vec![(1, mappings)],
            })
        }
        fn request_memory(&self, _size: u64) -> Result<(), MemoryRequestError> {
            Ok(())
        }
        fn transactions(&self) -> Vec<TransactionRecord> {
            vec![]
        }
        fn run_state(&self) -> crate::lifecycle::RunState {
            crate::lifecycle::RunState::Running
        }
        fn set_run_state(
            &self,
            _target: crate::lifecycle::RunState,
        ) -> Result<crate::lifecycle::Transition, crate::lifecycle::LifecycleError> {
            Err(crate::lifecycle::LifecycleError::Gone)
        }
        fn snapshot(
            &self,
            _dir: std::path::PathBuf,
        ) -> Result<crate::snapshot::SnapshotReport, crate::lifecycle::LifecycleError> {
            Err(crate::lifecycle::LifecycleError::Gone)
        }
        fn update(
            &self,
            _socket: std::path::PathBuf,
        ) -> Result<crate::lifecycle::UpdateReport, crate::lifecycle::LifecycleError> {
            Err(crate::lifecycle::LifecycleError::Gone)
        }
    }

    fn vdpa_status(info: VdpaInfo) -> VdpaStatus {
        VdpaStatus {
            id: "blk0".into(),
            pci_address: "0000:00:02.0".into(),
            info,
            transport_status: 0xf,
            transport: Default::default(),
            dma: Default::default(),
            activations: 1,
            resets: 0,
            iotlb_replays: 0,
            pauses: 1,
            queues: vec![],
            device_answering: true,
            boot_mapping: DeviceReport {
                device: "blk0".into(),
                updates: 1,
                invalidates: 0,
                batched: false,
                micros_to_end: 0,
            },
            address_space: "identity".into(),
            iotlb: vec![],
        }
    }

    #[test]
    fn info_says_each_vdpa_devices_type_and_what_was_offered_and_acked() {
        let info = VdpaInfo {
            path: "/dev/vhost-vdpa-1".into(),
            kind: DeviceKind::Block,
            device_id: 2,
            device_features: 0x3_0000_0244,
            device_features_acked: 0x3_0000_0240,
            guest_features_offered: 0x1_0000_0244,
            guest_features: 0x1_0000_0240,
            backend_features_offered: 0x17e,
            backend_features: 0x106,
            iova_first: 0,
            iova_last: u64::MAX,
            queue_max_size: 256,
            queues: 1,
            virtqueues: Some(1),
            groups: Some(1),
            address_spaces: None,
            status: 0xf,
            mappings: vec![],
            block: Some(BlockLayer {
                capacity: 128 << 11,
                size_max: None,
                seg_max: Some(32),
                blk_size: Some(512),
                queues: 1,
                readonly: false,
            }),
            control: None,
            stopped: Some(Stopped::Reset {
                positions: vec![devices::virtio::vdpa::pause::QueuePosition {
                    index: 0,
                    used_idx: 7,
                }],
            }),
        };
        let value = net_info(&vdpa_status(info));
        assert_eq!(value["stopped"]["by"], "reset");
        assert_eq!(value["stopped"]["positions"][0]["used_idx"], 7);
        assert_eq!(value["type"], "block");
        assert_eq!(value["kind"], "virtio-blk");
        assert_eq!(value["device_id"], 2);
        assert_eq!(value["device_features"], "0x300000244");
        assert_eq!(value["device_features_acked"], "0x300000240");
        assert_eq!(value["guest_features_offered"], "0x100000244");
        assert_eq!(value["guest_features"], "0x100000240");
        assert_eq!(value["backend_features_offered"], "0x17e");
        assert_eq!(value["backend_features"], "0x106");
        assert_eq!(value["groups"], 1);
        assert_eq!(value["address_spaces"], Value::Null, "not offered");
        assert_eq!(value["iova_range"]["last"], "0xffffffffffffffff");
        assert_eq!(value["block"]["capacity_bytes"], 128u64 << 20);
        assert_eq!(value["block"]["blk_size"], 512);
        assert_eq!(value["block"]["size_max"], Value::Null);
        assert_eq!(value["block"]["readonly"], false);
    }

    fn answer(vm: &ApiState, raw: &[u8]) -> (u16, Value) {
        let request = http::parse(raw).unwrap().unwrap();
        let Outcome::Answer(answer) = handle(vm, &request) else {
            panic!("a resize started");
        };
        let bytes = answer.to_bytes();
        let (_, body) = std::str::from_utf8(&bytes)
            .unwrap()
            .split_once("\r\n\r\n")
            .unwrap();
        (answer.status, serde_json::from_str(body).unwrap())
    }

    #[test]
    fn put_vm_pauses_and_resumes_and_refuses_what_is_not_a_state() {
        let vm = crate::api::test_vm::StillVm::new();
        let put = |body: &str| {
            let raw = format!(
                "PUT /vm HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            answer(&vm, raw.as_bytes())
        };
        assert_eq!(
            answer(&vm, b"GET /vm HTTP/1.1\r\n\r\n").1["state"],
            "running"
        );
        let (status, body) = put(r#"{"state": "paused"}"#);
        assert_eq!(
            (status, &body["state"], &body["changed"]),
            (200, &json!("paused"), &json!(true))
        );
        assert_eq!(
            answer(&vm, b"GET /vm HTTP/1.1\r\n\r\n").1["state"],
            "paused"
        );
        assert_eq!(
            answer(&vm, b"GET /info HTTP/1.1\r\n\r\n").1["state"],
            "paused"
        );
        assert_eq!(put(r#"{"state": "paused"}"#).1["changed"], false);
        assert_eq!(put(r#"{"state": "running"}"#).1["state"], "running");
        for bad in [r#"{"state": "stopped"}"#, r#"{"state": 1}"#, "{}", "paused"] {
            let (status, body) = put(bad);
            assert_eq!(status, 400, "{bad}: {body}");
        }
        assert_eq!(answer(&vm, b"DELETE /vm HTTP/1.1\r\n\r\n").0, 405);
        assert_eq!(
            answer(&vm, b"GET /vm HTTP/1.1\r\n\r\n").1["state"],
            "running"
        );
    }

    #[test]
    fn a_refused_pause_is_an_error_that_says_the_state_the_vm_is_in() {
        let vm = FragmentedVm {
            mappings: 0,
            plugged: 0,
        };
        let body = r#"{"state": "paused"}"#;
        let raw = format!(
            "PUT /vm HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let (status, body) = answer(&vm, raw.as_bytes());
        assert_eq!(status, 500);
        let error = body["error"].as_str().unwrap();
        assert!(
            error.starts_with("cannot set the VM paused: ") && error.ends_with("; it is running"),
            "{error}"
        );
    }

    fn info_of(vm: &FragmentedVm) -> (usize, Value) {
        let request = http::parse(b"GET /info HTTP/1.1\r\n\r\n").unwrap().unwrap();
        let Outcome::Answer(answer) = handle(vm, &request) else {
            panic!("info started a resize");
        };
        let bytes = answer.to_bytes();
        let (_, body) = std::str::from_utf8(&bytes)
            .unwrap()
            .split_once("\r\n\r\n")
            .unwrap();
        (bytes.len(), serde_json::from_str(body).unwrap())
    }

    #[test]
    fn info_lists_a_bounded_number_of_mappings_and_says_how_many_it_left_out() {
        let vm = FragmentedVm {
            mappings: 200_000,
            plugged: 20_000,
        };
        let (size, info) = info_of(&vm);
        let domain = &info["iommu"]["domains"][0];
        assert_eq!(domain["mapping_count"], 200_000);
        let listed = domain["mappings"].as_array().unwrap().len();
        assert!(listed <= MAX_LISTED, "{listed} mappings listed");
        assert_eq!(domain["mappings_omitted"], 200_000 - listed);
        let hotplug = &info["memory"]["hotplug"];
        let plugged = hotplug["plugged"].as_array().unwrap().len();
        assert!(plugged <= MAX_LISTED, "{plugged} plugged ranges listed");
        assert_eq!(hotplug["plugged_omitted"], 20_000 - plugged);
        assert!(size < 512 << 10, "a {size}-byte answer");
        // A small VM is listed whole.
        let (_, info) = info_of(&FragmentedVm {
            mappings: 3,
            plugged: 2,
        });
        assert_eq!(
            info["iommu"]["domains"][0]["mappings"]
                .as_array()
                .unwrap()
                .len(),
            3
        );
        assert_eq!(info["iommu"]["domains"][0]["mappings_omitted"], 0);
        assert_eq!(info["memory"]["hotplug"]["plugged_omitted"], 0);
    }
}
