//! Corrections to what CRIU dumps, applied to an image directory before it is restored.
//!
//! **Overdue periodic timerfds.** The kernel re-arms a periodic timerfd only when it is read: once
//! it expired in a frozen task, `/proc/PID/fdinfo` shows `it_value: (0, 0)` with the interval
//! intact. CRIU dumps that as is and restores it with `timerfd_settime(it_value = 0)`, which
//! *disarms* the timer: the restored program reads the pending ticks once and then blocks
//! forever (stock CRIU 4.2.1, kernel 6.18; any program whose timer period is shorter than the
//! freeze, i.e. every migration of a program with a periodic timerfd). The entry is corrected to
//! expire at once (1 ns) with the same interval, which is what the thawed timer would do.
//!
//! The image is patched at the protobuf wire level: `file_entry` has many optional members that
//! pclive does not model, and prost drops fields it does not know. Only the `tfd` member of an
//! entry is decoded and rewritten; every other byte is copied as it was.

use std::fs;
use std::path::Path;

use prost::encoding::{decode_key, decode_varint, encode_key, encode_varint, WireType};
use prost::Message;

use crate::images::{split_entries, Header, ImageError};

/// files.img (criu/include/magic.h).
pub const FILES_MAGIC: u32 = 0x5630_3138;
/// `file_entry.tfd` (images/fdinfo.proto).
const FILE_ENTRY_TFD: u32 = 12;

#[derive(Clone, PartialEq, Message)]
pub struct FownEntry {
    #[prost(uint32, required, tag = "1")]
    pub uid: u32,
    #[prost(uint32, required, tag = "2")]
    pub euid: u32,
    #[prost(uint32, required, tag = "3")]
    pub signum: u32,
    #[prost(uint32, required, tag = "4")]
    pub pid_type: u32,
    #[prost(uint32, required, tag = "5")]
    pub pid: u32,
}

/// images/timerfd.proto.
#[derive(Clone, PartialEq, Message)]
pub struct TimerfdEntry {
    #[prost(uint32, required, tag = "1")]
    pub id: u32,
    #[prost(uint32, required, tag = "2")]
    pub flags: u32,
    #[prost(message, required, tag = "3")]
    pub fown: FownEntry,
    #[prost(uint32, required, tag = "4")]
    pub clockid: u32,
    #[prost(uint64, required, tag = "5")]
    pub ticks: u64,
    #[prost(uint32, required, tag = "6")]
    pub settime_flags: u32,
    #[prost(uint64, required, tag = "7")]
    pub vsec: u64,
    #[prost(uint64, required, tag = "8")]
    pub vnsec: u64,
    #[prost(uint64, required, tag = "9")]
    pub isec: u64,
    #[prost(uint64, required, tag = "10")]
    pub insec: u64,
}

impl TimerfdEntry {
    /// Periodic, and recorded as disarmed because its expiry passed while it was frozen.
    fn overdue(&self) -> bool {
        self.vsec == 0 && self.vnsec == 0 && (self.isec != 0 || self.insec != 0)
    }
}

/// One top-level field of a protobuf message: its tag, wire type and raw bytes (key included).
struct RawField<'a> {
    tag: u32,
    wire_type: WireType,
    /// The whole field as it was encoded.
    raw: &'a [u8],
    /// The payload of a length-delimited field.
    payload: &'a [u8],
}

fn fields(mut buf: &[u8]) -> Result<Vec<RawField<'_>>, String> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let start = buf;
        let (tag, wire_type) = decode_key(&mut buf).map_err(|e| e.to_string())?;
        let payload: &[u8] = match wire_type {
            WireType::Varint => {
                decode_varint(&mut buf).map_err(|e| e.to_string())?;
                &[]
            }
            WireType::SixtyFourBit | WireType::ThirtyTwoBit => {
                let n = if wire_type == WireType::SixtyFourBit {
                    8
                } else {
                    4
                };
                if buf.len() < n {
                    return Err(format!("field {tag}: truncated"));
                }
                buf = &buf[n..];
                &[]
            }
            WireType::LengthDelimited => {
                let len = decode_varint(&mut buf).map_err(|e| e.to_string())? as usize;
                if buf.len() < len {
                    return Err(format!(
                        "field {tag}: {len} bytes announced, {} left",
                        buf.len()
                    ));
                }
                let (payload, rest) = buf.split_at(len);
                buf = rest;
                payload
            }
            other => return Err(format!("field {tag}: unsupported wire type {other:?}")),
        };
        let used = start.len() - buf.len();
        out.push(RawField {
            tag,
            wire_type,
            raw: &start[..used],
            payload,
        });
    }
    Ok(out)
}

/// The entry with an overdue periodic timerfd corrected; `None` if it needs nothing.
fn fix_entry(entry: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let fields = fields(entry)?;
    let mut changed = false;
    let mut out = Vec::with_capacity(entry.len() + 8);
    for f in &fields {
        if f.tag == FILE_ENTRY_TFD && f.wire_type == WireType::LengthDelimited {
            let mut tfd =
                TimerfdEntry::decode(f.payload).map_err(|e| format!("timerfd entry: {e}"))?;
            if tfd.overdue() {
                tfd.vnsec = 1;
                changed = true;
                encode_key(FILE_ENTRY_TFD, WireType::LengthDelimited, &mut out);
                encode_varint(tfd.encoded_len() as u64, &mut out);
                tfd.encode(&mut out).expect("a Vec grows to fit");
                continue;
            }
        }
        out.extend_from_slice(f.raw);
    }
    Ok(changed.then_some(out))
}

