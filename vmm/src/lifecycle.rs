//! Pause and resume of a running VM, on a thread of its own.
//!
//! Paused means: every vCPU out of KVM_RUN and parked at its gate; every
//! device worker (virtio-mem, virtio-iommu, a net control queue) idle between
//! two requests, the one in flight completed; every vDPA device stopped, so
//! that nothing writes guest memory (see `devices::virtio::vdpa::pause`).
//! The order is the order in which work flows: vCPUs first (no new guest
//! requests), then the workers (the requests already queued are finished or
//! wait), then the devices (DMA stops). Resume goes the other way.
//!
//! A step that fails undoes the steps before it, so a refused pause leaves
//! the VM running and a refused resume leaves it paused, each as it was.
//!
//! A paused VM can be saved ([`crate::snapshot`]): each vCPU saves its own
//! state at its gate, this thread saves the VM's and the serial port's and
//! writes them with guest RAM into a new directory. The VM stays paused,
//! whatever happens.
//!
//! The work runs on the "lifecycle" thread, whose seccomp filter allows the
//! vhost requests that stop and start devices, reading the VM's interrupt
//! controllers and clock, and creating a snapshot's directory and files; the
//! API asks it and waits a bounded time for the answer.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use devices::exit::{ExitReason, ExitSignal};
use devices::serial::SerialDevice;

use devices::virtio::queue_worker::{Parked, Parker, WorkerError};
use devices::virtio::vdpa::VdpaError;
use seccompiler::BpfProgram;

use crate::device_manager::iommu::IommuPciDevice;
use crate::device_manager::vdpa::VdpaPciDevice;
use crate::device_manager::virtio_mem::MemPciDevice;
use crate::seccomp;
use crate::snapshot::vdpa::{SavedDevices, VdpaDeviceState};
use crate::snapshot::{self, SavedHotplug, SavedIommu, SnapshotError, SnapshotReport, VmSnapshot};
use crate::vstate::memory::GuestRam;
use crate::vstate::vcpu::SavedVcpu;
use crate::vstate::vcpu_gate::{GateError, VcpuGate};
use crate::vstate::vm_state::VmState;

/// How long the vCPUs get to leave the guest.
const VCPU_BOUND: Duration = Duration::from_secs(2);
/// How long a worker gets to finish the request it is in: an IOTLB commit
/// to a VDUSE device may wait for the device's process.
const WORKER_BOUND: Duration = Duration::from_secs(10);
/// How long the API waits for the lifecycle thread: every step above is
/// bounded, and a VDUSE reset by the kernel's own 30 s.
pub const ANSWER_BOUND: Duration = Duration::from_secs(60);
/// How long the API waits for a snapshot: guest memory is written at the
/// disk's pace (2 GiB at 10 MB/s is under 4 minutes).
pub const SNAPSHOT_BOUND: Duration = Duration::from_secs(600);

/// What the VM is doing, as the API says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
}

