//! A container's processes (its init and its execs) and how their exits reach them: the reaper
//! reports every exit by pid, the registry routes it to its process.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use containerd_shim::monitor::{monitor_subscribe, Subject, Topic};
use log::debug;

use super::{os_err, TaskError, TaskEvent, Tasks};
use crate::io::{ProcessIo, StdioConfig};

/// How long an exit waits for the process's output to drain before it is reported.
const OUTPUT_DRAIN_BOUND: Duration = Duration::from_secs(2);
/// Exits of pids nobody claimed yet (a process that exits before runc returned its pid) are
/// remembered this long.
const UNCLAIMED_EXIT_TTL: Duration = Duration::from_secs(120);

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

pub(super) struct ProcessInner {
    pub(super) pid: u32,
    pub(super) status: ProcessStatus,
    pub(super) exit: Option<ExitInfo>,
    pub(super) io: Option<ProcessIo>,
}

pub(super) struct Process {
    pub(super) exec_id: Option<String>,
    pub(super) stdio: StdioConfig,
    inner: Mutex<ProcessInner>,
    pub(super) exited: Condvar,
}

impl Process {
    pub(super) fn new(exec_id: Option<String>, stdio: StdioConfig) -> Self {
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

    pub(super) fn lock(&self) -> MutexGuard<'_, ProcessInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Default)]
pub(super) struct PidRegistry {
    /// pid → (container id, exec id)
    owners: HashMap<u32, (String, Option<String>)>,
    unclaimed: HashMap<u32, (ExitInfo, Instant)>,
}

fn exit_code_to_info(code: i32) -> ExitInfo {
    ExitInfo {
        code: code as u32,
        at: SystemTime::now(),
    }
}

pub(super) fn read_pid_file(path: &Path) -> Result<u32, TaskError> {
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

impl Tasks {
    /// The reaper tells every exit; route each to its process.
    pub(super) fn spawn_exit_handler(self: &Arc<Self>) {
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
    pub(super) fn claim_pid(&self, id: &str, exec_id: Option<&str>, pid: u32) {
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
}
