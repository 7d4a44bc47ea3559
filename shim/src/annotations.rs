//! Every OCI annotation pclive reads (`io.containerd.pclive.*`, plus runc's `org.criu.config`)
//! and its parsing, in one place: the shim reads them, `pclive receive` and the tests write them.
//!
//! Annotations, not runtime options, because `ctr run --annotation` can set them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use log::warn;

use crate::lazy_restore::LazyOptions;
use crate::receive::ReceiveSpec;

/// runc reads the CRIU config file this annotation names (instead of /etc/criu/runc.conf).
pub const CRIU_CONFIG: &str = "org.criu.config";

/// Makes the container's task a restore from a CRIU image directory:
/// `ctr run --annotation io.containerd.pclive.restore.image-path=/path ...`.
pub const RESTORE_IMAGE_PATH: &str = "io.containerd.pclive.restore.image-path";
/// Optional CRIU work directory (logs) for such a restore.
pub const RESTORE_WORK_PATH: &str = "io.containerd.pclive.restore.work-path";
/// `true`: restore lazily: the tasks resume at once and pclive's lazy-pages server installs
/// their memory with userfaultfd (faults first, the rest in the background). A receiving
/// container restores lazily unless this says `false`: then its images are completed from the
/// staging store and restored eagerly (same pre-copy, no lazy-pages server).
pub const RESTORE_LAZY_PAGES: &str = "io.containerd.pclive.restore.lazy-pages";
/// Background fill limit of a lazy restore, in MiB/s (faults are never limited).
pub const RESTORE_FILL_RATE_MIB: &str = "io.containerd.pclive.restore.fill-rate-mib";
/// Threads of a lazy restore that copy the background fill while faults are served (1-16,
/// default 1): more fill faster where memory bandwidth allows, but take CPU from the service.
pub const RESTORE_COPIER_THREADS: &str = "io.containerd.pclive.restore.copier-threads";
/// Where a lazy restore takes pages from: `images` (the mapped image files, default) or
/// `staging` (copied into memory first).
pub const RESTORE_PAGE_SOURCE: &str = "io.containerd.pclive.restore.page-source";
/// `true`: established TCP connections are restored closed (CRIU's tcp-close), for containers
/// whose address does not move with them: their peers reconnect instead of the restore failing
/// to bind the old address.
pub const RESTORE_TCP_CLOSE: &str = "io.containerd.pclive.restore.tcp-close";

/// Receive a migration: listen on this host:port for the source (the container is restored
/// from what arrives). Needs [`RECEIVE_KEY_FILE`] or [`RECEIVE_INSECURE`]`=true`.
pub const RECEIVE_LISTEN: &str = "io.containerd.pclive.receive.listen";
/// The pre-shared key file that authenticates the source.
pub const RECEIVE_KEY_FILE: &str = "io.containerd.pclive.receive.key-file";
/// `true`: accept an unauthenticated source (the source must say `--insecure` too).
pub const RECEIVE_INSECURE: &str = "io.containerd.pclive.receive.insecure";
/// How long a receiving container waits for its source, in seconds (default 600).
pub const RECEIVE_ACCEPT_TIMEOUT: &str = "io.containerd.pclive.receive.accept-timeout-seconds";
/// Optional: a file the receiving shim appends its progress to (JSON lines: rounds as they
/// arrive, images, restore, commit), which `pclive receive` follows.
pub const RECEIVE_PROGRESS_FILE: &str = "io.containerd.pclive.receive.progress-file";
/// `true`: both hosts share the container's root filesystem storage; nothing of it is copied
/// (the source must say `--shared-rootfs` too, and the trees must be the same).
pub const RECEIVE_SHARED_ROOTFS: &str = "io.containerd.pclive.receive.shared-rootfs";
/// `true`: the container joins a network namespace (by path) that its network plugin gave the
/// source's address; its interfaces are held down until the switchover, then come up announcing
/// the address, and the source's TCP connections continue here (the source must say
/// `--move-address` too).
pub const RECEIVE_MOVE_ADDRESS: &str = "io.containerd.pclive.receive.move-address";

/// An annotation with a value pclive cannot use.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AnnotationError {
    #[error("annotation {key}={value}: {expected}")]
    BadValue {
        key: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("a receiving container needs exactly one of {RECEIVE_KEY_FILE}=FILE and {RECEIVE_INSECURE}=true")]
    ReceiveAuth,
    #[error("{RESTORE_TCP_CLOSE}=true with a CRIU config of your own ({CRIU_CONFIG}): put tcp-close in that config instead")]
    TcpCloseWithOwnConfig,
    #[error("{RECEIVE_MOVE_ADDRESS}=true with {RESTORE_TCP_CLOSE}=true: connections continue when the address moves; choose one")]
    MoveAddressWithTcpClose,
}

