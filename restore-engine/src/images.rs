//! CRIU image files: framing (magics, length-prefixed protobuf entries), the messages pclive
//! needs (inventory, pstree, mm/VMAs, pagemap), pagemap → pages-file offsets, and flattening of a
//! `parent` chain into one self-contained image directory.
//!
//! Formats as CRIU 4.2 writes them (criu/include/magic.h, criu/image.c, criu/protobuf.c,
//! images/*.proto). Magics and lengths are in host byte order; pclive supports little-endian
//! hosts (x86_64, arm64), where that is little-endian.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use prost::Message;

use crate::page;

pub const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
pub const INVENTORY_MAGIC: u32 = 0x5831_3116;
pub const PSTREE_MAGIC: u32 = 0x5027_3030;
pub const PAGEMAP_MAGIC: u32 = 0x5608_4025;
pub const MM_MAGIC: u32 = 0x5749_2820;
pub const CORE_MAGIC: u32 = 0x5505_3847;

/// Pagemap entry flags (criu/include/pagemap.h).
pub const PE_PARENT: u32 = 1 << 0;
pub const PE_LAZY: u32 = 1 << 1;
pub const PE_PRESENT: u32 = 1 << 2;

/// VMA status bits (criu/include/image.h).
pub const VMA_AREA_REGULAR: u32 = 1 << 0;
pub const VMA_AREA_VSYSCALL: u32 = 1 << 2;
pub const VMA_AREA_VDSO: u32 = 1 << 3;
pub const VMA_ANON_PRIVATE: u32 = 1 << 9;
pub const VMA_AREA_VVAR: u32 = 1 << 12;
pub const VMA_AREA_GUARD: u32 = 1 << 16;

const MAP_PRIVATE: u32 = 0x02;
const MAP_ANONYMOUS: u32 = 0x20;
const MAP_LOCKED: u32 = 0x2000;
const MAP_HUGETLB: u32 = 0x40000;

/// The largest entry we accept: CRIU's largest messages (mm with thousands of VMAs) stay far
/// below this; a bigger length is corruption, not data.
const MAX_ENTRY: u32 = 64 << 20;

/// Errors reading or writing images. Each names the file and, for decoding, the byte offset.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{file}: {source}")]
    Io {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{file} at offset {offset}: {problem}")]
    Corrupt {
        file: PathBuf,
        offset: u64,
        problem: String,
    },
}

impl ImageError {
    fn corrupt(file: &Path, offset: usize, problem: impl Into<String>) -> Self {
        ImageError::Corrupt {
            file: file.to_owned(),
            offset: offset as u64,
            problem: problem.into(),
        }
    }
}

fn io_err(file: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        file: file.to_owned(),
        source,
    }
}

// ---- messages (images/*.proto, proto2) ----

#[derive(Clone, PartialEq, Message)]
pub struct TaskKobjIdsEntry {
    #[prost(uint32, required, tag = "1")]
    pub vm_id: u32,
    #[prost(uint32, required, tag = "2")]
    pub files_id: u32,
    #[prost(uint32, required, tag = "3")]
    pub fs_id: u32,
    #[prost(uint32, required, tag = "4")]
    pub sighand_id: u32,
    #[prost(uint32, optional, tag = "5")]
    pub pid_ns_id: Option<u32>,
    #[prost(uint32, optional, tag = "6")]
    pub net_ns_id: Option<u32>,
    #[prost(uint32, optional, tag = "7")]
    pub ipc_ns_id: Option<u32>,
    #[prost(uint32, optional, tag = "8")]
    pub uts_ns_id: Option<u32>,
    #[prost(uint32, optional, tag = "9")]
    pub mnt_ns_id: Option<u32>,
    #[prost(uint32, optional, tag = "10")]
    pub user_ns_id: Option<u32>,
    #[prost(uint32, optional, tag = "11")]
    pub cgroup_ns_id: Option<u32>,
    #[prost(uint32, optional, tag = "12")]
    pub time_ns_id: Option<u32>,
}

#[derive(Clone, PartialEq, Message)]
pub struct PluginsEntry {
    #[prost(string, repeated, tag = "12")]
    pub plugins: Vec<String>,
}

