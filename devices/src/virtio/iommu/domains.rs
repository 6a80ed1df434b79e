//! The IOMMU's model of the guest's choices: which endpoint is in which
//! domain, what each translated domain maps. Each request is checked in
//! full before it changes anything, then changes this model and adds what
//! it means for the devices to a [`Pending`] plan. The caller works on a
//! copy and keeps it only if the plan is committed.

use std::collections::{btree_map, BTreeMap, BTreeSet};
use std::ops::{RangeBounds, RangeInclusive};

use crate::dma::interval::IntervalIndex;
use crate::dma::{
    Change, ChangeKind, DmaSpaces, GuestTranslate, Perm, Plan, SpaceId, TranslateError,
};

use super::request::*;

/// The page granule: 4 KiB.
pub const GRANULE: u64 = 4096;

/// What a domain is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DomainKind {
    /// Endpoints see only what the guest mapped, in its own address space.
    Translated,
    /// Attached with VIRTIO_IOMMU_ATTACH_F_BYPASS: endpoints see all guest
    /// RAM with IOVA = guest physical address (the identity space).
    Identity,
}

impl DomainKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DomainKind::Translated => "translated",
            DomainKind::Identity => "identity",
        }
    }
}

/// One guest MAP: [virt_start, virt_end] → phys_start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub virt_start: u64,
    /// Inclusive.
    pub virt_end: u64,
    pub phys_start: u64,
    /// `VIRTIO_IOMMU_MAP_F_READ` / `_WRITE`.
    pub flags: u32,
}

impl Mapping {
    /// Bytes covered; a stored mapping passed the MAP checks, so the size
    /// fits (saturating only guards the invariant).
    pub fn size(&self) -> u64 {
        (self.virt_end - self.virt_start).saturating_add(1)
    }

    fn phys_last(&self) -> u64 {
        self.phys_start
            .saturating_add(self.virt_end - self.virt_start)
    }
}

/// A domain's mappings by virt_start (never overlapping), and by the
/// guest memory they reach (overlapping at will), so that unplugging
/// memory finds the mappings into it without visiting the others.
#[derive(Clone, Debug, Default)]
struct MappingIndex {
    by_virt: BTreeMap<u64, Mapping>,
    by_phys: IntervalIndex<u64>,
}

impl MappingIndex {
    fn insert(&mut self, virt_start: u64, map: Mapping) {
        if let Some(old) = self.by_virt.insert(virt_start, map) {
            self.by_phys
                .remove(old.phys_start, old.phys_last(), old.virt_start);
        }
        self.by_phys
            .insert(map.phys_start, map.phys_last(), map.virt_start);
    }

    fn remove(&mut self, virt_start: &u64) -> Option<Mapping> {
        let map = self.by_virt.remove(virt_start)?;
        self.by_phys
            .remove(map.phys_start, map.phys_last(), map.virt_start);
        Some(map)
    }

    fn range(&self, range: impl RangeBounds<u64>) -> btree_map::Range<'_, u64, Mapping> {
        self.by_virt.range(range)
    }

    fn values(&self) -> btree_map::Values<'_, u64, Mapping> {
        self.by_virt.values()
    }

    fn len(&self) -> usize {
        self.by_virt.len()
    }

    /// Mappings that reach any of guest memory `[first, last]`.
    fn reaching(&self, first: u64, last: u64) -> Vec<Mapping> {
        let found = self.by_phys.meeting(first, last).into_iter();
        found
            .filter_map(|v| self.by_virt.get(&v).copied())
            .collect()
    }
}

#[derive(Clone, Debug)]
struct Domain {
    kind: DomainKind,
    space: SpaceId,
    endpoints: BTreeSet<u32>,
    mappings: MappingIndex,
}

#[derive(Clone, Debug)]
struct Endpoint {
    /// The DMA device's name in [`DmaSpaces`].
    device: String,
    domain: Option<u32>,
}

