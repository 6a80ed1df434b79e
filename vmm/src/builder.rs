//! Turns a validated `VmmConfig` into a running VM, in explicit steps:
//! API socket → memory → VM → platform devices → PCI devices → ACPI tables
//! (last, so they can describe the devices) → kernel → vCPUs; then seccomp
//! filters (once every descriptor they bind exists) → vCPU threads → API
//! thread → event loop.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::bus::{Bus, BusError};
use devices::exit::{ExitReason, ExitSignal};
use devices::legacy::{AcpiPm, I8042, SERIAL_COM1_BASE, SERIAL_COM1_IRQ, SERIAL_COM1_LEN};
use devices::serial::{SerialDevice, SerialSnapshot};
use devices::virtio::vdpa::Translation;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use seccompiler::BpfProgram;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::api::{self, control::VmSummary};
use crate::boot::{acpi, loader};
use crate::config::{self, HostLimits, SerialConfig, VmmConfig};
use crate::console;
use crate::device_manager::device_query::{DeviceQueries, ANSWER_BOUND};
use crate::device_manager::memlock::{self, MemlockStatus};
use crate::device_manager::vdpa::VdpaRequest;
use crate::device_manager::DeviceManager;
use crate::lifecycle::{self, Lifecycle};
use crate::seccomp::{self, FilterFds, SeccompError, ThreadKind};
use crate::snapshot::{self, handoff, SnapshotError, VmSnapshot};
use crate::vstate::memory::GuestRam;
use crate::vstate::vcpu::{SavedVcpu, Vcpu};
use crate::vstate::vcpu_gate::{install_kick_handler, VcpuGate};
use crate::vstate::vm::Vm;
use crate::{GuestExit, VmmError};

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A VM built and ready to run: every device exists, the guest is loaded,
/// vCPUs are created but not started.
pub struct Vmm {
    config: VmmConfig,
    // Kept alive for the VM's lifetime (dropped after the guest is done).
    vm: Vm,
    ram: Arc<GuestRam>,
    devices: DeviceManager,
    serial: Arc<Mutex<SerialDevice>>,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    exit: ExitSignal,
    vcpus: Vec<Vcpu>,
    api_socket: Option<api::ApiSocket>,
}

