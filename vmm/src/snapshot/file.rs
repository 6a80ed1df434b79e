//! The snapshot's state file: one header line, then the state.
//!
//! ```text
//! {"magic":"microvm-snapshot","version":1,"arch":"x86_64","length":N,"crc32":C}\n
//! <N bytes: the state, JSON>
//! ```
//!
//! The header is read first and on its own (at most [`MAX_HEADER`] bytes),
//! so a file that is not a snapshot, one from another version or another
//! architecture, is refused before its state is parsed; then exactly
//! `length` bytes (at most [`MAX_STATE`]) must follow, nothing after them,
//! and their CRC-32 must match: a truncated or corrupted file is refused with
//! what was wrong, never half read.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// What the first line says a snapshot is.
pub const MAGIC: &str = "microvm-snapshot";
/// The state format this build writes and reads. A change to any saved
/// type that an older reader would misread bumps it.
pub const VERSION: u32 = 1;
/// The architecture whose state the file holds.
pub const ARCH: &str = std::env::consts::ARCH;
/// The longest header line read.
pub const MAX_HEADER: usize = 4096;
/// The largest state read (guest memory is in its own file): vCPU state is
/// about 30 KiB each, so this leaves room for every device's.
pub const MAX_STATE: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a microvm snapshot ({why})")]
    NotASnapshot { path: PathBuf, why: String },
    #[error("{path}: snapshot format version {found}; this microvm reads version {VERSION}")]
    ForeignVersion { path: PathBuf, found: u32 },
    #[error("{path}: a snapshot of an {found} machine; this microvm runs {ARCH} guests")]
    ForeignArch { path: PathBuf, found: String },
    #[error("{path}: the state is {length} bytes, more than the {MAX_STATE} a snapshot may hold")]
    TooLarge { path: PathBuf, length: u64 },
    #[error(
        "{path}: truncated: the header promises {expected} bytes of state, the file has {found}"
    )]
    Truncated {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("{path}: {extra} bytes after the state: not a file this microvm wrote")]
    TrailingBytes { path: PathBuf, extra: u64 },
    #[error(
        "{path}: corrupted: the state's CRC-32 is {found:#010x}, the header says {expected:#010x}"
    )]
    Corrupted {
        path: PathBuf,
        expected: u32,
        found: u32,
    },
    #[error("{path}: the state does not fit this microvm's format: {reason}")]
    BadState { path: PathBuf, reason: String },
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    magic: String,
    version: u32,
    arch: String,
    length: u64,
    crc32: u32,
}

/// The header line and the state, as a state file holds them (also what a
/// live update sends).
pub fn encode<T: Serialize>(state: &T, path: &Path) -> Result<Vec<u8>, StateFileError> {
    let bad = |e: serde_json::Error| StateFileError::BadState {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let body = serde_json::to_vec(state).map_err(bad)?;
    let header = Header {
        magic: MAGIC.to_string(),
        version: VERSION,
        arch: ARCH.to_string(),
        length: u64::try_from(body.len()).unwrap_or(u64::MAX),
        crc32: crc32fast::hash(&body),
    };
    let mut bytes = serde_json::to_vec(&header).map_err(bad)?;
    bytes.push(b'\n');
    bytes.extend_from_slice(&body);
    Ok(bytes)
}

/// Writes `state` to a new file at `path` (an existing file is refused,
/// never overwritten), and syncs it.
pub fn write<T: Serialize>(path: &Path, state: &T) -> Result<(), StateFileError> {
    let io = |source| StateFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bytes = encode(state, path)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io)?;
    file.write_all(&bytes).map_err(io)?;
    file.sync_all().map_err(io)
}

/// Reads the state a snapshot's state file holds, checking everything the
/// header promises before the state is parsed.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T, StateFileError> {
    let file = std::fs::File::open(path).map_err(|source| StateFileError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let size = file.metadata().map(|m| m.len()).ok();
    decode(file, path, size)
}

