//! `pclive`: the command-line side of pclive.

use std::process::ExitCode;

use restore_engine::host;

const HELP: &str = "\
pclive — live migration of containers between containerd hosts

USAGE:
    pclive check [--json]     what this host offers pclive (tool versions, kernel features)
    pclive version            print the version
    pclive help               this text

Containers run with `ctr run --runtime io.containerd.pclive.v2 ...`. Checkpoint with
`ctr task checkpoint --image-path DIR [--exit] ID`; restore by creating a container with the
annotation io.containerd.pclive.restore.image-path=DIR.

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
