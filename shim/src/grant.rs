//! The receiving container's [`Grant`]: what its OCI spec (config.json in the bundle) grants its
//! processes, the ceiling for the CRIU images it restores (restore-engine/src/grant). Written
//! as `grant.json` (mode 0600) into the receiving server's work directory.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{Capabilities as CapSet, LinuxNamespaceType, Spec};
use restore_engine::grant::{self, Capabilities, Grant, GrantedMount, Namespace, GRANT_FILE};

#[derive(Debug, thiserror::Error)]
pub enum GrantSpecError {
    #[error("cannot read the receiving container's spec {path}: {message}; images cannot be checked against it")]
    Spec { path: PathBuf, message: String },
    #[error("the receiving container's spec {path}: {message}; fix its capabilities")]
    Capability { path: PathBuf, message: String },
    #[error("cannot write the receiving container's grant {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn mask(path: &Path, set: &Option<CapSet>) -> Result<u64, GrantSpecError> {
    let names: Vec<String> = set
        .iter()
        .flatten()
        .map(|cap| {
            serde_json::to_value(cap)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_else(|| cap.to_string())
        })
        .collect();
    grant::mask_of(names.iter().map(String::as_str)).map_err(|message| GrantSpecError::Capability {
        path: path.to_owned(),
        message,
    })
}

/// Whether the namespace at `path` is this host's own of its kind (the shim's, in which CRIU
/// restores): a container that joins it by path (a Kubernetes hostNetwork pod's containers
/// join their sandbox's network and UTS namespaces, which are the host's) has none of its own.
pub(crate) fn is_this_hosts(kind: Namespace, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (
        fs::metadata(path),
        fs::metadata(format!("/proc/self/ns/{}", kind.proc_name())),
    ) {
        (Ok(joined), Ok(ours)) => joined.dev() == ours.dev() && joined.ino() == ours.ino(),
        // Unreadable: count it as the container's own (the stricter reading).
        _ => false,
    }
}

fn namespace(typ: LinuxNamespaceType) -> Namespace {
    match typ {
        LinuxNamespaceType::Pid => Namespace::Pid,
        LinuxNamespaceType::Network => Namespace::Network,
        LinuxNamespaceType::Ipc => Namespace::Ipc,
        LinuxNamespaceType::Uts => Namespace::Uts,
        LinuxNamespaceType::Mount => Namespace::Mount,
        LinuxNamespaceType::User => Namespace::User,
        LinuxNamespaceType::Cgroup => Namespace::Cgroup,
        LinuxNamespaceType::Time => Namespace::Time,
    }
}

/// The grant of `spec` (read from `path`, for messages).
pub fn of_spec(spec: &Spec, path: &Path) -> Result<Grant, GrantSpecError> {
    let process = spec.process().clone().unwrap_or_default();
    let caps = process.capabilities().clone().unwrap_or_default();
    let user = process.user();
    let linux = spec.linux().clone().unwrap_or_default();
    Ok(Grant {
        capabilities: Capabilities {
            bounding: mask(path, caps.bounding())?,
            effective: mask(path, caps.effective())?,
            permitted: mask(path, caps.permitted())?,
            inheritable: mask(path, caps.inheritable())?,
            ambient: mask(path, caps.ambient())?,
        },
        no_new_privileges: process.no_new_privileges().unwrap_or(false),
        uid: user.uid(),
        gid: user.gid(),
        additional_gids: user.additional_gids().clone().unwrap_or_default(),
        seccomp: linux.seccomp().is_some(),
        namespaces: linux
            .namespaces()
            .iter()
            .flatten()
            .filter_map(|ns| {
                let kind = namespace(ns.typ());
                let hosts = ns.path().as_deref().is_some_and(|p| is_this_hosts(kind, p));
                (!hosts).then_some(kind)
            })
            .collect(),
        mounts: spec
            .mounts()
            .iter()
            .flatten()
            .map(|m| GrantedMount {
                destination: m.destination().display().to_string(),
                typ: m.typ().clone().unwrap_or_default(),
                readonly: m.options().iter().flatten().any(|o| o == "ro"),
            })
            .collect(),
        masked_paths: linux.masked_paths().clone().unwrap_or_default(),
        readonly_paths: linux.readonly_paths().clone().unwrap_or_default(),
        moves_address: spec
            .annotations()
            .as_ref()
            .and_then(|a| a.get(crate::annotations::RECEIVE_MOVE_ADDRESS))
            .is_some_and(|v| v == "true"),
        closes_connections: spec
            .annotations()
            .as_ref()
            .and_then(|a| a.get(crate::annotations::RESTORE_TCP_CLOSE))
            .is_some_and(|v| v == "true"),
    })
}