/// Reads a header line and the state it promises from `input` (named
/// `path` in messages; `size`, if known, its whole length), with every
/// check of [`read`].
pub fn decode<T: DeserializeOwned>(
    input: impl Read,
    path: &Path,
    size: Option<u64>,
) -> Result<T, StateFileError> {
    let owned = || path.to_path_buf();
    let io = |source| StateFileError::Io {
        path: owned(),
        source,
    };
    let not_snapshot = |why: &str| StateFileError::NotASnapshot {
        path: owned(),
        why: why.to_string(),
    };
    let mut reader = BufReader::new(input);
    let mut line = Vec::new();
    let limit = u64::try_from(MAX_HEADER).unwrap_or(u64::MAX);
    (&mut reader)
        .take(limit)
        .read_until(b'\n', &mut line)
        .map_err(io)?;
    if line.pop() != Some(b'\n') {
        return Err(not_snapshot("no header line"));
    }
    let header: Header =
        serde_json::from_slice(&line).map_err(|_| not_snapshot("its first line is no header"))?;
    if header.magic != MAGIC {
        return Err(not_snapshot("its header names something else"));
    }
    if header.version != VERSION {
        return Err(StateFileError::ForeignVersion {
            path: owned(),
            found: header.version,
        });
    }
    if header.arch != ARCH {
        return Err(StateFileError::ForeignArch {
            path: owned(),
            found: header.arch,
        });
    }
    if header.length > MAX_STATE {
        return Err(StateFileError::TooLarge {
            path: owned(),
            length: header.length,
        });
    }
    // One byte more than promised, to see whether anything follows.
    let mut body = Vec::new();
    reader
        .take(header.length.saturating_add(1))
        .read_to_end(&mut body)
        .map_err(io)?;
    let found = u64::try_from(body.len()).unwrap_or(u64::MAX);
    if found < header.length {
        return Err(StateFileError::Truncated {
            path: owned(),
            expected: header.length,
            found,
        });
    }
    if found > header.length {
        let extra = size
            .unwrap_or(0)
            .saturating_sub(u64::try_from(line.len()).unwrap_or(0) + 1 + header.length)
            .max(1);
        return Err(StateFileError::TrailingBytes {
            path: owned(),
            extra,
        });
    }
    let crc = crc32fast::hash(&body);
    if crc != header.crc32 {
        return Err(StateFileError::Corrupted {
            path: owned(),
            expected: header.crc32,
            found: crc,
        });
    }
    serde_json::from_slice(&body).map_err(|e| StateFileError::BadState {
        path: owned(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Example {
        vcpus: u8,
        regs: Vec<u64>,
        name: String,
    }

    fn example() -> Example {
        Example {
            vcpus: 2,
            regs: vec![1, u64::MAX, 0x1234],
            name: "net0".into(),
        }
    }

    fn dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("microvm-state-file-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A written file, and its bytes.
    fn written(name: &str) -> (PathBuf, Vec<u8>) {
        let path = dir(name).join("state");
        write(&path, &example()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        (path, bytes)
    }

    /// The header line of `bytes` with `field` set to `value`, and the rest.
    fn with_header(bytes: &[u8], field: &str, value: serde_json::Value) -> Vec<u8> {
        let end = bytes.iter().position(|&b| b == b'\n').unwrap();
        let mut header: serde_json::Value = serde_json::from_slice(&bytes[..end]).unwrap();
        header[field] = value;
        let mut out = serde_json::to_vec(&header).unwrap();
        out.extend_from_slice(&bytes[end..]);
        out
    }

    #[test]
    fn what_is_written_is_read_back_equal() {
        let (path, bytes) = written("round-trip");
        assert!(bytes.starts_with(b"{\"magic\":\"microvm-snapshot\",\"version\":1,"));
        assert_eq!(read::<Example>(&path).unwrap(), example());
    }

    #[test]
    fn an_existing_file_is_never_overwritten() {
        let (path, bytes) = written("exists");
        let error = write(
            &path,
            &Example {
                vcpus: 9,
                ..example()
            },
        )
        .unwrap_err();
        assert!(
            matches!(&error, StateFileError::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists),
            "{error}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
    }

    #[test]
    fn every_damaged_or_foreign_file_is_refused_with_what_is_wrong() {
        let (path, bytes) = written("damaged");
        let header_end = bytes.iter().position(|&b| b == b'\n').unwrap();
        let mut flipped = bytes.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 0x01;
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("empty", vec![], "not a microvm snapshot (no header line)"),
            (
                "text",
                b"hello\nworld".to_vec(),
                "its first line is no header",
            ),
            ("no newline", bytes[..header_end].to_vec(), "no header line"),
            (
                "other magic",
                with_header(&bytes, "magic", "qemu-savevm".into()),
                "its header names something else",
            ),
            (
                "future version",
                with_header(&bytes, "version", 2.into()),
                "snapshot format version 2; this microvm reads version 1",
            ),
            (
                "other arch",
                with_header(&bytes, "arch", "aarch64".into()),
                "a snapshot of an aarch64 machine",
            ),
            (
                "huge",
                with_header(&bytes, "length", (MAX_STATE + 1).into()),
                "more than the",
            ),
            (
                "truncated",
                bytes[..bytes.len() - 5].to_vec(),
                "truncated: the header promises",
            ),
            ("header only", bytes[..=header_end].to_vec(), "truncated"),
            ("flipped bit", flipped, "corrupted: the state's CRC-32"),
            (
                "trailing",
                [bytes.clone(), b"more".to_vec()].concat(),
                "4 bytes after the state",
            ),
            (
                "wrong crc",
                with_header(&bytes, "crc32", 7.into()),
                "the header says 0x00000007",
            ),
        ];
        for (what, content, expected) in cases {
            std::fs::write(&path, &content).unwrap();
            let error = read::<Example>(&path).unwrap_err().to_string();
            assert!(error.contains(expected), "{what}: {error}");
            assert!(
                error.starts_with(&path.display().to_string()),
                "{what}: {error}"
            );
        }
        // A long first line is not read past MAX_HEADER.
        std::fs::write(&path, vec![b'x'; MAX_HEADER * 4]).unwrap();
        let error = read::<Example>(&path).unwrap_err().to_string();
        assert!(error.contains("no header line"), "{error}");
    }

    #[test]
    fn a_state_of_another_shape_is_refused_as_such() {
        #[derive(Serialize)]
        struct Other {
            cpus: String,
        }
        let path = dir("shape").join("state");
        write(&path, &Other { cpus: "two".into() }).unwrap();
        let error = read::<Example>(&path).unwrap_err().to_string();
        assert!(
            error.contains("does not fit this microvm's format"),
            "{error}"
        );
    }

    #[test]
    fn a_missing_file_says_so() {
        let path = dir("missing").join("nothing-here");
        let error = read::<Example>(&path).unwrap_err();
        assert!(
            matches!(&error, StateFileError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound),
            "{error}"
        );
    }
}
