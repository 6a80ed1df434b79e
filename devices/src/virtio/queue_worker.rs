//! A device thread serving one virtqueue: the shape shared by devices whose
//! requests are handled in the VMM (virtio-mem's request queue, the
//! virtio-iommu request queue).
//!
//! The thread is created with the device, before any vCPU runs (vCPU threads
//! may not create threads under seccomp), runs `on_start` first (to install
//! its seccomp filter) and then idles until the transport hands it a queue:
//!
//! ```text
//!   QueueWorker::spawn(name, memory, handler, on_start)   at device creation
//!   worker.serve(Serve { queue, index, kick, interrupt }) at DRIVER_OK
//!   worker.stop()                                         at reset
//!   worker.call(|handler| ...)                            device state changes
//!   let parked = worker.park()?; ...; drop(parked)        VM paused, resumed
//! ```
//!
//! `call` runs a closure on the worker thread, with the handler, between two
//! drains, and returns once it ran: state the handler owns changes without a
//! lock and in order with the requests (virtio-iommu's bypass bit and reset).
//!
//! While serving, every kick (and the start itself, for requests queued
//! before it) calls the `QueueHandler` with a `Drain` of the queue. The
//! handler pops chains with `Drain::next_chain`, answers them with
//! `Drain::add_used`, and may take all chains of one kick before answering
//! (virtio-iommu commits one drain as one DMA transaction). The worker
//! raises the queue's interrupt when the handler added used entries.
//!
//! What the guest points at never sets what a drain costs: the worker
//! walks each chain itself and hands the handler its buffers as a short
//! list, or a `ChainError` when the chain is malformed (answer it with a
//! used length of 0). No device here offers VIRTIO_RING_F_INDIRECT_DESC, so
//! a chain with an indirect descriptor is malformed and its table is never
//! read; a chain has at most [`MAX_CHAIN_DESCRIPTORS`] descriptors and
//! [`MAX_CHAIN_BYTES`]. One drain pops at most the queue size's chains
//! (a driver that keeps queueing cannot stretch it): the rest waits, and
//! the worker comes back for it on its own, after any pending command.
//!
//! `stop` is synchronous: it returns once the worker has dropped the queue,
//! so after a reset the device no longer reads or writes the old rings. A
//! request the handler is in the middle of completes first (its used entry
//! is written before `stop` returns); chains still queued are left alone,
//! because `next_chain` returns `None` as soon as a stop is asked for.
//!
//! `park` is the pause of a running VM: it returns once the worker sits
//! between two drains (the drain in progress completes, all of it: a guest
//! request is never left half done) and keeps it there, queue and position
//! kept, until the returned [`Parked`] is dropped. Kicks that arrive
//! meanwhile wait in the kick eventfd and are served after it.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::VirtioInterrupt;

/// Most descriptors one chain may have: requests of the devices served
/// here take two (Linux's virtio-iommu and virtio-mem drivers).
pub const MAX_CHAIN_DESCRIPTORS: usize = 16;
/// Most bytes one chain's descriptors may describe, readable and writable
/// together (the largest request here, a PROBE, takes a few hundred).
pub const MAX_CHAIN_BYTES: u64 = 64 << 10;

/// One buffer of a chain, as its descriptor says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
    /// Device-writable (VIRTQ_DESC_F_WRITE).
    pub writable: bool,
}

/// Why a chain is not served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("descriptor {index} refers to an indirect table, which the device did not offer")]
    Indirect { index: u16 },
    #[error("descriptor {index} is outside the descriptor table of {size}")]
    OutOfTable { index: u16, size: u16 },
    #[error("descriptor {index} cannot be read")]
    Unreadable { index: u16 },
    #[error("more than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    #[error("more than {MAX_CHAIN_BYTES} bytes")]
    TooManyBytes,
}

/// One chain the driver made available, walked and checked by the worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    head: u16,
    segments: Result<Vec<Segment>, ChainError>,
}

impl Chain {
    /// What the used entry names.
    pub fn head_index(&self) -> u16 {
        self.head
    }

    /// Its buffers in order, or why it is malformed.
    pub fn segments(&self) -> Result<&[Segment], ChainError> {
        self.segments.as_deref().map_err(|e| *e)
    }
}

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
const DESC_SIZE: u64 = 16;

