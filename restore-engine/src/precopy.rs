//! Iterative pre-copy: rounds of dirty pages from the source's running tasks into the
//! destination's staging store, a convergence policy that decides when to stop, and the final
//! round while the source is frozen.
//!
//! Tasks are named on the wire by their pid in the container's pid namespace (as CRIU's images
//! name them); the source reads memory through host pids.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::memory::{Delta, DirtyTracker, TrackError, PAGE};
use crate::staging::StagingStore;
use crate::wire::{
    Control, ControlCode, Credit, ImageFile, Kind, PageRun, Pages, RoundEnd, Session, WireError,
};

/// Pages of one frame (8 MiB, under the frame limit).
const BATCH_BYTES: usize = 8 << 20;
/// The flow-control window (see [`crate::wire::INITIAL_CREDIT`]).
pub const CREDIT_WINDOW: u64 = crate::wire::INITIAL_CREDIT;

#[derive(Debug, thiserror::Error)]
pub enum PrecopyError {
    #[error(transparent)]
    Track(#[from] TrackError),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("staging: {0}")]
    Staging(#[from] crate::staging::StagingError),
    #[error("freezing the source failed: {0}")]
    Freeze(String),
    #[error("image file {name}: {source}")]
    ImageFile {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("image file name {0:?} is not a plain file name: refusing it")]
    ImageName(String),
    #[error("the peer aborted the migration: {0}")]
    Aborted(String),
    #[error("page run at {vaddr:#x} of task {pid} is corrupt: {problem}")]
    BadRun {
        pid: u32,
        vaddr: u64,
        problem: String,
    },
}

/// What a source shim needs to migrate a container (sent by `pclive migrate` inside containerd's
/// CheckpointOptions, which containerd passes through unchanged).
#[derive(Clone, PartialEq, prost::Message)]
pub struct MigrateRequest {
    /// The receiving shim's address, host:port.
    #[prost(string, tag = "1")]
    pub destination: String,
    /// Pre-shared key file on the source host (at least 16 bytes).
    #[prost(string, tag = "2")]
    pub key_file: String,
    /// Unauthenticated session: only if the user asked for it (and the receiver allows it).
    #[prost(bool, tag = "3")]
    pub insecure: bool,
    #[prost(uint32, tag = "4")]
    pub max_rounds: u32,
    #[prost(uint32, tag = "5")]
    pub target_downtime_ms: u32,
    /// content-hash or soft-dirty; empty: the best the kernel offers.
    #[prost(string, tag = "6")]
    pub tracker: String,
    /// LZ4-compress page runs (each run goes uncompressed when that saves too little).
    #[prost(bool, tag = "7")]
    pub compress: bool,
}

impl MigrateRequest {
    /// The convergence policy it asks for (defaults where it says nothing).
    pub fn policy(&self) -> ConvergencePolicy {
        let mut policy = ConvergencePolicy::default();
        if self.max_rounds > 0 {
            policy.max_rounds = self.max_rounds;
        }
        if self.target_downtime_ms > 0 {
            policy.target_downtime = Duration::from_millis(self.target_downtime_ms as u64);
        }
        policy
    }
}

/// When to stop iterating and do the final (frozen) round.
#[derive(Debug, Clone, Serialize)]
pub struct ConvergencePolicy {
    /// Stop when the next round's data would cross the link within this time.
    pub target_downtime: Duration,
    /// Stop after this many rounds whatever happens.
    pub max_rounds: u32,
    /// Stop when a round is not at least this much smaller than the previous one (the dirty
    /// rate matches the link: more rounds would not converge).
    pub min_shrink: f64,
}

impl Default for ConvergencePolicy {
    fn default() -> Self {
        ConvergencePolicy {
            target_downtime: Duration::from_millis(300),
            max_rounds: 10,
            min_shrink: 0.8,
        }
    }
}

/// Why pre-copy stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopReason {
    /// The remaining dirty memory fits the downtime target.
    Converged,
    /// Rounds stopped shrinking.
    NotShrinking,
    /// The round limit.
    RoundLimit,
}

impl ConvergencePolicy {
    /// Decides after a round that sent `last_bytes` (the previous one `previous_bytes`) at
    /// `bandwidth` bytes/s, with `rounds` done so far. `None`: do another round.
    pub fn decide(
        &self,
        rounds: u32,
        last_bytes: u64,
        previous_bytes: Option<u64>,
        bandwidth: f64,
    ) -> Option<StopReason> {
        // The next round carries roughly what the last one did (pages dirtied meanwhile).
        let next_transfer = if bandwidth > 0.0 {
            Duration::from_secs_f64(last_bytes as f64 / bandwidth)
        } else {
            Duration::MAX
        };
        if rounds > 1 && next_transfer <= self.target_downtime {
            return Some(StopReason::Converged);
        }
        if rounds >= self.max_rounds {
            return Some(StopReason::RoundLimit);
        }
        if let Some(previous) = previous_bytes {
            if rounds > 2 && last_bytes as f64 > previous as f64 * self.min_shrink {
                return Some(StopReason::NotShrinking);
            }
        }
        None
    }

