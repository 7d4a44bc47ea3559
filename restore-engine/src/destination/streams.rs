//! Receiving page streams (the source's `--streams N`, see [`crate::source::streams`]): a thread
//! per stream reads, checks and decrypts its frames and puts their pages in the staging store,
//! which the streams share with the main connection's thread while the rounds arrive.
//!
//! A round's pages go in place only once every stream has put all of the previous round's:
//! a page sent in two rounds on two streams must end up with the later contents. The main
//! connection's round end says how many frames each stream carried in the round; the round is
//! complete when each stream has staged that many. A frame of a later round waits for that; a
//! frame of a round already complete, or more frames than the round's end said, are refused.

use std::io::{Read, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::limits::{Budget, Limits};
use super::stage::{stage_frame, CreditReturn, ReceiveError};
use crate::cancel::Cancel;
use crate::staging::StagingStore;
use crate::wire::pages::ReceivedPages;
use crate::wire::{Control, ControlCode, Kind, RoundEnd, Session, WireError};

/// What the streams and the main connection's thread share.
struct State {
    store: StagingStore,
    /// The last round whose frames are all staged (0: none yet).
    complete: u32,
    /// Frames each stream staged of round `complete + 1`.
    staged: Vec<u64>,
    /// Streams whose source said it sent its last frame.
    ended: Vec<bool>,
    /// The first stream's error (and which stream).
    failed: Option<(usize, ReceiveError)>,
    /// Set when the rounds are over, or failed: the streams stop.
    closed: bool,
    /// Pages, zero pages and bytes staged since the last round's end was taken.
    pages: u64,
    zero_pages: u64,
    bytes: u64,
}

/// The page streams of a migration on the receiving end.
pub struct ReceiveStreams {
    shared: Arc<(Mutex<State>, Condvar)>,
    /// How many there are (their threads are not joined: see the `Drop`).
    count: usize,
}

/// What a round's pages came to on the streams.
#[derive(Debug, Default, Clone, Copy)]
pub struct StreamRound {
    pub pages: u64,
    pub zero_pages: u64,
    pub bytes: u64,
    pub resident_bytes: u64,
}

impl ReceiveStreams {
    /// Starts a thread for each of `sessions` (authenticated streams, in the source's order).
    /// Each frame is checked against `limits` before it is decoded, and the store after.
    pub fn start<S: Read + Write + Send + 'static>(
        sessions: Vec<Session<S>>,
        limits: &Limits,
        cancel: &Cancel,
    ) -> Result<ReceiveStreams, std::io::Error> {
        let count = sessions.len();
        let shared = Arc::new((
            Mutex::new(State {
                store: StagingStore::default(),
                complete: 0,
                staged: vec![0; count],
                ended: vec![false; count],
                failed: None,
                closed: false,
                pages: 0,
                zero_pages: 0,
                bytes: 0,
            }),
            Condvar::new(),
        ));
        for (index, session) in sessions.into_iter().enumerate() {
            let (shared, limits, cancel) = (shared.clone(), *limits, cancel.clone());
            std::thread::Builder::new()
                .name(format!("page-stream-{index}"))
                .spawn(move || {
                    let result = receive_frames(index, session, &shared, &limits, &cancel);
                    let (state, changed) = &*shared;
                    let mut state = lock(state);
                    match result {
                        Ok(()) => state.ended[index] = true,
                        Err(e) => {
                            if state.failed.is_none() && !state.closed {
                                state.failed = Some((index, e));
                            }
                        }
                    }
                    changed.notify_all();
                })?;
        }
        Ok(ReceiveStreams { shared, count })
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The store goes to the streams for the rounds (the caller's is left empty).
    pub fn lend(&self, store: &mut StagingStore) {
        let mut state = lock(&self.shared.0);
        std::mem::swap(&mut state.store, store);
    }

    /// Takes the store back and stops the streams (at the end of the rounds, or on failure).
    pub fn take_back(&self, store: &mut StagingStore) {
        let (state, changed) = &*self.shared;
        let mut state = lock(state);
        state.closed = true;
        std::mem::swap(&mut state.store, store);
        changed.notify_all();
    }

    /// Waits until every stream has staged its share of `end`'s round; returns what they
    /// staged since the previous round's end.
    pub fn end_round(&self, end: &RoundEnd, cancel: &Cancel) -> Result<StreamRound, ReceiveError> {
        let protocol = |problem: String| ReceiveError::Wire(WireError::BadPageFrame(problem));
        let (state, changed) = &*self.shared;
        let mut state = lock(state);
        if end.stream_frames.len() != state.staged.len() {
            return Err(protocol(format!(
                "round {} names frames of {} streams, the migration has {}",
                end.round,
                end.stream_frames.len(),
                state.staged.len()
            )));
        }
        if end.round != state.complete + 1 {
            return Err(protocol(format!(
                "round {} ended after round {}",
                end.round, state.complete
            )));
        }
        loop {
            if let Some(reason) = cancel.reason() {
                return Err(ReceiveError::Cancelled(reason));
            }
            if let Some((index, e)) = state.failed.take() {
                return Err(stream_failed(index, e));
            }
            let mut done = true;
            for (index, (&staged, &declared)) in
                state.staged.iter().zip(&end.stream_frames).enumerate()
            {
                if staged > declared {
                    return Err(protocol(format!(
                        "page stream {index} carried {staged} frames of round {}, its end says {declared}",
                        end.round
                    )));
                }
                if staged < declared {
                    if state.ended[index] {
                        return Err(protocol(format!(
                            "page stream {index} ended after {staged} of the {declared} frames of round {}",
                            end.round
                        )));
                    }
                    done = false;
                }
            }
            if done {
                break;
            }
            state = changed
                .wait_timeout(state, Duration::from_millis(200))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        state.complete = end.round;
        state.staged.iter_mut().for_each(|s| *s = 0);
        changed.notify_all();
        Ok(StreamRound {
            pages: std::mem::take(&mut state.pages),
            zero_pages: std::mem::take(&mut state.zero_pages),
            bytes: std::mem::take(&mut state.bytes),
            resident_bytes: state.store.footprint(),
        })
    }

    /// A stream's error, if one failed (to report it rather than what it caused elsewhere).
    pub fn failure(&self) -> Option<ReceiveError> {
        lock(&self.shared.0)
            .failed
            .take()
            .map(|(index, e)| stream_failed(index, e))
    }
}

impl Drop for ReceiveStreams {
    fn drop(&mut self) {
        let (state, changed) = &*self.shared;
        lock(state).closed = true;
        changed.notify_all();
        // The threads end when their source closes its streams (it does when the migration
        // ends either way), or the connection dies; nothing waits for them here.
    }
}

fn stream_failed(index: usize, e: ReceiveError) -> ReceiveError {
    ReceiveError::Stream {
        index,
        source: Box::new(e),
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// A stream's thread: frames until the source says the stream ended.
fn receive_frames<S: Read + Write>(
    index: usize,
    mut session: Session<S>,
    shared: &(Mutex<State>, Condvar),
    limits: &Limits,
    cancel: &Cancel,
) -> Result<(), ReceiveError> {
    let budget = Budget::new(limits);
    let mut credit = CreditReturn::default();
    loop {
        if let Some(reason) = cancel.reason() {
            return Err(ReceiveError::Cancelled(reason));
        }
        let frame = session.receive()?;
        match frame.kind {
            Kind::Pages => {
                let received = ReceivedPages::parse(&frame.payload)?;
                let round = received.pages.round;
                let (state, changed) = shared;
                let mut state = lock(state);
                // Wait for the rounds before this frame's to be complete everywhere.
                while !state.closed && state.failed.is_none() && round > state.complete + 1 {
                    state = changed
                        .wait_timeout(state, Duration::from_millis(200))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                    if let Some(reason) = cancel.reason() {
                        return Err(ReceiveError::Cancelled(reason));
                    }
                }
                if state.closed || state.failed.is_some() {
                    return Ok(());
                }
                if round <= state.complete {
                    return Err(ReceiveError::Wire(WireError::BadPageFrame(format!(
                        "a frame of round {round} arrived after that round ended"
                    ))));
                }
                let staged = stage_frame(&received, &mut state.store, &budget)?;
                state.pages += staged.pages;
                state.zero_pages += staged.zero_pages;
                state.bytes += staged.bytes;
                state.staged[index] += 1;
                changed.notify_all();
                drop(state);
                let wire = received.wire_bytes();
                drop(received);
                session.recycle(frame.payload);
                credit.consumed(&mut session, wire)?;
            }
            Kind::Control => {
                let control: Control = frame.decode()?;
                return match ControlCode::try_from(control.code) {
                    Ok(ControlCode::StreamEnd) => Ok(()),
                    Ok(ControlCode::Abort) => Err(ReceiveError::Aborted(control.message)),
                    _ => Err(WireError::Unexpected {
                        expected: Kind::Pages,
                        found: Kind::Control,
                    }
                    .into()),
                };
            }
            other => {
                return Err(WireError::Unexpected {
                    expected: Kind::Pages,
                    found: other,
                }
                .into())
            }
        }
    }
}
