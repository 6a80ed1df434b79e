//! Plain configuration structs for one microVM, and the parsers for the
//! small option languages the CLI accepts (`size=512M`, `file=PATH`).
//!
//! Nothing here touches KVM or the host: a `VmmConfig` is data, validated
//! against host limits by `VmmConfig::validate` before anything is built.

pub mod cli;

use std::path::PathBuf;

/// Smallest guest we agree to build: the kernel image alone is loaded at
/// 16 MiB and a useful guest needs room above it.
pub const MIN_MEMORY_BYTES: u64 = 64 << 20;
/// The x86 kernel truncates its command line at COMMAND_LINE_SIZE (2048,
/// including the trailing NUL); refuse what it would silently cut.
pub const MAX_CMDLINE_LEN: usize = 2047;
/// APIC IDs must fit in the 8-bit xAPIC ID of the MADT entries we emit.
pub const MAX_VCPUS: u8 = 254;
/// Most queue pairs one net device may get: a vector per queue, and far
/// more than a microVM's vCPUs can drive.
pub const MAX_QUEUE_PAIRS: u16 = 16;

pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
pub const DEFAULT_MEMORY_BYTES: u64 = 512 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("malformed size '{0}': expected a number with an optional K, M or G suffix")]
    MalformedSize(String),
    #[error("malformed memory option '{0}': expected size=SIZE[,hotplug=MAX][,block=BLOCK]")]
    MalformedMemory(String),
    #[error("malformed serial option '{0}': expected stdout, off or file=PATH[,max=SIZE]")]
    MalformedSerial(String),
    #[error(
        "malformed net option '{0}': expected vdpa=PATH[,mac=MAC][,queues=N][,iotlb-batch=on|off]"
    )]
    MalformedNet(String),
    #[error(
        "malformed vdpa option '{0}': expected \
         path=PATH[,iommu=on|off][,iotlb-batch=on|off][,readonly=on|off]"
    )]
    MalformedVdpa(String),
    #[error("malformed MAC address '{0}': expected six hex bytes like 52:54:00:12:34:56")]
    MalformedMac(String),
    #[error("'{key}' is given more than once in '{text}'")]
    RepeatedKey { key: String, text: String },
    #[error("malformed seccomp option '{0}': expected on or off")]
    MalformedSeccomp(String),
    #[error("malformed --cpus '{0}': expected a whole number")]
    MalformedCpus(String),
    #[error("--cpus must be at least 1")]
    NoVcpus,
    #[error("--cpus {requested} is above the limit of {limit} vCPUs")]
    TooManyVcpus { requested: u64, limit: u64 },
    #[error("guest memory {requested} is below the minimum of {minimum}")]
    MemoryTooSmall { requested: Size, minimum: Size },
    #[error("guest memory {requested} is more than this host has ({host})")]
    MemoryTooLarge { requested: Size, host: Size },
    #[error("guest memory {0} is not a multiple of 4 KiB")]
    MemoryUnaligned(Size),
    #[error("hotplug block size {0} must be a power of two of at least 2M")]
    BadHotplugBlock(Size),
    #[error("hotplug size {size} is not a multiple of the block size {block}")]
    HotplugUnaligned { size: Size, block: Size },
    #[error("guest memory {boot} plus hotplug {hotplug} is more than this host has ({host})")]
    HotplugTooLarge {
        boot: Size,
        hotplug: Size,
        host: Size,
    },
    #[error(
        "guest memory {boot} plus hotplug {hotplug} ends at guest address {end}, past {limit} \
         where the 64-bit PCI window starts"
    )]
    LayoutTooLarge {
        boot: Size,
        hotplug: Size,
        end: Size,
        limit: Size,
    },
    #[error(
        "hotplug {hotplug} in blocks of {block} needs {blocks} KVM memory slots (one per \
         plugged block) plus {boot} for boot RAM, but KVM gives a VM {limit}: use \
         block={suggested} or larger, or a smaller hotplug="
    )]
    TooManyMemslots {
        hotplug: Size,
        block: Size,
        blocks: u64,
        boot: u64,
        limit: u64,
        suggested: Size,
    },
    #[error(
        "--net vdpa={path},queues={queue_pairs}: at most {MAX_QUEUE_PAIRS} queue pairs are \
         supported"
    )]
    TooManyQueuePairs { path: PathBuf, queue_pairs: u16 },
    #[error(
        "--net vdpa={path},queues=N,iommu=on: multiqueue needs the VMM's control queue, which \
         is not built behind the vIOMMU yet (use queues=1 or iommu=off)"
    )]
    MultiqueueBehindIommu { path: PathBuf },
    #[error("kernel command line is {len} bytes; the guest kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("cannot read {what} '{path}': {reason}")]
    UnreadableFile {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
}

