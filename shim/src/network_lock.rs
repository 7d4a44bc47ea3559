//! CRIU's network lock in one step: nftables where the installed CRIU has it.
//!
//! While CRIU dumps a task in the host's network namespace, it locks each of its TCP
//! connections so that no packet changes them. With its default method that is a pair of
//! `iptables` runs per connection (about 20 ms each here): a server with 1000 clients would
//! pause for about 40 s more. With `network-lock nftables`, CRIU adds each connection to one
//! set through libnftables, inside its own process.
//!
//! runc has no flag for the method; it hands CRIU the config file that the container's
//! `org.criu.config` annotation names, or /etc/criu/runc.conf when there is none, and reads the
//! annotation once, when it creates the container. So the shim names a config of its own in
//! the bundle at create ([`own_config_at_create`], with /etc/criu/runc.conf's contents, so that
//! runc's default still applies), and adds the lock method to it before a dump
//! ([`prefer_nftables`]) when CRIU supports it. A container whose annotation names a config
//! of the user's is left as the user wrote it.
//!
//! Cheaper still is no lock at all: when the destination restores the connections closed
//! (`pclive receive --tcp-close`, which it says in the handshake), their state is of no use
//! there, and the final dump adds `tcp-close` and `network-lock skip` to the config for its run
//! ([`closing_connections`]). CRIU then neither puts each connection in repair mode to read it
//! nor locks anything, and the images say so (a restore without `tcp-close` refuses them).

use std::fs;
use std::path::Path;
use std::sync::OnceLock;

use crate::annotations::CRIU_CONFIG;

/// The CRIU config the shim names for a container it creates (a restored container's is
/// `criu-restore.conf`, task/restore.rs).
pub const CREATE_CONFIG: &str = "criu.conf";

/// The line that selects the method.
const NFTABLES_LINE: &str = "network-lock nftables";
/// The line that makes a dump record established connections as closed (and lock none).
const TCP_CLOSE_LINE: &str = "tcp-close";
/// The line that keeps CRIU from setting up a network lock at all.
const SKIP_LINE: &str = "network-lock skip";

#[derive(Debug, thiserror::Error)]
pub enum NetworkLockError {
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a JSON object with an object of annotations: {reason}")]
    Spec { path: String, reason: String },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> NetworkLockError {
    let path = path.display().to_string();
    move |source| NetworkLockError::Io { what, path, source }
}

/// Sets annotation `key` to `value` in the bundle's config.json (runc reads annotations from
/// there when it creates the container).
pub fn set_annotation(bundle: &Path, key: &str, value: &str) -> Result<(), NetworkLockError> {
    let spec_path = bundle.join("config.json");
    let text = fs::read(&spec_path).map_err(io("read", &spec_path))?;
    let bad = |reason: String| NetworkLockError::Spec {
        path: spec_path.display().to_string(),
        reason,
    };
    let mut spec: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    let root = spec
        .as_object_mut()
        .ok_or_else(|| bad("not an object".into()))?;
    let annotations = root
        .entry("annotations")
        .or_insert_with(|| serde_json::Value::Object(Default::default()))
        .as_object_mut()
        .ok_or_else(|| bad("annotations is not an object".into()))?;
    annotations.insert(key.into(), serde_json::Value::String(value.into()));
    let updated = serde_json::to_vec(&spec).map_err(|e| bad(e.to_string()))?;
    fs::write(&spec_path, updated).map_err(io("write", &spec_path))
}

/// At create: unless the container names a CRIU config of its own, name one in the bundle,
/// holding what /etc/criu/runc.conf holds (runc's default).
pub fn own_config_at_create(bundle: &Path) -> Result<(), NetworkLockError> {
    if crate::annotations::of_bundle(bundle).contains_key(CRIU_CONFIG) {
        return Ok(());
    }
    let config = bundle.join(CREATE_CONFIG);
    let base = fs::read_to_string("/etc/criu/runc.conf").unwrap_or_default();
    fs::write(&config, base).map_err(io("write", &config))?;
    set_annotation(bundle, CRIU_CONFIG, &config.display().to_string())
}

/// Whether the installed CRIU can lock with nftables (`criu check --feature`, run once: it
/// takes about 0.1 s).
pub fn criu_has_nftables() -> bool {
    static RESULT: OnceLock<bool> = OnceLock::new();
    *RESULT.get_or_init(|| {
        crate::tools::run_tool(
            "criu",
            &[
                "check".into(),
                "--feature".into(),
                "network_lock_nftables".into(),
            ],
            None,
        )
        .is_ok()
    })
}

/// Before a dump: where the container's CRIU config is the shim's own and CRIU has nftables
/// locking, selects it. Returns the method the dump will use, for the log.
pub fn prefer_nftables(bundle: &Path) -> Result<&'static str, NetworkLockError> {
    let annotations = crate::annotations::of_bundle(bundle);
    let Some(named) = annotations.get(CRIU_CONFIG) else {
        return Ok("iptables (the container predates pclive's own CRIU config)");
    };
    let named = Path::new(named);
    if named.parent() != Some(bundle) {
        return Ok("as the container's own CRIU config says");
    }
    // A shim that died during a final dump left the config changed ([`closing_connections`]).
    put_back_stale(named)?;
    let text = fs::read_to_string(named).unwrap_or_default();
    if text
        .lines()
        .any(|l| l.trim_start().starts_with("network-lock"))
    {
        return Ok("as the CRIU config says");
    }
    if !criu_has_nftables() {
        return Ok("iptables (this CRIU has no nftables locking)");
    }
    let mut updated = text;
    if !updated.is_empty() && !updated.ends_with('\n') {
        updated.push('\n');
    }
    updated.push_str(NFTABLES_LINE);
    updated.push('\n');
    fs::write(named, updated).map_err(io("write", named))?;
    Ok("nftables")
}

