//! The write-protect tracker: rounds that cost O(pages written), with userfaultfd
//! write-protect in asynchronous mode and `PAGEMAP_SCAN` (Linux 6.7+; docs/design-notes.md,
//! "A write-protect tracker").
//!
//! - Each task creates a userfaultfd once, by a system call injected with ptrace
//!   ([`inject`]); the shim keeps the descriptor, and registers each lazy mapping of the task
//!   for write-protect through it (a new mapping, a fork child, an `mremap`ped area or an exec'd
//!   task is found unregistered in a later round, and registered then). Registration happens
//!   with all the task's threads stopped and its mappings read again: a range read while it
//!   runs may be stale, and registering it could split a mapping the task then cannot
//!   `mremap` as one.
//! - A round asks `PAGEMAP_SCAN`, mapping by mapping, for the pages written since the last one
//!   and protects them again in the same step; a write after that unprotects the page (the
//!   kernel resolves the fault itself, nothing reads the descriptor) and the next round sees
//!   it. A page written between the scan and the read is read with its new content and sent
//!   again next round.
//! - A mapping's first scan reports every page (none is protected yet). A page reported written
//!   but absent was discarded (`MADV_DONTNEED`): if the destination holds it, it is sent as
//!   zero.
//! - The frozen round injects nothing: a task or mapping still unregistered is read whole.
//!   [`DirtyTracker::release`] then closes every descriptor, which removes the registrations
//!   and the protection (CRIU dumps the tasks next; it refuses a task holding a userfaultfd,
//!   which is why the tasks never keep theirs).
//! - A task the tracker cannot inject into (stopped, or a failing call) is tracked by content
//!   hash instead, and the log says why.

mod inject;
mod scan;
#[cfg(test)]
mod tests;

use std::collections::HashMap;

pub use inject::InjectError;
pub use scan::pagemap_scan_available;

use super::{
    carry_over, has_locked_memory, has_page, open_pagemap, pagemap_entries,
    parse_lazy_vmas_flagged, read_maps, read_page_forced, read_smaps, Delta, DeltaSink,
    DirtyTracker, HashTracker, LazyVma, Quiesce, TrackError, DELTA_PIECE_BYTES, READ_BATCH,
};
use crate::page;
use crate::uffd::Uffd;

/// Whether this kernel and architecture offer the write-protect tracker, and if not why.
pub fn uffd_wp_support() -> Result<(), String> {
    if !cfg!(target_arch = "x86_64") {
        return Err("injecting the userfaultfd call is implemented for x86-64 only".into());
    }
    match crate::uffd::probe() {
        Ok(f) if f.has(crate::uffd::UFFD_FEATURE_WP_ASYNC) => {}
        Ok(_) => return Err("userfaultfd has no asynchronous write-protect (Linux < 6.7)".into()),
        Err(e) => return Err(format!("no userfaultfd: {e}")),
    }
    if !pagemap_scan_available() {
        return Err("no PAGEMAP_SCAN ioctl (Linux < 6.7)".into());
    }
    Ok(())
}

#[derive(Default)]
struct Task {
    /// The userfaultfd of the task's address space (none yet, or dropped after an exec).
    uffd: Option<Uffd>,
    /// A scan found registered mappings once (none later: the address space was replaced).
    registered_before: bool,
    /// Tracked by content hash instead (the reason was logged).
    hashed: bool,
    /// Per mapping, which pages the destination holds (sent as data, not since discarded).
    sent: Vec<(LazyVma, Vec<bool>)>,
    /// Pages that could not be read: read next round (the scan protected them again).
    retry: Vec<u64>,
    /// Mappings registering refused (with the task stopped): read whole, not asked again.
    unregistrable: Vec<(u64, u64)>,
    /// The mappings registered as of the latest round.
    registered: Vec<LazyVma>,
    /// The eligible mappings as of the latest round, each with whether it is registered; None
    /// when they must be read from smaps again ([`UffdWpTracker::mappings`]).
    layout: Option<Vec<(LazyVma, bool)>>,
}