/// What the device accepts, fixed at construction except the features,
/// which the driver acks.
#[derive(Clone, Debug)]
pub struct Limits {
    pub input_range: RangeInclusive<u64>,
    pub domain_range: RangeInclusive<u32>,
    /// Ranges (inclusive) the guest must not map: the MSI window.
    pub reserved: Vec<RangeInclusive<u64>>,
    /// Most mappings all domains may hold together: each costs VMM memory
    /// (here, in the address space and in each device's engine), so a
    /// guest cannot map page by page without bound.
    pub max_mappings: usize,
    pub map_unmap: bool,
    pub bypass_config: bool,
    pub probe: bool,
}

/// A plan being built from one drain (or one config change), with the
/// translated spaces it created and those it leaves empty.
pub struct Pending<'a> {
    spaces: &'a mut DmaSpaces,
    pub plan: Plan,
    created: Vec<SpaceId>,
    doomed: Vec<SpaceId>,
}

impl<'a> Pending<'a> {
    pub fn new(spaces: &'a mut DmaSpaces, plan: Plan) -> Self {
        Pending {
            spaces,
            plan,
            created: Vec::new(),
            doomed: Vec::new(),
        }
    }

    pub fn spaces(&mut self) -> &mut DmaSpaces {
        self.spaces
    }

    fn create_space(&mut self) -> SpaceId {
        let id = self.spaces.create_space();
        self.created.push(id);
        id
    }

    /// After the plan was committed: the spaces of domains that ceased to
    /// exist go (no device is attached to them any more).
    pub fn committed(self) {
        for space in self.doomed {
            // Busy would mean a device still sits there, which the plan's
            // moves rule out; keeping the space is the safe side anyway.
            let _ = self.spaces.destroy_space(space);
        }
    }

    /// After the plan was refused: the spaces it created go.
    pub fn abandoned(self) {
        for space in self.created {
            let _ = self.spaces.destroy_space(space);
        }
    }
}

/// What a request did when it succeeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Changed the model (and maybe the plan): its success depends on the
    /// commit.
    Changed,
    /// Succeeded without changing anything.
    Unchanged,
    /// A PROBE of a known endpoint.
    Probe,
}

/// How MAP requests are treated in this pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapMode {
    Apply,
    /// Check them in full, then refuse those that would succeed with this
    /// status (the retry after a device refused a drain with MAPs).
    Refuse(u8),
}

/// Every domain and endpoint, and the global bypass bit.
#[derive(Clone, Debug)]
pub struct Domains {
    domains: BTreeMap<u32, Domain>,
    endpoints: BTreeMap<u32, Endpoint>,
    bypass: bool,
}

/// One domain as the control API shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainInfo {
    pub id: u32,
    pub kind: DomainKind,
    pub space: SpaceId,
    pub endpoints: Vec<u32>,
    pub mappings: usize,
}

/// One endpoint as the control API shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    pub id: u32,
    pub device: String,
    pub domain: Option<u32>,
    /// Where its device is attached according to the IOMMU (`None`: it
    /// reaches nothing).
    pub space: Option<SpaceId>,
}

impl Domains {
    /// `endpoints`: (endpoint id, DMA device name); no domains yet.
    pub fn new(endpoints: &[(u32, String)], bypass: bool) -> Self {
        Domains {
            domains: BTreeMap::new(),
            endpoints: endpoints
                .iter()
                .map(|(id, device)| {
                    let endpoint = Endpoint {
                        device: device.clone(),
                        domain: None,
                    };
                    (*id, endpoint)
                })
                .collect(),
            bypass,
        }
    }

    pub fn bypass(&self) -> bool {
        self.bypass
    }

    /// Where an endpoint outside any domain is attached.
    fn unattached_space(&self) -> Option<SpaceId> {
        self.bypass.then_some(SpaceId::IDENTITY)
    }

    fn space_of(&self, endpoint: &Endpoint) -> Option<SpaceId> {
        match endpoint.domain.and_then(|d| self.domains.get(&d)) {
            Some(domain) => Some(domain.space),
            None => self.unattached_space(),
        }
    }

    /// Puts every endpoint's device where the model says it is.
    pub fn place_all(&self, plan: &mut Plan) {
        for endpoint in self.endpoints.values() {
            plan.attach(&endpoint.device, self.space_of(endpoint));
        }
    }

