//! Live update: a VM handed by one VMM process to a new one on the same
//! host, guest memory not copied but passed as its memfd.
//!
//! KVM and vhost descriptors cannot move: KVM answers only the process
//! whose mm created the VM, and a vhost-vdpa device only its owner (the
//! opener's mm, VHOST_SET_OWNER). So the new process creates its own VM over
//! the same memory and opens each device once the old one has let go of it;
//! what moves is the state and the memory file.
//!
//! On a unix stream socket the new process listens on:
//! 1. old → new: one 16-byte message, the state's length and when the VM
//!    was paused (microseconds since the Unix epoch, both u64 LE), carrying
//!    the boot RAM memfd (SCM_RIGHTS); then the state, as a state file holds
//!    it (header line, JSON), checked the same way.
//! 2. new → old: one line, `ready` once the new process holds the memory
//!    and has checked the state (the old one then answers its client and
//!    exits, which lets go of the devices), or `refused: REASON`.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::file::{self, StateFileError};
use super::{check_vcpu_ids, SnapshotError, VmSnapshot};

/// What the new process answers once it can take the VM.
const READY: &str = "ready";
/// The longest answer line read.
const MAX_ANSWER: u64 = 4096;
const FRAME: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{0}: no VMM handed over a VM within {1:?}")]
    NoVmm(PathBuf, Duration),
    #[error("{0}: the other side did not send the memory files the state needs")]
    NoMemory(PathBuf),
    #[error("{0}: the other side closed the connection before it said it was ready")]
    Gone(PathBuf),
    #[error("{path}: the new VMM refused the VM: {reason}")]
    Refused { path: PathBuf, reason: String },
    #[error("{path}: the new VMM answered '{answer}'")]
    Unexpected { path: PathBuf, answer: String },
    #[error(transparent)]
    State(#[from] StateFileError),
    #[error(transparent)]
    Snapshot(#[from] Box<SnapshotError>),
}

fn io<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> HandoffError + 'a {
    move |source| HandoffError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

/// Sends the paused VM's `state`, its boot RAM file and its hotplug
/// region's file (if it has one) to the VMM
/// listening on `socket`, and waits (at most `bound` for each step) until
/// it says it is ready to take the VM. Returns the state's size. On an
/// error the new VMM has not taken the VM: the caller still has it.
pub fn send(
    socket: &Path,
    state: &VmSnapshot,
    (memory, hotplug): (&File, Option<&File>),
    paused_at_us: u64,
    bound: Duration,
) -> Result<u64, HandoffError> {
    let bytes = file::encode(state, socket)?;
    let length = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    let stream = UnixStream::connect(socket).map_err(io(socket, "cannot connect"))?;
    stream
        .set_write_timeout(Some(bound))
        .and_then(|()| stream.set_read_timeout(Some(bound)))
        .map_err(io(socket, "cannot bound the connection"))?;
    let mut frame = [0u8; FRAME];
    frame[..8].copy_from_slice(&length.to_le_bytes());
    frame[8..].copy_from_slice(&paused_at_us.to_le_bytes());
    let fds: Vec<std::os::fd::RawFd> = std::iter::once(memory.as_raw_fd())
        .chain(hotplug.map(AsRawFd::as_raw_fd))
        .collect();
    let sent = stream
        .send_with_fds(&[&frame[..]], &fds)
        .map_err(|e| HandoffError::Io {
            path: socket.to_path_buf(),
            what: "cannot send the memory file",
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
    if sent != FRAME {
        return Err(HandoffError::Gone(socket.to_path_buf()));
    }
    (&stream)
        .write_all(&bytes)
        .map_err(io(socket, "cannot send the state"))?;
    let mut answer = String::new();
    BufReader::new((&stream).take(MAX_ANSWER))
        .read_line(&mut answer)
        .map_err(io(socket, "no answer from the new VMM"))?;
    match answer.trim_end() {
        "" => Err(HandoffError::Gone(socket.to_path_buf())),
        READY => Ok(length),
        other => match other.strip_prefix("refused: ") {
            Some(reason) => Err(HandoffError::Refused {
                path: socket.to_path_buf(),
                reason: reason.to_string(),
            }),
            None => Err(HandoffError::Unexpected {
                path: socket.to_path_buf(),
                answer: other.chars().take(200).collect(),
            }),
        },
    }
}

/// A VM handed over, not yet acknowledged.
pub struct Incoming {
    pub state: VmSnapshot,
    pub memory: File,
    /// The hotplug region's memory file, if the VM has one.
    pub hotplug_memory: Option<File>,
    pub paused_at_us: u64,
    /// The state's size.
    pub state_bytes: u64,
    /// The old VMM's process: it lets go of the devices by exiting.
    pub sender_pid: libc::pid_t,
    stream: UnixStream,
    path: PathBuf,
}

/// Listens on `socket` (a path that must not exist) for the old VMM.
pub fn listen(socket: &Path) -> Result<UnixListener, HandoffError> {
    UnixListener::bind(socket).map_err(io(socket, "cannot listen"))
}

/// Waits up to `bound` for a VMM to connect to `listener` (at `socket`)
/// and hand over its VM; checks the state as a restore does, and that the
/// memory file holds all of the VM's RAM.
pub fn receive(
    listener: &UnixListener,
    socket: &Path,
    bound: Duration,
) -> Result<Incoming, HandoffError> {
    wait_readable(listener.as_raw_fd(), bound)
        .map_err(io(socket, "cannot wait for the old VMM"))?;
    let Some(stream) = accept_ready(listener, socket)? else {
        return Err(HandoffError::NoVmm(socket.to_path_buf(), bound));
    };
    stream
        .set_read_timeout(Some(bound))
        .and_then(|()| stream.set_write_timeout(Some(bound)))
        .map_err(io(socket, "cannot bound the connection"))?;
    let mut frame = [0u8; FRAME];
    let (read, mut files) = receive_files(&stream, &mut frame)
        .map_err(io(socket, "cannot receive the memory files"))?;
    if read != FRAME {
        return Err(HandoffError::Gone(socket.to_path_buf()));
    }
    let hotplug_memory = (files.len() > 1).then(|| files.remove(1));
    let memory = files
        .into_iter()
        .next()
        .ok_or_else(|| HandoffError::NoMemory(socket.to_path_buf()))?;
    let word = |range: std::ops::Range<usize>| {
        frame
            .get(range)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map_or(0, u64::from_le_bytes)
    };
    let (state_bytes, paused_at_us) = (word(0..8), word(8..16));
    let state: VmSnapshot = file::decode((&stream).take(state_bytes), socket, Some(state_bytes))?;
    check_vcpu_ids(&state.vcpus).map_err(Box::new)?;
    let holds = memory
        .metadata()
        .map_err(io(socket, "cannot read the memory file's size"))?
        .len();
    if holds < state.memory_bytes {
        return Err(Box::new(SnapshotError::MemorySize {
            path: socket.to_path_buf(),
            expected: state.memory_bytes,
            found: holds,
        })
        .into());
    }
    if state.hotplug.is_some() != hotplug_memory.is_some() {
        return Err(HandoffError::NoMemory(socket.to_path_buf()));
    }
    let sender_pid = peer_pid(&stream).map_err(io(socket, "cannot tell who connected"))?;
    Ok(Incoming {
        state,
        memory,
        hotplug_memory,
        paused_at_us,
        state_bytes,
        sender_pid,
        stream,
        path: socket.to_path_buf(),
    })
}

impl Incoming {
    /// Tells the old VMM to let go of the VM: from here on it is ours.
    pub fn ready(&mut self) -> Result<(), HandoffError> {
        (&self.stream)
            .write_all(format!("{READY}\n").as_bytes())
            .map_err(io(&self.path, "cannot tell the old VMM it may go"))
    }

    /// Tells the old VMM why the VM is not taken: it keeps running it.
    pub fn refuse(&mut self, reason: &str) {
        let line: String = reason.chars().filter(|c| *c != '\n').collect();
        let _ = (&self.stream).write_all(format!("refused: {line}\n").as_bytes());
    }
}

/// Receives `frame` and up to two descriptors with it, each owned by the
/// returned files.
fn receive_files(stream: &UnixStream, frame: &mut [u8]) -> std::io::Result<(usize, Vec<File>)> {
    let mut fds = [-1; 2];
    let mut iovecs = [libc::iovec {
        iov_base: frame.as_mut_ptr().cast(),
        iov_len: frame.len(),
    }];
    // SAFETY: `iovecs` describes `frame`, which is exclusively borrowed
    // and outlives the call; `fds` has room for the two descriptors asked
    // for, and each one the call reports is a new descriptor we own.
    let (read, count) = unsafe { stream.recv_with_fds(&mut iovecs, &mut fds) }
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    let files = fds
        .iter()
        .take(count)
        .filter(|&&fd| fd >= 0)
        // SAFETY: see above: each received descriptor is ours alone.
        .map(|&fd| unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
        .collect();
    Ok((read, files))
}

/// The process at the other end of `stream` (SO_PEERCRED).
fn peer_pid(stream: &UnixStream) -> std::io::Result<libc::pid_t> {
    let mut credentials = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut length = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `length` bytes, one `ucred`, into
    // `credentials`, which is exclusively borrowed for the call; `length`
    // says its size. The descriptor is our open socket.
    let ret = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut credentials as *mut libc::ucred).cast(),
            &mut length,
        )
    };
    match ret {
        0 => Ok(credentials.pid),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Waits up to `bound` for process `pid` to exit (its descriptors, the
/// vhost-vdpa devices among them, are closed by then). False if it did
/// not; true if it is gone or cannot be watched because it is gone.
pub fn wait_for_exit(pid: libc::pid_t, bound: Duration) -> std::io::Result<bool> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new
    // descriptor or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let error = std::io::Error::last_os_error();
        return match error.raw_os_error() {
            Some(libc::ESRCH) => Ok(true),
            _ => Err(error),
        };
    }
    let fd = libc::c_int::try_from(fd).map_err(|_| std::io::Error::other("pidfd out of range"))?;
    // SAFETY: `fd` is the new pidfd, owned by nobody else.
    let pidfd = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    wait_readable(pidfd.as_raw_fd(), bound)
}

/// Waits until `fd` is readable (true) or `bound` passes (false).
fn wait_readable(fd: std::os::fd::RawFd, bound: Duration) -> std::io::Result<bool> {
    let mut fds = [libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }];
    let timeout = libc::c_int::try_from(bound.as_millis()).unwrap_or(libc::c_int::MAX);
    loop {
        // SAFETY: `fds` is one valid, exclusively borrowed pollfd, and its
        // length is passed along.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 1, timeout) };
        match ready {
            0 => return Ok(false),
            1.. => return Ok(true),
            _ => {
                let error = std::io::Error::last_os_error();
                if error.kind() != std::io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
        }
    }
}

/// The connection waiting on `listener`, if one is.
fn accept_ready(
    listener: &UnixListener,
    socket: &Path,
) -> Result<Option<UnixStream>, HandoffError> {
    listener
        .set_nonblocking(true)
        .map_err(io(socket, "cannot poll the socket"))?;
    match listener.accept() {
        Ok((stream, _)) => {
            stream
                .set_nonblocking(false)
                .map_err(io(socket, "cannot use the connection"))?;
            Ok(Some(stream))
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(io(socket, "cannot accept")(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::GuestRam;
    use vm_memory::{Bytes, GuestAddress};

    fn state(memory_bytes: u64) -> VmSnapshot {
        crate::snapshot::tests::state(memory_bytes, vec![crate::snapshot::tests::vcpu(0)])
    }

    fn socket(name: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("microvm-handoff-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        path
    }

    #[test]
    fn the_state_and_the_memory_file_arrive_and_the_sender_waits_for_ready() {
        let path = socket("ok");
        let listener = listen(&path).unwrap();
        let ram = GuestRam::new(8 << 20).unwrap();
        ram.memory
            .write_obj(0x1234_5678u32, GuestAddress(0x1000))
            .unwrap();
        let sent = std::thread::scope(|s| {
            let sender = s.spawn(|| {
                send(
                    &path,
                    &state(8 << 20),
                    (&ram.boot_file, None),
                    42,
                    Duration::from_secs(5),
                )
            });
            let mut incoming = receive(&listener, &path, Duration::from_secs(5)).unwrap();
            assert_eq!(incoming.paused_at_us, 42);
            assert_eq!(incoming.sender_pid, std::process::id() as libc::pid_t);
            assert_eq!(incoming.state.memory_bytes, 8 << 20);
            // The same memory, not a copy: what one maps, the other sees.
            let copy = GuestRam::from_file(incoming.memory.try_clone().unwrap(), 8 << 20).unwrap();
            let seen: u32 = copy.memory.read_obj(GuestAddress(0x1000)).unwrap();
            assert_eq!(seen, 0x1234_5678);
            copy.memory.write_obj(7u32, GuestAddress(0x2000)).unwrap();
            assert!(!sender.is_finished(), "the sender waits for 'ready'");
            incoming.ready().unwrap();
            sender.join().unwrap()
        });
        assert!(sent.unwrap() > 0);
        let back: u32 = ram.memory.read_obj(GuestAddress(0x2000)).unwrap();
        assert_eq!(back, 7);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_refusal_reaches_the_sender_and_nobody_listening_is_an_error() {
        let path = socket("refused");
        let listener = listen(&path).unwrap();
        let ram = GuestRam::new(8 << 20).unwrap();
        let error = std::thread::scope(|s| {
            let sender = s.spawn(|| {
                send(
                    &path,
                    &state(8 << 20),
                    (&ram.boot_file, None),
                    1,
                    Duration::from_secs(5),
                )
            });
            let mut incoming = receive(&listener, &path, Duration::from_secs(5)).unwrap();
            incoming.refuse("no KVM\nhere");
            drop(incoming);
            sender.join().unwrap().unwrap_err().to_string()
        });
        assert!(
            error.contains("the new VMM refused the VM: no KVMhere"),
            "{error}"
        );
        std::fs::remove_file(&path).unwrap();
        let error = send(
            &path,
            &state(8 << 20),
            (&ram.boot_file, None),
            1,
            Duration::from_secs(1),
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("cannot connect"), "{error}");
    }

    #[test]
    fn a_memory_file_smaller_than_the_vm_and_a_silent_socket_are_refused() {
        let path = socket("small");
        let listener = listen(&path).unwrap();
        let ram = GuestRam::new(8 << 20).unwrap();
        let error = std::thread::scope(|s| {
            let sender = s.spawn(|| {
                send(
                    &path,
                    &state(16 << 20),
                    (&ram.boot_file, None),
                    1,
                    Duration::from_secs(2),
                )
            });
            let error = receive(&listener, &path, Duration::from_secs(5))
                .err()
                .unwrap()
                .to_string();
            let _ = sender.join();
            error
        });
        assert!(
            error
                .contains("the memory file is 8388608 bytes; the state says guest RAM is 16777216"),
            "{error}"
        );
        let error = receive(&listener, &path, Duration::from_millis(50))
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("no VMM handed over a VM within"), "{error}");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn the_old_vmm_is_waited_for_until_it_exits() {
        let mut child = std::process::Command::new("sleep")
            .arg("0.3")
            .spawn()
            .unwrap();
        let pid = child.id() as libc::pid_t;
        assert!(!wait_for_exit(pid, Duration::from_millis(20)).unwrap());
        assert!(wait_for_exit(pid, Duration::from_secs(5)).unwrap());
        child.wait().unwrap();
        assert!(
            wait_for_exit(pid, Duration::from_secs(5)).unwrap(),
            "reaped: gone"
        );
    }
}
