//! Legacy PC platform devices a Linux guest expects: where COM1 lives, the
//! i8042 controller's reset line, and the ACPI sleep/reset registers of a
//! hardware-reduced platform.

use crate::bus::BusDevice;
use crate::exit::{ExitReason, ExitSignal};

pub const SERIAL_COM1_BASE: u16 = 0x3f8;
pub const SERIAL_COM1_LEN: u64 = 8;
pub const SERIAL_COM1_IRQ: u32 = 4;

/// The i8042 keyboard controller, reduced to what guests use it for here:
/// `reboot=k` resets the machine by writing 0xfe to its command port.
pub struct I8042 {
    exit: ExitSignal,
}

impl I8042 {
    pub const BASE: u16 = 0x60;
    pub const LEN: u64 = 5;
    const COMMAND_OFFSET: u64 = 4;
    const CMD_PULSE_RESET: u8 = 0xfe;

    pub fn new(exit: ExitSignal) -> I8042 {
        I8042 { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: no data waiting, input buffer empty, so guests never spin.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == Self::COMMAND_OFFSET && data.first() == Some(&Self::CMD_PULSE_RESET) {
            self.exit.request(ExitReason::Reset);
        }
    }
}

/// ACPI sleep control/status and reset registers (FADT of a hardware-reduced
/// platform). Writing SLP_EN with the \_S5 sleep type powers the VM off.
pub struct AcpiPm {
    exit: ExitSignal,
    s5_sleep_type: u8,
}

impl AcpiPm {
    pub const BASE: u16 = 0x3c0;
    pub const LEN: u64 = 3;
    pub const SLEEP_CONTROL_PORT: u16 = Self::BASE;
    pub const SLEEP_STATUS_PORT: u16 = Self::BASE + 1;
    pub const RESET_PORT: u16 = Self::BASE + 2;
    pub const RESET_VALUE: u8 = 1;
    /// Sleep control register layout (ACPI 6.x, 4.8.3.7).
    const SLP_EN: u8 = 1 << 5;
    const SLP_TYP_SHIFT: u8 = 2;
    const SLP_TYP_MASK: u8 = 0b111;

    pub fn new(exit: ExitSignal, s5_sleep_type: u8) -> AcpiPm {
        AcpiPm {
            exit,
            s5_sleep_type,
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset + u64::from(Self::BASE) {
            port if port == u64::from(Self::SLEEP_CONTROL_PORT) => {
                let sleep_type = (value >> Self::SLP_TYP_SHIFT) & Self::SLP_TYP_MASK;
                if value & Self::SLP_EN != 0 && sleep_type == self.s5_sleep_type {
                    self.exit.request(ExitReason::PowerOff);
                }
            }
            port if port == u64::from(Self::RESET_PORT) && value == Self::RESET_VALUE => {
                self.exit.request(ExitReason::Reset);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn i8042_reset_command_requests_reset() {
        let exit = ExitSignal::new().unwrap();
        let mut i8042 = I8042::new(exit.clone());
        i8042.write(0, &[0xfe]);
        assert_eq!(exit.reason(), None, "data port writes are not commands");
        i8042.write(4, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }

    #[test]
    fn s5_with_slp_en_powers_off_other_sleep_states_do_not() {
        let exit = ExitSignal::new().unwrap();
        let mut pm = AcpiPm::new(exit.clone(), 5);
        pm.write(0, &[(3 << 2) | 0x20]); // S3 is not supported: ignored
        pm.write(0, &[5 << 2]); // no SLP_EN: ignored
        assert_eq!(exit.reason(), None);
        pm.write(0, &[(5 << 2) | 0x20]);
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
    }

    #[test]
    fn reset_register_requests_reset() {
        let exit = ExitSignal::new().unwrap();
        let mut pm = AcpiPm::new(exit.clone(), 5);
        pm.write(2, &[0]);
        assert_eq!(exit.reason(), None);
        pm.write(2, &[AcpiPm::RESET_VALUE]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }
}
