//! The edge: containerd's shim v2 protocol (ttrpc, protobuf) on one side, [`Tasks`] on the other.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use containerd_shim::api::{self, Empty};
use containerd_shim::protos::events::task as ev;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{Message, MessageDyn, MessageField};
use containerd_shim::protos::shim::oci::{CheckpointOptions, Options as RuncOptions};
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Context, DeleteResponse, ExitSignal, Flags, TtrpcContext, TtrpcResult};
use log::{error, info, warn};

use crate::io::StdioConfig;
use crate::task::{
    self, CheckpointParams, CreateParams, EventSink, ExitInfo, ProcessState, ProcessStatus,
    RootfsMount, RuntimeOptions, TaskError, TaskEvent, Tasks, TasksConfig,
};

pub const RUNTIME_ID: &str = "io.containerd.pclive.v2";
const RUNC_OPTIONS_TYPE: &str = "containerd.runc.v1.Options";
const CHECKPOINT_OPTIONS_TYPE: &str = "containerd.runc.v1.CheckpointOptions";
const LINUX_RESOURCES_TYPE_SUFFIX: &str = "LinuxResources";

fn to_status(err: TaskError) -> ttrpc::Error {
    let code = match &err {
        TaskError::NoContainer(_) | TaskError::NoProcess { .. } => Code::NOT_FOUND,
        TaskError::ContainerExists(_) | TaskError::ProcessExists { .. } => Code::ALREADY_EXISTS,
        TaskError::WrongState { .. }
        | TaskError::Unseizable(_)
        | TaskError::Migrate(crate::migrate::MigrateError::Unseizable(_))
        | TaskError::Migrate(crate::migrate::MigrateError::ExternalMounts(_))
        | TaskError::Migrate(crate::migrate::MigrateError::Filesystem(_)) => {
            Code::FAILED_PRECONDITION
        }
        TaskError::Invalid(_) | TaskError::Annotation(_) => Code::INVALID_ARGUMENT,
        TaskError::Confined(_) => Code::PERMISSION_DENIED,
        _ => Code::UNKNOWN,
    };
    let message = err.to_string();
    error!("{message}");
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message))
}

fn invalid(message: String) -> ttrpc::Error {
    error!("{message}");
    ttrpc::Error::RpcStatus(ttrpc::get_status(Code::INVALID_ARGUMENT, message))
}

fn exec_id(raw: &str) -> Option<&str> {
    (!raw.is_empty()).then_some(raw)
}

fn timestamp(at: SystemTime) -> Timestamp {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: since.as_secs() as i64,
        nanos: since.subsec_nanos() as i32,
        ..Default::default()
    }
}

fn exit_fields(exit: Option<ExitInfo>) -> (u32, MessageField<Timestamp>) {
    match exit {
        Some(e) => (e.code, MessageField::some(timestamp(e.at))),
        None => (0, MessageField::none()),
    }
}

fn status_of(status: ProcessStatus) -> api::Status {
    match status {
        ProcessStatus::Created => api::Status::CREATED,
        ProcessStatus::Running => api::Status::RUNNING,
        ProcessStatus::Paused => api::Status::PAUSED,
        ProcessStatus::Stopped => api::Status::STOPPED,
    }
}

/// containerd marshals well-known option types with a bare full name as the type URL; accept
/// both that and the `type.googleapis.com/` form.
fn type_name(any: &Any) -> &str {
    any.type_url.rsplit('/').next().unwrap_or("")
}

fn runtime_options(any: Option<&Any>) -> Result<RuntimeOptions, ttrpc::Error> {
    // `ctr container restore` sends an empty Any when the container has no runtime options.
    let Some(any) = any.filter(|a| !(a.type_url.is_empty() && a.value.is_empty())) else {
        return Ok(RuntimeOptions::default());
    };
    if type_name(any) == crate::cri_options::CRI_OPTIONS_TYPE {
        return crate::cri_options::parse(&any.value).map_err(invalid);
    }
    if type_name(any) != RUNC_OPTIONS_TYPE {
        return Err(invalid(format!(
            "task options of type '{}' are not understood by {RUNTIME_ID}: send {RUNC_OPTIONS_TYPE} or {}",
            any.type_url,
            crate::cri_options::CRI_OPTIONS_TYPE
        )));
    }
    let o = RuncOptions::parse_from_bytes(&any.value)
        .map_err(|e| invalid(format!("corrupt {RUNC_OPTIONS_TYPE}: {e}")))?;
    let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
    Ok(RuntimeOptions {
        binary_name: non_empty(&o.binary_name),
        root: non_empty(&o.root),
        no_pivot_root: o.no_pivot_root,
        no_new_keyring: o.no_new_keyring,
        systemd_cgroup: o.systemd_cgroup,
        criu_image_path: non_empty(&o.criu_image_path),
        criu_work_path: non_empty(&o.criu_work_path),
    })
}