/// A byte count that prints the way users typed it (512M, 2G).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const UNITS: [(u64, &str); 3] = [(1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")];
        for (unit, suffix) in UNITS {
            if self.0 >= unit && self.0.is_multiple_of(unit) {
                return write!(f, "{}{}", self.0 / unit, suffix);
            }
        }
        write!(f, "{} bytes", self.0)
    }
}

/// A decimal count: ASCII digits only. `str::parse` alone takes a leading
/// '+' ("+1"), which no option should.
pub fn parse_count<T: std::str::FromStr>(text: &str) -> Option<T> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// `--cpus N`: the count only; its limits are checked with the others.
pub fn parse_cpus(text: &str) -> Result<u64, ConfigError> {
    parse_count(text).ok_or_else(|| ConfigError::MalformedCpus(text.to_string()))
}

/// Parses `512M`, `2G`, `65536K` or a plain byte count.
pub fn parse_size(text: &str) -> Result<Size, ConfigError> {
    let malformed = || ConfigError::MalformedSize(text.to_string());
    let trimmed = text.trim();
    let (digits, shift) = match trimmed.char_indices().last() {
        Some((i, 'k' | 'K')) => (&trimmed[..i], 10),
        Some((i, 'm' | 'M')) => (&trimmed[..i], 20),
        Some((i, 'g' | 'G')) => (&trimmed[..i], 30),
        Some(_) => (trimmed, 0),
        None => return Err(malformed()),
    };
    let value: u64 = parse_count(digits).ok_or_else(malformed)?;
    value
        .checked_mul(1u64 << shift)
        .map(Size)
        .ok_or_else(malformed)
}

/// Guest-visible block size of hotplug memory when none is given: the
/// smallest the Linux virtio-mem driver accepts (a pageblock).
pub const DEFAULT_HOTPLUG_BLOCK: u64 = 2 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryConfig {
    pub size: Size,
    /// Room for memory plugged at run time (virtio-mem), if any.
    pub hotplug: Option<Size>,
    pub block: Size,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            size: Size(DEFAULT_MEMORY_BYTES),
            hotplug: None,
            block: Size(DEFAULT_HOTPLUG_BLOCK),
        }
    }
}

/// Refuses an option string (`key=value,key=value`) that names a key more
/// than once: the user meant one of the values, and we cannot know which.
pub fn refuse_repeated_keys(text: &str) -> Result<(), ConfigError> {
    let mut seen: Vec<&str> = Vec::new();
    for key in text
        .split(',')
        .filter_map(|item| item.split_once('='))
        .map(|(key, _)| key)
    {
        if seen.contains(&key) {
            return Err(ConfigError::RepeatedKey {
                key: key.to_string(),
                text: text.to_string(),
            });
        }
        seen.push(key);
    }
    Ok(())
}

/// Parses the `--memory` option: `size=SIZE` (a bare SIZE is accepted too).
pub fn parse_memory(text: &str) -> Result<MemoryConfig, ConfigError> {
    refuse_repeated_keys(text)?;
    let mut config = MemoryConfig::default();
    let mut saw_size = false;
    for item in text.split(',') {
        match item.split_once('=') {
            Some(("size", value)) if !saw_size => {
                config.size = parse_size(value)?;
                saw_size = true;
            }
            Some(("hotplug", value)) if config.hotplug.is_none() => {
                config.hotplug = Some(parse_size(value)?);
            }
            Some(("block", value)) => config.block = parse_size(value)?,
            None if !saw_size && !item.is_empty() => {
                config.size = parse_size(item)?;
                saw_size = true;
            }
            _ => return Err(ConfigError::MalformedMemory(text.to_string())),
        }
    }
    if !saw_size {
        return Err(ConfigError::MalformedMemory(text.to_string()));
    }
    Ok(config)
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum SerialConfig {
    #[default]
    Stdout,
    /// Appended to PATH; at most `max` bytes per run, then dropped.
    File {
        path: PathBuf,
        max: Size,
    },
    Off,
}

/// How much guest console output a file receives per run unless
/// `max=` says otherwise: far more than a boot log, far less than a disk.
pub const DEFAULT_SERIAL_FILE_MAX: u64 = 64 << 20;

/// Parses `--serial stdout|off|file=PATH[,max=SIZE]`.
pub fn parse_serial(text: &str) -> Result<SerialConfig, ConfigError> {
    let malformed = || ConfigError::MalformedSerial(text.to_string());
    match text {
        "stdout" => return Ok(SerialConfig::Stdout),
        "off" => return Ok(SerialConfig::Off),
        _ => {}
    }
    let file = text.strip_prefix("file=").ok_or_else(malformed)?;
    // The path may hold commas; only a trailing ",max=" is an option.
    let (path, max) = match file.rsplit_once(",max=") {
        Some((path, max)) => (path, parse_size(max)?),
        None => (file, Size(DEFAULT_SERIAL_FILE_MAX)),
    };
    if path.contains(",max=") {
        return Err(ConfigError::RepeatedKey {
            key: "max".to_string(),
            text: text.to_string(),
        });
    }
    if path.is_empty() || max.0 == 0 {
        return Err(malformed());
    }
    Ok(SerialConfig::File {
        path: PathBuf::from(path),
        max,
    })
}

pub fn parse_on_off(text: &str) -> Result<bool, ConfigError> {
    match text {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(ConfigError::MalformedSeccomp(text.to_string())),
    }
}

/// A virtio-net device whose data path is a vhost-vdpa device.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    pub vdpa_path: PathBuf,
    pub mac: Option<[u8; 6]>,
    pub queue_pairs: u16,
    /// Bracket each change with BATCH_BEGIN/END (the default); off sends
    /// one unbatched message per change, as peers do.
    pub iotlb_batch: bool,
    /// Put the device behind the vIOMMU (which exists when any device
    /// asks for it): it reaches only what the guest maps.
    pub iommu: bool,
}

