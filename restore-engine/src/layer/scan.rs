//! The sending end: each round walks the layer (without following a symlink: the container
//! runs meanwhile and may swap a directory for a link to the host's `/etc`), compares every
//! path's `lstat` with the last round's, and sends what changed: removals first, then new and
//! changed paths parents first, a changed file as its blocks whose content hash changed.
//!
//! A file changed within the second before a round's walk is read again in the next round even
//! if its `lstat` looks the same (a write in the same timestamp tick would otherwise be missed;
//! git calls these "racy"), so the frozen round catches every last write.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use nix::fcntl::{openat, readlinkat, OFlag};
use nix::sys::stat::{fstat, FileStat, Mode, SFlag};
use serde::Serialize;
use xattr::FileExt as _;
use xxhash_rust::xxh3::{xxh3_128, Xxh3};

use super::beneath::{self, lstat_at};
use super::{is_overlay_xattr, LayerError, LayerSource, BLOCK};
use crate::wire::{LayerBlock, LayerEntry, LayerKind, Xattr};

/// What a round sends, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Entry(LayerEntry),
    /// A block of the file of the last entry.
    Block(LayerBlock),
}

/// What one round of the layer did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LayerRoundStats {
    /// Paths sent (removals included).
    pub entries: u64,
    pub removed: u64,
    /// File data sent (holes not counted).
    pub bytes: u64,
    /// Paths in the layer.
    pub paths: u64,
    pub seconds: f64,
}

/// What a path looked like when last sent.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    mode: u32,
    uid: u32,
    gid: u32,
    size: i64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    ino: u64,
    rdev: u64,
    /// Another name of a file seen earlier in the walk.
    link_to: Option<Vec<u8>>,
}

impl Stamp {
    fn of(st: &FileStat, link_to: Option<Vec<u8>>) -> Stamp {
        Stamp {
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            size: st.st_size,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
            ino: st.st_ino,
            rdev: st.st_rdev,
            link_to,
        }
    }
}

#[derive(Debug, Clone)]
struct Seen {
    stamp: Stamp,
    /// A file's block hashes, as the destination has them.
    blocks: Vec<u128>,
    /// Changed within a second of the walk that recorded it: read again next round.
    racy: bool,
}

/// A path the walk found.
struct Found {
    path: Vec<u8>,
    st: FileStat,
}

fn file_type(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT
}

/// Walks `root` (parents before children, names sorted), staying on its filesystem and never
/// following a symlink; calls `child` with every directory's child names.
fn walk(
    root: BorrowedFd<'_>,
    root_dev: u64,
    skip_whiteouts: bool,
    mut children: impl FnMut(&[u8], Vec<Vec<u8>>),
) -> Result<Vec<Found>, LayerError> {
    let st = fstat(root).map_err(|e| LayerError::nix(b"", "stat", e))?;
    let mut found = vec![Found {
        path: Vec::new(),
        st,
    }];
    let dup = root
        .try_clone_to_owned()
        .map_err(|e| LayerError::io(b"", "opening", e))?;
    let mut stack: Vec<(Vec<u8>, OwnedFd)> = vec![(Vec::new(), dup)];
    // Depth first with an explicit stack, children in name order.
    let mut order: Vec<Found> = Vec::new();
    while let Some((path, dir)) = stack.pop() {
        let mut names = match beneath::list(dir.as_fd()) {
            Ok(names) => names,
            // It went away while the container runs: the next round sees it gone.
            Err(nix::errno::Errno::ENOENT) => continue,
            Err(e) => return Err(LayerError::nix(&path, "listing", e)),
        };
        names.sort();
        let mut kept = Vec::new();
        let mut subdirs = Vec::new();
        for name in names {
            let Some(st) = lstat_at(dir.as_fd(), &name)
                .map_err(|e| LayerError::nix(&join(&path, name.as_bytes()), "lstat", e))?
            else {
                continue;
            };
            if st.st_dev != root_dev {
                continue;
            }
            let child = join(&path, name.as_bytes());
            let whiteout = file_type(&st) == SFlag::S_IFCHR && st.st_rdev == 0;
            if !(skip_whiteouts && whiteout) {
                kept.push(name.as_bytes().to_vec());
            }
            if file_type(&st) == SFlag::S_IFDIR {
                match openat(
                    dir.as_fd(),
                    name.as_c_str(),
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                ) {
                    Ok(fd) => subdirs.push((child.clone(), fd)),
                    Err(nix::errno::Errno::ENOENT) => continue,
                    Err(e) => return Err(LayerError::nix(&child, "opening", e)),
                }
            }
            order.push(Found { path: child, st });
        }
        children(&path, kept);
        // Reversed onto the stack, so the first name is walked first.
        for sub in subdirs.into_iter().rev() {
            stack.push(sub);
        }
    }
    // Parents before children: sorting the paths component-wise gives exactly that.
    order.sort_by(|a, b| {
        a.path
            .split(|&c| c == b'/')
            .cmp(b.path.split(|&c| c == b'/'))
    });
    found.extend(order);
    Ok(found)
}

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent.is_empty() {
        name.to_vec()
    } else {
        [parent, b"/", name].concat()
    }
}