/// What a container's annotations ask of its restore.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RestoreAnnotations {
    /// Restore from this image directory ([`RESTORE_IMAGE_PATH`]).
    pub image_path: Option<PathBuf>,
    pub work_path: Option<PathBuf>,
    /// Lazy restore options, if [`RESTORE_LAZY_PAGES`]`=true`.
    pub lazy: Option<LazyOptions>,
    /// [`RESTORE_LAZY_PAGES`]`=false` was said explicitly (a receiving container then restores
    /// eagerly).
    pub eager: bool,
    /// Receive a migration first.
    pub receive: Option<ReceiveSpec>,
    /// [`RESTORE_TCP_CLOSE`]`=true`.
    pub tcp_close: bool,
    /// The container names a CRIU config of its own ([`CRIU_CONFIG`]).
    pub own_criu_config: bool,
}

fn boolean(
    annotations: &HashMap<String, String>,
    key: &'static str,
) -> Result<Option<bool>, AnnotationError> {
    match annotations.get(key).map(String::as_str) {
        None => Ok(None),
        Some("true") => Ok(Some(true)),
        Some("false") => Ok(Some(false)),
        Some(other) => Err(AnnotationError::BadValue {
            key,
            value: other.into(),
            expected: "use true or false",
        }),
    }
}

/// Parses pclive's annotations; anything it cannot use is an error that names the annotation.
pub fn parse(annotations: &HashMap<String, String>) -> Result<RestoreAnnotations, AnnotationError> {
    let lazy_pages = boolean(annotations, RESTORE_LAZY_PAGES)?;
    let fill_rate_mib = match annotations.get(RESTORE_FILL_RATE_MIB) {
        None => None,
        Some(v) => Some(v.parse::<u64>().ok().filter(|r| *r > 0).ok_or_else(|| {
            AnnotationError::BadValue {
                key: RESTORE_FILL_RATE_MIB,
                value: v.clone(),
                expected: "a positive number of MiB/s",
            }
        })?),
    };
    let copier_threads = match annotations.get(RESTORE_COPIER_THREADS) {
        None => None,
        Some(v) => Some(
            v.parse::<u16>()
                .ok()
                .filter(|n| (1..=16).contains(n))
                .ok_or_else(|| AnnotationError::BadValue {
                    key: RESTORE_COPIER_THREADS,
                    value: v.clone(),
                    expected: "a number of threads from 1 to 16",
                })?,
        ),
    };
    let stage_in_memory = match annotations.get(RESTORE_PAGE_SOURCE).map(String::as_str) {
        None | Some("images") => false,
        Some("staging") => true,
        Some(other) => {
            return Err(AnnotationError::BadValue {
                key: RESTORE_PAGE_SOURCE,
                value: other.into(),
                expected: "use images or staging",
            })
        }
    };
    let receive = match annotations.get(RECEIVE_LISTEN) {
        None => None,
        Some(listen) => {
            let key_file = annotations.get(RECEIVE_KEY_FILE).map(PathBuf::from);
            let insecure = boolean(annotations, RECEIVE_INSECURE)? == Some(true);
            if key_file.is_some() == insecure {
                return Err(AnnotationError::ReceiveAuth);
            }
            let accept_timeout_seconds = match annotations.get(RECEIVE_ACCEPT_TIMEOUT) {
                None => None,
                Some(v) => Some(v.parse::<u64>().ok().filter(|s| *s > 0).ok_or_else(|| {
                    AnnotationError::BadValue {
                        key: RECEIVE_ACCEPT_TIMEOUT,
                        value: v.clone(),
                        expected: "a positive number of seconds",
                    }
                })?),
            };
            Some(ReceiveSpec {
                listen: listen.clone(),
                key_file,
                progress_file: annotations.get(RECEIVE_PROGRESS_FILE).map(PathBuf::from),
                accept_timeout_seconds,
                // The shim's own (not an annotation's).
                state_dir: PathBuf::new(),
                limits: Default::default(),
                rootfs: None,
                shared_rootfs: boolean(annotations, RECEIVE_SHARED_ROOTFS)? == Some(true),
                move_address: boolean(annotations, RECEIVE_MOVE_ADDRESS)? == Some(true),
                // The shim's, once it holds the namespace's interfaces down.
                address_netns: None,
            })
        }
    };
    // A receiving container restores lazily unless told otherwise, so its lazy options count.
    let restores_lazily = lazy_pages == Some(true) || (receive.is_some() && lazy_pages.is_none());
    let lazy = restores_lazily.then_some(LazyOptions {
        fill_rate_mib,
        copier_threads,
        stage_in_memory,
        receive: None,
    });
    let tcp_close = boolean(annotations, RESTORE_TCP_CLOSE)? == Some(true);
    if tcp_close && receive.as_ref().is_some_and(|r| r.move_address) {
        return Err(AnnotationError::MoveAddressWithTcpClose);
    }
    let own_criu_config = annotations.contains_key(CRIU_CONFIG);
    if tcp_close && own_criu_config {
        return Err(AnnotationError::TcpCloseWithOwnConfig);
    }
    Ok(RestoreAnnotations {
        image_path: annotations.get(RESTORE_IMAGE_PATH).map(PathBuf::from),
        work_path: annotations.get(RESTORE_WORK_PATH).map(PathBuf::from),
        lazy,
        eager: lazy_pages == Some(false),
        receive,
        tcp_close,
        own_criu_config,
    })
}

