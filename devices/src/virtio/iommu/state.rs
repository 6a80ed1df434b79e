//! The device's state and the batching rule: every request of one drain of
//! the request queue goes into one [`Plan`], so each affected DMA device
//! gets one transaction per drain, however many requests it held.
//!
//! Requests are checked and applied in order to a copy of the domain
//! model; a request that fails its checks fails alone. The plan is then
//! committed, and only then are statuses final: if a device refuses it, the
//! copy is dropped (nothing half-mapped) and, when the drain held MAPs, it
//! is tried once more without them, so UNMAPs, ATTACHes and DETACHes the
//! guest already counts on still happen. If every try is refused, each
//! request's status is decided against the model as it still is, so none
//! reports a state that exists only through a refused request.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use crate::dma::{ChangeKind, DeviceReport, DmaError, DmaSpaces, GuestTranslate, Plan, SpaceError};

use super::domains::{
    DomainInfo, Domains, Effect, EndpointInfo, Limits, MapMode, Mapping, Pending,
};
use super::request::*;

/// Counters for the control API.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IommuCounters {
    /// (request type, status name) → requests; status "unanswered" for
    /// requests returned unwritten (unknown type, no room for a status).
    pub requests: BTreeMap<(&'static str, &'static str), u64>,
    /// Request-queue drains (one per guest notification served).
    pub drains: u64,
    /// Most requests taken in one drain.
    pub largest_drain: u64,
    /// Plans committed (drains that changed something, config changes,
    /// resets, memory unplugs) and plans a device refused.
    pub plans_committed: u64,
    pub plans_refused: u64,
    /// Per DMA device: transactions that sent it at least one message.
    pub device_batches: BTreeMap<String, u64>,
    /// Most messages one device got for one plan (brackets included).
    pub largest_batch: u64,
}

impl IommuCounters {
    /// Requests of `kind` with `status` ("ok", "inval", ...).
    pub fn count(&self, kind: RequestKind, status: &str) -> u64 {
        self.requests
            .iter()
            .filter(|((k, s), _)| *k == kind.as_str() && *s == status)
            .map(|(_, n)| *n)
            .sum()
    }

    /// Requests of `kind`, whatever their status.
    pub fn total(&self, kind: RequestKind) -> u64 {
        self.requests
            .iter()
            .filter(|((k, _), _)| *k == kind.as_str())
            .map(|(_, n)| *n)
            .sum()
    }

    /// Request type → status name → requests, for a JSON view.
    pub fn requests_by_type(&self) -> BTreeMap<&'static str, BTreeMap<&'static str, u64>> {
        let mut nested: BTreeMap<&'static str, BTreeMap<&'static str, u64>> = BTreeMap::new();
        for ((kind, status), n) in &self.requests {
            nested.entry(kind).or_default().insert(status, *n);
        }
        nested
    }

    fn note_reports(&mut self, reports: &[DeviceReport]) {
        self.plans_committed += 1;
        for report in reports.iter().filter(|r| r.messages() > 0) {
            *self
                .device_batches
                .entry(report.device.clone())
                .or_default() += 1;
            self.largest_batch = self.largest_batch.max(u64::from(report.messages()));
        }
    }
}

/// What `info` shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IommuSnapshot {
    pub bypass: bool,
    pub domains: Vec<DomainInfo>,
    pub endpoints: Vec<EndpointInfo>,
}

/// One request's provisional result within a drain.
#[derive(Clone, Copy, Debug)]
enum Outcome {
    Done(RequestKind, Result<Effect, u8>),
    Rejected(RequestKind, u8),
    Unanswerable(RequestKind),
}

impl Outcome {
    fn changed(&self) -> bool {
        matches!(self, Outcome::Done(_, Ok(Effect::Changed)))
    }

    fn is_changing_map(&self) -> bool {
        matches!(self, Outcome::Done(RequestKind::Map, Ok(Effect::Changed)))
    }
}

/// The status a request whose change a device refused gets: a MAP outside
/// a device's IOVA range is out of range, anything else a device error.
fn refused_status(kind: RequestKind, error: &SpaceError) -> u8 {
    match (kind, error.dma_error()) {
        (RequestKind::Map, Some(DmaError::OutOfIovaRange { .. })) => S_RANGE,
        _ => S_DEVERR,
    }
}

