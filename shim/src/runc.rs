//! Typed command lines for runc. Each invocation runs through [`crate::reaper`], so that its
//! exit status comes from the shim's reaper instead of racing it.
//!
//! Each subcommand has an options struct whose `push_args` renders it into an argument vector;
//! no command line is ever joined into a string.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;

use crate::reaper::{self, ReapedOutput};

/// Errors from running runc.
#[derive(Debug, thiserror::Error)]
pub enum RuncError {
    #[error("runc binary '{binary}' cannot be started: {source}. Install runc >= 1.3 (scripts/setup.sh) or set the runtime option binary_name")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`runc {subcommand}` exited with status {status}: {message}")]
    Failed {
        subcommand: String,
        status: i32,
        message: String,
    },
    #[error("runc {subcommand} printed output that is not the expected JSON: {source}")]
    Parse {
        subcommand: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the shim's exit monitor is unavailable: {0}")]
    Monitor(String),
}

/// Builds an argument vector flag by flag.
#[derive(Default)]
struct Args(Vec<OsString>);

impl Args {
    fn word(&mut self, word: impl AsRef<OsStr>) -> &mut Self {
        self.0.push(word.as_ref().to_owned());
        self
    }
    fn flag(&mut self, name: &str, on: bool) -> &mut Self {
        if on {
            self.0.push(name.into());
        }
        self
    }
    fn value(&mut self, name: &str, value: impl AsRef<OsStr>) -> &mut Self {
        self.0.push(name.into());
        self.0.push(value.as_ref().to_owned());
        self
    }
    fn maybe(&mut self, name: &str, value: Option<impl AsRef<OsStr>>) -> &mut Self {
        if let Some(v) = value {
            self.value(name, v);
        }
        self
    }
}

/// Options of `runc create`.
#[derive(Debug, Default, Clone)]
pub struct CreateOpts {
    pub pid_file: PathBuf,
    pub console_socket: Option<PathBuf>,
    pub no_pivot: bool,
    pub no_new_keyring: bool,
}

impl CreateOpts {
    fn push_args(&self, args: &mut Args) {
        args.value("--pid-file", &self.pid_file)
            .maybe("--console-socket", self.console_socket.as_ref())
            .flag("--no-pivot", self.no_pivot)
            .flag("--no-new-keyring", self.no_new_keyring);
    }
}

/// Options of `runc exec --detach`.
#[derive(Debug, Default, Clone)]
pub struct ExecOpts {
    pub process_spec: PathBuf,
    pub pid_file: PathBuf,
    pub console_socket: Option<PathBuf>,
}

impl ExecOpts {
    fn push_args(&self, args: &mut Args) {
        args.flag("--detach", true)
            .value("--process", &self.process_spec)
            .value("--pid-file", &self.pid_file)
            .maybe("--console-socket", self.console_socket.as_ref());
    }
}

/// Options shared by `runc checkpoint` and `runc restore` (CRIU behaviour).
#[derive(Debug, Default, Clone)]
pub struct CriuOpts {
    pub image_path: PathBuf,
    pub work_path: Option<PathBuf>,
    pub tcp_established: bool,
    pub ext_unix_sk: bool,
    pub shell_job: bool,
    pub file_locks: bool,
    pub empty_namespaces: Vec<String>,
    pub manage_cgroups_mode: Option<String>,
    pub lazy_pages: bool,
}

impl CriuOpts {
    fn push_args(&self, args: &mut Args) {
        args.value("--image-path", &self.image_path)
            .maybe("--work-path", self.work_path.as_ref())
            .flag("--tcp-established", self.tcp_established)
            .flag("--ext-unix-sk", self.ext_unix_sk)
            .flag("--shell-job", self.shell_job)
            .flag("--file-locks", self.file_locks)
            .maybe("--manage-cgroups-mode", self.manage_cgroups_mode.as_ref())
            .flag("--lazy-pages", self.lazy_pages);
        for ns in &self.empty_namespaces {
            args.value("--empty-ns", ns);
        }
    }
}

/// Options of `runc checkpoint`.
#[derive(Debug, Default, Clone)]
pub struct CheckpointOpts {
    pub criu: CriuOpts,
    pub leave_running: bool,
    /// Directory of a previous image set (`--parent-path`), relative to the image path.
    pub parent_path: Option<PathBuf>,
    /// `--status-fd`: runc writes a byte to it once the lazy dump is ready to serve pages.
    pub status_fd: Option<i32>,
    /// `--page-server ADDRESS:PORT`: with lazy pages, the port the dump serves pages on.
    pub page_server: Option<String>,
    /// `--tcp-skip-in-flight`: connections still in a listener's queue (not accepted yet) are
    /// left out rather than failing the dump; their clients see a reset and reconnect.
    pub tcp_skip_in_flight: bool,
}

/// Which network namespace `runc checkpoint` (and its CRIU) runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DumpNetwork {
    /// The shim's (the host's).
    Host,
    /// A new one with only `lo` (up): CRIU's page server listens where nothing else on the
    /// host can connect. Only for containers with a network namespace of their own: CRIU
    /// dumps the namespaces in which the container differs from CRIU, so a host-network
    /// container dumped from a private namespace would carry the host's network with it.
    Private,
}

