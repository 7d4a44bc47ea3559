//! `pclive check`: what this host offers pclive.

use std::process::ExitCode;

use restore_engine::host;

pub fn run(args: &[String]) -> ExitCode {
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