/// The IOMMU's state: its domain model, limits and counters.
pub struct IommuState {
    domains: Domains,
    /// The bypass bit at creation, and after every device reset.
    initial_bypass: bool,
    limits: Limits,
    probe_size: u32,
    /// The RESV_MEM properties every PROBE answers.
    properties: Vec<u8>,
    counters: IommuCounters,
}

impl IommuState {
    pub fn new(
        endpoints: &[(u32, String)],
        bypass: bool,
        limits: Limits,
        probe_size: u32,
    ) -> IommuState {
        let properties = limits
            .reserved
            .iter()
            .flat_map(|r| resv_mem_property(RESV_MEM_T_MSI, *r.start(), *r.end()))
            .collect();
        IommuState {
            domains: Domains::new(endpoints, bypass),
            initial_bypass: bypass,
            limits,
            probe_size,
            properties,
            counters: IommuCounters::default(),
        }
    }

    pub fn bypass(&self) -> bool {
        self.domains.bypass()
    }

    /// Records which features the driver acked.
    pub fn set_acked(&mut self, map_unmap: bool, bypass_config: bool, probe: bool) {
        self.limits.map_unmap = map_unmap;
        self.limits.bypass_config = bypass_config;
        self.limits.probe = probe;
    }

    pub fn counters(&self) -> IommuCounters {
        self.counters.clone()
    }

    /// The features the driver acked: MAP_UNMAP, BYPASS_CONFIG, PROBE.
    pub(super) fn acked(&self) -> (bool, bool, bool) {
        (
            self.limits.map_unmap,
            self.limits.bypass_config,
            self.limits.probe,
        )
    }

    pub(super) fn limits(&self) -> &Limits {
        &self.limits
    }

    pub(super) fn domains(&self) -> &Domains {
        &self.domains
    }

    pub(super) fn replace_domains(&mut self, domains: Domains) {
        self.domains = domains;
    }

    pub fn snapshot(&self) -> IommuSnapshot {
        IommuSnapshot {
            bypass: self.domains.bypass(),
            domains: self.domains.domain_infos(),
            endpoints: self.domains.endpoint_infos(),
        }
    }

    /// A domain's mappings, by virt_start.
    pub fn mappings(&self, domain: u32) -> Option<Vec<Mapping>> {
        self.domains.mappings(domain)
    }

    /// Attaches every endpoint's device where the model says (identity
    /// with bypass on, nowhere with it off): at creation.
    pub fn place_endpoints(&mut self, spaces: &mut DmaSpaces) -> Result<(), SpaceError> {
        let mut plan = Plan::new(ChangeKind::Attach);
        self.domains.place_all(&mut plan);
        self.count(spaces.commit(plan)).map(|_| ())
    }

    fn count(
        &mut self,
        result: Result<Vec<DeviceReport>, SpaceError>,
    ) -> Result<Vec<DeviceReport>, SpaceError> {
        match &result {
            Ok(reports) => self.counters.note_reports(reports),
            Err(_) => self.counters.plans_refused += 1,
        }
        result
    }

    /// Serves one drain of the request queue: one reply per request, in
    /// order, written by the caller after this returns (so after the plan
    /// was committed or refused).
    pub fn drain(
        &mut self,
        spaces: &mut DmaSpaces,
        translate: &dyn GuestTranslate,
        requests: &[RawRequest],
        started: Instant,
    ) -> Vec<Reply> {
        self.counters.drains += 1;
        self.counters.largest_drain = self.counters.largest_drain.max(requests.len() as u64);
        let parsed: Vec<Parsed> = requests.iter().map(|r| parse(r, self.probe_size)).collect();
        let outcomes = self.outcomes(spaces, translate, &parsed, started);
        requests
            .iter()
            .zip(outcomes)
            .map(|(raw, outcome)| self.reply(raw, outcome))
            .collect()
    }