    /// Moves every endpoint's device that is not where the model says
    /// (and only those, so a change that moves nothing sends nothing).
    pub fn place_changed(&self, spaces: &DmaSpaces, plan: &mut Plan) {
        for endpoint in self.endpoints.values() {
            let target = self.space_of(endpoint);
            if spaces.space_of(&endpoint.device).ok() != Some(target) {
                plan.attach(&endpoint.device, target);
            }
        }
    }

    /// Changes the global bypass bit (unattached endpoints move: see
    /// [`Domains::place_changed`]).
    pub fn set_bypass(&mut self, bypass: bool) {
        self.bypass = bypass;
    }

    /// Device reset: no endpoint is attached to a domain any more, and
    /// every domain ceases to exist (the bypass bit stays).
    pub fn reset(&mut self, pending: &mut Pending) {
        for (_, domain) in std::mem::take(&mut self.domains) {
            if domain.kind == DomainKind::Translated {
                pending.doomed.push(domain.space);
            }
        }
        for endpoint in self.endpoints.values_mut() {
            endpoint.domain = None;
        }
        let mut plan = std::mem::replace(&mut pending.plan, Plan::new(ChangeKind::Iommu));
        self.place_changed(pending.spaces, &mut plan);
        pending.plan = plan;
    }

    /// Handles one request against this model.
    pub fn apply(
        &mut self,
        request: &Request,
        limits: &Limits,
        translate: &dyn GuestTranslate,
        maps: MapMode,
        pending: &mut Pending,
    ) -> Result<Effect, u8> {
        match *request {
            Request::Attach {
                domain,
                endpoint,
                flags,
                reserved_set,
            } => self.attach(domain, endpoint, flags, reserved_set, limits, pending),
            Request::Detach { domain, endpoint } => self.detach(domain, endpoint, pending),
            Request::Map {
                domain,
                virt_start,
                virt_end,
                phys_start,
                flags,
            } => {
                let map = Mapping {
                    virt_start,
                    virt_end,
                    phys_start,
                    flags,
                };
                self.map(domain, map, limits, translate, maps, pending)
            }
            Request::Unmap {
                domain,
                virt_start,
                virt_end,
            } => self.unmap(domain, virt_start, virt_end, limits, pending),
            Request::Probe { endpoint } => match self.endpoints.contains_key(&endpoint) {
                true => Ok(Effect::Probe),
                false => Err(S_NOENT),
            },
        }
    }

    fn attach(
        &mut self,
        domain: u32,
        endpoint: u32,
        flags: u32,
        reserved_set: bool,
        limits: &Limits,
        pending: &mut Pending,
    ) -> Result<Effect, u8> {
        let known = if limits.bypass_config {
            ATTACH_F_BYPASS
        } else {
            0
        };
        if reserved_set || flags & !known != 0 {
            return Err(S_INVAL);
        }
        let device = match self.endpoints.get(&endpoint) {
            Some(e) => e.device.clone(),
            None => return Err(S_NOENT),
        };
        if !limits.domain_range.contains(&domain) {
            return Err(S_RANGE);
        }
        let kind = match flags & ATTACH_F_BYPASS {
            0 => DomainKind::Translated,
            _ => DomainKind::Identity,
        };
        if let Some(existing) = self.domains.get(&domain) {
            if existing.kind != kind {
                return Err(S_INVAL);
            }
            if existing.endpoints.contains(&endpoint) {
                return Ok(Effect::Unchanged);
            }
        }
        // As if the driver detached it first.
        self.leave_domain(endpoint, pending);
        let space = match self.domains.get_mut(&domain) {
            Some(existing) => {
                existing.endpoints.insert(endpoint);
                existing.space
            }
            None => {
                let space = match kind {
                    DomainKind::Identity => SpaceId::IDENTITY,
                    DomainKind::Translated => pending.create_space(),
                };
                let created = Domain {
                    kind,
                    space,
                    endpoints: BTreeSet::from([endpoint]),
                    mappings: MappingIndex::default(),
                };
                self.domains.insert(domain, created);
                space
            }
        };
        if let Some(e) = self.endpoints.get_mut(&endpoint) {
            e.domain = Some(domain);
        }
        pending.plan.attach(&device, Some(space));
        Ok(Effect::Changed)
    }