/// Checks the configuration against the host, then builds the VM: a new
/// one from its kernel, or one saved by a snapshot (`--restore`).
pub fn build(config: &VmmConfig) -> Result<Vmm, VmmError> {
    if let Some(dir) = &config.restore {
        return restore(config, dir);
    }
    if let Some(socket) = &config.take_over {
        return take_over(config, socket);
    }
    let checked = check(config)?;
    let api_socket = checked.api_socket;
    let platform = build_platform(
        config,
        checked.kvm,
        checked.max_slots,
        build_memory(config)?,
        None,
    )?;
    let Platform { ram, vm, .. } = &platform;
    let rsdp = acpi::write_tables(&ram.memory, config.vcpus, &platform.devices.acpi_tables())?;
    let boot_entry = loader::load(ram, &config.kernel, rsdp)?;
    let vcpus = (0..config.vcpus)
        .map(|id| {
            let boot = (id == 0).then_some(&boot_entry);
            Vcpu::new(vm, &ram.memory, id, config.vcpus, boot)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(platform.into_vmm(config, vcpus, api_socket))
}

/// Rebuilds the VM a snapshot saved: the same memory size and vCPU count,
/// the same vDPA devices (opened anew, at the paths given if any, each
/// attached with its IOTLB as one batch), guest RAM from the memory file,
/// then each device started where its queues stood, the serial port, the
/// VM's and each vCPU's KVM state, all before any vCPU runs; then it runs
/// like a new VM.
fn restore(config: &VmmConfig, dir: &Path) -> Result<Vmm, VmmError> {
    let started = Instant::now();
    let saved = snapshot::read_state(dir)?;
    let config = saved_config(config, &saved)?;
    let checked = check(&config)?;
    let vmm = rebuild(&config, checked, &saved, SavedMemory::File(dir))?;
    let plugged: u64 = saved.plugged().iter().map(|&(_, size)| size).sum();
    eprintln!(
        "microvm: restored the VM saved in {}: {} MiB of guest memory read, IOTLBs sent \
         ({}), in {} ms",
        dir.display(),
        saved.memory_bytes.saturating_add(plugged) >> 20,
        vmm.devices.iotlb_summary(),
        started.elapsed().as_millis()
    );
    Ok(vmm)
}

/// How long a take-over waits for the old VMM to hand its VM over, and
/// then for it to exit.
const HANDOVER_BOUND: Duration = Duration::from_secs(120);
const OLD_VMM_EXIT_BOUND: Duration = Duration::from_secs(10);

/// Takes over the VM another microvm process hands over on `socket` (live
/// update): its state and its guest memory's file, mapped, not copied.
/// Everything that can be checked is checked before the old VMM is told
/// to let go; it then exits (closing its devices, which only one process
/// may hold), and the VM is rebuilt as a restore does, over the same memory.
fn take_over(config: &VmmConfig, socket: &Path) -> Result<Vmm, VmmError> {
    let listener = handoff::listen(socket).map_err(|e| VmmError::TakeOver(e.to_string()))?;
    let _socket_file = RemoveOnDrop(socket);
    eprintln!(
        "microvm: waiting up to {}s on {} for a VMM to hand over its VM \
         (microvm-ctl --socket OLD-API-SOCKET update {})",
        HANDOVER_BOUND.as_secs(),
        socket.display(),
        socket.display()
    );
    let failed = |e: &dyn std::fmt::Display| VmmError::TakeOver(e.to_string());
    let mut incoming =
        handoff::receive(&listener, socket, HANDOVER_BOUND).map_err(|e| failed(&e))?;
    let received = Instant::now();
    // The API socket may be the old VMM's own: bound once it has gone.
    let checked = saved_config(config, &incoming.state).and_then(|config| {
        let without_api = VmmConfig {
            api_socket: None,
            ..config.clone()
        };
        Ok((check(&without_api)?, config))
    });
    let (mut checked, config) = match checked {
        Ok(checked) => checked,
        Err(error) => {
            incoming.refuse(&error.to_string());
            return Err(error);
        }
    };
    incoming.ready().map_err(|e| failed(&e))?;
    let pid = incoming.sender_pid;
    match handoff::wait_for_exit(pid, OLD_VMM_EXIT_BOUND) {
        Ok(true) => {}
        Ok(false) => {
            return Err(failed(&format!(
                "the old VMM (pid {pid}) did not exit within {OLD_VMM_EXIT_BOUND:?} of handing \
                 the VM over; its devices cannot be opened while it holds them"
            )))
        }
        Err(e) => {
            return Err(failed(&format!(
                "cannot watch the old VMM (pid {pid}): {e}"
            )))
        }
    }
    let old_gone = received.elapsed();
    checked.api_socket = config
        .api_socket
        .as_deref()
        .map(api::ApiSocket::bind)
        .transpose()?;
    let memory = SavedMemory::Memfd {
        boot: incoming.memory.try_clone().map_err(VmmError::EventFd)?,
        hotplug: incoming
            .hotplug_memory
            .as_ref()
            .map(std::fs::File::try_clone)
            .transpose()
            .map_err(VmmError::EventFd)?,
    };
    let vmm = rebuild(&config, checked, &incoming.state, memory)?;
    let paused_at = std::time::UNIX_EPOCH + Duration::from_micros(incoming.paused_at_us);
    let downtime = std::time::SystemTime::now()
        .duration_since(paused_at)
        .unwrap_or_default();
    let plugged: u64 = incoming.state.plugged().iter().map(|&(_, size)| size).sum();
    eprintln!(
        "microvm: took over the VM: {} MiB of guest memory mapped, not copied; {} bytes of \
         state; IOTLBs sent ({}); the old VMM was gone {} ms after the handover, the VM \
         rebuilt {} ms after it; downtime {} ms (paused there to running here)",
        incoming.state.memory_bytes.saturating_add(plugged) >> 20,
        incoming.state_bytes,
        vmm.devices.iotlb_summary(),
        old_gone.as_millis(),
        received.elapsed().as_millis(),
        downtime.as_millis()
    );
    Ok(vmm)
}

/// Removes a socket file when dropped.
struct RemoveOnDrop<'a>(&'a Path);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}

