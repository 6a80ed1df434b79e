//! Parking vCPUs: the CPU half of pausing a VM.
//!
//! Every vCPU thread passes the gate before each KVM_RUN. To pause, the
//! gate is closed and each vCPU thread is sent [`kick_signal`] until all of
//! them stand at the gate: a vCPU inside KVM_RUN leaves it with EINTR, one
//! busy with an exit reaches the gate when it is done. A kick that lands just
//! before a thread enters KVM_RUN is lost, so kicks repeat until every vCPU is
//! parked or the bound passes (then the gate opens again and the pause is
//! refused: no VM is left half paused).
//!
//! A parked vCPU is outside KVM_RUN, so its registers are stable and every
//! device access it made has completed. While the gate is closed it can be
//! asked for its state ([`VcpuGate::collect`]): each parked vCPU thread
//! saves its own (only that thread may use its vCPU's descriptor) and
//! leaves it at the gate.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How often a closing gate kicks the vCPUs that have not parked yet.
const KICK_INTERVAL: Duration = Duration::from_millis(5);

/// The signal that moves a vCPU thread out of KVM_RUN: the first real-time
/// signal the C library leaves to programs.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the (empty) handler of [`kick_signal`], once per process,
/// before any vCPU thread starts: a signal with a handler interrupts
/// KVM_RUN (EINTR) instead of ending the process.
pub fn install_kick_handler() -> std::io::Result<()> {
    extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GateError {
    #[error("{parked} of {count} vCPUs stopped within {bound:?}; the VM runs on")]
    NotParked {
        parked: usize,
        count: usize,
        bound: Duration,
    },
    #[error("the VM is ending: {0} of its vCPU threads have stopped")]
    Ended(usize),
    #[error("the vCPUs are not parked (the VM is not paused)")]
    Running,
    #[error("{saved} of {count} vCPUs saved their state within {bound:?}")]
    NotSaved {
        saved: usize,
        count: usize,
        bound: Duration,
    },
}

#[derive(Debug)]
struct Inner<S> {
    closed: bool,
    /// The registered vCPU threads; `None` once one has ended.
    threads: Vec<Option<libc::pthread_t>>,
    parked: usize,
    /// Bumped by each `collect`: a parked vCPU that has not answered this
    /// round saves its state into `saved`, at its seat.
    save_round: u64,
    saved: Vec<Option<S>>,
}

/// The gate all vCPU threads of one VM pass; `S` is what a parked vCPU
/// saves when asked.
#[derive(Debug)]
pub struct VcpuGate<S = ()> {
    /// The fast path of `pass`: read before each KVM_RUN.
    closed: AtomicBool,
    inner: Mutex<Inner<S>>,
    changed: Condvar,
}

impl<S> Default for VcpuGate<S> {
    fn default() -> Self {
        VcpuGate {
            closed: AtomicBool::new(false),
            inner: Mutex::new(Inner {
                closed: false,
                threads: Vec::new(),
                parked: 0,
                save_round: 0,
                saved: Vec::new(),
            }),
            changed: Condvar::new(),
        }
    }
}

/// A vCPU thread's place at the gate (see [`VcpuGate::register`]).
#[derive(Debug)]
pub struct GateSeat {
    index: usize,
}

impl<S> VcpuGate<S> {
    pub fn new() -> VcpuGate<S> {
        VcpuGate::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner<S>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by a vCPU thread when it starts: the gate kicks it by its
    /// pthread id from now on.
    pub fn register(&self) -> GateSeat {
        let mut inner = self.lock();
        // SAFETY: pthread_self has no preconditions and cannot fail.
        let me = unsafe { libc::pthread_self() };
        inner.threads.push(Some(me));
        GateSeat {
            index: inner.threads.len() - 1,
        }
    }

    /// Called by a vCPU thread as it ends: never kicked again (its pthread
    /// id may be reused once it is gone).
    pub fn leave(&self, seat: GateSeat) {
        let mut inner = self.lock();
        if let Some(slot) = inner.threads.get_mut(seat.index) {
            *slot = None;
        }
        self.changed.notify_all();
    }

    /// Called by a vCPU thread before each KVM_RUN: returns at once while
    /// the gate is open, else runs `on_park` (the vCPU is out of the guest)
    /// and waits until the gate opens, running `save` each time its state
    /// is asked for meanwhile.
    pub fn pass(&self, seat: &GateSeat, on_park: impl FnOnce(), mut save: impl FnMut() -> S) {
        if !self.closed.load(Ordering::Acquire) {
            return;
        }
        let mut inner = self.lock();
        if !inner.closed {
            return;
        }
        on_park();
        inner.parked += 1;
        let mut answered = inner.save_round;
        self.changed.notify_all();
        while inner.closed {
            if inner.save_round != answered {
                answered = inner.save_round;
                // Saved without the lock: a few ioctls on this thread's own
                // vCPU, while the others save theirs.
                drop(inner);
                let state = save();
                inner = self.lock();
                if let Some(slot) = inner.saved.get_mut(seat.index) {
                    *slot = Some(state);
                }
                self.changed.notify_all();
                continue;
            }
            inner = self.changed.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
        inner.parked -= 1;
        self.changed.notify_all();
    }

    /// Each parked vCPU's saved state, by seat (registration order). The
    /// gate must be closed with every vCPU parked; waits at most `bound`
    /// for them to save.
    pub fn collect(&self, bound: Duration) -> Result<Vec<S>, GateError> {
        let deadline = Instant::now() + bound;
        let mut inner = self.lock();
        let count = inner.threads.len();
        if !inner.closed || inner.parked != count {
            return Err(GateError::Running);
        }
        inner.save_round = inner.save_round.wrapping_add(1);
        inner.saved = (0..count).map(|_| None).collect();
        self.changed.notify_all();
        loop {
            let saved = inner.saved.iter().filter(|s| s.is_some()).count();
            if saved == count {
                return Ok(inner.saved.drain(..).flatten().collect());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(GateError::NotSaved {
                    saved,
                    count,
                    bound,
                });
            }
            inner = self
                .changed
                .wait_timeout(inner, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Closes the gate and returns once every registered vCPU stands at it.
    /// Waits at most `bound`; then the gate opens again and the pause is
    /// refused.
    pub fn close(&self, bound: Duration) -> Result<(), GateError> {
        let deadline = Instant::now() + bound;
        let mut inner = self.lock();
        let ended = inner.threads.iter().filter(|t| t.is_none()).count();
        if ended > 0 {
            return Err(GateError::Ended(ended));
        }
        inner.closed = true;
        self.closed.store(true, Ordering::Release);
        loop {
            let count = inner.threads.len();
            if inner.parked == count {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline || inner.threads.iter().any(Option::is_none) {
                let parked = inner.parked;
                drop(inner);
                self.open();
                return Err(GateError::NotParked {
                    parked,
                    count,
                    bound,
                });
            }
            for thread in inner.threads.iter().flatten() {
                // SAFETY: the thread is registered and has not left (it
                // leaves under this lock before it ends), so its pthread id
                // is live. The signal has a handler (install_kick_handler)
                // that does nothing; pthread_kill touches no memory of ours.
                unsafe {
                    libc::pthread_kill(*thread, kick_signal());
                }
            }
            let wait = KICK_INTERVAL.min(deadline - now);
            inner = self
                .changed
                .wait_timeout(inner, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Opens the gate: every parked vCPU goes back into the guest.
    pub fn open(&self) {
        let mut inner = self.lock();
        inner.closed = false;
        self.closed.store(false, Ordering::Release);
        self.changed.notify_all();
        drop(inner);
    }

    /// Whether the gate is closed (the vCPUs parked or being parked).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// How many vCPUs stand at the gate now.
    pub fn parked(&self) -> usize {
        self.lock().parked
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    /// A stand-in vCPU: spins (or sleeps, like a guest in KVM_RUN that a
    /// signal interrupts) and passes the gate between runs.
    fn spawn_vcpu(gate: &Arc<VcpuGate>, runs: &Arc<AtomicU64>, stop: &Arc<AtomicBool>) {
        let (gate, runs, stop) = (gate.clone(), runs.clone(), stop.clone());
        let (ready, started) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let seat = gate.register();
            ready.send(()).unwrap();
            while !stop.load(Ordering::Relaxed) {
                gate.pass(&seat, || {}, || ());
                runs.fetch_add(1, Ordering::Relaxed);
                // A long "KVM_RUN": one nanosleep, which the kick signal
                // ends early with EINTR as it ends KVM_RUN (std's sleep
                // would sleep on).
                let long = libc::timespec {
                    tv_sec: 30,
                    tv_nsec: 0,
                };
                // SAFETY: nanosleep reads `long` and writes nothing (no
                // remainder pointer).
                unsafe { libc::nanosleep(&long, std::ptr::null_mut()) };
            }
            gate.leave(seat);
        });
        started.recv().unwrap();
    }

    #[test]
    fn closing_parks_every_vcpu_even_one_asleep_in_the_guest_and_opening_releases_them() {
        install_kick_handler().unwrap();
        let gate = Arc::new(VcpuGate::new());
        let runs = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        for _ in 0..3 {
            spawn_vcpu(&gate, &runs, &stop);
        }
        let started = Instant::now();
        gate.close(Duration::from_secs(5)).unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(gate.parked(), 3);
        let at_pause = runs.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(runs.load(Ordering::Relaxed), at_pause, "no vCPU ran");
        gate.open();
        let deadline = Instant::now() + Duration::from_secs(5);
        while runs.load(Ordering::Relaxed) < at_pause + 3 {
            assert!(Instant::now() < deadline, "the vCPUs did not run again");
            std::thread::sleep(Duration::from_millis(5));
        }
        // The stand-ins leave at their next wake.
        stop.store(true, Ordering::Relaxed);
    }

    #[test]
    fn a_vcpu_that_never_comes_back_fails_the_pause_and_the_gate_opens_again() {
        install_kick_handler().unwrap();
        let gate: Arc<VcpuGate> = Arc::new(VcpuGate::new());
        // Registered, but it never passes the gate (a vCPU stuck in a
        // device access that does not return).
        let stuck = gate.clone();
        let (ready, started) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let seat = stuck.register();
            ready.send(()).unwrap();
            // Interrupted by kicks; keeps waiting.
            while released.recv_timeout(Duration::from_millis(1)).is_err() {}
            stuck.leave(seat);
        });
        started.recv().unwrap();
        let error = gate.close(Duration::from_millis(100)).unwrap_err();
        assert_eq!(
            error,
            GateError::NotParked {
                parked: 0,
                count: 1,
                bound: Duration::from_millis(100)
            }
        );
        assert!(!gate.is_closed(), "a refused pause leaves the VM running");
        release.send(()).unwrap();
        thread.join().unwrap();
        assert_eq!(
            gate.close(Duration::from_millis(100)),
            Err(GateError::Ended(1))
        );
    }
}