fn checkpoint_params(path: &str, any: Option<&Any>) -> Result<CheckpointParams, ttrpc::Error> {
    let mut params = CheckpointParams {
        image_path: PathBuf::from(path),
        ..Default::default()
    };
    if let Some(any) = any.filter(|a| !(a.type_url.is_empty() && a.value.is_empty())) {
        if type_name(any) != CHECKPOINT_OPTIONS_TYPE {
            return Err(invalid(format!(
                "checkpoint options of type '{}' are not understood by {RUNTIME_ID}: send {CHECKPOINT_OPTIONS_TYPE}",
                any.type_url
            )));
        }
        let o = CheckpointOptions::parse_from_bytes(&any.value)
            .map_err(|e| invalid(format!("corrupt {CHECKPOINT_OPTIONS_TYPE}: {e}")))?;
        if !o.image_path.is_empty() {
            params.image_path = PathBuf::from(&o.image_path);
        }
        params.work_path = (!o.work_path.is_empty()).then(|| PathBuf::from(&o.work_path));
        params.exit = o.exit;
        params.open_tcp = o.open_tcp;
        params.external_unix_sockets = o.external_unix_sockets;
        params.terminal = o.terminal;
        params.file_locks = o.file_locks;
        params.empty_namespaces = o.empty_namespaces.clone();
        params.cgroups_mode = (!o.cgroups_mode.is_empty()).then(|| o.cgroups_mode.clone());
        // pclive's extension: a migration request in field 1000 (containerd passes unknown
        // fields of CheckpointOptions through unchanged).
        if let Some(value) = o
            .special_fields
            .unknown_fields()
            .get(crate::migrate::MIGRATE_FIELD)
        {
            let containerd_shim::protos::protobuf::UnknownValueRef::LengthDelimited(bytes) = value
            else {
                return Err(invalid(format!(
                    "CheckpointOptions field {} must be an encoded pclive MigrateRequest",
                    crate::migrate::MIGRATE_FIELD
                )));
            };
            let request = <crate::migrate::MigrateRequest as prost::Message>::decode(bytes)
                .map_err(|e| invalid(format!("corrupt pclive MigrateRequest: {e}")))?;
            params.migrate = Some(request);
        }
    }
    if params.image_path.as_os_str().is_empty() {
        return Err(invalid(
            "checkpoint needs a path: containerd sends one, or set CheckpointOptions.image_path"
                .into(),
        ));
    }
    Ok(params)
}

/// Publishes [`TaskEvent`]s as containerd task events.
struct Publisher {
    remote: Mutex<RemotePublisher>,
    namespace: String,
}