/// The configuration of a saved VM: its vCPU count, memory size and
/// devices (at the paths given, if any) from the state; the rest (API
/// socket, serial, seccomp) from `config`.
fn saved_config(config: &VmmConfig, saved: &VmSnapshot) -> Result<VmmConfig, VmmError> {
    let mut config = config.clone();
    config.net = saved
        .devices
        .net_at(&config.net)
        .map_err(SnapshotError::from)?;
    config.vdpa = saved
        .devices
        .vdpa_at(&config.vdpa)
        .map_err(SnapshotError::from)?;
    config.vcpus = u8::try_from(saved.vcpus.len())
        .ok()
        .filter(|&n| n > 0)
        .ok_or(SnapshotError::VcpuCount {
            vcpus: 0,
            found: saved.vcpus.len(),
        })?;
    config.memory.size = config::Size(saved.memory_bytes);
    config.memory.hotplug = saved.hotplug.as_ref().map(|h| config::Size(h.size));
    if let Some(hotplug) = &saved.hotplug {
        config.memory.block = config::Size(hotplug.block_size);
    }
    Ok(config)
}

/// Where a saved VM's guest memory is.
enum SavedMemory<'a> {
    /// In a snapshot directory's memory file: copied into new memory.
    File(&'a Path),
    /// In the memfds a live update handed over (boot RAM, the hotplug
    /// region): mapped as they are.
    Memfd {
        boot: std::fs::File,
        hotplug: Option<std::fs::File>,
    },
}

/// Builds a VM as `saved` describes it, before any vCPU runs: the
/// platform and devices (each device's IOTLB one batch), guest memory, each
/// device started where its queues stood, the vCPUs' and the VM's state.
fn rebuild(
    config: &VmmConfig,
    checked: Checked,
    saved: &VmSnapshot,
    memory: SavedMemory<'_>,
) -> Result<Vmm, VmmError> {
    let api_socket = checked.api_socket;
    let (ram, from_file) = match memory {
        SavedMemory::File(dir) => (build_memory(config)?, Some(dir)),
        SavedMemory::Memfd { boot, hotplug } => {
            let ram = GuestRam::from_file(boot, saved.memory_bytes)?;
            let ram = match (hotplug, &saved.hotplug) {
                (Some(file), Some(region)) => {
                    ram.with_hotplug_file(region.size, region.block_size, file)?
                }
                (None, None) => ram,
                _ => {
                    return Err(VmmError::TakeOver(
                        "the hotplug memory file and the state disagree".into(),
                    ))
                }
            };
            (ram, None)
        }
    };
    let platform = build_platform(config, checked.kvm, checked.max_slots, ram, Some(saved))?;
    let Platform {
        ram, vm, devices, ..
    } = &platform;
    if let Some(dir) = from_file {
        snapshot::read_memory(dir, ram, saved.plugged())?;
    }
    devices.restore_virtio_iommu(saved.iommu.as_ref())?;
    devices.restore_virtio_mem(saved.hotplug.as_ref())?;
    devices.restore_vdpa(&saved.devices.states)?;
    let vcpus = saved
        .vcpus
        .iter()
        .enumerate()
        .map(|(index, state)| {
            let id = u8::try_from(index).unwrap_or(u8::MAX);
            let vcpu = Vcpu::new(vm, &ram.memory, id, config.vcpus, None)?;
            vcpu.restore(state)
                .map_err(|e| SnapshotError::Vcpu(e.to_string()))?;
            Ok(vcpu)
        })
        .collect::<Result<Vec<_>, VmmError>>()?;
    saved
        .vm
        .restore(&vm.fd)
        .map_err(|e| SnapshotError::Vm(e.to_string()))?;
    Ok(platform.into_vmm(config, vcpus, api_socket))
}

/// What checking a configuration against the host leaves open.
struct Checked {
    api_socket: Option<api::ApiSocket>,
    kvm: kvm_ioctls::Kvm,
    max_slots: u64,
}

/// Checks `config` against the host, binds the API socket and opens KVM.
fn check(config: &VmmConfig) -> Result<Checked, VmmError> {
    // Files, sizes and counts first, so bad input never waits on KVM.
    config.validate(&HostLimits::probe(u64::from(config::MAX_VCPUS)))?;
    // Bound before KVM is opened and any guest memory exists, so a bad
    // path is reported at once; removed again if the build fails.
    let api_socket = config
        .api_socket
        .as_deref()
        .map(api::ApiSocket::bind)
        .transpose()?;
    let kvm = Vm::open_kvm()?;
    // Only the vCPU count depends on KVM; the rest was checked above.
    let kvm_limits = HostLimits {
        max_vcpus: Vm::max_vcpus(&kvm),
        memory_bytes: u64::MAX,
    };
    config::check_vcpus(u64::from(config.vcpus), &kvm_limits)?;
    // Every hotplug block may need a KVM slot of its own.
    let max_slots = Vm::max_memslots(&kvm);
    config::check_memslots(&config.memory, max_slots)?;
    Ok(Checked {
        api_socket,
        kvm,
        max_slots,
    })
}