#[derive(Clone, PartialEq, Message)]
pub struct InventoryEntry {
    #[prost(uint32, required, tag = "1")]
    pub img_version: u32,
    #[prost(bool, optional, tag = "2")]
    pub fdinfo_per_id: Option<bool>,
    #[prost(message, optional, tag = "3")]
    pub root_ids: Option<TaskKobjIdsEntry>,
    #[prost(bool, optional, tag = "4")]
    pub ns_per_id: Option<bool>,
    #[prost(uint32, optional, tag = "5")]
    pub root_cg_set: Option<u32>,
    #[prost(uint32, optional, tag = "6")]
    pub lsmtype: Option<u32>,
    #[prost(uint64, optional, tag = "8")]
    pub dump_uptime: Option<u64>,
    #[prost(uint32, optional, tag = "9")]
    pub pre_dump_mode: Option<u32>,
    #[prost(bool, optional, tag = "10")]
    pub tcp_close: Option<bool>,
    #[prost(uint32, optional, tag = "11")]
    pub network_lock_method: Option<u32>,
    #[prost(message, optional, tag = "12")]
    pub plugins_entry: Option<PluginsEntry>,
    #[prost(string, optional, tag = "13")]
    pub dump_criu_run_id: Option<String>,
    #[prost(bool, optional, tag = "14")]
    pub allow_uprobes: Option<bool>,
}

#[derive(Clone, PartialEq, Message)]
pub struct PstreeEntry {
    #[prost(uint32, required, tag = "1")]
    pub pid: u32,
    #[prost(uint32, required, tag = "2")]
    pub ppid: u32,
    #[prost(uint32, required, tag = "3")]
    pub pgid: u32,
    #[prost(uint32, required, tag = "4")]
    pub sid: u32,
    #[prost(uint32, repeated, packed = "false", tag = "5")]
    pub threads: Vec<u32>,
}

#[derive(Clone, PartialEq, Message)]
pub struct VmaEntry {
    #[prost(uint64, required, tag = "1")]
    pub start: u64,
    #[prost(uint64, required, tag = "2")]
    pub end: u64,
    #[prost(uint64, required, tag = "3")]
    pub pgoff: u64,
    #[prost(uint64, required, tag = "4")]
    pub shmid: u64,
    #[prost(uint32, required, tag = "5")]
    pub prot: u32,
    #[prost(uint32, required, tag = "6")]
    pub flags: u32,
    #[prost(uint32, required, tag = "7")]
    pub status: u32,
    #[prost(sint64, required, tag = "8")]
    pub fd: i64,
    #[prost(uint64, optional, tag = "9")]
    pub madv: Option<u64>,
    #[prost(uint32, optional, tag = "10")]
    pub fdflags: Option<u32>,
}

impl VmaEntry {
    /// CRIU's `vma_entry_can_be_lazy`: private anonymous, not locked, not hugetlb, not
    /// vdso/vvar/vsyscall.
    pub fn can_be_lazy(&self) -> bool {
        self.flags & MAP_ANONYMOUS != 0
            && self.flags & MAP_PRIVATE != 0
            && self.flags & MAP_LOCKED == 0
            && self.flags & MAP_HUGETLB == 0
            && self.status & (VMA_AREA_VDSO | VMA_AREA_VVAR | VMA_AREA_VSYSCALL) == 0
    }
}

#[derive(Clone, PartialEq, Message)]
pub struct AioRingEntry {
    #[prost(uint64, required, tag = "1")]
    pub id: u64,
    #[prost(uint32, required, tag = "2")]
    pub nr_req: u32,
    #[prost(uint32, required, tag = "3")]
    pub ring_len: u32,
}