/// The write-protect tracker.
pub struct UffdWpTracker {
    tasks: HashMap<u32, Task>,
    /// For the tasks it cannot inject into.
    fallback: HashTracker,
    frozen: bool,
    regions: Vec<scan::PageRegion>,
    /// A page, for runs that must be read page by page.
    page: Vec<u8>,
}

impl UffdWpTracker {
    pub fn new() -> Result<Self, TrackError> {
        uffd_wp_support().map_err(TrackError::NoUffdWp)?;
        Ok(UffdWpTracker {
            tasks: HashMap::new(),
            fallback: HashTracker::default(),
            frozen: false,
            regions: Vec::new(),
            page: vec![0u8; page::SIZE],
        })
    }

    /// Task `pid`'s eligible mappings, each with whether it is registered (smaps' `uw`). smaps
    /// costs a walk of every page table entry (24 ms per round for a 1.4 GiB heap, all of it
    /// in the pause in the frozen round), so it is read only when /proc/PID/maps, which does
    /// not walk, shows other mappings than the latest round's, or when the task has locked
    /// memory (smaps' `lo`). Otherwise the registrations are the latest round's: a mapping
    /// loses its registration only by going away or moving, which maps shows, and a scan of a
    /// mapping that lost it all the same fails (EPERM: read whole, and smaps next round).
    fn mappings(&mut self, pid: u32) -> Result<Vec<(LazyVma, bool)>, TrackError> {
        if let Some(layout) = self.tasks.get(&pid).and_then(|t| t.layout.as_ref()) {
            let now = parse_lazy_vmas_flagged(&read_maps(pid)?);
            let same =
                now.len() == layout.len() && now.iter().zip(layout).all(|((a, _), (b, _))| a == b);
            if same && !has_locked_memory(pid)? {
                return Ok(layout.clone());
            }
        }
        Ok(parse_lazy_vmas_flagged(&read_smaps(pid)?))
    }

    /// Makes sure task `pid` has a userfaultfd and that its unregistered mappings are
    /// registered (not while frozen). Returns the task's mappings, each with whether it is
    /// registered: `vmas` as read, or read again with the task stopped if it had to register.
    ///
    /// Registration stops every thread of the task first and reads its mappings again: a range
    /// read from smaps while the task runs may have grown or merged since, and registering the
    /// stale range would split the task's mapping (its next `mremap` of it then fails with
    /// `EFAULT`: pclive would change what the program sees).
    fn register(
        &mut self,
        pid: u32,
        vmas: Vec<(LazyVma, bool)>,
    ) -> Result<Vec<(LazyVma, Registration)>, TrackError> {
        let task = self.tasks.entry(pid).or_default();
        let wanted = |vmas: &[(LazyVma, bool)], task: &Task| {
            vmas.iter()
                .any(|(v, wp)| !wp && !task.unregistrable.contains(&(v.start, v.end)))
        };
        if vmas.iter().any(|(_, wp)| *wp) {
            task.registered_before = true;
        }
        if self.frozen || !wanted(&vmas, task) {
            return Ok(registrations(&vmas));
        }
        let mut stopped = match inject::stop_task(pid) {
            Ok(stopped) => stopped,
            Err(e) => {
                if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    // Gone since the list was taken: as for any tracker.
                    return Err(TrackError::Proc {
                        pid,
                        what: "stopping its threads",
                        source: std::io::Error::from_raw_os_error(libc::ESRCH),
                    });
                }
                if task.uffd.is_none() {
                    log::warn!(
                        "task {pid}: cannot track its writes with uffd-wp ({e}); its pages are \
                         compared by content instead"
                    );
                    task.hashed = true;
                } else {
                    // Its new mappings are read whole this round, and registered in a later one.
                    log::debug!("task {pid}: new mappings not registered this round: {e}");
                }
                return Ok(registrations(&vmas));
            }
        };
        // The mappings as they are now: they cannot change until `stopped` is dropped.
        let vmas = parse_lazy_vmas_flagged(&read_smaps(pid)?);
        let mut registered = registrations(&vmas);
        if task.uffd.is_some()
            && task.registered_before
            && registered.iter().all(|(_, r)| *r == Registration::None)
        {
            // No mapping carries our registration any more: the task exec'd (the descriptor
            // refers to its old address space). A new one is made below.
            log::debug!("task {pid}: its address space was replaced; a new userfaultfd");
            task.uffd = None;
            task.registered_before = false;
            task.unregistrable.clear();
        }
        if task.uffd.is_none() {
            let made = stopped.userfaultfd().and_then(|fd| {
                let uffd = Uffd::from_owned(fd);
                uffd.enable_wp_async()
                    .map(|()| uffd)
                    .map_err(|source| InjectError::Sys {
                        pid,
                        what: "UFFDIO_API (write-protect async)",
                        source,
                    })
            });
            match made {
                Ok(fd) => task.uffd = Some(fd),
                Err(e) => {
                    log::warn!(
                        "task {pid}: cannot track its writes with uffd-wp ({e}); its pages are \
                         compared by content instead"
                    );
                    task.hashed = true;
                    return Ok(registered);
                }
            }
        }
        let uffd = task.uffd.as_ref().expect("made above");
        for (vma, registered) in registered.iter_mut() {
            if *registered != Registration::None
                || task.unregistrable.contains(&(vma.start, vma.end))
            {
                continue;
            }
            match uffd.register_wp(vma.start, vma.end - vma.start) {
                Ok(()) => *registered = Registration::Now,
                // A kind of mapping that cannot be registered (the task is stopped: the range
                // is current). Read whole each round; not asked again.
                Err(e) => {
                    log::debug!(
                        "task {pid}: registering {:#x}-{:#x} for write-protect: {e}",
                        vma.start,
                        vma.end
                    );
                    task.unregistrable.push((vma.start, vma.end));
                }
            }
        }
        drop(stopped);
        Ok(registered)
    }
}

