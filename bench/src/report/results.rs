//! Result lines (one JSON object per benchmark run), grouped and summarised per mode.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ReportError;

/// One benchmark run. Only `mode`, `link`, `records` and `read_ratio` are required; every
/// measurement may be missing (a run that failed half-way still reports what it has), and
/// unknown fields are ignored.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RunResult {
    pub mode: String,
    pub link: String,
    pub records: u64,
    pub read_ratio: f64,
    pub value_size: Option<u64>,
    pub rate_ops: Option<f64>,
    pub downtime_s: Option<f64>,
    /// What a client that waits on its connection until it fails saw (the patient probe).
    pub patient_downtime_s: Option<f64>,
    /// It got replies again (false: still waiting when the run ended).
    pub patient_recovered: Option<bool>,
    /// Its one connection lasted through the migration (the container's address moved with it).
    pub patient_connection_kept: Option<bool>,
    /// The downtime pclive itself reported (pause to the destination running the container).
    pub reported_downtime_s: Option<f64>,
    #[serde(default)]
    pub phases: Phases,
    pub restore_s: Option<f64>,
    pub migration_s: Option<f64>,
    #[serde(default)]
    pub rounds: Vec<Round>,
    pub precopy_bytes: Option<u64>,
    #[serde(default)]
    pub cpu_s: SrcDst<f64>,
    #[serde(default)]
    pub peak_mem_bytes: SrcDst<u64>,
    pub dst_mem_after_commit_bytes: Option<u64>,
    pub container_rss_bytes: Option<u64>,
    pub integrity: Option<Integrity>,
    pub after_resume_latency_us: Option<Latency>,
    pub timeline: Option<String>,
    pub start_unix: Option<f64>,
    pub pause_unix: Option<f64>,
    pub resume_unix: Option<f64>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct Phases {
    pub freeze_s: Option<f64>,
    pub final_dump_s: Option<f64>,
    pub transfer_s: Option<f64>,
    pub restore_s: Option<f64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Round {
    pub round: Option<u64>,
    pub bytes: Option<u64>,
    pub seconds: Option<f64>,
    pub cpu_seconds: Option<f64>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct SrcDst<T> {
    pub src: Option<T>,
    pub dst: Option<T>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct Integrity {
    pub ok: Option<bool>,
    pub checked: Option<u64>,
    pub mismatches: Option<u64>,
    pub read_mismatches: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct Latency {
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

impl RunResult {
    /// Restore time: the top-level field, else the restore phase.
    pub fn restore_seconds(&self) -> Option<f64> {
        self.restore_s.or(self.phases.restore_s)
    }

    /// The timeline file, resolved against the directory of the results file.
    pub fn timeline_path(&self, results_dir: &Path) -> Option<PathBuf> {
        let path = Path::new(self.timeline.as_deref()?);
        Some(if path.is_absolute() {
            path.to_path_buf()
        } else {
            results_dir.join(path)
        })
    }
}

/// Parses a results file: one JSON object per line, blank lines ignored.
pub fn parse_results(text: &str, source: &str) -> Result<Vec<RunResult>, ReportError> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(number, line)| {
            serde_json::from_str(line).map_err(|e| ReportError::BadLine {
                file: source.to_string(),
                line: number + 1,
                reason: e.to_string(),
            })
        })
        .collect()
}

/// Modes in the order the tables and plots show them; unknown modes follow, by name.
pub const KNOWN_MODES: [&str; 4] = ["baseline", "pclive-eager", "pclive", "pclive-moving"];

pub fn mode_rank(mode: &str) -> (usize, String) {
    let rank = KNOWN_MODES
        .iter()
        .position(|m| *m == mode)
        .unwrap_or(KNOWN_MODES.len());
    (rank, mode.to_string())
}

/// Runs compared with one another: same link, read ratio and data set size.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct GroupKey {
    pub link: String,
    /// The read ratio in thousandths, so that the key orders and compares exactly.
    pub read_permille: u32,
    pub records: u64,
}

impl GroupKey {
    pub fn of(run: &RunResult) -> Self {
        GroupKey {
            link: run.link.clone(),
            read_permille: (run.read_ratio * 1000.0).round() as u32,
            records: run.records,
        }
    }

    pub fn read_ratio(&self) -> f64 {
        f64::from(self.read_permille) / 1000.0
    }

    /// Read-intensive workloads (reads at least half of the operations) have their own targets.
    pub fn read_intensive(&self) -> bool {
        self.read_permille >= 500
    }

    pub fn title(&self) -> String {
        format!(
            "{} link, read ratio {}, {} records",
            self.link,
            self.read_ratio(),
            human_count(self.records)
        )
    }

    /// A file-name-safe name, e.g. `1gbit-r0.9-1M`.
    pub fn slug(&self) -> String {
        let raw = format!(
            "{}-r{}-{}",
            self.link,
            self.read_ratio(),
            human_count(self.records)
        );
        raw.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }
}

/// 1000000 → "1M", 1500 → "1.5k", 123 → "123".
pub fn human_count(n: u64) -> String {
    let (value, suffix) = match n {
        n if n >= 1_000_000 => (n as f64 / 1e6, "M"),
        n if n >= 1_000 => (n as f64 / 1e3, "k"),
        n => return n.to_string(),
    };
    let text = format!("{value:.2}");
    format!(
        "{}{suffix}",
        text.trim_end_matches('0').trim_end_matches('.')
    )
}

/// One mode within a group: the median of each measurement over its runs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModeSummary {
    pub mode: String,
    pub runs: usize,
    pub downtime_s: Option<f64>,
    pub patient_downtime_s: Option<f64>,
    pub reported_downtime_s: Option<f64>,
    pub freeze_s: Option<f64>,
    pub final_dump_s: Option<f64>,
    pub transfer_s: Option<f64>,
    pub restore_s: Option<f64>,
    pub migration_s: Option<f64>,
    pub rounds: Option<f64>,
    pub precopy_bytes: Option<f64>,
    pub cpu_src_s: Option<f64>,
    pub cpu_dst_s: Option<f64>,
    pub peak_mem_src: Option<f64>,
    pub peak_mem_dst: Option<f64>,
    pub dst_mem_after_commit: Option<f64>,
    pub container_rss: Option<f64>,
    /// Load latency in the second after the service resumed (µs).
    pub resume_p50_us: Option<f64>,
    pub resume_p99_us: Option<f64>,
    /// `Some(true)` when every run that reported integrity was intact.
    pub integrity_ok: Option<bool>,
    /// Runs whose integrity check failed.
    pub integrity_failures: usize,
    /// Runs whose patient client was still waiting when the run ended.
    pub patient_stuck: usize,
    /// `Some(true)` when the patient client kept its one connection in every run that said.
    pub patient_kept: Option<bool>,
}

impl ModeSummary {
    pub fn of(mode: &str, runs: &[&RunResult]) -> Self {
        let median_of = |get: &dyn Fn(&RunResult) -> Option<f64>| {
            median(runs.iter().filter_map(|r| get(r)).collect())
        };
        let integrity: Vec<bool> = runs
            .iter()
            .filter_map(|r| r.integrity.and_then(|i| i.ok))
            .collect();
        ModeSummary {
            mode: mode.to_string(),
            runs: runs.len(),
            downtime_s: median_of(&|r| r.downtime_s),
            patient_downtime_s: median_of(&|r| r.patient_downtime_s),
            reported_downtime_s: median_of(&|r| r.reported_downtime_s),
            freeze_s: median_of(&|r| r.phases.freeze_s),
            final_dump_s: median_of(&|r| r.phases.final_dump_s),
            transfer_s: median_of(&|r| r.phases.transfer_s),
            restore_s: median_of(&|r| r.restore_seconds()),
            migration_s: median_of(&|r| r.migration_s),
            rounds: median_of(&|r| (!r.rounds.is_empty()).then_some(r.rounds.len() as f64)),
            precopy_bytes: median_of(&|r| r.precopy_bytes.map(|b| b as f64)),
            cpu_src_s: median_of(&|r| r.cpu_s.src),
            cpu_dst_s: median_of(&|r| r.cpu_s.dst),
            peak_mem_src: median_of(&|r| r.peak_mem_bytes.src.map(|b| b as f64)),
            peak_mem_dst: median_of(&|r| r.peak_mem_bytes.dst.map(|b| b as f64)),
            dst_mem_after_commit: median_of(&|r| r.dst_mem_after_commit_bytes.map(|b| b as f64)),
            container_rss: median_of(&|r| r.container_rss_bytes.map(|b| b as f64)),
            resume_p50_us: median_of(&|r| r.after_resume_latency_us.and_then(|l| l.p50)),
            resume_p99_us: median_of(&|r| r.after_resume_latency_us.and_then(|l| l.p99)),
            integrity_ok: (!integrity.is_empty()).then(|| integrity.iter().all(|ok| *ok)),
            integrity_failures: integrity.iter().filter(|ok| !**ok).count(),
            patient_stuck: runs
                .iter()
                .filter(|r| r.patient_recovered == Some(false))
                .count(),
            patient_kept: {
                let kept: Vec<bool> = runs
                    .iter()
                    .filter_map(|r| r.patient_connection_kept)
                    .collect();
                (!kept.is_empty()).then(|| kept.iter().all(|k| *k))
            },
        }
    }
}

pub fn median(mut values: Vec<f64>) -> Option<f64> {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

/// A group's runs and per-mode summaries (modes in display order).
#[derive(Debug, Clone)]
pub struct Group<'a> {
    pub key: GroupKey,
    pub runs: Vec<&'a RunResult>,
    pub modes: Vec<ModeSummary>,
}

impl Group<'_> {
    pub fn mode(&self, mode: &str) -> Option<&ModeSummary> {
        self.modes.iter().find(|m| m.mode == mode)
    }
}

