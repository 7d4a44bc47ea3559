//! The receiving end of a migration, as the shim sees it (the lazy and the eager path share
//! this): how the engine's server is asked to receive, the shim's line to it (its stdin: the
//! restore's outcome, whether the container lives), and what the shim does when the server dies
//! before the source learnt the outcome: it records the truth and answers the source itself.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command};
use std::sync::{Arc, Mutex};
use std::thread;

use log::{info, warn};
use restore_engine::destination::limits::MEMORY_MARGIN_MIB;
use restore_engine::destination::{self, ReceiveOptions};
use restore_engine::events::ShimMessage;
use restore_engine::record::{Phase, Role, Store};
use restore_engine::wire::{self, Auth};

/// Where a receiving container listens for its source, and how it authenticates it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReceiveSpec {
    pub listen: String,
    /// None: an unauthenticated session, which the user asked for explicitly.
    pub key_file: Option<PathBuf>,
    /// Where to append the receiving server's events (JSON lines) for `pclive receive` to
    /// follow: rounds as they arrive, images, restore, commit.
    pub progress_file: Option<PathBuf>,
    /// How long to wait for the source (None: the engine's default, 600 s).
    pub accept_timeout_seconds: Option<u64>,
    /// Where this host records migrations (the shim's state directory).
    pub state_dir: PathBuf,
    /// What the source may make this host store ([`limits_for`]; the shim's, not an
    /// annotation's).
    pub limits: ReceiveLimits,
    /// The receiving container's root filesystem, where the source's is applied (the shim's,
    /// from the bundle).
    pub rootfs: Option<PathBuf>,
    /// Both hosts share the root filesystem's storage: nothing is copied, its tree is checked.
    pub shared_rootfs: bool,
    /// The container takes the source's address ([`crate::annotations::RECEIVE_MOVE_ADDRESS`]).
    pub move_address: bool,
    /// With `move_address`: the network namespace that takes it (the shim's, from the spec).
    pub address_netns: Option<PathBuf>,
}

/// What a source may make the receiving host store: the staging store (and the image files
/// together) at most `memory_mib`, at most `image_files` image files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReceiveLimits {
    pub memory_mib: u64,
    pub image_files: usize,
}

/// Image files a migration may bring: a CRIU image set has a handful per task and a few more
/// per container, far fewer than this.
pub const MAX_IMAGE_FILES: usize = 4096;

/// The limits of a receive into the container of `bundle`: its memory limit
/// (`linux.resources.memory.limit`) plus the engine's margin, or, without a limit, the host's
/// available memory (MemAvailable in /proc/meminfo).
pub fn limits_for(bundle: &Path) -> Result<ReceiveLimits, String> {
    let spec = oci_spec::runtime::Spec::load(bundle.join("config.json"))
        .map_err(|e| format!("cannot read {}/config.json: {e}", bundle.display()))?;
    let limit = spec
        .linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref())
        .and_then(|r| r.memory().as_ref())
        .and_then(|m| m.limit())
        .filter(|&l| l > 0);
    let memory_mib = match limit {
        Some(bytes) => (bytes as u64).div_ceil(1 << 20) + MEMORY_MARGIN_MIB,
        None => mem_available_mib()?,
    };
    Ok(ReceiveLimits {
        memory_mib,
        image_files: MAX_IMAGE_FILES,
    })
}

fn mem_available_mib() -> Result<u64, String> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")
        .map_err(|e| format!("cannot read /proc/meminfo: {e}"))?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib / 1024)
        .ok_or_else(|| "/proc/meminfo has no MemAvailable: cannot limit the receive".into())
}

impl ReceiveSpec {
    fn auth(&self) -> Result<Auth, String> {
        match &self.key_file {
            Some(path) => wire::read_key_file(path).map(Auth::Key),
            None => Ok(Auth::Insecure),
        }
    }
}

/// Makes the server receive a migration first, as `spec` says.
pub(crate) fn add_receive_args(command: &mut Command, spec: &ReceiveSpec) {
    command.args(["--receive", &spec.listen]);
    match &spec.key_file {
        Some(key) => {
            command.arg("--key-file").arg(key);
        }
        None => {
            command.arg("--insecure");
        }
    }
    command.arg("--state-dir").arg(&spec.state_dir);
    if let Some(seconds) = spec.accept_timeout_seconds {
        command.args(["--accept-timeout-seconds", &seconds.to_string()]);
    }
    command.args(["--max-memory-mib", &spec.limits.memory_mib.to_string()]);
    command.args(["--max-image-files", &spec.limits.image_files.to_string()]);
    if let Some(rootfs) = &spec.rootfs {
        command.arg("--rootfs").arg(rootfs);
        if spec.shared_rootfs {
            command.arg("--shared-rootfs");
        }
    }
}

/// The shim's line to a receiving server: its stdin. Closing it tells the server that the shim
/// went away.
#[derive(Clone, Default)]
pub(crate) struct ServerLine(Arc<Mutex<Option<ChildStdin>>>);

