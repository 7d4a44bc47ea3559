//! `pclive completions SHELL` and `pclive man DIR`: shell completions and man pages generated
//! from the command line's own definition (scripts/setup.sh installs both).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory};

use crate::Cli;

#[derive(Args, Debug)]
#[command(about = "Print the shell completion script (bash, zsh, fish, elvish, powershell)")]
pub struct CompletionsArgs {
    /// The shell
    pub shell: clap_complete::Shell,
}

#[derive(Args, Debug)]
#[command(about = "Write man pages (pclive.1 and one per subcommand) into a directory")]
pub struct ManArgs {
    /// Where to write them (e.g. /usr/local/share/man/man1)
    pub dir: PathBuf,
}

pub fn completions(args: CompletionsArgs) -> ExitCode {
    let mut command = Cli::command();
    clap_complete::generate(args.shell, &mut command, "pclive", &mut std::io::stdout());
    ExitCode::SUCCESS
}

pub fn man(args: ManArgs) -> ExitCode {
    let command = Cli::command();
    if let Err(e) = std::fs::create_dir_all(&args.dir)
        .and_then(|_| clap_mangen::generate_to(command, &args.dir))
    {
        eprintln!("pclive man: cannot write to {}: {e}", args.dir.display());
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_and_man_pages_cover_every_subcommand() {
        let mut command = Cli::command();
        let mut out = Vec::new();
        clap_complete::generate(clap_complete::Shell::Bash, &mut command, "pclive", &mut out);
        let script = String::from_utf8(out).unwrap();
        for word in ["migrate", "receive", "--listen", "--key-file", "resolve"] {
            assert!(script.contains(word), "bash completion lacks {word}");
        }
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            man(ManArgs {
                dir: dir.path().to_owned()
            }),
            ExitCode::SUCCESS
        );
        for page in ["pclive.1", "pclive-migrate.1", "pclive-receive.1"] {
            let text = std::fs::read_to_string(dir.path().join(page)).unwrap();
            assert!(text.contains(".TH"), "{page} is not a man page");
        }
    }
}
