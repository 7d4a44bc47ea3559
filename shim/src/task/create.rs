//! Create: a container for `runc create`, or, from a checkpoint or a migration, one whose
//! start is a restore (as the runc shim does, the restore runs at Start).

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use log::info;

use super::process::{read_pid_file, Process, ProcessState};
use super::{
    os_err, Container, CreateParams, InitStart, RestoreSource, RootfsMount, TaskError, TaskEvent,
    Tasks,
};
use crate::annotations::{self, RestoreAnnotations};
use crate::config::Config;
use crate::confine;
use crate::io as pio;
use crate::runc::CreateOpts;
use crate::tools;

impl Tasks {
    pub fn create(&self, params: CreateParams) -> Result<ProcessState, TaskError> {
        if self.containers().contains_key(&params.id) {
            return Err(TaskError::ContainerExists(params.id));
        }
        let bundle = params.bundle.clone();
        let runc = self.runc_for(&bundle, &params.options);
        tools::check_runc(&runc.binary.to_string_lossy())?;
        fs::create_dir_all(&runc.root).map_err(os_err(format!(
            "cannot create runc root {}",
            runc.root.display()
        )))?;

        // Where to restore from, if anywhere: containerd's checkpoint, runc options, annotations.
        let raw = annotations::of_bundle(&bundle);
        let asked = annotations::parse(&raw)?;
        // Annotations name host paths and listeners the shim acts on as root: only what the
        // host's settings allow.
        let config = Config::load()?;
        confine::check(
            &asked,
            &raw,
            &config.annotations,
            std::slice::from_ref(&self.config.state_dir),
            &Config::path(),
        )
        .map_err(Box::new)?;
        let restore = restore_source(&params, &asked, &self.config.state_dir)?;

        let rootfs_mounted = self.mount_rootfs(&bundle, &params.rootfs)?;
        let unmount_on_error = |e: TaskError| {
            if rootfs_mounted {
                unmount_rootfs(&bundle);
            }
            e
        };

        let prepared = pio::prepare(&params.stdio).map_err(|e| unmount_on_error(e.into()))?;
        let init = Arc::new(Process::new(None, params.stdio.clone()));
        let checkpoint_label;
        let pending_start = match restore {
            Some(source) => {
                // As the runc shim does: the restore itself runs at Start.
                checkpoint_label = source.image_path.display().to_string();
                info!(
                    "{}: created for restore from {}",
                    params.id, checkpoint_label
                );
                InitStart::Restore {
                    source: Box::new(source),
                    io: Box::new(prepared),
                }
            }
            None => {
                checkpoint_label = String::new();
                let pid_file = bundle.join("init.pid");
                let opts = CreateOpts {
                    pid_file: pid_file.clone(),
                    console_socket: prepared.console_socket.clone(),
                    no_pivot: params.options.no_pivot_root,
                    no_new_keyring: params.options.no_new_keyring,
                };
                // CRIU's network lock in one step for later dumps (network_lock.rs).
                crate::network_lock::own_config_at_create(&bundle)
                    .map_err(|e| unmount_on_error(TaskError::Invalid(e.to_string())))?;
                let (runc_stdio, rest) = prepared.split();
                runc.create(&params.id, &bundle, &opts, runc_stdio)
                    .map_err(|e| unmount_on_error(e.into()))?;
                let io = rest.start().map_err(|e| {
                    let _ = runc.delete(&params.id, true);
                    unmount_on_error(e.into())
                })?;
                let pid = read_pid_file(&pid_file).map_err(unmount_on_error)?;
                let mut inner = init.lock();
                inner.pid = pid;
                inner.io = Some(io);
                drop(inner);
                InitStart::Start
            }
        };

        let container = Arc::new(Container {
            id: params.id.clone(),
            bundle: bundle.clone(),
            runc,
            init: Arc::clone(&init),
            execs: Mutex::new(HashMap::new()),
            pending_start: Mutex::new(Some(pending_start)),
            rootfs_mounted,
            no_pivot: params.options.no_pivot_root,
            receive: Default::default(),
        });
        self.containers()
            .insert(params.id.clone(), Arc::clone(&container));
        let pid = init.lock().pid;
        if pid > 0 {
            self.claim_pid(&params.id, None, pid);
        }
        self.events.publish(TaskEvent::Create {
            id: params.id.clone(),
            bundle,
            stdio: params.stdio,
            pid,
            checkpoint: checkpoint_label,
        });
        Ok(self.snapshot(&container, &init))
    }

