//! The engine: keeps each address space's IOTLB as the device holds it and
//! turns a transaction into the smallest correct list of IOTLB messages.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound::{Excluded, Included};
use std::ops::RangeInclusive;

use super::backend::{BackendError, IotlbBackend, IotlbMessage};
use super::{inclusive_last, DmaRange, Perm};

/// Why a transaction was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    /// An add or remove with size 0, or one that runs past 2^64-1.
    #[error("invalid range: iova {iova:#x} size {size:#x} is empty or wraps past 2^64")]
    InvalidRange { iova: u64, size: u64 },
    /// An add whose host addresses run past 2^64-1.
    #[error("invalid range: host address {host_addr:#x} size {size:#x} wraps past 2^64")]
    InvalidHostRange { host_addr: u64, size: u64 },
    /// A resulting mapping would lie (partly) outside what the device can
    /// address; nothing was sent.
    #[error(
        "mapping iova {iova:#x} size {size:#x} lies outside the device's IOVA range \
         {first:#x}..={last:#x}"
    )]
    OutOfIovaRange {
        iova: u64,
        size: u64,
        first: u64,
        last: u64,
    },
    /// The device refused a message; the engine undid what it had sent, so the
    /// device and the engine are back to the state before the transaction.
    #[error("the device refused {message} ({source}); previous mappings restored")]
    Backend {
        message: IotlbMessage,
        #[source]
        source: BackendError,
    },
    /// The device refused a message and then refused a compensating message
    /// too: the engine still describes the state before the transaction, but
    /// the device may hold something else. The device needs a reset.
    #[error(
        "the device refused {message} and then {} ({}) while restoring the previous \
         mappings; its IOTLB is unknown",
        rollback.message,
        rollback.error
    )]
    RollbackFailed {
        message: IotlbMessage,
        #[source]
        source: BackendError,
        /// The first compensating message the device refused (boxed: rare,
        /// and it would double the size of every `Result`).
        rollback: Box<RollbackFailure>,
    },
}

/// A compensating message the device refused during a rollback.
#[derive(Debug)]
pub struct RollbackFailure {
    pub message: IotlbMessage,
    pub error: BackendError,
}

/// A change to one address space, applied by [`DmaMapper::commit`] as a
/// whole or not at all. Operations apply in order: a later add over an earlier
/// mapping replaces it, a remove cuts whatever is mapped in its range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transaction {
    asid: u32,
    ops: Vec<Op>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Add(DmaRange),
    Remove { iova: u64, size: u64 },
}

impl Transaction {
    pub fn new(asid: u32) -> Self {
        Transaction {
            asid,
            ops: Vec::new(),
        }
    }

    pub fn asid(&self) -> u32 {
        self.asid
    }

    /// A transaction on `asid` made of operations recorded elsewhere.
    pub(crate) fn from_ops(asid: u32, ops: Vec<Op>) -> Self {
        Transaction { asid, ops }
    }

    /// No operation recorded.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Makes `range` reachable by the device (replacing whatever was mapped
    /// in its IOVA span).
    pub fn add(&mut self, range: DmaRange) {
        self.ops.push(Op::Add(range));
    }

    /// Makes `[iova, iova + size)` unreachable; unmapped parts are ignored.
    pub fn remove(&mut self, iova: u64, size: u64) {
        self.ops.push(Op::Remove { iova, size });
    }
}

/// What one successful commit sent (compensating messages not included).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitReport {
    pub updates: u32,
    pub invalidates: u32,
    /// Whether the messages were bracketed by BATCH_BEGIN … BATCH_END.
    pub batched: bool,
}

/// Totals since the mapper was created. Message counters count messages the
/// device accepted, compensating ones included.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DmaCounters {
    pub iotlb_update: u64,
    pub iotlb_invalidate: u64,
    pub batch_begin: u64,
    pub batch_end: u64,
    /// Bytes currently mapped, over all address spaces (saturating).
    pub bytes_mapped: u64,
    /// Transactions committed successfully (empty ones included).
    pub transactions: u64,
    /// Transactions refused or failed.
    pub failed_transactions: u64,
}

