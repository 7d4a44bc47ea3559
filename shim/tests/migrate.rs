//! Live migration between two containerd daemons: iterative pre-copy while the container runs,
//! pause, last round, a final dump without the lazy memory, restore on the destination with the
//! memory installed from its staging store, commit, and the source goes.

mod common;

use std::fs;
use std::net::TcpListener;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `pclive migrate` through the source containerd's API; the JSON report on success.
fn migrate(
    src: &Containerd,
    id: &str,
    destination: &str,
    key: &str,
) -> Result<serde_json::Value, String> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pclive"))
        .args(["migrate", id, destination, "--key-file", key, "--json"])
        .args(["--address", &src.address, "--namespace", &src.namespace])
        .output()
        .unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn key_file(dir: &Path) -> String {
    let path = dir.join("migration.key");
    fs::write(&path, b"0123456789abcdef0123456789abcdef").unwrap();
    path.display().to_string()
}

/// Starts the receiving container on `dst` (ctr blocks until it runs: in the background).
fn receive(dst: &Containerd, id: &str, rootfs: &Path, listen: &str, key: Option<&str>) -> Guarded {
    let listen = format!("io.containerd.pclive.receive.listen={listen}");
    let auth = match key {
        Some(k) => format!("io.containerd.pclive.receive.key-file={k}"),
        None => "io.containerd.pclive.receive.insecure=true".into(),
    };
    let rootfs = rootfs.display().to_string();
    let child = dst
        .ctr_command(&[
            "run",
            "-d",
            "--null-io",
            "--runtime",
            RUNTIME,
            "--annotation",
            &listen,
            "--annotation",
            &auth,
            "--rootfs",
            &rootfs,
            id,
            "/bin/true",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the receiver to listen", Duration::from_secs(30), || {
        dst.log().contains("receiving a migration on")
    });
    Guarded(Some(child))
}

#[test]
fn a_container_with_checksummed_memory_migrates_live_and_keeps_running() {
    let hosts = TwoHosts::up("10gbit");
    let (src, dst) = (&hosts.src, &hosts.dst);
    let rootfs = src.rootfs("app");
    let status = rootfs.join("status");
    src.run_detached(
        "app",
        &rootfs,
        &[],
        &["/usr/local/bin/memcheck", "256", "--status", "/status"],
    );
    wait_for("memcheck to verify", Duration::from_secs(60), || {
        memcheck_status(&status).is_some_and(|s| s.pass >= 1)
    });
    let key = key_file(&src.dir);
    let listen = format!("{}:{}", hosts.dst_ip, free_port());
    let receiver = receive(dst, "app", &rootfs, &listen, Some(&key));

    let started = Instant::now();
    let before = memcheck_status(&status).unwrap();
    let report = migrate(src, "app", &listen, &key).unwrap_or_else(|e| {
        panic!(
            "migration failed: {e}\n--- source log ---\n{}\n--- destination log ---\n{}",
            tail(&src.log(), 30),
            tail(&dst.log(), 30)
        )
    });
    eprintln!("migration took {:?}", started.elapsed());
    assert_eq!(receiver.wait_code(Duration::from_secs(60)), 0);
    dst.wait_status("app", "RUNNING");
    src.wait_status("app", "STOPPED");
    wait_for(
        "two verified passes on the destination",
        Duration::from_secs(60),
        || memcheck_status(&status).is_some_and(|s| s.pass >= before.pass + 2),
    );
    eprintln!("{report:#}");
    assert!(report["downtime_seconds"].as_f64().unwrap() > 0.0);
    // The destination task is an ordinary task.
    dst.ctr_ok(&["task", "pause", "app"]);
    dst.ctr_ok(&["task", "resume", "app"]);
    let out = dst.ctr_ok(&["task", "exec", "--exec-id", "x", "app", "/bin/echo", "here"]);
    assert_eq!(out.trim(), "here");
}

