//! The layer's two ends against each other on real directories: a tree with every kind of file
//! goes over, changes go over as deltas, overlay whiteouts and opaque directories are honoured,
//! and hostile entries are refused without a byte written outside the root.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;

use proptest::prelude::*;

use super::*;
use crate::wire::{LayerBlock, LayerEntry, LayerKind};

/// A tree's content as comparable text: type, mode, owner, size, mtime, content hash, symlink
/// target, user xattrs, and which paths share an inode.
fn manifest(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, String> = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = fs::read_dir(&dir).unwrap().flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let md = fs::symlink_metadata(&path).unwrap();
            let ft = md.file_type();
            let mut line = format!(
                "mode={:o} uid={} gid={} mtime={}.{}",
                md.mode(),
                md.uid(),
                md.gid(),
                md.mtime(),
                md.mtime_nsec()
            );
            if ft.is_file() {
                let data = fs::read(&path).unwrap();
                line += &format!(
                    " size={} hash={:x}",
                    data.len(),
                    xxhash_rust::xxh3::xxh3_64(&data)
                );
                if md.nlink() > 1 {
                    let first = inodes.entry(md.ino()).or_insert_with(|| rel.clone());
                    line += &format!(" link={first}");
                }
            } else if ft.is_symlink() {
                line += &format!(" target={}", fs::read_link(&path).unwrap().display());
            } else if ft.is_dir() {
                stack.push(path.clone());
                line = line.split(" mtime").next().unwrap().to_string();
            } else {
                line += &format!(" rdev={}", md.rdev());
            }
            if !ft.is_symlink() {
                if let Ok(names) = xattr::list(&path) {
                    for n in names {
                        if n.to_string_lossy().starts_with("user.") {
                            let v = xattr::get(&path, &n).unwrap().unwrap();
                            line += &format!(
                                " {}={}",
                                n.to_string_lossy(),
                                String::from_utf8_lossy(&v)
                            );
                        }
                    }
                }
            }
            out.insert(rel, line);
        }
    }
    out
}

/// Runs one scanner round straight into an applier.
fn sync(scanner: &mut Scanner, applier: &mut Applier) -> LayerRoundStats {
    let mut failed = None;
    let stats = scanner
        .round(&mut |item| {
            let r = match item {
                Item::Entry(e) => applier.entry(e),
                Item::Block(b) => applier.block(&b).map(drop),
            };
            r.map_err(|e| failed = Some(e))
        })
        .unwrap_or_else(|e| panic!("{e}: {failed:?}"));
    applier.end_round().unwrap();
    stats
}

fn mknod(path: &Path, kind: nix::sys::stat::SFlag, dev: u64) {
    nix::sys::stat::mknod(
        path,
        kind,
        nix::sys::stat::Mode::from_bits_truncate(0o644),
        dev,
    )
    .unwrap();
}

