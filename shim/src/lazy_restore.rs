//! Lazy restore from the shim's side: starts the engine's lazy-pages server as a child process,
//! runs the restore against it, and supervises it until every page is installed.
//!
//! Supervision is what makes lazy restore safe. The server passes the shim a copy of every
//! userfaultfd it receives. If the server dies before the fill is complete, those copies keep
//! the userfaultfds open, so the restored tasks' faults stay blocked instead of being satisfied
//! with zero-filled pages; the shim then kills the container and says why. Only when the server
//! reports that every page is installed does the shim drop its copies.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use containerd_shim::monitor::{monitor_subscribe, Subject, Subscription, Topic};
use log::{error, info, warn};
use restore_engine::events::{FillStats, ServerEvent, ShimMessage};
use restore_engine::lazy;
use serde::Serialize;

use crate::receive::{self, ReceiveHandle, ReceiveSpec, ServerLine};
use crate::runc::Runc;

/// The subcommand of the shim binary that runs the lazy-pages server.
pub const SERVER_SUBCOMMAND: &str = "lazy-pages-server";
/// Name of the report the shim writes into the CRIU work directory when the fill ends.
pub const REPORT_FILE: &str = "pclive-lazy-restore.json";
/// The server's stderr, in the CRIU work directory.
pub(crate) const SERVER_LOG: &str = "lazy-pages-server.log";
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// A receiving server waits for the source's whole pre-copy.
pub(crate) const RECEIVE_TIMEOUT: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum LazyRestoreError {
    #[error("cannot start the lazy-pages server: {0}")]
    Spawn(String),
    #[error("the lazy-pages server failed before the restore: {0}")]
    NotReady(String),
}

/// Options of a lazy restore.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LazyOptions {
    /// Background fill limit in MiB/s (faults are always served at once).
    pub fill_rate_mib: Option<u64>,
    /// Threads that copy the background fill (None: the server's default, one).
    pub copier_threads: Option<u16>,
    /// Copy the pages into the engine's staging store before the restore, instead of installing
    /// them from the mapped image files.
    pub stage_in_memory: bool,
    /// Receive a migration first (rounds into the staging store, the images into the image
    /// directory), then restore from it.
    pub receive: Option<ReceiveSpec>,
}

/// What the shim records about a lazy restore (written as JSON next to CRIU's logs).
#[derive(Debug, Clone, Serialize)]
pub struct LazyReport {
    pub container: String,
    pub status: &'static str,
    pub reason: Option<String>,
    /// Server ready → CRIU's restore finished (tasks resumed).
    pub restore_seconds: Option<f64>,
    pub fill: Option<FillStats>,
}

/// Whether the restored container lives (Err: how it died).
pub type Liveness = Box<dyn Fn() -> Result<(), String> + Send>;

/// What the supervisor needs to stop the container if the fill fails, and to tell whether it
/// is alive when the fill completes.
struct Target {
    id: String,
    runc: Runc,
    alive: Liveness,
}

/// A running lazy-pages server, ready for the restore to connect, and supervised from the start:
/// if it dies at any point before every page is installed, the restored tasks are killed
/// (during the restore: every process the restore created; afterwards: the container).
pub struct LazyServer {
    pid: i32,
    target: Arc<Mutex<Option<Target>>>,
    watcher: Option<thread::JoinHandle<()>>,
    /// Receiving a migration: the shim's line to the server.
    line: Option<ServerLine>,
}

struct Watch {
    pid: i32,
    events: Receiver<ServerEvent>,
    supervisor: UnixStream,
    exit: Subscription,
    work_dir: PathBuf,
    ready_at: Instant,
    target: Arc<Mutex<Option<Target>>>,
    /// Receiving a migration: where, its id, and the line to the server.
    receive: Option<(ReceiveSpec, Option<String>, ServerLine)>,
}

