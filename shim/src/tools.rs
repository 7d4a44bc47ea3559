//! Version checks of runc and CRIU, once per shim process, and the host tools the shim runs
//! (iptables, ss), all through the reaper.

use std::process::{Command, Stdio};
use std::sync::OnceLock;

use restore_engine::versions::{self, VersionError, MIN_CRIU, MIN_RUNC};

use crate::reaper;

fn version_of(
    tool: &'static str,
    binary: &str,
    min: (u32, u32),
) -> Result<(u32, u32, u32), VersionError> {
    let mut command = Command::new(binary);
    command
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let missing = |detail: String| VersionError::Missing {
        tool,
        min: format!("{}.{}", min.0, min.1),
        detail,
    };
    let output = reaper::run(command, None).map_err(|e| missing(format!("{binary}: {e}")))?;
    if output.status != 0 {
        return Err(missing(format!(
            "{binary} --version exited with {}",
            output.status
        )));
    }
    versions::require(tool, &String::from_utf8_lossy(&output.stdout), min)
}

/// runc ≥ 1.3, checked once (the result is cached).
pub fn check_runc(binary: &str) -> Result<(), VersionError> {
    static RESULT: OnceLock<Result<(u32, u32, u32), VersionError>> = OnceLock::new();
    RESULT
        .get_or_init(|| version_of("runc", binary, MIN_RUNC))
        .clone()
        .map(drop)
}

/// CRIU ≥ 4.2, checked once (the result is cached).
pub fn check_criu() -> Result<(), VersionError> {
    static RESULT: OnceLock<Result<(u32, u32, u32), VersionError>> = OnceLock::new();
    RESULT
        .get_or_init(|| version_of("criu", "criu", MIN_CRIU))
        .clone()
        .map(drop)
}

/// Runs a host tool (iptables, ss) through the reaper, which owns every child's exit status; in
/// the network namespace of process `netns_of` (through nsenter) when given. Its stdout; its
/// stderr (or why it did not run) as the error.
pub fn run_tool(program: &str, args: &[String], netns_of: Option<u32>) -> Result<String, String> {
    let out =
        reaper::run(tool_command(program, args, netns_of), None).map_err(|e| e.to_string())?;
    tool_result(out.status == 0, &out.stdout, &out.stderr)
}

/// [`run_tool`] for a process without the shim's reaper (the shim run by CRIU as its action
/// script): it waits for the tool itself.
pub fn run_tool_unreaped(
    program: &str,
    args: &[String],
    netns_of: Option<u32>,
) -> Result<String, String> {
    let out = tool_command(program, args, netns_of)
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    tool_result(out.status.success(), &out.stdout, &out.stderr)
}

fn tool_command(program: &str, args: &[String], netns_of: Option<u32>) -> Command {
    let mut command = match netns_of {
        Some(pid) => {
            let mut command = Command::new("nsenter");
            command
                .arg(format!(
                    "--net={}",
                    crate::paths::netns_of_pid(pid).display()
                ))
                .arg(program);
            command
        }
        None => Command::new(program),
    };
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

fn tool_result(ok: bool, stdout: &[u8], stderr: &[u8]) -> Result<String, String> {
    if !ok {
        return Err(String::from_utf8_lossy(stderr).trim().to_string());
    }
    Ok(String::from_utf8_lossy(stdout).into_owned())
}
