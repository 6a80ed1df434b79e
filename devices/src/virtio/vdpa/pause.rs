//! Stopping a running vDPA device for a pause, and starting it again where
//! it stopped, the guest none the wiser.
//!
//! Two ways, chosen by what the device offers:
//! - SUSPEND and RESUME (vdpa_sim, mlx5): VHOST_VDPA_SUSPEND; the device keeps
//!   its rings, positions and mappings, and VHOST_VDPA_RESUME lets it go on.
//! - Neither (VDUSE, vp_vdpa): a reset. Once the reset returns the device no
//!   longer touches guest memory (VDUSE waits for its process to answer), and
//!   each started queue's position is then taken from the used index the guest
//!   sees: buffers the device took but never used are offered again (a TX frame
//!   may go out twice, an RX buffer is filled later; both are what a NIC may
//!   do). Resume starts the device again with those positions as the rings'
//!   bases (VHOST_SET_VRING_BASE), the IOTLB replayed through the address
//!   spaces where the device may have dropped it, and the queue pairs the guest
//!   had enabled.
//!
//! The guest's status register never changes: the transport still says
//! DRIVER_OK, and the device is back before any vCPU runs.

use vhost::vdpa::VhostVdpa;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::ioctl::ioctl;

use super::*;

vmm_sys_util::ioctl_io_nr!(VHOST_VDPA_RESUME, 0xaf, 0x7e);

/// Where a started queue stood when its device was stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueuePosition {
    pub index: u16,
    /// The used index in the guest's ring, which is the next avail entry
    /// the device serves when it starts again.
    pub used_idx: u16,
}

/// How a paused device was stopped (plain data: what a restore needs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// The driver had not started the device: nothing ran, nothing to stop.
    Idle,
    /// VHOST_VDPA_SUSPEND: the device kept its rings and positions.
    Suspended,
    /// A reset; the started queues' positions.
    Reset { positions: Vec<QueuePosition> },
}

impl Stopped {
    /// "idle", "suspend" or "reset", as `info` says it.
    pub fn method(&self) -> &'static str {
        match self {
            Stopped::Idle => "idle",
            Stopped::Suspended => "suspend",
            Stopped::Reset { .. } => "reset",
        }
    }
}

impl VdpaDevice {
    /// Whether this device stops by SUSPEND (acked with RESUME) rather than
    /// by a reset.
    pub fn can_suspend(&self) -> bool {
        let both = VHOST_BACKEND_F_SUSPEND | VHOST_BACKEND_F_RESUME;
        self.state.backend_features & both == both
    }

    /// Stops the device: when this returns Ok it no longer reads or writes
    /// guest memory, and [`VdpaDevice::resume`] starts it where it stopped.
    /// Pausing a paused device does nothing. On an error the device runs
    /// as before, as far as the device allows (a reset cannot be undone:
    /// the device is then started again at once).
    pub fn pause(&mut self) -> Result<(), VdpaError> {
        if self.state.stopped.is_some() {
            return Ok(());
        }
        let stopped = match self.activation.is_some() {
            false => Stopped::Idle,
            true if self.can_suspend() => {
                self.vhost.suspend().map_err(|source| VdpaError::Ioctl {
                    what: "VHOST_VDPA_SUSPEND",
                    source,
                })?;
                Stopped::Suspended
            }
            true => {
                if self.shadow.is_some() {
                    return Err(VdpaError::Pause(
                        "the device's control queue is shadowed, and a reset would lose its \
                         state: pausing it needs SUSPEND and RESUME"
                            .into(),
                    ));
                }
                // Where each used index lies is decided before the reset,
                // so a queue the VMM cannot read refuses the pause while
                // the device still runs; its value is read after it.
                let used = self.used_indexes()?;
                self.vhost
                    .set_status(0)
                    .map_err(|source| VdpaError::Ioctl {
                        what: "reset (set status 0)",
                        source,
                    })?;
                Stopped::Reset {
                    positions: self.read_used(&used),
                }
            }
        };
        self.state.stopped = Some(stopped);
        self.state.pauses += 1;
        Ok(())
    }