#[test]
fn a_wrong_key_is_refused_and_the_source_keeps_running() {
    let hosts = TwoHosts::up("10gbit");
    let (src, dst) = (&hosts.src, &hosts.dst);
    let rootfs = src.rootfs("app");
    let count = rootfs.join("tmp/count");
    src.run_detached(
        "app",
        &rootfs,
        &[],
        &[
            "/bin/sh",
            "-c",
            "i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.05; done",
        ],
    );
    src.wait_status("app", "RUNNING");
    let right = key_file(&dst.dir);
    let wrong = src.dir.join("wrong.key");
    fs::write(&wrong, b"fedcba9876543210fedcba9876543210").unwrap();
    let listen = format!("{}:{}", hosts.dst_ip, free_port());
    let receiver = receive(dst, "app", &rootfs, &listen, Some(&right));
    let err = migrate(src, "app", &listen, &wrong.display().to_string()).unwrap_err();
    assert!(err.contains("authentication failed"), "{err}");
    assert_eq!(src.task("app").unwrap().1, "RUNNING");
    let now = read_number(&count).unwrap();
    wait_for(
        "the source to keep counting",
        Duration::from_secs(10),
        || read_number(&count).is_some_and(|n| n > now + 3),
    );
    assert_ne!(receiver.wait_code(Duration::from_secs(30)), 0);
}

/// A counting container on `src` whose count file is in its rootfs.
fn counter(src: &Containerd) -> std::path::PathBuf {
    let rootfs = src.rootfs("app");
    src.run_detached(
        "app",
        &rootfs,
        &[],
        &[
            "/bin/sh",
            "-c",
            "/usr/local/bin/memcheck 256 --status /status & \
             i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.05; done",
        ],
    );
    src.wait_status("app", "RUNNING");
    wait_for(
        "memcheck to fill its memory",
        Duration::from_secs(60),
        || memcheck_status(&rootfs.join("status")).is_some(),
    );
    rootfs
}

fn assert_keeps_counting(src: &Containerd, rootfs: &Path) {
    assert_eq!(src.task("app").unwrap().1, "RUNNING");
    let count = rootfs.join("tmp/count");
    let now = read_number(&count).unwrap();
    wait_for(
        "the source to keep counting",
        Duration::from_secs(10),
        || read_number(&count).is_some_and(|n| n > now + 3),
    );
    let status = memcheck_status(&rootfs.join("status")).unwrap();
    assert_eq!(status.errors, 0);
}

#[test]
fn a_destination_killed_during_precopy_leaves_the_source_running() {
    let hosts = TwoHosts::up("10gbit");
    let (src, dst) = (&hosts.src, &hosts.dst);
    let rootfs = counter(src);
    let key = key_file(&src.dir);
    let destination = format!("{}:{}", hosts.dst_ip, free_port());
    let receiver = receive(dst, "app", &rootfs, &destination, Some(&key));
    let migration = std::thread::spawn({
        let (address, namespace, key) = (src.address.clone(), src.namespace.clone(), key.clone());
        let destination = destination.clone();
        move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_pclive"))
                .args(["migrate", "app", &destination, "--key-file", &key])
                .args(["--address", &address, "--namespace", &namespace])
                .output()
                .unwrap()
        }
    });
    // Kill the receiving side while the first (256 MiB) round is on its way.
    wait_for("pre-copy to start", Duration::from_secs(30), || {
        src.log().contains("process(es) to")
    });
    std::thread::sleep(Duration::from_millis(200));
    let servers = processes_with_args(&["--receive", &destination]);
    assert_eq!(servers.len(), 1, "one receiving server");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(servers[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let out = migration.join().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pclive migrate:"), "{err}");
    assert_keeps_counting(src, &rootfs);
    assert_ne!(receiver.wait_code(Duration::from_secs(30)), 0);
}

#[test]
fn a_failed_restore_on_the_destination_resumes_the_source() {
    let hosts = TwoHosts::up("10gbit");
    let (src, dst) = (&hosts.src, &hosts.dst);
    let rootfs = counter(src);
    let key = key_file(&src.dir);
    let listen = format!("{}:{}", hosts.dst_ip, free_port());
    // The destination restores into a root filesystem that lacks the container's files: CRIU
    // cannot reopen them and the restore fails after the source was frozen and dumped.
    let wrong_rootfs = dst.rootfs("empty-root");
    fs::remove_dir_all(wrong_rootfs.join("usr/local/bin")).unwrap();
    let receiver = receive(dst, "app", &wrong_rootfs, &listen, Some(&key));
    let err = migrate(src, "app", &listen, &key).unwrap_err();
    assert!(
        err.contains("keeps running here"),
        "the error does not say the source resumed: {err}"
    );
    assert_keeps_counting(src, &rootfs);
    assert_ne!(receiver.wait_code(Duration::from_secs(30)), 0);
}
