//! What containerd asks about a container: its state, its processes and its resource usage.

use super::process::{ProcessState, ProcessStatus};
use super::{TaskError, Tasks};
use crate::cgroups::{self, ContainerStats};

impl Tasks {
    pub fn state(&self, id: &str, exec_id: Option<&str>) -> Result<ProcessState, TaskError> {
        let container = self.container(id)?;
        let process = container.process(exec_id)?;
        Ok(self.snapshot(&container, &process))
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

    /// The pid of the container's init (0 before start of a restore).
    pub fn init_pid(&self, id: &str) -> Result<u32, TaskError> {
        Ok(self.container(id)?.init.lock().pid)
    }
}
