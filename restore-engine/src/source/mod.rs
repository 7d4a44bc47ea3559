//! The sending end of a migration: pre-copy rounds while the container runs, the freeze, the last
//! round, the final dump's image files, then waiting for the destination to report its tasks
//! running ("restored") and every page installed ("committed"). Any failure before the commit
//! thaws the container here.
//!
//! The engine does not know runc: the shim supplies the container's processes, the freeze, the
//! final CRIU dump and the thaw as [`SourceHooks`].
//!
//! - [`rounds`]: the pre-copy rounds ([`Sender`]),
//! - this file: the conversation with the destination ([`migrate`]) and the image files.

pub mod rounds;

use std::fs;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

pub use rounds::{unix_now, RoundStats, Sender, SourceReport, TaskIds};

use crate::memory::{self, TrackError};
use crate::policy::ConvergencePolicy;
use crate::wire::{self, Auth, Control, ControlCode, ImageFile, Kind, Session, WireError};

/// How long the destination may take to restore and install every page before the source
/// gives up and resumes.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long connecting to the destination may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// An error a hook reports (the shim's runc and CRIU errors, with their own messages).
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot reach the destination {address}: {source}. Is the receiving container started and listening there?")]
    Connect {
        address: String,
        #[source]
        source: io::Error,
    },
    #[error("{0} resolves to no address")]
    NoAddress(String),
    #[error("session with the destination: {0}")]
    Session(#[from] WireError),
    #[error(transparent)]
    Track(#[from] TrackError),
    #[error("listing the container's processes: {0}")]
    Tasks(#[source] HookError),
    #[error("freezing the container failed: {0}")]
    Freeze(#[source] HookError),
    #[error("final dump: {0}")]
    Dump(#[source] HookError),
    #[error("image file {name}: {source}")]
    ImageFile {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("the destination aborted: {0}. The container keeps running here")]
    Aborted(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

/// What the sending end needs to know about a migration.
#[derive(Clone)]
pub struct MigrateParams {
    /// The container's name, for logs and the report.
    pub container: String,
    /// The receiving end, host:port.
    pub destination: String,
    pub auth: Auth,
    pub policy: ConvergencePolicy,
    /// A dirty tracker by name (`content-hash`, `soft-dirty`); `None`: the best available.
    pub tracker: Option<String>,
    /// LZ4-compress page runs where that pays.
    pub compress: bool,
    /// Where the final dump's images go (`<work dir>/images`) and its logs stay.
    pub work_dir: PathBuf,
}

impl MigrateParams {
    pub fn image_dir(&self) -> PathBuf {
        self.work_dir.join("images")
    }
}

/// What the engine asks of the container runtime (the shim, over runc and CRIU).
pub trait SourceHooks {
    /// The container's processes now (taken anew each round: they come and go).
    fn tasks(&mut self) -> Result<Vec<TaskIds>, HookError>;
    /// Freezes every process of the container.
    fn freeze(&mut self) -> Result<(), HookError>;
    /// CRIU's final dump of the frozen container into `image_dir`, without the lazy memory
    /// (the destination has it from the rounds); the container stays frozen.
    fn final_dump(&mut self, image_dir: &Path) -> Result<(), HookError>;
    /// Thaws the container: the migration failed and it goes on running here.
    fn resume(&mut self) -> Result<(), HookError>;
    /// A round ended (progress).
    fn round_done(&mut self, _round: &RoundStats) {}
}

/// What a migration did (the shim writes it as JSON next to the final dump's logs).
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

/// Connects to the receiving end and authenticates the session.
pub fn connect(destination: &str, auth: &Auth) -> Result<Session<TcpStream>, SourceError> {
    let connect_err = |source| SourceError::Connect {
        address: destination.to_string(),
        source,
    };
    let address = destination
        .to_socket_addrs()
        .map_err(connect_err)?
        .next()
        .ok_or_else(|| SourceError::NoAddress(destination.to_string()))?;
    let stream = TcpStream::connect_timeout(&address, CONNECT_TIMEOUT).map_err(connect_err)?;
    wire::harden_tcp(&stream).map_err(|source| SourceError::Io {
        what: "setting up the connection to the destination".into(),
        source,
    })?;
    let _ = stream.set_read_timeout(Some(COMMIT_TIMEOUT));
    Ok(wire::connect(stream, auth)?)
}

/// Migrates the container to `params.destination`. On success the container is still frozen
/// here and the destination runs it: the caller removes this copy. On error it has been thawed
/// (if it was frozen at all).
pub fn migrate(
    params: &MigrateParams,
    hooks: &mut dyn SourceHooks,
) -> Result<MigrationReport, SourceError> {
    let session = connect(&params.destination, &params.auth)?;
    migrate_over(session, params, hooks)
}

/// [`migrate`] over an established session.
pub fn migrate_over<S: Read + Write>(
    mut session: Session<S>,
    params: &MigrateParams,
    hooks: &mut dyn SourceHooks,
) -> Result<MigrationReport, SourceError> {
    let mut tracker = memory::tracker(params.tracker.as_deref())?;
    log::info!(
        "{}: pre-copy to {} with the {} tracker",
        params.container,
        params.destination,
        tracker.name()
    );
    let started_unix = unix_now();
    let mut paused: Option<(Instant, f64)> = None;
    let result = (|| -> Result<MigrationReport, SourceError> {
        let image_dir = params.image_dir();
        fs::create_dir_all(&image_dir).map_err(|source| SourceError::Io {
            what: format!("creating {}", image_dir.display()),
            source,
        })?;
        // The hooks are used by the rounds (tasks, progress) and by the freeze: a cell lets
        // both closures borrow them.
        let hooks_cell = std::cell::RefCell::new(&mut *hooks);
        let precopy = Sender::new(&mut session).compress(params.compress).run(
            || hooks_cell.borrow_mut().tasks().map_err(SourceError::Tasks),
            tracker.as_mut(),
            &params.policy,
            || {
                hooks_cell
                    .borrow_mut()
                    .freeze()
                    .map_err(SourceError::Freeze)?;
                paused = Some((Instant::now(), unix_now()));
                Ok(())
            },
            |round| hooks_cell.borrow_mut().round_done(round),
        )?;
        let (paused_at, paused_unix) = paused.expect("the last round follows the freeze");
        let last_round_seconds = paused_at.elapsed().as_secs_f64();
        let dump_start = Instant::now();
        hooks.final_dump(&image_dir).map_err(SourceError::Dump)?;
        let final_dump_seconds = dump_start.elapsed().as_secs_f64();
        let images_start = Instant::now();
        let image_bytes = send_images(&mut session, &image_dir)?;
        let images_seconds = images_start.elapsed().as_secs_f64();
        let images_sent_unix = unix_now();
        let commit_start = Instant::now();
        let mut resumed_after = None;
        let mut restored_unix = None;
        let answer: Control = loop {
            let answer: Control = session.expect(Kind::Control).map_err(|e| match e {
                WireError::Closed | WireError::Truncated => SourceError::Aborted(
                    "the destination closed the connection before committing: its restore failed \
                     (see the destination's containerd log)"
                        .into(),
                ),
                other => other.into(),
            })?;
            if answer.code == ControlCode::Progress as i32 && answer.message == wire::RESTORED {
                resumed_after = Some(paused_at.elapsed().as_secs_f64());
                restored_unix = Some(unix_now());
                continue;
            }
            break answer;
        };
        match ControlCode::try_from(answer.code) {
            Ok(ControlCode::Committed) => Ok(MigrationReport {
                container: params.container.clone(),
                destination: params.destination.clone(),
                precopy,
                last_round_seconds,
                final_dump_seconds,
                image_bytes,
                images_seconds,
                commit_wait_seconds: commit_start.elapsed().as_secs_f64(),
                // Until the tasks ran on the destination (as seen from here: an upper bound).
                downtime_seconds: resumed_after
                    .unwrap_or_else(|| paused_at.elapsed().as_secs_f64()),
                frozen_until_commit_seconds: paused_at.elapsed().as_secs_f64(),
                started_unix,
                paused_unix,
                images_sent_unix,
                restored_unix,
                committed_unix: unix_now(),
            }),
            _ => Err(SourceError::Aborted(answer.message)),
        }
    })();
    if let Err(e) = &result {
        if paused.is_some() {
            log::warn!(
                "{}: migration failed ({e}); resuming the container here",
                params.container
            );
            if let Err(resume) = hooks.resume() {
                log::warn!(
                    "{}: could not resume after the failed migration: {resume}",
                    params.container
                );
            }
        }
    }
    result
}

/// Image file chunks (1 MiB: CRIU's images besides memory are small).
const IMAGE_CHUNK: usize = 1 << 20;

/// Sends every regular file of a CRIU image directory, then `ImagesDone`.
pub fn send_images<S: Read + Write>(
    session: &mut Session<S>,
    dir: &Path,
) -> Result<u64, SourceError> {
    let mut total = 0u64;
    let io_err = |name: &str| {
        let name = name.to_string();
        move |source| SourceError::ImageFile { name, source }
    };
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map_err(io_err("(image directory)"))?
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let data = fs::read(entry.path()).map_err(io_err(&name))?;
        let chunks: Vec<&[u8]> = if data.is_empty() {
            vec![&[]]
        } else {
            data.chunks(IMAGE_CHUNK).collect()
        };
        let count = chunks.len();
        for (i, chunk) in chunks.into_iter().enumerate() {
            session.send(
                Kind::ImageFile,
                &ImageFile {
                    name: name.clone(),
                    offset: (i * IMAGE_CHUNK) as u64,
                    data: chunk.to_vec(),
                    last_chunk: i + 1 == count,
                },
            )?;
        }
        total += data.len() as u64;
    }
    session.send(
        Kind::Control,
        &Control {
            code: ControlCode::ImagesDone as i32,
            message: String::new(),
        },
    )?;
    Ok(total)
}