#[derive(Clone, PartialEq, Message)]
pub struct MmEntry {
    #[prost(uint64, required, tag = "1")]
    pub mm_start_code: u64,
    #[prost(uint64, required, tag = "2")]
    pub mm_end_code: u64,
    #[prost(uint64, required, tag = "3")]
    pub mm_start_data: u64,
    #[prost(uint64, required, tag = "4")]
    pub mm_end_data: u64,
    #[prost(uint64, required, tag = "5")]
    pub mm_start_stack: u64,
    #[prost(uint64, required, tag = "6")]
    pub mm_start_brk: u64,
    #[prost(uint64, required, tag = "7")]
    pub mm_brk: u64,
    #[prost(uint64, required, tag = "8")]
    pub mm_arg_start: u64,
    #[prost(uint64, required, tag = "9")]
    pub mm_arg_end: u64,
    #[prost(uint64, required, tag = "10")]
    pub mm_env_start: u64,
    #[prost(uint64, required, tag = "11")]
    pub mm_env_end: u64,
    #[prost(uint32, required, tag = "12")]
    pub exe_file_id: u32,
    #[prost(uint64, repeated, packed = "false", tag = "13")]
    pub mm_saved_auxv: Vec<u64>,
    #[prost(message, repeated, tag = "14")]
    pub vmas: Vec<VmaEntry>,
    #[prost(int32, optional, tag = "15")]
    pub dumpable: Option<i32>,
    #[prost(message, repeated, tag = "16")]
    pub aios: Vec<AioRingEntry>,
    #[prost(bool, optional, tag = "17")]
    pub thp_disabled: Option<bool>,
}

#[derive(Clone, PartialEq, Message)]
pub struct PagemapHead {
    #[prost(uint32, required, tag = "1")]
    pub pages_id: u32,
}

#[derive(Clone, PartialEq, Message)]
pub struct PagemapEntry {
    #[prost(uint64, required, tag = "1")]
    pub vaddr: u64,
    #[prost(uint32, required, tag = "2")]
    pub compat_nr_pages: u32,
    #[prost(bool, optional, tag = "3")]
    pub in_parent: Option<bool>,
    #[prost(uint32, optional, tag = "4")]
    pub flags: Option<u32>,
    #[prost(uint64, optional, tag = "5")]
    pub nr_pages: Option<u64>,
}

// ---- framing ----

/// The magics at the start of an image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// `inventory.img`: its magic alone.
    Inventory,
    /// Every other protobuf image: IMG_COMMON_MAGIC then the image's own magic.
    Common(u32),
}

impl Header {
    fn bytes(self) -> Vec<u8> {
        match self {
            Header::Inventory => INVENTORY_MAGIC.to_le_bytes().to_vec(),
            Header::Common(magic) => [IMG_COMMON_MAGIC.to_le_bytes(), magic.to_le_bytes()].concat(),
        }
    }
}

fn u32_at(bytes: &[u8], offset: usize) -> Option<u32> {
    bytes
        .get(offset..offset + 4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
}

/// Splits an image's bytes into its raw entries, checking the header. `file` names the image in
/// errors.
pub fn split_entries<'a>(
    file: &Path,
    bytes: &'a [u8],
    header: Header,
) -> Result<Vec<(usize, &'a [u8])>, ImageError> {
    let expected = header.bytes();
    if bytes.len() < expected.len() {
        return Err(ImageError::corrupt(
            file,
            0,
            format!(
                "truncated header: {} bytes, a {:?} image starts with {} bytes of magic",
                bytes.len(),
                header,
                expected.len()
            ),
        ));
    }
    if bytes[..expected.len()] != expected[..] {
        let found: Vec<String> = bytes[..expected.len()]
            .chunks(4)
            .map(|c| {
                format!(
                    "{:#010x}",
                    u32::from_le_bytes(c.try_into().expect("4 bytes"))
                )
            })
            .collect();
        return Err(ImageError::corrupt(
            file,
            0,
            format!(
                "wrong magic {} (expected {:?}): not this kind of CRIU image, or a big-endian one",
                found.join(" "),
                header
            ),
        ));
    }
    let mut offset = expected.len();
    let mut entries = Vec::new();
    while offset < bytes.len() {
        let Some(len) = u32_at(bytes, offset) else {
            return Err(ImageError::corrupt(
                file,
                offset,
                format!(
                    "truncated entry length ({} of 4 bytes)",
                    bytes.len() - offset
                ),
            ));
        };
        if len > MAX_ENTRY {
            return Err(ImageError::corrupt(
                file,
                offset,
                format!("entry length {len} exceeds the {MAX_ENTRY}-byte limit"),
            ));
        }
        let start = offset + 4;
        let end = start + len as usize;
        if end > bytes.len() {
            return Err(ImageError::corrupt(
                file,
                offset,
                format!(
                    "truncated entry: {len} bytes announced, {} left",
                    bytes.len() - start
                ),
            ));
        }
        entries.push((start, &bytes[start..end]));
        offset = end;
    }
    Ok(entries)
}

