//! vdpa-mgmt: the project's client of the kernel's vdpa management interface
//! (generic netlink family "vdpa"): create and delete vdpa devices on any
//! management device (vdpasim_net, vdpasim_blk, vduse, ...), list the management
//! devices, and find a device's /dev/vhost-vdpa-K. The `vdpa-mgmt` binary is the
//! command-line face of it; vduse-net uses the same library to attach itself.
//!
//! Modules: `netlink` (generic netlink codec and socket), `vdpa` (the vdpa family's
//! commands and replies), `node` (the vhost-vdpa node of a device). The binary's
//! command line is in src/cli.rs.

pub mod netlink;
pub mod node;
pub mod vdpa;
