//! Where the shim keeps things per containerd instance: runc's state (tmpfs) and pclive's
//! migration records (on disk). The CLI computes the same paths from `--address` and
//! `--namespace`, so both ends of a host agree without configuration.

use std::path::{Path, PathBuf};

/// Overrides the base of the record directories (`/var/lib/pclive/<instance>`), e.g. for test
/// beds that run several containerd instances as separate hosts.
pub const STATE_DIR_ENV: &str = "PCLIVE_STATE_DIR";

/// FNV-1a of a containerd address: stable across builds and platforms, unlike std's
/// DefaultHasher.
fn instance(containerd_address: &str) -> String {
    let hash = containerd_address
        .trim_start_matches("unix://")
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        });
    format!("{hash:016x}")
}

/// runc's `--root` for one containerd instance and namespace.
pub fn runc_root(containerd_address: &str, namespace: &str) -> PathBuf {
    Path::new("/run/pclive/runc")
        .join(instance(containerd_address))
        .join(namespace)
}

/// Where the migration records of one containerd instance and namespace live.
pub fn state_dir(containerd_address: &str, namespace: &str) -> PathBuf {
    let base = match std::env::var_os(STATE_DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => Path::new("/var/lib/pclive").join(instance(containerd_address)),
    };
    base.join(namespace)
}

/// The network namespace of process `pid`, as a path. Here, in a module that imports nothing of
/// the crate, because both the tool runner and the network helpers need it.
pub fn netns_of_pid(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/ns/net"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_differ_per_containerd_instance_and_namespace() {
        let a = runc_root("/tmp/a/containerd.sock", "default");
        assert_ne!(a, runc_root("/tmp/b/containerd.sock", "default"));
        assert_ne!(a, runc_root("/tmp/a/containerd.sock", "other"));
        assert_eq!(a, runc_root("unix:///tmp/a/containerd.sock", "default"));
        assert!(a.starts_with("/run/pclive/runc"));
        let s = state_dir("/tmp/a/containerd.sock", "default");
        assert!(s.ends_with("default"));
    }
}
