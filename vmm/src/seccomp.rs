//! Seccomp filters, one per thread kind, kept as data: the syscalls each
//! thread needs once the VM is built. Anything else traps; the SIGSYS
//! handler names the syscall on stderr and ends the VMM.
//!
//! Filters are built once the VM and its devices exist, so every ioctl
//! rule names the descriptor its request is meant for (`FilterFds`): a
//! vCPU thread may run only its own vCPU, and a request on any other
//! descriptor (a dup included) traps like a syscall outside the filter.

use std::collections::BTreeMap;
use std::os::fd::RawFd;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Exit status when a thread makes a syscall outside its filter (128 + SIGSYS).
pub const SECCOMP_EXIT_STATUS: i32 = 128 + libc::SIGSYS;

/// `_IOC(dir, type, nr, size)` from include/uapi/asm-generic/ioctl.h.
const fn ioc(dir: u64, kind: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (kind << 8) | nr
}
const IOC_NONE: u64 = 0;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;
const KVMIO: u64 = 0xae;
const VHOST_VIRTIO: u64 = 0xaf;

const KVM_RUN: u64 = ioc(IOC_NONE, KVMIO, 0x80, 0);
/// Tells the guest's kvmclock that the vCPU was stopped (a pause).
const KVM_KVMCLOCK_CTRL: u64 = ioc(IOC_NONE, KVMIO, 0xad, 0);
const fn size<T>() -> u64 {
    std::mem::size_of::<T>() as u64
}
/// What a parked vCPU reads of itself for a snapshot (vstate/vcpu_state.rs).
const KVM_GET_SREGS: u64 = ioc(IOC_READ, KVMIO, 0x83, size::<kvm_bindings::kvm_sregs>());
const KVM_GET_MSRS: u64 = ioc(IOC_READ | IOC_WRITE, KVMIO, 0x88, 8);
const KVM_GET_LAPIC: u64 = ioc(
    IOC_READ,
    KVMIO,
    0x8e,
    size::<kvm_bindings::kvm_lapic_state>(),
);
const KVM_GET_CPUID2: u64 = ioc(IOC_READ | IOC_WRITE, KVMIO, 0x91, 8);
const KVM_GET_MP_STATE: u64 = ioc(IOC_READ, KVMIO, 0x98, size::<kvm_bindings::kvm_mp_state>());
const KVM_GET_VCPU_EVENTS: u64 = ioc(
    IOC_READ,
    KVMIO,
    0x9f,
    size::<kvm_bindings::kvm_vcpu_events>(),
);
const KVM_GET_XSAVE: u64 = ioc(IOC_READ, KVMIO, 0xa4, 4096);
const KVM_GET_XCRS: u64 = ioc(IOC_READ, KVMIO, 0xa6, size::<kvm_bindings::kvm_xcrs>());
/// What the lifecycle thread reads of the VM for a snapshot.
const KVM_GET_IRQCHIP: u64 = ioc(
    IOC_READ | IOC_WRITE,
    KVMIO,
    0x62,
    size::<kvm_bindings::kvm_irqchip>(),
);
const KVM_GET_CLOCK: u64 = ioc(
    IOC_READ,
    KVMIO,
    0x7c,
    size::<kvm_bindings::kvm_clock_data>(),
);
/// struct kvm_regs.
const KVM_GET_REGS: u64 = ioc(IOC_READ, KVMIO, 0x81, 144);
/// struct kvm_userspace_memory_region.
const KVM_SET_USER_MEMORY_REGION: u64 = ioc(IOC_WRITE, KVMIO, 0x46, 32);
/// struct kvm_irq_routing (header; entries follow).
const KVM_SET_GSI_ROUTING: u64 = ioc(IOC_WRITE, KVMIO, 0x6a, 8);
/// struct kvm_ioeventfd.
const KVM_IOEVENTFD: u64 = ioc(IOC_WRITE, KVMIO, 0x79, 64);
const VHOST_GET_FEATURES: u64 = ioc(IOC_READ, VHOST_VIRTIO, 0x00, 8);
const VHOST_SET_FEATURES: u64 = ioc(IOC_WRITE, VHOST_VIRTIO, 0x00, 8);
/// struct vhost_vring_state, vhost_vring_addr, vhost_vring_file.
const VHOST_SET_VRING_NUM: u64 = ioc(IOC_WRITE, VHOST_VIRTIO, 0x10, 8);
const VHOST_SET_VRING_ADDR: u64 = ioc(IOC_WRITE, VHOST_VIRTIO, 0x11, 40);
const VHOST_SET_VRING_BASE: u64 = ioc(IOC_WRITE, VHOST_VIRTIO, 0x12, 8);
const VHOST_GET_VRING_BASE: u64 = ioc(IOC_READ | IOC_WRITE, VHOST_VIRTIO, 0x12, 8);
const VHOST_SET_VRING_KICK: u64 = ioc(IOC_WRITE, VHOST_VIRTIO, 0x20, 8);
const VHOST_SET_VRING_CALL: u64 = ioc(IOC_WRITE, VHOST_VIRTIO, 0x21, 8);
const VHOST_VDPA_GET_STATUS: u64 = ioc(IOC_READ, VHOST_VIRTIO, 0x71, 1);
const VHOST_VDPA_SET_STATUS: u64 = ioc(IOC_WRITE, VHOST_VIRTIO, 0x72, 1);
/// struct vhost_vdpa_config header.
const VHOST_VDPA_GET_CONFIG: u64 = ioc(IOC_READ, VHOST_VIRTIO, 0x73, 8);
const VHOST_VDPA_SET_CONFIG: u64 = ioc(IOC_WRITE, VHOST_VIRTIO, 0x74, 8);
const VHOST_VDPA_SET_VRING_ENABLE: u64 = ioc(IOC_WRITE, VHOST_VIRTIO, 0x75, 8);
const VHOST_VDPA_SET_CONFIG_CALL: u64 = ioc(IOC_WRITE, VHOST_VIRTIO, 0x77, 4);
const VHOST_VDPA_SET_GROUP_ASID: u64 = ioc(IOC_WRITE, VHOST_VIRTIO, 0x7c, 8);
const VHOST_VDPA_SUSPEND: u64 = ioc(IOC_NONE, VHOST_VIRTIO, 0x7d, 0);
const VHOST_VDPA_RESUME: u64 = ioc(IOC_NONE, VHOST_VIRTIO, 0x7e, 0);
const TCGETS: u64 = 0x5401;
const TCSETS: u64 = 0x5402;
const TIOCGWINSZ: u64 = 0x5413;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The VMM thread: event loop, stdin, terminal.
    Vmm,
    /// A vCPU thread: KVM_RUN and device emulation.
    Vcpu,
    /// The control API thread: accepts clients, reads device state.
    Api,
    /// The virtio-mem worker: serves the guest's requests, gives each
    /// plugged block a memory slot and releases unplugged memory.
    MemoryWorker,
    /// The virtio-iommu request worker: serves the guest's requests and
    /// programs the devices' IOTLBs (writes on vhost descriptors).
    IommuWorker,
    /// The device query thread: asks the vhost-vdpa devices questions
    /// that are round trips to them (queue state), for the API.
    DeviceQuery,
    /// A net device's control-queue worker: serves the guest's commands
    /// and enables or disables the device's data queues.
    NetControlWorker,
    /// Pauses and resumes the VM: parks the vCPUs (signals them) and the
    /// workers, stops and restarts the vhost-vdpa devices.
    Lifecycle,
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the {0:?} seccomp filter: {1}")]
    Build(ThreadKind, String),
    #[error("cannot install the seccomp filter: {0}")]
    Install(seccompiler::Error),
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

