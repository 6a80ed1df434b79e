//! The control API: HTTP/1.1 with JSON bodies on a Unix socket, served by
//! a thread of its own. `GET /info` describes the VM, `GET /counters`
//! reports what the devices did, `PUT /memory` resizes hotplug memory.
//!
//! One thread serves every client with a poll loop, so a slow client never
//! holds up another: each connection must deliver its whole request within
//! `REQUEST_DEADLINE` of being accepted (else 408) and take its answer
//! within `REQUEST_DEADLINE` of it being ready; at most `MAX_CLIENTS` are
//! open at once, and a newer connection replaces one that has its answer or
//! sent no complete request in time (see server.rs), so idle connections
//! cannot keep an honest client waiting.
//! A resize is watched by the loop, not waited for: its client gets the
//! answer when the guest is done, the request's capped timeout passes, or a
//! newer resize replaces it.

pub mod control;
pub mod http;
pub mod routes;
pub mod server;
pub mod socket;
#[cfg(test)]
mod test_vm;

use std::io;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use seccompiler::BpfProgram;

pub use routes::{ApiState, MAX_RESIZE_TIMEOUT};
pub use socket::{bind, ApiSocket};

/// How long a client has to send its whole request, and to take its answer.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Connections served at once; further ones wait in the listen backlog
/// until an idle one makes room.
pub const MAX_CLIENTS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("API socket '{path}' is in use by a running process")]
    InUse { path: PathBuf },
    #[error("refusing to replace '{path}' with the API socket: it exists and is not a socket")]
    NotASocket { path: PathBuf },
    #[error("API socket path '{path}' is too long for a Unix socket (at most {max} bytes)")]
    PathTooLong { path: PathBuf, max: usize },
    #[error("cannot bind the API socket '{path}': {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot start the API thread: {0}")]
    Thread(io::Error),
}

/// Serves requests until the process ends. A client that misbehaves gets
/// an HTTP error; the VM is not affected.
pub fn spawn(
    listener: UnixListener,
    state: Arc<ApiState>,
    filter: Option<BpfProgram>,
) -> Result<(), ApiError> {
    // Before the filter: the API thread itself never changes descriptor flags.
    listener.set_nonblocking(true).map_err(ApiError::Thread)?;
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            if let Some(filter) = filter {
                if let Err(e) = crate::seccomp::apply(&filter) {
                    eprintln!("microvm: API disabled: {e}");
                    return;
                }
            }
            let mut server = server::Server::new(listener, state.clone());
            loop {
                server.turn();
                if !server.writing() {
                    state.after_answers();
                }
            }
        })
        .map(|_| ())
        .map_err(ApiError::Thread)
}
