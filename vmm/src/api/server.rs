//! The API's poll loop: every connection is non-blocking and has a
//! deadline, so no client waits on another. When the table is full, a new
//! connection takes the place of one that has its answer already or has
//! sent no complete request, so idle connections cannot keep others out.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::http::{self, HttpError, Response};
use super::routes::{self, ApiState, Outcome, PendingResize};
use super::{MAX_CLIENTS, REQUEST_DEADLINE};

/// How often a watched resize looks at the guest's progress.
const RESIZE_POLL: Duration = Duration::from_millis(10);
const READ_CHUNK: usize = 4096;

enum Phase {
    /// Receiving the request; answered 408 at the deadline.
    Reading(Vec<u8>),
    /// A resize is under way; `generation` orders resizes.
    Watching {
        pending: PendingResize,
        generation: u64,
    },
    /// Sending the answer; dropped at the deadline.
    Writing { bytes: Vec<u8>, sent: usize },
    /// Answer sent and write side shut: reading what the client still
    /// sends (closing with unread bytes would reset the connection before
    /// the client reads the answer), until it closes or the deadline.
    Draining { discarded: usize },
}

/// The most a client may still send after its answer.
const MAX_DRAIN_BYTES: usize = 1 << 20;

struct Client {
    stream: UnixStream,
    phase: Phase,
    deadline: Instant,
    accepted: Instant,
}

/// How long after being accepted a connection without a complete request
/// is safe from being closed for a newer one: a client that connects and
/// then writes is not closed in between. Also how long, at most, a full
/// table of such connections keeps the listener waiting.
const EVICTION_GRACE: Duration = Duration::from_millis(100);

/// What became of a client in one turn.
enum Next {
    Keep,
    Close,
}

pub struct Server {
    listener: UnixListener,
    state: Arc<ApiState>,
    clients: Vec<Client>,
    /// The newest resize: (generation, target). Older watchers are answered
    /// as replaced.
    latest_resize: Option<(u64, u64)>,
    /// After accept failed for want of resources (descriptors, memory),
    /// the listener is left alone until then rather than polled hot.
    accept_pause_until: Option<Instant>,
    /// How long a client has to send its request, and to take its answer.
    deadline: Duration,
}

/// How long the listener rests after accept ran out of resources.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

impl Server {
    /// `listener` must be non-blocking.
    pub fn new(listener: UnixListener, state: Arc<ApiState>) -> Server {
        Server::with_deadline(listener, state, REQUEST_DEADLINE)
    }

    /// As `new`, with another deadline than `REQUEST_DEADLINE`.
    fn with_deadline(listener: UnixListener, state: Arc<ApiState>, deadline: Duration) -> Server {
        Server {
            listener,
            state,
            clients: Vec::new(),
            latest_resize: None,
            accept_pause_until: None,
            deadline,
        }
    }