/// A contiguous mapping with an inclusive end, so that a range ending at
/// 2^64-1 is representable; `host` is the host address of `start`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Seg {
    pub(crate) start: u64,
    pub(crate) last: u64,
    pub(crate) host: u64,
    pub(crate) perm: Perm,
}

impl Seg {
    /// Size in bytes. Every stored segment is smaller than 2^64 (inputs are
    /// `DmaRange`s and merges that would reach 2^64 are not made).
    pub(crate) fn size(&self) -> u64 {
        (self.last - self.start).saturating_add(1)
    }

    pub(crate) fn to_range(self) -> DmaRange {
        DmaRange::new(self.start, self.size(), self.host, self.perm)
    }

    /// Host address backing `iova`, which must lie inside the segment.
    fn host_at(&self, iova: u64) -> u64 {
        self.host + (iova - self.start)
    }

    /// The part `[start, last]` of this segment (which must lie inside it).
    fn slice(&self, start: u64, last: u64) -> Seg {
        Seg {
            start,
            last,
            host: self.host_at(start),
            perm: self.perm,
        }
    }
}

/// Non-overlapping segments keyed by start.
pub(crate) type SegMap = BTreeMap<u64, Seg>;

/// Segments of `map` that intersect `[start, last]`, in IOVA order.
pub(crate) fn intersecting(map: &SegMap, start: u64, last: u64) -> Vec<Seg> {
    let mut out = Vec::new();
    if let Some((_, s)) = map.range(..=start).next_back() {
        if s.last >= start {
            out.push(*s);
        }
    }
    out.extend(
        map.range((Excluded(start), Included(last)))
            .map(|(_, s)| *s),
    );
    out
}

/// Removes `[start, last]` from `map`, keeping the parts of cut segments that
/// lie outside it (with their host offsets).
pub(crate) fn cut(map: &mut SegMap, start: u64, last: u64) {
    for seg in intersecting(map, start, last) {
        map.remove(&seg.start);
        if seg.start < start {
            map.insert(seg.start, seg.slice(seg.start, start - 1));
        }
        if seg.last > last {
            map.insert(last + 1, seg.slice(last + 1, seg.last));
        }
    }
}

/// Checks an operation and returns its inclusive span and, for an add, the
/// segment it maps.
pub(crate) fn checked_op(op: &Op) -> Result<(u64, u64, Option<Seg>), DmaError> {
    let (iova, size) = match *op {
        Op::Add(r) => (r.iova, r.size),
        Op::Remove { iova, size } => (iova, size),
    };
    let last = inclusive_last(iova, size).ok_or(DmaError::InvalidRange { iova, size })?;
    let add = match *op {
        Op::Add(r) => {
            inclusive_last(r.host_addr, size).ok_or(DmaError::InvalidHostRange {
                host_addr: r.host_addr,
                size,
            })?;
            Some(Seg {
                start: iova,
                last,
                host: r.host_addr,
                perm: r.perm,
            })
        }
        Op::Remove { .. } => None,
    };
    Ok((iova, last, add))
}

/// Applies `ops` in order to `map` (an add replaces what it covers); on an
/// invalid operation `map` is left as it was.
pub(crate) fn apply_ops(map: &mut SegMap, ops: &[Op]) -> Result<(), DmaError> {
    let checked = ops.iter().map(checked_op).collect::<Result<Vec<_>, _>>()?;
    for (start, last, add) in checked {
        cut(map, start, last);
        if let Some(seg) = add {
            map.insert(start, seg);
        }
    }
    Ok(())
}

/// Whether `map` maps every byte of `entry` exactly as `entry` does.
fn covers_exactly(map: &SegMap, entry: &Seg) -> bool {
    let mut cursor = entry.start;
    for seg in intersecting(map, entry.start, entry.last) {
        if seg.start > cursor
            || seg.perm != entry.perm
            || seg.host_at(cursor) != entry.host_at(cursor)
        {
            return false;
        }
        if seg.last >= entry.last {
            return true;
        }
        cursor = seg.last + 1;
    }
    false
}