/// A condition on one syscall argument: `(arg & mask) == value`, on the
/// argument's low 32 bits (every argument checked here is an int).
#[derive(Clone, Copy, Debug)]
struct Arg {
    index: u8,
    mask: u32,
    value: u32,
}

/// The argument equals `value`.
const fn eq(index: u8, value: u32) -> Arg {
    Arg {
        index,
        mask: u32::MAX,
        value,
    }
}

/// None of `bits` is set in the argument.
const fn none_of(index: u8, bits: u32) -> Arg {
    Arg {
        index,
        mask: bits,
        value: 0,
    }
}

/// All of `bits` are set in the argument.
const fn all_of(index: u8, bits: u32) -> Arg {
    Arg {
        index,
        mask: bits,
        value: bits,
    }
}

/// One allowed syscall: unconditionally (no rules), or when all the
/// conditions of one of its rules hold.
type Allowed = (i64, &'static [&'static [Arg]]);

const PRIVATE_ANON: u32 = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u32;
/// What malloc and thread stacks ask mmap for; never MAP_SHARED (no
/// new file mappings once running), never executable.
const MMAP_FLAGS: u32 = PRIVATE_ANON | (libc::MAP_NORESERVE | libc::MAP_STACK) as u32;
const PROT_EXEC: u32 = libc::PROT_EXEC as u32;

/// Syscalls every thread needs: memory (anonymous, never executable),
/// locks, signals, exit, time, I/O on descriptors it already holds.
const COMMON: &[Allowed] = &[
    (libc::SYS_read, &[]),
    (libc::SYS_write, &[]),
    (libc::SYS_writev, &[]),
    (libc::SYS_close, &[]),
    (libc::SYS_futex, &[]),
    (
        libc::SYS_mmap,
        &[
            // malloc's heaps and big blocks: private anonymous memory.
            &[
                none_of(2, PROT_EXEC),
                none_of(3, !MMAP_FLAGS),
                all_of(3, PRIVATE_ANON),
            ],
            // glibc shrinks a thread heap by mapping PROT_NONE over its end.
            &[
                eq(2, libc::PROT_NONE as u32),
                none_of(3, !(MMAP_FLAGS | libc::MAP_FIXED as u32)),
                all_of(3, PRIVATE_ANON),
            ],
        ],
    ),
    (libc::SYS_munmap, &[]),
    // realloc of a big block: moving is fine, MREMAP_FIXED is not needed.
    (
        libc::SYS_mremap,
        &[&[eq(3, 0)], &[eq(3, libc::MREMAP_MAYMOVE as u32)]],
    ),
    // glibc grows a thread's malloc arena with mprotect; never to PROT_EXEC.
    (libc::SYS_mprotect, &[&[none_of(2, PROT_EXEC)]]),
    // glibc gives freed heap pages back with MADV_DONTNEED; nothing else.
    (libc::SYS_madvise, &[&[eq(2, libc::MADV_DONTNEED as u32)]]),
    (libc::SYS_brk, &[]),
    (libc::SYS_rt_sigreturn, &[]),
    (libc::SYS_rt_sigprocmask, &[]),
    (libc::SYS_sigaltstack, &[]),
    (libc::SYS_sched_yield, &[]),
    (libc::SYS_clock_gettime, &[]),
    (libc::SYS_clock_nanosleep, &[]),
    (libc::SYS_nanosleep, &[]),
    (libc::SYS_getrandom, &[]),
    (libc::SYS_exit, &[]),
    (libc::SYS_exit_group, &[]),
    (libc::SYS_restart_syscall, &[]),
    // abort() on a panic: raise SIGABRT on ourselves.
    (libc::SYS_getpid, &[]),
    (libc::SYS_gettid, &[]),
    (libc::SYS_tgkill, &[]),
    // std's OwnedFd drop asks whether the descriptor is open when debug
    // assertions are on.
    (libc::SYS_fcntl, &[&[eq(1, libc::F_GETFD as u32)]]),
];

/// The API's poll loop: accepts non-blocking clients, answers, shuts the
/// write side and drains.
const API_ONLY: &[Allowed] = &[
    (libc::SYS_poll, &[]),
    (
        libc::SYS_accept4,
        &[&[eq(3, crate::api::server::accept_flags() as u32)]],
    ),
    (libc::SYS_recvfrom, &[]),
    (libc::SYS_sendto, &[]),
    (libc::SYS_shutdown, &[&[eq(1, libc::SHUT_WR as u32)]]),
];

/// The virtio-iommu worker waits on its queue; IOTLB messages are writes.
const IOMMU_WORKER_ONLY: &[Allowed] = &[(libc::SYS_poll, &[]), (libc::SYS_ppoll, &[])];

