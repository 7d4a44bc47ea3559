//! containerd's `binary://` log URIs (what `ctr run --log-uri binary:///path` and nerdctl pass):
//! a logging program that receives the container's output, as containerd's runc shim runs it
//! (containerd pkg/process/io.go, NewBinaryIO):
//!
//! - `binary:///path/to/logger?k1=v1&k2` runs `/path/to/logger k1 v1 k2 ""` with only
//!   `CONTAINER_ID` and `CONTAINER_NAMESPACE` in its environment (query order is kept; containerd
//!   takes Go's map order);
//! - fd 3 is the read end of the container's stdout, fd 4 of its stderr, and fd 5 a pipe the
//!   logger writes a byte to, or closes, once it is ready; the process starts only then;
//! - when the process has exited and its output is drained, the logger gets EOF, then SIGTERM,
//!   and SIGKILL 12 s later if it is still there.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use log::warn;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::unistd::pipe2;

/// Why a `binary://` logger cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LoggerError {
    #[error("log URI '{uri}': {why}")]
    BadUri { uri: String, why: String },
    #[error("cannot create a pipe for the logging binary: {0}")]
    Pipe(#[source] nix::Error),
    #[error("cannot start the logging binary {program}: {source}")]
    Start {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("the logging binary {program} did not say it was ready within {timeout:?} (it must write a byte to fd 5 or close it)")]
    NotReady { program: String, timeout: Duration },
}

/// How long the logger may take to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the logger may take to exit after SIGTERM (containerd: binaryIOProcTermTimeout).
const TERM_TIMEOUT: Duration = Duration::from_secs(12);

/// A `binary://` URI: the program and its arguments.
#[derive(Debug, PartialEq, Eq)]
pub struct LoggerCommand {
    pub program: String,
    pub args: Vec<String>,
}

/// Parses a `binary://` URI; `None` if it is not one.
pub fn parse(uri: &str) -> Option<Result<LoggerCommand, LoggerError>> {
    if !uri.starts_with("binary://") {
        return None;
    }
    let bad = |why: &str| LoggerError::BadUri {
        uri: uri.to_string(),
        why: why.to_string(),
    };
    // binary://[host]/path[?query]: the program is the path (percent-decoded), never a host.
    // (Hand-split rather than the url crate: it would add IDNA tables to the build for a
    // scheme that has no host.)
    let rest = &uri["binary://".len()..];
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if !path.starts_with('/') || path.len() < 2 {
        return Some(Err(bad(
            "the logger must be an absolute path: binary:///path/to/logger",
        )));
    }
    let program = match percent_encoding::percent_decode_str(path).decode_utf8() {
        Ok(p) => p.into_owned(),
        Err(e) => return Some(Err(bad(&e.to_string()))),
    };
    let args = form_urlencoded::parse(query.as_bytes())
        .flat_map(|(k, v)| [k.into_owned(), v.into_owned()])
        .collect();
    Some(Ok(LoggerCommand { program, args }))
}

/// A running logger and the write ends of its stdout and stderr pipes.
pub struct Logger {
    pub stdout: File,
    pub stderr: File,
    pub process: LoggerProcess,
}

/// The logger process, signalled through a pidfd (never a recycled pid).
pub struct LoggerProcess {
    pidfd: OwnedFd,
    program: String,
}

fn cloexec_pipe() -> Result<(OwnedFd, OwnedFd), LoggerError> {
    pipe2(OFlag::O_CLOEXEC).map_err(LoggerError::Pipe)
}

/// A copy of `fd` numbered 10 or above (so that placing the copies at 3, 4 and 5 in the child
/// cannot overwrite one another).
fn high_copy(fd: &OwnedFd) -> Result<OwnedFd, LoggerError> {
    let raw = fcntl(fd.as_fd(), FcntlArg::F_DUPFD_CLOEXEC(10)).map_err(LoggerError::Pipe)?;
    // SAFETY: fcntl returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags, no pointers.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as RawFd) })
}

