use std::fs;
use std::path::Path;

use super::creds::{CoreEntry, CredsEntry, TaskCoreEntry, ThreadCoreEntry};
use super::mounts::{MntEntry, MNTS_MAGIC};
use super::namespaces::IDS_MAGIC;
use super::*;
use crate::images::{
    encode_entries, Header, InventoryEntry, PstreeEntry, TaskKobjIdsEntry, CORE_MAGIC, PSTREE_MAGIC,
};

/// runc's default capabilities (as containerd's default spec): CAP_NET_RAW among them.
const DEFAULT_CAPS: u64 = 0xA804_25FB;
const NET_RAW: u64 = 1 << 13;

fn ids(pid: u32, net: u32) -> TaskKobjIdsEntry {
    TaskKobjIdsEntry {
        vm_id: 1,
        files_id: 1,
        fs_id: 1,
        sighand_id: 1,
        pid_ns_id: Some(pid),
        net_ns_id: Some(net),
        ipc_ns_id: Some(11),
        uts_ns_id: Some(12),
        mnt_ns_id: Some(13),
        user_ns_id: Some(7),
        cgroup_ns_id: Some(8),
        time_ns_id: Some(5),
    }
}

fn host_ids() -> TaskKobjIdsEntry {
    TaskKobjIdsEntry {
        ipc_ns_id: Some(3),
        uts_ns_id: Some(4),
        mnt_ns_id: Some(6),
        ..ids(1, 2)
    }
}

fn creds(caps: u64) -> CredsEntry {
    let words = vec![caps as u32, (caps >> 32) as u32];
    CredsEntry {
        cap_prm: words.clone(),
        cap_eff: words.clone(),
        cap_bnd: words,
        cap_inh: vec![0, 0],
        cap_amb: vec![0, 0],
        no_new_privs: Some(1),
        ..Default::default()
    }
}

fn mount(fstype: u32, at: &str, flags: u32) -> MntEntry {
    MntEntry {
        fstype,
        mnt_id: 1,
        flags,
        root: "/".into(),
        mountpoint: at.into(),
        source: "none".into(),
        ext_mount: None,
        fsname: None,
        sb_flags: None,
    }
}

/// Images of one task `sh` (pid 1) holding `caps` in its own namespaces (network: `net`; 2 is
/// the host's), with /proc, /sys (read-only) and `extra` mounts.
fn write_images(dir: &Path, caps: u64, net: u32, extra: &[MntEntry]) {
    let pstree = PstreeEntry {
        pid: 1,
        ppid: 0,
        pgid: 1,
        sid: 1,
        threads: vec![1],
    };
    fs::write(
        dir.join("pstree.img"),
        encode_entries(Header::Common(PSTREE_MAGIC), &[pstree]),
    )
    .unwrap();
    let core = CoreEntry {
        mtype: 1,
        tc: Some(TaskCoreEntry {
            task_state: 1,
            comm: "sh".into(),
            old_seccomp_mode: None,
        }),
        ids: None,
        thread_core: Some(ThreadCoreEntry {
            creds: Some(creds(caps)),
            seccomp_mode: None,
        }),
    };
    fs::write(
        dir.join("core-1.img"),
        encode_entries(Header::Common(CORE_MAGIC), &[core]),
    )
    .unwrap();
    let inventory = InventoryEntry {
        img_version: 2,
        root_ids: Some(host_ids()),
        ..Default::default()
    };
    fs::write(
        dir.join("inventory.img"),
        encode_entries(Header::Inventory, &[inventory]),
    )
    .unwrap();
    fs::write(
        dir.join("ids-1.img"),
        encode_entries(Header::Common(IDS_MAGIC), &[ids(9, net)]),
    )
    .unwrap();
    let mut mounts = vec![
        mount(0, "/", 0),
        mount(1, "/proc", 0xe),
        mount(2, "/sys", 0xf),
        mount(1, "/proc/sys", 0xf),
        mount(5, "/proc/kcore", 0x2),
    ];
    mounts.extend_from_slice(extra);
    fs::write(
        dir.join("mountpoints-13.img"),
        encode_entries(Header::Common(MNTS_MAGIC), &mounts),
    )
    .unwrap();
}

fn grant(caps: u64) -> Grant {
    let mount = |destination: &str, typ: &str, readonly: bool| GrantedMount {
        destination: destination.into(),
        typ: typ.into(),
        readonly,
    };
    Grant {
        capabilities: Capabilities {
            bounding: caps,
            effective: caps,
            permitted: caps,
            ..Default::default()
        },
        no_new_privileges: true,
        namespaces: vec![
            Namespace::Pid,
            Namespace::Network,
            Namespace::Ipc,
            Namespace::Uts,
            Namespace::Mount,
        ],
        mounts: vec![
            mount("/proc", "proc", false),
            mount("/sys", "sysfs", true),
            mount("/sys/fs/cgroup", "cgroup", true),
        ],
        masked_paths: vec!["/proc/kcore".into()],
        readonly_paths: vec!["/proc/sys".into()],
        ..Default::default()
    }
}

