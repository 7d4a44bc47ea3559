//! Lazy restore through containerd: CRIU recreates the process tree without memory and pclive's
//! lazy-pages server installs every page with userfaultfd from local memory.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::*;
use restore_engine::images::{self, Header, Pagemap, MM_MAGIC, PSTREE_MAGIC};

use containerd_shim_pclive::annotations;

/// The annotation of a lazy restore.
fn lazy() -> String {
    format!("{}=true", annotations::RESTORE_LAZY_PAGES)
}

fn lazy_restore(ctd: &Containerd, id: &str, rootfs: &Path, images: &Path, extra: &[&str]) {
    let annotation = format!("{RESTORE_ANNOTATION}={}", images.display());
    let lazy = lazy();
    let mut args = vec!["--annotation", &annotation, "--annotation", &lazy];
    args.extend_from_slice(extra);
    ctd.run_detached(id, rootfs, &args, &["/bin/true"]);
}

fn report_path(ctd: &Containerd, id: &str) -> PathBuf {
    ctd.bundle(id).join("criu-work/pclive-lazy-restore.json")
}

fn report(ctd: &Containerd, id: &str) -> Option<serde_json::Value> {
    serde_json::from_slice(&fs::read(report_path(ctd, id)).ok()?).ok()
}

#[test]
fn one_gib_of_checksummed_memory_restores_lazily_and_verifies() {
    let ctd = Containerd::start();
    let rootfs = ctd.rootfs("big");
    let status = rootfs.join("status");
    ctd.run_detached(
        "big",
        &rootfs,
        &[],
        &["/usr/local/bin/memcheck", "1024", "--status", "/status"],
    );
    wait_for("a verified pass of 1 GiB", Duration::from_secs(120), || {
        memcheck_status(&status).is_some_and(|s| s.pass >= 1)
    });
    let images = ctd.dir.join("big-images");
    ctd.checkpoint_and_remove("big", &images);
    let before = memcheck_status(&status).unwrap();
    check_image_codec_on_a_real_dump(&images);

    let started = Instant::now();
    lazy_restore(&ctd, "big-lazy", &rootfs, &images, &[]);
    let restore_time = started.elapsed();
    ctd.wait_status("big-lazy", "RUNNING");
    wait_for(
        "two full verified passes after the lazy restore",
        Duration::from_secs(120),
        || memcheck_status(&status).is_some_and(|s| s.pass >= before.pass + 2),
    );
    let after = memcheck_status(&status).unwrap();
    assert_eq!(after.errors, 0);
    assert!(after.writes > before.writes);

    wait_for("the fill report", Duration::from_secs(60), || {
        report(&ctd, "big-lazy").is_some()
    });
    let report = report(&ctd, "big-lazy").unwrap();
    assert_eq!(report["status"], "done", "{report:#}");
    let fill = &report["fill"];
    let installed_pages =
        fill["pages_by_fault"].as_u64().unwrap() + fill["pages_in_background"].as_u64().unwrap();
    assert!(
        installed_pages >= 250_000,
        "pclive's server installed only {installed_pages} pages of 1 GiB: {report:#}"
    );
    eprintln!(
        "lazy restore of 1 GiB: ctr run returned after {restore_time:?}; fill {}",
        fill
    );
}

/// Decodes the images CRIU just wrote with pclive's codec and re-encodes them byte for byte.
fn check_image_codec_on_a_real_dump(dir: &Path) {
    let inventory = images::read_inventory(dir).expect("inventory.img");
    assert_eq!(inventory.img_version, 2);
    let pstree_path = dir.join("pstree.img");
    let pstree = images::read_pstree(dir).expect("pstree.img");
    assert!(!pstree.is_empty());
    assert_eq!(
        images::encode_entries(Header::Common(PSTREE_MAGIC), &pstree),
        fs::read(&pstree_path).unwrap(),
        "pstree.img does not round-trip"
    );
    for task in &pstree {
        let mm_path = dir.join(format!("mm-{}.img", task.pid));
        let mm = images::read_mm(dir, task.pid).expect("mm image");
        assert!(mm.vmas.iter().any(|v| v.can_be_lazy()));
        assert_eq!(
            images::encode_entries(Header::Common(MM_MAGIC), std::slice::from_ref(&mm)),
            fs::read(&mm_path).unwrap(),
            "{} does not round-trip",
            mm_path.display()
        );
        let pagemap_path = dir.join(format!("pagemap-{}.img", task.pid));
        let raw = fs::read(&pagemap_path).unwrap();
        let pagemap = Pagemap::decode(&pagemap_path, &raw).unwrap();
        assert_eq!(
            pagemap.encode(),
            raw,
            "{} does not round-trip",
            pagemap_path.display()
        );
        let pages = dir.join(format!("pages-{}.img", pagemap.pages_id));
        assert_eq!(
            fs::metadata(&pages).unwrap().len(),
            pagemap.present_bytes(),
            "pagemap offsets disagree with {}",
            pages.display()
        );
        assert!(pagemap.ranges.iter().any(|r| r.is(images::PE_LAZY)));
    }
}

