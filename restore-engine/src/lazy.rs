//! The lazy-pages server: CRIU's lazy-pages socket protocol on one side, userfaultfd on the
//! other. It installs every lazy page of a restored container from local memory (an image set
//! or the staging store): faults first, everything else in the background.
//!
//! Protocol (criu/uffd.c, CRIU 4.2): the server listens on `<work dir>/lazy-pages.socket`;
//! `criu restore --lazy-pages` connects once and sends, per restored process, its pid (the pid in
//! the container's namespace, 4 bytes) and then one byte carrying the process's userfaultfd
//! (SCM_RIGHTS); a zombie sends its negated pid and no descriptor. After all tasks it sends the
//! marker 0x52535446 and expects no reply. The restorer has already done UFFDIO_API (fork,
//! remap, remove and unmap events) and registers every lazy-eligible VMA in MISSING mode.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

use crate::images::{self, ImageError, PE_LAZY, PE_PRESENT};
use crate::staging::StagingStore;
use crate::uffd::{Installed, Stop, Uffd, UffdEvent};

pub const SOCKET_NAME: &str = "lazy-pages.socket";
/// "ReSTore Finished": sent by CRIU once every task is restored.
pub const RESTORE_FINISHED: u32 = 0x5253_5446;
/// Pages installed around a faulting address (read-ahead within the same lazy range).
const FAULT_AROUND_PAGES: usize = 16;

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
    Io(#[from] io::Error),
}

/// Where lazy pages come from.
pub trait PageSource {
    /// Up to `max_pages` consecutive pages of task `pid` at image address `vaddr`, as one
    /// contiguous slice (or a run of zero pages).
    fn chunk(&self, pid: u32, vaddr: u64, max_pages: usize) -> Option<Chunk<'_>>;
    /// Pages that were installed and are no longer needed.
    fn installed(&mut self, _pid: u32, _vaddr: u64, _pages: usize) {}
}

/// Contents of consecutive pages.
#[derive(Debug, PartialEq, Eq)]
pub enum Chunk<'a> {
    Data(&'a [u8]),
    Zero(usize),
}

impl Chunk<'_> {
    pub fn pages(&self, page_size: usize) -> usize {
        match self {
            Chunk::Data(d) => d.len() / page_size,
            Chunk::Zero(n) => *n,
        }
    }
}

impl PageSource for StagingStore {
    fn chunk(&self, pid: u32, vaddr: u64, max_pages: usize) -> Option<Chunk<'_>> {
        let run = self.run_at(pid, vaddr, max_pages)?;
        Some(match run.data {
            Some(bytes) => Chunk::Data(bytes),
            None => Chunk::Zero(run.pages),
        })
    }
    fn installed(&mut self, pid: u32, vaddr: u64, pages: usize) {
        self.release(pid, vaddr, pages);
    }
}

/// Copies the lazy pages of an image set into a staging store (for a restore whose images are
/// not to be read while it runs, and the path migration takes: pages arrive in the store).
pub fn stage_images(dir: &Path, store: &mut StagingStore) -> Result<u64, LazyError> {
    let source = ImageSource::open(dir)?;
    let page_size = source.page_size;
    let mut bytes = 0u64;
    for (&pid, task) in &source.tasks {
        for range in task
            .ranges
            .iter()
            .filter(|r| r.is(PE_LAZY) && r.is(PE_PRESENT))
        {
            let len = range.nr_pages * page_size;
            let from = range.file_offset as usize;
            let data = task
                .pages
                .as_deref()
                .and_then(|p| p.get(from..from + len as usize))
                .ok_or(LazyError::MissingPage {
                    pid,
                    vaddr: range.vaddr,
                })?;
            store.put(pid, range.vaddr, data).map_err(|e| {
                LazyError::Protocol(format!("staging task {pid} at {:#x}: {e}", range.vaddr))
            })?;
            bytes += len;
        }
    }
    Ok(bytes)
}

/// Lazy pages read straight from an image set's page files (mapped, so installing is one copy
/// from the page cache).
pub struct ImageSource {
    page_size: u64,
    tasks: HashMap<u32, ImageTask>,
}

struct ImageTask {
    ranges: Vec<images::PageRange>,
    pages: Option<memmap2::Mmap>,
}

