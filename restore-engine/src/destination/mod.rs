//! The receiving end of a migration: the listener that waits for the source, pre-copy rounds
//! into the staging store (while the source still runs), the final dump's image files, then
//! either the lazy-pages server installs the memory from the staging store into the restored
//! tasks, or (eager) the images are completed from the staging store for a plain restore; then
//! the source is told to go (commit), or to resume (abort).
//!
//! - [`receive`]: rounds into the store and image files into a directory, checked as they come,
//! - [`streams`]: page frames arriving on connections of their own (`--streams`),
//! - `stage`: what every page frame goes through on its way into the store,
//! - this file: the listener and the conversation with the source.

pub mod gate;
pub mod limits;
pub mod receive;
mod stage;
pub mod streams;
pub mod txn;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::assemble::{self, AssembleError, AssembleReport};
pub use crate::cancel::Cancel;
use crate::events::{FillStats, ServerEvent};
use crate::grant::{self, Grant, GrantError};
use crate::lazy::{self, LazyError, ServerConfig};
use crate::record::{Phase, RecordError, Store};
use crate::staging::StagingStore;
use crate::wire::{self, Auth, Control, ControlCode, Kind, Session, Timeouts, WireError, RESTORED};
pub use limits::Limits;
pub use receive::DestinationLayer;
use receive::{ReceiveError, ReceiveReport};
pub use streams::ReceiveStreams;
pub use txn::DestinationTxn;

