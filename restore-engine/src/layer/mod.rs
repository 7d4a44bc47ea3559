//! The container's writable filesystem moves with it: the files it wrote, appended to, renamed
//! and deleted since it started, pre-copied round by round next to its memory, the last changes
//! while it is frozen, and applied to the receiving container's own root filesystem before the
//! restore (CRIU reopens the container's files by path there).
//!
//! - [`scan`]: the sending end: what changed in the layer since the last round ([`Scanner`]),
//!   as [`LayerEntry`](crate::wire::LayerEntry) and [`LayerBlock`](crate::wire::LayerBlock)
//!   frames; [`tree_digest`] for hosts that share the storage;
//! - [`apply`]: the receiving end ([`Applier`]), which checks every path before touching
//!   anything and never follows a symlink or leaves the root;
//! - [`beneath`]: that path discipline.
//!
//! Two kinds of layer:
//! - an overlayfs upper directory (containers from images, through containerd's snapshotter):
//!   its whiteouts become removals and its opaque directories list their children; the changes
//!   are applied through the destination's mounted root filesystem, whose overlayfs records
//!   them in its own upper directory;
//! - a whole directory (`ctr run --rootfs`): every directory lists its children, so the
//!   destination's directory ends up equal to the source's.

pub mod apply;
pub mod beneath;
pub mod scan;

use std::io;
use std::path::PathBuf;

pub use apply::Applier;
pub use scan::{tree_digest, Item, LayerRoundStats, Scanner};

/// Files travel in blocks of this size; a file that changed sends only the blocks whose content
/// hash changed (an append sends the tail).
pub const BLOCK: usize = 1 << 20;

/// What the sending end scans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerSource {
    /// An overlayfs upper directory.
    OverlayUpper(PathBuf),
    /// A whole root filesystem directory.
    Directory(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("path {path:?} from the source is not a plain relative path ({why}): refusing the whole migration before writing it")]
    BadPath { path: String, why: &'static str },
    #[error("{path:?}: {what}: {source}")]
    Io {
        path: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{path:?}: {0}", .problem)]
    Protocol { path: String, problem: String },
    #[error("{path:?} in the container's filesystem {problem}; pclive cannot move it")]
    Unsupported { path: String, problem: String },
    #[error("the receiving host's disk is full writing {path:?}: free space on the destination (or move the container to a host with room for its filesystem)")]
    DiskFull { path: String },
    /// The sink stopped the round (its own error says why).
    #[error("sending the filesystem stopped")]
    Stopped,
    #[error("{path:?} on the destination is in use by a running program: do both hosts share this root filesystem? Then pass --shared-rootfs to pclive migrate and pclive receive")]
    Busy { path: String },
}

impl LayerError {
    pub(crate) fn io(path: &[u8], what: &'static str, source: io::Error) -> LayerError {
        let path = show(path);
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => LayerError::DiskFull { path },
            Some(libc::ETXTBSY) => LayerError::Busy { path },
            _ => LayerError::Io { path, what, source },
        }
    }

    pub(crate) fn nix(path: &[u8], what: &'static str, errno: nix::errno::Errno) -> LayerError {
        LayerError::io(path, what, io::Error::from(errno))
    }
}

/// A path for messages.
pub fn show(path: &[u8]) -> String {
    if path.is_empty() {
        "/".into()
    } else {
        format!("/{}", String::from_utf8_lossy(path))
    }
}

/// Extended attributes overlayfs keeps for itself: never sent, never set.
pub(crate) fn is_overlay_xattr(name: &[u8]) -> bool {
    name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.")
}

#[cfg(test)]
mod tests;