    /// Seconds until the pause if the workload keeps dirtying `dirty_rate` bytes/s and the
    /// link carries `bandwidth` bytes/s: the rounds this policy would still run, simulated
    /// (each round carries what was dirtied while the previous one was sent). `None` when
    /// either rate is unknown.
    pub fn projected_seconds_to_pause(
        &self,
        rounds_done: u32,
        last_bytes: u64,
        last_seconds: f64,
        dirty_rate: f64,
        bandwidth: f64,
    ) -> Option<f64> {
        if !(bandwidth.is_finite() && bandwidth > 0.0 && dirty_rate.is_finite()) {
            return None;
        }
        let (mut rounds, mut previous, mut bytes, mut seconds) =
            (rounds_done, last_bytes, last_bytes, last_seconds);
        let mut total = 0.0;
        // A decision was already taken on the round just done: project the ones after it.
        while self
            .decide(rounds, bytes, Some(previous), bandwidth)
            .is_none()
        {
            previous = bytes;
            bytes = (dirty_rate * seconds) as u64;
            seconds = bytes as f64 / bandwidth;
            total += seconds;
            rounds += 1;
        }
        Some(total)
    }
}

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
}

/// CPU time (user + system) of this process: the sending thread and the tracker's hashing
/// threads (the shim's other threads are idle during a migration).
fn process_cpu_seconds() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    getrusage(UsageWho::RUSAGE_SELF)
        .map(|u| {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            t(u.user_time()) + t(u.system_time())
        })
        .unwrap_or(0.0)
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

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

/// A compressed run is sent only if it is at most 7/8 of the raw size: below that saving,
/// decompressing costs the destination more than the link time it saves.
fn worth_compressing(raw: usize, compressed: usize) -> bool {
    compressed * 8 <= raw * 7
}

/// A run of pages for the wire, LZ4-compressed if asked and worth it.
fn page_run(vaddr: u64, data: &[u8], compress: bool) -> PageRun {
    if compress {
        let lz4 = lz4_flex::block::compress(data);
        if worth_compressing(data.len(), lz4.len()) {
            return PageRun {
                vaddr,
                lz4,
                lz4_len: data.len() as u32,
                ..Default::default()
            };
        }
    }
    PageRun {
        vaddr,
        data: data.to_vec(),
        ..Default::default()
    }
}

