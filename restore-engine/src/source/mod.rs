//! The sending end of a migration: pre-copy rounds while the container runs, the freeze, the last
//! round, the final dump's image files, then waiting for the destination to report its tasks
//! running ("restored") and every page installed ("committed").
//!
//! The engine does not know runc: the shim supplies the container's processes, the freeze, the
//! final CRIU dump and the thaw as [`SourceHooks`].
//!
//! - [`rounds`]: the pre-copy rounds ([`Sender`]),
//! - [`streams`]: page frames on connections and threads of their own (`--streams`),
//! - [`query`]: asking the destination how a migration ended, after losing the connection,
//! - this file: the conversation with the destination ([`migrate`]), its record (written before
//!   each step: see [`crate::record`]) and the image files.
//!
//! The transaction: until the last byte of the images is written the destination cannot run the
//! container, so any failure thaws it here. From then on (`images-sent`) it never resumes here
//! on its own: the destination's `Abort` (it promises never to run it) resumes it, `Committed`
//! (every page installed in live tasks) lets the caller remove it, `Lost` or an unanswered
//! question leaves it frozen and in doubt for an operator (`pclive resolve`).

mod pace;
pub mod query;
mod report;
pub mod rounds;
pub mod streams;

use std::fs;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

pub use crate::clock::unix_now;
pub use report::{ClientsReleased, DumpOverlap, MigrationReport};
pub use rounds::{RoundStats, Sender, SourceLayer, SourceReport, TaskIds};

use crate::memory::{self, Quiesce, TrackError};
use crate::policy::ConvergencePolicy;
use crate::record::{Phase, Record, RecordError, Role, Store};
use crate::wire::{self, Auth, Control, ControlCode, ImageFile, Intent, Kind, Session, WireError};