    /// Takes `endpoint` out of its domain; the domain ceases to exist with
    /// its last endpoint. The caller decides where the device goes.
    fn leave_domain(&mut self, endpoint: u32, pending: &mut Pending) {
        let Some(e) = self.endpoints.get_mut(&endpoint) else {
            return;
        };
        let Some(id) = e.domain.take() else {
            return;
        };
        let Some(domain) = self.domains.get_mut(&id) else {
            return;
        };
        domain.endpoints.remove(&endpoint);
        if domain.endpoints.is_empty() {
            if domain.kind == DomainKind::Translated {
                pending.doomed.push(domain.space);
            }
            self.domains.remove(&id);
        }
    }

    fn detach(&mut self, domain: u32, endpoint: u32, pending: &mut Pending) -> Result<Effect, u8> {
        let Some(e) = self.endpoints.get(&endpoint) else {
            return Err(S_NOENT);
        };
        if e.domain != Some(domain) {
            return Err(S_INVAL);
        }
        let device = e.device.clone();
        self.leave_domain(endpoint, pending);
        pending.plan.attach(&device, self.unattached_space());
        Ok(Effect::Changed)
    }

    fn map(
        &mut self,
        domain: u32,
        map: Mapping,
        limits: &Limits,
        translate: &dyn GuestTranslate,
        mode: MapMode,
        pending: &mut Pending,
    ) -> Result<Effect, u8> {
        if !limits.map_unmap {
            return Err(S_UNSUPP);
        }
        // VIRTIO_IOMMU_F_MMIO is not offered: MMIO is refused like any
        // flag the device does not know.
        if map.flags & MAP_F_MMIO != 0 || map.flags & !(MAP_F_READ | MAP_F_WRITE) != 0 {
            return Err(S_INVAL);
        }
        let Some(target) = self.domains.get(&domain) else {
            return Err(S_NOENT);
        };
        if target.kind == DomainKind::Identity || map.virt_end < map.virt_start {
            return Err(S_INVAL);
        }
        let perm = match (map.flags & MAP_F_READ != 0, map.flags & MAP_F_WRITE != 0) {
            (true, true) => Perm::ReadWrite,
            (true, false) => Perm::ReadOnly,
            (false, true) => Perm::WriteOnly,
            (false, false) => return Err(S_INVAL),
        };
        let aligned = |a: u64| a.is_multiple_of(GRANULE);
        if !aligned(map.virt_start)
            || !aligned(map.phys_start)
            || !aligned(map.virt_end.wrapping_add(1))
        {
            return Err(S_RANGE);
        }
        let Some(size) = (map.virt_end - map.virt_start).checked_add(1) else {
            return Err(S_RANGE);
        };
        if map.phys_start.checked_add(size - 1).is_none()
            || !limits.input_range.contains(&map.virt_start)
            || !limits.input_range.contains(&map.virt_end)
            || limits
                .reserved
                .iter()
                .any(|r| map.virt_start <= *r.end() && *r.start() <= map.virt_end)
        {
            return Err(S_RANGE);
        }
        // Mappings never overlap: only the last one starting at or before
        // virt_end can reach into the new range.
        let overlaps = target
            .mappings
            .range(..=map.virt_end)
            .next_back()
            .is_some_and(|(_, m)| m.virt_end >= map.virt_start);
        if overlaps {
            return Err(S_INVAL);
        }
        let held: usize = self.domains.values().map(|d| d.mappings.len()).sum();
        if held >= limits.max_mappings {
            return Err(S_NOMEM);
        }
        let Some(target) = self.domains.get_mut(&domain) else {
            return Err(S_NOENT);
        };
        let ranges = translate
            .translate(map.virt_start, map.phys_start, size, perm)
            .map_err(|e| match e {
                TranslateError::NotRam { .. } => S_FAULT,
                TranslateError::Invalid { .. } => S_RANGE,
            })?;
        if let MapMode::Refuse(status) = mode {
            return Err(status);
        }
        let mut change = Change::new();
        for range in ranges {
            change.add(range);
        }
        target.mappings.insert(map.virt_start, map);
        pending.plan.change(target.space, change);
        Ok(Effect::Changed)
    }