/// The source's view of the layer between rounds.
pub struct Scanner {
    source: LayerSource,
    seen: BTreeMap<Vec<u8>, Seen>,
}

impl Scanner {
    pub fn new(source: LayerSource) -> Scanner {
        Scanner {
            source,
            seen: BTreeMap::new(),
        }
    }

    fn dir(&self) -> &Path {
        match &self.source {
            LayerSource::OverlayUpper(d) | LayerSource::Directory(d) => d,
        }
    }

    fn overlay(&self) -> bool {
        matches!(self.source, LayerSource::OverlayUpper(_))
    }

    /// Sends what changed since the last round to `sink` (which stops the round by returning
    /// `Err`: [`LayerError::Stopped`]).
    pub fn round(
        &mut self,
        sink: &mut dyn FnMut(Item) -> Result<(), ()>,
    ) -> Result<LayerRoundStats, LayerError> {
        let started = Instant::now();
        let walk_start = crate::clock::unix_now();
        let root = beneath::open_root(self.dir(), "opening the container's filesystem")?;
        let root_dev = fstat(root.as_fd())
            .map_err(|e| LayerError::nix(b"", "stat", e))?
            .st_dev;
        let overlay = self.overlay();
        let mut listing: HashMap<Vec<u8>, Vec<Vec<u8>>> = HashMap::new();
        let found = walk(root.as_fd(), root_dev, overlay, |dir, names| {
            listing.insert(dir.to_vec(), names);
        })?;
        let mut stats = LayerRoundStats {
            paths: found.len() as u64,
            ..Default::default()
        };
        let mut send = |item: Item| sink(item).map_err(|()| LayerError::Stopped);

        // Removals first: a path that became a symlink's parent must be cleared before.
        let present: HashSet<&[u8]> = found.iter().map(|f| f.path.as_slice()).collect();
        let mut gone: Option<&[u8]> = None;
        for path in self.seen.keys() {
            if present.contains(path.as_slice()) {
                continue;
            }
            if gone.is_some_and(|g| path.starts_with(g) && path.get(g.len()) == Some(&b'/')) {
                continue;
            }
            gone = Some(path);
            send(Item::Entry(LayerEntry {
                path: path.clone(),
                kind: LayerKind::Remove as i32,
                ..Default::default()
            }))?;
            stats.entries += 1;
            stats.removed += 1;
        }

        let mut next: BTreeMap<Vec<u8>, Seen> = BTreeMap::new();
        let mut inodes: HashMap<u64, Vec<u8>> = HashMap::new();
        for f in &found {
            let kind = file_type(&f.st);
            let link_to = if kind != SFlag::S_IFDIR && f.st.st_nlink > 1 {
                match inodes.get(&f.st.st_ino) {
                    Some(first) => Some(first.clone()),
                    None => {
                        inodes.insert(f.st.st_ino, f.path.clone());
                        None
                    }
                }
            } else {
                None
            };
            let stamp = Stamp::of(&f.st, link_to.clone());
            let racy = f.st.st_ctime as f64 >= walk_start - 1.0;
            let before = self.seen.get(&f.path);
            let unchanged = before.is_some_and(|b| b.stamp == stamp);
            let is_file = kind == SFlag::S_IFREG && link_to.is_none();
            if unchanged && !(is_file && before.is_some_and(|b| b.racy)) {
                next.insert(f.path.clone(), before.expect("unchanged").clone());
                continue;
            }
            let whiteout = overlay && kind == SFlag::S_IFCHR && f.st.st_rdev == 0;
            let mut entry = LayerEntry {
                path: f.path.clone(),
                mode: f.st.st_mode & 0o7777,
                uid: f.st.st_uid,
                gid: f.st.st_gid,
                mtime_sec: f.st.st_mtime,
                mtime_nsec: f.st.st_mtime_nsec as u32,
                ..Default::default()
            };
            let mut blocks = Vec::new();
            if whiteout {
                entry = LayerEntry {
                    path: f.path.clone(),
                    kind: LayerKind::Remove as i32,
                    ..Default::default()
                };
                stats.removed += 1;
            } else if let Some(first) = link_to {
                entry.kind = LayerKind::HardLink as i32;
                entry.target = first;
            } else {
                match kind {
                    SFlag::S_IFDIR => {
                        entry.kind = LayerKind::Dir as i32;
                        entry.xattrs = self.xattrs(root.as_fd(), &f.path, true)?;
                        entry.exact = !overlay || opaque(&entry.xattrs);
                        if entry.exact {
                            entry.children = listing.remove(&f.path).unwrap_or_default();
                        }
                        entry.xattrs.retain(|x| !is_overlay_xattr(&x.name));
                    }
                    SFlag::S_IFREG => {
                        entry.kind = LayerKind::File as i32;
                        entry.size = f.st.st_size as u64;
                        entry.xattrs = self.xattrs(root.as_fd(), &f.path, false)?;
                        entry.xattrs.retain(|x| !is_overlay_xattr(&x.name));
                    }
                    SFlag::S_IFLNK => {
                        entry.kind = LayerKind::Symlink as i32;
                        let parent = beneath::parent(root.as_fd(), &f.path)?
                            .expect("a symlink is not the root");
                        entry.target = readlinkat(parent.dir.as_fd(), parent.name.as_c_str())
                            .map_err(|e| LayerError::nix(&f.path, "readlink", e))?
                            .as_bytes()
                            .to_vec();
                    }
                    SFlag::S_IFIFO => entry.kind = LayerKind::Fifo as i32,
                    SFlag::S_IFSOCK => entry.kind = LayerKind::Socket as i32,
                    SFlag::S_IFCHR | SFlag::S_IFBLK => {
                        entry.kind = if kind == SFlag::S_IFCHR {
                            LayerKind::CharDevice
                        } else {
                            LayerKind::BlockDevice
                        } as i32;
                        entry.rdev = f.st.st_rdev;
                    }
                    _ => {
                        return Err(LayerError::Unsupported {
                            path: super::show(&f.path),
                            problem: format!("is of an unknown file type {:o}", f.st.st_mode),
                        })
                    }
                }
            }
            let mut hashes = Vec::new();
            if entry.kind == LayerKind::File as i32 {
                let old = before
                    .filter(|b| b.stamp.ino == f.st.st_ino)
                    .map(|b| b.blocks.as_slice());
                let (pieces, read) = read_changed(root.as_fd(), &f.path, entry.size, old)?;
                hashes = read;
                blocks = pieces;
            }
            let racy_but_same = unchanged && blocks.is_empty();
            next.insert(
                f.path.clone(),
                Seen {
                    stamp,
                    blocks: hashes,
                    racy,
                },
            );
            if racy_but_same {
                // Read again as racy, but it did not change after all.
                continue;
            }
            send(Item::Entry(entry))?;
            stats.entries += 1;
            for block in blocks {
                stats.bytes += block.data.len() as u64;
                send(Item::Block(block))?;
            }
        }
        self.seen = next;
        stats.seconds = started.elapsed().as_secs_f64();
        Ok(stats)
    }

