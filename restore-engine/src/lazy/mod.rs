//! The lazy-pages server: CRIU's lazy-pages socket protocol on one side, userfaultfd on the
//! other. It installs every lazy page of a restored container from local memory (an image set
//! or the staging store): faults first, everything else in the background.
//!
//! - [`socket`]: CRIU's lazy-pages socket (and the copies of every userfaultfd for the shim),
//! - [`pages`]: where pages come from ([`PageSource`]: the staging store or image files),
//! - [`pending`]: what is left to install in each address space,
//! - [`filler`]: installing pages and following the address spaces' events,
//! - [`copier`]: the threads that copy background chunks while faults are served,
//! - this file: [`serve`], the loop that ties them together.

mod copier;
mod filler;
mod pages;
mod pending;
pub mod socket;

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use pages::{stage_images, Chunk, ImageSource, PageSource};

use crate::cancel::Cancel;
use crate::events::{FillStats, ServerEvent};
use crate::images::{self, ImageError, PE_LAZY};
use crate::uffd::Uffd;
use filler::Filler;
use pending::PendingRanges;
use socket::{RESTORE_FINISHED, SOCKET_NAME};

/// Errors of a lazy restore. Any of them means the container must not keep running.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("CRIU's restore did not connect to the lazy-pages socket within {0:?}")]
    NoRestorer(Duration),
    #[error("lazy-pages protocol: {0}")]
    Protocol(String),
    #[error("the restorer closed the lazy-pages connection before restore finished: the restore failed (see CRIU's restore.log)")]
    RestoreAborted,
    #[error("no data for page {vaddr:#x} of task {pid}: the images do not hold it (was the dump made with --lazy-pages?)")]
    MissingPage { pid: u32, vaddr: u64 },
    #[error("installing pages at {vaddr:#x} in task {pid}: {source}")]
    Install {
        pid: u32,
        vaddr: u64,
        #[source]
        source: io::Error,
    },
    #[error("passing a userfaultfd to the supervisor: {0}")]
    Supervisor(String),
    #[error("{0}")]
    Cancelled(String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Computes a task's lazy ranges: pagemap entries marked PE_LAZY, cut to the task's
/// lazy-eligible VMAs (UFFDIO_COPY cannot cross a VMA).
pub fn lazy_ranges(pagemap: &images::Pagemap, mm: &images::MmEntry) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for r in pagemap.ranges.iter().filter(|r| r.is(PE_LAZY)) {
        let (start, end) = (r.vaddr, r.end());
        for vma in mm.vmas.iter().filter(|v| v.can_be_lazy()) {
            let s = start.max(vma.start);
            let e = end.min(vma.end);
            if s < e {
                out.push((s, e));
            }
        }
    }
    out
}

/// A number no other address space of this process's servers has.
fn new_task_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// One restored address space.
pub(crate) struct Task {
    /// Names it while its userfaultfd's events reorder the list of tasks.
    pub(crate) id: u64,
    /// Whose image pages to read (a forked child reads its parent's).
    pub(crate) source_pid: u32,
    pub(crate) uffd: Uffd,
    pub(crate) pending: PendingRanges,
    /// Faults that could not be served yet (the address space was changing): their threads
    /// wait, so they are retried before anything else.
    pub(crate) deferred_faults: Vec<u64>,
    /// Its userfaultfd reported an error or hang-up: stop polling it.
    pub(crate) gone: bool,
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub images: PathBuf,
    /// The CRIU work directory of the restore (`runc restore --work-path`): the socket lives here.
    pub work_dir: PathBuf,
    /// Background chunk size in bytes.
    pub chunk_bytes: usize,
    /// Threads that copy background chunks while the server thread serves faults.
    pub copier_threads: usize,
    /// Background fill limit in bytes per second (faults are never limited).
    pub fill_rate: Option<u64>,
    /// How long to wait for CRIU to connect.
    pub connect_timeout: Duration,
    /// Set when the restore must stop (it failed, or the shim went away).
    pub cancel: Cancel,
}

