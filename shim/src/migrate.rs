//! Migration, source side: pre-copy rounds while the container runs, then pause, the last round,
//! a final CRIU dump without the (already sent) lazy memory, the image files, and commit or roll
//! back. The container stays paused (frozen) from the last round until the destination commits;
//! any failure before that resumes it, so nothing is lost.

use std::cell::Cell;
use std::fs;
use std::io::{self, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use log::{info, warn};
use restore_engine::memory;
use restore_engine::precopy::{self, MigrateRequest, PrecopyError, SourceReport, TaskIds};
use restore_engine::wire::{self, Auth, Control, ControlCode, Kind, WireError};
use serde::Serialize;

use crate::runc::{CheckpointOpts, CriuOpts, Runc, RuncError};

/// How long the destination may take to restore and install every page before the source
/// gives up and resumes.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(600);
/// CRIU's page-server command that ends a lazy dump's serving session.
const PS_IOV_CLOSE: u32 = 0x1023;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("migration request: {0}")]
    Request(String),
    #[error("cannot reach the destination {address}: {source}. Is the receiving container started and listening there?")]
    Connect {
        address: String,
        #[source]
        source: io::Error,
    },
    #[error("session with the destination: {0}")]
    Session(#[from] WireError),
    #[error("pre-copy: {0}")]
    Precopy(#[from] PrecopyError),
    #[error(transparent)]
    Track(#[from] memory::TrackError),
    #[error("final dump: {0}")]
    Dump(#[from] RuncError),
    #[error("final dump: {0}")]
    DumpServer(String),
    #[error("the destination aborted: {0}. The container keeps running here")]
    Aborted(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

/// What a migration did, written as JSON next to the final dump's logs.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationReport {
    pub container: String,
    pub destination: String,
    pub precopy: SourceReport,
    /// Pause → last round sent.
    pub last_round_seconds: f64,
    pub final_dump_seconds: f64,
    pub image_bytes: u64,
    pub images_seconds: f64,
    /// Images sent → the destination committed (restore and every page installed).
    pub commit_wait_seconds: f64,
    /// Pause → the tasks run on the destination (reported by it): the service's downtime.
    pub downtime_seconds: f64,
    /// Pause → commit: how long the source stayed frozen, ready to resume if anything failed
    /// (includes the destination's background fill, while the service already runs there).
    pub frozen_until_commit_seconds: f64,
    /// Unix times of the steps, to line them up with what clients of the service saw.
    pub started_unix: f64,
    pub paused_unix: f64,
    /// The image files were on the destination: its restore could start.
    pub images_sent_unix: f64,
    /// The destination reported its tasks running (None if it never did before committing).
    pub restored_unix: Option<f64>,
    pub committed_unix: f64,
}

/// Host pid → pid in the container's namespace (the last NSpid field).
pub fn namespace_pid(host_pid: i32) -> Result<u32, MigrateError> {
    let status = fs::read_to_string(format!("/proc/{host_pid}/status")).map_err(|source| {
        MigrateError::Io {
            what: format!("reading /proc/{host_pid}/status"),
            source,
        }
    })?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|pids| pids.split_whitespace().last())
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| MigrateError::Request(format!("no NSpid for pid {host_pid}")))
}

fn auth_of(request: &MigrateRequest) -> Result<Auth, MigrateError> {
    match (request.key_file.is_empty(), request.insecure) {
        (false, false) => Ok(Auth::Key(
            wire::read_key_file(Path::new(&request.key_file)).map_err(MigrateError::Request)?,
        )),
        (true, true) => Ok(Auth::Insecure),
        (true, false) => Err(MigrateError::Request(
            "no key file: pass --key-file (or --insecure to migrate unauthenticated)".into(),
        )),
        (false, true) => Err(MigrateError::Request(
            "a key file and --insecure together: choose one".into(),
        )),
    }
}

/// A CRIU dump of the paused container that leaves the lazy memory out (the destination has it
/// from the rounds): `runc checkpoint --lazy-pages` makes CRIU serve those pages after writing
/// the images; closing its page server at once ends the dump, the container still paused.
fn lazy_final_dump(
    runc: &Runc,
    id: &str,
    image_dir: &Path,
    work_dir: &Path,
) -> Result<(), MigrateError> {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|source| MigrateError::Io {
            what: "choosing a port for CRIU's page server".into(),
            source,
        })?
        .port();
    let opts = CheckpointOpts {
        criu: CriuOpts {
            image_path: image_dir.to_owned(),
            work_path: Some(work_dir.to_owned()),
            tcp_established: true,
            ext_unix_sk: true,
            file_locks: true,
            lazy_pages: true,
            ..Default::default()
        },
        leave_running: true,
        parent_path: None,
        status_fd: None,
        page_server: Some(format!("127.0.0.1:{port}")),
        // A server under load has clients connecting while it is paused: their connections
        // wait in the listen queue, and CRIU would refuse to dump them. They are dropped (the
        // clients see a reset and reconnect to the destination) instead of failing the move.
        tcp_skip_in_flight: true,
    };
    let runc = runc.clone();
    let id = id.to_owned();
    let dump = thread::spawn(move || runc.checkpoint(&id, &opts));
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut stream = loop {
        if dump.is_finished() {
            return match dump.join() {
                Ok(Ok(())) => Err(MigrateError::DumpServer(
                    "CRIU finished without serving pages".into(),
                )),
                Ok(Err(e)) => Err(e.into()),
                Err(_) => Err(MigrateError::DumpServer("the dump thread panicked".into())),
            };
        }
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
            Err(source) => {
                return Err(MigrateError::Io {
                    what: "connecting to CRIU's page server".into(),
                    source,
                })
            }
        }
    };
    // struct page_server_iov { u32 cmd; (pad); u64 nr_pages; u64 vaddr; u64 dst_id; }
    let mut close = [0u8; 32];
    close[..4].copy_from_slice(&PS_IOV_CLOSE.to_le_bytes());
    // No waiting for CRIU's 4-byte acknowledgement: its page server corks the socket, so the
    // reply sits up to 200 ms in the kernel (measured: 0.2 s of every migration's downtime).
    // Whether the dump ended well is what runc's exit status says.
    stream
        .write_all(&close)
        .map_err(|source| MigrateError::Io {
            what: "closing CRIU's page server".into(),
            source,
        })?;
    drop(stream);
    match dump.join() {
        Ok(result) => Ok(result?),
        Err(_) => Err(MigrateError::DumpServer("the dump thread panicked".into())),
    }
}

