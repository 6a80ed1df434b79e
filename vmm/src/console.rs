//! The host side of the serial console: where guest output goes, and host
//! terminal input forwarded to the guest (raw mode while the VM runs).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use devices::serial::{SerialDevice, SerialOutput};
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::terminal::Terminal;

use crate::config::SerialConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("cannot open serial output file '{path}': {source}")]
    OpenFile { path: String, source: io::Error },
}

/// Unbuffered stdout: the guest writes a byte per exit and an interactive
/// prompt has no newline to flush on.
struct RawStdout;

impl Write for RawStdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        io::stdout().lock().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        io::stdout().lock().flush()
    }
}

/// Where the guest's serial output goes.
pub fn serial_output(config: &SerialConfig) -> Result<SerialOutput, ConsoleError> {
    Ok(match config {
        SerialConfig::Stdout => Box::new(RawStdout),
        SerialConfig::Off => Box::new(io::sink()),
        SerialConfig::File(path) => {
            let file: File = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| ConsoleError::OpenFile {
                    path: path.display().to_string(),
                    source,
                })?;
            Box::new(file)
        }
    })
}

/// Puts stdin in raw mode for as long as it lives, so keystrokes (Ctrl-C
/// included) reach the guest; restores canonical mode on drop.
pub struct RawTerminal {
    _private: (),
}

impl RawTerminal {
    /// Raw mode if stdin is a terminal; `None` otherwise.
    pub fn enter() -> Option<RawTerminal> {
        // SAFETY: isatty only inspects the descriptor number.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return None;
        }
        io::stdin().lock().set_raw_mode().ok()?;
        Some(RawTerminal { _private: () })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = io::stdin().lock().set_canon_mode();
    }
}

/// Forwards bytes typed on the host terminal to the guest's UART.
pub struct StdinForwarder {
    serial: Arc<Mutex<SerialDevice>>,
}

impl StdinForwarder {
    pub fn new(serial: Arc<Mutex<SerialDevice>>) -> StdinForwarder {
        StdinForwarder { serial }
    }
}

impl MutEventSubscriber for StdinForwarder {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buffer = [0u8; 64];
        let stdin = io::stdin();
        let closed = events
            .event_set()
            .intersects(EventSet::HANG_UP | EventSet::ERROR);
        match stdin.lock().read(&mut buffer) {
            // End of input, or a broken terminal: stop watching stdin, keep the VM.
            Ok(0) => {
                let _ = ops.remove(events);
            }
            Err(_) if closed => {
                let _ = ops.remove(events);
            }
            Ok(n) => {
                let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
                serial.enqueue_input(&buffer[..n]);
            }
            Err(_) => {}
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let stdin_fd = io::stdin().as_raw_fd();
        let _ = ops.add(Events::with_data_raw(
            stdin_fd,
            stdin_fd as u32,
            EventSet::IN,
        ));
    }
}