    /// A file's or directory's extended attributes (read through a descriptor opened beneath
    /// the root). overlayfs's own refuse the migration where they change what the directory
    /// shows (a renamed directory, a metadata-only copy).
    fn xattrs(
        &self,
        root: BorrowedFd<'_>,
        path: &[u8],
        dir: bool,
    ) -> Result<Vec<Xattr>, LayerError> {
        let file = match open_beneath(root, path, dir) {
            Ok(file) => file,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(Vec::new()),
            Err(e) => return Err(LayerError::io(path, "opening", e)),
        };
        let mut out = Vec::new();
        let names = file
            .list_xattr()
            .map_err(|e| LayerError::io(path, "listing extended attributes", e))?;
        for name in names {
            let bytes = name.as_bytes();
            if self.overlay()
                && (bytes.ends_with(b"overlay.redirect") || bytes.ends_with(b"overlay.metacopy"))
            {
                return Err(LayerError::Unsupported {
                    path: super::show(path),
                    problem: format!(
                        "carries overlayfs's {} (a directory renamed or a file copied up by metadata only: overlayfs's redirect_dir or metacopy is on)",
                        String::from_utf8_lossy(bytes)
                    ),
                });
            }
            if let Some(value) = file
                .get_xattr(&name)
                .map_err(|e| LayerError::io(path, "reading an extended attribute", e))?
            {
                out.push(Xattr {
                    name: bytes.to_vec(),
                    value,
                });
            }
        }
        Ok(out)
    }
}