    fn unmap(
        &mut self,
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        limits: &Limits,
        pending: &mut Pending,
    ) -> Result<Effect, u8> {
        if !limits.map_unmap {
            return Err(S_UNSUPP);
        }
        let Some(target) = self.domains.get_mut(&domain) else {
            return Err(S_NOENT);
        };
        if target.kind == DomainKind::Identity || virt_end < virt_start {
            return Err(S_INVAL);
        }
        // The mapping that starts before the range, if it reaches into it,
        // then every mapping starting inside it.
        let before = target
            .mappings
            .range(..virt_start)
            .next_back()
            .filter(|(_, m)| m.virt_end >= virt_start)
            .map(|(_, m)| *m);
        let inside = target
            .mappings
            .range(virt_start..=virt_end)
            .map(|(_, m)| *m);
        let affected: Vec<Mapping> = before.into_iter().chain(inside).collect();
        // Partly removing a mapping is not supported: nothing changes.
        if affected
            .iter()
            .any(|m| m.virt_start < virt_start || m.virt_end > virt_end)
        {
            return Err(S_RANGE);
        }
        if affected.is_empty() {
            return Ok(Effect::Unchanged);
        }
        let mut change = Change::new();
        for m in &affected {
            target.mappings.remove(&m.virt_start);
            change.remove(m.virt_start, m.size());
        }
        pending.plan.change(target.space, change);
        Ok(Effect::Changed)
    }

    /// Guest RAM `ranges` (gpa, size) goes away: adds to `plan` the
    /// removal of every domain mapping that reaches any of it, and returns
    /// those mappings by domain, for [`Domains::remove_mappings`] once the
    /// plan stands. The model does not change here. Costs what it finds:
    /// mappings elsewhere are never visited.
    pub fn guest_range_cut(&self, ranges: &[(u64, u64)], plan: &mut Plan) -> Vec<(u32, Mapping)> {
        let mut cut = Vec::new();
        for (&id, domain) in &self.domains {
            let mut hit: BTreeMap<u64, Mapping> = BTreeMap::new();
            for &(gpa, size) in ranges {
                let Some(last) = size.checked_sub(1).and_then(|s| gpa.checked_add(s)) else {
                    continue;
                };
                hit.extend(
                    domain
                        .mappings
                        .reaching(gpa, last)
                        .into_iter()
                        .map(|m| (m.virt_start, m)),
                );
            }
            if hit.is_empty() {
                continue;
            }
            let mut change = Change::new();
            for m in hit.values() {
                change.remove(m.virt_start, m.size());
            }
            plan.change(domain.space, change);
            cut.extend(hit.into_values().map(|m| (id, m)));
        }
        cut
    }

    /// Forgets the mappings of a [`Domains::guest_range_cut`] whose plan
    /// was committed.
    pub fn remove_mappings(&mut self, cut: &[(u32, Mapping)]) {
        for (id, m) in cut {
            if let Some(domain) = self.domains.get_mut(id) {
                domain.mappings.remove(&m.virt_start);
            }
        }
    }

    pub fn domain_infos(&self) -> Vec<DomainInfo> {
        self.domains
            .iter()
            .map(|(id, d)| DomainInfo {
                id: *id,
                kind: d.kind,
                space: d.space,
                endpoints: d.endpoints.iter().copied().collect(),
                mappings: d.mappings.len(),
            })
            .collect()
    }

    pub fn endpoint_infos(&self) -> Vec<EndpointInfo> {
        self.endpoints
            .iter()
            .map(|(id, e)| EndpointInfo {
                id: *id,
                device: e.device.clone(),
                domain: e.domain,
                space: self.space_of(e),
            })
            .collect()
    }

    /// A domain's mappings, by virt_start.
    pub fn mappings(&self, domain: u32) -> Option<Vec<Mapping>> {
        self.domains
            .get(&domain)
            .map(|d| d.mappings.values().copied().collect())
    }
}
