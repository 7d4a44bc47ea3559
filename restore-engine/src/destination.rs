//! The receiving end of a migration: pre-copy rounds into the staging store (while the source
//! still runs), the final dump's image files, then either the lazy-pages server installs the
//! memory from the staging store into the restored tasks, or (eager) the images are completed
//! from the staging store for a plain restore; then the source is told to go (commit).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::assemble::{self, AssembleError, AssembleReport};
use crate::lazy::{self, FillStats, LazyError, LazyEvent, ServerConfig};
use crate::precopy::{self, PrecopyError};
use crate::staging::StagingStore;
use crate::wire::{Control, ControlCode, Kind, Session};

/// Progress message the destination sends when the restored tasks run.
pub const RESTORED: &str = "restored";

#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    #[error("receiving the migration: {0}")]
    Receive(#[from] PrecopyError),
    #[error("installing the memory: {0}")]
    Install(#[from] LazyError),
    #[error("completing the images from the staging store: {0}")]
    Assemble(#[from] AssembleError),
    #[error("the restore failed: {0}")]
    Restore(String),
    #[error("telling the source to commit: {0}")]
    Commit(crate::wire::WireError),
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

/// Receives a migration on an authenticated `session` and serves its memory to the restore.
/// `config.images` receives the image files; the restore must connect to the lazy-pages socket
/// in `config.work_dir` after [`LazyEvent::Ready`]. On failure the source is told to abort (it
/// resumes); on success it is told to commit once every page is installed.
pub fn receive_and_serve<S: Read + Write>(
    session: &mut Session<S>,
    config: &ServerConfig,
    supervisor: Option<&UnixStream>,
    mut events: impl FnMut(LazyEvent),
) -> Result<FillStats, DestinationError> {
    let result = (|| -> Result<FillStats, DestinationError> {
        let mut store = StagingStore::default();
        let received = precopy::receive_rounds_reporting(session, &mut store, |end, so_far| {
            events(round_received(end, so_far))
        })?;
        let image_bytes = precopy::receive_images(session, &config.images)?;
        events(LazyEvent::ImagesReady {
            rounds: received.rounds,
            staged_bytes: received.bytes,
            image_bytes,
        });
        // Tell the source when the tasks run here: the end of the service's downtime (the
        // commit comes later, once the background fill is complete).
        let mut restored_sent = false;
        let mut forward = |event: LazyEvent| {
            if matches!(event, LazyEvent::RestoreFinished { .. }) && !restored_sent {
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
    mut events: impl FnMut(LazyEvent),
    restore: impl FnOnce() -> RestoreOutcome,
) -> Result<AssembleReport, DestinationError> {
    let result = (|| -> Result<AssembleReport, DestinationError> {
        let mut store = StagingStore::default();
        let received = precopy::receive_rounds_reporting(session, &mut store, |end, so_far| {
            events(round_received(end, so_far))
        })?;
        let image_bytes = precopy::receive_images(session, images)?;
        events(LazyEvent::ImagesReady {
            rounds: received.rounds,
            staged_bytes: received.bytes,
            image_bytes,
        });
        let assembled = assemble::assemble(images, &store)?;
        drop(store);
        events(LazyEvent::Assembled(assembled.clone()));
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

fn round_received(end: &crate::wire::RoundEnd, so_far: &precopy::ReceiveReport) -> LazyEvent {
    LazyEvent::RoundReceived {
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
) -> Result<(), crate::wire::WireError> {
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
