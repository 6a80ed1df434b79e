//! What memory hotplug means on the host: every guest PLUG or UNPLUG is one
//! transaction for each vDPA device's DMA-mapping engine (so each device
//! sees one batch per request), and unplugged memory is released — hole
//! punched in its memfd — only once no device can reach it any more.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use devices::dma::{CommitReport, DmaError, DmaMapper, DmaRange, Perm, VhostVdpaIotlb};
use devices::virtio::mem::HotplugBackend;

type Mapper = Arc<Mutex<DmaMapper<VhostVdpaIotlb>>>;

/// How many transaction records `history` keeps.
const HISTORY_LEN: usize = 64;

/// What one device was sent for one guest request.
#[derive(Clone, Debug)]
pub struct DeviceTransaction {
    pub device: String,
    pub updates: u32,
    pub invalidates: u32,
    pub batched: bool,
    /// From the guest's request reaching the VMM to this device's END.
    pub micros_to_end: u64,
}

#[derive(Clone, Debug)]
pub struct TransactionRecord {
    pub sequence: u64,
    pub kind: &'static str,
    pub ranges: Vec<(u64, u64)>,
    pub devices: Vec<DeviceTransaction>,
    pub error: Option<String>,
}

pub struct DmaHotplug {
    region_addr: u64,
    region_host: u64,
    file: File,
    mappers: Vec<(String, Mapper)>,
    history: Mutex<(u64, VecDeque<TransactionRecord>)>,
}

fn lock(mapper: &Mapper) -> MutexGuard<'_, DmaMapper<VhostVdpaIotlb>> {
    mapper.lock().unwrap_or_else(|p| p.into_inner())
}

impl DmaHotplug {
    pub fn new(
        region_addr: u64,
        region_host: u64,
        file: File,
        mappers: Vec<(String, Mapper)>,
    ) -> DmaHotplug {
        DmaHotplug {
            region_addr,
            region_host,
            file,
            mappers,
            history: Mutex::new((0, VecDeque::new())),
        }
    }

    /// The latest transactions, oldest first.
    pub fn history(&self) -> Vec<TransactionRecord> {
        let history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        history.1.iter().cloned().collect()
    }

    fn record(
        &self,
        kind: &'static str,
        ranges: &[(u64, u64)],
        devices: Vec<DeviceTransaction>,
        error: Option<String>,
    ) {
        let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        history.0 += 1;
        let sequence = history.0;
        if history.1.len() == HISTORY_LEN {
            history.1.pop_front();
        }
        history.1.push_back(TransactionRecord {
            sequence,
            kind,
            ranges: ranges.to_vec(),
            devices,
            error,
        });
    }

    fn dma_range(&self, (gpa, size): (u64, u64)) -> DmaRange {
        DmaRange::new(
            gpa,
            size,
            self.region_host + (gpa - self.region_addr),
            Perm::ReadWrite,
        )
    }

    /// Commits the same change to every device; if one refuses, the devices
    /// already changed are put back, so no partial mapping remains.
    fn apply(&self, kind: &'static str, plug: bool, ranges: &[(u64, u64)]) -> Result<(), String> {
        let started = Instant::now();
        let mut done: Vec<DeviceTransaction> = Vec::new();
        for (index, (id, mapper)) in self.mappers.iter().enumerate() {
            match self.commit(mapper, plug, ranges) {
                Ok(report) => done.push(DeviceTransaction {
                    device: id.clone(),
                    updates: report.updates,
                    invalidates: report.invalidates,
                    batched: report.batched,
                    micros_to_end: started.elapsed().as_micros() as u64,
                }),
                Err(e) => {
                    let error = format!("{id}: {e}");
                    self.undo(plug, ranges, &self.mappers[..index]);
                    self.record(kind, ranges, done, Some(error.clone()));
                    return Err(error);
                }
            }
        }
        self.record(kind, ranges, done, None);
        Ok(())
    }

    /// One transaction on one device: map `ranges` (`add`) or unmap them.
    fn commit(
        &self,
        mapper: &Mapper,
        add: bool,
        ranges: &[(u64, u64)],
    ) -> Result<CommitReport, DmaError> {
        let mut mapper = lock(mapper);
        let mut transaction = mapper.begin(0);
        for &range in ranges {
            if add {
                transaction.add(self.dma_range(range));
            } else {
                transaction.remove(range.0, range.1);
            }
        }
        mapper.commit(transaction)
    }

    fn undo(&self, plugged: bool, ranges: &[(u64, u64)], mappers: &[(String, Mapper)]) {
        for (_, mapper) in mappers {
            // If even this fails the engine has restored its own state and
            // the device needs a reset; the guest's request fails either way.
            let _ = self.commit(mapper, !plugged, ranges);
        }
    }

    /// Gives the memory of `ranges` back to the host.
    fn release(&self, ranges: &[(u64, u64)]) -> Result<(), String> {
        for &(gpa, size) in ranges {
            let offset = gpa - self.region_addr;
            // SAFETY: fallocate on a memfd we own, within its size; punching
            // a hole only drops page contents, the mapping stays valid.
            let ret = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset as libc::off_t,
                    size as libc::off_t,
                )
            };
            if ret != 0 {
                return Err(format!(
                    "cannot release [{gpa:#x}, +{size:#x}): {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
        Ok(())
    }
}

impl HotplugBackend for DmaHotplug {
    fn plug(&self, ranges: &[(u64, u64)]) -> Result<(), String> {
        self.apply("plug", true, ranges)
    }

    fn unplug(&self, ranges: &[(u64, u64)]) -> Result<(), String> {
        self.apply("unplug", false, ranges)?;
        // Only now can no device reach the memory: release it.
        self.release(ranges)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};

    #[test]
    fn released_memory_reads_as_zeros() {
        let mut file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        file.write_all(&[0xaa; 3 * 4096]).unwrap();
        let hotplug = DmaHotplug::new(1 << 32, 0, file.try_clone().unwrap(), vec![]);
        hotplug.unplug(&[((1 << 32) + 4096, 4096)]).unwrap();
        let mut bytes = vec![0u8; 3 * 4096];
        file.seek(SeekFrom::Start(0)).unwrap();
        file.read_exact(&mut bytes).unwrap();
        assert!(bytes[..4096].iter().all(|b| *b == 0xaa));
        assert!(
            bytes[4096..8192].iter().all(|b| *b == 0),
            "the unplugged block was released"
        );
        assert!(bytes[8192..].iter().all(|b| *b == 0xaa));
        assert_eq!(hotplug.history().len(), 1);
    }
}
