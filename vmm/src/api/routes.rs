//! What the API answers, built from the VM's live state.

use std::sync::MutexGuard;

use devices::dma::{DmaRange, Perm};
use serde_json::{json, Value};

use super::http::{Request, Response};
use crate::memory::RamRange;
use crate::net::{NetHandle, NetPciDevice};

/// Everything the API may look at; shared with the running VM.
pub struct ApiState {
    pub vcpus: u8,
    pub memory_bytes: u64,
    pub ram: Vec<RamRange>,
    pub nets: Vec<NetHandle>,
}

pub fn handle(state: &ApiState, request: &Request) -> Response {
    match (request.method.as_str(), request.path.as_str()) {
        ("GET", "/info") => Response::json(200, &info(state)),
        ("GET", "/counters") => Response::json(200, &counters(state)),
        (_, "/info" | "/counters") => Response::error(
            405,
            format!("{} is not allowed on {}", request.method, request.path),
        ),
        (_, path) => Response::error(404, format!("no such resource: {path}")),
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

fn lock(device: &std::sync::Mutex<NetPciDevice>) -> MutexGuard<'_, NetPciDevice> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}

fn net_id(index: usize) -> String {
    format!("net{index}")
}

fn info(state: &ApiState) -> Value {
    let regions: Vec<Value> = state
        .ram
        .iter()
        .map(|r| json!({ "guest_addr": hex(r.start), "size": r.size }))
        .collect();
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
        "memory": { "size": state.memory_bytes, "regions": regions },
        "devices": devices,
    })
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
    json!({ "devices": devices })
}
