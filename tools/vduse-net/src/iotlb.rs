//! The device's view of its IOTLB: which IOVA ranges the driver mapped, with what
//! permission, and where each is mapped in this process. Guest buffers are reached only
//! through these mappings (a vm-memory `GuestMemoryMmap` with one region per entry at
//! `GuestAddress(iova)`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use thiserror::Error;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::vduse::VduseError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Perm {
    Ro,
    Wo,
    Rw,
}

impl Perm {
    /// From VDUSE_ACCESS_RO/WO/RW.
    pub fn from_vduse(p: u8) -> Option<Perm> {
        match p {
            1 => Some(Perm::Ro),
            2 => Some(Perm::Wo),
            3 => Some(Perm::Rw),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Perm::Ro => "ro",
            Perm::Wo => "wo",
            Perm::Rw => "rw",
        }
    }

    fn readable(self) -> bool {
        self != Perm::Wo
    }

    fn writable(self) -> bool {
        self != Perm::Ro
    }
}

/// One IOTLB entry as reported by VDUSE_IOTLB_GET_FD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub start: u64,
    pub last: u64,
    pub offset: u64,
    pub perm: Perm,
}

impl Entry {
    /// Bytes covered; `None` for an inverted entry (start > last) and for
    /// one covering all 2^64 bytes, neither of which can be mapped.
    pub fn size(&self) -> Option<u64> {
        self.last.checked_sub(self.start)?.checked_add(1)
    }
}

#[derive(Debug, Error)]
pub enum IotlbError {
    #[error(transparent)]
    Vduse(#[from] VduseError),
    #[error("IOTLB entry [{start:#x},{last:#x}] has unknown permission {perm}")]
    BadPerm { start: u64, last: u64, perm: u8 },
    #[error("writing the IOTLB dump {path}: {source}")]
    Dump { path: String, source: io::Error },
}

/// Why a guest access was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AccessError {
    #[error("IOVA {0:#x} is not covered by any IOTLB mapping")]
    Unmapped(u64),
    #[error("IOVA {0:#x} is mapped without the needed permission")]
    Permission(u64),
    #[error("IOVA {0:#x} is mapped but could not be mapped into the device")]
    NotMapped(u64),
    #[error("buffer at IOVA {0:#x} wraps around the address space")]
    Wrap(u64),
}

/// Where the table gets its entries from (the VDUSE device, or a fake in tests):
/// the first mapping overlapping `[start, last]`, with a file to mmap.
pub trait IotlbSource {
    fn first_mapping(&self, start: u64, last: u64) -> Result<Option<(Entry, File)>, IotlbError>;
}

impl IotlbSource for crate::vduse::Device {
    fn first_mapping(&self, start: u64, last: u64) -> Result<Option<(Entry, File)>, IotlbError> {
        let Some((e, file)) = self.iotlb_get_fd(start, last)? else {
            return Ok(None);
        };
        let perm = Perm::from_vduse(e.perm).ok_or(IotlbError::BadPerm {
            start: e.start,
            last: e.last,
            perm: e.perm,
        })?;
        Ok(Some((
            Entry {
                start: e.start,
                last: e.last,
                offset: e.offset,
                perm,
            },
            file,
        )))
    }
}

struct Mapping {
    entry: Entry,
    /// (st_dev, st_ino) of the backing file, to tell a changed mapping from the same one.
    file_id: (u64, u64),
    /// `None` when the range could not be mapped (logged once).
    region: Option<Arc<GuestRegionMmap>>,
}

/// The result of one refresh.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Change {
    pub added: Vec<Entry>,
    pub removed: Vec<Entry>,
    pub kept: usize,
    /// Messages about entries that could not be mapped.
    pub warnings: Vec<String>,
}