/// Clears the uffd-wp markers of `pid`'s registered mappings `vmas` (see
/// [`DirtyTracker::prepare_dump`]).
fn clear_markers(
    pid: u32,
    uffd: &Uffd,
    vmas: &[LazyVma],
    regions: &mut Vec<scan::PageRegion>,
) -> Result<(), String> {
    let pagemap = open_pagemap(pid).map_err(|e| e.to_string())?;
    let mut holes = Vec::new();
    for vma in vmas {
        holes.clear();
        scan::swapped(&pagemap, vma.start, vma.end, regions, |r| {
            holes.push((r.start, r.end))
        })
        .map_err(|e| {
            format!(
                "finding the write-protect markers of {:#x}-{:#x}: {e}",
                vma.start, vma.end
            )
        })?;
        for &(start, end) in &holes {
            uffd.unprotect(start, end - start).map_err(|e| {
                format!("clearing the write-protect markers of {start:#x}-{end:#x}: {e}")
            })?;
        }
    }
    Ok(())
}

/// The mappings, each with whether smaps shows it registered.
fn registrations(vmas: &[(LazyVma, bool)]) -> Vec<(LazyVma, Registration)> {
    vmas.iter()
        .map(|(vma, wp)| {
            let registered = if *wp {
                Registration::Before
            } else {
                Registration::None
            };
            (*vma, registered)
        })
        .collect()
}

/// Whether a mapping is registered for write-protect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Registration {
    None,
    /// In an earlier round: a scan reports what was written since.
    Before,
    /// In this round: a scan protects its pages, and all present pages are read (the kernel
    /// leaves none of them protected when a mapping loses its registration, but reading them
    /// all does not depend on it).
    Now,
}

/// What a round reads from one mapping: runs of pages with content, pages to send as zero.
#[derive(Default)]
struct Plan {
    runs: Vec<(u64, u64)>,
    zero: Vec<u64>,
}

impl Plan {
    fn add_run(&mut self, start: u64, end: u64) {
        match self.runs.last_mut() {
            Some((_, e)) if *e == start => *e = end,
            _ => self.runs.push((start, end)),
        }
    }
}

