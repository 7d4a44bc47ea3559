//! PNG plots with plotters' bitmap backend. Text is drawn with ab_glyph from a TTF read at run
//! time, so the binary needs no fontconfig or freetype.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use super::results::{mode_rank, Group, RunResult};
use super::ReportError;

/// DejaVu Sans, from Debian's fonts-dejavu-core.
pub const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
pub const FONT_PACKAGE: &str = "fonts-dejavu-core";
/// The family name plotters asks for by default; we register our TTF under it.
const FAMILY: &str = "sans-serif";

/// Loads and registers the font once per process.
pub fn ensure_font() -> Result<(), ReportError> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let bytes = std::fs::read(FONT_PATH).map_err(|e| e.to_string())?;
            // plotters keeps fonts for the life of the process: leaking the one copy is intended.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            register_font(FAMILY, FontStyle::Normal, bytes)
                .map_err(|_| "not a valid TrueType font".to_string())
        })
        .clone()
        .map_err(|reason| ReportError::Font {
            path: FONT_PATH,
            package: FONT_PACKAGE,
            reason,
        })
}

fn plot_error(path: &Path) -> impl Fn(String) -> ReportError + '_ {
    move |reason| ReportError::Plot {
        path: path.display().to_string(),
        reason,
    }
}

/// Turns any plotters error into text (their error types are generic over the backend).
macro_rules! drawn {
    ($e:expr, $path:expr) => {
        $e.map_err(|e| plot_error($path)(e.to_string()))?
    };
}

const PHASES: [(&str, RGBColor); 4] = [
    ("freeze", RGBColor(0x4c, 0x72, 0xb0)),
    ("final dump", RGBColor(0xdd, 0x84, 0x52)),
    ("transfer", RGBColor(0x55, 0xa8, 0x68)),
    ("restore", RGBColor(0xc4, 0x4e, 0x52)),
];

pub fn mode_color(mode: &str) -> RGBColor {
    match mode {
        "baseline" => RGBColor(0xc4, 0x4e, 0x52),
        "pclive-eager" => RGBColor(0xdd, 0x84, 0x52),
        "pclive" => RGBColor(0x4c, 0x72, 0xb0),
        "pclive-moving" => RGBColor(0x55, 0xa8, 0x68),
        "pclive-hash" => RGBColor(0x81, 0x72, 0xb2),
        "pclive-wp" => RGBColor(0x2a, 0x9d, 0x8f),
        other => {
            let c = Palette99::pick(other.bytes().map(usize::from).sum::<usize>()).to_rgba();
            RGBColor(c.0, c.1, c.2)
        }
    }
}

/// Stacked bars of the downtime phases: one panel per group, one bar per mode.
pub fn downtime_split(groups: &[Group], path: &Path) -> Result<(), ReportError> {
    let columns = groups.len().clamp(1, 3);
    let rows = groups.len().div_ceil(columns).max(1);
    let root = BitMapBackend::new(path, (420 * columns as u32, 360 * rows as u32 + 40))
        .into_drawing_area();
    drawn!(root.fill(&WHITE), path);
    let (title, body) = root.split_vertically(40);
    drawn!(title.titled("Downtime by phase (s)", (FAMILY, 22)), path);
    let panels = body.split_evenly((rows, columns));
    for (group, panel) in groups.iter().zip(panels.iter()) {
        let bars: Vec<(String, [f64; 4])> = group
            .modes
            .iter()
            .map(|m| {
                let phases = [m.freeze_s, m.final_dump_s, m.transfer_s, m.restore_s]
                    .map(|p| p.unwrap_or(0.0).max(0.0));
                (m.mode.clone(), phases)
            })
            .collect();
        let top = bars
            .iter()
            .map(|(_, p)| p.iter().sum::<f64>())
            .fold(0.0, f64::max)
            .max(1e-3)
            * 1.15;
        let mut chart = drawn!(
            ChartBuilder::on(panel)
                .caption(group.key.slug(), (FAMILY, 16))
                .margin(8)
                .x_label_area_size(28)
                .y_label_area_size(48)
                .build_cartesian_2d(-0.5..bars.len() as f64 - 0.5, 0.0..top),
            path
        );
        let labels: Vec<String> = bars.iter().map(|(mode, _)| mode.clone()).collect();
        let label_of = move |x: &f64| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                labels.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        };
        drawn!(
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(bars.len().max(1))
                .x_label_formatter(&label_of)
                .y_desc("seconds")
                .label_style((FAMILY, 12))
                .draw(),
            path
        );
        for (phase_index, (phase, color)) in PHASES.iter().enumerate() {
            let rects = bars.iter().enumerate().map(|(i, (_, phases))| {
                let below: f64 = phases[..phase_index].iter().sum();
                let x = i as f64;
                Rectangle::new(
                    [(x - 0.3, below), (x + 0.3, below + phases[phase_index])],
                    color.filled(),
                )
            });
            let color = *color;
            drawn!(chart.draw_series(rects), path)
                .label(*phase)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled())
                });
        }
        drawn!(
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .label_font((FAMILY, 12))
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw(),
            path
        );
    }
    drawn!(root.present(), path);
    Ok(())
}

