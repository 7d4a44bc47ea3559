//! Reading a running task's memory for pre-copy: which mappings CRIU will restore lazily, which
//! of their pages are present, their contents (process_vm_readv in large batches), and dirty
//! trackers that say which pages changed since the last round.
//!
//! Trackers, chosen at run time by what the kernel offers:
//! - [`SoftDirtyTracker`]: clear_refs(4) + pagemap bit 55, where the kernel has soft-dirty.
//! - [`HashTracker`]: reads every present page each round and compares an XXH3 hash per page.
//!   Works on every kernel and architecture; costs a read of resident memory per round.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;

use xxhash_rust::xxh3::xxh3_64;

pub const PAGE: u64 = 4096;
/// Bytes per process_vm_readv batch: large enough to amortise the syscall, small enough to keep
/// the buffer in cache.
const READ_BATCH: usize = 4 << 20;

const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_SOFT_DIRTY: u64 = 1 << 55;
/// A guard region marker (MADV_GUARD_INSTALL, used by glibc ≥ 2.41 for thread stack guards):
/// reported with the swap bit set, but there is no page to read.
const PM_GUARD_REGION: u64 = 1 << 58;

/// Whether a pagemap entry is a page with content (in RAM or swapped out).
fn has_page(entry: u64) -> bool {
    entry & (PM_PRESENT | PM_SWAPPED) != 0 && entry & PM_GUARD_REGION == 0
}

#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    #[error("task {pid}: cannot read {what}: {source}. Has it exited, or is pclive not root?")]
    Proc {
        pid: u32,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("task {pid}: reading memory at {addr:#x}: {source}")]
    Read {
        pid: u32,
        addr: u64,
        #[source]
        source: io::Error,
    },
    #[error("this kernel has no soft-dirty tracking (CONFIG_MEM_SOFT_DIRTY); use the content-hash tracker")]
    NoSoftDirty,
    /// The consumer of a round's pages gave up (it keeps its own error).
    #[error("the round was stopped by its consumer")]
    Stopped,
}

impl TrackError {
    /// The task exited (its /proc entry or its address space is gone).
    pub fn task_vanished(&self) -> bool {
        match self {
            TrackError::Proc { source, .. } | TrackError::Read { source, .. } => {
                source.kind() == io::ErrorKind::NotFound
                    || source.raw_os_error() == Some(libc::ESRCH)
            }
            TrackError::NoSoftDirty | TrackError::Stopped => false,
        }
    }
}

/// A mapping CRIU restores lazily: private, anonymous, not locked, not hugetlb, not
/// vdso/vvar/vsyscall (CRIU's `vma_entry_can_be_lazy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LazyVma {
    pub start: u64,
    pub end: u64,
}

/// Parses /proc/PID/smaps (mappings plus VmFlags) into the lazy-eligible mappings.
pub fn parse_lazy_vmas(smaps: &str) -> Vec<LazyVma> {
    let mut out = Vec::new();
    let mut current: Option<(LazyVma, bool)> = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some((start, end)) = first.split_once('-').and_then(|(s, e)| {
            Some((
                u64::from_str_radix(s, 16).ok()?,
                u64::from_str_radix(e, 16).ok()?,
            ))
        }) {
            if let Some((vma, true)) = current.take() {
                out.push(vma);
            }
            let perms = fields.next().unwrap_or("");
            let _offset = fields.next();
            let _dev = fields.next();
            let inode = fields.next().unwrap_or("0");
            let path = fields.next().unwrap_or("");
            let private = perms.as_bytes().get(3) == Some(&b'p');
            let anonymous =
                inode == "0" && (path.is_empty() || path == "[heap]" || path.starts_with("[stack"));
            current = Some((LazyVma { start, end }, private && anonymous));
        } else if first == "VmFlags:" {
            let flags: Vec<&str> = fields.collect();
            // lo: locked, ht: hugetlb (CRIU dumps those eagerly). MADV_DONTDUMP (dd) does
            // not stop CRIU from dumping a mapping, so it does not stop us either.
            if flags.iter().any(|f| matches!(*f, "lo" | "ht")) {
                if let Some((_, eligible)) = current.as_mut() {
                    *eligible = false;
                }
            }
        }
    }
    if let Some((vma, true)) = current {
        out.push(vma);
    }
    out
}

