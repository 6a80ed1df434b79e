//! vdpa-probe: a tiny vhost-vdpa client to check a running vduse-net by hand.
//!
//! `vdpa-probe [--dev /dev/vhost-vdpa-0] --log VDUSE_NET_STDERR_FILE --dump IOTLB_DUMP`
//!
//! 1. Opens the node, SET_OWNER, reads device id / features / backend features and acks
//!    IOTLB_MSG_V2 | IOTLB_BATCH.
//! 2. Maps a 2 MiB memfd at IOVA 0x100000 inside BATCH_BEGIN/END and checks that
//!    vduse-net counted exactly one UPDATE_IOTLB and that its dump lists the range.
//! 3. Drives the device: two split rings in that memory, DRIVER_OK, one TX frame, and
//!    (loopback) expects it back in an RX buffer.
//! 4. Two unbatched UPDATEs (expects +2 UPDATE_IOTLB) and one batched pair of
//!    INVALIDATEs (expects +1), checking the dump each time.
//!
//! With `--tap-mode` step 3 only checks that the TX frame was consumed and that some
//! frame arrived on RX (the caller makes the host send one into the tap), and step 4 is
//! skipped.
//!
//! Prints `vdpa-probe: <step> ok` lines and exits non-zero on the first failure.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

const VHOST: u64 = 0xAF;

const fn ioc(dir: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (VHOST << 8) | nr
}
const VHOST_GET_FEATURES: u64 = ioc(2, 0x00, 8);
const VHOST_SET_FEATURES: u64 = ioc(1, 0x00, 8);
const VHOST_SET_OWNER: u64 = ioc(0, 0x01, 0);
const VHOST_SET_VRING_NUM: u64 = ioc(1, 0x10, 8);
const VHOST_SET_VRING_ADDR: u64 = ioc(1, 0x11, 40);
const VHOST_SET_VRING_BASE: u64 = ioc(1, 0x12, 8);
const VHOST_SET_VRING_KICK: u64 = ioc(1, 0x20, 8);
const VHOST_SET_VRING_CALL: u64 = ioc(1, 0x21, 8);
const VHOST_SET_BACKEND_FEATURES: u64 = ioc(1, 0x25, 8);
const VHOST_GET_BACKEND_FEATURES: u64 = ioc(2, 0x26, 8);
const VHOST_VDPA_GET_DEVICE_ID: u64 = ioc(2, 0x70, 4);
const VHOST_VDPA_SET_STATUS: u64 = ioc(1, 0x72, 1);
const VHOST_VDPA_SET_VRING_ENABLE: u64 = ioc(1, 0x75, 8);

const BACKEND_IOTLB_MSG_V2: u64 = 1 << 1;
const BACKEND_IOTLB_BATCH: u64 = 1 << 2;
const VHOST_IOTLB_MSG_V2: u32 = 2;
const IOTLB_UPDATE: u8 = 2;
const IOTLB_INVALIDATE: u8 = 3;
const IOTLB_BATCH_BEGIN: u8 = 5;
const IOTLB_BATCH_END: u8 = 6;
const ACCESS_RW: u8 = 3;

const IOVA: u64 = 0x10_0000;
const MEM_SIZE: usize = 2 << 20;
const QSIZE: u16 = 16;
const HDR: usize = 12;

#[repr(C)]
struct VringState {
    index: u32,
    num: u32,
}

#[repr(C)]
struct VringAddr {
    index: u32,
    flags: u32,
    desc: u64,
    used: u64,
    avail: u64,
    log: u64,
}

#[repr(C)]
struct VringFile {
    index: u32,
    fd: i32,
}

type Result<T> = std::result::Result<T, String>;

fn ioctl<T>(fd: RawFd, req: u64, arg: *mut T, what: &str) -> Result<()> {
    // SAFETY: every caller passes a request whose argument type is T (or ignores the
    // argument), and a pointer to a live, properly sized T for the duration of the call.
    let r = unsafe { libc::ioctl(fd, req as _, arg) };
    if r < 0 {
        return Err(format!("{what}: {}", io::Error::last_os_error()));
    }
    Ok(())
}

/// One `struct vhost_msg_v2` (72 bytes).
fn msg(ty: u8, iova: u64, size: u64, uaddr: u64) -> [u8; 72] {
    let mut b = [0u8; 72];
    b[0..4].copy_from_slice(&VHOST_IOTLB_MSG_V2.to_ne_bytes());
    b[8..16].copy_from_slice(&iova.to_ne_bytes());
    b[16..24].copy_from_slice(&size.to_ne_bytes());
    b[24..32].copy_from_slice(&uaddr.to_ne_bytes());
    b[32] = ACCESS_RW;
    b[33] = ty;
    b
}