impl ImageSource {
    /// Maps the pages of every task in `pstree.img`.
    pub fn open(dir: &Path) -> Result<Self, LazyError> {
        let page_size = images::page_size();
        let mut tasks = HashMap::new();
        for task in images::read_pstree(dir)? {
            let pagemap = match images::read_pagemap(dir, task.pid, page_size) {
                Ok(p) => p,
                // Zombies have no pagemap.
                Err(ImageError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                    continue
                }
                Err(e) => return Err(e.into()),
            };
            let path = dir.join(format!("pages-{}.img", pagemap.pages_id));
            let pages = match fs::File::open(&path) {
                Ok(file) => {
                    let len = file.metadata()?.len();
                    if len < pagemap.present_bytes(page_size) {
                        return Err(ImageError::Corrupt {
                            file: path,
                            offset: len,
                            problem: format!(
                                "truncated: the pagemap needs {} bytes",
                                pagemap.present_bytes(page_size)
                            ),
                        }
                        .into());
                    }
                    (len > 0)
                        .then(|| {
                            // SAFETY: image files are not modified while the server reads them.
                            unsafe { memmap2::Mmap::map(&file) }
                        })
                        .transpose()?
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(e.into()),
            };
            tasks.insert(
                task.pid,
                ImageTask {
                    ranges: pagemap.ranges,
                    pages,
                },
            );
        }
        Ok(ImageSource { page_size, tasks })
    }
}

impl PageSource for ImageSource {
    fn chunk(&self, pid: u32, vaddr: u64, max_pages: usize) -> Option<Chunk<'_>> {
        let task = self.tasks.get(&pid)?;
        let index = task
            .ranges
            .partition_point(|r| r.end(self.page_size) <= vaddr);
        let range = task.ranges.get(index).filter(|r| r.vaddr <= vaddr)?;
        if !range.is(PE_PRESENT) {
            return None;
        }
        let pages = ((range.end(self.page_size) - vaddr) / self.page_size).min(max_pages as u64);
        let from = (range.file_offset + vaddr - range.vaddr) as usize;
        let bytes = task
            .pages
            .as_deref()?
            .get(from..from + (pages * self.page_size) as usize)?;
        Some(Chunk::Data(bytes))
    }
}

/// A lazy range still to install: `[start, end)` in the task now, read from `img_start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pending {
    end: u64,
    img_start: u64,
}

/// Ranges still to install for one address space, keyed by start.
#[derive(Debug, Default, Clone)]
struct PendingRanges(BTreeMap<u64, Pending>);

