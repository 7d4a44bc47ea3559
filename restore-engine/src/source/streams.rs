//! Page streams (`--streams N`): the page frames travel on N connections of their own, each
//! sealed and written by a thread of its own, while the reading thread goes on reading (as
//! QEMU's multifd channels). Each stream is a session of its own: its own handshake, keys and
//! sequence numbers, and its own flow-control credit. The main connection keeps everything
//! else (the filesystem, each round's end, the images, the outcome).
//!
//! The receiver puts a round's pages in place only after the previous round is complete on
//! every stream, so a page sent twice in two rounds on two streams ends up with its later
//! contents. For that, each round's end says how many page frames each stream carried in it
//! (`RoundEnd::stream_frames`).
//!
//! Frames and their buffers circulate: the reading thread fills a frame, hands it to the next
//! stream (round-robin) and takes an emptied one back from a pool. At most two frames wait per
//! stream, so a slow link holds the reader back instead of filling memory.

use std::io::{Read, Write};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

use super::SourceError;
use crate::wire::pages::PageFrame;
use crate::wire::{Control, ControlCode, Kind, Session, WireError};

/// Frames a stream's thread may have queued besides the one it writes.
const QUEUED_PER_STREAM: usize = 1;

/// The most streams a receiver accepts for one migration.
pub const MAX_STREAMS: u32 = 16;

/// How many streams to use by default: one connection does it all (pages included) unless the
/// host has the cores to seal and send on several at once. Each stream costs about a core at
/// line rate on a fast link; the reading thread needs one too.
pub fn default_streams() -> u32 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    if cores < 4 {
        1
    } else {
        (cores / 2).min(4)
    }
}

/// How the pages travel, for a log line: nothing when on the migration's own connection.
pub fn describe(streams: u32) -> String {
    match streams {
        0 | 1 => String::new(),
        n => format!(", pages on {n} connections of their own"),
    }
}

struct Lane {
    jobs: Option<SyncSender<PageFrame>>,
    thread: Option<JoinHandle<Result<(), SourceError>>>,
    /// Page frames handed to this stream in the current round.
    frames: u64,
}

/// The page streams of a migration, seen from the reading thread.
pub struct PageStreams {
    lanes: Vec<Lane>,
    next: usize,
    spare: Receiver<PageFrame>,
}

impl PageStreams {
    /// Starts a thread for each of `sessions` (authenticated page streams, in order).
    pub fn start<S: Read + Write + Send + 'static>(
        sessions: Vec<Session<S>>,
    ) -> Result<PageStreams, SourceError> {
        let (give_back, spare) = mpsc::channel();
        let mut lanes = Vec::with_capacity(sessions.len());
        for (index, session) in sessions.into_iter().enumerate() {
            let (jobs, queue) = mpsc::sync_channel(QUEUED_PER_STREAM);
            let give_back = give_back.clone();
            let thread = std::thread::Builder::new()
                .name(format!("page-stream-{index}"))
                .spawn(move || send_frames(session, queue, give_back))
                .map_err(SourceError::io("starting a page stream's thread"))?;
            lanes.push(Lane {
                jobs: Some(jobs),
                thread: Some(thread),
                frames: 0,
            });
        }
        Ok(PageStreams {
            lanes,
            next: 0,
            spare,
        })
    }

    pub fn len(&self) -> usize {
        self.lanes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lanes.is_empty()
    }

    /// Hands the frame built in `frame` to the next stream and leaves an empty one in its
    /// place. Waits while that stream has a frame queued already.
    pub fn dispatch(&mut self, frame: &mut PageFrame) -> Result<(), SourceError> {
        let index = self.next;
        self.next = (self.next + 1) % self.lanes.len();
        let mut full = self.spare.try_recv().unwrap_or_default();
        std::mem::swap(frame, &mut full);
        let lane = &mut self.lanes[index];
        lane.frames += 1;
        let jobs = lane.jobs.as_ref().expect("streams are ended only once");
        if jobs.send(full).is_err() {
            return Err(self.failure(index));
        }
        Ok(())
    }

    /// The frames each stream carried since the last call (for the round's end).
    pub fn end_round(&mut self) -> Vec<u64> {
        self.lanes
            .iter_mut()
            .map(|lane| std::mem::take(&mut lane.frames))
            .collect()
    }

    /// After the last round: each stream sends what it has queued and says it has ended.
    /// Returns the first stream's error, if any.
    pub fn finish(&mut self) -> Result<(), SourceError> {
        for lane in &mut self.lanes {
            lane.jobs = None;
        }
        let mut first = Ok(());
        for index in 0..self.lanes.len() {
            if let Some(thread) = self.lanes[index].thread.take() {
                let ended = thread.join().unwrap_or_else(|_| {
                    Err(SourceError::io("a page stream")(std::io::Error::other(
                        "its thread panicked",
                    )))
                });
                if first.is_ok() {
                    first = ended;
                }
            }
        }
        first
    }

    /// Why stream `index` stopped taking frames.
    fn failure(&mut self, index: usize) -> SourceError {
        let lane = &mut self.lanes[index];
        lane.jobs = None;
        match lane.thread.take().map(|t| t.join()) {
            Some(Ok(Err(e))) => e,
            _ => SourceError::io(format!("page stream {index}"))(std::io::Error::other(
                "its thread ended early",
            )),
        }
    }
}

/// A stream's thread: seals and writes each frame once the receiver has room for it, gives the
/// emptied frame back, and says so when the reading thread has no more.
fn send_frames<S: Read + Write>(
    mut session: Session<S>,
    queue: Receiver<PageFrame>,
    give_back: mpsc::Sender<PageFrame>,
) -> Result<(), SourceError> {
    for mut frame in queue {
        session.spend(frame.wire_bytes() as u64)?;
        session.send_pages(&mut frame)?;
        let _ = give_back.send(frame);
    }
    session.send(
        Kind::Control,
        &Control {
            code: ControlCode::StreamEnd as i32,
            message: String::new(),
        },
    )?;
    // Closing with the receiver's credit still unread would reset the connection, and a reset
    // can discard frames the receiver has not read yet: the receiver closes first, once it has
    // staged everything.
    match session.receive() {
        Err(WireError::Closed) => Ok(()),
        Err(e) => Err(e.into()),
        Ok(frame) if frame.kind == Kind::Control => {
            let control: Control = frame.decode()?;
            Err(WireError::Refused(control.message).into())
        }
        Ok(frame) => Err(WireError::Unexpected {
            expected: Kind::Credit,
            found: frame.kind,
        }
        .into()),
    }
}