/// Walks the chain at `head` in the descriptor table at `table` of `size`
/// entries, reading one descriptor at a time and stopping at the first
/// bound it breaks; a loop breaks the descriptor bound.
fn walk(memory: &GuestMemoryMmap, table: u64, size: u16, head: u16) -> Chain {
    let mut segments = Vec::new();
    let mut bytes: u64 = 0;
    let mut index = head;
    let result = loop {
        if index >= size {
            break Err(ChainError::OutOfTable { index, size });
        }
        if segments.len() == MAX_CHAIN_DESCRIPTORS {
            break Err(ChainError::TooManyDescriptors);
        }
        let at = u64::from(index)
            .checked_mul(DESC_SIZE)
            .and_then(|offset| table.checked_add(offset));
        let descriptor = at.and_then(|at| memory.read_obj::<Descriptor>(GuestAddress(at)).ok());
        let Some(descriptor) = descriptor else {
            break Err(ChainError::Unreadable { index });
        };
        let flags = descriptor.flags();
        if flags & DESC_F_INDIRECT != 0 {
            break Err(ChainError::Indirect { index });
        }
        bytes = bytes.saturating_add(u64::from(descriptor.len()));
        if bytes > MAX_CHAIN_BYTES {
            break Err(ChainError::TooManyBytes);
        }
        segments.push(Segment {
            addr: descriptor.addr(),
            len: descriptor.len(),
            writable: flags & DESC_F_WRITE != 0,
        });
        if flags & DESC_F_NEXT == 0 {
            break Ok(segments);
        }
        index = descriptor.next();
    };
    Chain {
        head,
        segments: result,
    }
}

/// What a device does with the requests of its queue.
pub trait QueueHandler: Send + 'static {
    /// Serves what the driver queued, on each kick.
    fn serve(&mut self, drain: &mut Drain<'_>);
}

/// A closure over a drain is a handler too.
impl<F: FnMut(&mut Drain<'_>) + Send + 'static> QueueHandler for F {
    fn serve(&mut self, drain: &mut Drain<'_>) {
        self(drain)
    }
}

/// The queue as a handler sees it during one kick.
pub struct Drain<'a> {
    queue: &'a mut Queue,
    memory: &'a GuestMemoryMmap,
    stopping: &'a AtomicBool,
    used: bool,
    /// Chains popped so far: at most the queue size.
    popped: u16,
    /// The drain stopped at its bound; chains may be waiting.
    bounded: bool,
}

/// A drain outside any worker: never told to stop.
static NEVER_STOPPING: AtomicBool = AtomicBool::new(false);

impl<'a> Drain<'a> {
    /// A drain of `queue` run by the caller, for tests and fuzz targets
    /// that drive a handler synchronously.
    pub fn new(queue: &'a mut Queue, memory: &'a GuestMemoryMmap) -> Drain<'a> {
        Drain {
            queue,
            memory,
            stopping: &NEVER_STOPPING,
            used: false,
            popped: 0,
            bounded: false,
        }
    }

    /// Whether a used entry was added.
    pub fn used(&self) -> bool {
        self.used
    }

    /// Whether the drain ended at its bound rather than on an empty queue.
    pub fn bounded(&self) -> bool {
        self.bounded
    }

    /// The next chain the driver made available; `None` when the queue is
    /// empty, malformed, the drain took the queue size's chains, or the
    /// device is being stopped.
    pub fn next_chain(&mut self) -> Option<Chain> {
        if self.stopping.load(Ordering::Acquire) {
            return None;
        }
        if self.popped >= self.queue.size() {
            self.bounded = true;
            return None;
        }
        let head = self.queue.pop_descriptor_chain(self.memory)?.head_index();
        self.popped += 1;
        Some(walk(
            self.memory,
            self.queue.desc_table(),
            self.queue.size(),
            head,
        ))
    }

    /// Returns the chain whose head is `head` to the driver, with `written`
    /// bytes written into its device-writable buffers.
    pub fn add_used(&mut self, head: u16, written: u32) {
        // Fails only for a head outside the queue, which pop never returns;
        // the driver sees a request that never completes, not a crash.
        if self.queue.add_used(self.memory, head, written).is_ok() {
            self.used = true;
        }
    }

    pub fn memory(&self) -> &'a GuestMemoryMmap {
        self.memory
    }
}