pub fn lazy_vmas(pid: u32) -> Result<Vec<LazyVma>, TrackError> {
    let smaps =
        fs::read_to_string(format!("/proc/{pid}/smaps")).map_err(|source| TrackError::Proc {
            pid,
            what: "smaps",
            source,
        })?;
    Ok(parse_lazy_vmas(&smaps))
}

fn open_pagemap(pid: u32) -> Result<fs::File, TrackError> {
    fs::File::open(format!("/proc/{pid}/pagemap")).map_err(|source| TrackError::Proc {
        pid,
        what: "pagemap",
        source,
    })
}

/// Pagemap entries of `[start, end)`.
fn pagemap_entries(
    pid: u32,
    file: &fs::File,
    start: u64,
    end: u64,
) -> Result<Vec<u64>, TrackError> {
    let pages = ((end - start) / PAGE) as usize;
    let mut raw = vec![0u8; pages * 8];
    file.read_exact_at(&mut raw, start / PAGE * 8)
        .map_err(|source| TrackError::Proc {
            pid,
            what: "pagemap",
            source,
        })?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

/// Reads `len` bytes at `addr` of another process (or this one) into `buf`.
fn read_remote(pid: u32, addr: u64, buf: &mut [u8]) -> Result<(), TrackError> {
    let mut done = 0usize;
    while done < buf.len() {
        let local = libc::iovec {
            iov_base: buf[done..].as_mut_ptr().cast(),
            iov_len: buf.len() - done,
        };
        let remote = libc::iovec {
            iov_base: (addr + done as u64) as *mut libc::c_void,
            iov_len: buf.len() - done,
        };
        // SAFETY: one local iovec pointing into `buf` (valid for iov_len bytes), one remote
        // iovec the kernel checks against the target's address space.
        let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
        if n <= 0 {
            return Err(TrackError::Read {
                pid,
                addr: addr + done as u64,
                source: if n == 0 {
                    io::Error::new(io::ErrorKind::UnexpectedEof, "read nothing")
                } else {
                    io::Error::last_os_error()
                },
            });
        }
        done += n as usize;
    }
    Ok(())
}

/// Pages that changed in one round for one task.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Delta {
    /// Runs of consecutive changed pages with their contents.
    pub runs: Vec<(u64, Vec<u8>)>,
    /// Pages that are now zero (written with zeroes, or discarded).
    pub zero: Vec<u64>,
}

impl Delta {
    pub fn data_pages(&self) -> u64 {
        self.runs.iter().map(|(_, d)| d.len() as u64 / PAGE).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty() && self.zero.is_empty()
    }
    fn push_page(&mut self, addr: u64, data: &[u8]) {
        if data.iter().all(|&b| b == 0) {
            self.zero.push(addr);
            return;
        }
        match self.runs.last_mut() {
            Some((start, bytes)) if *start + bytes.len() as u64 == addr => {
                bytes.extend_from_slice(data)
            }
            _ => self.runs.push((addr, data.to_vec())),
        }
    }
}

/// Changed pages are handed on in pieces of about this much data, so a round never holds more
/// than a piece of a large task's memory (the first round is all of it).
pub const DELTA_PIECE_BYTES: usize = 16 << 20;

/// Takes a round's changed pages piece by piece; an error stops the round
/// ([`TrackError::Stopped`]).
pub type DeltaSink<'a> = dyn FnMut(Delta) -> Result<(), ()> + 'a;

/// Finds pages that changed since the previous round.
pub trait DirtyTracker {
    fn name(&self) -> &'static str;
    /// One round over the task `pid`: every page that changed since the last round (all present
    /// pages in the first round), handed to `sink` in pieces of about [`DELTA_PIECE_BYTES`]
    /// in address order.
    fn round_into(&mut self, pid: u32, sink: &mut DeltaSink) -> Result<(), TrackError>;
    /// [`Self::round_into`], collected into one delta.
    fn round(&mut self, pid: u32) -> Result<Delta, TrackError> {
        let mut all = Delta::default();
        self.round_into(pid, &mut |piece: Delta| {
            all.runs.extend(piece.runs);
            all.zero.extend(piece.zero);
            Ok(())
        })?;
        all.zero.sort_unstable();
        Ok(all)
    }
    /// How many threads a round may use (a hint; trackers that cannot use more ignore it).
    fn set_threads(&mut self, _threads: usize) {}
}