/// Where [`closing_connections`] keeps the config as it was during a final dump.
fn saved_path(config: &Path) -> std::path::PathBuf {
    let mut name = config.as_os_str().to_owned();
    name.push(".before-final-dump");
    std::path::PathBuf::from(name)
}

/// Puts back the config a final dump changed; true when there was one to put back.
fn put_back(config: &Path) -> Result<bool, NetworkLockError> {
    let saved = saved_path(config);
    match fs::rename(&saved, config) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(NetworkLockError::Io {
            what: "put back",
            path: saved.display().to_string(),
            source: e,
        }),
    }
}

/// Puts back what a final dump left changed because its shim died before the dump's guard could.
fn put_back_stale(config: &Path) -> Result<(), NetworkLockError> {
    if put_back(config)? {
        log::info!(
            "{}: put back as it was before an interrupted final dump",
            config.display()
        );
    }
    Ok(())
}

/// The shim's own CRIU config of the container in `bundle`, if it names one.
fn own_config(bundle: &Path) -> Option<std::path::PathBuf> {
    let named = crate::annotations::of_bundle(bundle)
        .get(CRIU_CONFIG)?
        .clone();
    let named = std::path::PathBuf::from(named);
    (named.parent() == Some(bundle)).then_some(named)
}

/// A CRIU config changed for one final dump; dropping this puts it back.
#[derive(Debug)]
pub struct ConfigForClosedConnections {
    config: std::path::PathBuf,
}

impl Drop for ConfigForClosedConnections {
    fn drop(&mut self) {
        match put_back(&self.config) {
            Ok(_) => log::debug!("{}: put back after the final dump", self.config.display()),
            Err(e) => log::warn!("{e}; the next dump puts it back"),
        }
    }
}

