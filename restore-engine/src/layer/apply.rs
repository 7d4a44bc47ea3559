//! The receiving end: applies the source's layer entries to the receiving container's root
//! filesystem as they arrive. Every path is checked and resolved beneath the root
//! ([`super::beneath`]); what is in the way (a file where a directory must be) is removed
//! first. Owners, modes, extended attributes and times are set at the round's end, children
//! before their parents (creating a child changes its directory's times).

use std::collections::HashSet;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{fallocate, openat, AtFlags, FallocateFlags, OFlag};
use nix::sys::stat::{
    fchmod, fchmodat, futimens, mkdirat, mknodat, utimensat, FchmodatFlags, Mode, SFlag,
    UtimensatFlags,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchown, fchownat, linkat, symlinkat, Gid, Uid};
use serde::Serialize;
use xattr::FileExt as _;

use super::beneath::{self, is_dir, lstat_at, Parent};
use super::{is_overlay_xattr, show, LayerError, BLOCK};
use crate::wire::{LayerBlock, LayerEntry, LayerKind, Xattr};

/// Largest extended attribute value accepted (the kernel's own limit).
const MAX_XATTR_VALUE: usize = 64 << 10;
/// Most extended attributes one path may carry.
const MAX_XATTRS: usize = 128;

/// What the receiving end applied.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ApplyStats {
    pub entries: u64,
    pub bytes: u64,
}

struct Current {
    path: Vec<u8>,
    file: File,
    size: u64,
}

/// Applies layer entries beneath a root directory.
pub struct Applier {
    dir: PathBuf,
    root: OwnedFd,
    current: Option<Current>,
    /// Entries whose metadata is set at the round's end.
    pending: Vec<LayerEntry>,
    pub stats: ApplyStats,
}

fn protocol(path: &[u8], problem: impl Into<String>) -> LayerError {
    LayerError::Protocol {
        path: show(path),
        problem: problem.into(),
    }
}