/// Pages `from..to` of mapping number `vma` (indices into the mapping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slice {
    vma: usize,
    from: usize,
    to: usize,
}

/// Cuts the pages of `vmas` into `parts` runs of consecutive slices with about as many pages
/// each (a large mapping is split), in address order.
fn partition(vmas: &[LazyVma], parts: usize) -> Vec<Vec<Slice>> {
    let total: usize = vmas
        .iter()
        .map(|v| ((v.end - v.start) / PAGE) as usize)
        .sum();
    let share = total.div_ceil(parts.max(1)).max(1);
    let mut groups = vec![Vec::new()];
    let mut room = share;
    for (vma, v) in vmas.iter().enumerate() {
        let pages = ((v.end - v.start) / PAGE) as usize;
        let mut from = 0;
        while from < pages {
            if room == 0 {
                groups.push(Vec::new());
                room = share;
            }
            let to = pages.min(from + room);
            groups
                .last_mut()
                .expect("never empty")
                .push(Slice { vma, from, to });
            room -= to - from;
            from = to;
        }
    }
    groups
}

/// Reads the present pages of `slices` of `pid`'s lazy mappings in large batches and calls
/// `visit` with each page's slice number, index in its mapping, and content.
fn for_each_present_page(
    pid: u32,
    vmas: &[LazyVma],
    slices: &[Slice],
    mut visit: impl FnMut(usize, usize, &[u8]),
) -> Result<(), TrackError> {
    let pagemap = open_pagemap(pid)?;
    let mut buf = vec![0u8; READ_BATCH];
    for (slice_index, slice) in slices.iter().enumerate() {
        let vma = vmas[slice.vma];
        let base = vma.start + slice.from as u64 * PAGE;
        let entries = pagemap_entries(pid, &pagemap, base, vma.start + slice.to as u64 * PAGE)?;
        let mut i = 0usize;
        while i < entries.len() {
            if !has_page(entries[i]) {
                i += 1;
                continue;
            }
            // A run of pages, at most one batch long.
            let mut j = i;
            while j < entries.len()
                && has_page(entries[j])
                && (j - i + 1) * PAGE as usize <= READ_BATCH
            {
                j += 1;
            }
            let addr = base + i as u64 * PAGE;
            let len = (j - i) * PAGE as usize;
            match read_remote(pid, addr, &mut buf[..len]) {
                Ok(()) => {
                    for (k, page) in buf[..len].chunks_exact(PAGE as usize).enumerate() {
                        visit(slice_index, slice.from + i + k, page);
                    }
                }
                // Part of the run is unreadable (the mapping changed under us): read page by
                // page and keep every page that can be read; a page missed here is caught by
                // the next round, and the frozen round cannot race.
                Err(TrackError::Read { source, .. })
                    if source.raw_os_error() == Some(libc::EFAULT) =>
                {
                    for k in 0..j - i {
                        let page = &mut buf[..PAGE as usize];
                        if read_remote(pid, addr + k as u64 * PAGE, page).is_ok() {
                            visit(slice_index, slice.from + i + k, page);
                        }
                    }
                }
                Err(e) => return Err(e),
            }
            i = j;
        }
    }
    Ok(())
}

/// Content-hash dirty tracking: works everywhere, costs a read of resident memory per round.
///
/// Hashes live in one vector per mapping (indexed by page), so a round costs an array access
/// per page, not a hash-map operation. Mappings may merge, split, grow or move between rounds:
/// each round carries the previous hashes over by address. A hash is stored with its low bit
/// set; 0 means "not present".
#[derive(Default)]
pub struct HashTracker {
    tasks: HashMap<u32, Vec<(LazyVma, Vec<u64>)>>,
    /// Threads that read and hash (0 or 1: the calling thread alone).
    threads: usize,
}

/// One thread's share of a round: new hashes of its slices (one vector per slice), and what
/// changed there.
type Share = (Vec<Vec<u64>>, Delta);

