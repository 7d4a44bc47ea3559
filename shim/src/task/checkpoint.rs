//! Checkpoint: a CRIU image of the container (`runc checkpoint`), or, when the request carries a
//! migration, the container moved to another host.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use log::{info, warn};

use super::process::ProcessStatus;
use super::{os_err, CheckpointParams, Container, TaskError, TaskEvent, Tasks};
use crate::migrate::MigrateRequest;
use crate::runc::{CheckpointOpts, CriuOpts};
use crate::tools;
use restore_engine::record::Store;
use restore_engine::source::{self, SourceError};

impl Tasks {
    /// Checkpoints the container with runc/CRIU into `params.image_path`.
    pub fn checkpoint(&self, id: &str, params: &CheckpointParams) -> Result<(), TaskError> {
        let container = self.container(id)?;
        let status = container.init.lock().status;
        if !matches!(status, ProcessStatus::Running | ProcessStatus::Paused) {
            return Err(TaskError::WrongState {
                what: format!("checkpoint {id}"),
                status,
                expected: "running or paused",
            });
        }
        tools::check_criu()?;
        super::restore::use_dump_criu_config(&container.bundle)?;
        match crate::network_lock::prefer_nftables(&container.bundle) {
            Ok(method) => log::info!("{id}: the dump locks the network with {method}"),
            Err(e) => {
                log::warn!("{id}: cannot choose CRIU's network lock ({e}); it uses its default")
            }
        }
        let work_path = params
            .work_path
            .clone()
            .unwrap_or_else(|| container.bundle.join("criu-work"));
        if let Some(request) = &params.migrate {
            return self.migrate_out(&container, request, &work_path);
        }
        for dir in [&params.image_path, &work_path] {
            fs::create_dir_all(dir).map_err(os_err(format!(
                "cannot create checkpoint directory {}",
                dir.display()
            )))?;
        }
        let opts = CheckpointOpts {
            criu: CriuOpts {
                image_path: params.image_path.clone(),
                work_path: Some(work_path),
                tcp_established: params.open_tcp,
                ext_unix_sk: params.external_unix_sockets,
                shell_job: params.terminal,
                file_locks: params.file_locks,
                empty_namespaces: params.empty_namespaces.clone(),
                manage_cgroups_mode: params.cgroups_mode.clone(),
                lazy_pages: false,
            },
            leave_running: !params.exit,
            parent_path: None,
            status_fd: None,
            page_server: None,
            tcp_skip_in_flight: false,
        };
        let pids: Vec<u32> = container
            .runc
            .ps(id)?
            .into_iter()
            .map(|p| p as u32)
            .collect();
        let blocked = crate::seizable::find(&pids);
        if !blocked.is_empty() {
            return Err(TaskError::Unseizable(crate::seizable::describe(&blocked)));
        }
        let started = Instant::now();
        container.runc.checkpoint(&container.id, &opts)?;
        restore_engine::fixups::fix_overdue_timerfds(&params.image_path).map_err(|e| {
            TaskError::Os {
                what: format!("correcting the timerfds of {}", params.image_path.display()),
                source: std::io::Error::other(e.to_string()),
            }
        })?;
        info!(
            "{id}: checkpointed to {} in {:.3}s{}",
            params.image_path.display(),
            started.elapsed().as_secs_f64(),
            if params.exit { " (exited)" } else { "" }
        );
        self.events
            .publish(TaskEvent::Checkpointed { id: id.into() });
        Ok(())
    }

    fn migrate_out(
        &self,
        container: &Container,
        request: &MigrateRequest,
        work_path: &Path,
    ) -> Result<(), TaskError> {
        let id = &container.id;
        let status = container.init.lock().status;
        if status != ProcessStatus::Running {
            return Err(TaskError::WrongState {
                what: format!("migrate {id}"),
                status,
                expected: "running",
            });
        }
        fs::create_dir_all(work_path)
            .map_err(os_err(format!("cannot create {}", work_path.display())))?;
        let init_pid = container.init.lock().pid;
        let migrated = crate::migrate::migrate_out(
            &container.runc,
            id,
            init_pid,
            &container.bundle,
            request,
            work_path,
            &self.config.state_dir,
            dump_network(&container.bundle),
        );
        let report = match migrated {
            Ok(report) => report,
            Err(e) => {
                if matches!(
                    e,
                    crate::migrate::MigrateError::Source(SourceError::InDoubt { .. })
                ) {
                    // Frozen until an operator resolves it: say so to containerd.
                    container.init.lock().status = ProcessStatus::Paused;
                    self.events.publish(TaskEvent::Paused { id: id.clone() });
                }
                return Err(e.into());
            }
        };
        info!(
            "{id}: migrated to {}: downtime {:.3}s (last round {:.3}s, final dump {:.3}s, images {:.3}s), frozen until commit {:.3}s, {} rounds",
            report.destination,
            report.downtime_seconds,
            report.last_round_seconds,
            report.final_dump_seconds,
            report.images_seconds,
            report.frozen_until_commit_seconds,
            report.precopy.rounds.len()
        );
        if let Ok(json) = serde_json::to_vec_pretty(&report) {
            let _ = fs::write(crate::migrate::report_path(work_path), json);
        }
        // The destination runs the container now: the paused source goes, every process
        // killed while still frozen (none may run again). The rules that refused its clients
        // go first (they live in its network namespace, which may be the host's); a connection
        // attempt in between finds the frozen listener, which the kill closes at once.
        if let Err(e) = crate::release::unrelease(id, init_pid) {
            warn!("{id}: migrated, but the rules that refused its clients here remain: {e}");
        }
        super::lifecycle::kill_frozen(&container.runc, id, init_pid)?;
        // Return only once the source is really gone: `pclive migrate` reports it so.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut inner = container.init.lock();
        while inner.exit.is_none() && Instant::now() < deadline {
            inner = container
                .init
                .exited
                .wait_timeout(inner, Duration::from_millis(100))
                .map(|(guard, _)| guard)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        if inner.exit.is_none() {
            warn!("{id}: migrated, but the source's init has not exited 10s after SIGKILL");
        }
        drop(inner);
        if let Err(e) =
            source::source_removed(&Store::new(&self.config.state_dir), &report.migration_id)
        {
            warn!("{id}: migrated and removed here, but {e}");
        }
        self.events
            .publish(TaskEvent::Checkpointed { id: id.clone() });
        Ok(())
    }
}

/// Where the final dump of a migration runs: a container with a network namespace of its own
/// (a new one, or one joined by path, e.g. CNI's) is dumped from a private namespace, so that
/// CRIU's page server cannot be reached from the host; a host-network container from the
/// host's (CRIU would otherwise take the host's network for the container's).
fn dump_network(bundle: &std::path::Path) -> crate::runc::DumpNetwork {
    let own = oci_spec::runtime::Spec::load(bundle.join("config.json"))
        .ok()
        .and_then(|spec| spec.linux().clone())
        .and_then(|linux| linux.namespaces().clone())
        .is_some_and(|namespaces| {
            namespaces
                .iter()
                .any(|ns| ns.typ() == oci_spec::runtime::LinuxNamespaceType::Network)
        });
    if own {
        crate::runc::DumpNetwork::Private
    } else {
        crate::runc::DumpNetwork::Host
    }
}