/// The pages of a received run (decompressed), refusing anything that is not whole pages of
/// at most one batch.
fn run_data<'r>(pid: u32, run: &'r PageRun) -> Result<std::borrow::Cow<'r, [u8]>, PrecopyError> {
    let bad = |problem: String| PrecopyError::BadRun {
        pid,
        vaddr: run.vaddr,
        problem,
    };
    let data = if run.lz4.is_empty() {
        std::borrow::Cow::Borrowed(&run.data[..])
    } else {
        if !run.data.is_empty() {
            return Err(bad("both raw and compressed data".into()));
        }
        let len = run.lz4_len as usize;
        if len > BATCH_BYTES {
            return Err(bad(format!("{len} bytes claimed, over the batch limit")));
        }
        let data =
            lz4_flex::block::decompress(&run.lz4, len).map_err(|e| bad(format!("LZ4: {e}")))?;
        if data.len() != len {
            return Err(bad(format!(
                "{} bytes decompressed, {len} claimed",
                data.len()
            )));
        }
        std::borrow::Cow::Owned(data)
    };
    if data.len() % PAGE as usize != 0 || run.vaddr % PAGE != 0 {
        return Err(bad("not whole pages".into()));
    }
    Ok(data)
}

/// The sending end of pre-copy.
pub struct Sender<'a, S: Read + Write> {
    session: &'a mut Session<S>,
    compress: bool,
}

impl<'a, S: Read + Write> Sender<'a, S> {
    pub fn new(session: &'a mut Session<S>) -> Self {
        Sender {
            session,
            compress: false,
        }
    }

    /// LZ4-compresses page runs where that saves enough.
    pub fn compress(mut self, compress: bool) -> Self {
        self.compress = compress;
        self
    }

    fn wait_for_credit(&mut self, bytes: u64) -> Result<(), PrecopyError> {
        Ok(self.session.spend(bytes)?)
    }

    /// Sends one task's delta in frames of at most BATCH_BYTES of page data. Returns the
    /// bytes put on the wire.
    fn send_delta(&mut self, ns_pid: u32, round: u32, delta: &Delta) -> Result<u64, PrecopyError> {
        let mut sent = 0u64;
        let mut frame = Pages {
            pid: ns_pid,
            round,
            runs: Vec::new(),
            zero_pages: delta.zero.clone(),
        };
        let (mut frame_data, mut frame_wire) = (0usize, 0usize);
        for (start, data) in &delta.runs {
            for (k, chunk) in data.chunks(BATCH_BYTES).enumerate() {
                if frame_data + chunk.len() > BATCH_BYTES && frame_data > 0 {
                    self.wait_for_credit(frame_wire as u64)?;
                    self.session.send(Kind::Pages, &frame)?;
                    sent += frame_wire as u64;
                    frame.runs.clear();
                    frame.zero_pages.clear();
                    (frame_data, frame_wire) = (0, 0);
                }
                let run = page_run(start + (k * BATCH_BYTES) as u64, chunk, self.compress);
                frame_data += chunk.len();
                frame_wire += run.wire_len();
                frame.runs.push(run);
            }
        }
        if frame_data > 0 || !frame.zero_pages.is_empty() {
            self.wait_for_credit(frame_wire as u64)?;
            self.session.send(Kind::Pages, &frame)?;
            sent += frame_wire as u64;
        }
        Ok(sent)
    }

