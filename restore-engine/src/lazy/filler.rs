//! Installing pages: serving faults (with read-ahead), background chunks (on the copier
//! threads), and following the address spaces through the events userfaultfd reports (fork,
//! mremap, MADV_DONTNEED, munmap).

use std::os::unix::net::UnixStream;

use super::copier::{Copiers, Done, InFlight};
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
    copiers: Copiers,
}

impl<'a, S: PageSource> Filler<'a, S> {
    pub(super) fn new(
        source: &'a mut S,
        stats: &'a mut FillStats,
        supervisor: Option<&'a UnixStream>,
        copier_threads: usize,
    ) -> Result<Self, LazyError> {
        Ok(Filler {
            source,
            stats,
            supervisor,
            shared: Default::default(),
            copiers: Copiers::start(copier_threads)?,
        })
    }

    /// Background ranges the copiers can take now.
    pub(super) fn copier_room(&self) -> usize {
        self.copiers.room()
    }

    /// Nothing is being copied.
    pub(super) fn nothing_in_flight(&self) -> bool {
        self.copiers.is_empty()
    }

    /// The descriptor that becomes readable when a copier is done.
    pub(super) fn copiers_fd(&self) -> std::os::fd::RawFd {
        self.copiers.signal_fd()
    }

    /// Ranges the copiers are done with.
    pub(super) fn copied(&mut self) -> Vec<Done> {
        self.copiers.take_ready()
    }

    /// Up to `pages` pages of image task `pid` at image address `img_addr`, from the page source.
    fn source_chunk(&self, pid: u32, img_addr: u64, pages: usize) -> Result<Chunk<'_>, LazyError> {
        self.source
            .chunk(pid, img_addr, pages)
            .ok_or(LazyError::MissingPage {
                pid,
                vaddr: img_addr,
            })
    }

    /// Counts `bytes` installed from image address `img_addr` and releases their source pages.
    fn account(&mut self, task: &Task, img_addr: u64, bytes: u64, zero: bool) {
        if bytes == 0 {
            return;
        }
        let pages = bytes as usize / page::SIZE;
        self.stats.bytes += bytes;
        if zero {
            self.stats.zero_pages += pages as u64;
        }
        if !self.shared.contains(&task.source_pid) {
            self.source.installed(task.source_pid, img_addr, pages);
        }
    }

    /// Takes back a range a copier is done with: what was not installed goes back to the
    /// pending ranges (or, past a mapping boundary, is installed here, in halves).
    pub(super) fn finish(&mut self, task: &mut Task, done: Done) -> Result<(), LazyError> {
        let InFlight {
            start,
            end,
            img_start,
            ..
        } = done.range;
        let Installed { bytes, stop } = done.result.map_err(install_error(task, start))?;
        self.account(task, img_start, bytes, false);
        self.stats.pages_in_background += bytes / page::SIZE_U64;
        task.pending.insert(start + bytes, end, img_start + bytes);
        match stop {
            // Busy: retried once the address space's events are read.
            None | Some(Stop::Busy) => {}
            Some(Stop::Unmapped) => {
                let rest = ((end - start - bytes) / page::SIZE_U64) as usize;
                let (pages, _busy) = self.install(task, start + bytes, rest)?;
                self.stats.pages_in_background += pages as u64;
            }
            Some(Stop::Exited) => task.pending = PendingRanges::default(),
        }
        Ok(())
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
        let chunk = self.source_chunk(task.source_pid, img_addr, room)?;
        let pages = chunk.pages().min(room);
        let len = (pages * page::SIZE) as u64;
        let is_zero = matches!(chunk, Chunk::Zero(_));
        let Installed { bytes, stop } = match chunk {
            Chunk::Data(data) => task.uffd.copy(addr, &data[..len as usize]),
            Chunk::Zero(_) => task.uffd.zero(addr, len),
        }
        .map_err(install_error(task, addr))?;
        let done_pages = bytes as usize / page::SIZE;
        if bytes > 0 {
            task.pending.remove(addr, addr + bytes);
        }
        self.account(task, img_addr, bytes, is_zero);
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
        } else if let Some(range) = self.copiers.in_flight_at(task.id, page) {
            // A copier is installing it: install this page now rather than wait for the whole
            // range. If the copier came first, the page is present and only the wake is needed.
            let img = range.img_start + (page - range.start);
            let Chunk::Data(data) = self.source_chunk(task.source_pid, img, 1)? else {
                return Err(LazyError::MissingPage {
                    pid: task.source_pid,
                    vaddr: img,
                });
            };
            let installed = task
                .uffd
                .copy(page, &data[..page::SIZE])
                .map_err(install_error(task, page))?;
            let _ = task.uffd.wake(page, page::SIZE_U64);
            self.stats.pages_by_fault += 1;
            installed.stop == Some(Stop::Busy)
        } else {
            // Never populated at dump time (or installed meanwhile): a zero page. Zeroing also
            // wakes the thread if another fault installed the page first.
            let installed = task
                .uffd
                .zero(page, page::SIZE_U64)
                .map_err(install_error(task, page))?;
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

    /// Starts one background chunk of `task`: data goes to an idle copier, a run of zero pages
    /// is installed here (no copy). Returns the bytes started.
    pub(super) fn background_chunk(
        &mut self,
        task: &mut Task,
        chunk_bytes: usize,
    ) -> Result<u64, LazyError> {
        let Some((start, pending)) = task.pending.first() else {
            return Ok(0);
        };
        let max_pages = (chunk_bytes / page::SIZE).max(1);
        let room = ((pending.end - start) as usize / page::SIZE).min(max_pages);
        let (src, len) = match self.source_chunk(task.source_pid, pending.img_start, room)? {
            Chunk::Data(data) => (data.as_ptr() as u64, data.len().min(room * page::SIZE)),
            Chunk::Zero(_) => {
                let (pages, _busy) = self.install(task, start, max_pages)?;
                self.stats.pages_in_background += pages as u64;
                return Ok((pages * page::SIZE) as u64);
            }
        };
        let range = InFlight {
            task: task.id,
            start,
            end: start + len as u64,
            img_start: pending.img_start,
        };
        task.pending.remove(range.start, range.end);
        self.copiers.send(range, &task.uffd, src)?;
        Ok(len as u64)
    }

    /// Takes back `task`'s in-flight ranges (before an event changes its address space).
    fn settle(&mut self, task: &mut Task) -> Result<(), LazyError> {
        for done in self.copiers.wait_for_task(task.id)? {
            self.finish(task, done)?;
        }
        Ok(())
    }

    pub(super) fn handle_event(
        &mut self,
        task: &mut Task,
        event: UffdEvent,
    ) -> Result<Option<Task>, LazyError> {
        if !matches!(event, UffdEvent::PageFault { .. }) {
            self.settle(task)?;
        }
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
                    id: super::new_task_id(),
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

/// The error of installing pages at `vaddr` in `task`.
fn install_error(task: &Task, vaddr: u64) -> impl FnOnce(std::io::Error) -> LazyError {
    let pid = task.source_pid;
    move |source| LazyError::Install { pid, vaddr, source }
}
