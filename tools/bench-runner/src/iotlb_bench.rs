//! `microvm-iotlb-bench --device /dev/vhost-vdpa-N [--runs R]`
//!
//! Measures what a memory hotplug change costs on the real vhost-vdpa path,
//! on a layout like a VM's after some hotplug (boot RAM plus 1 GiB plugged
//! earlier as 8 separate 128 MiB entries, as the Linux driver plugs it),
//! incremental (the DMA-mapping engine: only the changed blocks, one batch)
//! next to a baseline that remaps everything on each change (one batch that
//! invalidates every entry and maps the whole new layout), in the same run
//! on the same device. Each figure is the time from the call to the END
//! message being accepted, which includes the device rebuilding its IOTLB
//! (VDUSE asks its userspace device), and the messages sent. One JSON line
//! per (operation, blocks).

use std::os::fd::FromRawFd;
use std::sync::Arc;
use std::time::Instant;

use devices::dma::{DmaMapper, DmaRange, IotlbBackend, Perm, VhostVdpaIotlb};
use devices::virtio::vdpa::{Translation, VdpaConfig, VdpaDevice};
use vm_memory::{GuestAddress, GuestMemoryMmap};

const BLOCK: u64 = 2 << 20;
const BOOT: u64 = 512 << 20;
const HOTPLUG_BASE: u64 = 4 << 30;
/// Memory plugged before the measurements, one entry per 128 MiB request.
const EARLIER_ENTRIES: u64 = 8;
const EARLIER_ENTRY: u64 = 128 << 20;
/// The measured changes happen above the earlier ones.
const MEASURED_BASE: u64 = HOTPLUG_BASE + EARLIER_ENTRIES * EARLIER_ENTRY;
const SIZES: [u64; 3] = [1, 8, 64];

fn fail(message: String) -> ! {
    eprintln!("microvm-iotlb-bench: {message}");
    std::process::exit(1);
}

/// A shared file mapping, as VDUSE (a VA device) requires.
fn shared_memory(size: u64) -> u64 {
    let name = c"microvm-iotlb-bench";
    // SAFETY: valid NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        fail(format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and is owned by this File.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(size)
        .unwrap_or_else(|e| fail(format!("sizing memory: {e}")));
    // SAFETY: a fresh shared mapping of a file we own, never unmapped while
    // the process runs; the result is checked against MAP_FAILED.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        fail(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    std::mem::forget(file);
    addr as u64
}

struct Layout {
    boot_host: u64,
    earlier_host: u64,
    plug_host: u64,
}

impl Layout {
    /// Boot RAM and the earlier hotplug entries: what stays mapped.
    fn base(&self) -> Vec<DmaRange> {
        let mut ranges = vec![DmaRange::new(0, BOOT, self.boot_host, Perm::ReadWrite)];
        ranges.extend((0..EARLIER_ENTRIES).map(|i| {
            DmaRange::new(
                HOTPLUG_BASE + i * EARLIER_ENTRY,
                EARLIER_ENTRY,
                self.earlier_host + i * EARLIER_ENTRY,
                Perm::ReadWrite,
            )
        }));
        ranges
    }
    fn plugged(&self, blocks: u64) -> DmaRange {
        DmaRange::new(
            MEASURED_BASE,
            blocks * BLOCK,
            self.plug_host,
            Perm::ReadWrite,
        )
    }
}

type Mapper = DmaMapper<VhostVdpaIotlb>;

fn messages(mapper: &Mapper) -> u64 {
    let c = mapper.counters();
    c.iotlb_update + c.iotlb_invalidate + c.batch_begin + c.batch_end
}

/// Sends a batch straight through the backend (the baseline bypasses the
/// engine's diff on purpose); returns (micros, messages).
fn full_remap(mapper: &mut Mapper, old: &[DmaRange], new: &[DmaRange]) -> (f64, u64) {
    let started = Instant::now();
    let backend = mapper.backend_mut();
    let check = |r: Result<(), devices::dma::BackendError>| {
        r.unwrap_or_else(|e| fail(format!("baseline: {e}")))
    };
    check(backend.batch_begin(0));
    for range in old {
        check(backend.invalidate(0, range.iova, range.size));
    }
    for range in new {
        check(backend.update(0, range));
    }
    check(backend.batch_end(0));
    (
        started.elapsed().as_secs_f64() * 1e6,
        (old.len() + new.len() + 2) as u64,
    )
}

