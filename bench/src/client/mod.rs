//! The three jobs of `pclive-bench-client`: load a data set, run a workload through a migration
//! (with a downtime probe), verify the data set afterwards.

pub mod load;
pub mod run;
pub mod signals;
pub mod verify;

use std::time::Duration;

use thiserror::Error;

use crate::args::UsageError;
use crate::conn::ConnError;
use crate::state::StateError;

/// The data set: keys `key:0..records`, values `value_of(seed, i, version, value_size)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    pub records: u64,
    pub value_size: usize,
    pub seed: u64,
}

/// Load and verify talk to one server that is not migrating: a generous per-reply timeout
/// only guards against a hung server.
pub const BULK_TIMEOUT: Duration = Duration::from_secs(30);

/// Commands per pipelined batch in load and verify.
pub const BATCH: u64 = 256;

/// Batches in flight: enough to keep a local link busy while the server works.
pub const PIPELINE_DEPTH: usize = 4;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error(transparent)]
    Usage(#[from] UsageError),
    #[error("{endpoint}: {source}")]
    Conn { endpoint: String, source: ConnError },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("the state file was written for {what} {file}, but this command has {given}: pass the same --records, --seed and --value-size as `run`")]
    StateMismatch {
        what: &'static str,
        file: u64,
        given: u64,
    },
    #[error("cannot write {path}: {source}")]
    Output {
        path: String,
        source: std::io::Error,
    },
}

impl ClientError {
    /// Exit code: 2 for usage and connection problems (nothing was measured), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Usage(_)
            | ClientError::Conn { .. }
            | ClientError::State(_)
            | ClientError::StateMismatch { .. } => 2,
            ClientError::Output { .. } => 1,
        }
    }
}

pub(crate) fn conn_error(endpoint: &str) -> impl FnOnce(ConnError) -> ClientError + '_ {
    move |source| ClientError::Conn {
        endpoint: endpoint.to_string(),
        source,
    }
}

/// One pipelined batch: encoded commands, how many replies they produce, and what the caller
/// needs to interpret those replies.
pub(crate) struct Batch<C> {
    pub commands: Vec<u8>,
    pub replies: usize,
    pub context: C,
}

/// Sends batches keeping [`PIPELINE_DEPTH`] of them in flight, and hands each batch's replies
/// to `handle` in order.
pub(crate) fn pipelined<C>(
    conn: &mut crate::conn::Conn,
    batches: impl Iterator<Item = Batch<C>>,
    mut handle: impl FnMut(C, Vec<crate::resp::Value>) -> Result<(), ConnError>,
) -> Result<(), ConnError> {
    let mut in_flight = std::collections::VecDeque::new();
    let mut receive_oldest =
        |conn: &mut crate::conn::Conn, (replies, context): (usize, C)| -> Result<(), ConnError> {
            let values = (0..replies)
                .map(|_| conn.read_reply(BULK_TIMEOUT))
                .collect::<Result<Vec<_>, _>>()?;
            handle(context, values)
        };
    for batch in batches {
        conn.send(&batch.commands, BULK_TIMEOUT)?;
        in_flight.push_back((batch.replies, batch.context));
        if in_flight.len() > PIPELINE_DEPTH {
            let oldest = in_flight.pop_front().expect("not empty");
            receive_oldest(conn, oldest)?;
        }
    }
    while let Some(oldest) = in_flight.pop_front() {
        receive_oldest(conn, oldest)?;
    }
    Ok(())
}
