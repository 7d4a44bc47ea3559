//! Soft-dirty tracking, where the kernel has it (CONFIG_MEM_SOFT_DIRTY: most x86-64 distribution
//! kernels; not this project's test machines, nor arm64).
//!
//! The kernel marks a page soft-dirty when it is written; writing 4 to /proc/PID/clear_refs
//! clears every mark. Reading the marks and clearing them are two steps: a write between them
//! would be cleared without having been seen, and never sent again. So a round begins by freezing
//! the container briefly ([`Quiesce`]), reading the marks of every task and clearing them, and
//! thawing it; the contents of the marked pages are read afterwards, while the tasks run (a page
//! written after the clear is marked again and sent again next round). A page that was sent and
//! is now gone (MADV_DONTNEED, unmapped) has no mark: the tracker remembers what it sent and
//! sends such pages as zero. A page that cannot be read is sent next round, never skipped; in
//! the frozen round it is an error.
//!
//! The kernel is reached through [`SoftDirtyKernel`], so that a test can replay its behaviour
//! on a kernel without soft-dirty and interleave writes at every step of a round.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{Read, Seek, SeekFrom};

use super::{
    carry_over, has_page, lazy_vmas, open_pagemap, pagemap_entries, read_page_forced, Delta,
    DeltaSink, DirtyTracker, LazyVma, Quiesce, TrackError, DELTA_PIECE_BYTES, PM_SOFT_DIRTY,
};
use crate::page;

/// What soft-dirty tracking needs from the kernel.
pub trait SoftDirtyKernel: Send {
    /// The task's mappings CRIU restores lazily.
    fn vmas(&mut self, pid: u32) -> Result<Vec<LazyVma>, TrackError>;
    /// Pagemap entries of `[start, end)` (bit 55: soft-dirty).
    fn pagemap(&mut self, pid: u32, start: u64, end: u64) -> Result<Vec<u64>, TrackError>;
    /// Clears every soft-dirty mark of the task (`clear_refs` 4).
    fn clear(&mut self, pid: u32) -> Result<(), TrackError>;
    /// One page's content.
    fn read(&mut self, pid: u32, addr: u64, page: &mut [u8]) -> Result<(), TrackError>;
}

/// The real kernel, through /proc.
pub struct ProcKernel;

impl SoftDirtyKernel for ProcKernel {
    fn vmas(&mut self, pid: u32) -> Result<Vec<LazyVma>, TrackError> {
        lazy_vmas(pid)
    }

    fn pagemap(&mut self, pid: u32, start: u64, end: u64) -> Result<Vec<u64>, TrackError> {
        pagemap_entries(pid, &open_pagemap(pid)?, start, end)
    }

    fn clear(&mut self, pid: u32) -> Result<(), TrackError> {
        fs::write(format!("/proc/{pid}/clear_refs"), "4").map_err(|source| TrackError::Proc {
            pid,
            what: "clear_refs",
            source,
        })
    }

    fn read(&mut self, pid: u32, addr: u64, page: &mut [u8]) -> Result<(), TrackError> {
        read_page_forced(pid, addr, page)
    }
}

/// What a round sends for one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Planned {
    Data(u64),
    Zero(u64),
}

#[derive(Default)]
struct TaskState {
    /// Per mapping, which pages the destination holds (sent as data, not since discarded).
    sent: Vec<(LazyVma, Vec<bool>)>,
    /// Decided at the start of the round (while frozen), sent by `round_into`.
    plan: Vec<Planned>,
    /// Pages whose content could not be read: sent next round whatever their mark says.
    retry: HashSet<u64>,
    seen: bool,
}

/// Soft-dirty tracking: O(mapped pages) per round to read the marks (inside a short freeze),
/// O(dirty) to read data.
pub struct SoftDirtyTracker<K: SoftDirtyKernel = ProcKernel> {
    kernel: K,
    tasks: HashMap<u32, TaskState>,
    frozen: bool,
}

impl SoftDirtyTracker<ProcKernel> {
    pub fn new() -> Result<Self, TrackError> {
        if !soft_dirty_supported() {
            return Err(TrackError::NoSoftDirty);
        }
        Ok(Self::with_kernel(ProcKernel))
    }
}

