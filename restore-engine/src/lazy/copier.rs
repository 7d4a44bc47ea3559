//! Background copies on threads of their own, so that the server thread serves faults while a
//! chunk is being copied. One 4 MiB UFFDIO_COPY takes about 2 ms into memory the host has
//! touched before and up to 10 ms where a hypervisor must first populate fresh guest memory
//! (docs/benchmarks.md); a fault that waited behind it stalled the restored service that long.
//!
//! The server thread stays the only owner of the address-space bookkeeping. It takes a range
//! out of a task's pending ranges and hands it to a copier (the range is *in flight*), and it
//! takes the outcome back. A fault inside an in-flight range is served by the server thread
//! itself, one page, at once: whichever copy comes second finds the page present and skips it.
//! Any other event of an address space (fork, mremap, MADV_DONTNEED, munmap) first waits for that
//! space's in-flight ranges to come back, so it applies to settled ranges.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use crate::uffd::{Installed, Uffd};

/// Ranges per copier thread handed over at once (one copied, one waiting).
const QUEUED_PER_COPIER: usize = 2;

/// A range taken out of a task's pending ranges while a copier installs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct InFlight {
    /// [`super::Task::id`] of the address space.
    pub(super) task: u64,
    pub(super) start: u64,
    pub(super) end: u64,
    /// Where `start`'s data comes from (the image address).
    pub(super) img_start: u64,
}

impl InFlight {
    fn contains(&self, task: u64, addr: u64) -> bool {
        self.task == task && self.start <= addr && addr < self.end
    }
}

struct Job {
    range: InFlight,
    uffd: Uffd,
    /// Address of the range's data in this process (the page source's memory).
    src: u64,
}

/// The outcome of one in-flight range.
pub(super) struct Done {
    pub(super) range: InFlight,
    pub(super) result: io::Result<Installed>,
}

/// The copier threads and what they are copying.
pub(super) struct Copiers {
    jobs: Option<mpsc::Sender<Job>>,
    done: mpsc::Receiver<Done>,
    /// Readable when a copier finished a range (the server polls it with the userfaultfds).
    signal: UnixStream,
    threads: Vec<JoinHandle<()>>,
    in_flight: Vec<InFlight>,
    /// Outcomes received while waiting for another task's ranges.
    held: Vec<Done>,
}

impl Copiers {
    pub(super) fn start(threads: usize) -> io::Result<Self> {
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        let (done_tx, done_rx) = mpsc::channel();
        let (signal, notify) = UnixStream::pair()?;
        signal.set_nonblocking(true)?;
        notify.set_nonblocking(true)?;
        let mut handles = Vec::new();
        for _ in 0..threads.max(1) {
            let jobs = Arc::clone(&jobs_rx);
            let done = done_tx.clone();
            let notify = notify.try_clone()?;
            handles.push(
                std::thread::Builder::new()
                    .name("lazy-copier".into())
                    .spawn(move || loop {
                        // One thread waits in recv at a time; the queue's end ends them all.
                        let Some(job) = jobs.lock().ok().and_then(|jobs| jobs.recv().ok()) else {
                            return;
                        };
                        let len = job.range.end - job.range.start;
                        // SAFETY: the server keeps the source pages of an in-flight range
                        // allocated and unchanged until it has taken the range back: it
                        // releases them only in `Filler::finish`, and `Copiers` joins these
                        // threads when dropped, before the page source can go away.
                        let result = unsafe { job.uffd.copy_from(job.range.start, job.src, len) };
                        if done
                            .send(Done {
                                range: job.range,
                                result,
                            })
                            .is_err()
                        {
                            return;
                        }
                        // A full signal socket already holds a wake-up: nothing is lost.
                        let _ = (&notify).write(&[1]);
                    })?,
            );
        }
        Ok(Copiers {
            jobs: Some(jobs_tx),
            done: done_rx,
            signal,
            threads: handles,
            in_flight: Vec::new(),
            held: Vec::new(),
        })
    }

    /// Ranges that can be handed over now: each copier has one range queued behind the one it
    /// copies, so it goes on at once instead of waiting for the server thread to wake up.
    pub(super) fn room(&self) -> usize {
        (self.threads.len() * QUEUED_PER_COPIER).saturating_sub(self.in_flight.len())
    }

