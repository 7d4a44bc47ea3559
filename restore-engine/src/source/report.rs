//! What a migration reports: the JSON the shim writes next to the final dump's logs, and what
//! `pclive migrate --json` prints.

use serde::Serialize;

use super::{ConnectionDump, SourceReport};

/// What the source did for its clients once the destination ran the container.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClientsReleased {
    /// TCP ports the container listens on: connection attempts to them are refused here.
    pub ports: Vec<u16>,
    /// Its established connections, reset (their clients see the reset and reconnect).
    pub connections_reset: u32,
    /// After the destination said it runs the container.
    pub seconds: f64,
    /// Why the clients could not be released (they then wait on the frozen copy until the
    /// commit); the migration goes on.
    pub error: Option<String>,
}

/// The frozen round's transfer beside CRIU's final dump, each from the dump's start.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct DumpOverlap {
    /// Page bytes of the frozen round read before the dump and sent while it ran.
    pub held_bytes: u64,
    /// Until the frozen round's end was sent.
    pub sent_seconds: f64,
    /// Until CRIU's dump (runc included) ended.
    pub dump_seconds: f64,
}

/// What a migration did (the shim writes it as JSON next to the final dump's logs).
#[derive(Debug, Clone, Serialize)]
pub struct MigrationReport {
    pub migration_id: String,
    pub container: String,
    pub destination: String,
    pub precopy: SourceReport,
    /// Pause → the final dump began: the freeze and the frozen round's read (and what of its
    /// pages did not fit in memory, sent).
    pub last_round_seconds: f64,
    /// The final dump began → it ended and the frozen round's pages were sent: the two run
    /// together ([`DumpOverlap`] has each). With `last_round_seconds` and `images_seconds`,
    /// the parts of the pause on this side add up.
    pub final_dump_seconds: f64,
    pub dump_overlap: DumpOverlap,
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
    /// The commit was learnt by asking the destination after the connection was lost.
    pub learnt_by_query: bool,
    /// How the filesystem travelled: `copied`, `shared` or `none`.
    pub filesystem: &'static str,
    /// Host paths bind-mounted into the container, not copied (the user said the destination
    /// has them).
    pub external_mounts: Vec<String>,
    /// What the source did for its clients at the switchover (None: the destination never said
    /// it ran the container before committing).
    pub clients_released: Option<ClientsReleased>,
    /// The interfaces whose address moved to the destination (`--move-address`): taken down
    /// here before the final dump, announced there before the tasks resumed.
    pub address_moved: Vec<String>,
    /// What protected the migration's frames on the link: `AES-256-GCM`, or none (`--insecure`).
    pub encryption: &'static str,
    /// Connections the page frames travelled on (`--streams`; 1: the migration's own).
    pub page_streams: u32,
    /// What the final dump recorded of the TCP connections: `state`, or `closed` when the
    /// destination restores them closed.
    pub tcp_connections: ConnectionDump,
}