impl Change {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

#[derive(Default)]
pub struct Iotlb {
    maps: BTreeMap<u64, Mapping>,
    memory: Option<GuestMemoryMmap>,
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

fn map_entry(entry: &Entry, file: File) -> Result<Arc<GuestRegionMmap>, String> {
    let page = page_size();
    let len = entry
        .size()
        .ok_or_else(|| "inverted or covering the whole address space".to_string())?;
    if !entry.start.is_multiple_of(page)
        || !entry.offset.is_multiple_of(page)
        || !len.is_multiple_of(page)
    {
        return Err("not page aligned".into());
    }
    // Pages past the end of the file would fault (SIGBUS) on first touch.
    let file_len = file.metadata().map_err(|e| e.to_string())?.len();
    if entry
        .offset
        .checked_add(len)
        .is_none_or(|end| end > file_len)
    {
        return Err(format!("beyond the end of its file ({file_len:#x} bytes)"));
    }
    let len = usize::try_from(len).map_err(|_| "too large".to_string())?;
    // The fd VDUSE hands out is the VMM's own file (VDUSE_IOTLB_GET_FD
    // shares the file; the entry's permission does not change its open
    // mode), so a write-only entry can be mapped writable; `check` keeps
    // the device from reading it. Guests behind an IOMMU map receive
    // buffers write-only (DMA_FROM_DEVICE).
    let prot = match entry.perm {
        Perm::Ro => libc::PROT_READ,
        Perm::Rw | Perm::Wo => libc::PROT_READ | libc::PROT_WRITE,
    };
    let region = MmapRegion::build(
        Some(FileOffset::new(file, entry.offset)),
        len,
        prot,
        libc::MAP_SHARED,
    )
    .map_err(|e| e.to_string())?;
    GuestRegionMmap::new(region, GuestAddress(entry.start))
        .map(Arc::new)
        .ok_or_else(|| "address overflow".into())
}

impl Iotlb {
    pub fn new() -> Iotlb {
        Iotlb::default()
    }

    /// Re-reads `[start, last]` from `src`: maps new entries, keeps unchanged ones and
    /// drops the ones that are gone.
    pub fn refresh(
        &mut self,
        src: &dyn IotlbSource,
        start: u64,
        last: u64,
    ) -> Result<Change, IotlbError> {
        let mut fresh: Vec<(Entry, File)> = Vec::new();
        let mut cur = start;
        while cur <= last {
            let Some((e, f)) = src.first_mapping(cur, last)? else {
                break;
            };
            let next = e.last;
            fresh.push((e, f));
            if next >= last || next < cur {
                break;
            }
            cur = next + 1;
        }

        let mut change = Change::default();
        // Old entries overlapping the range.
        let old: Vec<u64> = self
            .maps
            .values()
            .filter(|m| m.entry.last >= start && m.entry.start <= last)
            .map(|m| m.entry.start)
            .collect();
        let mut old: BTreeMap<u64, Mapping> = old
            .into_iter()
            .filter_map(|k| self.maps.remove(&k).map(|m| (k, m)))
            .collect();

        for (entry, file) in fresh {
            let file_id = file
                .metadata()
                .map(|m| (m.dev(), m.ino()))
                .unwrap_or((0, 0));
            if let Some(m) = old.get(&entry.start) {
                if m.entry == entry && m.file_id == file_id {
                    let m = old.remove(&entry.start).expect("present");
                    self.maps.insert(entry.start, m);
                    change.kept += 1;
                    continue;
                }
            }
            let region = match map_entry(&entry, file) {
                Ok(r) => Some(r),
                Err(why) => {
                    change.warnings.push(format!(
                        "cannot map IOTLB entry [{:#x},{:#x}] {}: {why}",
                        entry.start,
                        entry.last,
                        entry.perm.as_str()
                    ));
                    None
                }
            };
            self.maps.insert(
                entry.start,
                Mapping {
                    entry,
                    file_id,
                    region,
                },
            );
            change.added.push(entry);
        }
        change.removed = old.into_values().map(|m| m.entry).collect();
        self.rebuild_memory();
        Ok(change)
    }

    fn rebuild_memory(&mut self) {
        let regions: Vec<Arc<GuestRegionMmap>> = self
            .maps
            .values()
            .filter_map(|m| m.region.clone())
            .collect();
        // Entries are sorted and never overlap, so this only fails when there is none.
        self.memory = GuestMemoryMmap::from_arc_regions(regions).ok();
    }

    /// The guest memory made of the current mappings (`None` when nothing is mapped).
    pub fn memory(&self) -> Option<&GuestMemoryMmap> {
        self.memory.as_ref()
    }