#[test]
fn killing_the_lazy_pages_server_during_the_fill_kills_the_container() {
    let ctd = Containerd::start();
    let rootfs = ctd.rootfs("victim");
    let status = rootfs.join("status");
    // Slow verification (a full pass takes ~13 s) so the fill is still running when we strike.
    ctd.run_detached(
        "victim",
        &rootfs,
        &[],
        &[
            "/usr/local/bin/memcheck",
            "256",
            "--status",
            "/status",
            "--tick-ms",
            "200",
            "--writes-per-tick",
            "4",
        ],
    );
    wait_for("memcheck to start", Duration::from_secs(60), || {
        memcheck_status(&status).is_some()
            || fs::metadata(&status).is_ok()
            || ctd.task("victim").is_some_and(|(_, s)| s == "RUNNING")
    });
    sleep(Duration::from_secs(1));
    let images = ctd.dir.join("victim-images");
    ctd.checkpoint_and_remove("victim", &images);

    // A slow background fill (8 MiB/s: ~30 s for 256 MiB) leaves time to kill the server.
    lazy_restore(
        &ctd,
        "victim-lazy",
        &rootfs,
        &images,
        &[
            "--annotation",
            &format!("{}=8", annotations::RESTORE_FILL_RATE_MIB),
        ],
    );
    ctd.wait_status("victim-lazy", "RUNNING");
    let image_arg = images.display().to_string();
    let servers = processes_with_args(&["--images", &image_arg]);
    assert_eq!(servers.len(), 1, "expected one lazy-pages server");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(servers[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();

    ctd.wait_status("victim-lazy", "STOPPED");
    wait_for("the failure report", Duration::from_secs(30), || {
        report(&ctd, "victim-lazy").is_some()
    });
    let report = report(&ctd, "victim-lazy").unwrap();
    assert_eq!(report["status"], "failed", "{report:#}");
    assert!(
        report["reason"].as_str().unwrap().contains("signal 9"),
        "{report:#}"
    );
    assert!(
        ctd.log().contains("lazy restore failed"),
        "containerd's log does not say why the container died"
    );
    // The container never ran on zero-filled memory: memcheck did not report corruption.
    if let Ok(text) = fs::read_to_string(&status) {
        assert!(!text.starts_with("CORRUPT"), "{text}");
    }
}

#[test]
fn redis_restores_lazily_with_the_same_dataset() {
    let ctd = Containerd::start();
    let redis_server = find_on_path("redis-server");
    let redis_cli = find_on_path("redis-cli");
    let rootfs = ctd.rootfs_with("redis", &[&redis_server, &redis_cli]);
    ctd.run_detached(
        "redis",
        &rootfs,
        &[],
        &[
            "/usr/local/bin/redis-server",
            "--save",
            "",
            "--appendonly",
            "no",
            "--bind",
            "127.0.0.1",
            "--enable-debug-command",
            "yes",
        ],
    );
    let cli = |id: &str, args: &[&str]| -> String {
        let mut all = vec![
            "task",
            "exec",
            "--exec-id",
            "cli",
            id,
            "/usr/local/bin/redis-cli",
        ];
        all.extend_from_slice(args);
        ctd.ctr_ok(&all).trim().to_string()
    };
    wait_for("redis to answer", Duration::from_secs(30), || {
        ctd.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "ping",
            "redis",
            "/usr/local/bin/redis-cli",
            "PING",
        ])
        .stdout
        .starts_with(b"PONG")
    });
    // ~300 MB of data: 250k keys of 1 KB.
    assert_eq!(
        cli("redis", &["DEBUG", "POPULATE", "250000", "key", "1024"]),
        "OK"
    );
    let digest = cli("redis", &["DEBUG", "DIGEST"]);
    assert_eq!(cli("redis", &["DBSIZE"]), "250000");

    let images = ctd.dir.join("redis-images");
    ctd.checkpoint_and_remove("redis", &images);
    // Through the staging store, the path migrated pages take.
    lazy_restore(
        &ctd,
        "redis-lazy",
        &rootfs,
        &images,
        &[
            "--annotation",
            &format!("{}=staging", annotations::RESTORE_PAGE_SOURCE),
        ],
    );
    ctd.wait_status("redis-lazy", "RUNNING");
    assert_eq!(cli("redis-lazy", &["DEBUG", "DIGEST"]), digest);
    assert_eq!(cli("redis-lazy", &["DBSIZE"]), "250000");
    assert_eq!(cli("redis-lazy", &["SET", "after", "restore"]), "OK");
    wait_for("the fill report", Duration::from_secs(60), || {
        report(&ctd, "redis-lazy").is_some()
    });
    assert_eq!(report(&ctd, "redis-lazy").unwrap()["status"], "done");
}

