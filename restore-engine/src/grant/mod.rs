//! What the receiving container was granted, and the check that received CRIU images do not
//! exceed it.
//!
//! CRIU restores, as root, the credentials, capabilities, seccomp state, namespaces and mounts
//! recorded in the images, not those of the receiving container's OCI spec. Images that arrive
//! over the network are therefore checked against a [`Grant`] (built by the shim from the
//! receiving container's spec) before CRIU sees them:
//!
//! - [`creds`]: every thread's uids, gids, groups, capability sets, no_new_privs and seccomp
//!   mode (core-TID.img),
//! - [`namespaces`]: a task in the dumping host's namespace would be restored into this host's
//!   one (inventory.img, ids-PID.img),
//! - [`mounts`]: every mount of the container's mount namespace (mountpoints-N.img).

pub mod creds;
pub mod mounts;
pub mod namespaces;

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::images::{self, ImageError};

/// Linux capability numbers (include/uapi/linux/capability.h), by name.
pub const CAPABILITIES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

pub const CAP_SETGID: u32 = 6;
pub const CAP_SETUID: u32 = 7;
pub const CAP_SYS_ADMIN: u32 = 21;

/// The number of a capability name (`CAP_NET_RAW` or `NET_RAW`, any case).
pub fn capability_number(name: &str) -> Option<u32> {
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    };
    CAPABILITIES
        .iter()
        .position(|c| *c == full)
        .map(|n| n as u32)
}

/// The name of capability `number` (`CAP_43` for numbers this table does not know).
pub fn capability_name(number: u32) -> String {
    CAPABILITIES
        .get(number as usize)
        .map(|n| n.to_string())
        .unwrap_or_else(|| format!("CAP_{number}"))
}

/// A mask of capabilities (bit N: capability N).
pub fn mask_of<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<u64, String> {
    names.into_iter().try_fold(0u64, |mask, name| {
        capability_number(name)
            .map(|n| mask | 1 << n)
            .ok_or_else(|| format!("unknown capability {name}"))
    })
}

/// The capability sets the receiving container's process gets (bit N: capability N).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    pub bounding: u64,
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
    pub ambient: u64,
}

impl Capabilities {
    /// Every capability a process of the container can come to hold: a root process regains
    /// its bounding set on exec, the others are what it starts with.
    pub fn ceiling(&self) -> u64 {
        self.bounding | self.effective | self.permitted | self.inheritable | self.ambient
    }
}

/// A kind of namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Namespace {
    Pid,
    Network,
    Ipc,
    Uts,
    Mount,
    User,
    Cgroup,
    Time,
}

impl Namespace {
    pub const ALL: [Namespace; 8] = [
        Namespace::Pid,
        Namespace::Network,
        Namespace::Ipc,
        Namespace::Uts,
        Namespace::Mount,
        Namespace::User,
        Namespace::Cgroup,
        Namespace::Time,
    ];

    /// Its file under /proc/PID/ns.
    pub fn proc_name(self) -> &'static str {
        match self {
            Namespace::Pid => "pid",
            Namespace::Network => "net",
            Namespace::Ipc => "ipc",
            Namespace::Uts => "uts",
            Namespace::Mount => "mnt",
            Namespace::User => "user",
            Namespace::Cgroup => "cgroup",
            Namespace::Time => "time",
        }
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Namespace::Pid => "pid",
            Namespace::Network => "network",
            Namespace::Ipc => "ipc",
            Namespace::Uts => "uts",
            Namespace::Mount => "mount",
            Namespace::User => "user",
            Namespace::Cgroup => "cgroup",
            Namespace::Time => "time",
        })
    }
}

/// A mount of the receiving container's spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantedMount {
    pub destination: String,
    /// The spec's type (`proc`, `tmpfs`, `bind`, ...; empty if it names none).
    #[serde(default)]
    pub typ: String,
    pub readonly: bool,
}

