//! The 16550 serial console: vm-superio's UART on the I/O bus, its interrupt
//! raised through an eventfd that KVM injects as an irqfd.

use std::io::{self, Write};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Raises the serial interrupt by signalling an irqfd-registered eventfd.
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    pub fn new(event: EventFd) -> EventFdTrigger {
        EventFdTrigger(event)
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

pub type SerialOutput = Box<dyn Write + Send>;

/// The UART's registers and receive FIFO, as plain data (vm-superio's
/// `SerialState`, which has no serde of its own).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// A UART as it is at reset.
impl Default for SerialSnapshot {
    fn default() -> SerialSnapshot {
        SerialState::default().into()
    }
}

impl From<SerialState> for SerialSnapshot {
    fn from(s: SerialState) -> SerialSnapshot {
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for SerialState {
    fn from(s: &SerialSnapshot) -> SerialState {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the serial port's saved state does not fit a 16550: {0}")]
pub struct SerialRestoreError(String);

pub struct SerialDevice {
    uart: Serial<EventFdTrigger, NoEvents, SerialOutput>,
}

impl SerialDevice {
    pub fn new(interrupt: EventFd, output: SerialOutput) -> SerialDevice {
        SerialDevice {
            uart: Serial::new(EventFdTrigger::new(interrupt), output),
        }
    }

    /// A UART that goes on from `saved` (a restore).
    pub fn from_snapshot(
        interrupt: EventFd,
        output: SerialOutput,
        saved: &SerialSnapshot,
    ) -> Result<SerialDevice, SerialRestoreError> {
        let uart = Serial::from_state(
            &SerialState::from(saved),
            EventFdTrigger::new(interrupt),
            NoEvents,
            output,
        )
        .map_err(|e| SerialRestoreError(format!("{e:?}")))?;
        Ok(SerialDevice { uart })
    }

    pub fn snapshot(&self) -> SerialSnapshot {
        self.uart.state().into()
    }

    /// Feeds host input to the guest; returns how many bytes fit in the FIFO
    /// (the rest is dropped, as a real UART drops overrun input).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        self.uart.enqueue_raw_bytes(&bytes[..room]).unwrap_or(0)
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(offset), [byte, rest @ ..]) = (u8::try_from(offset), data) {
            *byte = self.uart.read(offset);
            rest.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), Some(&value)) = (u8::try_from(offset), data.first()) {
            // Output errors (a closed stdout) must not stop the guest; the
            // interrupt error can only be a failed eventfd write.
            let _ = self.uart.write(offset, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuffer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    const THR: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;
    const LSR_DATA_READY: u8 = 1;
    const IER_RX_DATA: u8 = 1;

    #[test]
    fn guest_writes_reach_the_output() {
        let out = SharedBuffer::default();
        let irq = EventFd::new(0).unwrap();
        let mut serial = SerialDevice::new(irq, Box::new(out.clone()));
        for b in b"hi\n" {
            serial.write(THR, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn host_input_is_readable_and_raises_the_interrupt() {
        let irq = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let mut serial = SerialDevice::new(irq.try_clone().unwrap(), Box::new(io::sink()));
        serial.write(IER, &[IER_RX_DATA]);
        assert_eq!(serial.enqueue_input(b"ok"), 2);
        assert!(irq.read().unwrap() >= 1, "input must raise the interrupt");
        let mut lsr = [0u8];
        serial.read(LSR, &mut lsr);
        assert_ne!(lsr[0] & LSR_DATA_READY, 0);
        let mut byte = [0u8];
        serial.read(THR, &mut byte);
        assert_eq!(byte, [b'o']);
    }

    #[test]
    fn a_uart_restored_from_its_snapshot_has_its_registers_and_unread_input() {
        const SCRATCH: u64 = 7;
        let irq = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let mut serial = SerialDevice::new(irq, Box::new(io::sink()));
        serial.write(IER, &[IER_RX_DATA]);
        serial.write(SCRATCH, &[0x5a]);
        serial.enqueue_input(b"ab");
        let saved = serial.snapshot();
        let text = serde_json::to_string(&saved).unwrap();
        let saved: SerialSnapshot = serde_json::from_str(&text).unwrap();

        let irq = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let mut restored = SerialDevice::from_snapshot(irq, Box::new(io::sink()), &saved).unwrap();
        assert_eq!(restored.snapshot(), saved);
        let read = |serial: &mut SerialDevice, offset| {
            let mut byte = [0u8];
            serial.read(offset, &mut byte);
            byte[0]
        };
        assert_eq!(read(&mut restored, SCRATCH), 0x5a);
        assert_eq!(read(&mut restored, IER), IER_RX_DATA);
        assert_eq!(read(&mut restored, THR), b'a', "unread input came along");
        // A FIFO larger than a 16550's is refused, not truncated.
        let too_much = SerialSnapshot {
            in_buffer: vec![0; 1000],
            ..saved
        };
        let irq = EventFd::new(0).unwrap();
        assert!(SerialDevice::from_snapshot(irq, Box::new(io::sink()), &too_much).is_err());
    }

    #[test]
    fn input_beyond_the_fifo_is_dropped_not_blocking() {
        let irq = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let mut serial = SerialDevice::new(irq, Box::new(io::sink()));
        let accepted = serial.enqueue_input(&[b'x'; 1000]);
        assert!(accepted > 0 && accepted < 1000);
        assert_eq!(serial.enqueue_input(b"more"), 0);
    }
}
