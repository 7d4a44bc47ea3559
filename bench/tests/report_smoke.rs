//! The report from a small synthetic results file: Markdown and every PNG are written.

use std::path::Path;
use std::process::Command;

use pclive_bench::report::plots::FONT_PATH;

const REPORT: &str = env!("CARGO_BIN_EXE_pclive-bench-report");

fn result_line(
    mode: &str,
    read_ratio: f64,
    records: u64,
    downtime: f64,
    restore: f64,
    timeline: Option<&str>,
) -> String {
    let start = 1_700_000_000.0;
    let mut line = serde_json::json!({
        "mode": mode, "link": "1gbit", "records": records, "value_size": 1024,
        "read_ratio": read_ratio, "rate_ops": 3000,
        "downtime_s": downtime,
        "phases": {"freeze_s": downtime * 0.1, "final_dump_s": downtime * 0.3,
                   "transfer_s": downtime * 0.2, "restore_s": restore},
        "restore_s": restore, "migration_s": 12.5,
        "rounds": [{"round": 1, "bytes": 1u64 << 30, "seconds": 9.0, "cpu_seconds": 2.0}],
        "precopy_bytes": 1u64 << 30,
        "cpu_s": {"src": 3.0, "dst": 2.0},
        "peak_mem_bytes": {"src": 1u64 << 31, "dst": 3u64 << 29},
        "dst_mem_after_commit_bytes": 1_100_000_000u64, "container_rss_bytes": 1_050_000_000u64,
        "integrity": {"ok": true, "checked": records, "mismatches": 0, "read_mismatches": 0},
        "after_resume_latency_us": {"p50": 80.0, "p99": 900.0},
        "start_unix": start, "pause_unix": start + 10.0, "resume_unix": start + 10.0 + downtime,
        "some_future_field": "ignored"
    });
    if let Some(timeline) = timeline {
        line["timeline"] = timeline.into();
    }
    line.to_string()
}

