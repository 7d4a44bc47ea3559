//! `run`: a paced read/write load and two 1 ms PING probes that follow the server through a
//! migration, until a stop file appears (or a signal arrives). The impatient probe gives up on
//! an endpoint after 20 ms (a client with a short timeout that fails over on its own); the
//! patient one stays on its connection until the connection itself fails (most clients:
//! redis-cli, pools without a per-request timeout), so it sees how long the old endpoint keeps
//! it waiting.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{ClientError, Workload};
use crate::conn::{Conn, PING};
use crate::follow::{FollowError, Follower};
use crate::resp::{encode_command, Value};
use crate::state::{KeyVersions, StateFile};
use crate::stats::{self, Clock, LatencySummary, OpRecord, Outcome, ProbeSample};
use crate::values::{fill_value, is_value_of, key_name, Rng};

/// A load request without a reply after this long is lost (the server froze or moved).
pub const LOAD_TIMEOUT: Duration = Duration::from_millis(100);
/// The probe's request timeout: short, so a frozen endpoint is left quickly.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(20);
/// Connect timeout when looking for an answering endpoint (then one PING, same timeout).
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(20);
pub const PROBE_INTERVAL: Duration = Duration::from_millis(1);
/// The patient probe's request timeout: only a failed connection moves it.
pub const PATIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// The patient probe's connect timeout (a refused connection fails at once anyway).
pub const PATIENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
pub const BUCKET_US: u64 = 100_000;
/// "After resume" latency covers load operations completed this long after the gap.
pub const AFTER_RESUME_US: u64 = 1_000_000;
/// How far behind schedule the load may fall and still catch up (a burst of at most this many
/// milliseconds of operations); beyond that, missed slots are skipped and counted.
const MAX_LAG: Duration = Duration::from_millis(10);
/// How often the stop file and signal flag are checked.
const STOP_POLL: Duration = Duration::from_millis(20);

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub endpoints: Vec<SocketAddr>,
    pub workload: Workload,
    pub read_ratio: f64,
    pub rate_ops: f64,
    pub stop_file: PathBuf,
    pub timeline: PathBuf,
    pub state: PathBuf,
    /// Client connections opened to the first endpoint before the load starts, each answered
    /// one PING, then held idle until the run ends: connections the migration must carry.
    pub idle_connections: usize,
}

/// The JSON summary `run` prints.
#[derive(Debug, Serialize)]
pub struct RunSummary {
    pub ops: u64,
    pub reads: u64,
    pub writes: u64,
    pub errors: u64,
    pub read_mismatches: u64,
    pub longest_gap_s: Option<f64>,
    pub gap_start_unix: Option<f64>,
    pub gap_end_unix: Option<f64>,
    pub endpoint_after_gap: Option<u8>,
    pub after_resume_latency_us: LatencySummary,
    /// Schedule slots skipped because the load thread was behind (blocked on a failover).
    pub late_slots: u64,
    /// Keys whose last SET got no reply: either version is accepted by `verify`.
    pub uncertain_keys: usize,
    pub probes: u64,
    pub load_reconnects: u64,
    pub probe_reconnects: u64,
    /// The patient probe's longest gap between replies and when it was.
    pub patient_longest_gap_s: Option<f64>,
    pub patient_gap_start_unix: Option<f64>,
    pub patient_gap_end_unix: Option<f64>,
    pub patient_reconnects: u64,
    /// The patient probe got replies again after its longest gap (false: it was still waiting
    /// when the run ended).
    pub patient_recovered: Option<bool>,
    pub start_unix: f64,
    pub end_unix: f64,
}

/// Counters the progress line reads while the threads run.
#[derive(Default)]
struct Progress {
    ops: AtomicU64,
    errors: AtomicU64,
    endpoint: AtomicU8,
}