/// What the driver set up, handed over at DRIVER_OK.
pub struct Serve {
    pub queue: Queue,
    /// The queue's index in the device, for its interrupt.
    pub index: u16,
    /// Written on each guest notification.
    pub kick: EventFd,
    pub interrupt: Arc<dyn VirtioInterrupt>,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("the {0} thread is gone")]
    Gone(String),
    #[error("the {0} thread did not finish its request within {1:?}")]
    Busy(String, std::time::Duration),
}

/// Work for the handler, run on the worker thread.
type Call<H> = Box<dyn FnOnce(&mut H) + Send>;

enum Command<H> {
    Serve(Serve),
    /// Acknowledged once the queue is dropped.
    Stop(Sender<()>),
    /// Acknowledged once the closure ran.
    Call(Call<H>, Sender<()>),
    /// Acknowledged between two drains; the worker then waits until the
    /// second channel's sender is dropped.
    Park(Sender<()>, Receiver<()>),
}

/// A worker held between two drains (see [`QueueWorker::park`]); dropping
/// it lets the worker go on.
#[must_use = "the worker goes on as soon as this is dropped"]
pub struct Parked {
    _release: Sender<()>,
}

/// Sends a park command to one worker: true if it was queued.
type AskPark = dyn Fn(Sender<()>, Receiver<()>) -> bool + Send + Sync;

/// Parks one worker, whatever its handler: what pausing a VM needs of
/// each device thread (see [`QueueWorker::parker`]).
#[derive(Clone)]
pub struct Parker {
    name: String,
    ask: Arc<AskPark>,
}

impl Parker {
    /// The worker thread's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Returns once the worker sits between two drains, and keeps it there
    /// until the answer is dropped. Waits at most `bound` for the drain in
    /// progress (a handler's own device commit is bounded by the kernel).
    pub fn park(&self, bound: std::time::Duration) -> Result<Parked, WorkerError> {
        let (ack, acked) = channel();
        let (release, released) = channel();
        if !(self.ask)(ack, released) {
            return Err(WorkerError::Gone(self.name.clone()));
        }
        match acked.recv_timeout(bound) {
            Ok(()) => Ok(Parked { _release: release }),
            // Dropping `release` lets the worker go on at once when it gets
            // there: nothing stays parked behind a refusal.
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                Err(WorkerError::Busy(self.name.clone(), bound))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                Err(WorkerError::Gone(self.name.clone()))
            }
        }
    }
}

/// The device's handle on its worker thread, whose handler is an `H`.
pub struct QueueWorker<H> {
    name: String,
    commands: Sender<Command<H>>,
    /// Wakes the worker when a command is queued.
    wake: Arc<EventFd>,
    /// Tells a handler in the middle of a drain to stop popping chains.
    stopping: Arc<AtomicBool>,
}

