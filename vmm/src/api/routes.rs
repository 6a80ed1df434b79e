//! What the API answers, built from the VM's live state.

use std::sync::MutexGuard;
use std::time::{Duration, Instant};

use devices::dma::{DmaRange, Perm};
use serde_json::{json, Value};

use super::http::{Request, Response};
use crate::config::parse_size;
use crate::device_manager::net::{NetHandle, NetPciDevice};
use crate::device_manager::virtio_mem::MemHandle;
use crate::vstate::memory::RamRange;
use devices::virtio::mem::ResizeError;

/// How long PUT /memory waits for the guest by default.
const DEFAULT_RESIZE_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest PUT /memory may wait (`timeout_ms` above it is refused):
/// a client cannot hold its connection, or the request, open for longer.
pub const MAX_RESIZE_TIMEOUT: Duration = Duration::from_secs(600);

/// Everything the API may look at; shared with the running VM.
pub struct ApiState {
    pub vcpus: u8,
    pub memory_bytes: u64,
    pub ram: Vec<RamRange>,
    pub nets: Vec<NetHandle>,
    pub hotplug: Option<MemHandle>,
}

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
        (_, "/info" | "/counters" | "/memory") => Response::error(
            405,
            format!("{} is not allowed on {}", request.method, request.path),
        ),
        (_, path) => Response::error(404, format!("no such resource: {path}")),
    };
    Outcome::Answer(answer)
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

fn lock(device: &std::sync::Mutex<NetPciDevice>) -> MutexGuard<'_, NetPciDevice> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}

fn net_id(index: usize) -> String {
    format!("net{index}")
}

fn info(state: &ApiState) -> Value {
    let ram: Vec<(u64, u64)> = state.ram.iter().map(|r| (r.start, r.size)).collect();
    let regions = ranges(&ram);
    let devices: Vec<Value> = state
        .nets
        .iter()
        .enumerate()
        .map(|(index, net)| {
            let pci = lock(&net.pci);
            let info = pci.device().info(pci.negotiated_features());
            json!({
                "id": net_id(index),
                "kind": "virtio-net",
                "backend": "vhost-vdpa",
                "path": info.path.display().to_string(),
                "pci_address": format!("0000:00:{:02x}.0", net.slot),
                "device_status": info.status,
                "transport_status": pci.status(),
                "device_features": hex(info.device_features),
                "guest_features": hex(info.guest_features),
                "backend_features": hex(info.backend_features),
                "iova_range": { "first": hex(info.iova_first), "last": hex(info.iova_last) },
                "queues": info.queues,
                "queue_max_size": info.queue_max_size,
                "iotlb": info.mappings.iter().map(mapping).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "vcpus": state.vcpus,
        "memory": { "size": state.memory_bytes, "regions": regions, "hotplug": hotplug_info(state) },
        "devices": devices,
    })
}

fn hotplug_info(state: &ApiState) -> Value {
    let Some(hotplug) = &state.hotplug else {
        return Value::Null;
    };
    let mem = hotplug.state.lock().unwrap_or_else(|p| p.into_inner());
    json!({
        "region": { "guest_addr": hex(hotplug.region.addr), "size": hotplug.region.size },
        "block_size": hotplug.region.block_size,
        "pci_address": format!("0000:00:{:02x}.0", hotplug.slot),
        "driver_active": mem.driver_active,
        "requested_size": mem.requested_size,
        "plugged_size": mem.plugged_size(),
        "plugged": ranges(&mem.plugged_ranges()),
    })
}

fn hotplug_counters(state: &ApiState) -> Value {
    let Some(hotplug) = &state.hotplug else {
        return Value::Null;
    };
    let requests: Vec<Value> = {
        let mem = hotplug.state.lock().unwrap_or_else(|p| p.into_inner());
        mem.history
            .iter()
            .map(|r| json!({ "kind": r.kind, "ranges": ranges(&r.ranges), "result": r.result, "micros": r.micros }))
            .collect()
    };
    let transactions: Vec<Value> = hotplug.backend.history().iter().map(transaction).collect();
    json!({ "guest_requests": requests, "transactions": transactions })
}

/// One guest request as the devices saw it: what changed, what each was
/// sent, and how long from the request to its END message.
fn transaction(t: &crate::device_manager::memory_hotplug::TransactionRecord) -> Value {
    let (added, removed) = match t.kind {
        "plug" => (ranges(&t.ranges), vec![]),
        _ => (vec![], ranges(&t.ranges)),
    };
    let devices: Vec<Value> = t
        .devices
        .iter()
        .map(|d| {
            let sent = d.updates + d.invalidates;
            let brackets = if d.batched && sent > 0 { 2 } else { 0 };
            json!({
                "id": d.device,
                "iotlb_update": d.updates,
                "iotlb_invalidate": d.invalidates,
                "batched": d.batched,
                "messages": sent + brackets,
                "micros_to_end": d.micros_to_end,
            })
        })
        .collect();
    json!({
        "sequence": t.sequence,
        "kind": t.kind,
        "ranges_added": added,
        "ranges_removed": removed,
        "error": t.error,
        "devices": devices,
    })
}

fn ranges(list: &[(u64, u64)]) -> Vec<Value> {
    list.iter()
        .map(|&(addr, size)| json!({ "guest_addr": hex(addr), "size": size }))
        .collect()
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
    let Some(hotplug) = &state.hotplug else {
        return refuse(
            409,
            &"this VM has no hotplug memory (start it with --memory size=SIZE,hotplug=MAX)",
        );
    };
    let started = Instant::now();
    let first_transaction = hotplug.backend.history().last().map_or(0, |t| t.sequence) + 1;
    {
        let mut pci = hotplug.pci.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = pci.device().request_size(size) {
            let status = match e {
                ResizeError::NoDriver => 409,
                _ => 400,
            };
            return refuse(status, &e);
        }
        pci.signal_config_change();
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
    let hotplug = state.hotplug.as_ref()?;
    let plugged = hotplug
        .state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .plugged_size();
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
    let transactions: Vec<Value> = hotplug
        .backend
        .history()
        .iter()
        .filter(|t| t.sequence >= pending.first_transaction)
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
    let devices: Vec<Value> = state
        .nets
        .iter()
        .enumerate()
        .map(|(index, net)| {
            let pci = lock(&net.pci);
            let transport = pci.counters();
            let device = pci.device().counters();
            let dma = device.dma;
            let queues: Vec<Value> = device
                .queues
                .iter()
                .map(|q| json!({ "index": q.index, "size": q.size, "last_avail_idx": q.last_avail_idx }))
                .collect();
            json!({
                "id": net_id(index),
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
                "activations": transport.activations,
                "resets": transport.resets,
                "activation_failures": transport.activation_failures,
                "iotlb_replays": device.iotlb_replays,
                "queues": queues,
                "interrupts": {
                    "config_raised_by_vmm": transport.config_interrupts,
                    "queue": "delivered by KVM irqfds straight from the device; the VMM does not see them",
                },
            })
        })
        .collect();
    json!({ "devices": devices, "memory_hotplug": hotplug_counters(state) })
}
