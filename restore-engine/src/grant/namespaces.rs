//! Namespaces: CRIU records the dumping host's own namespaces (inventory.img `root_ids`, those
//! of CRIU itself) and every task's (ids-PID.img). A task whose namespace was the host's is
//! restored into the restoring CRIU's namespace of that kind: this host's. That is refused when
//! the receiving container's spec gives it a namespace of its own. (The other direction, a task
//! of a namespace of its own restored into a new one, grants nothing.)

use std::path::Path;

use super::creds::{label, read_core};
use super::{Grant, Namespace, Task};
use crate::images::{self, Header, ImageError, TaskKobjIdsEntry};

/// criu/include/magic.h: IDS_MAGIC.
pub const IDS_MAGIC: u32 = 0x5443_2030;

fn id_of(ids: &TaskKobjIdsEntry, ns: Namespace) -> Option<u32> {
    match ns {
        Namespace::Pid => ids.pid_ns_id,
        Namespace::Network => ids.net_ns_id,
        Namespace::Ipc => ids.ipc_ns_id,
        Namespace::Uts => ids.uts_ns_id,
        Namespace::Mount => ids.mnt_ns_id,
        Namespace::User => ids.user_ns_id,
        Namespace::Cgroup => ids.cgroup_ns_id,
        Namespace::Time => ids.time_ns_id,
    }
}

/// A task's namespace ids: ids-PID.img (CRIU 4.x), else its core's `ids`.
fn task_ids(dir: &Path, pid: u32) -> Result<Option<TaskKobjIdsEntry>, ImageError> {
    let file = dir.join(format!("ids-{pid}.img"));
    if file.exists() {
        return images::read_single(&file, Header::Common(IDS_MAGIC)).map(Some);
    }
    Ok(read_core(dir, pid)?.ids)
}

/// Checks every task's namespaces; returns the kinds in which the first (root) task shares the
/// dumping host's namespace.
pub(crate) fn check(
    dir: &Path,
    tasks: &[Task],
    grant: &Grant,
    violations: &mut Vec<String>,
) -> Result<Vec<Namespace>, ImageError> {
    let inventory = images::read_inventory(dir)?;
    let Some(host) = inventory.root_ids else {
        violations.push(
            "inventory.img does not say which namespaces were the dumping host's, so the \
             tasks' namespaces cannot be checked; dump the source with CRIU 4.2"
                .into(),
        );
        return Ok(Namespace::ALL.to_vec());
    };
    let mut root_shares = Vec::new();
    for (i, task) in tasks.iter().enumerate() {
        let Some(ids) = task_ids(dir, task.pid)? else {
            violations.push(format!(
                "task {} has no namespace ids (ids-{}.img), so its namespaces cannot be checked; \
                 dump the source with CRIU 4.2",
                task.pid, task.pid
            ));
            continue;
        };
        let shared: Vec<Namespace> = Namespace::ALL
            .into_iter()
            .filter(|ns| id_of(&ids, *ns).is_some() && id_of(&ids, *ns) == id_of(&host, *ns))
            .collect();
        if i == 0 {
            root_shares = shared.clone();
        }
        let refused: Vec<String> = shared
            .iter()
            .filter(|ns| grant.has_own(**ns))
            .map(|ns| ns.to_string())
            .collect();
        if !refused.is_empty() {
            let comm = read_core(dir, task.pid)?
                .tc
                .map(|tc| tc.comm)
                .unwrap_or_default();
            violations.push(format!(
                "{} was in the source host's own {} namespace{}, so CRIU would restore it into \
                 this host's, where the receiving container's spec gives it {} of its own; \
                 migrate only containers that have their own namespaces, as the receiving \
                 container's spec says",
                label(task.pid, &comm),
                refused.join(", "),
                if refused.len() > 1 { "s" } else { "" },
                if refused.len() > 1 {
                    "namespaces"
                } else {
                    "one"
                },
            ));
        }
    }
    Ok(root_shares)
}
