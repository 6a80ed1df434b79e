//! `microvm-ctl --socket PATH <command>`: talks to a running microvm's
//! control API and prints its JSON answer.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "microvm-ctl",
    version,
    about = "Query and steer a running microvm through its API socket."
)]
struct Cli {
    /// The socket given to microvm --api-socket.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Memory regions, devices and negotiated features.
    Info,
    /// Per-device counters: IOTLB messages and batches, queues, interrupts.
    Counters,
    /// Set the hotplug memory the guest should have plugged (0 unplugs all)
    /// and wait until it has, or the timeout passes.
    MemoryResize {
        /// Total plugged hotplug memory, e.g. 512M or 2G.
        size: String,
        /// Seconds to wait for the guest (at most 600, the VMM's cap).
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(0..=600))]
        timeout: u64,
    },
    /// Pause the VM: vCPUs parked, device workers idle, every vDPA device
    /// stopped (suspended where it can be, else reset with its rings'
    /// positions kept). Prints what each step took.
    Pause,
    /// Resume a paused VM where it stopped.
    Resume,
    /// Whether the VM runs or is paused.
    State,
    /// Save the paused VM into DIR, a directory to create: its state file
    /// and guest memory (restore it with microvm --restore DIR).
    Snapshot { dir: PathBuf },
    /// Hand the running VM to a new VMM that waits on SOCKET (started with
    /// microvm --take-over SOCKET): live update. Guest memory is not
    /// copied; this VMM ends once the new one is ready.
    Update { socket: PathBuf },
    /// Send the bytes on stdin as the request and print the raw answer
    /// (for debugging API clients).
    SendRaw,
}

/// How long an answer may take beyond what the request itself waits for:
/// the VMM answers other requests at once, or within its 5 s deadline
/// when it is busy with slower clients.
const ANSWER_MARGIN: Duration = Duration::from_secs(15);

/// Sends `request` and reads the whole answer, waiting at most `patience`.
fn exchange(socket: &PathBuf, request: &[u8], patience: Duration) -> Result<String, String> {
    let mut stream = UnixStream::connect(socket)
        .map_err(|e| format!("cannot connect to {}: {e}", socket.display()))?;
    let _ = stream.set_read_timeout(Some(patience));
    let _ = stream.set_write_timeout(Some(patience));
    stream
        .write_all(request)
        .map_err(|e| format!("cannot send the request: {e}"))?;
    let mut raw = String::new();
    stream
        .read_to_string(&mut raw)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
                "the VMM did not answer within {:.1} s; it may still complete the request \
             (check with `microvm-ctl info`)",
                patience.as_secs_f64()
            ),
            _ => format!("cannot read the answer: {e}"),
        })?;
    Ok(raw)
}

fn request(
    socket: &PathBuf,
    method: &str,
    path: &str,
    body: &str,
    wait: Duration,
) -> Result<(u16, String), String> {
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: microvm\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let raw = exchange(
        socket,
        request.as_bytes(),
        wait.saturating_add(ANSWER_MARGIN),
    )?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| "malformed answer from the VMM".to_string())?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| "malformed status line from the VMM".to_string())?;
    Ok((status, body.to_string()))
}

fn main() -> ExitCode {
    let cli = match vmm::config::cli::parse_or_exit::<Cli>("microvm-ctl") {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let (method, path, body, wait) = match cli.command {
        Command::Info => ("GET", "/info", String::new(), Duration::ZERO),
        Command::Counters => ("GET", "/counters", String::new(), Duration::ZERO),
        Command::MemoryResize { size, timeout } => {
            let wait = Duration::from_secs(timeout);
            let body = serde_json::json!({ "requested_size": size, "timeout_ms": wait.as_millis() as u64 });
            ("PUT", "/memory", body.to_string(), wait)
        }
        Command::Pause | Command::Resume => {
            let state = match cli.command {
                Command::Pause => "paused",
                _ => "running",
            };
            let body = serde_json::json!({ "state": state });
            ("PUT", "/vm", body.to_string(), vmm::lifecycle::ANSWER_BOUND)
        }
        Command::State => ("GET", "/vm", String::new(), Duration::ZERO),
        Command::Snapshot { dir } => {
            // The VMM resolves a relative path against its own directory,
            // not ours: send an absolute one.
            let dir = std::path::absolute(&dir).unwrap_or(dir);
            let body = serde_json::json!({ "dir": dir });
            (
                "PUT",
                "/snapshot",
                body.to_string(),
                vmm::lifecycle::SNAPSHOT_BOUND,
            )
        }
        Command::Update { socket } => {
            let socket = std::path::absolute(&socket).unwrap_or(socket);
            let body = serde_json::json!({ "socket": socket });
            (
                "PUT",
                "/update",
                body.to_string(),
                vmm::lifecycle::UPDATE_ANSWER_BOUND,
            )
        }
        Command::SendRaw => {
            let mut request = Vec::new();
            if let Err(e) = std::io::stdin().read_to_end(&mut request) {
                eprintln!("microvm-ctl: cannot read stdin: {e}");
                return ExitCode::FAILURE;
            }
            return match exchange(&cli.socket, &request, ANSWER_MARGIN) {
                Ok(raw) => {
                    print!("{raw}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("microvm-ctl: {e}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    match request(&cli.socket, method, path, &body, wait) {
        Ok((200, body)) => {
            let answer = serde_json::from_str::<serde_json::Value>(&body).ok();
            let incomplete = answer.as_ref().is_some_and(|v| v["done"] == false);
            let stopped = answer
                .as_ref()
                .and_then(|v| v["stopped"].as_str().map(str::to_string));
            let pretty = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| serde_json::to_string_pretty(&v).ok())
                .unwrap_or(body);
            println!("{pretty}");
            if incomplete {
                let reason = stopped.unwrap_or_else(|| "before the timeout".to_string());
                eprintln!("microvm-ctl: the guest did not reach the requested size: {reason}");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            let reason = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or(body);
            eprintln!("microvm-ctl: the VMM answered {status}: {reason}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("microvm-ctl: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn an_answer_slower_than_the_wait_is_reported_as_such() {
        let dir = std::env::temp_dir().join(format!("microvm-ctl-slow-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("api.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        // A VMM that takes the request and answers later than we wait.
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            std::thread::sleep(Duration::from_millis(800));
            drop(stream);
        });
        let error = exchange(
            &socket,
            b"GET /info HTTP/1.1\r\n\r\n",
            Duration::from_millis(200),
        )
        .unwrap_err();
        assert!(
            error.contains("the VMM did not answer within 0.2 s"),
            "{error}"
        );
        server.join().unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
