//! Tasks that CRIU cannot seize, found before a migration starts and again once the container
//! is frozen, so that `pclive migrate` refuses with the cause instead of hanging in CRIU's dump.
//!
//! - **A task blocked in vfork** (its parent side: waiting until the child execs or exits) is in
//!   an uninterruptible wait that ptrace cannot interrupt: CRIU fails with "Unseizable
//!   non-zombie ... state D" after its 10 s timeout. Shells and posix_spawn vfork for a moment
//!   only: such a task is waited for (the freeze is retried); one that stays blocked is refused.
//! - **A stopped task** (SIGSTOP, SIGTSTP) in a cgroup v1 freezer: CRIU attaches with ptrace after
//!   the cgroup is frozen, and the kernel's ptrace attach to a stopped task waits until the task
//!   has run to re-enter its stop, which a frozen task never does: CRIU hangs in
//!   `ptrace_attach` (so does `runc checkpoint`, which freezes the same way). Measured with stock
//!   CRIU 4.2.1 on kernel 6.18. The cgroup v2 freezer stops tasks by a job-control trap instead,
//!   and is not affected.
//!
//! A task is classified from /proc: its state letter and `wchan` (the kernel function it
//! sleeps in) of each of its threads.

use std::fmt;
use std::fs;

use crate::cgroups::{host_cgroup_version, CgroupVersion};

/// Why a task cannot be seized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// Waiting for its vfork child to exec or exit.
    Vfork,
    /// Stopped by a signal, in a cgroup v1 freezer.
    Stopped,
}

/// A task CRIU cannot seize.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unseizable {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub why: Why,
}

impl fmt::Display for Unseizable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let task = if self.tid == self.pid {
            format!("process {} ({})", self.pid, self.comm)
        } else {
            format!(
                "thread {} of process {} ({})",
                self.tid, self.pid, self.comm
            )
        };
        match self.why {
            Why::Vfork => write!(
                f,
                "{task} is blocked in vfork, waiting for its child to exec or exit; CRIU cannot \
                 checkpoint a task in that wait (ptrace cannot interrupt it: \"Unseizable \
                 non-zombie\"). Migrate once the child has exec'd or exited"
            ),
            Why::Stopped => write!(
                f,
                "{task} is stopped (SIGSTOP or SIGTSTP); on a cgroup v1 host CRIU cannot \
                 checkpoint a stopped task of a frozen container (the kernel's ptrace attach waits \
                 for the stopped task to run, which a frozen task never does: runc checkpoint \
                 hangs the same way). Continue it (kill -CONT) or end it, then migrate"
            ),
        }
    }
}

/// The classification of one thread from its state letter and wchan; `v1_freezer` says whether
/// stopped tasks are a problem on this host.
pub fn classify(state: char, wchan: &str, v1_freezer: bool) -> Option<Why> {
    // The parent side of vfork sleeps in wait_for_vfork_done, which the kernel inlines into
    // kernel_clone: a task sleeps there for no other reason.
    if state == 'D' && (wchan == "kernel_clone" || wchan.contains("vfork")) {
        return Some(Why::Vfork);
    }
    // Stopped: 'T' while running; once frozen the state reads 'D' and the task sleeps in
    // do_signal_stop.
    if v1_freezer && (state == 'T' || wchan == "do_signal_stop") {
        return Some(Why::Stopped);
    }
    None
}

/// The unseizable threads of the processes `pids` (host pids); processes that vanish meanwhile
/// are skipped.
pub fn find(pids: &[u32]) -> Vec<Unseizable> {
    let v1_freezer = host_cgroup_version() == CgroupVersion::V1;
    let mut found = Vec::new();
    for &pid in pids {
        let Ok(threads) = fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        let comm = fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim_end().to_string())
            .unwrap_or_default();
        for tid in threads
            .flatten()
            .filter_map(|t| t.file_name().to_str()?.parse().ok())
        {
            let dir = format!("/proc/{pid}/task/{tid}");
            let (Ok(stat), Ok(wchan)) = (
                fs::read_to_string(format!("{dir}/stat")),
                fs::read_to_string(format!("{dir}/wchan")),
            ) else {
                continue;
            };
            let Some(state) = restore_engine::procfs::stat_state(&stat) else {
                continue;
            };
            if let Some(why) = classify(state, wchan.trim(), v1_freezer) {
                found.push(Unseizable {
                    pid,
                    tid,
                    comm: comm.clone(),
                    why,
                });
                break;
            }
        }
    }
    found
}

/// One message for all of them.
pub fn describe(tasks: &[Unseizable]) -> String {
    tasks
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_vfork_waits_and_stops_as_the_kernel_reports_them() {
        // Measured on kernel 6.18: a vfork parent before and after a v1 freeze.
        assert_eq!(classify('D', "kernel_clone", true), Some(Why::Vfork));
        assert_eq!(classify('D', "kernel_clone", false), Some(Why::Vfork));
        // A stopped task, running and frozen.
        assert_eq!(classify('T', "do_signal_stop", true), Some(Why::Stopped));
        assert_eq!(classify('D', "do_signal_stop", true), Some(Why::Stopped));
        assert_eq!(classify('T', "do_signal_stop", false), None);
        // Ordinary sleeps, frozen or not.
        assert_eq!(classify('S', "hrtimer_nanosleep", true), None);
        assert_eq!(classify('D', "hrtimer_nanosleep", true), None);
        assert_eq!(classify('D', "__refrigerator", true), None);
        assert_eq!(classify('R', "0", true), None);
    }

    #[test]
    fn names_the_task_the_cause_and_the_way_out() {
        let t = Unseizable {
            pid: 7,
            tid: 9,
            comm: "worker".into(),
            why: Why::Stopped,
        };
        let text = t.to_string();
        assert!(text.contains("thread 9 of process 7 (worker)"), "{text}");
        assert!(text.contains("kill -CONT"), "{text}");
    }
}