#[test]
fn a_whole_tree_goes_over_then_only_its_changes() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let s = src.path();
    fs::create_dir_all(s.join("etc/app")).unwrap();
    fs::write(s.join("etc/app/conf"), b"a=1\n").unwrap();
    fs::set_permissions(s.join("etc/app/conf"), fs::Permissions::from_mode(0o640)).unwrap();
    let big: Vec<u8> = (0..(3 << 20) + 123).map(|i| (i % 251) as u8).collect();
    fs::write(s.join("big"), &big).unwrap();
    let sparse = fs::File::create(s.join("sparse")).unwrap();
    sparse.set_len(8 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"end", (8 << 20) - 3).unwrap();
    symlink("etc/app/conf", s.join("conf-link")).unwrap();
    fs::hard_link(s.join("etc/app/conf"), s.join("conf-hard")).unwrap();
    mknod(&s.join("fifo"), nix::sys::stat::SFlag::S_IFIFO, 0);
    mknod(&s.join("sock"), nix::sys::stat::SFlag::S_IFSOCK, 0);
    mknod(
        &s.join("null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::makedev(1, 3),
    );
    xattr::set(s.join("big"), "user.pclive", b"yes").unwrap();
    nix::unistd::chown(
        &s.join("etc/app/conf"),
        Some(1000.into()),
        Some(1001.into()),
    )
    .unwrap();
    // The destination has things of its own: stale, in the way, or extra.
    fs::create_dir_all(dst.path().join("big")).unwrap();
    fs::write(dst.path().join("extra"), b"not on the source").unwrap();
    fs::write(dst.path().join("sparse"), vec![7u8; 9 << 20]).unwrap();

    let mut scanner = Scanner::new(LayerSource::Directory(s.to_owned()));
    let mut applier = Applier::open(dst.path()).unwrap();
    let first = sync(&mut scanner, &mut applier);
    assert_eq!(manifest(s), manifest(dst.path()));
    assert!(first.bytes >= big.len() as u64, "{first:?}");
    assert!(
        first.bytes < big.len() as u64 + (2 << 20),
        "the sparse file's hole is not sent: {first:?}"
    );

    // Nothing changed: nothing goes.
    let idle = sync(&mut scanner, &mut applier);
    assert_eq!(idle.bytes, 0, "{idle:?}");

    // Append, rename, delete, chmod, a directory replaced by a file.
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(s.join("big"))
        .unwrap();
    std::io::Write::write_all(&mut f, b"appended").unwrap();
    fs::rename(s.join("etc/app/conf"), s.join("etc/app/conf.old")).unwrap();
    fs::remove_file(s.join("fifo")).unwrap();
    fs::set_permissions(s.join("sparse"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::remove_dir_all(s.join("etc/app")).unwrap();
    fs::write(s.join("etc/app"), b"now a file").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(10));
    let delta = sync(&mut scanner, &mut applier);
    assert_eq!(manifest(s), manifest(dst.path()));
    assert!(
        delta.bytes <= (1 << 20) + 64,
        "an append sends its last block only: {delta:?}"
    );
    assert!(!dst.path().join("fifo").exists());
}

#[test]
fn overlay_whiteouts_remove_and_opaque_directories_replace() {
    let upper = tempfile::tempdir().unwrap();
    let merged = tempfile::tempdir().unwrap();
    let (u, m) = (upper.path(), merged.path());
    // The destination's merged view has the image's files.
    fs::create_dir_all(m.join("var/cache")).unwrap();
    fs::write(m.join("var/cache/old"), b"image").unwrap();
    fs::write(m.join("etc-passwd"), b"image").unwrap();
    fs::write(m.join("kept"), b"image").unwrap();
    // The source's upper directory: a deletion, an opaque directory, a new file.
    mknod(&u.join("etc-passwd"), nix::sys::stat::SFlag::S_IFCHR, 0);
    fs::create_dir_all(u.join("var/cache")).unwrap();
    xattr::set(u.join("var/cache"), "trusted.overlay.opaque", b"y").unwrap();
    fs::write(u.join("var/cache/new"), b"written").unwrap();
    fs::write(u.join("log"), b"line\n").unwrap();

    let mut scanner = Scanner::new(LayerSource::OverlayUpper(u.to_owned()));
    let mut applier = Applier::open(m).unwrap();
    sync(&mut scanner, &mut applier);
    assert!(!m.join("etc-passwd").exists(), "a whiteout removes");
    assert!(
        !m.join("var/cache/old").exists(),
        "an opaque directory hides what was there"
    );
    assert_eq!(fs::read(m.join("var/cache/new")).unwrap(), b"written");
    assert_eq!(
        fs::read(m.join("kept")).unwrap(),
        b"image",
        "the rest stays"
    );
    assert!(xattr::get(m.join("var/cache"), "trusted.overlay.opaque")
        .unwrap()
        .is_none());

    // A new file deleted again vanishes from the upper directory without a whiteout.
    fs::remove_file(u.join("log")).unwrap();
    sync(&mut scanner, &mut applier);
    assert!(!m.join("log").exists());
}

fn entry(path: &str, kind: LayerKind) -> LayerEntry {
    LayerEntry {
        path: path.as_bytes().to_vec(),
        kind: kind as i32,
        mode: 0o644,
        ..Default::default()
    }
}

#[test]
fn hostile_entries_are_refused_and_nothing_leaves_the_root() {
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("root");
    fs::create_dir(&root).unwrap();
    let outside = base.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("secret"), b"host").unwrap();
    let mut a = Applier::open(&root).unwrap();

    for bad in [
        "../outside/secret",
        "/etc/passwd",
        "a/../../x",
        "a//b",
        "./a",
        "a/.",
    ] {
        let err = a.entry(entry(bad, LayerKind::File)).unwrap_err();
        assert!(matches!(err, LayerError::BadPath { .. }), "{bad}: {err}");
    }
    // A symlink to the outside, then a write through it.
    let mut link = entry("evil", LayerKind::Symlink);
    link.target = outside.display().to_string().into_bytes();
    a.entry(link).unwrap();
    let err = a.entry(entry("evil/secret", LayerKind::File)).unwrap_err();
    assert!(err.to_string().contains("evil/secret"), "{err}");
    // Removing beneath a symlink removes nothing (there is no such path in the root).
    a.entry(entry("evil/secret", LayerKind::Remove)).unwrap();
    let mut hard = entry("h", LayerKind::HardLink);
    hard.target = b"evil/secret".to_vec();
    assert!(a.entry(hard).is_err());
    // Blocks that do not fit their file, or have none.
    let mut b = Applier::open(&root).unwrap();
    assert!(b
        .block(&LayerBlock {
            offset: 0,
            data: vec![1],
            zero_len: 0
        })
        .is_err());
    let mut f = entry("f", LayerKind::File);
    f.size = 10;
    b.entry(f).unwrap();
    assert!(b
        .block(&LayerBlock {
            offset: 8,
            data: vec![1; 4],
            zero_len: 0
        })
        .is_err());
    assert!(b
        .block(&LayerBlock {
            offset: u64::MAX,
            data: vec![],
            zero_len: 2
        })
        .is_err());
    let mut dir = entry("d", LayerKind::Dir);
    dir.exact = true;
    dir.children = vec![b"../x".to_vec()];
    assert!(b.entry(dir).is_err());
    let mut x = entry("f", LayerKind::File);
    x.xattrs = vec![crate::wire::Xattr {
        name: b"trusted.overlay.redirect".to_vec(),
        value: b"/".to_vec(),
    }];
    assert!(b.entry(x).is_err());
    assert_eq!(fs::read(outside.join("secret")).unwrap(), b"host");
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 1);
}