/// Corrects the image directory's files.img (see the module documentation); returns how many
/// timerfds were corrected. A directory without files.img needs nothing.
pub fn fix_overdue_timerfds(dir: &Path) -> Result<usize, ImageError> {
    let path = dir.join("files.img");
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(source) => return Err(ImageError::Io { file: path, source }),
    };
    let header = Header::Common(FILES_MAGIC);
    let entries = split_entries(&path, &bytes, header)?;
    let mut fixed = 0;
    let mut out =
        bytes[..bytes.len() - entries.iter().map(|(_, e)| e.len() + 4).sum::<usize>()].to_vec();
    for (offset, entry) in &entries {
        let corrupt = |problem: String| ImageError::Corrupt {
            file: path.clone(),
            offset: *offset as u64,
            problem,
        };
        let new = fix_entry(entry).map_err(corrupt)?;
        if new.is_some() {
            fixed += 1;
        }
        let new = new.as_deref().unwrap_or(entry);
        out.extend_from_slice(&(new.len() as u32).to_le_bytes());
        out.extend_from_slice(new);
    }
    if fixed > 0 {
        // Written beside and renamed: a crash leaves the old image or the new one.
        let tmp = dir.join("files.img.pclive-tmp");
        fs::write(&tmp, &out).map_err(|source| ImageError::Io {
            file: tmp.clone(),
            source,
        })?;
        fs::rename(&tmp, &path).map_err(|source| ImageError::Io {
            file: path.clone(),
            source,
        })?;
    }
    Ok(fixed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::encode_entries;

    fn tfd(vsec: u64, vnsec: u64, isec: u64, insec: u64) -> TimerfdEntry {
        TimerfdEntry {
            id: 7,
            flags: 0x80000,
            fown: FownEntry {
                uid: 0,
                euid: 0,
                signum: 0,
                pid_type: 0,
                pid: 0,
            },
            clockid: 1,
            ticks: 3,
            settime_flags: 0,
            vsec,
            vnsec,
            isec,
            insec,
        }
    }

    /// A file_entry as CRIU writes it: type, id, then the member, plus a field pclive does not
    /// know (which must survive).
    fn file_entry(t: &TimerfdEntry) -> Vec<u8> {
        let mut out = Vec::new();
        encode_key(1, WireType::Varint, &mut out);
        encode_varint(8, &mut out);
        encode_key(2, WireType::Varint, &mut out);
        encode_varint(7, &mut out);
        encode_key(FILE_ENTRY_TFD, WireType::LengthDelimited, &mut out);
        encode_varint(t.encoded_len() as u64, &mut out);
        t.encode(&mut out).unwrap();
        encode_key(99, WireType::LengthDelimited, &mut out);
        encode_varint(3, &mut out);
        out.extend_from_slice(b"xyz");
        out
    }

    #[derive(Clone, PartialEq, Message)]
    struct Raw {
        #[prost(bytes = "vec", tag = "1")]
        bytes: Vec<u8>,
    }

    fn image(entries: &[Vec<u8>]) -> Vec<u8> {
        let mut out = encode_entries::<Raw>(Header::Common(FILES_MAGIC), &[]);
        for e in entries {
            out.extend_from_slice(&(e.len() as u32).to_le_bytes());
            out.extend_from_slice(e);
        }
        out
    }

    #[test]
    fn an_overdue_periodic_timerfd_expires_at_once_and_keeps_its_interval() {
        let dir = tempfile::tempdir().unwrap();
        let overdue = tfd(0, 0, 0, 10_000_000);
        let armed = tfd(0, 5_000, 0, 10_000_000);
        let one_shot_spent = tfd(0, 0, 0, 0);
        let entries = vec![
            file_entry(&overdue),
            file_entry(&armed),
            file_entry(&one_shot_spent),
        ];
        fs::write(dir.path().join("files.img"), image(&entries)).unwrap();
        assert_eq!(fix_overdue_timerfds(dir.path()).unwrap(), 1);
        let bytes = fs::read(dir.path().join("files.img")).unwrap();
        let after = split_entries(Path::new("f"), &bytes, Header::Common(FILES_MAGIC)).unwrap();
        assert_eq!(after.len(), 3);
        let mut expected = overdue.clone();
        expected.vnsec = 1;
        assert_eq!(after[0].1, file_entry(&expected).as_slice());
        // Armed timers and spent one-shot timers are left as they are, byte for byte.
        assert_eq!(after[1].1, entries[1].as_slice());
        assert_eq!(after[2].1, entries[2].as_slice());
        // Nothing left to fix: the image is not rewritten.
        assert_eq!(fix_overdue_timerfds(dir.path()).unwrap(), 0);
    }

    #[test]
    fn corrupt_entries_are_refused_with_their_offset() {
        let dir = tempfile::tempdir().unwrap();
        let mut entry = file_entry(&tfd(0, 0, 0, 1));
        entry.truncate(entry.len() - 10);
        fs::write(dir.path().join("files.img"), image(&[entry])).unwrap();
        let err = fix_overdue_timerfds(dir.path()).unwrap_err().to_string();
        assert!(err.contains("files.img at offset 12"), "{err}");
        assert!(fix_overdue_timerfds(&dir.path().join("none")).unwrap() == 0);
    }
}
