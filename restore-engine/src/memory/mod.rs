//! Reading a running task's memory for pre-copy: which mappings CRIU will restore lazily, which
//! of their pages are present, their contents (process_vm_readv in large batches), and dirty
//! trackers that say which pages changed since the last round.
//!
//! Trackers, chosen at run time by what the kernel offers:
//! - [`SoftDirtyTracker`] (`soft_dirty.rs`): clear_refs(4) + pagemap bit 55, where the kernel
//!   has soft-dirty.
//! - [`UffdWpTracker`] (`uffd_wp/`): userfaultfd write-protect in asynchronous mode and
//!   PAGEMAP_SCAN (Linux 6.7+): O(written pages) per round, no freeze.
//! - [`HashTracker`] (`hash.rs`): reads every present page each round and compares an XXH3
//!   hash per page. Works on every kernel and architecture; costs a read of resident memory per
//!   round.

mod hash;
mod soft_dirty;
#[cfg(test)]
mod tests;
mod uffd_wp;

use std::fs;
use std::io;
use std::os::unix::fs::FileExt;

pub use hash::HashTracker;
pub use soft_dirty::{soft_dirty_supported, ProcKernel, SoftDirtyKernel, SoftDirtyTracker};
pub use uffd_wp::{pagemap_scan_available, uffd_wp_support, UffdWpTracker};

use crate::page;

/// Bytes per process_vm_readv batch: large enough to amortise the syscall, small enough to keep
/// the buffer in cache.
pub(super) const READ_BATCH: usize = 4 << 20;

const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
pub(super) const PM_SOFT_DIRTY: u64 = 1 << 55;
/// A guard region marker (MADV_GUARD_INSTALL, used by glibc ≥ 2.41 for thread stack guards):
/// reported with the swap bit set, but there is no page to read.
const PM_GUARD_REGION: u64 = 1 << 58;

/// Whether a pagemap entry is a page with content (in RAM or swapped out).
pub(super) fn has_page(entry: u64) -> bool {
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
    #[error(
        "the write-protect tracker (uffd-wp) cannot run here: {0}; use --tracker content-hash"
    )]
    NoUffdWp(String),
    #[error("freezing the container for a moment (to read its soft-dirty marks) failed: {0}")]
    Quiesce(String),
    /// The consumer of a round's pages gave up (it keeps its own error).
    #[error("the round was stopped by its consumer")]
    Stopped,
}