impl LazyServer {
    /// Starts the server for `images`, listening in `work_dir` (the restore's CRIU work dir), and
    /// waits until it listens.
    pub fn start(
        images: &Path,
        work_dir: &Path,
        options: &LazyOptions,
        handle: &ReceiveHandle,
    ) -> Result<Self, LazyRestoreError> {
        let (ours, theirs) =
            UnixStream::pair().map_err(|e| LazyRestoreError::Spawn(format!("socketpair: {e}")))?;
        let mut command = server_command(images, work_dir).map_err(LazyRestoreError::Spawn)?;
        command.args(["--supervisor-fd", "3"]);
        // A receiving server hears from the shim on its stdin (the restore's outcome, the
        // container's verdict); its end tells the server that the shim went away.
        command.stdin(if options.receive.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        if let Some(rate) = options.fill_rate_mib {
            command.args(["--fill-rate-mib", &rate.to_string()]);
        }
        if let Some(threads) = options.copier_threads {
            command.args(["--copier-threads", &threads.to_string()]);
        }
        if options.stage_in_memory {
            command.args(["--page-source", "staging"]);
        }
        if let Some(receive) = &options.receive {
            receive::add_receive_args(&mut command, receive);
        }
        let theirs_fd = theirs.as_raw_fd();
        // SAFETY: dup2 and close_range are async-signal-safe; they only rearrange the child's
        // descriptors (fd 3 becomes the supervisor socket, nothing else of the shim leaks).
        unsafe {
            command.pre_exec(move || {
                if libc::dup2(theirs_fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32);
                Ok(())
            });
        }
        // Subscribe before spawning so the exit cannot be missed.
        let exit = monitor_subscribe(Topic::Pid)
            .map_err(|e| LazyRestoreError::Spawn(format!("exit monitor: {e}")))?;
        let mut child = command
            .spawn()
            .map_err(|e| LazyRestoreError::Spawn(e.to_string()))?;
        drop(theirs);
        let pid = child.id() as i32;
        let stdout = child.stdout.take().expect("stdout is piped");
        let line = options
            .receive
            .as_ref()
            .map(|_| ServerLine::new(child.stdin.take()));
        if let Some(line) = &line {
            handle.attach(line.clone());
        }
        // The reaper collects the exit; the Child handle is not waited on.
        drop(child);
        let progress = options
            .receive
            .as_ref()
            .and_then(|r| r.progress_file.clone());
        let events =
            forward_events(stdout, progress).map_err(|e| LazyRestoreError::Spawn(e.to_string()))?;

        // A receiving server is ready only once the whole pre-copy and the images arrived.
        let ready_timeout = if options.receive.is_some() {
            RECEIVE_TIMEOUT
        } else {
            READY_TIMEOUT
        };
        let deadline = Instant::now() + ready_timeout;
        let mut migration_id: Option<String> = None;
        let mut concluded = false;
        let not_ready = |reason: String, concluded: bool, migration_id: Option<&str>| {
            // A receiving server that concluded (recorded the outcome and told the source) goes
            // on answering the source's questions and exits by itself; any other is stopped.
            if !concluded {
                kill(pid);
                let _ = wait_exit(&exit, pid, Duration::from_secs(10));
                if let Some(spec) = &options.receive {
                    receive::server_died(spec, migration_id, &reason);
                }
            }
            LazyRestoreError::NotReady(reason)
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match events.recv_timeout(left) {
                Ok(ServerEvent::Ready { lazy_bytes, .. }) => {
                    info!(
                        "lazy-pages server {pid} ready: {:.1} MiB to install lazily",
                        lazy_bytes as f64 / (1 << 20) as f64
                    );
                    break;
                }
                Ok(ServerEvent::Listening { address }) => {
                    info!("receiving a migration on {address}")
                }
                Ok(ServerEvent::SourceArrived {
                    migration_id: id,
                    container,
                    peer,
                    page_streams,
                }) => {
                    info!(
                        "migration {id} of {container} from {peer}: receiving{}",
                        restore_engine::source::streams::describe(page_streams)
                    );
                    migration_id = Some(id);
                }
                Ok(ServerEvent::Refused { peer, reason }) => {
                    warn!("refused a connection from {peer}: {reason}; still waiting for the source")
                }
                Ok(ServerEvent::Concluded { phase, reason }) => {
                    concluded = true;
                    info!("migration concluded here: {phase} ({})", reason.unwrap_or_default());
                }
                Ok(ServerEvent::RoundReceived {
                    round,
                    bytes,
                    resident_bytes,
                    cpu_seconds,
                    last,
                    ..
                }) => info!(
                    "round {round}{} received: {:.1} MiB ({:.1} MiB resident in the staging store, {cpu_seconds:.3} CPU-s)",
                    if last { " (the source is paused)" } else { "" },
                    bytes as f64 / (1 << 20) as f64,
                    resident_bytes as f64 / (1 << 20) as f64
                ),
                Ok(ServerEvent::ImagesReady {
                    rounds,
                    received_bytes,
                    resident_bytes,
                    image_bytes,
                }) => info!(
                    "migration received: {rounds} rounds, {:.1} MiB of pages received, {:.1} MiB resident, {:.1} KiB of images; restoring",
                    received_bytes as f64 / (1 << 20) as f64,
                    resident_bytes as f64 / (1 << 20) as f64,
                    image_bytes as f64 / 1024.0
                ),
                Ok(ServerEvent::Error { message }) => {
                    return Err(not_ready(message, concluded, migration_id.as_deref()))
                }
                Ok(other) => {
                    return Err(not_ready(
                        format!("unexpected {other:?}"),
                        concluded,
                        migration_id.as_deref(),
                    ))
                }
                Err(_) => {
                    let log = fs::read_to_string(work_dir.join(SERVER_LOG))
                        .unwrap_or_default();
                    return Err(not_ready(
                        format!("not ready within {ready_timeout:?}. {}", log.trim()),
                        concluded,
                        migration_id.as_deref(),
                    ));
                }
            }
        }

        let target = Arc::new(Mutex::new(None));
        let watch = Watch {
            pid,
            events,
            supervisor: ours,
            exit,
            work_dir: work_dir.to_owned(),
            ready_at: Instant::now(),
            target: Arc::clone(&target),
            receive: options
                .receive
                .clone()
                .map(|spec| (spec, migration_id, line.clone().unwrap_or_default())),
        };
        let watcher = thread::Builder::new()
            .name("lazy-supervisor".into())
            .spawn(move || watch.run())
            .map_err(|e| LazyRestoreError::Spawn(e.to_string()))?;
        Ok(LazyServer {
            pid,
            target,
            watcher: Some(watcher),
            line,
        })
    }

    /// The restore failed (`reason`): a receiving server is told so (it records the outcome
    /// and tells the source), any other is stopped; nothing depends on it any more.
    pub fn abort(mut self, reason: &str) {
        match &self.line {
            Some(line)
                if line
                    .tell(&ShimMessage::RestoreFailed {
                        reason: reason.into(),
                    })
                    .is_ok() =>
            {
                // The supervisor ends once the server concluded; a server that does not is
                // stopped.
                let watcher = self.watcher.take();
                let (tx, rx) = mpsc::channel();
                thread::spawn(move || {
                    if let Some(w) = watcher {
                        let _ = w.join();
                    }
                    let _ = tx.send(());
                });
                if rx.recv_timeout(Duration::from_secs(30)).is_err() {
                    kill(self.pid);
                }
            }
            _ => {
                kill(self.pid);
                if let Some(watcher) = self.watcher.take() {
                    let _ = watcher.join();
                }
            }
        }
    }

    /// The restore succeeded: from now on a failure of the fill kills container `id`, and
    /// `alive` tells whether it lives when every page is installed.
    pub fn restored(self, id: String, runc: Runc, alive: Liveness) {
        *self.target.lock().unwrap_or_else(|p| p.into_inner()) = Some(Target { id, runc, alive });
    }
}

/// The engine's server as a child process of the shim (`<shim> lazy-pages-server --images DIR
/// --work-dir DIR`), its stdout piped for events and its stderr logged in the work directory.
pub(crate) fn server_command(images: &Path, work_dir: &Path) -> Result<Command, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the shim binary: {e}"))?;
    let log = fs::File::create(work_dir.join(SERVER_LOG))
        .map_err(|e| format!("server log {}: {e}", work_dir.join(SERVER_LOG).display()))?;
    let mut command = Command::new(exe);
    command
        .arg(SERVER_SUBCOMMAND)
        .arg("--images")
        .arg(images)
        .arg("--work-dir")
        .arg(work_dir)
        .stdout(Stdio::piped())
        .stderr(log);
    Ok(command)
}

