//! Opening files without following symbolic links (openat2 `RESOLVE_NO_SYMLINKS`): for paths
//! that annotations name ([`crate::confine`]), which someone other than the host's
//! administrator chose.

use std::os::fd::OwnedFd;
use std::path::Path;

use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag, AT_FDCWD};
use nix::sys::stat::Mode;

/// Opens `path` (absolute) without following any symbolic link on the way (openat2 with
/// RESOLVE_NO_SYMLINKS; the kernel refuses with ELOOP).
pub fn open_no_symlinks(path: &Path, flags: OFlag, mode: Mode) -> nix::Result<OwnedFd> {
    openat2(
        AT_FDCWD,
        path,
        OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .mode(mode)
            .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS),
    )
}

/// Opens (creates, 0600) a file to append to, without following symbolic links.
pub fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    open_no_symlinks(
        path,
        OFlag::O_WRONLY | OFlag::O_APPEND | OFlag::O_CREAT,
        Mode::from_bits_truncate(0o600),
    )
    .map(std::fs::File::from)
    .map_err(std::io::Error::from)
}
