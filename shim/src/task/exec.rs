//! Exec: an extra process in a running container (`runc exec`).

use std::fs;
use std::sync::Arc;

use super::process::{read_pid_file, Process, ProcessStatus};
use super::{os_err, Container, TaskError, TaskEvent, Tasks};
use crate::io::{self as pio, StdioConfig};
use crate::runc::ExecOpts;

impl Tasks {
    pub(super) fn start_exec(
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
}