impl ServerConfig {
    pub fn new(images: PathBuf, work_dir: PathBuf) -> Self {
        ServerConfig {
            images,
            work_dir,
            chunk_bytes: 4 << 20,
            copier_threads: 1,
            fill_rate: None,
            connect_timeout: Duration::from_secs(120),
            cancel: Cancel::default(),
        }
    }
}

/// Serves one lazy restore. `events` receives progress; `supervisor`, if any, gets a copy of
/// every userfaultfd.
pub fn serve<S: PageSource>(
    config: &ServerConfig,
    source: &mut S,
    supervisor: Option<&UnixStream>,
    mut events: impl FnMut(ServerEvent),
) -> Result<FillStats, LazyError> {
    let pstree = images::read_pstree(&config.images)?;
    // Lazy ranges per image pid, from the pagemaps and VMAs.
    let mut ranges_by_pid: HashMap<u32, Vec<(u64, u64)>> = HashMap::new();
    let mut lazy_total = 0u64;
    for task in &pstree {
        let pagemap = match images::read_pagemap(&config.images, task.pid) {
            Ok(p) => p,
            Err(ImageError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                continue
            }
            Err(e) => return Err(e.into()),
        };
        let mm = images::read_mm(&config.images, task.pid)?;
        let ranges = lazy_ranges(&pagemap, &mm);
        lazy_total += ranges.iter().map(|(s, e)| e - s).sum::<u64>();
        ranges_by_pid.insert(task.pid, ranges);
    }

    let listener = socket::listen(&config.work_dir)?;
    events(ServerEvent::Ready {
        socket: config.work_dir.join(SOCKET_NAME).display().to_string(),
        lazy_bytes: lazy_total,
    });
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + config.connect_timeout;
    let mut restorer = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Some(reason) = config.cancel.reason() {
                    return Err(LazyError::Cancelled(reason));
                }
                if Instant::now() > deadline {
                    return Err(LazyError::NoRestorer(config.connect_timeout));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e.into()),
        }
    };
    drop(listener);
    let _ = fs::remove_file(config.work_dir.join(SOCKET_NAME));
    restorer.set_nonblocking(false)?;
    let connected = Instant::now();

    // One record per task of pstree.img, then the end marker.
    let mut tasks: Vec<Task> = Vec::new();
    for _ in 0..pstree.len() {
        let mut raw = [0u8; 4];
        if !socket::read_exact_or_eof(&mut restorer, &mut raw)? {
            return Err(LazyError::RestoreAborted);
        }
        let pid = i32::from_le_bytes(raw);
        if pid <= 0 {
            continue; // a zombie: no memory
        }
        let pid = pid as u32;
        let fd = socket::receive_fd(&restorer)?;
        if let Some(supervisor) = supervisor {
            socket::send_to_supervisor(supervisor, pid, fd.as_raw_fd())?;
        }
        let mut pending = PendingRanges::default();
        for &(s, e) in ranges_by_pid.get(&pid).map(Vec::as_slice).unwrap_or(&[]) {
            pending.insert(s, e, s);
        }
        events(ServerEvent::Task {
            pid,
            lazy_bytes: pending.bytes(),
        });
        tasks.push(Task {
            id: new_task_id(),
            source_pid: pid,
            uffd: Uffd::from_owned(fd),
            pending,
            deferred_faults: Vec::new(),
            gone: false,
        });
    }
    // The restorer may fault on lazy memory before it finishes (CRIU's restorer blob touches
    // task memory), so faults are served from now on; the background fill starts once the
    // restorer sends its end marker.
    restorer.set_nonblocking(true)?;
    let mut fill_start: Option<Instant> = None;
    let mut stats = FillStats {
        tasks: tasks.len(),
        ..Default::default()
    };
    let mut filler = Filler::new(source, &mut stats, supervisor, config.copier_threads)?;
    let mut next_task = 0usize;
    let mut background_bytes = 0u64;
    let mut pollfds: Vec<libc::pollfd> = Vec::new();
    loop {
        if let Some(reason) = config.cancel.reason() {
            return Err(LazyError::Cancelled(reason));
        }
        for done in filler.copied() {
            // A task that went away meanwhile has nothing left to settle.
            if let Some(task) = tasks.iter_mut().find(|t| t.id == done.range.task) {
                filler.finish(task, done)?;
            }
        }
        let all_installed = filler.nothing_in_flight()
            && tasks
                .iter()
                .all(|t| t.pending.is_empty() && t.deferred_faults.is_empty());
        if fill_start.is_some() && all_installed {
            break;
        }
        let background_ready =
            filler.copier_room() > 0 && tasks.iter().any(|t| !t.pending.is_empty());
        // Block while the restore runs, when the background is done, throttled or every copier
        // is busy (a finished copy wakes the poll); otherwise poll without waiting so that
        // faults always go first.
        let wait_ms = match fill_start {
            None => 100,
            Some(_) if !background_ready => 100,
            Some(started) => match config.fill_rate {
                Some(rate) => {
                    let allowed = started.elapsed().as_secs_f64() * rate as f64;
                    if (background_bytes as f64) < allowed {
                        0
                    } else {
                        (((background_bytes as f64 - allowed) / rate as f64) * 1000.0).ceil() as i32
                    }
                }
                None => 0,
            },
        };
        pollfds.clear();
        pollfds.push(libc::pollfd {
            fd: if fill_start.is_none() {
                restorer.as_raw_fd()
            } else {
                -1
            },
            events: libc::POLLIN,
            revents: 0,
        });
        pollfds.push(libc::pollfd {
            fd: filler.copiers_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        pollfds.extend(tasks.iter().map(|t| libc::pollfd {
            fd: t.uffd.as_raw(),
            events: libc::POLLIN,
            revents: 0,
        }));
        // SAFETY: pollfds is a valid array of pollfd of the given length for the call.
        let ready =
            unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, wait_ms) };
        if ready < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err.into());
        }
        let task_events = pollfds[2..].iter().any(|p| p.revents != 0);
        if pollfds[0].revents != 0 {
            let mut raw = [0u8; 4];
            match restorer.read(&mut raw) {
                Ok(4) if u32::from_le_bytes(raw) == RESTORE_FINISHED => {
                    let now = Instant::now();
                    fill_start = Some(now);
                    events(ServerEvent::RestoreFinished {
                        after_seconds: now.duration_since(connected).as_secs_f64(),
                    });
                }
                Ok(0) => return Err(LazyError::RestoreAborted),
                Ok(n) => {
                    return Err(LazyError::Protocol(format!(
                        "expected the restore-finished marker {RESTORE_FINISHED:#x}, got {:02x?}",
                        &raw[..n]
                    )))
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
        }
        if task_events {
            let mut forks = Vec::new();
            for (i, pfd) in pollfds[2..].iter().enumerate() {
                if pfd.revents == 0 {
                    continue;
                }
                let task = &mut tasks[i];
                let messages = match task.uffd.read_events() {
                    Ok(m)
                        if pfd.revents & (libc::POLLERR | libc::POLLHUP) == 0 || !m.is_empty() =>
                    {
                        m
                    }
                    _ => {
                        // The address space is gone.
                        task.pending = PendingRanges::default();
                        task.gone = true;
                        continue;
                    }
                };
                for event in messages {
                    if let Some(child) = filler.handle_event(task, event)? {
                        forks.push(child);
                    }
                }
            }
            tasks.retain(|t| !t.gone);
            tasks.extend(forks);
        }
        for task in tasks.iter_mut() {
            filler.retry_deferred(task)?;
        }
        if ready > 0 || wait_ms > 0 || fill_start.is_none() {
            continue;
        }
        // No fault pending: one background chunk, round-robin over the tasks with work left.
        // A throttled fill moves in small chunks (a tenth of a second's worth) so it is smooth.
        let chunk_bytes = match config.fill_rate {
            Some(rate) => config
                .chunk_bytes
                .min((rate / 10) as usize)
                .max(crate::page::SIZE),
            None => config.chunk_bytes,
        };
        let candidates: Vec<usize> = (0..tasks.len())
            .filter(|&i| !tasks[i].pending.is_empty())
            .collect();
        let index = candidates[next_task % candidates.len()];
        next_task += 1;
        background_bytes += filler.background_chunk(&mut tasks[index], chunk_bytes)?;
    }
    let fill_start = fill_start.expect("the loop ends only after the restore finished");
    stats.fill_seconds = fill_start.elapsed().as_secs_f64();
    stats.fill_gb_per_s = if stats.fill_seconds > 0.0 {
        stats.bytes as f64 / stats.fill_seconds / 1e9
    } else {
        0.0
    };
    events(ServerEvent::Done(stats.clone()));
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::PE_PRESENT;
    use crate::staging::StagingStore;
    use crate::testsupport::UffdRegion;
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

    /// Plays CRIU's restorer against the real server: a region of this test process is
    /// registered with a userfaultfd and handed over as task 7; a thread faults on it before the
    /// end marker (as CRIU's restorer does), the background fills the rest from the staging store.
    #[test]
    fn serves_faults_and_fills_a_registered_region_from_the_staging_store() {
        fill_region(&[]);
    }

    /// mprotect splits a mapping after the dump (zdtm's maps04 pattern): a fill run that crosses
    /// the new boundaries makes UFFDIO_COPY fail with ENOENT although every page is mapped.
    /// Every page must still arrive (dropping the run left zero pages behind).
    #[test]
    fn pages_of_a_mapping_split_by_mprotect_are_all_installed() {
        fill_region(&[3, 64, 130, 131, 200, 255]);
    }

    /// Starts the server on `store` and returns once it listens.
    fn start_server(
        config: ServerConfig,
        mut store: StagingStore,
    ) -> std::thread::JoinHandle<Result<FillStats, LazyError>> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let server = std::thread::spawn(move || {
            serve(&config, &mut store, None, |event| {
                if matches!(event, ServerEvent::Ready { .. }) {
                    let _ = ready_tx.send(());
                }
            })
        });
        ready_rx.recv().unwrap();
        server
    }

    /// Plays the start of CRIU's restorer: task `pid`'s userfaultfd goes to the server (the
    /// test's copy is closed); the connection is returned for the end marker.
    fn hand_over(work: &std::path::Path, pid: i32, uffd: Uffd) -> UnixStream {
        let restorer = UnixStream::connect(work.join(SOCKET_NAME)).unwrap();
        std::io::Write::write_all(&mut &restorer, &pid.to_le_bytes()).unwrap();
        let byte = [0u8; 1];
        let iov = [io::IoSlice::new(&byte)];
        let fds = [uffd.as_raw()];
        sendmsg::<()>(
            restorer.as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        restorer
    }

    /// Images of task 7 with one lazy VMA over `region` (no data, as a lazy dump writes), and
    /// the work directory: (images, work).
    fn lazy_dump_of(region: &UffdRegion, dir: &std::path::Path) -> (PathBuf, PathBuf) {
        let images = dir.join("images");
        fs::create_dir(&images).unwrap();
        let pages = (region.len / crate::page::SIZE) as u64;
        crate::testsupport::write_lazy_images(&images, 7, region.base, pages);
        let work = dir.join("work");
        fs::create_dir(&work).unwrap();
        (images, work)
    }

    fn fill_region(prot_none: &[usize]) {
        // This process's memory gets a userfaultfd: no other test may fork meanwhile.
        let _no_forks = crate::testsupport::own_memory_uffd();
        const PAGES: usize = 256;
        let page = crate::page::SIZE;
        let mut region = UffdRegion::new(PAGES);
        let base = region.base;
        let protect = |i: usize, prot| {
            // SAFETY: changes the protection of one page of our own region.
            let rc = unsafe { libc::mprotect((base + (i * page) as u64) as *mut _, page, prot) };
            assert_eq!(rc, 0, "mprotect");
        };
        for &i in prot_none {
            protect(i, libc::PROT_NONE);
        }
        let dir = tempfile::tempdir().unwrap();
        let (images, work) = lazy_dump_of(&region, dir.path());

        // The staged memory: page i is filled with (i % 251) + 1; page 5 is a zero page.
        let mut store = StagingStore::default();
        for i in 0..PAGES {
            if i == 5 {
                store.put_zero(7, region.page(i), 1).unwrap();
            } else {
                store
                    .put(7, region.page(i), &vec![(i % 251) as u8 + 1; page])
                    .unwrap();
            }
        }
        let server = start_server(ServerConfig::new(images, work.clone()), store);

        // The restorer: pid, then the userfaultfd, then (after a fault) the end marker.
        let restorer = hand_over(&work, 7, region.uffd.take().unwrap());
        // A fault before the marker must be served (CRIU's restorer touches lazy memory).
        assert_eq!(region.read_u64(100) as u8, 101);
        std::io::Write::write_all(&mut &restorer, &RESTORE_FINISHED.to_le_bytes()).unwrap();

        let stats = server.join().unwrap().expect("the fill completes");
        assert_eq!(stats.bytes, (PAGES * page) as u64);
        assert!(stats.pages_by_fault >= 1);
        assert!(stats.zero_pages >= 1);
        for &i in prot_none {
            protect(i, libc::PROT_READ);
        }
        for i in 0..PAGES {
            let want = if i == 5 { 0 } else { (i % 251) as u8 + 1 };
            assert_eq!(region.read_u64(i) as u8, want, "page {i}");
        }
    }

    /// Threads read a 64 MiB region from both ends while the copiers fill it: faults land in
    /// pending ranges and in ranges being copied, and every page must hold its own content
    /// (its index), whoever installed it.
    #[test]
    fn faults_during_the_background_copies_find_their_own_pages() {
        let _no_forks = crate::testsupport::own_memory_uffd();
        const PAGES: usize = 16384;
        let mut region = UffdRegion::new(PAGES);
        let dir = tempfile::tempdir().unwrap();
        let (images, work) = lazy_dump_of(&region, dir.path());
        let mut store = StagingStore::default();
        let mut content = vec![0u8; crate::page::SIZE];
        for i in 0..PAGES {
            content[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
            store.put(7, region.page(i), &content).unwrap();
        }
        let mut config = ServerConfig::new(images, work.clone());
        config.copier_threads = 2;
        let server = start_server(config, store);
        let restorer = hand_over(&work, 7, region.uffd.take().unwrap());
        std::io::Write::write_all(&mut &restorer, &RESTORE_FINISHED.to_le_bytes()).unwrap();
        let region = std::sync::Arc::new(region);
        let readers = [true, false].map(|backwards| {
            let region = region.clone();
            std::thread::spawn(move || {
                let pages: Vec<usize> = if backwards {
                    (0..PAGES).rev().step_by(3).collect()
                } else {
                    (0..PAGES).step_by(37).collect()
                };
                for i in pages {
                    assert_eq!(region.read_u64(i), i as u64 + 1, "page {i}");
                }
            })
        });
        for reader in readers {
            reader
                .join()
                .expect("every page read holds its own content");
        }
        let stats = server.join().unwrap().expect("the fill completes");
        assert_eq!(stats.bytes, (PAGES * crate::page::SIZE) as u64);
        assert!(stats.pages_by_fault >= 1);
        for i in 0..PAGES {
            assert_eq!(region.read_u64(i), i as u64 + 1, "page {i}");
        }
    }

    #[test]
    fn lazy_ranges_are_cut_to_lazy_vmas() {
        use crate::images::{MmEntry, PageRange, Pagemap, VmaEntry};
        let vma = |start, end, flags| VmaEntry {
            start,
            end,
            pgoff: 0,
            shmid: 0,
            prot: 3,
            flags,
            status: 1,
            fd: -1,
            madv: None,
            fdflags: None,
        };
        let mm = MmEntry {
            vmas: vec![
                vma(0x10000, 0x20000, 0x22),
                vma(0x20000, 0x30000, 0x22),
                vma(0x30000, 0x40000, 0x01),
            ],
            ..Default::default()
        };
        let pagemap = Pagemap {
            pages_id: 1,
            ranges: vec![
                PageRange {
                    vaddr: 0x18000,
                    nr_pages: 16,
                    flags: PE_LAZY | PE_PRESENT,
                    file_offset: 0,
                },
                PageRange {
                    vaddr: 0x30000,
                    nr_pages: 1,
                    flags: PE_PRESENT,
                    file_offset: 0,
                },
            ],
        };
        assert_eq!(
            lazy_ranges(&pagemap, &mm),
            vec![(0x18000, 0x20000), (0x20000, 0x28000)]
        );
    }
}
