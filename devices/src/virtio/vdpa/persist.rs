//! What a snapshot keeps of a vDPA device besides its transport, and
//! starting a device in a new process where a snapshot left it.
//!
//! A paused device no longer touches guest memory, whichever way it was
//! stopped (SUSPEND or a reset), so each started queue's position is the
//! used index the guest's ring holds: buffers the device took but never
//! used are offered again, as after a pause by reset. The guest's control
//! queue, where the VMM alone serves it, is parked between two commands, so
//! its used index is where it stands too, and its net state (the queue
//! pairs in use) is kept. A restore opens the device anew (its IOTLB comes
//! from the address spaces, one batch, when it is attached) and starts it on
//! the driver's rings from those positions before any vCPU runs.

use serde::{Deserialize, Serialize};

use super::*;

/// A device's own state in a snapshot (plain data).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdpaSnapshot {
    /// Where each started queue stood, the VMM-served control queue's
    /// included (empty if the driver never started the device).
    pub positions: Vec<QueuePosition>,
    /// The net state the guest's control queue set, where the VMM serves it.
    pub control: Option<NetState>,
}

impl VdpaDevice {
    /// Why a snapshot cannot keep everything this device holds, if it
    /// cannot: a shadowed control queue has state in the device that is not
    /// saved yet.
    pub fn snapshot_refusal(&self) -> Option<&'static str> {
        match &self.state.layer {
            Layer::Net(NetLayer {
                control: Some(ControlMode::Shadowed { .. }),
                ..
            }) => Some("the state its own control queue holds is not saved yet"),
            _ => None,
        }
    }

    /// The device's state while it is paused.
    pub fn snapshot(&self) -> Result<VdpaSnapshot, VdpaError> {
        if let Some(reason) = self.snapshot_refusal() {
            return Err(VdpaError::Snapshot(reason.into()));
        }
        let mut positions = match &self.state.stopped {
            None => {
                return Err(VdpaError::Snapshot(
                    "the device is running; the VM must be paused".into(),
                ))
            }
            Some(Stopped::Idle) => return Ok(VdpaSnapshot::default()),
            Some(Stopped::Reset { positions }) => positions.clone(),
            Some(Stopped::Suspended) => {
                let used = self.used_indexes()?;
                self.read_used(&used)
            }
        };
        let control = match (&self.control, &self.activation) {
            (Some(control), Some(activation)) => {
                let index = self.control_queue(activation.features).map(|(i, _)| i);
                let queue = activation.queues.iter().find(|q| Some(q.index) == index);
                if let Some(queue) = queue {
                    positions.push(self.control_position(queue)?);
                }
                Some(lock_state(&control.state).clone())
            }
            _ => None,
        };
        Ok(VdpaSnapshot { positions, control })
    }

    /// Where the guest's control queue stands: its used index, in guest
    /// memory (the VMM serves it only without a vIOMMU, at guest physical
    /// addresses).
    fn control_position(&self, queue: &QueueConfig) -> Result<QueuePosition, VdpaError> {
        let used_idx = queue.used_idx(&self.memory).ok_or_else(|| {
            VdpaError::Snapshot(format!(
                "the control queue's used ring at {:#x} is not in guest memory",
                queue.device
            ))
        })?;
        Ok(QueuePosition {
            index: queue.index,
            used_idx,
        })
    }

    /// Starts the device a snapshot saved as started: on the driver's
    /// rings (`activation`), each queue from its saved position, the queue
    /// pairs the guest had in use enabled, and the VMM's control-queue
    /// worker going on with the saved state. Every started queue must have
    /// a position. On an error the device is reset.
    pub fn restore_started(
        &mut self,
        activation: Activation,
        saved: &VdpaSnapshot,
    ) -> Result<(), VdpaError> {
        if let Some(reason) = self.snapshot_refusal() {
            return Err(VdpaError::Restore(reason.into()));
        }
        let position = |index: u16| saved.positions.iter().find(|p| p.index == index);
        if let Some(queue) = activation
            .queues
            .iter()
            .find(|q| position(q.index).is_none())
        {
            return Err(VdpaError::Restore(format!(
                "queue {} was started but the snapshot has no position for it",
                queue.index
            )));
        }
        let state = saved.control.clone().unwrap_or_default();
        let most = match &self.state.layer {
            Layer::Net(net) => net.queue_pairs,
            Layer::Block(_) => 1,
        };
        if state.queue_pairs == 0 || state.queue_pairs > most {
            return Err(VdpaError::Restore(format!(
                "the snapshot has {} queue pairs in use; the device is presented with {most}",
                state.queue_pairs
            )));
        }
        let started = self
            .bring_up(&activation, &saved.positions, state.queue_pairs)
            .and_then(|control| match control {
                Some((index, max_pairs)) => {
                    let at = position(index).map_or(0, |p| p.used_idx);
                    self.serve_control(&activation, index, max_pairs, Some((at, state)))
                }
                None => Ok(()),
            });
        match started {
            Ok(()) => {
                self.state.activations += 1;
                self.activation = Some(activation);
                Ok(())
            }
            Err(error) => {
                let _ = self.vhost.set_status(0);
                self.state.active.clear();
                Err(error)
            }
        }
    }
}