/// Decodes every entry of an image as `M`.
pub fn decode_entries<M: Message + Default>(
    file: &Path,
    bytes: &[u8],
    header: Header,
) -> Result<Vec<M>, ImageError> {
    split_entries(file, bytes, header)?
        .into_iter()
        .map(|(offset, raw)| {
            M::decode(raw).map_err(|e| {
                ImageError::corrupt(file, offset, format!("undecodable protobuf entry: {e}"))
            })
        })
        .collect()
}

/// Encodes entries with their header.
pub fn encode_entries<M: Message>(header: Header, entries: &[M]) -> Vec<u8> {
    let mut out = header.bytes();
    for entry in entries {
        let len = entry.encoded_len() as u32;
        out.extend_from_slice(&len.to_le_bytes());
        entry
            .encode(&mut out)
            .expect("a Vec grows to fit any message");
    }
    out
}

fn read_file(path: &Path) -> Result<Vec<u8>, ImageError> {
    fs::read(path).map_err(io_err(path))
}

/// Reads all entries of one image file.
pub fn read_image<M: Message + Default>(path: &Path, header: Header) -> Result<Vec<M>, ImageError> {
    decode_entries(path, &read_file(path)?, header)
}

/// Reads the one entry an image holds.
pub fn read_single<M: Message + Default>(path: &Path, header: Header) -> Result<M, ImageError> {
    let mut entries = read_image::<M>(path, header)?;
    match entries.len() {
        1 => Ok(entries.remove(0)),
        n => Err(ImageError::corrupt(
            path,
            0,
            format!("expected exactly one entry, found {n}"),
        )),
    }
}

// ---- pagemaps ----

/// A pagemap entry with CRIU's compatibility rules applied (`init_compat_pagemap_entry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRange {
    pub vaddr: u64,
    pub nr_pages: u64,
    pub flags: u32,
    /// Offset of this range's data in `pages-<pages_id>.img` (meaningful with PE_PRESENT).
    pub file_offset: u64,
}

impl PageRange {
    pub fn end(&self) -> u64 {
        self.vaddr + self.nr_pages * page::SIZE_U64
    }
    pub fn is(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }
}

/// A task's pagemap: which pages exist and where their data is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pagemap {
    pub pages_id: u32,
    pub ranges: Vec<PageRange>,
}

impl Pagemap {
    /// Decodes `pagemap-N.img` bytes and computes each range's offset in the pages file.
    pub fn decode(file: &Path, bytes: &[u8]) -> Result<Self, ImageError> {
        let raw = split_entries(file, bytes, Header::Common(PAGEMAP_MAGIC))?;
        let Some(((head_offset, head_raw), rest)) = raw.split_first() else {
            return Err(ImageError::corrupt(file, 8, "no pagemap head entry"));
        };
        let head = PagemapHead::decode(*head_raw).map_err(|e| {
            ImageError::corrupt(file, *head_offset, format!("undecodable pagemap head: {e}"))
        })?;
        let mut offset_in_pages = 0u64;
        let mut previous_end = 0u64;
        let mut ranges = Vec::with_capacity(rest.len());
        for (offset, raw) in rest {
            let e = PagemapEntry::decode(*raw).map_err(|err| {
                ImageError::corrupt(file, *offset, format!("undecodable pagemap entry: {err}"))
            })?;
            let flags = if e.in_parent == Some(true) {
                e.flags.unwrap_or(0) | PE_PARENT
            } else {
                e.flags.unwrap_or(PE_PRESENT)
            };
            let nr_pages = e.nr_pages.unwrap_or(e.compat_nr_pages as u64);
            if !page::is_aligned(e.vaddr) {
                return Err(ImageError::corrupt(
                    file,
                    *offset,
                    format!("pagemap entry address {:#x} is not page aligned", e.vaddr),
                ));
            }
            let end = nr_pages
                .checked_mul(page::SIZE_U64)
                .and_then(|len| e.vaddr.checked_add(len))
                .ok_or_else(|| {
                    ImageError::corrupt(
                        file,
                        *offset,
                        format!("pagemap entry {:#x}+{nr_pages} pages overflows", e.vaddr),
                    )
                })?;
            if e.vaddr < previous_end {
                return Err(ImageError::corrupt(
                    file,
                    *offset,
                    format!(
                        "pagemap entries out of order or overlapping at {:#x}",
                        e.vaddr
                    ),
                ));
            }
            previous_end = end;
            ranges.push(PageRange {
                vaddr: e.vaddr,
                nr_pages,
                flags,
                file_offset: offset_in_pages,
            });
            if flags & PE_PRESENT != 0 {
                offset_in_pages += nr_pages * page::SIZE_U64;
            }
        }
        Ok(Pagemap {
            pages_id: head.pages_id,
            ranges,
        })
    }

