//! The resume gate: the point of no return of a migration, where the destination decides.
//!
//! CRIU restores the tasks, then runs its `post-restore` action scripts *before* the tasks may
//! resume, and aborts the restore (killing every restored task) if a script fails
//! (criu/cr-restore.c). The receiving shim's CRIU config names the shim binary as an action
//! script; run by CRIU it is [`hook_main`]: at `post-restore` it asks the gate in the image
//! directory (`pclive-gate.sock`, found through `CRTOOLS_IMAGE_DIR`) and exits 0 only if the gate
//! recorded `running` first ([`DestinationTxn::decide_resume`]). Any other answer, or no gate at
//! all, fails the restore: the tasks never run unrecorded.
//!
//! For a container whose address moves here (`--move-address`) the gate also tells the same
//! action script, at CRIU's `setup-namespaces`, to bring the held-down interfaces up locked
//! (`lock`), and at `network-unlock`, which CRIU runs after `post-restore` and before the tasks
//! resume, to unlock and announce them (`raise`), but only once `running` is recorded.

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

/// The request CRIU's `network-unlock` action script sends: may the container's interfaces
/// come up now?
pub const NETWORK_UNLOCK: &str = "network-unlock";
/// The request CRIU's `setup-namespaces` action script sends: must the container's interfaces
/// come up locked (CRIU reconnects its TCP sockets through them), for an address that moves
/// here?
pub const NETWORK_LOCK: &str = "network-lock";

/// Serves the gate for the restore of `images` on a thread of its own, until the process ends.
/// `raise_links`: the receiving container takes the source's address
/// ([`crate::grant::Grant::moves_address`]); its interfaces come up at CRIU's `network-unlock`,
/// once the resume is recorded.
pub fn open(images: &Path, txn: DestinationTxn, raise_links: bool) -> io::Result<()> {
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
                    Ok(request) if request.starts_with(NETWORK_UNLOCK) => {
                        network_answer(&txn, raise_links).to_string()
                    }
                    Ok(request) if request.starts_with(NETWORK_LOCK) => {
                        if raise_links { "lock" } else { "keep" }.to_string()
                    }
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

/// `raise` when the container's interfaces come up now: it takes the source's address and its
/// resume is recorded (the source is down for good: its address may be announced here);
/// `keep` otherwise.
fn network_answer(txn: &DestinationTxn, raise_links: bool) -> &'static str {
    if raise_links && txn.phase() == Some(crate::record::Phase::Running) {
        log::info!("resume gate: network-unlock: the container's interfaces come up here");
        "raise"
    } else {
        "keep"
    }
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

/// CRIU's `setup-namespaces` (`NETWORK_LOCK`: the answer is `lock` for an address that moves
/// here) or `network-unlock` (`NETWORK_UNLOCK`: `raise` once the resume is recorded) action
/// script, for a restore with a gate: whether the answer is `yes`. A restore without a gate (a
/// local checkpoint) gets `false`.
pub fn ask_network(request: &str, yes: &str) -> Result<bool, String> {
    let images = std::env::var("CRTOOLS_IMAGE_DIR")
        .map_err(|_| "CRTOOLS_IMAGE_DIR is not set".to_string())?;
    if std::fs::symlink_metadata(Path::new(&images).join(GATE_SOCKET)).is_err() {
        return Ok(false);
    }
    match ask(Path::new(&images), request) {
        Ok(answer) => Ok(answer == yes),
        Err(e) => Err(format!("cannot ask the receiving server: {e}")),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Phase, Store};

    /// For an address that moves here, CRIU's `setup-namespaces` hears `lock`; `network-unlock`
    /// hears `raise` only once the resume is recorded (a restore that never got the go keeps
    /// the address down). A receive whose address does not move hears `keep` throughout.
    #[test]
    fn the_address_comes_up_only_after_the_resume_is_recorded() {
        for moves in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let txn = DestinationTxn::new(Store::new(&dir.path().join("state")));
            txn.begin("00112233445566778899aabbccddeeff", "app", "peer")
                .unwrap();
            txn.enter(Phase::Restoring, None).unwrap();
            let images = dir.path().join("images");
            fs::create_dir(&images).unwrap();
            open(&images, txn.clone(), moves).unwrap();
            let lock = if moves { "lock" } else { "keep" };
            assert_eq!(ask(&images, NETWORK_LOCK).unwrap(), lock);
            assert_eq!(ask(&images, NETWORK_UNLOCK).unwrap(), "keep");
            assert_eq!(ask(&images, "post-restore init=1").unwrap(), "go");
            let raise = if moves { "raise" } else { "keep" };
            assert_eq!(ask(&images, NETWORK_UNLOCK).unwrap(), raise);
        }
    }
}