impl RunState {
    pub fn name(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
        }
    }

    pub fn from_name(name: &str) -> Option<RunState> {
        match name {
            "running" => Some(RunState::Running),
            "paused" => Some(RunState::Paused),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("the vCPUs: {0}")]
    Vcpus(#[from] GateError),
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error("{id}: {source}")]
    Device { id: String, source: VdpaError },
    #[error("the lifecycle thread did not answer within {0:?}")]
    NoAnswer(Duration),
    #[error("snapshot: {0}")]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error("the lifecycle thread is gone")]
    Gone,
    #[error("live update: {0}")]
    Update(#[from] crate::snapshot::handoff::HandoffError),
    #[error("the VM was handed over to a new VMM; this one is ending")]
    HandedOver,
}

/// What one pause or resume did, and how long each step took.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub state: RunState,
    /// Whether anything changed (pausing a paused VM does not).
    pub changed: bool,
    pub vcpus: Duration,
    pub workers: Duration,
    pub devices: Duration,
    /// How each vDPA device was stopped ("suspend", "reset", "idle"), by id.
    pub device_methods: Vec<(String, &'static str)>,
}

impl Transition {
    pub fn total(&self) -> Duration {
        self.vcpus + self.workers + self.devices
    }
}

/// What a pause stops.
pub struct PauseTargets {
    pub gate: Arc<VcpuGate<SavedVcpu>>,
    pub workers: Vec<Parker>,
    /// Each vDPA device by id.
    pub vdpa: Vec<(String, Arc<Mutex<VdpaPciDevice>>)>,
    /// What a snapshot saves besides the vCPUs.
    pub saved: SnapshotSources,
}

/// Where a snapshot's state comes from, besides the vCPUs.
pub struct SnapshotSources {
    pub vm: Arc<kvm_ioctls::VmFd>,
    pub ram: Arc<GuestRam>,
    pub serial: Arc<Mutex<SerialDevice>>,
    /// Devices whose state is not saved yet, by id and why: a snapshot is
    /// refused while there are any.
    pub unsaved: Vec<String>,
    /// The options the vDPA devices were added with (their states are
    /// filled in at each snapshot).
    pub devices: SavedDevices,
    /// The hotplug region's size and block size, and its virtio-mem device.
    pub hotplug: Option<(u64, u64, Arc<Mutex<MemPciDevice>>)>,
    /// The virtio-iommu.
    pub iommu: Option<Arc<Mutex<IommuPciDevice>>>,
}

/// How long the vCPUs get to save their state.
const SAVE_BOUND: Duration = Duration::from_secs(5);

/// The VM's run state and the parked workers while paused.
struct Machine {
    targets: PauseTargets,
    parked: Option<Vec<Parked>>,
    /// A new VMM took the VM: nothing may run it here again.
    handed_over: bool,
}

/// What a live update did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpdateReport {
    pub socket: PathBuf,
    pub state_bytes: u64,
    /// From the pause to the new VMM's "ready" (it then starts the VM).
    pub took: Duration,
}

/// How long the new VMM gets for each step of a live update.
const UPDATE_BOUND: Duration = Duration::from_secs(30);
/// How long the API waits for a live update: the pause, then each of the
/// new VMM's steps.
pub const UPDATE_ANSWER_BOUND: Duration = Duration::from_secs(60 + 3 * 30);

fn lock(device: &Mutex<VdpaPciDevice>) -> MutexGuard<'_, VdpaPciDevice> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}

impl Machine {
    fn state(&self) -> RunState {
        match self.parked {
            Some(_) => RunState::Paused,
            None => RunState::Running,
        }
    }

    fn unchanged(&self) -> Transition {
        Transition {
            state: self.state(),
            changed: false,
            vcpus: Duration::ZERO,
            workers: Duration::ZERO,
            devices: Duration::ZERO,
            device_methods: Vec::new(),
        }
    }

    fn pause(&mut self) -> Result<Transition, LifecycleError> {
        if self.parked.is_some() {
            return Ok(self.unchanged());
        }
        let started = Instant::now();
        self.targets.gate.close(VCPU_BOUND)?;
        let vcpus = started.elapsed();

        let started = Instant::now();
        let mut parked = Vec::with_capacity(self.targets.workers.len());
        for worker in &self.targets.workers {
            match worker.park(WORKER_BOUND) {
                Ok(p) => parked.push(p),
                Err(e) => {
                    drop(parked);
                    self.targets.gate.open();
                    return Err(e.into());
                }
            }
        }
        let workers = started.elapsed();

        let started = Instant::now();
        let mut methods = Vec::with_capacity(self.targets.vdpa.len());
        for (done, (id, device)) in self.targets.vdpa.iter().enumerate() {
            let mut pci = lock(device);
            if let Err(source) = pci.device_mut().pause() {
                drop(pci);
                // Undo: the devices before it run again, then the rest.
                for (_, earlier) in self.targets.vdpa.iter().take(done).rev() {
                    let _ = lock(earlier).device_mut().resume();
                }
                drop(parked);
                self.targets.gate.open();
                return Err(LifecycleError::Device {
                    id: id.clone(),
                    source,
                });
            }
            let method = pci
                .device()
                .state()
                .stopped
                .as_ref()
                .map_or("", |s| s.method());
            methods.push((id.clone(), method));
        }
        let devices = started.elapsed();
        self.parked = Some(parked);
        Ok(Transition {
            state: RunState::Paused,
            changed: true,
            vcpus,
            workers,
            devices,
            device_methods: methods,
        })
    }

