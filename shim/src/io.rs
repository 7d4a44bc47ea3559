//! Process stdio: pipes between the container and containerd's FIFOs (or log files), and the pty
//! master for terminal processes.
//!
//! Containers always get pipes (or a pty), never containerd's FIFOs directly: CRIU can dump and
//! restore a pipe whose other end lives in the shim (runc maps it with `--inherit-fd`), but not a
//! FIFO or a file of the host.

use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::warn;
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use nix::unistd::pipe;

use crate::logger::LoggerProcess;
use crate::runc::RuncStdio;

/// Errors while wiring a process's stdio.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("cannot create a pipe for the container's {stream}: {source}")]
    Pipe {
        stream: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("cannot open {what} '{path}': {source}")]
    Open {
        what: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("stdio URI '{0}' is not supported: use a FIFO path, file:///absolute/path or binary:///absolute/logger")]
    UnsupportedUri(String),
    #[error(transparent)]
    Logger(#[from] crate::logger::LoggerError),
    #[error("console socket {path}: {source}")]
    Console {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("runc did not send the pty master over the console socket: {0}")]
    NoConsole(String),
}

/// Where containerd wants a process's stdio.
#[derive(Debug, Clone, Default)]
pub struct StdioConfig {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
    /// For a `binary://` logger's environment: the container and its containerd namespace.
    pub container_id: String,
    pub namespace: String,
}

impl StdioConfig {
    /// The `binary://` logger the output URIs name, started; None for FIFOs and files.
    fn start_logger(&self) -> Result<Option<crate::logger::Logger>, IoError> {
        match [&self.stdout, &self.stderr]
            .into_iter()
            .find_map(|uri| crate::logger::parse(uri))
        {
            None => Ok(None),
            Some(command) => Ok(Some(crate::logger::start(
                &command?,
                &self.container_id,
                &self.namespace,
            )?)),
        }
    }
}

/// An output destination: a FIFO containerd reads, or a file (`file://` log URI).
fn open_output(target: &str) -> Result<File, IoError> {
    if let Some(path) = target.strip_prefix("file://") {
        if let Some(parent) = Path::new(path).parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        return OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| IoError::Open {
                what: "log file",
                path: path.into(),
                source,
            });
    }
    if target.contains("://") {
        return Err(IoError::UnsupportedUri(target.into()));
    }
    // Read-write so the open never blocks on a FIFO whose reader has not opened yet (or has gone
    // away, as `ctr run -d` does): output then waits in the FIFO instead of failing with EPIPE.
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(target)
        .map_err(|source| IoError::Open {
            what: "stdout/stderr FIFO",
            path: target.into(),
            source,
        })
}

/// The shim's end of a process's stdio, kept for CloseIO, ResizePty and the final flush.
#[derive(Default)]
pub struct ProcessIo {
    /// Write end of the container's stdin pipe (or the pty master for terminals); CloseIO drops it.
    stdin: Arc<Mutex<Option<File>>>,
    console: Option<File>,
    output_copiers: Vec<JoinHandle<()>>,
    logger: Option<LoggerProcess>,
    console_socket_dir: Option<tempfile_dir::TempDir>,
}