fn send(fd: RawFd, m: &[u8; 72], what: &str) -> Result<()> {
    // SAFETY: write reads 72 bytes from the live array.
    let n = unsafe { libc::write(fd, m.as_ptr() as *const libc::c_void, m.len()) };
    if n != m.len() as isize {
        return Err(format!("write {what}: {}", io::Error::last_os_error()));
    }
    Ok(())
}

/// Highest `iotlb update #N` in vduse-net's log.
fn update_count(log: &str) -> u64 {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split("iotlb update #").nth(1))
        .filter_map(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|d| d.parse().ok())
        })
        .max()
        .unwrap_or(0)
}

fn expect_updates(log: &str, before: u64, delta: u64, what: &str) -> Result<u64> {
    // The device logs before it answers, and the write returns after the answer.
    let now = update_count(log);
    if now != before + delta {
        return Err(format!(
            "{what}: expected {delta} UPDATE_IOTLB, vduse-net counted {}",
            now - before
        ));
    }
    println!("vdpa-probe: {what}: {delta} UPDATE_IOTLB ok");
    Ok(now)
}

fn expect_dump(path: &str, want: &str) -> Result<()> {
    let got = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    if got != want {
        return Err(format!("dump is {got:?}, expected {want:?}"));
    }
    println!("vdpa-probe: dump {:?} ok", got.trim_end());
    Ok(())
}

fn eventfd() -> Result<OwnedFd> {
    // SAFETY: eventfd has no memory arguments.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(format!("eventfd: {}", io::Error::last_os_error()));
    }
    // SAFETY: `fd` is new and owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The shared memory: 2 MiB memfd mapped MAP_SHARED.
struct Mem {
    ptr: *mut u8,
}

impl Mem {
    fn new() -> Result<(Mem, OwnedFd)> {
        // SAFETY: memfd_create reads a static NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"vdpa-probe".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(format!("memfd_create: {}", io::Error::last_os_error()));
        }
        // SAFETY: `fd` is new and owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on our own memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), MEM_SIZE as libc::off_t) } < 0 {
            return Err(format!("ftruncate: {}", io::Error::last_os_error()));
        }
        // SAFETY: a new shared mapping of our memfd; nothing else is mapped there.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap: {}", io::Error::last_os_error()));
        }
        Ok((Mem { ptr: p as *mut u8 }, fd))
    }

    fn write(&self, off: usize, data: &[u8]) {
        assert!(off + data.len() <= MEM_SIZE);
        for (i, b) in data.iter().enumerate() {
            // SAFETY: the byte is inside our mapping (asserted above); volatile because
            // the device process reads the same pages concurrently.
            unsafe { self.ptr.add(off + i).write_volatile(*b) };
        }
    }

    fn read(&self, off: usize, len: usize) -> Vec<u8> {
        assert!(off + len <= MEM_SIZE);
        (0..len)
            .map(|i| {
                // SAFETY: the byte is inside our mapping (asserted above); volatile
                // because the device process writes the same pages concurrently.
                unsafe { self.ptr.add(off + i).read_volatile() }
            })
            .collect()
    }

    fn u16_at(&self, off: usize) -> u16 {
        let b = self.read(off, 2);
        u16::from_le_bytes([b[0], b[1]])
    }
}

/// Ring layout (offsets in the memfd; IOVA = IOVA + offset).
const RX_RING: usize = 0x0000;
const TX_RING: usize = 0x4000;
const AVAIL: usize = 0x1000;
const USED: usize = 0x2000;
const RX_BUF: usize = 0x1_0000;
const TX_BUF: usize = 0x8_0000;

fn desc(mem: &Mem, ring: usize, i: u16, off: usize, len: u32, flags: u16) {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&(IOVA + off as u64).to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    mem.write(ring + 16 * i as usize, &d);
}

fn publish(mem: &Mem, ring: usize, slot: u16, head: u16, new_idx: u16) {
    mem.write(ring + AVAIL + 4 + 2 * slot as usize, &head.to_le_bytes());
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    mem.write(ring + AVAIL + 2, &new_idx.to_le_bytes());
}

