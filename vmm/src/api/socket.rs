//! The API's listening socket: created with mode 0600 whatever the umask,
//! and never at the cost of something else living at its path.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use super::ApiError;

/// Mode of the socket file: only the VMM's user may connect.
pub const SOCKET_MODE: libc::mode_t = 0o600;
const BACKLOG: libc::c_int = 64;

/// Binds the API socket at `path`. Only a stale socket (nobody accepts on
/// it: the connection is refused) is replaced; a live one, even one whose
/// backlog is full, and anything that is not a socket are refused.
pub fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    let error = |source| ApiError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let address = SocketAddress::new(path)?;
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_socket() => match probe(&address) {
            Probe::Live => {
                return Err(ApiError::InUse {
                    path: path.to_path_buf(),
                })
            }
            Probe::Stale => match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(error(e)),
                _ => {}
            },
            Probe::Gone => {}
            Probe::Failed(e) => return Err(error(e)),
        },
        Ok(_) => {
            return Err(ApiError::NotASocket {
                path: path.to_path_buf(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(error(e)),
    }
    listen(&address).map_err(|e| match e.kind() {
        // Someone else bound it between our look and our bind.
        io::ErrorKind::AddrInUse => ApiError::InUse {
            path: path.to_path_buf(),
        },
        _ => error(e),
    })
}

/// The API socket, bound before the VM is built so a bad path is reported
/// before any guest memory exists. Until the API thread takes the listener,
/// dropping it removes the socket file: a VM that fails to build leaves
/// nothing behind.
pub struct ApiSocket {
    listener: UnixListener,
    remove_on_drop: RemoveOnDrop,
}

struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            // Ours: nobody replaces a live socket (see `bind`).
            let _ = std::fs::remove_file(path);
        }
    }
}

impl ApiSocket {
    pub fn bind(path: &Path) -> Result<ApiSocket, ApiError> {
        Ok(ApiSocket {
            listener: bind(path)?,
            remove_on_drop: RemoveOnDrop(Some(path.to_path_buf())),
        })
    }

    /// The listener, for the API thread; the socket file then stays.
    pub fn into_listener(self) -> UnixListener {
        let ApiSocket {
            listener,
            mut remove_on_drop,
        } = self;
        remove_on_drop.0 = None;
        listener
    }
}

/// A `sockaddr_un` for a filesystem path.
struct SocketAddress {
    raw: libc::sockaddr_un,
}

impl SocketAddress {
    fn new(path: &Path) -> Result<SocketAddress, ApiError> {
        // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
        let mut raw: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        raw.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let bytes = path.as_os_str().as_bytes();
        // Room for the terminating NUL, which the zeroed tail provides.
        let max = raw.sun_path.len() - 1;
        if bytes.is_empty() || bytes.len() > max || bytes.contains(&0) {
            return Err(ApiError::PathTooLong {
                path: path.to_path_buf(),
                max,
            });
        }
        for (slot, &byte) in raw.sun_path.iter_mut().zip(bytes) {
            *slot = byte as libc::c_char;
        }
        Ok(SocketAddress { raw })
    }

    fn as_ptr(&self) -> *const libc::sockaddr {
        &self.raw as *const libc::sockaddr_un as *const libc::sockaddr
    }

    fn len(&self) -> libc::socklen_t {
        std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t
    }
}

fn unix_socket(flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers; a non-negative result is a new
    // descriptor that we own from here on.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | flags, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: see above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

enum Probe {
    Live,
    Stale,
    Gone,
    Failed(io::Error),
}

/// Whether a process accepts on the socket at `address`. A non-blocking
/// connect does not wait on a full backlog: EAGAIN means someone listens.
fn probe(address: &SocketAddress) -> Probe {
    let socket = match unix_socket(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) {
        Ok(socket) => socket,
        Err(e) => return Probe::Failed(e),
    };
    // SAFETY: the address points to a sockaddr_un of the given length that
    // outlives the call; the descriptor is ours.
    let rc = unsafe { libc::connect(socket.as_raw_fd(), address.as_ptr(), address.len()) };
    if rc == 0 {
        return Probe::Live;
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EAGAIN | libc::EINPROGRESS) => Probe::Live,
        Some(libc::ECONNREFUSED) => Probe::Stale,
        Some(libc::ENOENT) => Probe::Gone,
        _ => Probe::Failed(error),
    }
}