/// With a `sink`, the delta is handed on whenever it holds a piece's worth; without one it is
/// returned whole (threads that share a round return theirs).
fn hash_slices(
    pid: u32,
    vmas: &[LazyVma],
    old: &[Vec<u64>],
    slices: &[Slice],
    mut sink: Option<&mut DeltaSink>,
) -> Result<Share, TrackError> {
    let mut new: Vec<Vec<u64>> = slices.iter().map(|s| vec![0u64; s.to - s.from]).collect();
    let mut delta = Delta::default();
    let mut held = 0usize;
    let mut stopped = false;
    for_each_present_page(pid, vmas, slices, |slice, index, page| {
        if stopped {
            return;
        }
        let hash = xxh3_64(page) | 1;
        let s = slices[slice];
        new[slice][index - s.from] = hash;
        if old[s.vma][index] != hash {
            delta.push_page(vmas[s.vma].start + index as u64 * PAGE, page);
            held += PAGE as usize;
            if held >= DELTA_PIECE_BYTES {
                if let Some(sink) = sink.as_mut() {
                    stopped = sink(std::mem::take(&mut delta)).is_err();
                    held = 0;
                }
            }
        }
    })?;
    if stopped {
        return Err(TrackError::Stopped);
    }
    Ok((new, delta))
}

impl HashTracker {
    /// Reads and hashes with this many threads (while the tasks are frozen their cores are
    /// free; while they run, one thread keeps pre-copy from taking more than a core from them).
    pub fn with_threads(threads: usize) -> Self {
        HashTracker {
            threads,
            ..Default::default()
        }
    }
}

/// The previous round's hashes for `vma`, by address, from whatever mappings covered it then.
fn carry_over(previous: &[(LazyVma, Vec<u64>)], vma: LazyVma) -> Vec<u64> {
    let mut old = vec![0u64; ((vma.end - vma.start) / PAGE) as usize];
    let first = previous.partition_point(|(v, _)| v.end <= vma.start);
    for (v, hashes) in &previous[first..] {
        if v.start >= vma.end {
            break;
        }
        let from = v.start.max(vma.start);
        let to = v.end.min(vma.end);
        let src = ((from - v.start) / PAGE) as usize;
        let dst = ((from - vma.start) / PAGE) as usize;
        let n = ((to - from) / PAGE) as usize;
        old[dst..dst + n].copy_from_slice(&hashes[src..src + n]);
    }
    old
}

impl DirtyTracker for HashTracker {
    fn name(&self) -> &'static str {
        "content-hash"
    }

    fn set_threads(&mut self, threads: usize) {
        self.threads = threads;
    }

    fn round_into(&mut self, pid: u32, sink: &mut DeltaSink) -> Result<(), TrackError> {
        let previous = self.tasks.remove(&pid).unwrap_or_default();
        let vmas = lazy_vmas(pid)?;
        let old: Vec<Vec<u64>> = vmas.iter().map(|v| carry_over(&previous, *v)).collect();
        drop(previous);
        let groups = partition(&vmas, self.threads.max(1));
        // One thread streams its pieces as it goes. Several threads (the frozen round: only the
        // pages dirtied since the last round) each read a consecutive share and return what
        // changed; shares are in address order, so their deltas follow one another.
        let shares: Vec<Result<Share, TrackError>> = if groups.len() == 1 {
            vec![hash_slices(pid, &vmas, &old, &groups[0], Some(&mut *sink))]
        } else {
            std::thread::scope(|scope| {
                let workers: Vec<_> = groups
                    .iter()
                    .map(|slices| scope.spawn(|| hash_slices(pid, &vmas, &old, slices, None)))
                    .collect();
                workers
                    .into_iter()
                    .map(|w| w.join().expect("a hashing thread panicked"))
                    .collect()
            })
        };
        let mut new: Vec<Vec<u64>> = old.iter().map(|o| vec![0u64; o.len()]).collect();
        for (slices, share) in groups.iter().zip(shares) {
            let (hashes, part) = share?;
            for (slice, hashes) in slices.iter().zip(hashes) {
                new[slice.vma][slice.from..slice.to].copy_from_slice(&hashes);
            }
            if !part.is_empty() {
                sink(part).map_err(|()| TrackError::Stopped)?;
            }
        }
        // Present before, absent now (discarded with MADV_DONTNEED): zero on the destination.
        let mut gone = Delta::default();
        for (v, (o, n)) in vmas.iter().zip(old.iter().zip(&new)) {
            for (index, (before, now)) in o.iter().zip(n).enumerate() {
                if *before != 0 && *now == 0 {
                    gone.zero.push(v.start + index as u64 * PAGE);
                }
            }
        }
        self.tasks.insert(pid, vmas.into_iter().zip(new).collect());
        if !gone.is_empty() {
            sink(gone).map_err(|()| TrackError::Stopped)?;
        }
        Ok(())
    }
}

