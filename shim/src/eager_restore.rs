//! Eager restore of a migration, from the shim's side: the engine's server receives the migration
//! (pre-copy rounds into its staging store, then the final dump's images) and completes the images
//! from the store; the shim then runs a plain `runc restore` (no lazy-pages server) and tells the
//! server how it went, and the server tells the source to commit (it goes) or to abort (it
//! resumes).
//!
//! The server is a child process as in the lazy path: the staging store, the container's whole
//! memory, lives and dies with it (it is freed before the restore), never in the shim; and if the
//! shim or the server dies, the connection to the source closes and the source resumes.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use containerd_shim::monitor::{monitor_subscribe, Subscription, Topic};
use log::{error, info, warn};
use restore_engine::assemble::AssembleReport;
use restore_engine::events::{ServerEvent, ShimMessage};
use serde::Serialize;

use crate::lazy_restore::{
    forward_events, kill, server_command, wait_exit, RECEIVE_TIMEOUT, SERVER_LOG,
};
use crate::receive::{self, add_receive_args, ReceiveHandle, ReceiveSpec, ServerLine};

/// Name of the report the shim writes into the CRIU work directory when an eager restore of a
/// migration ends (the lazy path writes `pclive-lazy-restore.json`).
pub const REPORT_FILE: &str = "pclive-eager-restore.json";
/// How long the server may take to tell the source that the tasks run and to commit (two
/// messages on an open connection).
const COMMIT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the server may take to exit once it has nothing left to do.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum EagerRestoreError {
    #[error("cannot start the receiving server: {0}")]
    Spawn(String),
    #[error("receiving the migration for an eager restore failed: {0}. The source keeps running")]
    Receive(String),
    #[error("the restore succeeded but the source was not told to commit ({0}); the restored container was stopped here and the source resumes")]
    Commit(String),
}

/// What the shim records about the eager restore of a migration (JSON next to CRIU's logs).
#[derive(Debug, Clone, Serialize)]
pub struct EagerReport {
    pub container: String,
    /// `done` (restored and committed) or `failed`.
    pub status: &'static str,
    pub reason: Option<String>,
    pub rounds: Option<u32>,
    /// What the staging store held when the images arrived (each page once).
    pub staged_bytes: Option<u64>,
    pub image_bytes: Option<u64>,
    /// Images received → `runc restore` started: mostly the assembly of the images.
    pub images_to_restore_start_seconds: Option<f64>,
    /// Completing the images from the staging store (part of the above).
    pub assemble_seconds: Option<f64>,
    /// `runc restore` alone: CRIU writes every page before the tasks resume.
    pub restore_seconds: Option<f64>,
    /// Images received → the tasks run; a lazy restore's report measures the same span as its
    /// `restore_seconds`.
    pub images_to_running_seconds: Option<f64>,
    pub assemble: Option<AssembleReport>,
}

impl EagerReport {
    fn failed(mut self, reason: &str) -> Self {
        self.status = "failed";
        self.reason = Some(reason.to_string());
        self
    }
}

/// A receiving server whose images are complete, waiting to hear how the restore went.
pub struct EagerReceiver {
    pid: i32,
    events: Receiver<ServerEvent>,
    exit: Subscription,
    line: ServerLine,
    spec: ReceiveSpec,
    migration_id: Option<String>,
    /// The server recorded the outcome and told the source.
    concluded: bool,
    work_dir: PathBuf,
    images_ready_at: Instant,
    report: EagerReport,
    /// The server was told the outcome (or is gone): nothing for Drop to do.
    finished: bool,
}