fn violations(dir: &Path, grant: &Grant) -> Vec<String> {
    match check(dir, grant) {
        Ok(()) => Vec::new(),
        Err(GrantError::Exceeds(v)) => v,
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn images_within_the_grant_pass() {
    let dir = tempfile::tempdir().unwrap();
    write_images(dir.path(), DEFAULT_CAPS, 10, &[]);
    check(dir.path(), &grant(DEFAULT_CAPS)).unwrap();
    // Fewer capabilities than granted are fine too.
    write_images(dir.path(), DEFAULT_CAPS & !NET_RAW, 10, &[]);
    check(dir.path(), &grant(DEFAULT_CAPS)).unwrap();
}

#[test]
fn a_zombie_with_only_a_core_file_passes_but_a_live_task_without_ids_does_not() {
    // As CRIU dumps a zombie (a forking workload has some at any moment): a pstree entry and a
    // core file with task_state TASK_DEAD, no credentials, no ids-PID.img.
    let dir = tempfile::tempdir().unwrap();
    write_images(dir.path(), DEFAULT_CAPS, 10, &[]);
    let mut entries = images::read_pstree(dir.path()).unwrap();
    entries.push(PstreeEntry {
        pid: 7,
        ppid: 1,
        pgid: 1,
        sid: 1,
        threads: vec![7],
    });
    fs::write(
        dir.path().join("pstree.img"),
        encode_entries(Header::Common(PSTREE_MAGIC), &entries),
    )
    .unwrap();
    let zombie = |state: u32| CoreEntry {
        mtype: 1,
        tc: Some(TaskCoreEntry {
            task_state: state,
            comm: "child".into(),
            old_seccomp_mode: None,
        }),
        ids: None,
        thread_core: None,
    };
    fs::write(
        dir.path().join("core-7.img"),
        encode_entries(
            Header::Common(CORE_MAGIC),
            &[zombie(super::creds::TASK_DEAD)],
        ),
    )
    .unwrap();
    check(dir.path(), &grant(DEFAULT_CAPS)).unwrap();
    // The same task alive is refused: nothing about it can be checked.
    fs::write(
        dir.path().join("core-7.img"),
        encode_entries(Header::Common(CORE_MAGIC), &[zombie(1)]),
    )
    .unwrap();
    let found = violations(dir.path(), &grant(DEFAULT_CAPS));
    assert!(
        found
            .iter()
            .any(|v| v.contains("task 7 (child) has no credentials")),
        "{found:?}"
    );
}

#[test]
fn a_capability_the_spec_does_not_grant_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    write_images(dir.path(), DEFAULT_CAPS, 10, &[]);
    let err = check(dir.path(), &grant(DEFAULT_CAPS & !NET_RAW)).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(
            "task 1 (sh) holds CAP_NET_RAW (in its permitted, effective, bounding sets), which \
             the receiving container's spec does not grant; give the receiving container the \
             same capabilities as the source's"
        ),
        "{text}"
    );
    assert!(matches!(err, GrantError::Exceeds(v) if v.len() == 1));
}

#[test]
fn credentials_beyond_the_spec_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_images(dir.path(), 0, 10, &[]);
    // Uid 0 in the images, uid 1000 without CAP_SETUID in the spec.
    let mut g = grant(0);
    g.uid = 1000;
    g.gid = 1000;
    g.seccomp = true;
    let v = violations(dir.path(), &g);
    assert!(v.iter().any(|v| v.contains("runs as uid 0")), "{v:?}");
    assert!(v.iter().any(|v| v.contains("holds gid 0")), "{v:?}");
    assert!(
        v.iter().any(|v| v.contains("without a seccomp filter")),
        "{v:?}"
    );
    // With CAP_SETUID and CAP_SETGID the container could have changed them itself.
    let mut g = grant(1 << CAP_SETUID | 1 << CAP_SETGID);
    g.uid = 1000;
    write_images(dir.path(), 1 << CAP_SETUID | 1 << CAP_SETGID, 10, &[]);
    check(dir.path(), &g).unwrap();
}

#[test]
fn a_task_of_the_hosts_namespace_is_refused_where_the_spec_gives_one_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    write_images(dir.path(), DEFAULT_CAPS, 2, &[]);
    let v = violations(dir.path(), &grant(DEFAULT_CAPS));
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(
        v[0].contains("task 1 (sh) was in the source host's own network namespace"),
        "{v:?}"
    );
    // A receiving container on the host's network: nothing more is granted by the images.
    let mut g = grant(DEFAULT_CAPS);
    g.namespaces.retain(|ns| *ns != Namespace::Network);
    check(dir.path(), &g).unwrap();
    write_images(dir.path(), DEFAULT_CAPS, 10, &[]);
    check(dir.path(), &g).unwrap();
}