    /// Waits until a client is ready or a deadline passes, and serves.
    pub fn turn(&mut self) {
        let before = Instant::now();
        let paused = self.accept_pause_until.is_some_and(|until| before < until);
        let room = self.clients.len() < MAX_CLIENTS || self.evictable(before).is_some();
        let listening = room && !paused;
        let mut fds = Vec::with_capacity(self.clients.len() + 1);
        if listening {
            fds.push(pollfd(self.listener.as_raw_fd(), libc::POLLIN));
        }
        for client in &self.clients {
            let events = match client.phase {
                Phase::Reading(_) | Phase::Draining { .. } => libc::POLLIN,
                Phase::Writing { .. } => libc::POLLOUT,
                // Only hang-ups, reported whatever the mask.
                Phase::Watching { .. } => 0,
            };
            fds.push(pollfd(client.stream.as_raw_fd(), events));
        }
        let timeout = self.poll_timeout(Instant::now());
        // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd
        // structs, and its length is passed along.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if ready < 0 {
            return; // EINTR: go round again.
        }
        let now = Instant::now();
        let offset = usize::from(listening);
        let revents: Vec<libc::c_short> = fds.iter().skip(offset).map(|f| f.revents).collect();
        let mut clients = std::mem::take(&mut self.clients);
        let mut index = 0;
        clients.retain_mut(|client| {
            let events = revents.get(index).copied().unwrap_or(0);
            index += 1;
            matches!(self.advance(client, events, now), Next::Keep)
        });
        // A new resize replaces those still watched: answer them now.
        if let Some((latest, target)) = self.latest_resize {
            let deadline = self.deadline;
            clients.retain_mut(|client| {
                let superseded = match &client.phase {
                    Phase::Watching {
                        pending,
                        generation,
                    } if *generation < latest => {
                        routes::poll_resize(self.state.as_ref(), pending, now, Some(target))
                    }
                    _ => None,
                };
                match superseded {
                    Some(answer) => matches!(respond(client, &answer, deadline), Next::Keep),
                    None => true,
                }
            });
        }
        self.clients = clients;
        if listening && fds.first().is_some_and(|f| f.revents != 0) {
            self.accept();
        }
    }

    /// Whether an answer is still being sent.
    pub fn writing(&self) -> bool {
        self.clients
            .iter()
            .any(|c| matches!(c.phase, Phase::Writing { .. }))
    }

    /// Milliseconds until the nearest deadline (-1: none).
    fn poll_timeout(&self, now: Instant) -> libc::c_int {
        let nearest = self
            .clients
            .iter()
            .map(|client| match client.phase {
                Phase::Watching { .. } => client.deadline.min(now + RESIZE_POLL),
                _ => client.deadline,
            })
            .chain(self.accept_pause_until.filter(|&until| until > now))
            .chain(self.grace_ends(now))
            .min();
        match nearest {
            None => -1,
            Some(at) => {
                let wait = at.saturating_duration_since(now);
                // Round up, so a deadline is past when poll returns.
                (wait.as_millis() + 1).min(libc::c_int::MAX as u128) as libc::c_int
            }
        }
    }

    /// When the table is full: the first time a connection becomes
    /// evictable (the listener is not polled until then).
    fn grace_ends(&self, now: Instant) -> Option<Instant> {
        if self.clients.len() < MAX_CLIENTS {
            return None;
        }
        self.clients
            .iter()
            .filter(|c| matches!(c.phase, Phase::Reading(_)))
            .map(|c| c.accepted + EVICTION_GRACE)
            .filter(|&at| at > now)
            .min()
    }

    /// The connection a newer one may replace: one that has its whole
    /// answer (draining), else one past its grace that has not sent a
    /// complete request; the oldest first. Resizes being watched and
    /// answers being written keep their place (each ends by a deadline).
    fn evictable(&self, now: Instant) -> Option<usize> {
        let oldest = |wanted: fn(&Client, Instant) -> bool| {
            self.clients
                .iter()
                .enumerate()
                .filter(|(_, c)| wanted(c, now))
                .min_by_key(|(_, c)| c.accepted)
                .map(|(i, _)| i)
        };
        oldest(|c, _| matches!(c.phase, Phase::Draining { .. })).or_else(|| {
            oldest(|c, now| {
                matches!(c.phase, Phase::Reading(_)) && c.accepted + EVICTION_GRACE <= now
            })
        })
    }

    fn accept(&mut self) {
        loop {
            let now = Instant::now();
            let full = self.clients.len() >= MAX_CLIENTS;
            if full && self.evictable(now).is_none() {
                return; // The rest wait in the backlog.
            }
            // SAFETY: accept4 on our listening descriptor; null address
            // pointers ask for no peer address.
            let fd = unsafe {
                libc::accept4(
                    self.listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    ACCEPT_FLAGS,
                )
            };
            if fd < 0 {
                let error = io::Error::last_os_error();
                // Anything but "nobody waiting" or "a client that left":
                // out of descriptors or memory. The client stays queued.
                if !matches!(
                    error.raw_os_error(),
                    Some(libc::EAGAIN | libc::ECONNABORTED | libc::EINTR)
                ) {
                    self.accept_pause_until = Some(now + ACCEPT_PAUSE);
                }
                return;
            }
            // SAFETY: accept4 returned a new descriptor that we own.
            let stream = unsafe { UnixStream::from_raw_fd(fd) };
            if full {
                if let Some(index) = self.evictable(now) {
                    evict(self.clients.swap_remove(index));
                }
            }
            let mut client = Client {
                stream,
                phase: Phase::Reading(Vec::new()),
                deadline: now + self.deadline,
                accepted: now,
            };
            // Its request is usually there already: serve it at once.
            if let Next::Keep = self.advance(&mut client, libc::POLLIN, now) {
                self.clients.push(client);
            }
        }
    }

    fn advance(&mut self, client: &mut Client, events: libc::c_short, now: Instant) -> Next {
        if events & libc::POLLNVAL != 0 {
            return Next::Close;
        }
        match &mut client.phase {
            Phase::Reading(received) => {
                if events & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                    match read_more(&mut client.stream, received) {
                        Ok(0) if received.is_empty() => return Next::Close,
                        Ok(0) => {
                            return respond(client, &error(&HttpError::Truncated), self.deadline)
                        }
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => return Next::Close,
                    }
                }
                match http::parse(received) {
                    Err(e) => respond(client, &error(&e), self.deadline),
                    Ok(Some(request)) => match routes::handle(self.state.as_ref(), &request) {
                        Outcome::Answer(answer) => respond(client, &answer, self.deadline),
                        Outcome::Resize(pending) => {
                            let generation = self.latest_resize.map_or(0, |(g, _)| g + 1);
                            self.latest_resize =
                                Some((generation, routes::resize_target(&pending)));
                            client.deadline = pending.deadline();
                            client.phase = Phase::Watching {
                                pending,
                                generation,
                            };
                            self.advance(client, 0, now)
                        }
                    },
                    Ok(None) if now >= client.deadline => {
                        let timeout = HttpError::Timeout(self.deadline.as_millis());
                        respond(client, &error(&timeout), self.deadline)
                    }
                    Ok(None) => Next::Keep,
                }
            }
            Phase::Watching { pending, .. } => {
                if events & (libc::POLLHUP | libc::POLLERR) != 0 {
                    return Next::Close; // The guest goes on; nobody to tell.
                }
                match routes::poll_resize(self.state.as_ref(), pending, now, None) {
                    Some(answer) => respond(client, &answer, self.deadline),
                    None => Next::Keep,
                }
            }
            Phase::Writing { .. } | Phase::Draining { .. } if now >= client.deadline => Next::Close,
            Phase::Writing { .. } => send_more(client),
            Phase::Draining { discarded } => {
                let mut chunk = [0u8; READ_CHUNK];
                match client.stream.read(&mut chunk) {
                    Ok(n) if n > 0 && *discarded + n <= MAX_DRAIN_BYTES => {
                        *discarded += n;
                        Next::Keep
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Next::Keep,
                    _ => Next::Close,
                }
            }
        }
    }
}