impl PendingRanges {
    fn insert(&mut self, start: u64, end: u64, img_start: u64) {
        if start < end {
            self.0.insert(start, Pending { end, img_start });
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn bytes(&self) -> u64 {
        self.0.iter().map(|(s, p)| p.end - s).sum()
    }

    /// The pending range containing `addr`.
    fn find(&self, addr: u64) -> Option<(u64, Pending)> {
        let (&start, &p) = self.0.range(..=addr).next_back()?;
        (addr < p.end).then_some((start, p))
    }

    /// Removes `[start, end)` from the pending ranges, splitting as needed.
    fn remove(&mut self, start: u64, end: u64) {
        let overlapping: Vec<(u64, Pending)> = self
            .0
            .range(..end)
            .filter(|(s, p)| **s < end && p.end > start)
            .map(|(s, p)| (*s, *p))
            .collect();
        for (s, p) in overlapping {
            self.0.remove(&s);
            if s < start {
                self.insert(s, start, p.img_start);
            }
            if p.end > end {
                self.insert(end, p.end, p.img_start + (end - s));
            }
        }
    }

    /// Moves pending pieces inside `[from, from + len)` to `to` (mremap in the task); the data
    /// still comes from the original image addresses.
    fn remap(&mut self, from: u64, to: u64, len: u64) {
        let end = from + len;
        let inside: Vec<(u64, Pending)> = self
            .0
            .range(..end)
            .filter(|(s, p)| **s < end && p.end > from)
            .map(|(s, p)| (*s, *p))
            .collect();
        self.remove(from, end);
        for (s, p) in inside {
            let piece_start = s.max(from);
            let piece_end = p.end.min(end);
            let img = p.img_start + (piece_start - s);
            self.insert(piece_start - from + to, piece_end - from + to, img);
        }
    }

    fn first(&self) -> Option<(u64, Pending)> {
        self.0.iter().next().map(|(s, p)| (*s, *p))
    }
}

/// Computes a task's lazy ranges: pagemap entries marked PE_LAZY, cut to the task's
/// lazy-eligible VMAs (UFFDIO_COPY cannot cross a VMA).
pub fn lazy_ranges(
    pagemap: &images::Pagemap,
    mm: &images::MmEntry,
    page_size: u64,
) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for r in pagemap.ranges.iter().filter(|r| r.is(PE_LAZY)) {
        let (start, end) = (r.vaddr, r.end(page_size));
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

/// One restored address space.
struct Task {
    /// Whose image pages to read (a forked child reads its parent's).
    source_pid: u32,
    uffd: Uffd,
    pending: PendingRanges,
    /// Faults that could not be served yet (the address space was changing): their threads
    /// wait, so they are retried before anything else.
    deferred_faults: Vec<u64>,
    /// Its userfaultfd reported an error or hang-up: stop polling it.
    gone: bool,
}

/// Progress reported by the server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum LazyEvent {
    /// Listening: start the restore now.
    Ready { socket: String, lazy_bytes: u64 },
    /// A restored task handed over its userfaultfd.
    Task { pid: u32, lazy_bytes: u64 },
    /// CRIU finished the restore: the tasks run now.
    RestoreFinished { after_seconds: f64 },
    /// Every lazy page is installed.
    Done(FillStats),
    /// The server failed; the container must be stopped.
    Error { message: String },
    /// Migration: listening for the source on this address.
    Listening { address: String },
    /// Migration: a pre-copy round arrived (`last`: the source's frozen round).
    RoundReceived {
        round: u32,
        pages: u64,
        bytes: u64,
        staged_bytes: u64,
        last: bool,
    },
    /// Migration: every round and image file arrived; restore now (the lazy-pages socket
    /// follows with `Ready`).
    ImagesReady {
        rounds: u32,
        staged_bytes: u64,
        image_bytes: u64,
    },
    /// Eager migration: the images are complete (every page in them); restore them now, then
    /// write the [`crate::destination::RestoreOutcome`] to the server's stdin.
    Assembled(crate::assemble::AssembleReport),
    /// Eager migration: the source was told that the tasks run here and to commit.
    Committed,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FillStats {
    pub tasks: usize,
    /// Address spaces created by fork while the fill ran (each followed by the server).
    pub forks: u64,
    /// mremap, MADV_DONTNEED/REMOVE and munmap events seen while the fill ran.
    pub remaps: u64,
    pub removes: u64,
    pub unmaps: u64,
    pub pages_by_fault: u64,
    pub pages_in_background: u64,
    pub zero_pages: u64,
    pub bytes: u64,
    /// From the end of the restore to the last installed page.
    pub fill_seconds: f64,
    pub fill_gb_per_s: f64,
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub images: PathBuf,
    /// The CRIU work directory of the restore (`runc restore --work-path`): the socket lives here.
    pub work_dir: PathBuf,
    /// Background chunk size in bytes.
    pub chunk_bytes: usize,
    /// Background fill limit in bytes per second (faults are never limited).
    pub fill_rate: Option<u64>,
    /// How long to wait for CRIU to connect.
    pub connect_timeout: Duration,
}

impl ServerConfig {
    pub fn new(images: PathBuf, work_dir: PathBuf) -> Self {
        ServerConfig {
            images,
            work_dir,
            chunk_bytes: 4 << 20,
            fill_rate: None,
            connect_timeout: Duration::from_secs(120),
        }
    }
}

/// Binds `<dir>/lazy-pages.socket`. Through /proc/self/fd when the path is longer than a unix
/// socket address allows.
pub fn listen(dir: &Path) -> Result<UnixListener, LazyError> {
    let path = dir.join(SOCKET_NAME);
    let _ = fs::remove_file(&path);
    let listen_err = |source| LazyError::Listen {
        path: path.clone(),
        source,
    };
    if path.as_os_str().len() < 100 {
        return UnixListener::bind(&path).map_err(listen_err);
    }
    let dir_fd = fs::File::open(dir).map_err(listen_err)?;
    let short = format!("/proc/self/fd/{}/{SOCKET_NAME}", dir_fd.as_raw_fd());
    UnixListener::bind(short).map_err(listen_err)
}

fn read_exact_or_eof(stream: &mut UnixStream, buf: &mut [u8]) -> io::Result<bool> {
    let mut done = 0;
    while done < buf.len() {
        match stream.read(&mut buf[done..]) {
            Ok(0) if done == 0 => return Ok(false),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "truncated message",
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Receives one message of `data.len()` bytes and the first descriptor it carries (any further
/// descriptors are closed). Returns the bytes received and the descriptor.
fn receive_with_fd(stream: &UnixStream, data: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut iov = [io::IoSliceMut::new(data)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut fd = None;
    for cmsg in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for raw in fds {
                // SAFETY: the kernel installed this descriptor for us; nobody else owns it.
                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                fd.get_or_insert(owned);
            }
        }
    }
    Ok((msg.bytes, fd))
}

fn receive_fd(stream: &UnixStream) -> Result<OwnedFd, LazyError> {
    let mut byte = [0u8; 1];
    let (_, fd) = receive_with_fd(stream, &mut byte)
        .map_err(|e| LazyError::Protocol(format!("receiving a userfaultfd: {e}")))?;
    fd.ok_or_else(|| LazyError::Protocol("a task record carried no userfaultfd".into()))
}

/// Sends `pid` and a descriptor to the supervisor, which keeps a copy so that the memory of the
/// restored tasks is never zero-filled even if this server dies.
pub fn send_to_supervisor(supervisor: &UnixStream, pid: u32, fd: RawFd) -> Result<(), LazyError> {
    let data = pid.to_le_bytes();
    let iov = [io::IoSlice::new(&data)];
    let fds = [fd];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    sendmsg::<()>(supervisor.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
        .map(drop)
        .map_err(|e| LazyError::Supervisor(e.to_string()))
}

/// Receives what [`send_to_supervisor`] sent: `None` at end of stream.
pub fn receive_from_server(stream: &UnixStream) -> io::Result<Option<(u32, OwnedFd)>> {
    let mut data = [0u8; 4];
    let (bytes, fd) = receive_with_fd(stream, &mut data)?;
    if bytes == 0 {
        return Ok(None);
    }
    let pid = u32::from_le_bytes(data);
    fd.map(|f| Some((pid, f)))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "message without descriptor"))
}

/// Serves one lazy restore. `events` receives progress; `supervisor`, if any, gets a copy of
/// every userfaultfd.
pub fn serve<S: PageSource>(
    config: &ServerConfig,
    source: &mut S,
    supervisor: Option<&UnixStream>,
    mut events: impl FnMut(LazyEvent),
) -> Result<FillStats, LazyError> {
    let page_size = images::page_size();
    let pstree = images::read_pstree(&config.images)?;
    // Lazy ranges per image pid, from the pagemaps and VMAs.
    let mut ranges_by_pid: HashMap<u32, Vec<(u64, u64)>> = HashMap::new();
    let mut lazy_total = 0u64;
    for task in &pstree {
        let pagemap = match images::read_pagemap(&config.images, task.pid, page_size) {
            Ok(p) => p,
            Err(ImageError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                continue
            }
            Err(e) => return Err(e.into()),
        };
        let mm = images::read_mm(&config.images, task.pid)?;
        let ranges = lazy_ranges(&pagemap, &mm, page_size);
        lazy_total += ranges.iter().map(|(s, e)| e - s).sum::<u64>();
        ranges_by_pid.insert(task.pid, ranges);
    }

    let listener = listen(&config.work_dir)?;
    events(LazyEvent::Ready {
        socket: config.work_dir.join(SOCKET_NAME).display().to_string(),
        lazy_bytes: lazy_total,
    });
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + config.connect_timeout;
    let mut restorer = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
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
        if !read_exact_or_eof(&mut restorer, &mut raw)? {
            return Err(LazyError::RestoreAborted);
        }
        let pid = i32::from_le_bytes(raw);
        if pid <= 0 {
            continue; // a zombie: no memory
        }
        let pid = pid as u32;
        let fd = receive_fd(&restorer)?;
        if let Some(supervisor) = supervisor {
            send_to_supervisor(supervisor, pid, fd.as_raw_fd())?;
        }
        let mut pending = PendingRanges::default();
        for &(s, e) in ranges_by_pid.get(&pid).map(Vec::as_slice).unwrap_or(&[]) {
            pending.insert(s, e, s);
        }
        events(LazyEvent::Task {
            pid,
            lazy_bytes: pending.bytes(),
        });
        tasks.push(Task {
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
    let mut filler = Filler {
        source,
        page_size: page_size as usize,
        stats: &mut stats,
        supervisor,
        shared: Default::default(),
    };
    let mut next_task = 0usize;
    let mut background_bytes = 0u64;
    let mut pollfds: Vec<libc::pollfd> = Vec::new();
    loop {
        let all_installed = tasks
            .iter()
            .all(|t| t.pending.is_empty() && t.deferred_faults.is_empty());
        if fill_start.is_some() && all_installed {
            break;
        }
        // Block while the restore runs or when the background is done or throttled; otherwise
        // poll without waiting so that faults always go first.
        let wait_ms = match fill_start {
            None => 100,
            Some(_) if all_installed => 100,
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
        if ready > 0 {
            if pollfds[0].revents != 0 {
                let mut raw = [0u8; 4];
                match restorer.read(&mut raw) {
                    Ok(4) if u32::from_le_bytes(raw) == RESTORE_FINISHED => {
                        let now = Instant::now();
                        fill_start = Some(now);
                        events(LazyEvent::RestoreFinished {
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
            let mut forks = Vec::new();
            for (i, pfd) in pollfds[1..].iter().enumerate() {
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
            for task in tasks.iter_mut() {
                filler.retry_deferred(task)?;
            }
            continue;
        }
        for task in tasks.iter_mut() {
            filler.retry_deferred(task)?;
        }
        if wait_ms > 0 || fill_start.is_none() {
            continue;
        }
        // No fault pending: one background chunk, round-robin over the tasks with work left.
        // A throttled fill moves in small chunks (a tenth of a second's worth) so it is smooth.
        let chunk_bytes = match config.fill_rate {
            Some(rate) => config
                .chunk_bytes
                .min((rate / 10) as usize)
                .max(page_size as usize),
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
    events(LazyEvent::Done(stats.clone()));
    Ok(stats)
}

struct Filler<'a, S: PageSource> {
    source: &'a mut S,
    page_size: usize,
    stats: &'a mut FillStats,
    supervisor: Option<&'a UnixStream>,
    /// Image pids whose pages more than one address space reads (a restored task forked while
    /// the fill ran): their pages stay in the source until the end, since installing a page in
    /// one address space does not install it in the other.
    shared: std::collections::HashSet<u32>,
}

impl<S: PageSource> Filler<'_, S> {
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
        let room = ((pending.end - addr) as usize / self.page_size).min(max_pages);
        let chunk =
            self.source
                .chunk(task.source_pid, img_addr, room)
                .ok_or(LazyError::MissingPage {
                    pid: task.source_pid,
                    vaddr: img_addr,
                })?;
        let pages = chunk.pages(self.page_size).min(room);
        let len = (pages * self.page_size) as u64;
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
        let done_pages = bytes as usize / self.page_size;
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
            Some(Stop::Unmapped) => {
                task.pending.remove(addr + bytes, addr + len);
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
            let installed = task
                .uffd
                .zero(page, self.page_size as u64)
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
                        let _ = task.uffd.wake(page, self.page_size as u64);
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
    fn retry_deferred(&mut self, task: &mut Task) -> Result<(), LazyError> {
        for page in std::mem::take(&mut task.deferred_faults) {
            self.serve_fault(task, page)?;
        }
        Ok(())
    }

    fn background_chunk(&mut self, task: &mut Task, chunk_bytes: usize) -> Result<u64, LazyError> {
        let Some((start, _)) = task.pending.first() else {
            return Ok(0);
        };
        let (pages, _busy) = self.install(task, start, (chunk_bytes / self.page_size).max(1))?;
        self.stats.pages_in_background += pages as u64;
        Ok((pages * self.page_size) as u64)
    }

    fn handle_event(
        &mut self,
        task: &mut Task,
        event: UffdEvent,
    ) -> Result<Option<Task>, LazyError> {
        match event {
            UffdEvent::PageFault { address, .. } => {
                let page = address & !(self.page_size as u64 - 1);
                self.serve_fault(task, page)?;
                Ok(None)
            }
            UffdEvent::Fork { child_uffd } => {
                // SAFETY: the kernel installed this descriptor in our table for the event.
                let uffd = unsafe { Uffd::from_raw(child_uffd) };
                if let Some(supervisor) = self.supervisor {
                    send_to_supervisor(supervisor, task.source_pid, uffd.as_raw())?;
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
                let mut range = crate::uffd::UffdioRange {
                    start,
                    len: end - start,
                };
                // SAFETY: valid uffd and uffdio_range for the call; failure means the range is
                // gone already, which is what we want.
                let _ = unsafe { uffdio_unregister(task.uffd.as_raw(), &mut range) };
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

/// `lazy-pages-server` command line: run by the shim as a child process (so that a crash of the
/// server cannot take the shim down, and the shim can stop the container if the server dies).
///
/// ```text
/// lazy-pages-server --images DIR --work-dir DIR [--supervisor-fd N] [--fill-rate-mib N]
///                   [--chunk-kib N] [--page-source images|staging]
///                   [--receive ADDR (--key-file FILE | --insecure) [--eager]]
/// ```
///
/// With `--receive` it first receives a migration on ADDR (rounds into the staging store, the
/// image files into `--images`), then serves the restore from the staging store and tells the
/// source to commit. With `--eager` as well it serves no pages: it completes the images from the
/// staging store (event `assembled`), frees the store, and waits for one JSON line on stdin
/// ([`crate::destination::RestoreOutcome`]) saying how the restore went; then it tells the source
/// to commit (event `committed`) or to abort. End of stdin counts as a failed restore.
///
/// `images` (default) installs pages straight from the mapped image files; `staging` first
/// copies them into the staging store (RAM), as a migration's pages arrive.
///
/// Progress goes to stdout as JSON lines ([`LazyEvent`]). Exit code 0 once every page is
/// installed, 1 on failure, 2 on a usage error.
pub fn server_main(args: &[String]) -> i32 {
    let usage = "usage: lazy-pages-server --images DIR --work-dir DIR [--supervisor-fd N] [--fill-rate-mib N] [--chunk-kib N] [--page-source images|staging] [--receive ADDR (--key-file FILE | --insecure) [--eager]]";
    let mut images = None;
    let mut work_dir = None;
    let mut supervisor_fd = None;
    let mut fill_rate_mib = None;
    let mut chunk_kib = None;
    let mut staging = false;
    let mut receive: Option<String> = None;
    let mut key_file: Option<PathBuf> = None;
    let mut insecure = false;
    let mut eager = false;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--insecure" {
            insecure = true;
            continue;
        }
        if flag == "--eager" {
            eager = true;
            continue;
        }
        let Some(value) = it.next() else {
            eprintln!("{usage}");
            return 2;
        };
        match flag.as_str() {
            "--receive" => receive = Some(value.clone()),
            "--key-file" => key_file = Some(PathBuf::from(value)),
            "--images" => images = Some(PathBuf::from(value)),
            "--work-dir" => work_dir = Some(PathBuf::from(value)),
            "--supervisor-fd" => supervisor_fd = value.parse::<RawFd>().ok(),
            "--fill-rate-mib" => fill_rate_mib = value.parse::<u64>().ok(),
            "--chunk-kib" => chunk_kib = value.parse::<usize>().ok(),
            "--page-source" if value == "images" => staging = false,
            "--page-source" if value == "staging" => staging = true,
            _ => {
                eprintln!("{usage}");
                return 2;
            }
        }
    }
    let (Some(images), Some(work_dir)) = (images, work_dir) else {
        eprintln!("{usage}");
        return 2;
    };
    if eager && receive.is_none() {
        eprintln!("--eager restores a received migration: it needs --receive\n{usage}");
        return 2;
    }
    let mut config = ServerConfig::new(images.clone(), work_dir);
    config.fill_rate = fill_rate_mib.map(|m| m << 20);
    if let Some(kib) = chunk_kib {
        config.chunk_bytes = (kib << 10).max(4096);
    }
    // SAFETY: the shim passes this descriptor to us and nothing else in this process owns it.
    let supervisor = supervisor_fd.map(|fd| unsafe { UnixStream::from_raw_fd(fd) });
    let emit = |event: LazyEvent| {
        if let Ok(line) = serde_json::to_string(&event) {
            use std::io::Write;
            let mut out = io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    };
    if let Some(address) = receive {
        let auth = match (key_file, insecure) {
            (Some(path), false) => match crate::wire::read_key_file(&path) {
                Ok(key) => crate::wire::Auth::Key(key),
                Err(message) => {
                    emit(LazyEvent::Error { message });
                    return 1;
                }
            },
            (None, true) => crate::wire::Auth::Insecure,
            _ => {
                eprintln!("--receive needs exactly one of --key-file FILE and --insecure");
                return 2;
            }
        };
        let received = std::net::TcpListener::bind(&address)
            .map_err(|e| format!("cannot listen on {address}: {e}"))
            .and_then(|listener| {
                emit(LazyEvent::Listening {
                    address: listener
                        .local_addr()
                        .map(|a| a.to_string())
                        .unwrap_or(address.clone()),
                });
                let (stream, _) = listener
                    .accept()
                    .map_err(|e| format!("accepting the source: {e}"))?;
                crate::wire::harden_tcp(&stream)
                    .map_err(|e| format!("setting up the connection: {e}"))?;
                crate::wire::accept(stream, &auth).map_err(|e| e.to_string())
            })
            .and_then(|mut session| {
                let received = if eager {
                    crate::destination::receive_and_restore_eagerly(
                        &mut session,
                        &images,
                        emit,
                        read_restore_outcome,
                    )
                    .map(|_| emit(LazyEvent::Committed))
                } else {
                    crate::destination::receive_and_serve(
                        &mut session,
                        &config,
                        supervisor.as_ref(),
                        emit,
                    )
                    .map(drop)
                };
                received.map_err(|e| e.to_string())
            });
        return match received {
            Ok(_) => 0,
            Err(message) => {
                emit(LazyEvent::Error { message });
                1
            }
        };
    }
    let result = if staging {
        let mut store = StagingStore::default();
        stage_images(&images, &mut store)
            .and_then(|_| serve(&config, &mut store, supervisor.as_ref(), emit))
    } else {
        ImageSource::open(&images)
            .and_then(|mut source| serve(&config, &mut source, supervisor.as_ref(), emit))
    };
    match result {
        Ok(_) => 0,
        Err(e) => {
            emit(LazyEvent::Error {
                message: e.to_string(),
            });
            1
        }
    }
}

/// Reads how the shim's eager restore went: one JSON line on stdin.
fn read_restore_outcome() -> crate::destination::RestoreOutcome {
    use crate::destination::RestoreOutcome;
    let mut line = String::new();
    match io::stdin().read_line(&mut line) {
        Ok(0) => RestoreOutcome::Failed {
            reason: "the shim went away before the restore ended".into(),
        },
        Ok(_) => serde_json::from_str(&line).unwrap_or_else(|e| RestoreOutcome::Failed {
            reason: format!(
                "the shim's restore outcome {:?} is not understood: {e}",
                line.trim()
            ),
        }),
        Err(e) => RestoreOutcome::Failed {
            reason: format!("reading the restore outcome from the shim: {e}"),
        },
    }
}

nix::ioctl_read!(uffdio_unregister, 0xAA, 0x01, crate::uffd::UffdioRange);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_ranges_split_on_remove() {
        let mut p = PendingRanges::default();
        p.insert(0x1000, 0x9000, 0x1000);
        p.remove(0x3000, 0x5000);
        assert_eq!(
            p.find(0x2000),
            Some((
                0x1000,
                Pending {
                    end: 0x3000,
                    img_start: 0x1000
                }
            ))
        );
        assert_eq!(p.find(0x3000), None);
        assert_eq!(
            p.find(0x8000),
            Some((
                0x5000,
                Pending {
                    end: 0x9000,
                    img_start: 0x5000
                }
            ))
        );
        assert_eq!(p.bytes(), 0x6000);
    }

    #[test]
    fn remap_moves_pending_pieces_and_keeps_image_addresses() {
        let mut p = PendingRanges::default();
        p.insert(0x10000, 0x14000, 0x10000);
        p.remap(0x12000, 0x80000, 0x4000);
        assert_eq!(
            p.find(0x10000).map(|(s, e)| (s, e.end, e.img_start)),
            Some((0x10000, 0x12000, 0x10000))
        );
        assert_eq!(
            p.find(0x81000).map(|(s, e)| (s, e.end, e.img_start)),
            Some((0x80000, 0x82000, 0x12000))
        );
        assert_eq!(p.find(0x13000), None);
    }

    /// Plays CRIU's restorer against the real server: a region of this test process is
    /// registered with a userfaultfd and handed over as task 7; a thread faults on it before the
    /// end marker (as CRIU's restorer does), the background fills the rest from the staging store.
    #[test]
    fn serves_faults_and_fills_a_registered_region_from_the_staging_store() {
        use std::sync::mpsc;

        const PAGES: usize = 256;
        let page = images::page_size() as usize;
        // SAFETY: a fresh private anonymous mapping of our own.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGES * page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        } as u64;
        assert_ne!(base as *mut libc::c_void, libc::MAP_FAILED);
        let uffd = crate::uffd::open_like_criu().expect("userfaultfd");
        uffd.register_missing(base, (PAGES * page) as u64).unwrap();

        // Images: task 7 with one lazy VMA over the region, no data (as a lazy dump writes).
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        fs::create_dir(&images).unwrap();
        crate::testsupport::write_lazy_images(&images, 7, base, PAGES as u64);

        // The staged memory: page i is filled with (i % 251) + 1; page 5 is a zero page.
        let mut store = StagingStore::default();
        for i in 0..PAGES {
            let addr = base + (i * page) as u64;
            if i == 5 {
                store.put_zero(7, addr, 1).unwrap();
            } else {
                store
                    .put(7, addr, &vec![(i % 251) as u8 + 1; page])
                    .unwrap();
            }
        }

        let work = dir.path().join("work");
        fs::create_dir(&work).unwrap();
        let config = ServerConfig::new(images.clone(), work.clone());
        let (ready_tx, ready_rx) = mpsc::channel();
        let server = std::thread::spawn(move || {
            serve(&config, &mut store, None, |event| {
                if matches!(event, LazyEvent::Ready { .. }) {
                    let _ = ready_tx.send(());
                }
            })
        });
        ready_rx.recv().unwrap();

        // The restorer: pid, then the userfaultfd, then (after a fault) the end marker.
        let restorer = UnixStream::connect(work.join(SOCKET_NAME)).unwrap();
        let mut writer = &restorer;
        std::io::Write::write_all(&mut writer, &7i32.to_le_bytes()).unwrap();
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
        drop(uffd);
        // A fault before the marker must be served (CRIU's restorer touches lazy memory).
        // SAFETY: reads a page of our own registered region; the server installs it.
        let early = unsafe { std::ptr::read_volatile((base + 100 * page as u64) as *const u8) };
        assert_eq!(early, 101);
        std::io::Write::write_all(&mut writer, &RESTORE_FINISHED.to_le_bytes()).unwrap();

        let stats = server.join().unwrap().expect("the fill completes");
        assert_eq!(stats.bytes, (PAGES * page) as u64);
        assert!(stats.pages_by_fault >= 1);
        assert!(stats.zero_pages >= 1);
        for i in 0..PAGES {
            let want = if i == 5 { 0 } else { (i % 251) as u8 + 1 };
            // SAFETY: every page of the region is installed now.
            let got =
                unsafe { std::ptr::read_volatile((base + (i * page) as u64 + 17) as *const u8) };
            assert_eq!(got, want, "page {i}");
        }
        // SAFETY: unmaps our own region.
        unsafe { libc::munmap(base as *mut libc::c_void, PAGES * page) };
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
            lazy_ranges(&pagemap, &mm, 4096),
            vec![(0x18000, 0x20000), (0x20000, 0x28000)]
        );
    }
}
