//! The parameters of the shim's container operations, in the shim's own terms (service.rs
//! translates containerd's requests into these).

use std::path::PathBuf;

use crate::io::StdioConfig;
use crate::lazy_restore::LazyOptions;
use crate::migrate::MigrateRequest;
use crate::receive::ReceiveSpec;

/// A rootfs mount containerd asks for (from the snapshotter).
#[derive(Debug, Clone)]
pub struct RootfsMount {
    pub fs_type: String,
    pub source: String,
    pub options: Vec<String>,
}

/// Where a restore reads its CRIU images from, and how.
#[derive(Debug, Clone)]
pub struct RestoreSource {
    pub image_path: PathBuf,
    pub work_path: Option<PathBuf>,
    /// Lazy restore (userfaultfd) instead of CRIU filling memory before the tasks resume.
    pub lazy: Option<LazyOptions>,
    /// Receive a migration first and restore it eagerly (its images completed from the staging
    /// store). A lazily restored migration says so in `lazy` instead.
    pub receive_eagerly: Option<ReceiveSpec>,
}

/// Runtime options (containerd's runc `Options`, as far as they apply).
#[derive(Debug, Clone, Default)]
pub struct RuntimeOptions {
    pub binary_name: Option<String>,
    pub root: Option<String>,
    pub no_pivot_root: bool,
    pub no_new_keyring: bool,
    pub systemd_cgroup: bool,
    pub criu_image_path: Option<String>,
    pub criu_work_path: Option<String>,
}

/// A create request in the shim's terms.
#[derive(Debug, Clone)]
pub struct CreateParams {
    pub id: String,
    pub bundle: PathBuf,
    pub rootfs: Vec<RootfsMount>,
    pub stdio: StdioConfig,
    /// A directory holding a CRIU image set to restore from (containerd unpacked it).
    pub checkpoint: Option<PathBuf>,
    pub options: RuntimeOptions,
}

/// A checkpoint request in the shim's terms (runc `CheckpointOptions` compatible).
#[derive(Debug, Clone, Default)]
pub struct CheckpointParams {
    pub image_path: PathBuf,
    pub work_path: Option<PathBuf>,
    pub exit: bool,
    pub open_tcp: bool,
    pub external_unix_sockets: bool,
    pub terminal: bool,
    pub file_locks: bool,
    pub empty_namespaces: Vec<String>,
    pub cgroups_mode: Option<String>,
    /// Migrate to another host instead of writing a checkpoint.
    pub migrate: Option<MigrateRequest>,
}