    fn round(
        &mut self,
        round: u32,
        tasks: &mut dyn FnMut() -> Result<Vec<TaskIds>, PrecopyError>,
        tracker: &mut dyn DirtyTracker,
        frozen: bool,
    ) -> Result<RoundStats, PrecopyError> {
        let started = Instant::now();
        let cpu_start = process_cpu_seconds();
        let mut stats = RoundStats {
            round,
            frozen,
            ..Default::default()
        };
        let mut scan = Duration::ZERO;
        // The task list is taken anew each round: processes come and go while the container
        // runs (once frozen, the list is the one CRIU dumps).
        for task in tasks()? {
            let task_start = Instant::now();
            let mut sending = Duration::ZERO;
            let mut failed: Option<PrecopyError> = None;
            // Pieces of the task's changed pages go out as the tracker finds them: the source
            // never holds more than a piece (the first round is the whole container).
            let tracked = tracker.round_into(task.host_pid, &mut |delta: Delta| {
                let send_start = Instant::now();
                stats.pages += delta.data_pages();
                stats.zero_pages += delta.zero.len() as u64;
                stats.bytes += delta.data_pages() * PAGE;
                let sent = self.send_delta(task.ns_pid, round, &delta);
                sending += send_start.elapsed();
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
        self.session.send(
            Kind::RoundEnd,
            &RoundEnd {
                round,
                pages: stats.pages,
                bytes: stats.bytes,
                last: frozen,
            },
        )?;
        stats.scan_seconds = scan.as_secs_f64();
        stats.seconds = started.elapsed().as_secs_f64();
        stats.cpu_seconds = process_cpu_seconds() - cpu_start;
        stats.link_bytes_per_second = if stats.seconds > 0.0 {
            stats.wire_bytes as f64 / stats.seconds
        } else {
            0.0
        };
        stats.end_unix = unix_now();
        Ok(stats)
    }

    /// Runs rounds while the tasks run, then `freeze`s them and sends the last round.
    /// `on_round` sees every round's statistics (progress).
    pub fn run(
        &mut self,
        mut tasks: impl FnMut() -> Result<Vec<TaskIds>, PrecopyError>,
        tracker: &mut dyn DirtyTracker,
        policy: &ConvergencePolicy,
        freeze: impl FnOnce() -> Result<(), String>,
        mut on_round: impl FnMut(&RoundStats),
    ) -> Result<SourceReport, PrecopyError> {
        let mut report = SourceReport {
            tracker: tracker.name().into(),
            ..Default::default()
        };
        let mut previous: Option<u64> = None;
        let mut previous_seconds: Option<f64> = None;
        let mut round = 1u32;
        loop {
            let mut stats = self.round(round, &mut tasks, tracker, false)?;
            let bandwidth = if stats.seconds > 0.0 {
                stats.bytes as f64 / stats.seconds
            } else {
                f64::INFINITY
            };
            // A page read in this round was last read in the previous one: on average half a
            // round of each earlier, so the time it had to get dirty is the mean of the two.
            stats.dirty_bytes_per_second = previous_seconds
                .map(|s| stats.bytes as f64 / ((s + stats.seconds) / 2.0).max(1e-3));
            let decision = policy.decide(round, stats.bytes, previous, bandwidth);
            if decision.is_none() {
                stats.eta_seconds = stats.dirty_bytes_per_second.and_then(|dirty_rate| {
                    policy.projected_seconds_to_pause(
                        round,
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
        freeze().map_err(PrecopyError::Freeze)?;
        // The frozen tasks leave every core to the last round, which is all downtime.
        tracker.set_threads(std::thread::available_parallelism().map_or(1, |n| n.get()));
        let last = self.round(round + 1, &mut tasks, tracker, true)?;
        on_round(&last);
        report.final_round_seconds = last.seconds;
        report.rounds.push(last);
        Ok(report)
    }
}

/// Image file chunks (1 MiB: CRIU's images besides memory are small).
const IMAGE_CHUNK: usize = 1 << 20;

/// Sends every regular file of a CRIU image directory, then `ImagesDone`.
pub fn send_images<S: Read + Write>(
    session: &mut Session<S>,
    dir: &std::path::Path,
) -> Result<u64, PrecopyError> {
    let mut total = 0u64;
    let io_err = |name: &str| {
        let name = name.to_string();
        move |source| PrecopyError::ImageFile { name, source }
    };
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(io_err("(image directory)"))?
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let data = std::fs::read(entry.path()).map_err(io_err(&name))?;
        let chunks: Vec<&[u8]> = if data.is_empty() {
            vec![&[]]
        } else {
            data.chunks(IMAGE_CHUNK).collect()
        };
        let count = chunks.len();
        for (i, chunk) in chunks.into_iter().enumerate() {
            session.send(
                Kind::ImageFile,
                &ImageFile {
                    name: name.clone(),
                    offset: (i * IMAGE_CHUNK) as u64,
                    data: chunk.to_vec(),
                    last_chunk: i + 1 == count,
                },
            )?;
        }
        total += data.len() as u64;
    }
    session.send(
        Kind::Control,
        &Control {
            code: ControlCode::ImagesDone as i32,
            message: String::new(),
        },
    )?;
    Ok(total)
}

/// Receives image files into `dir` until `ImagesDone`. File names must be plain names (no
/// directories, no `..`): a hostile peer cannot write outside `dir`.
pub fn receive_images<S: Read + Write>(
    session: &mut Session<S>,
    dir: &std::path::Path,
) -> Result<u64, PrecopyError> {
    use std::os::unix::fs::FileExt;
    let mut total = 0u64;
    loop {
        let frame = session.receive()?;
        match frame.kind {
            Kind::ImageFile => {
                let file: ImageFile = frame.decode()?;
                let plain = !file.name.is_empty()
                    && file.name != "."
                    && file.name != ".."
                    && !file.name.contains('/')
                    && !file.name.contains('\0');
                if !plain {
                    return Err(PrecopyError::ImageName(file.name));
                }
                let path = dir.join(&file.name);
                let out = std::fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(file.offset == 0)
                    .open(&path)
                    .map_err(|source| PrecopyError::ImageFile {
                        name: file.name.clone(),
                        source,
                    })?;
                out.write_all_at(&file.data, file.offset)
                    .map_err(|source| PrecopyError::ImageFile {
                        name: file.name.clone(),
                        source,
                    })?;
                total += file.data.len() as u64;
            }
            Kind::Control => {
                let control: Control = frame.decode()?;
                match ControlCode::try_from(control.code) {
                    Ok(ControlCode::ImagesDone) => return Ok(total),
                    Ok(ControlCode::Abort) => return Err(PrecopyError::Aborted(control.message)),
                    _ => {
                        return Err(WireError::Unexpected {
                            expected: Kind::ImageFile,
                            found: Kind::Control,
                        }
                        .into())
                    }
                }
            }
            other => {
                return Err(WireError::Unexpected {
                    expected: Kind::ImageFile,
                    found: other,
                }
                .into())
            }
        }
    }
}

/// What the receiving end staged.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReceiveReport {
    pub rounds: u32,
    pub pages: u64,
    pub zero_pages: u64,
    pub bytes: u64,
}

/// Receives rounds into `store` until the last (frozen) round has arrived.
pub fn receive_rounds<S: Read + Write>(
    session: &mut Session<S>,
    store: &mut StagingStore,
) -> Result<ReceiveReport, PrecopyError> {
    receive_rounds_reporting(session, store, |_, _| {})
}

/// [`receive_rounds`], calling `on_round` with each round's end marker and the report so far.
pub fn receive_rounds_reporting<S: Read + Write>(
    session: &mut Session<S>,
    store: &mut StagingStore,
    mut on_round: impl FnMut(&RoundEnd, &ReceiveReport),
) -> Result<ReceiveReport, PrecopyError> {
    let mut report = ReceiveReport::default();
    let mut consumed = 0u64;
    loop {
        let frame = session.receive()?;
        match frame.kind {
            Kind::Pages => {
                let pages: Pages = frame.decode()?;
                let (mut bytes, mut wire) = (0u64, 0u64);
                for run in &pages.runs {
                    let data = run_data(pages.pid, run)?;
                    store.put(pages.pid, run.vaddr, &data)?;
                    bytes += data.len() as u64;
                    wire += run.wire_len() as u64;
                }
                for &addr in &pages.zero_pages {
                    store.put_zero(pages.pid, addr, 1)?;
                }
                report.pages += bytes / PAGE;
                report.zero_pages += pages.zero_pages.len() as u64;
                report.bytes += bytes;
                // Return the credit once half the window is used, so the sender never stalls
                // on a link that keeps up.
                consumed += wire;
                if consumed >= CREDIT_WINDOW / 2 {
                    session.send(Kind::Credit, &Credit { bytes: consumed })?;
                    consumed = 0;
                }
            }
            Kind::RoundEnd => {
                let end: RoundEnd = frame.decode()?;
                report.rounds = end.round;
                on_round(&end, &report);
                if consumed > 0 {
                    session.send(Kind::Credit, &Credit { bytes: consumed })?;
                    consumed = 0;
                }
                if end.last {
                    return Ok(report);
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::HashTracker;
    use crate::staging::PageRef;
    use crate::testsupport::Writer;
    use crate::wire::{accept, connect, Auth};
    use std::os::unix::net::UnixStream;
    use std::thread;

    #[test]
    fn image_files_travel_and_hostile_names_are_refused() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("core-1.img"), vec![7u8; 3 << 20]).unwrap();
        std::fs::write(src.path().join("empty.img"), b"").unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        let key = Auth::Key(vec![9; 32]);
        let k2 = key.clone();
        let dst_path = dst.path().to_owned();
        let receiver = thread::spawn(move || {
            let mut session = accept(b, &k2).unwrap();
            receive_images(&mut session, &dst_path)
        });
        let mut session = connect(a, &key).unwrap();
        let sent = send_images(&mut session, src.path()).unwrap();
        assert_eq!(receiver.join().unwrap().unwrap(), sent);
        assert_eq!(
            std::fs::read(dst.path().join("core-1.img")).unwrap(),
            vec![7u8; 3 << 20]
        );
        assert!(dst.path().join("empty.img").exists());

        let (a, b) = UnixStream::pair().unwrap();
        let k2 = key.clone();
        let dst_path = dst.path().to_owned();
        let receiver = thread::spawn(move || {
            let mut session = accept(b, &k2).unwrap();
            receive_images(&mut session, &dst_path)
        });
        let mut session = connect(a, &key).unwrap();
        session
            .send(
                Kind::ImageFile,
                &ImageFile {
                    name: "../escape".into(),
                    offset: 0,
                    data: vec![1],
                    last_chunk: true,
                },
            )
            .unwrap();
        assert!(matches!(
            receiver.join().unwrap(),
            Err(PrecopyError::ImageName(_))
        ));
        assert!(!dst.path().parent().unwrap().join("escape").exists());
    }

    #[test]
    fn policy_stops_on_convergence_stagnation_or_limit() {
        let policy = ConvergencePolicy::default();
        // 1 GB/s link, 100 MB left: 0.1 s < 0.3 s target.
        assert_eq!(
            policy.decide(3, 100_000_000, Some(400_000_000), 1e9),
            Some(StopReason::Converged)
        );
        // The first round never counts as converged (it is the bulk copy).
        assert_eq!(policy.decide(1, 1_000, None, 1e9), None);
        // Not shrinking: 900 MB after 1 GB.
        assert_eq!(
            policy.decide(3, 900_000_000, Some(1_000_000_000), 1e9),
            Some(StopReason::NotShrinking)
        );
        // Shrinking well but slow link: go on.
        assert_eq!(
            policy.decide(3, 500_000_000, Some(1_000_000_000), 1e9),
            None
        );
        assert_eq!(
            policy.decide(10, 500_000_000, Some(1_000_000_000), 1e9),
            Some(StopReason::RoundLimit)
        );
    }

    #[test]
    fn compressed_runs_round_trip_and_corrupt_ones_are_refused() {
        let text: Vec<u8> = (0..4 * PAGE as usize).map(|i| (i / 64 % 7) as u8).collect();
        let run = page_run(0x10000, &text, true);
        assert!(
            run.data.is_empty() && run.lz4.len() < text.len() / 8,
            "compressible"
        );
        assert_eq!(&run_data(1, &run).unwrap()[..], &text[..]);
        // Incompressible data goes raw.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..2 * PAGE as usize)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let raw = page_run(0x10000, &noise, true);
        assert!(raw.lz4.is_empty() && raw.data == noise);
        // A lie about the length, a truncated block, half pages, both forms at once.
        let mut lie = run.clone();
        lie.lz4_len += PAGE as u32;
        let mut cut = run.clone();
        cut.lz4.truncate(cut.lz4.len() / 2);
        let mut huge = run.clone();
        huge.lz4_len = u32::MAX;
        let half = PageRun {
            vaddr: 0x10000,
            data: vec![1; 100],
            ..Default::default()
        };
        let mut both = run.clone();
        both.data = vec![0; PAGE as usize];
        for bad in [lie, cut, huge, half, both] {
            assert!(
                matches!(run_data(1, &bad), Err(PrecopyError::BadRun { .. })),
                "{:?}",
                bad.lz4_len
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn the_run_decoder_never_panics(
            lz4 in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            lz4_len in proptest::prelude::any::<u32>(),
        ) {
            let run = PageRun { vaddr: 0, data: Vec::new(), lz4, lz4_len };
            let _ = run_data(1, &run);
        }
    }

    #[test]
    fn the_projection_runs_the_policy_forward() {
        let policy = ConvergencePolicy::default();
        // 1 GB/s link, 100 MB/s dirtied, 1 s round of 1 GB just done: 100 MB (0.1 s) next,
        // which converges.
        let eta = policy
            .projected_seconds_to_pause(1, 1_000_000_000, 1.0, 1e8, 1e9)
            .unwrap();
        assert!((eta - 0.1).abs() < 1e-6, "{eta}");
        // Dirtying as fast as the link: the rounds stop shrinking after the third.
        let eta = policy
            .projected_seconds_to_pause(1, 1_000_000_000, 1.0, 1e9, 1e9)
            .unwrap();
        assert!((eta - 2.0).abs() < 1e-6, "{eta}");
        // A round limit bounds it even when nothing converges.
        let eta = policy
            .projected_seconds_to_pause(1, 1_000_000_000, 1.0, 2e9, 1e9)
            .unwrap();
        assert!(eta.is_finite());
        assert_eq!(
            policy.projected_seconds_to_pause(1, 1, 1.0, 1e6, 0.0),
            None,
            "no bandwidth, no projection"
        );
    }

    #[test]
    fn rounds_converge_and_the_staged_memory_equals_the_frozen_source() {
        let writer = Writer::start();
        let (a, b) = UnixStream::pair().unwrap();
        let key = Auth::Key(vec![5; 32]);
        let server_key = key.clone();
        let receiver = thread::spawn(move || {
            let mut session = accept(b, &server_key).unwrap();
            let mut store = StagingStore::default();
            let report = receive_rounds(&mut session, &mut store).unwrap();
            (store, report)
        });
        let mut session = connect(a, &key).unwrap();
        let mut tracker = HashTracker::default();
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
                &mut tracker,
                &policy,
                || {
                    // SAFETY: stops our own child.
                    unsafe { libc::kill(pid, libc::SIGSTOP) };
                    thread::sleep(Duration::from_millis(50));
                    Ok(())
                },
                |_| {},
            )
            .unwrap();
        let (store, received) = receiver.join().unwrap();
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
        let mut page = vec![0u8; PAGE as usize];
        for offset in (0..writer.len as u64).step_by(PAGE as usize) {
            let addr = writer.base + offset;
            let local = libc::iovec {
                iov_base: page.as_mut_ptr().cast(),
                iov_len: page.len(),
            };
            let remote = libc::iovec {
                iov_base: addr as *mut libc::c_void,
                iov_len: page.len(),
            };
            // SAFETY: reads one page of our stopped child into `page`.
            let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
            assert_eq!(n, PAGE as isize);
            match store.get(1, addr) {
                Some(PageRef::Data(staged)) => assert_eq!(staged, &page[..], "page {addr:#x}"),
                Some(PageRef::Zero) => assert!(page.iter().all(|&b| b == 0), "page {addr:#x}"),
                None => assert!(
                    page.iter().all(|&b| b == 0),
                    "page {addr:#x} was never staged but is not zero"
                ),
            }
        }
    }
}