/// Everything of a VM but its guest contents and vCPUs.
struct Platform {
    ram: Arc<GuestRam>,
    vm: Vm,
    exit: ExitSignal,
    serial: Arc<Mutex<SerialDevice>>,
    io_bus: Bus,
    mmio_bus: Arc<Bus>,
    devices: DeviceManager,
}

impl Platform {
    /// The VM ready to run, once its vCPUs exist.
    fn into_vmm(
        self,
        config: &VmmConfig,
        vcpus: Vec<Vcpu>,
        api_socket: Option<api::ApiSocket>,
    ) -> Vmm {
        let Platform {
            ram,
            vm,
            exit,
            serial,
            io_bus,
            mmio_bus,
            devices,
        } = self;
        Vmm {
            config: config.clone(),
            vm,
            ram,
            devices,
            serial,
            io_bus: Arc::new(io_bus),
            mmio_bus,
            exit,
            vcpus,
            api_socket,
        }
    }
}

/// The VM over guest memory `ram`, the platform devices and the PCI
/// devices, for a new VM and a restored one alike (`saved`: the serial
/// port, the plugged blocks and the vIOMMU's domains as a snapshot saved
/// them).
fn build_platform(
    config: &VmmConfig,
    kvm: kvm_ioctls::Kvm,
    max_slots: u64,
    ram: GuestRam,
    saved: Option<&VmSnapshot>,
) -> Result<Platform, VmmError> {
    let ram = Arc::new(ram);
    let vm = Vm::new(kvm)?;
    let boot_slots = vm.register_memory(&ram)?;
    let slots = (boot_slots, u32::try_from(max_slots).unwrap_or(u32::MAX));
    let exit = ExitSignal::new().map_err(VmmError::EventFd)?;
    let serial = build_serial(&vm, config, saved.map(|s| &s.serial))?;
    let io_bus = legacy_io_bus(&serial, &exit)?;
    let mmio_bus = Arc::new(Bus::new());
    let devices = build_devices(config, &vm, &ram, slots, (&io_bus, &mmio_bus), saved)?;
    Ok(Platform {
        ram,
        vm,
        exit,
        serial,
        io_bus,
        mmio_bus,
        devices,
    })
}

fn build_memory(config: &VmmConfig) -> Result<GuestRam, VmmError> {
    let hotplug = config
        .memory
        .hotplug
        .map(|size| (size.0, config.memory.block.0));
    Ok(GuestRam::with_hotplug(config.memory.size.0, hotplug)?)
}

/// The serial port: new, or as a snapshot saved it.
fn build_serial(
    vm: &Vm,
    config: &VmmConfig,
    saved: Option<&SerialSnapshot>,
) -> Result<Arc<Mutex<SerialDevice>>, VmmError> {
    let irq = EventFd::new(EFD_NONBLOCK).map_err(VmmError::EventFd)?;
    vm.connect_irq(&irq, SERIAL_COM1_IRQ)?;
    let output = console::serial_output(&config.serial)?;
    let serial = match saved {
        None => SerialDevice::new(irq, output),
        Some(saved) => SerialDevice::from_snapshot(irq, output, saved)
            .map_err(|e| SnapshotError::Vm(e.to_string()))?,
    };
    Ok(Arc::new(Mutex::new(serial)))
}

/// The platform devices on the port I/O bus.
fn legacy_io_bus(serial: &Arc<Mutex<SerialDevice>>, exit: &ExitSignal) -> Result<Bus, BusError> {
    let bus = Bus::new();
    bus.insert(u64::from(SERIAL_COM1_BASE), SERIAL_COM1_LEN, serial.clone())?;
    bus.insert(
        u64::from(I8042::BASE),
        I8042::LEN,
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
    )?;
    bus.insert(
        u64::from(AcpiPm::BASE),
        AcpiPm::LEN,
        Arc::new(Mutex::new(AcpiPm::new(exit.clone(), acpi::S5_SLEEP_TYPE))),
    )?;
    Ok(bus)
}

