//! The container's filesystem moves with it (issue: "The container's filesystem moves with
//! it"). A container that writes files, appends to an open log, deletes and renames files that
//! came with its image, creates a FIFO, a unix socket, a hard link, a symlink and a file with
//! an extended attribute, and rewrites a 200 MiB file during pre-copy, migrates between two
//! hosts that share nothing (own containerd, image store and root filesystem); on the
//! destination every path equals the source's at the freeze, deleted paths stay deleted, and
//! the log keeps growing with no line lost. Once from an image (overlayfs: the writable layer
//! travels), once from a `--rootfs` directory (the whole directory is brought to the source's).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::migration::*;
use common::*;

const IMAGE: &str = "docker.io/library/pclive-fs:1";

/// The container's program: the files of phase A, then a log appended to through one open
/// descriptor and a 200 MiB file rewritten 1 MiB at a time until `/phase-b` appears; then it
/// deletes, renames and links (phase B) and stops rewriting, and the log goes on.
const SCRIPT: &str = "cd / && echo in-tmpfs > /scratch/kept && \
    echo written > /data.txt && ln /data.txt /data-hard && mkfifo /fifo && \
    mkdir -p /st && /usr/local/bin/statecheck unix --status /st & \
    dd if=/dev/urandom of=/big bs=1M count=200 2>/dev/null; \
    rm /etc/doomed; mv /etc/movable /etc/moved; \
    exec 3>>/var/app.log; i=0; touch /ready; \
    while :; do \
      i=$((i+1)); echo \"line $i\" >&3; \
      if [ ! -e /phase-b ]; then \
        dd if=/dev/urandom of=/big bs=1M count=1 seek=$((i % 200)) conv=notrunc 2>/dev/null; \
      elif [ ! -e /phase-b-done ]; then \
        mv /data.txt /data-renamed.txt; ln -s data-renamed.txt /data-link; rm /etc/moved; \
        touch /phase-b-done; \
      fi; \
      sleep 0.05; \
    done";

/// A tmpfs inside the container: its files are CRIU's to move (in the images), not the layer's.
const TMPFS: &str = "type=tmpfs,src=tmpfs,dst=/scratch,options=rw";

/// Paths that keep changing on both hosts (checked on their own).
const LIVE: [&str; 2] = ["var/app.log", "st"];

/// A root filesystem with the container's files, and the files "from the image" it deletes
/// and renames.
fn rootfs(host: &Containerd, name: &str) -> PathBuf {
    let rootfs = host.rootfs_with(name, &[&workload_binary("statecheck")]);
    fs::write(rootfs.join("etc/doomed"), b"deleted in phase A").unwrap();
    fs::write(rootfs.join("etc/movable"), b"renamed in phase A").unwrap();
    fs::create_dir_all(rootfs.join("var")).unwrap();
    rootfs
}

/// Every path under `root` (but the live ones): type, mode, owner, size, content hash, mtime
/// of files, symlink target, `user.` extended attributes, and the first path of its inode
/// when it has several.
fn manifest(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, String> = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = fs::read_dir(&dir).unwrap().flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            if LIVE
                .iter()
                .any(|l| rel == *l || rel.starts_with(&format!("{l}/")))
            {
                continue;
            }
            let md = fs::symlink_metadata(&path).unwrap();
            let ft = md.file_type();
            let mut line = format!("mode={:o} owner={}:{}", md.mode(), md.uid(), md.gid());
            if ft.is_file() {
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                fs::read(&path).unwrap().hash(&mut hasher);
                line += &format!(
                    " size={} hash={:x} mtime={}.{}",
                    md.size(),
                    hasher.finish(),
                    md.mtime(),
                    md.mtime_nsec()
                );
                if md.nlink() > 1 {
                    let first = inodes.entry(md.ino()).or_insert_with(|| rel.clone());
                    line += &format!(" inode-of={first}");
                }
            } else if ft.is_symlink() {
                line += &format!(" -> {}", fs::read_link(&path).unwrap().display());
            } else if ft.is_dir() {
                stack.push(path.clone());
            } else if ft.is_fifo() {
                line += " fifo";
            } else if ft.is_socket() {
                line += " socket";
            }
            if ft.is_file() || ft.is_dir() {
                for name in xattr::list(&path).unwrap() {
                    if name.to_string_lossy().starts_with("user.") {
                        let value = xattr::get(&path, &name).unwrap().unwrap_or_default();
                        line += &format!(
                            " {}={}",
                            name.to_string_lossy(),
                            String::from_utf8_lossy(&value)
                        );
                    }
                }
            }
            out.insert(rel, line);
        }
    }
    out
}