const ACCEPT_FLAGS: libc::c_int = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;

/// accept4's flags argument as the API thread's seccomp filter allows it.
pub const fn accept_flags() -> libc::c_int {
    ACCEPT_FLAGS
}

fn pollfd(fd: libc::c_int, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

fn error(e: &HttpError) -> Response {
    Response::from_error(e)
}

/// Reads what is available, never buffering more than a request may hold
/// (one byte more, so the parser sees it is too large).
fn read_more(stream: &mut UnixStream, received: &mut Vec<u8>) -> io::Result<usize> {
    let room = (http::MAX_REQUEST_BYTES + 1).saturating_sub(received.len());
    if room == 0 {
        return Ok(1); // Full: let the parser refuse it.
    }
    let mut chunk = [0u8; READ_CHUNK];
    let limit = room.min(chunk.len());
    let n = stream.read(&mut chunk[..limit])?;
    received.extend_from_slice(&chunk[..n]);
    Ok(n)
}

/// Starts sending `answer`; the client has `deadline` from now to take it
/// (now: building the answer may have waited on the VM's locks).
fn respond(client: &mut Client, answer: &Response, deadline: Duration) -> Next {
    client.phase = Phase::Writing {
        bytes: answer.to_bytes(),
        sent: 0,
    };
    client.deadline = Instant::now() + deadline;
    send_more(client)
}

/// Closes a connection to make room for a newer one. One that never sent a
/// complete request is told why, if its socket takes the answer at once.
fn evict(mut client: Client) {
    if let Phase::Reading(_) = client.phase {
        let answer = Response::error(
            503,
            "closed for a newer connection: the API's connection table is full \
             and this one sent no complete request",
        );
        let _ = client.stream.write(&answer.to_bytes());
    }
}

fn send_more(client: &mut Client) -> Next {
    let Phase::Writing { bytes, sent } = &mut client.phase else {
        return Next::Keep;
    };
    loop {
        let Some(rest) = bytes.get(*sent..).filter(|rest| !rest.is_empty()) else {
            let _ = client.stream.shutdown(std::net::Shutdown::Write);
            client.phase = Phase::Draining { discarded: 0 };
            return Next::Keep;
        };
        match client.stream.write(rest) {
            Ok(0) => return Next::Close,
            Ok(n) => *sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Keep,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Next::Close,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::control::{
        IommuStatus, MemoryRequestError, MemoryStatus, VdpaStatus, VmControl, VmSummary,
    };
    use std::io::{Read, Write};
    use std::path::PathBuf;

    fn empty_state() -> Arc<ApiState> {
        Arc::new(crate::api::test_vm::StillVm::new())
    }

    /// A served API socket in a fresh directory.
    fn serve(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("microvm-srv-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let listener = crate::api::bind(&path).unwrap();
        crate::api::spawn(listener, empty_state(), None).unwrap();
        path
    }

    fn exchange(path: &PathBuf, request: &[u8]) -> String {
        let mut stream = UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream.write_all(request).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    }

    #[test]
    fn the_server_runs_under_the_api_threads_seccomp_filter() {
        let dir = std::env::temp_dir().join(format!("microvm-srv-filter-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let listener = crate::api::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let fds = crate::seccomp::FilterFds::new(900, vec![901]);
        let program = crate::seccomp::filter(crate::seccomp::ThreadKind::Api, &fds).unwrap();
        let state = empty_state();
        // SAFETY: the child applies the filter and serves until killed; glibc's
        // fork resets malloc's locks in the child.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            if crate::seccomp::apply(&program).is_err() {
                // SAFETY: leaving the child at once.
                unsafe { libc::_exit(100) };
            }
            let mut server = Server::new(listener, state);
            loop {
                server.turn();
            }
        }
        drop(listener);
        let answers = [
            exchange(&path, b"GET /info HTTP/1.1\r\n\r\n"),
            exchange(&path, b"GET /nowhere HTTP/1.1\r\n\r\n"),
            exchange(&path, b"BOGUS\r\n\r\n"),
            exchange(
                &path,
                b"PUT /memory HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
            ),
        ];
        let mut status = 0;
        // SAFETY: polling our own child without blocking.
        let exited = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        // SAFETY: ending and reaping our own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, &mut status, 0);
        }
        assert_eq!(exited, 0, "the server died: status {status:#x}");
        assert!(answers[0].starts_with("HTTP/1.1 200"), "{}", answers[0]);
        assert!(answers[1].starts_with("HTTP/1.1 404"), "{}", answers[1]);
        assert!(answers[2].starts_with("HTTP/1.1 400"), "{}", answers[2]);
        assert!(answers[3].starts_with("HTTP/1.1 400"), "{}", answers[3]);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_server_out_of_descriptors_rests_instead_of_spinning() {
        let dir = std::env::temp_dir().join(format!("microvm-srv-emfile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let listener = crate::api::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        // A client waits in the backlog: the listener stays readable.
        let _client = UnixStream::connect(&path).unwrap();
        let state = empty_state();
        // SAFETY: the child only runs the server and leaves with _exit;
        // glibc's fork resets malloc's locks in the child.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: in the child: open /dev/null to learn the lowest free
            // descriptor, then forbid any new one (accept4 gets EMFILE).
            unsafe {
                let free = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
                libc::close(free);
                let limit = libc::rlimit {
                    rlim_cur: free as libc::rlim_t,
                    rlim_max: free as libc::rlim_t,
                };
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            }
            let mut server = Server::new(listener, state);
            let started = Instant::now();
            let mut turns = 0u32;
            while started.elapsed() < Duration::from_secs(1) {
                server.turn();
                turns += 1;
            }
            // SAFETY: leaving the child.
            unsafe { libc::_exit(if turns < 100 { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the server spun on a listener it could not accept from: {status:#x}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn idle_and_trickling_clients_do_not_delay_another() {
        let path = serve("slow");
        let _idle: Vec<UnixStream> = (0..3)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        let mut trickle = UnixStream::connect(&path).unwrap();
        trickle.write_all(b"GET /in").unwrap();
        let started = Instant::now();
        let answer = exchange(&path, b"GET /info HTTP/1.1\r\n\r\n");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "answered after {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_client_that_never_finishes_its_request_gets_408_at_the_deadline() {
        let path = serve("trickle");
        let mut trickle = UnixStream::connect(&path).unwrap();
        trickle
            .set_read_timeout(Some(REQUEST_DEADLINE * 3))
            .unwrap();
        let started = Instant::now();
        // A byte every half second would keep a per-read timeout happy forever.
        let mut writer = trickle.try_clone().unwrap();
        std::thread::spawn(move || {
            for byte in b"GET /info HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaa" {
                if writer.write_all(&[*byte]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        let mut first = [0u8; 12];
        trickle.read_exact(&mut first).unwrap();
        let elapsed = started.elapsed();
        assert_eq!(&first, b"HTTP/1.1 408");
        assert!(
            elapsed >= REQUEST_DEADLINE && elapsed < REQUEST_DEADLINE + Duration::from_secs(1),
            "{elapsed:?}"
        );
    }

    #[test]
    fn more_clients_than_the_limit_still_get_answers_within_the_deadline() {
        let path = serve("many");
        let _idle: Vec<UnixStream> = (0..MAX_CLIENTS + 4)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        let started = Instant::now();
        let answer = exchange(&path, b"GET /counters HTTP/1.1\r\n\r\n");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        // Idle connections give way to it: well within one deadline.
        assert!(
            started.elapsed() < REQUEST_DEADLINE,
            "answered after {:?}",
            started.elapsed()
        );
    }

    /// A server with its own `deadline` over `state`, on a thread of its own.
    fn serve_with(name: &str, state: Arc<ApiState>, deadline: Duration) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("microvm-srv-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let listener = crate::api::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let mut server = Server::with_deadline(listener, state, deadline);
            loop {
                server.turn();
            }
        });
        path
    }

    #[test]
    fn idle_connections_filling_the_table_and_the_backlog_do_not_delay_an_honest_client() {
        let deadline = Duration::from_secs(1);
        let path = serve_with("idle-flood", empty_state(), deadline);
        // The table full, and the backlog nearly so (it holds 64).
        let _idle: Vec<UnixStream> = (0..MAX_CLIENTS + 60)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        let answer = exchange(&path, b"GET /counters HTTP/1.1\r\n\r\n");
        let waited = started.elapsed();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(waited < deadline, "answered after {waited:?}");
    }

    /// A VM whose every look takes `delay` (a lock held elsewhere) and whose
    /// summary is bigger than a socket buffer.
    struct SlowVm {
        delay: Duration,
    }

    impl VmControl for SlowVm {
        fn summary(&self) -> VmSummary {
            std::thread::sleep(self.delay);
            VmSummary {
                vcpus: 1,
                memory_bytes: 1 << 30,
                ram: (0..40_000u64).map(|i| (i << 21, 1 << 21)).collect(),
            }
        }
        fn vdpa_devices(&self) -> Vec<VdpaStatus> {
            vec![]
        }
        fn memory(&self) -> Option<MemoryStatus> {
            None
        }
        fn iommu(&self) -> Option<IommuStatus> {
            None
        }
        fn request_memory(&self, _size: u64) -> Result<(), MemoryRequestError> {
            Err(MemoryRequestError::NoHotplug)
        }
        fn transactions(&self) -> Vec<devices::dma::TransactionRecord> {
            vec![]
        }
        fn run_state(&self) -> crate::lifecycle::RunState {
            crate::lifecycle::RunState::Running
        }
        fn set_run_state(
            &self,
            _target: crate::lifecycle::RunState,
        ) -> Result<crate::lifecycle::Transition, crate::lifecycle::LifecycleError> {
            Err(crate::lifecycle::LifecycleError::Gone)
        }
        fn snapshot(
            &self,
            _dir: std::path::PathBuf,
        ) -> Result<crate::snapshot::SnapshotReport, crate::lifecycle::LifecycleError> {
            Err(crate::lifecycle::LifecycleError::Gone)
        }
        fn update(
            &self,
            _socket: std::path::PathBuf,
        ) -> Result<crate::lifecycle::UpdateReport, crate::lifecycle::LifecycleError> {
            Err(crate::lifecycle::LifecycleError::Gone)
        }
    }

    #[test]
    fn an_answer_that_took_long_to_build_still_gets_a_whole_deadline_to_be_taken() {
        let deadline = Duration::from_millis(500);
        let state = Arc::new(SlowVm {
            delay: deadline * 2,
        });
        let path = serve_with("slow-answer", state, deadline);
        let answer = exchange(&path, b"GET /info HTTP/1.1\r\n\r\n");
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "{}",
            &answer[..answer.len().min(200)]
        );
        let (_, body) = answer.split_once("\r\n\r\n").unwrap();
        let info: serde_json::Value = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("{} of the answer's bytes arrived: {e}", answer.len()));
        assert_eq!(info["memory"]["regions"].as_array().unwrap().len(), 40_000);
    }

    #[test]
    fn oversized_requests_are_answered_431_and_413_on_the_socket() {
        let path = serve("big");
        let head = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(70 * 1024));
        let answer = exchange(&path, head.as_bytes());
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
        let body = "PUT /memory HTTP/1.1\r\nContent-Length: 100000\r\n\r\n{}";
        let answer = exchange(&path, body.as_bytes());
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        let plus = "PUT /memory HTTP/1.1\r\nContent-Length: +2\r\n\r\n{}";
        let answer = exchange(&path, plus.as_bytes());
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    }

    /// A VM whose virtio-mem driver accepts every target and never plugs.
    fn state_with_idle_hotplug() -> Arc<ApiState> {
        Arc::new(crate::api::test_vm::StillVm::with_hotplug(
            64 << 20,
            2 << 20,
        ))
    }

    fn resize_request(size: &str, timeout_ms: u64) -> Vec<u8> {
        let body = format!(r#"{{"requested_size": "{size}", "timeout_ms": {timeout_ms}}}"#);
        format!(
            "PUT /memory HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    fn json_body(answer: &str) -> serde_json::Value {
        let (_, body) = answer.split_once("\r\n\r\n").unwrap();
        serde_json::from_str(body).unwrap()
    }

    #[test]
    fn a_new_resize_replaces_a_pending_one_and_a_stuck_one_ends_at_its_timeout() {
        let dir = std::env::temp_dir().join(format!("microvm-srv-resize-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let listener = crate::api::bind(&path).unwrap();
        crate::api::spawn(listener, state_with_idle_hotplug(), None).unwrap();

        let started = Instant::now();
        let first_path = path.clone();
        let first =
            std::thread::spawn(move || exchange(&first_path, &resize_request("8M", 60_000)));
        std::thread::sleep(Duration::from_millis(300));
        let second = exchange(&path, &resize_request("16M", 400));
        let first = first.join().unwrap();

        // The first, replaced, was answered as soon as the second came.
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");
        let first = json_body(&first);
        assert_eq!(first["done"], false, "{first}");
        let stopped = first["stopped"].as_str().unwrap();
        assert!(
            stopped.contains("replaced by a newer request for 16777216 bytes"),
            "{stopped}"
        );
        // The second is not refused; the guest never plugs, so it ends at
        // its own timeout saying where it stopped.
        assert!(second.starts_with("HTTP/1.1 200"), "{second}");
        let second = json_body(&second);
        assert_eq!(second["done"], false, "{second}");
        assert_eq!(second["plugged_size"], 0);
        let stopped = second["stopped"].as_str().unwrap();
        assert!(
            stopped.contains("timed out after 400 ms with 0 of the 16777216 requested bytes"),
            "{stopped}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        // And a third is accepted too.
        let third = exchange(&path, &resize_request("0", 0));
        assert!(third.starts_with("HTTP/1.1 200"), "{third}");
        assert_eq!(json_body(&third)["done"], true, "0 plugged already");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_resize_timeout_above_the_cap_is_refused_at_once() {
        let path = serve("cap");
        let body = r#"{"requested_size": 0, "timeout_ms": 18446744073709551615}"#;
        let request = format!(
            "PUT /memory HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let started = Instant::now();
        let answer = exchange(&path, request.as_bytes());
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("at most 600000"), "{answer}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
