//! The 16550 serial console: vm-superio's UART on the I/O bus, its interrupt
//! raised through an eventfd that KVM injects as an irqfd.

use std::io::{self, Write};

use vm_superio::{serial::NoEvents, Serial, Trigger};
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

pub struct SerialDevice {
    uart: Serial<EventFdTrigger, NoEvents, SerialOutput>,
}

impl SerialDevice {
    pub fn new(interrupt: EventFd, output: SerialOutput) -> SerialDevice {
        SerialDevice {
            uart: Serial::new(EventFdTrigger::new(interrupt), output),
        }
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
    fn input_beyond_the_fifo_is_dropped_not_blocking() {
        let irq = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let mut serial = SerialDevice::new(irq, Box::new(io::sink()));
        let accepted = serial.enqueue_input(&[b'x'; 1000]);
        assert!(accepted > 0 && accepted < 1000);
        assert_eq!(serial.enqueue_input(b"more"), 0);
    }
}