/// What the receiving container's OCI spec grants its processes: the ceiling for what the
/// images may hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub capabilities: Capabilities,
    pub no_new_privileges: bool,
    pub uid: u32,
    pub gid: u32,
    #[serde(default)]
    pub additional_gids: Vec<u32>,
    /// The spec has a seccomp profile: every thread must run under a filter.
    pub seccomp: bool,
    /// The namespaces the container has of its own (new, or joined by path); it shares the
    /// others with the host.
    pub namespaces: Vec<Namespace>,
    pub mounts: Vec<GrantedMount>,
    #[serde(default)]
    pub masked_paths: Vec<String>,
    #[serde(default)]
    pub readonly_paths: Vec<String>,
    /// The container joins a network namespace prepared with the source's address, whose
    /// interfaces stay down until the switchover (`pclive receive --move-address`): only a
    /// source whose address moves may come, and only such a source's restore raises them.
    #[serde(default)]
    pub moves_address: bool,
    /// The receiving container restores established TCP connections closed (`pclive receive
    /// --tcp-close`): the source is told so in the handshake ([`crate::wire::Terms`]).
    #[serde(default)]
    pub closes_connections: bool,
}

impl Grant {
    pub fn has_own(&self, ns: Namespace) -> bool {
        self.namespaces.contains(&ns)
    }

    /// Reads a grant written as JSON (mode 0600, by the shim).
    pub fn read(path: &Path) -> Result<Grant, String> {
        let text = std::fs::read(path).map_err(|e| {
            format!(
                "cannot read the receiving container's grant {}: {e} (the shim writes it before \
                 starting the receiving server; images cannot be checked without it)",
                path.display()
            )
        })?;
        serde_json::from_slice(&text).map_err(|e| {
            format!(
                "the receiving container's grant {} is not valid: {e}; restart the receive",
                path.display()
            )
        })
    }
}

/// The file in the receiving server's work directory that holds its grant (JSON, mode 0600).
pub const GRANT_FILE: &str = "grant.json";

/// How many violations an error spells out.
const SHOWN: usize = 6;

#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    #[error("checking the images against the receiving container's spec: {0}")]
    Image(#[from] ImageError),
    #[error("{}", describe(.0))]
    Exceeds(Vec<String>),
    #[error("the source moves the container's address with it (pclive migrate --move-address), but this receiving container was not prepared for that: start it with pclive receive --netns PATH --move-address, in a network namespace that has the source's address")]
    AddressNotExpected,
    #[error("this receiving container takes the source's address (pclive receive --move-address), but the source does not move it: pass --move-address to pclive migrate too")]
    AddressNotMoved,
}

/// Whether a source that does (`moves`) or does not move the container's address may migrate
/// into a container with `grant`: both ends must say the same, or two hosts would announce the
/// address at once, or none.
pub fn check_address(moves: bool, grant: &Grant) -> Result<(), GrantError> {
    match (moves, grant.moves_address) {
        (true, false) => Err(GrantError::AddressNotExpected),
        (false, true) => Err(GrantError::AddressNotMoved),
        _ => Ok(()),
    }
}

fn describe(violations: &[String]) -> String {
    let mut text = format!(
        "the images exceed what the receiving container's spec grants, so they are not restored: {}",
        violations
            .iter()
            .take(SHOWN)
            .cloned()
            .collect::<Vec<_>>()
            .join("; ")
    );
    if violations.len() > SHOWN {
        text.push_str(&format!("; and {} more", violations.len() - SHOWN));
    }
    text
}

/// A task of the image set (pstree.img) and its threads.
pub(crate) struct Task {
    pub pid: u32,
    pub threads: Vec<u32>,
}

/// Checks the images in `images_dir` against `grant`: every violation is listed in
/// [`GrantError::Exceeds`].
pub fn check(images_dir: &Path, grant: &Grant) -> Result<(), GrantError> {
    let mut tasks = Vec::new();
    for e in images::read_pstree(images_dir)? {
        // A zombie runs nothing and holds nothing: it has only a core file, with no
        // credentials or namespaces to check (a forking workload has some at any moment).
        let leader = creds::read_core(images_dir, e.pid)?;
        if leader.tc.as_ref().map(|tc| tc.task_state) == Some(creds::TASK_DEAD) {
            continue;
        }
        tasks.push(Task {
            pid: e.pid,
            threads: if e.threads.is_empty() {
                vec![e.pid]
            } else {
                e.threads
            },
        });
    }
    let mut violations = Vec::new();
    creds::check(images_dir, &tasks, grant, &mut violations)?;
    let host = namespaces::check(images_dir, &tasks, grant, &mut violations)?;
    if !host.contains(&Namespace::Mount) {
        mounts::check(images_dir, grant, &mut violations)?;
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(GrantError::Exceeds(violations))
    }
}

#[cfg(test)]
mod tests;