pub fn group(results: &[RunResult]) -> Vec<Group<'_>> {
    let mut by_key: BTreeMap<GroupKey, Vec<&RunResult>> = BTreeMap::new();
    for run in results {
        by_key.entry(GroupKey::of(run)).or_default().push(run);
    }
    by_key
        .into_iter()
        .map(|(key, runs)| {
            let mut by_mode: BTreeMap<(usize, String), Vec<&RunResult>> = BTreeMap::new();
            for run in &runs {
                by_mode.entry(mode_rank(&run.mode)).or_default().push(run);
            }
            let modes = by_mode
                .iter()
                .map(|((_, mode), runs)| ModeSummary::of(mode, runs))
                .collect();
            Group { key, runs, modes }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_minimal_and_full_lines_ignoring_unknown_fields() {
        let text = r#"
{"mode":"pclive","link":"1gbit","records":1000,"read_ratio":0.9,"future_field":[1,2]}

{"mode":"baseline","link":"1gbit","records":1000,"read_ratio":0.9,"downtime_s":2.5,"phases":{"freeze_s":0.1,"restore_s":1.5},"rounds":[{"round":1,"bytes":10,"seconds":0.5,"cpu_seconds":0.4}],"cpu_s":{"src":1.0},"integrity":{"ok":true,"checked":1000,"mismatches":0,"read_mismatches":0},"timeline":"t/b.jsonl"}
"#;
        let runs = parse_results(text, "r.jsonl").unwrap();
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].downtime_s, None);
        assert_eq!(runs[1].restore_seconds(), Some(1.5));
        assert_eq!(runs[1].cpu_s.src, Some(1.0));
        assert_eq!(
            runs[1].timeline_path(Path::new("/res")),
            Some(PathBuf::from("/res/t/b.jsonl"))
        );
        let err = parse_results("{\"mode\":1}\n", "r.jsonl").unwrap_err();
        assert!(err.to_string().contains("r.jsonl:1"), "{err}");
    }

    #[test]
    fn groups_by_link_ratio_and_size_with_modes_in_order() {
        let run = |mode: &str, records, downtime| RunResult {
            mode: mode.into(),
            link: "1gbit".into(),
            records,
            read_ratio: 0.9,
            downtime_s: Some(downtime),
            ..Default::default()
        };
        let results = vec![
            run("pclive", 1000, 0.1),
            run("baseline", 1000, 2.0),
            run("pclive", 1000, 0.3),
            run("pclive", 1000, 0.2),
            run("pclive-eager", 1000, 0.5),
            run("pclive", 2000, 0.1),
        ];
        let groups = group(&results);
        assert_eq!(groups.len(), 2);
        let modes: Vec<&str> = groups[0].modes.iter().map(|m| m.mode.as_str()).collect();
        assert_eq!(modes, ["baseline", "pclive-eager", "pclive"]);
        let pclive = groups[0].mode("pclive").unwrap();
        assert_eq!((pclive.runs, pclive.downtime_s), (3, Some(0.2)));
        assert_eq!(groups[0].key.slug(), "1gbit-r0.9-1k");
    }

    #[test]
    fn medians_and_counts() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0]), Some(2.0));
        assert_eq!(median(vec![3.0, 1.0, 2.0, f64::NAN]), Some(2.0));
        assert_eq!(human_count(1_000_000), "1M");
        assert_eq!(human_count(2_500_000), "2.5M");
        assert_eq!(human_count(100), "100");
    }
}