    pub(super) fn is_empty(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// The descriptor to poll for finished ranges.
    pub(super) fn signal_fd(&self) -> RawFd {
        self.signal.as_raw_fd()
    }

    /// The in-flight range of `task` holding `addr`.
    pub(super) fn in_flight_at(&self, task: u64, addr: u64) -> Option<InFlight> {
        self.in_flight
            .iter()
            .find(|r| r.contains(task, addr))
            .copied()
    }

    /// Hands `range` to a copier; its data is at address `src` of this process (see
    /// [`Uffd::copy_from`] for what the caller must keep alive).
    pub(super) fn send(&mut self, range: InFlight, uffd: &Uffd, src: u64) -> io::Result<()> {
        let job = Job {
            range,
            uffd: uffd.try_clone()?,
            src,
        };
        self.jobs
            .as_ref()
            .and_then(|jobs| jobs.send(job).ok())
            .ok_or_else(copiers_gone)?;
        self.in_flight.push(range);
        Ok(())
    }

    fn taken(&mut self, done: &Done) {
        self.in_flight.retain(|r| *r != done.range);
    }

    /// Outcomes that are ready, without waiting.
    pub(super) fn take_ready(&mut self) -> Vec<Done> {
        let mut buf = [0u8; 64];
        while matches!((&self.signal).read(&mut buf), Ok(n) if n > 0) {}
        let mut ready = std::mem::take(&mut self.held);
        while let Ok(done) = self.done.try_recv() {
            self.taken(&done);
            ready.push(done);
        }
        ready
    }

    /// Waits until no range of `task` is in flight and returns their outcomes; those of other
    /// tasks that arrive meanwhile are kept for [`Self::take_ready`].
    pub(super) fn wait_for_task(&mut self, task: u64) -> io::Result<Vec<Done>> {
        let (mut mine, others): (Vec<Done>, Vec<Done>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|d| d.range.task == task);
        self.held = others;
        while self.in_flight.iter().any(|r| r.task == task) {
            let done = self.done.recv().map_err(|_| copiers_gone())?;
            self.taken(&done);
            if done.range.task == task {
                mine.push(done);
            } else {
                self.held.push(done);
            }
        }
        Ok(mine)
    }
}

fn copiers_gone() -> io::Error {
    io::Error::other("the lazy-pages copier threads are gone")
}

impl Drop for Copiers {
    /// Ends the threads once their current copy is done: the page source must outlive any copy.
    fn drop(&mut self) {
        self.jobs = None;
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page;

    /// Two tasks' ranges in flight on two copiers: waiting for one task returns only its
    /// outcome and keeps the other's for `take_ready`; both ranges are installed.
    #[test]
    fn waiting_for_one_task_keeps_the_others_outcomes() {
        // This process's memory gets a userfaultfd: no other test may fork meanwhile.
        let _no_forks = crate::testsupport::own_memory_uffd();
        const PAGES: usize = 64;
        let len = PAGES * page::SIZE;
        let region = crate::testsupport::UffdRegion::new(PAGES);
        let (base, uffd) = (region.base, region.uffd.as_ref().unwrap());
        let data: Vec<u8> = (0..len).map(|i| (i / page::SIZE) as u8 + 1).collect();

        let mut copiers = Copiers::start(2).unwrap();
        let half = (len / 2) as u64;
        let ranges = [(1, base), (2, base + half)].map(|(task, start)| InFlight {
            task,
            start,
            end: start + half,
            img_start: start,
        });
        for range in ranges {
            let src = data.as_ptr() as u64 + (range.start - base);
            copiers.send(range, uffd, src).unwrap();
        }
        assert_eq!(copiers.room(), 2);
        assert_eq!(copiers.in_flight_at(2, base + half + 5), Some(ranges[1]));

        let mine = copiers.wait_for_task(2).unwrap();
        assert_eq!(mine.len(), 1);
        assert_eq!(mine[0].range, ranges[1]);
        assert_eq!(mine[0].result.as_ref().unwrap().bytes, half);
        assert_eq!(copiers.in_flight_at(2, base + half + 5), None);
        // The other task's outcome arrives, whether it came while waiting or after.
        let mut others = Vec::new();
        while others.is_empty() {
            others = copiers.take_ready();
        }
        assert_eq!(others.len(), 1);
        assert_eq!(others[0].range, ranges[0]);
        assert!(copiers.is_empty());
        assert_eq!(copiers.room(), 4);
        for i in 0..PAGES {
            assert_eq!(region.read_u64(i) as u8, i as u8 + 1, "page {i}");
        }
        drop(copiers);
    }
}