    /// Each request's outcome against what was committed: the pass the
    /// devices accepted, or, if they refused every try, the model as it was.
    fn outcomes(
        &mut self,
        spaces: &mut DmaSpaces,
        translate: &dyn GuestTranslate,
        parsed: &[Parsed],
        started: Instant,
    ) -> Vec<Outcome> {
        let first = self.attempt(spaces, translate, parsed, MapMode::Apply, started);
        let Some(first_error) = first.refused else {
            return first.outcomes;
        };
        let map_status = refused_status(RequestKind::Map, &first_error);
        let maps = first.outcomes.iter().any(Outcome::is_changing_map);
        let others = first
            .outcomes
            .iter()
            .any(|o| o.changed() && !o.is_changing_map());
        let error = if maps && others {
            let retry = self.attempt(
                spaces,
                translate,
                parsed,
                MapMode::Refuse(map_status),
                started,
            );
            match retry.refused {
                None => return retry.outcomes,
                Some(error) => error,
            }
        } else {
            first_error
        };
        self.unchanged_outcomes(spaces, translate, parsed, map_status, &error)
    }

    /// Every request checked against the committed model with none of
    /// them applied, after the devices refused the drain: a request that
    /// would change something gets the refusal's status (MAPs `map_status`,
    /// as in the retry), the others what they get from that model alone, so
    /// nothing reports a change an earlier refused request would have made.
    ///
    /// Requests run on one scratch copy; a request that changes it marks
    /// what it touched ([`Touched`]), and a later request that would see
    /// that gets a fresh copy. At most [`MAX_FRESH_COPIES`] are taken per
    /// drain (each costs the whole model); past them, such a request gets
    /// the refusal's status, which claims nothing about the devices.
    fn unchanged_outcomes(
        &self,
        spaces: &mut DmaSpaces,
        translate: &dyn GuestTranslate,
        parsed: &[Parsed],
        map_status: u8,
        error: &SpaceError,
    ) -> Vec<Outcome> {
        let held: usize = self.domains.domain_infos().iter().map(|d| d.mappings).sum();
        let at_limit = held >= self.limits.max_mappings;
        let domain_of: BTreeMap<u32, Option<u32>> = self
            .domains
            .endpoint_infos()
            .iter()
            .map(|e| (e.id, e.domain))
            .collect();
        let mut scratch = self.domains.clone();
        let mut touched = Touched::default();
        let mut fresh_copies = 0;
        parsed
            .iter()
            .map(|p| match p {
                Parsed::Request(Request::Probe { .. }) if !self.limits.probe => {
                    Outcome::Unanswerable(RequestKind::Probe)
                }
                Parsed::Request(request) => {
                    let kind = request.kind();
                    let refused = match kind {
                        RequestKind::Map => map_status,
                        _ => refused_status(kind, error),
                    };
                    if touched.seen_by(request, at_limit) {
                        if fresh_copies == MAX_FRESH_COPIES {
                            return Outcome::Done(kind, Err(refused));
                        }
                        fresh_copies += 1;
                        scratch = self.domains.clone();
                        touched = Touched::default();
                    }
                    let mut pending = Pending::new(spaces, Plan::new(ChangeKind::Iommu));
                    let maps = MapMode::Refuse(map_status);
                    let result =
                        scratch.apply(request, &self.limits, translate, maps, &mut pending);
                    // Spaces the request created for a new domain go again.
                    pending.abandoned();
                    let result = match result {
                        Ok(Effect::Changed) => {
                            touched.note(request, &domain_of);
                            Err(refused)
                        }
                        other => other,
                    };
                    Outcome::Done(kind, result)
                }
                Parsed::Reject(kind, status) => Outcome::Rejected(*kind, *status),
                Parsed::Unanswerable(kind) => Outcome::Unanswerable(*kind),
            })
            .collect()
    }

    /// One pass over the drain on a copy of the model; the copy is kept if
    /// its plan is committed.
    fn attempt(
        &mut self,
        spaces: &mut DmaSpaces,
        translate: &dyn GuestTranslate,
        parsed: &[Parsed],
        maps: MapMode,
        started: Instant,
    ) -> Pass {
        let mut model = self.domains.clone();
        let mut pending = Pending::new(spaces, Plan::started_at(ChangeKind::Iommu, started));
        let outcomes: Vec<Outcome> = parsed
            .iter()
            .map(|p| match p {
                Parsed::Request(Request::Probe { .. }) if !self.limits.probe => {
                    Outcome::Unanswerable(RequestKind::Probe)
                }
                Parsed::Request(request) => Outcome::Done(
                    request.kind(),
                    model.apply(request, &self.limits, translate, maps, &mut pending),
                ),
                Parsed::Reject(kind, status) => Outcome::Rejected(*kind, *status),
                Parsed::Unanswerable(kind) => Outcome::Unanswerable(*kind),
            })
            .collect();
        if pending.plan.is_empty() {
            pending.committed();
            self.domains = model;
            return Pass {
                outcomes,
                refused: None,
            };
        }
        let plan = std::mem::replace(&mut pending.plan, Plan::new(ChangeKind::Iommu));
        let result = pending.spaces().commit(plan);
        let refused = self.count(result).err();
        match refused {
            None => {
                pending.committed();
                self.domains = model;
            }
            Some(_) => pending.abandoned(),
        }
        Pass { outcomes, refused }
    }

