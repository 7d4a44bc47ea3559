//! The shim's core: containers and their processes over runc, in the shim's own types.
//!
//! `service.rs` translates containerd's ttrpc requests into calls on [`Tasks`] (containerd's
//! word for a container's process tree as it runs) and its [`TaskEvent`]s back into containerd
//! events; nothing here knows about protobuf. One operation per file:
//! [`create`](create), [`start`](start) (and [`restore`](restore), the start of a container
//! created from a checkpoint or a migration), [`exec`](exec), [`lifecycle`](lifecycle) (kill,
//! wait, delete, pause, resume, update, stdio), [`state`](state) (state, pids, stats) and
//! [`checkpoint`](checkpoint) (checkpoint and migrate-out); [`process`](process) holds the
//! processes and their exits, [`params`](params) the operations' parameters.

mod checkpoint;
mod create;
mod events;
mod exec;
mod lifecycle;
mod params;
mod process;
mod restore;
mod start;
mod state;

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

pub use create::unmount_rootfs;
pub use events::{EventSink, TaskEvent};
pub use params::{CheckpointParams, CreateParams, RestoreSource, RootfsMount, RuntimeOptions};
pub use process::{ExitInfo, ProcessState, ProcessStatus};

use crate::annotations::AnnotationError;
use crate::cgroups::CgroupError;
use crate::eager_restore::EagerRestoreError;
use crate::io::{IoError, PreparedIo};
use crate::lazy_restore::LazyRestoreError;
use crate::receive::ReceiveHandle;
use crate::runc::{Runc, RuncError};
use process::{PidRegistry, Process};
use restore_engine::versions::VersionError;

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
    Annotation(#[from] AnnotationError),
    /// The annotations ask for what this host's settings do not allow.
    #[error(transparent)]
    Confined(#[from] Box<crate::confine::ConfineError>),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
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
    /// A task CRIU cannot checkpoint (crate::seizable).
    #[error("cannot checkpoint: {0}")]
    Unseizable(String),
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
    /// A received migration's receive, which Kill can stop.
    receive: ReceiveHandle,
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

/// Shim-wide settings.
#[derive(Debug, Clone)]
pub struct TasksConfig {
    /// runc `--root` for this shim's containerd instance.
    pub runc_root: PathBuf,
    /// Where this containerd instance's migrations are recorded.
    pub state_dir: PathBuf,
}

/// All containers of this shim.
pub struct Tasks {
    config: TasksConfig,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    pids: Mutex<PidRegistry>,
    events: Arc<dyn EventSink>,
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
}