fn run() -> Result<()> {
    let mut dev = "/dev/vhost-vdpa-0".to_string();
    let mut log = None;
    let mut dump = None;
    let mut tap_mode = false;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--dev" => dev = it.next().ok_or("--dev needs a value")?,
            "--log" => log = it.next(),
            "--dump" => dump = it.next(),
            "--tap-mode" => tap_mode = true,
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    let log = log.ok_or("--log PATH (vduse-net's stderr) is required")?;
    let dump = dump.ok_or("--dump PATH (vduse-net's --iotlb-dump) is required")?;

    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&dev)
        .map_err(|e| format!("{dev}: {e}"))?;
    let fd = f.as_raw_fd();
    ioctl(
        fd,
        VHOST_SET_OWNER,
        std::ptr::null_mut::<u8>(),
        "VHOST_SET_OWNER",
    )?;
    let mut id = 0u32;
    ioctl(fd, VHOST_VDPA_GET_DEVICE_ID, &mut id, "GET_DEVICE_ID")?;
    let mut features = 0u64;
    ioctl(fd, VHOST_GET_FEATURES, &mut features, "GET_FEATURES")?;
    let mut backend = 0u64;
    ioctl(
        fd,
        VHOST_GET_BACKEND_FEATURES,
        &mut backend,
        "GET_BACKEND_FEATURES",
    )?;
    println!("vdpa-probe: device id {id} features {features:#x} backend features {backend:#x}");
    let mut want = BACKEND_IOTLB_MSG_V2 | BACKEND_IOTLB_BATCH;
    if backend & want != want {
        return Err(format!("backend lacks MSG_V2|BATCH: {backend:#x}"));
    }
    ioctl(
        fd,
        VHOST_SET_BACKEND_FEATURES,
        &mut want,
        "SET_BACKEND_FEATURES",
    )?;

    let (mem, _memfd) = Mem::new()?;
    let h = mem.ptr as u64;

    // Step 2: one batched UPDATE.
    let c0 = update_count(&log);
    send(fd, &msg(IOTLB_BATCH_BEGIN, 0, 0, 0), "BATCH_BEGIN")?;
    send(fd, &msg(IOTLB_UPDATE, IOVA, MEM_SIZE as u64, h), "UPDATE")?;
    send(fd, &msg(IOTLB_BATCH_END, 0, 0, 0), "BATCH_END")?;
    let c1 = expect_updates(&log, c0, 1, "batched map of 2 MiB")?;
    expect_dump(&dump, "0x100000 0x2fffff rw\n")?;

    // Step 3: datapath.
    let mut st = 1u8 | 2; // ACKNOWLEDGE | DRIVER
    ioctl(fd, VHOST_VDPA_SET_STATUS, &mut st, "SET_STATUS driver")?;
    let mut feat = features;
    ioctl(fd, VHOST_SET_FEATURES, &mut feat, "SET_FEATURES")?;
    st |= 8; // FEATURES_OK
    ioctl(fd, VHOST_VDPA_SET_STATUS, &mut st, "SET_STATUS features_ok")?;
    let mut kicks = Vec::new();
    let mut calls = Vec::new();
    for (i, ring) in [(0u32, RX_RING), (1u32, TX_RING)] {
        let r = ring as u64 + IOVA;
        ioctl(
            fd,
            VHOST_SET_VRING_NUM,
            &mut VringState {
                index: i,
                num: QSIZE as u32,
            },
            "SET_VRING_NUM",
        )?;
        let mut addr = VringAddr {
            index: i,
            flags: 0,
            desc: r,
            used: r + USED as u64,
            avail: r + AVAIL as u64,
            log: 0,
        };
        ioctl(fd, VHOST_SET_VRING_ADDR, &mut addr, "SET_VRING_ADDR")?;
        ioctl(
            fd,
            VHOST_SET_VRING_BASE,
            &mut VringState { index: i, num: 0 },
            "SET_VRING_BASE",
        )?;
        let k = eventfd()?;
        let c = eventfd()?;
        ioctl(
            fd,
            VHOST_SET_VRING_KICK,
            &mut VringFile {
                index: i,
                fd: k.as_raw_fd(),
            },
            "SET_VRING_KICK",
        )?;
        ioctl(
            fd,
            VHOST_SET_VRING_CALL,
            &mut VringFile {
                index: i,
                fd: c.as_raw_fd(),
            },
            "SET_VRING_CALL",
        )?;
        ioctl(
            fd,
            VHOST_VDPA_SET_VRING_ENABLE,
            &mut VringState { index: i, num: 1 },
            "SET_VRING_ENABLE",
        )?;
        kicks.push(k);
        calls.push(c);
    }
    st |= 4; // DRIVER_OK
    ioctl(fd, VHOST_VDPA_SET_STATUS, &mut st, "SET_STATUS driver_ok")?;
    println!("vdpa-probe: DRIVER_OK set");

    // Four RX buffers of 2 KiB.
    for i in 0..4u16 {
        desc(&mem, RX_RING, i, RX_BUF + 0x1000 * i as usize, 2048, 2);
        publish(&mem, RX_RING, i, i, i + 1);
    }
    // One TX frame: header + broadcast Ethernet frame of 60 bytes.
    let mut frame = vec![0u8; HDR];
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    frame.extend_from_slice(&[0x88, 0xb5]); // local experimental ethertype
    frame.extend((0..46u8).map(|b| b ^ 0x5a));
    mem.write(TX_BUF, &frame);
    desc(&mem, TX_RING, 0, TX_BUF, frame.len() as u32, 0);
    publish(&mem, TX_RING, 0, 0, 1);
    for k in &kicks {
        let one = 1u64.to_ne_bytes();
        // SAFETY: write reads 8 bytes from a live array into our eventfd.
        unsafe { libc::write(k.as_raw_fd(), one.as_ptr() as *const libc::c_void, 8) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    if tap_mode {
        // The frame leaves through the tap; something on the host side (e.g. a ping
        // into the tap's subnet) must send frames back.
        while mem.u16_at(TX_RING + USED + 2) == 0 || mem.u16_at(RX_RING + USED + 2) == 0 {
            if Instant::now() > deadline {
                return Err(format!(
                    "tap mode: tx used idx {}, rx used idx {} after 10 s",
                    mem.u16_at(TX_RING + USED + 2),
                    mem.u16_at(RX_RING + USED + 2)
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let used = mem.read(RX_RING + USED + 4, 8);
        let id = u32::from_le_bytes(used[0..4].try_into().unwrap());
        let len = u32::from_le_bytes(used[4..8].try_into().unwrap());
        let got = mem.read(RX_BUF + 0x1000 * id as usize, len as usize);
        println!(
            "vdpa-probe: tap ok: tx frame sent; rx buffer {id} got {len} bytes, ethertype {:02x}{:02x}, src {:02x?}",
            got.get(HDR + 12).copied().unwrap_or(0),
            got.get(HDR + 13).copied().unwrap_or(0),
            got.get(HDR + 6..HDR + 12).unwrap_or(&[])
        );
        return Ok(());
    }
    while mem.u16_at(RX_RING + USED + 2) == 0 {
        if Instant::now() > deadline {
            return Err(format!(
                "no RX completion within 10 s (tx used idx {})",
                mem.u16_at(TX_RING + USED + 2)
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let tx_used = mem.u16_at(TX_RING + USED + 2);
    let used = mem.read(RX_RING + USED + 4, 8);
    let id = u32::from_le_bytes(used[0..4].try_into().unwrap());
    let len = u32::from_le_bytes(used[4..8].try_into().unwrap());
    let got = mem.read(RX_BUF + 0x1000 * id as usize, len as usize);
    let mut expected = frame.clone();
    expected[..HDR].fill(0);
    expected[10] = 1; // num_buffers
    if tx_used != 1 || got != expected {
        return Err(format!(
            "loopback mismatch: tx used {tx_used}, rx id {id} len {len}, got {got:02x?}"
        ));
    }
    let mut ev = [0u8; 8];
    // SAFETY: read writes at most 8 bytes into the live array.
    let irq = unsafe {
        libc::read(
            calls[0].as_raw_fd(),
            ev.as_mut_ptr() as *mut libc::c_void,
            8,
        )
    } == 8;
    println!("vdpa-probe: loopback ok: tx frame of {} bytes came back in rx buffer {id} (len {len}, rx interrupt {irq})", frame.len() - HDR);

    // Step 4: unbatched updates, then a batched invalidation.
    send(
        fd,
        &msg(IOTLB_UPDATE, 0x40_0000, 0x1000, h + 0x1f_0000),
        "UPDATE 0x400000",
    )?;
    send(
        fd,
        &msg(IOTLB_UPDATE, 0x50_0000, 0x1000, h + 0x1f_1000),
        "UPDATE 0x500000",
    )?;
    let c2 = expect_updates(&log, c1, 2, "two unbatched maps")?;
    expect_dump(
        &dump,
        "0x100000 0x2fffff rw\n0x400000 0x400fff rw\n0x500000 0x500fff rw\n",
    )?;
    send(fd, &msg(IOTLB_BATCH_BEGIN, 0, 0, 0), "BATCH_BEGIN")?;
    send(
        fd,
        &msg(IOTLB_INVALIDATE, 0x40_0000, 0x1000, 0),
        "INVALIDATE 0x400000",
    )?;
    send(
        fd,
        &msg(IOTLB_INVALIDATE, 0x50_0000, 0x1000, 0),
        "INVALIDATE 0x500000",
    )?;
    send(fd, &msg(IOTLB_BATCH_END, 0, 0, 0), "BATCH_END")?;
    expect_updates(&log, c2, 1, "batched unmap of two ranges")?;
    expect_dump(&dump, "0x100000 0x2fffff rw\n")?;
    println!("vdpa-probe: all ok");
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vdpa-probe: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
