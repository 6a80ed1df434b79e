//! Address spaces: the canonical mappings of each IOVA space, and the
//! devices attached to them.
//!
//! Every source of change (boot memory, memory hotplug, the vIOMMU) hands
//! [`DmaSpaces::commit`] one [`Plan`]: changes to one or more spaces and
//! devices moving between spaces. The plan becomes one transaction per
//! affected device — so one batch — and is applied all or nothing: if a
//! device refuses, the devices already changed are put back and no space
//! changes. Attaching a device replays its space to it as one transaction,
//! detaching removes it as one, moving it swaps its IOTLB in one.
//!
//! The identity space ([`SpaceId::IDENTITY`], IOVA = guest physical address)
//! always exists; translated spaces (one per vIOMMU domain) are created and
//! destroyed by their owner.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use super::backend::IotlbBackend;
use super::engine::{
    apply_ops, checked_op, intersecting, CommitReport, DmaError, DmaMapper, Op, SegMap, Transaction,
};
use super::DmaRange;

/// The ASID a device's IOTLB is programmed in. Our vDPA net devices keep
/// all their virtqueues in group 0, so one address space per device.
pub const DEVICE_ASID: u32 = 0;

/// How many records [`DmaSpaces::history`] keeps.
pub const HISTORY_LEN: usize = 64;

/// A device whose IOTLB an address space programs. Object safe, so a space
/// can hold real vhost-vdpa engines and recording ones side by side.
pub trait DmaDevice: Send {
    /// Applies `change` to the device as one transaction (one batch); on
    /// error the device keeps what it had (see [`DmaMapper::commit`]).
    fn commit_change(&mut self, change: &Change) -> Result<CommitReport, DmaError>;
    /// What the device holds now, sorted by IOVA.
    fn device_mappings(&self) -> Vec<DmaRange>;
    /// Re-sends everything the device holds as one transaction, for a
    /// device that may have dropped its IOTLB (see [`DmaMapper::replay`]).
    fn replay_all(&mut self) -> Result<CommitReport, DmaError>;
}

impl<B: IotlbBackend> DmaDevice for DmaMapper<B> {
    fn commit_change(&mut self, change: &Change) -> Result<CommitReport, DmaError> {
        self.commit(Transaction::from_ops(DEVICE_ASID, change.ops.clone()))
    }

    fn device_mappings(&self) -> Vec<DmaRange> {
        self.mappings(DEVICE_ASID)
    }

    fn replay_all(&mut self) -> Result<CommitReport, DmaError> {
        self.replay(DEVICE_ASID)
    }
}

pub type SharedDmaDevice = Arc<Mutex<dyn DmaDevice>>;

/// Names an address space. 64 bits, and never one of a live space: see
/// [`DmaSpaces::create_space`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpaceId(u64);

impl SpaceId {
    /// IOVA = guest physical address over all guest RAM.
    pub const IDENTITY: SpaceId = SpaceId(0);

    pub fn raw(self) -> u64 {
        self.0
    }
}

impl fmt::Display for SpaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            SpaceId::IDENTITY => write!(f, "identity"),
            SpaceId(id) => write!(f, "space {id}"),
        }
    }
}

/// A change to one address space: adds and removes, applied in order (an
/// add replaces whatever it covers, a remove cuts whatever is mapped).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Change {
    ops: Vec<Op>,
}

impl Change {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, range: DmaRange) -> &mut Self {
        self.ops.push(Op::Add(range));
        self
    }

    pub fn remove(&mut self, iova: u64, size: u64) -> &mut Self {
        self.ops.push(Op::Remove { iova, size });
        self
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Everything out, then `mappings` in: the engine beneath turns this
    /// into the minimal diff from what the device holds.
    fn replace_all<'a>(mappings: impl IntoIterator<Item = &'a DmaRange>) -> Change {
        let mut change = Change::new();
        // [0, 2^64 - 1] is 2^64 bytes: two removes cover it.
        change.remove(0, u64::MAX).remove(u64::MAX, 1);
        for range in mappings {
            change.add(*range);
        }
        change
    }

    fn extend(&mut self, other: &Change) {
        self.ops.extend_from_slice(&other.ops);
    }

    /// (iova, size) of every add, for records.
    fn added(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ops.iter().filter_map(|op| match op {
            Op::Add(r) => Some((r.iova, r.size)),
            Op::Remove { .. } => None,
        })
    }

    /// (iova, size) of every remove, for records.
    fn removed(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ops.iter().filter_map(|op| match op {
            Op::Remove { iova, size } => Some((*iova, *size)),
            Op::Add(_) => None,
        })
    }
}