/// Starts the logger of `command` for container `id` in containerd namespace `namespace`, and
/// waits until it is ready.
pub fn start(command: &LoggerCommand, id: &str, namespace: &str) -> Result<Logger, LoggerError> {
    let (out_r, out_w) = cloexec_pipe()?;
    let (err_r, err_w) = cloexec_pipe()?;
    let (ready_r, ready_w) = cloexec_pipe()?;
    let child_fds = [high_copy(&out_r)?, high_copy(&err_r)?, high_copy(&ready_w)?];
    let raw: Vec<RawFd> = child_fds.iter().map(|f| f.as_raw_fd()).collect();
    let failed = |source: io::Error| LoggerError::Start {
        program: command.program.clone(),
        source,
    };
    let mut cmd = Command::new(&command.program);
    cmd.args(&command.args)
        .env_clear()
        .env("CONTAINER_ID", id)
        .env("CONTAINER_NAMESPACE", namespace)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: between fork and exec the child only calls dup2, which is async-signal-safe, on
    // descriptors that stay open in the parent until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            for (target, &fd) in raw.iter().enumerate() {
                if libc::dup2(fd, 3 + target as RawFd) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    // The shim's reaper collects the logger's exit; the Child handle is never waited on.
    let child = cmd.spawn().map_err(failed)?;
    let process = LoggerProcess {
        pidfd: pidfd_open(child.id()).map_err(failed)?,
        program: command.program.clone(),
    };
    drop((child_fds, out_r, err_r, ready_w));
    // Ready: a byte, or EOF once the logger closed fd 5 (or exited).
    let mut fds = [PollFd::new(ready_r.as_fd(), PollFlags::POLLIN)];
    let timeout =
        PollTimeout::try_from(READY_TIMEOUT.as_millis() as i32).unwrap_or(PollTimeout::MAX);
    let ready = loop {
        match poll(&mut fds, timeout) {
            Ok(n) => break n > 0,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                process.kill();
                return Err(failed(e.into()));
            }
        }
    };
    if !ready {
        process.kill();
        return Err(LoggerError::NotReady {
            program: command.program.clone(),
            timeout: READY_TIMEOUT,
        });
    }
    let _ = File::from(ready_r).read(&mut [0u8; 1]);
    Ok(Logger {
        stdout: File::from(out_w),
        stderr: File::from(err_w),
        process,
    })
}

impl LoggerProcess {
    fn signal(&self, signal: libc::c_int) -> io::Result<()> {
        // SAFETY: pidfd_send_signal with our pidfd and no siginfo.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn kill(&self) {
        let _ = self.signal(libc::SIGKILL);
    }

    /// Whether it exited within `within` (a pidfd becomes readable when its process exits).
    fn exited(&self, within: Duration) -> bool {
        let mut fds = [PollFd::new(self.pidfd.as_fd(), PollFlags::POLLIN)];
        let timeout = PollTimeout::try_from(within.as_millis() as i32).unwrap_or(PollTimeout::MAX);
        matches!(poll(&mut fds, timeout), Ok(n) if n > 0)
    }

    /// The output is drained (the logger has had EOF): SIGTERM, and SIGKILL after
    /// [`TERM_TIMEOUT`], in the background.
    pub fn stop(self) {
        thread::spawn(move || {
            if self.exited(Duration::from_millis(0)) {
                return;
            }
            if self.signal(libc::SIGTERM).is_err() {
                return; // already gone
            }
            if !self.exited(TERM_TIMEOUT) {
                warn!(
                    "logging binary {} did not exit within {TERM_TIMEOUT:?} of SIGTERM: killing it",
                    self.program
                );
                self.kill();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_program_and_its_arguments_in_order() {
        let parsed = parse("binary:///usr/bin/logger?--dir=%2Fvar%2Flog&-v&x=1")
            .unwrap()
            .unwrap();
        assert_eq!(parsed.program, "/usr/bin/logger");
        assert_eq!(parsed.args, ["--dir", "/var/log", "-v", "", "x", "1"]);
        assert!(parse("file:///x").is_none());
        assert!(parse("/run/fifo").is_none());
        let err = parse("binary://relative/logger").unwrap().unwrap_err();
        assert!(err.to_string().contains("absolute path"), "{err}");
    }
}