impl<H: QueueHandler + 'static> QueueWorker<H> {
    /// Starts the thread `name`. `on_start` runs first on it; if it fails,
    /// the thread ends and `serve`, `stop` and `call` report
    /// `WorkerError::Gone`.
    pub fn spawn(
        name: &str,
        memory: Arc<GuestMemoryMmap>,
        handler: H,
        on_start: Box<dyn FnOnce() -> Result<(), String> + Send>,
    ) -> io::Result<QueueWorker<H>> {
        let (commands, receiver) = channel();
        let wake = EventFd::new(EFD_NONBLOCK)?;
        let stopping = Arc::new(AtomicBool::new(false));
        let thread = Thread {
            commands: receiver,
            wake: wake.try_clone()?,
            memory,
            stopping: stopping.clone(),
        };
        let thread_name = name.to_string();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                if let Err(e) = on_start() {
                    eprintln!("microvm: {thread_name} disabled: {e}");
                    return;
                }
                thread.run(handler)
            })?;
        Ok(QueueWorker {
            name: name.into(),
            commands,
            wake: Arc::new(wake),
            stopping,
        })
    }

    /// Serves `serve.queue` from now on, in place of any previous queue.
    pub fn serve(&self, serve: Serve) -> Result<(), WorkerError> {
        self.send(Command::Serve(serve))
    }

    /// Returns once the worker no longer touches the queue it served.
    pub fn stop(&self) -> Result<(), WorkerError> {
        let (ack, acked) = channel();
        self.stopping.store(true, Ordering::Release);
        let sent = self.send(Command::Stop(ack));
        // A worker that ended drops the command, and with it `ack`.
        let result = sent.and_then(|()| acked.recv().map_err(|_| self.gone()));
        self.stopping.store(false, Ordering::Release);
        result
    }

    /// Runs `f` on the worker thread with the handler, between drains;
    /// returns once it ran.
    pub fn call(&self, f: impl FnOnce(&mut H) + Send + 'static) -> Result<(), WorkerError> {
        let (ack, acked) = channel();
        self.send(Command::Call(Box::new(f), ack))?;
        acked.recv().map_err(|_| self.gone())
    }

    /// See [`Parker::park`].
    pub fn park(&self, bound: std::time::Duration) -> Result<Parked, WorkerError> {
        self.parker().park(bound)
    }

    /// A handle that parks this worker from another thread, without the
    /// device it belongs to (whose lock the worker may need to finish).
    pub fn parker(&self) -> Parker {
        let (commands, wake) = (self.commands.clone(), self.wake.clone());
        Parker {
            name: self.name.clone(),
            ask: Arc::new(move |ack, released| {
                commands.send(Command::Park(ack, released)).is_ok() && wake.write(1).is_ok()
            }),
        }
    }

    fn send(&self, command: Command<H>) -> Result<(), WorkerError> {
        self.commands.send(command).map_err(|_| self.gone())?;
        self.wake.write(1).map_err(|_| self.gone())
    }

    fn gone(&self) -> WorkerError {
        WorkerError::Gone(self.name.clone())
    }
}

/// The worker thread's side.
struct Thread<H> {
    commands: Receiver<Command<H>>,
    wake: EventFd,
    memory: Arc<GuestMemoryMmap>,
    stopping: Arc<AtomicBool>,
}

impl<H: QueueHandler> Thread<H> {
    fn run(self, mut handler: H) {
        let mut serving: Option<Serve> = None;
        loop {
            let mut fds = vec![pollfd(&self.wake)];
            if let Some(serve) = &serving {
                fds.push(pollfd(&serve.kick));
            }
            if !wait_readable(&mut fds) {
                return;
            }
            let mut started = false;
            if fds[0].revents != 0 {
                let _ = self.wake.read();
                while let Ok(command) = self.commands.try_recv() {
                    match command {
                        Command::Serve(serve) => {
                            serving = Some(serve);
                            started = true;
                        }
                        Command::Stop(ack) => {
                            // Dropping the queue is what "stopped" means.
                            serving = None;
                            started = false;
                            let _ = ack.send(());
                        }
                        Command::Call(f, ack) => {
                            f(&mut handler);
                            let _ = ack.send(());
                        }
                        Command::Park(ack, released) => {
                            // A parker that gave up dropped `ack`: go on.
                            if ack.send(()).is_ok() {
                                // Err once the `Parked` is dropped.
                                let _ = released.recv();
                            }
                        }
                    }
                }
            }
            let kicked = fds.get(1).is_some_and(|f| f.revents != 0);
            if let Some(serve) = serving.as_mut().filter(|_| kicked || started) {
                let _ = serve.kick.read();
                let mut drain = Drain {
                    queue: &mut serve.queue,
                    memory: &self.memory,
                    stopping: &self.stopping,
                    used: false,
                    popped: 0,
                    bounded: false,
                };
                handler.serve(&mut drain);
                if drain.used {
                    let _ = serve.interrupt.signal_queue(serve.index);
                }
                if drain.bounded {
                    // The rest gets the next turn, as if the guest kicked:
                    // commands queued meanwhile still go first.
                    let _ = serve.kick.write(1);
                }
            }
        }
    }
}

/// Waits for readability of `fds`; false if polling failed.
fn wait_readable(fds: &mut [libc::pollfd]) -> bool {
    loop {
        // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd
        // structs, and its length is passed along.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if ready >= 0 {
            return true;
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return false;
        }
    }
}

