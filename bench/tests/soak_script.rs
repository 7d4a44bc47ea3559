//! The soak script end to end, small: a 16 MiB memcheck container migrated there and back
//! across the two-host test bed, its memory verified after each hop, and the hosts checked for
//! leaks. This keeps `scripts/soak.sh` working (it once failed before its first hop on a /tmp
//! without pclive directories); the long soaks' numbers are in docs/benchmarks.md.
//!
//! Needs root and what scripts/setup.sh installs; test.sh runs setup before the tests.

mod common;

use std::path::Path;

#[test]
fn two_hops_verify_and_leave_nothing_behind() {
    common::require_root("the soak");
    let out = tempfile::tempdir().unwrap();
    let results = out.path().join("soak.jsonl");
    let output = common::script("soak.sh")
        .args(["--hops", "2", "--mib", "16", "--rate", "none", "--no-setup"])
        .arg("--out")
        .arg(&results)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "soak.sh failed: {}\n{stdout}\n{stderr}",
        output.status
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&results)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let hops: Vec<_> = lines.iter().filter(|l| l.get("hop").is_some()).collect();
    assert_eq!(hops.len(), 2, "{lines:?}");
    assert_eq!(
        (&hops[0]["from"], &hops[0]["to"]),
        (&"src".into(), &"dst".into())
    );
    assert_eq!(
        (&hops[1]["from"], &hops[1]["to"]),
        (&"dst".into(), &"src".into())
    );
    for hop in &hops {
        let downtime = hop["downtime_s"].as_f64().unwrap();
        assert!(downtime > 0.0 && downtime < 5.0, "{hop}");
    }
    let summary = lines.last().unwrap();
    assert_eq!(summary["hops"], 2, "{summary}");
    assert_eq!(summary["leaks"], "none", "{summary}");
    assert!(stderr.contains("nothing leaked"), "{stderr}");
    // Nothing of the test bed is left.
    assert!(!Path::new("/run/pclive-testbed/pclivesoak").exists());
    assert!(!Path::new("/run/netns/pclivesoak-src").exists());
    assert_eq!(
        common::processes_mentioning("pclivesoak"),
        Vec::<String>::new()
    );
}