impl EagerReceiver {
    /// Starts the server receiving a migration for container `id` as `spec` says, the image files
    /// into `images`, its logs into `work_dir`; returns once the images are complete. On error
    /// the server is gone (and has told the source to abort, or closed the connection).
    pub fn receive(
        id: &str,
        images: &Path,
        work_dir: &Path,
        spec: &ReceiveSpec,
        handle: &ReceiveHandle,
    ) -> Result<Self, EagerRestoreError> {
        let mut command = server_command(images, work_dir).map_err(EagerRestoreError::Spawn)?;
        add_receive_args(&mut command, spec);
        command.arg("--eager").stdin(Stdio::piped());
        // SAFETY: close_range is async-signal-safe; it only closes the child's copies of the
        // shim's descriptors above stdio, so none of them leaks into the server.
        unsafe {
            command.pre_exec(|| {
                libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
                Ok(())
            });
        }
        // Subscribe before spawning so the exit cannot be missed.
        let exit = monitor_subscribe(Topic::Pid)
            .map_err(|e| EagerRestoreError::Spawn(format!("exit monitor: {e}")))?;
        let mut child = command
            .spawn()
            .map_err(|e| EagerRestoreError::Spawn(e.to_string()))?;
        let pid = child.id() as i32;
        let line = ServerLine::new(child.stdin.take());
        handle.attach(line.clone());
        let stdout = child.stdout.take().expect("stdout is piped");
        // The reaper collects the exit; the Child handle is not waited on.
        drop(child);
        let events = forward_events(stdout, spec.progress_file.clone()).map_err(|e| {
            kill(pid);
            EagerRestoreError::Spawn(e.to_string())
        })?;
        let mut receiver = EagerReceiver {
            pid,
            events,
            exit,
            line,
            spec: spec.clone(),
            migration_id: None,
            concluded: false,
            work_dir: work_dir.to_owned(),
            images_ready_at: Instant::now(),
            report: EagerReport {
                container: id.to_string(),
                status: "failed",
                reason: None,
                rounds: None,
                staged_bytes: None,
                image_bytes: None,
                images_to_restore_start_seconds: None,
                assemble_seconds: None,
                restore_seconds: None,
                images_to_running_seconds: None,
                assemble: None,
            },
            finished: false,
        };
        match receiver.wait_until_assembled() {
            Ok(()) => Ok(receiver),
            Err(reason) => {
                receiver.stop_server();
                receiver.write_report(receiver.report.clone().failed(&reason));
                Err(EagerRestoreError::Receive(reason))
            }
        }
    }

