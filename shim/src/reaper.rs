//! Running helper programs (runc, criu) without racing the shim's reaper.
//!
//! The shim is a child subreaper and the containerd-shim crate reaps every child with
//! `waitpid(-1)` on SIGCHLD, so `std::process::Child::wait` (and `Command::output`) would fail
//! with ECHILD or lose the exit status. Instead we subscribe to the reaper's exit monitor before
//! spawning and learn the status from there.

use std::io::{self, Read, Write};
use std::process::Command;
use std::thread;

use containerd_shim::monitor::{monitor_subscribe, Subject, Topic};

#[derive(Debug, thiserror::Error)]
pub enum ReaperError {
    #[error("cannot start the program: {0}")]
    Spawn(#[source] io::Error),
    #[error("the shim's exit monitor is unavailable: {0}")]
    Monitor(String),
}

/// A finished program.
pub struct ReapedOutput {
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Spawns `command` (whose stdio the caller configured), feeds `stdin_data` if stdin is piped,
/// collects piped stdout/stderr and returns the exit status the reaper saw.
pub fn run(command: Command, stdin_data: Option<&[u8]>) -> Result<ReapedOutput, ReaperError> {
    run_reporting(command, stdin_data, |_| {})
}

/// [`run`], telling `started` the child's pid as soon as it runs (to stop it from elsewhere).
pub fn run_reporting(
    mut command: Command,
    stdin_data: Option<&[u8]>,
    started: impl FnOnce(i32),
) -> Result<ReapedOutput, ReaperError> {
    let subscription =
        monitor_subscribe(Topic::Pid).map_err(|e| ReaperError::Monitor(e.to_string()))?;
    let mut child = command.spawn().map_err(ReaperError::Spawn)?;
    // The Command holds the parent's copies of descriptors handed to the child (a container's
    // pipes): drop them now so that only the child keeps them open.
    drop(command);
    let pid = child.id() as i32;
    started(pid);

    if let Some(mut stdin) = child.stdin.take() {
        if let Some(data) = stdin_data {
            let _ = stdin.write_all(data);
        }
    }
    let stdout_reader = child.stdout.take().map(|mut out| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = out.read_to_end(&mut buf);
            buf
        })
    });
    let mut stderr = Vec::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_end(&mut stderr);
    }
    let stdout = stdout_reader
        .map(|t| t.join().unwrap_or_default())
        .unwrap_or_default();

    let status = loop {
        match subscription.rx.recv() {
            Ok(event) if matches!(event.subject, Subject::Pid(p) if p == pid) => {
                break event.exit_code
            }
            Ok(_) => continue,
            Err(_) => {
                return Err(ReaperError::Monitor(
                    "exit monitor closed before the program exited".into(),
                ))
            }
        }
    };
    Ok(ReapedOutput {
        status,
        stdout,
        stderr,
    })
}
