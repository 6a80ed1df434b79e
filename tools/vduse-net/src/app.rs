//! Life cycle: create the VDUSE device, attach it to the vdpa bus (on a helper thread,
//! so the main thread keeps answering the kernel's requests), serve it, and on a signal
//! or a fatal error detach and destroy it.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{Backend, Server};
use crate::log;
use crate::net::{self, QUEUE_MAX_SIZE, VIRTIO_ID_NET};
use crate::tap::{Tap, TapError};
use crate::vduse::{self, Control, Device, VduseError};
use vdpa_mgmt::netlink::NetlinkError;
use vdpa_mgmt::node::{self, NodeError};
use vdpa_mgmt::vdpa;

/// Where the device's frames go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendConfig {
    Tap(String),
    Loopback,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub name: String,
    pub mac: [u8; 6],
    pub backend: BackendConfig,
    pub iotlb_dump: Option<PathBuf>,
    /// Refuse the Nth VDUSE_UPDATE_IOTLB request (fault injection).
    pub fail_iotlb: Option<u64>,
    /// Queue pairs (1 to net::MAX_PAIRS).
    pub queues: u16,
    /// Where per-queue counters are written about once a second.
    pub stats: Option<PathBuf>,
}

#[derive(Debug, Error)]
pub enum AppError {
    #[error(transparent)]
    Vduse(#[from] VduseError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        source: io::Error,
    },
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("{0}")]
    Fatal(String),
}

fn os_err(what: &'static str) -> AppError {
    AppError::Os {
        what,
        source: io::Error::last_os_error(),
    }
}

/// Blocks SIGTERM, SIGINT and SIGUSR1 (in this thread and every thread it spawns later)
/// and returns a signalfd that reports them.
fn signal_fd() -> Result<OwnedFd, AppError> {
    // SAFETY: an all-zero sigset_t is a valid value to initialise with sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigemptyset/sigaddset only write into the local `set`.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGUSR1);
    }
    // SAFETY: pthread_sigmask reads the local `set`; the old mask is not requested.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(AppError::Os {
            what: "pthread_sigmask",
            source: io::Error::from_raw_os_error(r),
        });
    }
    // SAFETY: signalfd reads the local `set` and returns a new descriptor (or -1).
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if fd < 0 {
        return Err(os_err("signalfd"));
    }
    // SAFETY: `fd` is a new descriptor owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads one pending signal number from the signalfd.
fn read_signal(fd: &OwnedFd) -> Option<u32> {
    // SAFETY: signalfd_siginfo is plain old data; all-zero is a valid value.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = size_of::<libc::signalfd_siginfo>();
    // SAFETY: read writes at most `size` bytes into the local `info`.
    let n = unsafe {
        libc::read(
            fd.as_raw_fd(),
            &mut info as *mut libc::signalfd_siginfo as *mut libc::c_void,
            size,
        )
    };
    (n == size as isize).then_some(info.ssi_signo)
}

/// Lets the process keep one fd per IOTLB mapping (vm-memory keeps the file open).
fn raise_nofile_limit() {
    // SAFETY: all-zero rlimit is valid; getrlimit/setrlimit read/write only the local.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

enum Done {
    Attached(Result<String, AppError>),
    Detached(Result<(), AppError>),
}

/// Runs `f` on a helper thread; its result arrives on `tx` and `ev` fires.
fn aside(tx: &mpsc::Sender<Done>, ev: &EventFd, f: impl FnOnce() -> Done + Send + 'static) {
    let tx = tx.clone();
    let ev = ev.try_clone();
    thread::spawn(move || {
        let r = f();
        let _ = tx.send(r);
        if let Ok(ev) = ev {
            let _ = ev.write(1);
        }
    });
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Attaching,
    Running,
    Detaching,
    Done,
}

/// How often the server's tick runs (at most this long between two).
const TICK_MS: libc::c_int = 100;

fn poll_in(fds: &mut [libc::pollfd]) -> Result<(), AppError> {
    // SAFETY: poll reads and writes `fds.len()` pollfd structures in the slice we own.
    // A tick bounds every wait: queue readiness and --stats are looked at on it.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, TICK_MS) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(AppError::Os {
                what: "poll",
                source: e,
            });
        }
    }
    Ok(())
}

