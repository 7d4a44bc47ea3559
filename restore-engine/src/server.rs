//! The lazy-pages server process: the shim runs it as a child (`containerd-shim-pclive-v2
//! lazy-pages-server ...`), so that a crash of the server cannot take the shim down and the shim
//! can stop the container if the server dies. It either serves a lazy restore from an image set,
//! or receives a migration first ([`crate::destination`]) and then serves or assembles it.

use std::io::{self, BufRead, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::Duration;

use crate::cancel::Cancel;
use crate::destination::{self, ReceiveOptions, RestoreOutcome};
use crate::events::{ServerEvent, ShimMessage};
use crate::grant::{Grant, GRANT_FILE};
use crate::lazy::{self, ImageSource, ServerConfig};
use crate::record::Store;
use crate::staging::StagingStore;
use crate::wire;

/// `lazy-pages-server` command line.
///
/// ```text
/// lazy-pages-server --images DIR --work-dir DIR [--supervisor-fd N] [--fill-rate-mib N]
///                   [--chunk-kib N] [--page-source images|staging]
///                   [--receive ADDR (--key-file FILE | --insecure) --state-dir DIR [--eager]
///                    --max-memory-mib N --max-image-files N [--rootfs DIR [--shared-rootfs]]
///                    [--accept-timeout-seconds N] [--linger-seconds N]]
/// ```
///
/// With `--receive` it first receives a migration on ADDR (rounds into the staging store, the
/// image files into `--images`), recording its phases under `--state-dir`, then serves the
/// restore from the staging store. What the source may make this host store is limited
/// ([`destination::Limits`]): the staging store to `--max-memory-mib` (the receiving
/// container's memory limit plus a margin), the image files to `--max-image-files` files and
/// `--max-memory-mib` MiB together; over a limit the migration aborts (the source resumes).
/// The images are refused unless they stay within what the receiving container's spec grants:
/// `grant.json` in `--work-dir` ([`crate::grant`]), which the shim writes. The restore's CRIU
/// must ask the resume gate
/// ([`destination::gate`]) before the tasks resume. When every page is installed it emits
/// `fill-complete` and waits for the shim's verdict on stdin ([`ShimMessage`]: `alive` or
/// `died`); then it tells the source the outcome (`concluded`). With `--eager` as well it serves
/// no pages: it completes the images from the staging store (event `assembled`), frees the
/// store, and waits for `restored` or `restore-failed` on stdin. End of stdin means the shim
/// went away: before the point of no return the source is told to resume. After the outcome it
/// keeps answering the source's questions until the source acknowledged it or
/// `--linger-seconds` (default 300) passed.
///
/// `images` (default) installs pages straight from the mapped image files; `staging` first
/// copies them into the staging store (RAM), as a migration's pages arrive.
///
/// Progress goes to stdout as JSON lines ([`ServerEvent`]). Exit code 0 once every page is
/// installed, 1 on failure, 2 on a usage error.
/// Log lines go to stderr (the shim sends it to `lazy-pages-server.log` in the work directory).
#[derive(Debug, clap::Parser)]
#[command(name = "lazy-pages-server", disable_version_flag = true)]
struct Args {
    /// The CRIU image directory (a migration's image files are received into it).
    #[arg(long, value_name = "DIR")]
    images: PathBuf,
    /// The restore's CRIU work directory (the lazy-pages socket).
    #[arg(long, value_name = "DIR")]
    work_dir: PathBuf,
    /// A socket the shim passed: every userfaultfd received is copied to it.
    #[arg(long, value_name = "N")]
    supervisor_fd: Option<RawFd>,
    /// Background fill limit in MiB/s.
    #[arg(long, value_name = "N")]
    fill_rate_mib: Option<u64>,
    #[arg(long, value_name = "N")]
    chunk_kib: Option<usize>,
    /// Threads that copy background chunks while the main thread serves faults (more copy
    /// faster where memory bandwidth allows, but take CPU from the restored service).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    copier_threads: u16,
    #[arg(long, value_enum, default_value_t = PageSource::Images)]
    page_source: PageSource,
    /// Receive a migration on this address first.
    #[arg(long, value_name = "ADDR")]
    receive: Option<String>,
    /// The pre-shared key that authenticates the source.
    #[arg(
        long,
        value_name = "FILE",
        requires = "receive",
        conflicts_with = "insecure"
    )]
    key_file: Option<PathBuf>,
    /// Accept an unauthenticated source (both ends must ask for it).
    #[arg(long, requires = "receive")]
    insecure: bool,
    /// Where the migration is recorded.
    #[arg(long, value_name = "DIR", requires = "receive")]
    state_dir: Option<PathBuf>,
    /// Complete the images from the staging store for a plain restore; serve no pages.
    #[arg(long, requires = "receive")]
    eager: bool,
    #[arg(long, value_name = "N", requires = "receive")]
    accept_timeout_seconds: Option<u64>,
    #[arg(long, value_name = "N", requires = "receive")]
    linger_seconds: Option<u64>,
    /// The most memory the source may make this host stage, and the most bytes of image files
    /// (the receiving container's memory limit plus a margin).
    #[arg(long, value_name = "N", requires = "receive")]
    max_memory_mib: Option<u64>,
    /// The most image files the source may send.
    #[arg(long, value_name = "N", requires = "receive")]
    max_image_files: Option<usize>,
    /// The receiving container's root filesystem (mounted): the source's filesystem changes
    /// are applied to it before the restore ([`crate::layer`]). Without it a source that sends
    /// them is refused.
    #[arg(long, value_name = "DIR", requires = "receive")]
    rootfs: Option<std::path::PathBuf>,
    /// Both hosts share the root filesystem's storage: nothing is copied, and its digest must
    /// be the source's.
    #[arg(long, requires = "rootfs")]
    shared_rootfs: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PageSource {
    Images,
    Staging,
}

struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::Level::Info
    }
    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            eprintln!(
                "{:.3} {} {}",
                crate::clock::unix_now(),
                record.level(),
                record.args()
            );
        }
    }
    fn flush(&self) {}
}

pub fn server_main(args: &[String]) -> i32 {
    if log::set_logger(&StderrLog).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
    let args = match <Args as clap::Parser>::try_parse_from(
        std::iter::once("lazy-pages-server").chain(args.iter().map(String::as_str)),
    ) {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    let Args {
        images,
        work_dir,
        supervisor_fd,
        fill_rate_mib,
        chunk_kib,
        copier_threads,
        page_source,
        receive,
        key_file,
        insecure,
        state_dir,
        eager,
        accept_timeout_seconds: accept_timeout,
        linger_seconds: linger,
        max_memory_mib,
        max_image_files,
        rootfs,
        shared_rootfs,
    } = args;
    let staging = page_source == PageSource::Staging;
    if eager && receive.is_none() {
        eprintln!("--eager restores a received migration: it needs --receive");
        return 2;
    }
    let mut config = ServerConfig::new(images.clone(), work_dir);
    config.fill_rate = fill_rate_mib.map(|m| m << 20);
    if let Some(kib) = chunk_kib {
        config.chunk_bytes = (kib << 10).max(4096);
    }
    config.copier_threads = copier_threads.into();
    // SAFETY: the shim passes this descriptor to us and nothing else in this process owns it.
    let supervisor = supervisor_fd.map(|fd| unsafe { UnixStream::from_raw_fd(fd) });
    if let Some(address) = receive {
        let auth = match (key_file, insecure) {
            (Some(path), false) => match wire::read_key_file(&path) {
                Ok(key) => wire::Auth::Key(key),
                Err(message) => {
                    emit(ServerEvent::Error { message });
                    return 1;
                }
            },
            (None, true) => wire::Auth::Insecure,
            _ => {
                eprintln!("--receive needs exactly one of --key-file FILE and --insecure");
                return 2;
            }
        };
        let Some(state_dir) = state_dir else {
            eprintln!("--receive needs --state-dir DIR (where the migration is recorded)");
            return 2;
        };
        let (Some(memory_mib), Some(image_files)) = (max_memory_mib, max_image_files) else {
            eprintln!(
                "--receive needs --max-memory-mib N and --max-image-files N: what the source \
                 may make this host store (the receiving container's memory limit plus a \
                 margin, and a few thousand files)"
            );
            return 2;
        };
        let limits = destination::Limits {
            memory_bytes: memory_mib << 20,
            image_files,
            image_bytes: memory_mib << 20,
        };
        // What the receiving container's spec grants: the images must not exceed it.
        let grant = match Grant::read(&config.work_dir.join(GRANT_FILE)) {
            Ok(grant) => grant,
            Err(message) => {
                emit(ServerEvent::Error { message });
                return 1;
            }
        };
        let layer = match rootfs
            .as_deref()
            .map(crate::layer::Applier::open)
            .transpose()
        {
            Ok(applier) => applier.map(|a| destination::DestinationLayer::new(a, shared_rootfs)),
            Err(e) => {
                emit(ServerEvent::Error {
                    message: e.to_string(),
                });
                return 1;
            }
        };
        crate::fault::load();
        let mut options = ReceiveOptions::new(&address, auth, Store::new(&state_dir));
        options.terms.closes_connections = grant.closes_connections;
        if let Some(seconds) = accept_timeout {
            options.accept_timeout = Duration::from_secs(seconds);
        }
        if let Some(seconds) = linger {
            options.linger = Duration::from_secs(seconds);
        }
        let cancel = Cancel::default();
        let messages = shim_messages(cancel.clone());
        config.cancel = cancel.clone();
        return receive_migration(
            options,
            &limits,
            cancel,
            messages,
            &config,
            &grant,
            layer,
            supervisor.as_ref(),
            eager,
        );
    }
    let result = if staging {
        let mut store = StagingStore::default();
        lazy::stage_images(&images, &mut store)
            .and_then(|_| lazy::serve(&config, &mut store, supervisor.as_ref(), emit))
    } else {
        ImageSource::open(&images)
            .and_then(|mut source| lazy::serve(&config, &mut source, supervisor.as_ref(), emit))
    };
    match result {
        Ok(_) => 0,
        Err(e) => {
            emit(ServerEvent::Error {
                message: e.to_string(),
            });
            1
        }
    }
}

/// What the shim says on stdin, line by line, on a channel. A failed restore or the end of stdin
/// (the shim went away) also cancels the waits of the receive.
fn shim_messages(cancel: Cancel) -> Receiver<ShimMessage> {
    let (tx, rx) = mpsc::channel();
    let _ = thread::Builder::new()
        .name("shim-messages".into())
        .spawn(move || {
            for line in io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<ShimMessage>(&line) {
                    Ok(message) => {
                        if let ShimMessage::RestoreFailed { reason } = &message {
                            cancel.cancel(&format!("the restore failed: {reason}"));
                        }
                        if tx.send(message).is_err() {
                            return;
                        }
                    }
                    Err(e) => log::warn!("the shim said something unexpected ({e}): {line}"),
                }
            }
            cancel.cancel("the shim went away (its container is stopped by containerd)");
            let _ = tx.send(ShimMessage::Died {
                reason: "the shim went away (containerd stops its container)".into(),
            });
        });
    rx
}

