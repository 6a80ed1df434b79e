//! MSI-X: the capability in config space, and the vector table and pending
//! bit array that live in a BAR. Every change the guest makes to an entry,
//! its mask, or the function's enable/mask bits becomes a route update.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::interrupt::{MsiMessage, MsiRouter, MsiVector};

pub const CAPABILITY_ID: u8 = 0x11;
const ENTRY_SIZE: u64 = 16;
const ENTRY_VECTOR_MASKED: u32 = 1;
/// Message control bits (upper half of the capability's first dword).
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;

#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    address_low: u32,
    address_high: u32,
    data: u32,
    control: u32,
}

impl Entry {
    fn masked(&self) -> bool {
        self.control & ENTRY_VECTOR_MASKED != 0
    }

    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: (u64::from(self.address_high) << 32) | u64::from(self.address_low),
            data: self.data,
        }
    }
}

/// The vector table and pending bits as the guest left them (plain data: a
/// snapshot). The function's enable and mask bits live in config space.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    /// Each entry's address low, address high, data and vector control.
    pub entries: Vec<[u32; 4]>,
    pub pending: Vec<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum MsixRestoreError {
    #[error("the saved MSI-X table has {saved} entries and {pending} pending bits; the device has {count} vectors")]
    TableSize {
        saved: usize,
        pending: usize,
        count: usize,
    },
}

pub struct Msix {
    entries: Vec<Entry>,
    vectors: Vec<MsiVector>,
    router: Arc<dyn MsiRouter>,
    enabled: bool,
    function_masked: bool,
    /// Set when an interrupt was requested while its vector was masked.
    pending: Vec<bool>,
    /// Whether each vector currently has a route.
    routed: Vec<bool>,
}