/// A vhost-vdpa device presented as whatever type it reports (`--vdpa`,
/// Cloud Hypervisor's shape): net or block.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VdpaDeviceConfig {
    pub path: PathBuf,
    /// Put the device behind the vIOMMU.
    pub iommu: bool,
    /// Bracket each change with BATCH_BEGIN/END (the default).
    pub iotlb_batch: bool,
    /// Accept a read-only block device (VIRTIO_BLK_F_RO); refused for a
    /// writable one, which the VMM could not keep the guest from writing.
    pub readonly: bool,
}

/// Parses `--vdpa path=PATH[,iommu=on|off][,iotlb-batch=on|off][,readonly=on|off]`.
pub fn parse_vdpa(text: &str) -> Result<VdpaDeviceConfig, ConfigError> {
    refuse_repeated_keys(text)?;
    let malformed = || ConfigError::MalformedVdpa(text.to_string());
    let on_off = |value: &str| parse_on_off(value).map_err(|_| malformed());
    let mut path = None;
    let (mut iommu, mut iotlb_batch, mut readonly) = (false, true, false);
    for item in text.split(',') {
        match item.split_once('=') {
            Some(("path", p)) if !p.is_empty() => path = Some(PathBuf::from(p)),
            Some(("iommu", value)) => iommu = on_off(value)?,
            Some(("iotlb-batch", value)) => iotlb_batch = on_off(value)?,
            Some(("readonly", value)) => readonly = on_off(value)?,
            _ => return Err(malformed()),
        }
    }
    Ok(VdpaDeviceConfig {
        path: path.ok_or_else(malformed)?,
        iommu,
        iotlb_batch,
        readonly,
    })
}

/// Parses `--net vdpa=PATH[,mac=MAC][,queues=N][,iotlb-batch=on|off][,iommu=on|off]`.
pub fn parse_net(text: &str) -> Result<NetConfig, ConfigError> {
    refuse_repeated_keys(text)?;
    let malformed = || ConfigError::MalformedNet(text.to_string());
    let mut path = None;
    let mut mac = None;
    let mut queue_pairs = 1;
    let mut iotlb_batch = None;
    let mut iommu = None;
    for item in text.split(',') {
        match item.split_once('=') {
            Some(("vdpa", p)) if !p.is_empty() && path.is_none() => path = Some(PathBuf::from(p)),
            Some(("mac", m)) if mac.is_none() => mac = Some(parse_mac(m)?),
            Some(("queues", n)) => {
                queue_pairs = parse_count(n).filter(|&n| n > 0).ok_or_else(malformed)?
            }
            Some(("iotlb-batch", value)) if iotlb_batch.is_none() => {
                iotlb_batch = Some(parse_on_off(value).map_err(|_| malformed())?)
            }
            Some(("iommu", value)) if iommu.is_none() => {
                iommu = Some(parse_on_off(value).map_err(|_| malformed())?)
            }
            _ => return Err(malformed()),
        }
    }
    Ok(NetConfig {
        vdpa_path: path.ok_or_else(malformed)?,
        mac,
        queue_pairs,
        iotlb_batch: iotlb_batch.unwrap_or(true),
        iommu: iommu.unwrap_or(false),
    })
}