impl TrackError {
    /// The task exited (its /proc entry or its address space is gone). A task that is exiting
    /// or exec'ing keeps its /proc entry, but reads of its old address space return nothing
    /// (end of file): short-lived processes do this all the time, and a running round skips
    /// them (the frozen round reads every task strictly).
    pub fn task_vanished(&self) -> bool {
        match self {
            TrackError::Proc { source, .. } | TrackError::Read { source, .. } => {
                source.kind() == io::ErrorKind::NotFound
                    || source.kind() == io::ErrorKind::UnexpectedEof
                    || source.raw_os_error() == Some(libc::ESRCH)
            }
            TrackError::NoSoftDirty
            | TrackError::NoUffdWp(_)
            | TrackError::Stopped
            | TrackError::Quiesce(_) => false,
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
    parse_lazy_vmas_flagged(smaps)
        .into_iter()
        .map(|(vma, _)| vma)
        .collect()
}

/// [`parse_lazy_vmas`], each mapping with whether it is registered for userfaultfd
/// write-protect (VmFlags `uw`).
pub(super) fn parse_lazy_vmas_flagged(smaps: &str) -> Vec<(LazyVma, bool)> {
    let mut out = Vec::new();
    // The mapping being parsed: whether CRIU restores it lazily, whether it carries `uw`.
    let mut current: Option<(LazyVma, bool, bool)> = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some((start, end)) = parse_range(first) {
            if let Some((vma, true, wp)) = current.take() {
                out.push((vma, wp));
            }
            let perms = fields.next().unwrap_or("");
            let _offset = fields.next();
            let _dev = fields.next();
            let inode = fields.next().unwrap_or("0");
            let path = fields.next().unwrap_or("");
            let private = perms.as_bytes().get(3) == Some(&b'p');
            let anonymous =
                inode == "0" && (path.is_empty() || path == "[heap]" || path.starts_with("[stack"));
            current = Some((LazyVma { start, end }, private && anonymous, false));
        } else if first == "VmFlags:" {
            if let Some((_, eligible, wp)) = current.as_mut() {
                for flag in fields {
                    match flag {
                        // lo: locked, ht: hugetlb (CRIU dumps those eagerly). MADV_DONTDUMP
                        // (dd) does not stop CRIU from dumping a mapping, so it does not stop
                        // us either.
                        "lo" | "ht" => *eligible = false,
                        "uw" => *wp = true,
                        _ => {}
                    }
                }
            }
        }
    }
    if let Some((vma, true, wp)) = current {
        out.push((vma, wp));
    }
    out
}

/// A mapping's address range as /proc/PID/maps and smaps print it (`start-end`, hexadecimal).
pub(super) fn parse_range(field: &str) -> Option<(u64, u64)> {
    let (s, e) = field.split_once('-')?;
    Some((
        u64::from_str_radix(s, 16).ok()?,
        u64::from_str_radix(e, 16).ok()?,
    ))
}

pub(super) fn read_smaps(pid: u32) -> Result<String, TrackError> {
    fs::read_to_string(format!("/proc/{pid}/smaps")).map_err(|source| TrackError::Proc {
        pid,
        what: "smaps",
        source,
    })
}

/// /proc/PID/maps: the mappings without smaps' counters, whose computation walks every page
/// table entry (24 ms for a 1.4 GiB heap here, against 0.2 ms for maps).
pub(super) fn read_maps(pid: u32) -> Result<String, TrackError> {
    fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|source| TrackError::Proc {
        pid,
        what: "maps",
        source,
    })
}

/// Whether task `pid` has locked memory (/proc/PID/status `VmLck`): which mappings are locked
/// (CRIU dumps them eagerly) only smaps says.
pub(super) fn has_locked_memory(pid: u32) -> Result<bool, TrackError> {
    let status =
        fs::read_to_string(format!("/proc/{pid}/status")).map_err(|source| TrackError::Proc {
            pid,
            what: "status",
            source,
        })?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.split_whitespace().next())
        .is_none_or(|kb| kb != "0"))
}

pub fn lazy_vmas(pid: u32) -> Result<Vec<LazyVma>, TrackError> {
    Ok(parse_lazy_vmas(&read_smaps(pid)?))
}

/// The previous round's per-page values for `vma` (hashes, marks), by address, from whatever
/// mappings covered it then (mappings merge, split, grow and move between rounds);
/// `T::default()` where none did. `previous` is in address order.
pub(super) fn carry_over<T: Copy + Default>(
    previous: &[(LazyVma, Vec<T>)],
    vma: LazyVma,
) -> Vec<T> {
    let mut out = vec![T::default(); ((vma.end - vma.start) / page::SIZE_U64) as usize];
    let first = previous.partition_point(|(v, _)| v.end <= vma.start);
    for (v, values) in &previous[first..] {
        if v.start >= vma.end {
            break;
        }
        let from = v.start.max(vma.start);
        let to = v.end.min(vma.end);
        let src = ((from - v.start) / page::SIZE_U64) as usize;
        let dst = ((from - vma.start) / page::SIZE_U64) as usize;
        let n = ((to - from) / page::SIZE_U64) as usize;
        out[dst..dst + n].copy_from_slice(&values[src..src + n]);
    }
    out
}

pub(super) fn open_pagemap(pid: u32) -> Result<fs::File, TrackError> {
    fs::File::open(format!("/proc/{pid}/pagemap")).map_err(|source| TrackError::Proc {
        pid,
        what: "pagemap",
        source,
    })
}