    fn wait_until_assembled(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + RECEIVE_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(ServerEvent::Listening { address }) => {
                    info!("receiving a migration on {address} (eager restore)")
                }
                Ok(ServerEvent::SourceArrived {
                    migration_id,
                    container,
                    peer,
                    page_streams,
                }) => {
                    info!(
                        "migration {migration_id} of {container} from {peer}: receiving{}",
                        restore_engine::source::streams::describe(page_streams)
                    );
                    self.migration_id = Some(migration_id);
                }
                Ok(ServerEvent::Refused { peer, reason }) => {
                    warn!(
                        "refused a connection from {peer}: {reason}; still waiting for the source"
                    )
                }
                Ok(ServerEvent::Concluded { phase, reason }) => {
                    self.concluded = true;
                    info!(
                        "migration concluded here: {phase} ({})",
                        reason.unwrap_or_default()
                    );
                }
                Ok(ServerEvent::RoundReceived {
                    round, bytes, last, ..
                }) => info!(
                    "{}: round {round}{} received: {:.1} MiB",
                    self.report.container,
                    if last { " (the source is paused)" } else { "" },
                    bytes as f64 / (1 << 20) as f64
                ),
                Ok(ServerEvent::ImagesReady {
                    rounds,
                    received_bytes,
                    resident_bytes,
                    image_bytes,
                }) => {
                    self.images_ready_at = Instant::now();
                    self.report.rounds = Some(rounds);
                    self.report.staged_bytes = Some(resident_bytes);
                    self.report.image_bytes = Some(image_bytes);
                    info!(
                        "{}: migration received: {rounds} rounds, {:.1} MiB of pages received, {:.1} MiB resident, {:.1} KiB of images; completing the images",
                        self.report.container,
                        received_bytes as f64 / (1 << 20) as f64,
                        resident_bytes as f64 / (1 << 20) as f64,
                        image_bytes as f64 / 1024.0
                    );
                }
                Ok(ServerEvent::Assembled(assembled)) => {
                    info!(
                        "{}: images complete in {:.3}s: {} pages from the staging store, {} zero, {} from the dump; restoring",
                        self.report.container,
                        assembled.seconds,
                        assembled.pages_from_staging,
                        assembled.zero_pages,
                        assembled.pages_from_images
                    );
                    self.report.assemble_seconds = Some(assembled.seconds);
                    self.report.assemble = Some(assembled);
                    return Ok(());
                }
                Ok(ServerEvent::Error { message }) => return Err(message),
                Ok(other) => return Err(format!("the server reported {other:?} unexpectedly")),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("no migration arrived within {RECEIVE_TIMEOUT:?}"))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let log =
                        fs::read_to_string(self.work_dir.join(SERVER_LOG)).unwrap_or_default();
                    return Err(format!(
                        "the receiving server exited without a word. {}",
                        log.trim()
                    ));
                }
            }
        }
    }

    /// `runc restore` (started at `restore_started`) succeeded and the tasks run: the server
    /// tells the source so and to commit. Err: the source was not told to commit; it resumes,
    /// and the caller must stop the restored container.
    pub fn restored(mut self, restore_started: Instant) -> Result<(), EagerRestoreError> {
        self.record_restore(restore_started);
        let committed = self
            .line
            .tell(&ShimMessage::Restored)
            .and_then(|()| self.wait_for_commit());
        self.stop_server();
        match committed {
            Ok(()) => {
                let report = &self.report;
                info!(
                    "{}: eager restore committed: images → restore start {:.3}s (assembly {:.3}s), runc restore {:.3}s",
                    report.container,
                    report.images_to_restore_start_seconds.unwrap_or_default(),
                    report.assemble_seconds.unwrap_or_default(),
                    report.restore_seconds.unwrap_or_default()
                );
                let mut done = self.report.clone();
                done.status = "done";
                self.write_report(done);
                Ok(())
            }
            Err(reason) => {
                error!("{}: {reason}", self.report.container);
                self.write_report(self.report.clone().failed(&reason));
                Err(EagerRestoreError::Commit(reason))
            }
        }
    }

    /// `runc restore` (started at `restore_started`) failed with `reason`: the server tells the
    /// source to abort (it resumes) and exits.
    pub fn restore_failed(mut self, restore_started: Instant, reason: &str) {
        self.record_restore(restore_started);
        if let Err(e) = self.line.tell(&ShimMessage::RestoreFailed {
            reason: reason.to_string(),
        }) {
            warn!("{}: {e}", self.report.container);
        }
        // The server records the outcome and tells the source to resume.
        let _ = self.wait_for_commit();
        self.stop_server();
        self.write_report(self.report.clone().failed(reason));
    }

    fn record_restore(&mut self, restore_started: Instant) {
        let now = Instant::now();
        let since_images = |at: Instant| at.duration_since(self.images_ready_at).as_secs_f64();
        self.report.images_to_restore_start_seconds = Some(since_images(restore_started));
        self.report.restore_seconds = Some(now.duration_since(restore_started).as_secs_f64());
        self.report.images_to_running_seconds = Some(since_images(now));
    }

    fn wait_for_commit(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + COMMIT_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(ServerEvent::Concluded { phase, reason }) => {
                    self.concluded = true;
                    return match phase.as_str() {
                        "committed" => Ok(()),
                        _ => Err(reason.unwrap_or_else(|| format!("the migration is {phase}"))),
                    };
                }
                Ok(ServerEvent::Committed) => {}
                Ok(ServerEvent::Error { message }) => return Err(message),
                Ok(other) => warn!("receiving server: unexpected {other:?}"),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("no commit within {COMMIT_TIMEOUT:?}"))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err("the receiving server exited before committing".into())
                }
            }
        }
    }

    /// Done with the server. One that concluded exits by itself (once the source has the
    /// outcome: it may answer the source's questions for a while); one that did not is stopped,
    /// and the shim records the truth and answers the source in its place.
    fn stop_server(&mut self) {
        if !self.concluded {
            kill(self.pid);
            let _ = wait_exit(&self.exit, self.pid, EXIT_TIMEOUT);
            receive::server_died(
                &self.spec,
                self.migration_id.as_deref(),
                "the receiving server did not conclude the migration",
            );
        }
        self.finished = true;
    }

    fn write_report(&self, report: EagerReport) {
        if let Ok(json) = serde_json::to_vec_pretty(&report) {
            let path = self.work_dir.join(REPORT_FILE);
            if let Err(e) = fs::write(&path, json) {
                warn!("cannot write {}: {e}", path.display());
            }
        }
    }
}

impl Drop for EagerReceiver {
    /// Never told the outcome (the shim failed in between): the source must not wait for a
    /// commit that will not come; killing the server closes the connection and it resumes.
    fn drop(&mut self) {
        if !self.finished {
            let reason = "the shim gave up before the restore";
            if self
                .line
                .tell(&ShimMessage::RestoreFailed {
                    reason: reason.into(),
                })
                .is_ok()
            {
                let _ = self.wait_for_commit();
            }
            self.stop_server();
            self.write_report(
                self.report
                    .clone()
                    .failed("the shim gave up before the restore"),
            );
        }
    }
}