    fn reply(&mut self, raw: &RawRequest, outcome: Outcome) -> Reply {
        let (kind, reply) = match outcome {
            Outcome::Done(kind, Ok(Effect::Probe)) => {
                (kind, Reply::probe(&self.properties, self.probe_size))
            }
            Outcome::Done(kind, Ok(_)) => (kind, Reply::status(raw.writable_len, S_OK)),
            Outcome::Done(kind, Err(status)) | Outcome::Rejected(kind, status) => {
                (kind, Reply::status(raw.writable_len, status))
            }
            Outcome::Unanswerable(kind) => (kind, Reply::Unwritten),
        };
        let status = reply.status_code().map_or("unanswered", status_name);
        *self
            .counters
            .requests
            .entry((kind.as_str(), status))
            .or_default() += 1;
        reply
    }

    /// The driver wrote the bypass field. Only a driver that negotiated
    /// VIRTIO_IOMMU_F_BYPASS_CONFIG may write it (virtio 1.3, "Device
    /// configuration layout"); any other write is ignored.
    pub fn write_bypass(&mut self, spaces: &mut DmaSpaces, bypass: bool) -> Result<(), SpaceError> {
        if !self.limits.bypass_config {
            return Ok(());
        }
        self.set_bypass(spaces, bypass)
    }

    /// Sets the bypass bit: unattached endpoints move in one plan. If a
    /// device refuses, the bit keeps its old value (what the devices still
    /// do).
    pub fn set_bypass(&mut self, spaces: &mut DmaSpaces, bypass: bool) -> Result<(), SpaceError> {
        let mut model = self.domains.clone();
        let mut plan = Plan::new(ChangeKind::Iommu);
        model.set_bypass(bypass);
        model.place_changed(spaces, &mut plan);
        if plan.is_empty() {
            self.domains = model;
            return Ok(());
        }
        self.count(spaces.commit(plan))?;
        self.domains = model;
        Ok(())
    }

