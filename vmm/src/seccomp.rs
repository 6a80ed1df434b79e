//! Seccomp filters, one per thread kind, kept as data: the syscalls each
//! thread needs once the VM is built. Anything else traps; the SIGSYS
//! handler names the syscall on stderr and ends the VMM.

use std::collections::BTreeMap;

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
/// struct kvm_irq_routing (header; entries follow).
const KVM_SET_GSI_ROUTING: u64 = ioc(IOC_WRITE, KVMIO, 0x6a, 8);
/// struct kvm_ioeventfd.
const KVM_IOEVENTFD: u64 = ioc(IOC_WRITE, KVMIO, 0x79, 64);
/// struct kvm_userspace_memory_region (kvm-ioctls' set_user_memory_region).
const KVM_SET_USER_MEMORY_REGION: u64 = ioc(IOC_WRITE, KVMIO, 0x46, 32);
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
    /// A device worker serving a guest queue and programming IOTLBs: the
    /// virtio-mem worker (which also releases unplugged memory) and the
    /// virtio-iommu request worker.
    DeviceWorker,
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

/// Device workers wait on their queue; virtio-mem's releases unplugged blocks.
const DEVICE_WORKER_ONLY: &[Allowed] = &[
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

const VMM_ONLY: &[Allowed] = &[
    (libc::SYS_epoll_wait, &[]),
    (libc::SYS_epoll_pwait, &[]),
    (libc::SYS_epoll_ctl, &[]),
];

/// vCPU threads duplicate descriptors: EventFd::try_clone hands a device
/// its kick and call fds when the guest starts it.
const VCPU_ONLY: &[Allowed] = &[(libc::SYS_fcntl, &[&[eq(1, libc::F_DUPFD_CLOEXEC as u32)]])];

/// The ioctl requests a thread may make. vCPU threads run device
/// emulation: a guest write can reprogram MSI-X routes, move a BAR (its
/// ioeventfds), or start and reset a vhost-vdpa device. Requests are
/// matched by number; the descriptor is not known when filters are built,
/// except for the terminal (see `ioctl_fd`).
fn ioctl_rules(kind: ThreadKind) -> Vec<u64> {
    match kind {
        ThreadKind::Vmm => vec![TCGETS, TCSETS, TIOCGWINSZ],
        ThreadKind::Api => vec![VHOST_GET_VRING_BASE, VHOST_VDPA_GET_STATUS],
        // virtio-mem gives each plugged block a KVM slot and takes it back.
        ThreadKind::DeviceWorker => vec![KVM_SET_USER_MEMORY_REGION],
        ThreadKind::Vcpu => vec![
            KVM_RUN,
            KVM_SET_GSI_ROUTING,
            KVM_IOEVENTFD,
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
        ],
    }
}

/// The one descriptor a thread's ioctls may target, when there is one:
/// the VMM thread only puts the terminal on stdin in raw mode and back.
fn ioctl_fd(kind: ThreadKind) -> Option<libc::c_int> {
    match kind {
        ThreadKind::Vmm => Some(libc::STDIN_FILENO),
        _ => None,
    }
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

/// Compiles the filter for one kind of thread.
pub fn filter(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    prepare_malloc();
    let error = |e: &dyn std::fmt::Display| SeccompError::Build(kind, e.to_string());
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let extra: &[Allowed] = match kind {
        ThreadKind::Vmm => VMM_ONLY,
        ThreadKind::Api => API_ONLY,
        ThreadKind::DeviceWorker => DEVICE_WORKER_ONLY,
        ThreadKind::Vcpu => VCPU_ONLY,
    };
    add(&mut rules, COMMON).map_err(|e| error(&e))?;
    add(&mut rules, extra).map_err(|e| error(&e))?;
    let ioctls = ioctl_rules(kind)
        .into_iter()
        .map(|request| {
            let mut conditions = vec![SeccompCondition::new(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                request,
            )?];
            if let Some(fd) = ioctl_fd(kind) {
                conditions.push(SeccompCondition::new(
                    0,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::Eq,
                    fd as u64,
                )?);
            }
            SeccompRule::new(conditions)
        })
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

    /// Runs `body` in a forked child under `kind`'s filter; returns the
    /// child's wait status and what it wrote to the pipe.
    fn in_filtered_child(kind: ThreadKind, body: fn(libc::c_int)) -> (libc::c_int, Vec<u8>) {
        let program = filter(kind).unwrap();
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

    const EVERY_KIND: [ThreadKind; 4] = [
        ThreadKind::Vmm,
        ThreadKind::Vcpu,
        ThreadKind::Api,
        ThreadKind::DeviceWorker,
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
    fn only_vcpu_threads_may_duplicate_descriptors() {
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
        let (status, _) = in_filtered_child(ThreadKind::Api, duplicate);
        assert_killed_by_sigsys(status);
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_encoding() {
        // Values as the kernel headers compute them (checked with a C build).
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_SET_GSI_ROUTING, 0x4008_ae6a);
        assert_eq!(KVM_IOEVENTFD, 0x4040_ae79);
        assert_eq!(KVM_SET_USER_MEMORY_REGION, 0x4020_ae46);
        assert_eq!(VHOST_GET_VRING_BASE, 0xc008_af12);
        assert_eq!(VHOST_VDPA_SET_STATUS, 0x4001_af72);
        assert_eq!(VHOST_VDPA_SET_CONFIG_CALL, 0x4004_af77);
    }

    /// KVM_SET_USER_MEMORY_REGION with a zeroed region, on the pipe: the
    /// kernel answers ENOTTY if the filter lets it through.
    fn memory_slot_ioctl(fd: libc::c_int) {
        let region = kvm_bindings::kvm_userspace_memory_region::default();
        // SAFETY: a valid pointer to a region struct that outlives the call.
        unsafe {
            libc::write(fd, b"alive".as_ptr() as *const libc::c_void, 5);
            libc::ioctl(fd, KVM_SET_USER_MEMORY_REGION as _, &region);
        }
    }

    #[test]
    fn the_hotplug_thread_may_set_memory_slots_and_issue_no_other_ioctl() {
        let (status, output) = in_filtered_child(ThreadKind::DeviceWorker, memory_slot_ioctl);
        assert_eq!(output, b"alive");
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "status {status:#x}"
        );
        let (status, output) = in_filtered_child(ThreadKind::DeviceWorker, terminal_ioctl);
        assert_eq!(output, b"alive");
        assert_killed_by_sigsys(status);
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
