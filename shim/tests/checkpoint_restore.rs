//! Local checkpoint and restore through containerd's API (ctr), runc and CRIU: a restored
//! container continues where it stopped, proven by a counter and by checksummed memory.

mod common;

use std::fs;
use std::path::Path;
use std::thread::sleep;
use std::time::Duration;

use common::*;

const COUNTER: &[&str] = &[
    "/bin/sh",
    "-c",
    "i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.05; done",
];

fn restore(ctd: &Containerd, id: &str, rootfs: &Path, images: &Path) {
    let annotation = format!("{RESTORE_ANNOTATION}={}", images.display());
    // The command is ignored: the process tree comes from the images.
    ctd.run_detached(id, rootfs, &["--annotation", &annotation], &["/bin/true"]);
    ctd.wait_status(id, "RUNNING");
}

#[test]
fn a_counter_continues_after_checkpoint_and_restore() {
    let ctd = Containerd::start();
    let rootfs = ctd.rootfs("counter");
    let count = rootfs.join("tmp/count");
    ctd.run_detached("counter", &rootfs, &[], COUNTER);
    wait_for("the counter to reach 20", Duration::from_secs(20), || {
        read_number(&count).is_some_and(|n| n >= 20)
    });

    let images = ctd.dir.join("counter-images");
    ctd.checkpoint_and_remove("counter", &images);
    assert!(images.join("inventory.img").is_file());
    let at_checkpoint = read_number(&count).unwrap();
    sleep(Duration::from_millis(300));
    assert_eq!(
        read_number(&count).unwrap(),
        at_checkpoint,
        "--exit left the container running"
    );

    restore(&ctd, "counter-restored", &rootfs, &images);
    // A fresh start would count from 1; the restored shell goes on from where it stopped.
    wait_for(
        "the restored counter to continue",
        Duration::from_secs(20),
        || read_number(&count).is_some_and(|n| n > at_checkpoint + 5),
    );
    // And it is an ordinary task: exec, pause and kill work on it.
    let out = ctd.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "look",
        "counter-restored",
        "/bin/cat",
        "/tmp/count",
    ]);
    assert!(out.trim().parse::<u64>().unwrap() > at_checkpoint);
    ctd.ctr_ok(&["task", "pause", "counter-restored"]);
    ctd.ctr_ok(&["task", "resume", "counter-restored"]);
    ctd.ctr_ok(&["task", "kill", "-s", "SIGKILL", "counter-restored"]);
    ctd.wait_status("counter-restored", "STOPPED");
}

#[test]
fn an_image_based_container_checkpoints_to_the_content_store_and_restores_live() {
    let ctd = Containerd::start();
    let events = ctd.record_events();
    let image = "pclive.test/busybox:1";
    ctd.import_image(&ctd.rootfs("image"), image);

    // From an image the rootfs comes from the snapshotter: the shim mounts it.
    let out = ctd.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        image,
        "probe",
        "/bin/sh",
        "-c",
        "grep -q '^overlay / overlay' /proc/mounts && exit 4",
    ]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "rootfs is not the overlay: {out:?}"
    );

    ctd.ctr_ok(
        &["run", "-d", "--null-io", "--runtime", RUNTIME, image, "svc"]
            .into_iter()
            .chain(COUNTER.iter().copied())
            .collect::<Vec<_>>(),
    );
    let read_count = |id: &str, exec_id: &str| -> u64 {
        ctd.ctr_ok(&[
            "task",
            "exec",
            "--exec-id",
            exec_id,
            id,
            "/bin/cat",
            "/tmp/count",
        ])
        .trim()
        .parse()
        .unwrap()
    };
    ctd.wait_status("svc", "RUNNING");
    // 60 counts take 3 s: a restarted (not restored) counter could not be there yet when we look.
    wait_for("the counter to reach 60", Duration::from_secs(30), || {
        // The file appears with the first count.
        let out = ctd.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "c1",
            "svc",
            "/bin/cat",
            "/tmp/count",
        ]);
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<u64>()
            .is_ok_and(|n| n >= 60)
    });

    // The checkpoint goes into containerd's content store (criu tar + spec + the writable
    // layer), the task runs on. The writable layer is taken in the same pause as the task: the
    // counter may hold /tmp/count.new open at the dump, and without the layer that file is not
    // there to restore ("Can't open file tmp/count.new on restore", seen once in CI).
    ctd.ctr_ok(&[
        "container",
        "checkpoint",
        "--task",
        "--rw",
        "svc",
        "pclive.test/svc-checkpoint:1",
    ]);
    // The counter's value when the checkpoint was taken is at most this.
    let after_checkpoint = read_count("svc", "c2");
    ctd.ctr_ok(&["task", "kill", "-s", "SIGKILL", "svc"]);
    ctd.wait_status("svc", "STOPPED");
    ctd.ctr_ok(&["task", "rm", "svc"]);
    ctd.ctr_ok(&["container", "rm", "svc"]);

    // containerd unpacks the checkpoint and hands the directory to the shim (CreateTaskRequest.checkpoint).
    ctd.ctr_ok(&[
        "container",
        "restore",
        "--live",
        "--rw",
        "svc",
        "pclive.test/svc-checkpoint:1",
    ]);
    ctd.wait_status("svc", "RUNNING");
    wait_for("the restored counter", Duration::from_secs(20), || {
        ctd.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "c3",
            "svc",
            "/bin/cat",
            "/tmp/count",
        ])
        .status
        .success()
    });
    let restored = read_count("svc", "c4");
    // Restored, the counter resumes at its checkpointed value (>= 60, <= after_checkpoint);
    // restarted, it would be far below 60 this soon.
    assert!(
        (60..after_checkpoint + 200).contains(&restored),
        "restored counter {restored} does not continue from the checkpoint (<= {after_checkpoint})"
    );
    events.wait_for_topics(&["/tasks/checkpointed"]);
}

