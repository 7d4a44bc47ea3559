//! Minimum versions of the tools pclive drives. The shim checks them (through its reaper) so that
//! a host with an old runc or CRIU fails with a message that names the fix, not deep inside CRIU;
//! `pclive check` reports them.

use std::process::Command;

/// pclive needs runc ≥ 1.3 (lazy-pages restore, checkpoint fixes) and CRIU ≥ 4.2 (TCP sockets on
/// kernels ≥ 6.16, vDSO on 6.18); containerd ≥ 2.0 speaks task API v3.
pub const MIN_RUNC: (u32, u32) = (1, 3);
pub const MIN_CRIU: (u32, u32) = (4, 2);
pub const MIN_CONTAINERD: (u32, u32) = (2, 0);

#[derive(Debug, Clone, thiserror::Error)]
pub enum VersionError {
    #[error("{tool} not found or not runnable ({detail}): install {tool} >= {min} (scripts/setup.sh installs it)")]
    Missing {
        tool: &'static str,
        min: String,
        detail: String,
    },
    #[error("{tool} {found} is too old: pclive needs {tool} >= {min} (scripts/setup.sh installs it; on Debian 12 it comes from Debian testing)")]
    TooOld {
        tool: &'static str,
        found: String,
        min: String,
    },
}

/// The first `major.minor[.patch]` in `text`.
pub fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    text.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter(|w| w.contains('.'))
        .find_map(|word| {
            let mut parts = word.split('.').filter(|p| !p.is_empty());
            let major = parts.next()?.parse().ok()?;
            let minor = parts.next()?.parse().ok()?;
            let patch = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
            Some((major, minor, patch))
        })
}

/// Checks a version string against a minimum.
pub fn require(
    tool: &'static str,
    version_text: &str,
    min: (u32, u32),
) -> Result<(u32, u32, u32), VersionError> {
    let min_text = format!("{}.{}", min.0, min.1);
    let found = parse_version(version_text).ok_or_else(|| VersionError::Missing {
        tool,
        min: min_text.clone(),
        detail: format!("no version in '{}'", version_text.trim()),
    })?;
    if (found.0, found.1) < min {
        return Err(VersionError::TooOld {
            tool,
            found: format!("{}.{}.{}", found.0, found.1, found.2),
            min: min_text,
        });
    }
    Ok(found)
}

/// Runs `binary args` and checks the version it prints against `min`.
pub fn tool_version(
    tool: &'static str,
    binary: &str,
    args: &[&str],
    min: (u32, u32),
) -> Result<(u32, u32, u32), VersionError> {
    let output = Command::new(binary)
        .args(args)
        .output()
        .map_err(|e| VersionError::Missing {
            tool,
            min: format!("{}.{}", min.0, min.1),
            detail: format!("{binary}: {e}"),
        })?;
    let text = String::from_utf8_lossy(&output.stdout);
    require(tool, &text, min)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_version_lines_of_the_tools() {
        assert_eq!(
            parse_version("runc version 1.3.6+ds1\ncommit: x\nspec: 1.2.1"),
            Some((1, 3, 6))
        );
        assert_eq!(parse_version("Version: 4.2.1\n"), Some((4, 2, 1)));
        assert_eq!(parse_version("2.1.9+unknown"), Some((2, 1, 9)));
        assert_eq!(parse_version("v1.7.28"), Some((1, 7, 28)));
        assert_eq!(parse_version("no digits"), None);
    }

    #[test]
    fn old_versions_are_refused_with_the_fix() {
        let err = require("criu", "Version: 3.17.1", MIN_CRIU).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("3.17.1") && text.contains(">= 4.2"), "{text}");
        assert!(require("criu", "Version: 4.2", MIN_CRIU).is_ok());
        assert!(require("runc", "runc version 1.10.0", MIN_RUNC).is_ok());
    }
}