/// In a child before exec: a new network namespace whose loopback is up.
fn private_network() -> std::io::Result<()> {
    // SAFETY: unshare, socket, ioctl and close on a zeroed ifreq we own; plain system calls.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNET) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        let mut rc = libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req);
        if rc == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            rc = libc::ioctl(sock, libc::SIOCSIFFLAGS, &req);
        }
        let err = std::io::Error::last_os_error();
        libc::close(sock);
        if rc != 0 {
            return Err(err);
        }
    }
    Ok(())
}

impl CheckpointOpts {
    fn push_args(&self, args: &mut Args) {
        self.criu.push_args(args);
        args.flag("--leave-running", self.leave_running)
            .maybe("--parent-path", self.parent_path.as_ref())
            .maybe("--status-fd", self.status_fd.map(|fd| fd.to_string()))
            .maybe("--page-server", self.page_server.as_ref())
            .flag("--tcp-skip-in-flight", self.tcp_skip_in_flight);
    }
}

/// Options of `runc restore --detach`.
#[derive(Debug, Default, Clone)]
pub struct RestoreOpts {
    pub criu: CriuOpts,
    pub bundle: PathBuf,
    pub pid_file: PathBuf,
    pub console_socket: Option<PathBuf>,
    pub no_pivot: bool,
}

impl RestoreOpts {
    fn push_args(&self, args: &mut Args) {
        self.criu.push_args(args);
        args.flag("--detach", true)
            .value("--bundle", &self.bundle)
            .value("--pid-file", &self.pid_file)
            .maybe("--console-socket", self.console_socket.as_ref())
            .flag("--no-pivot", self.no_pivot);
    }
}

/// Where a runc invocation's stdio goes.
pub enum RuncStdio {
    /// Capture stdout and stderr (for commands whose output we parse or report).
    Capture,
    /// Hand these descriptors to runc; the container process inherits them (create, exec, restore).
    /// `None` entries become /dev/null.
    Container {
        stdin: Option<OwnedFd>,
        stdout: Option<OwnedFd>,
        stderr: Option<OwnedFd>,
    },
}

/// A runc binary with its global options.
#[derive(Debug, Clone)]
pub struct Runc {
    pub binary: PathBuf,
    /// `--root`: where runc keeps container state. Unique per containerd instance so that two
    /// containerd daemons on one machine (the migration test bed) never share state.
    pub root: PathBuf,
    /// `--log` (JSON): runc's own error messages end up here when its stderr is the container's.
    pub log: Option<PathBuf>,
    pub systemd_cgroup: bool,
}