    fn resume(&mut self) -> Result<Transition, LifecycleError> {
        if self.parked.is_none() {
            return Ok(self.unchanged());
        }
        let started = Instant::now();
        let mut methods = Vec::with_capacity(self.targets.vdpa.len());
        for (done, (id, device)) in self.targets.vdpa.iter().enumerate() {
            let mut pci = lock(device);
            let method = pci
                .device()
                .state()
                .stopped
                .as_ref()
                .map_or("", |s| s.method());
            if let Err(source) = pci.device_mut().resume() {
                drop(pci);
                // Undo: the devices already running stop again; the VM
                // stays paused, and a later resume tries again.
                for (_, earlier) in self.targets.vdpa.iter().take(done) {
                    let _ = lock(earlier).device_mut().pause();
                }
                return Err(LifecycleError::Device {
                    id: id.clone(),
                    source,
                });
            }
            methods.push((id.clone(), method));
        }
        let devices = started.elapsed();

        let started = Instant::now();
        self.parked = None;
        let workers = started.elapsed();

        let started = Instant::now();
        self.targets.gate.open();
        let vcpus = started.elapsed();
        Ok(Transition {
            state: RunState::Running,
            changed: true,
            vcpus,
            workers,
            devices,
            device_methods: methods,
        })
    }
}

impl Machine {
    /// Saves the paused VM into `dir`, which must not exist.
    fn snapshot(&self, dir: &Path) -> Result<SnapshotReport, LifecycleError> {
        let state = self.saved_state()?;
        Ok(snapshot::write(dir, &state, &self.targets.saved.ram)?)
    }

    /// Hands the VM to the VMM listening on `socket`: pauses it (if it
    /// runs), sends its state and its memory file, and waits for the new
    /// VMM to say it is ready. Then the VM is the new VMM's: this one must
    /// end without touching it. On an error the VM runs here as before.
    fn update(&mut self, socket: &Path) -> Result<UpdateReport, LifecycleError> {
        let started = Instant::now();
        let paused_at_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        let was_running = self.parked.is_none();
        self.pause()?;
        let sent = self.saved_state().and_then(|state| {
            let ram = &self.targets.saved.ram;
            let files = (&ram.boot_file, ram.hotplug.as_ref().map(|h| &h.file));
            Ok(snapshot::handoff::send(
                socket,
                &state,
                files,
                paused_at_us,
                UPDATE_BOUND,
            )?)
        });
        match sent {
            Ok(state_bytes) => {
                self.handed_over = true;
                Ok(UpdateReport {
                    socket: socket.to_path_buf(),
                    state_bytes,
                    took: started.elapsed(),
                })
            }
            Err(error) => {
                if was_running {
                    let _ = self.resume();
                }
                Err(error)
            }
        }
    }

    /// The paused VM's whole state: each vCPU's (saved at its gate), the
    /// VM's, the serial port's, each device's.
    fn saved_state(&self) -> Result<VmSnapshot, LifecycleError> {
        if self.parked.is_none() {
            return Err(SnapshotError::NotPaused.into());
        }
        let saved = &self.targets.saved;
        if !saved.unsaved.is_empty() {
            return Err(SnapshotError::DevicesNotSaved(saved.unsaved.join(", ")).into());
        }
        // By vCPU id: the gate keeps them in the order their threads
        // started, which is not always the vCPUs' order.
        let mut vcpus = self
            .targets
            .gate
            .collect(SAVE_BOUND)
            .map_err(|e| SnapshotError::Vcpu(e.to_string()))?
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| SnapshotError::Vcpu(e.to_string()))?;
        vcpus.sort_by_key(|v| v.id);
        snapshot::check_vcpu_ids(&vcpus)?;
        let vm = VmState::save(&saved.vm).map_err(|e| SnapshotError::Vm(e.to_string()))?;
        let serial = saved
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .snapshot();
        let mut devices = saved.devices.clone();
        devices.states = self.device_states()?;
        let hotplug = saved.hotplug.as_ref().map(|(size, block_size, device)| {
            let pci = device.lock().unwrap_or_else(|p| p.into_inner());
            SavedHotplug {
                size: *size,
                block_size: *block_size,
                transport: pci.state(),
                device: pci.device().snapshot(),
            }
        });
        let iommu = saved.iommu.as_ref().map(|device| {
            let pci = device.lock().unwrap_or_else(|p| p.into_inner());
            SavedIommu {
                transport: pci.state(),
                device: pci.device().snapshot(),
            }
        });
        let state = VmSnapshot {
            memory_bytes: saved.ram.ranges.iter().map(|r| r.size).sum(),
            vcpus,
            vm,
            serial,
            devices,
            hotplug,
            iommu,
        };
        Ok(state)
    }
}