/// Plans a registered mapping from its written pages (protecting them again).
fn plan_scanned(
    pagemap: &std::fs::File,
    vma: LazyVma,
    before: &[bool],
    regions: &mut Vec<scan::PageRegion>,
    plan: &mut Plan,
) -> std::io::Result<()> {
    scan::take_written(pagemap, vma.start, vma.end, regions, |region| {
        if region.categories & scan::PAGE_IS_GUARD != 0 {
            // Nothing to read, and nothing sent before (the other trackers skip it too).
        } else if region.categories & (scan::PAGE_IS_PRESENT | scan::PAGE_IS_SWAPPED) != 0 {
            plan.add_run(region.start, region.end);
        } else {
            // Discarded or never touched: zero where the destination holds content.
            let mut addr = region.start;
            while addr < region.end {
                if before[((addr - vma.start) / page::SIZE_U64) as usize] {
                    plan.zero.push(addr);
                }
                addr += page::SIZE_U64;
            }
        }
    })
}

/// Plans an unregistered mapping: every present page (and zero for what is gone).
fn plan_whole(
    pid: u32,
    pagemap: &std::fs::File,
    vma: LazyVma,
    before: &[bool],
    plan: &mut Plan,
) -> Result<(), TrackError> {
    let entries = pagemap_entries(pid, pagemap, vma.start, vma.end)?;
    for (i, entry) in entries.iter().enumerate() {
        let addr = vma.start + i as u64 * page::SIZE_U64;
        if has_page(*entry) {
            plan.add_run(addr, addr + page::SIZE_U64);
        } else if before[i] {
            plan.zero.push(addr);
        }
    }
    Ok(())
}