    /// Encodes as CRIU 4.2 writes it (flags and nr_pages always present, compat_nr_pages 0).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = encode_entries(
            Header::Common(PAGEMAP_MAGIC),
            &[PagemapHead {
                pages_id: self.pages_id,
            }],
        );
        for r in &self.ranges {
            let entry = PagemapEntry {
                vaddr: r.vaddr,
                compat_nr_pages: 0,
                in_parent: None,
                flags: Some(r.flags),
                nr_pages: Some(r.nr_pages),
            };
            out.extend_from_slice(&(entry.encoded_len() as u32).to_le_bytes());
            entry.encode(&mut out).expect("Vec grows");
        }
        out
    }

    /// Bytes of page data the pages file must hold.
    pub fn present_bytes(&self) -> u64 {
        self.ranges
            .iter()
            .filter(|r| r.is(PE_PRESENT))
            .map(|r| r.nr_pages * page::SIZE_U64)
            .sum()
    }
}

/// Reads `pagemap-<pid>.img` of an image directory.
pub fn read_pagemap(dir: &Path, pid: u32) -> Result<Pagemap, ImageError> {
    let path = dir.join(format!("pagemap-{pid}.img"));
    let bytes = read_file(&path)?;
    Pagemap::decode(&path, &bytes)
}

/// The tasks of an image set (`pstree.img`).
pub fn read_pstree(dir: &Path) -> Result<Vec<PstreeEntry>, ImageError> {
    read_image(&dir.join("pstree.img"), Header::Common(PSTREE_MAGIC))
}

/// A task's memory layout (`mm-<pid>.img`).
pub fn read_mm(dir: &Path, pid: u32) -> Result<MmEntry, ImageError> {
    read_single(&dir.join(format!("mm-{pid}.img")), Header::Common(MM_MAGIC))
}