pub fn parse_mac(text: &str) -> Result<[u8; 6], ConfigError> {
    let malformed = || ConfigError::MalformedMac(text.to_string());
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        // from_str_radix alone would take a sign ("+1").
        let part = parts
            .next()
            .filter(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(malformed)?;
        *byte = u8::from_str_radix(part, 16).map_err(|_| malformed())?;
    }
    if parts.next().is_some() {
        return Err(malformed());
    }
    Ok(mac)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelConfig {
    pub path: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
}

/// Everything needed to build and run one microVM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmmConfig {
    pub kernel: KernelConfig,
    pub vcpus: u8,
    pub memory: MemoryConfig,
    pub serial: SerialConfig,
    pub seccomp: bool,
    pub net: Vec<NetConfig>,
    /// `--vdpa` devices, after the `--net` ones on the PCI bus.
    pub vdpa: Vec<VdpaDeviceConfig>,
    pub api_socket: Option<PathBuf>,
    /// Restore the VM saved in this snapshot directory instead of booting
    /// `kernel` (whose fields are then unused); its vCPU count and memory
    /// size come from the snapshot.
    pub restore: Option<PathBuf>,
    /// Take over the VM another microvm process hands over on this socket
    /// (live update); like `restore`, the VM comes from there.
    pub take_over: Option<PathBuf>,
}

/// What the host offers, gathered once so validation stays a pure function.
#[derive(Clone, Copy, Debug)]
pub struct HostLimits {
    pub max_vcpus: u64,
    pub memory_bytes: u64,
}

impl HostLimits {
    /// Reads the host's memory from /proc/meminfo; the vCPU limit comes
    /// from KVM and is filled in by the caller.
    pub fn probe(max_vcpus: u64) -> HostLimits {
        HostLimits {
            max_vcpus,
            memory_bytes: host_memory_bytes().unwrap_or(u64::MAX),
        }
    }
}

fn host_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Checks a requested vCPU count before it is narrowed to the config's type.
pub fn check_vcpus(requested: u64, limits: &HostLimits) -> Result<u8, ConfigError> {
    let limit = limits.max_vcpus.min(u64::from(MAX_VCPUS));
    match requested {
        0 => Err(ConfigError::NoVcpus),
        n if n > limit => Err(ConfigError::TooManyVcpus {
            requested: n,
            limit,
        }),
        n => Ok(n as u8),
    }
}

/// Checks that boot RAM and every hotplug block can have a KVM memory slot
/// of its own at once: `limit` is KVM's KVM_CAP_NR_MEMSLOTS, so this runs
/// once KVM is open. Call after `validate` (block and hotplug checked).
pub fn check_memslots(memory: &MemoryConfig, limit: u64) -> Result<(), ConfigError> {
    let boot = crate::vstate::memory::ram_ranges(memory.size.0).len() as u64;
    let Some(hotplug) = memory.hotplug else {
        return Ok(());
    };
    let block = memory.block;
    let blocks = hotplug.0.checked_div(block.0).unwrap_or(u64::MAX);
    if boot.saturating_add(blocks) <= limit {
        return Ok(());
    }
    // The smallest power-of-two block that fits, if any does.
    let room = limit.saturating_sub(boot).max(1);
    let suggested = hotplug
        .0
        .div_ceil(room)
        .max(DEFAULT_HOTPLUG_BLOCK)
        .checked_next_power_of_two()
        .unwrap_or(u64::MAX);
    Err(ConfigError::TooManyMemslots {
        hotplug,
        block,
        blocks,
        boot,
        limit,
        suggested: Size(suggested),
    })
}

