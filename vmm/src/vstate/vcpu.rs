//! vCPUs: creation and boot-time register state, and the run loop that
//! serves their exits on a thread of their own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use devices::bus::Bus;
use devices::exit::{ExitReason, ExitSignal};
use kvm_bindings::{kvm_msr_entry, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestMemoryMmap;

use crate::boot::loader::BootEntry;
use crate::vstate::cpuid::{self, CpuidOptions};
use crate::vstate::regs;
use crate::vstate::vcpu_gate::{GateSeat, VcpuGate};
use crate::vstate::vcpu_state::{SaveContext, VcpuState, VcpuStateError};
use crate::vstate::vm::Vm;

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WRITE_BACK: u64 = (1 << 11) | 6;

/// Local APIC LVT registers and delivery modes.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {id}: {source}")]
    Create { id: u8, source: kvm_ioctls::Error },
    #[error("cannot read KVM's supported CPUID: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    #[error("vCPU {id}: {source}")]
    Cpuid { id: u8, source: cpuid::CpuidError },
    #[error("vCPU {id}: cannot set {what}: {source}")]
    Set {
        id: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {id}: KVM accepted only {set} of {wanted} boot MSRs")]
    PartialMsrs { id: u8, set: usize, wanted: usize },
    #[error("vCPU {id}: {source}")]
    Regs { id: u8, source: regs::RegsError },
}

pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    /// What saving its state needs to know of the host.
    save_context: SaveContext,
}

/// What a parked vCPU leaves at its gate when its state is asked for.
pub type SavedVcpu = Result<VcpuState, VcpuStateError>;

impl Vcpu {
    /// Creates vCPU `id` of `count` and gives it the state every CPU has at
    /// power-on; only the boot CPU gets the kernel entry state (`boot`).
    pub fn new(
        vm: &Vm,
        memory: &GuestMemoryMmap,
        id: u8,
        count: u8,
        boot: Option<&BootEntry>,
    ) -> Result<Vcpu, VcpuError> {
        let fd = vm
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|source| VcpuError::Create { id, source })?;
        let set = |what: &'static str| move |source| VcpuError::Set { id, what, source };

