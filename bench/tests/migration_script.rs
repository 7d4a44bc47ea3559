//! The migration benchmark script end to end, small: Redis with 20k records migrated once per
//! mode (baseline, pclive-eager, pclive) across the two-host test bed with the client load
//! running, every record checked afterwards, and the report written. This keeps
//! `scripts/bench-migration.sh` working; the numbers themselves come from full runs
//! (docs/benchmarks.md).
//!
//! Needs root and what scripts/setup.sh installs (containerd, runc, CRIU, redis-server and the
//! pclive binaries on PATH); test.sh runs setup before the tests.

mod common;

use std::path::Path;

#[test]
fn every_mode_migrates_redis_with_its_data_intact_and_the_report_is_written() {
    common::require_root("the migration benchmark");
    let out = tempfile::tempdir().unwrap();
    let status = common::script("bench-migration.sh")
        .args([
            "--quick",
            "--records",
            "20000",
            "--rate",
            "2000",
            "--no-setup",
        ])
        .args(["--testbed", "pcbtest"])
        .arg("--out")
        .arg(out.path())
        .env(
            "PCLIVE_BENCH_CLIENT",
            env!("CARGO_BIN_EXE_pclive-bench-client"),
        )
        .env(
            "PCLIVE_BENCH_REPORT",
            env!("CARGO_BIN_EXE_pclive-bench-report"),
        )
        .status()
        .unwrap();
    assert!(status.success(), "bench-migration.sh failed: {status}");

    let results = std::fs::read_to_string(out.path().join("results.jsonl")).unwrap();
    let runs: Vec<serde_json::Value> = results
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let modes: Vec<&str> = runs.iter().map(|r| r["mode"].as_str().unwrap()).collect();
    assert_eq!(
        modes,
        ["baseline", "pclive-eager", "pclive", "pclive-moving"]
    );
    for run in &runs {
        let mode = &run["mode"];
        assert_eq!(run["integrity"]["ok"], true, "{mode}: {run}");
        // Measured with a standard host's /run (a tmpfs, where CRIU keeps its kernel probe),
        // whatever this machine's is.
        assert_eq!(run["criu_kdat_cached"], true, "{mode}: {run}");
        assert_eq!(
            run["integrity"]["checked"], 20000,
            "{mode}: every record checked"
        );
        let downtime = run["downtime_s"].as_f64().unwrap();
        assert!(
            downtime > 0.0 && downtime < 30.0,
            "{mode}: downtime {downtime}"
        );
        assert!(run["restore_s"].as_f64().unwrap() > 0.0, "{mode}: {run}");
        assert!(run["cpu_s"]["src"].as_f64().unwrap() > 0.0, "{mode}: {run}");
        assert!(
            run["container_rss_bytes"].as_u64().unwrap() > 20000 * 1024,
            "{mode}: the container held the records: {run}"
        );
        if mode == "pclive-moving" {
            // One address, which moved: the patient client stayed on its connection.
            assert_eq!(run["endpoint_after_gap"], 0, "{mode}: {run}");
            assert_eq!(run["patient_connection_kept"], true, "{mode}: {run}");
            assert_eq!(run["address_moved"], serde_json::json!(["eth0"]), "{run}");
        } else {
            assert_eq!(run["endpoint_after_gap"], 1, "{mode}: the service moved");
            assert_eq!(run["patient_connection_kept"], false, "{mode}: {run}");
        }
    }
    for pclive in &runs[1..] {
        assert!(
            pclive["rounds"].as_array().unwrap().len() >= 2,
            "pre-copy rounds reported: {pclive}"
        );
        // Both ends showed their progress: the source per round (dirty rate, ETA after the
        // second), the destination per round received.
        let run_dir = out.path().join("runs").join(format!(
            "10gbit-20000-r90-{}",
            pclive["mode"].as_str().unwrap()
        ));
        let sent = std::fs::read_to_string(run_dir.join("migrate.log")).unwrap();
        assert!(
            sent.contains("round  2") && sent.contains("dirtied"),
            "{sent}"
        );
        let received = std::fs::read_to_string(run_dir.join("receive.log")).unwrap();
        assert!(
            received.contains("round  1:") && received.contains("(source paused)"),
            "{received}"
        );
    }
    let markdown = std::fs::read_to_string(out.path().join("results.md")).unwrap();
    assert!(markdown.contains("## Targets"), "{markdown}");
    for plot in ["downtime-split.png", "restore-vs-size.png"] {
        let png = std::fs::read(out.path().join(plot)).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "{plot} is a PNG");
    }
    // Nothing of the test bed is left.
    assert!(!Path::new("/run/pclive-testbed/pcbtest").exists());
    assert!(!Path::new("/run/netns/pcbtest-src").exists());
    assert!(!Path::new("/run/netns/pcbtest-src-redis").exists());
    // Where the script ran with a /run of its own, a leftover would be a process.
    assert_eq!(
        common::processes_mentioning("pcbtest"),
        Vec::<String>::new()
    );
}
