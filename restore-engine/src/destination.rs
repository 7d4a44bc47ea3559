//! The receiving end of a migration: pre-copy rounds into the staging store (while the source
//! still runs), the final dump's image files, then the lazy-pages server installs the memory from
//! the staging store into the restored tasks, and the source is told to go (commit).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

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
    #[error("telling the source to commit: {0}")]
    Commit(crate::wire::WireError),
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
        let received = precopy::receive_rounds(session, &mut store)?;
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
                let _ = session.send(
                    Kind::Control,
                    &Control {
                        code: ControlCode::Progress as i32,
                        message: RESTORED.into(),
                    },
                );
            }
            events(event);
        };
        Ok(lazy::serve(config, &mut store, supervisor, &mut forward)?)
    })();
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
