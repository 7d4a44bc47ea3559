//! What the benchmark script tests share.

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