impl Msix {
    /// A table of one entry per vector, all masked as at reset.
    pub fn new(vectors: Vec<MsiVector>, router: Arc<dyn MsiRouter>) -> Msix {
        let count = vectors.len();
        Msix {
            entries: vec![
                Entry {
                    control: ENTRY_VECTOR_MASKED,
                    ..Default::default()
                };
                count
            ],
            vectors,
            router,
            enabled: false,
            function_masked: false,
            pending: vec![false; count],
            routed: vec![false; count],
        }
    }

    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * ENTRY_SIZE
    }

    pub fn pba_size(&self) -> u64 {
        (self.entries.len() as u64).div_ceil(64) * 8
    }

    /// The capability body (after ID and next): message control, table and
    /// PBA location (BAR index in the low 3 bits). Writable: enable and mask.
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> (Vec<u8>, Vec<u8>) {
        let control = (self.entries.len() as u16).saturating_sub(1);
        let mut body = control.to_le_bytes().to_vec();
        body.extend_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        body.extend_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        let mut writable = vec![0u8; body.len()];
        writable[1] = ((CONTROL_ENABLE | CONTROL_FUNCTION_MASK) >> 8) as u8;
        (body, writable)
    }

    /// The table and pending bits (a snapshot).
    pub fn state(&self) -> MsixState {
        MsixState {
            entries: self
                .entries
                .iter()
                .map(|e| [e.address_low, e.address_high, e.data, e.control])
                .collect(),
            pending: self.pending.clone(),
        }
    }

    /// Puts back a table and pending bits a snapshot saved, before the
    /// function's enable bit is (by [`Msix::set_control`], from config
    /// space): that routes each vector deliverable then. Refused, changing
    /// nothing, when the table is not this function's size.
    pub fn restore(&mut self, state: &MsixState) -> Result<(), MsixRestoreError> {
        let count = self.entries.len();
        if state.entries.len() != count || state.pending.len() != count {
            return Err(MsixRestoreError::TableSize {
                saved: state.entries.len(),
                pending: state.pending.len(),
                count,
            });
        }
        for (entry, saved) in self.entries.iter_mut().zip(&state.entries) {
            let [address_low, address_high, data, control] = *saved;
            *entry = Entry {
                address_low,
                address_high,
                data,
                control: control & ENTRY_VECTOR_MASKED,
            };
        }
        self.pending.clone_from(&state.pending);
        Ok(())
    }

    /// Called after the guest wrote the capability's message control.
    pub fn set_control(&mut self, control: u16) {
        let enabled = control & CONTROL_ENABLE != 0;
        let masked = control & CONTROL_FUNCTION_MASK != 0;
        if enabled != self.enabled || masked != self.function_masked {
            self.enabled = enabled;
            self.function_masked = masked;
            for vector in 0..self.entries.len() {
                self.update_route(vector);
            }
        }
    }

    fn deliverable(&self, vector: usize) -> bool {
        self.enabled && !self.function_masked && !self.entries[vector].masked()
    }

    fn update_route(&mut self, vector: usize) {
        let message = self
            .deliverable(vector)
            .then(|| self.entries[vector].message());
        // A routing failure leaves the vector silent; there is no one to tell
        // but the guest, which sees a device that does not interrupt.
        let _ = self.router.route(self.vectors[vector].gsi, message);
        let was_routed = std::mem::replace(&mut self.routed[vector], message.is_some());
        // The pending bit stays set until the vector can be delivered.
        let pending = message.is_some() && std::mem::take(&mut self.pending[vector]);
        // Backends like vhost signal the irqfd directly, so an interrupt
        // raised while the vector had no route was dropped by KVM and the
        // VMM cannot know. Linux masks a vector to move it (typically on its
        // first interrupt): fire once on every unmask, as the pending bit
        // would have, rather than lose one. Virtio drivers treat a spurious
        // interrupt as a no-op.
        if message.is_some() && (pending || !was_routed) {
            let _ = self.vectors[vector].trigger();
        }
    }

    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        let (index, field) = (offset / ENTRY_SIZE, offset % ENTRY_SIZE);
        let Some(entry) = usize::try_from(index)
            .ok()
            .and_then(|index| self.entries.get(index))
        else {
            data.fill(0);
            return;
        };
        let words = [
            entry.address_low,
            entry.address_high,
            entry.data,
            entry.control,
        ];
        let mut bytes = [0u8; 16];
        for (i, word) in words.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&word.to_le_bytes());
        }
        match byte_range(field, data.len()).and_then(|r| bytes.get(r)) {
            Some(slice) => data.copy_from_slice(slice),
            None => data.fill(0),
        }
    }

    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let (Ok(index), Some(field)) = (
            usize::try_from(offset / ENTRY_SIZE),
            byte_range(offset % ENTRY_SIZE, data.len()).filter(|r| r.end <= 16),
        ) else {
            return;
        };
        let Some(entry) = self.entries.get_mut(index) else {
            return;
        };
        let mut bytes = [0u8; 16];
        for (i, word) in [
            entry.address_low,
            entry.address_high,
            entry.data,
            entry.control,
        ]
        .iter()
        .enumerate()
        {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&word.to_le_bytes());
        }
        bytes[field].copy_from_slice(data);
        let word =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let before = *entry;
        *entry = Entry {
            address_low: word(0),
            address_high: word(4),
            data: word(8),
            control: word(12) & ENTRY_VECTOR_MASKED,
        };
        let changed = before.message() != entry.message() || before.masked() != entry.masked();
        if changed {
            self.update_route(index);
        }
    }

    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let mut bits = vec![0u8; self.pba_size() as usize];
        for (i, pending) in self.pending.iter().enumerate() {
            if *pending {
                bits[i / 8] |= 1 << (i % 8);
            }
        }
        match byte_range(offset, data.len()).and_then(|r| bits.get(r)) {
            Some(slice) => data.copy_from_slice(slice),
            None => data.fill(0),
        }
    }

    /// Raises `vector`, or marks it pending if the guest masked it.
    pub fn notify(&mut self, vector: usize) {
        if vector >= self.vectors.len() {
            return;
        }
        if self.deliverable(vector) {
            let _ = self.vectors[vector].trigger();
        } else {
            self.pending[vector] = true;
        }
    }

    /// The irqfd of `vector`, for backends that signal interrupts directly
    /// (vhost-vdpa's call eventfds).
    pub fn vector(&self, vector: usize) -> Option<&MsiVector> {
        self.vectors.get(vector)
    }

    pub fn vector_count(&self) -> usize {
        self.vectors.len()
    }
}

