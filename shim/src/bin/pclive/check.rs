//! `pclive check`: what this host offers pclive.

use std::process::ExitCode;

use clap::Args;
use restore_engine::host;

#[derive(Args, Debug)]
#[command(
    about = "Show what this host offers pclive: tool versions and kernel features",
    long_about = "Checks containerd, runc and CRIU versions, userfaultfd (lazy restore), \
write-protect tracking, soft-dirty and cgroups, and says what each means for pclive. Each line is \
marked ok, note (pclive works, but slower or more limited here than it could be: the line says \
why and what to do) or FAIL. Exit code 1 if this host cannot run pclive (a FAIL); notes do not \
change it."
)]
pub struct CheckArgs {
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: CheckArgs) -> ExitCode {
    let json = args.json;
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
        let name_width = report
            .findings
            .iter()
            .map(|f| f.name.len())
            .max()
            .unwrap_or(0);
        let detail_width = report
            .findings
            .iter()
            .map(|f| f.detail.chars().count())
            .max()
            .unwrap_or(0);
        for f in &report.findings {
            let mark = match (f.ok, f.note) {
                (false, _) => "FAIL",
                (true, true) => "note",
                (true, false) => "ok  ",
            };
            println!(
                "{mark} {:<name_width$} {:<detail_width$} {}",
                f.name, f.detail, f.meaning
            );
        }
    }
    if report.ready() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
