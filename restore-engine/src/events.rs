//! What the lazy-pages server process reports to the shim (JSON lines on its stdout): the
//! receiving end of a migration (listening, rounds, images, commit) and the lazy restore
//! (ready, tasks, restore finished, every page installed), or the error that ended it.

use serde::{Deserialize, Serialize};

/// Progress reported by the server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum ServerEvent {
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
    /// Migration: the source authenticated; the migration has this id.
    SourceArrived {
        migration_id: String,
        container: String,
        peer: String,
        /// Connections of their own the pages come on (`--streams`; 0: the main one).
        #[serde(default)]
        page_streams: u32,
    },
    /// Migration: a connection that failed to authenticate was refused (the wait goes on).
    Refused { peer: String, reason: String },
    /// Migration: a pre-copy round arrived (`last`: the source's frozen round).
    RoundReceived {
        round: u32,
        pages: u64,
        bytes: u64,
        /// Page bytes received in all rounds so far (a page sent in several rounds counts
        /// each time).
        received_bytes: u64,
        /// What the staging store holds now (each page once, with its index).
        resident_bytes: u64,
        /// CPU the receiving server spent on this round.
        cpu_seconds: f64,
        last: bool,
    },
    /// Migration: every round and image file arrived; restore now (the lazy-pages socket
    /// follows with `Ready`).
    ImagesReady {
        rounds: u32,
        received_bytes: u64,
        resident_bytes: u64,
        image_bytes: u64,
    },
    /// Eager migration: the images are complete (every page in them); restore them now, then
    /// write the [`crate::destination::RestoreOutcome`] to the server's stdin.
    Assembled(crate::assemble::AssembleReport),
    /// Eager migration: the source was told that the tasks run here and to commit.
    Committed,
    /// Lazy migration: every page is installed; the shim must say whether the container is
    /// alive (a [`ShimMessage`] on the server's stdin) before the source is told to commit.
    FillComplete(FillStats),
    /// Migration: the outcome, recorded and told to the source (`committed`, `aborted` or
    /// `lost`), with the reason when it failed.
    Concluded {
        phase: String,
        reason: Option<String>,
    },
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

/// What the shim tells a receiving server (JSON lines on its stdin).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "message", rename_all = "kebab-case")]
pub enum ShimMessage {
    /// The restore succeeded: the tasks run (an eager restore waits for this).
    Restored,
    /// The restore failed.
    RestoreFailed { reason: String },
    /// After [`ServerEvent::FillComplete`]: the container's init is alive.
    Alive,
    /// After [`ServerEvent::FillComplete`], or at any time: the container died.
    Died { reason: String },
}
