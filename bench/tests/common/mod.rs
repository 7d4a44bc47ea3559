//! What the benchmark script tests share.

use std::path::Path;
use std::process::Command;

/// Fails the test unless it runs as root: `what` needs it (network namespaces, containerd).
pub fn require_root(what: &str) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "{what} needs root (network namespaces, containerd): run as root"
    );
}

/// `bash scripts/NAME`, from the repository's scripts directory.
pub fn script(name: &str) -> Command {
    let mut command = Command::new("bash");
    command.arg(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../scripts")
            .join(name),
    );
    command
}

/// The command lines of live processes that mention `word` (a test bed's name): what a test
/// bed left running. Processes that exit while being read are skipped.
pub fn processes_mentioning(word: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let line = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if line.contains(word) {
            found.push(format!("{pid}: {line}"));
        }
    }
    found
}