/// The PCI segment and its devices: vDPA devices first (`--net`, then
/// `--vdpa`, in the order given), then the
/// virtio-iommu in front of those that asked for it, then virtio-mem
/// (which maps hot-plugged memory for them).
fn build_devices(
    config: &VmmConfig,
    vm: &Vm,
    ram: &Arc<GuestRam>,
    slots: (u32, u32),
    (io_bus, mmio_bus): (&Bus, &Arc<Bus>),
    saved: Option<&VmSnapshot>,
) -> Result<DeviceManager, VmmError> {
    let mut devices = DeviceManager::new(
        io_bus,
        mmio_bus,
        vm,
        ram.clone(),
        slots,
        config.seccomp,
        saved.map_or(&[], |s| s.plugged()),
    )?;
    let end = devices.identity_end();
    let requests: Vec<VdpaRequest> = (config.net.iter())
        .map(|net| VdpaRequest::from_net(net, end))
        .chain(config.vdpa.iter().map(|v| VdpaRequest::from_vdpa(v, end)))
        .collect();
    let memlock = raise_memlock(config, &requests);
    for request in &requests {
        devices.add_vdpa(request, &memlock)?;
    }
    devices.add_virtio_iommu(saved.and_then(|s| s.iommu.as_ref().map(|i| &i.device)))?;
    devices.add_virtio_mem()?;
    Ok(devices)
}

/// Raises RLIMIT_MEMLOCK for devices that may pin all guest memory
/// (before any device is opened, and before any seccomp filter).
fn raise_memlock(config: &VmmConfig, requests: &[VdpaRequest]) -> MemlockStatus {
    if requests.is_empty() {
        return MemlockStatus::default();
    }
    let guest = (config.memory.size.0).saturating_add(config.memory.hotplug.map_or(0, |h| h.0));
    let count = |iommu: bool| {
        let n = requests
            .iter()
            .filter(|r| !iommu || r.config.translation == Translation::Iommu)
            .count();
        u64::try_from(n).unwrap_or(u64::MAX)
    };
    memlock::raise(memlock::needed(guest, count(false), count(true)))
}

impl Vmm {
    /// Starts the vCPUs, the API and the event loop, and runs until the
    /// guest powers off or resets, or something fails.
    pub fn run(self) -> Result<GuestExit, VmmError> {
        let Vmm {
            config,
            vm,
            ram,
            devices,
            serial,
            io_bus,
            mmio_bus,
            exit,
            vcpus,
            api_socket,
        } = self;
        let filters = match config.seccomp {
            true => Some(Filters::build(&devices)?),
            false => None,
        };
        // Pause moves vCPU threads out of KVM_RUN with a signal, whose
        // handler must be in place before any of them starts.
        install_kick_handler().map_err(VmmError::Lifecycle)?;
        let gate: Arc<VcpuGate<SavedVcpu>> = Arc::new(VcpuGate::new());
        if let Some(socket) = api_socket {
            let summary = VmSummary {
                vcpus: config.vcpus,
                memory_bytes: config.memory.size.0,
                ram: ram.ranges.iter().map(|r| (r.start, r.size)).collect(),
            };
            // Its own thread, started before the VMM thread's filter
            // forbids creating one: the API never waits on a device.
            let queries = DeviceQueries::spawn(
                filters.as_ref().map(|f| f.device_query.clone()),
                ANSWER_BOUND,
            )
            .map_err(crate::device_manager::DeviceError::from)?;
            let lifecycle = Lifecycle::spawn(
                devices.pause_targets(gate.clone(), serial.clone(), (&config.net, &config.vdpa)),
                filters.as_ref().map(|f| f.lifecycle.clone()),
                lifecycle::ANSWER_BOUND,
                exit.clone(),
            )
            .map_err(VmmError::Lifecycle)?;
            let filter = filters.as_ref().map(|f| f.api.clone());
            let view = Arc::new(devices.api_view(summary, queries, lifecycle));
            api::spawn(socket.into_listener(), view, filter)?;
        }

        let mut event_manager =
            EventManager::<Subscriber>::new().map_err(|e| VmmError::EventLoop(e.to_string()))?;
        // The exit eventfd is watched like any other source so the loop
        // wakes at once; the reason itself is kept by the signal.
        event_manager.add_subscriber(Arc::new(Mutex::new(ExitWatcher {
            fd: exit.event_fd().try_clone().map_err(VmmError::EventFd)?,
        })));
        let _raw_terminal = match config.serial {
            SerialConfig::Stdout => {
                let terminal = console::RawTerminal::enter();
                if terminal.is_some() {
                    event_manager.add_subscriber(Arc::new(Mutex::new(
                        console::StdinForwarder::new(serial.clone()),
                    )));
                }
                terminal
            }
            _ => None,
        };

        start_vcpus(vcpus, &io_bus, &mmio_bus, &exit, &gate, filters.as_ref())?;
        if let Some(filters) = &filters {
            seccomp::apply(&filters.vmm)?;
        }

        // Nothing past this point may need a syscall outside the filters.
        let reason = wait_for_exit(&mut event_manager, &exit)?;
        drop((devices, ram, vm));
        match reason {
            ExitReason::PowerOff => Ok(GuestExit::PowerOff),
            ExitReason::Reset => Ok(GuestExit::Reset),
            ExitReason::Error(message) => Err(VmmError::Guest(message)),
            ExitReason::HandedOver => Ok(GuestExit::HandedOver),
        }
    }
}