#[test]
fn mounts_beyond_the_spec_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let extra = [
        mount(9, "/mnt/securityfs", 0),
        mount(2, "/proc/sys", 0),
        mount(12, "/sys/fs/cgroup/cpu", 0xf),
    ];
    write_images(dir.path(), DEFAULT_CAPS, 10, &extra);
    let v = violations(dir.path(), &grant(DEFAULT_CAPS));
    assert_eq!(v.len(), 2, "{v:?}");
    assert!(
        v[0].contains("a securityfs mount at /mnt/securityfs that the receiving container's spec does not have"),
        "{v:?}"
    );
    assert!(
        v[1].contains("a sysfs mount at /proc/sys is writable"),
        "{v:?}"
    );
    // A writable /sys where the spec has it read-only; a sysfs where it has a proc.
    let dir = tempfile::tempdir().unwrap();
    write_images(dir.path(), DEFAULT_CAPS, 10, &[]);
    let mut g = grant(DEFAULT_CAPS);
    g.mounts[1].readonly = true;
    g.mounts[0].typ = "tmpfs".into();
    let v = violations(dir.path(), &g);
    assert!(
        v[0].contains("a proc mount at /proc, where the receiving container's spec mounts tmpfs"),
        "{v:?}"
    );
    // CAP_SYS_ADMIN may mount anything itself.
    write_images(dir.path(), DEFAULT_CAPS | 1 << CAP_SYS_ADMIN, 10, &extra);
    check(dir.path(), &grant(DEFAULT_CAPS | 1 << CAP_SYS_ADMIN)).unwrap();
}

#[test]
fn runcs_writable_tmpfs_at_a_read_only_cgroup_v1_mount_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    // runc 1.3 on cgroup v1: a writable tmpfs at the spec's read-only cgroup mount, holding
    // the hierarchies' read-only mounts.
    let runcs = [
        mount(5, "/sys/fs/cgroup", 0),
        mount(12, "/sys/fs/cgroup/cpu", 1),
    ];
    write_images(dir.path(), DEFAULT_CAPS, 10, &runcs);
    check(dir.path(), &grant(DEFAULT_CAPS)).unwrap();
    // Another file system there, writable, is not runc's making.
    write_images(
        dir.path(),
        DEFAULT_CAPS,
        10,
        &[mount(2, "/sys/fs/cgroup", 0)],
    );
    let v = violations(dir.path(), &grant(DEFAULT_CAPS));
    assert!(
        v.iter()
            .any(|v| v.contains("a sysfs mount at /sys/fs/cgroup is writable")),
        "{v:?}"
    );
}

#[test]
fn many_violations_are_summed_up() {
    let dir = tempfile::tempdir().unwrap();
    write_images(dir.path(), DEFAULT_CAPS, 10, &[]);
    let text = check(dir.path(), &grant(0)).unwrap_err().to_string();
    // 14 capabilities: six spelt out.
    assert_eq!(text.matches(" holds CAP_").count(), 6, "{text}");
    assert!(text.ends_with("; and 8 more"), "{text}");
}

#[test]
fn missing_or_corrupt_images_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = check(dir.path(), &grant(0)).unwrap_err();
    assert!(matches!(err, GrantError::Image(_)));
    assert!(err.to_string().contains("pstree.img"), "{err}");
    write_images(dir.path(), DEFAULT_CAPS, 10, &[]);
    fs::write(dir.path().join("core-1.img"), b"garbage").unwrap();
    let err = check(dir.path(), &grant(DEFAULT_CAPS)).unwrap_err();
    assert!(err.to_string().contains("core-1.img"), "{err}");
}

#[test]
fn capability_names_and_grants_round_trip() {
    assert_eq!(capability_number("CAP_NET_RAW"), Some(13));
    assert_eq!(capability_number("net_raw"), Some(13));
    assert_eq!(capability_number("CAP_CHECKPOINT_RESTORE"), Some(40));
    assert_eq!(capability_name(0), "CAP_CHOWN");
    assert_eq!(capability_name(45), "CAP_45");
    assert!(mask_of(["CAP_FOO"]).is_err());
    let g = grant(DEFAULT_CAPS);
    let json = serde_json::to_string(&g).unwrap();
    assert_eq!(serde_json::from_str::<Grant>(&json).unwrap(), g);
}

#[test]
fn an_address_moves_only_when_both_ends_say_so() {
    let moving = Grant {
        moves_address: true,
        ..Default::default()
    };
    let staying = Grant::default();
    assert!(check_address(true, &moving).is_ok());
    assert!(check_address(false, &staying).is_ok());
    let err = check_address(true, &staying).unwrap_err().to_string();
    assert!(
        err.contains("pclive receive --netns PATH --move-address"),
        "{err}"
    );
    let err = check_address(false, &moving).unwrap_err().to_string();
    assert!(
        err.contains("pass --move-address to pclive migrate"),
        "{err}"
    );
    // A grant written before the field existed does not take an address.
    let old: Grant = serde_json::from_str(
        &serde_json::to_string(&staying)
            .unwrap()
            .replace(",\"moves_address\":false", ""),
    )
    .unwrap();
    assert!(!old.moves_address);
}
