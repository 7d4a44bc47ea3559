//! `pclive`: the command-line side of pclive. One file per subcommand.

mod check;
mod dirty_rate;
mod docs;
mod migrate;
mod options;
mod progress;
mod receive;
mod resolve;
mod status;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

const AFTER_HELP: &str = "\
Containers run with `ctr run --runtime io.containerd.pclive.v2 ...` (or nerdctl --runtime).
Checkpoint with `ctr task checkpoint --image-path DIR [--exit] ID`; restore by creating a
container with the annotation io.containerd.pclive.restore.image-path=DIR, lazily (tasks resume
at once, memory installed with userfaultfd) with io.containerd.pclive.restore.lazy-pages=true.

Exit codes:
  0  success
  1  failure; the message says what. A migration that fails before the destination could run
     the container leaves it running on the source
  2  usage error
  3  containerd could not be reached: nothing was done
  4  a migration is in doubt: its source stays frozen (see `pclive status`, `pclive resolve`)";

#[derive(Parser, Debug)]
#[command(
    name = "pclive",
    version,
    about = "Live migration of containers between containerd hosts",
    long_about = "pclive moves running containers between containerd hosts with a pause that \
does not grow with their memory: memory is copied while the container runs, and installed with \
userfaultfd on the destination after a short final dump.",
    after_help = AFTER_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    Migrate(migrate::MigrateArgs),
    Receive(receive::ReceiveArgs),
    Status(status::StatusArgs),
    Resolve(resolve::ResolveArgs),
    Check(check::CheckArgs),
    DirtyRate(dirty_rate::DirtyRateArgs),
    Completions(docs::CompletionsArgs),
    Man(docs::ManArgs),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Migrate(args) => migrate::run(args),
        Command::Receive(args) => receive::run(args),
        Command::Status(args) => status::run(args),
        Command::Resolve(args) => resolve::run(args),
        Command::Check(args) => check::run(args),
        Command::DirtyRate(args) => dirty_rate::run(args),
        Command::Completions(args) => docs::completions(args),
        Command::Man(args) => docs::man(args),
    }
}