impl Runc {
    fn global_args(&self) -> Args {
        let mut args = Args::default();
        args.value("--root", &self.root);
        if let Some(log) = &self.log {
            args.value("--log", log).value("--log-format", "json");
        }
        args.flag("--systemd-cgroup", self.systemd_cgroup);
        args
    }

    pub fn create(
        &self,
        id: &str,
        bundle: &Path,
        opts: &CreateOpts,
        stdio: RuncStdio,
    ) -> Result<(), RuncError> {
        let mut args = self.global_args();
        args.word("create").value("--bundle", bundle);
        opts.push_args(&mut args);
        args.word(id);
        self.run("create", args, stdio, None).map(drop)
    }

    pub fn start(&self, id: &str) -> Result<(), RuncError> {
        let mut args = self.global_args();
        args.word("start").word(id);
        self.run("start", args, RuncStdio::Capture, None).map(drop)
    }

    pub fn exec(&self, id: &str, opts: &ExecOpts, stdio: RuncStdio) -> Result<(), RuncError> {
        let mut args = self.global_args();
        args.word("exec");
        opts.push_args(&mut args);
        args.word(id);
        self.run("exec", args, stdio, None).map(drop)
    }

    pub fn kill(&self, id: &str, signal: u32, all: bool) -> Result<(), RuncError> {
        let mut args = self.global_args();
        args.word("kill")
            .flag("--all", all)
            .word(id)
            .word(signal.to_string());
        self.run("kill", args, RuncStdio::Capture, None).map(drop)
    }

    pub fn delete(&self, id: &str, force: bool) -> Result<(), RuncError> {
        let mut args = self.global_args();
        args.word("delete").flag("--force", force).word(id);
        self.run("delete", args, RuncStdio::Capture, None).map(drop)
    }

    pub fn pause(&self, id: &str) -> Result<(), RuncError> {
        let mut args = self.global_args();
        args.word("pause").word(id);
        self.run("pause", args, RuncStdio::Capture, None).map(drop)
    }

    pub fn resume(&self, id: &str) -> Result<(), RuncError> {
        let mut args = self.global_args();
        args.word("resume").word(id);
        self.run("resume", args, RuncStdio::Capture, None).map(drop)
    }

    pub fn ps(&self, id: &str) -> Result<Vec<i32>, RuncError> {
        let mut args = self.global_args();
        args.word("ps").value("--format", "json").word(id);
        let out = self.run("ps", args, RuncStdio::Capture, None)?;
        // runc prints `null` for an empty list.
        let pids: Option<Vec<i32>> =
            serde_json::from_slice(&out).map_err(|source| RuncError::Parse {
                subcommand: "ps".into(),
                source,
            })?;
        Ok(pids.unwrap_or_default())
    }

    /// `runc update --resources -`, the resources given as OCI `LinuxResources` JSON.
    pub fn update(&self, id: &str, resources_json: &[u8]) -> Result<(), RuncError> {
        let mut args = self.global_args();
        args.word("update").value("--resources", "-").word(id);
        self.run("update", args, RuncStdio::Capture, Some(resources_json))
            .map(drop)
    }

    pub fn checkpoint(&self, id: &str, opts: &CheckpointOpts) -> Result<(), RuncError> {
        self.checkpoint_in_group(id, opts, DumpNetwork::Host, |_| {})
    }

    /// `runc checkpoint` in a process group of its own (runc and the CRIU it starts), whose id
    /// `started` learns, so that it can be stopped as a whole (`killpg`) if it hangs.
    pub fn checkpoint_in_group(
        &self,
        id: &str,
        opts: &CheckpointOpts,
        network: DumpNetwork,
        started: impl FnOnce(i32),
    ) -> Result<(), RuncError> {
        let mut args = self.global_args();
        args.word("checkpoint");
        opts.push_args(&mut args);
        args.word(id);
        self.run_in(
            "checkpoint",
            args,
            RuncStdio::Capture,
            None,
            Some(Box::new(started)),
            network,
        )
        .map_err(|e| with_criu_log(e, opts.criu.work_path.as_deref(), "dump.log"))
        .map(drop)
    }