/// Runs until `stop_file` exists or `external_stop` is set, then writes the timeline and the
/// state file and returns the summary.
pub fn run(config: &RunConfig, external_stop: &AtomicBool) -> Result<RunSummary, ClientError> {
    check_writable(&config.timeline)?;
    check_writable(&config.state)?;
    let _idle = open_idle(config.endpoints[0], config.idle_connections)?;
    let clock = Clock::start();
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(Progress::default());

    let load = {
        let (config, stop, progress) = (config.clone(), stop.clone(), progress.clone());
        std::thread::Builder::new()
            .name("load".into())
            .spawn(move || load_loop(&config, clock, stop, &progress))
            .expect("spawn load thread")
    };
    let probe = {
        let (endpoints, stop) = (config.endpoints.clone(), stop.clone());
        std::thread::Builder::new()
            .name("probe".into())
            .spawn(move || probe_loop(endpoints, clock, stop, PROBE_TIMEOUT, CONNECT_TIMEOUT))
            .expect("spawn probe thread")
    };
    let patient = {
        let (endpoints, stop) = (config.endpoints.clone(), stop.clone());
        std::thread::Builder::new()
            .name("patient-probe".into())
            .spawn(move || {
                probe_loop(
                    endpoints,
                    clock,
                    stop,
                    PATIENT_TIMEOUT,
                    PATIENT_CONNECT_TIMEOUT,
                )
            })
            .expect("spawn patient probe thread")
    };

    let mut last_progress = Instant::now();
    while !config.stop_file.exists() && !external_stop.load(Ordering::SeqCst) {
        std::thread::sleep(STOP_POLL);
        if last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            eprintln!(
                "run: {:.1}s ops={} errors={} endpoint={}",
                (clock.now_us() - clock.start_us()) as f64 / 1e6,
                progress.ops.load(Ordering::Relaxed),
                progress.errors.load(Ordering::Relaxed),
                progress.endpoint.load(Ordering::Relaxed),
            );
        }
    }
    stop.store(true, Ordering::SeqCst);
    let load = load.join().expect("load thread panicked");
    let (probes, probe_reconnects) = probe.join().expect("probe thread panicked");
    let (patient, patient_reconnects) = patient.join().expect("patient probe panicked");
    let end_us = clock.now_us();

    let timeline = stats::buckets(&load.ops, &probes, clock.start_us(), end_us, BUCKET_US);
    write_timeline(&config.timeline, &timeline)?;
    StateFile {
        seed: config.workload.seed,
        value_size: config.workload.value_size as u64,
        versions: load.versions.clone(),
    }
    .write(&config.state)?;
    let mut summary = summarize(&load, &probes, probe_reconnects, clock.start_us(), end_us);
    // Counted until the end of the run: a patient client left hanging on a connection nobody
    // serves (no reset, no reply) waits that long, and longer.
    let gap = stats::longest_gap_until(&patient, end_us);
    summary.patient_longest_gap_s = gap.map(|g| g.seconds());
    summary.patient_recovered = gap.map(|g| g.endpoint_after != stats::NO_ENDPOINT);
    summary.patient_gap_start_unix = gap.map(|g| stats::us_to_unix_seconds(g.start_us));
    summary.patient_gap_end_unix = gap.map(|g| stats::us_to_unix_seconds(g.end_us));
    summary.patient_reconnects = patient_reconnects;
    Ok(summary)
}

