//! Which version of each key the server may hold, and the file `run` hands to `verify`.
//!
//! Per key two numbers are kept: `acked`, the version of the last SET the server acknowledged
//! (0 = as loaded), and `issued`, the highest version ever sent. They differ when a SET was sent
//! but its reply never came (the connection died in a migration): the server may or may not have
//! applied it, so any version in `acked..=issued` is acceptable. Each new SET takes
//! `issued + 1`, so versions of one key never repeat.
//!
//! State file layout (all integers little-endian):
//!
//! ```text
//! offset  size        field
//! 0       8           magic "PCLBVER\0"
//! 8       4           format version, 1
//! 12      8           records N
//! 20      8           seed
//! 28      8           value size in bytes
//! 36      4*N         acked[0..N]   (u32)
//! 36+4N   4*N         issued[0..N]  (u32)
//! 36+8N   8           FNV-1a 64 of bytes 0..36+8N
//! ```
//!
//! The length is checked against N before anything else, so a truncated file is reported as
//! such, and the checksum catches corruption.

use std::io::Write;
use std::ops::RangeInclusive;
use std::path::Path;

use thiserror::Error;

const MAGIC: &[u8; 8] = b"PCLBVER\0";
const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 36;

/// Per-key versions (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyVersions {
    acked: Vec<u32>,
    issued: Vec<u32>,
}

impl KeyVersions {
    /// Every key as loaded (version 0, certain).
    pub fn loaded(records: usize) -> Self {
        KeyVersions {
            acked: vec![0; records],
            issued: vec![0; records],
        }
    }

    pub fn len(&self) -> usize {
        self.acked.len()
    }

    pub fn is_empty(&self) -> bool {
        self.acked.is_empty()
    }

    /// Takes the next version of `key` for a SET about to be sent.
    pub fn issue(&mut self, key: usize) -> u32 {
        self.issued[key] += 1;
        self.issued[key]
    }

    /// The server acknowledged the SET of `version`.
    pub fn acknowledge(&mut self, key: usize, version: u32) {
        self.acked[key] = self.acked[key].max(version);
    }

    /// The server answered the SET of `version` with an error: it did not apply it.
    pub fn reject(&mut self, key: usize, version: u32) {
        if self.issued[key] == version {
            self.issued[key] = version - 1;
        }
    }

    /// A read saw `version`: the server holds it, older versions are no longer acceptable.
    pub fn observe(&mut self, key: usize, version: u32) {
        self.acked[key] = self.acked[key].max(version);
    }

    /// The versions the server may hold for `key`, newest last.
    pub fn acceptable(&self, key: usize) -> RangeInclusive<u32> {
        self.acked[key]..=self.issued[key]
    }

    /// Keys whose value is not known for sure.
    pub fn uncertain_count(&self) -> usize {
        self.acked
            .iter()
            .zip(&self.issued)
            .filter(|(a, i)| a != i)
            .count()
    }
}

/// What `verify` needs from a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateFile {
    pub seed: u64,
    pub value_size: u64,
    pub versions: KeyVersions,
}

#[derive(Debug, Error)]
pub enum StateError {
    #[error("cannot read or write the state file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("not a pclive-bench state file (bad magic): pass the --state file `run` wrote")]
    BadMagic,
    #[error("state file format version {0} is not supported (expected {FORMAT_VERSION}): rerun with the same pclive-bench-client build")]
    UnsupportedVersion(u32),
    #[error("state file truncated or padded: {actual} bytes, {expected} expected for {records} records (was `run` killed while writing it?)")]
    BadLength {
        actual: usize,
        expected: usize,
        records: u64,
    },
    #[error("state file corrupt: checksum mismatch")]
    BadChecksum,
    #[error("state file invalid: key {key} has acked version {acked} above issued {issued}")]
    Inconsistent { key: usize, acked: u32, issued: u32 },
}

