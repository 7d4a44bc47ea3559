//! `pclive-bench-client`: loads, exercises and verifies a Redis data set for the migration
//! benchmarks (issue #5). JSON results go to stdout, progress to stderr.

use std::path::PathBuf;
use std::process::ExitCode;

use pclive_bench::args::{invalid, Flags, UsageError};
use pclive_bench::client::run::{run, RunConfig};
use pclive_bench::client::{load, signals, verify, ClientError, Workload};
use pclive_bench::conn;

const HELP: &str = "\
pclive-bench-client — Redis load, downtime probe and integrity check for pclive benchmarks

USAGE:
    pclive-bench-client load --endpoint HOST:PORT --records N [--value-size BYTES] [--seed S]
        Writes keys key:0 .. key:N-1, each with the deterministic incompressible value of
        (seed, key, version 0), pipelined. Prints {\"records\":N,\"seconds\":S}.

    pclive-bench-client run --endpoints HOST:PORT[,HOST:PORT...] --records N --stop-file PATH
                            --timeline OUT.jsonl --state OUT.state
                            [--value-size BYTES] [--seed S] [--read-ratio R] [--rate OPS]
                            [--idle-connections N]
        Opens N connections to the first endpoint first (each answers a PING) and holds them
        idle until the end: the connections a migration must carry besides the load's.
        Until PATH exists (or SIGTERM/SIGINT): an open-loop load at OPS operations/s (GET with
        probability R, else SET of the key's next version) on one connection with a 100 ms
        timeout, and a probe PINGing every 1 ms with a 20 ms timeout. Both follow the server:
        on a timeout or error they try the endpoints in rotation (connect and PING, 20 ms each)
        until one answers, so the server can move from the first endpoint to another (live
        migration). GET replies are checked against the expected version (either one when a
        SET's reply was lost). Writes one JSON line per 100 ms to --timeline, the key versions
        to --state (for verify), and a JSON summary to stdout (longest probe gap = downtime).

    pclive-bench-client verify --endpoint HOST:PORT --records N [--value-size BYTES] [--seed S]
                               [--state FILE]
        Checks DBSIZE >= N and every key's value: version 0, or the versions a run left
        (--state). Prints {\"checked\":..,\"mismatches\":..,\"missing\":..,\"dbsize\":..,\"seconds\":..}.

    pclive-bench-client help        this text

DEFAULTS: --value-size 1024, --seed 1, --read-ratio 0.9, --rate 3000.

EXIT CODES:
    0  success
    1  verify found missing or wrong values, or run read a wrong value (read_mismatches > 0),
       or an output file could not be written
    2  usage error, unreachable server, or unreadable state file: nothing was measured";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        None | Some("help" | "--help" | "-h") => {
            println!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Some("load") => load_command(&args[1..]),
        Some("run") => run_command(&args[1..]),
        Some("verify") => verify_command(&args[1..]),
        Some(other) => Err(ClientError::Usage(UsageError::Unknown(other.to_string()))),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("pclive-bench-client: {e}");
            if matches!(e, ClientError::Usage(_)) {
                eprintln!("run `pclive-bench-client --help` for usage");
            }
            ExitCode::from(e.exit_code())
        }
    }
}

const WORKLOAD_FLAGS: [&str; 3] = ["records", "value-size", "seed"];

fn workload(flags: &Flags) -> Result<Workload, UsageError> {
    let records: u64 = flags.required("records")?;
    if records == 0 || records > u64::from(u32::MAX) {
        return Err(invalid("records", records, "must be between 1 and 2^32-1"));
    }
    let value_size: usize = flags.or("value-size", 1024)?;
    if value_size == 0 || value_size > 64 << 20 {
        return Err(invalid(
            "value-size",
            value_size,
            "must be between 1 and 64 MiB",
        ));
    }
    Ok(Workload {
        records,
        value_size,
        seed: flags.or("seed", 1)?,
    })
}

fn with_workload_flags(extra: &[&'static str]) -> Vec<&'static str> {
    WORKLOAD_FLAGS.iter().chain(extra).copied().collect()
}

fn print_json(value: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string(value).expect("reports serialize")
    );
}

fn load_command(args: &[String]) -> Result<u8, ClientError> {
    let flags = Flags::parse(args, &with_workload_flags(&["endpoint"]))?;
    let endpoint: String = flags.required("endpoint")?;
    let workload = workload(&flags)?;
    let report = load::load(&endpoint, &workload)?;
    print_json(&report);
    Ok(0)
}

fn run_command(args: &[String]) -> Result<u8, ClientError> {
    let flags = Flags::parse(
        args,
        &with_workload_flags(&[
            "endpoints",
            "read-ratio",
            "rate",
            "stop-file",
            "timeline",
            "state",
            "idle-connections",
        ]),
    )?;
    let endpoint_list: String = flags.required("endpoints")?;
    let endpoints = endpoint_list
        .split(',')
        .map(|e| {
            conn::resolve(e.trim())
                .map_err(|e| invalid("endpoints", &endpoint_list, &e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if endpoints.len() > usize::from(u8::MAX) {
        return Err(invalid("endpoints", endpoints.len(), "at most 255 endpoints").into());
    }
    let read_ratio: f64 = flags.or("read-ratio", 0.9)?;
    if !(0.0..=1.0).contains(&read_ratio) {
        return Err(invalid("read-ratio", read_ratio, "must be between 0 and 1").into());
    }
    let rate_ops: f64 = flags.or("rate", 3000.0)?;
    if !(rate_ops > 0.0 && rate_ops <= 1e6) {
        return Err(invalid("rate", rate_ops, "must be between 0 and 1000000 ops/s").into());
    }
    let config = RunConfig {
        endpoints,
        workload: workload(&flags)?,
        read_ratio,
        rate_ops,
        stop_file: flags.required::<PathBuf>("stop-file")?,
        timeline: flags.required::<PathBuf>("timeline")?,
        state: flags.required::<PathBuf>("state")?,
        idle_connections: flags.or("idle-connections", 0usize)?,
    };
    let stop = signals::install_stop_handlers();
    let summary = run(&config, stop)?;
    print_json(&summary);
    if summary.read_mismatches > 0 {
        eprintln!(
            "run: {} reads returned a wrong or missing value",
            summary.read_mismatches
        );
        return Ok(1);
    }
    Ok(0)
}

fn verify_command(args: &[String]) -> Result<u8, ClientError> {
    let flags = Flags::parse(args, &with_workload_flags(&["endpoint", "state"]))?;
    let endpoint: String = flags.required("endpoint")?;
    let workload = workload(&flags)?;
    let state: Option<PathBuf> = flags.optional("state")?;
    let report = verify::verify(&endpoint, &workload, state.as_deref())?;
    print_json(&report);
    Ok(if report.ok(workload.records) { 0 } else { 1 })
}
