//! Start: `runc start` of a created container's init (or its restore, see [`super::restore`]),
//! or of an exec process (see [`super::exec`]); and the OOM watch of a started container.

use std::sync::Arc;
use std::thread;

use log::warn;

use super::process::{ProcessState, ProcessStatus};
use super::{Container, InitStart, TaskError, TaskEvent, Tasks};
use crate::cgroups::OomWatch;

impl Tasks {
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
                self.restore_init(container, *source, *io)?
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
}