fn opaque(xattrs: &[Xattr]) -> bool {
    xattrs
        .iter()
        .any(|x| x.name.ends_with(b"overlay.opaque") && x.value == b"y")
}

/// Opens a file or directory beneath the root for reading, following nothing.
fn open_beneath(root: BorrowedFd<'_>, path: &[u8], dir: bool) -> std::io::Result<File> {
    let parts = beneath::components(path).map_err(std::io::Error::other)?;
    if dir {
        return beneath::open_dir(root, &parts, OFlag::O_RDONLY)
            .map(File::from)
            .map_err(Into::into);
    }
    let parent = beneath::parent(root, path)
        .map_err(std::io::Error::other)?
        .expect("a file is not the root");
    openat(
        parent.dir.as_fd(),
        parent.name.as_c_str(),
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        Mode::empty(),
    )
    .map(File::from)
    .map_err(Into::into)
}

/// Reads a file's first `size` bytes in blocks; returns the blocks whose hash differs from
/// `old` (all of them, holes as zero runs, without `old`) and every block's hash.
fn read_changed(
    root: BorrowedFd<'_>,
    path: &[u8],
    size: u64,
    old: Option<&[u128]>,
) -> Result<(Vec<LayerBlock>, Vec<u128>), LayerError> {
    let file = match open_beneath(root, path, false) {
        Ok(file) => file,
        // Gone since the walk: the next round sends its removal.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok((Vec::new(), Vec::new())),
        Err(e) => return Err(LayerError::io(path, "opening", e)),
    };
    let st = fstat(file.as_fd()).map_err(|e| LayerError::nix(path, "stat", e))?;
    if file_type(&st) != SFlag::S_IFREG {
        // Swapped for something else since the walk: the next round sees what it is now.
        return Ok((Vec::new(), Vec::new()));
    }
    let mut pieces: Vec<LayerBlock> = Vec::new();
    let mut hashes = Vec::new();
    let mut buf = vec![0u8; BLOCK];
    let mut offset = 0u64;
    while offset < size {
        let want = (size - offset).min(BLOCK as u64) as usize;
        let mut got = 0;
        while got < want {
            match file.read_at(&mut buf[got..want], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(LayerError::io(path, "reading", e)),
            }
        }
        // Shrunk while read: what is missing reads as zeros (the next round sends the size).
        buf[got..want].fill(0);
        let block = &buf[..want];
        let hash = xxh3_128(block);
        let index = hashes.len();
        hashes.push(hash);
        let same = old.is_some_and(|o| o.get(index) == Some(&hash));
        if !same {
            if block.iter().all(|&b| b == 0) {
                match pieces.last_mut() {
                    Some(last) if last.data.is_empty() && last.offset + last.zero_len == offset => {
                        last.zero_len += want as u64
                    }
                    _ => pieces.push(LayerBlock {
                        offset,
                        data: Vec::new(),
                        zero_len: want as u64,
                    }),
                }
            } else {
                pieces.push(LayerBlock {
                    offset,
                    data: block.to_vec(),
                    zero_len: 0,
                });
            }
        }
        offset += want as u64;
    }
    Ok((pieces, hashes))
}

/// A digest of a root filesystem's tree: every path with its type, owner, mode, size, times
/// and symlink target. Two hosts that really share the storage compute the same.
pub fn tree_digest(dir: &Path) -> Result<Vec<u8>, LayerError> {
    let root = beneath::open_root(dir, "opening the root filesystem")?;
    let root_dev = fstat(root.as_fd())
        .map_err(|e| LayerError::nix(b"", "stat", e))?
        .st_dev;
    let found = walk(root.as_fd(), root_dev, false, |_, _| {})?;
    let mut hasher = Xxh3::new();
    for f in &found {
        hasher.update(&(f.path.len() as u64).to_le_bytes());
        hasher.update(&f.path);
        for v in [
            f.st.st_mode as i64,
            f.st.st_uid as i64,
            f.st.st_gid as i64,
            f.st.st_size,
            f.st.st_mtime,
            f.st.st_mtime_nsec,
            f.st.st_rdev as i64,
        ] {
            hasher.update(&v.to_le_bytes());
        }
        if file_type(&f.st) == SFlag::S_IFLNK {
            if let Some(parent) = beneath::parent(root.as_fd(), &f.path)? {
                if let Ok(target) = readlinkat(parent.dir.as_fd(), parent.name.as_c_str()) {
                    hasher.update(target.as_bytes());
                }
            }
        }
    }
    Ok(hasher.digest128().to_le_bytes().to_vec())
}
