//! `pclive dirty-rate PID`: how fast a process dirties its memory, measured with the tracker
//! pre-copy uses.

use std::process::ExitCode;

use clap::Args;

#[derive(Args, Debug)]
#[command(
    about = "Measure how fast a process dirties its memory (will a migration converge?)",
    long_about = "Reads the process's memory round after round with the tracker pre-copy would \
use and prints how much changed in each interval. Round 0 is the full copy. If the dirty rate \
approaches the link's rate, pre-copy cannot converge."
)]
pub struct DirtyRateArgs {
    /// The process (a host pid)
    pub pid: u32,
    /// Rounds after the first
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,
    /// Time between rounds
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    pub interval_ms: u64,
    /// The tracker (default: the best this kernel offers)
    #[arg(long, value_parser = restore_engine::memory::TRACKERS)]
    pub tracker: Option<String>,
    /// Print one JSON object per round
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: DirtyRateArgs) -> ExitCode {
    use restore_engine::memory;
    use std::time::{Duration, Instant};

    let (pid, rounds, json) = (args.pid, args.rounds, args.json);
    let interval = Duration::from_millis(args.interval_ms);
    let tracker_name = args.tracker;
    let mut tracker = match memory::tracker(tracker_name.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("pclive: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !json {
        println!(
            "tracker {}; round 0 is the full copy, later rounds what changed in between",
            tracker.name()
        );
        println!("round  dirty MiB  zero pages  scan s   scanned GB/s");
    }
    let mut scanned_before = 0u64;
    for round in 0..=rounds {
        let started = Instant::now();
        // Counted piece by piece: a whole round of a large process is never held.
        let (mut dirty, mut zero_pages) = (0u64, 0usize);
        // Soft-dirty reads and clears its marks with the process stopped for a moment.
        if let Err(e) = tracker.begin_round(&[pid], &mut memory::StopSignal(pid), false) {
            eprintln!("pclive: {e}");
            return ExitCode::FAILURE;
        }
        if let Err(e) = tracker.round_into(pid, &mut |piece: &mut memory::Delta| {
            dirty += piece.data_pages() * restore_engine::page::SIZE_U64;
            zero_pages += piece.zero.len();
            Ok(())
        }) {
            eprintln!("pclive: {e}");
            return ExitCode::FAILURE;
        }
        let seconds = started.elapsed().as_secs_f64();
        if round == 0 {
            scanned_before = dirty;
        }
        let gbps = scanned_before as f64 / seconds.max(1e-9) / 1e9;
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "round": round, "dirty_bytes": dirty, "zero_pages": zero_pages,
                    "scan_seconds": seconds, "scanned_gb_per_s": gbps,
                    "interval_seconds": interval.as_secs_f64(), "tracker": tracker.name(),
                })
            );
        } else {
            println!(
                "{round:>5}  {:>9.1}  {:>10}  {seconds:>6.3}  {gbps:>12.2}",
                dirty as f64 / (1 << 20) as f64,
                zero_pages
            );
        }
        if round < rounds {
            std::thread::sleep(interval);
        }
    }
    ExitCode::SUCCESS
}
