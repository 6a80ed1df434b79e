//! RLIMIT_MEMLOCK for vDPA devices that pin guest memory.
//!
//! A PA parent (vdpa_sim with `use_va=0`, mlx5 on real hardware) pins every
//! page it is given an IOTLB entry for, and vhost-vdpa charges the pages to
//! the VMM's `pinned_vm` against RLIMIT_MEMLOCK — for root too
//! (drivers/vhost/vdpa.c, `vhost_vdpa_pa_map`): past the limit the UPDATE
//! is refused. Userspace cannot ask whether a parent is PA, so before any
//! device is opened (and before any seccomp filter) the VMM raises the limit
//! to what every vDPA device pinning all of guest RAM and the hotplug region
//! needs: the soft limit up to the hard one freely, the hard one too when
//! the VMM may (CAP_SYS_RESOURCE). What it could not raise is remembered: a
//! refused UPDATE then names the limit and the amount.

use crate::config::Size;

/// Room a device behind the vIOMMU may pin beyond guest RAM: the guest may
/// map one page at several IOVAs at once (each mapping is pinned again).
pub const IOMMU_SLACK: u64 = 64 << 20;
/// What a net device's shadowed control queue pins beyond guest RAM: the
/// VMM's ring and command buffer in address space 1 (two pages).
pub const CONTROL_QUEUE_BYTES: u64 = 2 * 4096;

/// What pinning all guest memory for `devices` vDPA devices, `behind_iommu`
/// of them behind the vIOMMU, charges to RLIMIT_MEMLOCK (each device pins
/// its own mappings).
pub fn needed(guest_bytes: u64, devices: u64, behind_iommu: u64) -> u64 {
    guest_bytes
        .saturating_add(CONTROL_QUEUE_BYTES)
        .saturating_mul(devices)
        .saturating_add(IOMMU_SLACK.saturating_mul(behind_iommu))
}

/// What to do about a limit of (`soft`, `hard`) when `needed` bytes may be
/// pinned. `u64::MAX` is RLIM_INFINITY.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Enough,
    /// Raise the soft limit (no privilege needed).
    RaiseSoft(u64),
    /// Raise both (needs CAP_SYS_RESOURCE).
    RaiseBoth(u64),
}

pub fn plan(soft: u64, hard: u64, needed: u64) -> Action {
    match needed {
        n if n <= soft => Action::Enough,
        n if n <= hard => Action::RaiseSoft(n),
        n => Action::RaiseBoth(n),
    }
}

/// The limit as it stands once the VMM did what it could.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemlockStatus {
    /// The soft limit now (bytes; u64::MAX is unlimited).
    pub limit: u64,
    pub needed: u64,
    /// Why it could not be raised, when it could not.
    pub refused: Option<String>,
}

impl MemlockStatus {
    /// A sentence naming the limit and the amount, when the limit is below
    /// what a PA device would pin.
    pub fn shortfall(&self) -> Option<String> {
        if self.limit >= self.needed {
            return None;
        }
        let why = match &self.refused {
            Some(reason) => format!(" (raising it failed: {reason})"),
            None => String::new(),
        };
        Some(format!(
            "RLIMIT_MEMLOCK is {}, below the {} a device that pins guest pages (a PA parent, \
             such as vdpa_sim with use_va=0) needs for guest RAM and the hotplug region{why}: \
             raise it (ulimit -l, LimitMEMLOCK=) or give the VMM CAP_SYS_RESOURCE",
            Size(self.limit),
            Size(self.needed)
        ))
    }
}

fn get() -> std::io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `struct rlimit`, which `limit` is and
    // outlives the call; the result is checked.
    let ret = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) };
    match ret {
        0 => Ok((limit.rlim_cur, limit.rlim_max)),
        _ => Err(std::io::Error::last_os_error()),
    }
}

fn set(soft: u64, hard: u64) -> std::io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads one `struct rlimit`, which `limit` is and
    // outlives the call; the result is checked.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) };
    match ret {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Raises RLIMIT_MEMLOCK towards `needed` bytes as far as this process may.
/// Never fails: a VA device needs nothing, so a limit that stays low is
/// reported only when an UPDATE is refused.
pub fn raise(needed: u64) -> MemlockStatus {
    let (soft, hard) = match get() {
        Ok(limits) => limits,
        Err(e) => {
            return MemlockStatus {
                limit: 0,
                needed,
                refused: Some(e.to_string()),
            }
        }
    };
    let result = match plan(soft, hard, needed) {
        Action::Enough => Ok(soft),
        Action::RaiseSoft(n) => set(n, hard).map(|()| n).map_err(|e| (e, soft)),
        Action::RaiseBoth(n) => match set(n, n) {
            Ok(()) => Ok(n),
            // Without the privilege, as far as the hard limit goes.
            Err(e) => Err((e, set(hard, hard).map(|()| hard).unwrap_or(soft))),
        },
    };
    match result {
        Ok(limit) => MemlockStatus {
            limit,
            needed,
            refused: None,
        },
        Err((e, limit)) => MemlockStatus {
            limit,
            needed,
            refused: Some(e.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn every_device_may_pin_all_guest_memory() {
        // 512M boot + 1G hotplug, one identity device.
        assert_eq!(
            needed(512 * MIB + GIB, 1, 0),
            512 * MIB + GIB + CONTROL_QUEUE_BYTES
        );
        // Two devices pin their own mappings; one behind the vIOMMU gets room
        // for pages mapped twice.
        assert_eq!(
            needed(GIB, 2, 1),
            2 * (GIB + CONTROL_QUEUE_BYTES) + IOMMU_SLACK
        );
        assert_eq!(needed(GIB, 0, 0), 0);
        assert_eq!(needed(u64::MAX, 2, 1), u64::MAX, "saturates");
    }

    #[test]
    fn the_soft_limit_is_raised_up_to_the_hard_one_and_past_it_only_with_privilege() {
        // The test host's default: 8 MiB soft and hard.
        assert_eq!(
            plan(8 * MIB, 8 * MIB, 512 * MIB),
            Action::RaiseBoth(512 * MIB)
        );
        assert_eq!(
            plan(8 * MIB, u64::MAX, 512 * MIB),
            Action::RaiseSoft(512 * MIB)
        );
        assert_eq!(plan(u64::MAX, u64::MAX, 512 * MIB), Action::Enough);
        assert_eq!(plan(512 * MIB, 512 * MIB, 512 * MIB), Action::Enough);
        assert_eq!(plan(0, 0, 0), Action::Enough);
    }

    #[test]
    fn a_limit_below_the_need_is_named_with_the_amount() {
        let low = MemlockStatus {
            limit: 8 * MIB,
            needed: 1536 * MIB,
            refused: Some("Operation not permitted (os error 1)".into()),
        };
        let text = low.shortfall().unwrap();
        assert!(
            text.starts_with("RLIMIT_MEMLOCK is 8M, below the 1536M a device that pins"),
            "{text}"
        );
        assert!(
            text.contains("raising it failed: Operation not permitted"),
            "{text}"
        );
        assert!(!text.contains('\n'));
        let enough = MemlockStatus {
            limit: u64::MAX,
            needed: 1536 * MIB,
            refused: None,
        };
        assert_eq!(enough.shortfall(), None);
    }

    #[test]
    fn raising_to_what_the_process_already_has_changes_nothing() {
        let (soft, _) = get().unwrap();
        let status = raise(0);
        assert_eq!(status.limit, soft);
        assert_eq!(status.refused, None);
        assert_eq!(get().unwrap().0, soft);
    }
}