fn pollfd(fd: &EventFd) -> libc::pollfd {
    libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use vm_memory::GuestAddress;

    use super::*;
    use crate::virtio::test_ring::{CountingInterrupt, TestRing};

    fn memory() -> Arc<GuestMemoryMmap> {
        Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap())
    }

    /// A worker whose handler answers each chain with length 7 and
    /// records the heads it saw.
    fn worker(
        memory: &Arc<GuestMemoryMmap>,
    ) -> (QueueWorker<impl QueueHandler>, Arc<Mutex<Vec<u16>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let handler = move |drain: &mut Drain<'_>| {
            while let Some(chain) = drain.next_chain() {
                record.lock().unwrap().push(chain.head_index());
                drain.add_used(chain.head_index(), 7);
            }
        };
        let worker =
            QueueWorker::spawn("test-worker", memory.clone(), handler, Box::new(|| Ok(())))
                .unwrap();
        (worker, seen)
    }

    fn serve(ring: &TestRing, kick: &EventFd, interrupt: &Arc<CountingInterrupt>) -> Serve {
        let config = ring.config(0);
        let mut queue = Queue::new(config.size).unwrap();
        queue.set_desc_table_address(Some(config.desc as u32), Some(0));
        queue.set_avail_ring_address(Some(config.driver as u32), Some(0));
        queue.set_used_ring_address(Some(config.device as u32), Some(0));
        queue.set_ready(true);
        Serve {
            queue,
            index: 0,
            kick: kick.try_clone().unwrap(),
            interrupt: interrupt.clone(),
        }
    }

    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn kicks_serve_the_queue_and_raise_its_interrupt() {
        let memory = memory();
        let (worker, seen) = worker(&memory);
        let mut ring = TestRing::new(0x1000, 8);
        let interrupt = Arc::new(CountingInterrupt::default());
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        // A chain queued before the start is served at the start.
        ring.add_chain(&memory, &[(0x8000, 16, false)]);
        worker.serve(serve(&ring, &kick, &interrupt)).unwrap();
        wait_until("the first chain", || ring.used_idx(&memory) == 1);
        ring.add_chain(&memory, &[(0x8000, 16, false), (0x9000, 16, true)]);
        kick.write(1).unwrap();
        wait_until("the second chain", || ring.used_idx(&memory) == 2);
        assert_eq!(*seen.lock().unwrap(), vec![0, 1]);
        assert_eq!(ring.used_entry(&memory, 1), (1, 7));
        wait_until("two interrupts", || interrupt.queue_interrupts() == 2);
    }

    #[test]
    fn a_drain_takes_at_most_the_queue_size_and_the_worker_comes_back_for_the_rest() {
        const TOTAL: u16 = 20;
        let memory = memory();
        let ring = Arc::new(Mutex::new(TestRing::new(0x1000, 8)));
        let drains = Arc::new(Mutex::new(Vec::new()));
        let (guest, seen, mem) = (ring.clone(), drains.clone(), memory.clone());
        let handler = move |drain: &mut Drain<'_>| {
            let mut taken = 0;
            while let Some(chain) = drain.next_chain() {
                taken += 1;
                drain.add_used(chain.head_index(), 0);
                // A guest vCPU keeps queueing while the device drains.
                let mut ring = guest.lock().unwrap();
                if ring.avail_idx(&mem) < TOTAL {
                    ring.add_chain(&mem, &[(0x8000, 16, false)]);
                }
            }
            if taken > 0 {
                seen.lock().unwrap().push(taken);
            }
        };
        let worker =
            QueueWorker::spawn("test-worker", memory.clone(), handler, Box::new(|| Ok(())))
                .unwrap();
        let interrupt = Arc::new(CountingInterrupt::default());
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        ring.lock()
            .unwrap()
            .add_chain(&memory, &[(0x8000, 16, false)]);
        worker
            .serve(serve(&ring.lock().unwrap(), &kick, &interrupt))
            .unwrap();
        // No further kick: the worker comes back by itself.
        wait_until("every chain", || {
            ring.lock().unwrap().used_idx(&memory) == TOTAL
        });
        let drains = drains.lock().unwrap().clone();
        assert!(drains.iter().all(|&n| n <= 8), "drains of {drains:?}");
        assert_eq!(drains.iter().sum::<u16>(), TOTAL);
    }

    #[test]
    fn after_stop_returns_kicks_are_ignored_until_served_again() {
        let memory = memory();
        let (worker, seen) = worker(&memory);
        let mut ring = TestRing::new(0x1000, 8);
        let interrupt = Arc::new(CountingInterrupt::default());
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        worker.serve(serve(&ring, &kick, &interrupt)).unwrap();
        worker.stop().unwrap();
        ring.add_chain(&memory, &[(0x8000, 16, false)]);
        kick.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(ring.used_idx(&memory), 0, "stopped");
        assert!(seen.lock().unwrap().is_empty());
        // Stopping a stopped worker is fine; serving again picks up.
        worker.stop().unwrap();
        worker.serve(serve(&ring, &kick, &interrupt)).unwrap();
        wait_until("the queued chain", || ring.used_idx(&memory) == 1);
    }

    #[test]
    fn a_parked_worker_keeps_its_queue_and_serves_kicks_once_released() {
        let memory = memory();
        let (worker, seen) = worker(&memory);
        let mut ring = TestRing::new(0x1000, 8);
        let interrupt = Arc::new(CountingInterrupt::default());
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        ring.add_chain(&memory, &[(0x8000, 16, false)]);
        worker.serve(serve(&ring, &kick, &interrupt)).unwrap();
        wait_until("the first chain", || ring.used_idx(&memory) == 1);

        let parked = worker.park(Duration::from_secs(5)).unwrap();
        ring.add_chain(&memory, &[(0x8000, 16, false)]);
        kick.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(ring.used_idx(&memory), 1, "parked: the kick waits");
        drop(parked);
        wait_until("the kick after release", || ring.used_idx(&memory) == 2);
        // The position was kept: no chain served twice.
        assert_eq!(*seen.lock().unwrap(), vec![0, 1]);
    }

    #[test]
    fn park_waits_for_the_drain_in_progress_and_gives_up_at_its_bound() {
        let memory = memory();
        let (entered, inside) = channel::<()>();
        let gate = Arc::new(Mutex::new(()));
        let held = gate.lock().unwrap();
        let handler_gate = gate.clone();
        let handler = move |drain: &mut Drain<'_>| {
            while let Some(chain) = drain.next_chain() {
                let _ = entered.send(());
                // A request that takes as long as the test says.
                drop(handler_gate.lock().unwrap());
                drain.add_used(chain.head_index(), 0);
            }
        };
        let worker =
            QueueWorker::spawn("test-worker", memory.clone(), handler, Box::new(|| Ok(())))
                .unwrap();
        let mut ring = TestRing::new(0x1000, 8);
        let interrupt = Arc::new(CountingInterrupt::default());
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        ring.add_chain(&memory, &[(0x8000, 16, false)]);
        worker.serve(serve(&ring, &kick, &interrupt)).unwrap();
        inside.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(matches!(
            worker.park(Duration::from_millis(100)),
            Err(WorkerError::Busy(..))
        ));
        drop(held);
        // The refused park left nothing parked: the request completes, and
        // a new park succeeds once it has.
        wait_until("the request", || ring.used_idx(&memory) == 1);
        let parked = worker.park(Duration::from_secs(5)).unwrap();
        drop(parked);
    }

    #[test]
    fn calls_run_on_the_worker_with_the_handler_and_in_order() {
        struct Counter(Vec<u32>);
        impl QueueHandler for Counter {
            fn serve(&mut self, _drain: &mut Drain<'_>) {}
        }
        let worker = QueueWorker::spawn(
            "test-worker",
            memory(),
            Counter(vec![]),
            Box::new(|| Ok(())),
        )
        .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        for i in 0..3 {
            worker.call(move |c: &mut Counter| c.0.push(i)).unwrap();
        }
        let copy = seen.clone();
        worker
            .call(move |c: &mut Counter| {
                *copy.lock().unwrap() = c.0.clone();
                assert_eq!(std::thread::current().name(), Some("test-worker"));
            })
            .unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![0, 1, 2]);
    }

    #[test]
    fn a_worker_whose_start_failed_reports_that_it_is_gone() {
        let worker = QueueWorker::spawn(
            "test-worker",
            memory(),
            |_: &mut Drain<'_>| {},
            Box::new(|| Err("no filter".into())),
        )
        .unwrap();
        wait_until("the thread to end", || worker.stop().is_err());
        assert!(matches!(worker.stop(), Err(WorkerError::Gone(name)) if name == "test-worker"));
        assert!(worker.call(|_| {}).is_err());
    }
}