/// Whether `next` continues `prev` in IOVA and host address with the same
/// permission, and the union stays below 2^64 bytes.
fn continues(prev: &Seg, next: &Seg) -> bool {
    prev.last.checked_add(1) == Some(next.start)
        && prev.perm == next.perm
        && prev.host.checked_add(next.start - prev.start) == Some(next.host)
        && next.last - prev.start != u64::MAX
}

/// One INVALIDATE and the entries it removes (for the rollback).
#[derive(Debug)]
struct Invalidation {
    start: u64,
    last: u64,
    removed: Vec<Seg>,
}

impl Invalidation {
    fn size(&self) -> u64 {
        (self.last - self.start).saturating_add(1)
    }
}

/// The messages a transaction needs, computed before anything is sent.
#[derive(Debug)]
struct Plan {
    invalidates: Vec<Invalidation>,
    updates: Vec<Seg>,
}

/// The DMA-mapping engine for one vDPA device. See the module documentation.
pub struct DmaMapper<B: IotlbBackend> {
    backend: B,
    iova_first: u64,
    iova_last: u64,
    batching: bool,
    /// Per ASID, exactly the entries the device holds: the UPDATEs we sent
    /// and did not invalidate since.
    tables: HashMap<u32, SegMap>,
    counters: DmaCounters,
    bytes_mapped: u128,
}

impl<B: IotlbBackend> DmaMapper<B> {
    /// `iova_range` is the device's usable IOVA range (inclusive, as
    /// VHOST_VDPA_GET_IOVA_RANGE reports it); `batching` says whether
    /// VHOST_BACKEND_F_IOTLB_BATCH was acked.
    pub fn new(backend: B, iova_range: RangeInclusive<u64>, batching: bool) -> Self {
        DmaMapper {
            backend,
            iova_first: *iova_range.start(),
            iova_last: *iova_range.end(),
            batching,
            tables: HashMap::new(),
            counters: DmaCounters::default(),
            bytes_mapped: 0,
        }
    }

    /// Starts a transaction on address space `asid`.
    pub fn begin(&mut self, asid: u32) -> Transaction {
        Transaction::new(asid)
    }

    pub fn iova_range(&self) -> RangeInclusive<u64> {
        self.iova_first..=self.iova_last
    }

    pub fn batching(&self) -> bool {
        self.batching
    }

    /// The device's current IOTLB entries for `asid`, sorted by IOVA.
    pub fn mappings(&self, asid: u32) -> Vec<DmaRange> {
        self.tables
            .get(&asid)
            .map(|t| t.values().map(|s| s.to_range()).collect())
            .unwrap_or_default()
    }

