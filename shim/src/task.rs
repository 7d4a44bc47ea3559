//! The shim's core: containers and their processes over runc, in the shim's own types.
//!
//! `service.rs` translates containerd's ttrpc requests into calls on [`Tasks`] and its
//! [`TaskEvent`]s back into containerd events; nothing here knows about protobuf.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use containerd_shim::monitor::{monitor_subscribe, Subject, Topic};
use log::{debug, info, warn};

use crate::cgroups::{self, CgroupError, ContainerStats, OomWatch};
use crate::eager_restore::{EagerReceiver, EagerRestoreError};
use crate::io::{self as pio, IoError, PreparedIo, ProcessIo, StdioConfig};
use crate::lazy_restore::{LazyOptions, LazyRestoreError, LazyServer, ReceiveSpec};
use crate::runc::{CheckpointOpts, CreateOpts, CriuOpts, ExecOpts, RestoreOpts, Runc, RuncError};
use crate::tools;
use restore_engine::versions::VersionError;

/// runc reads the CRIU config file this annotation names (instead of /etc/criu/runc.conf).
const CRIU_CONFIG_ANNOTATION: &str = "org.criu.config";
/// Options CRIU needs on restore only. `mntns-compat-mode`: CRIU 4.2's new mount engine fails
/// (move_mount EINVAL) on bundles that bind-mount host directories; CRIU refuses it on dump,
/// so it cannot live in /etc/criu/runc.conf.
const RESTORE_ONLY_CRIU_OPTIONS: &str = "mntns-compat-mode\n";

/// Annotation on a container's OCI spec that makes its task a restore from a CRIU image
/// directory: `ctr run --annotation io.containerd.pclive.restore.image-path=/path ...`.
pub const RESTORE_IMAGE_ANNOTATION: &str = "io.containerd.pclive.restore.image-path";
/// Optional CRIU work directory (logs) for such a restore.
pub const RESTORE_WORK_ANNOTATION: &str = "io.containerd.pclive.restore.work-path";
/// `true`: restore lazily: the tasks resume at once and pclive's lazy-pages server installs
/// their memory with userfaultfd (faults first, the rest in the background). A receiving
/// container restores lazily unless this says `false`: then its images are completed from the
/// staging store and restored eagerly (same pre-copy, no lazy-pages server).
pub const RESTORE_LAZY_ANNOTATION: &str = "io.containerd.pclive.restore.lazy-pages";
/// Background fill limit of a lazy restore, in MiB/s (faults are never limited).
pub const RESTORE_FILL_RATE_ANNOTATION: &str = "io.containerd.pclive.restore.fill-rate-mib";
/// Receive a migration: listen on this host:port for the source (the container is restored
/// from what arrives). Needs RECEIVE_KEY_FILE_ANNOTATION or RECEIVE_INSECURE_ANNOTATION=true.
pub const RECEIVE_LISTEN_ANNOTATION: &str = "io.containerd.pclive.receive.listen";
pub const RECEIVE_KEY_FILE_ANNOTATION: &str = "io.containerd.pclive.receive.key-file";
pub const RECEIVE_INSECURE_ANNOTATION: &str = "io.containerd.pclive.receive.insecure";
/// Optional: a file the receiving shim appends its progress to (JSON lines: rounds as they
/// arrive, images, restore, commit), which `pclive receive` follows.
pub const RECEIVE_PROGRESS_ANNOTATION: &str = "io.containerd.pclive.receive.progress-file";
/// `true`: established TCP connections are restored closed (CRIU's tcp-close), for containers
/// whose address does not move with them: their peers reconnect instead of the restore failing
/// to bind the old address.
pub const RESTORE_TCP_CLOSE_ANNOTATION: &str = "io.containerd.pclive.restore.tcp-close";
/// Where a lazy restore takes pages from: `images` (the mapped image files, default) or
/// `staging` (copied into memory first).
pub const RESTORE_PAGE_SOURCE_ANNOTATION: &str = "io.containerd.pclive.restore.page-source";

/// How long an exit waits for the process's output to drain before it is reported.
const OUTPUT_DRAIN_BOUND: Duration = Duration::from_secs(2);
/// Exits of pids nobody claimed yet (a process that exits before runc returned its pid) are
/// remembered this long.
const UNCLAIMED_EXIT_TTL: Duration = Duration::from_secs(120);