/// Parses the server's stdout (JSON lines) into events on a thread of its own; the channel
/// closes when the server's stdout does. Each line is also appended to `progress`, if given.
pub(crate) fn forward_events(
    stdout: ChildStdout,
    progress: Option<PathBuf>,
) -> std::io::Result<Receiver<ServerEvent>> {
    let (tx, events) = mpsc::channel();
    // Named by an annotation (checked against the host's settings at Create): created 0600,
    // never through a symbolic link.
    let mut progress = progress.and_then(|path| {
        crate::nofollow::open_append(&path)
            .map_err(|e| warn!("progress file {}: {e}; going on without it", path.display()))
            .ok()
    });
    thread::Builder::new()
        .name("server-events".into())
        .spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(file) = progress.as_mut() {
                    use std::io::Write as _;
                    let _ = writeln!(file, "{line}");
                }
                match serde_json::from_str::<ServerEvent>(&line) {
                    Ok(event) => {
                        if tx.send(event).is_err() {
                            break;
                        }
                    }
                    Err(e) => warn!("lazy-pages server said something unexpected ({e}): {line}"),
                }
            }
        })?;
    Ok(events)
}

pub(crate) fn kill(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// SIGKILLs every descendant of this shim except `spare`: during a restore these are runc, CRIU
/// and the tasks being restored (blocked in faults nobody will serve).
fn kill_descendants(spare: i32) {
    let me = std::process::id() as i32;
    let Ok(entries) = fs::read_dir("/proc") else {
        return;
    };
    let parents: Vec<(i32, i32)> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            Some((pid, restore_engine::procfs::stat_ppid(&stat)?))
        })
        .collect();
    let mut family = vec![me];
    let mut i = 0;
    while i < family.len() {
        let parent = family[i];
        family.extend(
            parents
                .iter()
                .filter(|(_, ppid)| *ppid == parent)
                .map(|(pid, _)| *pid),
        );
        i += 1;
    }
    for pid in family.into_iter().skip(1).filter(|p| *p != spare) {
        kill(pid);
    }
}