/// The virtio-mem worker waits on its queue and releases unplugged blocks.
const MEMORY_WORKER_ONLY: &[Allowed] = &[
    (libc::SYS_poll, &[]),
    (libc::SYS_ppoll, &[]),
    (
        libc::SYS_fallocate,
        &[&[eq(
            1,
            (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u32,
        )]],
    ),
];

/// The device query thread only waits on its channel (futex) and asks
/// its ioctls.
const DEVICE_QUERY_ONLY: &[Allowed] = &[];

/// A net control-queue worker waits on its queue.
const NET_CONTROL_WORKER_ONLY: &[Allowed] = &[(libc::SYS_poll, &[]), (libc::SYS_ppoll, &[])];

/// A new file a snapshot writes: created write-only, never opened if it
/// exists (OpenOptions::new().write(true).create_new(true); std's
/// File::create_new would ask for O_RDWR).
const CREATE_NEW: u32 = (libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC) as u32;

/// The lifecycle thread waits on its channel (futex) and kicks vCPU
/// threads (tgkill, in COMMON). Starting a device again after a reset
/// hands it the interrupt eventfds as a driver's start does on a vCPU
/// thread: duplicates (EventFd::try_clone). A snapshot creates its
/// directory and new files in it (never opening one that exists, never
/// reading one), syncs them and reads back their size.
const LIFECYCLE_ONLY: &[Allowed] = &[
    (libc::SYS_fcntl, &[&[eq(1, libc::F_DUPFD_CLOEXEC as u32)]]),
    // A live update: connect to the new VMM's unix socket, send the state
    // and the memory file, read its answer, each step with a timeout.
    (libc::SYS_socket, &[&[eq(0, libc::AF_UNIX as u32)]]),
    (libc::SYS_connect, &[]),
    (libc::SYS_sendmsg, &[]),
    (libc::SYS_sendto, &[]),
    (libc::SYS_recvfrom, &[]),
    (
        libc::SYS_setsockopt,
        &[
            &[
                eq(1, libc::SOL_SOCKET as u32),
                eq(2, libc::SO_RCVTIMEO as u32),
            ],
            &[
                eq(1, libc::SOL_SOCKET as u32),
                eq(2, libc::SO_SNDTIMEO as u32),
            ],
        ],
    ),
    (libc::SYS_mkdir, &[]),
    (libc::SYS_mkdirat, &[]),
    (libc::SYS_openat, &[&[eq(2, CREATE_NEW)]]),
    (libc::SYS_fsync, &[]),
    (libc::SYS_statx, &[]),
    (libc::SYS_newfstatat, &[]),
];

const VMM_ONLY: &[Allowed] = &[
    (libc::SYS_epoll_wait, &[]),
    (libc::SYS_epoll_pwait, &[]),
    (libc::SYS_epoll_ctl, &[]),
];

/// vCPU threads duplicate descriptors: EventFd::try_clone hands a device
/// its kick and call fds when the guest starts it.
const VCPU_ONLY: &[Allowed] = &[(libc::SYS_fcntl, &[&[eq(1, libc::F_DUPFD_CLOEXEC as u32)]])];

/// The terminal requests of the VMM thread: stdin into raw mode and back.
const TERMINAL: &[u64] = &[TCGETS, TCSETS, TIOCGWINSZ];
/// On its own vCPU: run it, read the registers to report a failed exit,
/// tell the guest's clock when a pause parked it, and read its state for a
/// snapshot while parked.
const VCPU_OWN: &[u64] = &[
    KVM_RUN,
    KVM_GET_REGS,
    KVM_KVMCLOCK_CTRL,
    KVM_GET_SREGS,
    KVM_GET_MSRS,
    KVM_GET_LAPIC,
    KVM_GET_CPUID2,
    KVM_GET_MP_STATE,
    KVM_GET_VCPU_EVENTS,
    KVM_GET_XSAVE,
    KVM_GET_XCRS,
];
/// On the VM, from the lifecycle thread: the interrupt controllers and the
/// clock, for a snapshot.
const VM_FROM_LIFECYCLE: &[u64] = &[KVM_GET_IRQCHIP, KVM_GET_CLOCK];
/// On the VM, from device emulation: a guest write can reprogram MSI-X
/// routes or move a BAR (its ioeventfds).
const VM_FROM_VCPU: &[u64] = &[KVM_SET_GSI_ROUTING, KVM_IOEVENTFD];
/// On each vhost-vdpa device, from device emulation: the guest starts,
/// configures and resets the device through its PCI registers. The same
/// for every device type: a block device's config (capacity, writeback) is
/// GET/SET_CONFIG like a net device's. What a device is (device id, config
/// size, queue count, groups, address spaces, IOVA range, backend features)
/// is asked once at open, before any filter exists, and RLIMIT_MEMLOCK is
/// raised then too: no filtered thread may make those requests, setrlimit
/// or prlimit64.
const VHOST_FROM_VCPU: &[u64] = &[
    VHOST_GET_FEATURES,
    VHOST_SET_FEATURES,
    VHOST_SET_VRING_NUM,
    VHOST_SET_VRING_ADDR,
    VHOST_SET_VRING_BASE,
    VHOST_GET_VRING_BASE,
    VHOST_SET_VRING_KICK,
    VHOST_SET_VRING_CALL,
    VHOST_VDPA_GET_STATUS,
    VHOST_VDPA_SET_STATUS,
    VHOST_VDPA_GET_CONFIG,
    VHOST_VDPA_SET_CONFIG,
    VHOST_VDPA_SET_VRING_ENABLE,
    VHOST_VDPA_SET_CONFIG_CALL,
    // A shadowed control queue's group goes to address space 1 at start.
    VHOST_VDPA_SET_GROUP_ASID,
];
/// On each vhost-vdpa device, from the API: the kernel answers the status
/// itself (VDUSE keeps it), so it never waits on the device.
const VHOST_FROM_API: &[u64] = &[VHOST_VDPA_GET_STATUS];
/// On each vhost-vdpa device, from the device query thread: queue state,
/// a round trip to the device (VDUSE: to its userspace process).
const VHOST_FROM_DEVICE_QUERY: &[u64] = &[VHOST_GET_VRING_BASE];
/// On each vhost-vdpa device, from the lifecycle thread: a pause suspends
/// the device, or resets it where it cannot suspend; a resume resumes it,
/// or starts it again as the driver had (the requests the driver's own
/// start makes from a vCPU thread).
const VHOST_FROM_LIFECYCLE: &[u64] = &[VHOST_VDPA_SUSPEND, VHOST_VDPA_RESUME];
/// On each vhost-vdpa device, from a net control-queue worker: the guest
/// sets the queue pairs in use.
const VHOST_FROM_NET_CONTROL: &[u64] = &[VHOST_VDPA_SET_VRING_ENABLE];
/// On the VM, from the virtio-mem worker: plugged blocks get a memory slot
/// of their own and unplugged ones lose it (guest-inaccessible unplug).
const VM_FROM_MEMORY_WORKER: &[u64] = &[KVM_SET_USER_MEMORY_REGION];

/// The descriptors ioctl rules are bound to. They exist once the VM and
/// its devices are built and stay open for the VM's life; no filtered
/// thread may open a file, so a number keeps meaning the same file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilterFds {
    /// The VM (KVM_CREATE_VM's descriptor).
    pub vm: RawFd,
    /// Every vhost-vdpa device's control descriptor.
    pub vhost: Vec<RawFd>,
    /// The vCPU a vCPU thread runs; other threads have none.
    pub vcpu: Option<RawFd>,
}

impl FilterFds {
    pub fn new(vm: RawFd, vhost: Vec<RawFd>) -> FilterFds {
        FilterFds {
            vm,
            vhost,
            vcpu: None,
        }
    }

    /// The same descriptors, for the thread that runs vCPU `vcpu`.
    pub fn for_vcpu(&self, vcpu: RawFd) -> FilterFds {
        FilterFds {
            vcpu: Some(vcpu),
            ..self.clone()
        }
    }
}

/// The ioctls a thread may make, each as (descriptor, request).
fn ioctl_rules(kind: ThreadKind, fds: &FilterFds) -> Result<Vec<(RawFd, u64)>, &'static str> {
    let on = |fd: RawFd, requests: &'static [u64]| requests.iter().map(move |&r| (fd, r));
    let on_vhost = |requests: &'static [u64]| {
        fds.vhost
            .iter()
            .flat_map(move |&fd| on(fd, requests))
            .collect::<Vec<_>>()
    };
    Ok(match kind {
        ThreadKind::Vmm => on(libc::STDIN_FILENO, TERMINAL).collect(),
        ThreadKind::Api => on_vhost(VHOST_FROM_API),
        ThreadKind::MemoryWorker => on(fds.vm, VM_FROM_MEMORY_WORKER).collect(),
        ThreadKind::IommuWorker => Vec::new(),
        ThreadKind::DeviceQuery => on_vhost(VHOST_FROM_DEVICE_QUERY),
        ThreadKind::NetControlWorker => on_vhost(VHOST_FROM_NET_CONTROL),
        ThreadKind::Lifecycle => {
            let mut rules = on_vhost(VHOST_FROM_VCPU);
            rules.extend(on_vhost(VHOST_FROM_LIFECYCLE));
            rules.extend(on(fds.vm, VM_FROM_LIFECYCLE));
            rules
        }
        ThreadKind::Vcpu => {
            let vcpu = fds
                .vcpu
                .ok_or("a vCPU filter needs the vCPU's descriptor")?;
            on(vcpu, VCPU_OWN)
                .chain(on(fds.vm, VM_FROM_VCPU))
                .chain(on_vhost(VHOST_FROM_VCPU))
                .collect()
        }
    })
}

