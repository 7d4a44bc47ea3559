//! Migration, source side, as the shim drives it: the request that `pclive migrate` sends inside
//! containerd's CheckpointOptions, and the runc operations the engine's sending end
//! ([`restore_engine::source`]) asks for: the container's processes, the freeze, the final CRIU
//! dump without the (already sent) lazy memory, and the thaw. The container stays frozen from the
//! last round until the destination commits; any failure before that resumes it.

use std::fs;
use std::io::{self, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use log::info;
use restore_engine::policy::ConvergencePolicy;
use restore_engine::record::{self, Store};
use restore_engine::source::{
    self, HookError, MigrateParams, MigrationReport, RoundStats, SourceError, SourceHooks, TaskIds,
};
use restore_engine::wire::{self, Auth};

use crate::runc::{CheckpointOpts, CriuOpts, Runc, RuncError};

/// CRIU's page-server command that ends a lazy dump's serving session.
const PS_IOV_CLOSE: u32 = 0x1023;
/// How long CRIU may take to dump the frozen container (everything but the lazy memory) before
/// it serves pages.
const DUMP_START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long runc may take to end after CRIU's page server closed.
const DUMP_END_TIMEOUT: Duration = Duration::from_secs(10);
/// The field of containerd's `CheckpointOptions` that carries a [`MigrateRequest`] (containerd
/// passes unknown fields through to the shim unchanged).
pub const MIGRATE_FIELD: u32 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("migration request: {0}")]
    Request(String),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

/// What a source shim needs to migrate a container (sent by `pclive migrate` inside containerd's
/// CheckpointOptions, field [`MIGRATE_FIELD`]).
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
    /// The migration's id (32 hex digits), chosen by `pclive migrate` so that it can follow the
    /// migration's record; empty: the shim chooses.
    #[prost(string, tag = "8")]
    pub migration_id: String,
    /// After losing the connection once the images went out, how long to keep asking the
    /// destination for the outcome before declaring the migration in doubt (0: 120 s).
    #[prost(uint32, tag = "9")]
    pub resolve_timeout_seconds: u32,
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

    fn auth(&self) -> Result<Auth, MigrateError> {
        match (self.key_file.is_empty(), self.insecure) {
            (false, false) => Ok(Auth::Key(
                wire::read_key_file(Path::new(&self.key_file)).map_err(MigrateError::Request)?,
            )),
            (true, true) => Ok(Auth::Insecure),
            (true, false) => Err(MigrateError::Request(
                "no key file: pass --key-file (or --insecure to migrate unauthenticated)".into(),
            )),
            (false, true) => Err(MigrateError::Request(
                "a key file and --insecure together: choose one".into(),
            )),
        }
    }

    /// The engine's parameters for container `id`, the final dump and logs in `work_dir`, the
    /// records under `state_dir`.
    pub fn params(
        &self,
        id: &str,
        work_dir: &Path,
        state_dir: &Path,
    ) -> Result<MigrateParams, MigrateError> {
        let migration_id = if self.migration_id.is_empty() {
            record::new_migration_id().map_err(|source| MigrateError::Io {
                what: "choosing a migration id".into(),
                source,
            })?
        } else {
            self.migration_id.clone()
        };
        Ok(MigrateParams {
            migration_id,
            container: id.to_string(),
            destination: self.destination.clone(),
            auth: self.auth()?,
            key_file: (!self.key_file.is_empty()).then(|| PathBuf::from(&self.key_file)),
            store: Store::new(state_dir),
            resolve_timeout: Duration::from_secs(match self.resolve_timeout_seconds {
                0 => 120,
                n => n as u64,
            }),
            policy: self.policy(),
            tracker: (!self.tracker.is_empty()).then(|| self.tracker.clone()),
            compress: self.compress,
            work_dir: work_dir.to_owned(),
        })
    }
}

/// Host pid → pid in the container's namespace (the last NSpid field).
pub fn namespace_pid(host_pid: i32) -> io::Result<u32> {
    let status = fs::read_to_string(format!("/proc/{host_pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|pids| pids.split_whitespace().last())
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("no NSpid for pid {host_pid}"),
            )
        })
}

/// The runc operations of a migration's sending end.
struct RuncHooks<'a> {
    runc: &'a Runc,
    id: &'a str,
    work_dir: &'a Path,
}

impl SourceHooks for RuncHooks<'_> {
    fn tasks(&mut self) -> Result<Vec<TaskIds>, HookError> {
        let pids = self.runc.ps(self.id)?;
        // A process that exits between the listing and here is skipped.
        Ok(pids
            .into_iter()
            .filter_map(|pid| {
                namespace_pid(pid).ok().map(|ns_pid| TaskIds {
                    host_pid: pid as u32,
                    ns_pid,
                })
            })
            .collect())
    }

    fn freeze(&mut self) -> Result<(), HookError> {
        Ok(self.runc.pause(self.id)?)
    }

    fn final_dump(&mut self, image_dir: &Path) -> Result<(), HookError> {
        Ok(lazy_final_dump(
            self.runc,
            self.id,
            image_dir,
            self.work_dir,
        )?)
    }

    fn resume(&mut self) -> Result<(), HookError> {
        Ok(self.runc.resume(self.id)?)
    }

    fn round_done(&mut self, round: &RoundStats) {
        // Progress for `pclive migrate`, which follows this file while it waits.
        if let Ok(line) = serde_json::to_string(round) {
            if let Ok(mut f) = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(progress_path(self.work_dir))
            {
                let _ = writeln!(f, "{line}");
            }
        }
        info!(
            "{}: round {}: {} pages ({:.1} MiB), {} zero, {:.3}s{}",
            self.id,
            round.round,
            round.pages,
            round.bytes as f64 / (1 << 20) as f64,
            round.zero_pages,
            round.seconds,
            if round.frozen { " (frozen)" } else { "" }
        )
    }
}

