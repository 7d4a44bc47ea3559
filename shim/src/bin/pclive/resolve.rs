//! `pclive resolve CONTAINER --resume-source | --discard-source`: ends a migration that is in
//! doubt. The destination is asked where the container stands there first, and a decision that
//! could leave two copies running, or none, is refused unless `--force` says the operator knows
//! better (e.g. the destination host is gone). The decision is recorded before it is carried out.

use std::path::Path;
use std::process::ExitCode;

use clap::Args;
use containerd_client::services::v1::{tasks_client::TasksClient, KillRequest, ResumeTaskRequest};
use restore_engine::record::{Phase, Role};
use restore_engine::source::query::query_outcome;

use crate::options::{exit, runtime, Containerd, KeyArgs};

#[derive(Args, Debug)]
#[command(
    about = "End a migration that is in doubt: resume the frozen source, or discard it",
    long_about = "Ends a migration whose source is frozen in doubt (see `pclive status`). The \
destination is asked first: --resume-source is refused while the destination reports the \
container running (or about to), --discard-source while it reports it not running (that would \
lose it). If the destination cannot be asked, both are refused unless --force says you checked \
yourself (`pclive status CONTAINER` on the destination host). The key file recorded for the \
migration is used unless --key-file or --insecure is given."
)]
#[command(group(clap::ArgGroup::new("decision").required(true).args(["resume_source", "discard_source"])))]
pub struct ResolveArgs {
    /// The container whose migration is in doubt
    pub container: String,
    /// Run the frozen source copy again (the destination does not run it)
    #[arg(long)]
    pub resume_source: bool,
    /// Remove the frozen source copy (the destination runs it)
    #[arg(long)]
    pub discard_source: bool,
    /// Decide even though the destination cannot confirm it
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub key: KeyArgs,
    #[command(flatten)]
    pub containerd: Containerd,
}

pub fn run(args: ResolveArgs) -> ExitCode {
    let fail = |code: u8, message: String| {
        eprintln!("pclive resolve: {message}");
        ExitCode::from(code)
    };
    let store = args.containerd.store();
    let mut record = match store.latest(&args.container, Role::Source) {
        Ok(Some(r)) => r,
        Ok(None) => {
            return fail(
                exit::FAILED,
                format!(
                    "no migration of {} from this host is recorded in {}",
                    args.container,
                    store.dir().display()
                ),
            )
        }
        Err(e) => return fail(exit::FAILED, e.to_string()),
    };
    if !record.in_doubt() {
        return fail(
            exit::FAILED,
            format!(
                "migration {} of {} is {}, not in doubt: nothing to resolve",
                record.migration_id, args.container, record.phase
            ),
        );
    }
    let decision = if args.resume_source {
        "resume-source"
    } else {
        "discard-source"
    };
    // Ask the destination where the container stands there.
    let asked = args
        .key
        .auth(record.key_file.as_deref().map(Path::new))
        .and_then(|auth| {
            query_outcome(&record.peer, &auth, &record.migration_id, false)
                .map_err(|e| e.to_string())
        });
    let there = match &asked {
        Ok(outcome) if outcome.known => Phase::parse(&outcome.phase),
        // The destination cannot be asked any more (it stops answering once the source has
        // the outcome): what it said then, recorded here, is final there.
        _ => match record.destination_said {
            Some(said) => {
                eprintln!(
                    "pclive resolve: the destination cannot be asked now; it reported the migration {said} before"
                );
                Some(said)
            }
            None => None,
        },
    };
    let verdict = match (decision, there) {
        ("resume-source", Some(Phase::Aborted | Phase::Lost)) => Ok(()),
        ("resume-source", Some(phase)) => Err(format!(
            "the destination {} reports the migration {phase}: the container runs there (or is about to); resuming it here would run it twice",
            record.peer
        )),
        ("discard-source", Some(Phase::Committed | Phase::Running)) => Ok(()),
        (_, Some(phase)) => Err(format!(
            "the destination {} reports the migration {phase}: the container does not run there; discarding the source would lose it",
            record.peer
        )),
        (_, None) => Err(match &asked {
            Ok(_) => format!(
                "the destination {} has no record of migration {}",
                record.peer, record.migration_id
            ),
            Err(e) => format!("cannot ask the destination {}: {e}", record.peer),
        }),
    };
    if let Err(why) = verdict {
        if !args.force {
            return fail(
                exit::FAILED,
                format!(
                    "{why}. Nothing was done. If you checked yourself (`pclive status {}` on the destination host), pass --force",
                    args.container
                ),
            );
        }
        eprintln!("pclive resolve: {why}; going on because of --force");
    }
    // Recorded first: the shim lets the frozen container resume only with a decision on disk.
    record.resolution = Some(decision.to_string());
    if let Err(e) = store.write(&record) {
        return fail(exit::FAILED, e.to_string());
    }
    let runtime = match runtime() {
        Ok(r) => r,
        Err(e) => return fail(exit::FAILED, e),
    };
    let done: Result<(), String> = runtime.block_on(async {
        let channel = args.containerd.connect().await?;
        let mut tasks = TasksClient::new(channel);
        if args.discard_source {
            // runc kill --all thaws a frozen container after signalling it: it dies.
            tasks
                .kill(args.containerd.request(KillRequest {
                    container_id: args.container.clone(),
                    exec_id: String::new(),
                    signal: libc::SIGKILL as u32,
                    all: true,
                })?)
                .await
                .map(drop)
                .map_err(|s| format!("killing {}: {}", args.container, s.message()))
        } else {
            // The shim lets it resume because the decision is on disk, and records the end.
            tasks
                .resume(args.containerd.request(ResumeTaskRequest {
                    container_id: args.container.clone(),
                })?)
                .await
                .map(drop)
                .map_err(|s| format!("resuming {}: {}", args.container, s.message()))
        }
    });
    if done.is_ok() && args.discard_source {
        record.enter(
            Phase::Done,
            Some("an operator discarded the source copy (pclive resolve)".into()),
        );
        if let Err(e) = store.write(&record) {
            eprintln!("pclive resolve: the source copy is gone, but {e}");
        }
    }
    if let Err(e) = done {
        return fail(
            exit::FAILED,
            format!("{e} (the decision {decision} is recorded: run pclive resolve again to carry it out)"),
        );
    }
    println!(
        "{}: migration {} resolved: {}",
        args.container,
        record.migration_id,
        if args.resume_source {
            "the container runs here again"
        } else {
            "the source copy is discarded; the container runs on the destination"
        }
    );
    ExitCode::SUCCESS
}