fn condition(arg: Arg) -> Result<SeccompCondition, seccompiler::BackendError> {
    let op = match arg.mask {
        u32::MAX => SeccompCmpOp::Eq,
        mask => SeccompCmpOp::MaskedEq(u64::from(mask)),
    };
    SeccompCondition::new(arg.index, SeccompCmpArgLen::Dword, op, u64::from(arg.value))
}

/// Adds `allowed` to `rules`; rules of a syscall listed twice accumulate.
fn add(
    rules: &mut BTreeMap<i64, Vec<SeccompRule>>,
    allowed: &[Allowed],
) -> Result<(), seccompiler::BackendError> {
    for &(syscall, conditions) in allowed {
        let entry = rules.entry(syscall).or_default();
        for rule in conditions {
            let rule = rule
                .iter()
                .map(|&arg| condition(arg))
                .collect::<Result<_, _>>()?;
            entry.push(SeccompRule::new(rule)?);
        }
    }
    Ok(())
}

/// glibc's malloc reads files lazily: the first time it shrinks a thread's
/// heap it opens /proc/sys/vm/overcommit_memory, and past 8 arenas it asks
/// for the CPU count. A filtered thread may do neither, so, before any
/// filter exists: heaps are never trimmed (freed memory is kept for reuse)
/// and the arena count is fixed.
fn prepare_malloc() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: mallopt only sets malloc parameters; no pointers.
        unsafe {
            libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
            libc::mallopt(libc::M_ARENA_MAX, 8);
        }
    });
}

/// `ioctl(fd, request, ...)`: a rule's conditions must all hold, so the
/// request is allowed on this descriptor only.
fn ioctl_rule(fd: RawFd, request: u64) -> Result<SeccompRule, String> {
    let fd = u64::try_from(fd).map_err(|_| format!("invalid descriptor {fd}"))?;
    let equals = |index, value| {
        SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
    };
    let rule = || SeccompRule::new(vec![equals(0, fd)?, equals(1, request)?]);
    rule().map_err(|e| e.to_string())
}

/// Compiles the filter for one kind of thread, its ioctls bound to `fds`.
pub fn filter(kind: ThreadKind, fds: &FilterFds) -> Result<BpfProgram, SeccompError> {
    prepare_malloc();
    let error = |e: &dyn std::fmt::Display| SeccompError::Build(kind, e.to_string());
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let extra: &[Allowed] = match kind {
        ThreadKind::Vmm => VMM_ONLY,
        ThreadKind::Api => API_ONLY,
        ThreadKind::MemoryWorker => MEMORY_WORKER_ONLY,
        ThreadKind::IommuWorker => IOMMU_WORKER_ONLY,
        ThreadKind::DeviceQuery => DEVICE_QUERY_ONLY,
        ThreadKind::NetControlWorker => NET_CONTROL_WORKER_ONLY,
        ThreadKind::Lifecycle => LIFECYCLE_ONLY,
        ThreadKind::Vcpu => VCPU_ONLY,
    };
    add(&mut rules, COMMON).map_err(|e| error(&e))?;
    add(&mut rules, extra).map_err(|e| error(&e))?;
    let ioctls = ioctl_rules(kind, fds)
        .map_err(|e| error(&e))?
        .into_iter()
        .map(|(fd, request)| ioctl_rule(fd, request))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(&e))?;
    // An empty rule list would allow the syscall unconditionally: a thread
    // that needs no ioctl gets no ioctl entry at all.
    if !ioctls.is_empty() {
        rules.insert(libc::SYS_ioctl, ioctls);
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| error(&e))?;
    BpfProgram::try_from(filter).map_err(|e| error(&e))
}

/// Installs `program` on the calling thread only.
pub fn apply(program: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter(program).map_err(SeccompError::Install)
}

/// Offset of `si_syscall` in the SIGSYS siginfo on x86_64: after signo,
/// errno, code, padding (16 bytes) and the faulting address (8 bytes).
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS delivered by
    // seccomp's Trap action; si_syscall is an int at this fixed offset.
    let syscall = unsafe {
        std::ptr::read_unaligned((info as *const u8).add(SI_SYSCALL_OFFSET) as *const i32)
    };
    // Only async-signal-safe work here: format into a stack buffer, write, exit.
    let mut message = *b"microvm: seccomp refused syscall           \n";
    let mut digits = [0u8; 10];
    let mut n = syscall.unsigned_abs();
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 || len == digits.len() {
            break;
        }
    }
    let start = b"microvm: seccomp refused syscall ".len();
    for i in 0..len {
        message[start + i] = digits[len - 1 - i];
    }
    message[start + len] = b'\n';
    // SAFETY: write(2) and _exit(2) are async-signal-safe and allowed by
    // every filter; the buffer is valid for the given length.
    unsafe {
        libc::write(2, message.as_ptr() as *const libc::c_void, start + len + 1);
        libc::_exit(SECCOMP_EXIT_STATUS);
    }
}