#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("accepting the source: {0}")]
    Accept(#[source] std::io::Error),
    #[error("no source arrived within {0:?} (pclive migrate on the source host connects here)")]
    NoSource(Duration),
    #[error("the source's page streams: {0}")]
    Streams(String),
    #[error("{0}")]
    Handshake(#[from] WireError),
    #[error("receiving the migration: {0}")]
    Receive(#[from] ReceiveError),
    #[error("refused: {0}")]
    Refused(#[from] GrantError),
    #[error("installing the memory: {0}")]
    Install(#[from] LazyError),
    #[error("completing the images from the staging store: {0}")]
    Assemble(#[from] AssembleError),
    #[error("the restore failed: {0}")]
    Restore(String),
    #[error("the restored container died before every page was installed: {0}")]
    Died(String),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("{0}")]
    Cancelled(String),
    #[error("telling the source the outcome: {0}")]
    Commit(WireError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// How an eager restore ended, as the restoring side (the shim) tells the receiving engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum RestoreOutcome {
    /// The restored tasks run: the source may go.
    Restored,
    /// The restore failed: the source must resume.
    Failed { reason: String },
}

fn check(cancel: &Cancel) -> Result<(), DestinationError> {
    match cancel.reason() {
        Some(reason) => Err(DestinationError::Cancelled(reason)),
        None => Ok(()),
    }
}

/// How the receiving end waits for its source and answers it.
#[derive(Clone)]
pub struct ReceiveOptions {
    pub address: String,
    pub auth: Auth,
    pub store: Store,
    /// How long to wait for an authenticated source.
    pub accept_timeout: Duration,
    /// How long a connection may take to authenticate.
    pub handshake_timeout: Duration,
    /// After the migration ended, how long to keep answering the source's questions about its
    /// outcome if it has not acknowledged it.
    pub linger: Duration,
    /// What the source learns in the handshake about how this end restores.
    pub terms: wire::Terms,
}

impl ReceiveOptions {
    pub fn new(address: &str, auth: Auth, store: Store) -> Self {
        ReceiveOptions {
            address: address.to_string(),
            auth,
            store,
            accept_timeout: Duration::from_secs(600),
            handshake_timeout: Duration::from_secs(10),
            linger: Duration::from_secs(300),
            terms: wire::Terms::default(),
        }
    }
}

/// The receiving end's listener: it waits for the source, then keeps answering outcome queries
/// (on the same address) until the source acknowledged the outcome or the linger time passed.
pub struct Receiver {
    options: ReceiveOptions,
    listener: Option<TcpListener>,
    txn: DestinationTxn,
    cancel: Cancel,
    stop: Arc<AtomicBool>,
    answerer: Option<thread::JoinHandle<()>>,
    /// The source's page streams, once it is here ([`Self::take_streams`]).
    streams: Vec<Session<TcpStream>>,
}

impl Receiver {
    /// Binds the address (`events` hears where it listens).
    pub fn bind(
        options: ReceiveOptions,
        cancel: Cancel,
        mut events: impl FnMut(ServerEvent),
    ) -> Result<Receiver, DestinationError> {
        let listener =
            TcpListener::bind(&options.address).map_err(|source| DestinationError::Listen {
                address: options.address.clone(),
                source,
            })?;
        listener
            .set_nonblocking(true)
            .map_err(DestinationError::Accept)?;
        events(ServerEvent::Listening {
            address: listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| options.address.clone()),
        });
        Ok(Receiver {
            txn: DestinationTxn::new(options.store.clone()),
            options,
            listener: Some(listener),
            cancel,
            stop: Arc::new(AtomicBool::new(false)),
            answerer: None,
            streams: Vec::new(),
        })
    }

    pub fn txn(&self) -> &DestinationTxn {
        &self.txn
    }

    /// The source's page streams (empty when its pages come on the main connection).
    pub fn take_streams(&mut self) -> Vec<Session<TcpStream>> {
        std::mem::take(&mut self.streams)
    }

    /// Waits for the `wanted` page streams the source announced on `main`, within the
    /// handshake timeout; other connections meanwhile are answered (queries) or turned away.
    fn accept_streams(
        &self,
        listener: &TcpListener,
        main: &mut Session<TcpStream>,
        wanted: u32,
    ) -> Result<Vec<Session<TcpStream>>, DestinationError> {
        let migration_id = main.intent().migration_id.clone();
        let refuse = |main: &mut Session<TcpStream>, reason: String| {
            turn_away(main, &reason);
            DestinationError::Streams(reason)
        };
        if wanted > crate::source::streams::MAX_STREAMS {
            return Err(refuse(
                main,
                format!(
                    "{wanted} streams asked for, this receiver takes at most {}: use fewer (--streams)",
                    crate::source::streams::MAX_STREAMS
                ),
            ));
        }
        let mut streams: Vec<Option<Session<TcpStream>>> = (0..wanted).map(|_| None).collect();
        let deadline = Instant::now() + self.options.handshake_timeout;
        while streams.iter().any(Option::is_none) {
            check(&self.cancel)?;
            if Instant::now() >= deadline {
                let arrived = streams.iter().filter(|s| s.is_some()).count();
                return Err(refuse(
                    main,
                    format!(
                        "{arrived} of the {wanted} announced arrived within {:?}: does a firewall let only one connection through?",
                        self.options.handshake_timeout
                    ),
                ));
            }
            let Some((stream, peer)) = accept_one(listener)? else {
                continue;
            };
            match handshake(stream, &self.options) {
                Ok(session) if session.intent().is_query() => {
                    let _ = txn::answer_query(session, &self.txn);
                }
                Ok(mut session)
                    if session.intent().is_stream()
                        && session.intent().migration_id == migration_id
                        && streams
                            .get(session.intent().streams as usize)
                            .is_some_and(Option::is_none) =>
                {
                    let _ = session.stream().set_read_timeout(None);
                    let index = session.intent().streams as usize;
                    streams[index] = Some(session);
                }
                Ok(mut session) => {
                    log::warn!("turned away {peer}: not one of the source's page streams");
                    turn_away(&mut session, TAKEN);
                }
                Err(e) => log::warn!("refused a connection from {peer}: {e}"),
            }
        }
        log::info!("{wanted} page streams arrived");
        Ok(streams.into_iter().flatten().collect())
    }

    /// Waits for an authenticated migration source. Connections that fail to authenticate are
    /// refused and the wait goes on; outcome queries are answered. Once the source is here, a
    /// thread keeps answering queries on the same address.
    pub fn accept_source(
        &mut self,
        mut events: impl FnMut(ServerEvent),
    ) -> Result<Session<TcpStream>, DestinationError> {
        let listener = self.listener.take().expect("accept_source is called once");
        let deadline = Instant::now() + self.options.accept_timeout;
        let session = loop {
            check(&self.cancel)?;
            if Instant::now() >= deadline {
                return Err(DestinationError::NoSource(self.options.accept_timeout));
            }
            let Some((stream, peer)) = accept_one(&listener)? else {
                continue;
            };
            match handshake(stream, &self.options) {
                Ok(session) if session.intent().is_query() => {
                    let _ = txn::answer_query(session, &self.txn);
                }
                Ok(mut session) if session.intent().is_stream() => {
                    log::warn!("turned away {peer}: a page stream of a migration not begun here");
                    turn_away(
                        &mut session,
                        "no migration with these page streams began here",
                    );
                }
                Ok(mut session) => {
                    let _ = session.stream().set_read_timeout(None);
                    let intent = session.intent().clone();
                    if intent.streams > 0 {
                        // Before anything is recorded: without its streams the migration
                        // does not begin (the source is told, and resumes).
                        self.streams =
                            self.accept_streams(&listener, &mut session, intent.streams)?;
                    }
                    self.txn
                        .begin(&intent.migration_id, &intent.container, &peer)?;
                    events(ServerEvent::SourceArrived {
                        migration_id: intent.migration_id.clone(),
                        container: intent.container.clone(),
                        peer,
                        page_streams: intent.streams,
                    });
                    break session;
                }
                Err(e) => {
                    log::warn!("refused a connection from {peer}: {e}");
                    events(ServerEvent::Refused {
                        peer,
                        reason: e.to_string(),
                    });
                }
            }
        };
        // Questions about the outcome may come while the migration goes on (the source lost
        // its connection) and after it ended.
        let (txn, options, stop) = (self.txn.clone(), self.options.clone(), self.stop.clone());
        self.answerer = Some(
            thread::Builder::new()
                .name("outcome-answerer".into())
                .spawn(move || answer_until_stopped(&listener, &options, &txn, &stop))
                .map_err(|e| DestinationError::Io {
                    what: "starting the outcome answerer".into(),
                    source: e,
                })?,
        );
        Ok(session)
    }

    /// Keeps answering the source's questions until it acknowledged the outcome or the linger
    /// time passed; then stops listening.
    pub fn linger(mut self) {
        log::info!(
            "the migration ended here ({:?}); the source {} the outcome",
            self.txn.phase(),
            if self.txn.acknowledged() {
                "has"
            } else {
                "does not have"
            }
        );
        if self.answerer.is_some() && !self.txn.acknowledged() {
            log::info!(
                "waiting up to {:?} for the source to learn the outcome",
                self.options.linger
            );
            self.txn.wait_acknowledged(self.options.linger);
        }
        self.stop.store(true, Ordering::SeqCst);
        if let Some(answerer) = self.answerer.take() {
            let _ = answerer.join();
        }
    }
}

/// Answers the source's questions about migration `migration_id` on `options.address`, from
/// the record on disk, until the source acknowledged the outcome or `options.linger` passed: for
/// the shim, when the receiving server died before the source learnt how the migration ended.
pub fn answer_queries(options: ReceiveOptions, migration_id: &str) -> Result<(), DestinationError> {
    let txn = DestinationTxn::load(options.store.clone(), migration_id)?;
    if txn.acknowledged() {
        return Ok(());
    }
    let listener =
        TcpListener::bind(&options.address).map_err(|source| DestinationError::Listen {
            address: options.address.clone(),
            source,
        })?;
    listener
        .set_nonblocking(true)
        .map_err(DestinationError::Accept)?;
    let stop = Arc::new(AtomicBool::new(false));
    let answerer = {
        let (txn, options, stop) = (txn.clone(), options.clone(), stop.clone());
        thread::spawn(move || answer_until_stopped(&listener, &options, &txn, &stop))
    };
    txn.wait_acknowledged(options.linger);
    stop.store(true, Ordering::SeqCst);
    let _ = answerer.join();
    Ok(())
}

/// What a source that connects while another migration is received here is told.
const TAKEN: &str = "this receiver is taken by another migration";

/// Tells the peer of an authenticated session why it is turned away (a peer that is gone
/// already does not matter).
fn turn_away(session: &mut Session<TcpStream>, reason: &str) {
    let _ = session.send(
        Kind::Control,
        &Control {
            code: ControlCode::Abort as i32,
            message: reason.to_string(),
        },
    );
}

/// One connection, or None after a short wait.
fn accept_one(listener: &TcpListener) -> Result<Option<(TcpStream, String)>, DestinationError> {
    match listener.accept() {
        Ok((stream, peer)) => {
            stream
                .set_nonblocking(false)
                .map_err(DestinationError::Accept)?;
            Ok(Some((stream, peer.to_string())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            thread::sleep(Duration::from_millis(20));
            Ok(None)
        }
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(None),
        Err(e) => Err(DestinationError::Accept(e)),
    }
}

/// Authenticates a connection within the handshake timeout.
fn handshake(
    stream: TcpStream,
    options: &ReceiveOptions,
) -> Result<Session<TcpStream>, DestinationError> {
    wire::harden_tcp(&stream).map_err(DestinationError::Accept)?;
    stream
        .set_read_timeout(Some(options.handshake_timeout))
        .map_err(DestinationError::Accept)?;
    stream
        .set_write_timeout(Some(options.handshake_timeout))
        .map_err(DestinationError::Accept)?;
    let mut session = wire::accept_on(stream, &options.auth, options.terms)?;
    let _ = session.stream().set_write_timeout(None);
    Ok(session)
}

/// Answers outcome queries on `listener` (and turns away other sources) until `stop`.
fn answer_until_stopped(
    listener: &TcpListener,
    options: &ReceiveOptions,
    txn: &DestinationTxn,
    stop: &AtomicBool,
) {
    log::info!("answering outcome queries");
    while !stop.load(Ordering::SeqCst) {
        let (stream, peer) = match accept_one(listener) {
            Ok(Some(accepted)) => accepted,
            Ok(None) => continue,
            Err(e) => {
                log::warn!("{e}");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        match handshake(stream, options) {
            Ok(session) if session.intent().is_query() => {
                if let Err(e) = txn::answer_query(session, txn) {
                    log::info!("answering {peer}'s question: {e}");
                }
            }
            Ok(mut session) => {
                turn_away(&mut session, TAKEN);
            }
            Err(e) => log::warn!("refused a connection from {peer}: {e}"),
        }
    }
    log::info!("no longer answering outcome queries");
}

/// Receives a migration on an authenticated `session` and serves its memory to the restore.
/// `config.images` receives the image files; the restore must connect to the lazy-pages socket
/// in `config.work_dir` after [`ServerEvent::Ready`], and its CRIU must ask the resume gate
/// ([`gate`]) before the tasks resume. Once every page is installed, `verdict` says whether the
/// container is alive; then the source is told the outcome: `Committed`, `Abort` (nothing ran
/// here: it resumes) or `Lost` (it ran here and died). What the source sends must stay within
/// `limits`, and the images within `grant`, what the receiving container's spec grants
/// ([`grant::check`]); otherwise the migration aborts (the source resumes). The container's
/// filesystem goes to `layer`, before the images (the restore opens its files by path).
#[allow(clippy::too_many_arguments)]
pub fn receive_and_serve<S: Read + Write + Timeouts>(
    session: &mut Session<S>,
    streams: Option<&ReceiveStreams>,
    limits: &Limits,
    config: &ServerConfig,
    grant: &Grant,
    layer: Option<&mut DestinationLayer>,
    supervisor: Option<&UnixStream>,
    txn: &DestinationTxn,
    cancel: &Cancel,
    mut events: impl FnMut(ServerEvent),
    verdict: impl FnOnce(&FillStats) -> Result<(), String>,
) -> Result<FillStats, DestinationError> {
    let result = (|| -> Result<FillStats, DestinationError> {
        grant::check_address(session.intent().moves_address, grant)?;
        let mut store = StagingStore::default();
        let mut budget = limits::Budget::new(limits);
        let received = receive::receive_rounds_reporting(
            session,
            streams,
            &mut store,
            layer,
            &budget,
            cancel,
            |end, so_far| events(round_received(end, so_far)),
        )?;
        fault("destination::after-rounds")?;
        let image_bytes = receive::receive_images(session, &config.images, &mut budget)?;
        grant::check(&config.images, grant)?;
        fault("destination::after-images")?;
        check(cancel)?;
        txn.enter(Phase::Restoring, None)?;
        gate::open(&config.images, txn.clone(), grant.moves_address).map_err(|source| {
            DestinationError::Io {
                what: "opening the resume gate".into(),
                source,
            }
        })?;
        events(ServerEvent::ImagesReady {
            rounds: received.rounds,
            received_bytes: received.bytes,
            resident_bytes: received.resident_bytes,
            image_bytes,
        });
        // Tell the source when the tasks run here: the end of the service's downtime (the
        // commit comes later, once the background fill is complete).
        let mut restored_sent = false;
        let mut forward = |event: ServerEvent| {
            if matches!(event, ServerEvent::RestoreFinished { .. }) && !restored_sent {
                restored_sent = true;
                let _ = send_progress(session, RESTORED);
                let _ = crate::fault::point("destination::after-restored");
            }
            events(event);
        };
        let stats = lazy::serve(config, &mut store, supervisor, &mut forward)?;
        fault("destination::before-commit")?;
        verdict(&stats).map_err(DestinationError::Died)?;
        Ok(stats)
    })();
    conclude(session, txn, result)
}

/// Receives a migration on an authenticated `session` for an eager restore: the rounds go into
/// the staging store and the image files into `images`, which are then completed from the store
/// ([`assemble::assemble`]). The store is freed before `restore` runs (the restored tasks need
/// that memory). `restore` restores from `images` (its CRIU asking the resume gate) and says how
/// it went; the source is then told the outcome, as in [`receive_and_serve`] (`limits` and
/// `grant` as there).
#[allow(clippy::too_many_arguments)]
pub fn receive_and_restore_eagerly<S: Read + Write + Timeouts>(
    session: &mut Session<S>,
    streams: Option<&ReceiveStreams>,
    limits: &Limits,
    images: &Path,
    grant: &Grant,
    layer: Option<&mut DestinationLayer>,
    txn: &DestinationTxn,
    cancel: &Cancel,
    mut events: impl FnMut(ServerEvent),
    restore: impl FnOnce() -> RestoreOutcome,
) -> Result<AssembleReport, DestinationError> {
    let result = (|| -> Result<AssembleReport, DestinationError> {
        grant::check_address(session.intent().moves_address, grant)?;
        let mut store = StagingStore::default();
        let mut budget = limits::Budget::new(limits);
        let received = receive::receive_rounds_reporting(
            session,
            streams,
            &mut store,
            layer,
            &budget,
            cancel,
            |end, so_far| events(round_received(end, so_far)),
        )?;
        fault("destination::after-rounds")?;
        let image_bytes = receive::receive_images(session, images, &mut budget)?;
        grant::check(images, grant)?;
        fault("destination::after-images")?;
        events(ServerEvent::ImagesReady {
            rounds: received.rounds,
            received_bytes: received.bytes,
            resident_bytes: received.resident_bytes,
            image_bytes,
        });
        let assembled = assemble::assemble(images, &store)?;
        drop(store);
        check(cancel)?;
        txn.enter(Phase::Restoring, None)?;
        gate::open(images, txn.clone(), grant.moves_address).map_err(|source| {
            DestinationError::Io {
                what: "opening the resume gate".into(),
                source,
            }
        })?;
        events(ServerEvent::Assembled(assembled.clone()));
        match restore() {
            RestoreOutcome::Restored if txn.phase() == Some(Phase::Running) => {
                // The end of the service's downtime, as in the lazy path.
                let _ = send_progress(session, RESTORED);
                Ok(assembled)
            }
            RestoreOutcome::Restored => {
                // Never: the restore's CRIU asks the gate. Should it not have, the restored copy
                // must be stopped here (the shim does on this error) and the source must not
                // resume on its own: the migration is lost, not aborted.
                txn.enter(Phase::Running, None)?;
                Err(DestinationError::Restore(
                    "the restore completed without passing the resume gate".into(),
                ))
            }
            RestoreOutcome::Failed { reason } => Err(DestinationError::Restore(reason)),
        }
    })();
    conclude(session, txn, result)
}

/// How long the source has to acknowledge the outcome on the migration's connection (it can ask
/// again later if it misses it).
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

fn fault(name: &str) -> Result<(), DestinationError> {
    crate::fault::point(name).map_err(|source| DestinationError::Io {
        what: name.to_string(),
        source,
    })
}

fn round_received(end: &crate::wire::RoundEnd, so_far: &ReceiveReport) -> ServerEvent {
    ServerEvent::RoundReceived {
        round: end.round,
        pages: end.pages,
        bytes: end.bytes,
        received_bytes: so_far.bytes,
        resident_bytes: so_far.resident_bytes,
        cpu_seconds: so_far.round_cpu_seconds,
        last: end.last,
    }
}

fn send_progress<S: Read + Write>(
    session: &mut Session<S>,
    message: &str,
) -> Result<(), WireError> {
    session.send(
        Kind::Control,
        &Control {
            code: ControlCode::Progress as i32,
            message: message.into(),
        },
    )
}

/// Records the outcome, then tells the source: `Committed` after `result` succeeded, `Abort`
/// (it resumes) after a failure before the restored tasks resumed here, `Lost` (it stays frozen,
/// in doubt) after a failure once they had. Then waits a little for the source's `Ack`.
fn conclude<S: Read + Write + Timeouts, T>(
    session: &mut Session<S>,
    txn: &DestinationTxn,
    result: Result<T, DestinationError>,
) -> Result<T, DestinationError> {
    let (code, message, result) = match result {
        Ok(value) => match txn.enter(Phase::Committed, None) {
            Ok(()) => (ControlCode::Committed, String::new(), Ok(value)),
            // The commit could not be recorded: it did not happen. The container runs here
            // with every page, but the source must not be told to go.
            Err(e) => match txn.fail(&e.to_string()) {
                Ok(_) => (ControlCode::Lost, e.to_string(), Err(e.into())),
                Err(e) => return Err(e.into()),
            },
        },
        Err(e) => {
            let reason = e.to_string();
            match txn.fail(&reason) {
                Ok(Phase::Lost) => (ControlCode::Lost, reason, Err(e)),
                Ok(_) => (ControlCode::Abort, reason, Err(e)),
                // Nothing can be promised to the source without the record: it stays in doubt
                // and asks (and will hear the phase on disk).
                Err(record) => {
                    log::error!("{record} (after: {reason})");
                    return Err(e);
                }
            }
        }
    };
    let sent = session.send(
        Kind::Control,
        &Control {
            code: code as i32,
            message,
        },
    );
    if sent.is_ok() {
        let _ = session.stream().set_read_timeout(Some(ACK_TIMEOUT));
        // A source still sending (an abort during its images) reads the answer only when it
        // is done: what it sends meanwhile is skipped, so that closing does not reset the
        // connection and discard the answer before it was read.
        let deadline = Instant::now() + ACK_TIMEOUT;
        let acknowledged = loop {
            match session.receive() {
                Ok(frame) if frame.kind == Kind::Control => {
                    break frame
                        .decode::<Control>()
                        .is_ok_and(|c| c.code == ControlCode::Ack as i32)
                }
                Ok(_) if Instant::now() < deadline => continue,
                _ => break false,
            }
        };
        if acknowledged {
            txn.acknowledge();
        }
    }
    match (result, sent) {
        (Ok(value), Ok(())) => Ok(value),
        // Committed but the source did not hear it: it will ask.
        (Ok(value), Err(e)) => {
            log::warn!("telling the source about the commit: {e}; it will ask");
            Ok(value)
        }
        (Err(e), _) => Err(e),
    }
}