/// Soft-dirty tracking: the kernel marks written pages; O(mapped pages) per round to read the
/// bits, O(dirty) to read data.
pub struct SoftDirtyTracker {
    first_round_done: HashMap<u32, ()>,
}

impl SoftDirtyTracker {
    pub fn new() -> Result<Self, TrackError> {
        if !soft_dirty_supported() {
            return Err(TrackError::NoSoftDirty);
        }
        Ok(SoftDirtyTracker {
            first_round_done: HashMap::new(),
        })
    }
}

impl DirtyTracker for SoftDirtyTracker {
    fn name(&self) -> &'static str {
        "soft-dirty"
    }

    fn round_into(&mut self, pid: u32, sink: &mut DeltaSink) -> Result<(), TrackError> {
        let first = self.first_round_done.insert(pid, ()).is_none();
        let pagemap = open_pagemap(pid)?;
        let mut delta = Delta::default();
        let mut held = 0usize;
        let mut page = vec![0u8; PAGE as usize];
        for vma in lazy_vmas(pid)? {
            let entries = pagemap_entries(pid, &pagemap, vma.start, vma.end)?;
            for (i, entry) in entries.iter().enumerate() {
                let present = has_page(*entry);
                if present && (first || entry & PM_SOFT_DIRTY != 0) {
                    let addr = vma.start + i as u64 * PAGE;
                    if read_remote(pid, addr, &mut page).is_ok() {
                        delta.push_page(addr, &page);
                        held += PAGE as usize;
                        if held >= DELTA_PIECE_BYTES {
                            sink(std::mem::take(&mut delta)).map_err(|()| TrackError::Stopped)?;
                            held = 0;
                        }
                    }
                }
            }
        }
        fs::write(format!("/proc/{pid}/clear_refs"), "4").map_err(|source| TrackError::Proc {
            pid,
            what: "clear_refs",
            source,
        })?;
        if !delta.is_empty() {
            sink(delta).map_err(|()| TrackError::Stopped)?;
        }
        Ok(())
    }
}

/// Whether this kernel tracks soft-dirty bits: clear them, write a page, look at bit 55.
pub fn soft_dirty_supported() -> bool {
    let probe = vec![1u8; 2 * PAGE as usize];
    let addr = (probe.as_ptr() as u64).div_ceil(PAGE) * PAGE;
    if fs::write("/proc/self/clear_refs", "4").is_err() {
        return false;
    }
    // SAFETY: addr is inside `probe` (page-aligned within its 2 pages); a volatile write keeps
    // the compiler from eliding the touch.
    unsafe { std::ptr::write_volatile(addr as *mut u8, 2) };
    let Ok(mut pagemap) = fs::File::open("/proc/self/pagemap") else {
        return false;
    };
    let mut entry = [0u8; 8];
    let ok = pagemap.seek(SeekFrom::Start(addr / PAGE * 8)).is_ok()
        && pagemap.read_exact(&mut entry).is_ok();
    drop(probe);
    ok && u64::from_le_bytes(entry) & PM_SOFT_DIRTY != 0
}

