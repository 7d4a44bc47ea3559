//! Migration helpers for tests that migrate between the two containerds of a [`TwoHosts`]:
//! `pclive migrate` on the source, receiving containers on the destination.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use containerd_shim_pclive::annotations;

use super::*;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `pclive migrate` through the source containerd's API; the JSON report on success, stderr on
/// failure.
pub fn migrate(
    src: &Containerd,
    id: &str,
    destination: &str,
    key: &str,
) -> Result<serde_json::Value, String> {
    migrate_with(src, id, destination, key, &[])
}

/// `pclive migrate` with more options.
pub fn migrate_with(
    src: &Containerd,
    id: &str,
    destination: &str,
    key: &str,
    options: &[&str],
) -> Result<serde_json::Value, String> {
    pclive_migrate(src, id, destination, &["--key-file", key], options)
}

/// `pclive migrate --insecure` (no key: the frames travel in the clear).
pub fn migrate_insecure(
    src: &Containerd,
    id: &str,
    destination: &str,
) -> Result<serde_json::Value, String> {
    pclive_migrate(src, id, destination, &["--insecure"], &[])
}

fn pclive_migrate(
    src: &Containerd,
    id: &str,
    destination: &str,
    auth: &[&str],
    options: &[&str],
) -> Result<serde_json::Value, String> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pclive"))
        .args(["migrate", id, destination, "--json"])
        .args(auth)
        .args(["--address", &src.address, "--namespace", &src.namespace])
        .arg("--state-dir")
        .arg(src.state_base())
        .args(options)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `pclive migrate` of container `id` on a thread of its own: its output and how long it took.
pub fn migrate_in_background(
    src: &Containerd,
    id: &str,
    destination: &str,
    key: &str,
    options: &[&str],
) -> std::thread::JoinHandle<(std::process::Output, Duration)> {
    let options: Vec<String> = options.iter().map(|o| o.to_string()).collect();
    let (address, namespace) = (src.address.clone(), src.namespace.clone());
    let (id, destination, key) = (id.to_string(), destination.to_string(), key.to_string());
    let state = src.state_base();
    std::thread::spawn(move || {
        let started = std::time::Instant::now();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pclive"))
            .args(["migrate", &id, &destination, "--key-file", &key])
            .args(["--address", &address, "--namespace", &namespace])
            .arg("--state-dir")
            .arg(&state)
            .args(&options)
            .output()
            .unwrap();
        (out, started.elapsed())
    })
}

/// Starts a (lazy) receiving container on `dst` with `ctr run` and `extra` ctr options (ctr
/// blocks until it runs: in the background).
pub fn receive_with(
    dst: &Containerd,
    id: &str,
    rootfs: &Path,
    listen: &str,
    key: &str,
    extra: &[&str],
) -> Guarded {
    let auth = format!("{}={key}", annotations::RECEIVE_KEY_FILE);
    receive_annotated(dst, id, rootfs, listen, &auth, extra)
}

/// [`receive_with`] for an unauthenticated source (`pclive migrate --insecure`; the test bed's
/// hosts allow it).
pub fn receive_insecure(dst: &Containerd, id: &str, rootfs: &Path, listen: &str) -> Guarded {
    let auth = format!("{}=true", annotations::RECEIVE_INSECURE);
    receive_annotated(dst, id, rootfs, listen, &auth, &[])
}

fn receive_annotated(
    dst: &Containerd,
    id: &str,
    rootfs: &Path,
    listen: &str,
    auth: &str,
    extra: &[&str],
) -> Guarded {
    let address = listen;
    let listen = format!("{}={listen}", annotations::RECEIVE_LISTEN);
    let rootfs = rootfs.display().to_string();
    let mut args = vec!["run", "-d", "--null-io", "--runtime", RUNTIME];
    args.extend_from_slice(&["--annotation", &listen, "--annotation", auth]);
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--rootfs", &rootfs, id, "/bin/true"]);
    let child = dst
        .ctr_command(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let listening = format!("receiving a migration on {address}");
    wait_for("the receiver to listen", Duration::from_secs(30), || {
        dst.log().contains(&listening)
    });
    Guarded(Some(child))
}

/// A container `app` on `src` that counts in /tmp/count and checks 64 MiB of memory
/// (/status); its rootfs.
pub fn counter(src: &Containerd) -> PathBuf {
    let rootfs = src.rootfs("app");
    src.run_detached(
        "app",
        &rootfs,
        &[],
        &[
            "/bin/sh",
            "-c",
            "/usr/local/bin/memcheck 64 --status /status & \
             i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.05; done",
        ],
    );
    src.wait_status("app", "RUNNING");
    wait_for("memcheck to verify", Duration::from_secs(60), || {
        memcheck_status(&rootfs.join("status")).is_some_and(|s| s.pass >= 1)
    });
    rootfs
}

/// The source's `app` runs, keeps counting, and its memory checks out.
pub fn assert_keeps_running(src: &Containerd, rootfs: &Path) {
    assert_eq!(src.task("app").unwrap().1, "RUNNING");
    let count = rootfs.join("tmp/count");
    let now = read_number(&count).unwrap();
    wait_for(
        "the source to keep counting",
        Duration::from_secs(10),
        || read_number(&count).is_some_and(|n| n > now + 3),
    );
    let status = rootfs.join("status");
    let before = memcheck_status(&status).unwrap();
    wait_for(
        "another verified memcheck pass on the source",
        Duration::from_secs(60),
        || memcheck_status(&status).is_some_and(|s| s.pass > before.pass),
    );
    assert_eq!(memcheck_status(&status).unwrap().errors, 0);
}
