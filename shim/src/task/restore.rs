//! Restore: the start of a container created from CRIU images: `runc restore` (lazily with the
//! lazy-pages server, or eagerly), after receiving them for a migration.

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use log::{info, warn};

use super::process::{read_pid_file, Process, ProcessStatus};
use super::{os_err, Container, RestoreSource, TaskError, TaskEvent, Tasks};
use crate::annotations::{self, CRIU_CONFIG};
use crate::eager_restore::EagerReceiver;
use crate::io::PreparedIo;
use crate::lazy_restore::LazyServer;
use crate::runc::{CriuOpts, RestoreOpts};
use crate::tools;

/// Options CRIU needs on restore only. `mntns-compat-mode`: CRIU 4.2's new mount engine fails
/// (move_mount EINVAL) on bundles that bind-mount host directories; CRIU refuses it on dump,
/// so it cannot live in /etc/criu/runc.conf.
const RESTORE_ONLY_CRIU_OPTIONS: &str = "mntns-compat-mode\n";
/// The CRIU config pclive writes into a restored container's bundle.
const RESTORE_CONFIG: &str = "criu-restore.conf";

impl Tasks {
    /// Starts the init of a container created for a restore: `runc restore` from its images
    /// (received first, for a migration), lazily with the lazy-pages server or eagerly.
    pub(super) fn restore_init(
        &self,
        container: &Container,
        source: RestoreSource,
        io: PreparedIo,
    ) -> Result<(), TaskError> {
        tools::check_criu()?;
        use_restore_criu_config(&container.bundle)?;
        let started = Instant::now();
        let pid_file = container.bundle.join("init.pid");
        let work_path = source
            .work_path
            .clone()
            .unwrap_or_else(|| container.bundle.join("criu-work"));
        fs::create_dir_all(&work_path).map_err(os_err(format!(
            "cannot create CRIU work directory {}",
            work_path.display()
        )))?;
        let received = (|| -> Result<_, TaskError> {
            let receiving = source.receive_eagerly.is_some()
                || source.lazy.as_ref().is_some_and(|o| o.receive.is_some());
            if receiving {
                // The receiving server checks the images against it once they arrived.
                crate::grant::write_for_server(&container.bundle, &work_path)
                    .map_err(|e| TaskError::Invalid(e.to_string()))?;
            } else {
                // CRIU takes credentials, capabilities, namespaces and mounts from the images,
                // not from this container's spec: they must not exceed it.
                let grant = crate::grant::of_bundle(&container.bundle)
                    .map_err(|e| TaskError::Invalid(e.to_string()))?;
                restore_engine::grant::check(&source.image_path, &grant).map_err(|e| {
                    TaskError::Invalid(format!("{}: {e}", source.image_path.display()))
                })?;
            }
            let eager_receiver = match &source.receive_eagerly {
                Some(spec) => Some(EagerReceiver::receive(
                    &container.id,
                    &source.image_path,
                    &work_path,
                    spec,
                    &container.receive,
                )?),
                None => None,
            };
            let lazy_server = match &source.lazy {
                Some(options) => Some(LazyServer::start(
                    &source.image_path,
                    &work_path,
                    options,
                    &container.receive,
                )?),
                None => None,
            };
            Ok((eager_receiver, lazy_server))
        })();
        let (eager_receiver, lazy_server) = match received {
            Ok(r) => r,
            Err(e) => {
                container.receive.finish();
                return Err(match container.receive.cancelled() {
                    Some(why) => TaskError::Invalid(format!("{why} ({e})")),
                    None => e,
                });
            }
        };
        let opts = RestoreOpts {
            criu: CriuOpts {
                image_path: source.image_path.clone(),
                work_path: Some(work_path.clone()),
                // A checkpoint of established connections is only restorable with it.
                tcp_established: true,
                ext_unix_sk: true,
                file_locks: true,
                lazy_pages: lazy_server.is_some(),
                ..Default::default()
            },
            bundle: container.bundle.clone(),
            pid_file: pid_file.clone(),
            console_socket: io.console_socket.clone(),
            no_pivot: container.no_pivot,
        };
        let (runc_stdio, rest) = io.split();
        let restore_started = Instant::now();
        let restored = container.runc.restore(&container.id, &opts, runc_stdio);
        container.receive.finish();
        if let Err(e) = restored {
            if let Some(server) = lazy_server {
                server.abort(&e.to_string());
            }
            if let Some(receiver) = eager_receiver {
                receiver.restore_failed(restore_started, &e.to_string());
                // What a failed CRIU may have left mounted in its work directory.
                crate::lazy_restore::unmount_below(&work_path);
            }
            return Err(e.into());
        }
        if let Some(receiver) = eager_receiver {
            if let Err(e) = receiver.restored(restore_started) {
                // The source resumes: this copy must not run as well.
                if let Err(kill) = container
                    .runc
                    .kill(&container.id, libc::SIGKILL as u32, true)
                {
                    warn!(
                        "{}: runc kill after the failed commit: {kill}",
                        container.id
                    );
                }
                return Err(e.into());
            }
        }
        let process_io = rest.start()?;
        let pid = read_pid_file(&pid_file)?;
        {
            let mut inner = container.init.lock();
            inner.pid = pid;
            inner.status = ProcessStatus::Running;
            inner.io = Some(process_io);
        }
        self.claim_pid(&container.id, None, pid);
        if let Some(server) = lazy_server {
            let init = Arc::clone(&container.init);
            server.restored(
                container.id.clone(),
                container.runc.clone(),
                Box::new(move || init_alive(&init)),
            );
        }
        let spec = oci_spec::runtime::Spec::load(container.bundle.join("config.json"));
        if spec.as_ref().is_ok_and(crate::netns::has_private_netns) {
            if let Err(e) = crate::netns::bring_up_loopback(pid) {
                warn!(
                    "{}: cannot bring up lo after the restore: {e}",
                    container.id
                );
            }
        }
        info!(
            "{}: restored from {} in {:.3}s (pid {pid}, {})",
            container.id,
            source.image_path.display(),
            started.elapsed().as_secs_f64(),
            if source.lazy.is_some() {
                "lazy: memory is being installed"
            } else if source.receive_eagerly.is_some() {
                "eager, migration committed"
            } else {
                "eager"
            }
        );
        self.events.publish(TaskEvent::Start {
            id: container.id.clone(),
            pid,
        });
        Ok(())
    }
}