/// [offset, offset + len) as indices, if representable.
fn byte_range(offset: u64, len: usize) -> Option<std::ops::Range<usize>> {
    let start = usize::try_from(offset).ok()?;
    Some(start..start.checked_add(len)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[derive(Default)]
    struct RecordingRouter(Mutex<Vec<(u32, Option<MsiMessage>)>>);

    impl MsiRouter for RecordingRouter {
        fn route(&self, gsi: u32, message: Option<MsiMessage>) -> std::io::Result<()> {
            self.0.lock().unwrap().push((gsi, message));
            Ok(())
        }
    }

    fn msix(count: u32) -> (Msix, Arc<RecordingRouter>) {
        let router = Arc::new(RecordingRouter::default());
        let vectors = (0..count)
            .map(|i| MsiVector {
                gsi: 24 + i,
                event: EventFd::new(EFD_NONBLOCK).unwrap(),
            })
            .collect();
        (Msix::new(vectors, router.clone()), router)
    }

    fn program(msix: &mut Msix, vector: u64, address: u64, data: u32, masked: bool) {
        let base = vector * ENTRY_SIZE;
        msix.write_table(base, &(address as u32).to_le_bytes());
        msix.write_table(base + 4, &((address >> 32) as u32).to_le_bytes());
        msix.write_table(base + 8, &data.to_le_bytes());
        msix.write_table(base + 12, &u32::from(masked).to_le_bytes());
    }

    #[test]
    fn unmasked_entry_of_an_enabled_function_is_routed() {
        let (mut msix, router) = msix(2);
        program(&mut msix, 1, 0xfee0_0000, 0x4041, false);
        assert!(
            router.0.lock().unwrap().iter().all(|(_, m)| m.is_none()),
            "not enabled yet"
        );
        msix.set_control(CONTROL_ENABLE);
        let routes = router.0.lock().unwrap().clone();
        assert!(routes.contains(&(
            25,
            Some(MsiMessage {
                address: 0xfee0_0000,
                data: 0x4041
            })
        )));
        assert!(routes.contains(&(24, None)), "vector 0 stays masked");
    }

    #[test]
    fn a_saved_table_is_routed_in_a_new_function_once_it_is_enabled() {
        let (mut msix_a, _) = msix(2);
        program(&mut msix_a, 1, 0xfee0_1000, 0x4042, false);
        msix_a.notify(0);
        let state = msix_a.state();
        assert_eq!(state.pending, vec![true, false]);

        let (mut copy, router) = msix(2);
        copy.restore(&state).unwrap();
        assert_eq!(copy.state(), state);
        assert!(router.0.lock().unwrap().is_empty(), "nothing routed yet");
        copy.set_control(CONTROL_ENABLE);
        let routes = router.0.lock().unwrap().clone();
        assert!(routes.contains(&(
            25,
            Some(MsiMessage {
                address: 0xfee0_1000,
                data: 0x4042
            })
        )));

        let (mut small, _) = msix(1);
        let error = small.restore(&state).unwrap_err().to_string();
        assert!(error.contains("2 entries"), "{error}");
        assert_eq!(small.state().entries.len(), 1);
    }

    #[test]
    fn masked_interrupts_become_pending_and_fire_on_unmask() {
        let (mut msix, _router) = msix(1);
        msix.set_control(CONTROL_ENABLE);
        program(&mut msix, 0, 0xfee0_0000, 0x30, true);
        msix.notify(0);
        let mut pba = [0u8; 8];
        msix.read_pba(0, &mut pba);
        assert_eq!(pba[0], 1);
        assert!(
            msix.vectors[0].event.read().is_err(),
            "nothing delivered while masked"
        );
        msix.write_table(12, &0u32.to_le_bytes());
        assert_eq!(
            msix.vectors[0].event.read().unwrap(),
            1,
            "delivered on unmask"
        );
        msix.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
    }

    #[test]
    fn pending_stays_set_while_the_vector_is_masked() {
        let (mut msix, _router) = msix(1);
        program(&mut msix, 0, 0xfee0_0000, 0x30, true);
        msix.notify(0);
        let pba = |msix: &Msix| {
            let mut pba = [0u8; 8];
            msix.read_pba(0, &mut pba);
            pba[0]
        };
        assert_eq!(pba(&msix), 1);
        // Rewriting a masked entry, enabling the function with the vector
        // still masked, or masking the whole function keeps it pending.
        msix.write_table(8, &0x31u32.to_le_bytes());
        assert_eq!(pba(&msix), 1, "after rewriting the masked entry");
        msix.set_control(CONTROL_ENABLE);
        assert_eq!(pba(&msix), 1, "after enabling with the vector masked");
        msix.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        msix.write_table(12, &0u32.to_le_bytes());
        assert_eq!(pba(&msix), 1, "unmasked entry of a masked function");
        assert!(msix.vectors[0].event.read().is_err(), "nothing delivered");
        msix.set_control(CONTROL_ENABLE);
        assert_eq!(msix.vectors[0].event.read().unwrap(), 1);
        assert_eq!(pba(&msix), 0, "cleared once delivered");
    }

    #[test]
    fn unmasking_fires_once_because_an_irqfd_interrupt_may_have_been_dropped() {
        let (mut msix, _router) = msix(1);
        msix.set_control(CONTROL_ENABLE);
        program(&mut msix, 0, 0xfee0_0000, 0x30, false);
        assert_eq!(msix.vectors[0].event.read().unwrap(), 1, "first route");
        // Linux moves a vector: mask, rewrite, unmask.
        msix.write_table(12, &1u32.to_le_bytes());
        msix.write_table(8, &0x31u32.to_le_bytes());
        assert!(
            msix.vectors[0].event.read().is_err(),
            "nothing while masked"
        );
        msix.write_table(12, &0u32.to_le_bytes());
        assert_eq!(msix.vectors[0].event.read().unwrap(), 1, "fired on unmask");
        // A rewrite that keeps the vector routed does not fire.
        msix.write_table(0, &0xfee0_1000u32.to_le_bytes());
        assert!(msix.vectors[0].event.read().is_err());
    }

    #[test]
    fn huge_offsets_read_as_zero_and_write_nothing() {
        let (mut msix, router) = msix(2);
        for offset in [ENTRY_SIZE * 2, u64::MAX - 3, u64::MAX] {
            let mut data = [0xaau8; 4];
            msix.read_table(offset, &mut data);
            assert_eq!(data, [0; 4], "table at {offset:#x}");
            let mut data = [0xaau8; 8];
            msix.read_pba(offset, &mut data);
            assert_eq!(data, [0; 8], "PBA at {offset:#x}");
            msix.write_table(offset, &[0; 4]);
        }
        assert!(router.0.lock().unwrap().is_empty(), "no entry changed");
    }

    #[test]
    fn table_reads_back_what_was_written() {
        let (mut msix, _router) = msix(3);
        program(&mut msix, 2, 0x1_2345_6780, 7, false);
        let mut data = [0u8; 4];
        msix.read_table(2 * ENTRY_SIZE + 4, &mut data);
        assert_eq!(u32::from_le_bytes(data), 1);
        msix.read_table(2 * ENTRY_SIZE + 8, &mut data);
        assert_eq!(u32::from_le_bytes(data), 7);
        let (body, writable) = msix.capability(0, 0x4000, 0x5000);
        assert_eq!(
            u16::from_le_bytes([body[0], body[1]]),
            2,
            "table size is N-1"
        );
        assert_eq!(writable[1], 0xc0);
    }
}
