//! `pclive status [CONTAINER]`: where this host's migrations stand, from their records.

use std::process::ExitCode;

use clap::Args;
use restore_engine::record::{Phase, Record, Role};

use crate::options::{ago, Containerd};

#[derive(Args, Debug)]
#[command(
    about = "Show this host's migrations: phase, peer, timings, and whether one is in doubt",
    long_about = "Shows the migrations this host took part in, as the shim recorded them (before \
each step). By default the latest migration of each container and role; --all shows every one. \
A source `in-doubt` is frozen here because its outcome is unknown or needs a decision: end it \
with `pclive resolve`. Exit code 4 if any migration shown is in doubt."
)]
pub struct StatusArgs {
    /// Only this container
    pub container: Option<String>,
    #[command(flatten)]
    pub containerd: Containerd,
    /// Every migration, not only the latest per container and role
    #[arg(long)]
    pub all: bool,
    /// Print the records as JSON
    #[arg(long)]
    pub json: bool,
}

fn note(record: &Record) -> String {
    let reason = record.reason.clone().unwrap_or_default();
    match (record.role, record.phase) {
        (Role::Source, Phase::InDoubt) => format!(
            "IN DOUBT: {reason}. Frozen here; `pclive resolve {} --resume-source` or `--discard-source`",
            record.container
        ),
        (_, Phase::Aborted | Phase::Lost | Phase::Resumed | Phase::SourceLost) => reason,
        (_, phase) if !phase.is_final() => "in progress".into(),
        _ => String::new(),
    }
}

pub fn run(args: StatusArgs) -> ExitCode {
    let store = args.containerd.store();
    let records = match store.list() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pclive status: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut shown: Vec<Record> = records
        .into_iter()
        .filter(|r| args.container.as_ref().is_none_or(|c| &r.container == c))
        .collect();
    if !args.all {
        let mut latest: Vec<Record> = Vec::new();
        for record in shown.into_iter().rev() {
            if !latest
                .iter()
                .any(|l| l.container == record.container && l.role == record.role)
            {
                latest.push(record);
            }
        }
        latest.reverse();
        shown = latest;
    }
    let in_doubt = shown.iter().any(Record::in_doubt);
    if args.json {
        match serde_json::to_string_pretty(&shown) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("pclive status: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else if shown.is_empty() {
        println!("no migrations recorded in {}", store.dir().display());
    } else {
        println!(
            "{:<16} {:<11} {:<12} {:<22} {:<19} {:<9} NOTE",
            "CONTAINER", "ROLE", "MIGRATION", "PEER", "PHASE", "UPDATED"
        );
        for r in &shown {
            println!(
                "{:<16} {:<11} {:<12} {:<22} {:<19} {:<9} {}",
                r.container,
                match r.role {
                    Role::Source => "source",
                    Role::Destination => "destination",
                },
                &r.migration_id[..12.min(r.migration_id.len())],
                r.peer,
                r.phase.name(),
                ago(r.updated_unix()),
                note(r)
            );
        }
    }
    if in_doubt {
        ExitCode::from(crate::options::exit::IN_DOUBT)
    } else {
        ExitCode::SUCCESS
    }
}