impl DirtyTracker for UffdWpTracker {
    fn name(&self) -> &'static str {
        "uffd-wp"
    }

    fn begin_round(
        &mut self,
        pids: &[u32],
        quiesce: &mut dyn Quiesce,
        frozen: bool,
    ) -> Result<(), TrackError> {
        self.frozen = frozen;
        // Tasks that exited: their descriptors go.
        self.tasks.retain(|pid, _| pids.contains(pid));
        self.fallback.begin_round(pids, quiesce, frozen)
    }

    fn round_into(&mut self, pid: u32, sink: &mut DeltaSink) -> Result<(), TrackError> {
        if self.tasks.get(&pid).is_some_and(|t| t.hashed) {
            return self.fallback.round_into(pid, sink);
        }
        let vmas = self.mappings(pid)?;
        let vmas = self.register(pid, vmas)?;
        let task = self.tasks.get_mut(&pid).expect("registered above");
        // Taken again below unless the registrations turn out otherwise than recorded.
        task.layout = None;
        let mut layout_holds = true;
        let layout: Vec<(LazyVma, bool)> = vmas
            .iter()
            .map(|(vma, r)| (*vma, *r != Registration::None))
            .collect();
        if task.hashed {
            return self.fallback.round_into(pid, sink);
        }
        let pagemap = open_pagemap(pid)?;
        let strict = self.frozen;
        let retry = std::mem::take(&mut task.retry);
        let mut sent = Vec::with_capacity(vmas.len());
        let mut delta = Delta::for_pieces();
        let mut held = 0usize;
        task.registered = vmas
            .iter()
            .filter(|(_, r)| *r != Registration::None)
            .map(|(vma, _)| *vma)
            .collect();
        for (vma, registered) in vmas {
            let mut marks = carry_over(&task.sent, vma);
            let mut plan = Plan::default();
            if registered == Registration::Now {
                // Every present page, planned before the mapping's first scan: that scan
                // protects its holes with uffd-wp markers, which pagemap reports as swapped
                // pages.
                plan_whole(pid, &pagemap, vma, &marks, &mut plan)?;
            }
            let scanned = registered != Registration::None
                && match plan_scanned(&pagemap, vma, &marks, &mut self.regions, &mut plan) {
                    Ok(()) => true,
                    // Unregistered since smaps was read (mremap, munmap and mmap): whole.
                    Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                        plan = Plan::default();
                        layout_holds = false;
                        false
                    }
                    Err(source) => {
                        return Err(TrackError::Proc {
                            pid,
                            what: "PAGEMAP_SCAN",
                            source,
                        })
                    }
                };
            if !scanned {
                plan_whole(pid, &pagemap, vma, &marks, &mut plan)?;
            }
            // Pages a previous round could not read.
            for &addr in retry.iter().filter(|a| (vma.start..vma.end).contains(*a)) {
                plan.runs.push((addr, addr + page::SIZE_U64));
            }
            plan.runs.sort_unstable();
            plan.runs.dedup_by(|next, run| {
                // Overlapping or adjacent: one run.
                if next.0 <= run.1 {
                    run.1 = run.1.max(next.1);
                    true
                } else {
                    false
                }
            });
            plan.zero.sort_unstable();
            plan.zero.dedup();
            for &addr in &plan.zero {
                marks[((addr - vma.start) / page::SIZE_U64) as usize] = false;
            }
            delta.zero.extend_from_slice(&plan.zero);
            for (start, end) in plan.runs {
                let mut at = start;
                while at < end {
                    let len = ((end - at) as usize).min(READ_BATCH);
                    match delta.read_run(pid, at, len) {
                        Ok(()) => {
                            let first = ((at - vma.start) / page::SIZE_U64) as usize;
                            marks[first..first + len / page::SIZE].fill(true);
                            held += len;
                        }
                        // PROT_NONE pages (which CRIU dumps) or a mapping changed under us:
                        // page by page, forcing access as a debugger does.
                        Err(TrackError::Read { source, .. })
                            if source.raw_os_error() == Some(libc::EFAULT) =>
                        {
                            let one = &mut self.page;
                            for addr in (at..at + len as u64).step_by(page::SIZE) {
                                match read_page_forced(pid, addr, one) {
                                    Ok(()) => {
                                        delta.push_page(addr, one);
                                        marks[((addr - vma.start) / page::SIZE_U64) as usize] =
                                            true;
                                        held += page::SIZE;
                                    }
                                    Err(e) if strict => return Err(e),
                                    Err(_) => task.retry.push(addr),
                                }
                            }
                        }
                        Err(e) => return Err(e),
                    }
                    at += len as u64;
                    if held >= DELTA_PIECE_BYTES {
                        sink(&mut delta).map_err(|()| TrackError::Stopped)?;
                        delta.clear();
                        held = 0;
                    }
                }
            }
            sent.push((vma, marks));
        }
        task.sent = sent;
        if layout_holds {
            task.layout = Some(layout);
        }
        if !delta.is_empty() {
            sink(&mut delta).map_err(|()| TrackError::Stopped)?;
        }
        Ok(())
    }

    /// Clears the markers protection left on never-touched pages: pagemap shows them as
    /// swapped pages, and CRIU would dump each (a zero page faulted in, a lazy page to serve).
    /// Protected pages that are there stay protected: CRIU reads them with vmsplice, which the
    /// protection does not stop, and the frozen tasks write nothing. Lifting the protection of
    /// every page is a walk of all their page tables (29 ms per GiB measured), so that waits
    /// for [`DirtyTracker::release`] or the drop, after the pause: a resumed task's writes are
    /// resolved by the kernel (asynchronous mode), and a killed task's go with it.
    fn prepare_dump(&mut self) {
        let regions = &mut self.regions;
        for (pid, task) in self.tasks.iter_mut() {
            let Some(uffd) = task.uffd.as_ref() else {
                continue;
            };
            if let Err(e) = clear_markers(*pid, uffd, &task.registered, regions) {
                // The safe way, at the full cost: this task's registrations go now.
                log::warn!("task {pid}: {e}; releasing its write-protect entirely");
                task.uffd = None;
            }
        }
    }

    fn release(&mut self) {
        // Closing the descriptors removes the registrations and the protection.
        self.tasks.clear();
    }
}
