//! What the subcommands share: containerd's address and namespace, where this host records its
//! migrations, the pre-shared key, and the containerd API client.

use std::path::{Path, PathBuf};

use clap::Args;
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::Request;
use restore_engine::record::Store;
use restore_engine::wire::{self, Auth};

/// Exit codes (documented in `pclive --help`).
pub mod exit {
    pub const FAILED: u8 = 1;
    pub const UNREACHABLE: u8 = 3;
    pub const IN_DOUBT: u8 = 4;
}

#[derive(Args, Debug, Clone)]
pub struct Containerd {
    /// containerd's socket
    #[arg(
        long,
        env = "CONTAINERD_ADDRESS",
        default_value = "/run/containerd/containerd.sock",
        value_name = "SOCKET"
    )]
    pub address: String,
    /// containerd namespace
    #[arg(
        long,
        short = 'n',
        env = "CONTAINERD_NAMESPACE",
        default_value = "default",
        value_name = "NS"
    )]
    pub namespace: String,
    /// Where this host's migration records live (default: /var/lib/pclive/<instance>, as the
    /// shim has it; the same as the shim's PCLIVE_STATE_DIR)
    #[arg(long, env = "PCLIVE_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

impl Containerd {
    /// The records of this containerd instance and namespace.
    pub fn store(&self) -> Store {
        Store::new(&self.dir())
    }

    /// The shim's state directory for this containerd instance and namespace (annotations may
    /// always name files there).
    pub fn dir(&self) -> PathBuf {
        match &self.state_dir {
            Some(base) => base.join(&self.namespace),
            None => containerd_shim_pclive::paths::state_dir(&self.address, &self.namespace),
        }
    }

    /// A request to containerd in our namespace.
    pub fn request<T>(&self, message: T) -> Result<Request<T>, String> {
        let mut request = Request::new(message);
        request.metadata_mut().insert(
            "containerd-namespace",
            self.namespace
                .parse()
                .map_err(|_| format!("bad namespace {}", self.namespace))?,
        );
        Ok(request)
    }

    /// Connects to containerd's API.
    pub async fn connect(&self) -> Result<Channel, String> {
        containerd_client::connect(&self.address)
            .await
            .map_err(|e| format!("cannot reach containerd at {}: {e}", self.address))
    }
}

#[derive(Args, Debug, Clone)]
#[group(required = false, multiple = false)]
pub struct KeyArgs {
    /// The pre-shared key file (the same on both hosts: head -c 32 /dev/urandom > FILE)
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// No authentication: only on a network you trust, and only if the other end says so too
    #[arg(long)]
    pub insecure: bool,
}

impl KeyArgs {
    /// The key file as an absolute path (the shim runs in another directory), or None for
    /// `--insecure`; an error if neither or both were given.
    pub fn key_path(&self) -> Result<Option<PathBuf>, String> {
        match (&self.key_file, self.insecure) {
            (Some(path), false) => std::path::absolute(path)
                .map(Some)
                .map_err(|e| format!("--key-file {}: {e}", path.display())),
            (None, true) => Ok(None),
            _ => Err("give exactly one of --key-file FILE and --insecure".into()),
        }
    }

    /// The authentication these options (or, failing them, `recorded`) give.
    pub fn auth(&self, recorded: Option<&Path>) -> Result<Auth, String> {
        if self.insecure {
            return Ok(Auth::Insecure);
        }
        match self.key_file.as_deref().or(recorded) {
            Some(path) => wire::read_key_file(path).map(Auth::Key),
            None => Err("give --key-file FILE (or --insecure)".into()),
        }
    }
}

/// A tokio runtime for containerd's client.
pub fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

/// "3s ago", "2m ago".
pub fn ago(unix: f64) -> String {
    let seconds = (restore_engine::source::unix_now() - unix).max(0.0);
    match seconds {
        s if s < 120.0 => format!("{s:.0}s ago"),
        s if s < 7200.0 => format!("{:.0}m ago", s / 60.0),
        s => format!("{:.0}h ago", s / 3600.0),
    }
}

/// A new directory in `parent` only we may enter (mkdtemp, 0700: tempfile's default follows the
/// umask, 0755 here), removed when dropped.
pub fn private_tempdir(prefix: &str, parent: &Path) -> std::io::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new()
        .prefix(prefix)
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(parent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_directories_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let parent = tempfile::tempdir().unwrap();
        let dir = private_tempdir("t-", parent.path()).unwrap();
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    /// A relative --key-file leaves the CLI absolute: the shim reads it from another directory.
    #[test]
    fn a_relative_key_file_is_made_absolute() {
        let args = KeyArgs {
            key_file: Some(PathBuf::from("keys/migration.key")),
            insecure: false,
        };
        let path = args.key_path().unwrap().unwrap();
        assert!(path.is_absolute(), "{}", path.display());
        assert_eq!(
            path,
            std::env::current_dir().unwrap().join("keys/migration.key")
        );
        let both = KeyArgs {
            key_file: Some(PathBuf::from("k")),
            insecure: true,
        };
        assert!(both.key_path().is_err());
    }
}