/// The filters of the threads `Vmm::run` starts. Built once the VM, the
/// devices and the vCPUs exist: each binds its ioctls to their descriptors.
/// (Device workers start with their device; the device manager builds
/// theirs.)
struct Filters {
    vmm: BpfProgram,
    api: BpfProgram,
    device_query: BpfProgram,
    lifecycle: BpfProgram,
    fds: FilterFds,
}

impl Filters {
    fn build(devices: &DeviceManager) -> Result<Filters, SeccompError> {
        seccomp::install_sigsys_handler()?;
        let fds = devices.filter_fds();
        Ok(Filters {
            vmm: seccomp::filter(ThreadKind::Vmm, &fds)?,
            api: seccomp::filter(ThreadKind::Api, &fds)?,
            device_query: seccomp::filter(ThreadKind::DeviceQuery, &fds)?,
            lifecycle: seccomp::filter(ThreadKind::Lifecycle, &fds)?,
            fds,
        })
    }

    /// A vCPU thread may run only its own vCPU.
    fn vcpu(&self, vcpu: &Vcpu) -> Result<BpfProgram, SeccompError> {
        seccomp::filter(ThreadKind::Vcpu, &self.fds.for_vcpu(vcpu.raw_fd()))
    }
}

/// One thread per vCPU, each under its own filter.
fn start_vcpus(
    vcpus: Vec<Vcpu>,
    io_bus: &Arc<Bus>,
    mmio_bus: &Arc<Bus>,
    exit: &ExitSignal,
    gate: &Arc<VcpuGate<SavedVcpu>>,
    filters: Option<&Filters>,
) -> Result<(), VmmError> {
    for vcpu in vcpus {
        let id = vcpu.id();
        let (io_bus, mmio_bus, exit) = (io_bus.clone(), mmio_bus.clone(), exit.clone());
        let gate = gate.clone();
        let filter = filters.map(|f| f.vcpu(&vcpu)).transpose()?;
        std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                if let Some(filter) = filter {
                    if let Err(e) = seccomp::apply(&filter) {
                        exit.request(ExitReason::Error(format!("vCPU {id}: {e}")));
                        return;
                    }
                }
                vcpu.run(io_bus, mmio_bus, exit, &gate)
            })
            .map_err(|source| VmmError::Thread { id, source })?;
    }
    Ok(())
}

/// Serves host events until someone requests the end of the VM.
fn wait_for_exit(
    event_manager: &mut EventManager<Subscriber>,
    exit: &ExitSignal,
) -> Result<ExitReason, VmmError> {
    loop {
        if let Some(reason) = exit.reason() {
            return Ok(reason);
        }
        event_manager
            .run()
            .map_err(|e| VmmError::EventLoop(e.to_string()))?;
    }
}

struct ExitWatcher {
    fd: EventFd,
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, _events: event_manager::Events, _ops: &mut event_manager::EventOps) {
        let _ = self.fd.read();
    }

    fn init(&mut self, ops: &mut event_manager::EventOps) {
        let _ = ops.add(event_manager::Events::new(
            &self.fd,
            vmm_sys_util::epoll::EventSet::IN,
        ));
    }
}