fn pfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Creates, attaches, serves and finally removes the device. `Ok` after a clean
/// shutdown on SIGTERM/SIGINT, `Err` with the reason otherwise.
pub fn run(cfg: Config) -> Result<(), AppError> {
    let sigfd = signal_fd()?;
    raise_nofile_limit();

    let backend = match &cfg.backend {
        BackendConfig::Tap(ifname) if cfg.queues > 1 => {
            let taps = Tap::create_multi(ifname, cfg.queues)?;
            let name = taps
                .first()
                .map(|t| t.name().to_string())
                .unwrap_or_default();
            log(&format!("tap {name} is up with {} queues", taps.len()));
            Backend::Tap(taps)
        }
        BackendConfig::Tap(ifname) => {
            let t = Tap::create(ifname)?;
            log(&format!("tap {} is up", t.name()));
            Backend::Tap(vec![t])
        }
        BackendConfig::Loopback => Backend::Loopback,
    };

    let control = Control::open()?;
    control.set_api_version(vduse::API_VERSION)?;
    let features = net::device_features(cfg.queues);
    let dev_config = vduse::encode_dev_config(
        &cfg.name,
        VIRTIO_ID_NET,
        features,
        u32::from(cfg.queues) * 2,
        4096,
        &net::net_config(cfg.mac, cfg.queues),
    )?;
    control.create_dev(&dev_config).map_err(|e| match e {
        VduseError::Ioctl { source, .. } if source.raw_os_error() == Some(libc::EEXIST) => {
            AppError::Fatal(format!(
                "a VDUSE device named {} already exists (another vduse-net running?)",
                cfg.name
            ))
        }
        e => e.into(),
    })?;
    log(&format!(
        "created VDUSE device {} (features {features:#x}, {} queue pairs, mac {})",
        cfg.name,
        cfg.queues,
        cfg.mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    ));

    let result = serve(&cfg, backend, &sigfd);

    // The device node must be closed (serve dropped it) and the vdpa device gone
    // before VDUSE_DESTROY_DEV succeeds; the vdpa device is released asynchronously.
    let deadline = Instant::now() + Duration::from_secs(5);
    let destroyed = loop {
        match control.destroy_dev(&cfg.name) {
            Ok(()) => break Ok(()),
            Err(VduseError::Ioctl { source, .. })
                if source.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
            {
                thread::sleep(Duration::from_millis(50));
            }
            Err(e) => break Err(e),
        }
    };
    match &destroyed {
        Ok(()) => log(&format!("destroyed VDUSE device {}", cfg.name)),
        Err(e) => log(&format!("cannot destroy VDUSE device {}: {e}", cfg.name)),
    }
    result?;
    destroyed.map_err(AppError::from)
}

