//! `results.md`: one table per group, then the targets.

use std::fmt::Write;

use super::results::{Group, ModeSummary};
use super::targets::{Check, Verdict};

const COLUMNS: [&str; 19] = [
    "Mode",
    "Runs",
    "Downtime (s)",
    "Patient client's downtime (s)",
    "Reported downtime (s)",
    "Freeze (s)",
    "Final dump (s)",
    "Transfer (s)",
    "Restore (s)",
    "Migration (s)",
    "Rounds",
    "Pre-copy",
    "Src CPU (s)",
    "Dst CPU (s)",
    "Src peak mem growth",
    "Dst peak mem growth",
    "Dst mem after commit / RSS",
    "Latency after resume p50/p99 (ms)",
    "Integrity",
];

/// A missing measurement.
const NONE: &str = "–";

pub fn render(groups: &[Group], checks: &[Check], plots: &[String]) -> String {
    let mut out = String::from("# pclive migration benchmarks\n\n");
    out.push_str(
        "Medians over the runs of each mode. Downtime is what the client saw (longest gap \
         between successful probe replies, or the runner's measure): a probe that gives up on \
         an endpoint after 20 ms; the patient client stays on its connection until it fails \
         (most clients do), and keeps it when the container's address moves with it \
         (pclive-moving: `--move-address`); the reported downtime is pclive's own (pause to the \
         destination running the container). Times in seconds.\n\n",
    );
    for group in groups {
        let _ = writeln!(out, "## {}\n", group.key.title());
        out.push_str(&table(&group.modes));
        out.push('\n');
    }
    out.push_str(&targets_section(checks));
    if !plots.is_empty() {
        out.push_str("\n## Plots\n\n");
        for plot in plots {
            let _ = writeln!(out, "![{plot}]({plot})\n");
        }
    }
    out
}

fn table(modes: &[ModeSummary]) -> String {
    let mut out = format!("| {} |\n", COLUMNS.join(" | "));
    let _ = writeln!(out, "|{}", "---|".repeat(COLUMNS.len()));
    for m in modes {
        let cells = [
            m.mode.clone(),
            m.runs.to_string(),
            seconds(m.downtime_s),
            match m.patient_stuck {
                0 if m.patient_kept == Some(true) => {
                    format!("{} (same connection)", seconds(m.patient_downtime_s))
                }
                0 => seconds(m.patient_downtime_s),
                n => format!(
                    "≥ {} (still waiting at the end in {n} run(s))",
                    seconds(m.patient_downtime_s)
                ),
            },
            seconds(m.reported_downtime_s),
            seconds(m.freeze_s),
            seconds(m.final_dump_s),
            seconds(m.transfer_s),
            seconds(m.restore_s),
            seconds(m.migration_s),
            m.rounds.map_or(NONE.into(), |r| format!("{r}")),
            bytes(m.precopy_bytes),
            seconds(m.cpu_src_s),
            seconds(m.cpu_dst_s),
            bytes(m.peak_mem_src),
            bytes(m.peak_mem_dst),
            memory_over_rss(m),
            match (m.resume_p50_us, m.resume_p99_us) {
                (Some(p50), Some(p99)) => format!("{:.2} / {:.2}", p50 / 1e3, p99 / 1e3),
                _ => NONE.into(),
            },
            integrity(m),
        ];
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
    out
}

fn targets_section(checks: &[Check]) -> String {
    let count = |wanted: fn(&Verdict) -> bool| checks.iter().filter(|c| wanted(&c.verdict)).count();
    let mut out = String::from("## Targets\n\n");
    let _ = writeln!(
        out,
        "{} met, {} missed, {} without data; ratios are against the baseline of the same link, \
         read ratio and data set size (1/N: N times less).\n",
        count(|v| *v == Verdict::Met),
        count(|v| *v == Verdict::Missed),
        count(|v| matches!(v, Verdict::NoData(_))),
    );
    for check in checks {
        let mark = match check.verdict {
            Verdict::Met => "✅",
            Verdict::Missed => "❌",
            Verdict::Info => "ℹ️",
            Verdict::NoData(_) => "❔",
        };
        let _ = writeln!(out, "- {mark} {check}");
    }
    out
}

fn seconds(value: Option<f64>) -> String {
    value.map_or(NONE.into(), |s| format!("{s:.3}"))
}

/// Bytes in binary units, e.g. "1.23 GiB".
pub fn bytes(value: Option<f64>) -> String {
    let Some(b) = value else {
        return NONE.into();
    };
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut scaled = b;
    let mut unit = 0;
    while scaled >= 1024.0 && unit < UNITS.len() - 1 {
        scaled /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b:.0} B")
    } else {
        format!("{scaled:.2} {}", UNITS[unit])
    }
}

fn memory_over_rss(m: &ModeSummary) -> String {
    match (m.dst_mem_after_commit, m.container_rss) {
        (Some(memory), Some(rss)) if rss > 0.0 => format!(
            "{} / {} ({:.2}x)",
            bytes(Some(memory)),
            bytes(Some(rss)),
            memory / rss
        ),
        (memory, rss) => format!("{} / {}", bytes(memory), bytes(rss)),
    }
}

fn integrity(m: &ModeSummary) -> String {
    match m.integrity_ok {
        Some(true) => "ok".into(),
        Some(false) => format!("**FAILED** ({} of {} runs)", m.integrity_failures, m.runs),
        None => NONE.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_units() {
        assert_eq!(bytes(Some(512.0)), "512 B");
        assert_eq!(bytes(Some(1536.0)), "1.50 KiB");
        assert_eq!(bytes(Some(3.0 * 1024.0 * 1024.0 * 1024.0)), "3.00 GiB");
        assert_eq!(bytes(None), "–");
        assert_eq!(seconds(Some(0.12345)), "0.123");
    }

    #[test]
    fn table_has_one_row_per_mode_and_aligned_cells() {
        let modes = vec![
            ModeSummary {
                mode: "baseline".into(),
                runs: 1,
                downtime_s: Some(2.0),
                integrity_ok: Some(true),
                ..Default::default()
            },
            ModeSummary {
                mode: "pclive".into(),
                runs: 2,
                integrity_ok: Some(false),
                integrity_failures: 1,
                dst_mem_after_commit: Some(110.0),
                container_rss: Some(100.0),
                ..Default::default()
            },
        ];
        let text = table(&modes);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        for line in &lines {
            assert_eq!(line.matches('|').count(), COLUMNS.len() + 1, "{line}");
        }
        assert!(lines[2].contains("| 2.000 |"));
        assert!(lines[3].contains("**FAILED** (1 of 2 runs)"));
        assert!(lines[3].contains("(1.10x)"));
    }
}