/// `count` connections to `addr`, each answered one PING. Raises the open-file limit to its
/// hard limit first (1000 connections pass the usual soft limit of 1024 with the rest).
fn open_idle(addr: SocketAddr, count: usize) -> Result<Vec<Conn>, ClientError> {
    if count == 0 {
        return Ok(Vec::new());
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
    let conn_error = |source| ClientError::Conn {
        endpoint: addr.to_string(),
        source,
    };
    let mut idle = Vec::with_capacity(count);
    for _ in 0..count {
        let mut conn = Conn::connect(addr, PATIENT_CONNECT_TIMEOUT).map_err(conn_error)?;
        conn.request(PING, PATIENT_CONNECT_TIMEOUT)
            .map_err(conn_error)?;
        idle.push(conn);
    }
    eprintln!("run: {count} idle connections open");
    Ok(idle)
}

fn summarize(
    load: &LoadResult,
    probes: &[ProbeSample],
    probe_reconnects: u64,
    start_us: u64,
    end_us: u64,
) -> RunSummary {
    let count = |outcome| load.ops.iter().filter(|op| op.outcome == outcome).count() as u64;
    let gap = stats::longest_gap(probes);
    let after_resume = match gap {
        Some(gap) => stats::latency_after(&load.ops, gap.end_us, AFTER_RESUME_US),
        None => stats::summarize(Vec::new()),
    };
    RunSummary {
        ops: load.ops.len() as u64,
        reads: count(Outcome::Read),
        writes: count(Outcome::Write),
        errors: count(Outcome::Error),
        read_mismatches: load.read_mismatches,
        longest_gap_s: gap.map(|g| g.seconds()),
        gap_start_unix: gap.map(|g| stats::us_to_unix_seconds(g.start_us)),
        gap_end_unix: gap.map(|g| stats::us_to_unix_seconds(g.end_us)),
        endpoint_after_gap: gap.map(|g| g.endpoint_after),
        after_resume_latency_us: after_resume,
        late_slots: load.late_slots,
        uncertain_keys: load.versions.uncertain_count(),
        probes: probes.len() as u64,
        load_reconnects: load.reconnects,
        probe_reconnects,
        patient_longest_gap_s: None,
        patient_gap_start_unix: None,
        patient_gap_end_unix: None,
        patient_reconnects: 0,
        patient_recovered: None,
        start_unix: stats::us_to_unix_seconds(start_us),
        end_unix: stats::us_to_unix_seconds(end_us),
    }
}

/// Fails before the run, not after minutes of measuring, when an output cannot be written.
fn check_writable(path: &Path) -> Result<(), ClientError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map(drop)
        .map_err(|source| ClientError::Output {
            path: path.display().to_string(),
            source,
        })
}

fn write_timeline(path: &Path, buckets: &[stats::Bucket]) -> Result<(), ClientError> {
    let output = |source| ClientError::Output {
        path: path.display().to_string(),
        source,
    };
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).map_err(output)?);
    for bucket in buckets {
        serde_json::to_writer(&mut out, bucket).map_err(|e| output(e.into()))?;
        out.write_all(b"\n").map_err(output)?;
    }
    out.flush().map_err(output)
}

struct LoadResult {
    ops: Vec<OpRecord>,
    versions: KeyVersions,
    read_mismatches: u64,
    late_slots: u64,
    reconnects: u64,
}

