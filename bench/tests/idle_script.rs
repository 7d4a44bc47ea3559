//! The idle-container benchmark script end to end, small: one 16 MiB container migrated once
//! across the two-host test bed, verified on the destination, its line and table written, and
//! nothing of the test bed left. This keeps `scripts/bench-idle.sh` working; the numbers come
//! from full runs (docs/benchmarks.md).
//!
//! Needs root and what scripts/setup.sh installs; test.sh runs setup before the tests.

mod common;

use std::path::Path;

#[test]
fn an_idle_container_migrates_and_its_pause_is_recorded() {
    common::require_root("the idle benchmark");
    let out = tempfile::tempdir().unwrap();
    let output = common::script("bench-idle.sh")
        .args([
            "--mib",
            "16",
            "--runs",
            "1",
            "--no-setup",
            "--testbed",
            "pcitest",
        ])
        .arg("--out")
        .arg(out.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "bench-idle.sh failed: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let lines = std::fs::read_to_string(out.path().join("idle-results.jsonl")).unwrap();
    let runs: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(runs.len(), 1, "{lines}");
    let run = &runs[0];
    assert_eq!(run["mib"], 16, "{run}");
    // A standard host's /run, whatever this machine's.
    assert_eq!(run["criu_kdat_cached"], true, "{run}");
    let pause = run["downtime_s"].as_f64().unwrap();
    let dump = run["final_dump_s"].as_f64().unwrap();
    assert!(pause > 0.0 && dump > 0.0 && dump < pause, "{run}");
    assert!(stdout.contains("| 16 | 1 |"), "{stdout}");
    // Nothing of the test bed is left: no path (where the script ran with this machine's /run)
    // and no process (its containerd daemons and shims, wherever /run was).
    assert!(!Path::new("/run/pclive-testbed/pcitest").exists());
    assert!(!Path::new("/run/netns/pcitest-src").exists());
    assert_eq!(
        common::processes_mentioning("pcitest"),
        Vec::<String>::new()
    );
}