    pub fn restore(&self, id: &str, opts: &RestoreOpts, stdio: RuncStdio) -> Result<(), RuncError> {
        let mut args = self.global_args();
        args.word("restore");
        opts.push_args(&mut args);
        args.word(id);
        self.run("restore", args, stdio, None)
            .map_err(|e| with_criu_log(e, opts.criu.work_path.as_deref(), "restore.log"))
            .map(drop)
    }

    /// Runs runc and returns its stdout. Its exit status comes from the reaper's monitor.
    fn run(
        &self,
        subcommand: &str,
        args: Args,
        stdio: RuncStdio,
        stdin_data: Option<&[u8]>,
    ) -> Result<Vec<u8>, RuncError> {
        self.run_in(subcommand, args, stdio, stdin_data, None, DumpNetwork::Host)
    }

    /// [`Self::run`]; with `group`, in a new process group whose id `group` learns.
    fn run_in(
        &self,
        subcommand: &str,
        args: Args,
        stdio: RuncStdio,
        stdin_data: Option<&[u8]>,
        group: Option<Box<dyn FnOnce(i32) + '_>>,
        network: DumpNetwork,
    ) -> Result<Vec<u8>, RuncError> {
        let mut command = Command::new(&self.binary);
        command.args(&args.0);
        if group.is_some() {
            std::os::unix::process::CommandExt::process_group(&mut command, 0);
        }
        if network == DumpNetwork::Private {
            // SAFETY: the hook runs in the child between fork and exec and makes only system
            // calls (unshare, socket, ioctl, close): no allocation, no locks.
            unsafe { std::os::unix::process::CommandExt::pre_exec(&mut command, private_network) };
        }
        let capture = matches!(stdio, RuncStdio::Capture);
        match stdio {
            RuncStdio::Capture => {
                command
                    .stdin(if stdin_data.is_some() {
                        Stdio::piped()
                    } else {
                        Stdio::null()
                    })
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
            }
            RuncStdio::Container {
                stdin,
                stdout,
                stderr,
            } => {
                let to_stdio = |fd: Option<OwnedFd>| fd.map(Stdio::from).unwrap_or(Stdio::null());
                command
                    .stdin(to_stdio(stdin))
                    .stdout(to_stdio(stdout))
                    .stderr(to_stdio(stderr));
            }
        }
        if let Some(log) = &self.log {
            // Keep only this invocation's messages, so errors name this failure.
            let _ = fs::remove_file(log);
        }
        let ReapedOutput {
            status,
            stdout,
            stderr: stderr_buf,
        } = reaper::run_reporting(command, stdin_data, |pid| {
            if let Some(group) = group {
                group(pid)
            }
        })
        .map_err(|e| match e {
            reaper::ReaperError::Spawn(source) => RuncError::Spawn {
                binary: self.binary.clone(),
                source,
            },
            reaper::ReaperError::Monitor(m) => RuncError::Monitor(m),
        })?;

        if status != 0 {
            let mut message = String::from_utf8_lossy(&stderr_buf).trim().to_string();
            if let Some(from_log) = self.log.as_deref().and_then(last_log_error) {
                if message.is_empty() || !capture {
                    message = from_log;
                } else if !message.contains(&from_log) {
                    message = format!("{message} ({from_log})");
                }
            }
            if message.is_empty() {
                message = "no error message".into();
            }
            return Err(RuncError::Failed {
                subcommand: subcommand.into(),
                status,
                message,
            });
        }
        Ok(stdout)
    }
}

/// The last error-level message of runc's JSON log.
fn last_log_error(log: &Path) -> Option<String> {
    #[derive(Deserialize)]
    struct Entry {
        level: Option<String>,
        msg: Option<String>,
    }
    let text = fs::read_to_string(log).ok()?;
    text.lines()
        .rev()
        .filter_map(|line| serde_json::from_str::<Entry>(line).ok())
        .filter(|e| matches!(e.level.as_deref(), Some("error") | Some("fatal")))
        .find_map(|e| e.msg)
}