mod tempfile_dir {
    //! A private temporary directory for the console socket (paths under the bundle can exceed
    //! the 108-byte limit of a unix socket address).
    use std::path::{Path, PathBuf};

    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new() -> std::io::Result<Self> {
            let base = Path::new("/run/pclive/console");
            std::fs::create_dir_all(base)?;
            for attempt in 0..100u32 {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos())
                    .unwrap_or(0);
                let dir = base.join(format!("{}-{nanos}-{attempt}", std::process::id()));
                match std::fs::create_dir(&dir) {
                    Ok(()) => return Ok(TempDir(dir)),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(e),
                }
            }
            Err(std::io::Error::other("no free console socket directory"))
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// What to pass to runc, and what to do once runc has returned.
pub struct PreparedIo {
    runc_stdio: RuncStdio,
    pub console_socket: Option<PathBuf>,
    pending: PendingIo,
}

/// The shim's side of prepared stdio, started once runc has run.
pub struct PendingIo(ProcessIoPending);

enum ProcessIoPending {
    Pipes {
        stdin_writer: Option<File>,
        stdin_fifo: String,
        outputs: Vec<(File, File)>,
        logger: Option<LoggerProcess>,
    },
    Console {
        listener: UnixListener,
        dir: tempfile_dir::TempDir,
        config: StdioConfig,
    },
}

fn make_pipe(stream: &'static str) -> Result<(File, File), IoError> {
    let (r, w) = pipe().map_err(|source| IoError::Pipe { stream, source })?;
    Ok((File::from(r), File::from(w)))
}

/// Prepares stdio before runc runs: pipes for plain processes, a console socket for terminals.
pub fn prepare(config: &StdioConfig) -> Result<PreparedIo, IoError> {
    if config.terminal {
        let dir = tempfile_dir::TempDir::new().map_err(|source| IoError::Console {
            path: "/run/pclive/console".into(),
            source,
        })?;
        let path = dir.path().join("pty.sock");
        let listener = UnixListener::bind(&path).map_err(|source| IoError::Console {
            path: path.clone(),
            source,
        })?;
        return Ok(PreparedIo {
            runc_stdio: RuncStdio::Container {
                stdin: None,
                stdout: None,
                stderr: None,
            },
            console_socket: Some(path),
            pending: PendingIo(ProcessIoPending::Console {
                listener,
                dir,
                config: config.clone(),
            }),
        });
    }

    let mut container_stdin = None;
    let mut stdin_writer = None;
    if !config.stdin.is_empty() {
        let (r, w) = make_pipe("stdin")?;
        container_stdin = Some(OwnedFd::from(r));
        stdin_writer = Some(w);
    }
    let mut outputs = Vec::new();
    let mut container_out = [None, None];
    let logger = config.start_logger()?;
    let (mut to_logger, logger) = match logger {
        Some(l) => ([Some(l.stdout), Some(l.stderr)], Some(l.process)),
        None => ([None, None], None),
    };
    for (slot, (stream, target)) in [("stdout", &config.stdout), ("stderr", &config.stderr)]
        .into_iter()
        .enumerate()
    {
        if target.is_empty() {
            continue;
        }
        let destination = match to_logger[slot].take() {
            Some(pipe) if target.starts_with("binary://") => pipe,
            _ => open_output(target)?,
        };
        let (r, w) = make_pipe(stream)?;
        container_out[slot] = Some(OwnedFd::from(w));
        outputs.push((r, destination));
    }
    let [stdout, stderr] = container_out;
    Ok(PreparedIo {
        runc_stdio: RuncStdio::Container {
            stdin: container_stdin,
            stdout,
            stderr,
        },
        console_socket: None,
        pending: PendingIo(ProcessIoPending::Pipes {
            stdin_writer,
            stdin_fifo: config.stdin.clone(),
            outputs,
            logger,
        }),
    })
}

impl PreparedIo {
    /// Separates the descriptors runc hands to the container from the shim's side.
    pub fn split(self) -> (RuncStdio, PendingIo) {
        (self.runc_stdio, self.pending)
    }
}

impl PendingIo {
    /// Starts the copy threads. For terminals this receives the pty master, which runc sends
    /// while it runs; call it after runc returned successfully.
    pub fn start(self) -> Result<ProcessIo, IoError> {
        match self.0 {
            ProcessIoPending::Pipes {
                stdin_writer,
                stdin_fifo,
                outputs,
                logger,
            } => {
                let mut io = ProcessIo {
                    stdin: Arc::new(Mutex::new(stdin_writer)),
                    logger,
                    ..Default::default()
                };
                if !stdin_fifo.is_empty() {
                    spawn_stdin_copier(stdin_fifo, Arc::clone(&io.stdin));
                }
                for (from, to) in outputs {
                    io.output_copiers.push(spawn_output_copier(from, to));
                }
                Ok(io)
            }
            ProcessIoPending::Console {
                listener,
                dir,
                config,
            } => {
                let master = receive_console(&listener)?;
                let mut io = ProcessIo {
                    console_socket_dir: Some(dir),
                    ..Default::default()
                };
                let reader = master.try_clone().map_err(|source| IoError::Console {
                    path: "pty master".into(),
                    source,
                })?;
                if !config.stdout.is_empty() {
                    let destination = match config.start_logger()? {
                        Some(logger) => {
                            io.logger = Some(logger.process);
                            logger.stdout
                        }
                        None => open_output(&config.stdout)?,
                    };
                    io.output_copiers
                        .push(spawn_output_copier(reader, destination));
                }
                if !config.stdin.is_empty() {
                    let writer = master.try_clone().map_err(|source| IoError::Console {
                        path: "pty master".into(),
                        source,
                    })?;
                    *io.stdin.lock().unwrap_or_else(|p| p.into_inner()) = Some(writer);
                    spawn_stdin_copier(config.stdin.clone(), Arc::clone(&io.stdin));
                }
                io.console = Some(master);
                Ok(io)
            }
        }
    }
}

fn receive_console(listener: &UnixListener) -> Result<File, IoError> {
    // runc connected while it ran; if it did not (it failed earlier), do not block forever.
    listener
        .set_nonblocking(true)
        .map_err(|e| IoError::NoConsole(e.to_string()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(IoError::NoConsole(e.to_string())),
        }
    };
    stream
        .set_nonblocking(false)
        .map_err(|e| IoError::NoConsole(e.to_string()))?;
    let mut name = [0u8; 4096];
    let mut iov = [io::IoSliceMut::new(&mut name)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| IoError::NoConsole(e.to_string()))?;
    for cmsg in msg.cmsgs().map_err(|e| IoError::NoConsole(e.to_string()))? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            if let Some(&fd) = fds.first() {
                for &extra in &fds[1..] {
                    // SAFETY: the kernel just installed these descriptors for us; nothing else owns them.
                    drop(unsafe { OwnedFd::from_raw_fd(extra) });
                }
                // SAFETY: as above; we take sole ownership of the received pty master.
                return Ok(unsafe { File::from_raw_fd(fd) });
            }
        }
    }
    Err(IoError::NoConsole("message carried no descriptor".into()))
}