        let mut cpuid = vm
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VcpuError::SupportedCpuid)?;
        let options = CpuidOptions {
            vcpu_id: id,
            vcpu_count: count,
            tsc_deadline: vm.supports_tsc_deadline(),
        };
        cpuid::patch(&mut cpuid, options).map_err(|source| VcpuError::Cpuid { id, source })?;
        fd.set_cpuid2(&cpuid).map_err(set("CPUID"))?;

        set_boot_msrs(&fd, id)?;
        fd.set_fpu(&regs::boot_fpu()).map_err(set("FPU state"))?;
        set_lint(&fd).map_err(set("local APIC"))?;

        if let Some(boot) = boot {
            let sregs = fd.get_sregs().map_err(set("special registers"))?;
            let sregs = regs::boot_sregs(memory, boot, sregs)
                .map_err(|source| VcpuError::Regs { id, source })?;
            fd.set_sregs(&sregs).map_err(set("special registers"))?;
            fd.set_regs(&regs::boot_regs(boot))
                .map_err(set("registers"))?;
        }
        let save_context = SaveContext {
            msr_indices: vm
                .kvm
                .get_msr_index_list()
                .map(|list| list.as_slice().to_vec())
                .unwrap_or_default(),
            xsave_size: usize::try_from(vm.kvm.check_extension_int(kvm_ioctls::Cap::Xsave2))
                .unwrap_or(0),
        };
        Ok(Vcpu {
            id,
            fd,
            save_context,
        })
    }

    pub fn id(&self) -> u8 {
        self.id
    }

    /// Reads this vCPU's state; only while it is outside KVM_RUN (parked).
    pub fn save_state(&self) -> SavedVcpu {
        VcpuState::save(self.id, &self.fd, &self.save_context)
    }

    /// Gives this vCPU, which has not run, a saved state (a restore).
    pub fn restore(&self, state: &VcpuState) -> Result<(), VcpuStateError> {
        state.restore(&self.fd, &self.save_context)
    }

    /// The vCPU's descriptor, which its thread's seccomp filter binds
    /// KVM_RUN to.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.fd)
    }

    /// Runs the vCPU until the VM ends. Device accesses go to the buses;
    /// anything that ends the VM is reported through `exit`. Before each
    /// entry into the guest the vCPU passes `gate`, where a pause parks it.
    pub fn run(
        mut self,
        io_bus: Arc<Bus>,
        mmio_bus: Arc<Bus>,
        exit: ExitSignal,
        gate: &VcpuGate<SavedVcpu>,
    ) {
        let seat = gate.register();
        self.run_until_exit(&io_bus, &mmio_bus, &exit, gate, &seat);
        gate.leave(seat);
    }

    fn run_until_exit(
        &mut self,
        io_bus: &Bus,
        mmio_bus: &Bus,
        exit: &ExitSignal,
        gate: &VcpuGate<SavedVcpu>,
        seat: &GateSeat,
    ) {
        loop {
            // Parked: tell the guest's kvmclock that it was stopped, so
            // that its watchdogs do not call the pause a lockup (fails with
            // EINVAL where the guest does not use kvmclock: nothing to tell).
            // Asked for its state while parked, the vCPU saves it.
            let (id, fd, context) = (self.id, &self.fd, &self.save_context);
            gate.pass(
                seat,
                || {
                    let _ = fd.kvmclock_ctrl();
                },
                || VcpuState::save(id, fd, context),
            );
            let reason = match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    io_bus.read(u64::from(port), data);
                    continue;
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    io_bus.write(u64::from(port), data);
                    continue;
                }
                // An address no device claims (unplugged hotplug memory has
                // no KVM slot, so it lands here too) reads as all ones and
                // drops writes; the bus counts them, the first is logged.
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !mmio_bus.read(addr, data) {
                        note_unclaimed(addr);
                    }
                    continue;
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if !mmio_bus.write(addr, data) {
                        note_unclaimed(addr);
                    }
                    continue;
                }
                // With the in-kernel LAPIC, HLT is handled by KVM; an exit
                // here is spurious, and an interrupt window needs nothing.
                Ok(VcpuExit::Hlt | VcpuExit::IrqWindowOpen | VcpuExit::Intr) => continue,
                Ok(VcpuExit::Shutdown) => {
                    // A triple fault: the guest cannot say so itself. No
                    // registers: AMD's KVM has already reset the vCPU here.
                    eprintln!("microvm: vCPU {} triple-faulted; the guest is reset", self.id);
                    ExitReason::Reset
                }
                Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _)) => ExitReason::PowerOff,
                Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _)) => ExitReason::Reset,
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    ExitReason::Error(format!("vCPU {}: guest system event {kind}", self.id))
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => ExitReason::Error(format!(
                    "vCPU {}: KVM could not enter the guest (hardware reason {reason:#x} on host CPU {cpu})",
                    self.id
                )),
                Ok(VcpuExit::InternalError) => ExitReason::Error(format!(
                    "vCPU {}: KVM internal error at rip {}",
                    self.id,
                    self.rip()
                )),
                Ok(other) => {
                    let exit = format!("{other:?}");
                    ExitReason::Error(format!(
                        "vCPU {}: unhandled exit {exit} at rip {}",
                        self.id,
                        self.rip()
                    ))
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => ExitReason::Error(format!("vCPU {}: KVM_RUN failed: {e}", self.id)),
            };
            exit.request(reason);
            return;
        }
    }

    fn rip(&self) -> String {
        match self.fd.get_regs() {
            Ok(regs) => format!("{:#x}", regs.rip),
            Err(_) => "unknown".to_string(),
        }
    }
}

/// Logs the first guest access to an address no device claims, once per
/// VMM: a guest can make any number of them, so the rest are only counted
/// (`Bus::unclaimed`).
fn note_unclaimed(addr: u64) {
    static LOGGED: AtomicBool = AtomicBool::new(false);
    if !LOGGED.swap(true, Ordering::Relaxed) {
        eprintln!(
            "microvm: the guest accessed {addr:#x}, which no device or RAM claims; such \
             accesses read as all ones and writes are dropped (logged once)"
        );
    }
}

fn set_boot_msrs(fd: &VcpuFd, id: u8) -> Result<(), VcpuError> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let entries = [
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITE_BACK),
    ];
    let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::PartialMsrs {
        id,
        set: 0,
        wanted: entries.len(),
    })?;
    let set = fd.set_msrs(&msrs).map_err(|source| VcpuError::Set {
        id,
        what: "MSRs",
        source,
    })?;
    if set != entries.len() {
        return Err(VcpuError::PartialMsrs {
            id,
            set,
            wanted: entries.len(),
        });
    }
    Ok(())
}

