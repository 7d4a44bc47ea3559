//! The receiving end's path discipline: a path from the wire is checked before use (relative,
//! no empty, `.` or `..` component, no NUL), and resolved beneath the root without following
//! any symlink or crossing a mount (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_XDEV`). The last component is then only ever used with `*at` calls that do not
//! follow it either, so a source that plants `etc -> /etc` and then writes `etc/passwd` gets an
//! error, not the host's file.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use nix::errno::Errno;
use nix::fcntl::{openat, openat2, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstatat, FileStat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};

use super::LayerError;

/// The most components a path may have (a hostile depth must not exhaust the stack of
/// [`remove_tree`]'s recursion either).
pub const MAX_DEPTH: usize = 256;
/// The longest path accepted (Linux's PATH_MAX).
pub const MAX_PATH: usize = 4096;

/// The components of a path from the wire; `""` is the root (no components).
pub fn components(path: &[u8]) -> Result<Vec<&[u8]>, LayerError> {
    let bad = |why| LayerError::BadPath {
        path: String::from_utf8_lossy(path).into_owned(),
        why,
    };
    if path.is_empty() {
        return Ok(Vec::new());
    }
    if path.len() > MAX_PATH {
        return Err(bad("longer than PATH_MAX"));
    }
    if path.contains(&0) {
        return Err(bad("it contains a NUL byte"));
    }
    if path.starts_with(b"/") {
        return Err(bad("it is absolute"));
    }
    let parts: Vec<&[u8]> = path.split(|&b| b == b'/').collect();
    if parts.len() > MAX_DEPTH {
        return Err(bad("deeper than 256 directories"));
    }
    for part in &parts {
        match *part {
            b"" => return Err(bad("it has an empty component")),
            b"." | b".." => return Err(bad("it has a . or .. component")),
            _ => {}
        }
    }
    Ok(parts)
}

/// A plain name (one component), as a directory's child list carries.
pub fn check_name(name: &[u8]) -> Result<(), LayerError> {
    match components(name)?.len() {
        1 => Ok(()),
        _ => Err(LayerError::BadPath {
            path: String::from_utf8_lossy(name).into_owned(),
            why: "a child's name must be one component",
        }),
    }
}

/// Opens a root directory (the host's path, trusted) for what follows beneath it.
pub fn open_root(dir: &std::path::Path, what: &'static str) -> Result<OwnedFd, LayerError> {
    nix::fcntl::open(
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| LayerError::Io {
        path: dir.display().to_string(),
        what,
        source: e.into(),
    })
}

fn resolve() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_XDEV
}

/// Opens the directory `rel` (components) beneath `root`, following nothing.
pub fn open_dir(root: BorrowedFd<'_>, rel: &[&[u8]], flags: OFlag) -> Result<OwnedFd, Errno> {
    let joined = if rel.is_empty() {
        b".".to_vec()
    } else {
        rel.join(&b'/')
    };
    openat2(
        root,
        OsStr::from_bytes(&joined),
        OpenHow::new()
            .flags(flags | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
            .resolve(resolve()),
    )
}

/// A path's parent directory (opened beneath `root`, `O_PATH`) and its last component. `None`
/// for the root itself.
pub struct Parent {
    pub dir: OwnedFd,
    pub name: CString,
}

/// Opens the parent of `path` beneath `root`. Errors are the kernel's (ENOENT: a parent is
/// missing; ELOOP: a parent is a symlink; EXDEV: it would leave the root's mount).
pub fn parent(root: BorrowedFd<'_>, path: &[u8]) -> Result<Option<Parent>, LayerError> {
    let parts = components(path)?;
    let Some((last, dirs)) = parts.split_last() else {
        return Ok(None);
    };
    let dir = open_dir(root, dirs, OFlag::O_PATH)
        .map_err(|e| LayerError::nix(path, "opening its directory", e))?;
    let name = CString::new(*last).expect("components have no NUL");
    Ok(Some(Parent { dir, name }))
}

/// `lstat` of a name in a directory; `None` if it does not exist.
pub fn lstat_at(dir: BorrowedFd<'_>, name: &CString) -> Result<Option<FileStat>, Errno> {
    match fstatat(dir, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn is_dir(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
}

/// Removes `name` in `dir`, whatever it is (a directory with everything in it), without
/// following symlinks. A name that does not exist is not an error.
pub fn remove_tree(dir: BorrowedFd<'_>, name: &CString, depth: usize) -> Result<(), Errno> {
    let Some(st) = lstat_at(dir, name)? else {
        return Ok(());
    };
    if !is_dir(&st) {
        return match unlinkat(dir, name.as_c_str(), UnlinkatFlags::NoRemoveDir) {
            Err(Errno::ENOENT) => Ok(()),
            other => other,
        };
    }
    if depth > MAX_DEPTH {
        return Err(Errno::ELOOP);
    }
    let sub = openat(
        dir,
        name.as_c_str(),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    for child in list(sub.as_fd())? {
        remove_tree(sub.as_fd(), &child, depth + 1)?;
    }
    match unlinkat(dir, name.as_c_str(), UnlinkatFlags::RemoveDir) {
        Err(Errno::ENOENT) => Ok(()),
        other => other,
    }
}

/// The names in an open directory (without `.` and `..`).
pub fn list(dir: BorrowedFd<'_>) -> Result<Vec<CString>, Errno> {
    let fd = openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut listing = nix::dir::Dir::from_fd(fd)?;
    let mut names = Vec::new();
    for entry in listing.iter() {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}