impl VmmConfig {
    /// Checks everything that can be checked before touching KVM, so bad
    /// input fails fast with a message naming the culprit.
    pub fn validate(&self, limits: &HostLimits) -> Result<(), ConfigError> {
        check_vcpus(u64::from(self.vcpus), limits)?;
        // What the devices accept, too: nothing may be refused once KVM and
        // guest memory exist.
        if let Some(net) = self.net.iter().find(|n| n.queue_pairs > 1 && n.iommu) {
            return Err(ConfigError::MultiqueueBehindIommu {
                path: net.vdpa_path.clone(),
            });
        }
        if let Some(net) = self.net.iter().find(|n| n.queue_pairs > MAX_QUEUE_PAIRS) {
            return Err(ConfigError::TooManyQueuePairs {
                path: net.vdpa_path.clone(),
                queue_pairs: net.queue_pairs,
            });
        }
        let size = self.memory.size;
        if size.0 < MIN_MEMORY_BYTES {
            return Err(ConfigError::MemoryTooSmall {
                requested: size,
                minimum: Size(MIN_MEMORY_BYTES),
            });
        }
        if !size.0.is_multiple_of(4096) {
            return Err(ConfigError::MemoryUnaligned(size));
        }
        if size.0 > limits.memory_bytes {
            return Err(ConfigError::MemoryTooLarge {
                requested: size,
                host: Size(limits.memory_bytes),
            });
        }
        if let Some(hotplug) = self.memory.hotplug {
            let block = self.memory.block;
            if !block.0.is_power_of_two() || block.0 < DEFAULT_HOTPLUG_BLOCK {
                return Err(ConfigError::BadHotplugBlock(block));
            }
            if hotplug.0 == 0 || !hotplug.0.is_multiple_of(block.0) {
                return Err(ConfigError::HotplugUnaligned {
                    size: hotplug,
                    block,
                });
            }
            if size.0.saturating_add(hotplug.0) > limits.memory_bytes {
                return Err(ConfigError::HotplugTooLarge {
                    boot: size,
                    hotplug,
                    host: Size(limits.memory_bytes),
                });
            }
        }
        check_layout(size, self.memory.hotplug.unwrap_or(Size(0)))?;
        if self.restore.is_some() || self.take_over.is_some() {
            // The kernel and its command line are in the saved memory.
            return Ok(());
        }
        if self.kernel.cmdline.len() > MAX_CMDLINE_LEN {
            return Err(ConfigError::CmdlineTooLong {
                len: self.kernel.cmdline.len(),
                max: MAX_CMDLINE_LEN,
            });
        }
        check_readable("kernel", &self.kernel.path)?;
        if let Some(initramfs) = &self.kernel.initramfs {
            check_readable("initramfs", initramfs)?;
        }
        Ok(())
    }
}

/// RAM, boot and hotplug, must end below the 64-bit PCI window.
fn check_layout(boot: Size, hotplug: Size) -> Result<(), ConfigError> {
    let limit = crate::vstate::memory::pci_layout::MEM64_START;
    match crate::vstate::memory::ram_end(boot.0, hotplug.0) {
        Some(end) if end <= limit => Ok(()),
        end => Err(ConfigError::LayoutTooLarge {
            boot,
            hotplug,
            end: Size(end.unwrap_or(u64::MAX)),
            limit: Size(limit),
        }),
    }
}

