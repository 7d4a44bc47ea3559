//! Mounts of the container's mount namespace (mountpoints-N.img) against the spec's: each must
//! be one the spec has (or a masked or read-only path runc makes), of the spec's type, and
//! read-only where the spec says so. A container granted CAP_SYS_ADMIN may mount and remount
//! on its own: its mounts are not checked.

use std::fs;
use std::path::Path;

use prost::Message;

use super::{Grant, GrantedMount, CAP_SYS_ADMIN};
use crate::images::{self, Header, ImageError};

/// criu/include/magic.h: MNTS_MAGIC.
pub const MNTS_MAGIC: u32 = 0x5556_3928;

const MS_RDONLY: u32 = 1;

/// images/mnt.proto (CRIU 4.2), only the fields checked here.
#[derive(Clone, PartialEq, Message)]
pub struct MntEntry {
    #[prost(uint32, required, tag = "1")]
    pub fstype: u32,
    #[prost(uint32, required, tag = "2")]
    pub mnt_id: u32,
    #[prost(uint32, required, tag = "5")]
    pub flags: u32,
    #[prost(string, required, tag = "6")]
    pub root: String,
    #[prost(string, required, tag = "7")]
    pub mountpoint: String,
    #[prost(string, required, tag = "8")]
    pub source: String,
    #[prost(bool, optional, tag = "13")]
    pub ext_mount: Option<bool>,
    #[prost(string, optional, tag = "14")]
    pub fsname: Option<String>,
    #[prost(uint32, optional, tag = "17")]
    pub sb_flags: Option<u32>,
}

impl MntEntry {
    pub fn readonly(&self) -> bool {
        self.flags & MS_RDONLY != 0 || self.sb_flags.unwrap_or(0) & MS_RDONLY != 0
    }

    fn type_name(&self) -> String {
        match fstype_name(self.fstype) {
            Some(name) => name.to_string(),
            None => self
                .fsname
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| format!("fstype-{}", self.fstype)),
        }
    }
}

/// images/mnt.proto `fstype`, as mount(8) names them.
const FSTYPES: [(u32, &str); 19] = [
    (1, "proc"),
    (2, "sysfs"),
    (3, "devtmpfs"),
    (4, "binfmt_misc"),
    (5, "tmpfs"),
    (6, "devpts"),
    (7, "simfs"),
    (8, "pstore"),
    (9, "securityfs"),
    (10, "fusectl"),
    (11, "debugfs"),
    (12, "cgroup"),
    (13, "aufs"),
    (14, "mqueue"),
    (15, "fuse"),
    (17, "overlay"),
    (18, "autofs"),
    (19, "tracefs"),
    (23, "cgroup2"),
];

fn fstype_name(fstype: u32) -> Option<&'static str> {
    FSTYPES.iter().find(|(n, _)| *n == fstype).map(|(_, s)| *s)
}

/// The pseudo file systems whose type is compared with the spec's (a bind mount or a block
/// device has the type of what it mounts).
const COMPARED: [&str; 6] = ["proc", "sysfs", "tmpfs", "devpts", "mqueue", "devtmpfs"];

fn normal(path: &str) -> &str {
    let trimmed = path.trim_start_matches('.').trim_end_matches('/');
    if trimmed.is_empty() {
        "/"
    } else {
        trimmed
    }
}

fn is_under(path: &str, dir: &str) -> bool {
    path.strip_prefix(dir)
        .is_some_and(|rest| rest.starts_with('/'))
}

pub fn read_mounts(dir: &Path) -> Result<Vec<MntEntry>, ImageError> {
    let entries = fs::read_dir(dir).map_err(|source| ImageError::Io {
        file: dir.to_owned(),
        source,
    })?;
    let mut mounts = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("mountpoints-") && name.ends_with(".img") {
            mounts.extend(images::read_image::<MntEntry>(
                &entry.path(),
                Header::Common(MNTS_MAGIC),
            )?);
        }
    }
    Ok(mounts)
}

pub(crate) fn check(
    dir: &Path,
    grant: &Grant,
    violations: &mut Vec<String>,
) -> Result<(), ImageError> {
    if grant.capabilities.ceiling() & (1 << CAP_SYS_ADMIN) != 0 {
        return Ok(());
    }
    for mount in read_mounts(dir)? {
        if let Some(v) = check_one(&mount, grant) {
            violations.push(v);
        }
    }
    Ok(())
}

const ADVICE: &str = "give the receiving container the same mounts as the source's";

fn check_one(mount: &MntEntry, grant: &Grant) -> Option<String> {
    let at = normal(&mount.mountpoint);
    let typ = mount.type_name();
    // The root is the receiving container's own rootfs (runc's); the console is a pty runc
    // binds there.
    if at == "/" || at == "/dev/console" {
        return None;
    }
    let readonly_needed = |what: &str| {
        (!mount.readonly()).then(|| {
            format!(
                "a {typ} mount at {at} is writable, but the receiving container's spec has {at} \
                 read-only ({what}); {ADVICE}"
            )
        })
    };
    let granted: Option<&GrantedMount> = grant
        .mounts
        .iter()
        .rev()
        .find(|m| normal(&m.destination) == at);
    if let Some(granted) = granted {
        let spec_type = granted.typ.as_str();
        if COMPARED.contains(&spec_type)
            && spec_type != typ
            && !(spec_type == "tmpfs" && typ == "devtmpfs")
        {
            return Some(format!(
                "a {typ} mount at {at}, where the receiving container's spec mounts {spec_type}; \
                 {ADVICE}"
            ));
        }
        // cgroup v1: runc mounts a tmpfs at the spec's cgroup mount, writable even when the
        // spec says ro (runc 1.3), to hold the hierarchies' read-only mounts: its own making.
        if granted.readonly && !(spec_type == "cgroup" && typ == "tmpfs") {
            return readonly_needed("a read-only mount");
        }
        return None;
    }
    if grant.masked_paths.iter().any(|p| normal(p) == at) {
        return None;
    }
    if grant.readonly_paths.iter().any(|p| normal(p) == at) {
        return readonly_needed("readonlyPaths");
    }
    // cgroup v1: runc mounts each hierarchy below the spec's cgroup mount.
    let below_cgroup = grant
        .mounts
        .iter()
        .any(|m| (m.typ == "cgroup" || m.typ == "cgroup2") && is_under(at, normal(&m.destination)));
    if below_cgroup && (typ == "cgroup" || typ == "cgroup2" || typ == "tmpfs") {
        return None;
    }
    Some(format!(
        "a {typ} mount at {at} that the receiving container's spec does not have; {ADVICE}"
    ))
}