impl ServerLine {
    pub(crate) fn new(stdin: Option<ChildStdin>) -> Self {
        ServerLine(Arc::new(Mutex::new(stdin)))
    }

    pub(crate) fn tell(&self, message: &ShimMessage) -> Result<(), String> {
        let mut line = serde_json::to_string(message).map_err(|e| format!("encoding {e}"))?;
        line.push('\n');
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let stdin = slot
            .as_mut()
            .ok_or("the receiving server's stdin is already closed")?;
        stdin
            .write_all(line.as_bytes())
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("telling the receiving server {message:?}: {e}"))
    }
}

/// Lets a Kill stop a receive that waits for, or takes in, its source: the server is told the
/// restore failed (it tells the source to resume) and the container's start fails.
#[derive(Clone, Default)]
pub struct ReceiveHandle(Arc<Mutex<HandleState>>);

#[derive(Default)]
struct HandleState {
    line: Option<ServerLine>,
    cancelled: Option<String>,
    done: bool,
}

impl ReceiveHandle {
    /// The receiving server started: Kill reaches it through `line`.
    pub(crate) fn attach(&self, line: ServerLine) {
        let mut state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(reason) = &state.cancelled {
            let _ = line.tell(&ShimMessage::RestoreFailed {
                reason: reason.clone(),
            });
        }
        state.line = Some(line);
    }

    /// The restore ran (or failed): there is nothing to cancel any more.
    pub(crate) fn finish(&self) {
        let mut state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        state.line = None;
        state.done = true;
    }

    /// Stops the receive, if one is under way; true if it was.
    pub fn cancel(&self, reason: &str) -> bool {
        let mut state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if state.done {
            return false;
        }
        state.cancelled.get_or_insert_with(|| reason.to_string());
        if let Some(line) = &state.line {
            let _ = line.tell(&ShimMessage::RestoreFailed {
                reason: reason.to_string(),
            });
        }
        true
    }

    pub fn cancelled(&self) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .cancelled
            .clone()
    }
}

/// The receiving server died (or was given up on) before the source learnt how migration
/// `migration_id` ended: record the truth (`lost` if the restored tasks had resumed, `aborted`
/// if not) and answer the source's questions on the listen address for a while, on a thread.
pub(crate) fn server_died(spec: &ReceiveSpec, migration_id: Option<&str>, reason: &str) {
    let Some(id) = migration_id else {
        // The source never arrived: there is nothing to tell it.
        return;
    };
    let store = Store::new(&spec.state_dir);
    match store.read(id, Role::Destination) {
        Ok(Some(mut record)) if !record.phase.is_final() => {
            let phase = if record.phase == Phase::Running {
                Phase::Lost
            } else {
                Phase::Aborted
            };
            record.enter(phase, Some(reason.to_string()));
            if let Err(e) = store.write(&record) {
                warn!("migration {id}: {e}");
                return;
            }
            info!("migration {id}: recorded {phase}: {reason}");
        }
        Ok(Some(record)) if record.acknowledged => return,
        Ok(Some(_)) => {}
        Ok(None) => return,
        Err(e) => {
            warn!("migration {id}: {e}");
            return;
        }
    }
    let auth = match spec.auth() {
        Ok(auth) => auth,
        Err(e) => {
            warn!("migration {id}: cannot answer the source: {e}");
            return;
        }
    };
    let options = ReceiveOptions::new(&spec.listen, auth, store);
    let id = id.to_string();
    let _ = thread::Builder::new()
        .name("outcome-answerer".into())
        .spawn(move || {
            if let Err(e) = destination::answer_queries(options, &id) {
                warn!("migration {id}: cannot answer the source's questions: {e}");
            }
        });
}

/// containerd cleans up after the shim of container `id` died (and stopped the container): a
/// migration it took part in and that had not ended is recorded as ended by that.
pub fn shim_died(state_dir: &std::path::Path, id: &str) {
    let store = Store::new(state_dir);
    for role in [Role::Source, Role::Destination] {
        let Ok(Some(mut record)) = store.latest(id, role) else {
            continue;
        };
        if record.phase.is_final() && record.phase != Phase::Committed {
            continue;
        }
        let (phase, reason) = match (role, record.phase) {
            (Role::Source, Phase::Committed) => (Phase::Done, "the source's shim died after the commit; containerd stopped the source copy"),
            (Role::Source, _) => (Phase::SourceLost, "the source's shim died during the migration and containerd stopped the container here"),
            (Role::Destination, Phase::Committed) => continue,
            (Role::Destination, Phase::Running) => (Phase::Lost, "the receiving shim died after the restored tasks resumed; containerd stopped the container"),
            (Role::Destination, _) => (Phase::Aborted, "the receiving shim died before the restored tasks resumed"),
        };
        record.enter(phase, Some(reason.into()));
        match store.write(&record) {
            Ok(()) => info!(
                "{id}: migration {} recorded {phase}: {reason}",
                record.migration_id
            ),
            Err(e) => warn!("{id}: {e}"),
        }
    }
}
