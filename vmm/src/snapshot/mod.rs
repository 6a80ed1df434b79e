//! Snapshots of a paused VM, and restoring one in a new process (issue 17).
//!
//! A snapshot is a directory the VMM creates (it must not exist):
//! - `state`: the versioned, checksummed state file ([`file`]): every vCPU's
//!   KVM state, the VM's (interrupt controllers, kvmclock), the serial port
//!   and the memory layout;
//! - `memory`: guest RAM, its boot ranges then the plugged hotplug blocks,
//!   one after the other.
//!
//! What is built so far covers the serial console, virtio-mem (its plugged
//! blocks' memory follows boot RAM in the memory file) and identity-mapped
//! vDPA devices ([`vdpa`]), the control queue the VMM serves included: a VM
//! with a vIOMMU, or a device whose own control queue the VMM shadows, is
//! refused at snapshot time with a clear message, because their state
//! (domains, the device's filters) is not saved yet. Live update
//! ([`handoff`]) hands the same state and the memory files to a new VMM.

pub mod file;
pub mod handoff;
pub mod vdpa;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use devices::serial::SerialSnapshot;
use devices::virtio::iommu::IommuPersisted;
use devices::virtio::mem::MemSnapshot;
use devices::virtio::pci::TransportState;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use crate::vstate::memory::GuestRam;
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm_state::VmState;
use file::StateFileError;

/// The state file in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// Guest RAM in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// How much guest memory is copied at a time.
const CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the VM must be paused first (microvm-ctl pause)")]
    NotPaused,
    #[error(
        "{0}: not saved by snapshots yet (what is: the console, virtio-mem, and vDPA \
         devices without a vIOMMU whose control queue, if any, the VMM serves alone)"
    )]
    DevicesNotSaved(String),
    #[error("{id}: {reason}")]
    Device { id: String, reason: String },
    #[error(transparent)]
    DeviceOptions(#[from] vdpa::DeviceOptionsError),
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    StateFile(#[from] StateFileError),
    #[error("{0}")]
    Vcpu(String),
    #[error("the VM's state: {0}")]
    Vm(String),
    #[error("{path}: the memory file is {found} bytes; the state says guest RAM is {expected}")]
    MemorySize {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("the snapshot holds {found} vCPU states for {vcpus} vCPUs")]
    VcpuCount { vcpus: usize, found: usize },
    #[error("the snapshot's vCPU states are for vCPUs {found:?}; they must be 0, 1, ... in order")]
    VcpuIds { found: Vec<u8> },
}

/// Everything the state file holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmSnapshot {
    /// Boot RAM's size (the memory file's length): a VM of this size lays
    /// out the same ranges.
    pub memory_bytes: u64,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub serial: SerialSnapshot,
    /// The vDPA devices: the options they were added with and their state
    /// (none in a snapshot of a VM without devices).
    #[serde(default)]
    pub devices: vdpa::SavedDevices,
    /// The hotplug region and its virtio-mem device, if the VM had one.
    #[serde(default)]
    pub hotplug: Option<SavedHotplug>,
    /// The virtio-iommu, if the VM had one: its transport and the guest's
    /// domain model.
    #[serde(default)]
    pub iommu: Option<SavedIommu>,
}

/// The virtio-iommu's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedIommu {
    pub transport: TransportState,
    pub device: IommuPersisted,
}

/// The hotplug region and its virtio-mem device's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedHotplug {
    pub size: u64,
    pub block_size: u64,
    pub transport: TransportState,
    pub device: MemSnapshot,
}

impl VmSnapshot {
    /// The plugged hotplug blocks: their memory follows boot RAM in the
    /// memory file.
    pub fn plugged(&self) -> &[(u64, u64)] {
        self.hotplug.as_ref().map_or(&[], |h| &h.device.plugged)
    }
}

/// What a snapshot wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotReport {
    pub dir: PathBuf,
    pub state_bytes: u64,
    pub memory_bytes: u64,
}

fn io<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