    /// Device reset: every domain goes, nothing is negotiated any more, and
    /// the bypass bit is back at its initial value, in one plan. (The spec
    /// keeps the bit across a device reset and restores it on system reset;
    /// a microVM has no system reset, so the next driver would inherit what
    /// an earlier one set, and its endpoints would reach all RAM before it
    /// asked for anything.)
    ///
    /// If a device refuses, every endpoint is detached instead and the bit
    /// reads 0, which is then what the devices do; if a device refuses that
    /// too, nothing changed and the model (domains included) still says
    /// so. Either way the first refusal is returned.
    pub fn reset(&mut self, spaces: &mut DmaSpaces) -> Result<(), SpaceError> {
        self.set_acked(false, false, false);
        let refused = match self.reset_to(spaces, self.initial_bypass) {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        // With bypass on the refused plan moved devices to identity; with
        // it off this tries the same detach once more.
        let _ = self.reset_to(spaces, false);
        Err(refused)
    }

    /// Resets the model with the bypass bit at `bypass` and moves the
    /// devices to match; on a refusal nothing changed.
    fn reset_to(&mut self, spaces: &mut DmaSpaces, bypass: bool) -> Result<(), SpaceError> {
        let mut model = self.domains.clone();
        model.set_bypass(bypass);
        let mut pending = Pending::new(spaces, Plan::new(ChangeKind::Iommu));
        model.reset(&mut pending);
        let plan = std::mem::replace(&mut pending.plan, Plan::new(ChangeKind::Iommu));
        if !plan.is_empty() {
            let result = pending.spaces().commit(plan);
            if let Err(error) = self.count(result) {
                pending.abandoned();
                return Err(error);
            }
        }
        self.domains = model;
        pending.committed();
        Ok(())
    }

    /// Memory unplug: guest RAM `ranges` (gpa, size) is about to go.
    /// Adds to `plan` (the unplug's one plan, which also takes the ranges
    /// out of the identity space) the removal of every domain mapping that
    /// reaches any of it, and returns those mappings; the model changes
    /// only in [`IommuState::unmap_guest_ranges_done`], once the whole
    /// unplug stands.
    pub fn unmap_guest_ranges(
        &self,
        ranges: &[(u64, u64)],
        plan: &mut Plan,
    ) -> Vec<(u32, Mapping)> {
        self.domains.guest_range_cut(ranges, plan)
    }

    /// The unplug that [`IommuState::unmap_guest_ranges`] took part in
    /// stands (`Some`: what its plan sent) or was undone (`None`): the cut
    /// mappings leave the model, or the model stays as it was.
    pub fn unmap_guest_ranges_done(
        &mut self,
        cut: &[(u32, Mapping)],
        reports: Option<&[DeviceReport]>,
    ) {
        if cut.is_empty() {
            return;
        }
        match reports {
            Some(reports) => {
                self.domains.remove_mappings(cut);
                self.counters.note_reports(reports);
            }
            None => self.counters.plans_refused += 1,
        }
    }
}

/// Fresh copies of the model one refused drain may take to decide its
/// statuses (see `IommuState::unchanged_outcomes`).
const MAX_FRESH_COPIES: usize = 8;

/// What requests changed in a scratch copy of the model, so that a later
/// request that would see it gets a fresh copy. A request sees a change
/// when:
/// - ATTACH/DETACH: any endpoint moved (membership, domains that came or
///   went); UNMAPs do not change what they check;
/// - MAP/UNMAP: its domain came, went or changed kind, or an UNMAP removed
///   mappings in an overlapping range (an UNMAP only removes mappings
///   inside its range), or, for a MAP with the model at its mapping limit,
///   any UNMAP freed room;
/// - PROBE: never (endpoints are fixed).
#[derive(Default)]
struct Touched {
    membership: bool,
    domains: BTreeSet<u32>,
    /// (domain, first, last) of each changing UNMAP.
    ranges: Vec<(u32, u64, u64)>,
    /// A request whose effect is not tracked here changed the copy.
    everything: bool,
}

impl Touched {
    fn seen_by(&self, request: &Request, at_limit: bool) -> bool {
        let overlaps = |domain: u32, first: u64, last: u64| {
            self.ranges
                .iter()
                .any(|&(d, f, l)| d == domain && f <= last && first <= l)
        };
        self.everything
            || match *request {
                Request::Attach { .. } | Request::Detach { .. } => self.membership,
                Request::Map {
                    domain,
                    virt_start,
                    virt_end,
                    ..
                } => {
                    self.domains.contains(&domain)
                        || overlaps(domain, virt_start, virt_end)
                        || (at_limit && !self.ranges.is_empty())
                }
                Request::Unmap {
                    domain,
                    virt_start,
                    virt_end,
                } => self.domains.contains(&domain) || overlaps(domain, virt_start, virt_end),
                Request::Probe { .. } => false,
            }
    }

    /// `request` changed the copy; `domain_of` is each endpoint's domain in
    /// the committed model (what a fresh copy says).
    fn note(&mut self, request: &Request, domain_of: &BTreeMap<u32, Option<u32>>) {
        match *request {
            Request::Attach {
                domain, endpoint, ..
            } => {
                self.membership = true;
                self.domains.insert(domain);
                if let Some(Some(old)) = domain_of.get(&endpoint) {
                    self.domains.insert(*old);
                }
            }
            Request::Detach { domain, .. } => {
                self.membership = true;
                self.domains.insert(domain);
            }
            Request::Unmap {
                domain,
                virt_start,
                virt_end,
            } => self.ranges.push((domain, virt_start, virt_end)),
            // MAPs are refused before they change anything.
            Request::Map { .. } | Request::Probe { .. } => self.everything = true,
        }
    }
}

/// One pass over a drain: its outcomes (provisional if refused) and, if a
/// device refused its plan, why.
struct Pass {
    outcomes: Vec<Outcome>,
    refused: Option<SpaceError>,
}
