//! The destination's side of the migration transaction: its record, shared by the conversation,
//! the resume gate and the outcome answerer, and moved from phase to phase under one lock so
//! that "resume" and "abort" can never both happen.
//!
//! The destination decides: it records `running` (at the resume gate, before the restored tasks
//! may resume: the point of no return) or `aborted` (before telling the source to resume, and
//! only while nothing was resumed), and once every page is installed in live tasks `committed`,
//! or `lost` if the resumed container died first. The source learns the decision from the
//! conversation or, if that breaks, by asking ([`answer_query`]).

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::record::{Phase, Record, RecordError, Role, Store};
use crate::wire::{Control, ControlCode, Kind, Outcome, Session, WireError};

/// The destination's record of the migration it receives, shared between threads.
#[derive(Clone)]
pub struct DestinationTxn(Arc<(Mutex<State>, Condvar)>);

struct State {
    store: Store,
    record: Option<Record>,
    peer: String,
}

/// Why the gate did not let the restored tasks resume.
#[derive(Debug, thiserror::Error)]
pub enum GateRefused {
    #[error("the migration is {0}: the restored tasks must not resume")]
    Phase(Phase),
    #[error("no migration is being restored here")]
    NoMigration,
    #[error(transparent)]
    Record(#[from] RecordError),
}

impl DestinationTxn {
    pub fn new(store: Store) -> Self {
        DestinationTxn(Arc::new((
            Mutex::new(State {
                store,
                record: None,
                peer: String::new(),
            }),
            Condvar::new(),
        )))
    }

    /// The transaction of migration `migration_id` as its record on disk says (to answer the
    /// source's questions after the receiving server is gone).
    pub fn load(store: Store, migration_id: &str) -> Result<Self, RecordError> {
        let record = store.read(migration_id, Role::Destination)?;
        let peer = record.as_ref().map(|r| r.peer.clone()).unwrap_or_default();
        Ok(DestinationTxn(Arc::new((
            Mutex::new(State {
                store,
                record,
                peer,
            }),
            Condvar::new(),
        ))))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.0 .0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The source of migration `migration_id` (container `container`, from `peer`) arrived.
    pub fn begin(
        &self,
        migration_id: &str,
        container: &str,
        peer: &str,
    ) -> Result<(), RecordError> {
        let mut state = self.lock();
        let record = Record::new(
            migration_id,
            container,
            Role::Destination,
            peer,
            Phase::Receiving,
        );
        state.store.write(&record)?;
        state.record = Some(record);
        state.peer = peer.to_string();
        Ok(())
    }

    /// The migration's id, once the source arrived.
    pub fn migration_id(&self) -> Option<String> {
        self.lock().record.as_ref().map(|r| r.migration_id.clone())
    }

    pub fn phase(&self) -> Option<Phase> {
        self.lock().record.as_ref().map(|r| r.phase)
    }

    /// Records a new phase (durably, before the caller acts on it).
    pub fn enter(&self, phase: Phase, reason: Option<String>) -> Result<(), RecordError> {
        let mut state = self.lock();
        let store = state.store.clone();
        if let Some(record) = state.record.as_mut() {
            record.enter(phase, reason);
            store.write(record)?;
        }
        drop(state);
        self.0 .1.notify_all();
        Ok(())
    }

    /// The resume gate: the restored tasks may resume only if the migration is still being
    /// restored, and only once `running` is on disk.
    pub fn decide_resume(&self) -> Result<(), GateRefused> {
        let mut state = self.lock();
        let store = state.store.clone();
        let record = state.record.as_mut().ok_or(GateRefused::NoMigration)?;
        if record.phase != Phase::Restoring {
            return Err(GateRefused::Phase(record.phase));
        }
        crate::fault::point("destination::before-resume").map_err(|e| {
            GateRefused::Record(RecordError::Write {
                path: store.dir().to_owned(),
                source: e,
            })
        })?;
        record.enter(Phase::Running, None);
        store.write(record)?;
        Ok(())
    }

    /// Ends the migration after a failure: `aborted` if the restored tasks never resumed here
    /// (the source may resume), `lost` if they did. Returns the phase recorded.
    pub fn fail(&self, reason: &str) -> Result<Phase, RecordError> {
        let mut state = self.lock();
        let store = state.store.clone();
        let Some(record) = state.record.as_mut() else {
            return Ok(Phase::Aborted);
        };
        if record.phase.is_final() {
            return Ok(record.phase);
        }
        let phase = if record.phase == Phase::Running {
            Phase::Lost
        } else {
            Phase::Aborted
        };
        record.enter(phase, Some(reason.to_string()));
        store.write(record)?;
        drop(state);
        self.0 .1.notify_all();
        Ok(phase)
    }

    /// The source has the final outcome.
    pub fn acknowledge(&self) {
        let mut state = self.lock();
        let store = state.store.clone();
        if let Some(record) = state.record.as_mut() {
            if !record.acknowledged {
                record.acknowledged = true;
                if let Err(e) = store.write(record) {
                    log::warn!("{e}");
                }
            }
        }
        drop(state);
        self.0 .1.notify_all();
    }

    pub fn acknowledged(&self) -> bool {
        self.lock().record.as_ref().is_some_and(|r| r.acknowledged)
    }

    /// Waits until the source acknowledged the outcome, or `timeout`.
    pub fn wait_acknowledged(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if state.record.as_ref().is_some_and(|r| r.acknowledged) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .0
                 .1
                .wait_timeout(state, left)
                .map(|(s, _)| s)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// What to answer a query about `migration_id`.
    pub fn outcome(&self, migration_id: &str) -> Outcome {
        let state = self.lock();
        let record = match state.record.as_ref() {
            Some(r) if r.migration_id == migration_id => Some(r.clone()),
            // Not the migration in progress: perhaps an earlier one.
            _ => state
                .store
                .read(migration_id, Role::Destination)
                .ok()
                .flatten(),
        };
        match record {
            Some(r) => Outcome {
                migration_id: migration_id.to_string(),
                known: true,
                phase: r.phase.name().to_string(),
                reason: r.reason.unwrap_or_default(),
            },
            None => Outcome {
                migration_id: migration_id.to_string(),
                known: false,
                phase: String::new(),
                reason: String::new(),
            },
        }
    }
}

/// Answers one query session: the outcome, then (if it was final) the source's acknowledgement.
pub fn answer_query<S: std::io::Read + std::io::Write>(
    mut session: Session<S>,
    txn: &DestinationTxn,
) -> Result<(), WireError> {
    let id = session.intent().migration_id.clone();
    let outcome = txn.outcome(&id);
    let is_final = Phase::parse(&outcome.phase).is_some_and(|p| p.is_final());
    session.send(Kind::Outcome, &outcome)?;
    if outcome.known && is_final {
        let ack: Control = session.expect(Kind::Control)?;
        if ack.code == ControlCode::Ack as i32 && txn.migration_id().as_deref() == Some(&id) {
            txn.acknowledge();
        }
    }
    Ok(())
}