impl StateFile {
    pub fn encode(&self) -> Vec<u8> {
        let n = self.versions.len();
        let mut out = Vec::with_capacity(HEADER_LEN + 8 * n + 8);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(n as u64).to_le_bytes());
        out.extend_from_slice(&self.seed.to_le_bytes());
        out.extend_from_slice(&self.value_size.to_le_bytes());
        for v in self.versions.acked.iter().chain(&self.versions.issued) {
            out.extend_from_slice(&v.to_le_bytes());
        }
        let checksum = fnv1a64(&out);
        out.extend_from_slice(&checksum.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<StateFile, StateError> {
        if bytes.len() < 8 || &bytes[..8] != MAGIC {
            return Err(if bytes.len() < 8 && MAGIC.starts_with(bytes) {
                StateError::BadLength {
                    actual: bytes.len(),
                    expected: HEADER_LEN + 8,
                    records: 0,
                }
            } else {
                StateError::BadMagic
            });
        }
        if bytes.len() < HEADER_LEN {
            return Err(StateError::BadLength {
                actual: bytes.len(),
                expected: HEADER_LEN + 8,
                records: 0,
            });
        }
        let format = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if format != FORMAT_VERSION {
            return Err(StateError::UnsupportedVersion(format));
        }
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let records = u64_at(12);
        let expected = usize::try_from(records)
            .ok()
            .and_then(|n| n.checked_mul(8))
            .and_then(|b| b.checked_add(HEADER_LEN + 8));
        if expected != Some(bytes.len()) {
            return Err(StateError::BadLength {
                actual: bytes.len(),
                expected: expected.unwrap_or(usize::MAX),
                records,
            });
        }
        let body_end = bytes.len() - 8;
        if fnv1a64(&bytes[..body_end]) != u64_at(body_end) {
            return Err(StateError::BadChecksum);
        }
        let n = records as usize;
        let read_u32s = |from: usize| -> Vec<u32> {
            bytes[from..from + 4 * n]
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect()
        };
        let versions = KeyVersions {
            acked: read_u32s(HEADER_LEN),
            issued: read_u32s(HEADER_LEN + 4 * n),
        };
        if let Some(key) = (0..n).find(|&k| versions.acked[k] > versions.issued[k]) {
            return Err(StateError::Inconsistent {
                key,
                acked: versions.acked[key],
                issued: versions.issued[key],
            });
        }
        Ok(StateFile {
            seed: u64_at(20),
            value_size: u64_at(28),
            versions,
        })
    }

    /// Writes to a temporary file then renames, so a reader never sees half a file.
    pub fn write(&self, path: &Path) -> Result<(), StateError> {
        let io = |source| StateError::Io {
            path: path.display().to_string(),
            source,
        };
        let tmp = path.with_extension("tmp");
        let mut file = std::fs::File::create(&tmp).map_err(io)?;
        file.write_all(&self.encode()).map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    pub fn read(path: &Path) -> Result<StateFile, StateError> {
        let bytes = std::fs::read(path).map_err(|source| StateError::Io {
            path: path.display().to_string(),
            source,
        })?;
        StateFile::decode(&bytes)
    }
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StateFile {
        let mut versions = KeyVersions::loaded(5);
        let v = versions.issue(1);
        versions.acknowledge(1, v);
        versions.issue(3); // lost: uncertain
        StateFile {
            seed: 9,
            value_size: 1024,
            versions,
        }
    }

    #[test]
    fn tracks_uncertain_writes() {
        let mut k = KeyVersions::loaded(2);
        assert_eq!(k.acceptable(0), 0..=0);
        let v1 = k.issue(0);
        assert_eq!(k.acceptable(0), 0..=1, "in flight: either");
        k.acknowledge(0, v1);
        assert_eq!(k.acceptable(0), 1..=1);
        let v2 = k.issue(0); // lost
        let v3 = k.issue(0); // lost too
        assert_eq!((v2, v3), (2, 3));
        assert_eq!(k.acceptable(0), 1..=3);
        assert_eq!(k.uncertain_count(), 1);
        k.observe(0, 2);
        assert_eq!(k.acceptable(0), 2..=3);
        let v4 = k.issue(0);
        k.reject(0, v4);
        assert_eq!(k.acceptable(0), 2..=3);
        let v4 = k.issue(0);
        assert_eq!(v4, 4, "a rejected version is reused: it was never applied");
        k.acknowledge(0, v4);
        assert_eq!(k.acceptable(0), 4..=4);
        assert_eq!(k.uncertain_count(), 0);
    }

    #[test]
    fn round_trips() {
        let state = sample();
        assert_eq!(StateFile::decode(&state.encode()).unwrap(), state);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.state");
        state.write(&path).unwrap();
        assert_eq!(StateFile::read(&path).unwrap(), state);
    }

    #[test]
    fn rejects_truncated_padded_and_corrupt_files() {
        let bytes = sample().encode();
        for cut in [0, 4, 20, HEADER_LEN, bytes.len() - 1] {
            assert!(
                matches!(
                    StateFile::decode(&bytes[..cut]),
                    Err(StateError::BadLength { .. })
                ),
                "cut at {cut}: {:?}",
                StateFile::decode(&bytes[..cut])
            );
        }
        let mut padded = bytes.clone();
        padded.push(0);
        assert!(matches!(
            StateFile::decode(&padded),
            Err(StateError::BadLength { .. })
        ));
        let mut flipped = bytes.clone();
        flipped[HEADER_LEN + 2] ^= 1;
        assert!(matches!(
            StateFile::decode(&flipped),
            Err(StateError::BadChecksum)
        ));
        let mut other = bytes.clone();
        other[0] = b'X';
        assert!(matches!(
            StateFile::decode(&other),
            Err(StateError::BadMagic)
        ));
        let mut future = bytes;
        future[8] = 2;
        assert!(matches!(
            StateFile::decode(&future),
            Err(StateError::UnsupportedVersion(2))
        ));
        // A huge record count in the header is a length error, not an allocation.
        let mut huge = sample().encode();
        huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            StateFile::decode(&huge),
            Err(StateError::BadLength { .. })
        ));
    }
}