/// How long the destination may take, after the images, to restore and install every page
/// while it keeps answering (the source waits that long at most for a commit).
const COMMIT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long connecting to the destination may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the destination may take to answer the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("the container's filesystem: {0}")]
    Layer(#[from] crate::layer::LayerError),
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
    #[error("the migration is in doubt: {reason}. The container stays frozen here so that it never runs twice; `pclive status {container}` shows the migration, `pclive resolve {container}` ends it")]
    InDoubt { container: String, reason: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

impl SourceError {
    fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> SourceError {
        let what = what.into();
        move |source| SourceError::Io { what, source }
    }
}

/// What the sending end needs to know about a migration.
#[derive(Clone)]
pub struct MigrateParams {
    /// Identifies the migration on both ends (32 hex digits, [`crate::record::new_migration_id`]).
    pub migration_id: String,
    /// The container's name, for logs and the report.
    pub container: String,
    /// The receiving end, host:port.
    pub destination: String,
    pub auth: Auth,
    /// The key file `auth` came from, kept in the record for `pclive resolve`.
    pub key_file: Option<PathBuf>,
    pub policy: ConvergencePolicy,
    /// A dirty tracker by name ([`memory::TRACKERS`]); `None`: the best available.
    pub tracker: Option<String>,
    /// LZ4-compress page runs where that pays.
    pub compress: bool,
    /// Bytes per second the live rounds may put on the link (None: as fast as it goes).
    pub max_bandwidth: Option<u64>,
    /// Cores the live rounds may use (None: as many as they take; they use one thread).
    pub max_cpu: Option<f64>,
    /// Connections the page frames travel on, each sealed and sent by a thread of its own
    /// (`--streams`); 1: on the main connection, by the reading thread.
    pub streams: u32,
    /// Where the final dump's images go (`<work dir>/images`) and its logs stay.
    pub work_dir: PathBuf,
    /// Where this host records its migrations.
    pub store: Store,
    /// After losing the connection once the images went out, how long to keep trying to ask
    /// the destination how the migration ended before declaring it in doubt.
    pub resolve_timeout: Duration,
    /// The container's filesystem: what to move, or `Shared` (None: it does not travel, as in
    /// the engine's own tests of the memory path).
    pub layer: Option<LayerPlan>,
    /// Host paths bind-mounted into the container that the user said exist on the destination
    /// (they are not copied); listed in the report.
    pub external_mounts: Vec<String>,
    /// The container's address moves with it (`--move-address`): its interfaces go down before
    /// the final dump (nothing may change its connections after the dump, and the destination
    /// takes the address), and its clients are not sent away at the switchover (their
    /// connections continue on the destination).
    pub move_address: bool,
}

/// What happens to the container's filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerPlan {
    Copy(crate::layer::LayerSource),
    /// Both hosts see this root filesystem directory (`--shared-rootfs`).
    Shared(PathBuf),
}

impl MigrateParams {
    pub fn image_dir(&self) -> PathBuf {
        self.work_dir.join("images")
    }
}

/// What the engine asks of the container runtime (the shim, over runc and CRIU).
/// `Send`: the final dump runs on a thread of its own while the frozen round is sent.
pub trait SourceHooks: Send {
    /// The container's processes now (taken anew each round: they come and go).
    fn tasks(&mut self) -> Result<Vec<TaskIds>, HookError>;
    /// Freezes every process of the container.
    fn freeze(&mut self) -> Result<(), HookError>;
    /// CRIU's final dump of the frozen container into `image_dir`, without the lazy memory
    /// (the destination has it from the rounds), recording its TCP connections as
    /// `connections` says; the container stays frozen.
    fn final_dump(
        &mut self,
        image_dir: &Path,
        connections: ConnectionDump,
    ) -> Result<(), HookError>;
    /// Thaws the container: the migration failed and it goes on running here.
    fn resume(&mut self) -> Result<(), HookError>;
    /// A round ended (progress).
    fn round_done(&mut self, _round: &RoundStats) {}
    /// The destination runs the container (recorded): the frozen copy here will never serve
    /// its clients again, so make them fail over now rather than wait on it until the commit.
    /// It stays frozen and able to resume (an operator may decide so if the outcome is in doubt).
    fn release_clients(&mut self) -> Result<ClientsReleased, HookError> {
        Ok(ClientsReleased::default())
    }
    /// The container's network interfaces that carry its address (all but loopback, those
    /// that are up), for `--move-address`.
    fn address_links(&mut self) -> Result<Vec<String>, HookError> {
        Err("this runtime cannot move a container's address".into())
    }
    /// Takes the interfaces `names` of the container down, or brings them up again (announcing
    /// the address).
    fn set_address_links(&mut self, _names: &[String], _up: bool) -> Result<(), HookError> {
        Err("this runtime cannot move a container's address".into())
    }
}

/// What the final dump records of the container's established TCP connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConnectionDump {
    /// Their state, each connection locked while it is read (CRIU's `--tcp-established`): the
    /// destination restores them.
    State,
    /// Only that they exist (CRIU's `tcp-close` on dump): the destination said it restores them
    /// closed, so reading each one's state and locking it would only lengthen the pause (by
    /// about 0.5 ms per connection here).
    Closed,
}

/// Connects to the receiving end and authenticates the session.
pub fn connect(
    destination: &str,
    auth: &Auth,
    intent: &Intent,
) -> Result<Session<TcpStream>, SourceError> {
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
    wire::harden_tcp(&stream).map_err(SourceError::io(
        "setting up the connection to the destination",
    ))?;
    // A destination that accepts but never answers must not hold the source for long.
    let _ = stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let mut session = wire::connect(stream, auth, intent)?;
    let _ = session.stream().set_read_timeout(Some(COMMIT_TIMEOUT));
    Ok(session)
}