/// Which source a transaction came from; one set of kinds for every record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// Boot RAM, when the identity space is first filled.
    BootMemory,
    /// A device joined, left or moved between spaces.
    Attach,
    /// A guest PLUG request (virtio-mem).
    Plug,
    /// A guest UNPLUG or UNPLUG_ALL request (virtio-mem).
    Unplug,
    /// One drain of the vIOMMU's request queue.
    Iommu,
    /// A device's space sent to it again after a device reset that may
    /// have dropped its IOTLB.
    Replay,
    /// Puts back what an earlier plan changed, when a step after it failed
    /// (see [`DmaSpaces::commit_undoable`]).
    Undo,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::BootMemory => "boot",
            ChangeKind::Attach => "attach",
            ChangeKind::Plug => "plug",
            ChangeKind::Unplug => "unplug",
            ChangeKind::Iommu => "iommu",
            ChangeKind::Replay => "replay",
            ChangeKind::Undo => "undo",
        }
    }
}

/// One atomic step: changes to spaces and devices moving between spaces.
#[derive(Debug)]
pub struct Plan {
    kind: ChangeKind,
    started: Instant,
    changes: Vec<(SpaceId, Change)>,
    moves: Vec<(String, Option<SpaceId>)>,
}

impl Plan {
    /// A plan whose latency is measured from now.
    pub fn new(kind: ChangeKind) -> Self {
        Self::started_at(kind, Instant::now())
    }

    /// A plan whose latency is measured from `started` (when the request
    /// that caused it reached the VMM).
    pub fn started_at(kind: ChangeKind, started: Instant) -> Self {
        Plan {
            kind,
            started,
            changes: Vec::new(),
            moves: Vec::new(),
        }
    }

    /// Applies `change` to `space` (after earlier changes of this plan).
    pub fn change(&mut self, space: SpaceId, change: Change) -> &mut Self {
        if !change.is_empty() {
            self.changes.push((space, change));
        }
        self
    }

