//! The microVM monitor: turns a `VmmConfig` into a running KVM guest and
//! runs it until the guest powers off or something fails.
//!
//! Bring-up is a sequence of small steps with explicit inputs:
//! validate → memory → VM → ACPI → kernel → devices → vCPUs → run.

pub mod api;
pub mod boot;
pub mod config;
pub mod console;
pub mod device_manager;
pub mod fuzz_targets;
pub mod seccomp;
pub mod vstate;

use std::sync::{Arc, Mutex};

use devices::bus::{Bus, BusError};
use devices::exit::{ExitReason, ExitSignal};
use devices::legacy::{AcpiPm, I8042, SERIAL_COM1_BASE, SERIAL_COM1_IRQ, SERIAL_COM1_LEN};
use devices::serial::SerialDevice;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use boot::{acpi, loader as boot_loader};
use config::{ConfigError, HostLimits, SerialConfig, VmmConfig};
use device_manager::{net, pci, virtio_mem as mem};
use pci::{PciSegment, PciWiring};
use seccomp::ThreadKind;
use vstate::interrupts::{self, KvmIoEvents, KvmMsiRouter};
use vstate::memory::{self, GuestRam};
use vstate::vcpu::{self, Vcpu};
use vstate::vm::{self, Vm};

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Vm(#[from] vm::VmError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Boot(#[from] boot_loader::BootError),
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    #[error(transparent)]
    Console(#[from] console::ConsoleError),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error(transparent)]
    Interrupts(#[from] interrupts::InterruptError),
    #[error(transparent)]
    Pci(#[from] pci::PciSetupError),
    #[error(transparent)]
    Net(#[from] net::NetError),
    #[error(transparent)]
    Hotplug(#[from] mem::MemError),
    #[error(transparent)]
    Api(#[from] api::ApiError),
    #[error("cannot place a device on the I/O bus: {0}")]
    Bus(#[from] BusError),
    #[error("cannot create an event descriptor: {0}")]
    EventFd(std::io::Error),
    #[error("event loop failed: {0}")]
    EventLoop(String),
    #[error("cannot start a thread for vCPU {id}: {source}")]
    Thread { id: u8, source: std::io::Error },
    #[error("{0}")]
    Guest(String),
}

/// How a VM that ran ended without error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestExit {
    PowerOff,
    Reset,
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Builds the VM described by `config` and runs it to the end.
pub fn run(config: &VmmConfig) -> Result<GuestExit, VmmError> {
    // Files, sizes and counts first, so bad input never waits on KVM.
    config.validate(&HostLimits::probe(u64::from(config::MAX_VCPUS)))?;
    let kvm = Vm::open_kvm()?;
    // Only the vCPU count depends on KVM; the rest was checked above.
    let kvm_limits = HostLimits {
        max_vcpus: Vm::max_vcpus(&kvm),
        memory_bytes: u64::MAX,
    };
    config::check_vcpus(u64::from(config.vcpus), &kvm_limits)?;

    let hotplug = config
        .memory
        .hotplug
        .map(|size| (size.0, config.memory.block.0));
    let ram = GuestRam::with_hotplug(config.memory.size.0, hotplug)?;
    let vm = Vm::new(kvm)?;
    vm.register_memory(&ram)?;
    let rsdp = acpi::write_tables(&ram.memory, config.vcpus)?;
    let boot_entry = boot_loader::load(&ram, &config.kernel, rsdp)?;

    let exit = ExitSignal::new().map_err(VmmError::EventFd)?;
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(VmmError::EventFd)?;
    vm.connect_irq(&serial_irq, SERIAL_COM1_IRQ)?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        serial_irq,
        console::serial_output(&config.serial)?,
    )));
    let io_bus = legacy_io_bus(&serial, &exit)?;
    let mmio_bus = Arc::new(Bus::new());
    let mut segment = PciSegment::new(&io_bus, &mmio_bus)?;
    let router = KvmMsiRouter::new(vm.fd.clone())?;
    let ioevents = KvmIoEvents::new(vm.fd.clone());
    let shared_memory = Arc::new(ram.memory.clone());
    let mut nets = Vec::with_capacity(config.net.len());
    for net_config in &config.net {
        let wiring = PciWiring {
            segment: &mut segment,
            router: &router,
            ioevents: &ioevents,
        };
        nets.push(net::add_vdpa_net(
            net_config,
            &ram,
            shared_memory.clone(),
            wiring,
        )?);
    }
    let hotplug = match &ram.hotplug {
        Some(region) => {
            let wiring = PciWiring {
                segment: &mut segment,
                router: &router,
                ioevents: &ioevents,
            };
            Some(mem::add_virtio_mem(
                region,
                &nets,
                shared_memory.clone(),
                config.seccomp,
                wiring,
            )?)
        }
        None => None,
    };
    let io_bus = Arc::new(io_bus);

    let vcpus = (0..config.vcpus)
        .map(|id| {
            let boot = (id == 0).then_some(&boot_entry);
            Vcpu::new(&vm, &ram.memory, id, config.vcpus, boot)
        })
        .collect::<Result<Vec<_>, _>>()?;

    let filters = if config.seccomp {
        seccomp::install_sigsys_handler()?;
        Some((
            seccomp::filter(ThreadKind::Vmm)?,
            seccomp::filter(ThreadKind::Vcpu)?,
        ))
    } else {
        None
    };
    let api_state = Arc::new(api::ApiState {
        vcpus: config.vcpus,
        memory_bytes: config.memory.size.0,
        ram: ram.ranges.clone(),
        nets,
        hotplug,
    });
    if let Some(path) = &config.api_socket {
        let listener = api::bind(path)?;
        let filter = match config.seccomp {
            true => Some(seccomp::filter(ThreadKind::Api)?),
            false => None,
        };
        api::spawn(listener, api_state.clone(), filter)?;
    }

    let mut event_manager =
        EventManager::<Subscriber>::new().map_err(|e| VmmError::EventLoop(e.to_string()))?;
    // The exit eventfd is watched like any other source so the loop wakes
    // at once; the reason itself is kept by the signal.
    event_manager.add_subscriber(Arc::new(Mutex::new(ExitWatcher {
        fd: exit.event_fd().try_clone().map_err(VmmError::EventFd)?,
    })));
    let _raw_terminal = if config.serial == SerialConfig::Stdout {
        let terminal = console::RawTerminal::enter();
        if terminal.is_some() {
            event_manager.add_subscriber(Arc::new(Mutex::new(console::StdinForwarder::new(
                serial.clone(),
            ))));
        }
        terminal
    } else {
        None
    };

    for vcpu in vcpus {
        let id = vcpu.id();
        let (io_bus, mmio_bus, exit) = (io_bus.clone(), mmio_bus.clone(), exit.clone());
        let filter = filters.as_ref().map(|(_, vcpu_filter)| vcpu_filter.clone());
        std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                if let Some(filter) = filter {
                    if let Err(e) = seccomp::apply(&filter) {
                        exit.request(ExitReason::Error(format!("vCPU {id}: {e}")));
                        return;
                    }
                }
                vcpu.run(io_bus, mmio_bus, exit)
            })
            .map_err(|source| VmmError::Thread { id, source })?;
    }
    if let Some((vmm_filter, _)) = &filters {
        seccomp::apply(vmm_filter)?;
    }

    // Nothing past this point may need a syscall outside the filters.
    // `ram` and `vm` stay alive here until the guest is done.
    let reason = wait_for_exit(&mut event_manager, &exit)?;
    drop((api_state, ram, vm));
    match reason {
        ExitReason::PowerOff => Ok(GuestExit::PowerOff),
        ExitReason::Reset => Ok(GuestExit::Reset),
        ExitReason::Error(message) => Err(VmmError::Guest(message)),
    }
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