/// Creates `dir` (it must not exist) and writes `state` and guest RAM into
/// it. On an error nothing in `dir` is to be trusted: the caller's VM is
/// untouched and stays paused.
pub fn write(
    dir: &Path,
    state: &VmSnapshot,
    ram: &GuestRam,
) -> Result<SnapshotReport, SnapshotError> {
    std::fs::create_dir(dir).map_err(io(dir, "cannot create the snapshot directory"))?;
    let memory = dir.join(MEMORY_FILE);
    let memory_bytes = write_memory(&memory, ram, state.plugged())?;
    let path = dir.join(STATE_FILE);
    file::write(&path, state)?;
    let state_bytes = std::fs::metadata(&path)
        .map(|m| m.len())
        .map_err(io(&path, "cannot read back the state file's size"))?;
    Ok(SnapshotReport {
        dir: dir.to_path_buf(),
        state_bytes,
        memory_bytes,
    })
}

/// Boot RAM's ranges, then the plugged hotplug blocks, one after the
/// other.
fn saved_ranges(ram: &GuestRam, plugged: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let boot = ram.ranges.iter().map(|r| (r.start, r.size));
    boot.chain(plugged.iter().copied()).collect()
}

/// Guest memory ([`saved_ranges`]), one range after the other, into a new
/// file at `path`.
fn write_memory(path: &Path, ram: &GuestRam, plugged: &[(u64, u64)]) -> Result<u64, SnapshotError> {
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io(path, "cannot create"))?;
    let written = each_chunk(&saved_ranges(ram, plugged), |at, chunk| {
        ram.memory
            .read_slice(chunk, GuestAddress(at))
            .map_err(|e| SnapshotError::Io {
                path: path.to_path_buf(),
                what: "cannot read guest memory",
                source: std::io::Error::other(e.to_string()),
            })?;
        out.write_all(chunk).map_err(io(path, "cannot write"))
    })?;
    out.sync_all().map_err(io(path, "cannot sync"))?;
    Ok(written)
}

/// Calls `f` on each [`CHUNK`] of `ranges` (guest address, size) in
/// order, with its guest address and a buffer of its length; returns the
/// bytes covered.
fn each_chunk(
    ranges: &[(u64, u64)],
    mut f: impl FnMut(u64, &mut [u8]) -> Result<(), SnapshotError>,
) -> Result<u64, SnapshotError> {
    let mut buffer = vec![0u8; CHUNK];
    let mut covered = 0u64;
    for &(start, size) in ranges {
        let mut at = start;
        let end = start.saturating_add(size);
        while at < end {
            let len = usize::try_from(end - at).map_or(CHUNK, |left| left.min(CHUNK));
            f(at, buffer.get_mut(..len).unwrap_or_default())?;
            at = at.saturating_add(len as u64);
            covered = covered.saturating_add(len as u64);
        }
    }
    Ok(covered)
}

/// Reads a snapshot's state file (every check of [`file::read`]), whose
/// vCPU states must be vCPU 0, 1, ... in order.
pub fn read_state(dir: &Path) -> Result<VmSnapshot, SnapshotError> {
    let state: VmSnapshot = file::read(&dir.join(STATE_FILE))?;
    check_vcpu_ids(&state.vcpus)?;
    Ok(state)
}

/// The vCPU states are those of vCPUs 0, 1, ..., in that order (a vCPU's
/// state holds its APIC ID: a state given to another vCPU is another CPU).
pub fn check_vcpu_ids(vcpus: &[VcpuState]) -> Result<(), SnapshotError> {
    let in_order = vcpus
        .iter()
        .enumerate()
        .all(|(index, v)| usize::from(v.id) == index);
    match in_order && !vcpus.is_empty() {
        true => Ok(()),
        false => Err(SnapshotError::VcpuIds {
            found: vcpus.iter().map(|v| v.id).collect(),
        }),
    }
}