fn arb_path() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop::sample::select(vec!["a", "b", "..", ".", "", "evil", "/"]),
        1..4,
    )
    .prop_map(|parts| parts.join("/"))
}

fn arb_entry() -> impl Strategy<Value = LayerEntry> {
    (arb_path(), 0i32..11, arb_path(), any::<bool>(), 0u64..4096).prop_map(
        |(path, kind, target, exact, size)| LayerEntry {
            path: path.into_bytes(),
            kind,
            mode: 0o755,
            size,
            target: if target.starts_with("evil") {
                b"/tmp".to_vec()
            } else {
                target.into_bytes()
            },
            exact,
            children: vec![b"a".to_vec()],
            ..Default::default()
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    /// Any sequence of entries and blocks: errors at worst, and nothing outside the root.
    #[test]
    fn no_sequence_of_entries_writes_outside_the_root(
        entries in prop::collection::vec((arb_entry(), any::<bool>(), 0u64..5000), 1..12)
    ) {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("root");
        fs::create_dir(&root).unwrap();
        fs::write(base.path().join("sentinel"), b"x").unwrap();
        let mut a = Applier::open(&root).unwrap();
        for (e, with_block, offset) in entries {
            let _ = a.entry(e);
            if with_block {
                let _ = a.block(&LayerBlock { offset, data: vec![9; 64], zero_len: 0 });
            }
        }
        let _ = a.end_round();
        let names: Vec<_> = fs::read_dir(base.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        prop_assert_eq!(names.len(), 2, "{:?}", names);
        prop_assert_eq!(fs::read(base.path().join("sentinel")).unwrap(), b"x".to_vec());
    }
}