impl Applier {
    /// Applies into `dir` (the receiving container's root filesystem, mounted).
    pub fn open(dir: &Path) -> Result<Applier, LayerError> {
        let root = beneath::open_root(dir, "opening the receiving container's root filesystem")?;
        Ok(Applier {
            dir: dir.to_owned(),
            root,
            current: None,
            pending: Vec::new(),
            stats: ApplyStats::default(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn parent(&self, path: &[u8]) -> Result<Parent, LayerError> {
        beneath::parent(self.root.as_fd(), path)?
            .ok_or_else(|| protocol(path, "the root can only be a directory"))
    }

    /// Applies one entry (its blocks follow, for a file).
    pub fn entry(&mut self, entry: LayerEntry) -> Result<(), LayerError> {
        self.current = None;
        let path = entry.path.clone();
        beneath::components(&path)?;
        let kind = LayerKind::try_from(entry.kind)
            .ok()
            .filter(|k| *k != LayerKind::Unspecified)
            .ok_or_else(|| protocol(&path, format!("unknown entry kind {}", entry.kind)))?;
        check_xattrs(&path, &entry.xattrs)?;
        for child in &entry.children {
            beneath::check_name(child)?;
        }
        self.stats.entries += 1;
        if path.is_empty() {
            if kind != LayerKind::Dir {
                return Err(protocol(&path, "the root can only be a directory"));
            }
            if entry.exact {
                let root = self
                    .root
                    .try_clone()
                    .map_err(|e| LayerError::io(&path, "opening", e))?;
                prune(&path, root, &entry.children)?;
            }
            self.pending.push(entry);
            return Ok(());
        }
        if kind == LayerKind::Remove {
            let parent = match beneath::parent(self.root.as_fd(), &path) {
                Ok(parent) => parent.expect("not the root"),
                // A parent is gone already, or is no directory: so is the path.
                Err(LayerError::Io { source, .. })
                    if matches!(
                        source.raw_os_error(),
                        Some(libc::ENOENT) | Some(libc::ENOTDIR)
                    ) =>
                {
                    return Ok(())
                }
                Err(e) => return Err(e),
            };
            return beneath::remove_tree(parent.dir.as_fd(), &parent.name, 0)
                .map_err(|e| LayerError::nix(&path, "removing", e));
        }
        let p = self.parent(&path)?;
        let existing =
            lstat_at(p.dir.as_fd(), &p.name).map_err(|e| LayerError::nix(&path, "lstat", e))?;
        let clear = |p: &Parent| {
            beneath::remove_tree(p.dir.as_fd(), &p.name, 0)
                .map_err(|e| LayerError::nix(&path, "removing what is in the way", e))
        };
        let type_of =
            |st: &nix::sys::stat::FileStat| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        match kind {
            LayerKind::Remove | LayerKind::Unspecified => unreachable!(),
            LayerKind::Dir => {
                match &existing {
                    Some(st) if is_dir(st) => {}
                    Some(_) => {
                        clear(&p)?;
                        mkdir(&p, &path)?;
                    }
                    None => mkdir(&p, &path)?,
                }
                if entry.exact {
                    let dir = openat(
                        p.dir.as_fd(),
                        p.name.as_c_str(),
                        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(|e| LayerError::nix(&path, "opening", e))?;
                    prune(&path, dir, &entry.children)?;
                }
            }
            LayerKind::File => {
                if existing
                    .as_ref()
                    .is_some_and(|st| type_of(st) != SFlag::S_IFREG)
                {
                    clear(&p)?;
                }
                let fd = openat(
                    p.dir.as_fd(),
                    p.name.as_c_str(),
                    OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )
                .map_err(|e| LayerError::nix(&path, "opening for writing", e))?;
                let file = File::from(fd);
                file.set_len(entry.size)
                    .map_err(|e| LayerError::io(&path, "setting its size", e))?;
                self.current = Some(Current {
                    path: path.clone(),
                    file,
                    size: entry.size,
                });
            }
            LayerKind::Symlink => {
                if entry.target.is_empty()
                    || entry.target.contains(&0)
                    || entry.target.len() > beneath::MAX_PATH
                {
                    return Err(protocol(
                        &path,
                        "a symlink's target must be 1 to 4096 bytes without NUL",
                    ));
                }
                if existing.is_some() {
                    clear(&p)?;
                }
                symlinkat(
                    std::ffi::OsStr::from_bytes(&entry.target),
                    p.dir.as_fd(),
                    p.name.as_c_str(),
                )
                .map_err(|e| LayerError::nix(&path, "creating the symlink", e))?;
            }
            LayerKind::Fifo
            | LayerKind::Socket
            | LayerKind::CharDevice
            | LayerKind::BlockDevice => {
                if existing.is_some() {
                    clear(&p)?;
                }
                let (flag, rdev) = match kind {
                    LayerKind::Fifo => (SFlag::S_IFIFO, 0),
                    LayerKind::Socket => (SFlag::S_IFSOCK, 0),
                    LayerKind::CharDevice => (SFlag::S_IFCHR, entry.rdev),
                    _ => (SFlag::S_IFBLK, entry.rdev),
                };
                mknodat(
                    p.dir.as_fd(),
                    p.name.as_c_str(),
                    flag,
                    Mode::from_bits_truncate(0o600),
                    rdev,
                )
                .map_err(|e| LayerError::nix(&path, "creating it", e))?;
            }
            LayerKind::HardLink => {
                let target = &entry.target;
                beneath::components(target)?;
                let t = self.parent(target)?;
                let target_st = lstat_at(t.dir.as_fd(), &t.name)
                    .map_err(|e| LayerError::nix(target, "lstat", e))?
                    .ok_or_else(|| {
                        protocol(
                            &path,
                            format!("a hard link to {}, which does not exist", show(target)),
                        )
                    })?;
                if is_dir(&target_st) {
                    return Err(protocol(&path, "a hard link to a directory"));
                }
                if existing.as_ref().is_some_and(|st| {
                    st.st_ino == target_st.st_ino && st.st_dev == target_st.st_dev
                }) {
                    return Ok(());
                }
                if existing.is_some() {
                    clear(&p)?;
                }
                linkat(
                    t.dir.as_fd(),
                    t.name.as_c_str(),
                    p.dir.as_fd(),
                    p.name.as_c_str(),
                    AtFlags::empty(),
                )
                .map_err(|e| LayerError::nix(&path, "linking", e))?;
                // Its owner, mode and times are its target's.
                return Ok(());
            }
        }
        self.pending.push(entry);
        Ok(())
    }

    /// Writes a block of the file of the last entry. Returns the bytes written.
    pub fn block(&mut self, block: &LayerBlock) -> Result<u64, LayerError> {
        let Some(current) = &self.current else {
            return Err(protocol(b"", "a file block arrived without its file"));
        };
        let path = &current.path;
        let len = if block.data.is_empty() {
            block.zero_len
        } else if block.zero_len != 0 {
            return Err(protocol(path, "a block with both data and a hole"));
        } else {
            block.data.len() as u64
        };
        if block.data.len() > BLOCK
            || block
                .offset
                .checked_add(len)
                .is_none_or(|end| end > current.size)
        {
            return Err(protocol(
                path,
                format!(
                    "a block of {len} bytes at {} does not fit its {}-byte file",
                    block.offset, current.size
                ),
            ));
        }
        if block.data.is_empty() {
            punch(&current.file, block.offset, len)
                .map_err(|e| LayerError::io(path, "writing zeros", e))?;
            return Ok(0);
        }
        current
            .file
            .write_all_at(&block.data, block.offset)
            .map_err(|e| LayerError::io(path, "writing", e))?;
        self.stats.bytes += len;
        Ok(len)
    }

    /// The round's entries arrived: sets their owners, modes, extended attributes and times.
    pub fn end_round(&mut self) -> Result<(), LayerError> {
        self.current = None;
        let pending = std::mem::take(&mut self.pending);
        for entry in pending.iter().rev() {
            self.set_metadata(entry)?;
        }
        Ok(())
    }

    fn set_metadata(&self, entry: &LayerEntry) -> Result<(), LayerError> {
        let path = &entry.path;
        let mtime = TimeSpec::new(entry.mtime_sec, entry.mtime_nsec.min(999_999_999) as i64);
        let (uid, gid) = (
            Some(Uid::from_raw(entry.uid)),
            Some(Gid::from_raw(entry.gid)),
        );
        let mode = Mode::from_bits_truncate(entry.mode & 0o7777);
        let err = |what| move |e| LayerError::nix(path, what, e);
        if path.is_empty() {
            fchown(self.root.as_fd(), uid, gid).map_err(err("chown"))?;
            fchmod(self.root.as_fd(), mode).map_err(err("chmod"))?;
            let file = File::from(
                self.root
                    .try_clone()
                    .map_err(|e| LayerError::io(path, "opening", e))?,
            );
            set_xattrs(path, &file, &entry.xattrs)?;
            return futimens(self.root.as_fd(), &TimeSpec::UTIME_OMIT, &mtime)
                .map_err(err("setting its times"));
        }
        let p = self.parent(path)?;
        let st = lstat_at(p.dir.as_fd(), &p.name)
            .map_err(err("lstat"))?
            .ok_or_else(|| protocol(path, "vanished while it was applied"))?;
        let kind = LayerKind::try_from(entry.kind).unwrap_or(LayerKind::Unspecified);
        let symlink = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK;
        // Owner first: chown clears setuid bits and file capabilities.
        fchownat(
            p.dir.as_fd(),
            p.name.as_c_str(),
            uid,
            gid,
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(err("chown"))?;
        if !symlink {
            // Not a symlink (just checked, and nothing else writes here): the mode is its own.
            fchmodat(
                p.dir.as_fd(),
                p.name.as_c_str(),
                mode,
                FchmodatFlags::FollowSymlink,
            )
            .map_err(err("chmod"))?;
        }
        if matches!(kind, LayerKind::Dir | LayerKind::File) && !symlink {
            let flags = if kind == LayerKind::Dir {
                OFlag::O_RDONLY | OFlag::O_DIRECTORY
            } else {
                OFlag::O_RDONLY | OFlag::O_NONBLOCK
            };
            let fd = openat(
                p.dir.as_fd(),
                p.name.as_c_str(),
                flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(err("opening"))?;
            set_xattrs(path, &File::from(fd), &entry.xattrs)?;
        }
        utimensat(
            p.dir.as_fd(),
            p.name.as_c_str(),
            &TimeSpec::UTIME_OMIT,
            &mtime,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(err("setting its times"))
    }

    /// The receiving root filesystem's digest ([`super::tree_digest`]).
    pub fn digest(&self) -> Result<Vec<u8>, LayerError> {
        super::tree_digest(&self.dir)
    }
}

fn mkdir(p: &Parent, path: &[u8]) -> Result<(), LayerError> {
    mkdirat(
        p.dir.as_fd(),
        p.name.as_c_str(),
        Mode::from_bits_truncate(0o700),
    )
    .map_err(|e| LayerError::nix(path, "creating the directory", e))
}

/// Removes the children of `dir` that `keep` does not name.
fn prune(path: &[u8], dir: OwnedFd, keep: &[Vec<u8>]) -> Result<(), LayerError> {
    let keep: HashSet<&[u8]> = keep.iter().map(|k| k.as_slice()).collect();
    let names = beneath::list(dir.as_fd()).map_err(|e| LayerError::nix(path, "listing", e))?;
    for name in names {
        if !keep.contains(name.as_bytes()) {
            beneath::remove_tree(dir.as_fd(), &name, 0)
                .map_err(|e| LayerError::nix(path, "removing what the source does not have", e))?;
        }
    }
    Ok(())
}

fn check_xattrs(path: &[u8], xattrs: &[Xattr]) -> Result<(), LayerError> {
    if xattrs.len() > MAX_XATTRS {
        return Err(protocol(
            path,
            format!("more than {MAX_XATTRS} extended attributes"),
        ));
    }
    for x in xattrs {
        let plain = !x.name.is_empty() && !x.name.contains(&0) && x.name.len() <= 255;
        if !plain || is_overlay_xattr(&x.name) || x.value.len() > MAX_XATTR_VALUE {
            return Err(protocol(
                path,
                format!(
                    "extended attribute {:?} is refused (overlayfs's own, or not a plain name, or over 64 KiB)",
                    String::from_utf8_lossy(&x.name)
                ),
            ));
        }
    }
    Ok(())
}

/// Makes a file's extended attributes the source's (overlayfs's own are left alone).
fn set_xattrs(path: &[u8], file: &File, xattrs: &[Xattr]) -> Result<(), LayerError> {
    let wanted: HashSet<&[u8]> = xattrs.iter().map(|x| x.name.as_slice()).collect();
    let existing = file
        .list_xattr()
        .map_err(|e| LayerError::io(path, "listing extended attributes", e))?;
    for name in existing {
        let bytes = name.as_bytes();
        if !wanted.contains(bytes)
            && !is_overlay_xattr(bytes)
            && !bytes.starts_with(b"security.selinux")
        {
            file.remove_xattr(&name)
                .map_err(|e| LayerError::io(path, "removing an extended attribute", e))?;
        }
    }
    for x in xattrs {
        file.set_xattr(std::ffi::OsStr::from_bytes(&x.name), &x.value)
            .map_err(|e| LayerError::io(path, "setting an extended attribute", e))?;
    }
    Ok(())
}

/// Makes `len` bytes at `offset` zeros, as a hole where the filesystem can.
fn punch(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    match fallocate(file.as_fd(), flags, offset as i64, len as i64) {
        Ok(()) => Ok(()),
        Err(Errno::EOPNOTSUPP) => {
            let zeros = vec![0u8; BLOCK];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(BLOCK as u64) as usize;
                file.write_all_at(&zeros[..n], offset + done)?;
                done += n as u64;
            }
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}