fn spawn_stdin_copier(fifo: String, writer: Arc<Mutex<Option<File>>>) {
    thread::spawn(move || {
        // Blocks until the client opens its end; EOF from the client closes the container's stdin.
        let mut source = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&fifo)
        {
            Ok(f) => f,
            Err(e) => {
                warn!("cannot open stdin FIFO {fifo}: {e}");
                return;
            }
        };
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = match source.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            let mut guard = writer.lock().unwrap_or_else(|p| p.into_inner());
            let Some(w) = guard.as_mut() else { return };
            if w.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        // Only a pipe is closed on EOF; a pty master stays open for output.
        let mut guard = writer.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = guard.as_ref() {
            if is_pipe(w) {
                guard.take();
            }
        }
    });
}

fn is_pipe(file: &File) -> bool {
    use std::os::unix::fs::FileTypeExt;
    file.metadata()
        .map(|m| m.file_type().is_fifo())
        .unwrap_or(false)
}

fn spawn_output_copier(mut from: File, mut to: File) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match from.read(&mut buf) {
                // EIO: the pty slave closed (the terminal process exited).
                Ok(0) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
    })
}

impl ProcessIo {
    /// CloseIO: the client has no more input.
    pub fn close_stdin(&self) {
        let mut guard = self.stdin.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref() {
            // For a terminal, send EOF (^D) rather than closing the master, which would hang up.
            Some(w) if !is_pipe(w) => {
                let mut w = w;
                let _ = w.write_all(&[4]);
            }
            _ => {
                guard.take();
            }
        }
    }

    pub fn resize(&self, width: u16, height: u16) -> io::Result<()> {
        let Some(console) = &self.console else {
            return Err(io::Error::new(
                ErrorKind::InvalidInput,
                "process has no terminal",
            ));
        };
        let size = libc::winsize {
            ws_row: height,
            ws_col: width,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize struct that lives for the duration of the call; the
        // descriptor is our open pty master.
        let rc = unsafe { libc::ioctl(console.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits (bounded) until the output copiers have drained the container's pipes, so that a
    /// client sees all output before the exit event. A daemonised grandchild may hold the pipe
    /// open forever, hence the bound.
    pub fn wait_output(&mut self, bound: Duration) {
        let deadline = Instant::now() + bound;
        for handle in std::mem::take(&mut self.output_copiers) {
            while !handle.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
            if handle.is_finished() {
                let _ = handle.join();
            }
        }
        self.console_socket_dir.take();
        // The logger has had EOF on every output it gets (unless a grandchild holds one open).
        if let Some(logger) = self.logger.take() {
            logger.stop();
        }
    }
}
