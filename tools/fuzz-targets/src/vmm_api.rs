//! The VMM's fuzz targets, for the inputs an API client and a user
//! control: the control API's HTTP handling and the `microvm` command line.
//! They drive the `vmm` crate through its public API, so the product holds
//! no fuzz or test code.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use clap::Parser;

use devices::dma::TransactionRecord;
use vmm::api::control::{
    IommuStatus, LifecycleError, MemoryRequestError, MemoryStatus, RunState, Transition,
    VdpaStatus, VmControl, VmSummary,
};
use vmm::api::http::{self, HttpError};
use vmm::api::routes::{self, ApiState, Outcome};
use vmm::config::{self, cli::Cli, HostLimits};
use vmm::vstate::memory::{pci_layout, ram_end};

/// A VM for the API that never changes by itself and has no devices.
struct StillVm;

impl VmControl for StillVm {
    fn summary(&self) -> VmSummary {
        VmSummary {
            vcpus: 1,
            memory_bytes: 256 << 20,
            ram: vec![(0, 256 << 20)],
        }
    }

    fn vdpa_devices(&self) -> Vec<VdpaStatus> {
        vec![]
    }

    fn memory(&self) -> Option<MemoryStatus> {
        None
    }

    fn iommu(&self) -> Option<IommuStatus> {
        None
    }

    fn request_memory(&self, _size: u64) -> Result<(), MemoryRequestError> {
        Err(MemoryRequestError::NoHotplug)
    }

    fn transactions(&self) -> Vec<TransactionRecord> {
        vec![]
    }

    fn run_state(&self) -> RunState {
        RunState::Running
    }

    /// No vCPUs or devices to stop: every pause is refused.
    fn set_run_state(&self, _target: RunState) -> Result<Transition, LifecycleError> {
        Err(LifecycleError::Gone)
    }

    /// Nothing to save: every snapshot is refused.
    fn snapshot(
        &self,
        _dir: std::path::PathBuf,
    ) -> Result<vmm::api::control::SnapshotReport, LifecycleError> {
        Err(LifecycleError::Gone)
    }

    /// Nobody takes it: every live update is refused.
    fn update(
        &self,
        _socket: std::path::PathBuf,
    ) -> Result<vmm::api::control::UpdateReport, LifecycleError> {
        Err(LifecycleError::Gone)
    }
}

fn state() -> &'static ApiState {
    &StillVm
}

/// HTTP request handling: `data[0]` sets how the rest arrives (in pieces
/// of 1 to 256 bytes), as the poll loop would receive it; each prefix is
/// parsed, and a complete request is routed and answered.
pub fn http(data: &[u8]) {
    let Some((&piece, stream)) = data.split_first() else {
        return;
    };
    let piece = usize::from(piece) + 1;
    let mut end = 0;
    loop {
        end = (end + piece).min(stream.len());
        match http::parse(&stream[..end]) {
            Ok(None) if end < stream.len() => continue,
            Ok(None) => return,
            Ok(Some(request)) => {
                assert!(request.body.len() <= http::MAX_BODY_BYTES);
                assert!(request.path.starts_with('/'));
                let answer = match routes::handle(state(), &request) {
                    Outcome::Answer(answer) => answer,
                    Outcome::Resize(_) => panic!("a VM without hotplug memory started a resize"),
                };
                check_answer(&answer.to_bytes(), answer.status);
                return;
            }
            Err(error) => {
                assert!(matches!(error.status(), 400 | 408 | 413 | 431 | 501));
                if error == HttpError::HeadTooLarge {
                    assert!(end > 0);
                }
                let answer = http::Response::from_error(&error);
                check_answer(&answer.to_bytes(), answer.status);
                return;
            }
        }
    }
}

/// Every answer is one well-formed HTTP response with a JSON body.
fn check_answer(bytes: &[u8], status: u16) {
    let mut headers = [httparse::EMPTY_HEADER; 8];
    let mut response = httparse::Response::new(&mut headers);
    let head = match response.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        other => panic!("malformed answer ({other:?})"),
    };
    assert_eq!(response.code, Some(status));
    let body = bytes.get(head..).unwrap_or_default();
    assert!(serde_json::from_slice::<serde_json::Value>(body).is_ok());
}

/// The `microvm` command line: arguments are the NUL-separated pieces of
/// `data`. Parsing and the checks that need no files must never panic,
/// and a configuration that validates must lay RAM out below the PCI
/// window. Each piece is also fed to the option parsers on its own.
pub fn cli(data: &[u8]) {
    let args: Vec<OsString> = std::iter::once(OsString::from("microvm"))
        .chain(
            data.split(|&b| b == 0)
                .map(|a| OsString::from_vec(a.to_vec())),
        )
        .collect();
    for arg in args.iter().skip(1).filter_map(|a| a.to_str()) {
        let _ = config::parse_size(arg);
        let _ = config::parse_mac(arg);
        let _ = config::parse_net(arg);
        let _ = config::parse_vdpa(arg);
        let _ = config::parse_serial(arg);
        if let Ok(memory) = config::parse_memory(arg) {
            let _ = ram_end(memory.size.0, memory.hotplug.map_or(0, |h| h.0));
        }
    }
    let Ok(cli) = Cli::try_parse_from(args) else {
        return;
    };
    let Ok(config) = cli.into_config() else {
        return;
    };
    let limits = HostLimits {
        max_vcpus: 64,
        memory_bytes: 1 << 40,
    };
    // Validation looks at the kernel and initramfs files last; point them
    // at a file that is always readable, so every other check is reached.
    let mut config = config;
    config.kernel.path = "/proc/self/exe".into();
    config.kernel.initramfs = None;
    if config.validate(&limits).is_ok() {
        let hotplug = config.memory.hotplug.map_or(0, |h| h.0);
        let end = ram_end(config.memory.size.0, hotplug).expect("validated layouts fit");
        assert!(end <= pci_layout::MEM64_START);
        assert!(config.memory.size.0 <= limits.memory_bytes);
    }
}

