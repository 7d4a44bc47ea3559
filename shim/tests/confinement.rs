//! Annotations are confined to what the host's settings allow (README, "Trust"): each abuse of
//! a path-bearing or listening annotation is refused at create with an error that names the
//! setting, and nothing outside the allowed directory is read, created or changed.

mod common;

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};

use common::migration::free_port;
use common::*;
use containerd_shim_pclive::annotations;

/// A host whose settings allow annotations in its own directory only; `receive`/`insecure`
/// say whether containers may listen (with or without a key).
fn host(receive: bool, insecure: bool) -> Containerd {
    let c = Containerd::start();
    fs::write(
        c.pclive_config(),
        format!(
            "[annotations]\nread_dirs = [\"{d}\"]\nwrite_dirs = [\"{d}\"]\nallow_receive = {receive}\nallow_insecure = {insecure}\n",
            d = c.dir.display()
        ),
    )
    .unwrap();
    c
}

/// A directory outside what the host allows, removed at the end.
fn outside() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("pclive-outside-")
        .tempdir_in("/tmp")
        .unwrap()
}

/// Creating a container with `annotations` fails with an error containing `expect`; no
/// container is left behind.
fn refused(c: &Containerd, annotations: &[String], expect: &str) -> String {
    let rootfs = c.rootfs("app").display().to_string();
    let mut args = vec!["run", "-d", "--null-io", "--runtime", RUNTIME];
    for a in annotations {
        args.extend_from_slice(&["--annotation", a]);
    }
    args.extend_from_slice(&["--rootfs", &rootfs, "app", "/bin/true"]);
    let err = c.ctr_err(&args);
    assert!(err.contains(expect), "expected '{expect}' in: {err}");
    assert!(c.task("app").is_none(), "a refused container has no task");
    let _ = c.ctr(&["container", "rm", "app"]);
    err
}

fn listen_here() -> String {
    format!("{}=127.0.0.1:{}", annotations::RECEIVE_LISTEN, free_port())
}

fn annotation(key: &str, value: &Path) -> String {
    format!("{key}={}", value.display())
}

#[test]
fn a_progress_file_outside_the_allowed_directories_is_refused() {
    let c = host(true, false);
    let out = outside();
    let target = out.path().join("progress");
    let err = refused(
        &c,
        &[
            listen_here(),
            annotation(annotations::RECEIVE_KEY_FILE, Path::new(&c.key())),
            annotation(annotations::RECEIVE_PROGRESS_FILE, &target),
        ],
        "write_dirs",
    );
    assert!(err.contains(annotations::RECEIVE_PROGRESS_FILE), "{err}");
    assert!(!target.exists(), "nothing is created outside");
}

#[test]
fn a_progress_file_through_a_planted_link_is_refused() {
    let c = host(true, false);
    let out = outside();
    let victim = out.path().join("victim");
    fs::write(&victim, b"untouched").unwrap();
    let link = c.dir.join("progress");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    refused(
        &c,
        &[
            listen_here(),
            annotation(annotations::RECEIVE_KEY_FILE, Path::new(&c.key())),
            annotation(annotations::RECEIVE_PROGRESS_FILE, &link),
        ],
        "symbolic link",
    );
    assert_eq!(fs::read(&victim).unwrap(), b"untouched");
}

#[test]
fn a_key_file_outside_the_allowed_directories_is_refused() {
    let c = host(true, false);
    refused(
        &c,
        &[
            listen_here(),
            annotation(annotations::RECEIVE_KEY_FILE, Path::new("/dev/zero")),
        ],
        "read_dirs",
    );
}

#[test]
fn restoring_images_from_outside_the_allowed_directories_is_refused() {
    let c = host(false, false);
    // A real image set outside: a checkpoint of a container of this host.
    let out = outside();
    let images = out.path().join("images");
    let rootfs = c.rootfs("victim");
    c.run_detached("victim", &rootfs, &[], &["/bin/sleep", "600"]);
    c.checkpoint_and_remove("victim", &images);
    assert!(images.join("inventory.img").exists());
    refused(
        &c,
        &[annotation(annotations::RESTORE_IMAGE_PATH, &images)],
        "read_dirs",
    );
}

#[test]
fn a_work_path_through_a_planted_link_is_refused() {
    let c = host(false, false);
    let images = c.dir.join("images");
    fs::create_dir(&images).unwrap();
    fs::write(images.join("inventory.img"), b"").unwrap();
    let out = outside();
    let link = c.dir.join("work");
    std::os::unix::fs::symlink(out.path(), &link).unwrap();
    refused(
        &c,
        &[
            annotation(annotations::RESTORE_IMAGE_PATH, &images),
            annotation(annotations::RESTORE_WORK_PATH, &link.join("logs")),
        ],
        "symbolic link",
    );
    assert_eq!(
        fs::read_dir(out.path()).unwrap().count(),
        0,
        "nothing is written through the link"
    );
}

#[test]
fn a_criu_config_outside_the_allowed_directories_is_refused() {
    let c = host(false, false);
    let out = outside();
    let config: PathBuf = out.path().join("criu.conf");
    fs::write(&config, b"tcp-close\n").unwrap();
    refused(
        &c,
        &[annotation(annotations::CRIU_CONFIG, &config)],
        "read_dirs",
    );
}

#[test]
fn listening_for_a_migration_needs_the_hosts_consent() {
    let c = host(false, false);
    let port = free_port();
    refused(
        &c,
        &[
            format!("{}=127.0.0.1:{port}", annotations::RECEIVE_LISTEN),
            annotation(annotations::RECEIVE_KEY_FILE, Path::new(&c.key())),
        ],
        "allow_receive = true",
    );
    assert!(
        TcpListener::bind(("127.0.0.1", port)).is_ok(),
        "nothing listens on the port"
    );
}

#[test]
fn an_insecure_receive_needs_the_hosts_consent() {
    let c = host(true, false);
    refused(
        &c,
        &[
            listen_here(),
            format!("{}=true", annotations::RECEIVE_INSECURE),
        ],
        "allow_insecure = true",
    );
}

/// `pclive migrate --work-dir`: the shim writes the final dump's logs and the report there as
/// root, so a directory someone else owns or may write to (a predictable /tmp path prepared by
/// another user, or a link) is refused before anything is written or asked of containerd.
#[test]
fn a_work_directory_someone_else_controls_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let out = outside();
    let open = out.path().join("open");
    fs::create_dir(&open).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
    let theirs = out.path().join("theirs");
    fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    let link = out.path().join("link");
    std::os::unix::fs::symlink(&open, &link).unwrap();
    for (dir, expect) in [
        (&open, "lets others write"),
        (&theirs, "owned by uid 65534"),
        (&link, "symbolic link"),
    ] {
        let run = std::process::Command::new(env!("CARGO_BIN_EXE_pclive"))
            .args(["migrate", "app", "127.0.0.1:9", "--insecure", "--work-dir"])
            .arg(dir)
            .args(["--address", "/nonexistent/containerd.sock"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{}: {stderr}", dir.display());
        assert!(stderr.contains(expect), "{}: {stderr}", dir.display());
    }
    for dir in [&open, &theirs] {
        assert_eq!(fs::read_dir(dir).unwrap().count(), 0, "nothing written");
    }
}