impl Machine {
    /// Each paused vDPA device's transport and queue positions.
    fn device_states(&self) -> Result<Vec<VdpaDeviceState>, SnapshotError> {
        self.targets
            .vdpa
            .iter()
            .map(|(id, device)| {
                let pci = lock(device);
                let device = pci.device().snapshot().map_err(|e| SnapshotError::Device {
                    id: id.clone(),
                    reason: e.to_string(),
                })?;
                Ok(VdpaDeviceState {
                    id: id.clone(),
                    transport: pci.state(),
                    device,
                })
            })
            .collect()
    }
}

type Answer = Result<Transition, LifecycleError>;
type SnapshotAnswer = Result<SnapshotReport, LifecycleError>;
type UpdateAnswer = Result<UpdateReport, LifecycleError>;

/// What the API asks of the lifecycle thread.
enum Request {
    Set(RunState, Sender<Answer>),
    Snapshot(PathBuf, Sender<SnapshotAnswer>),
    Update(PathBuf, Sender<UpdateAnswer>),
}

/// The API's handle on the lifecycle thread.
pub struct Lifecycle {
    requests: Mutex<Sender<Request>>,
    paused: Arc<AtomicBool>,
    handed_over: Arc<AtomicBool>,
    bound: Duration,
    /// Ends this VMM once the VM is handed over.
    exit: ExitSignal,
}

impl Lifecycle {
    /// Starts the "lifecycle" thread under `filter` (when seccomp is on).
    pub fn spawn(
        targets: PauseTargets,
        filter: Option<BpfProgram>,
        bound: Duration,
        exit: ExitSignal,
    ) -> std::io::Result<Lifecycle> {
        let (requests, received) = channel();
        let paused = Arc::new(AtomicBool::new(false));
        let handed_over = Arc::new(AtomicBool::new(false));
        let flags = (paused.clone(), handed_over.clone());
        std::thread::Builder::new()
            .name("lifecycle".into())
            .spawn(move || {
                if let Some(filter) = filter {
                    if let Err(e) = seccomp::apply(&filter) {
                        eprintln!("microvm: pause and resume disabled: {e}");
                        return;
                    }
                }
                serve(
                    Machine {
                        targets,
                        parked: None,
                        handed_over: false,
                    },
                    received,
                    &flags,
                );
            })?;
        Ok(Lifecycle {
            requests: Mutex::new(requests),
            paused,
            handed_over,
            bound,
            exit,
        })
    }

    /// Ends this VMM if a new one took the VM. Called by the API once no
    /// answer is left to send, so the client of the update hears of it.
    pub fn end_if_handed_over(&self) {
        if self.handed_over.load(Ordering::Acquire) {
            self.exit.request(ExitReason::HandedOver);
        }
    }

    /// Hands the VM to the new VMM listening on `socket` (live update).
    /// Waits up to [`UPDATE_ANSWER_BOUND`].
    pub fn update(&self, socket: PathBuf) -> UpdateAnswer {
        let (reply, answer) = channel();
        self.ask(Request::Update(socket, reply), answer, UPDATE_ANSWER_BOUND)
    }

    pub fn state(&self) -> RunState {
        match self.paused.load(Ordering::Acquire) {
            true => RunState::Paused,
            false => RunState::Running,
        }
    }

    /// Takes the VM to `target`; returns what it took.
    pub fn set(&self, target: RunState) -> Answer {
        let (reply, answer) = channel();
        self.ask(Request::Set(target, reply), answer, self.bound)
    }

    /// Saves the paused VM into `dir` (which must not exist). Waits up to
    /// [`SNAPSHOT_BOUND`]: writing guest memory takes as long as the disk.
    pub fn snapshot(&self, dir: PathBuf) -> SnapshotAnswer {
        let (reply, answer) = channel();
        self.ask(Request::Snapshot(dir, reply), answer, SNAPSHOT_BOUND)
    }