/// The best tracker this kernel offers, or the one asked for.
pub fn tracker(preference: Option<&str>) -> Result<Box<dyn DirtyTracker + Send>, TrackError> {
    match preference {
        Some("content-hash") => Ok(Box::new(HashTracker::default())),
        Some("soft-dirty") => Ok(Box::new(SoftDirtyTracker::new()?)),
        _ => match SoftDirtyTracker::new() {
            Ok(t) => Ok(Box::new(t)),
            Err(_) => Ok(Box::new(HashTracker::default())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_parsing_keeps_private_anonymous_unlocked_mappings() {
        let smaps = "\
55d0c0000000-55d0c0021000 rw-p 00000000 00:00 0                          [heap]
VmFlags: rd wr mr mw me ac
7f0000000000-7f0000100000 rw-p 00000000 00:00 0 
VmFlags: rd wr mr mw me ac
7f0000100000-7f0000200000 rw-p 00000000 00:00 0 
VmFlags: rd wr mr mw me lo ac
7f0000200000-7f0000300000 rw-s 00000000 00:01 1234                       /dev/zero (deleted)
VmFlags: rd wr sh mr mw me ms
7f0000300000-7f0000301000 r--p 00000000 08:01 99                         /usr/lib/libc.so.6
VmFlags: rd mr mw me
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]
VmFlags: rd wr mr mw me gd ac
7ffc00100000-7ffc00102000 r-xp 00000000 00:00 0                          [vdso]
VmFlags: rd ex mr mw me de
";
        let vmas = parse_lazy_vmas(smaps);
        assert_eq!(
            vmas.iter().map(|v| v.start).collect::<Vec<_>>(),
            vec![0x55d0c0000000, 0x7f0000000000, 0x7ffc00000000]
        );
    }

    #[test]
    fn hashes_carry_over_when_mappings_merge_split_or_grow() {
        let vma = |start: u64, pages: u64| LazyVma {
            start,
            end: start + pages * PAGE,
        };
        let previous = vec![
            (vma(0x10000, 2), vec![11, 12]),
            (vma(0x12000, 2), vec![21, 22]),
            (vma(0x20000, 1), vec![31]),
        ];
        // Merged into one mapping that also grew by a page.
        assert_eq!(
            carry_over(&previous, vma(0x10000, 5)),
            vec![11, 12, 21, 22, 0]
        );
        // Split: the second half of the first mapping alone.
        assert_eq!(carry_over(&previous, vma(0x11000, 1)), vec![12]);
        // A new mapping elsewhere starts empty.
        assert_eq!(carry_over(&previous, vma(0x40000, 2)), vec![0, 0]);
    }

    /// A page-aligned anonymous mapping of our own, as a tracked task's memory.
    struct Region {
        ptr: *mut u8,
        len: usize,
    }

    impl Region {
        fn new(pages: usize) -> Self {
            let len = pages * PAGE as usize;
            // SAFETY: a fresh private anonymous mapping.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(ptr, libc::MAP_FAILED);
            Region {
                ptr: ptr.cast(),
                len,
            }
        }
        fn addr(&self, page: usize) -> u64 {
            self.ptr as u64 + page as u64 * PAGE
        }
        fn write(&self, page: usize, value: u8) {
            // SAFETY: within our mapping.
            unsafe {
                std::ptr::write_bytes(self.ptr.add(page * PAGE as usize), value, PAGE as usize)
            };
        }
        fn in_region(&self, addr: u64) -> bool {
            addr >= self.ptr as u64 && addr < self.ptr as u64 + self.len as u64
        }
    }

    impl Drop for Region {
        fn drop(&mut self) {
            // SAFETY: unmaps our own mapping.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }

    fn ours(delta: &Delta, region: &Region) -> (Vec<u64>, Vec<u64>) {
        let mut data = Vec::new();
        for (start, bytes) in &delta.runs {
            for k in 0..bytes.len() as u64 / PAGE {
                let addr = start + k * PAGE;
                if region.in_region(addr) {
                    data.push(addr);
                }
            }
        }
        let zero = delta
            .zero
            .iter()
            .copied()
            .filter(|a| region.in_region(*a))
            .collect();
        (data, zero)
    }

    fn exercise(tracker: &mut dyn DirtyTracker) {
        let region = Region::new(64);
        for page in 0..64 {
            region.write(page, page as u8 + 1);
        }
        let me = std::process::id();
        let (first, _) = ours(&tracker.round(me).unwrap(), &region);
        assert_eq!(first.len(), 64, "the first round sends every present page");

        region.write(3, 0xaa);
        region.write(10, 0xbb);
        region.write(20, 0);
        // SAFETY: discards one page of our own mapping.
        unsafe {
            libc::madvise(
                region.ptr.add(30 * PAGE as usize).cast(),
                PAGE as usize,
                libc::MADV_DONTNEED,
            )
        };
        let delta = tracker.round(me).unwrap();
        let (data, zero) = ours(&delta, &region);
        assert_eq!(
            data,
            vec![region.addr(3), region.addr(10)],
            "{}",
            tracker.name()
        );
        assert!(
            zero.contains(&region.addr(20)),
            "a zeroed page is a zero marker"
        );
        assert!(
            zero.contains(&region.addr(30)),
            "a discarded page is a zero marker"
        );
        let content = delta
            .runs
            .iter()
            .find(|(start, _)| *start == region.addr(3))
            .map(|(_, bytes)| bytes[0]);
        assert_eq!(content, Some(0xaa));

        let (quiet, _) = ours(&tracker.round(me).unwrap(), &region);
        assert!(quiet.is_empty(), "nothing changed: {quiet:x?}");
    }

    #[test]
    fn hash_tracker_reports_exactly_the_changed_pages_of_our_own_process() {
        exercise(&mut HashTracker::default());
    }

    #[test]
    fn a_round_streams_in_bounded_pieces_and_its_consumer_can_stop_it() {
        // 40 MiB of our own memory, every page present and non-zero.
        let region = std::hint::black_box(vec![0x5au8; 40 << 20]);
        let me = std::process::id();
        let mut tracker = HashTracker::default();
        let mut pieces = Vec::new();
        tracker
            .round_into(me, &mut |piece: Delta| {
                pieces.push(piece.data_pages() * PAGE);
                Ok(())
            })
            .unwrap();
        assert!(pieces.len() >= 3, "{pieces:?}");
        assert!(
            pieces.iter().all(|&b| b as usize <= DELTA_PIECE_BYTES),
            "no piece holds more than DELTA_PIECE_BYTES: {pieces:?}"
        );
        assert!(pieces.iter().sum::<u64>() >= region.len() as u64);
        let mut calls = 0;
        let stopped = HashTracker::default().round_into(me, &mut |_| {
            calls += 1;
            Err(())
        });
        assert!(matches!(stopped, Err(TrackError::Stopped)), "{stopped:?}");
        assert_eq!(calls, 1, "nothing is read after the consumer gave up");
        drop(region);
    }

    #[test]
    fn hash_tracker_with_threads_reports_the_same() {
        // Shares split mappings in the middle (our heap and the test region included).
        exercise(&mut HashTracker::with_threads(3));
    }

    #[test]
    fn partition_cuts_mappings_into_equal_ordered_shares() {
        let vma = |start: u64, pages: u64| LazyVma {
            start: start * PAGE,
            end: (start + pages) * PAGE,
        };
        let vmas = [vma(0, 10), vma(100, 1), vma(200, 5)];
        let groups = partition(&vmas, 2);
        assert_eq!(
            groups,
            [
                vec![Slice {
                    vma: 0,
                    from: 0,
                    to: 8
                }],
                vec![
                    Slice {
                        vma: 0,
                        from: 8,
                        to: 10
                    },
                    Slice {
                        vma: 1,
                        from: 0,
                        to: 1
                    },
                    Slice {
                        vma: 2,
                        from: 0,
                        to: 5
                    },
                ],
            ]
        );
        // Every page exactly once, whatever the number of parts.
        for parts in 1..20 {
            let groups = partition(&vmas, parts);
            assert!(groups.len() <= parts, "{parts}: {groups:?}");
            let covered: usize = groups.iter().flatten().map(|s| s.to - s.from).sum();
            assert_eq!(covered, 16);
            let flat: Vec<_> = groups.into_iter().flatten().collect();
            for pair in flat.windows(2) {
                let (a, b) = (pair[0], pair[1]);
                assert!(
                    a.vma < b.vma || (a.vma == b.vma && a.to == b.from),
                    "{a:?} {b:?}"
                );
            }
        }
        assert_eq!(partition(&[], 4), [Vec::<Slice>::new()]);
    }

    #[test]
    fn soft_dirty_tracker_reports_exactly_the_changed_pages_where_the_kernel_has_it() {
        match SoftDirtyTracker::new() {
            Ok(mut tracker) => exercise(&mut tracker),
            Err(e) => eprintln!(
                "SKIPPED soft_dirty_tracker test: {e} (this kernel lacks CONFIG_MEM_SOFT_DIRTY)"
            ),
        }
    }
}