impl Watch {
    /// Whether the restored container lives, once the restore returned (it may return a little
    /// after the fill of a small container completed).
    fn verdict(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(target) = self
                .target
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
            {
                return (target.alive)();
            }
            if Instant::now() > deadline {
                return Err("the restore did not complete".into());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn run(self) {
        let held: Arc<Mutex<Vec<OwnedFd>>> = Arc::new(Mutex::new(Vec::new()));
        let receiver = {
            let held = Arc::clone(&held);
            let stream = self
                .supervisor
                .try_clone()
                .expect("clone of the supervisor socket");
            thread::spawn(move || {
                while let Ok(Some((_pid, fd))) = lazy::socket::receive_from_server(&stream) {
                    held.lock().unwrap_or_else(|p| p.into_inner()).push(fd);
                }
            })
        };
        let label = || {
            self.target
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(|t| t.id.clone())
                .unwrap_or_else(|| "restore".into())
        };
        let mut restore_seconds = None;
        let mut outcome: Result<FillStats, String> =
            Err("the lazy-pages server exited before installing every page".into());
        let mut stats = None;
        let mut concluded = false;
        loop {
            match self.events.recv_timeout(Duration::from_secs(1)) {
                Ok(ServerEvent::FillComplete(fill)) => {
                    let verdict = self.verdict();
                    match &verdict {
                        Ok(()) => info!(
                            "{}: every page is installed and the container lives",
                            label()
                        ),
                        Err(why) => warn!("{}: every page is installed but {why}", label()),
                    }
                    let message = match verdict {
                        Ok(()) => ShimMessage::Alive,
                        Err(reason) => ShimMessage::Died { reason },
                    };
                    if let Some((_, _, line)) = &self.receive {
                        if let Err(e) = line.tell(&message) {
                            warn!("{}: {e}", label());
                        }
                    }
                    stats = Some(fill);
                }
                Ok(ServerEvent::Concluded { phase, reason }) => {
                    concluded = true;
                    outcome = match (phase.as_str(), stats.take()) {
                        ("committed", Some(fill)) => Ok(fill),
                        ("committed", None) => Err("committed without a fill report".into()),
                        (_, _) => {
                            Err(reason.unwrap_or_else(|| format!("the migration is {phase}")))
                        }
                    };
                    // The server may go on answering the source's questions for a while: the
                    // restore's outcome does not wait for that.
                    break;
                }
                Ok(ServerEvent::RestoreFinished { .. }) => {
                    let seconds = self.ready_at.elapsed().as_secs_f64();
                    restore_seconds = Some(seconds);
                    info!(
                        "{}: lazy restore: tasks resume {seconds:.3}s after the server was ready",
                        label()
                    );
                }
                Ok(ServerEvent::Task { pid, lazy_bytes }) => info!(
                    "{}: task {pid} handed over its userfaultfd ({:.1} MiB lazy)",
                    label(),
                    lazy_bytes as f64 / (1 << 20) as f64
                ),
                Ok(ServerEvent::Done(fill)) => {
                    if self.receive.is_none() {
                        outcome = Ok(fill);
                    }
                }
                Ok(ServerEvent::Error { message }) => outcome = Err(message),
                Ok(ServerEvent::Ready { .. })
                | Ok(ServerEvent::Listening { .. })
                | Ok(ServerEvent::SourceArrived { .. })
                | Ok(ServerEvent::Refused { .. })
                | Ok(ServerEvent::RoundReceived { .. })
                | Ok(ServerEvent::ImagesReady { .. })
                | Ok(ServerEvent::Assembled(_))
                | Ok(ServerEvent::Committed) => {}
                Err(RecvTimeoutError::Timeout) => continue,
                // stdout closed: the server is exiting.
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        let code = if concluded {
            // A concluded receiving server exits when the source has the outcome.
            Some(0)
        } else {
            wait_exit(&self.exit, self.pid, Duration::from_secs(30))
        };
        let id = label();
        let report = match (outcome, code) {
            (Ok(stats), Some(0)) => {
                info!(
                    "{id}: lazy restore complete: {} pages by fault, {} in background, {} zero, {:.1} MiB in {:.3}s ({:.2} GB/s)",
                    stats.pages_by_fault,
                    stats.pages_in_background,
                    stats.zero_pages,
                    stats.bytes as f64 / (1 << 20) as f64,
                    stats.fill_seconds,
                    stats.fill_gb_per_s
                );
                LazyReport {
                    container: id,
                    status: "done",
                    reason: None,
                    restore_seconds,
                    fill: Some(stats),
                }
            }
            (outcome, code) => {
                let mut reason = match outcome {
                    Err(message) => message,
                    Ok(_) => format!("the lazy-pages server exited with {code:?}"),
                };
                if let Some(signal) = code.filter(|c| *c > 128).map(|c| c - 128) {
                    reason = format!("{reason} (the server was killed by signal {signal})");
                }
                let criu_errors = crate::runc::criu_log_errors(&self.work_dir.join("restore.log"));
                if !criu_errors.is_empty() {
                    reason = format!("{reason}\nCRIU's restore.log says:\n  {criu_errors}");
                }
                error!(
                    "{id}: lazy restore failed: {reason}. Killing the container: its memory is incomplete and it must not run on zero-filled pages"
                );
                let target = self.target.lock().unwrap_or_else(|p| p.into_inner()).take();
                match target {
                    Some(Target { id, runc, .. }) => {
                        if let Err(e) = runc.kill(&id, libc::SIGKILL as u32, true) {
                            error!("{id}: runc kill: {e}");
                        }
                        kill_descendants(self.pid);
                    }
                    // Still restoring: the tasks hang in faults; kill them, CRIU and runc, and
                    // remove what a killed CRIU leaves mounted in its work directory.
                    None => {
                        kill_descendants(self.pid);
                        thread::sleep(Duration::from_millis(200));
                        unmount_below(&self.work_dir);
                    }
                }
                if let Some(ns) = self
                    .receive
                    .as_ref()
                    .and_then(|(spec, ..)| spec.address_netns.as_ref())
                {
                    give_back_address(&id, ns);
                }
                if let (false, Some((spec, migration_id, _))) = (concluded, &self.receive) {
                    // The server died before it could tell the source: the shim does.
                    receive::server_died(spec, migration_id.as_deref(), &reason);
                }
                LazyReport {
                    container: id,
                    status: "failed",
                    reason: Some(reason),
                    restore_seconds,
                    fill: None,
                }
            }
        };
        // Only now may the userfaultfds close: every page is installed, or the tasks are dead.
        drop(self.supervisor);
        let _ = receiver.join();
        held.lock().unwrap_or_else(|p| p.into_inner()).clear();
        if let Ok(json) = serde_json::to_vec_pretty(&report) {
            let _ = fs::write(self.work_dir.join(REPORT_FILE), json);
        }
    }
}

/// A receiving container that took the source's address failed: its interfaces go down, so
/// that the address is free for the source to take back (`pclive resolve --resume-source`)
/// instead of two hosts answering for it. Lock rules CRIU's action script left in the namespace
/// stay: the namespace belongs to the network plugin, which removes it with the pod.
fn give_back_address(id: &str, ns: &Path) {
    let taken_down = crate::netns::link_names(ns)
        .and_then(|names| crate::netns::set_links(ns, &names, false).map(|()| names));
    match taken_down {
        Ok(names) => warn!(
            "{id}: interface(s) {} of {} are down again: the address is free for the source to take back",
            names.join(", "),
            ns.display()
        ),
        Err(e) => error!(
            "{id}: cannot take the interfaces of {} down: {e}; take them down by hand before the source resumes, or two hosts answer for one address",
            ns.display()
        ),
    }
}

/// Detaches every mount below `dir` (CRIU's cgroup yard, left behind when CRIU is killed).
pub fn unmount_below(dir: &Path) {
    let Ok(mounts) = fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    let mut below: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| Path::new(m).starts_with(dir) && Path::new(m) != dir)
        .collect();
    below.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in below {
        if let Err(e) = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH) {
            warn!("cannot unmount {m}: {e}");
        }
    }
}

/// Waits for `pid`'s exit code from the reaper's monitor.
pub(crate) fn wait_exit(subscription: &Subscription, pid: i32, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match subscription.rx.recv_timeout(left) {
            Ok(event) if matches!(event.subject, Subject::Pid(p) if p == pid) => {
                return Some(event.exit_code)
            }
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}
