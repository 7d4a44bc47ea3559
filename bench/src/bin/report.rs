//! `pclive-bench-report`: Markdown tables, target verdicts and PNG plots from benchmark results.

use std::path::PathBuf;
use std::process::ExitCode;

use pclive_bench::args::Flags;
use pclive_bench::report::{self, targets::Verdict};

const HELP: &str = "\
pclive-bench-report — tables, targets and plots from pclive benchmark results

USAGE:
    pclive-bench-report --input results.jsonl --out-dir DIR

    Reads one JSON object per line (mode baseline|pclive-eager|pclive, link, records,
    read_ratio, and the measurements: downtime_s, phases, restore_s, migration_s, rounds,
    precopy_bytes, cpu_s, peak_mem_bytes, dst_mem_after_commit_bytes, container_rss_bytes,
    integrity, timeline, start_unix, pause_unix, resume_unix; missing ones show as –, unknown
    fields are ignored). Timeline paths are relative to the input file's directory.

    Writes into DIR:
      results.md                 a table per (link, read ratio, records) with the median of each
                                 mode's runs, then the targets (met/missed against the baseline)
      downtime-split.png         downtime phases stacked per mode and group
      restore-vs-size.png        restore time against record count, per mode
      rounds-cpu.png             source CPU of each pre-copy round after the first against
                                 the bytes it sent, per mode (when runs have such rounds)
      throughput-<group>.png     ops/s over time per mode from the timelines, with pause/resume

    Needs the font /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf (apt-get install
    fonts-dejavu-core).

EXIT CODES:
    0  report written (targets missed or not)
    1  input unreadable or invalid, or output could not be written
    2  usage error";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty()
        || args
            .iter()
            .any(|a| matches!(a.as_str(), "help" | "--help" | "-h"))
    {
        println!("{HELP}");
        return ExitCode::SUCCESS;
    }
    let parsed = Flags::parse(&args, &["input", "out-dir"]).and_then(|flags| {
        Ok((
            flags.required::<PathBuf>("input")?,
            flags.required::<PathBuf>("out-dir")?,
        ))
    });
    let (input, out_dir) = match parsed {
        Ok(paths) => paths,
        Err(e) => {
            eprintln!("pclive-bench-report: {e}\nrun `pclive-bench-report --help` for usage");
            return ExitCode::from(2);
        }
    };
    match report::generate(&input, &out_dir) {
        Ok(generated) => {
            let count =
                |v: fn(&Verdict) -> bool| generated.checks.iter().filter(|c| v(&c.verdict)).count();
            eprintln!(
                "report: {} runs in {} groups; targets: {} met, {} missed; wrote {} in {}",
                generated.runs,
                generated.groups,
                count(|v| *v == Verdict::Met),
                count(|v| *v == Verdict::Missed),
                generated.files.join(", "),
                out_dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pclive-bench-report: {e}");
            ExitCode::from(1)
        }
    }
}