/// The grant of the container whose bundle is `bundle`.
pub fn of_bundle(bundle: &Path) -> Result<Grant, GrantSpecError> {
    let path = bundle.join("config.json");
    let spec = Spec::load(&path).map_err(|e| GrantSpecError::Spec {
        path: path.clone(),
        message: e.to_string(),
    })?;
    of_spec(&spec, &path)
}

/// Writes the grant of `bundle`'s container as `grant.json` (mode 0600) into the receiving
/// server's `work_dir`, where it reads it.
pub fn write_for_server(bundle: &Path, work_dir: &Path) -> Result<(), GrantSpecError> {
    let grant = of_bundle(bundle)?;
    let path = work_dir.join(GRANT_FILE);
    let write = || -> std::io::Result<()> {
        // A stale file of an earlier receive would keep its own mode: start afresh.
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        file.write_all(&serde_json::to_vec_pretty(&grant).map_err(std::io::Error::other)?)?;
        file.sync_all()
    };
    write().map_err(|source| GrantSpecError::Write {
        path: path.clone(),
        source,
    })
}

/// The network namespace whose address moves with the container (`--move-address`): the one
/// its spec joins by path, which must not be the host's. The error says what to do instead.
pub fn moving_netns(spec: &oci_spec::runtime::Spec) -> Result<std::path::PathBuf, String> {
    match crate::netns::joined_netns(spec) {
        Some(path)
            if is_this_hosts(restore_engine::grant::Namespace::Network, &path) =>
        {
            Err(format!(
                "--move-address: the container shares the host's network ({}): a host's address cannot move; use --tcp-close on the receiving side instead",
                path.display()
            ))
        }
        Some(path) => Ok(path),
        None if crate::netns::has_private_netns(spec) => Err(
            "--move-address: the container's network namespace is runc's own (no address from a network plugin); join a prepared one by path (ctr run --with-ns network:PATH, a CNI pod network namespace)".into(),
        ),
        None => Err(
            "--move-address: the container shares the host's network: a host's address cannot move; use --tcp-close on the receiving side instead".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A namespace joined by path counts as the container's own unless it is this host's
    /// (a hostNetwork pod's containers join their sandbox's, which are the host's).
    #[test]
    fn a_namespace_joined_by_path_is_the_hosts_only_when_it_is() {
        assert!(is_this_hosts(
            Namespace::Network,
            Path::new("/proc/self/ns/net")
        ));
        assert!(!is_this_hosts(
            Namespace::Network,
            Path::new("/nonexistent/ns/net")
        ));
        // A thread in a network namespace of its own (unshare needs root: the suite runs as
        // root, as the shim does).
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            tx.send(nix::unistd::gettid()).unwrap();
            let _ = done_rx.recv();
        });
        let tid = rx.recv().unwrap();
        let theirs = format!("/proc/self/task/{tid}/ns/net");
        assert!(!is_this_hosts(Namespace::Network, Path::new(&theirs)));
        // The same namespace kind is compared: its UTS namespace is still ours.
        let uts = format!("/proc/self/task/{tid}/ns/uts");
        assert!(is_this_hosts(Namespace::Uts, Path::new(&uts)));
        done_tx.send(()).unwrap();
        thread.join().unwrap();
    }

    #[test]
    fn a_spec_becomes_its_grant() {
        let mut spec = Spec::default();
        let mut process = spec.process().clone().unwrap();
        let mut caps = process.capabilities().clone().unwrap();
        let bounding: CapSet = [oci_spec::runtime::Capability::NetRaw]
            .into_iter()
            .collect();
        caps.set_bounding(Some(bounding));
        process.set_capabilities(Some(caps));
        spec.set_process(Some(process));
        let grant = of_spec(&spec, Path::new("config.json")).unwrap();
        assert_eq!(grant.capabilities.bounding, 1 << 13);
        assert!(grant.has_own(Namespace::Pid) && grant.has_own(Namespace::Mount));
        assert!(!grant.has_own(Namespace::User));
        assert!(grant
            .mounts
            .iter()
            .any(|m| m.destination == "/proc" && m.typ == "proc"));
        assert!(grant.readonly_paths.iter().any(|p| p == "/proc/sys"));
        assert!(grant.no_new_privileges);
    }

    #[test]
    fn the_grant_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        Spec::default()
            .save(dir.path().join("config.json"))
            .unwrap();
        write_for_server(dir.path(), dir.path()).unwrap();
        write_for_server(dir.path(), dir.path()).unwrap();
        let file = dir.path().join(GRANT_FILE);
        assert_eq!(
            fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        Grant::read(&file).unwrap();
    }
}
