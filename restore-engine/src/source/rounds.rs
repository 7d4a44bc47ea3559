//! Pre-copy rounds: the dirty pages of the source's running tasks, round after round, into
//! the session; then the freeze and the last round. Tasks are named on the wire by their pid in
//! the container's pid namespace (as CRIU's images name them); memory is read through host pids.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::SourceError;
use crate::clock::unix_now;
use crate::layer::{self, Item, LayerRoundStats, Scanner};
use crate::memory::{Delta, DirtyTracker, Quiesce, TrackError};
use crate::page;
use crate::policy::{ConvergencePolicy, LinkRate, StopReason};
use crate::wire::pages::{PageFrame, BATCH_BYTES};
use crate::wire::{Kind, LayerSync, RoundEnd, Session, HEADER_LEN};

// A streamed piece's front room holds a frame header: the sender seals it where it lies.
const _: () = assert!(crate::memory::PIECE_FRONT_ROOM == HEADER_LEN);

/// Zero pages one frame names at most: their addresses (up to 8 bytes each) and an 8 MiB batch
/// stay within a frame's payload limit.
const ZERO_PAGES_PER_FRAME: usize = 64 << 10;

/// Statistics of one round.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RoundStats {
    pub round: u32,
    pub pages: u64,
    pub zero_pages: u64,
    /// Page data of the round.
    pub bytes: u64,
    /// What crossed the link for it (less than `bytes` when compression paid).
    pub wire_bytes: u64,
    pub scan_seconds: f64,
    /// Time spent sending the round's pages (waiting for the link, the receiver's credit and
    /// the pace included).
    pub send_seconds: f64,
    pub seconds: f64,
    /// CPU time the source spent on this round (reading, hashing, sending).
    pub cpu_seconds: f64,
    /// Frozen (the final round) or not.
    pub frozen: bool,
    /// Bytes/s the link carried during this round.
    pub link_bytes_per_second: f64,
    /// Bytes/s the workload dirtied: this round's data over the time since the previous
    /// round started (pages dirtied while that one was read and sent). None for round 1.
    pub dirty_bytes_per_second: Option<f64>,
    /// Projected seconds until the pause at these rates (None once decided or unknown).
    pub eta_seconds: Option<f64>,
    /// Unix time the round ended (to line rounds up with a client's view of the service).
    pub end_unix: f64,
    /// The container's filesystem in this round (None: it does not travel).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer: Option<LayerRoundStats>,
}

/// What happens to the container's filesystem during pre-copy.
pub enum SourceLayer {
    /// Its changes travel each round ([`Scanner`]).
    Copy(Scanner),
    /// Both hosts see the same storage: only its digest travels, at the end, for the
    /// destination to check.
    Shared(std::path::PathBuf),
}

// CPU time of this process: the sending thread and the tracker's hashing threads (the shim's
// other threads are idle during a migration).
use crate::clock::process_cpu_seconds;

/// What a pre-copy did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceReport {
    pub tracker: String,
    pub rounds: Vec<RoundStats>,
    pub stop: Option<StopReason>,
    /// Time the source was frozen for its last round of memory (the images come after).
    pub final_round_seconds: f64,
}

/// A task to migrate: its host pid (to read memory) and its pid in the container's namespace
/// (the name in CRIU's images and on the wire).
#[derive(Debug, Clone, Copy)]
pub struct TaskIds {
    pub host_pid: u32,
    pub ns_pid: u32,
}

/// The sending end of pre-copy.
pub struct Sender<'a, S: Read + Write> {
    session: &'a mut Session<S>,
    compress: bool,
    layer: Option<SourceLayer>,
    pacer: super::pace::Pacer,
    cpu: super::pace::CpuBudget,
    /// The page frame being built (its buffer is reused frame after frame).
    frame: PageFrame,
    /// Page bytes a held round keeps at most ([`HOLD_LIMIT`]).
    hold_limit: usize,
    /// Connections of their own for the page frames (None: they go on `session`).
    streams: Option<super::streams::PageStreams>,
}