/// Routes SIGSYS to a handler that reports the refused syscall.
pub fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is a valid starting point; we fill in the
    // handler and flags before passing it to sigaction(2), and the handler
    // is an extern "C" function with the SA_SIGINFO signature.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Descriptors for tests that do not exercise the binding: numbers no
    /// test opens.
    fn unused_fds() -> FilterFds {
        FilterFds::new(900, vec![901, 902]).for_vcpu(903)
    }

    /// Runs `body` in a forked child under `kind`'s filter; returns the
    /// child's wait status and what it wrote to the pipe.
    fn in_filtered_child(kind: ThreadKind, body: impl Fn(libc::c_int)) -> (libc::c_int, Vec<u8>) {
        in_bound_child(kind, &unused_fds(), body)
    }

    /// As `in_filtered_child`, with the filter's ioctls bound to `fds`.
    fn in_bound_child(
        kind: ThreadKind,
        fds: &FilterFds,
        body: impl Fn(libc::c_int),
    ) -> (libc::c_int, Vec<u8>) {
        let program = filter(kind, fds).unwrap();
        let mut fds = [0; 2];
        // SAFETY: fds has room for the two descriptors pipe(2) returns.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the child only calls async-signal-safe functions (prctl,
        // seccomp via apply_filter's syscalls, write, socket, _exit) before
        // exiting; the program was compiled before forking.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: in the child; see above.
            unsafe {
                libc::close(fds[0]);
                if apply(&program).is_err() {
                    libc::_exit(100);
                }
                body(fds[1]);
                libc::_exit(0);
            }
        }
        // SAFETY: closing our copy of the write end, then waiting for our child.
        let mut status = 0;
        unsafe {
            libc::close(fds[1]);
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
        }
        let mut output = vec![0u8; 64];
        // SAFETY: output is a valid buffer of the length given.
        let n = unsafe { libc::read(fds[0], output.as_mut_ptr() as *mut libc::c_void, 64) };
        output.truncate(n.max(0) as usize);
        // SAFETY: closing the read end we own.
        unsafe { libc::close(fds[0]) };
        (status, output)
    }

    fn write_then_open_socket(fd: libc::c_int) {
        // SAFETY: writing a static buffer to a pipe we own, then a plain
        // socket(2) call with no pointers.
        unsafe {
            libc::write(fd, b"alive".as_ptr() as *const libc::c_void, 5);
            libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        }
    }

    fn terminal_ioctl(fd: libc::c_int) {
        let mut size: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: a valid pointer to a winsize; the descriptor is a pipe,
        // so the kernel answers ENOTTY if the filter lets the call through.
        unsafe {
            libc::write(fd, b"alive".as_ptr() as *const libc::c_void, 5);
            libc::ioctl(fd, libc::TIOCGWINSZ, &mut size);
        }
    }

    fn assert_killed_by_sigsys(status: libc::c_int) {
        assert!(
            libc::WIFSIGNALED(status),
            "child was not killed: status {status:#x}"
        );
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }

    /// Panics on a vCPU-filtered thread with RUST_BACKTRACE=1, in a child
    /// whose stderr is a pipe, as the VMM has them: SIGSYS handler and
    /// panic hook installed before the filter. Returns what reached stderr.
    fn stderr_of_a_filtered_panic() -> String {
        let program = filter(ThreadKind::Vcpu, &unused_fds()).unwrap();
        let mut fds = [0; 2];
        // SAFETY: fds has room for the two descriptors pipe(2) returns.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the child redirects stderr, installs the handler and hook,
        // applies the filter and panics on purpose; it leaves with _exit
        // whatever happens. glibc's fork resets malloc's locks in the child.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: in the child; see above.
            unsafe {
                libc::dup2(fds[1], 2);
                libc::close(fds[0]);
                libc::close(fds[1]);
            }
            std::env::set_var("RUST_BACKTRACE", "1");
            if install_sigsys_handler().is_err() {
                // SAFETY: leaving the child at once.
                unsafe { libc::_exit(100) };
            }
            crate::panic_hook::install();
            if apply(&program).is_err() {
                // SAFETY: leaving the child at once.
                unsafe { libc::_exit(101) };
            }
            let _ = std::panic::catch_unwind(|| panic!("the device model broke: {}", 42));
            // SAFETY: leaving the child.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: closing our copy of the write end, then waiting for our child.
        unsafe {
            libc::close(fds[1]);
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
        }
        // SAFETY: the read end is ours; File takes it over.
        let mut pipe = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[0]) };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut pipe, &mut stderr).unwrap();
        stderr
    }

    #[test]
    fn a_panic_on_a_filtered_thread_reports_its_message_and_location() {
        let stderr = stderr_of_a_filtered_panic();
        assert!(
            stderr.contains("the device model broke: 42"),
            "stderr: {stderr:?}"
        );
        assert!(stderr.contains("vmm/src/seccomp.rs:"), "stderr: {stderr:?}");
        assert!(!stderr.contains("seccomp refused"), "stderr: {stderr:?}");
    }

    #[test]
    fn a_syscall_outside_the_vcpu_filter_is_refused() {
        let (status, output) = in_filtered_child(ThreadKind::Vcpu, write_then_open_socket);
        assert_eq!(output, b"alive", "allowed syscalls must still work");
        assert_killed_by_sigsys(status);
    }

    #[test]
    fn a_syscall_outside_the_vmm_filter_is_refused() {
        let (status, output) = in_filtered_child(ThreadKind::Vmm, write_then_open_socket);
        assert_eq!(output, b"alive");
        assert_killed_by_sigsys(status);
    }

    #[test]
    fn vcpu_threads_may_not_issue_terminal_ioctls() {
        let (status, _) = in_filtered_child(ThreadKind::Vcpu, terminal_ioctl);
        assert_killed_by_sigsys(status);
    }

    /// std's `OwnedFd` drop checks the descriptor with fcntl(F_GETFD) when
    /// debug assertions are on: every thread closes descriptors.
    fn drop_an_owned_fd(fd: libc::c_int) {
        use std::os::fd::FromRawFd;
        // SAFETY: `fd` is the child's own copy of the pipe's write end;
        // nothing else uses it after this point.
        let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: writing a static buffer to a descriptor we own.
        unsafe { libc::write(fd, b"alive".as_ptr() as *const libc::c_void, 5) };
        drop(owned);
    }

    const EVERY_KIND: [ThreadKind; 7] = [
        ThreadKind::Vmm,
        ThreadKind::Vcpu,
        ThreadKind::Api,
        ThreadKind::MemoryWorker,
        ThreadKind::IommuWorker,
        ThreadKind::DeviceQuery,
        ThreadKind::NetControlWorker,
    ];

    /// Meaningful in the (default) debug test build, where the drop calls
    /// fcntl(F_GETFD); a release build only closes.
    #[test]
    fn every_thread_may_drop_an_owned_fd_in_a_debug_build() {
        for kind in EVERY_KIND {
            let (status, output) = in_filtered_child(kind, drop_an_owned_fd);
            assert_eq!(output, b"alive", "{kind:?}");
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "{kind:?}: status {status:#x}"
            );
        }
    }

    /// What malloc does on a running thread: big blocks (mmap), growing
    /// them (mremap), freeing (munmap, madvise).
    fn allocate_grow_and_free(fd: libc::c_int) {
        let mut big = vec![1u8; 8 << 20];
        big.resize(64 << 20, 2);
        let sum: u64 = big.iter().step_by(4096).map(|&b| u64::from(b)).sum();
        drop(big);
        let small: Vec<Vec<u8>> = (0..1000).map(|i| vec![0u8; i * 64]).collect();
        drop(small);
        if sum > 0 {
            // SAFETY: writing a static buffer to the pipe we were given.
            unsafe { libc::write(fd, b"alive".as_ptr() as *const libc::c_void, 5) };
        }
    }

    fn map(prot: libc::c_int, flags: libc::c_int) {
        // SAFETY: an anonymous mapping at an address of the kernel's choice.
        unsafe { libc::mmap(std::ptr::null_mut(), 4096, prot, flags, -1, 0) };
    }

    fn say_alive(fd: libc::c_int) {
        // SAFETY: writing a static buffer to the pipe we were given.
        unsafe { libc::write(fd, b"alive".as_ptr() as *const libc::c_void, 5) };
    }

    fn map_executable(fd: libc::c_int) {
        say_alive(fd);
        map(
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        );
    }

    fn map_shared(fd: libc::c_int) {
        say_alive(fd);
        map(
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
        );
    }

    fn make_heap_executable(fd: libc::c_int) {
        let page = vec![0u8; 3 * 4096];
        let aligned = (page.as_ptr() as usize).next_multiple_of(4096);
        say_alive(fd);
        // SAFETY: a page inside `page`, which outlives the call; the filter
        // is expected to stop it before it takes effect.
        unsafe {
            libc::mprotect(
                aligned as *mut libc::c_void,
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
            )
        };
    }

    fn unusual_madvise(fd: libc::c_int) {
        let page = vec![0u8; 3 * 4096];
        let aligned = (page.as_ptr() as usize).next_multiple_of(4096);
        say_alive(fd);
        // SAFETY: advice on a page inside `page`, which outlives the call.
        unsafe { libc::madvise(aligned as *mut libc::c_void, 4096, libc::MADV_DONTFORK) };
    }

    #[test]
    fn every_thread_may_allocate_grow_and_free_memory() {
        for kind in EVERY_KIND {
            let (status, output) = in_filtered_child(kind, allocate_grow_and_free);
            assert_eq!(output, b"alive", "{kind:?}");
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "{kind:?}: status {status:#x}"
            );
        }
    }

    #[test]
    fn no_thread_may_create_executable_or_shared_mappings() {
        for kind in EVERY_KIND {
            for (what, body) in [
                ("mmap PROT_EXEC", map_executable as fn(libc::c_int)),
                ("mmap MAP_SHARED", map_shared),
                ("mprotect PROT_EXEC", make_heap_executable),
                ("madvise MADV_DONTFORK", unusual_madvise),
            ] {
                let (status, output) = in_filtered_child(kind, body);
                assert_eq!(output, b"alive", "{kind:?} {what}");
                assert!(
                    libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
                    "{kind:?} was allowed {what}: status {status:#x}"
                );
            }
        }
    }

    #[test]
    fn only_vcpu_and_lifecycle_threads_may_duplicate_descriptors() {
        fn duplicate(fd: libc::c_int) {
            say_alive(fd);
            // SAFETY: fcntl on the pipe we were given; no pointers.
            let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
            if copy >= 0 {
                // SAFETY: closing the copy we just made.
                unsafe { libc::close(copy) };
            }
        }
        let (status, _) = in_filtered_child(ThreadKind::Vcpu, duplicate);
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        let (status, _) = in_filtered_child(ThreadKind::Lifecycle, duplicate);
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        let (status, _) = in_filtered_child(ThreadKind::Api, duplicate);
        assert_killed_by_sigsys(status);
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_encoding() {
        // Values as the kernel headers compute them (checked with a C build).
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_SET_GSI_ROUTING, 0x4008_ae6a);
        assert_eq!(KVM_IOEVENTFD, 0x4040_ae79);
        assert_eq!(VHOST_GET_VRING_BASE, 0xc008_af12);
        assert_eq!(VHOST_VDPA_SET_STATUS, 0x4001_af72);
        assert_eq!(VHOST_VDPA_SET_CONFIG_CALL, 0x4004_af77);
        assert_eq!(VHOST_VDPA_SET_GROUP_ASID, 0x4008_af7c);
        assert_eq!(VHOST_VDPA_SUSPEND, 0xaf7d);
        assert_eq!(VHOST_VDPA_RESUME, 0xaf7e);
        assert_eq!(KVM_KVMCLOCK_CTRL, 0xaead);
        // From the kernel's headers (a C build of each _IO* macro).
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(KVM_GET_MSRS, 0xc008_ae88);
        assert_eq!(KVM_GET_LAPIC, 0x8400_ae8e);
        assert_eq!(KVM_GET_CPUID2, 0xc008_ae91);
        assert_eq!(KVM_GET_MP_STATE, 0x8004_ae98);
        assert_eq!(KVM_GET_VCPU_EVENTS, 0x8040_ae9f);
        assert_eq!(KVM_GET_XSAVE, 0x9000_aea4);
        assert_eq!(KVM_GET_XCRS, 0x8188_aea6);
        assert_eq!(KVM_GET_IRQCHIP, 0xc208_ae62);
        assert_eq!(KVM_GET_CLOCK, 0x8030_ae7c);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_SET_USER_MEMORY_REGION, 0x4020_ae46);
        // The sizes encoded in them are those of the structs kvm-ioctls passes.
        assert_eq!(std::mem::size_of::<kvm_bindings::kvm_regs>(), 144);
        assert_eq!(
            std::mem::size_of::<kvm_bindings::kvm_userspace_memory_region>(),
            32
        );
    }

    #[test]
    fn device_workers_may_not_issue_terminal_ioctls() {
        for kind in [
            ThreadKind::MemoryWorker,
            ThreadKind::IommuWorker,
            ThreadKind::NetControlWorker,
        ] {
            let (status, output) = in_filtered_child(kind, terminal_ioctl);
            assert_eq!(output, b"alive", "{kind:?}");
            assert_killed_by_sigsys(status);
        }
    }

    /// Distinct descriptors standing for the VM, vCPUs and vhost devices:
    /// each its own open of /dev/null, which answers ENOTTY to every KVM
    /// and vhost request, so a child that survives the call was let
    /// through by the filter. `dup` is a second number for `vm`'s file.
    struct Files {
        vm: std::fs::File,
        vcpu: std::fs::File,
        other_vcpu: std::fs::File,
        vhost: [std::fs::File; 2],
        dup: std::os::fd::OwnedFd,
    }

    impl Files {
        fn open() -> Files {
            let open = || std::fs::File::open("/dev/null").unwrap();
            let vm = open();
            let dup = std::os::fd::AsFd::as_fd(&vm).try_clone_to_owned().unwrap();
            Files {
                vm,
                vcpu: open(),
                other_vcpu: open(),
                vhost: [open(), open()],
                dup,
            }
        }

        fn fds(&self) -> FilterFds {
            use std::os::fd::AsRawFd;
            let vhost = self.vhost.iter().map(|f| f.as_raw_fd()).collect();
            FilterFds::new(self.vm.as_raw_fd(), vhost).for_vcpu(self.vcpu.as_raw_fd())
        }
    }

    /// Whether `kind`'s filter, bound to `fds`, lets `ioctl(target,
    /// request)` through; any other ending of the child fails the test.
    fn allows(kind: ThreadKind, fds: &FilterFds, target: RawFd, request: u64) -> bool {
        let (status, output) = in_bound_child(kind, fds, |pipe| {
            say_alive(pipe);
            // SAFETY: no pointer argument; /dev/null refuses the request
            // with ENOTTY if the filter lets it through.
            unsafe { libc::ioctl(target, request as libc::c_ulong, 0usize) };
        });
        assert_eq!(output, b"alive", "{kind:?} {request:#x} on {target}");
        if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
            return true;
        }
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "{kind:?} {request:#x} on {target}: status {status:#x}"
        );
        false
    }

    #[test]
    fn a_vcpu_thread_may_run_only_its_own_vcpu() {
        use std::os::fd::AsRawFd;
        let files = Files::open();
        let fds = files.fds();
        let vcpu = files.vcpu.as_raw_fd();
        assert!(allows(ThreadKind::Vcpu, &fds, vcpu, KVM_RUN));
        assert!(allows(ThreadKind::Vcpu, &fds, vcpu, KVM_GET_REGS));
        for other in [files.other_vcpu.as_raw_fd(), fds.vm, fds.vhost[0]] {
            assert!(
                !allows(ThreadKind::Vcpu, &fds, other, KVM_RUN),
                "fd {other}"
            );
        }
        // Only the vCPU threads run vCPUs.
        assert!(!allows(ThreadKind::Api, &fds, vcpu, KVM_RUN));
        assert!(!allows(ThreadKind::MemoryWorker, &fds, vcpu, KVM_RUN));
        assert!(!allows(ThreadKind::IommuWorker, &fds, vcpu, KVM_RUN));
    }

    #[test]
    fn vcpu_threads_program_the_vm_and_vhost_devices_on_their_descriptors_only() {
        use std::os::fd::AsRawFd;
        let files = Files::open();
        let fds = files.fds();
        let dup = files.dup.as_raw_fd();
        for request in [KVM_SET_GSI_ROUTING, KVM_IOEVENTFD] {
            assert!(allows(ThreadKind::Vcpu, &fds, fds.vm, request));
            assert!(
                !allows(ThreadKind::Vcpu, &fds, dup, request),
                "{request:#x} on a dup"
            );
            assert!(!allows(
                ThreadKind::Vcpu,
                &fds,
                files.vcpu.as_raw_fd(),
                request
            ));
        }
        for request in [VHOST_VDPA_SET_STATUS, VHOST_SET_VRING_KICK] {
            for vhost in &fds.vhost {
                assert!(allows(ThreadKind::Vcpu, &fds, *vhost, request));
            }
            assert!(!allows(ThreadKind::Vcpu, &fds, fds.vm, request));
        } // What a device is was asked at open: not from a running VM.
        let open_only = [
            ioc(IOC_READ, VHOST_VIRTIO, 0x70, 4), // VHOST_VDPA_GET_DEVICE_ID
            ioc(IOC_READ, VHOST_VIRTIO, 0x78, 16), // VHOST_VDPA_GET_IOVA_RANGE
            ioc(IOC_READ, VHOST_VIRTIO, 0x79, 4), // VHOST_VDPA_GET_CONFIG_SIZE
            ioc(IOC_READ, VHOST_VIRTIO, 0x7a, 4), // VHOST_VDPA_GET_AS_NUM
            ioc(IOC_READ, VHOST_VIRTIO, 0x80, 4), // VHOST_VDPA_GET_VQS_COUNT
            ioc(IOC_READ, VHOST_VIRTIO, 0x81, 4), // VHOST_VDPA_GET_GROUP_NUM
            ioc(IOC_WRITE, VHOST_VIRTIO, 0x25, 8), // VHOST_SET_BACKEND_FEATURES
        ];
        for request in open_only {
            for kind in [ThreadKind::Vcpu, ThreadKind::Vmm, ThreadKind::Api] {
                assert!(
                    !allows(kind, &fds, fds.vhost[0], request),
                    "{kind:?} {request:#x}"
                );
            }
        }
    }

    #[test]
    fn the_device_query_thread_may_only_read_queue_state_on_vhost_devices() {
        use std::os::fd::AsRawFd;
        let files = Files::open();
        let fds = files.fds();
        let kind = ThreadKind::DeviceQuery;
        let every_vhost_request = VHOST_FROM_VCPU.iter().chain(VHOST_FROM_API);
        for vhost in &fds.vhost {
            for &request in every_vhost_request.clone() {
                assert_eq!(
                    allows(kind, &fds, *vhost, request),
                    request == VHOST_GET_VRING_BASE,
                    "{request:#x} on {vhost}"
                );
            }
        }
        let dup = files.dup.as_raw_fd();
        assert!(!allows(kind, &fds, dup, VHOST_GET_VRING_BASE));
        assert!(!allows(kind, &fds, fds.vm, VHOST_GET_VRING_BASE));
        assert!(!allows(kind, &fds, fds.vm, KVM_SET_GSI_ROUTING));
        assert!(!allows(kind, &fds, files.vcpu.as_raw_fd(), KVM_RUN));
    }

    #[test]
    fn the_net_control_worker_may_only_enable_vrings_on_vhost_devices() {
        use std::os::fd::AsRawFd;
        let files = Files::open();
        let fds = files.fds();
        let kind = ThreadKind::NetControlWorker;
        let every_vhost_request = VHOST_FROM_VCPU.iter().chain(VHOST_FROM_API);
        for vhost in &fds.vhost {
            for &request in every_vhost_request.clone() {
                assert_eq!(
                    allows(kind, &fds, *vhost, request),
                    request == VHOST_VDPA_SET_VRING_ENABLE,
                    "{request:#x} on {vhost}"
                );
            }
        }
        let dup = files.dup.as_raw_fd();
        assert!(!allows(kind, &fds, dup, VHOST_VDPA_SET_VRING_ENABLE));
        assert!(!allows(kind, &fds, fds.vm, KVM_SET_GSI_ROUTING));
    }

    #[test]
    fn the_lifecycle_thread_may_stop_and_start_vhost_devices_and_nothing_on_kvm() {
        use std::os::fd::AsRawFd;
        let files = Files::open();
        let fds = files.fds();
        let kind = ThreadKind::Lifecycle;
        for vhost in &fds.vhost {
            for &request in VHOST_FROM_VCPU.iter().chain(VHOST_FROM_LIFECYCLE) {
                assert!(
                    allows(kind, &fds, *vhost, request),
                    "{request:#x} on {vhost}"
                );
            }
        }
        let dup = files.dup.as_raw_fd();
        assert!(!allows(kind, &fds, dup, VHOST_VDPA_SUSPEND));
        assert!(!allows(kind, &fds, fds.vm, KVM_SET_GSI_ROUTING));
        assert!(!allows(kind, &fds, fds.vm, KVM_SET_USER_MEMORY_REGION));
        assert!(!allows(kind, &fds, files.vcpu.as_raw_fd(), KVM_RUN));
        assert!(!allows(
            kind,
            &fds,
            files.vcpu.as_raw_fd(),
            KVM_KVMCLOCK_CTRL
        ));
        // The other threads may not suspend or resume a device.
        for other in [
            ThreadKind::Api,
            ThreadKind::DeviceQuery,
            ThreadKind::NetControlWorker,
        ] {
            for vhost in &fds.vhost {
                assert!(
                    !allows(other, &fds, *vhost, VHOST_VDPA_SUSPEND),
                    "{other:?}"
                );
                assert!(!allows(other, &fds, *vhost, VHOST_VDPA_RESUME), "{other:?}");
            }
        }
    }

    #[test]
    fn the_lifecycle_thread_may_write_a_snapshot_under_its_filter() {
        use crate::snapshot;
        use crate::vstate::memory::GuestRam;
        // Made before the filter: guest memory is a memfd, which no filtered
        // thread may create.
        let ram = GuestRam::new(8 << 20).unwrap();
        let dir = std::env::temp_dir().join(format!("microvm-seccomp-snap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let state = crate::snapshot::tests::state(8 << 20, Vec::new());
        let (status, output) = in_filtered_child(ThreadKind::Lifecycle, |pipe| {
            say_alive(pipe);
            if snapshot::write(&dir, &state, &ram).is_ok() {
                // SAFETY: writing a static buffer to the pipe we were given.
                unsafe { libc::write(pipe, b" written".as_ptr() as *const libc::c_void, 8) };
            }
        });
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        assert_eq!(output, b"alive written");
        assert_eq!(
            std::fs::metadata(dir.join("memory")).unwrap().len(),
            8 << 20
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_lifecycle_thread_may_hand_the_vm_over_under_its_filter() {
        use crate::snapshot::handoff;
        use crate::vstate::memory::GuestRam;
        use std::time::Duration;
        let ram = GuestRam::new(8 << 20).unwrap();
        let socket =
            std::env::temp_dir().join(format!("microvm-seccomp-update-{}", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        let listener = handoff::listen(&socket).unwrap();
        let state = crate::snapshot::tests::state(8 << 20, vec![crate::snapshot::tests::vcpu(0)]);
        let taker = {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut incoming =
                    handoff::receive(&listener, &socket, Duration::from_secs(10)).unwrap();
                incoming.ready().unwrap();
                incoming.memory.metadata().unwrap().len()
            })
        };
        let (status, output) = in_filtered_child(ThreadKind::Lifecycle, |pipe| {
            say_alive(pipe);
            let sent = handoff::send(
                &socket,
                &state,
                (&ram.boot_file, None),
                1,
                Duration::from_secs(10),
            );
            if sent.is_ok() {
                // SAFETY: writing a static buffer to the pipe we were given.
                unsafe { libc::write(pipe, b" sent".as_ptr() as *const libc::c_void, 5) };
            }
        });
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        assert_eq!(output, b"alive sent");
        assert_eq!(taker.join().unwrap(), 8 << 20);
        std::fs::remove_file(&socket).unwrap();
    }

    #[test]
    fn a_vcpu_may_read_its_own_state_and_the_lifecycle_thread_the_vms() {
        use std::os::fd::AsRawFd;
        // (A forked child cannot make real KVM requests, whose mm must be
        // the VM creator's: the filter is checked on stand-ins, as above.)
        let files = Files::open();
        let fds = files.fds();
        let (vcpu, other) = (files.vcpu.as_raw_fd(), files.other_vcpu.as_raw_fd());
        for &request in &VCPU_OWN[3..] {
            assert!(
                allows(ThreadKind::Vcpu, &fds, vcpu, request),
                "{request:#x}"
            );
            assert!(
                !allows(ThreadKind::Vcpu, &fds, other, request),
                "{request:#x}"
            );
            assert!(
                !allows(ThreadKind::Lifecycle, &fds, vcpu, request),
                "{request:#x}"
            );
        }
        for &request in VM_FROM_LIFECYCLE {
            assert!(
                allows(ThreadKind::Lifecycle, &fds, fds.vm, request),
                "{request:#x}"
            );
            assert!(
                !allows(ThreadKind::Api, &fds, fds.vm, request),
                "{request:#x}"
            );
            assert!(
                !allows(ThreadKind::Vcpu, &fds, fds.vm, request),
                "{request:#x}"
            );
        }
    }

    #[test]
    fn the_api_thread_may_only_read_vhost_state_on_vhost_devices() {
        use std::os::fd::AsRawFd;
        let files = Files::open();
        let fds = files.fds();
        for vhost in &fds.vhost {
            assert!(allows(ThreadKind::Api, &fds, *vhost, VHOST_VDPA_GET_STATUS));
            // Queue state is a round trip to the device (VDUSE: to its
            // process): only the device query thread asks for it.
            assert!(!allows(ThreadKind::Api, &fds, *vhost, VHOST_GET_VRING_BASE));
            assert!(!allows(
                ThreadKind::Api,
                &fds,
                *vhost,
                VHOST_VDPA_SET_STATUS
            ));
        }
        let dup = files.dup.as_raw_fd();
        assert!(!allows(ThreadKind::Api, &fds, dup, VHOST_VDPA_GET_STATUS));
        assert!(!allows(ThreadKind::Api, &fds, fds.vm, KVM_SET_GSI_ROUTING));
    }

    #[test]
    fn only_the_memory_worker_may_set_memory_regions_or_punch_holes() {
        let files = Files::open();
        let fds = files.fds();
        let region = KVM_SET_USER_MEMORY_REGION;
        assert!(allows(ThreadKind::MemoryWorker, &fds, fds.vm, region));
        assert!(!allows(ThreadKind::IommuWorker, &fds, fds.vm, region));
        let (status, output) = in_filtered_child(ThreadKind::MemoryWorker, punch_hole);
        assert_eq!(output, b"alive");
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "status {status:#x}"
        );
        let (status, output) = in_filtered_child(ThreadKind::IommuWorker, punch_hole);
        assert_eq!(output, b"alive");
        assert_killed_by_sigsys(status);
    }

    /// fallocate(PUNCH_HOLE) on the pipe: the kernel refuses it (ESPIPE)
    /// when the filter lets it through.
    fn punch_hole(fd: libc::c_int) {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: writing a static buffer to the pipe we were given, then
        // fallocate(2) on it, which takes no pointers.
        unsafe {
            libc::write(fd, b"alive".as_ptr() as *const libc::c_void, 5);
            libc::fallocate(fd, mode, 0, 4096);
        }
    }

    #[test]
    fn the_memory_worker_may_set_memory_regions_on_the_vm_only() {
        use std::os::fd::AsRawFd;
        let files = Files::open();
        let fds = files.fds();
        let region = KVM_SET_USER_MEMORY_REGION;
        assert!(allows(ThreadKind::MemoryWorker, &fds, fds.vm, region));
        assert!(!allows(
            ThreadKind::MemoryWorker,
            &fds,
            files.dup.as_raw_fd(),
            region
        ));
        assert!(!allows(
            ThreadKind::MemoryWorker,
            &fds,
            fds.vhost[0],
            region
        ));
        assert!(!allows(
            ThreadKind::MemoryWorker,
            &fds,
            fds.vm,
            KVM_SET_GSI_ROUTING
        ));
        // Nobody else changes the guest's memory map once running.
        assert!(!allows(ThreadKind::Vcpu, &fds, fds.vm, region));
        assert!(!allows(ThreadKind::Api, &fds, fds.vm, region));
    }

    #[test]
    fn a_vcpu_filter_needs_its_vcpu_descriptor() {
        let fds = FilterFds::new(900, vec![]);
        assert!(matches!(
            filter(ThreadKind::Vcpu, &fds),
            Err(SeccompError::Build(ThreadKind::Vcpu, _))
        ));
        assert!(filter(ThreadKind::Vcpu, &fds.for_vcpu(901)).is_ok());
    }

    fn stdin_terminal_ioctl(fd: libc::c_int) {
        let mut size: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: a valid pointer to a winsize; the kernel answers ENOTTY
        // when stdin is no terminal.
        unsafe {
            libc::write(fd, b"alive".as_ptr() as *const libc::c_void, 5);
            libc::ioctl(libc::STDIN_FILENO, libc::TIOCGWINSZ, &mut size);
        }
    }

    #[test]
    fn the_vmm_thread_may_query_the_terminal_on_stdin_only() {
        let (status, output) = in_filtered_child(ThreadKind::Vmm, stdin_terminal_ioctl);
        assert_eq!(output, b"alive");
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "status {status:#x}"
        );
        let (status, output) = in_filtered_child(ThreadKind::Vmm, terminal_ioctl);
        assert_eq!(output, b"alive");
        assert_killed_by_sigsys(status);
    }
}
