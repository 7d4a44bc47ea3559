//! Credentials, capabilities, no_new_privs and seccomp of every thread (core-TID.img), against
//! the grant.

use std::path::Path;

use prost::Message;

use super::{capability_name, Grant, Task, CAP_SETGID, CAP_SETUID};
use crate::images::{self, Header, ImageError, TaskKobjIdsEntry, CORE_MAGIC};

// images/core.proto and images/creds.proto (CRIU 4.2), only the fields checked here.

#[derive(Clone, PartialEq, Message)]
pub struct CredsEntry {
    #[prost(uint32, required, tag = "1")]
    pub uid: u32,
    #[prost(uint32, required, tag = "2")]
    pub gid: u32,
    #[prost(uint32, required, tag = "3")]
    pub euid: u32,
    #[prost(uint32, required, tag = "4")]
    pub egid: u32,
    #[prost(uint32, required, tag = "5")]
    pub suid: u32,
    #[prost(uint32, required, tag = "6")]
    pub sgid: u32,
    #[prost(uint32, required, tag = "7")]
    pub fsuid: u32,
    #[prost(uint32, required, tag = "8")]
    pub fsgid: u32,
    #[prost(uint32, repeated, packed = "false", tag = "9")]
    pub cap_inh: Vec<u32>,
    #[prost(uint32, repeated, packed = "false", tag = "10")]
    pub cap_prm: Vec<u32>,
    #[prost(uint32, repeated, packed = "false", tag = "11")]
    pub cap_eff: Vec<u32>,
    #[prost(uint32, repeated, packed = "false", tag = "12")]
    pub cap_bnd: Vec<u32>,
    #[prost(uint32, required, tag = "13")]
    pub secbits: u32,
    #[prost(uint32, repeated, packed = "false", tag = "14")]
    pub groups: Vec<u32>,
    #[prost(uint32, optional, tag = "18")]
    pub no_new_privs: Option<u32>,
    #[prost(uint32, repeated, packed = "false", tag = "19")]
    pub cap_amb: Vec<u32>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TaskCoreEntry {
    /// [`TASK_DEAD`] for a zombie.
    #[prost(uint32, required, tag = "1")]
    pub task_state: u32,
    #[prost(string, required, tag = "6")]
    pub comm: String,
    #[prost(int32, optional, tag = "11")]
    pub old_seccomp_mode: Option<i32>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ThreadCoreEntry {
    #[prost(message, optional, tag = "10")]
    pub creds: Option<CredsEntry>,
    #[prost(int32, optional, tag = "11")]
    pub seccomp_mode: Option<i32>,
}

#[derive(Clone, PartialEq, Message)]
pub struct CoreEntry {
    #[prost(int32, required, tag = "1")]
    pub mtype: i32,
    #[prost(message, optional, tag = "3")]
    pub tc: Option<TaskCoreEntry>,
    #[prost(message, optional, tag = "4")]
    pub ids: Option<TaskKobjIdsEntry>,
    #[prost(message, optional, tag = "5")]
    pub thread_core: Option<ThreadCoreEntry>,
}

/// A zombie's task_state (compel/include/uapi/task-state.h): CRIU dumps only its core (comm,
/// exit code), no credentials and no namespace ids, and restores it as a task that exits.
pub const TASK_DEAD: u32 = 0x02;

/// SECCOMP_MODE_STRICT and SECCOMP_MODE_FILTER.
const SECCOMP_STRICT: i32 = 1;
const SECCOMP_FILTER: i32 = 2;

pub fn read_core(dir: &Path, tid: u32) -> Result<CoreEntry, ImageError> {
    images::read_single(
        &dir.join(format!("core-{tid}.img")),
        Header::Common(CORE_MAGIC),
    )
}

/// A capability set of the images (u32 words, lowest first) as a mask.
pub fn mask(words: &[u32]) -> u64 {
    words
        .iter()
        .take(2)
        .enumerate()
        .fold(0, |m, (i, w)| m | (*w as u64) << (32 * i))
}

/// "task 1 (sh)".
pub(crate) fn label(pid: u32, comm: &str) -> String {
    format!("task {pid} ({comm})")
}

pub(crate) fn check(
    dir: &Path,
    tasks: &[Task],
    grant: &Grant,
    violations: &mut Vec<String>,
) -> Result<(), ImageError> {
    let mut checked = std::collections::HashSet::new();
    for task in tasks {
        let leader = read_core(dir, task.pid)?;
        checked.insert(task.pid);
        let comm = leader
            .tc
            .as_ref()
            .map(|tc| tc.comm.clone())
            .unwrap_or_default();
        let who = label(task.pid, &comm);
        let old_seccomp = leader.tc.as_ref().and_then(|tc| tc.old_seccomp_mode);
        for &tid in &task.threads {
            let core = if tid == task.pid {
                leader.clone()
            } else if dir.join(format!("core-{tid}.img")).exists() {
                read_core(dir, tid)?
            } else {
                // CRIU cannot restore a thread without its core file; every core file that
                // exists is checked below.
                continue;
            };
            checked.insert(tid);
            let thread = core.thread_core.unwrap_or_default();
            let mut found = Vec::new();
            match &thread.creds {
                Some(creds) => check_creds(&who, creds, grant, &mut found),
                None => found.push(format!(
                    "{who} has no credentials in core-{tid}.img, so they cannot be checked; \
                     dump the source with CRIU 4.2"
                )),
            }
            let seccomp = thread.seccomp_mode.or(old_seccomp).unwrap_or(0);
            if grant.seccomp && seccomp != SECCOMP_FILTER && seccomp != SECCOMP_STRICT {
                found.push(format!(
                    "{who} runs without a seccomp filter, which the receiving container's spec \
                     requires; give the source container a seccomp profile as well"
                ));
            }
            for v in found {
                if !violations.contains(&v) {
                    violations.push(v);
                }
            }
        }
    }
    // Every core file CRIU could restore is checked, whatever pstree.img lists (a thread list
    // that names other threads must not leave one unchecked).
    let entries = std::fs::read_dir(dir).map_err(|source| ImageError::Io {
        file: dir.to_owned(),
        source,
    })?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(tid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("core-"))
            .and_then(|n| n.strip_suffix(".img"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if checked.contains(&tid) {
            continue;
        }
        let core = read_core(dir, tid)?;
        if core.tc.as_ref().map(|tc| tc.task_state) == Some(TASK_DEAD) {
            continue; // a zombie: restored as a task that only exits
        }
        let who = format!("thread {tid}");
        let mut found = Vec::new();
        match core.thread_core.as_ref().and_then(|t| t.creds.as_ref()) {
            Some(creds) => check_creds(&who, creds, grant, &mut found),
            None => found.push(format!(
                "{who} has no credentials in core-{tid}.img, so they cannot be checked; \
                 dump the source with CRIU 4.2"
            )),
        }
        for v in found {
            if !violations.contains(&v) {
                violations.push(v);
            }
        }
    }
    Ok(())
}

fn check_creds(who: &str, creds: &CredsEntry, grant: &Grant, found: &mut Vec<String>) {
    let granted = &grant.capabilities;
    let ceiling = granted.ceiling();
    let sets = [
        ("permitted", mask(&creds.cap_prm), ceiling),
        ("effective", mask(&creds.cap_eff), ceiling),
        ("inheritable", mask(&creds.cap_inh), ceiling),
        ("ambient", mask(&creds.cap_amb), ceiling),
        ("bounding", mask(&creds.cap_bnd), granted.bounding),
    ];
    for cap in 0..64u32 {
        let bit = 1u64 << cap;
        let held: Vec<&str> = sets
            .iter()
            .filter(|(_, has, allowed)| has & bit != 0 && allowed & bit == 0)
            .map(|(name, _, _)| *name)
            .collect();
        if !held.is_empty() {
            found.push(format!(
                "{who} holds {} (in its {} set{}), which the receiving container's spec does not \
                 grant; give the receiving container the same capabilities as the source's, or \
                 drop them on the source",
                capability_name(cap),
                held.join(", "),
                if held.len() > 1 { "s" } else { "" }
            ));
        }
    }
    let can = |cap: u32| ceiling & (1 << cap) != 0;
    let uids = [creds.uid, creds.euid, creds.suid, creds.fsuid];
    if !can(CAP_SETUID) {
        if let Some(uid) = uids.iter().find(|u| **u != grant.uid) {
            found.push(format!(
                "{who} runs as uid {uid}, but the receiving container's spec runs its process as \
                 uid {} without CAP_SETUID; run the receiving container as the source's user",
                grant.uid
            ));
        }
    }
    if !can(CAP_SETGID) {
        let gids = [creds.gid, creds.egid, creds.sgid, creds.fsgid];
        let allowed = |g: &u32| *g == grant.gid || grant.additional_gids.contains(g);
        if let Some(gid) = gids.iter().chain(&creds.groups).find(|g| !allowed(g)) {
            found.push(format!(
                "{who} holds gid {gid}, but the receiving container's spec gives its process gid \
                 {} and groups {:?} without CAP_SETGID; run the receiving container with the \
                 source's group and additional groups",
                grant.gid, grant.additional_gids
            ));
        }
    }
    if grant.no_new_privileges && creds.no_new_privs.unwrap_or(0) == 0 {
        found.push(format!(
            "{who} runs without no_new_privs, which the receiving container's spec sets \
             (noNewPrivileges); set noNewPrivileges on the source container as well"
        ));
    }
}