impl<'a, S: Read + Write> Sender<'a, S> {
    pub fn new(session: &'a mut Session<S>) -> Self {
        Sender {
            session,
            compress: false,
            layer: None,
            pacer: super::pace::Pacer::new(None),
            cpu: super::pace::CpuBudget::new(None),
            frame: PageFrame::default(),
            hold_limit: HOLD_LIMIT,
            streams: None,
        }
    }

    /// Sends the page frames on `streams` (`--streams`), and the rest on the session.
    pub fn streams(mut self, streams: Option<super::streams::PageStreams>) -> Self {
        self.streams = streams.filter(|s| !s.is_empty());
        self
    }

    /// Bounds what a held frozen round keeps in memory (tests: a small bound).
    pub fn hold_limit(mut self, bytes: usize) -> Self {
        self.hold_limit = bytes;
        self
    }

    /// Bounds the cores the live rounds use (`--max-cpu`).
    pub fn max_cpu(mut self, cores: Option<f64>) -> Self {
        self.cpu = super::pace::CpuBudget::new(cores);
        self
    }

    /// Bounds what the live rounds send per second (`--max-bandwidth`).
    pub fn max_bandwidth(mut self, bytes_per_second: Option<u64>) -> Self {
        self.pacer = super::pace::Pacer::new(bytes_per_second);
        self
    }

    /// Moves the container's filesystem too, as `layer` says.
    pub fn layer(mut self, layer: Option<SourceLayer>) -> Self {
        self.layer = layer;
        self
    }