/// Whether a restored container's init lives: not reaped, and not a zombie waiting to be.
fn init_alive(init: &Process) -> Result<(), String> {
    let inner = init.lock();
    if let Some(exit) = inner.exit {
        return Err(describe_exit(inner.pid, exit.code));
    }
    let pid = inner.pid;
    drop(inner);
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    match restore_engine::procfs::stat_state(&stat) {
        Some('Z') | Some('X') | None => Err(format!("its init (pid {pid}) has exited")),
        Some(_) => Ok(()),
    }
}

fn describe_exit(pid: u32, code: u32) -> String {
    if code > 128 {
        format!("its init (pid {pid}) was killed by signal {}", code - 128)
    } else {
        format!("its init (pid {pid}) exited with status {code}")
    }
}

/// Points runc's restore at a CRIU config with the restore-only options (plus whatever
/// /etc/criu/runc.conf says, or the container's own CRIU config), and the shim as CRIU's action
/// script: it brings `lo` up before sockets are restored and, for a received migration, lets
/// the tasks resume only once the receiving server recorded it (the resume gate,
/// restore-engine/src/destination/gate.rs).
fn use_restore_criu_config(bundle: &Path) -> Result<(), TaskError> {
    let annotations = annotations::of_bundle(bundle);
    let asked = annotations::parse(&annotations)?;
    let base = match annotations.get(CRIU_CONFIG) {
        Some(own) => fs::read_to_string(own).map_err(os_err(format!(
            "cannot read the container's CRIU config {own} ({CRIU_CONFIG})"
        )))?,
        None => fs::read_to_string("/etc/criu/runc.conf").unwrap_or_default(),
    };
    let mut config = base;
    if !config.is_empty() && !config.ends_with('\n') {
        config.push('\n');
    }
    if !asked.own_criu_config {
        config.push_str(RESTORE_ONLY_CRIU_OPTIONS);
    }
    if asked.tcp_close {
        config.push_str("tcp-close\n");
    }
    let shim = std::env::current_exe().map_err(os_err(
        "cannot find the shim binary for CRIU's action script",
    ))?;
    config.push_str(&format!("action-script {}\n", shim.display()));
    let config_path = bundle.join(RESTORE_CONFIG);
    fs::write(&config_path, config)
        .map_err(os_err(format!("cannot write {}", config_path.display())))?;
    crate::network_lock::set_annotation(bundle, CRIU_CONFIG, &config_path.display().to_string())
        .map_err(|e| TaskError::Invalid(e.to_string()))
}

/// A container that was restored keeps the restore's CRIU config (runc reads the config named by
/// `org.criu.config` on dump too), and CRIU refuses restore-only options on dump ("Option
/// --mntns-compat-mode is only valid on restore"): a migrated container could never be
/// checkpointed or migrated again. Before a dump, the config pclive wrote for the restore loses
/// what pclive added to it (restore-only options and the action script).
pub(super) fn use_dump_criu_config(bundle: &Path) -> Result<(), TaskError> {
    let config_path = bundle.join(RESTORE_CONFIG);
    let named = annotations::of_bundle(bundle)
        .get(CRIU_CONFIG)
        .is_some_and(|p| Path::new(p) == config_path);
    if !named || !config_path.exists() {
        return Ok(());
    }
    let text = fs::read_to_string(&config_path)
        .map_err(os_err(format!("cannot read {}", config_path.display())))?;
    let dump: String = text
        .lines()
        .filter(|line| {
            let line = line.trim();
            !(RESTORE_ONLY_CRIU_OPTIONS.lines().any(|o| o == line)
                || line == "tcp-close"
                || line.starts_with("action-script "))
        })
        .map(|line| format!("{line}\n"))
        .collect();
    fs::write(&config_path, dump).map_err(os_err(format!("cannot write {}", config_path.display())))
}
