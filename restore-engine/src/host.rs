//! What this host offers pclive: tool versions and kernel features.

use std::fs;
use std::path::Path;
use std::process::Command;

use serde::Serialize;

use crate::versions::{self, MIN_CONTAINERD, MIN_CRIU, MIN_RUNC};

/// One finding of `pclive check`.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub name: String,
    pub ok: bool,
    /// Works, but slower or more limited on this host than it could be: `meaning` says why and
    /// what to do. Never set with `ok: false`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub note: bool,
    pub detail: String,
    /// What follows for pclive, or what to do.
    pub meaning: String,
}

/// Everything `pclive check` reports.
#[derive(Debug, Clone, Serialize)]
pub struct HostReport {
    pub kernel: String,
    pub findings: Vec<Finding>,
}

impl HostReport {
    /// True when every required finding holds.
    pub fn ready(&self) -> bool {
        self.findings.iter().all(|f| f.ok)
    }
}

fn version_finding(name: &'static str, binary: &str, args: &[&str], min: (u32, u32)) -> Finding {
    match versions::tool_version(name, binary, args, min) {
        Ok((major, minor, patch)) => Finding {
            name: name.into(),
            ok: true,
            note: false,
            detail: format!("{major}.{minor}.{patch}"),
            meaning: format!("{name} >= {}.{} as pclive needs", min.0, min.1),
        },
        Err(e) => Finding {
            name: name.into(),
            ok: false,
            note: false,
            detail: "missing or too old".into(),
            meaning: e.to_string(),
        },
    }
}