    /// Starts a paused device again where it stopped. Resuming a running
    /// device does nothing.
    pub fn resume(&mut self) -> Result<(), VdpaError> {
        let Some(stopped) = self.state.stopped.clone() else {
            return Ok(());
        };
        match &stopped {
            Stopped::Idle => {}
            Stopped::Suspended => {
                // SAFETY: VHOST_VDPA_RESUME takes no argument and touches no
                // memory of ours; on a descriptor that is not a vhost-vdpa
                // device it fails with an errno, which is checked.
                let ret = unsafe { ioctl(&self.vhost, VHOST_VDPA_RESUME()) };
                if ret < 0 {
                    return Err(VdpaError::Ioctl {
                        what: "VHOST_VDPA_RESUME",
                        source: vhost::Error::IoctlError(std::io::Error::last_os_error()),
                    });
                }
            }
            Stopped::Reset { positions } => {
                let persist = self.state.backend_features & VHOST_BACKEND_F_IOTLB_PERSIST != 0;
                if !persist && replay_after_reset(self.spaces.as_ref()) {
                    self.state.iotlb_replays += 1;
                }
                let Some(activation) = self.activation.take() else {
                    return Err(VdpaError::Pause("no saved start to resume".into()));
                };
                let pairs = self
                    .control
                    .as_ref()
                    .map_or(1, |c| lock_state(&c.state).queue_pairs);
                let started = self.bring_up(&activation, positions, pairs);
                self.activation = Some(activation);
                if let Err(error) = started {
                    let _ = self.vhost.set_status(0);
                    return Err(error);
                }
            }
        }
        self.state.stopped = None;
        Ok(())
    }

    /// The used index at each of `used`, now: where each queue's device
    /// stopped, once it no longer writes guest memory.
    pub(super) fn read_used(&self, used: &[(u16, GuestAddress)]) -> Vec<QueuePosition> {
        used.iter()
            .map(|&(index, at)| QueuePosition {
                index,
                // The address was checked to lie in guest memory.
                used_idx: u16::from_le(self.memory.read_obj::<u16>(at).unwrap_or(0)),
            })
            .collect()
    }

    /// Where each started queue's used index lies in guest memory, found
    /// through the device's own IOTLB (its ring addresses are IOVAs).
    pub(super) fn used_indexes(&self) -> Result<Vec<(u16, GuestAddress)>, VdpaError> {
        let mappings = self.lock_mapper().mappings(DEVICE_ASID);
        self.state
            .active
            .iter()
            .map(|queue| {
                let at = queue
                    .device
                    .checked_add(USED_IDX_OFFSET)
                    .and_then(|iova| host_of(&mappings, iova))
                    .and_then(|host| guest_of(&self.memory, host))
                    .ok_or_else(|| {
                        VdpaError::Pause(format!(
                            "queue {}: its used ring at {:#x} is not in guest memory the device \
                             may reach",
                            queue.index, queue.device
                        ))
                    })?;
                Ok((queue.index, at))
            })
            .collect()
    }
}

/// The VMM address behind `iova` in a device's IOTLB, if it maps 2 bytes
/// there.
fn host_of(mappings: &[DmaRange], iova: u64) -> Option<u64> {
    let end = iova.checked_add(2)?;
    let range = mappings
        .iter()
        .find(|r| iova >= r.iova && r.iova.checked_add(r.size).is_some_and(|e| end <= e))?;
    range.host_addr.checked_add(iova - range.iova)
}

/// The guest address whose memory is at VMM address `host`.
fn guest_of(memory: &GuestMemoryMmap, host: u64) -> Option<GuestAddress> {
    memory.iter().find_map(|region| {
        let start = region.as_ptr() as u64;
        let offset = host.checked_sub(start)?;
        (offset.checked_add(2)? <= region.len()).then(|| region.start_addr().unchecked_add(offset))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::Perm;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(1 << 30), 1 << 20),
        ])
        .unwrap()
    }

    fn host(memory: &GuestMemoryMmap, gpa: u64) -> u64 {
        memory.get_host_address(GuestAddress(gpa)).unwrap() as u64
    }

    #[test]
    fn a_used_index_behind_an_iova_is_found_through_the_iotlb_and_the_guest_memory() {
        let memory = memory();
        memory
            .write_obj(0x1234u16.to_le(), GuestAddress((1 << 30) + 0x802))
            .unwrap();
        // The guest mapped its second region's first page at IOVA 0xfee0_0000.
        let mappings = [DmaRange::new(
            0xfee0_0000,
            0x1000,
            host(&memory, 1 << 30),
            Perm::ReadWrite,
        )];
        let h = host_of(&mappings, 0xfee0_0802).unwrap();
        let gpa = guest_of(&memory, h).unwrap();
        assert_eq!(gpa, GuestAddress((1 << 30) + 0x802));
        assert_eq!(memory.read_obj::<u16>(gpa).unwrap(), 0x1234);
    }

    #[test]
    fn an_index_outside_the_iotlb_or_straddling_its_end_is_not_read() {
        let memory = memory();
        let mappings = [DmaRange::new(
            0x1000,
            0x1000,
            host(&memory, 0x1000),
            Perm::ReadWrite,
        )];
        assert_eq!(host_of(&mappings, 0x3000), None);
        assert_eq!(
            host_of(&mappings, 0x1fff),
            None,
            "only one of its bytes is mapped"
        );
        assert_eq!(host_of(&mappings, u64::MAX), None);
        assert!(host_of(&mappings, 0x1ffe).is_some());
        assert_eq!(guest_of(&memory, 0x10), None, "not guest memory");
    }
}
