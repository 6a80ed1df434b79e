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
        SerialConfig::File { path, max } => {
            let file: File = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| ConsoleError::OpenFile {
                    path: path.display().to_string(),
                    source,
                })?;
            Box::new(Capped::new(file, max.0))
        }
    })
}

/// Passes at most `left` bytes on, then one line saying so, then drops
/// everything: a guest must not fill the host's disk through its console.
/// Dropped output is reported as written, so the UART never stalls.
struct Capped<W: Write> {
    inner: W,
    left: u64,
    noted: bool,
}

impl<W: Write> Capped<W> {
    fn new(inner: W, max: u64) -> Capped<W> {
        Capped {
            inner,
            left: max,
            noted: false,
        }
    }
}

const CAP_NOTE: &[u8] = b"\n[microvm: serial output cap reached; further output dropped]\n";

impl<W: Write> Write for Capped<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.left == 0 {
            if !self.noted {
                self.noted = true;
                let _ = self.inner.write_all(CAP_NOTE);
            }
            return Ok(buf.len());
        }
        let take = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let written = self.inner.write(&buf[..take])?;
        self.left -= written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_output_stops_at_its_cap_with_one_note() {
        let mut capped = Capped::new(Vec::new(), 10);
        for _ in 0..100 {
            capped.write_all(b"0123456789abcdef").unwrap();
        }
        capped.write_all(b"more").unwrap();
        let mut expected = b"0123456789".to_vec();
        expected.extend_from_slice(CAP_NOTE);
        assert_eq!(capped.inner, expected);
    }

    #[test]
    fn a_serial_file_keeps_at_most_its_cap() {
        let path = std::env::temp_dir().join(format!("microvm-serial-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let config = SerialConfig::File {
            path: path.clone(),
            max: crate::config::Size(4096),
        };
        let mut output = serial_output(&config).unwrap();
        for _ in 0..10_000 {
            output.write_all(b"guest output line\n").unwrap();
        }
        drop(output);
        let size = std::fs::metadata(&path).unwrap().len();
        assert_eq!(size, 4096 + CAP_NOTE.len() as u64);
        std::fs::remove_file(path).unwrap();
    }
}
