//! The resume gate: the point of no return of a migration, where the destination decides.
//!
//! CRIU restores the tasks, then runs its `post-restore` action scripts *before* the tasks may
//! resume, and aborts the restore (killing every restored task) if a script fails
//! (criu/cr-restore.c). The receiving shim's CRIU config names the shim binary as an action
//! script; run by CRIU it is [`hook_main`]: at `post-restore` it asks the gate in the image
//! directory (`pclive-gate.sock`, found through `CRTOOLS_IMAGE_DIR`) and exits 0 only if the gate
//! recorded `running` first ([`DestinationTxn::decide_resume`]). Any other answer, or no gate at
//! all, fails the restore: the tasks never run unrecorded.

use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::thread;
use std::time::Duration;

use super::txn::DestinationTxn;

/// The gate's socket in the restore's image directory.
pub const GATE_SOCKET: &str = "pclive-gate.sock";
/// The environment variable CRIU sets for action scripts: which action runs.
pub const ACTION_ENV: &str = "CRTOOLS_SCRIPT_ACTION";

/// Serves the gate for the restore of `images` on a thread of its own, until the process ends.
pub fn open(images: &Path, txn: DestinationTxn) -> io::Result<()> {
    let path = images.join(GATE_SOCKET);
    let _ = fs::remove_file(&path);
    // Through /proc/self/fd: image directories can be longer than a socket address allows.
    let dir = fs::File::open(images)?;
    let listener = UnixListener::bind(format!("/proc/self/fd/{}/{GATE_SOCKET}", dir.as_raw_fd()))?;
    thread::Builder::new()
        .name("resume-gate".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let answer = match read_request(&stream) {
                    Ok(request) => match txn.decide_resume() {
                        Ok(()) => {
                            log::info!("resume gate: {request}: the restored tasks may resume (recorded running)");
                            "go".to_string()
                        }
                        Err(refused) => {
                            log::warn!("resume gate: {request}: {refused}");
                            format!("no: {refused}")
                        }
                    },
                    Err(e) => format!("no: unreadable request: {e}"),
                };
                let mut stream = stream;
                let _ = writeln!(stream, "{answer}");
            }
        })?;
    Ok(())
}

fn read_request(stream: &UnixStream) -> io::Result<String> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    Ok(line.trim().to_string())
}

/// Asks the gate of the restore of `images` whether the restored tasks may resume: `go`, or
/// `no: <why>`.
pub fn ask(images: &Path, request: &str) -> io::Result<String> {
    let mut stream = UnixStream::connect(images.join(GATE_SOCKET))?;
    // The gate answers once the decision is on disk; that is quick, but a stalled disk must
    // not hang CRIU forever.
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    writeln!(stream, "{request}")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    Ok(line.trim().to_string())
}

/// CRIU's `post-restore` action script: exit code 0 lets the restore go on. A restore whose
/// image directory has a gate (a received migration: the receiving server opened it before the
/// restore started) must ask it; a restore without one (a local checkpoint) passes.
pub fn hook_main() -> i32 {
    let init = std::env::var("CRTOOLS_INIT_PID").unwrap_or_default();
    let Ok(images) = std::env::var("CRTOOLS_IMAGE_DIR") else {
        eprintln!("pclive resume gate: CRTOOLS_IMAGE_DIR is not set: refusing to resume");
        return 1;
    };
    if std::fs::symlink_metadata(Path::new(&images).join(GATE_SOCKET)).is_err() {
        return 0;
    }
    match ask(Path::new(&images), &format!("post-restore init={init}")) {
        Ok(go) if go == "go" => 0,
        Ok(refused) => {
            eprintln!("pclive resume gate: {refused}");
            1
        }
        Err(e) => {
            eprintln!(
                "pclive resume gate: cannot ask the receiving server ({e}): refusing to resume"
            );
            1
        }
    }
}