impl<K: SoftDirtyKernel> SoftDirtyTracker<K> {
    /// A tracker over `kernel` (a replay of the kernel's behaviour, in tests).
    pub fn with_kernel(kernel: K) -> Self {
        SoftDirtyTracker {
            kernel,
            tasks: HashMap::new(),
            frozen: false,
        }
    }

    pub fn kernel_mut(&mut self) -> &mut K {
        &mut self.kernel
    }

    /// Reads task `pid`'s marks, plans what to send, and clears them (the task is frozen).
    fn plan(&mut self, pid: u32) -> Result<(), TrackError> {
        let state = self.tasks.entry(pid).or_default();
        let first = !state.seen;
        state.seen = true;
        let vmas = self.kernel.vmas(pid)?;
        let mut plan = Vec::new();
        let mut sent = Vec::with_capacity(vmas.len());
        for vma in vmas {
            let entries = self.kernel.pagemap(pid, vma.start, vma.end)?;
            let before = carry_over(&state.sent, vma);
            let mut now = vec![false; entries.len()];
            for (i, entry) in entries.iter().enumerate() {
                let addr = vma.start + i as u64 * page::SIZE_U64;
                let present = has_page(*entry);
                let dirty = first || entry & PM_SOFT_DIRTY != 0 || state.retry.contains(&addr);
                if present && dirty {
                    plan.push(Planned::Data(addr));
                } else if !present && before[i] {
                    // Sent once, gone now (discarded or never refaulted): zero there too.
                    plan.push(Planned::Zero(addr));
                }
                now[i] = present;
            }
            sent.push((vma, now));
        }
        self.kernel.clear(pid)?;
        state.retry.clear();
        state.sent = sent;
        state.plan = plan;
        Ok(())
    }
}

impl<K: SoftDirtyKernel> DirtyTracker for SoftDirtyTracker<K> {
    fn name(&self) -> &'static str {
        "soft-dirty"
    }

    fn begin_round(
        &mut self,
        pids: &[u32],
        quiesce: &mut dyn Quiesce,
        frozen: bool,
    ) -> Result<(), TrackError> {
        self.frozen = frozen;
        if !frozen {
            quiesce.freeze()?;
        }
        let mut result = Ok(());
        for &pid in pids {
            match self.plan(pid) {
                Ok(()) => {}
                // It exited since the list was taken: it has nothing to send.
                Err(e) if e.task_vanished() && !frozen => {
                    self.tasks.remove(&pid);
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if !frozen {
            quiesce.thaw()?;
        }
        result
    }

    fn round_into(&mut self, pid: u32, sink: &mut DeltaSink) -> Result<(), TrackError> {
        let Some(state) = self.tasks.get_mut(&pid) else {
            return Ok(());
        };
        let plan = std::mem::take(&mut state.plan);
        let mut delta = Delta::for_pieces();
        let mut held = 0usize;
        let mut page = vec![0u8; page::SIZE];
        for planned in plan {
            match planned {
                Planned::Zero(addr) => delta.zero.push(addr),
                Planned::Data(addr) => match self.kernel.read(pid, addr, &mut page) {
                    Ok(()) => {
                        delta.push_page(addr, &page);
                        held += page::SIZE;
                    }
                    // The frozen round must be complete.
                    Err(e) if self.frozen => return Err(e),
                    // Unmapped since the marks were read, or not readable now: next round
                    // decides (sent again if still there, as zero if gone).
                    Err(_) => {
                        let state = self.tasks.get_mut(&pid).expect("planned above");
                        state.retry.insert(addr);
                    }
                },
            }
            if held >= DELTA_PIECE_BYTES {
                sink(&mut delta).map_err(|()| TrackError::Stopped)?;
                delta.clear();
                held = 0;
            }
        }
        if !delta.is_empty() {
            sink(&mut delta).map_err(|()| TrackError::Stopped)?;
        }
        Ok(())
    }
}

/// Whether this kernel tracks soft-dirty bits: clear them, write a page, look at bit 55.
pub fn soft_dirty_supported() -> bool {
    let probe = vec![1u8; 2 * page::SIZE];
    let addr = (probe.as_ptr() as u64).div_ceil(page::SIZE_U64) * page::SIZE_U64;
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
    let ok = pagemap
        .seek(SeekFrom::Start(addr / page::SIZE_U64 * 8))
        .is_ok()
        && pagemap.read_exact(&mut entry).is_ok();
    drop(probe);
    ok && u64::from_le_bytes(entry) & PM_SOFT_DIRTY != 0
}