    fn mount_rootfs(&self, bundle: &Path, mounts: &[RootfsMount]) -> Result<bool, TaskError> {
        if mounts.is_empty() {
            return Ok(false);
        }
        let target = bundle.join("rootfs");
        fs::create_dir_all(&target).map_err(os_err(format!(
            "cannot create rootfs mount point {}",
            target.display()
        )))?;
        for (i, m) in mounts.iter().enumerate() {
            if let Err(e) = containerd_shim::mount::mount_rootfs(
                Some(m.fs_type.as_str()),
                Some(m.source.as_str()),
                &m.options,
                &target,
            ) {
                if i > 0 {
                    unmount_rootfs(bundle);
                }
                return Err(TaskError::Os {
                    what: format!(
                        "cannot mount rootfs ({} from {}) at {}",
                        m.fs_type,
                        m.source,
                        target.display()
                    ),
                    source: io::Error::other(e.to_string()),
                });
            }
        }
        Ok(true)
    }
}

/// Unmounts what containerd's rootfs mounts put on `<bundle>/rootfs`.
pub fn unmount_rootfs(bundle: &Path) {
    let target = bundle.join("rootfs");
    for _ in 0..16 {
        match nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) => continue,
            Err(_) => break,
        }
    }
}

/// A receiving container that takes the source's address: the interfaces of the network
/// namespace it joins stay down until the switchover (the source has the address until then);
/// CRIU's `network-unlock` brings them up once the resume is recorded.
fn hold_address(bundle: &Path) -> Result<PathBuf, TaskError> {
    let path = bundle.join("config.json");
    let spec = oci_spec::runtime::Spec::load(&path)
        .map_err(|e| TaskError::Invalid(format!("cannot read {}: {e}", path.display())))?;
    let ns = crate::grant::moving_netns(&spec).map_err(TaskError::Invalid)?;
    let names = crate::netns::link_names(&ns).map_err(os_err(format!(
        "cannot list the interfaces of {}",
        ns.display()
    )))?;
    if names.is_empty() {
        return Err(TaskError::Invalid(format!(
            "--move-address: the network namespace {} has no interface besides lo: give it the source's address first (its network plugin does)",
            ns.display()
        )));
    }
    crate::netns::set_links(&ns, &names, false).map_err(os_err(format!(
        "cannot hold the interfaces of {} down until the switchover",
        ns.display()
    )))?;
    log::info!(
        "receiving into {}: interface(s) {} held down until the source's address moves here",
        ns.display(),
        names.join(", ")
    );
    Ok(ns)
}

/// Where a container's start restores from, if anywhere: a migration it receives, containerd's
/// checkpoint, the runc options' image path, or the restore annotation (in this order).
fn restore_source(
    params: &CreateParams,
    asked: &RestoreAnnotations,
    state_dir: &Path,
) -> Result<Option<RestoreSource>, TaskError> {
    if let Some(spec) = &asked.receive {
        let mut spec = spec.clone();
        spec.state_dir = state_dir.to_owned();
        spec.limits = crate::receive::limits_for(&params.bundle).map_err(TaskError::Invalid)?;
        spec.rootfs = Some(crate::rootfs::root_dir(&params.bundle).map_err(TaskError::Invalid)?);
        if spec.move_address {
            spec.address_netns = Some(hold_address(&params.bundle)?);
        }
        let image_path = params.bundle.join("migration-images");
        fs::create_dir_all(&image_path)
            .map_err(os_err(format!("cannot create {}", image_path.display())))?;
        // Only root reads what the source sends.
        fs::set_permissions(&image_path, fs::Permissions::from_mode(0o700))
            .map_err(os_err(format!("cannot restrict {}", image_path.display())))?;
        // Lazy unless the annotation says false explicitly: migration has always restored
        // lazily.
        return Ok(Some(if asked.eager {
            RestoreSource {
                image_path,
                work_path: None,
                lazy: None,
                receive_eagerly: Some(spec.clone()),
            }
        } else {
            let mut lazy = asked.lazy.clone().unwrap_or_default();
            lazy.receive = Some(spec.clone());
            RestoreSource {
                image_path,
                work_path: None,
                lazy: Some(lazy),
                receive_eagerly: None,
            }
        }));
    }
    let from_options = params
        .checkpoint
        .clone()
        .or_else(|| params.options.criu_image_path.as_ref().map(PathBuf::from))
        .map(|image_path| {
            (
                image_path,
                params.options.criu_work_path.as_ref().map(PathBuf::from),
            )
        });
    let from_annotation = asked
        .image_path
        .clone()
        .map(|image_path| (image_path, asked.work_path.clone()));
    let Some((image_path, work_path)) = from_options.or(from_annotation) else {
        return Ok(None);
    };
    if !image_path.join("inventory.img").is_file() {
        return Err(TaskError::Invalid(format!(
            "restore image directory {} holds no CRIU image set (inventory.img missing): \
             pass the --image-path a checkpoint wrote",
            image_path.display()
        )));
    }
    Ok(Some(RestoreSource {
        image_path,
        work_path,
        lazy: asked.lazy.clone(),
        receive_eagerly: None,
    }))
}
