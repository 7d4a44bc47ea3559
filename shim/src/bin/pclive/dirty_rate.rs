//! `pclive dirty-rate PID`: how fast a process dirties its memory, measured with the tracker
//! pre-copy uses.

use std::process::ExitCode;

pub fn run(args: &[String]) -> ExitCode {
    use restore_engine::memory;
    use std::time::{Duration, Instant};

    let usage = "usage: pclive dirty-rate PID [--rounds N] [--interval-ms MS] [--tracker content-hash|soft-dirty] [--json]";
    let Some(pid) = args.first().and_then(|p| p.parse::<u32>().ok()) else {
        eprintln!("{usage}");
        return ExitCode::from(2);
    };
    let mut rounds = 5u32;
    let mut interval = Duration::from_millis(1000);
    let mut tracker_name: Option<String> = None;
    let mut json = false;
    let mut it = args[1..].iter();
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--json" => json = true,
            "--rounds" | "--interval-ms" | "--tracker" => {
                let Some(value) = it.next() else {
                    eprintln!("{usage}");
                    return ExitCode::from(2);
                };
                match flag.as_str() {
                    "--rounds" => rounds = value.parse().unwrap_or(0),
                    "--interval-ms" => {
                        interval = Duration::from_millis(value.parse().unwrap_or(1000))
                    }
                    _ => tracker_name = Some(value.clone()),
                }
            }
            _ => {
                eprintln!("{usage}");
                return ExitCode::from(2);
            }
        }
    }
    if rounds == 0 {
        eprintln!("{usage}");
        return ExitCode::from(2);
    }
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
        if let Err(e) = tracker.round_into(pid, &mut |piece: memory::Delta| {
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