/// Binds and listens. The socket inode gets SOCKET_MODE before bind, and
/// Linux gives the new file that mode minus the umask: 0600 or stricter.
fn listen(address: &SocketAddress) -> io::Result<UnixListener> {
    let socket = unix_socket(libc::SOCK_CLOEXEC)?;
    let fd = socket.as_raw_fd();
    // SAFETY: fchmod, bind and listen on a descriptor we own; the address
    // points to a sockaddr_un of the given length that outlives the calls.
    unsafe {
        if libc::fchmod(fd, SOCKET_MODE) != 0
            || libc::bind(fd, address.as_ptr(), address.len()) != 0
            || libc::listen(fd, BACKLOG) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(UnixListener::from(socket))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("microvm-api-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn a_regular_file_is_never_replaced() {
        let dir = temp_dir("file");
        let path = dir.join("api.sock");
        std::fs::write(&path, b"precious").unwrap();
        let error = bind(&path).unwrap_err();
        assert!(matches!(error, ApiError::NotASocket { .. }), "{error}");
        assert!(error.to_string().contains("not a socket"), "{error}");
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_directory_or_symlink_is_refused() {
        let dir = temp_dir("dir");
        let sub = dir.join("sub");
        std::fs::create_dir(&sub).unwrap();
        assert!(matches!(bind(&sub), Err(ApiError::NotASocket { .. })));
        let link = dir.join("link");
        std::os::unix::fs::symlink("/nonexistent", &link).unwrap();
        assert!(matches!(bind(&link), Err(ApiError::NotASocket { .. })));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_stale_socket_is_replaced() {
        let dir = temp_dir("stale");
        let path = dir.join("api.sock");
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists(), "the stale socket file stays behind");
        let listener = bind(&path).unwrap();
        UnixStream::connect(&path).unwrap();
        drop(listener);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_live_socket_is_refused() {
        let dir = temp_dir("live");
        let path = dir.join("api.sock");
        let _live = UnixListener::bind(&path).unwrap();
        assert!(matches!(bind(&path), Err(ApiError::InUse { .. })));
        UnixStream::connect(&path).expect("the live socket is untouched");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_live_socket_with_a_full_backlog_is_refused() {
        let dir = temp_dir("backlog");
        let path = dir.join("api.sock");
        let address = SocketAddress::new(&path).unwrap();
        let live = unix_socket(libc::SOCK_CLOEXEC).unwrap();
        // SAFETY: bind and listen on a descriptor we own with a valid address.
        unsafe {
            assert_eq!(
                libc::bind(live.as_raw_fd(), address.as_ptr(), address.len()),
                0
            );
            assert_eq!(libc::listen(live.as_raw_fd(), 0), 0);
        }
        // Fill the backlog with connections nobody accepts.
        let mut pending = Vec::new();
        loop {
            let client = unix_socket(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC).unwrap();
            // SAFETY: connect on our descriptor with a valid address.
            let rc = unsafe { libc::connect(client.as_raw_fd(), address.as_ptr(), address.len()) };
            if rc != 0 {
                assert_eq!(
                    io::Error::last_os_error().raw_os_error(),
                    Some(libc::EAGAIN)
                );
                break;
            }
            pending.push(client);
            assert!(pending.len() < 16, "the backlog never filled");
        }
        let error = bind(&path).unwrap_err();
        assert!(matches!(error, ApiError::InUse { .. }), "{error}");
        assert!(std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_socket());
        drop(pending);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_socket_is_private_whatever_the_umask() {
        let dir = temp_dir("mode");
        let path = dir.join("api.sock");
        // A forked child sets the umask, so other tests never see it.
        // SAFETY: the child only binds and exits with _exit; glibc's fork
        // resets malloc's locks in the child, so bind's allocations are safe.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: in the child; umask and _exit take no pointers.
            unsafe {
                libc::umask(0);
                let ok = bind(&path).is_ok();
                libc::_exit(if ok { 0 } else { 1 });
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        assert_eq!(mode(&path), 0o600, "umask 000");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_api_socket_dropped_before_the_api_starts_is_removed() {
        let dir = temp_dir("drop");
        let path = dir.join("api.sock");
        drop(ApiSocket::bind(&path).unwrap());
        assert!(!path.exists(), "a failed build leaves its socket behind");
        let listener = ApiSocket::bind(&path).unwrap().into_listener();
        UnixStream::connect(&path).expect("a running API keeps its socket");
        drop(listener);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_overlong_path_is_refused() {
        let path = std::path::PathBuf::from(format!("/tmp/{}", "x".repeat(200)));
        assert!(matches!(bind(&path), Err(ApiError::PathTooLong { .. })));
    }
}