/// A timeline like `run` writes: 3000 ops/s, nothing during the downtime.
fn write_timeline(path: &Path, downtime: f64) {
    let start = 1_700_000_000.0 - 2.0;
    let lines: Vec<String> = (0..200)
        .map(|i| {
            let t = start + f64::from(i) * 0.1;
            let paused = t >= 1_700_000_010.0 && t < 1_700_000_010.0 + downtime;
            let reads = if paused { 0 } else { 270 };
            let writes = if paused { 0 } else { 30 };
            serde_json::json!({"t": t, "reads": reads, "writes": writes, "errors": 0,
                               "p50_us": 60, "p99_us": 300, "endpoint": 0})
            .to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n")).unwrap();
}

#[test]
fn writes_markdown_and_plots() {
    // setup.sh installs the font: without it the benchmark cannot draw, so this fails.
    assert!(
        Path::new(FONT_PATH).exists(),
        "{FONT_PATH} is missing: run scripts/setup.sh (apt-get install fonts-dejavu-core)"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("timelines")).unwrap();
    write_timeline(&dir.path().join("timelines/baseline.jsonl"), 2.0);
    write_timeline(&dir.path().join("timelines/pclive.jsonl"), 0.15);
    let absolute = dir.path().join("eager.jsonl");
    write_timeline(&absolute, 0.6);
    let lines = [
        result_line(
            "baseline",
            0.9,
            1_000_000,
            2.0,
            8.0,
            Some("timelines/baseline.jsonl"),
        ),
        result_line(
            "pclive-eager",
            0.9,
            1_000_000,
            0.6,
            4.0,
            Some(absolute.to_str().unwrap()),
        ),
        result_line(
            "pclive",
            0.9,
            1_000_000,
            0.15,
            0.5,
            Some("timelines/pclive.jsonl"),
        ),
        result_line("baseline", 0.9, 2_000_000, 4.0, 16.0, None),
        result_line("pclive", 0.9, 2_000_000, 0.5, 0.6, None),
        // A timeline that does not exist: the plot goes on without it.
        result_line("baseline", 0.1, 1_000_000, 2.0, 8.0, Some("missing.jsonl")),
        r#"{"mode":"pclive","link":"1gbit","records":1000000,"read_ratio":0.1}"#.to_string(),
    ];
    let input = dir.path().join("results.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let out = dir.path().join("report");

    let output = Command::new(REPORT)
        .args([
            "--input",
            input.to_str().unwrap(),
            "--out-dir",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");

    let markdown = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(
        markdown.contains("## 1gbit link, read ratio 0.9, 1M records"),
        "{markdown}"
    );
    assert!(markdown.contains("| pclive-eager |"), "{markdown}");
    assert!(markdown.contains("met: 1/13.3 (target 1/10)"), "{markdown}");
    assert!(
        markdown.contains("missed: 1/8.0, target 1/10"),
        "{markdown}"
    );
    assert!(markdown.contains("met: 1/16.0 (target 1/10)"), "{markdown}");
    assert!(markdown.contains("met: 1/26.7 (target 1/15)"), "{markdown}");
    assert!(
        markdown.contains("met: 1.20x from 1M to 2M records"),
        "{markdown}"
    );
    assert!(markdown.contains("no verdict"), "{markdown}");

    for png in [
        "downtime-split.png",
        "restore-vs-size.png",
        "throughput-1gbit-r0.9-1M.png",
    ] {
        let bytes = std::fs::read(out.join(png)).unwrap_or_else(|e| panic!("{png}: {e}"));
        assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
            "{png} is not a PNG"
        );
        assert!(bytes.len() > 5_000, "{png} is suspiciously small");
        assert!(
            markdown.contains(&format!("]({png})")),
            "results.md does not show {png}"
        );
    }
    // The write-intensive group has no readable timeline: no throughput plot for it.
    assert!(!out.join("throughput-1gbit-r0.1-1M.png").exists());
}

#[test]
fn invalid_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("results.jsonl");
    std::fs::write(&input, "{\"mode\":\"pclive\"}\n").unwrap();
    let output = Command::new(REPORT)
        .args([
            "--input",
            input.to_str().unwrap(),
            "--out-dir",
            dir.path().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("results.jsonl:1"), "{stderr}");
    assert!(stderr.contains("link"), "{stderr}");

    let usage = Command::new(REPORT)
        .args(["--input", "x"])
        .output()
        .unwrap();
    assert_eq!(usage.status.code(), Some(2));
}

/// Runs with rounds after the first get the per-round CPU plot (the trackers compared); runs
/// with only a first round do not.
#[test]
fn later_rounds_are_plotted_cpu_against_bytes() {
    if !Path::new(FONT_PATH).exists() {
        eprintln!("SKIPPED (LOUDLY): no font at {FONT_PATH}; scripts/setup.sh installs it");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let with_rounds = |mode: &str| {
        let mut line: serde_json::Value =
            serde_json::from_str(&result_line(mode, 0.9, 1_000_000, 0.5, 0.2, None)).unwrap();
        line["rounds"] = serde_json::json!([
            {"round": 1, "bytes": 1u64 << 30, "seconds": 9.0, "cpu_seconds": 1.0},
            {"round": 2, "bytes": 60_000_000u64, "seconds": 0.5, "cpu_seconds": 0.12},
            {"round": 3, "bytes": 6_000_000u64, "seconds": 0.05, "cpu_seconds": 0.03}
        ]);
        line.to_string()
    };
    let input = dir.path().join("results.jsonl");
    std::fs::write(
        &input,
        [with_rounds("pclive"), with_rounds("pclive-hash")].join("\n") + "\n",
    )
    .unwrap();
    let out = dir.path().join("report");
    let output = Command::new(REPORT)
        .args(["--input", input.to_str().unwrap()])
        .args(["--out-dir", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let png = std::fs::read(out.join("rounds-cpu.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 5_000);
    let markdown = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(markdown.contains("](rounds-cpu.png)"), "{markdown}");
}
