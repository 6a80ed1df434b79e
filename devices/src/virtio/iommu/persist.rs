//! What a snapshot keeps of the virtio-iommu, and putting it back in a new
//! process.
//!
//! The guest's domain model is plain data: the bypass bit, the features the
//! driver acked, and each domain with its endpoints and mappings (a domain
//! exists only while an endpoint is in it). A restore replays it as the
//! guest's own requests — an ATTACH per endpoint, a MAP per mapping — so
//! every check a request gets applies to the saved state too, and all of it
//! is one plan: each endpoint's device gets its whole domain as one batch,
//! before any vCPU runs.

use serde::{Deserialize, Serialize};

use super::domains::{DomainKind, Domains, MapMode, Mapping, Pending};
use super::request::{status_name, Request, ATTACH_F_BYPASS};
use super::state::IommuState;
use crate::dma::{ChangeKind, DmaSpaces, GuestTranslate, Plan, SpaceError};

/// The virtio-iommu's state in a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IommuPersisted {
    pub bypass: bool,
    /// The features the driver acked: MAP_UNMAP, BYPASS_CONFIG, PROBE.
    pub map_unmap: bool,
    pub bypass_config: bool,
    pub probe: bool,
    pub domains: Vec<SavedDomain>,
    /// Where the request queue stands (its used index: the worker, parked
    /// between drains, answered every request before it), if the driver
    /// started it.
    pub queue_position: Option<u16>,
}

/// One domain: its endpoints and, translated, its mappings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDomain {
    pub id: u32,
    /// Attached with ATTACH_F_BYPASS: endpoints reach all guest RAM.
    pub identity: bool,
    pub endpoints: Vec<u32>,
    pub mappings: Vec<SavedMapping>,
}

/// One MAP: [virt_start, virt_end] → phys_start, with its flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedMapping {
    pub virt_start: u64,
    pub virt_end: u64,
    pub phys_start: u64,
    pub flags: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum IommuRestoreError {
    #[error("the saved {what} was refused as the guest's request would be ({status})")]
    Refused { what: String, status: &'static str },
    #[error("domain {0} has no endpoint: a domain exists only while one is in it")]
    EmptyDomain(u32),
    #[error("the devices refused the saved domains: {0}")]
    Devices(#[source] SpaceError),
}

impl IommuState {
    /// The domain model as plain data (the caller adds the queue position).
    pub fn persisted(&self) -> IommuPersisted {
        let (map_unmap, bypass_config, probe) = self.acked();
        IommuPersisted {
            bypass: self.bypass(),
            map_unmap,
            bypass_config,
            probe,
            domains: self.domains().saved(),
            queue_position: None,
        }
    }

    /// Replaces a new device's model with `saved`, replayed as the guest's
    /// requests into one plan, and commits it: each endpoint's device is
    /// moved to its domain's space (or, unattached, where the bypass bit
    /// says) with everything it may reach, in one batch. Nothing changes
    /// if any request is refused or a device refuses the plan.
    pub fn restore(
        &mut self,
        saved: &IommuPersisted,
        spaces: &mut DmaSpaces,
        translate: &dyn GuestTranslate,
    ) -> Result<(), IommuRestoreError> {
        let mut limits = self.limits().clone();
        limits.map_unmap = saved.map_unmap;
        limits.bypass_config = saved.bypass_config;
        limits.probe = saved.probe;
        let mut model = self.domains().clone();
        model.set_bypass(saved.bypass);
        let mut pending = Pending::new(spaces, Plan::new(ChangeKind::Iommu));
        let replayed = replay(&mut model, saved, &limits, translate, &mut pending);
        if let Err(error) = replayed {
            pending.abandoned();
            return Err(error);
        }
        model.place_all(&mut pending.plan);
        let plan = std::mem::replace(&mut pending.plan, Plan::new(ChangeKind::Iommu));
        if let Err(error) = pending.spaces().commit(plan) {
            pending.abandoned();
            return Err(IommuRestoreError::Devices(error));
        }
        pending.committed();
        self.set_acked(saved.map_unmap, saved.bypass_config, saved.probe);
        self.replace_domains(model);
        Ok(())
    }
}

/// Each saved domain as the guest built it: its endpoints attached, then
/// its mappings made.
fn replay(
    model: &mut Domains,
    saved: &IommuPersisted,
    limits: &super::domains::Limits,
    translate: &dyn GuestTranslate,
    pending: &mut Pending,
) -> Result<(), IommuRestoreError> {
    for domain in &saved.domains {
        if domain.endpoints.is_empty() {
            return Err(IommuRestoreError::EmptyDomain(domain.id));
        }
        let flags = match domain.identity {
            true => ATTACH_F_BYPASS,
            false => 0,
        };
        for &endpoint in &domain.endpoints {
            let request = Request::Attach {
                domain: domain.id,
                endpoint,
                flags,
                reserved_set: false,
            };
            model
                .apply(&request, limits, translate, MapMode::Apply, pending)
                .map_err(|status| IommuRestoreError::Refused {
                    what: format!("attach of endpoint {endpoint} to domain {}", domain.id),
                    status: status_name(status),
                })?;
        }
        for m in &domain.mappings {
            let request = Request::Map {
                domain: domain.id,
                virt_start: m.virt_start,
                virt_end: m.virt_end,
                phys_start: m.phys_start,
                flags: m.flags,
            };
            model
                .apply(&request, limits, translate, MapMode::Apply, pending)
                .map_err(|status| IommuRestoreError::Refused {
                    what: format!(
                        "mapping {:#x}..={:#x} of domain {}",
                        m.virt_start, m.virt_end, domain.id
                    ),
                    status: status_name(status),
                })?;
        }
    }
    Ok(())
}

impl Domains {
    /// Every domain with its endpoints and mappings.
    pub fn saved(&self) -> Vec<SavedDomain> {
        self.domain_infos()
            .into_iter()
            .map(|info| SavedDomain {
                id: info.id,
                identity: info.kind == DomainKind::Identity,
                endpoints: info.endpoints,
                mappings: self
                    .mappings(info.id)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|m: Mapping| SavedMapping {
                        virt_start: m.virt_start,
                        virt_end: m.virt_end,
                        phys_start: m.phys_start,
                        flags: m.flags,
                    })
                    .collect(),
            })
            .collect()
    }
}
