//! What annotations may ask of the host: the paths they name must lie under the directories
//! the host's settings ([`crate::config`]) allow, reached without symbolic links, and a
//! container may listen for a migration only where the settings allow it.
//!
//! The shim acts on annotations as root, but whoever creates a container sets them: without
//! these checks `…receive.progress-file` would append to any file, `…receive.key-file` read any
//! file, `…restore.image-path` restore any checkpoint on the host and `…receive.listen` open
//! a listener on the host's network. runc lists its own such annotations as unsafe.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use crate::annotations::{
    RestoreAnnotations, CRIU_CONFIG, RECEIVE_INSECURE, RECEIVE_KEY_FILE, RECEIVE_LISTEN,
    RECEIVE_PROGRESS_FILE, RESTORE_IMAGE_PATH, RESTORE_WORK_PATH,
};
use crate::config::AnnotationPolicy;
use crate::nofollow::open_no_symlinks;

/// Whether the shim reads or writes what a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

impl Access {
    fn setting(self) -> &'static str {
        match self {
            Access::Read => "read_dirs",
            Access::Write => "write_dirs",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfineError {
    #[error("annotation {key}={path}: {problem}. Annotations may name paths under {allowed}, reached without symbolic links")]
    Path {
        key: &'static str,
        path: String,
        problem: String,
        /// The allowed directories and the setting that lists them.
        allowed: String,
    },
    #[error("annotation {RECEIVE_LISTEN} asks this host to listen for a migration, which {config} does not allow: set allow_receive = true under [annotations] there on hosts that receive migrations")]
    Receive { config: String },
    #[error("annotation {RECEIVE_INSECURE}=true asks for a receive without a key, which {config} does not allow: give the receiving container a key file ({RECEIVE_KEY_FILE}), or set allow_insecure = true under [annotations] there (only where nobody else can reach the port)")]
    Insecure { config: String },
}

/// Checks what `asked` (parsed from `raw`) may do on this host. `own_dirs` are the shim's own
/// directories (its state directory), always allowed; `config` names the settings file in
/// errors.
pub fn check(
    asked: &RestoreAnnotations,
    raw: &HashMap<String, String>,
    policy: &AnnotationPolicy,
    own_dirs: &[PathBuf],
    config: &Path,
) -> Result<(), ConfineError> {
    let config_name = config.display().to_string();
    if let Some(receive) = &asked.receive {
        if !policy.allow_receive {
            return Err(ConfineError::Receive {
                config: config_name,
            });
        }
        if receive.key_file.is_none() && !policy.allow_insecure {
            return Err(ConfineError::Insecure {
                config: config_name,
            });
        }
    }
    let mut paths: Vec<(&'static str, &Path, Access)> = Vec::new();
    if let Some(p) = &asked.image_path {
        paths.push((RESTORE_IMAGE_PATH, p, Access::Read));
    }
    if let Some(p) = &asked.work_path {
        paths.push((RESTORE_WORK_PATH, p, Access::Write));
    }
    if let Some(p) = raw.get(CRIU_CONFIG) {
        paths.push((CRIU_CONFIG, Path::new(p), Access::Read));
    }
    if let Some(receive) = &asked.receive {
        if let Some(p) = &receive.key_file {
            paths.push((RECEIVE_KEY_FILE, p, Access::Read));
        }
        if let Some(p) = &receive.progress_file {
            paths.push((RECEIVE_PROGRESS_FILE, p, Access::Write));
        }
    }
    for (key, path, access) in paths {
        let configured = match access {
            Access::Read => &policy.read_dirs,
            Access::Write => &policy.write_dirs,
        };
        let dirs: Vec<&Path> = configured
            .iter()
            .chain(own_dirs)
            .map(PathBuf::as_path)
            .collect();
        if let Err(problem) = allowed(path, &dirs) {
            let dirs = if configured.is_empty() {
                "no directory".to_string()
            } else {
                configured
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(ConfineError::Path {
                key,
                path: path.display().to_string(),
                problem,
                allowed: format!(
                    "{dirs} only (the host's setting {} under [annotations] in {config_name})",
                    access.setting()
                ),
            });
        }
    }
    Ok(())
}

/// `path` is absolute, plain (no `.` or `..`), under one of `dirs`, and whatever of it exists
/// is reached without a symbolic link.
fn allowed(path: &Path, dirs: &[&Path]) -> Result<(), String> {
    if !path.is_absolute()
        || path
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err("not an absolute path without . or ..".into());
    }
    if !dirs.iter().any(|dir| path.starts_with(dir) && path != *dir) {
        return Err("outside the allowed directories".into());
    }
    // The longest part of the path that exists must resolve without symbolic links (a link
    // planted there would lead the shim elsewhere).
    let mut existing = Some(path);
    while let Some(p) = existing {
        match open_no_symlinks(p, OFlag::O_PATH, Mode::empty()) {
            Ok(_) => return Ok(()),
            Err(Errno::ENOENT) => existing = p.parent(),
            Err(Errno::ELOOP) => return Err("it goes through a symbolic link".into()),
            Err(e) => return Err(format!("cannot check it: {e}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotations;
    use crate::nofollow::open_append;

    fn policy(dir: &Path) -> AnnotationPolicy {
        AnnotationPolicy {
            read_dirs: vec![dir.to_owned()],
            write_dirs: vec![dir.to_owned()],
            allow_receive: true,
            allow_insecure: false,
        }
    }

    fn check_pairs(
        pairs: &[(&str, String)],
        policy: &AnnotationPolicy,
    ) -> Result<(), ConfineError> {
        let raw: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let asked = annotations::parse(&raw).unwrap();
        check(
            &asked,
            &raw,
            policy,
            &[],
            Path::new("/etc/pclive/config.toml"),
        )
    }

    #[test]
    fn paths_must_stay_under_the_allowed_directories_without_links() {
        let dir = tempfile::tempdir().unwrap();
        let allowed_dir = dir.path().join("allowed");
        std::fs::create_dir(&allowed_dir).unwrap();
        let policy = policy(&allowed_dir);
        let inside = allowed_dir.join("progress").display().to_string();
        assert!(check_pairs(&[(RESTORE_WORK_PATH, inside)], &policy).is_ok());
        for bad in [
            "/etc/shadow".to_string(),
            format!("{}/../escape", allowed_dir.display()),
            "relative/path".to_string(),
            allowed_dir.display().to_string(),
        ] {
            let err = check_pairs(&[(RESTORE_WORK_PATH, bad.clone())], &policy).unwrap_err();
            assert!(err.to_string().contains("write_dirs"), "{bad}: {err}");
        }
        // A link inside the allowed directory that leads out of it.
        std::os::unix::fs::symlink("/etc", allowed_dir.join("link")).unwrap();
        let through = allowed_dir.join("link/passwd").display().to_string();
        let err = check_pairs(&[(RESTORE_IMAGE_PATH, through)], &policy).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
    }

    #[test]
    fn listening_and_insecure_receives_need_the_hosts_consent() {
        let dir = tempfile::tempdir().unwrap();
        let mut policy = policy(dir.path());
        let key = dir.path().join("key").display().to_string();
        let listen = (RECEIVE_LISTEN, "0.0.0.0:7411".to_string());
        assert!(check_pairs(&[listen.clone(), (RECEIVE_KEY_FILE, key.clone())], &policy).is_ok());
        let insecure = [listen.clone(), (RECEIVE_INSECURE, "true".to_string())];
        assert!(matches!(
            check_pairs(&insecure, &policy),
            Err(ConfineError::Insecure { .. })
        ));
        policy.allow_receive = false;
        let err = check_pairs(&[listen, (RECEIVE_KEY_FILE, key)], &policy).unwrap_err();
        assert!(err.to_string().contains("allow_receive = true"), "{err}");
    }

    #[test]
    fn appending_refuses_a_planted_link() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, b"keep").unwrap();
        let link = dir.path().join("progress");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(open_append(&link).is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        let file = open_append(&dir.path().join("new")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(file.metadata().unwrap().permissions().mode() & 0o777, 0o600);
    }
}