fn check_readable(what: &'static str, path: &std::path::Path) -> Result<(), ConfigError> {
    let unreadable = |reason: String| ConfigError::UnreadableFile {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let metadata = std::fs::metadata(path).map_err(|e| unreadable(io_reason(&e)))?;
    if !metadata.is_file() {
        return Err(unreadable("not a regular file".to_string()));
    }
    std::fs::File::open(path).map_err(|e| unreadable(io_reason(&e)))?;
    Ok(())
}

/// The OS error text without Rust's "(os error N)" suffix, for one-line messages.
fn io_reason(error: &std::io::Error) -> String {
    let text = error.to_string();
    match text.find(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_accept_suffixes_and_plain_bytes() {
        assert_eq!(parse_size("512M"), Ok(Size(512 << 20)));
        assert_eq!(parse_size("2g"), Ok(Size(2 << 30)));
        assert_eq!(parse_size("64K"), Ok(Size(64 << 10)));
        assert_eq!(parse_size("4096"), Ok(Size(4096)));
    }

    #[test]
    fn malformed_sizes_are_refused() {
        for bad in ["", "M", "12X", "-1M", "1.5G", "99999999999999999999G", " "] {
            assert!(
                matches!(parse_size(bad), Err(ConfigError::MalformedSize(_))),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn memory_option_forms() {
        assert_eq!(parse_memory("size=1G").unwrap().size, Size(1 << 30));
        assert_eq!(parse_memory("256M").unwrap().size, Size(256 << 20));
        let hotplug = parse_memory("size=512M,hotplug=2G,block=4M").unwrap();
        assert_eq!(hotplug.hotplug, Some(Size(2 << 30)));
        assert_eq!(hotplug.block, Size(4 << 20));
        assert_eq!(
            parse_memory("size=512M,hotplug=1G").unwrap().block,
            Size(2 << 20)
        );
        assert!(parse_memory("size=512M,hotplug=1G,hotplug=2G").is_err());
        assert!(parse_memory("size=512M,hotplug=x").is_err());
        assert!(parse_memory("size=").is_err());
        assert!(parse_memory("bogus=1").is_err());
        assert!(parse_memory("size=1G,size=2G").is_err());
        assert!(parse_memory("").is_err());
    }

    #[test]
    fn serial_option_forms() {
        assert_eq!(parse_serial("stdout"), Ok(SerialConfig::Stdout));
        assert_eq!(parse_serial("off"), Ok(SerialConfig::Off));
        assert_eq!(
            parse_serial("file=/tmp/x"),
            Ok(SerialConfig::File {
                path: "/tmp/x".into(),
                max: Size(DEFAULT_SERIAL_FILE_MAX)
            })
        );
        assert_eq!(
            parse_serial("file=/tmp/a,b,max=1M"),
            Ok(SerialConfig::File {
                path: "/tmp/a,b".into(),
                max: Size(1 << 20)
            })
        );
        assert!(parse_serial("file=").is_err());
        assert!(parse_serial("file=,max=1M").is_err());
        assert!(parse_serial("file=/x,max=0").is_err());
        assert!(parse_serial("file=/x,max=lots").is_err());
        assert!(matches!(
            parse_serial("file=/x,max=1M,max=2M"),
            Err(ConfigError::RepeatedKey { .. })
        ));
        assert!(parse_serial("tty").is_err());
    }

    #[test]
    fn net_option_forms() {
        let net = parse_net("vdpa=/dev/vhost-vdpa-0,mac=52:54:00:ab:cd:ef,queues=1").unwrap();
        assert_eq!(net.vdpa_path, PathBuf::from("/dev/vhost-vdpa-0"));
        assert_eq!(net.mac, Some([0x52, 0x54, 0, 0xab, 0xcd, 0xef]));
        assert_eq!(net.queue_pairs, 1);
        assert!(net.iotlb_batch);
        assert!(
            !parse_net("vdpa=/dev/x,iotlb-batch=off")
                .unwrap()
                .iotlb_batch
        );
        assert!(parse_net("vdpa=/dev/x,iotlb-batch=no").is_err());
        assert!(parse_net("vdpa=/dev/x,iotlb-batch=on,iotlb-batch=off").is_err());
        assert!(!net.iommu);
        assert!(parse_net("vdpa=/dev/x,iommu=on").unwrap().iommu);
        assert!(parse_net("vdpa=/dev/x,iommu=1").is_err());
        assert_eq!(parse_net("vdpa=/dev/x").unwrap().mac, None);
        for bad in [
            "",
            "vdpa=",
            "tap=tap0",
            "vdpa=/a,vdpa=/b",
            "vdpa=/a,queues=0",
            "vdpa=/a,mac=1:2:3",
        ] {
            assert!(parse_net(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(matches!(
            parse_mac("52:54:00:ab:cd"),
            Err(ConfigError::MalformedMac(_))
        ));
        assert!(parse_mac("52:54:00:ab:cd:ef:00").is_err());
        assert!(parse_mac("52:54:00:ab:cd:gg").is_err());
    }

    #[test]
    fn vdpa_option_forms() {
        let vdpa = parse_vdpa("path=/dev/vhost-vdpa-0").unwrap();
        assert_eq!(
            vdpa,
            VdpaDeviceConfig {
                path: "/dev/vhost-vdpa-0".into(),
                iommu: false,
                iotlb_batch: true,
                readonly: false,
            }
        );
        let all =
            parse_vdpa("path=/dev/vhost-vdpa-1,iommu=on,iotlb-batch=off,readonly=on").unwrap();
        assert!(all.iommu && !all.iotlb_batch && all.readonly);
        // Any order.
        assert_eq!(
            parse_vdpa("iommu=on,path=/p").unwrap().path,
            PathBuf::from("/p")
        );
        for bad in [
            "",
            "path=",
            "/dev/vhost-vdpa-0",
            "vdpa=/dev/vhost-vdpa-0",
            "path=/a,iommu=yes",
            "path=/a,iotlb-batch=1",
            "path=/a,readonly=",
            "path=/a,mac=52:54:00:00:00:01",
            "path=/a,num_queues=2",
            "iommu=on",
            "path=/a,,iommu=on",
        ] {
            assert!(
                matches!(parse_vdpa(bad), Err(ConfigError::MalformedVdpa(_))),
                "{bad:?}: {:?}",
                parse_vdpa(bad)
            );
        }
        for repeated in ["path=/a,path=/b", "path=/a,iommu=on,iommu=off"] {
            assert!(
                matches!(parse_vdpa(repeated), Err(ConfigError::RepeatedKey { .. })),
                "{repeated:?}"
            );
        }
        assert_eq!(
            parse_vdpa("path=/a,iommu=maybe").unwrap_err().to_string(),
            "malformed vdpa option 'path=/a,iommu=maybe': expected \
             path=PATH[,iommu=on|off][,iotlb-batch=on|off][,readonly=on|off]"
        );
    }

    #[test]
    fn a_key_given_twice_is_refused_in_every_option() {
        for bad in [
            "size=512M,hotplug=1G,block=4M,block=2M",
            "size=512M,hotplug=1G,hotplug=1G",
        ] {
            assert!(parse_memory(bad).is_err(), "{bad:?} was accepted");
        }
        for bad in [
            "vdpa=/a,queues=1,queues=1",
            "vdpa=/a,mac=52:54:00:00:00:01,mac=52:54:00:00:00:02",
        ] {
            assert!(parse_net(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(matches!(
            parse_memory("size=512M,hotplug=1G,block=4M,block=2M"),
            Err(ConfigError::RepeatedKey { .. })
        ));
    }

    #[test]
    fn mac_bytes_are_exactly_two_hex_digits() {
        for bad in [
            "+1:22:33:44:55:66",
            "52:54:00:ab:cd:+f",
            "52:54:00:ab:cd:-1",
            " 1:22:33:44:55:66",
        ] {
            assert!(
                matches!(parse_mac(bad), Err(ConfigError::MalformedMac(_))),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn size_prints_in_largest_whole_unit() {
        assert_eq!(Size(512 << 20).to_string(), "512M");
        assert_eq!(Size(3 << 30).to_string(), "3G");
        assert_eq!(Size(1000).to_string(), "1000 bytes");
    }

    fn config_with(vcpus: u8, memory: u64, kernel: &str) -> VmmConfig {
        VmmConfig {
            kernel: KernelConfig {
                path: kernel.into(),
                initramfs: None,
                cmdline: DEFAULT_CMDLINE.to_string(),
            },
            vcpus,
            memory: MemoryConfig {
                size: Size(memory),
                ..Default::default()
            },
            serial: SerialConfig::Stdout,
            seccomp: true,
            net: vec![],
            vdpa: vec![],
            api_socket: None,
            restore: None,
            take_over: None,
        }
    }

    const LIMITS: HostLimits = HostLimits {
        max_vcpus: 8,
        memory_bytes: 1 << 30,
    };

    #[test]
    fn counts_take_digits_only() {
        for bad in ["+1", "-1", " 1", "1 ", "", "0x1", "1_0", "١"] {
            let net = format!("vdpa=/a,queues={bad}");
            assert!(parse_net(&net).is_err(), "{net:?} was accepted");
        }
        assert_eq!(parse_net("vdpa=/a,queues=1").unwrap().queue_pairs, 1);
    }

    #[test]
    fn too_many_queue_pairs_are_refused_before_kvm_is_touched() {
        let mut config = config_with(1, 256 << 20, "/proc/self/exe");
        config.net = vec![
            parse_net("vdpa=/a,queues=16").unwrap(),
            parse_net("vdpa=/b,queues=17").unwrap(),
        ];
        assert_eq!(
            config.validate(&LIMITS),
            Err(ConfigError::TooManyQueuePairs {
                path: "/b".into(),
                queue_pairs: 17
            })
        );
        config.net.pop();
        assert_eq!(config.validate(&LIMITS), Ok(()));
        config.net = vec![parse_net("vdpa=/c,queues=2,iommu=on").unwrap()];
        assert_eq!(
            config.validate(&LIMITS),
            Err(ConfigError::MultiqueueBehindIommu { path: "/c".into() })
        );
    }

    #[test]
    fn validation_names_the_bad_input() {
        // /proc/self/exe is always a readable regular file.
        let exe = "/proc/self/exe";
        assert_eq!(
            config_with(0, 256 << 20, exe).validate(&LIMITS),
            Err(ConfigError::NoVcpus)
        );
        assert!(matches!(
            config_with(9, 256 << 20, exe).validate(&LIMITS),
            Err(ConfigError::TooManyVcpus { limit: 8, .. })
        ));
        assert!(matches!(
            config_with(1, 1 << 20, exe).validate(&LIMITS),
            Err(ConfigError::MemoryTooSmall { .. })
        ));
        assert!(matches!(
            config_with(1, 2 << 30, exe).validate(&LIMITS),
            Err(ConfigError::MemoryTooLarge { .. })
        ));
        assert!(matches!(
            config_with(1, (256 << 20) + 1, exe).validate(&LIMITS),
            Err(ConfigError::MemoryUnaligned(_))
        ));
        assert!(matches!(
            config_with(1, 256 << 20, "/nonexistent").validate(&LIMITS),
            Err(ConfigError::UnreadableFile { what: "kernel", .. })
        ));
        assert!(matches!(
            config_with(1, 256 << 20, "/").validate(&LIMITS),
            Err(ConfigError::UnreadableFile { .. })
        ));
        let mut long = config_with(1, 256 << 20, exe);
        long.kernel.cmdline = "x".repeat(MAX_CMDLINE_LEN + 1);
        assert!(matches!(
            long.validate(&LIMITS),
            Err(ConfigError::CmdlineTooLong { .. })
        ));
        assert_eq!(config_with(2, 256 << 20, exe).validate(&LIMITS), Ok(()));
        let mut hotplug = config_with(1, 256 << 20, exe);
        hotplug.memory.hotplug = Some(Size(3 << 20));
        assert!(matches!(
            hotplug.validate(&LIMITS),
            Err(ConfigError::HotplugUnaligned { .. })
        ));
        hotplug.memory.hotplug = Some(Size(1 << 30));
        assert!(matches!(
            hotplug.validate(&LIMITS),
            Err(ConfigError::HotplugTooLarge { .. })
        ));
        hotplug.memory.hotplug = Some(Size(256 << 20));
        hotplug.memory.block = Size(1 << 20);
        assert!(matches!(
            hotplug.validate(&LIMITS),
            Err(ConfigError::BadHotplugBlock(_))
        ));
        hotplug.memory.block = Size(2 << 20);
        assert_eq!(hotplug.validate(&LIMITS), Ok(()));
    }

    #[test]
    fn every_hotplug_block_must_be_able_to_have_a_kvm_slot() {
        let memory = |size: u64, hotplug: u64, block: u64| MemoryConfig {
            size: Size(size),
            hotplug: Some(Size(hotplug)),
            block: Size(block),
        };
        const MIB: u64 = 1 << 20;
        const GIB: u64 = 1 << 30;
        // x86 KVM's documented limit: 1 boot slot + 32763 blocks fit.
        let limit = 32764;
        check_memslots(&memory(512 * MIB, 32763 * 2 * MIB, 2 * MIB), limit).unwrap();
        let error = check_memslots(&memory(512 * MIB, 64 * GIB, 2 * MIB), limit).unwrap_err();
        assert!(
            matches!(
                error,
                ConfigError::TooManyMemslots {
                    blocks: 32768,
                    boot: 1,
                    suggested: Size(s),
                    ..
                } if s == 4 * MIB
            ),
            "{error:?}"
        );
        assert!(
            error.to_string().contains("use block=4M or larger"),
            "{error}"
        );
        // Above the MMIO hole boot RAM takes two slots.
        let error = check_memslots(&memory(4 * GIB, 64 * MIB, 2 * MIB), 33).unwrap_err();
        assert!(
            matches!(error, ConfigError::TooManyMemslots { boot: 2, .. }),
            "{error:?}"
        );
        check_memslots(&memory(4 * GIB, 62 * MIB, 2 * MIB), 33).unwrap();
        check_memslots(
            &MemoryConfig {
                hotplug: None,
                ..memory(4 * GIB, 0, 2 * MIB)
            },
            2,
        )
        .unwrap();
    }

    #[test]
    fn layouts_that_reach_the_64_bit_pci_window_are_refused() {
        let exe = "/proc/self/exe";
        // A host large enough that only the guest layout can refuse.
        let huge_host = HostLimits {
            max_vcpus: 8,
            memory_bytes: 4 << 40,
        };
        let with = |size: u64, hotplug: Option<u64>| {
            let mut config = config_with(1, size, exe);
            config.memory.hotplug = hotplug.map(Size);
            config.validate(&huge_host)
        };
        const G: u64 = 1 << 30;
        for (size, hotplug) in [
            (300 * G, None),
            (200 * G, Some(100 * G)),
            (8 * G, Some(500 * G)),
            (255 * G + (2 << 20), None),
        ] {
            assert!(
                matches!(with(size, hotplug), Err(ConfigError::LayoutTooLarge { .. })),
                "{size:#x} + {hotplug:?}: {:?}",
                with(size, hotplug)
            );
        }
        // The largest layouts that still fit below the window.
        assert_eq!(with(255 * G, None), Ok(()));
        assert_eq!(with(8 * G, Some(247 * G)), Ok(()));
        assert!(matches!(
            with(8 * G, Some(248 * G)),
            Err(ConfigError::LayoutTooLarge { .. })
        ));
        let message = with(300 * G, None).unwrap_err().to_string();
        assert!(message.contains("256G"), "{message}");
    }

    #[test]
    fn unreadable_file_message_is_one_line() {
        let error = config_with(1, 256 << 20, "/nonexistent")
            .validate(&LIMITS)
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "cannot read kernel '/nonexistent': No such file or directory"
        );
    }
}
