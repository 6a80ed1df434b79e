//! vduse-net: a virtio-net device in userspace, attached to the kernel's vdpa bus through
//! VDUSE and bound to vhost_vdpa, so a VMM can drive it through /dev/vhost-vdpa-N.
//!
//! Modules: `vduse` (UAPI structs, ioctls, request codec), `iotlb` (IOVA -> mapping table, dump), `net` (virtio-net queues and
//! frames), `tap` (TAP back end), `device` (request handling and datapath glue), `app`
//! (life cycle and event loop). A library so the fuzz targets (tools/fuzz-targets) can
//! drive the descriptor and IOTLB handling.

pub mod app;
pub mod device;
pub mod iotlb;
pub mod net;
pub mod tap;
pub mod vduse;

use std::io::Write;

/// Writes `vduse-net: <msg>` to stderr; never panics.
pub fn log(msg: &str) {
    let _ = writeln!(std::io::stderr().lock(), "vduse-net: {msg}");
}