/// The open-loop load: one operation per schedule slot (`1 / rate` apart), one at a time on one
/// connection. Falling behind by more than [`MAX_LAG`] skips the missed slots and counts them,
/// so a failover does not leave a backlog that would then hit the new server as a burst.
fn load_loop(
    config: &RunConfig,
    clock: Clock,
    stop: Arc<AtomicBool>,
    progress: &Progress,
) -> LoadResult {
    let workload = config.workload;
    let mut follower = Follower::new(
        config.endpoints.clone(),
        LOAD_TIMEOUT,
        CONNECT_TIMEOUT,
        stop.clone(),
    );
    let mut result = LoadResult {
        ops: Vec::new(),
        versions: KeyVersions::loaded(workload.records as usize),
        read_mismatches: 0,
        late_slots: 0,
        reconnects: 0,
    };
    let interval = Duration::from_secs_f64(1.0 / config.rate_ops);
    let mut rng = Rng::new(workload.seed ^ 0x6c6f_6164); // "load"
    let mut command = Vec::with_capacity(workload.value_size + 64);
    let mut value = Vec::with_capacity(workload.value_size);
    let mut next_slot = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now < next_slot {
            std::thread::sleep(next_slot - now);
        } else if now - next_slot > MAX_LAG {
            let behind = (now - next_slot).as_nanos() / interval.as_nanos().max(1);
            result.late_slots += behind as u64;
            next_slot = now;
        }
        next_slot += interval;

        let key = rng.below(workload.records) as usize;
        let is_read = rng.unit() < config.read_ratio;
        command.clear();
        let name = key_name(key as u64);
        let written_version = if is_read {
            encode_command(&mut command, &[b"GET", name.as_bytes()]);
            None
        } else {
            let version = result.versions.issue(key);
            value.clear();
            fill_value(
                workload.seed,
                key as u64,
                version,
                workload.value_size,
                &mut value,
            );
            encode_command(&mut command, &[b"SET", name.as_bytes(), &value]);
            Some(version)
        };
        let (outcome, endpoint, latency) = match follower.request(&command) {
            Ok(reply) => {
                let outcome = match written_version {
                    None => check_read(&mut result, &workload, key, reply.value),
                    Some(version) => check_write(&mut result.versions, key, version, reply.value),
                };
                (outcome, reply.endpoint, reply.latency)
            }
            Err(FollowError::Stopped) => {
                // Nothing was sent: the issued version was never used.
                if let Some(version) = written_version {
                    result.versions.reject(key, version);
                }
                break;
            }
            // Lost: a SET stays uncertain (issued above acked), which `verify` accepts.
            Err(FollowError::Lost { endpoint, .. }) => (Outcome::Error, endpoint, Duration::ZERO),
        };
        let latency_us = match outcome {
            Outcome::Error => 0,
            _ => latency.as_micros().min(u128::from(u32::MAX)) as u32,
        };
        result.ops.push(OpRecord {
            done_us: clock.now_us(),
            latency_us,
            outcome,
            endpoint: endpoint as u8,
        });
        progress.ops.fetch_add(1, Ordering::Relaxed);
        if outcome == Outcome::Error {
            progress.errors.fetch_add(1, Ordering::Relaxed);
        } else {
            progress.endpoint.store(endpoint as u8, Ordering::Relaxed);
        }
    }
    result.reconnects = follower.reconnects;
    result
}

fn check_read(result: &mut LoadResult, workload: &Workload, key: usize, reply: Value) -> Outcome {
    match reply {
        Value::Bulk(Some(actual)) => {
            // Newest first: usually the only acceptable one.
            let seen = result.versions.acceptable(key).rev().find(|&version| {
                is_value_of(
                    workload.seed,
                    key as u64,
                    version,
                    &actual,
                    workload.value_size,
                )
            });
            match seen {
                Some(version) => result.versions.observe(key, version),
                None => result.read_mismatches += 1,
            }
            Outcome::Read
        }
        Value::Bulk(None) => {
            // The key vanished: as wrong as a wrong value.
            result.read_mismatches += 1;
            Outcome::Read
        }
        // An error reply (e.g. LOADING while a replica syncs) is not data: count an error.
        _ => Outcome::Error,
    }
}

fn check_write(versions: &mut KeyVersions, key: usize, version: u32, reply: Value) -> Outcome {
    match reply {
        Value::Simple(ok) if ok == b"OK" => {
            versions.acknowledge(key, version);
            Outcome::Write
        }
        _ => {
            // The server answered, so it did not apply the SET.
            versions.reject(key, version);
            Outcome::Error
        }
    }
}

/// PINGs every [`PROBE_INTERVAL`] (closed loop) and records every successful reply.
fn probe_loop(
    endpoints: Vec<SocketAddr>,
    clock: Clock,
    stop: Arc<AtomicBool>,
    request_timeout: Duration,
    connect_timeout: Duration,
) -> (Vec<ProbeSample>, u64) {
    let mut follower = Follower::new(endpoints, request_timeout, connect_timeout, stop.clone());
    let mut samples = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let sent = Instant::now();
        match follower.request(PING) {
            Ok(reply) if reply.value == Value::Simple(b"PONG".to_vec()) => {
                samples.push(ProbeSample {
                    reply_us: clock.now_us(),
                    endpoint: reply.endpoint as u8,
                })
            }
            Ok(_) => follower.disconnect(),
            Err(FollowError::Stopped) => break,
            Err(FollowError::Lost { .. }) => {}
        }
        let next = sent + PROBE_INTERVAL;
        let now = Instant::now();
        if now < next {
            std::thread::sleep(next - now);
        }
    }
    (samples, follower.reconnects)
}