/// The differences between two manifests, one line each.
fn differences(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> Vec<String> {
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| format!("{k}: source {:?}, destination {:?}", a.get(k), b.get(k)))
        .collect()
}

/// The log's line numbers: consecutive from 1 (no line lost, no hole of zeros).
fn log_lines(log: &Path) -> u64 {
    let text = fs::read(log).unwrap();
    assert!(!text.contains(&0), "the log has a hole of zeros");
    let text = String::from_utf8(text).unwrap();
    let mut n = 0;
    for line in text.lines() {
        n += 1;
        assert_eq!(line, format!("line {n}"), "the log lost or mangled a line");
    }
    n
}

/// statecheck's rounds in a status directory.
fn unix_rounds(status: &Path) -> u64 {
    let text = fs::read_to_string(status.join("unix")).unwrap_or_default();
    assert!(!text.starts_with("FAIL"), "{text}");
    text.trim()
        .strip_prefix("ok rounds=")
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

/// How the container is created on each host.
enum From {
    Image,
    /// Built on each host: the destination starts with the image's files and nothing of what
    /// the source wrote (and still has the files the source deletes).
    Rootfs,
}

fn migrate_a_container_that_writes(from: From) {
    let dir = tempfile::tempdir().unwrap();
    // The migration holds before the freeze (for phase B) and once frozen (for the manifest).
    let (go, frozen) = (dir.path().join("go"), dir.path().join("frozen"));
    let (failpoints, _cleanup) = failpoints_file(&format!(
        "source::before-freeze=return(wait:{})\nsource::after-freeze=return(wait:{})\n",
        go.display(),
        frozen.display()
    ));
    let hosts = TwoHosts::up_with_env("10gbit", &[("PCLIVE_FAILPOINTS", &failpoints)]);
    let (src, dst) = (&hosts.src, &hosts.dst);
    let id = "writer";
    let (receive_from, src_root, dst_root) = match &from {
        From::Image => {
            // The same image, imported into each host's own store (as both would pull it).
            let image = rootfs(src, "image");
            for host in [src, dst] {
                host.import_image(&image, IMAGE);
            }
            src.ctr_ok(&[
                "run",
                "-d",
                "--null-io",
                "--runtime",
                RUNTIME,
                "--mount",
                TMPFS,
                IMAGE,
                id,
                "/bin/sh",
                "-c",
                SCRIPT,
            ]);
            let mounted = |host: &Containerd| host.bundle(id).join("rootfs");
            (
                vec!["--image".to_string(), IMAGE.to_string()],
                mounted(src),
                mounted(dst),
            )
        }
        From::Rootfs => {
            let (s, d) = (rootfs(src, id), rootfs(dst, id));
            src.run_detached(id, &s, &["--mount", TMPFS], &["/bin/sh", "-c", SCRIPT]);
            (vec!["--rootfs".to_string(), d.display().to_string()], s, d)
        }
    };
    wait_for("the container's files", Duration::from_secs(60), || {
        src_root.join("ready").exists() && unix_rounds(&src_root.join("st")) >= 1
    });
    // An extended attribute, set from the host.
    xattr::set(src_root.join("data.txt"), "user.pclive", b"kept").unwrap();

    let listen = format!("{}:{}", hosts.dst_ip, free_port());
    let receiver = Guarded(Some(
        std::process::Command::new(env!("CARGO_BIN_EXE_pclive"))
            .args(["receive", id, "--listen", &listen, "--key-file", &dst.key()])
            .args(&receive_from)
            .args(["--mount", TMPFS])
            .args(["--address", &dst.address, "--namespace", &dst.namespace])
            .arg("--state-dir")
            .arg(dst.state_base())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    wait_for("the receiver to listen", Duration::from_secs(30), || {
        dst.log().contains("receiving a migration on")
    });
    let migration = migrate_in_background(src, id, &listen, &src.key(), &["--json"]);

    // Pre-copy is over (the 200 MiB file was rewritten meanwhile) and the freeze is next:
    // phase B (delete, rename, link) happens now, so it travels in the frozen round.
    wait_for(
        "the migration to reach the freeze",
        Duration::from_secs(120),
        || dir.path().join("go.reached").exists(),
    );
    fs::write(src_root.join("phase-b"), b"").unwrap();
    wait_for("phase B", Duration::from_secs(30), || {
        src_root.join("phase-b-done").exists()
    });
    fs::write(&go, b"").unwrap();
    // Frozen: the manifest of every path, and the log as it is.
    wait_for("the freeze", Duration::from_secs(60), || {
        dir.path().join("frozen.reached").exists()
    });
    let at_freeze = manifest(&src_root);
    let frozen_log = fs::read(src_root.join("var/app.log")).unwrap();
    fs::write(&frozen, b"").unwrap();

    let (out, _) = migration.join().unwrap();
    assert!(
        out.status.success(),
        "migration failed: {}\n--- source log ---\n{}\n--- destination log ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        tail(&src.log(), 30),
        tail(&dst.log(), 30)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["filesystem"], "copied", "{report:#}");
    let rounds = report["precopy"]["rounds"].as_array().unwrap();
    let layer_bytes: u64 = rounds
        .iter()
        .map(|r| r["layer"]["bytes"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        layer_bytes >= 200 << 20,
        "the 200 MiB file (at least) travelled: {layer_bytes} bytes in {rounds:#?}"
    );
    let frozen = rounds.last().unwrap();
    assert!(
        frozen["layer"]["entries"].as_u64().unwrap() > 0,
        "phase B travelled in the frozen round: {frozen:#}"
    );
    assert_eq!(receiver.wait_code(Duration::from_secs(60)), 0);
    assert_eq!(dst.task(id).unwrap().1, "RUNNING");

    // Every path as it was at the freeze.
    let there = manifest(&dst_root);
    let diff = differences(&at_freeze, &there);
    assert!(
        diff.is_empty(),
        "the destination differs:\n{}",
        diff.join("\n")
    );
    for gone in ["etc/doomed", "etc/movable", "etc/moved", "data.txt"] {
        assert!(!at_freeze.contains_key(gone), "{gone} is on the source");
    }
    for kept in ["data-renamed.txt", "data-hard", "data-link", "fifo", "big"] {
        assert!(there.contains_key(kept), "{kept} is missing: {there:#?}");
    }
    assert!(there["data-renamed.txt"].contains("user.pclive=kept"));
    assert!(
        there["data-hard"].contains("inode-of=data-hard")
            || there["data-renamed.txt"].contains("inode-of=data-hard")
    );
    assert!(
        there.keys().any(|k| k.starts_with("tmp/statecheck-unix-"))
            && there.values().any(|v| v.ends_with(" socket")),
        "the unix socket's file is missing: {there:#?}"
    );
    // The tmpfs came in CRIU's images.
    let kept = dst.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "t",
        id,
        "/bin/cat",
        "/scratch/kept",
    ]);
    assert_eq!(kept.trim(), "in-tmpfs");
    // The log goes on from where it was, line after line, and the socket's program verifies.
    let log = dst_root.join("var/app.log");
    assert!(
        fs::read(&log).unwrap().starts_with(&frozen_log),
        "the destination's log does not begin with the frozen source's"
    );
    let lines = log_lines(&log);
    let rounds = unix_rounds(&dst_root.join("st"));
    wait_for("the log to keep growing", Duration::from_secs(10), || {
        log_lines(&log) > lines + 10
    });
    wait_for(
        "the unix socket check to go on",
        Duration::from_secs(10),
        || unix_rounds(&dst_root.join("st")) > rounds + 5,
    );
    let source = src.task(id);
    assert!(
        source
            .as_ref()
            .is_none_or(|(_, status)| status == "STOPPED"),
        "the source copy still runs: {source:?}"
    );
}

#[test]
fn an_image_based_container_that_writes_migrates_with_its_writable_layer() {
    migrate_a_container_that_writes(From::Image);
}

#[test]
fn a_rootfs_container_that_writes_migrates_into_the_destinations_own_directory() {
    migrate_a_container_that_writes(From::Rootfs);
}

/// `--shared-rootfs`: nothing is copied, and the receive checks the hosts really share the
/// directory; said on one side only, or about directories that differ, the migration is
/// refused and the source runs on.
#[test]
fn shared_storage_is_checked_instead_of_copied() {
    let hosts = TwoHosts::up("10gbit");
    let (src, dst) = (&hosts.src, &hosts.dst);
    let rootfs = counter(src);
    let key = src.key();
    let shared = format!(
        "{}=true",
        containerd_shim_pclive::annotations::RECEIVE_SHARED_ROOTFS
    );

    // The source says the storage is shared, the receiver was not told.
    let listen = format!("{}:{}", hosts.dst_ip, free_port());
    let receiver = receive_with(dst, "app", &rootfs, &listen, &dst.key(), &[]);
    let err = migrate_with(src, "app", &listen, &key, &["--shared-rootfs"]).unwrap_err();
    assert!(
        err.contains("--shared-rootfs on both hosts or on neither")
            && err.contains("keeps running"),
        "{err}"
    );
    assert_ne!(receiver.wait_code(Duration::from_secs(30)), 0);
    assert_keeps_running(src, &rootfs);
    dst.ctr(&["task", "rm", "-f", "app"]);
    dst.ctr(&["container", "rm", "app"]);

    // Both say so, but the destination's directory is another one.
    let listen = format!("{}:{}", hosts.dst_ip, free_port());
    let other = dst.rootfs("app");
    let receiver = receive_with(
        dst,
        "app",
        &other,
        &listen,
        &dst.key(),
        &["--annotation", &shared],
    );
    let err = migrate_with(src, "app", &listen, &key, &["--shared-rootfs"]).unwrap_err();
    assert!(
        err.contains("the hosts do not share this storage") && err.contains("keeps running"),
        "{err}"
    );
    assert_ne!(receiver.wait_code(Duration::from_secs(30)), 0);
    assert_keeps_running(src, &rootfs);
    dst.ctr(&["task", "rm", "-f", "app"]);
    dst.ctr(&["container", "rm", "app"]);

    // Both say so, about the same directory: it migrates, and nothing of it travels.
    let listen = format!("{}:{}", hosts.dst_ip, free_port());
    let receiver = receive_with(
        dst,
        "app",
        &rootfs,
        &listen,
        &dst.key(),
        &["--annotation", &shared],
    );
    let report = migrate_with(src, "app", &listen, &key, &["--shared-rootfs"]).unwrap();
    assert_eq!(receiver.wait_code(Duration::from_secs(60)), 0);
    assert_eq!(report["filesystem"], "shared", "{report:#}");
    assert!(
        report["precopy"]["rounds"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["layer"].is_null()),
        "files travelled: {report:#}"
    );
    assert_eq!(dst.task("app").unwrap().1, "RUNNING");
    let count = rootfs.join("tmp/count");
    let now = read_number(&count).unwrap();
    wait_for(
        "the destination to count on",
        Duration::from_secs(10),
        || read_number(&count).is_some_and(|n| n > now + 3),
    );
}