/// CRIU's own log says why a dump or restore failed; runc only says "criu failed". Append the
/// log's error lines so the user sees the cause without digging.
/// The last error lines of a CRIU log (empty if it has none or cannot be read).
pub(crate) fn criu_log_errors(log_path: &Path) -> String {
    let errors: Vec<String> = fs::read_to_string(log_path)
        .map(|text| {
            text.lines()
                .filter(|l| l.contains("Error") || l.contains("error"))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    errors
        .iter()
        .rev()
        .take(5)
        .rev()
        .cloned()
        .collect::<Vec<_>>()
        .join("\n  ")
}

fn with_criu_log(err: RuncError, work_path: Option<&Path>, log_name: &str) -> RuncError {
    let RuncError::Failed {
        subcommand,
        status,
        message,
    } = err
    else {
        return err;
    };
    let Some(log_path) = work_path.map(|w| w.join(log_name)) else {
        return RuncError::Failed {
            subcommand,
            status,
            message,
        };
    };
    let tail = criu_log_errors(&log_path);
    let message = if tail.is_empty() {
        format!("{message} (CRIU log: {})", log_path.display())
    } else {
        format!("{message}\nCRIU log {} says:\n  {tail}", log_path.display())
    };
    RuncError::Failed {
        subcommand,
        status,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &Args) -> Vec<String> {
        args.0
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn checkpoint_args_are_typed_and_ordered() {
        let opts = CheckpointOpts {
            criu: CriuOpts {
                image_path: "/img".into(),
                work_path: Some("/work".into()),
                tcp_established: true,
                empty_namespaces: vec!["network".into()],
                lazy_pages: true,
                ..Default::default()
            },
            leave_running: true,
            parent_path: None,
            status_fd: Some(5),
            page_server: None,
            tcp_skip_in_flight: false,
        };
        let mut args = Args::default();
        opts.push_args(&mut args);
        assert_eq!(
            strings(&args),
            [
                "--image-path",
                "/img",
                "--work-path",
                "/work",
                "--tcp-established",
                "--lazy-pages",
                "--empty-ns",
                "network",
                "--leave-running",
                "--status-fd",
                "5"
            ]
        );
    }

    #[test]
    fn restore_is_detached_with_bundle_and_pid_file() {
        let opts = RestoreOpts {
            criu: CriuOpts {
                image_path: "/img".into(),
                ..Default::default()
            },
            bundle: "/b".into(),
            pid_file: "/b/init.pid".into(),
            console_socket: None,
            no_pivot: false,
        };
        let mut args = Args::default();
        opts.push_args(&mut args);
        assert_eq!(
            strings(&args),
            [
                "--image-path",
                "/img",
                "--detach",
                "--bundle",
                "/b",
                "--pid-file",
                "/b/init.pid"
            ]
        );
    }

    #[test]
    fn global_args_carry_root_and_json_log() {
        let runc = Runc {
            binary: "runc".into(),
            root: "/run/r".into(),
            log: Some("/b/log.json".into()),
            systemd_cgroup: false,
        };
        assert_eq!(
            strings(&runc.global_args()),
            [
                "--root",
                "/run/r",
                "--log",
                "/b/log.json",
                "--log-format",
                "json"
            ]
        );
    }

    #[test]
    fn last_log_error_picks_the_last_error_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log.json");
        fs::write(
            &log,
            "{\"level\":\"warning\",\"msg\":\"w\"}\n{\"level\":\"error\",\"msg\":\"first\"}\nnot json\n{\"level\":\"error\",\"msg\":\"second\"}\n",
        )
        .unwrap();
        assert_eq!(last_log_error(&log).as_deref(), Some("second"));
    }
}