impl EventSink for Publisher {
    fn publish(&self, event: TaskEvent) {
        let (topic, message): (&str, Box<dyn MessageDyn>) = match event {
            TaskEvent::Create {
                id,
                bundle,
                stdio,
                pid,
                checkpoint,
            } => (
                topics::TASK_CREATE_EVENT_TOPIC,
                Box::new(ev::TaskCreate {
                    container_id: id,
                    bundle: bundle.display().to_string(),
                    io: MessageField::some(ev::TaskIO {
                        stdin: stdio.stdin,
                        stdout: stdio.stdout,
                        stderr: stdio.stderr,
                        terminal: stdio.terminal,
                        ..Default::default()
                    }),
                    checkpoint,
                    pid,
                    ..Default::default()
                }),
            ),
            TaskEvent::Start { id, pid } => (
                topics::TASK_START_EVENT_TOPIC,
                Box::new(ev::TaskStart {
                    container_id: id,
                    pid,
                    ..Default::default()
                }),
            ),
            TaskEvent::Exit {
                id,
                exec_id,
                pid,
                exit,
            } => (
                topics::TASK_EXIT_EVENT_TOPIC,
                Box::new(ev::TaskExit {
                    // containerd uses the container id as the init's exec id here.
                    id: exec_id.unwrap_or_else(|| id.clone()),
                    container_id: id,
                    pid,
                    exit_status: exit.code,
                    exited_at: MessageField::some(timestamp(exit.at)),
                    ..Default::default()
                }),
            ),
            TaskEvent::ExecAdded { id, exec_id } => (
                topics::TASK_EXEC_ADDED_EVENT_TOPIC,
                Box::new(ev::TaskExecAdded {
                    container_id: id,
                    exec_id,
                    ..Default::default()
                }),
            ),
            TaskEvent::ExecStarted { id, exec_id, pid } => (
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(ev::TaskExecStarted {
                    container_id: id,
                    exec_id,
                    pid,
                    ..Default::default()
                }),
            ),
            TaskEvent::Paused { id } => (
                topics::TASK_PAUSED_EVENT_TOPIC,
                Box::new(ev::TaskPaused {
                    container_id: id,
                    ..Default::default()
                }),
            ),
            TaskEvent::Resumed { id } => (
                topics::TASK_RESUMED_EVENT_TOPIC,
                Box::new(ev::TaskResumed {
                    container_id: id,
                    ..Default::default()
                }),
            ),
            TaskEvent::Oom { id } => (
                topics::TASK_OOM_EVENT_TOPIC,
                Box::new(ev::TaskOOM {
                    container_id: id,
                    ..Default::default()
                }),
            ),
            TaskEvent::Checkpointed { id } => (
                topics::TASK_CHECKPOINTED_EVENT_TOPIC,
                Box::new(ev::TaskCheckpointed {
                    container_id: id,
                    ..Default::default()
                }),
            ),
            TaskEvent::Delete { id, pid, exit } => {
                let (exit_status, exited_at) = exit_fields(exit);
                (
                    topics::TASK_DELETE_EVENT_TOPIC,
                    Box::new(ev::TaskDelete {
                        id: id.clone(),
                        container_id: id,
                        pid,
                        exit_status,
                        exited_at,
                        ..Default::default()
                    }),
                )
            }
        };
        let remote = self.remote.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = remote.publish(Context::default(), topic, &self.namespace, message) {
            warn!("cannot publish {topic}: {e}");
        }
    }
}

/// The shim process: containerd's `start`/`delete` actions and the task service.
pub struct Service {
    namespace: String,
    runc_root: PathBuf,
    state_dir: PathBuf,
    id: String,
    exit: Arc<ExitSignal>,
}