/// Fills `ram` (laid out for the snapshot's memory size) from the memory
/// file: boot RAM, then the `plugged` blocks; the file must be exactly as
/// large as they are.
pub fn read_memory(
    dir: &Path,
    ram: &GuestRam,
    plugged: &[(u64, u64)],
) -> Result<(), SnapshotError> {
    let ranges = saved_ranges(ram, plugged);
    let expected = ranges
        .iter()
        .fold(0u64, |total, &(_, size)| total.saturating_add(size));
    let path = dir.join(MEMORY_FILE);
    let mut input = std::fs::File::open(&path).map_err(io(&path, "cannot open"))?;
    let found = input
        .metadata()
        .map(|m| m.len())
        .map_err(io(&path, "cannot read its size"))?;
    if found != expected {
        return Err(SnapshotError::MemorySize {
            path,
            expected,
            found,
        });
    }
    each_chunk(&ranges, |at, chunk| {
        input.read_exact(chunk).map_err(io(&path, "cannot read"))?;
        ram.memory
            .write_slice(chunk, GuestAddress(at))
            .map_err(|e| SnapshotError::Io {
                path: path.clone(),
                what: "cannot fill guest memory",
                source: std::io::Error::other(e.to_string()),
            })
    })?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("microvm-snap-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn guest_memory_goes_to_the_file_and_back() {
        let size = 64 << 20;
        let ram = GuestRam::new(size).unwrap();
        for range in &ram.ranges {
            let end = range.start + range.size - 8;
            ram.memory
                .write_obj(range.start ^ 0x5a5a, GuestAddress(range.start))
                .unwrap();
            ram.memory
                .write_obj(end ^ 0xa5a5, GuestAddress(end))
                .unwrap();
        }
        let dir = dir("memory");
        std::fs::create_dir(&dir).unwrap();
        assert_eq!(
            write_memory(&dir.join(MEMORY_FILE), &ram, &[]).unwrap(),
            size
        );

        let copy = GuestRam::new(size).unwrap();
        read_memory(&dir, &copy, &[]).unwrap();
        for range in &copy.ranges {
            let end = range.start + range.size - 8;
            assert_eq!(
                copy.memory
                    .read_obj::<u64>(GuestAddress(range.start))
                    .unwrap(),
                range.start ^ 0x5a5a
            );
            assert_eq!(
                copy.memory.read_obj::<u64>(GuestAddress(end)).unwrap(),
                end ^ 0xa5a5
            );
        }
        // A memory file of another size is refused before anything is read.
        let large = GuestRam::new(128 << 20).unwrap();
        let error = read_memory(&dir, &large, &[]).unwrap_err().to_string();
        assert!(
            error.contains(
                "the memory file is 67108864 bytes; the state says guest RAM is 134217728"
            ),
            "{error}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_snapshot_never_writes_into_a_directory_that_exists() {
        let dir = dir("exists");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("keep"), b"mine").unwrap();
        let ram = GuestRam::new(64 << 20).unwrap();
        let state = state(64 << 20, Vec::new());
        let error = write(&dir, &state, &ram).unwrap_err().to_string();
        assert!(
            error.contains("cannot create the snapshot directory"),
            "{error}"
        );
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    pub(crate) fn vcpu(id: u8) -> VcpuState {
        VcpuState {
            id,
            cpuid: Vec::new(),
            sregs: Default::default(),
            regs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            msrs: Vec::new(),
            lapic: Default::default(),
            events: Default::default(),
            mp_state: Default::default(),
        }
    }

    #[test]
    fn vcpu_states_must_be_those_of_vcpus_0_1_in_order() {
        assert!(check_vcpu_ids(&[vcpu(0), vcpu(1), vcpu(2)]).is_ok());
        for ids in [&[][..], &[1, 0], &[0, 0], &[0, 2], &[1]] {
            let vcpus: Vec<VcpuState> = ids.iter().map(|&id| vcpu(id)).collect();
            let error = check_vcpu_ids(&vcpus).unwrap_err().to_string();
            assert!(error.contains(&format!("for vCPUs {ids:?}")), "{error}");
        }
    }

    /// A VM of `memory_bytes` and `vcpus` with nothing else in its state
    /// (for tests that write or send one).
    pub(crate) fn state(memory_bytes: u64, vcpus: Vec<VcpuState>) -> VmSnapshot {
        VmSnapshot {
            memory_bytes,
            vcpus,
            vm: VmState {
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                clock: Default::default(),
            },
            serial: Default::default(),
            devices: Default::default(),
            hotplug: None,
            iommu: None,
        }
    }
}