fn criu_feature(feature: &str) -> bool {
    Command::new("criu")
        .args(["check", "--feature", feature])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Feature bit of a virtio balloon that reports freed guest pages to the hypervisor
/// (VIRTIO_BALLOON_F_REPORTING).
const VIRTIO_BALLOON_F_REPORTING: usize = 5;

/// Whether a virtio balloon hands memory freed in this VM back to its hypervisor (free page
/// reporting). `sys` is normally /sys; each device's `features` file has one '0'/'1' per bit.
fn free_page_reporting(sys: &Path) -> bool {
    let Ok(devices) = fs::read_dir(sys.join("bus/virtio/devices")) else {
        return false;
    };
    devices.flatten().any(|device| {
        let path = device.path();
        let balloon = fs::read_link(path.join("driver"))
            .is_ok_and(|driver| driver.file_name() == Some("virtio_balloon".as_ref()));
        balloon
            && fs::read_to_string(path.join("features"))
                .is_ok_and(|f| f.as_bytes().get(VIRTIO_BALLOON_F_REPORTING) == Some(&b'1'))
    })
}

/// Inspects this host.
pub fn inspect() -> HostReport {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let mut findings = vec![
        version_finding("containerd", "containerd", &["--version"], MIN_CONTAINERD),
        version_finding("runc", "runc", &["--version"], MIN_RUNC),
        version_finding("criu", "criu", &["--version"], MIN_CRIU),
    ];
    let uffd = crate::uffd::probe();
    findings.push(match &uffd {
        Ok(features) => Finding {
            name: "userfaultfd".into(),
            ok: features.has(crate::uffd::UFFD_FEATURE_EVENT_FORK | crate::uffd::UFFD_FEATURE_EVENT_REMAP),
            note: false,
            detail: format!("features {:#x}", features.features),
            meaning: "lazy restore: pclive installs memory with UFFDIO_COPY from local RAM".into(),
        },
        Err(e) => Finding {
            name: "userfaultfd".into(),
            ok: false,
            note: false,
            detail: e.to_string(),
            meaning: "no userfaultfd: lazy restore cannot work (needs CONFIG_USERFAULTFD and root or vm.unprivileged_userfaultfd=1)".into(),
        },
    });
    let wp = crate::memory::uffd_wp_support();
    findings.push(Finding {
        name: "uffd-wp".into(),
        // Optional: the write-protect tracker is an optimisation over content hashing.
        ok: true,
        note: false,
        detail: match &wp {
            Ok(()) => "write-protect async and PAGEMAP_SCAN: yes".into(),
            Err(why) => why.clone(),
        },
        meaning: if wp.is_ok() {
            "O(dirty) write-protect dirty tracking: pre-copy rounds cost the pages written".into()
        } else {
            "no O(dirty) write-protect tracking: pclive uses soft-dirty or hashes page contents"
                .into()
        },
    });
    let (tracker, why) = crate::memory::default_tracker();
    findings.push(Finding {
        name: "tracker".into(),
        ok: true,
        // Content hashing rereads all memory every round.
        note: tracker == "content-hash",
        detail: tracker.into(),
        meaning: format!(
            "pre-copy finds changed pages with the {tracker} tracker by default: {why} \
             (pclive migrate --tracker chooses another)"
        ),
    });
    let soft_dirty = criu_feature("mem_dirty_track");
    findings.push(Finding {
        name: "soft-dirty".into(),
        // Optional: pclive falls back to its content-hash tracker.
        ok: true,
        note: false,
        detail: if soft_dirty { "present" } else { "absent" }.into(),
        meaning: if soft_dirty {
            "dirty pages are tracked by the kernel".into()
        } else {
            "no soft-dirty: CRIU pre-dump cannot run here (pclive needs it for none of its trackers but soft-dirty)"
                .into()
        },
    });
    let reporting = free_page_reporting(Path::new("/sys"));
    findings.push(Finding {
        name: "free-page-reporting".into(),
        // Informational: it sets the pace of restores, it does not stop them.
        ok: true,
        note: reporting,
        detail: if reporting {
            "on (virtio balloon)"
        } else {
            "off"
        }
        .into(),
        meaning: if reporting {
            "memory freed in this VM goes back to its hypervisor, which must populate every page \
             a restore installs again: the fill after a live migration runs at that pace \
             (0.3-0.8 GB/s measured on such a VM, against 1.5-2.2 GB/s into memory used before; \
             docs/benchmarks.md). A VM whose memory stays backed (no free page reporting, or \
             preallocated memory) fills at the faster pace"
                .into()
        } else {
            "memory freed on this host stays with it".into()
        },
    });
    findings.push(kdat_cache_finding(Path::new("/run")));
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let freezer = v2 || Path::new("/sys/fs/cgroup/freezer").exists();
    findings.push(Finding {
        name: "cgroups".into(),
        ok: freezer,
        note: false,
        detail: if v2 { "v2 (unified)" } else { "v1" }.into(),
        meaning: if freezer {
            "containers can be frozen for the final dump".into()
        } else {
            "no freezer cgroup: pause and checkpoint cannot work".into()
        },
    });
    HostReport { kernel, findings }
}

/// Whether CRIU can keep what it probes of the kernel between runs: it writes `/run/criu.kdat`
/// only where /run is a tmpfs (so that a reboot forgets it), as on any systemd host. Elsewhere
/// every CRIU run probes again (a network namespace with a veth pair, the vDSO, ...), about
/// 50 ms measured here, and a migration's pause holds two runs: the dump and the restore.
fn kdat_cache_finding(run: &Path) -> Finding {
    use nix::sys::statfs::{statfs, TMPFS_MAGIC};
    let (kept, detail, meaning) = match statfs(run) {
        Ok(fs) if fs.filesystem_type() == TMPFS_MAGIC => (
            true,
            format!("kept ({} is a tmpfs)", run.display()),
            "CRIU keeps its kernel probe between runs".to_string(),
        ),
        Ok(fs) => (
            false,
            format!(
                "not kept ({} is not a tmpfs, type {:#x})",
                run.display(),
                fs.filesystem_type().0
            ),
            format!(
                "every CRIU run probes the kernel again (about 50 ms here), and a migration's \
                 pause holds two (the dump and the restore): mount a tmpfs on {} at boot, as \
                 systemd does, so CRIU keeps criu.kdat there",
                run.display()
            ),
        ),
        Err(e) => (
            false,
            format!("unknown ({}: {e})", run.display()),
            "CRIU may probe the kernel again on every run".to_string(),
        ),
    };
    Finding {
        name: "criu-kdat-cache".into(),
        // Informational: it lengthens pauses, it does not stop them.
        ok: true,
        note: !kept,
        detail,
        meaning,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kdat_cache_is_kept_only_on_a_tmpfs() {
        // /dev/shm is a tmpfs on every Linux host; /proc never is.
        let shm = kdat_cache_finding(Path::new("/dev/shm"));
        assert!(shm.detail.starts_with("kept") && !shm.note, "{shm:?}");
        let proc = kdat_cache_finding(Path::new("/proc"));
        assert!(proc.detail.starts_with("not kept") && proc.note, "{proc:?}");
        assert!(proc.meaning.contains("mount a tmpfs on /proc"), "{proc:?}");
    }

    #[test]
    fn report_lists_every_tool() {
        let report = inspect();
        let names: Vec<&str> = report.findings.iter().map(|f| f.name.as_str()).collect();
        for want in [
            "containerd",
            "runc",
            "criu",
            "userfaultfd",
            "uffd-wp",
            "tracker",
            "soft-dirty",
            "free-page-reporting",
            "criu-kdat-cache",
            "cgroups",
        ] {
            assert!(names.contains(&want), "{names:?}");
        }
    }

    /// A fake /sys with a balloon and a disk: only the balloon's bit 5 counts.
    #[test]
    fn free_page_reporting_is_read_from_the_balloons_feature_bits() {
        let sys = tempfile::tempdir().unwrap();
        let device = |name: &str, driver: &str, features: &str| {
            let dir = sys.path().join("bus/virtio/devices").join(name);
            fs::create_dir_all(&dir).unwrap();
            let drivers = sys.path().join("bus/virtio/drivers").join(driver);
            fs::create_dir_all(&drivers).unwrap();
            let _ = fs::remove_file(dir.join("driver"));
            std::os::unix::fs::symlink(&drivers, dir.join("driver")).unwrap();
            fs::write(dir.join("features"), format!("{features}\n")).unwrap();
        };
        assert!(!free_page_reporting(sys.path()), "no devices at all");
        device("virtio1", "virtio_blk", "0010011001");
        assert!(
            !free_page_reporting(sys.path()),
            "bit 5 of a disk is not reporting"
        );
        device("virtio0", "virtio_balloon", "0110000100");
        assert!(!free_page_reporting(sys.path()), "a balloon without bit 5");
        device("virtio0", "virtio_balloon", "0110010100");
        assert!(free_page_reporting(sys.path()));
    }
}