/// Pagemap entries of `[start, end)`.
pub(super) fn pagemap_entries(
    pid: u32,
    file: &fs::File,
    start: u64,
    end: u64,
) -> Result<Vec<u64>, TrackError> {
    let pages = ((end - start) / page::SIZE_U64) as usize;
    let mut raw = vec![0u8; pages * 8];
    file.read_exact_at(&mut raw, start / page::SIZE_U64 * 8)
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
pub(super) fn read_remote(pid: u32, addr: u64, buf: &mut [u8]) -> Result<(), TrackError> {
    read_remote_raw(pid, addr, buf.as_mut_ptr(), buf.len())
}

/// [`read_remote`] into `len` bytes at `buf`, which may be uninitialised: the kernel only
/// writes there. `buf` must be valid for `len` bytes of writes.
fn read_remote_raw(pid: u32, addr: u64, buf: *mut u8, len: usize) -> Result<(), TrackError> {
    let mut done = 0usize;
    while done < len {
        let local = libc::iovec {
            // An offset within the caller's buffer.
            iov_base: buf.wrapping_add(done).cast(),
            iov_len: len - done,
        };
        let remote = libc::iovec {
            iov_base: (addr + done as u64) as *mut libc::c_void,
            iov_len: len - done,
        };
        // SAFETY: one local iovec within the caller's buffer (valid for `len` bytes of writes,
        // the function's contract), one remote iovec the kernel checks against the target's
        // address space.
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

/// Reads one page of `pid` at `addr`: process_vm_readv, or, where that is refused (PROT_NONE
/// pages), /proc/PID/mem, which forces access as a debugger does. CRIU dumps such pages (it
/// makes them readable while it dumps), so pre-copy must send them too.
pub(super) fn read_page_forced(pid: u32, addr: u64, page: &mut [u8]) -> Result<(), TrackError> {
    match read_remote(pid, addr, page) {
        Err(TrackError::Read { source, .. }) if source.raw_os_error() == Some(libc::EFAULT) => {
            let mem =
                fs::File::open(format!("/proc/{pid}/mem")).map_err(|source| TrackError::Proc {
                    pid,
                    what: "mem",
                    source,
                })?;
            mem.read_exact_at(page, addr)
                .map_err(|source| TrackError::Read { pid, addr, source })
        }
        other => other,
    }
}

/// Stops the container's writes for a moment (soft-dirty tracking reads and clears its marks
/// inside such a freeze).
pub trait Quiesce {
    fn freeze(&mut self) -> Result<(), TrackError>;
    fn thaw(&mut self) -> Result<(), TrackError>;
}

/// For callers whose tasks cannot write during a round (tests on their own memory).
pub struct NoQuiesce;

impl Quiesce for NoQuiesce {
    fn freeze(&mut self) -> Result<(), TrackError> {
        Ok(())
    }
    fn thaw(&mut self) -> Result<(), TrackError> {
        Ok(())
    }
}

/// Freezes one process with SIGSTOP/SIGCONT (for `pclive dirty-rate` on any process: its
/// parent may notice; a container is frozen through its cgroup instead).
pub struct StopSignal(pub u32);

impl Quiesce for StopSignal {
    fn freeze(&mut self) -> Result<(), TrackError> {
        signal(self.0, libc::SIGSTOP)?;
        // Wait until it is stopped (state T), briefly.
        for _ in 0..200 {
            let stat = fs::read_to_string(format!("/proc/{}/stat", self.0)).unwrap_or_default();
            if matches!(
                crate::procfs::stat_state(&stat),
                Some('T') | Some('t') | None
            ) {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Ok(())
    }
    fn thaw(&mut self) -> Result<(), TrackError> {
        signal(self.0, libc::SIGCONT)
    }
}

fn signal(pid: u32, sig: libc::c_int) -> Result<(), TrackError> {
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid as libc::pid_t, sig) } < 0 {
        return Err(TrackError::Proc {
            pid,
            what: "signal",
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Pages that changed in one round for one task: runs of consecutive changed pages, their
/// contents one after the other in one buffer (reused piece after piece), and pages that are now
/// zero.
///
/// A streamed piece's buffer keeps [`PIECE_FRONT_ROOM`] bytes free in front of its pages: the
/// sender writes a frame header there, appends the frame's descriptor after the pages, and
/// seals and sends the piece where the tracker put it ([`Delta::buffer_mut`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Delta {
    /// Start address and length in bytes of each run; the runs' bytes follow one another in
    /// `data`, from `front` on.
    runs: Vec<(u64, usize)>,
    data: Vec<u8>,
    front: usize,
    /// Pages that are now zero (written with zeroes, or discarded).
    pub zero: Vec<u64>,
}

/// Bytes a streamed piece leaves free in front of its pages (a frame header's).
pub const PIECE_FRONT_ROOM: usize = 20;

impl Delta {
    /// A delta for streamed pieces: room in front for a frame header, and for a piece's worth
    /// of pages and a frame's descriptor and tag after them (no reallocation while it fills).
    pub fn for_pieces() -> Self {
        let mut data = Vec::with_capacity(PIECE_FRONT_ROOM + DELTA_PIECE_BYTES + (1 << 20));
        data.resize(PIECE_FRONT_ROOM, 0);
        Delta {
            data,
            front: PIECE_FRONT_ROOM,
            ..Default::default()
        }
    }
    /// Bytes of page data it holds.
    pub fn held_bytes(&self) -> usize {
        self.data.len() - self.front
    }

    /// A copy that owns its pages, for a sender that keeps them a while (a tracker reuses its
    /// buffer piece after piece), with room after them for a frame's descriptor and tag, as a
    /// streamed piece has.
    pub fn to_held(&self) -> Delta {
        let room = 256 + 32 * (self.runs.len() + self.zero.len());
        let mut data = Vec::with_capacity(self.data.len() + room);
        data.extend_from_slice(&self.data);
        Delta {
            runs: self.runs.clone(),
            data,
            front: self.front,
            zero: self.zero.clone(),
        }
    }

    /// Each run of consecutive changed pages: its address and contents.
    pub fn runs(&self) -> impl Iterator<Item = (u64, &[u8])> + '_ {
        let mut at = self.front;
        self.runs.iter().map(move |&(addr, len)| {
            let bytes = &self.data[at..at + len];
            at += len;
            (addr, bytes)
        })
    }
    pub fn data_pages(&self) -> u64 {
        ((self.data.len() - self.front) / page::SIZE) as u64
    }
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty() && self.zero.is_empty()
    }
    /// Bytes free in front of the pages ([`PIECE_FRONT_ROOM`] for a streamed piece, else 0).
    pub fn front(&self) -> usize {
        self.front
    }
    /// The buffer: the front room, then the pages. Whoever borrows it may append to it and
    /// overwrite it (a sender seals a frame in it), or swap in another buffer with the same
    /// front room; the delta must be cleared before it is filled again.
    pub fn buffer_mut(&mut self) -> &mut Vec<u8> {
        &mut self.data
    }
    /// The buffer ([`Self::buffer_mut`]) with, beside it, each run's address and length in
    /// bytes and the zero pages.
    pub fn parts_mut(&mut self) -> (&mut Vec<u8>, &[(u64, usize)], &[u64]) {
        (&mut self.data, &self.runs, &self.zero)
    }
    /// Empties the delta, keeping its buffers.
    pub fn clear(&mut self) {
        self.runs.clear();
        self.data.truncate(self.front);
        self.data.resize(self.front, 0);
        self.zero.clear();
    }
    /// Appends `other`'s runs and zero pages (which come later in address order).
    pub fn extend_from(&mut self, other: &Delta) {
        for (addr, bytes) in other.runs() {
            self.push_run(addr, bytes);
        }
        self.zero.extend_from_slice(&other.zero);
    }
    fn push_run(&mut self, addr: u64, data: &[u8]) {
        self.note_run(addr, data.len());
        self.data.extend_from_slice(data);
    }
    /// Records `len` bytes at `addr` whose contents are already at the end of the buffer.
    fn note_run(&mut self, addr: u64, len: usize) {
        match self.runs.last_mut() {
            Some((start, run)) if *start + *run as u64 == addr => *run += len,
            _ => self.runs.push((addr, len)),
        }
    }
    /// Appends the `len` bytes of task `pid` at `addr`, read straight into the buffer (no copy
    /// through another one); pages that read as zero become zero markers, and the pages after
    /// them move down. On error nothing is appended.
    pub(super) fn read_run(&mut self, pid: u32, addr: u64, len: usize) -> Result<(), TrackError> {
        let start = self.data.len();
        self.data.reserve(len);
        read_remote_raw(
            pid,
            addr,
            self.data.spare_capacity_mut()[..len].as_mut_ptr().cast(),
            len,
        )?;
        // SAFETY: read_remote_raw wrote all `len` bytes after the vector's end (within the
        // capacity reserved above), or returned an error.
        unsafe { self.data.set_len(start + len) };
        let mut kept = start;
        for k in 0..len / page::SIZE {
            let at = start + k * page::SIZE;
            let page_addr = addr + (k * page::SIZE) as u64;
            if self.data[at..at + page::SIZE].iter().all(|&b| b == 0) {
                self.zero.push(page_addr);
                continue;
            }
            if kept != at {
                self.data.copy_within(at..at + page::SIZE, kept);
            }
            self.note_run(page_addr, page::SIZE);
            kept += page::SIZE;
        }
        self.data.truncate(kept);
        Ok(())
    }
    pub(super) fn push_page(&mut self, addr: u64, data: &[u8]) {
        if data.iter().all(|&b| b == 0) {
            self.zero.push(addr);
            return;
        }
        self.push_run(addr, data);
    }
}

/// Changed pages are handed on in pieces of about this much data, so a round never holds more
/// than a piece of a large task's memory (the first round is all of it).
pub const DELTA_PIECE_BYTES: usize = 8 << 20;

/// Takes a round's changed pages piece by piece; an error stops the round
/// ([`TrackError::Stopped`]).
/// The sink may use the piece's buffer ([`Delta::buffer_mut`]); the tracker clears it after.
pub type DeltaSink<'a> = dyn FnMut(&mut Delta) -> Result<(), ()> + 'a;

/// Finds pages that changed since the previous round.
pub trait DirtyTracker {
    fn name(&self) -> &'static str;
    /// Starts a round over the container's tasks `pids`: a tracker that must look at every task
    /// at once (soft-dirty) does it here, inside `quiesce`'s freeze. `frozen`: the tasks are
    /// frozen for the last round (no freeze needed, and every page must be read).
    fn begin_round(
        &mut self,
        _pids: &[u32],
        _quiesce: &mut dyn Quiesce,
        _frozen: bool,
    ) -> Result<(), TrackError> {
        Ok(())
    }
    /// One round over the task `pid`: every page that changed since the last round (all present
    /// pages in the first round), handed to `sink` in pieces of about [`DELTA_PIECE_BYTES`]
    /// in address order.
    fn round_into(&mut self, pid: u32, sink: &mut DeltaSink) -> Result<(), TrackError>;
    /// [`Self::round_into`], collected into one delta.
    fn round(&mut self, pid: u32) -> Result<Delta, TrackError> {
        self.begin_round(&[pid], &mut NoQuiesce, false)?;
        let mut all = Delta::default();
        self.round_into(pid, &mut |piece: &mut Delta| {
            all.extend_from(piece);
            Ok(())
        })?;
        all.zero.sort_unstable();
        Ok(all)
    }
    /// How many threads a round may use (a hint; trackers that cannot use more ignore it).
    fn set_threads(&mut self, _threads: usize) {}
    /// The last round is done and CRIU dumps the tasks next: undo whatever in the tasks CRIU
    /// would misread. This is in the pause; what can wait is left to [`Self::release`].
    fn prepare_dump(&mut self) {
        self.release()
    }
    /// Undo whatever the tracker changed in the tasks. Dropping the tracker does too.
    fn release(&mut self) {}
}

/// Pages `from..to` of mapping number `vma` (indices into the mapping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Slice {
    vma: usize,
    from: usize,
    to: usize,
}

/// Cuts the pages of `vmas` into `parts` runs of consecutive slices with about as many pages
/// each (a large mapping is split), in address order.
pub(super) fn partition(vmas: &[LazyVma], parts: usize) -> Vec<Vec<Slice>> {
    let total: usize = vmas
        .iter()
        .map(|v| ((v.end - v.start) / page::SIZE_U64) as usize)
        .sum();
    let share = total.div_ceil(parts.max(1)).max(1);
    let mut groups = vec![Vec::new()];
    let mut room = share;
    for (vma, v) in vmas.iter().enumerate() {
        let pages = ((v.end - v.start) / page::SIZE_U64) as usize;
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
/// Reads the present pages of `slices` of `pid`'s lazy mappings in large batches and calls
/// `visit` with each page's slice number, index in its mapping, and content. A page that cannot
/// be read is an error when `strict` (the frozen round); otherwise `visit` gets `None` for it
/// (the mapping changed under the reader: the next round looks again).
pub(super) fn for_each_present_page(
    pid: u32,
    vmas: &[LazyVma],
    slices: &[Slice],
    strict: bool,
    mut visit: impl FnMut(usize, usize, Option<&[u8]>),
) -> Result<(), TrackError> {
    let pagemap = open_pagemap(pid)?;
    let mut buf = vec![0u8; READ_BATCH];
    for (slice_index, slice) in slices.iter().enumerate() {
        let vma = vmas[slice.vma];
        let base = vma.start + slice.from as u64 * page::SIZE_U64;
        let entries = pagemap_entries(
            pid,
            &pagemap,
            base,
            vma.start + slice.to as u64 * page::SIZE_U64,
        )?;
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
                && (j - i + 1) * page::SIZE <= READ_BATCH
            {
                j += 1;
            }
            let addr = base + i as u64 * page::SIZE_U64;
            let len = (j - i) * page::SIZE;
            match read_remote(pid, addr, &mut buf[..len]) {
                Ok(()) => {
                    for (k, page) in buf[..len].chunks_exact(page::SIZE).enumerate() {
                        visit(slice_index, slice.from + i + k, Some(page));
                    }
                }
                // Part of the run cannot be read this way: PROT_NONE pages (which CRIU dumps,
                // and which process_vm_readv refuses), or the mapping changed under us. Page by
                // page, forcing access as a debugger does (/proc/PID/mem).
                Err(TrackError::Read { source, .. })
                    if source.raw_os_error() == Some(libc::EFAULT) =>
                {
                    for k in 0..j - i {
                        let page = &mut buf[..page::SIZE];
                        let at = addr + k as u64 * page::SIZE_U64;
                        match read_page_forced(pid, at, page) {
                            Ok(()) => visit(slice_index, slice.from + i + k, Some(page)),
                            Err(e) if strict => return Err(e),
                            Err(_) => visit(slice_index, slice.from + i + k, None),
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

/// The trackers, by the name `--tracker` takes.
pub const TRACKERS: [&str; 3] = ["uffd-wp", "soft-dirty", "content-hash"];

/// The best tracker this kernel offers by default (uffd-wp, then soft-dirty, then
/// content-hash), or the one asked for.
pub fn tracker(preference: Option<&str>) -> Result<Box<dyn DirtyTracker + Send>, TrackError> {
    match preference {
        Some("content-hash") => Ok(Box::new(HashTracker::default())),
        Some("soft-dirty") => Ok(Box::new(SoftDirtyTracker::new()?)),
        Some("uffd-wp") => Ok(Box::new(UffdWpTracker::new()?)),
        _ => {
            if let Ok(t) = UffdWpTracker::new() {
                return Ok(Box::new(t));
            }
            match SoftDirtyTracker::new() {
                Ok(t) => Ok(Box::new(t)),
                Err(_) => Ok(Box::new(HashTracker::default())),
            }
        }
    }
}

/// Which tracker [`tracker`] picks on this host by default, and why.
pub fn default_tracker() -> (&'static str, String) {
    let uffd_wp = uffd_wp_support();
    match (&uffd_wp, soft_dirty_supported()) {
        (Ok(()), _) => (
            "uffd-wp",
            "userfaultfd write-protect (async) and PAGEMAP_SCAN: rounds cost O(pages written)"
                .to_string(),
        ),
        (Err(why), true) => (
            "soft-dirty",
            format!("no uffd-wp ({why}); the kernel has soft-dirty"),
        ),
        (Err(why), false) => (
            "content-hash",
            format!(
                "no uffd-wp ({why}) and no soft-dirty: rounds read all resident memory; \
                 upgrade to Linux 6.7+ on x86-64 for O(pages written) rounds"
            ),
        ),
    }
}