/// For a final dump whose destination restores the connections closed: until the returned
/// guard drops (after the dump, whatever its outcome: a source that resumes may dump its
/// connections' state later), the container's CRIU config says `tcp-close` and
/// `network-lock skip`. With nothing to lock, CRIU's lock would still create and delete its
/// nftables table (about 20 ms of libnftables in the pause). The config as it was is kept
/// beside it and put back by the guard, or by the next dump if this shim dies first. None when
/// the config is the user's: CRIU then reads and locks each connection, as it would without
/// pclive.
pub fn closing_connections(
    bundle: &Path,
) -> Result<Option<ConfigForClosedConnections>, NetworkLockError> {
    let Some(config) = own_config(bundle) else {
        return Ok(None);
    };
    put_back_stale(&config)?;
    let text = fs::read_to_string(&config).unwrap_or_default();
    let saved = saved_path(&config);
    fs::write(&saved, &text).map_err(io("write", &saved))?;
    let guard = ConfigForClosedConnections {
        config: config.clone(),
    };
    let mut changed: String = text
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            !(l.starts_with("network-lock") || l.trim_end() == TCP_CLOSE_LINE)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    changed.push_str(TCP_CLOSE_LINE);
    changed.push('\n');
    changed.push_str(SKIP_LINE);
    changed.push('\n');
    fs::write(&config, changed).map_err(io("write", &config))?;
    Ok(Some(guard))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle_with(annotations: serde_json::Value) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let spec = serde_json::json!({ "ociVersion": "1.2.0", "annotations": annotations });
        fs::write(dir.path().join("config.json"), spec.to_string()).unwrap();
        dir
    }

    #[test]
    fn a_user_config_is_left_alone_and_the_own_one_is_named_once() {
        let user = bundle_with(serde_json::json!({ CRIU_CONFIG: "/etc/my-criu.conf" }));
        own_config_at_create(user.path()).unwrap();
        assert_eq!(
            crate::annotations::of_bundle(user.path())[CRIU_CONFIG],
            "/etc/my-criu.conf"
        );
        assert_eq!(
            prefer_nftables(user.path()).unwrap(),
            "as the container's own CRIU config says"
        );

        let own = bundle_with(serde_json::json!({}));
        own_config_at_create(own.path()).unwrap();
        let named = own.path().join(CREATE_CONFIG);
        assert_eq!(
            crate::annotations::of_bundle(own.path())[CRIU_CONFIG],
            named.display().to_string()
        );
        // A method already chosen stays.
        fs::write(&named, "network-lock iptables\n").unwrap();
        assert_eq!(
            prefer_nftables(own.path()).unwrap(),
            "as the CRIU config says"
        );
        assert_eq!(
            fs::read_to_string(&named).unwrap(),
            "network-lock iptables\n"
        );
    }

    #[test]
    fn tcp_close_and_no_lock_are_in_the_own_config_for_one_dump_only() {
        let user = bundle_with(serde_json::json!({ CRIU_CONFIG: "/etc/my-criu.conf" }));
        assert!(closing_connections(user.path()).unwrap().is_none());

        let own = bundle_with(serde_json::json!({}));
        own_config_at_create(own.path()).unwrap();
        let named = own.path().join(CREATE_CONFIG);
        let before = "manage-cgroups-mode soft\nnetwork-lock nftables\n";
        fs::write(&named, before).unwrap();
        let guard = closing_connections(own.path()).unwrap().unwrap();
        assert_eq!(
            fs::read_to_string(&named).unwrap(),
            "manage-cgroups-mode soft\ntcp-close\nnetwork-lock skip\n"
        );
        drop(guard);
        assert_eq!(fs::read_to_string(&named).unwrap(), before);
        assert!(!saved_path(&named).exists());
        // What a dead shim left is put back before the next dump chooses its lock.
        std::mem::forget(closing_connections(own.path()).unwrap().unwrap());
        assert!(fs::read_to_string(&named).unwrap().contains("skip"));
        assert_eq!(
            prefer_nftables(own.path()).unwrap(),
            "as the CRIU config says"
        );
        assert_eq!(fs::read_to_string(&named).unwrap(), before);
        // And before the next final dump.
        std::mem::forget(closing_connections(own.path()).unwrap().unwrap());
        drop(closing_connections(own.path()).unwrap().unwrap());
        assert_eq!(fs::read_to_string(&named).unwrap(), before);
    }
}
