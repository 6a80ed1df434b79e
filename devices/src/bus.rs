//! Routes guest port I/O (and, later, MMIO) accesses to the device that
//! owns the address.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// A device reachable on a bus. Offsets are relative to the device's base.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("device range [{base:#x}, {end:#x}) overlaps an existing device")]
    Overlap { base: u64, end: u64 },
    #[error("device range at {0:#x} is empty")]
    Empty(u64),
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Devices by base address; each entry holds (length, device). The map is
/// behind a lock so devices (PCI BARs) can move while vCPUs run; the lock is
/// never held while a device is called, so a device may move itself.
#[derive(Default)]
pub struct Bus {
    devices: RwLock<BTreeMap<u64, (u64, SharedDevice)>>,
    /// Accesses no device claimed (a guest touching unplugged memory, say).
    unclaimed: AtomicU64,
}

impl Bus {
    pub fn new() -> Bus {
        Bus::default()
    }

    pub fn insert(&self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::Empty(base))?;
        let mut devices = self.devices.write().unwrap_or_else(|p| p.into_inner());
        let overlaps_previous = devices
            .range(..end)
            .next_back()
            .is_some_and(|(&b, &(l, _))| b + l > base);
        if overlaps_previous {
            return Err(BusError::Overlap { base, end });
        }
        devices.insert(base, (len, device));
        Ok(())
    }

    /// Removes the device at exactly `base`; returns whether one was there.
    pub fn remove(&self, base: u64) -> bool {
        let mut devices = self.devices.write().unwrap_or_else(|p| p.into_inner());
        devices.remove(&base).is_some()
    }

    fn resolve(&self, addr: u64) -> Option<(u64, SharedDevice)> {
        let devices = self.devices.read().unwrap_or_else(|p| p.into_inner());
        let (&base, (len, device)) = devices.range(..=addr).next_back()?;
        (addr - base < *len).then(|| (addr - base, device.clone()))
    }

    /// Reads from the device at `addr`; unclaimed addresses read as all ones,
    /// as on real hardware. Returns whether a device answered.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, device)) => {
                lock(&device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                self.unclaimed.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Writes to the device at `addr`; writes to unclaimed addresses are dropped.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, device)) => {
                lock(&device).write(offset, data);
                true
            }
            None => {
                self.unclaimed.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Reads and writes that reached no device so far.
    pub fn unclaimed(&self) -> u64 {
        self.unclaimed.load(Ordering::Relaxed)
    }
}

/// A device whose lock was poisoned by a panic on another thread is still
/// the best state we have; keep serving it rather than cascading the panic.
fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn accesses_reach_the_owning_device_at_its_offset() {
        let device = Arc::new(Mutex::new(Recorder::default()));
        let bus = Bus::new();
        bus.insert(0x3f8, 8, device.clone()).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
        assert!(bus.write(0x3f8, &[0x41]));
        assert_eq!(device.lock().unwrap().writes, vec![(0, vec![0x41])]);
    }

    #[test]
    fn unclaimed_reads_are_all_ones() {
        let bus = Bus::new();
        let mut data = [0u8; 4];
        assert!(!bus.read(0xcfc, &mut data));
        assert_eq!(data, [0xff; 4]);
        assert!(!bus.write(0x80, &[1]));
        assert_eq!(bus.unclaimed(), 2);
    }

    #[test]
    fn overlapping_and_empty_ranges_are_refused() {
        let bus = Bus::new();
        bus.insert(0x60, 5, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
        assert!(matches!(
            bus.insert(0x64, 2, Arc::new(Mutex::new(Recorder::default()))),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0x10, 0, Arc::new(Mutex::new(Recorder::default()))),
            Err(BusError::Empty(_))
        ));
        bus.insert(0x65, 1, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
        bus.insert(0x50, 0x10, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x5f, &mut data));
        assert!(!bus.read(0x66, &mut data));
    }
}