    /// Attaches `device` to `space`, or detaches it with `None`; the last
    /// move of a device in a plan wins.
    pub fn attach(&mut self, device: &str, space: Option<SpaceId>) -> &mut Self {
        self.moves.retain(|(d, _)| d != device);
        self.moves.push((device.to_string(), space));
        self
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.moves.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpaceError {
    #[error("no address space {0}")]
    NoSpace(SpaceId),
    #[error("no DMA device '{0}'")]
    NoDevice(String),
    #[error("a DMA device '{0}' is already registered")]
    Duplicate(String),
    #[error("{0} still has devices attached")]
    Busy(SpaceId),
    /// A range of the plan is empty or wraps; nothing was sent.
    #[error("invalid change: {0}")]
    Invalid(#[source] DmaError),
    /// A device refused its transaction; the devices already changed were
    /// put back (those in `restore_failed` refused that too and need a
    /// reset) and no space changed.
    #[error(
        "device '{device}' refused the change: {source}{}",
        restore_note(restore_failed)
    )]
    Device {
        device: String,
        /// Boxed: the engine's error is large and refusals are rare.
        #[source]
        source: Box<DmaError>,
        restore_failed: Vec<String>,
    },
}

fn restore_note(failed: &[String]) -> String {
    match failed.is_empty() {
        true => String::new(),
        false => format!("; restoring {} failed too", failed.join(", ")),
    }
}

impl SpaceError {
    /// The engine's error behind a refusal, when a device refused.
    pub fn dma_error(&self) -> Option<&DmaError> {
        match self {
            SpaceError::Invalid(e) => Some(e),
            SpaceError::Device { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// What one device was sent for one plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceReport {
    pub device: String,
    pub updates: u32,
    pub invalidates: u32,
    pub batched: bool,
    /// From the plan's start to this device's END message.
    pub micros_to_end: u64,
}

impl DeviceReport {
    /// Every message the device got, batch brackets included.
    pub fn messages(&self) -> u32 {
        let sent = self.updates.saturating_add(self.invalidates);
        let brackets = if self.batched && sent > 0 { 2 } else { 0 };
        sent.saturating_add(brackets)
    }
}

/// One committed (or refused) plan, as the history keeps it.
#[derive(Clone, Debug)]
pub struct TransactionRecord {
    pub sequence: u64,
    pub kind: ChangeKind,
    /// (iova, size) per add and per remove, over every space it changed.
    pub added: Vec<(u64, u64)>,
    pub removed: Vec<(u64, u64)>,
    /// (device, new space) per device that moved.
    pub moves: Vec<(String, Option<SpaceId>)>,
    pub devices: Vec<DeviceReport>,
    pub error: Option<String>,
}

struct Attached {
    device: SharedDmaDevice,
    space: Option<SpaceId>,
}

/// Every address space of the VM and every DMA device, with the
/// transaction history. Shared as [`SharedSpaces`].
pub struct DmaSpaces {
    spaces: BTreeMap<SpaceId, SegMap>,
    devices: BTreeMap<String, Attached>,
    next_space: u64,
    sequence: u64,
    history: VecDeque<TransactionRecord>,
}

pub type SharedSpaces = Arc<Mutex<DmaSpaces>>;

fn lock(device: &SharedDmaDevice) -> MutexGuard<'_, dyn DmaDevice + 'static> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}

impl Default for DmaSpaces {
    fn default() -> Self {
        Self::new()
    }
}

impl DmaSpaces {
    /// The identity space, empty, and no devices.
    pub fn new() -> Self {
        DmaSpaces {
            spaces: BTreeMap::from([(SpaceId::IDENTITY, SegMap::new())]),
            devices: BTreeMap::new(),
            next_space: 1,
            sequence: 0,
            history: VecDeque::new(),
        }
    }

    pub fn shared(self) -> SharedSpaces {
        Arc::new(Mutex::new(self))
    }

    /// A new, empty translated space. Its id is no live space's: ids
    /// count up in 64 bits and, should they ever wrap, skip live ones
    /// (fewer than 2^64 - 1 spaces can live, so one is free).
    pub fn create_space(&mut self) -> SpaceId {
        loop {
            let id = SpaceId(self.next_space);
            self.next_space = self.next_space.checked_add(1).unwrap_or(1);
            if let std::collections::btree_map::Entry::Vacant(slot) = self.spaces.entry(id) {
                slot.insert(SegMap::new());
                return id;
            }
        }
    }

    /// The next id handed out becomes `next` (at least 1): tests of what
    /// happens after very many spaces.
    #[cfg(test)]
    pub(crate) fn skip_space_ids_for_tests(&mut self, next: u64) {
        self.next_space = next.max(1);
    }

    /// Forgets a space no device is attached to (the identity space stays).
    pub fn destroy_space(&mut self, id: SpaceId) -> Result<(), SpaceError> {
        if !self.spaces.contains_key(&id) || id == SpaceId::IDENTITY {
            return Err(SpaceError::NoSpace(id));
        }
        if self.devices.values().any(|a| a.space == Some(id)) {
            return Err(SpaceError::Busy(id));
        }
        self.spaces.remove(&id);
        Ok(())
    }

    /// Makes `device` known under `id`, attached to no space: it reaches
    /// nothing until a plan attaches it.
    pub fn register(&mut self, id: &str, device: SharedDmaDevice) -> Result<(), SpaceError> {
        if self.devices.contains_key(id) {
            return Err(SpaceError::Duplicate(id.to_string()));
        }
        self.devices.insert(
            id.to_string(),
            Attached {
                device,
                space: None,
            },
        );
        Ok(())
    }

    /// The space's mappings, sorted by IOVA.
    pub fn mappings(&self, space: SpaceId) -> Result<Vec<DmaRange>, SpaceError> {
        let table = self.spaces.get(&space).ok_or(SpaceError::NoSpace(space))?;
        Ok(table.values().map(|s| s.to_range()).collect())
    }

    /// How many mappings the space holds.
    pub fn mapping_count(&self, space: SpaceId) -> Option<usize> {
        self.spaces.get(&space).map(|t| t.len())
    }

    /// Where `device` is attached.
    pub fn space_of(&self, device: &str) -> Result<Option<SpaceId>, SpaceError> {
        self.devices
            .get(device)
            .map(|a| a.space)
            .ok_or_else(|| SpaceError::NoDevice(device.to_string()))
    }

    /// Devices attached to `space`.
    pub fn devices_in(&self, space: SpaceId) -> Vec<String> {
        self.devices
            .iter()
            .filter(|(_, a)| a.space == Some(space))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The latest transactions, oldest first.
    pub fn history(&self) -> Vec<TransactionRecord> {
        self.history.iter().cloned().collect()
    }

    /// Sequence number of the latest record (0 before any).
    pub fn last_sequence(&self) -> u64 {
        self.sequence
    }

    /// Applies `plan` to every space and device it touches, all or nothing;
    /// each affected device gets exactly one transaction.
    pub fn commit(&mut self, plan: Plan) -> Result<Vec<DeviceReport>, SpaceError> {
        let mut reports = Vec::new();
        let result = self.try_commit(&plan, &mut reports);
        let error = result.as_ref().err().map(ToString::to_string);
        self.record(&plan, reports.clone(), error);
        result.map(|()| reports)
    }

    /// Like [`DmaSpaces::commit`], and returns the plan that puts every
    /// space and device back as they were before it: for a source whose
    /// later step (a KVM slot, say) may still fail after the devices
    /// changed. Costs what the plan touches, not what the spaces hold.
    pub fn commit_undoable(&mut self, plan: Plan) -> Result<(Vec<DeviceReport>, Plan), SpaceError> {
        let undo = self.undo_of(&plan);
        self.commit(plan).map(|reports| (reports, undo))
    }

    /// For every space `plan` changes: its spans out, then what the space
    /// holds in them now back in; every device that moves goes back.
    fn undo_of(&self, plan: &Plan) -> Plan {
        let mut undo = Plan::started_at(ChangeKind::Undo, plan.started);
        let mut spans: BTreeMap<SpaceId, Vec<(u64, u64)>> = BTreeMap::new();
        for (space, change) in &plan.changes {
            let entry = spans.entry(*space).or_default();
            for op in &change.ops {
                let (iova, size) = match *op {
                    Op::Add(r) => (r.iova, r.size),
                    Op::Remove { iova, size } => (iova, size),
                };
                // An invalid op fails the plan itself: nothing to undo.
                if let Some(last) = super::inclusive_last(iova, size) {
                    entry.push((iova, last));
                }
            }
        }
        for (space, spans) in spans {
            let Some(table) = self.spaces.get(&space) else {
                continue;
            };
            let mut change = Change::new();
            let mut held = BTreeMap::new();
            for &(iova, last) in &spans {
                change.remove(iova, last - iova + 1);
                held.extend(
                    intersecting(table, iova, last)
                        .into_iter()
                        .map(|s| (s.start, s)),
                );
            }
            for seg in held.values() {
                change.add(seg.to_range());
            }
            undo.change(space, change);
        }
        for (device, _) in &plan.moves {
            if let Some(attached) = self.devices.get(device) {
                undo.attach(device, attached.space);
            }
        }
        undo
    }

    /// Sends `device` everything its space holds again, as one transaction
    /// (kind [`ChangeKind::Replay`], kept in the history): after a device
    /// reset that may have dropped its IOTLB. A device in no space holds
    /// nothing and gets nothing.
    pub fn replay(&mut self, device: &str) -> Result<DeviceReport, SpaceError> {
        let started = Instant::now();
        let attached = self
            .devices
            .get(device)
            .ok_or_else(|| SpaceError::NoDevice(device.to_string()))?;
        let mut plan = Plan::started_at(ChangeKind::Replay, started);
        // The record names what was sent again: the device's space.
        if let Some(table) = attached
            .space
            .and_then(|s| self.spaces.get(&s).map(|t| (s, t)))
        {
            let mut change = Change::new();
            for seg in table.1.values() {
                change.add(seg.to_range());
            }
            plan.change(table.0, change);
        }
        let result = lock(&attached.device).replay_all();
        let (report, error) = match result {
            Ok(report) => {
                let report = DeviceReport {
                    device: device.to_string(),
                    updates: report.updates,
                    invalidates: report.invalidates,
                    batched: report.batched,
                    micros_to_end: micros_since(started),
                };
                (Ok(report), None)
            }
            Err(source) => {
                let error = SpaceError::Device {
                    device: device.to_string(),
                    source: Box::new(source),
                    restore_failed: Vec::new(),
                };
                let text = error.to_string();
                (Err(error), Some(text))
            }
        };
        let reports = report.iter().cloned().collect();
        self.record(&plan, reports, error);
        report
    }

    /// Fills `reports` with the devices it reached, even when it fails.
    fn try_commit(
        &mut self,
        plan: &Plan,
        reports: &mut Vec<DeviceReport>,
    ) -> Result<(), SpaceError> {
        // Every check first, so a bad plan sends nothing and changes no
        // space.
        for (space, change) in &plan.changes {
            if !self.spaces.contains_key(space) {
                return Err(SpaceError::NoSpace(*space));
            }
            for op in &change.ops {
                checked_op(op).map_err(SpaceError::Invalid)?;
            }
        }
        for (device, target) in &plan.moves {
            if !self.devices.contains_key(device) {
                return Err(SpaceError::NoDevice(device.clone()));
            }
            if let Some(space) = target {
                if !self.spaces.contains_key(space) {
                    return Err(SpaceError::NoSpace(*space));
                }
            }
        }
        // The spaces change in place (no copy of what the plan does not
        // touch); `undo` puts them back if a device refuses.
        let undo = self.undo_of(plan);
        apply_changes(&mut self.spaces, &plan.changes);

        // One change per affected device, in a stable order.
        let mut work: Vec<(&String, &Attached, Change)> = Vec::new();
        for (id, attached) in &self.devices {
            let target = plan
                .moves
                .iter()
                .find(|(d, _)| d == id)
                .map_or(attached.space, |(_, s)| *s);
            let change = if target != attached.space {
                let empty = SegMap::new();
                let table = match target {
                    Some(space) => self.spaces.get(&space).unwrap_or(&empty),
                    None => &empty,
                };
                Change::replace_all(&table.values().map(|s| s.to_range()).collect::<Vec<_>>())
            } else {
                let mut change = Change::new();
                for (space, part) in &plan.changes {
                    if Some(*space) == attached.space {
                        change.extend(part);
                    }
                }
                change
            };
            if !change.is_empty() {
                work.push((id, attached, change));
            }
        }

        for (index, (id, attached, change)) in work.iter().enumerate() {
            match lock(&attached.device).commit_change(change) {
                Ok(report) => reports.push(DeviceReport {
                    device: (*id).clone(),
                    updates: report.updates,
                    invalidates: report.invalidates,
                    batched: report.batched,
                    micros_to_end: micros_since(plan.started),
                }),
                Err(source) => {
                    // The spaces first: restoring a device sends it its
                    // space as it was.
                    apply_changes(&mut self.spaces, &undo.changes);
                    let restore_failed = work
                        .iter()
                        .take(index)
                        .filter(|(_, done, _)| !self.restore(done))
                        .map(|(id, _, _)| (*id).clone())
                        .collect();
                    let error = SpaceError::Device {
                        device: (*id).clone(),
                        source: Box::new(source),
                        restore_failed,
                    };
                    return Err(error);
                }
            }
        }

        for (device, target) in &plan.moves {
            if let Some(attached) = self.devices.get_mut(device) {
                attached.space = *target;
            }
        }
        Ok(())
    }

    /// Puts back what `attached` held before this plan: its space as it
    /// still is here. False if the device refused that too.
    fn restore(&self, attached: &Attached) -> bool {
        let previous = attached
            .space
            .and_then(|space| self.spaces.get(&space))
            .map(|table| table.values().map(|s| s.to_range()).collect::<Vec<_>>())
            .unwrap_or_default();
        lock(&attached.device)
            .commit_change(&Change::replace_all(&previous))
            .is_ok()
    }

    fn record(&mut self, plan: &Plan, devices: Vec<DeviceReport>, error: Option<String>) {
        self.sequence += 1;
        if self.history.len() == HISTORY_LEN {
            self.history.pop_front();
        }
        let changes = plan.changes.iter().map(|(_, c)| c);
        self.history.push_back(TransactionRecord {
            sequence: self.sequence,
            kind: plan.kind,
            added: changes.clone().flat_map(Change::added).collect(),
            removed: changes.flat_map(Change::removed).collect(),
            moves: plan.moves.clone(),
            devices,
            error,
        });
    }
}

/// Applies checked `changes` to their spaces, in order.
fn apply_changes(spaces: &mut BTreeMap<SpaceId, SegMap>, changes: &[(SpaceId, Change)]) {
    for (space, change) in changes {
        if let Some(table) = spaces.get_mut(space) {
            // Checked before: an invalid op cannot come up here, and one
            // would leave its table as it was.
            let _ = apply_ops(table, &change.ops);
        }
    }
}

fn micros_since(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX)
}