    /// Bytes of IOVA the entries cover.
    pub fn bytes(&self) -> u64 {
        self.entries().fold(0u64, |sum, e| {
            sum.saturating_add(e.last.saturating_sub(e.start).saturating_add(1))
        })
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.maps.values().map(|m| &m.entry)
    }

    pub fn len(&self) -> usize {
        self.maps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// The entry containing `addr`.
    pub fn entry_of(&self, addr: u64) -> Option<&Entry> {
        self.maps
            .range(..=addr)
            .next_back()
            .map(|(_, m)| &m.entry)
            .filter(|e| e.last >= addr)
    }

    /// Checks that every byte of `[addr, addr + len)` is mapped into this process with
    /// read (or write) permission. Only then may the buffer be touched.
    pub fn check(&self, addr: u64, len: u64, write: bool) -> Result<(), AccessError> {
        if len == 0 {
            return Ok(());
        }
        let end = addr.checked_add(len - 1).ok_or(AccessError::Wrap(addr))?;
        let mut cur = addr;
        loop {
            let m = self
                .maps
                .range(..=cur)
                .next_back()
                .map(|(_, m)| m)
                .filter(|m| m.entry.last >= cur)
                .ok_or(AccessError::Unmapped(cur))?;
            let ok = if write {
                m.entry.perm.writable()
            } else {
                m.entry.perm.readable()
            };
            if !ok {
                return Err(AccessError::Permission(cur));
            }
            if m.region.is_none() {
                return Err(AccessError::NotMapped(cur));
            }
            if m.entry.last >= end {
                return Ok(());
            }
            cur = m.entry.last + 1;
        }
    }

    /// The dump: one line per entry, `<start_hex> <last_hex> <perm>`, sorted by start.
    pub fn dump(&self) -> String {
        format_dump(self.entries())
    }

    /// Rewrites `path` atomically (temporary file + rename) with [`Iotlb::dump`].
    pub fn write_dump(&self, path: &Path) -> Result<(), IotlbError> {
        let err = |source| IotlbError::Dump {
            path: path.display().to_string(),
            source,
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        std::fs::write(&tmp, self.dump()).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }
}

pub fn format_dump<'a>(entries: impl Iterator<Item = &'a Entry>) -> String {
    let mut v: Vec<&Entry> = entries.collect();
    v.sort_by_key(|e| e.start);
    let mut s = String::new();
    for e in v {
        let _ = writeln!(s, "{:#x} {:#x} {}", e.start, e.last, e.perm.as_str());
    }
    s
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::os::fd::FromRawFd;
    use vm_memory::{Bytes, GuestMemoryBackend};

    /// A memfd of `size` bytes.
    pub fn memfd(size: u64) -> File {
        // SAFETY: memfd_create reads a NUL-terminated name from a static C string.
        let fd = unsafe { libc::memfd_create(c"vduse-net-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` is a new descriptor owned by nothing else.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(size).unwrap();
        f
    }

    /// A fake IOTLB: entries over one shared memfd.
    pub struct FakeSource {
        pub file: File,
        pub entries: RefCell<Vec<Entry>>,
        pub calls: RefCell<usize>,
    }

    impl FakeSource {
        pub fn new(size: u64, entries: Vec<Entry>) -> FakeSource {
            FakeSource {
                file: memfd(size),
                entries: RefCell::new(entries),
                calls: RefCell::new(0),
            }
        }
    }

    impl IotlbSource for FakeSource {
        fn first_mapping(
            &self,
            start: u64,
            last: u64,
        ) -> Result<Option<(Entry, File)>, IotlbError> {
            *self.calls.borrow_mut() += 1;
            let mut v = self.entries.borrow().clone();
            v.sort_by_key(|e| e.start);
            Ok(v.into_iter()
                .find(|e| e.last >= start && e.start <= last)
                .map(|e| (e, self.file.try_clone().unwrap())))
        }
    }

    pub fn entry(start: u64, last: u64, offset: u64, perm: Perm) -> Entry {
        Entry {
            start,
            last,
            offset,
            perm,
        }
    }

    #[test]
    fn refresh_maps_keeps_and_drops() {
        let src = FakeSource::new(
            0x40_0000,
            vec![
                entry(0x10_0000, 0x1f_ffff, 0, Perm::Rw),
                entry(0x30_0000, 0x30_0fff, 0x10_0000, Perm::Ro),
            ],
        );
        let mut t = Iotlb::new();
        let c = t.refresh(&src, 0, u64::MAX).unwrap();
        assert_eq!(c.added.len(), 2);
        assert!(c.warnings.is_empty());
        assert_eq!(*src.calls.borrow(), 3);
        assert_eq!(t.dump(), "0x100000 0x1fffff rw\n0x300000 0x300fff ro\n");
        assert_eq!(t.bytes(), 0x10_0000 + 0x1000);

        // Bytes written through IOVA 0x10_0010 land at memfd offset 0x10.
        let mem = t.memory().unwrap();
        mem.write_slice(b"hello", GuestAddress(0x10_0010)).unwrap();
        let mut buf = [0u8; 5];
        use std::os::unix::fs::FileExt;
        src.file.read_exact_at(&mut buf, 0x10).unwrap();
        assert_eq!(&buf, b"hello");
        // The RO entry aliases offset 0x10_0000 of the memfd (= IOVA 0x20_0000, unmapped).
        src.file.write_all_at(b"ro!", 0x10_0000).unwrap();
        let mut buf = [0u8; 3];
        mem.read_slice(&mut buf, GuestAddress(0x30_0000)).unwrap();
        assert_eq!(&buf, b"ro!");
        assert!(mem.address_in_range(GuestAddress(0x30_0fff)));
        assert!(!mem.address_in_range(GuestAddress(0x20_0000)));

        // Second refresh: one entry gone, one new, one unchanged.
        *src.entries.borrow_mut() = vec![
            entry(0x10_0000, 0x1f_ffff, 0, Perm::Rw),
            entry(0x0, 0xfff, 0x20_0000, Perm::Rw),
        ];
        let c = t.refresh(&src, 0, u64::MAX).unwrap();
        assert_eq!(c.kept, 1);
        assert_eq!(c.added, vec![entry(0x0, 0xfff, 0x20_0000, Perm::Rw)]);
        assert_eq!(
            c.removed,
            vec![entry(0x30_0000, 0x30_0fff, 0x10_0000, Perm::Ro)]
        );
        assert_eq!(t.dump(), "0x0 0xfff rw\n0x100000 0x1fffff rw\n");

        // Everything unmapped.
        src.entries.borrow_mut().clear();
        let c = t.refresh(&src, 0, u64::MAX).unwrap();
        assert_eq!(c.removed.len(), 2);
        assert!(t.memory().is_none());
        assert_eq!(t.dump(), "");
    }

    #[test]
    fn partial_refresh_leaves_other_entries() {
        let src = FakeSource::new(
            0x20_0000,
            vec![
                entry(0x1000, 0x1fff, 0, Perm::Rw),
                entry(0x8000, 0x8fff, 0x1000, Perm::Rw),
            ],
        );
        let mut t = Iotlb::new();
        t.refresh(&src, 0, u64::MAX).unwrap();
        src.entries.borrow_mut().pop();
        // Only [0, 0x4fff] is refreshed: 0x8000 stays although the source lost it.
        let c = t.refresh(&src, 0, 0x4fff).unwrap();
        assert_eq!(c.kept, 1);
        assert!(c.removed.is_empty());
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn access_checks() {
        let src = FakeSource::new(
            0x10_0000,
            vec![
                entry(0x1000, 0x1fff, 0, Perm::Rw),
                entry(0x2000, 0x2fff, 0x1000, Perm::Ro),
                entry(0x5000, 0x5fff, 0x2000, Perm::Wo),
                entry(0x7000, 0x7fff, 0x800, Perm::Rw), // offset not page aligned
            ],
        );
        let mut t = Iotlb::new();
        let c = t.refresh(&src, 0, u64::MAX).unwrap();
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert_eq!(t.check(0x1000, 0x2000, false), Ok(()));
        assert_eq!(
            t.check(0x1ff0, 0x20, true),
            Err(AccessError::Permission(0x2000))
        );
        assert_eq!(t.check(0x1ff0, 0x10, true), Ok(()));
        assert_eq!(
            t.check(0x2ff0, 0x20, false),
            Err(AccessError::Unmapped(0x3000))
        );
        assert_eq!(t.check(0x500, 1, false), Err(AccessError::Unmapped(0x500)));
        // Write-only (receive buffers behind an IOMMU): written, never read.
        assert_eq!(t.check(0x5000, 0x1000, true), Ok(()));
        assert_eq!(
            t.check(0x5000, 1, false),
            Err(AccessError::Permission(0x5000))
        );
        assert_eq!(
            t.check(0x7000, 1, false),
            Err(AccessError::NotMapped(0x7000))
        );
        assert_eq!(
            t.check(u64::MAX, 2, false),
            Err(AccessError::Wrap(u64::MAX))
        );
        assert_eq!(t.entry_of(0x2abc).map(|e| e.start), Some(0x2000));
        assert_eq!(t.entry_of(0x3000), None);
    }

    #[test]
    fn whole_space_and_inverted_entries_are_refused_without_overflow() {
        let src = FakeSource::new(
            0x10_0000,
            vec![
                entry(0x1000, 0x1fff, 0, Perm::Rw),
                entry(0x9000, 0x8000, 0, Perm::Rw),
            ],
        );
        let mut t = Iotlb::new();
        let c = t.refresh(&src, 0, u64::MAX).unwrap();
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert_eq!(
            t.check(0x9000, 1, false),
            Err(AccessError::Unmapped(0x9000))
        );
        assert_eq!(t.check(0x1000, 0x1000, true), Ok(()));

        *src.entries.borrow_mut() = vec![entry(0, u64::MAX, 0, Perm::Rw)];
        let c = t.refresh(&src, 0, u64::MAX).unwrap();
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert_eq!(
            t.check(0x1000, 1, false),
            Err(AccessError::NotMapped(0x1000))
        );
        assert_eq!(
            t.check(u64::MAX, 1, false),
            Err(AccessError::NotMapped(u64::MAX))
        );
        assert_eq!(entry(0, u64::MAX, 0, Perm::Rw).size(), None);
        assert_eq!(entry(5, 4, 0, Perm::Rw).size(), None);
        assert_eq!(entry(4, 4, 0, Perm::Rw).size(), Some(1));
    }

    #[test]
    fn entries_beyond_the_end_of_their_file_are_not_mapped() {
        let src = FakeSource::new(
            0x2000,
            vec![
                entry(0x1000, 0x1fff, 0x1000, Perm::Rw),
                entry(0x4000, 0x5fff, 0x1000, Perm::Rw),
                entry(0x8000, 0x8fff, u64::MAX - 0xfff, Perm::Rw),
            ],
        );
        let mut t = Iotlb::new();
        let c = t.refresh(&src, 0, u64::MAX).unwrap();
        assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
        assert_eq!(t.check(0x1000, 0x1000, true), Ok(()));
        assert_eq!(
            t.check(0x4000, 1, false),
            Err(AccessError::NotMapped(0x4000))
        );
        assert_eq!(
            t.check(0x8000, 1, false),
            Err(AccessError::NotMapped(0x8000))
        );
    }

    #[test]
    fn dump_file_is_replaced() {
        let dir = std::env::temp_dir().join(format!("vduse-net-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("dump");
        let src = FakeSource::new(0x2000, vec![entry(0xabc000, 0xabcfff, 0, Perm::Ro)]);
        let mut t = Iotlb::new();
        t.write_dump(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        t.refresh(&src, 0, u64::MAX).unwrap();
        t.write_dump(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "0xabc000 0xabcfff ro\n"
        );
        assert!(!dir.join("dump.tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dump_sorted() {
        let e = [
            entry(0x5000, 0x5fff, 0, Perm::Wo),
            entry(0x1000, 0x1fff, 0, Perm::Rw),
        ];
        assert_eq!(
            format_dump(e.iter()),
            "0x1000 0x1fff rw\n0x5000 0x5fff wo\n"
        );
    }
}