pub fn read_inventory(dir: &Path) -> Result<InventoryEntry, ImageError> {
    read_single(&dir.join("inventory.img"), Header::Inventory)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PS: u64 = page::SIZE_U64;

    fn sample_pagemap() -> Pagemap {
        Pagemap {
            pages_id: 1,
            ranges: vec![
                PageRange {
                    vaddr: 0x10000,
                    nr_pages: 2,
                    flags: PE_PRESENT,
                    file_offset: 0,
                },
                PageRange {
                    vaddr: 0x20000,
                    nr_pages: 3,
                    flags: PE_PRESENT | PE_LAZY,
                    file_offset: 2 * PS,
                },
                PageRange {
                    vaddr: 0x30000,
                    nr_pages: 1,
                    flags: PE_LAZY,
                    file_offset: 5 * PS,
                },
                PageRange {
                    vaddr: 0x40000,
                    nr_pages: 4,
                    flags: PE_PRESENT,
                    file_offset: 5 * PS,
                },
            ],
        }
    }

    #[test]
    fn pagemap_round_trips_and_offsets_skip_absent_ranges() {
        let map = sample_pagemap();
        let bytes = map.encode();
        // common magic, pagemap magic, then the head {pages_id = 1}: length 2, 08 01.
        assert_eq!(
            &bytes[..12],
            &[0x19, 0x43, 0x56, 0x54, 0x25, 0x40, 0x08, 0x56, 2, 0, 0, 0]
        );
        assert_eq!(&bytes[12..14], &[0x08, 0x01]);
        let decoded = Pagemap::decode(Path::new("pagemap-1.img"), &bytes).unwrap();
        assert_eq!(decoded, map);
        assert_eq!(decoded.present_bytes(), 9 * PS);
    }

    #[test]
    fn compat_entries_are_normalised() {
        let mut bytes = encode_entries(
            Header::Common(PAGEMAP_MAGIC),
            &[PagemapHead { pages_id: 3 }],
        );
        for entry in [
            PagemapEntry {
                vaddr: 0x1000,
                compat_nr_pages: 2,
                in_parent: None,
                flags: None,
                nr_pages: None,
            },
            PagemapEntry {
                vaddr: 0x8000,
                compat_nr_pages: 1,
                in_parent: Some(true),
                flags: None,
                nr_pages: None,
            },
        ] {
            bytes.extend_from_slice(&(entry.encoded_len() as u32).to_le_bytes());
            entry.encode(&mut bytes).unwrap();
        }
        let map = Pagemap::decode(Path::new("p"), &bytes).unwrap();
        assert_eq!(map.ranges[0].flags, PE_PRESENT);
        assert_eq!(map.ranges[0].nr_pages, 2);
        assert_eq!(map.ranges[1].flags, PE_PARENT);
    }

    #[test]
    fn errors_name_the_file_and_offset() {
        let bytes = sample_pagemap().encode();
        let truncated = &bytes[..bytes.len() - 3];
        let err = Pagemap::decode(Path::new("/img/pagemap-7.img"), truncated).unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("/img/pagemap-7.img at offset "), "{text}");
        assert!(text.contains("truncated entry"), "{text}");

        let err = split_entries(Path::new("mm-1.img"), &bytes, Header::Common(MM_MAGIC))
            .unwrap_err()
            .to_string();
        assert!(err.contains("wrong magic"), "{err}");
        let err = split_entries(Path::new("x"), &[1, 2], Header::Inventory)
            .unwrap_err()
            .to_string();
        assert!(err.contains("truncated header"), "{err}");
    }

    #[test]
    fn overlapping_or_unaligned_entries_are_refused() {
        let mut map = sample_pagemap();
        map.ranges[1].vaddr = 0x10000;
        let err = Pagemap::decode(Path::new("p"), &map.encode()).unwrap_err();
        assert!(err.to_string().contains("overlapping"), "{err}");
        let mut map = sample_pagemap();
        map.ranges[0].vaddr = 0x10010;
        let err = Pagemap::decode(Path::new("p"), &map.encode()).unwrap_err();
        assert!(err.to_string().contains("not page aligned"), "{err}");
    }

    #[test]
    fn lazy_eligibility_follows_criu() {
        let mut vma = VmaEntry {
            start: 0,
            end: 4096,
            pgoff: 0,
            shmid: 0,
            prot: 3,
            flags: MAP_PRIVATE | MAP_ANONYMOUS,
            status: VMA_AREA_REGULAR | VMA_ANON_PRIVATE,
            fd: -1,
            madv: None,
            fdflags: None,
        };
        assert!(vma.can_be_lazy());
        vma.status |= VMA_AREA_VDSO;
        assert!(!vma.can_be_lazy());
        vma.status = VMA_AREA_REGULAR;
        vma.flags |= MAP_LOCKED;
        assert!(!vma.can_be_lazy());
        vma.flags = 0x01; // MAP_SHARED file mapping
        assert!(!vma.can_be_lazy());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Arbitrary bytes never panic any decoder.
        #[test]
        fn decoders_never_panic_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let path = Path::new("fuzz.img");
            let _ = Pagemap::decode(path, &bytes);
            let _ = decode_entries::<MmEntry>(path, &bytes, Header::Common(MM_MAGIC));
            let _ = decode_entries::<PstreeEntry>(path, &bytes, Header::Common(PSTREE_MAGIC));
            let _ = decode_entries::<InventoryEntry>(path, &bytes, Header::Inventory);
        }

        /// A valid image with bytes flipped or cut is decoded or refused, never a panic.
        #[test]
        fn decoders_never_panic_on_mutated_images(
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
            cut in any::<usize>(),
        ) {
            let mut bytes = sample_pagemap().encode();
            for (at, value) in flips {
                let len = bytes.len();
                bytes[at % len] ^= value;
            }
            let keep = cut % (bytes.len() + 1);
            let _ = Pagemap::decode(Path::new("fuzz.img"), &bytes[..keep]);
        }
    }
}
