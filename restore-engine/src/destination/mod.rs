//! The receiving end of a migration: the listener that waits for the source, pre-copy rounds
//! into the staging store (while the source still runs), the final dump's image files, then
//! either the lazy-pages server installs the memory from the staging store into the restored
//! tasks, or (eager) the images are completed from the staging store for a plain restore; then
//! the source is told to go (commit), or to resume (abort).
//!
//! - [`receive`]: rounds into the store and image files into a directory, checked as they come,
//! - this file: the listener and the conversation with the source.

pub mod receive;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::assemble::{self, AssembleError, AssembleReport};
use crate::events::{FillStats, ServerEvent};
use crate::lazy::{self, LazyError, ServerConfig};
use crate::staging::StagingStore;
use crate::wire::{self, Auth, Control, ControlCode, Kind, Session, WireError, RESTORED};
use receive::{ReceiveError, ReceiveReport};

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
    #[error("setting up the connection: {0}")]
    Setup(#[source] std::io::Error),
    #[error("{0}")]
    Handshake(#[from] WireError),
    #[error("receiving the migration: {0}")]
    Receive(#[from] ReceiveError),
    #[error("installing the memory: {0}")]
    Install(#[from] LazyError),
    #[error("completing the images from the staging store: {0}")]
    Assemble(#[from] AssembleError),
    #[error("the restore failed: {0}")]
    Restore(String),
    #[error("telling the source to commit: {0}")]
    Commit(WireError),
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

/// Listens on `address` for the source and authenticates it (`events` hears where it listens).
pub fn accept_source(
    address: &str,
    auth: &Auth,
    mut events: impl FnMut(ServerEvent),
) -> Result<Session<TcpStream>, DestinationError> {
    let listener = TcpListener::bind(address).map_err(|source| DestinationError::Listen {
        address: address.to_string(),
        source,
    })?;
    events(ServerEvent::Listening {
        address: listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| address.to_string()),
    });
    let (stream, _) = listener.accept().map_err(DestinationError::Accept)?;
    wire::harden_tcp(&stream).map_err(DestinationError::Setup)?;
    Ok(wire::accept(stream, auth)?)
}

/// Receives a migration on an authenticated `session` and serves its memory to the restore.
/// `config.images` receives the image files; the restore must connect to the lazy-pages socket
/// in `config.work_dir` after [`ServerEvent::Ready`]. On failure the source is told to abort (it
/// resumes); on success it is told to commit once every page is installed.
pub fn receive_and_serve<S: Read + Write>(
    session: &mut Session<S>,
    config: &ServerConfig,
    supervisor: Option<&UnixStream>,
    mut events: impl FnMut(ServerEvent),
) -> Result<FillStats, DestinationError> {
    let result = (|| -> Result<FillStats, DestinationError> {
        let mut store = StagingStore::default();
        let received = receive::receive_rounds_reporting(session, &mut store, |end, so_far| {
            events(round_received(end, so_far))
        })?;
        let image_bytes = receive::receive_images(session, &config.images)?;
        events(ServerEvent::ImagesReady {
            rounds: received.rounds,
            staged_bytes: received.bytes,
            image_bytes,
        });
        // Tell the source when the tasks run here: the end of the service's downtime (the
        // commit comes later, once the background fill is complete).
        let mut restored_sent = false;
        let mut forward = |event: ServerEvent| {
            if matches!(event, ServerEvent::RestoreFinished { .. }) && !restored_sent {
                restored_sent = true;
                let _ = send_progress(session, RESTORED);
            }
            events(event);
        };
        Ok(lazy::serve(config, &mut store, supervisor, &mut forward)?)
    })();
    commit_or_abort(session, result)
}

/// Receives a migration on an authenticated `session` for an eager restore: the rounds go into
/// the staging store and the image files into `images`, which are then completed from the store
/// ([`assemble::assemble`]). The store is freed before `restore` runs (the restored tasks need
/// that memory). `restore` restores from `images` and says how it went; the source is then told
/// that the tasks run and to commit, or to abort (it resumes), as it is on any failure here.
pub fn receive_and_restore_eagerly<S: Read + Write>(
    session: &mut Session<S>,
    images: &Path,
    mut events: impl FnMut(ServerEvent),
    restore: impl FnOnce() -> RestoreOutcome,
) -> Result<AssembleReport, DestinationError> {
    let result = (|| -> Result<AssembleReport, DestinationError> {
        let mut store = StagingStore::default();
        let received = receive::receive_rounds_reporting(session, &mut store, |end, so_far| {
            events(round_received(end, so_far))
        })?;
        let image_bytes = receive::receive_images(session, images)?;
        events(ServerEvent::ImagesReady {
            rounds: received.rounds,
            staged_bytes: received.bytes,
            image_bytes,
        });
        let assembled = assemble::assemble(images, &store)?;
        drop(store);
        events(ServerEvent::Assembled(assembled.clone()));
        match restore() {
            RestoreOutcome::Restored => {
                // The end of the service's downtime, as in the lazy path.
                send_progress(session, RESTORED).map_err(DestinationError::Commit)?;
                Ok(assembled)
            }
            RestoreOutcome::Failed { reason } => Err(DestinationError::Restore(reason)),
        }
    })();
    commit_or_abort(session, result)
}

fn round_received(end: &crate::wire::RoundEnd, so_far: &ReceiveReport) -> ServerEvent {
    ServerEvent::RoundReceived {
        round: end.round,
        pages: end.pages,
        bytes: end.bytes,
        staged_bytes: so_far.bytes,
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

/// Tells the source to commit after `result` succeeded, or to abort (and why) after it failed.
fn commit_or_abort<S: Read + Write, T>(
    session: &mut Session<S>,
    result: Result<T, DestinationError>,
) -> Result<T, DestinationError> {
    match &result {
        Ok(_) => session
            .send(
                Kind::Control,
                &Control {
                    code: ControlCode::Committed as i32,
                    message: String::new(),
                },
            )
            .map_err(DestinationError::Commit)?,
        Err(e) => {
            // Best effort: the source resumes when it hears this, or when the connection drops.
            let _ = session.send(
                Kind::Control,
                &Control {
                    code: ControlCode::Abort as i32,
                    message: e.to_string(),
                },
            );
        }
    }
    result
}