/// Errors of task operations. Each maps to one containerd/ttrpc status code.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("container {0} does not exist in this shim")]
    NoContainer(String),
    #[error("process {exec_id} does not exist in container {id}")]
    NoProcess { id: String, exec_id: String },
    #[error("container {0} already exists in this shim")]
    ContainerExists(String),
    #[error("exec process {exec_id} already exists in container {id}")]
    ProcessExists { id: String, exec_id: String },
    #[error("{what}: process is {status}, expected {expected}")]
    WrongState {
        what: String,
        status: ProcessStatus,
        expected: &'static str,
    },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error(transparent)]
    Runc(#[from] RuncError),
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Version(#[from] VersionError),
    #[error(transparent)]
    Lazy(#[from] LazyRestoreError),
    #[error(transparent)]
    Eager(#[from] EagerRestoreError),
    #[error("migration: {0}")]
    Migrate(#[from] crate::migrate::MigrateError),
    #[error("{what}: {source}")]
    Os {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn os_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> TaskError {
    let what = what.into();
    move |source| TaskError::Os { what, source }
}

/// Process life cycle, as containerd sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessStatus {
    Created,
    Running,
    Paused,
    Stopped,
}

impl std::fmt::Display for ProcessStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProcessStatus::Created => "created",
            ProcessStatus::Running => "running",
            ProcessStatus::Paused => "paused",
            ProcessStatus::Stopped => "stopped",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    pub code: u32,
    pub at: SystemTime,
}

/// A snapshot of one process.
#[derive(Debug, Clone)]
pub struct ProcessState {
    pub id: String,
    pub exec_id: Option<String>,
    pub bundle: PathBuf,
    pub pid: u32,
    pub status: ProcessStatus,
    pub stdio: StdioConfig,
    pub exit: Option<ExitInfo>,
}

/// Events containerd expects from a shim.
#[derive(Debug, Clone)]
pub enum TaskEvent {
    Create {
        id: String,
        bundle: PathBuf,
        stdio: StdioConfig,
        pid: u32,
        checkpoint: String,
    },
    Start {
        id: String,
        pid: u32,
    },
    Exit {
        id: String,
        exec_id: Option<String>,
        pid: u32,
        exit: ExitInfo,
    },
    ExecAdded {
        id: String,
        exec_id: String,
    },
    ExecStarted {
        id: String,
        exec_id: String,
        pid: u32,
    },
    Paused {
        id: String,
    },
    Resumed {
        id: String,
    },
    Oom {
        id: String,
    },
    Checkpointed {
        id: String,
    },
    Delete {
        id: String,
        pid: u32,
        exit: Option<ExitInfo>,
    },
}

/// Where the shim sends task events.
pub trait EventSink: Send + Sync {
    fn publish(&self, event: TaskEvent);
}

/// A rootfs mount containerd asks for (from the snapshotter).
#[derive(Debug, Clone)]
pub struct RootfsMount {
    pub fs_type: String,
    pub source: String,
    pub options: Vec<String>,
}

/// Where a restore reads its CRIU images from, and how.
#[derive(Debug, Clone)]
pub struct RestoreSource {
    pub image_path: PathBuf,
    pub work_path: Option<PathBuf>,
    /// Lazy restore (userfaultfd) instead of CRIU filling memory before the tasks resume.
    pub lazy: Option<LazyOptions>,
    /// Receive a migration first and restore it eagerly (its images completed from the staging
    /// store). A lazily restored migration says so in `lazy` instead.
    pub receive_eagerly: Option<ReceiveSpec>,
}

impl RestoreSource {
    /// The images arrive with a migration (they are not there yet at create).
    fn receives(&self) -> bool {
        self.receive_eagerly.is_some() || self.lazy.as_ref().is_some_and(|l| l.receive.is_some())
    }
}

/// Runtime options (containerd's runc `Options`, as far as they apply).
#[derive(Debug, Clone, Default)]
pub struct RuntimeOptions {
    pub binary_name: Option<String>,
    pub root: Option<String>,
    pub no_pivot_root: bool,
    pub no_new_keyring: bool,
    pub systemd_cgroup: bool,
    pub criu_image_path: Option<String>,
    pub criu_work_path: Option<String>,
}

/// A create request in the shim's terms.
#[derive(Debug, Clone)]
pub struct CreateParams {
    pub id: String,
    pub bundle: PathBuf,
    pub rootfs: Vec<RootfsMount>,
    pub stdio: StdioConfig,
    /// A directory holding a CRIU image set to restore from (containerd unpacked it).
    pub checkpoint: Option<PathBuf>,
    pub options: RuntimeOptions,
}

/// A checkpoint request in the shim's terms (runc `CheckpointOptions` compatible).
#[derive(Debug, Clone, Default)]
pub struct CheckpointParams {
    pub image_path: PathBuf,
    pub work_path: Option<PathBuf>,
    pub exit: bool,
    pub open_tcp: bool,
    pub external_unix_sockets: bool,
    pub terminal: bool,
    pub file_locks: bool,
    pub empty_namespaces: Vec<String>,
    pub cgroups_mode: Option<String>,
    /// Migrate to another host instead of writing a checkpoint.
    pub migrate: Option<restore_engine::precopy::MigrateRequest>,
}

struct ProcessInner {
    pid: u32,
    status: ProcessStatus,
    exit: Option<ExitInfo>,
    io: Option<ProcessIo>,
}

struct Process {
    exec_id: Option<String>,
    stdio: StdioConfig,
    inner: Mutex<ProcessInner>,
    exited: Condvar,
}

impl Process {
    fn new(exec_id: Option<String>, stdio: StdioConfig) -> Self {
        Process {
            exec_id,
            stdio,
            inner: Mutex::new(ProcessInner {
                pid: 0,
                status: ProcessStatus::Created,
                exit: None,
                io: None,
            }),
            exited: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ProcessInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What `Start` must do for the init process.
enum InitStart {
    /// `runc start` of a created container.
    Start,
    /// `runc restore`, stdio already prepared at create time.
    Restore {
        source: Box<RestoreSource>,
        io: Box<PreparedIo>,
    },
}

struct Container {
    id: String,
    bundle: PathBuf,
    runc: Runc,
    init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    pending_start: Mutex<Option<InitStart>>,
    rootfs_mounted: bool,
    no_pivot: bool,
}

impl Container {
    fn process(&self, exec_id: Option<&str>) -> Result<Arc<Process>, TaskError> {
        match exec_id {
            None => Ok(Arc::clone(&self.init)),
            Some(e) => self
                .execs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(e)
                .cloned()
                .ok_or_else(|| TaskError::NoProcess {
                    id: self.id.clone(),
                    exec_id: e.into(),
                }),
        }
    }
}

#[derive(Default)]
struct PidRegistry {
    /// pid → (container id, exec id)
    owners: HashMap<u32, (String, Option<String>)>,
    unclaimed: HashMap<u32, (ExitInfo, Instant)>,
}

/// Shim-wide settings.
#[derive(Debug, Clone)]
pub struct TasksConfig {
    /// runc `--root` for this shim's containerd instance.
    pub runc_root: PathBuf,
}

/// All containers of this shim.
pub struct Tasks {
    config: TasksConfig,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    pids: Mutex<PidRegistry>,
    events: Arc<dyn EventSink>,
}

fn exit_code_to_info(code: i32) -> ExitInfo {
    ExitInfo {
        code: code as u32,
        at: SystemTime::now(),
    }
}

fn read_pid_file(path: &Path) -> Result<u32, TaskError> {
    let text = fs::read_to_string(path).map_err(os_err(format!(
        "runc did not write the pid file {}",
        path.display()
    )))?;
    text.trim().parse().map_err(|_| {
        TaskError::Invalid(format!(
            "pid file {} holds '{}', not a pid",
            path.display(),
            text.trim()
        ))
    })
}

/// A receiving container's listen address and authentication, from its annotations.
fn receive_spec(annotations: &HashMap<String, String>) -> Result<Option<ReceiveSpec>, TaskError> {
    let Some(listen) = annotations.get(RECEIVE_LISTEN_ANNOTATION) else {
        return Ok(None);
    };
    let key_file = annotations
        .get(RECEIVE_KEY_FILE_ANNOTATION)
        .map(PathBuf::from);
    let insecure = annotations
        .get(RECEIVE_INSECURE_ANNOTATION)
        .is_some_and(|v| v == "true");
    if key_file.is_some() == insecure {
        return Err(TaskError::Invalid(format!(
            "a receiving container needs exactly one of {RECEIVE_KEY_FILE_ANNOTATION}=FILE and {RECEIVE_INSECURE_ANNOTATION}=true"
        )));
    }
    Ok(Some(ReceiveSpec {
        listen: listen.clone(),
        key_file,
        progress_file: annotations
            .get(RECEIVE_PROGRESS_ANNOTATION)
            .map(PathBuf::from),
    }))
}

/// Lazy-restore options from the container's annotations.
fn lazy_options(annotations: &HashMap<String, String>) -> Result<Option<LazyOptions>, TaskError> {
    match annotations.get(RESTORE_LAZY_ANNOTATION).map(String::as_str) {
        None | Some("false") => return Ok(None),
        Some("true") => {}
        Some(other) => {
            return Err(TaskError::Invalid(format!(
                "annotation {RESTORE_LAZY_ANNOTATION}={other}: use true or false"
            )))
        }
    };
    let fill_rate_mib = match annotations.get(RESTORE_FILL_RATE_ANNOTATION) {
        None => None,
        Some(v) => Some(v.parse::<u64>().ok().filter(|r| *r > 0).ok_or_else(|| {
            TaskError::Invalid(format!(
                "annotation {RESTORE_FILL_RATE_ANNOTATION}={v}: a positive number of MiB/s"
            ))
        })?),
    };
    let stage_in_memory = match annotations
        .get(RESTORE_PAGE_SOURCE_ANNOTATION)
        .map(String::as_str)
    {
        None | Some("images") => false,
        Some("staging") => true,
        Some(other) => {
            return Err(TaskError::Invalid(format!(
                "annotation {RESTORE_PAGE_SOURCE_ANNOTATION}={other}: use images or staging"
            )))
        }
    };
    Ok(Some(LazyOptions {
        fill_rate_mib,
        stage_in_memory,
        receive: None,
    }))
}

/// Reads the annotations of the bundle's OCI spec.
fn spec_annotations(bundle: &Path) -> HashMap<String, String> {
    let spec = oci_spec::runtime::Spec::load(bundle.join("config.json"));
    match spec {
        Ok(spec) => spec.annotations().clone().unwrap_or_default(),
        Err(e) => {
            warn!("cannot read {}/config.json: {e}", bundle.display());
            HashMap::new()
        }
    }
}

impl Tasks {
    pub fn new(config: TasksConfig, events: Arc<dyn EventSink>) -> Arc<Self> {
        let tasks = Arc::new(Tasks {
            config,
            containers: Mutex::new(HashMap::new()),
            pids: Mutex::new(PidRegistry::default()),
            events,
        });
        tasks.spawn_exit_handler();
        tasks
    }

    fn containers(&self) -> MutexGuard<'_, HashMap<String, Arc<Container>>> {
        self.containers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn container(&self, id: &str) -> Result<Arc<Container>, TaskError> {
        self.containers()
            .get(id)
            .cloned()
            .ok_or_else(|| TaskError::NoContainer(id.into()))
    }

    pub fn is_empty(&self) -> bool {
        self.containers().is_empty()
    }

    /// runc `--root` of this shim's containers.
    pub fn runc_root(&self) -> &Path {
        &self.config.runc_root
    }

    /// The reaper tells every exit; route each to its process.
    fn spawn_exit_handler(self: &Arc<Self>) {
        let subscription = match monitor_subscribe(Topic::All) {
            Ok(s) => s,
            Err(e) => {
                log::error!("cannot subscribe to process exits: {e}; exits will not be reported");
                return;
            }
        };
        let tasks = Arc::downgrade(self);
        thread::Builder::new()
            .name("exit-handler".into())
            .spawn(move || {
                while let Ok(event) = subscription.rx.recv() {
                    let Subject::Pid(pid) = event.subject else {
                        continue;
                    };
                    let Some(tasks) = tasks.upgrade() else { break };
                    tasks.on_exit(pid as u32, exit_code_to_info(event.exit_code));
                }
            })
            .expect("spawn exit handler thread");
    }

    fn on_exit(&self, pid: u32, exit: ExitInfo) {
        let owner = {
            let mut pids = self.pids.lock().unwrap_or_else(|p| p.into_inner());
            match pids.owners.remove(&pid) {
                Some(owner) => owner,
                None => {
                    // runc's own exits land here too; they expire.
                    let now = Instant::now();
                    pids.unclaimed
                        .retain(|_, (_, seen)| now.duration_since(*seen) < UNCLAIMED_EXIT_TTL);
                    pids.unclaimed.insert(pid, (exit, now));
                    return;
                }
            }
        };
        self.complete_exit(&owner.0, owner.1.as_deref(), pid, exit);
    }

    /// Registers a started process's pid; if it already exited, completes the exit now.
    fn claim_pid(&self, id: &str, exec_id: Option<&str>, pid: u32) {
        let early_exit = {
            let mut pids = self.pids.lock().unwrap_or_else(|p| p.into_inner());
            match pids.unclaimed.remove(&pid) {
                Some((exit, _)) => Some(exit),
                None => {
                    pids.owners
                        .insert(pid, (id.to_string(), exec_id.map(str::to_string)));
                    None
                }
            }
        };
        if let Some(exit) = early_exit {
            self.complete_exit(id, exec_id, pid, exit);
        }
    }

    fn complete_exit(&self, id: &str, exec_id: Option<&str>, pid: u32, exit: ExitInfo) {
        let Ok(container) = self.container(id) else {
            return;
        };
        let Ok(process) = container.process(exec_id) else {
            return;
        };
        // Let the output reach the client before it learns about the exit.
        let io = process.lock().io.take();
        if let Some(mut io) = io {
            io.wait_output(OUTPUT_DRAIN_BOUND);
            process.lock().io = Some(io);
        }
        {
            let mut inner = process.lock();
            inner.status = ProcessStatus::Stopped;
            inner.exit = Some(exit);
        }
        process.exited.notify_all();
        debug!(
            "{id}/{}: pid {pid} exited with {}",
            exec_id.unwrap_or("init"),
            exit.code
        );
        self.events.publish(TaskEvent::Exit {
            id: id.into(),
            exec_id: exec_id.map(str::to_string),
            pid,
            exit,
        });
        if exec_id.is_none() {
            // Exec processes die with the init's pid namespace; if they share the host's, kill them.
            let execs: Vec<Arc<Process>> = container
                .execs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .cloned()
                .collect();
            for exec in execs {
                let pid = exec.lock().pid;
                let running = exec.lock().exit.is_none();
                if running && pid > 0 {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }

    fn runc_for(&self, bundle: &Path, options: &RuntimeOptions) -> Runc {
        Runc {
            binary: PathBuf::from(options.binary_name.as_deref().unwrap_or("runc")),
            root: options
                .root
                .as_ref()
                .map(PathBuf::from)
                .unwrap_or_else(|| self.config.runc_root.clone()),
            log: Some(bundle.join("log.json")),
            systemd_cgroup: options.systemd_cgroup,
        }
    }

    pub fn create(&self, params: CreateParams) -> Result<ProcessState, TaskError> {
        if self.containers().contains_key(&params.id) {
            return Err(TaskError::ContainerExists(params.id));
        }
        let bundle = params.bundle.clone();
        let runc = self.runc_for(&bundle, &params.options);
        tools::check_runc(&runc.binary.to_string_lossy())?;
        fs::create_dir_all(&runc.root).map_err(os_err(format!(
            "cannot create runc root {}",
            runc.root.display()
        )))?;

        // Where to restore from, if anywhere: containerd's checkpoint, runc options, annotation.
        let annotations = spec_annotations(&bundle);
        let lazy = lazy_options(&annotations)?;
        let criu_work_path = params.options.criu_work_path.as_ref().map(PathBuf::from);
        let restore = params
            .checkpoint
            .clone()
            .or_else(|| params.options.criu_image_path.as_ref().map(PathBuf::from))
            .map(|image_path| RestoreSource {
                image_path,
                work_path: criu_work_path.clone(),
                lazy: lazy.clone(),
                receive_eagerly: None,
            })
            .or_else(|| {
                annotations
                    .get(RESTORE_IMAGE_ANNOTATION)
                    .map(|p| RestoreSource {
                        image_path: PathBuf::from(p),
                        work_path: annotations.get(RESTORE_WORK_ANNOTATION).map(PathBuf::from),
                        lazy: lazy.clone(),
                        receive_eagerly: None,
                    })
            });
        let restore = match receive_spec(&annotations)? {
            Some(spec) => {
                let image_path = bundle.join("migration-images");
                fs::create_dir_all(&image_path)
                    .map_err(os_err(format!("cannot create {}", image_path.display())))?;
                // Lazy unless the annotation says false explicitly (lazy_options checked its
                // value): migration has always restored lazily.
                let eager = annotations
                    .get(RESTORE_LAZY_ANNOTATION)
                    .is_some_and(|v| v == "false");
                Some(if eager {
                    RestoreSource {
                        image_path,
                        work_path: None,
                        lazy: None,
                        receive_eagerly: Some(spec),
                    }
                } else {
                    let mut lazy = lazy.clone().unwrap_or_default();
                    lazy.receive = Some(spec);
                    RestoreSource {
                        image_path,
                        work_path: None,
                        lazy: Some(lazy),
                        receive_eagerly: None,
                    }
                })
            }
            None => restore,
        };
        if let Some(source) = restore.as_ref().filter(|s| !s.receives()) {
            if !source.image_path.join("inventory.img").is_file() {
                return Err(TaskError::Invalid(format!(
                    "restore image directory {} holds no CRIU image set (inventory.img missing): \
                     pass the --image-path a checkpoint wrote",
                    source.image_path.display()
                )));
            }
        }

        let rootfs_mounted = self.mount_rootfs(&bundle, &params.rootfs)?;
        let unmount_on_error = |e: TaskError| {
            if rootfs_mounted {
                unmount_rootfs(&bundle);
            }
            e
        };

        let prepared = pio::prepare(&params.stdio).map_err(|e| unmount_on_error(e.into()))?;
        let init = Arc::new(Process::new(None, params.stdio.clone()));
        let checkpoint_label;
        let pending_start = match restore {
            Some(source) => {
                // As the runc shim does: the restore itself runs at Start.
                checkpoint_label = source.image_path.display().to_string();
                info!(
                    "{}: created for restore from {}",
                    params.id, checkpoint_label
                );
                InitStart::Restore {
                    source: Box::new(source),
                    io: Box::new(prepared),
                }
            }
            None => {
                checkpoint_label = String::new();
                let pid_file = bundle.join("init.pid");
                let opts = CreateOpts {
                    pid_file: pid_file.clone(),
                    console_socket: prepared.console_socket.clone(),
                    no_pivot: params.options.no_pivot_root,
                    no_new_keyring: params.options.no_new_keyring,
                };
                let (runc_stdio, rest) = prepared.split();
                runc.create(&params.id, &bundle, &opts, runc_stdio)
                    .map_err(|e| unmount_on_error(e.into()))?;
                let io = rest.start().map_err(|e| {
                    let _ = runc.delete(&params.id, true);
                    unmount_on_error(e.into())
                })?;
                let pid = read_pid_file(&pid_file).map_err(unmount_on_error)?;
                let mut inner = init.lock();
                inner.pid = pid;
                inner.io = Some(io);
                drop(inner);
                InitStart::Start
            }
        };

        let container = Arc::new(Container {
            id: params.id.clone(),
            bundle: bundle.clone(),
            runc,
            init: Arc::clone(&init),
            execs: Mutex::new(HashMap::new()),
            pending_start: Mutex::new(Some(pending_start)),
            rootfs_mounted,
            no_pivot: params.options.no_pivot_root,
        });
        self.containers()
            .insert(params.id.clone(), Arc::clone(&container));
        let pid = init.lock().pid;
        if pid > 0 {
            self.claim_pid(&params.id, None, pid);
        }
        self.events.publish(TaskEvent::Create {
            id: params.id.clone(),
            bundle,
            stdio: params.stdio,
            pid,
            checkpoint: checkpoint_label,
        });
        Ok(self.snapshot(&container, &init))
    }

    fn mount_rootfs(&self, bundle: &Path, mounts: &[RootfsMount]) -> Result<bool, TaskError> {
        if mounts.is_empty() {
            return Ok(false);
        }
        let target = bundle.join("rootfs");
        fs::create_dir_all(&target).map_err(os_err(format!(
            "cannot create rootfs mount point {}",
            target.display()
        )))?;
        for (i, m) in mounts.iter().enumerate() {
            if let Err(e) = containerd_shim::mount::mount_rootfs(
                Some(m.fs_type.as_str()),
                Some(m.source.as_str()),
                &m.options,
                &target,
            ) {
                if i > 0 {
                    unmount_rootfs(bundle);
                }
                return Err(TaskError::Os {
                    what: format!(
                        "cannot mount rootfs ({} from {}) at {}",
                        m.fs_type,
                        m.source,
                        target.display()
                    ),
                    source: io::Error::other(e.to_string()),
                });
            }
        }
        Ok(true)
    }

    fn snapshot(&self, container: &Container, process: &Process) -> ProcessState {
        let inner = process.lock();
        ProcessState {
            id: container.id.clone(),
            exec_id: process.exec_id.clone(),
            bundle: container.bundle.clone(),
            pid: inner.pid,
            status: inner.status,
            stdio: process.stdio.clone(),
            exit: inner.exit,
        }
    }

    pub fn start(&self, id: &str, exec_id: Option<&str>) -> Result<ProcessState, TaskError> {
        let container = self.container(id)?;
        let process = container.process(exec_id)?;
        let status = process.lock().status;
        if status != ProcessStatus::Created {
            return Err(TaskError::WrongState {
                what: format!("start {id}/{}", exec_id.unwrap_or("init")),
                status,
                expected: "created",
            });
        }
        match exec_id {
            None => self.start_init(&container)?,
            Some(exec_id) => self.start_exec(&container, &process, exec_id)?,
        }
        Ok(self.snapshot(&container, &process))
    }

    fn start_init(&self, container: &Container) -> Result<(), TaskError> {
        let pending = container
            .pending_start
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match pending {
            Some(InitStart::Start) | None => {
                container.runc.start(&container.id)?;
                let pid = {
                    let mut inner = container.init.lock();
                    if inner.exit.is_none() {
                        inner.status = ProcessStatus::Running;
                    }
                    inner.pid
                };
                self.events.publish(TaskEvent::Start {
                    id: container.id.clone(),
                    pid,
                });
            }
            Some(InitStart::Restore { source, io }) => {
                tools::check_criu()?;
                use_restore_criu_config(&container.bundle)?;
                let started = Instant::now();
                let pid_file = container.bundle.join("init.pid");
                let work_path = source
                    .work_path
                    .clone()
                    .unwrap_or_else(|| container.bundle.join("criu-work"));
                fs::create_dir_all(&work_path).map_err(os_err(format!(
                    "cannot create CRIU work directory {}",
                    work_path.display()
                )))?;
                let eager_receiver = match &source.receive_eagerly {
                    Some(spec) => Some(EagerReceiver::receive(
                        &container.id,
                        &source.image_path,
                        &work_path,
                        spec,
                    )?),
                    None => None,
                };
                let lazy_server = match &source.lazy {
                    Some(options) => {
                        Some(LazyServer::start(&source.image_path, &work_path, options)?)
                    }
                    None => None,
                };
                let opts = RestoreOpts {
                    criu: CriuOpts {
                        image_path: source.image_path.clone(),
                        work_path: Some(work_path.clone()),
                        // A checkpoint of established connections is only restorable with it.
                        tcp_established: true,
                        ext_unix_sk: true,
                        file_locks: true,
                        lazy_pages: lazy_server.is_some(),
                        ..Default::default()
                    },
                    bundle: container.bundle.clone(),
                    pid_file: pid_file.clone(),
                    console_socket: io.console_socket.clone(),
                    no_pivot: container.no_pivot,
                };
                let (runc_stdio, rest) = io.split();
                let restore_started = Instant::now();
                if let Err(e) = container.runc.restore(&container.id, &opts, runc_stdio) {
                    if let Some(server) = lazy_server {
                        server.abort();
                    }
                    if let Some(receiver) = eager_receiver {
                        receiver.restore_failed(restore_started, &e.to_string());
                        // What a failed CRIU may have left mounted in its work directory.
                        crate::lazy_restore::unmount_below(&work_path);
                    }
                    return Err(e.into());
                }
                if let Some(receiver) = eager_receiver {
                    if let Err(e) = receiver.restored(restore_started) {
                        // The source resumes: this copy must not run as well.
                        if let Err(kill) =
                            container
                                .runc
                                .kill(&container.id, libc::SIGKILL as u32, true)
                        {
                            warn!(
                                "{}: runc kill after the failed commit: {kill}",
                                container.id
                            );
                        }
                        return Err(e.into());
                    }
                }
                if let Some(server) = lazy_server {
                    server.restored(container.id.clone(), container.runc.clone());
                }
                let process_io = rest.start()?;
                let pid = read_pid_file(&pid_file)?;
                {
                    let mut inner = container.init.lock();
                    inner.pid = pid;
                    inner.status = ProcessStatus::Running;
                    inner.io = Some(process_io);
                }
                self.claim_pid(&container.id, None, pid);
                let spec = oci_spec::runtime::Spec::load(container.bundle.join("config.json"));
                if spec.as_ref().is_ok_and(crate::netns::has_private_netns) {
                    if let Err(e) = crate::netns::bring_up_loopback(pid) {
                        warn!(
                            "{}: cannot bring up lo after the restore: {e}",
                            container.id
                        );
                    }
                }
                info!(
                    "{}: restored from {} in {:.3}s (pid {pid}, {})",
                    container.id,
                    source.image_path.display(),
                    started.elapsed().as_secs_f64(),
                    if source.lazy.is_some() {
                        "lazy: memory is being installed"
                    } else if source.receive_eagerly.is_some() {
                        "eager, migration committed"
                    } else {
                        "eager"
                    }
                );
                self.events.publish(TaskEvent::Start {
                    id: container.id.clone(),
                    pid,
                });
            }
        }
        self.watch_oom(container);
        Ok(())
    }

    fn watch_oom(&self, container: &Container) {
        let pid = container.init.lock().pid;
        let mut watch = match OomWatch::register(pid as i32) {
            Ok(w) => w,
            Err(e) => {
                warn!("{}: no OOM notifications: {e}", container.id);
                return;
            }
        };
        let events = Arc::clone(&self.events);
        let id = container.id.clone();
        let init = Arc::clone(&container.init);
        let _ = thread::Builder::new()
            .name(format!("oom-{id}"))
            .spawn(move || {
                while watch.wait() {
                    if init.lock().exit.is_some() {
                        break;
                    }
                    warn!("{id}: out of memory");
                    events.publish(TaskEvent::Oom { id: id.clone() });
                }
            });
    }

    fn start_exec(
        &self,
        container: &Container,
        process: &Arc<Process>,
        exec_id: &str,
    ) -> Result<(), TaskError> {
        let init_status = container.init.lock().status;
        if init_status != ProcessStatus::Running {
            return Err(TaskError::WrongState {
                what: format!("exec {exec_id} in {}", container.id),
                status: init_status,
                expected: "running",
            });
        }
        let spec_path = container.bundle.join(format!("{exec_id}.process.json"));
        let pid_file = container.bundle.join(format!("{exec_id}.pid"));
        let prepared = pio::prepare(&process.stdio)?;
        let opts = ExecOpts {
            process_spec: spec_path,
            pid_file: pid_file.clone(),
            console_socket: prepared.console_socket.clone(),
        };
        let (runc_stdio, rest) = prepared.split();
        container.runc.exec(&container.id, &opts, runc_stdio)?;
        let io = rest.start()?;
        let pid = read_pid_file(&pid_file)?;
        {
            let mut inner = process.lock();
            inner.pid = pid;
            inner.io = Some(io);
            if inner.exit.is_none() {
                inner.status = ProcessStatus::Running;
            }
        }
        self.events.publish(TaskEvent::ExecStarted {
            id: container.id.clone(),
            exec_id: exec_id.into(),
            pid,
        });
        self.claim_pid(&container.id, Some(exec_id), pid);
        Ok(())
    }

    /// Registers an exec process; `spec_json` is the OCI process spec containerd sent.
    pub fn exec(
        &self,
        id: &str,
        exec_id: &str,
        stdio: StdioConfig,
        spec_json: &[u8],
    ) -> Result<(), TaskError> {
        let container = self.container(id)?;
        if exec_id.is_empty() {
            return Err(TaskError::Invalid("exec id is empty".into()));
        }
        let mut execs = container.execs.lock().unwrap_or_else(|p| p.into_inner());
        if execs.contains_key(exec_id) {
            return Err(TaskError::ProcessExists {
                id: id.into(),
                exec_id: exec_id.into(),
            });
        }
        serde_json::from_slice::<serde_json::Value>(spec_json).map_err(|e| {
            TaskError::Invalid(format!("exec {exec_id}: process spec is not JSON: {e}"))
        })?;
        let spec_path = container.bundle.join(format!("{exec_id}.process.json"));
        fs::write(&spec_path, spec_json)
            .map_err(os_err(format!("cannot write {}", spec_path.display())))?;
        execs.insert(
            exec_id.into(),
            Arc::new(Process::new(Some(exec_id.into()), stdio)),
        );
        drop(execs);
        self.events.publish(TaskEvent::ExecAdded {
            id: id.into(),
            exec_id: exec_id.into(),
        });
        Ok(())
    }

    pub fn state(&self, id: &str, exec_id: Option<&str>) -> Result<ProcessState, TaskError> {
        let container = self.container(id)?;
        let process = container.process(exec_id)?;
        Ok(self.snapshot(&container, &process))
    }

    pub fn kill(
        &self,
        id: &str,
        exec_id: Option<&str>,
        signal: u32,
        all: bool,
    ) -> Result<(), TaskError> {
        let container = self.container(id)?;
        let process = container.process(exec_id)?;
        let (pid, status) = {
            let inner = process.lock();
            (inner.pid, inner.status)
        };
        match exec_id {
            None => {
                if status == ProcessStatus::Stopped && !all {
                    return Err(TaskError::WrongState {
                        what: format!("kill {id}"),
                        status,
                        expected: "running",
                    });
                }
                container.runc.kill(&container.id, signal, all)?;
            }
            Some(exec_id) => {
                if pid == 0 || status == ProcessStatus::Stopped {
                    return Err(TaskError::WrongState {
                        what: format!("kill {id}/{exec_id}"),
                        status,
                        expected: "running",
                    });
                }
                let sig = nix::sys::signal::Signal::try_from(signal as i32).map_err(|_| {
                    TaskError::Invalid(format!("signal {signal} is not a valid signal"))
                })?;
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).map_err(
                    |e| TaskError::Os {
                        what: format!("kill {id}/{exec_id} (pid {pid})"),
                        source: e.into(),
                    },
                )?;
            }
        }
        Ok(())
    }

    pub fn wait(&self, id: &str, exec_id: Option<&str>) -> Result<ExitInfo, TaskError> {
        let container = self.container(id)?;
        let process = container.process(exec_id)?;
        let mut inner = process.lock();
        loop {
            if let Some(exit) = inner.exit {
                return Ok(exit);
            }
            inner = process
                .exited
                .wait(inner)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    pub fn delete(&self, id: &str, exec_id: Option<&str>) -> Result<ProcessState, TaskError> {
        let container = self.container(id)?;
        let process = container.process(exec_id)?;
        let state = self.snapshot(&container, &process);
        match exec_id {
            Some(exec_id) => {
                if matches!(state.status, ProcessStatus::Running | ProcessStatus::Paused) {
                    return Err(TaskError::WrongState {
                        what: format!("delete {id}/{exec_id}"),
                        status: state.status,
                        expected: "created or stopped",
                    });
                }
                container
                    .execs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(exec_id);
                let _ = fs::remove_file(container.bundle.join(format!("{exec_id}.process.json")));
                let _ = fs::remove_file(container.bundle.join(format!("{exec_id}.pid")));
            }
            None => {
                if matches!(state.status, ProcessStatus::Running | ProcessStatus::Paused) {
                    return Err(TaskError::WrongState {
                        what: format!("delete {id}"),
                        status: state.status,
                        expected: "created or stopped",
                    });
                }
                // A restore killed half-way (its lazy-pages server died) leaves CRIU's root
                // mount in runc's state directory, which runc delete cannot remove.
                crate::lazy_restore::unmount_below(&container.runc.root.join(&container.id));
                // A created (never started) container still has a runc init waiting: force.
                if let Err(e) = container.runc.delete(&container.id, true) {
                    warn!("{id}: runc delete: {e}");
                }
                if container.rootfs_mounted {
                    unmount_rootfs(&container.bundle);
                }
                self.containers().remove(id);
                self.events.publish(TaskEvent::Delete {
                    id: id.into(),
                    pid: state.pid,
                    exit: state.exit,
                });
            }
        }
        Ok(state)
    }

    pub fn pids(&self, id: &str) -> Result<Vec<(u32, Option<String>)>, TaskError> {
        let container = self.container(id)?;
        let pids = container.runc.ps(&container.id)?;
        let execs = container.execs.lock().unwrap_or_else(|p| p.into_inner());
        Ok(pids
            .into_iter()
            .map(|pid| {
                let exec = execs
                    .iter()
                    .find(|(_, p)| p.lock().pid == pid as u32)
                    .map(|(e, _)| e.clone());
                (pid as u32, exec)
            })
            .collect())
    }

    pub fn pause(&self, id: &str) -> Result<(), TaskError> {
        let container = self.container(id)?;
        let status = container.init.lock().status;
        if status != ProcessStatus::Running {
            return Err(TaskError::WrongState {
                what: format!("pause {id}"),
                status,
                expected: "running",
            });
        }
        container.runc.pause(id)?;
        container.init.lock().status = ProcessStatus::Paused;
        self.events.publish(TaskEvent::Paused { id: id.into() });
        Ok(())
    }

    pub fn resume(&self, id: &str) -> Result<(), TaskError> {
        let container = self.container(id)?;
        let status = container.init.lock().status;
        if status != ProcessStatus::Paused {
            return Err(TaskError::WrongState {
                what: format!("resume {id}"),
                status,
                expected: "paused",
            });
        }
        container.runc.resume(id)?;
        {
            let mut inner = container.init.lock();
            if inner.exit.is_none() {
                inner.status = ProcessStatus::Running;
            }
        }
        self.events.publish(TaskEvent::Resumed { id: id.into() });
        Ok(())
    }

    pub fn update(&self, id: &str, resources_json: &[u8]) -> Result<(), TaskError> {
        let container = self.container(id)?;
        serde_json::from_slice::<oci_spec::runtime::LinuxResources>(resources_json).map_err(
            |e| {
                TaskError::Invalid(format!(
                    "update {id}: resources are not OCI LinuxResources JSON: {e}"
                ))
            },
        )?;
        container.runc.update(id, resources_json)?;
        Ok(())
    }

    pub fn stats(&self, id: &str) -> Result<ContainerStats, TaskError> {
        let container = self.container(id)?;
        let pid = container.init.lock().pid;
        if pid == 0 {
            return Err(TaskError::WrongState {
                what: format!("stats {id}"),
                status: ProcessStatus::Created,
                expected: "running",
            });
        }
        Ok(cgroups::read_stats(pid as i32)?)
    }

    pub fn close_io(&self, id: &str, exec_id: Option<&str>) -> Result<(), TaskError> {
        let container = self.container(id)?;
        let process = container.process(exec_id)?;
        if let Some(io) = process.lock().io.as_ref() {
            io.close_stdin();
        }
        Ok(())
    }

    pub fn resize_pty(
        &self,
        id: &str,
        exec_id: Option<&str>,
        width: u16,
        height: u16,
    ) -> Result<(), TaskError> {
        let container = self.container(id)?;
        let process = container.process(exec_id)?;
        let inner = process.lock();
        let io = inner.io.as_ref().ok_or_else(|| {
            TaskError::Invalid(format!(
                "{id}/{} has no stdio yet",
                exec_id.unwrap_or("init")
            ))
        })?;
        io.resize(width, height).map_err(|source| TaskError::Os {
            what: format!("resize pty of {id}/{}", exec_id.unwrap_or("init")),
            source,
        })
    }

    /// Checkpoints the container with runc/CRIU into `params.image_path`.
    pub fn checkpoint(&self, id: &str, params: &CheckpointParams) -> Result<(), TaskError> {
        let container = self.container(id)?;
        let status = container.init.lock().status;
        if !matches!(status, ProcessStatus::Running | ProcessStatus::Paused) {
            return Err(TaskError::WrongState {
                what: format!("checkpoint {id}"),
                status,
                expected: "running or paused",
            });
        }
        tools::check_criu()?;
        let work_path = params
            .work_path
            .clone()
            .unwrap_or_else(|| container.bundle.join("criu-work"));
        if let Some(request) = &params.migrate {
            return self.migrate_out(&container, request, &work_path);
        }
        for dir in [&params.image_path, &work_path] {
            fs::create_dir_all(dir).map_err(os_err(format!(
                "cannot create checkpoint directory {}",
                dir.display()
            )))?;
        }
        let opts = CheckpointOpts {
            criu: CriuOpts {
                image_path: params.image_path.clone(),
                work_path: Some(work_path),
                tcp_established: params.open_tcp,
                ext_unix_sk: params.external_unix_sockets,
                shell_job: params.terminal,
                file_locks: params.file_locks,
                empty_namespaces: params.empty_namespaces.clone(),
                manage_cgroups_mode: params.cgroups_mode.clone(),
                lazy_pages: false,
            },
            leave_running: !params.exit,
            parent_path: None,
            status_fd: None,
            page_server: None,
            tcp_skip_in_flight: false,
        };
        let started = Instant::now();
        container.runc.checkpoint(&container.id, &opts)?;
        info!(
            "{id}: checkpointed to {} in {:.3}s{}",
            params.image_path.display(),
            started.elapsed().as_secs_f64(),
            if params.exit { " (exited)" } else { "" }
        );
        self.events
            .publish(TaskEvent::Checkpointed { id: id.into() });
        Ok(())
    }

    fn migrate_out(
        &self,
        container: &Container,
        request: &restore_engine::precopy::MigrateRequest,
        work_path: &Path,
    ) -> Result<(), TaskError> {
        let id = &container.id;
        let status = container.init.lock().status;
        if status != ProcessStatus::Running {
            return Err(TaskError::WrongState {
                what: format!("migrate {id}"),
                status,
                expected: "running",
            });
        }
        fs::create_dir_all(work_path)
            .map_err(os_err(format!("cannot create {}", work_path.display())))?;
        let pids = container.runc.ps(id)?;
        let report = crate::migrate::migrate_out(&container.runc, id, &pids, request, work_path)?;
        info!(
            "{id}: migrated to {}: downtime {:.3}s (last round {:.3}s, final dump {:.3}s, images {:.3}s), frozen until commit {:.3}s, {} rounds",
            report.destination,
            report.downtime_seconds,
            report.last_round_seconds,
            report.final_dump_seconds,
            report.images_seconds,
            report.frozen_until_commit_seconds,
            report.precopy.rounds.len()
        );
        if let Ok(json) = serde_json::to_vec_pretty(&report) {
            let _ = fs::write(crate::migrate::report_path(work_path), json);
        }
        // The destination runs the container now: the paused source goes. Frozen tasks die
        // only once thawed, hence the resume after the kill.
        container.runc.kill(id, libc::SIGKILL as u32, true)?;
        let _ = container.runc.resume(id);
        // Return only once the source is really gone: `pclive migrate` reports it so.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut inner = container.init.lock();
        while inner.exit.is_none() && Instant::now() < deadline {
            inner = container
                .init
                .exited
                .wait_timeout(inner, Duration::from_millis(100))
                .map(|(guard, _)| guard)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        if inner.exit.is_none() {
            warn!("{id}: migrated, but the source's init has not exited 10s after SIGKILL");
        }
        drop(inner);
        self.events
            .publish(TaskEvent::Checkpointed { id: id.clone() });
        Ok(())
    }

    /// The pid of the container's init (0 before start of a restore).
    pub fn init_pid(&self, id: &str) -> Result<u32, TaskError> {
        Ok(self.container(id)?.init.lock().pid)
    }
}

/// Points runc's restore at a CRIU config with the restore-only options (plus whatever
/// /etc/criu/runc.conf says), unless the user named a CRIU config of their own.
fn use_restore_criu_config(bundle: &Path) -> Result<(), TaskError> {
    let spec_path = bundle.join("config.json");
    let text =
        fs::read(&spec_path).map_err(os_err(format!("cannot read {}", spec_path.display())))?;
    let mut spec: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| TaskError::Invalid(format!("{} is not JSON: {e}", spec_path.display())))?;
    let Some(root) = spec.as_object_mut() else {
        return Err(TaskError::Invalid(format!(
            "{} is not a JSON object",
            spec_path.display()
        )));
    };
    let annotations = root
        .entry("annotations")
        .or_insert_with(|| serde_json::Value::Object(Default::default()));
    let Some(annotations) = annotations.as_object_mut() else {
        return Err(TaskError::Invalid(format!(
            "{}: annotations is not an object",
            spec_path.display()
        )));
    };
    let tcp_close = match annotations
        .get(RESTORE_TCP_CLOSE_ANNOTATION)
        .map(|v| v.as_str())
    {
        None | Some(Some("false")) => false,
        Some(Some("true")) => true,
        Some(other) => {
            return Err(TaskError::Invalid(format!(
                "{RESTORE_TCP_CLOSE_ANNOTATION} is {other:?}: use true or false"
            )))
        }
    };
    if annotations.contains_key(CRIU_CONFIG_ANNOTATION) {
        if tcp_close {
            return Err(TaskError::Invalid(format!(
                "{RESTORE_TCP_CLOSE_ANNOTATION}=true with a CRIU config of your own \
                 ({CRIU_CONFIG_ANNOTATION}): put tcp-close in that config instead"
            )));
        }
        return Ok(());
    }
    let mut config = fs::read_to_string("/etc/criu/runc.conf").unwrap_or_default();
    if !config.is_empty() && !config.ends_with('\n') {
        config.push('\n');
    }
    config.push_str(RESTORE_ONLY_CRIU_OPTIONS);
    if tcp_close {
        config.push_str("tcp-close\n");
    }
    let config_path = bundle.join("criu-restore.conf");
    fs::write(&config_path, config)
        .map_err(os_err(format!("cannot write {}", config_path.display())))?;
    annotations.insert(
        CRIU_CONFIG_ANNOTATION.into(),
        serde_json::Value::String(config_path.display().to_string()),
    );
    let updated = serde_json::to_vec(&spec)
        .map_err(|e| TaskError::Invalid(format!("cannot encode {}: {e}", spec_path.display())))?;
    fs::write(&spec_path, updated).map_err(os_err(format!("cannot write {}", spec_path.display())))
}

/// Unmounts what containerd's rootfs mounts put on `<bundle>/rootfs`.
pub fn unmount_rootfs(bundle: &Path) {
    let target = bundle.join("rootfs");
    for _ in 0..16 {
        match nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) => continue,
            Err(_) => break,
        }
    }
}