/// Migrates container `id` (its processes `host_pids`) to `request.destination`. `work_dir`
/// holds the final dump and its logs. On success the caller kills the (paused) source; on
/// error it has been resumed already.
pub fn migrate_out(
    runc: &Runc,
    id: &str,
    host_pids: &[i32],
    request: &MigrateRequest,
    work_dir: &Path,
) -> Result<MigrationReport, MigrateError> {
    let auth = auth_of(request)?;
    let address = request
        .destination
        .to_socket_addrs()
        .map_err(|source| MigrateError::Connect {
            address: request.destination.clone(),
            source,
        })?
        .next()
        .ok_or_else(|| {
            MigrateError::Request(format!("{} resolves to nothing", request.destination))
        })?;
    let stream =
        TcpStream::connect_timeout(&address, Duration::from_secs(10)).map_err(|source| {
            MigrateError::Connect {
                address: request.destination.clone(),
                source,
            }
        })?;
    wire::harden_tcp(&stream).map_err(|source| MigrateError::Io {
        what: "setting up the connection to the destination".into(),
        source,
    })?;
    let _ = stream.set_read_timeout(Some(COMMIT_TIMEOUT));
    let mut session = wire::connect(stream, &auth)?;
    let mut tracker =
        memory::tracker((!request.tracker.is_empty()).then_some(request.tracker.as_str()))?;
    info!(
        "{id}: migrating {} process(es) to {} with the {} tracker",
        host_pids.len(),
        request.destination,
        tracker.name()
    );
    // The container's processes, taken anew each round; one that exits meanwhile is skipped.
    let list_tasks = || -> Result<Vec<TaskIds>, PrecopyError> {
        let pids = runc
            .ps(id)
            .map_err(|e| PrecopyError::Freeze(format!("listing the container's processes: {e}")))?;
        Ok(pids
            .into_iter()
            .filter_map(|pid| {
                namespace_pid(pid).ok().map(|ns_pid| TaskIds {
                    host_pid: pid as u32,
                    ns_pid,
                })
            })
            .collect())
    };

    let started_unix = precopy::unix_now();
    let paused_at = Cell::new(None::<Instant>);
    let paused_unix = Cell::new(0.0f64);
    let image_dir = work_dir.join("images");
    let result = (|| -> Result<MigrationReport, MigrateError> {
        fs::create_dir_all(&image_dir).map_err(|source| MigrateError::Io {
            what: format!("creating {}", image_dir.display()),
            source,
        })?;
        let precopy = precopy::Sender::new(&mut session)
            .compress(request.compress)
            .run(
                list_tasks,
                tracker.as_mut(),
                &request.policy(),
                || {
                    runc.pause(id).map_err(|e| e.to_string())?;
                    paused_at.set(Some(Instant::now()));
                    paused_unix.set(precopy::unix_now());
                    Ok(())
                },
                |round| {
                    // Progress for `pclive migrate`, which follows this file while it waits.
                    if let Ok(line) = serde_json::to_string(round) {
                        use std::io::Write as _;
                        if let Ok(mut f) = fs::OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(progress_path(work_dir))
                        {
                            let _ = writeln!(f, "{line}");
                        }
                    }
                    info!(
                        "{id}: round {}: {} pages ({:.1} MiB), {} zero, {:.3}s{}",
                        round.round,
                        round.pages,
                        round.bytes as f64 / (1 << 20) as f64,
                        round.zero_pages,
                        round.seconds,
                        if round.frozen { " (frozen)" } else { "" }
                    )
                },
            )?;
        let paused = paused_at.get().expect("the last round follows the pause");
        let last_round_seconds = paused.elapsed().as_secs_f64();
        let dump_start = Instant::now();
        lazy_final_dump(runc, id, &image_dir, work_dir)?;
        let final_dump_seconds = dump_start.elapsed().as_secs_f64();
        let images_start = Instant::now();
        let image_bytes = precopy::send_images(&mut session, &image_dir)?;
        let images_seconds = images_start.elapsed().as_secs_f64();
        let images_sent_unix = precopy::unix_now();
        let commit_start = Instant::now();
        let mut resumed_after = None;
        let mut restored_unix = None;
        let answer: Control = loop {
            let answer: Control = session.expect(Kind::Control).map_err(|e| match e {
                WireError::Closed | WireError::Truncated => MigrateError::Aborted(
                    "the destination closed the connection before committing: its restore failed \
                     (see the destination's containerd log)"
                        .into(),
                ),
                other => other.into(),
            })?;
            if answer.code == ControlCode::Progress as i32
                && answer.message == restore_engine::destination::RESTORED
            {
                resumed_after = Some(paused.elapsed().as_secs_f64());
                restored_unix = Some(precopy::unix_now());
                continue;
            }
            break answer;
        };
        match ControlCode::try_from(answer.code) {
            Ok(ControlCode::Committed) => Ok(MigrationReport {
                container: id.into(),
                destination: request.destination.clone(),
                precopy,
                last_round_seconds,
                final_dump_seconds,
                image_bytes,
                images_seconds,
                commit_wait_seconds: commit_start.elapsed().as_secs_f64(),
                // Until the tasks ran on the destination (as seen from here: an upper bound).
                downtime_seconds: resumed_after.unwrap_or_else(|| paused.elapsed().as_secs_f64()),
                frozen_until_commit_seconds: paused.elapsed().as_secs_f64(),
                started_unix,
                paused_unix: paused_unix.get(),
                images_sent_unix,
                restored_unix,
                committed_unix: precopy::unix_now(),
            }),
            _ => Err(MigrateError::Aborted(answer.message)),
        }
    })();
    if let Err(e) = &result {
        if paused_at.get().is_some() {
            warn!("{id}: migration failed ({e}); resuming the container here");
            if let Err(resume) = runc.resume(id) {
                warn!("{id}: could not resume after the failed migration: {resume}");
            }
        }
    }
    result
}

/// Where the rounds of a running migration are appended (JSON lines).
pub fn progress_path(work_dir: &Path) -> PathBuf {
    work_dir.join("pclive-migration.progress")
}

/// Where the report of a migration goes.
pub fn report_path(work_dir: &Path) -> PathBuf {
    work_dir.join("pclive-migration.json")
}