/// Why the final dump failed.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error(transparent)]
    Runc(#[from] RuncError),
    #[error("{0}")]
    Server(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

/// A CRIU dump of the paused container that leaves the lazy memory out (the destination has it
/// from the rounds): `runc checkpoint --lazy-pages` makes CRIU serve those pages after writing
/// the images; closing its page server at once ends the dump, the container still paused.
fn lazy_final_dump(
    runc: &Runc,
    id: &str,
    image_dir: &Path,
    work_dir: &Path,
) -> Result<(), DumpError> {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|source| DumpError::Io {
            what: "choosing a port for CRIU's page server".into(),
            source,
        })?
        .port();
    let opts = CheckpointOpts {
        criu: CriuOpts {
            image_path: image_dir.to_owned(),
            work_path: Some(work_dir.to_owned()),
            tcp_established: true,
            ext_unix_sk: true,
            file_locks: true,
            lazy_pages: true,
            ..Default::default()
        },
        leave_running: true,
        parent_path: None,
        status_fd: None,
        page_server: Some(format!("127.0.0.1:{port}")),
        // A server under load has clients connecting while it is paused: their connections
        // wait in the listen queue, and CRIU would refuse to dump them. They are dropped (the
        // clients see a reset and reconnect to the destination) instead of failing the move.
        tcp_skip_in_flight: true,
    };
    let runc = runc.clone();
    let id = id.to_owned();
    // runc and its CRIU run in a process group of their own: a dump that does not end in time
    // is stopped as a whole before the container may resume.
    let group = Arc::new(AtomicI32::new(0));
    let dump = {
        let group = Arc::clone(&group);
        thread::spawn(move || {
            runc.checkpoint_in_group(&id, &opts, |pgid| group.store(pgid, Ordering::SeqCst))
        })
    };
    let give_up = |what: String| {
        let pgid = group.load(Ordering::SeqCst);
        if pgid > 0 {
            // SAFETY: killpg has no memory-safety preconditions; the group is runc's own.
            unsafe { libc::killpg(pgid, libc::SIGKILL) };
        }
        DumpError::Server(format!(
            "{what}; runc and CRIU were stopped (CRIU's dump.log in the work directory says where it hung)"
        ))
    };
    let deadline = Instant::now() + DUMP_START_TIMEOUT;
    let mut stream = loop {
        if dump.is_finished() {
            return match dump.join() {
                Ok(Ok(())) => Err(DumpError::Server(
                    "CRIU finished without serving pages".into(),
                )),
                Ok(Err(e)) => Err(e.into()),
                Err(_) => Err(DumpError::Server("the dump thread panicked".into())),
            };
        }
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
            Err(_) => {
                let error = give_up(format!(
                    "CRIU did not finish the final dump within {DUMP_START_TIMEOUT:?}"
                ));
                let _ = dump.join();
                return Err(error);
            }
        }
    };
    // struct page_server_iov { u32 cmd; (pad); u64 nr_pages; u64 vaddr; u64 dst_id; }
    let mut close = [0u8; 32];
    close[..4].copy_from_slice(&PS_IOV_CLOSE.to_le_bytes());
    // No waiting for CRIU's 4-byte acknowledgement: its page server corks the socket, so the
    // reply sits up to 200 ms in the kernel (measured: 0.2 s of every migration's downtime).
    // Whether the dump ended well is what runc's exit status says.
    stream.write_all(&close).map_err(|source| DumpError::Io {
        what: "closing CRIU's page server".into(),
        source,
    })?;
    drop(stream);
    let deadline = Instant::now() + DUMP_END_TIMEOUT;
    while !dump.is_finished() {
        if Instant::now() > deadline {
            let error = give_up(format!(
                "runc checkpoint did not end within {DUMP_END_TIMEOUT:?} after its page server closed"
            ));
            let _ = dump.join();
            return Err(error);
        }
        thread::sleep(Duration::from_millis(5));
    }
    match dump.join() {
        Ok(result) => Ok(result?),
        Err(_) => Err(DumpError::Server("the dump thread panicked".into())),
    }
}

/// Migrates container `id` to `request.destination`; `work_dir` holds the final dump and its
/// logs. On success the caller removes the (frozen) source and records that; on
/// [`SourceError::InDoubt`] it stays frozen; on any other error it has been resumed.
pub fn migrate_out(
    runc: &Runc,
    id: &str,
    request: &MigrateRequest,
    work_dir: &Path,
    state_dir: &Path,
) -> Result<MigrationReport, MigrateError> {
    let params = request.params(id, work_dir, state_dir)?;
    let mut hooks = RuncHooks { runc, id, work_dir };
    let processes = hooks.tasks().map(|t| t.len()).unwrap_or(0);
    info!(
        "{id}: migrating {processes} process(es) to {}",
        request.destination
    );
    Ok(source::migrate(&params, &mut hooks)?)
}

/// Where the rounds of a running migration are appended (JSON lines).
pub fn progress_path(work_dir: &Path) -> PathBuf {
    work_dir.join("pclive-migration.progress")
}

/// Where the report of a migration goes.
pub fn report_path(work_dir: &Path) -> PathBuf {
    work_dir.join("pclive-migration.json")
}