    /// Sends what changed in the filesystem since the last round.
    fn send_layer(&mut self, scanner: &mut Scanner) -> Result<LayerRoundStats, SourceError> {
        let mut failed: Option<SourceError> = None;
        let mut sink = |item: Item| {
            let sent = match item {
                Item::Entry(entry) => self
                    .session
                    .send(Kind::LayerEntry, &entry)
                    .map_err(SourceError::from),
                Item::Block(block) => {
                    self.wait_for_credit(block.data.len() as u64)
                        .and_then(|()| {
                            self.session
                                .send(Kind::LayerBlock, &block)
                                .map_err(SourceError::from)
                        })
                }
            };
            sent.map_err(|e| failed = Some(e))
        };
        match scanner.round(&mut sink) {
            Ok(stats) => Ok(stats),
            Err(layer::LayerError::Stopped) => {
                Err(failed.expect("a stopped round has the sink's error"))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// LZ4-compresses page runs where that saves enough.
    pub fn compress(mut self, compress: bool) -> Self {
        self.compress = compress;
        self
    }

    fn wait_for_credit(&mut self, bytes: u64) -> Result<(), SourceError> {
        self.pacer.pace(bytes);
        Ok(self.session.spend(bytes)?)
    }

    /// Sends one task's delta in frames of at most BATCH_BYTES of page data (and at most
    /// [`ZERO_PAGES_PER_FRAME`] zero pages). A streamed piece that fits one frame is sealed and
    /// sent in its own buffer; anything else is copied into frames. Returns the bytes put on
    /// the wire.
    fn send_delta(
        &mut self,
        ns_pid: u32,
        round: u32,
        delta: &mut Delta,
    ) -> Result<u64, SourceError> {
        let fits = delta.front() == HEADER_LEN
            && delta.data_pages() * page::SIZE_U64 <= BATCH_BYTES as u64
            && delta.zero.len() <= ZERO_PAGES_PER_FRAME;
        if fits && !self.compress {
            let (buffer, runs, zero) = delta.parts_mut();
            self.frame
                .adopt(buffer, ns_pid, round, runs.iter().copied(), zero);
            let sent = self.send_frame();
            self.frame.give_back(delta.buffer_mut());
            return sent;
        }
        let mut sent = 0u64;
        self.frame.start(ns_pid, round);
        for &addr in &delta.zero {
            if self.frame.zero_pages() >= ZERO_PAGES_PER_FRAME {
                sent += self.flush(ns_pid, round)?;
            }
            self.frame.push_zero(addr);
        }
        for (start, data) in delta.runs() {
            for (k, chunk) in data.chunks(BATCH_BYTES).enumerate() {
                if self.frame.page_bytes() + chunk.len() > BATCH_BYTES {
                    sent += self.flush(ns_pid, round)?;
                }
                self.frame
                    .push_run(start + (k * BATCH_BYTES) as u64, chunk, self.compress);
            }
        }
        if !self.frame.is_empty() {
            sent += self.flush(ns_pid, round)?;
        }
        Ok(sent)
    }

    /// Sends the frame being built once the receiver has room for it. Returns its bytes on
    /// the wire.
    fn send_frame(&mut self) -> Result<u64, SourceError> {
        let wire = self.frame.wire_bytes() as u64;
        if let Some(streams) = self.streams.as_mut() {
            // Each stream waits for its own credit.
            self.pacer.pace(wire);
            streams.dispatch(&mut self.frame)?;
            return Ok(wire);
        }
        self.wait_for_credit(wire)?;
        self.session.send_pages(&mut self.frame)?;
        Ok(wire)
    }

    /// [`Self::send_frame`], then starts the next frame.
    fn flush(&mut self, ns_pid: u32, round: u32) -> Result<u64, SourceError> {
        let wire = self.send_frame()?;
        self.frame.start(ns_pid, round);
        Ok(wire)
    }

    /// One round, read and sent.
    fn round(
        &mut self,
        round: u32,
        tasks: &mut dyn FnMut() -> Result<Vec<TaskIds>, SourceError>,
        tracker: &mut dyn DirtyTracker,
        quiesce: &mut dyn Quiesce,
        frozen: bool,
    ) -> Result<RoundStats, SourceError> {
        let read = self.read_round(round, tasks, tracker, quiesce, frozen, false)?;
        self.end_round(read)
    }

    /// Reads a round's changes and sends them as they are found, or, with `hold`, keeps pieces
    /// of them while they fit in [`Self::hold_limit`] bytes (sending the others as found) for
    /// [`Self::end_round`].
    fn read_round(
        &mut self,
        round: u32,
        tasks: &mut dyn FnMut() -> Result<Vec<TaskIds>, SourceError>,
        tracker: &mut dyn DirtyTracker,
        quiesce: &mut dyn Quiesce,
        frozen: bool,
        hold: bool,
    ) -> Result<ReadRound, SourceError> {
        let started = Instant::now();
        let cpu_start = process_cpu_seconds();
        self.pacer.frozen(frozen);
        self.cpu.round(frozen);
        let mut stats = RoundStats {
            round,
            frozen,
            ..Default::default()
        };
        // The filesystem first, the memory last: the next round's (and the frozen round's)
        // memory is what was dirtied since this round read it, so the time spent on files here
        // does not add to it. In the last round, while frozen.
        let (mut sync, mut layer_digest) = (LayerSync::NotSent, Vec::new());
        match self.layer.take() {
            Some(SourceLayer::Copy(mut scanner)) => {
                let sent = self.send_layer(&mut scanner);
                self.layer = Some(SourceLayer::Copy(scanner));
                let sent = sent?;
                stats.wire_bytes += sent.bytes;
                stats.layer = Some(sent);
                sync = LayerSync::Sent;
            }
            Some(SourceLayer::Shared(root)) => {
                if frozen {
                    layer_digest = layer::tree_digest(&root)?;
                }
                self.layer = Some(SourceLayer::Shared(root));
                sync = LayerSync::Shared;
            }
            None => {}
        }
        let (mut scan, mut send) = (Duration::ZERO, Duration::ZERO);
        let mut held: Vec<(u32, Delta)> = Vec::new();
        let mut held_bytes = 0usize;
        // The task list is taken anew each round: processes come and go while the container
        // runs (once frozen, the list is the one CRIU dumps).
        let tasks = tasks()?;
        let host_pids: Vec<u32> = tasks.iter().map(|t| t.host_pid).collect();
        tracker.begin_round(&host_pids, quiesce, frozen)?;
        for task in tasks {
            let task_start = Instant::now();
            let mut sending = Duration::ZERO;
            let mut failed: Option<SourceError> = None;
            // Pieces of the task's changed pages go out as the tracker finds them: the source
            // never holds more than a piece (the first round is the whole container), or what
            // a held round keeps.
            let tracked = tracker.round_into(task.host_pid, &mut |delta: &mut Delta| {
                stats.pages += delta.data_pages();
                stats.zero_pages += delta.zero.len() as u64;
                stats.bytes += delta.data_pages() * page::SIZE_U64;
                let bytes = delta.held_bytes();
                if hold && held_bytes + bytes <= self.hold_limit {
                    held_bytes += bytes;
                    held.push((task.ns_pid, delta.to_held()));
                    return Ok(());
                }
                // No room left for it: it goes now, what is held goes beside the dump (a page
                // appears once in a round, so their order does not matter).
                let send_start = Instant::now();
                let sent = self.send_delta(task.ns_pid, round, delta);
                sending += send_start.elapsed();
                self.cpu.keep();
                match sent {
                    Ok(wire) => {
                        stats.wire_bytes += wire;
                        Ok(())
                    }
                    Err(e) => {
                        failed = Some(e);
                        Err(())
                    }
                }
            });
            scan += task_start.elapsed().saturating_sub(sending);
            send += sending;
            match tracked {
                Ok(()) => {}
                Err(TrackError::Stopped) => {
                    return Err(failed.expect("a stopped round has the sink's error"))
                }
                // It exited since the list was taken: nothing of it will be restored (pages
                // already sent for it stay unused in the staging store).
                Err(e) if e.task_vanished() && !frozen => continue,
                Err(e) => return Err(e.into()),
            }
        }
        stats.scan_seconds = scan.as_secs_f64();
        stats.send_seconds = send.as_secs_f64();
        stats.cpu_seconds = process_cpu_seconds() - cpu_start;
        Ok(ReadRound {
            stats,
            started,
            held,
            layer: sync,
            layer_digest,
        })
    }

    /// Sends what `read` held and the round's end; returns the round's statistics.
    fn end_round(&mut self, read: ReadRound) -> Result<RoundStats, SourceError> {
        let ReadRound {
            mut stats,
            started,
            held,
            layer,
            layer_digest,
        } = read;
        let send_start = Instant::now();
        // This thread sends, or, with page streams, theirs: the process's CPU then (a held
        // round's read was counted for the whole process; the final dump's thread meanwhile
        // waits on runc, which is not this process).
        let cpu_clock = match self.streams {
            Some(_) => crate::clock::process_cpu_seconds,
            None => crate::clock::thread_cpu_seconds,
        };
        let cpu_start = cpu_clock();
        for (ns_pid, mut piece) in held {
            stats.wire_bytes += self.send_delta(ns_pid, stats.round, &mut piece)?;
        }
        self.session.send(
            Kind::RoundEnd,
            &RoundEnd {
                round: stats.round,
                pages: stats.pages,
                bytes: stats.bytes,
                last: stats.frozen,
                layer: layer as i32,
                layer_digest,
                stream_frames: self
                    .streams
                    .as_mut()
                    .map(|s| s.end_round())
                    .unwrap_or_default(),
            },
        )?;
        if stats.frozen {
            if let Some(streams) = self.streams.as_mut() {
                // The last round is sent once every stream has written its share.
                streams.finish()?;
            }
        }
        stats.send_seconds += send_start.elapsed().as_secs_f64();
        stats.cpu_seconds += cpu_clock() - cpu_start;
        stats.seconds = started.elapsed().as_secs_f64();
        stats.link_bytes_per_second = if stats.seconds > 0.0 {
            stats.wire_bytes as f64 / stats.seconds
        } else {
            0.0
        };
        stats.end_unix = unix_now();
        Ok(stats)
    }

    /// Runs rounds while the tasks run, then `freeze`s them and sends the last round.
    /// `quiesce` freezes them for a moment when the tracker needs it (soft-dirty);
    /// `on_round` sees every round's statistics (progress).
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &mut self,
        tasks: impl FnMut() -> Result<Vec<TaskIds>, SourceError>,
        tracker: &mut dyn DirtyTracker,
        quiesce: &mut dyn Quiesce,
        policy: &ConvergencePolicy,
        freeze: impl FnOnce() -> Result<(), SourceError>,
        mut on_round: impl FnMut(&RoundStats),
    ) -> Result<SourceReport, SourceError> {
        let (mut report, frozen) = self.run_until_frozen(
            tasks,
            tracker,
            quiesce,
            policy,
            freeze,
            &mut on_round,
            false,
        )?;
        let last = self.send_frozen(frozen, &mut report)?;
        on_round(&last);
        Ok(report)
    }

    /// [`Self::run`] up to the frozen round read: with `hold`, that round's pages (up to
    /// [`HOLD_LIMIT`]) are read but not yet sent, so that CRIU's final dump can run while
    /// [`Self::send_frozen`] sends them. They are read before CRIU injects its parasite, which
    /// rewrites code of the frozen tasks while it runs.
    #[allow(clippy::too_many_arguments)]
    pub fn run_until_frozen(
        &mut self,
        mut tasks: impl FnMut() -> Result<Vec<TaskIds>, SourceError>,
        tracker: &mut dyn DirtyTracker,
        quiesce: &mut dyn Quiesce,
        policy: &ConvergencePolicy,
        freeze: impl FnOnce() -> Result<(), SourceError>,
        on_round: &mut dyn FnMut(&RoundStats),
        hold: bool,
    ) -> Result<(SourceReport, FrozenRound), SourceError> {
        let mut report = SourceReport {
            tracker: tracker.name().into(),
            ..Default::default()
        };
        let mut previous: Option<u64> = None;
        let mut previous_seconds: Option<f64> = None;
        let mut link = LinkRate::default();
        let mut round = 1u32;
        loop {
            let mut stats = self.round(round, &mut tasks, tracker, quiesce, false)?;
            // The rate at which the frozen round will move what is left: the link's, measured
            // while sending; before a round has sent enough to measure it, what the round moved
            // (memory and file data) over its whole time.
            link.observe(stats.bytes, stats.send_seconds);
            let layer_bytes = stats.layer.as_ref().map_or(0, |l| l.bytes);
            let bandwidth = link.or(if stats.seconds > 0.0 {
                (stats.bytes + layer_bytes) as f64 / stats.seconds
            } else {
                f64::INFINITY
            });
            // A page read in this round was last read in the previous one: on average half a
            // round of each earlier, so the time it had to get dirty is the mean of the two.
            stats.dirty_bytes_per_second = previous_seconds
                .map(|s| stats.bytes as f64 / ((s + stats.seconds) / 2.0).max(1e-3));
            let decision = policy.decide(round, stats.bytes, previous, bandwidth);
            if decision.is_none() {
                stats.eta_seconds = stats.dirty_bytes_per_second.and_then(|dirty_rate| {
                    policy.projected_seconds_to_pause(
                        round,
                        previous,
                        stats.bytes,
                        stats.seconds,
                        dirty_rate,
                        bandwidth,
                    )
                });
            }
            on_round(&stats);
            previous = Some(stats.bytes);
            previous_seconds = Some(stats.seconds);
            report.rounds.push(stats);
            if let Some(reason) = decision {
                report.stop = Some(reason);
                break;
            }
            round += 1;
        }
        freeze()?;
        // The frozen tasks leave every core to the last round, which is all downtime.
        tracker.set_threads(std::thread::available_parallelism().map_or(1, |n| n.get()));
        let last = self.read_round(round + 1, &mut tasks, tracker, quiesce, true, hold)?;
        let prepared = Instant::now();
        tracker.prepare_dump();
        log::debug!(
            "{} tracker ready for the dump in {:.1} ms",
            tracker.name(),
            prepared.elapsed().as_secs_f64() * 1e3
        );
        Ok((report, FrozenRound(last)))
    }

    /// Sends what the frozen round held and its end, and adds it to `report`.
    pub fn send_frozen(
        &mut self,
        frozen: FrozenRound,
        report: &mut SourceReport,
    ) -> Result<RoundStats, SourceError> {
        let last = self.end_round(frozen.0)?;
        report.final_round_seconds = last.seconds;
        report.rounds.push(last.clone());
        Ok(last)
    }
}

/// Page bytes a held frozen round keeps in memory at most; beyond it, the rest is sent as it
/// is read, before the dump starts, and what is held goes beside the dump. The frozen round
/// carries what the link moves within the policy's downtime target (0.3 s: about 36 MiB at
/// 1 Gbit/s), unless rounds stopped shrinking.
pub const HOLD_LIMIT: usize = 64 << 20;

/// A round read and not yet (wholly) sent.
struct ReadRound {
    stats: RoundStats,
    started: Instant,
    /// Pieces read and not yet sent: (task's pid in the container, its pages).
    held: Vec<(u32, Delta)>,
    /// How the filesystem went in this round, for the round's end (sent after the held pieces).
    layer: LayerSync,
    layer_digest: Vec<u8>,
}

/// The frozen round, read: [`Sender::send_frozen`] sends what it holds.
pub struct FrozenRound(ReadRound);

impl FrozenRound {
    /// Page bytes read and not yet sent.
    pub fn held_bytes(&self) -> usize {
        self.0.held.iter().map(|(_, d)| d.held_bytes()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destination::receive::{receive_rounds, ReceiveError, ReceiveReport};
    use crate::memory::HashTracker;
    use crate::staging::{PageRef, StagingStore};
    use crate::testsupport::{assert_staged, region_of, Writer};
    use crate::wire::{accept, connect, Auth, Intent};
    use std::os::unix::net::UnixStream;
    use std::thread;

    type Received = (StagingStore, Result<ReceiveReport, ReceiveError>);

    /// A session to a receiver that stages what it gets (its store and report come back when
    /// the last round has arrived).
    fn to_a_receiver() -> (Session<UnixStream>, thread::JoinHandle<Received>) {
        let (a, b) = UnixStream::pair().unwrap();
        let key = Auth::Key(vec![5; 32]);
        let server_key = key.clone();
        let receiver = thread::spawn(move || {
            let mut session = accept(b, &server_key).unwrap();
            let mut store = StagingStore::default();
            let report = receive_rounds(
                &mut session,
                None,
                &mut store,
                &crate::destination::Limits::unlimited(),
            );
            (store, report)
        });
        (connect(a, &key, &Intent::default()).unwrap(), receiver)
    }

    #[test]
    fn rounds_converge_and_the_staged_memory_equals_the_frozen_source() {
        staged_memory_equals_the_frozen_source(&mut HashTracker::default());
    }

    #[test]
    fn with_the_write_protect_tracker_the_staged_memory_equals_the_frozen_source() {
        match crate::memory::UffdWpTracker::new() {
            Ok(mut tracker) => staged_memory_equals_the_frozen_source(&mut tracker),
            Err(e) => eprintln!("SKIPPED (LOUDLY): {e}"),
        }
    }

    fn staged_memory_equals_the_frozen_source(tracker: &mut dyn DirtyTracker) {
        let writer = Writer::start();
        let (mut session, receiver) = to_a_receiver();
        let tasks = [TaskIds {
            host_pid: writer.pid as u32,
            ns_pid: 1,
        }];
        let policy = ConvergencePolicy {
            max_rounds: 4,
            ..Default::default()
        };
        let pid = writer.pid;
        let report = Sender::new(&mut session)
            .run(
                || Ok(tasks.to_vec()),
                tracker,
                &mut crate::memory::NoQuiesce,
                &policy,
                || {
                    crate::testsupport::stop(pid);
                    Ok(())
                },
                |_| {},
            )
            .unwrap();
        let (store, received) = receiver.join().unwrap();
        let received = received.unwrap();
        assert!(report.rounds.len() >= 2, "{report:?}");
        assert!(report.rounds.last().unwrap().frozen);
        assert!(
            report.rounds[0].pages >= 4096,
            "the first round copies the region"
        );
        assert_eq!(
            received.pages,
            report.rounds.iter().map(|r| r.pages).sum::<u64>()
        );

        // Every page of the frozen writer's region is staged with its final content.
        assert_staged(&store, &writer, &region_of(&writer));
    }

    #[test]
    fn a_held_frozen_round_sends_what_was_read_before_the_dump_began() {
        held_frozen_round(HOLD_LIMIT);
    }

    #[test]
    fn a_frozen_round_beyond_the_hold_limit_is_sent_before_the_dump() {
        // The hash tracker hands the frozen round over whole: with no room, it all goes at once.
        held_frozen_round(0);
    }

    /// CRIU's parasite rewrites code of the frozen tasks while the dump runs beside the frozen
    /// round's transfer: what goes out must be what was read before it started, whether held
    /// (up to `limit`) or sent before.
    fn held_frozen_round(limit: usize) {
        let mut tracker = HashTracker::default();
        let writer = Writer::start();
        let (mut session, receiver) = to_a_receiver();
        let tasks = [TaskIds {
            host_pid: writer.pid as u32,
            ns_pid: 1,
        }];
        let policy = ConvergencePolicy {
            max_rounds: 3,
            ..Default::default()
        };
        let pid = writer.pid;
        let mut sender = Sender::new(&mut session).hold_limit(limit);
        let (mut report, frozen) = sender
            .run_until_frozen(
                || Ok(tasks.to_vec()),
                &mut tracker,
                &mut crate::memory::NoQuiesce,
                &policy,
                || {
                    crate::testsupport::stop(pid);
                    Ok(())
                },
                &mut |_| {},
                true,
            )
            .unwrap();
        let held = frozen.held_bytes();
        if limit > 0 {
            assert!(held > 0, "the writer dirtied pages before the freeze");
        }
        assert!(held <= limit, "{held} held, beyond {limit}");
        let read = region_of(&writer);
        // Every page rewritten after the read, as a parasite might.
        let scribbled = vec![0xa5u8; writer.len];
        let local = libc::iovec {
            iov_base: scribbled.as_ptr() as *mut libc::c_void,
            iov_len: scribbled.len(),
        };
        let remote = libc::iovec {
            iov_base: writer.base as *mut libc::c_void,
            iov_len: writer.len,
        };
        // SAFETY: writes our stopped child's region from a buffer as long.
        let n = unsafe { libc::process_vm_writev(pid, &local, 1, &remote, 1, 0) };
        assert_eq!(n, writer.len as isize);
        let last = sender.send_frozen(frozen, &mut report).unwrap();
        assert!(last.frozen && last.pages > 0, "{last:?}");
        assert!(
            last.bytes >= held as u64,
            "the round sent what it held and what it sent before: {last:?}"
        );
        let (store, received) = receiver.join().unwrap();
        assert_eq!(
            received.unwrap().pages,
            report.rounds.iter().map(|r| r.pages).sum::<u64>()
        );
        assert_staged(&store, &writer, &read);
    }

    #[test]
    fn many_zero_pages_travel_in_frames_under_the_payload_limit() {
        // 1.5 million zero pages in one piece (a task that discarded 5.7 GiB): in one frame
        // their addresses alone (7 bytes each) would pass the 9 MiB frame limit.
        let (mut session, receiver) = to_a_receiver();
        let mut sender = Sender::new(&mut session);
        let mut delta = Delta::default();
        delta.zero = (0..1_500_000u64).map(|i| (1 << 46) + i * 4096).collect();
        sender.send_delta(1, 1, &mut delta).unwrap();
        sender
            .session
            .send(
                Kind::RoundEnd,
                &RoundEnd {
                    round: 1,
                    last: true,
                    ..Default::default()
                },
            )
            .unwrap();
        let (store, report) = receiver.join().unwrap();
        assert_eq!(report.unwrap().zero_pages, 1_500_000);
        assert_eq!(
            store.get(1, (1 << 46) + 1_499_999 * 4096),
            Some(PageRef::Zero)
        );
    }
}
