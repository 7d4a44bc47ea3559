//! Installing pages: serving faults (with read-ahead), background chunks, and following the
//! address spaces through the events userfaultfd reports (fork, mremap, MADV_DONTNEED, munmap).

use std::os::unix::net::UnixStream;

use super::pages::{Chunk, PageSource};
use super::pending::PendingRanges;
use super::{socket, LazyError, Task};
use crate::events::FillStats;
use crate::page;
use crate::uffd::{Installed, Stop, Uffd, UffdEvent};

/// Pages installed around a faulting address (read-ahead within the same lazy range).
const FAULT_AROUND_PAGES: usize = 16;

pub(super) struct Filler<'a, S: PageSource> {
    source: &'a mut S,
    stats: &'a mut FillStats,
    supervisor: Option<&'a UnixStream>,
    /// Image pids whose pages more than one address space reads (a restored task forked while
    /// the fill ran): their pages stay in the source until the end, since installing a page in
    /// one address space does not install it in the other.
    shared: std::collections::HashSet<u32>,
}

impl<'a, S: PageSource> Filler<'a, S> {
    pub(super) fn new(
        source: &'a mut S,
        stats: &'a mut FillStats,
        supervisor: Option<&'a UnixStream>,
    ) -> Self {
        Filler {
            source,
            stats,
            supervisor,
            shared: Default::default(),
        }
    }

    /// Installs up to `max_pages` pending pages at `addr`. Returns the pages handled and whether
    /// the address space was busy (events must be read before retrying).
    fn install(
        &mut self,
        task: &mut Task,
        addr: u64,
        max_pages: usize,
    ) -> Result<(usize, bool), LazyError> {
        let Some((start, pending)) = task.pending.find(addr) else {
            return Ok((0, false));
        };
        let img_addr = pending.img_start + (addr - start);
        let room = ((pending.end - addr) as usize / page::SIZE).min(max_pages);
        let chunk =
            self.source
                .chunk(task.source_pid, img_addr, room)
                .ok_or(LazyError::MissingPage {
                    pid: task.source_pid,
                    vaddr: img_addr,
                })?;
        let pages = chunk.pages().min(room);
        let len = (pages * page::SIZE) as u64;
        let is_zero = matches!(chunk, Chunk::Zero(_));
        let Installed { bytes, stop } = match chunk {
            Chunk::Data(data) => task.uffd.copy(addr, &data[..len as usize]),
            Chunk::Zero(_) => task.uffd.zero(addr, len),
        }
        .map_err(|source| LazyError::Install {
            pid: task.source_pid,
            vaddr: addr,
            source,
        })?;
        let done_pages = bytes as usize / page::SIZE;
        if bytes > 0 {
            task.pending.remove(addr, addr + bytes);
            self.stats.bytes += bytes;
            if is_zero {
                self.stats.zero_pages += done_pages as u64;
            }
            if !self.shared.contains(&task.source_pid) {
                self.source.installed(task.source_pid, img_addr, done_pages);
            }
        }
        match stop {
            None => Ok((done_pages, false)),
            Some(Stop::Busy) => Ok((done_pages, true)),
            // ENOENT means "not inside one registered mapping": the pages may be unmapped, or
            // the run may cross a boundary that did not exist at dump time (mprotect splits
            // mappings; maps04). Halve the run until it fits; only a single page that fails is
            // really gone (its unmap event follows). Dropping the whole run here left pages the
            // task later read as zeros.
            Some(Stop::Unmapped) => {
                let failed = addr + bytes;
                let rest = (len - bytes) as usize / page::SIZE;
                if rest > 1 {
                    let (more, busy) = self.install(task, failed, rest / 2)?;
                    return Ok((done_pages + more, busy));
                }
                task.pending.remove(failed, failed + page::SIZE_U64);
                Ok((done_pages, false))
            }
            Some(Stop::Exited) => {
                task.pending = PendingRanges::default();
                Ok((done_pages, false))
            }
        }
    }

    /// Serves a fault at `page`; defers it if the address space is changing.
    fn serve_fault(&mut self, task: &mut Task, page: u64) -> Result<(), LazyError> {
        let busy = if task.pending.find(page).is_some() {
            let (pages, busy) = self.install(task, page, FAULT_AROUND_PAGES)?;
            self.stats.pages_by_fault += pages as u64;
            busy && pages == 0
        } else {
            // Never populated at dump time (or installed meanwhile): a zero page. Zeroing also
            // wakes the thread if another fault installed the page first.
            let installed =
                task.uffd
                    .zero(page, page::SIZE_U64)
                    .map_err(|source| LazyError::Install {
                        pid: task.source_pid,
                        vaddr: page,
                        source,
                    })?;
            match installed.stop {
                Some(Stop::Busy) => true,
                Some(Stop::Exited) => {
                    task.pending = PendingRanges::default();
                    false
                }
                _ => {
                    if installed.bytes > 0 {
                        let _ = task.uffd.wake(page, page::SIZE_U64);
                    }
                    false
                }
            }
        };
        if busy {
            task.deferred_faults.push(page);
        }
        Ok(())
    }

    /// Retries deferred faults of a task (after its events were read).
    pub(super) fn retry_deferred(&mut self, task: &mut Task) -> Result<(), LazyError> {
        for page in std::mem::take(&mut task.deferred_faults) {
            self.serve_fault(task, page)?;
        }
        Ok(())
    }

    pub(super) fn background_chunk(
        &mut self,
        task: &mut Task,
        chunk_bytes: usize,
    ) -> Result<u64, LazyError> {
        let Some((start, _)) = task.pending.first() else {
            return Ok(0);
        };
        let (pages, _busy) = self.install(task, start, (chunk_bytes / page::SIZE).max(1))?;
        self.stats.pages_in_background += pages as u64;
        Ok((pages * page::SIZE) as u64)
    }

    pub(super) fn handle_event(
        &mut self,
        task: &mut Task,
        event: UffdEvent,
    ) -> Result<Option<Task>, LazyError> {
        match event {
            UffdEvent::PageFault { address, .. } => {
                let page = address & !(page::SIZE_U64 - 1);
                self.serve_fault(task, page)?;
                Ok(None)
            }
            UffdEvent::Fork { child_uffd } => {
                // SAFETY: the kernel installed this descriptor in our table for the event.
                let uffd = unsafe { Uffd::from_raw(child_uffd) };
                if let Some(supervisor) = self.supervisor {
                    socket::send_to_supervisor(supervisor, task.source_pid, uffd.as_raw())?;
                }
                self.stats.forks += 1;
                self.shared.insert(task.source_pid);
                Ok(Some(Task {
                    source_pid: task.source_pid,
                    uffd,
                    pending: task.pending.clone(),
                    deferred_faults: Vec::new(),
                    gone: false,
                }))
            }
            UffdEvent::Remap { from, to, len } => {
                self.stats.remaps += 1;
                task.pending.remap(from, to, len);
                Ok(None)
            }
            UffdEvent::Remove { start, end } => {
                self.stats.removes += 1;
                // MADV_DONTNEED/REMOVE: the task dropped these pages; stop watching them so
                // its later touches get fresh zero pages from the kernel.
                // Failure means the range is gone already, which is what we want.
                let _ = task.uffd.unregister(start, end - start);
                task.pending.remove(start, end);
                Ok(None)
            }
            UffdEvent::Unmap { start, end } => {
                self.stats.unmaps += 1;
                task.pending.remove(start, end);
                Ok(None)
            }
            UffdEvent::Unknown(kind) => Err(LazyError::Protocol(format!(
                "unexpected userfaultfd event {kind:#x}"
            ))),
        }
    }
}