#[test]
fn checkpoint_without_exit_leaves_the_container_running() {
    let ctd = Containerd::start();
    let rootfs = ctd.rootfs("live");
    let count = rootfs.join("tmp/count");
    ctd.run_detached("live", &rootfs, &[], COUNTER);
    ctd.wait_status("live", "RUNNING");
    let images = ctd.dir.join("live-images").display().to_string();
    ctd.ctr_ok(&["task", "checkpoint", "--image-path", &images, "live"]);
    assert!(Path::new(&images).join("inventory.img").is_file());
    assert_eq!(ctd.task("live").unwrap().1, "RUNNING");
    let now = read_number(&count).unwrap();
    wait_for("the counter to go on", Duration::from_secs(20), || {
        read_number(&count).is_some_and(|n| n > now + 3)
    });

    // Without --image-path containerd stores the checkpoint in its content store as an image.
    // ctr names checkpoint images by the second, and it made one for the first checkpoint too.
    sleep(Duration::from_millis(1100));
    ctd.ctr_ok(&["task", "checkpoint", "live"]);
    let images = ctd.ctr_ok(&["image", "ls", "-q"]);
    assert!(
        images.contains("checkpoint"),
        "no checkpoint image: {images}"
    );
    assert_eq!(ctd.task("live").unwrap().1, "RUNNING");
}

#[test]
fn checksummed_memory_of_256_mib_survives_checkpoint_and_restore() {
    let ctd = Containerd::start();
    let rootfs = ctd.rootfs("mem");
    let status = rootfs.join("status");
    ctd.run_detached(
        "mem",
        &rootfs,
        &[],
        &["/usr/local/bin/memcheck", "256", "--status", "/status"],
    );
    wait_for("two verified passes", Duration::from_secs(60), || {
        memcheck_status(&status).is_some_and(|s| s.pass >= 2)
    });

    let images = ctd.dir.join("mem-images");
    ctd.checkpoint_and_remove("mem", &images);
    let before = memcheck_status(&status).unwrap();
    assert_eq!(before.pages, 256 * 256);
    let pages_size: u64 = fs::read_dir(&images)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("pages-"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(
        pages_size >= 256 << 20,
        "the image holds only {pages_size} bytes of pages"
    );

    restore(&ctd, "mem-restored", &rootfs, &images);
    // Two more full passes after the restore: every page was verified against its generation,
    // and the process is the same one (its pass and write counters went on, not from zero).
    wait_for(
        "two full verified passes after restore",
        Duration::from_secs(60),
        || memcheck_status(&status).is_some_and(|s| s.pass >= before.pass + 2),
    );
    let after = memcheck_status(&status).unwrap();
    assert_eq!(after.errors, 0);
    assert!(after.writes > before.writes, "{before:?} -> {after:?}");
    assert_eq!(ctd.task("mem-restored").unwrap().1, "RUNNING");
}

#[test]
fn restoring_from_a_directory_without_images_is_refused() {
    let ctd = Containerd::start();
    let rootfs = ctd.rootfs("bogus");
    let empty = ctd.dir.join("empty-images");
    fs::create_dir_all(&empty).unwrap();
    let annotation = format!("{RESTORE_ANNOTATION}={}", empty.display());
    let rootfs_arg = rootfs.display().to_string();
    let err = ctd.ctr_err(&[
        "run",
        "-d",
        "--null-io",
        "--runtime",
        RUNTIME,
        "--annotation",
        &annotation,
        "--rootfs",
        &rootfs_arg,
        "bogus",
        "/bin/true",
    ]);
    assert!(
        err.contains("no CRIU image set") && err.contains("inventory.img"),
        "unclear error: {err}"
    );
}

#[test]
fn checkpoint_without_criu_names_the_fix_and_keeps_the_container() {
    let ctd = Containerd::start_with(Tools::NoCriu);
    let rootfs = ctd.rootfs("nocriu");
    let count = rootfs.join("tmp/count");
    ctd.run_detached("nocriu", &rootfs, &[], COUNTER);
    ctd.wait_status("nocriu", "RUNNING");
    let images = ctd.dir.join("nocriu-images").display().to_string();
    let err = ctd.ctr_err(&[
        "task",
        "checkpoint",
        "--exit",
        "--image-path",
        &images,
        "nocriu",
    ]);
    assert!(
        err.contains("criu") && err.contains("install criu >= 4.2"),
        "unclear error: {err}"
    );
    // Nothing lost: the container runs on.
    assert_eq!(ctd.task("nocriu").unwrap().1, "RUNNING");
    let now = read_number(&count).unwrap();
    wait_for("the counter to go on", Duration::from_secs(20), || {
        read_number(&count).is_some_and(|n| n > now + 3)
    });
}
