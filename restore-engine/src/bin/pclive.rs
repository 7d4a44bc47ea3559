//! `pclive`: the command-line side of pclive.

use std::process::ExitCode;

use restore_engine::host;

const HELP: &str = "\
pclive — live migration of containers between containerd hosts

USAGE:
    pclive check [--json]     what this host offers pclive (tool versions, kernel features)
    pclive dirty-rate PID [--rounds N] [--interval-ms MS] [--tracker content-hash|soft-dirty] [--json]
                              how fast a process dirties its memory, measured with the tracker
                              pre-copy uses: tells whether a migration will converge
    pclive version            print the version
    pclive help               this text

Containers run with `ctr run --runtime io.containerd.pclive.v2 ...`. Checkpoint with
`ctr task checkpoint --image-path DIR [--exit] ID`; restore by creating a container with the
annotation io.containerd.pclive.restore.image-path=DIR, lazily (tasks resume at once, memory is
installed with userfaultfd) with io.containerd.pclive.restore.lazy-pages=true as well.

EXIT CODES:
    0  success    1  the host lacks something pclive needs    2  usage error";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None | Some("help" | "--help" | "-h") => {
            println!("{HELP}");
            ExitCode::SUCCESS
        }
        Some("version" | "--version" | "-V") => {
            println!("pclive {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some("check") => check(&args[1..]),
        Some("dirty-rate") => dirty_rate(&args[1..]),
        Some(other) => {
            eprintln!("pclive: unknown command '{other}'\n\n{HELP}");
            ExitCode::from(2)
        }
    }
}

fn check(args: &[String]) -> ExitCode {
    let json = match args {
        [] => false,
        [flag] if flag == "--json" => true,
        _ => {
            eprintln!("usage: pclive check [--json]");
            return ExitCode::from(2);
        }
    };
    let report = host::inspect();
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("pclive: cannot encode the report: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        println!("kernel {}", report.kernel);
        for f in &report.findings {
            let mark = if f.ok { "ok  " } else { "FAIL" };
            println!("{mark} {:<12} {:<40} {}", f.name, f.detail, f.meaning);
        }
    }
    if report.ready() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn dirty_rate(args: &[String]) -> ExitCode {
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
        let delta = match tracker.round(pid) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("pclive: {e}");
                return ExitCode::FAILURE;
            }
        };
        let seconds = started.elapsed().as_secs_f64();
        let dirty = delta.data_pages() * memory::PAGE;
        if round == 0 {
            scanned_before = dirty;
        }
        let gbps = scanned_before as f64 / seconds.max(1e-9) / 1e9;
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "round": round, "dirty_bytes": dirty, "zero_pages": delta.zero.len(),
                    "scan_seconds": seconds, "scanned_gb_per_s": gbps,
                    "interval_seconds": interval.as_secs_f64(), "tracker": tracker.name(),
                })
            );
        } else {
            println!(
                "{round:>5}  {:>9.1}  {:>10}  {seconds:>6.3}  {gbps:>12.2}",
                dirty as f64 / (1 << 20) as f64,
                delta.zero.len()
            );
        }
        if round < rounds {
            std::thread::sleep(interval);
        }
    }
    ExitCode::SUCCESS
}
