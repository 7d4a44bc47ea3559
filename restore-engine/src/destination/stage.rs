//! What every received page frame goes through, on the main connection or on a page stream:
//! checked against the receiver's limits, decoded and put in the staging store, its credit
//! returned to the sender; and the errors of receiving a migration.

use super::limits::{Budget, LimitExceeded};
use crate::layer::LayerError;
use crate::page;
use crate::staging::{StagingError, StagingStore};
use crate::wire::pages::{decode_run, ReceivedPages};
use std::io::{Read, Write};

use crate::wire::{Credit, Kind, Session, WireError, INITIAL_CREDIT};

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("staging: {0}")]
    Staging(#[from] StagingError),
    #[error("image file {name}: {source}")]
    ImageFile {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("image file name {0:?} is not a plain file name: refusing it")]
    ImageName(String),
    #[error("the source aborted the migration: {0}")]
    Aborted(String),
    #[error("{0}")]
    Cancelled(String),
    /// The source sent more than the receiver may store (see [`super::limits`]).
    #[error("over a limit of the receiving host: {0}")]
    Limit(String),
    #[error("the container's filesystem: {0}")]
    Layer(#[from] LayerError),
    #[error("the container's filesystem: {0}")]
    LayerMismatch(String),
    #[error("page stream {index}: {source}")]
    Stream {
        index: usize,
        #[source]
        source: Box<ReceiveError>,
    },
}

impl From<LimitExceeded> for ReceiveError {
    fn from(e: LimitExceeded) -> Self {
        ReceiveError::Limit(e.0)
    }
}

/// What one page frame added to the store.
#[derive(Debug, Default, Clone, Copy)]
pub struct Staged {
    pub pages: u64,
    pub zero_pages: u64,
    pub bytes: u64,
}

/// Puts a page frame's pages in `store`, checked against `budget` before they are decoded and
/// the store after.
pub fn stage_frame(
    received: &ReceivedPages,
    store: &mut StagingStore,
    budget: &Budget,
) -> Result<Staged, ReceiveError> {
    let pages = &received.pages;
    budget.check_pages(pages, store)?;
    let mut bytes = 0u64;
    for (run, travelled) in received.runs() {
        let data = decode_run(pages.pid, run, travelled)?;
        store.put(pages.pid, run.vaddr, &data)?;
        bytes += data.len() as u64;
    }
    for &addr in &pages.zero_pages {
        store.put_zero(pages.pid, addr, 1)?;
    }
    budget.check_staged(store)?;
    Ok(Staged {
        pages: bytes / page::SIZE_U64,
        zero_pages: pages.zero_pages.len() as u64,
        bytes,
    })
}

/// Flow-control credit for what this end has consumed, returned to the sender once half the
/// window is used ([`crate::wire::INITIAL_CREDIT`]), so that a sender on a link that keeps up
/// never stalls; and at the end of a round.
#[derive(Default)]
pub struct CreditReturn(u64);

impl CreditReturn {
    /// `bytes` more were consumed: returns the credit when half the window is.
    pub fn consumed<S: Read + Write>(
        &mut self,
        session: &mut Session<S>,
        bytes: u64,
    ) -> Result<(), WireError> {
        self.0 += bytes;
        if self.0 >= INITIAL_CREDIT / 2 {
            self.flush(session)?;
        }
        Ok(())
    }

    /// Returns whatever credit is due.
    pub fn flush<S: Read + Write>(&mut self, session: &mut Session<S>) -> Result<(), WireError> {
        if self.0 > 0 {
            session.send(Kind::Credit, &Credit { bytes: self.0 })?;
            self.0 = 0;
        }
        Ok(())
    }
}