/// The annotations of the bundle's OCI spec (none if it cannot be read: runc will say why).
pub fn of_bundle(bundle: &Path) -> HashMap<String, String> {
    match oci_spec::runtime::Spec::load(bundle.join("config.json")) {
        Ok(spec) => spec.annotations().clone().unwrap_or_default(),
        Err(e) => {
            warn!("cannot read {}/config.json: {e}", bundle.display());
            HashMap::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn nothing_asked_is_a_plain_container() {
        assert_eq!(parse(&map(&[])).unwrap(), RestoreAnnotations::default());
    }

    #[test]
    fn a_lazy_restore_takes_its_options() {
        let parsed = parse(&map(&[
            (RESTORE_IMAGE_PATH, "/ckpt"),
            (RESTORE_LAZY_PAGES, "true"),
            (RESTORE_FILL_RATE_MIB, "100"),
            (RESTORE_COPIER_THREADS, "2"),
            (RESTORE_PAGE_SOURCE, "staging"),
        ]))
        .unwrap();
        assert_eq!(parsed.image_path, Some(PathBuf::from("/ckpt")));
        let lazy = parsed.lazy.unwrap();
        assert_eq!(lazy.fill_rate_mib, Some(100));
        assert_eq!(lazy.copier_threads, Some(2));
        assert!(lazy.stage_in_memory && !parsed.eager);
    }

    #[test]
    fn a_receiving_container_needs_exactly_one_way_to_authenticate() {
        let listen = (RECEIVE_LISTEN, "10.0.0.2:7411");
        assert_eq!(
            parse(&map(&[listen])).unwrap_err(),
            AnnotationError::ReceiveAuth
        );
        assert_eq!(
            parse(&map(&[
                listen,
                (RECEIVE_KEY_FILE, "/k"),
                (RECEIVE_INSECURE, "true")
            ]))
            .unwrap_err(),
            AnnotationError::ReceiveAuth
        );
        let parsed = parse(&map(&[listen, (RECEIVE_KEY_FILE, "/k")])).unwrap();
        let receive = parsed.receive.unwrap();
        assert_eq!(receive.key_file, Some(PathBuf::from("/k")));
        let parsed = parse(&map(&[
            listen,
            (RECEIVE_INSECURE, "true"),
            (RESTORE_LAZY_PAGES, "false"),
        ]))
        .unwrap();
        assert!(parsed.receive.unwrap().key_file.is_none() && parsed.eager);
    }

    #[test]
    fn a_receiving_container_takes_the_lazy_options_without_asking_for_lazy_pages() {
        let parsed = parse(&map(&[
            (RECEIVE_LISTEN, "10.0.0.2:7411"),
            (RECEIVE_KEY_FILE, "/k"),
            (RESTORE_COPIER_THREADS, "3"),
        ]))
        .unwrap();
        assert_eq!(parsed.lazy.unwrap().copier_threads, Some(3));
        assert!(!parsed.eager);
    }

    #[test]
    fn bad_values_name_the_annotation() {
        for (key, value) in [
            (RESTORE_LAZY_PAGES, "yes"),
            (RESTORE_FILL_RATE_MIB, "0"),
            (RESTORE_FILL_RATE_MIB, "fast"),
            (RESTORE_COPIER_THREADS, "0"),
            (RESTORE_COPIER_THREADS, "17"),
            (RESTORE_PAGE_SOURCE, "disk"),
            (RESTORE_TCP_CLOSE, "1"),
        ] {
            let err = parse(&map(&[(key, value)])).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(value), "{err}");
        }
        assert_eq!(
            parse(&map(&[
                (RESTORE_TCP_CLOSE, "true"),
                (CRIU_CONFIG, "/etc/mine.conf")
            ]))
            .unwrap_err(),
            AnnotationError::TcpCloseWithOwnConfig
        );
    }

    #[test]
    fn a_moving_address_is_a_receive_option_that_excludes_tcp_close() {
        let listen = (RECEIVE_LISTEN, "10.0.0.2:7411");
        let parsed = parse(&map(&[
            listen,
            (RECEIVE_INSECURE, "true"),
            (RECEIVE_MOVE_ADDRESS, "true"),
        ]))
        .unwrap();
        assert!(parsed.receive.unwrap().move_address);
        assert_eq!(
            parse(&map(&[
                listen,
                (RECEIVE_INSECURE, "true"),
                (RECEIVE_MOVE_ADDRESS, "true"),
                (RESTORE_TCP_CLOSE, "true"),
            ]))
            .unwrap_err(),
            AnnotationError::MoveAddressWithTcpClose
        );
    }
}
