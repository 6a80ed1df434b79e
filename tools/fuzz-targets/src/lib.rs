//! Fuzz targets for everything a guest or an API client feeds the VMM, and
//! for the test device (vduse-net) that the end-to-end tests trust.
//!
//! Each target is a plain `fn(&[u8])` that decodes the bytes into a sequence
//! of operations (see [`input::Input`]), drives one parser or state machine
//! with them, and panics when an invariant breaks. Any panic — an overflow in
//! a debug build, an out-of-bounds index, a failed check — is a finding.
//!
//! The same functions run in three ways:
//! - `cargo test -p fuzz-targets` (stable): every target for a bounded time
//!   (`FUZZ_SECS`, default 2) over its checked-in corpus
//!   (`tools/fuzz-targets/corpus/<name>/`) plus seeded random inputs and
//!   mutations of the corpus ([`runner`]).
//! - `cargo run -p fuzz-targets --bin fuzz-run -- NAME [SECS]` (stable): the
//!   same loop for one target, for as long as you like; `--input FILE`
//!   replays one input (a crash the loop printed, say).
//! - `tools/fuzz NAME [SECS]`: coverage-guided under libFuzzer, built on
//!   the stable toolchain with rustc's sancov pass (no sanitizer).
//!
//! # Adding a target
//! 1. Write `pub fn name(data: &[u8])` here, driving the crate under test
//!    through its public API (product crates hold no fuzz code: `microvm`
//!    must not ship it); decode with [`input::Input`] (or your own parser)
//!    and never let the harness itself panic on short input: only the code
//!    under test and your invariant checks may panic. Fakes and helpers a
//!    target needs from a product crate's insides go behind that crate's
//!    `test-utils` feature, which may only add items, never change others.
//! 2. Add `Target { name: "name", run: path::to::name, about: "...", seeds: &[] }`
//!    to [`TARGETS`].
//! 3. Give it seed inputs: files in `corpus/name/` (any file name), or
//!    `seeds` kept in code (as [`vmm_api`]'s are): ones that reach deep
//!    states, and every input that ever found a bug.
//!
//! Nothing else: the test, `fuzz-run` and `tools/fuzz` all go through the
//! registry.

pub mod dma;
pub mod input;
pub mod pci;
pub mod runner;
pub mod vdpa;
pub mod vduse_net;
pub mod virtio_iommu;
pub mod virtio_mem;
pub mod vmm_api;

/// One fuzz target.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
    /// One line: what it drives and what it checks.
    pub about: &'static str,
    /// Seed inputs kept in code by the crate that owns the target, used
    /// with the files in `corpus/<name>/`.
    pub seeds: &'static [&'static [u8]],
}

/// Every target, by name.
pub const TARGETS: &[Target] = &[
    Target {
        name: "pci_config",
        run: pci::pci_config,
        about: "PCI config space through 0xCF8/0xCFC, ECAM and the public API; BARs on the MMIO bus",
        seeds: &[],
    },
    Target {
        name: "msix",
        run: pci::msix,
        about: "MSI-X table, PBA and control against a model of pending bits",
        seeds: &[],
    },
    Target {
        name: "virtio_pci",
        run: pci::virtio_pci,
        about: "virtio-pci common config and status: activations only with offered features, on the rings the transport reports",
        seeds: &[],
    },
    Target {
        name: "virtio_mem",
        run: virtio_mem::virtio_mem,
        about: "virtio-mem requests through a real split ring against a model of plugged blocks",
        seeds: &[],
    },
    Target {
        name: "virtio_iommu",
        run: virtio_iommu::virtio_iommu,
        about: "virtio-iommu requests through a real split ring over a recording vDPA device: engine and device agree after every drain",
        seeds: &[],
    },
    Target {
        name: "dma",
        run: dma::dma,
        about: "DMA engine (DmaMapper + RecordingBackend) against a byte-granular mapping model",
        seeds: &[],
    },
    Target {
        name: "vdpa_negotiate",
        run: vdpa::vdpa_negotiate,
        about: "what a vDPA device reports at open against negotiation and the net/block layers: acked and offered features, queues, config reads",
        seeds: &[],
    },
    Target {
        name: "vduse_net",
        run: vduse_net::vduse_net,
        about: "vduse-net IOTLB refresh, descriptor chains (TX and RX) and request decoding",
        seeds: &[],
    },
    Target {
        name: "http",
        run: vmm_api::http,
        about: "the control API's HTTP parsing and routing, the request arriving in pieces",
        seeds: vmm_api::HTTP_SEEDS,
    },
    Target {
        name: "cli",
        run: vmm_api::cli,
        about: "the microvm command line (NUL-separated arguments) and its validation",
        seeds: vmm_api::CLI_SEEDS,
    },
];

pub fn find(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

pub fn names() -> Vec<&'static str> {
    TARGETS.iter().map(|t| t.name).collect()
}
