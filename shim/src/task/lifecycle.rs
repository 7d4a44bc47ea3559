//! A container's life after start: kill, wait, delete, pause, resume, resource updates, and its
//! processes' stdio (close stdin, resize the terminal).

use std::fs;

use log::warn;

use super::process::{ExitInfo, ProcessState, ProcessStatus};
use super::{unmount_rootfs, TaskError, TaskEvent, Tasks};
use restore_engine::record::{Phase, Role, Store};

/// SIGKILL for every process of a frozen (paused) container, then the thaw: each process
/// leaves the freezer with the signal pending and dies without returning to user space.
///
/// `runc kill` of a container with its own PID namespace signals its init alone and thaws the
/// cgroup; the other processes then run until the kernel's teardown of the namespace reaches
/// them. For a migrated source that is two copies running at once: the workload suite's journal
/// caught a source process making a round (and writing to a volume both hosts share) after the
/// destination had started. The cgroup is frozen, so its process list cannot change while it is
/// read and signalled.
pub(super) fn kill_frozen(
    runc: &crate::runc::Runc,
    id: &str,
    init_pid: u32,
) -> Result<(), TaskError> {
    let pids = crate::cgroups::container_procs(init_pid as i32)?;
    for pid in &pids {
        // An already exiting process is no error.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    // runc's own kill for its state, then the thaw.
    let killed = runc.kill(id, libc::SIGKILL as u32, true);
    let _ = runc.resume(id);
    killed.map_err(TaskError::from)
}

impl Tasks {
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
            // A container still receiving its migration has no process to signal: the receive
            // stops (the source is told to resume) and its start fails.
            None if status == ProcessStatus::Created
                && container.receive.cancel(&format!(
                    "the receiving container was killed (signal {signal}) before its migration arrived"
                )) =>
            {
                log::info!("{id}: killed while receiving a migration: the receive stops");
            }
            None => {
                if status == ProcessStatus::Stopped && !all {
                    return Err(TaskError::WrongState {
                        what: format!("kill {id}"),
                        status,
                        expected: "running",
                    });
                }
                if status == ProcessStatus::Paused && signal == libc::SIGKILL as u32 {
                    // A frozen container (e.g. a migration's source in doubt) dies without
                    // running again.
                    kill_frozen(&container.runc, &container.id, pid)?;
                } else {
                    container.runc.kill(&container.id, signal, all)?;
                }
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
        // A container frozen by a migration that may run elsewhere must not be thawed here
        // unless an operator resolved it (pclive resolve records the decision first).
        let store = Store::new(&self.config.state_dir);
        let migration = store.latest(id, Role::Source).map_err(|e| {
            TaskError::Invalid(format!(
                "resume {id}: cannot read its migration record: {e}"
            ))
        })?;
        if let Some(record) = migration
            .as_ref()
            .filter(|r| !r.phase.is_final() || r.phase == Phase::Committed)
        {
            if record.resolution.is_none() {
                return Err(TaskError::Invalid(if record.in_doubt() {
                    format!(
                        "{id} is frozen because its migration {} to {} is in doubt ({}): resuming it here could run it twice. `pclive status {id}` shows it; end it with `pclive resolve {id} --resume-source` or `--discard-source`",
                        record.migration_id,
                        record.peer,
                        record.reason.as_deref().unwrap_or("no outcome")
                    )
                } else {
                    format!(
                        "{id} is being migrated to {} (migration {}, {}): the migration resumes it if it fails",
                        record.peer, record.migration_id, record.phase
                    )
                }));
            }
        }
        if migration.as_ref().is_some_and(|r| r.resolution.is_some()) {
            // Resolved after the destination ran it: the rules that sent its clients away go.
            let pid = container.init.lock().pid;
            if let Err(e) = crate::release::unrelease(id, pid) {
                log::warn!("{id}: {e}; connections to its ports may still be refused here");
            }
            // Its address went down for a move (--move-address): it is this copy's again.
            if let Some(links) = migration
                .as_ref()
                .filter(|r| r.resolution.as_deref() == Some("resume-source"))
                .map(|r| &r.moved_links)
                .filter(|l| !l.is_empty())
            {
                crate::netns::set_links(&crate::netns::of_pid(pid), links, true).map_err(|e| {
                    TaskError::Os {
                        what: format!("bringing {id}'s interfaces {links:?} up before resuming it"),
                        source: e,
                    }
                })?;
            }
        }
        container.runc.resume(id)?;
        {
            let mut inner = container.init.lock();
            if inner.exit.is_none() {
                inner.status = ProcessStatus::Running;
            }
        }
        if let Some(mut record) =
            migration.filter(|r| r.resolution.is_some() && !r.phase.is_final())
        {
            let (phase, why) = match record.resolution.as_deref() {
                Some("discard-source") => (Phase::Done, "an operator discarded the source copy"),
                _ => (Phase::Resumed, "an operator resumed the source copy"),
            };
            record.enter(phase, Some(why.into()));
            if let Err(e) = store.write(&record) {
                log::warn!("{id}: resumed, but {e}");
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
}