fn incremental(mapper: &mut Mapper, add: Option<DmaRange>, remove: Option<DmaRange>) -> (f64, u64) {
    let before = messages(mapper);
    let started = Instant::now();
    let mut transaction = mapper.begin(0);
    if let Some(range) = add {
        transaction.add(range);
    }
    if let Some(range) = remove {
        transaction.remove(range.iova, range.size);
    }
    mapper
        .commit(transaction)
        .unwrap_or_else(|e| fail(format!("incremental: {e}")));
    (
        started.elapsed().as_secs_f64() * 1e6,
        messages(mapper) - before,
    )
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut device = None;
    let mut runs = 7;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--device" => device = args.next(),
            "--runs" => {
                runs = args
                    .next()
                    .and_then(|r| r.parse().ok())
                    .filter(|&r| r > 0)
                    .unwrap_or(0)
            }
            _ => fail(format!("unknown argument '{arg}'")),
        }
    }
    let (Some(device), true) = (device, runs > 0) else {
        fail("usage: microvm-iotlb-bench --device /dev/vhost-vdpa-N [--runs R]".into());
    };
    let memory = Arc::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)])
            .unwrap_or_else(|e| fail(e.to_string())),
    );
    let config = VdpaConfig::net(device.into(), Translation::Identity, true);
    let net = VdpaDevice::open(&config, memory).unwrap_or_else(|e| fail(e.to_string()));
    let mapper = net.mapper();
    let mut mapper = mapper.lock().unwrap_or_else(|p| p.into_inner());
    let layout = Layout {
        boot_host: shared_memory(BOOT),
        earlier_host: shared_memory(EARLIER_ENTRIES * EARLIER_ENTRY),
        plug_host: shared_memory(64 * BLOCK),
    };
    // One transaction each, as boot and the guest's earlier requests were.
    let base = layout.base();
    for range in &base {
        incremental(&mut mapper, Some(*range), None);
    }
    let with = |extra: DmaRange| base.iter().copied().chain([extra]).collect::<Vec<_>>();

    for blocks in SIZES {
        let plugged = layout.plugged(blocks);
        let (mut inc_plug, mut inc_unplug, mut full_plug, mut full_unplug) =
            (vec![], vec![], vec![], vec![]);
        let mut counts = [0u64; 4];
        for _ in 0..runs {
            let (t, m) = incremental(&mut mapper, Some(plugged), None);
            inc_plug.push(t);
            counts[0] = m;
            let (t, m) = incremental(&mut mapper, None, Some(plugged));
            inc_unplug.push(t);
            counts[1] = m;
            // The baseline leaves the device as it found it: the base layout.
            let (t, m) = full_remap(&mut mapper, &base, &with(plugged));
            full_plug.push(t);
            counts[2] = m;
            let (t, m) = full_remap(&mut mapper, &with(plugged), &base);
            full_unplug.push(t);
            counts[3] = m;
        }
        for (op, inc, full, inc_msgs, full_msgs) in [
            ("plug", &mut inc_plug, &mut full_plug, counts[0], counts[2]),
            (
                "unplug",
                &mut inc_unplug,
                &mut full_unplug,
                counts[1],
                counts[3],
            ),
        ] {
            let (i, f) = (median(inc), median(full));
            println!(
                "{{\"bench\":\"hotplug\",\"op\":\"{op}\",\"blocks\":{blocks},\"block_size\":{BLOCK},\"runs\":{runs},\"entries_before\":{},\
                 \"incremental\":{{\"median_us\":{i:.1},\"messages\":{inc_msgs}}},\
                 \"full_remap\":{{\"median_us\":{f:.1},\"messages\":{full_msgs}}},\
                 \"time_ratio_full_over_incremental\":{:.2}}}",
                base.len(),
                f / i
            );
        }
    }
}