/// Restore time against data set size, one line per mode (and per link and read ratio when
/// there are several).
pub fn restore_vs_size(groups: &[Group], path: &Path) -> Result<(), ReportError> {
    let several_workloads = groups
        .iter()
        .map(|g| (&g.key.link, g.key.read_permille))
        .collect::<std::collections::BTreeSet<_>>()
        .len()
        > 1;
    // (mode order and name, workload suffix) → (records, restore seconds)
    type SeriesKey = ((usize, String), String);
    let mut series: BTreeMap<SeriesKey, Vec<(f64, f64)>> = BTreeMap::new();
    for group in groups {
        for mode in &group.modes {
            let Some(restore) = mode.restore_s else {
                continue;
            };
            let workload = if several_workloads {
                format!(" {} r{}", group.key.link, group.key.read_ratio())
            } else {
                String::new()
            };
            series
                .entry((mode_rank(&mode.mode), workload))
                .or_default()
                .push((group.key.records as f64, restore));
        }
    }
    let max_x = series.values().flatten().map(|p| p.0).fold(1.0, f64::max) * 1.05;
    let max_y = series.values().flatten().map(|p| p.1).fold(1e-3, f64::max) * 1.15;
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    drawn!(root.fill(&WHITE), path);
    let mut chart = drawn!(
        ChartBuilder::on(&root)
            .caption("Restore time vs data set size", (FAMILY, 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..max_x, 0.0..max_y),
        path
    );
    drawn!(
        chart
            .configure_mesh()
            .x_desc("records")
            .y_desc("restore (s)")
            .x_label_formatter(&|x| super::results::human_count(x.max(0.0) as u64))
            .label_style((FAMILY, 13))
            .draw(),
        path
    );
    // Same colour per mode; the workloads after the first are dashed.
    let workloads: Vec<String> = series
        .keys()
        .map(|(_, workload)| workload.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    for (((_, mode), workload), mut points) in series {
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let color = mode_color(&mode);
        let dashed = workloads.iter().position(|w| *w == workload).unwrap_or(0) > 0;
        let style = color.stroke_width(2);
        let legend = move |(x, y): (i32, i32)| PathElement::new([(x, y), (x + 16, y)], style);
        if dashed {
            drawn!(
                chart.draw_series(DashedLineSeries::new(points.clone(), 8, 5, style)),
                path
            )
            .label(format!("{mode}{workload}"))
            .legend(legend);
        } else {
            drawn!(
                chart.draw_series(LineSeries::new(points.clone(), style)),
                path
            )
            .label(format!("{mode}{workload}"))
            .legend(legend);
        }
        drawn!(
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled()))),
            path
        );
    }
    drawn!(
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font((FAMILY, 13))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw(),
        path
    );
    drawn!(root.present(), path);
    Ok(())
}

/// Source CPU of each pre-copy round after the first against the bytes it sent, one series
/// per mode: a tracker that reads all memory each round (content-hash) costs the same whatever
/// the round sends; a write-protect tracker's cost follows the pages written. The first round
/// (all memory) is left out so that the later ones are readable. `false`: no round to plot.
pub fn rounds_cpu(groups: &[Group], path: &Path) -> Result<bool, ReportError> {
    let mut series: BTreeMap<(usize, String), Vec<(f64, f64)>> = BTreeMap::new();
    for run in groups.iter().flat_map(|g| &g.runs) {
        for round in run.rounds.iter().skip(1) {
            if let (Some(bytes), Some(cpu)) = (round.bytes, round.cpu_seconds) {
                series
                    .entry(mode_rank(&run.mode))
                    .or_default()
                    .push((bytes as f64 / 1e6, cpu));
            }
        }
    }
    if series.is_empty() {
        return Ok(false);
    }
    let max_x = series.values().flatten().map(|p| p.0).fold(1.0, f64::max) * 1.05;
    let max_y = series.values().flatten().map(|p| p.1).fold(1e-3, f64::max) * 1.15;
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    drawn!(root.fill(&WHITE), path);
    let mut chart = drawn!(
        ChartBuilder::on(&root)
            .caption(
                "Source CPU per pre-copy round (after the first) vs what it sent",
                (FAMILY, 22),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..max_x, 0.0..max_y),
        path
    );
    drawn!(
        chart
            .configure_mesh()
            .x_desc("round's pages (MB)")
            .y_desc("source CPU (s)")
            .label_style((FAMILY, 13))
            .draw(),
        path
    );
    for ((_, mode), points) in series {
        let color = mode_color(&mode);
        drawn!(
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 5, color.filled()))),
            path
        )
        .label(mode)
        .legend(move |(x, y)| Circle::new((x + 8, y), 5, color.filled()));
    }
    drawn!(
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font((FAMILY, 13))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw(),
        path
    );
    drawn!(root.present(), path);
    Ok(true)
}