/// LINT0 delivers ExtINT and LINT1 NMI, as firmware leaves them.
fn set_lint(fd: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    let mut lapic = fd.get_lapic()?;
    for (offset, mode) in [
        (APIC_LVT_LINT0, APIC_MODE_EXTINT),
        (APIC_LVT_LINT1, APIC_MODE_NMI),
    ] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, byte) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *byte as _;
        }
    }
    fd.set_lapic(&lapic)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::loader::BootProtocol;
    use crate::vstate::memory::{layout, GuestRam};
    use crate::vstate::vm_state::VmState;
    use devices::bus::BusDevice;
    use devices::legacy::AcpiPm;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};
    use vm_memory::{Bytes, GuestAddress};

    #[derive(Default)]
    struct Recorder(Vec<u8>);

    impl BusDevice for Recorder {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0.extend_from_slice(data);
        }
    }

    /// 32-bit code: write "OK" to port 0x3f8, then S5|SLP_EN to the ACPI
    /// sleep control register, then halt.
    const GUEST_CODE: &[u8] = &[
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'O', 0xee, // mov al, 'O'; out dx, al
        0xb0, b'K', 0xee, // mov al, 'K'; out dx, al
        0x66, 0xba, 0xc0, 0x03, // mov dx, 0x3c0
        0xb0, 0x34, 0xee, // mov al, (5 << 2) | 0x20; out dx, al
        0xf4, // hlt
    ];

    /// 32-bit code: write to and read from 256 MiB, where nothing is
    /// mapped (an MMIO exit), print the byte read, then GUEST_CODE.
    const UNCLAIMED_ACCESS: &[u8] = &[
        0xa3, 0x00, 0x00, 0x00, 0x10, // mov [0x10000000], eax
        0xa1, 0x00, 0x00, 0x00, 0x10, // mov eax, [0x10000000]
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xee, // out dx, al
    ];

    /// 32-bit code: count in ECX, store the count at COUNTER, until the
    /// word at STOP is not 0; then power off.
    const COUNTER: u64 = 0x20_0000;
    const STOP: u64 = 0x20_0100;
    const COUNTING_GUEST: &[u8] = &[
        0x31, 0xc9, // xor ecx, ecx
        0x41, // loop: inc ecx
        0x89, 0x0d, 0x00, 0x00, 0x20, 0x00, // mov [COUNTER], ecx
        0xa1, 0x00, 0x01, 0x20, 0x00, // mov eax, [STOP]
        0x85, 0xc0, // test eax, eax
        0x74, 0xf0, // jz loop
        0x66, 0xba, 0xc0, 0x03, // mov dx, 0x3c0
        0xb0, 0x34, 0xee, // mov al, (5 << 2) | 0x20; out dx, al
        0xf4, // hlt
    ];

    /// Runs `vcpu` on its own thread behind `gate`, with the ACPI sleep
    /// register on its port bus; its exit signal. (The thread is left
    /// behind: after the guest's poweroff it halts, and the VMM would end.)
    fn start(vcpu: Vcpu, gate: &Arc<VcpuGate<SavedVcpu>>) -> ExitSignal {
        let exit = ExitSignal::new().unwrap();
        let io_bus = Bus::new();
        io_bus
            .insert(
                u64::from(AcpiPm::BASE),
                AcpiPm::LEN,
                Arc::new(Mutex::new(AcpiPm::new(exit.clone(), 5))),
            )
            .unwrap();
        let (io_bus, mmio_bus) = (Arc::new(io_bus), Arc::new(Bus::new()));
        let (signal, gate) = (exit.clone(), gate.clone());
        std::thread::spawn(move || vcpu.run(io_bus, mmio_bus, signal, &gate));
        exit
    }

    fn counter(ram: &GuestRam) -> u32 {
        ram.memory.read_obj::<u32>(GuestAddress(COUNTER)).unwrap()
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_guest_paused_mid_loop_goes_on_in_a_new_vm_from_its_saved_vcpu_vm_and_memory() {
        crate::vstate::vcpu_gate::install_kick_handler().unwrap();
        // The first VM counts until it is paused.
        let ram = GuestRam::new(64 << 20).unwrap();
        let vm = Vm::new(Vm::open_kvm().unwrap()).unwrap();
        vm.register_memory(&ram).unwrap();
        let entry = GuestAddress(layout::HIMEM_START);
        ram.memory.write_slice(COUNTING_GUEST, entry).unwrap();
        let boot = BootEntry {
            entry,
            protocol: BootProtocol::Pvh {
                start_info: GuestAddress(layout::PVH_START_INFO),
            },
        };
        let gate = Arc::new(VcpuGate::new());
        let vcpu = Vcpu::new(&vm, &ram.memory, 0, 1, Some(&boot)).unwrap();
        let exit = start(vcpu, &gate);
        wait_for("the guest to count", || counter(&ram) > 1000);
        gate.close(Duration::from_secs(5)).unwrap();
        let paused_at = counter(&ram);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(counter(&ram), paused_at, "a parked vCPU does not run");

        // Its state, through the state file's serialisation.
        let mut saved = gate.collect(Duration::from_secs(5)).unwrap();
        assert_eq!(saved.len(), 1);
        let vcpu_state = saved.remove(0).unwrap();
        // ECX holds the count, or one more if the vCPU stopped between
        // the increment and the store.
        let count = vcpu_state.regs.rcx;
        assert!(
            count == u64::from(paused_at) || count == u64::from(paused_at) + 1,
            "{count}"
        );
        let vm_state = VmState::save(&vm.fd).unwrap();
        let text = serde_json::to_string(&(&vcpu_state, &vm_state)).unwrap();
        let (vcpu_state, vm_state): (VcpuState, VmState) = serde_json::from_str(&text).unwrap();

        // A new VM from the saved memory and state goes on counting from
        // where the first stopped (not from 0: ECX came along).
        let copy = GuestRam::new(64 << 20).unwrap();
        let mut bytes = vec![0u8; 64 << 20];
        ram.memory.read_slice(&mut bytes, GuestAddress(0)).unwrap();
        copy.memory.write_slice(&bytes, GuestAddress(0)).unwrap();
        let vm2 = Vm::new(Vm::open_kvm().unwrap()).unwrap();
        vm2.register_memory(&copy).unwrap();
        vm_state.restore(&vm2.fd).unwrap();
        let vcpu2 = Vcpu::new(&vm2, &copy.memory, 0, 1, None).unwrap();
        vcpu2.restore(&vcpu_state).unwrap();
        let gate2 = Arc::new(VcpuGate::new());
        let exit2 = start(vcpu2, &gate2);
        let mut seen = paused_at;
        wait_for("the restored guest to count", || {
            seen = counter(&copy);
            seen != paused_at
        });
        assert!(
            seen > paused_at && seen < paused_at.saturating_add(1 << 30),
            "restored at {paused_at}, then counted {seen}"
        );
        copy.memory.write_obj(1u32, GuestAddress(STOP)).unwrap();
        wait_for("the restored guest to power off", || {
            exit2.reason().is_some()
        });
        assert_eq!(exit2.reason(), Some(ExitReason::PowerOff));

        // The first VM, released, goes on too, and stops when told.
        ram.memory.write_obj(1u32, GuestAddress(STOP)).unwrap();
        gate.open();
        wait_for("the first guest to power off", || exit.reason().is_some());
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
    }

    #[test]
    fn a_tiny_guest_runs_through_the_pvh_entry_and_powers_off() {
        assert_eq!(run_tiny_guest(GUEST_CODE).0, b"OK");
    }

    #[test]
    fn an_access_to_unclaimed_memory_reads_all_ones_and_the_guest_goes_on() {
        let code = [UNCLAIMED_ACCESS, GUEST_CODE].concat();
        let (console, unclaimed) = run_tiny_guest(&code);
        assert_eq!(console, b"\xffOK");
        assert_eq!(unclaimed, 2, "one write, one read");
    }

    /// Runs `code` at the PVH entry of a 64 MiB guest until it powers off;
    /// returns what it wrote to the serial port and the MMIO bus's count
    /// of unclaimed accesses.
    fn run_tiny_guest(code: &[u8]) -> (Vec<u8>, u64) {
        let ram = GuestRam::new(64 << 20).unwrap();
        let vm = Vm::new(Vm::open_kvm().unwrap()).unwrap();
        vm.register_memory(&ram).unwrap();
        let entry = GuestAddress(layout::HIMEM_START);
        ram.memory.write_slice(code, entry).unwrap();
        let boot = BootEntry {
            entry,
            protocol: BootProtocol::Pvh {
                start_info: GuestAddress(layout::PVH_START_INFO),
            },
        };
        let vcpu = Vcpu::new(&vm, &ram.memory, 0, 1, Some(&boot)).unwrap();

        let exit = ExitSignal::new().unwrap();
        let console = Arc::new(Mutex::new(Recorder::default()));
        let io_bus = Bus::new();
        io_bus.insert(0x3f8, 8, console.clone()).unwrap();
        io_bus
            .insert(
                u64::from(AcpiPm::BASE),
                AcpiPm::LEN,
                Arc::new(Mutex::new(AcpiPm::new(exit.clone(), 5))),
            )
            .unwrap();
        let (io_bus, mmio_bus) = (Arc::new(io_bus), Arc::new(Bus::new()));
        let signal = exit.clone();
        let mmio = mmio_bus.clone();
        let gate: crate::vstate::vcpu_gate::VcpuGate<SavedVcpu> =
            crate::vstate::vcpu_gate::VcpuGate::new();
        std::thread::spawn(move || vcpu.run(io_bus, mmio, signal, &gate));

        let deadline = Instant::now() + Duration::from_secs(20);
        while exit.reason().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
        let written = console.lock().unwrap().0.clone();
        (written, mmio_bus.unclaimed())
    }
}