fn serve(cfg: &Config, backend: Backend, sigfd: &OwnedFd) -> Result<(), AppError> {
    let dev = Device::open(&cfg.name, Duration::from_secs(5))?;
    for i in 0..u32::from(cfg.queues) * 2 {
        dev.vq_setup(i, QUEUE_MAX_SIZE)?;
    }
    let mut server = Server::new(
        dev,
        backend,
        cfg.queues,
        cfg.iotlb_dump.clone(),
        cfg.fail_iotlb,
        cfg.stats.clone(),
    );
    server.write_initial_dump();

    let done_ev = EventFd::new(EFD_NONBLOCK).map_err(|source| AppError::Os {
        what: "eventfd",
        source,
    })?;
    let (tx, rx) = mpsc::channel::<Done>();
    let name = cfg.name.clone();
    aside(&tx, &done_ev, move || {
        let r = vdpa::vdpa_dev_new("vduse", &name)
            .map_err(AppError::from)
            .and_then(|()| {
                node::wait_vhost_node(&name, Duration::from_secs(10))
                    .map(|p| p.display().to_string())
                    .map_err(AppError::from)
            });
        Done::Attached(r)
    });

    let mut phase = Phase::Attaching;
    let mut attached = false;
    let mut stop_requested = false;
    let mut failure: Option<AppError> = None;
    let mut dev_broken = false;

    while phase != Phase::Done {
        if stop_requested && phase == Phase::Running {
            if attached {
                let name = cfg.name.clone();
                aside(&tx, &done_ev, move || {
                    Done::Detached(vdpa::vdpa_dev_del(&name).map_err(AppError::from))
                });
                phase = Phase::Detaching;
            } else {
                phase = Phase::Done;
                continue;
            }
        }

        let mut fds = vec![
            pfd(sigfd.as_raw_fd()),
            pfd(done_ev.as_raw_fd()),
            pfd(if dev_broken { -1 } else { server.device_fd() }),
        ];
        let kicks = server.kick_fds();
        fds.extend(kicks.iter().map(|&(_, fd)| pfd(fd)));
        let taps = server.tap_fds();
        fds.extend(taps.iter().map(|&(_, fd)| pfd(fd)));
        poll_in(&mut fds)?;

        if fds[0].revents != 0 {
            while let Some(sig) = read_signal(sigfd) {
                if sig == libc::SIGUSR1 as u32 {
                    log(&server.stats_line());
                } else if !stop_requested {
                    let what = if sig == libc::SIGINT as u32 {
                        "SIGINT"
                    } else {
                        "SIGTERM"
                    };
                    log(&format!("{what}: shutting down"));
                    stop_requested = true;
                }
            }
        }
        if fds[1].revents != 0 {
            let _ = done_ev.read();
            while let Ok(done) = rx.try_recv() {
                match done {
                    Done::Attached(Ok(node)) => {
                        attached = true;
                        phase = Phase::Running;
                        let mut out = io::stdout().lock();
                        let _ = writeln!(out, "vduse-net: {} ready at {node}", cfg.name);
                        let _ = out.flush();
                    }
                    Done::Attached(Err(e)) => {
                        // DEV_NEW may have succeeded before the wait failed.
                        attached =
                            Path::new(&format!("/sys/bus/vdpa/devices/{}", cfg.name)).exists();
                        phase = Phase::Running;
                        stop_requested = true;
                        failure.get_or_insert(e);
                    }
                    Done::Detached(r) => {
                        match r {
                            Ok(()) => log(&format!("detached {} from the vdpa bus", cfg.name)),
                            Err(e) => {
                                failure.get_or_insert(e);
                            }
                        }
                        phase = Phase::Done;
                    }
                }
            }
        }
        if fds[2].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            failure.get_or_insert(AppError::Fatal(
                "the VDUSE device is broken (a request timed out?)".into(),
            ));
            stop_requested = true;
            dev_broken = true;
            if phase == Phase::Detaching {
                // Nothing more can be answered; the detach thread finishes on its own.
                phase = Phase::Done;
            }
            continue;
        }
        if fds[2].revents & libc::POLLIN != 0 {
            if let Err(e) = server.handle_requests() {
                failure.get_or_insert(e.into());
                stop_requested = true;
                if phase == Phase::Detaching {
                    phase = Phase::Done;
                }
                continue;
            }
        }
        for (k, &(index, _)) in kicks.iter().enumerate() {
            if fds[3 + k].revents != 0 {
                server.on_kick(index);
            }
        }
        for (k, &(pair, _)) in taps.iter().enumerate() {
            if fds.get(3 + kicks.len() + k).is_some_and(|f| f.revents != 0) {
                server.on_tap(pair);
            }
        }
        server.on_tick();
    }
    server.write_stats();
    log(&server.stats_line());
    drop(server);
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