/// Starting points for the HTTP target (the runner's seed corpus).
pub const HTTP_SEEDS: &[&[u8]] = &[
    b"\x07GET /info HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x00GET /counters HTTP/1.1\r\n\r\n",
    b"\x10PUT /memory HTTP/1.1\r\nContent-Length: 40\r\n\r\n{\"requested_size\":\"1G\",\"timeout_ms\":500}",
    b"\xffPUT /memory HTTP/1.1\r\nContent-Length: +5\r\n\r\nhello",
    b"\x03DELETE /info HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
];

/// Starting points for the CLI target.
pub const CLI_SEEDS: &[&[u8]] = &[
    b"--kernel\0/k\0--memory\0size=512M,hotplug=2G,block=4M\0--cpus\x002",
    b"--kernel\0/k\0--net\0vdpa=/dev/vhost-vdpa-0,mac=52:54:00:12:34:56,queues=1",
    b"--kernel\0/k\0--vdpa\0path=/dev/vhost-vdpa-1,iommu=on,iotlb-batch=off,readonly=on",
    b"--kernel\0/k\0--serial\0file=/tmp/s,max=1M\0--seccomp\0off\0--api-socket\0/tmp/a",
    b"--kernel\0/k\0--memory\x00300G\0--cmdline\0console=ttyS0",
];

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: reproducible inputs without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Pieces that make mutations interesting for both targets.
    const TOKENS: &[&[u8]] = &[
        b"\r\n",
        b"\r\n\r\n",
        b":",
        b",",
        b"=",
        b"\0",
        b"+",
        b"-",
        b" ",
        b"Content-Length: ",
        b"99999999999999999999",
        b"18446744073709551615",
        b"G",
        b"M",
        b"hotplug=",
        b"block=",
        b"size=",
        b"max=",
        b"--memory",
        b"--net",
        b"--vdpa",
        b"path=",
        b"readonly=on",
        b"--serial",
        b"--cpus",
        b"\xff\xfe",
    ];

    /// A seed with a few random edits, or plain random bytes.
    fn input(rng: &mut Rng, seeds: &[&[u8]]) -> Vec<u8> {
        if rng.below(4) == 0 {
            let len = rng.below(512);
            return (0..len).map(|_| rng.next() as u8).collect();
        }
        let mut data = seeds[rng.below(seeds.len())].to_vec();
        for _ in 0..=rng.below(6) {
            let at = rng.below(data.len() + 1);
            match rng.below(4) {
                0 => data.insert(at, rng.next() as u8),
                1 if at < data.len() => {
                    data.remove(at);
                }
                2 => {
                    let token = TOKENS[rng.below(TOKENS.len())];
                    data.splice(at..at, token.iter().copied());
                }
                _ if at < data.len() => data[at] = rng.next() as u8,
                _ => {}
            }
        }
        data
    }

    fn run(target: fn(&[u8]), seeds: &[&[u8]], seed: u64, count: usize) {
        let mut rng = Rng(seed);
        for seed in seeds {
            target(seed);
        }
        for _ in 0..count {
            target(&input(&mut rng, seeds));
        }
    }

    #[test]
    fn the_http_target_survives_seeded_random_inputs() {
        run(http, HTTP_SEEDS, 0x5eed_0001, 5000);
        // Big heads and bodies, past every limit.
        let big = [
            &b"\x00GET /"[..],
            &vec![b'a'; http::MAX_HEAD_BYTES + 10],
            b" HTTP/1.1\r\n\r\n",
        ]
        .concat();
        http(&big);
    }

    #[test]
    fn the_cli_target_survives_seeded_random_inputs() {
        run(cli, CLI_SEEDS, 0x5eed_0002, 3000);
    }

    #[test]
    fn the_seeds_reach_the_deep_paths() {
        // A seed that parses and routes (200), one refused by the parser.
        let answer = |data: &[u8]| {
            let request = http::parse(&data[1..]).unwrap().unwrap();
            match routes::handle(state(), &request) {
                Outcome::Answer(answer) => answer.status,
                Outcome::Resize(_) => 0,
            }
        };
        assert_eq!(answer(HTTP_SEEDS[0]), 200);
        assert_eq!(answer(HTTP_SEEDS[2]), 409, "no hotplug memory in this VM");
        assert!(http::parse(&HTTP_SEEDS[3][1..]).is_err());
    }
}
