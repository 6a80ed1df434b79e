//! The control API: HTTP/1.1 with JSON bodies on a Unix socket, served by
//! a thread of its own. `GET /info` describes the VM, `GET /counters`
//! reports what the devices did.

pub mod control;
pub mod http;
mod routes;

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use seccompiler::BpfProgram;

pub use routes::ApiState;

const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("API socket '{path}' is in use by a running process")]
    InUse { path: PathBuf },
    #[error("cannot bind the API socket '{path}': {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot start the API thread: {0}")]
    Thread(io::Error),
}

/// Binds `path`, replacing a stale socket left by a VMM that is gone.
pub fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    match UnixListener::bind(path) {
        Ok(listener) => Ok(listener),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            if UnixStream::connect(path).is_ok() {
                return Err(ApiError::InUse {
                    path: path.to_path_buf(),
                });
            }
            let bind_error = |source| ApiError::Bind {
                path: path.to_path_buf(),
                source,
            };
            std::fs::remove_file(path).map_err(bind_error)?;
            UnixListener::bind(path).map_err(bind_error)
        }
        Err(source) => Err(ApiError::Bind {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Serves requests until the process ends. A client that misbehaves gets
/// an HTTP error; the VM is not affected.
pub fn spawn(
    listener: UnixListener,
    state: Arc<ApiState>,
    filter: Option<BpfProgram>,
) -> Result<(), ApiError> {
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            if let Some(filter) = filter {
                if let Err(e) = crate::seccomp::apply(&filter) {
                    eprintln!("microvm: API disabled: {e}");
                    return;
                }
            }
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => serve(stream, state.as_ref()),
                    Err(_) => continue,
                }
            }
        })
        .map(|_| ())
        .map_err(ApiError::Thread)
}

fn serve(stream: UnixStream, state: &ApiState) {
    let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
    let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
    let response = match http::read_request(&stream) {
        Ok(request) => routes::handle(state, &request),
        Err(http::HttpError::TooLarge) => http::Response::error(413, http::HttpError::TooLarge),
        Err(e) => http::Response::error(400, e),
    };
    let _ = http::write_response(&stream, &response);
}