impl containerd_shim::Shim for Service {
    type T = TaskService;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut containerd_shim::Config) -> Self {
        Service {
            namespace: args.namespace.clone(),
            runc_root: crate::paths::runc_root(&args.address, &args.namespace),
            state_dir: crate::paths::state_dir(&args.address, &args.namespace),
            id: args.id.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    fn start_shim(&mut self, opts: containerd_shim::StartOpts) -> containerd_shim::Result<String> {
        if !opts.containerd_version.is_empty() {
            restore_engine::versions::require(
                "containerd",
                &opts.containerd_version,
                restore_engine::versions::MIN_CONTAINERD,
            )
            .map_err(|e| containerd_shim::Error::InvalidArgument(e.to_string()))?;
        }
        // One shim process per container.
        let grouping = opts.id.clone();
        let (_pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        containerd_shim::util::write_address(&address)?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        // containerd calls this when the shim is gone: clean up what runc left for this id.
        let bundle = std::env::current_dir().unwrap_or_default();
        let runc = crate::runc::Runc {
            binary: "runc".into(),
            root: self.runc_root.clone(),
            log: Some(bundle.join("log.json")),
            systemd_cgroup: false,
        };
        if let Err(e) = runc.delete(&self.id, true) {
            warn!("cleanup of {}: {e}", self.id);
        }
        task::unmount_rootfs(&bundle);
        // A migration this container was part of ends with it: say so in its records.
        crate::receive::shim_died(&self.state_dir, &self.id);
        Ok(DeleteResponse {
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: MessageField::some(timestamp(SystemTime::now())),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        let sink = Arc::new(Publisher {
            remote: Mutex::new(publisher),
            namespace: self.namespace.clone(),
        });
        TaskService {
            tasks: Tasks::new(
                TasksConfig {
                    runc_root: self.runc_root.clone(),
                    state_dir: self.state_dir.clone(),
                },
                sink,
            ),
            exit: Arc::clone(&self.exit),
            namespace: self.namespace.clone(),
        }
    }
}

/// containerd's Task API (v3) over [`Tasks`].
pub struct TaskService {
    tasks: Arc<Tasks>,
    exit: Arc<ExitSignal>,
    /// The containerd namespace (a `binary://` logger's CONTAINER_NAMESPACE).
    namespace: String,
}

fn state_response(state: ProcessState) -> api::StateResponse {
    let (exit_status, exited_at) = exit_fields(state.exit);
    api::StateResponse {
        id: state.exec_id.clone().unwrap_or_else(|| state.id.clone()),
        bundle: state.bundle.display().to_string(),
        pid: state.pid,
        status: status_of(state.status).into(),
        stdin: state.stdio.stdin,
        stdout: state.stdio.stdout,
        stderr: state.stdio.stderr,
        terminal: state.stdio.terminal,
        exit_status,
        exited_at,
        exec_id: state.exec_id.unwrap_or_default(),
        ..Default::default()
    }
}

impl containerd_shim::Task for TaskService {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        info!("create {} (bundle {})", req.id, req.bundle);
        let options = runtime_options(req.options.as_ref())?;
        let params = CreateParams {
            id: req.id.clone(),
            bundle: PathBuf::from(&req.bundle),
            rootfs: req
                .rootfs
                .iter()
                .map(|m| RootfsMount {
                    fs_type: m.type_.clone(),
                    source: m.source.clone(),
                    options: m.options.clone(),
                })
                .collect(),
            stdio: StdioConfig {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                container_id: req.id.clone(),
                namespace: self.namespace.clone(),
            },
            checkpoint: (!req.checkpoint.is_empty()).then(|| PathBuf::from(&req.checkpoint)),
            options,
        };
        let state = self.tasks.create(params).map_err(to_status)?;
        Ok(api::CreateTaskResponse {
            pid: state.pid,
            ..Default::default()
        })
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        info!("start {} {}", req.id, req.exec_id);
        let state = self
            .tasks
            .start(&req.id, exec_id(&req.exec_id))
            .map_err(to_status)?;
        Ok(api::StartResponse {
            pid: state.pid,
            ..Default::default()
        })
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let state = self
            .tasks
            .state(&req.id, exec_id(&req.exec_id))
            .map_err(to_status)?;
        Ok(state_response(state))
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        info!("delete {} {}", req.id, req.exec_id);
        let state = self
            .tasks
            .delete(&req.id, exec_id(&req.exec_id))
            .map_err(to_status)?;
        let (exit_status, exited_at) = exit_fields(state.exit);
        Ok(api::DeleteResponse {
            pid: state.pid,
            exit_status,
            exited_at,
            ..Default::default()
        })
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let pids = self.tasks.pids(&req.id).map_err(to_status)?;
        let mut processes = Vec::with_capacity(pids.len());
        for (pid, exec) in pids {
            let info = match exec {
                Some(exec_id) => {
                    let details = containerd_shim::protos::shim::oci::ProcessDetails {
                        exec_id,
                        ..Default::default()
                    };
                    MessageField::some(Any {
                        type_url: "containerd.runc.v1.ProcessDetails".into(),
                        value: details
                            .write_to_bytes()
                            .map_err(|e| ttrpc::Error::Others(e.to_string()))?,
                        ..Default::default()
                    })
                }
                None => MessageField::none(),
            };
            processes.push(ProcessInfo {
                pid,
                info,
                ..Default::default()
            });
        }
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<Empty> {
        info!("pause {}", req.id);
        self.tasks.pause(&req.id).map_err(to_status)?;
        Ok(Empty::new())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<Empty> {
        info!("resume {}", req.id);
        self.tasks.resume(&req.id).map_err(to_status)?;
        Ok(Empty::new())
    }

    fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<Empty> {
        info!("checkpoint {} to {}", req.id, req.path);
        let params = checkpoint_params(&req.path, req.options.as_ref())?;
        self.tasks.checkpoint(&req.id, &params).map_err(to_status)?;
        Ok(Empty::new())
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<Empty> {
        info!("kill {} {} signal {}", req.id, req.exec_id, req.signal);
        self.tasks
            .kill(&req.id, exec_id(&req.exec_id), req.signal, req.all)
            .map_err(to_status)?;
        Ok(Empty::new())
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<Empty> {
        info!("exec {} {}", req.id, req.exec_id);
        let spec = req
            .spec
            .as_ref()
            .ok_or_else(|| invalid(format!("exec {}: no process spec", req.exec_id)))?;
        self.tasks
            .exec(
                &req.id,
                &req.exec_id,
                StdioConfig {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    container_id: req.id.clone(),
                    namespace: self.namespace.clone(),
                },
                &spec.value,
            )
            .map_err(to_status)?;
        Ok(Empty::new())
    }

    fn resize_pty(&self, _ctx: &TtrpcContext, req: api::ResizePtyRequest) -> TtrpcResult<Empty> {
        let width = u16::try_from(req.width).unwrap_or(u16::MAX);
        let height = u16::try_from(req.height).unwrap_or(u16::MAX);
        self.tasks
            .resize_pty(&req.id, exec_id(&req.exec_id), width, height)
            .map_err(to_status)?;
        Ok(Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<Empty> {
        self.tasks
            .close_io(&req.id, exec_id(&req.exec_id))
            .map_err(to_status)?;
        Ok(Empty::new())
    }

    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<Empty> {
        info!("update {}", req.id);
        let resources = req
            .resources
            .as_ref()
            .ok_or_else(|| invalid(format!("update {}: no resources", req.id)))?;
        if !type_name(resources).ends_with(LINUX_RESOURCES_TYPE_SUFFIX) {
            return Err(invalid(format!(
                "update {}: resources of type '{}' are not OCI LinuxResources",
                req.id, resources.type_url
            )));
        }
        self.tasks
            .update(&req.id, &resources.value)
            .map_err(to_status)?;
        Ok(Empty::new())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let exit = self
            .tasks
            .wait(&req.id, exec_id(&req.exec_id))
            .map_err(to_status)?;
        Ok(api::WaitResponse {
            exit_status: exit.code,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let stats = self.tasks.stats(&req.id).map_err(to_status)?;
        Ok(api::StatsResponse {
            stats: MessageField::some(
                crate::metrics::stats_any(&stats).map_err(ttrpc::Error::Others)?,
            ),
            ..Default::default()
        })
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self.tasks.init_pid(&req.id).unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<Empty> {
        if self.tasks.is_empty() {
            info!("shutdown: no containers left");
            // runc's state directories of this namespace and containerd instance go when empty.
            let root = self.tasks.runc_root();
            let _ = std::fs::remove_dir(root);
            if let Some(per_daemon) = root.parent() {
                let _ = std::fs::remove_dir(per_daemon);
            }
            self.exit.signal();
        }
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_options_are_runc_compatible() {
        let opts = CheckpointOptions {
            exit: true,
            image_path: "/img".into(),
            work_path: "/work".into(),
            open_tcp: true,
            ..Default::default()
        };
        let any = Any {
            type_url: CHECKPOINT_OPTIONS_TYPE.into(),
            value: opts.write_to_bytes().unwrap(),
            ..Default::default()
        };
        let params = checkpoint_params("/containerd/tmp", Some(&any)).unwrap();
        assert_eq!(params.image_path, PathBuf::from("/img"));
        assert_eq!(params.work_path, Some(PathBuf::from("/work")));
        assert!(params.exit && params.open_tcp);

        let plain = checkpoint_params("/containerd/tmp", None).unwrap();
        assert_eq!(plain.image_path, PathBuf::from("/containerd/tmp"));
        assert!(!plain.exit);
    }

    #[test]
    fn unknown_option_types_are_refused_with_the_expected_type() {
        let any = Any {
            type_url: "example.com/Other".into(),
            ..Default::default()
        };
        let err = checkpoint_params("/p", Some(&any)).unwrap_err();
        assert!(err.to_string().contains(CHECKPOINT_OPTIONS_TYPE), "{err}");
        let err = runtime_options(Some(&any)).unwrap_err();
        assert!(err.to_string().contains(RUNC_OPTIONS_TYPE), "{err}");
    }

    #[test]
    fn runtime_options_accept_the_googleapis_type_url_form() {
        let o = RuncOptions {
            criu_image_path: "/img".into(),
            ..Default::default()
        };
        let any = Any {
            type_url: format!("type.googleapis.com/{RUNC_OPTIONS_TYPE}"),
            value: o.write_to_bytes().unwrap(),
            ..Default::default()
        };
        let parsed = runtime_options(Some(&any)).unwrap();
        assert_eq!(parsed.criu_image_path.as_deref(), Some("/img"));
    }
}
