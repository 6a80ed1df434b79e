//! How any part of the VMM (a vCPU, a device) asks the VMM to stop, and why.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered itself off.
    PowerOff,
    /// The guest asked for a reset (reboot); a microVM ends instead.
    Reset,
    /// Something failed; the text is a one-line reason for the user.
    Error(String),
    /// A new VMM process took the VM (live update): this one ends without
    /// touching it.
    HandedOver,
}

/// Shared by everyone who may end the VM. The first reason wins: a vCPU
/// failing after the guest already powered off does not turn success into
/// an error.
#[derive(Clone)]
pub struct ExitSignal {
    event: Arc<EventFd>,
    reason: Arc<Mutex<Option<ExitReason>>>,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<ExitSignal> {
        Ok(ExitSignal {
            event: Arc::new(EventFd::new(EFD_NONBLOCK)?),
            reason: Arc::new(Mutex::new(None)),
        })
    }

    pub fn request(&self, reason: ExitReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
        }
        drop(slot);
        // A full eventfd counter still wakes the reader; nothing to handle.
        let _ = self.event.write(1);
    }

    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Readable once an exit was requested; for the event loop.
    pub fn event_fd(&self) -> &EventFd {
        &self.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_the_event_fires() {
        let signal = ExitSignal::new().unwrap();
        assert_eq!(signal.reason(), None);
        signal.clone().request(ExitReason::PowerOff);
        signal.request(ExitReason::Error("late".into()));
        assert_eq!(signal.reason(), Some(ExitReason::PowerOff));
        assert_eq!(signal.event_fd().read().unwrap(), 2);
    }
}
