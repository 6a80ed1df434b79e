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
        /// Seconds to wait for the guest.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Send the bytes on stdin as the request and print the raw answer
    /// (for debugging API clients).
    SendRaw,
}

const TIMEOUT: Duration = Duration::from_secs(30);

fn exchange(socket: &PathBuf, request: &[u8]) -> Result<String, String> {
    let mut stream = UnixStream::connect(socket)
        .map_err(|e| format!("cannot connect to {}: {e}", socket.display()))?;
    let _ = stream.set_read_timeout(Some(TIMEOUT));
    stream
        .write_all(request)
        .map_err(|e| format!("cannot send the request: {e}"))?;
    let mut raw = String::new();
    stream
        .read_to_string(&mut raw)
        .map_err(|e| format!("cannot read the answer: {e}"))?;
    Ok(raw)
}

fn request(
    socket: &PathBuf,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, String), String> {
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: microvm\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let raw = exchange(socket, request.as_bytes())?;
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
    let (method, path, body) = match cli.command {
        Command::Info => ("GET", "/info", String::new()),
        Command::Counters => ("GET", "/counters", String::new()),
        Command::MemoryResize { size, timeout } => (
            "PUT",
            "/memory",
            serde_json::json!({ "requested_size": size, "timeout_ms": timeout * 1000 }).to_string(),
        ),
        Command::SendRaw => {
            let mut request = Vec::new();
            if let Err(e) = std::io::stdin().read_to_end(&mut request) {
                eprintln!("microvm-ctl: cannot read stdin: {e}");
                return ExitCode::FAILURE;
            }
            return match exchange(&cli.socket, &request) {
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
    match request(&cli.socket, method, path, &body) {
        Ok((200, body)) => {
            let incomplete = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .is_some_and(|v| v["done"] == false);
            let pretty = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| serde_json::to_string_pretty(&v).ok())
                .unwrap_or(body);
            println!("{pretty}");
            if incomplete {
                eprintln!(
                    "microvm-ctl: the guest did not reach the requested size before the timeout"
                );
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