/// How long the shim may take to say whether the container is alive after the fill.
const VERDICT_TIMEOUT: Duration = Duration::from_secs(60);

/// The receiving server: waits for the source, receives, has the shim restore, serves or
/// assembles the memory, concludes, and answers the source's questions for a while.
#[allow(clippy::too_many_arguments)]
fn receive_migration(
    options: ReceiveOptions,
    limits: &destination::Limits,
    cancel: Cancel,
    messages: Receiver<ShimMessage>,
    config: &ServerConfig,
    grant: &Grant,
    mut layer: Option<destination::DestinationLayer>,
    supervisor: Option<&UnixStream>,
    eager: bool,
) -> i32 {
    let mut receiver = match destination::Receiver::bind(options, cancel.clone(), emit) {
        Ok(r) => r,
        Err(e) => {
            emit(ServerEvent::Error {
                message: e.to_string(),
            });
            return 1;
        }
    };
    let mut session = match receiver.accept_source(emit) {
        Ok(s) => s,
        Err(e) => {
            emit(ServerEvent::Error {
                message: e.to_string(),
            });
            return 1;
        }
    };
    let txn = receiver.txn().clone();
    let streams = match destination::ReceiveStreams::start(receiver.take_streams(), limits, &cancel)
    {
        Ok(streams) => streams,
        Err(e) => {
            emit(ServerEvent::Error {
                message: format!("starting the page streams' threads: {e}"),
            });
            return 1;
        }
    };
    let result = if eager {
        destination::receive_and_restore_eagerly(
            &mut session,
            Some(&streams),
            limits,
            &config.images,
            grant,
            layer.as_mut(),
            &txn,
            &cancel,
            emit,
            || match messages.recv() {
                Ok(ShimMessage::Restored) => RestoreOutcome::Restored,
                Ok(ShimMessage::RestoreFailed { reason }) | Ok(ShimMessage::Died { reason }) => {
                    RestoreOutcome::Failed { reason }
                }
                Ok(other) => RestoreOutcome::Failed {
                    reason: format!("the shim said {other:?} where a restore outcome was expected"),
                },
                Err(_) => RestoreOutcome::Failed {
                    reason: "the shim went away before the restore ended".into(),
                },
            },
        )
        .map(drop)
    } else {
        destination::receive_and_serve(
            &mut session,
            Some(&streams),
            limits,
            config,
            grant,
            layer.as_mut(),
            supervisor,
            &txn,
            &cancel,
            emit,
            |stats| {
                emit(ServerEvent::FillComplete(stats.clone()));
                match messages.recv_timeout(VERDICT_TIMEOUT) {
                    Ok(ShimMessage::Alive) => Ok(()),
                    Ok(ShimMessage::Died { reason }) | Ok(ShimMessage::RestoreFailed { reason }) => {
                        Err(reason)
                    }
                    Ok(other) => Err(format!("the shim said {other:?} where a verdict was expected")),
                    Err(_) => Err(format!(
                        "the shim did not say within {VERDICT_TIMEOUT:?} whether the container lives"
                    )),
                }
            },
        )
        .map(drop)
    };
    drop(session);
    let phase = txn
        .phase()
        .map(|p| p.name().to_string())
        .unwrap_or_default();
    let code = match &result {
        Ok(()) => {
            emit(ServerEvent::Concluded {
                phase,
                reason: None,
            });
            if eager {
                emit(ServerEvent::Committed);
            }
            0
        }
        Err(e) => {
            emit(ServerEvent::Concluded {
                phase,
                reason: Some(e.to_string()),
            });
            emit(ServerEvent::Error {
                message: e.to_string(),
            });
            1
        }
    };
    receiver.linger();
    code
}

/// Prints an event on stdout for the shim (one JSON line).
fn emit(event: ServerEvent) {
    if let Ok(line) = serde_json::to_string(&event) {
        let mut out = io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}