/// A run's throughput over time, from its timeline file.
#[derive(Debug, Clone, PartialEq)]
pub struct Throughput {
    pub mode: String,
    /// (seconds since migration start, operations per second)
    pub points: Vec<(f64, f64)>,
    pub pause_s: Option<f64>,
    pub resume_s: Option<f64>,
}

#[derive(serde::Deserialize)]
struct TimelineLine {
    t: f64,
    #[serde(default)]
    reads: u64,
    #[serde(default)]
    writes: u64,
}

/// Reads a timeline (`run --timeline` lines) into ops/s relative to the migration start
/// (`start_unix`, else the first bucket).
pub fn throughput_of(run: &RunResult, timeline: &Path) -> Result<Throughput, ReportError> {
    let text = std::fs::read_to_string(timeline).map_err(|e| ReportError::Input {
        path: timeline.display().to_string(),
        source: e,
    })?;
    let mut lines = Vec::new();
    for (number, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        lines.push(serde_json::from_str::<TimelineLine>(line).map_err(|e| {
            ReportError::BadLine {
                file: timeline.display().to_string(),
                line: number + 1,
                reason: e.to_string(),
            }
        })?);
    }
    let width = super::results::median(lines.windows(2).map(|w| w[1].t - w[0].t).collect())
        .filter(|w| *w > 0.0)
        .unwrap_or(0.1);
    let origin = run.start_unix.or(lines.first().map(|l| l.t)).unwrap_or(0.0);
    Ok(Throughput {
        mode: run.mode.clone(),
        points: lines
            .iter()
            .map(|l| (l.t - origin, (l.reads + l.writes) as f64 / width))
            .collect(),
        pause_s: run.pause_unix.map(|t| t - origin),
        resume_s: run.resume_unix.map(|t| t - origin),
    })
}

/// The first run with a timeline of each mode in the group.
pub fn group_throughputs(group: &Group, results_dir: &Path) -> Vec<Throughput> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for run in &group.runs {
        let Some(timeline) = run.timeline_path(results_dir) else {
            continue;
        };
        if seen.contains(&run.mode) {
            continue;
        }
        match throughput_of(run, &timeline) {
            Ok(t) => {
                seen.insert(run.mode.clone());
                out.push(t);
            }
            Err(e) => eprintln!("report: skipping a {} timeline: {e}", run.mode),
        }
    }
    out.sort_by_key(|t| mode_rank(&t.mode));
    out
}

pub fn throughput_plot(title: &str, runs: &[Throughput], path: &Path) -> Result<(), ReportError> {
    let all = runs.iter().flat_map(|r| r.points.iter());
    let (min_x, max_x, max_y) = all.fold((0.0f64, 1.0f64, 1.0f64), |(lo, hi, y), p| {
        (lo.min(p.0), hi.max(p.0), y.max(p.1))
    });
    let root = BitMapBackend::new(path, (1000, 520)).into_drawing_area();
    drawn!(root.fill(&WHITE), path);
    let mut chart = drawn!(
        ChartBuilder::on(&root)
            .caption(format!("Throughput: {title}"), (FAMILY, 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(min_x..max_x, 0.0..max_y * 1.1),
        path
    );
    drawn!(
        chart
            .configure_mesh()
            .x_desc("seconds since migration start")
            .y_desc("ops/s")
            .label_style((FAMILY, 13))
            .draw(),
        path
    );
    for run in runs {
        let color = mode_color(&run.mode);
        drawn!(
            chart.draw_series(LineSeries::new(run.points.clone(), color.stroke_width(2))),
            path
        )
        .label(run.mode.clone())
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2)));
        // Pause and resume: dashed vertical lines in the run's colour.
        for marker in [run.pause_s, run.resume_s].into_iter().flatten() {
            drawn!(
                chart.draw_series(DashedLineSeries::new(
                    [(marker, 0.0), (marker, max_y * 1.1)],
                    6,
                    4,
                    color.stroke_width(1),
                )),
                path
            );
        }
    }
    drawn!(
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font((FAMILY, 13))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw(),
        path
    );
    drawn!(root.present(), path);
    Ok(())
}

/// Writes every plot into `out_dir`; returns the file names written.
pub fn write_all(
    groups: &[Group],
    results_dir: &Path,
    out_dir: &Path,
) -> Result<Vec<String>, ReportError> {
    ensure_font()?;
    let mut written = Vec::new();
    let mut output = |name: String| -> PathBuf {
        written.push(name.clone());
        out_dir.join(name)
    };
    downtime_split(groups, &output("downtime-split.png".into()))?;
    restore_vs_size(groups, &output("restore-vs-size.png".into()))?;
    let rounds = out_dir.join("rounds-cpu.png");
    if rounds_cpu(groups, &rounds)? {
        output("rounds-cpu.png".into());
    }
    for group in groups {
        let runs = group_throughputs(group, results_dir);
        if runs.is_empty() {
            eprintln!(
                "report: no timeline for {}: no throughput plot",
                group.key.title()
            );
            continue;
        }
        let name = format!("throughput-{}.png", group.key.slug());
        throughput_plot(&group.key.title(), &runs, &output(name))?;
    }
    Ok(written)
}
