//! The lazy-pages server process: the shim runs it as a child (`containerd-shim-pclive-v2
//! lazy-pages-server ...`), so that a crash of the server cannot take the shim down and the shim
//! can stop the container if the server dies. It either serves a lazy restore from an image set,
//! or receives a migration first ([`crate::destination`]) and then serves or assembles it.

use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use crate::destination;
use crate::events::ServerEvent;
use crate::lazy::{self, ImageSource, ServerConfig};
use crate::staging::StagingStore;
use crate::wire;

/// `lazy-pages-server` command line.
///
/// ```text
/// lazy-pages-server --images DIR --work-dir DIR [--supervisor-fd N] [--fill-rate-mib N]
///                   [--chunk-kib N] [--page-source images|staging]
///                   [--receive ADDR (--key-file FILE | --insecure) [--eager]]
/// ```
///
/// With `--receive` it first receives a migration on ADDR (rounds into the staging store, the
/// image files into `--images`), then serves the restore from the staging store and tells the
/// source to commit. With `--eager` as well it serves no pages: it completes the images from the
/// staging store (event `assembled`), frees the store, and waits for one JSON line on stdin
/// ([`destination::RestoreOutcome`]) saying how the restore went; then it tells the source
/// to commit (event `committed`) or to abort. End of stdin counts as a failed restore.
///
/// `images` (default) installs pages straight from the mapped image files; `staging` first
/// copies them into the staging store (RAM), as a migration's pages arrive.
///
/// Progress goes to stdout as JSON lines ([`ServerEvent`]). Exit code 0 once every page is
/// installed, 1 on failure, 2 on a usage error.
pub fn server_main(args: &[String]) -> i32 {
    let usage = "usage: lazy-pages-server --images DIR --work-dir DIR [--supervisor-fd N] [--fill-rate-mib N] [--chunk-kib N] [--page-source images|staging] [--receive ADDR (--key-file FILE | --insecure) [--eager]]";
    let mut images = None;
    let mut work_dir = None;
    let mut supervisor_fd = None;
    let mut fill_rate_mib = None;
    let mut chunk_kib = None;
    let mut staging = false;
    let mut receive: Option<String> = None;
    let mut key_file: Option<PathBuf> = None;
    let mut insecure = false;
    let mut eager = false;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--insecure" {
            insecure = true;
            continue;
        }
        if flag == "--eager" {
            eager = true;
            continue;
        }
        let Some(value) = it.next() else {
            eprintln!("{usage}");
            return 2;
        };
        match flag.as_str() {
            "--receive" => receive = Some(value.clone()),
            "--key-file" => key_file = Some(PathBuf::from(value)),
            "--images" => images = Some(PathBuf::from(value)),
            "--work-dir" => work_dir = Some(PathBuf::from(value)),
            "--supervisor-fd" => supervisor_fd = value.parse::<RawFd>().ok(),
            "--fill-rate-mib" => fill_rate_mib = value.parse::<u64>().ok(),
            "--chunk-kib" => chunk_kib = value.parse::<usize>().ok(),
            "--page-source" if value == "images" => staging = false,
            "--page-source" if value == "staging" => staging = true,
            _ => {
                eprintln!("{usage}");
                return 2;
            }
        }
    }
    let (Some(images), Some(work_dir)) = (images, work_dir) else {
        eprintln!("{usage}");
        return 2;
    };
    if eager && receive.is_none() {
        eprintln!("--eager restores a received migration: it needs --receive\n{usage}");
        return 2;
    }
    let mut config = ServerConfig::new(images.clone(), work_dir);
    config.fill_rate = fill_rate_mib.map(|m| m << 20);
    if let Some(kib) = chunk_kib {
        config.chunk_bytes = (kib << 10).max(4096);
    }
    // SAFETY: the shim passes this descriptor to us and nothing else in this process owns it.
    let supervisor = supervisor_fd.map(|fd| unsafe { UnixStream::from_raw_fd(fd) });
    let emit = |event: ServerEvent| {
        if let Ok(line) = serde_json::to_string(&event) {
            use std::io::Write;
            let mut out = io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    };
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
        let received = destination::accept_source(&address, &auth, emit)
            .and_then(|mut session| {
                if eager {
                    destination::receive_and_restore_eagerly(
                        &mut session,
                        &images,
                        emit,
                        read_restore_outcome,
                    )
                    .map(|_| emit(ServerEvent::Committed))
                } else {
                    destination::receive_and_serve(&mut session, &config, supervisor.as_ref(), emit)
                        .map(drop)
                }
            })
            .map_err(|e| e.to_string());
        return match received {
            Ok(_) => 0,
            Err(message) => {
                emit(ServerEvent::Error { message });
                1
            }
        };
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

/// Reads how the shim's eager restore went: one JSON line on stdin.
fn read_restore_outcome() -> destination::RestoreOutcome {
    use destination::RestoreOutcome;
    let mut line = String::new();
    match io::stdin().read_line(&mut line) {
        Ok(0) => RestoreOutcome::Failed {
            reason: "the shim went away before the restore ended".into(),
        },
        Ok(_) => serde_json::from_str(&line).unwrap_or_else(|e| RestoreOutcome::Failed {
            reason: format!(
                "the shim's restore outcome {:?} is not understood: {e}",
                line.trim()
            ),
        }),
        Err(e) => RestoreOutcome::Failed {
            reason: format!("reading the restore outcome from the shim: {e}"),
        },
    }
}
