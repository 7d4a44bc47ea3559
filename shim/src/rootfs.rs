//! The container's root filesystem as a migration sees it: where it is (the spec's
//! `root.path`), what of it must travel (the overlayfs upper directory of a snapshot, or the
//! whole directory of a `--rootfs` container), and which host paths are bind-mounted into it
//! (never copied: the user must say the destination has them).

use std::fs;
use std::path::{Path, PathBuf};

use restore_engine::layer::LayerSource;
use restore_engine::source::LayerPlan;

fn spec(bundle: &Path) -> Result<oci_spec::runtime::Spec, String> {
    oci_spec::runtime::Spec::load(bundle.join("config.json"))
        .map_err(|e| format!("cannot read {}/config.json: {e}", bundle.display()))
}

/// The container's root filesystem directory (`root.path`, relative to the bundle unless
/// absolute).
pub fn root_dir(bundle: &Path) -> Result<PathBuf, String> {
    let spec = spec(bundle)?;
    let root = spec
        .root()
        .as_ref()
        .map(|r| r.path().clone())
        .unwrap_or_else(|| PathBuf::from("rootfs"));
    Ok(if root.is_absolute() {
        root
    } else {
        bundle.join(root)
    })
}

/// What of the root filesystem at `root` travels: with `shared`, nothing (the destination
/// checks it sees the same tree); on an overlayfs mount, its upper directory; otherwise the
/// whole directory.
pub fn layer_plan(root: &Path, shared: bool) -> Result<LayerPlan, String> {
    if shared {
        return Ok(LayerPlan::Shared(root.to_owned()));
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    let root = fs::canonicalize(root).map_err(|e| format!("{}: {e}", root.display()))?;
    match overlay_upper(&mountinfo, &root)? {
        Some(upper) => Ok(LayerPlan::Copy(LayerSource::OverlayUpper(upper))),
        None => Ok(LayerPlan::Copy(LayerSource::Directory(root))),
    }
}

/// The upper directory of the overlayfs mounted at `mount_point` (the last mount there wins);
/// None if what is mounted there is not overlayfs.
fn overlay_upper(mountinfo: &str, mount_point: &Path) -> Result<Option<PathBuf>, String> {
    let mut found = None;
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.len() < dash + 4 || fields.len() < 5 {
            continue;
        }
        if Path::new(&unescape(fields[4])) != mount_point {
            continue;
        }
        found = Some((fields[dash + 1] == "overlay").then(|| fields[dash + 3].to_string()));
    }
    let Some(Some(options)) = found else {
        return Ok(None);
    };
    options
        .split(',')
        .find_map(|o| o.strip_prefix("upperdir="))
        .map(|u| Some(PathBuf::from(unescape(u))))
        .ok_or_else(|| {
            format!(
                "the overlayfs at {} has no upper directory (a read-only snapshot): nothing of it can change, pass --shared-rootfs if the destination has the same image",
                mount_point.display()
            )
        })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A host path bind-mounted into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalMount {
    /// `DESTINATION (from SOURCE)`.
    pub text: String,
    /// One of the host's own configuration files at its own path (`/etc/hosts`,
    /// `/etc/resolv.conf`, `/etc/hostname`, `/etc/localtime`, as `ctr run --net-host` mounts
    /// them): every host has its own, and the container is meant to see the host it runs on.
    pub host_config: bool,
}

const HOST_CONFIG_FILES: [&str; 4] = [
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/hostname",
    "/etc/localtime",
];

/// The host paths bind-mounted into the container.
pub fn external_mounts(bundle: &Path) -> Result<Vec<ExternalMount>, String> {
    let spec = spec(bundle)?;
    let mut out = Vec::new();
    for m in spec.mounts().iter().flatten() {
        let bind = m.typ().as_deref() == Some("bind")
            || m.options()
                .iter()
                .flatten()
                .any(|o| o == "bind" || o == "rbind");
        if !bind {
            continue;
        }
        let source = m
            .source()
            .as_ref()
            .map_or_else(|| "?".into(), |s| s.display().to_string());
        let destination = m.destination().display().to_string();
        out.push(ExternalMount {
            host_config: source == destination && HOST_CONFIG_FILES.contains(&source.as_str()),
            text: format!("{destination} (from {source})"),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_mounts_are_external_and_the_hosts_own_config_files_are_told_apart() {
        let bundle = tempfile::tempdir().unwrap();
        std::fs::write(
            bundle.path().join("config.json"),
            r#"{"ociVersion": "1.1.0", "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": "/etc/hosts", "options": ["rbind", "ro"]},
                {"destination": "/etc/resolv.conf", "source": "/srv/resolv.conf", "options": ["rbind"]},
                {"destination": "/data", "type": "none", "source": "/srv/data", "options": ["bind", "rw"]},
                {"destination": "/scratch", "type": "tmpfs", "source": "tmpfs"}
            ]}"#,
        )
        .unwrap();
        let mounts = external_mounts(bundle.path()).unwrap();
        let seen: Vec<(&str, bool)> = mounts
            .iter()
            .map(|m| (m.text.as_str(), m.host_config))
            .collect();
        assert_eq!(
            seen,
            [
                ("/etc/hosts (from /etc/hosts)", true),
                ("/etc/resolv.conf (from /srv/resolv.conf)", false),
                ("/data (from /srv/data)", false),
            ]
        );
    }

    #[test]
    fn the_overlay_upper_directory_is_found_in_mountinfo() {
        let info = "\
24 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
301 24 0:77 / /run/c/bundle\\040x/rootfs rw,relatime - overlay overlay rw,lowerdir=/l1:/l2,upperdir=/snap/12/fs,workdir=/snap/12/work
302 24 0:78 / /run/c/other/rootfs rw - tmpfs tmpfs rw
303 24 0:79 / /run/c/ro/rootfs ro - overlay overlay ro,lowerdir=/l1:/l2
";
        assert_eq!(
            overlay_upper(info, Path::new("/run/c/bundle x/rootfs")).unwrap(),
            Some(PathBuf::from("/snap/12/fs"))
        );
        assert_eq!(
            overlay_upper(info, Path::new("/run/c/other/rootfs")).unwrap(),
            None
        );
        assert_eq!(overlay_upper(info, Path::new("/nowhere")).unwrap(), None);
        let err = overlay_upper(info, Path::new("/run/c/ro/rootfs")).unwrap_err();
        assert!(err.contains("--shared-rootfs"), "{err}");
    }
}