    pub fn counters(&self) -> DmaCounters {
        DmaCounters {
            bytes_mapped: u64::try_from(self.bytes_mapped).unwrap_or(u64::MAX),
            ..self.counters
        }
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Sends the smallest set of messages that turns the device's IOTLB for
    /// the transaction's ASID into the requested one. On any error the device
    /// (unless [`DmaError::RollbackFailed`]) and the engine keep the state
    /// they had before.
    pub fn commit(&mut self, txn: Transaction) -> Result<CommitReport, DmaError> {
        let result = self.try_commit(&txn);
        match result {
            Ok(_) => self.counters.transactions += 1,
            Err(_) => self.counters.failed_transactions += 1,
        }
        result
    }

    fn try_commit(&mut self, txn: &Transaction) -> Result<CommitReport, DmaError> {
        let asid = txn.asid;
        let plan = self.plan(txn)?;
        if plan.invalidates.is_empty() && plan.updates.is_empty() {
            return Ok(CommitReport::default());
        }

        if self.batching {
            let begin = IotlbMessage::BatchBegin { asid };
            // Nothing was sent yet and no batch is open: nothing to undo.
            self.send(begin).map_err(|source| DmaError::Backend {
                message: begin,
                source,
            })?;
        }

        let mut sent = Sent::default();
        for (i, inv) in plan.invalidates.iter().enumerate() {
            let msg = IotlbMessage::Invalidate {
                asid,
                iova: inv.start,
                size: inv.size(),
            };
            if let Err(e) = self.send(msg) {
                return Err(self.roll_back(asid, &plan, &sent, msg, e));
            }
            sent.invalidates = i + 1;
        }
        for (i, seg) in plan.updates.iter().enumerate() {
            let msg = IotlbMessage::Update {
                asid,
                range: seg.to_range(),
            };
            if let Err(e) = self.send(msg) {
                return Err(self.roll_back(asid, &plan, &sent, msg, e));
            }
            sent.updates = i + 1;
        }
        if self.batching {
            let end = IotlbMessage::BatchEnd { asid };
            if let Err(e) = self.send(end) {
                return Err(self.roll_back(asid, &plan, &sent, end, e));
            }
        }

        let report = CommitReport {
            updates: count(plan.updates.len()),
            invalidates: count(plan.invalidates.len()),
            batched: self.batching,
        };
        self.apply(asid, plan);
        Ok(report)
    }

    /// Re-sends every entry of `asid`: each is invalidated, then updated,
    /// in one batch. For a device that may have dropped its mappings (a
    /// reset without VHOST_BACKEND_F_IOTLB_PERSIST lets a parent clean
    /// them); the engine's own state does not change.
    pub fn replay(&mut self, asid: u32) -> Result<CommitReport, DmaError> {
        let entries = self.mappings(asid);
        if entries.is_empty() {
            return Ok(CommitReport::default());
        }
        let mut messages = Vec::with_capacity(2 * entries.len() + 2);
        if self.batching {
            messages.push(IotlbMessage::BatchBegin { asid });
        }
        messages.extend(entries.iter().map(|e| IotlbMessage::Invalidate {
            asid,
            iova: e.iova,
            size: e.size,
        }));
        messages.extend(
            entries
                .iter()
                .map(|&range| IotlbMessage::Update { asid, range }),
        );
        for (i, &message) in messages.iter().enumerate() {
            if let Err(source) = self.send(message) {
                // Close a batch we opened; the device's state is unknown now.
                if self.batching && i > 0 {
                    let _ = self.send(IotlbMessage::BatchEnd { asid });
                }
                return Err(DmaError::Backend { message, source });
            }
        }
        if self.batching {
            let end = IotlbMessage::BatchEnd { asid };
            self.send(end).map_err(|source| DmaError::Backend {
                message: end,
                source,
            })?;
        }
        Ok(CommitReport {
            updates: count(entries.len()),
            invalidates: count(entries.len()),
            batched: self.batching,
        })
    }

    /// Computes the diff; refuses the transaction before anything is sent.
    fn plan(&self, txn: &Transaction) -> Result<Plan, DmaError> {
        let empty = SegMap::new();
        let entries = self.tables.get(&txn.asid).unwrap_or(&empty);

        // The entries the transaction may touch, and the requested state of
        // the IOVA space they and the transaction's ranges cover.
        let mut candidates = SegMap::new();
        let mut wanted = SegMap::new();
        let mut ops = Vec::with_capacity(txn.ops.len());
        for op in &txn.ops {
            let (iova, last, add) = checked_op(op)?;
            for e in intersecting(entries, iova, last) {
                candidates.insert(e.start, e);
                wanted.insert(e.start, e);
            }
            ops.push((iova, last, add));
        }
        for (start, last, add) in ops {
            cut(&mut wanted, start, last);
            if let Some(seg) = add {
                wanted.insert(start, seg);
            }
        }

        // An entry that still maps exactly as before is kept and never
        // re-sent; any other touched entry is invalidated, and its surviving
        // parts are still in `wanted` to be sent again.
        let mut dirty = Vec::new();
        for e in candidates.values() {
            if covers_exactly(&wanted, e) {
                cut(&mut wanted, e.start, e.last);
            } else {
                dirty.push(*e);
            }
        }

        let mut updates: Vec<Seg> = Vec::new();
        for seg in wanted.values() {
            match updates.last_mut() {
                Some(prev) if continues(prev, seg) => prev.last = seg.last,
                _ => updates.push(*seg),
            }
        }
        for u in &updates {
            if u.start < self.iova_first || u.last > self.iova_last {
                return Err(DmaError::OutOfIovaRange {
                    iova: u.start,
                    size: u.size(),
                    first: self.iova_first,
                    last: self.iova_last,
                });
            }
        }

        // The kernel drops every entry intersecting an INVALIDATE whole, so
        // dirty entries share one INVALIDATE only when no other entry lies
        // between them. Gaps without entries are fine: invalidates go first,
        // before any new entry exists.
        let mut invalidates: Vec<Invalidation> = Vec::new();
        for e in dirty {
            if let Some(prev) = invalidates.last_mut() {
                let nothing_between = entries
                    .range((Excluded(prev.last), Excluded(e.start)))
                    .next()
                    .is_none();
                if nothing_between && e.last - prev.start != u64::MAX {
                    prev.last = e.last;
                    prev.removed.push(e);
                    continue;
                }
            }
            invalidates.push(Invalidation {
                start: e.start,
                last: e.last,
                removed: vec![e],
            });
        }

        Ok(Plan {
            invalidates,
            updates,
        })
    }

    /// Puts the device back to the state before the transaction after
    /// `failed` was refused: invalidates the entries this transaction
    /// created, re-sends the ones it invalidated, closes the batch.
    fn roll_back(
        &mut self,
        asid: u32,
        plan: &Plan,
        sent: &Sent,
        failed: IotlbMessage,
        source: BackendError,
    ) -> DmaError {
        let mut compensation = Vec::new();
        for seg in plan.updates[..sent.updates].iter().rev() {
            compensation.push(IotlbMessage::Invalidate {
                asid,
                iova: seg.start,
                size: seg.size(),
            });
        }
        for inv in &plan.invalidates[..sent.invalidates] {
            for e in &inv.removed {
                compensation.push(IotlbMessage::Update {
                    asid,
                    range: e.to_range(),
                });
            }
        }
        let mut rollback_failure = None;
        for msg in compensation {
            if let Err(e) = self.send(msg) {
                rollback_failure = Some((msg, e));
                break;
            }
        }
        // The batch opened by this transaction is still open on the device
        // (a refused message, even BATCH_END, does not close it).
        if self.batching {
            let end = IotlbMessage::BatchEnd { asid };
            if let Err(e) = self.send(end) {
                rollback_failure.get_or_insert((end, e));
            }
        }
        match rollback_failure {
            None => DmaError::Backend {
                message: failed,
                source,
            },
            Some((message, error)) => DmaError::RollbackFailed {
                message: failed,
                source,
                rollback: Box::new(RollbackFailure { message, error }),
            },
        }
    }

    fn apply(&mut self, asid: u32, plan: Plan) {
        let table = self.tables.entry(asid).or_default();
        for inv in plan.invalidates {
            for e in inv.removed {
                table.remove(&e.start);
                self.bytes_mapped -= u128::from(e.size());
            }
        }
        for seg in plan.updates {
            self.bytes_mapped += u128::from(seg.size());
            table.insert(seg.start, seg);
        }
        if table.is_empty() {
            self.tables.remove(&asid);
        }
    }

    /// Sends one message and counts it if the device accepted it.
    fn send(&mut self, msg: IotlbMessage) -> Result<(), BackendError> {
        msg.send(&mut self.backend)?;
        let counter = match msg {
            IotlbMessage::BatchBegin { .. } => &mut self.counters.batch_begin,
            IotlbMessage::Update { .. } => &mut self.counters.iotlb_update,
            IotlbMessage::Invalidate { .. } => &mut self.counters.iotlb_invalidate,
            IotlbMessage::BatchEnd { .. } => &mut self.counters.batch_end,
        };
        *counter += 1;
        Ok(())
    }
}

/// How far a transaction got: the first `invalidates` invalidations and the
/// first `updates` updates of the plan were accepted.
#[derive(Debug, Default)]
struct Sent {
    invalidates: usize,
    updates: usize,
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
