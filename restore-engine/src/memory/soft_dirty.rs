//! Soft-dirty tracking, where the kernel has it.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom};

use super::{
    has_page, lazy_vmas, open_pagemap, pagemap_entries, read_remote, Delta, DeltaSink,
    DirtyTracker, TrackError, DELTA_PIECE_BYTES, PM_SOFT_DIRTY,
};
use crate::page;

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
        let mut page = vec![0u8; page::SIZE];
        for vma in lazy_vmas(pid)? {
            let entries = pagemap_entries(pid, &pagemap, vma.start, vma.end)?;
            for (i, entry) in entries.iter().enumerate() {
                let present = has_page(*entry);
                if present && (first || entry & PM_SOFT_DIRTY != 0) {
                    let addr = vma.start + i as u64 * page::SIZE_U64;
                    if read_remote(pid, addr, &mut page).is_ok() {
                        delta.push_page(addr, &page);
                        held += page::SIZE;
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