/// Migrates the container to `params.destination`. On success the container is still frozen
/// here and the destination runs it with every page: the caller removes this copy, then
/// [`source_removed`]. On [`SourceError::InDoubt`] it stays frozen; on any other error it has
/// been thawed (if it was frozen at all) and runs here.
pub fn migrate(
    params: &MigrateParams,
    hooks: &mut dyn SourceHooks,
) -> Result<MigrationReport, SourceError> {
    let mut txn = Txn::begin(params)?;
    let extra = if params.streams > 1 {
        params.streams
    } else {
        0
    };
    let intent = Intent::migrate(&params.migration_id, &params.container)
        .moving_address(params.move_address)
        .with_streams(extra);
    let connected = connect(&params.destination, &params.auth, &intent).and_then(|session| {
        let streams = (0..extra)
            .map(|index| {
                connect(
                    &params.destination,
                    &params.auth,
                    &Intent::stream(&params.migration_id, index),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let streams = match streams.is_empty() {
            true => None,
            false => Some(streams::PageStreams::start(streams)?),
        };
        Ok((session, streams))
    });
    let (session, streams) = match connected {
        Ok(connected) => connected,
        Err(e) => {
            txn.enter(Phase::Resumed, Some(e.to_string()))?;
            return Err(e);
        }
    };
    migrate_over_txn(session, streams, params, hooks, txn)
}

/// [`migrate`] over an established session.
pub fn migrate_over<S: Read + Write>(
    session: Session<S>,
    params: &MigrateParams,
    hooks: &mut dyn SourceHooks,
) -> Result<MigrationReport, SourceError> {
    let txn = Txn::begin(params)?;
    migrate_over_txn(session, None, params, hooks, txn)
}

/// Records that the frozen source copy of a committed migration is gone.
pub fn source_removed(store: &Store, migration_id: &str) -> Result<(), RecordError> {
    if let Some(mut record) = store.read(migration_id, Role::Source)? {
        record.enter(Phase::Done, None);
        store.write(&record)?;
    }
    Ok(())
}

/// The source's record of one migration, written before each step is taken.
struct Txn {
    store: Store,
    record: Record,
}

impl Txn {
    fn begin(params: &MigrateParams) -> Result<Txn, SourceError> {
        crate::fault::load();
        let mut record = Record::new(
            &params.migration_id,
            &params.container,
            Role::Source,
            &params.destination,
            Phase::Precopy,
        );
        record.key_file = params.key_file.as_ref().map(|p| p.display().to_string());
        params.store.write(&record)?;
        Ok(Txn {
            store: params.store.clone(),
            record,
        })
    }

    fn enter(&mut self, phase: Phase, reason: Option<String>) -> Result<(), SourceError> {
        self.record.enter(phase, reason);
        Ok(self.store.write(&self.record)?)
    }
}

/// How the destination said the migration ended.
enum Answer {
    Committed,
    Aborted(String),
    Lost(String),
}

fn fault(name: &str) -> Result<(), SourceError> {
    crate::fault::point(name).map_err(SourceError::io(name))
}

/// What the source did up to the images sent (the report's first part).
struct BeforeImages {
    precopy: SourceReport,
    last_round_seconds: f64,
    final_dump_seconds: f64,
    dump_overlap: DumpOverlap,
    image_bytes: u64,
    images_seconds: f64,
}

fn migrate_over_txn<S: Read + Write>(
    mut session: Session<S>,
    streams: Option<streams::PageStreams>,
    params: &MigrateParams,
    hooks: &mut dyn SourceHooks,
    mut txn: Txn,
) -> Result<MigrationReport, SourceError> {
    let mut tracker = memory::tracker(params.tracker.as_deref())?;
    let encryption = session.protection();
    let page_streams = streams.as_ref().map_or(1, |s| s.len() as u32);
    let connections = if session.terms().closes_connections {
        ConnectionDump::Closed
    } else {
        ConnectionDump::State
    };
    log::info!(
        "{}: pre-copy to {} with the {} tracker, frames protected by {}, pages on {} connection(s) (migration {})",
        params.container,
        params.destination,
        tracker.name(),
        encryption,
        page_streams,
        params.migration_id
    );
    let started_unix = unix_now();
    let mut paused: Option<(Instant, f64)> = None;
    // Until the images are complete the destination cannot run the container: any failure
    // resumes it here.
    let before_images = (|| -> Result<BeforeImages, SourceError> {
        let image_dir = params.image_dir();
        fs::create_dir_all(&image_dir)
            .map_err(SourceError::io(format!("creating {}", image_dir.display())))?;
        fault("source::precopy")?;
        // The hooks are used by the rounds (tasks, progress) and by the freeze: a cell lets
        // both closures borrow them.
        let hooks_cell = std::cell::RefCell::new(&mut *hooks);
        let txn_cell = std::cell::RefCell::new(&mut txn);
        let mut quiesce = HooksQuiesce(&hooks_cell);
        let layer = params.layer.as_ref().map(|plan| match plan {
            LayerPlan::Copy(source) => {
                rounds::SourceLayer::Copy(crate::layer::Scanner::new(source.clone()))
            }
            LayerPlan::Shared(root) => rounds::SourceLayer::Shared(root.clone()),
        });
        let mut sender = Sender::new(&mut session)
            .compress(params.compress)
            .max_bandwidth(params.max_bandwidth)
            .max_cpu(params.max_cpu)
            .streams(streams)
            .layer(layer);
        let (mut precopy, frozen_round) = sender.run_until_frozen(
            || hooks_cell.borrow_mut().tasks().map_err(SourceError::Tasks),
            tracker.as_mut(),
            &mut quiesce,
            &params.policy,
            || {
                // (Tests stall here to change the container between the rounds and the freeze.)
                fault("source::before-freeze")?;
                txn_cell.borrow_mut().enter(Phase::Frozen, None)?;
                hooks_cell
                    .borrow_mut()
                    .freeze()
                    .map_err(SourceError::Freeze)?;
                paused = Some((Instant::now(), unix_now()));
                fault("source::after-freeze")
            },
            &mut |round| hooks_cell.borrow_mut().round_done(round),
            true,
        )?;
        let (paused_at, _) = paused.expect("the last round follows the freeze");
        if params.move_address {
            // From here on nothing may change the connections' state that the dump records:
            // the address goes down (recorded first: whoever resumes this copy restores it).
            let links = hooks.address_links().map_err(SourceError::Dump)?;
            if links.is_empty() {
                return Err(SourceError::Dump(
                    "--move-address: the container's network namespace has no interface up \
                     besides lo: there is no address to move"
                        .into(),
                ));
            }
            txn.record.moved_links = links.clone();
            txn.store.write(&txn.record)?;
            hooks
                .set_address_links(&links, false)
                .map_err(SourceError::Dump)?;
            fault("source::after-address-down")?;
        }
        // The frozen round's pages are read: CRIU's dump and their transfer are independent,
        // so they run together (the dump on a thread of its own).
        let held_bytes = frozen_round.held_bytes() as u64;
        let dump_start = Instant::now();
        let last_round_seconds = paused_at.elapsed().as_secs_f64();
        log::info!(
            "{}: frozen round read {last_round_seconds:.3}s after the pause: {:.1} MiB go over beside the final dump",
            params.container,
            held_bytes as f64 / (1 << 20) as f64
        );
        let (sent, dumped) = std::thread::scope(|scope| {
            let dump = scope.spawn(|| {
                let dumped = hooks.final_dump(&image_dir, connections);
                (dumped, dump_start.elapsed().as_secs_f64())
            });
            let sent = sender
                .send_frozen(frozen_round, &mut precopy)
                .map(|last| (last, dump_start.elapsed().as_secs_f64()));
            (sent, dump.join())
        });
        let (dumped, dump_seconds) =
            dumped.map_err(|_| SourceError::Dump("the final dump's thread panicked".into()))?;
        let (last, sent_seconds) = match (sent, dumped) {
            (Ok(sent), Ok(())) => sent,
            (Err(e), dumped) => {
                if let Err(dump_error) = dumped {
                    log::warn!(
                        "{}: the final dump failed too: {dump_error}",
                        params.container
                    );
                }
                return Err(e);
            }
            (Ok(_), Err(e)) => return Err(SourceError::Dump(e)),
        };
        let overlap = DumpOverlap {
            held_bytes,
            sent_seconds,
            dump_seconds,
        };
        log::debug!("{}: beside the final dump: {overlap:?}", params.container);
        hooks.round_done(&last);
        let timers = crate::fixups::fix_overdue_timerfds(&image_dir)
            .map_err(|e| SourceError::Dump(e.into()))?;
        if timers > 0 {
            log::info!(
                "{}: {timers} overdue periodic timerfd(s) set to expire at once (CRIU would disarm them)",
                params.container
            );
        }
        let final_dump_seconds = dump_start.elapsed().as_secs_f64();
        fault("source::after-dump")?;
        let images_start = Instant::now();
        let image_bytes = send_image_files(&mut session, &image_dir)?;
        fault("source::before-images-done")?;
        Ok(BeforeImages {
            precopy,
            last_round_seconds,
            final_dump_seconds,
            dump_overlap: overlap,
            image_bytes,
            images_seconds: images_start.elapsed().as_secs_f64(),
        })
    })();
    let BeforeImages {
        precopy,
        last_round_seconds,
        final_dump_seconds,
        dump_overlap,
        image_bytes,
        images_seconds,
    } = match before_images {
        Ok(done) => done,
        Err(e) => return Err(resume_here(&mut txn, hooks, e, params, paused.is_some())),
    };
    let (paused_at, paused_unix) = paused.expect("the last round follows the freeze");

    // The point from which the destination may run the container: never resume on our own.
    txn.enter(Phase::ImagesSent, None)?;
    let images_sent_unix = unix_now();
    let commit_start = Instant::now();
    let mut restored_unix = None;
    let mut resumed_after = None;
    let mut learnt_by_query = false;
    let mut clients_released = None;
    let conversation = (|| -> Result<Answer, SourceError> {
        session.send(
            Kind::Control,
            &Control {
                code: ControlCode::ImagesDone as i32,
                message: String::new(),
            },
        )?;
        fault("source::after-images-done")?;
        loop {
            let answer: Control = session.expect(Kind::Control)?;
            match ControlCode::try_from(answer.code) {
                Ok(ControlCode::Progress) if answer.message == wire::RESTORED => {
                    resumed_after = Some(paused_at.elapsed().as_secs_f64());
                    restored_unix = Some(unix_now());
                    txn.enter(Phase::DestinationRunning, None)?;
                    let started = Instant::now();
                    if params.move_address {
                        // The clients' connections continue on the destination, at the address
                        // that moved there: nothing to send away here.
                        fault("source::after-restored")?;
                        continue;
                    }
                    let mut released = hooks.release_clients().unwrap_or_else(|e| {
                        log::warn!(
                            "{}: cannot release the clients of the frozen copy: {e}; they wait on it until the commit",
                            params.container
                        );
                        ClientsReleased {
                            error: Some(e.to_string()),
                            ..Default::default()
                        }
                    });
                    released.seconds = started.elapsed().as_secs_f64();
                    clients_released = Some(released);
                    fault("source::after-restored")?;
                }
                Ok(ControlCode::Progress) => {}
                Ok(ControlCode::Committed) => return Ok(Answer::Committed),
                Ok(ControlCode::Abort) => return Ok(Answer::Aborted(answer.message)),
                Ok(ControlCode::Lost) => return Ok(Answer::Lost(answer.message)),
                _ => {
                    return Err(WireError::Unexpected {
                        expected: Kind::Control,
                        found: Kind::Control,
                    }
                    .into())
                }
            }
        }
    })();
    let answer = match conversation {
        Ok(answer) => {
            // Best effort: the destination stops answering queries once it has this.
            let _ = session.send(
                Kind::Control,
                &Control {
                    code: ControlCode::Ack as i32,
                    message: String::new(),
                },
            );
            answer
        }
        Err(lost) => {
            log::warn!(
                "{}: lost the connection to the destination after the images ({lost}); asking it how the migration ended",
                params.container
            );
            learnt_by_query = true;
            drop(session);
            match query::settle(params, commit_start + COMMIT_TIMEOUT) {
                Ok(answer) => answer,
                Err(reason) => {
                    let reason = format!("{lost}; {reason}");
                    txn.enter(Phase::InDoubt, Some(reason.clone()))?;
                    return Err(SourceError::InDoubt {
                        container: params.container.clone(),
                        reason,
                    });
                }
            }
        }
    };
    txn.record.destination_said = Some(match &answer {
        Answer::Committed => Phase::Committed,
        Answer::Aborted(_) => Phase::Aborted,
        Answer::Lost(_) => Phase::Lost,
    });
    match answer {
        Answer::Committed => {
            txn.enter(Phase::Committed, None)?;
            fault("source::after-commit")?;
            Ok(MigrationReport {
                migration_id: params.migration_id.clone(),
                container: params.container.clone(),
                destination: params.destination.clone(),
                precopy,
                last_round_seconds,
                final_dump_seconds,
                dump_overlap,
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
                learnt_by_query,
                filesystem: match params.layer {
                    Some(LayerPlan::Copy(_)) => "copied",
                    Some(LayerPlan::Shared(_)) => "shared",
                    None => "none",
                },
                external_mounts: params.external_mounts.clone(),
                clients_released,
                address_moved: txn.record.moved_links.clone(),
                encryption,
                page_streams,
                tcp_connections: connections,
            })
        }
        // The destination never resumed the container and never will: it runs here again.
        Answer::Aborted(reason) => Err(resume_here(
            &mut txn,
            hooks,
            SourceError::Aborted(reason),
            params,
            true,
        )),
        // The destination resumed it and lost it: the frozen copy here is all that is left, but
        // only an operator may tell whether running it again is right.
        Answer::Lost(reason) => {
            let reason = format!("the destination lost the container after running it: {reason}");
            txn.enter(Phase::InDoubt, Some(reason.clone()))?;
            Err(SourceError::InDoubt {
                container: params.container.clone(),
                reason,
            })
        }
    }
}

/// A brief freeze of the container for the tracker (soft-dirty reads and clears its marks
/// inside one), through the runtime's freeze and thaw.
struct HooksQuiesce<'a, T>(&'a std::cell::RefCell<T>);

impl<T> Quiesce for HooksQuiesce<'_, T>
where
    T: std::ops::DerefMut,
    T::Target: SourceHooks,
{
    fn freeze(&mut self) -> Result<(), TrackError> {
        self.0
            .borrow_mut()
            .freeze()
            .map_err(|e| TrackError::Quiesce(e.to_string()))
    }
    fn thaw(&mut self) -> Result<(), TrackError> {
        self.0
            .borrow_mut()
            .resume()
            .map_err(|e| TrackError::Quiesce(e.to_string()))
    }
}

/// The migration failed before the destination could run the container: record that and thaw
/// it (if it was frozen). Returns the error to report.
fn resume_here(
    txn: &mut Txn,
    hooks: &mut dyn SourceHooks,
    error: SourceError,
    params: &MigrateParams,
    frozen: bool,
) -> SourceError {
    if let Err(record) = txn.enter(Phase::Resumed, Some(error.to_string())) {
        // Without the record the decision cannot be acted on: the container stays as it is.
        log::error!(
            "{}: migration failed ({error}) and {record}",
            params.container
        );
        return record;
    }
    if frozen {
        log::warn!(
            "{}: migration failed ({error}); resuming the container here",
            params.container
        );
        let links = txn.record.moved_links.clone();
        if !links.is_empty() {
            // The destination never announced the address: it is this copy's again.
            if let Err(up) = hooks.set_address_links(&links, true) {
                log::error!(
                    "{}: could not bring its interfaces {links:?} up again: {up}; it resumes without its address",
                    params.container
                );
            }
        }
        if let Err(resume) = hooks.resume() {
            log::error!(
                "{}: could not resume after the failed migration: {resume}",
                params.container
            );
            return SourceError::Io {
                what: format!("{error}; then resuming the container here failed"),
                source: io::Error::other(resume.to_string()),
            };
        }
    }
    error
}

/// Image file chunks (1 MiB: CRIU's images besides memory are small).
const IMAGE_CHUNK: usize = 1 << 20;

/// Sends every regular file of a CRIU image directory, then `ImagesDone`.
pub fn send_images<S: Read + Write>(
    session: &mut Session<S>,
    dir: &Path,
) -> Result<u64, SourceError> {
    let total = send_image_files(session, dir)?;
    session.send(
        Kind::Control,
        &Control {
            code: ControlCode::ImagesDone as i32,
            message: String::new(),
        },
    )?;
    Ok(total)
}

/// Sends every regular file of a CRIU image directory (not yet `ImagesDone`).
fn send_image_files<S: Read + Write>(
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
    Ok(total)
}