    fn ask<T>(
        &self,
        request: Request,
        answer: Receiver<Result<T, LifecycleError>>,
        bound: Duration,
    ) -> Result<T, LifecycleError> {
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(request)
            .map_err(|_| LifecycleError::Gone)?;
        match answer.recv_timeout(bound) {
            Ok(answer) => answer,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(LifecycleError::NoAnswer(bound)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(LifecycleError::Gone),
        }
    }
}

fn serve(
    mut machine: Machine,
    requests: Receiver<Request>,
    (paused, handed_over): &(Arc<AtomicBool>, Arc<AtomicBool>),
) {
    while let Ok(request) = requests.recv() {
        if machine.handed_over {
            match request {
                Request::Set(_, reply) => drop(reply.send(Err(LifecycleError::HandedOver))),
                Request::Snapshot(_, reply) => drop(reply.send(Err(LifecycleError::HandedOver))),
                Request::Update(_, reply) => drop(reply.send(Err(LifecycleError::HandedOver))),
            }
            continue;
        }
        match request {
            Request::Set(target, reply) => {
                let answer = match target {
                    RunState::Paused => machine.pause(),
                    RunState::Running => machine.resume(),
                };
                paused.store(machine.state() == RunState::Paused, Ordering::Release);
                let _ = reply.send(answer);
            }
            Request::Snapshot(dir, reply) => {
                let _ = reply.send(machine.snapshot(&dir));
            }
            Request::Update(socket, reply) => {
                let answer = machine.update(&socket);
                paused.store(machine.state() == RunState::Paused, Ordering::Release);
                handed_over.store(machine.handed_over, Ordering::Release);
                let _ = reply.send(answer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::virtio::queue_worker::{Drain, QueueWorker};
    use std::sync::atomic::AtomicU64;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    fn worker() -> QueueWorker<impl devices::virtio::queue_worker::QueueHandler> {
        let memory = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap());
        QueueWorker::spawn(
            "test-worker",
            memory,
            |_: &mut Drain<'_>| {},
            Box::new(|| Ok(())),
        )
        .unwrap()
    }

    /// A VM with no vCPU of its own, 64 MiB of RAM and a serial port.
    fn sources() -> SnapshotSources {
        let vm = crate::vstate::vm::Vm::new(crate::vstate::vm::Vm::open_kvm().unwrap()).unwrap();
        let irq = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        SnapshotSources {
            vm: vm.fd.clone(),
            ram: Arc::new(GuestRam::new(64 << 20).unwrap()),
            serial: Arc::new(Mutex::new(SerialDevice::new(
                irq,
                Box::new(std::io::sink()),
            ))),
            unsaved: Vec::new(),
            devices: SavedDevices::default(),
            hotplug: None,
            iommu: None,
        }
    }

    /// What a stand-in vCPU "saves": it has no state.
    fn not_saved() -> crate::vstate::vcpu_state::VcpuStateError {
        crate::vstate::vcpu_state::VcpuStateError::PartialMsrs {
            id: 0,
            set: 0,
            wanted: 0,
        }
    }

    /// A stand-in vCPU that counts its runs through the gate.
    fn vcpu(gate: &Arc<VcpuGate<SavedVcpu>>) -> Arc<AtomicU64> {
        let runs = Arc::new(AtomicU64::new(0));
        let (gate, count) = (gate.clone(), runs.clone());
        let (ready, started) = channel();
        std::thread::spawn(move || {
            let seat = gate.register();
            ready.send(()).unwrap();
            loop {
                gate.pass(&seat, || {}, || Err(not_saved()));
                count.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        started.recv().unwrap();
        runs
    }

    #[test]
    fn pause_parks_vcpus_and_workers_resume_releases_them_and_repeats_change_nothing() {
        crate::vstate::vcpu_gate::install_kick_handler().unwrap();
        let gate = Arc::new(VcpuGate::new());
        let runs = vcpu(&gate);
        let worker = worker();
        let lifecycle = Lifecycle::spawn(
            PauseTargets {
                gate: gate.clone(),
                workers: vec![worker.parker()],
                vdpa: Vec::new(),
                saved: sources(),
            },
            None,
            ANSWER_BOUND,
            ExitSignal::new().unwrap(),
        )
        .unwrap();
        assert_eq!(lifecycle.state(), RunState::Running);
        let paused = lifecycle.set(RunState::Paused).unwrap();
        assert!(paused.changed);
        assert_eq!(lifecycle.state(), RunState::Paused);
        assert_eq!(gate.parked(), 1);
        // The worker is parked: a call waits behind the park.
        let (done, called) = channel();
        std::thread::scope(|s| {
            s.spawn(|| worker.call(move |_| done.send(()).unwrap()).unwrap());
            assert!(called.recv_timeout(Duration::from_millis(100)).is_err());
            let at_pause = runs.load(Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(20));
            assert_eq!(runs.load(Ordering::Relaxed), at_pause);

            assert!(!lifecycle.set(RunState::Paused).unwrap().changed);
            let resumed = lifecycle.set(RunState::Running).unwrap();
            assert!(resumed.changed);
            called.recv_timeout(Duration::from_secs(5)).unwrap();
        });
        assert_eq!(lifecycle.state(), RunState::Running);
        assert!(!lifecycle.set(RunState::Running).unwrap().changed);
        let deadline = Instant::now() + Duration::from_secs(5);
        let at_resume = runs.load(Ordering::Relaxed);
        while runs.load(Ordering::Relaxed) == at_resume {
            assert!(Instant::now() < deadline, "the vCPU did not run again");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_snapshot_needs_a_paused_vm_whose_devices_can_all_be_saved() {
        crate::vstate::vcpu_gate::install_kick_handler().unwrap();
        let gate = Arc::new(VcpuGate::new());
        let _runs = vcpu(&gate);
        let mut saved = sources();
        saved.unsaved = vec!["net0".into(), "virtio-mem".into()];
        let lifecycle = Lifecycle::spawn(
            PauseTargets {
                gate: gate.clone(),
                workers: Vec::new(),
                vdpa: Vec::new(),
                saved,
            },
            None,
            ANSWER_BOUND,
            ExitSignal::new().unwrap(),
        )
        .unwrap();
        let dir = std::env::temp_dir().join(format!("microvm-lifecycle-{}", std::process::id()));
        let error = lifecycle.snapshot(dir.clone()).unwrap_err();
        assert!(
            matches!(error, LifecycleError::Snapshot(SnapshotError::NotPaused)),
            "{error}"
        );
        lifecycle.set(RunState::Paused).unwrap();
        let error = lifecycle.snapshot(dir.clone()).unwrap_err().to_string();
        assert!(
            error.contains("net0, virtio-mem: not saved by snapshots yet"),
            "{error}"
        );
        assert!(!dir.exists(), "a refused snapshot writes nothing");
        assert_eq!(
            lifecycle.state(),
            RunState::Paused,
            "and the VM stays paused"
        );
        lifecycle.set(RunState::Running).unwrap();
    }

    #[test]
    fn a_worker_that_cannot_park_refuses_the_pause_and_the_vcpus_run_on() {
        crate::vstate::vcpu_gate::install_kick_handler().unwrap();
        let gate = Arc::new(VcpuGate::new());
        let _runs = vcpu(&gate);
        let gone = {
            let memory =
                Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap());
            // Its start fails, so its thread ends: it can never park.
            let w = QueueWorker::spawn(
                "dead-worker",
                memory,
                |_: &mut Drain<'_>| {},
                Box::new(|| Err("no".into())),
            )
            .unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            while w.stop().is_ok() {
                assert!(Instant::now() < deadline);
                std::thread::sleep(Duration::from_millis(5));
            }
            w.parker()
        };
        let lifecycle = Lifecycle::spawn(
            PauseTargets {
                gate: gate.clone(),
                workers: vec![gone],
                vdpa: Vec::new(),
                saved: sources(),
            },
            None,
            ANSWER_BOUND,
            ExitSignal::new().unwrap(),
        )
        .unwrap();
        let error = lifecycle.set(RunState::Paused).unwrap_err();
        assert!(
            matches!(error, LifecycleError::Worker(WorkerError::Gone(_))),
            "{error}"
        );
        assert_eq!(lifecycle.state(), RunState::Running);
        assert!(!gate.is_closed());
    }
}