#[test]
fn a_forking_multi_process_container_restores_lazily() {
    let ctd = Containerd::start();
    let rootfs = ctd.rootfs("family");
    // A shell with two memcheck children: one forks a short-lived child every 20 ms, the other
    // maps, moves (mremap), discards (MADV_DONTNEED) and unmaps a region in a cycle. This all
    // happens while the (throttled) fill runs, so the server must follow new address spaces,
    // exits, remaps, removes and unmaps.
    ctd.run_detached(
        "family",
        &rootfs,
        &[],
        &[
            "/bin/sh",
            "-c",
            "/usr/local/bin/memcheck 64 --status /s1 --fork-every 4 & \
             /usr/local/bin/memcheck 64 --status /s2 --churn --tick-ms 50 & \
             while true; do sleep 0.05; done",
        ],
    );
    let (s1, s2) = (rootfs.join("s1"), rootfs.join("s2"));
    wait_for("both children to verify", Duration::from_secs(60), || {
        memcheck_status(&s1).is_some_and(|s| s.pass >= 1)
            && memcheck_status(&s2).is_some_and(|s| s.pass >= 1)
    });
    let images = ctd.dir.join("family-images");
    ctd.checkpoint_and_remove("family", &images);
    assert!(images::read_pstree(&images).unwrap().len() >= 3);
    let (b1, b2) = (memcheck_status(&s1).unwrap(), memcheck_status(&s2).unwrap());

    lazy_restore(
        &ctd,
        "family-lazy",
        &rootfs,
        &images,
        &[
            "--annotation",
            &format!("{}=2", annotations::RESTORE_FILL_RATE_MIB),
        ],
    );
    ctd.wait_status("family-lazy", "RUNNING");
    wait_for(
        "both children to verify after restore",
        Duration::from_secs(90),
        || {
            memcheck_status(&s1).is_some_and(|s| s.pass >= b1.pass + 2)
                && memcheck_status(&s2).is_some_and(|s| s.pass >= b2.pass + 2)
        },
    );
    wait_for("the fill report", Duration::from_secs(120), || {
        report(&ctd, "family-lazy").is_some()
    });
    let report = report(&ctd, "family-lazy").unwrap();
    assert_eq!(report["status"], "done", "{report:#}");
    assert!(
        report["fill"]["tasks"].as_u64().unwrap() >= 3,
        "the server did not serve every task: {report:#}"
    );
    for event in ["forks", "remaps", "removes", "unmaps"] {
        assert!(
            report["fill"][event].as_u64().unwrap() > 0,
            "no {event} happened during the fill: the test proves nothing: {report:#}"
        );
    }
    assert_eq!(ctd.task("family-lazy").unwrap().1, "RUNNING");
}
