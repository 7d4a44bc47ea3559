//! Container resource statistics and OOM notifications from the cgroup of the init process,
//! for cgroup v1 (this project's hosts) and v2.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Errors while reading a container's cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read the cgroups of pid {pid} (/proc/{pid}/cgroup): {source}. Is the container still running?")]
    ProcCgroup {
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("pid {pid} is in no {controller} cgroup")]
    NoController { pid: i32, controller: &'static str },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot watch {path} for OOM events: {source}")]
    Watch {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Which cgroup hierarchy a container lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CgroupVersion {
    #[default]
    V1,
    V2,
}

pub fn host_cgroup_version() -> CgroupVersion {
    if Path::new(CGROUP_ROOT).join("cgroup.controllers").exists() {
        CgroupVersion::V2
    } else {
        CgroupVersion::V1
    }
}

/// Resource usage of a container, independent of the cgroup version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerStats {
    pub memory_usage: u64,
    pub memory_limit: u64,
    pub memory_max_usage: u64,
    pub memory_failcnt: u64,
    pub memory_rss: u64,
    pub memory_cache: u64,
    pub cpu_total_ns: u64,
    pub cpu_user_ns: u64,
    pub cpu_kernel_ns: u64,
    pub cpu_per_core_ns: Vec<u64>,
    pub pids_current: u64,
    pub pids_limit: u64,
    /// Which hierarchy these came from (containerd wants the matching Metrics type).
    pub version: CgroupVersion,
    /// What only v2 reports here (the fields kubelet's working set, page fault and OOM
    /// figures come from): memory.stat's inactive_file, pgfault, pgmajfault, file_mapped,
    /// shmem, slab; memory.events; cpu.stat's throttling.
    pub memory_inactive_file: u64,
    pub memory_active_file: u64,
    pub memory_pgfault: u64,
    pub memory_pgmajfault: u64,
    pub memory_file_mapped: u64,
    pub memory_shmem: u64,
    pub memory_slab: u64,
    pub memory_swap_usage: u64,
    pub memory_swap_limit: u64,
    pub memory_events_high: u64,
    pub memory_events_oom: u64,
    pub memory_events_oom_kill: u64,
    pub cpu_nr_periods: u64,
    pub cpu_nr_throttled: u64,
    pub cpu_throttled_ns: u64,
}

/// The cgroup paths of one process: controller name → path under its hierarchy.
struct ProcCgroups {
    entries: Vec<(String, String)>,
}

impl ProcCgroups {
    fn of(pid: i32) -> Result<Self, CgroupError> {
        let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .map_err(|source| CgroupError::ProcCgroup { pid, source })?;
        Ok(Self::parse(&text))
    }

    fn parse(text: &str) -> Self {
        let entries = text
            .lines()
            .filter_map(|line| {
                let mut parts = line.splitn(3, ':');
                let _id = parts.next()?;
                let controllers = parts.next()?;
                let path = parts.next()?;
                Some((controllers.to_string(), path.to_string()))
            })
            .collect();
        ProcCgroups { entries }
    }

    /// Directory of a v1 controller (`memory`, `cpuacct`, `pids`) for this process.
    fn v1_dir(&self, controller: &str) -> Option<PathBuf> {
        self.entries.iter().find_map(|(controllers, path)| {
            let names: Vec<&str> = controllers.split(',').collect();
            if !names.contains(&controller) {
                return None;
            }
            // Mounts may be combined (cpu,cpuacct); find the directory that exists.
            let candidates = [
                Path::new(CGROUP_ROOT).join(controller),
                Path::new(CGROUP_ROOT).join(controllers),
            ];
            candidates
                .into_iter()
                .map(|base| base.join(path.trim_start_matches('/')))
                .find(|dir| dir.exists())
        })
    }

    fn v2_dir(&self) -> Option<PathBuf> {
        self.entries
            .iter()
            .find(|(controllers, _)| controllers.is_empty())
            .map(|(_, path)| Path::new(CGROUP_ROOT).join(path.trim_start_matches('/')))
    }
}

fn read_u64(path: &Path) -> Result<u64, CgroupError> {
    let text = fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_owned(),
        source,
    })?;
    let value = text.trim();
    // "max" (v2) means no limit.
    Ok(if value == "max" {
        u64::MAX
    } else {
        value.parse().unwrap_or(0)
    })
}

fn read_keyed(path: &Path) -> Result<Vec<(String, u64)>, CgroupError> {
    let text = fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_owned(),
        source,
    })?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect())
}

fn keyed(values: &[(String, u64)], key: &str) -> u64 {
    values
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| *v)
        .unwrap_or(0)
}

/// The processes of the cgroup that `pid` (the container's init) belongs to: its freezer
/// cgroup's (v1) or its cgroup's (v2) `cgroup.procs`. Cheaper than `runc ps` (no process to
/// start), for the frozen phase of a migration.
pub fn container_procs(pid: i32) -> Result<Vec<u32>, CgroupError> {
    let cgroups = ProcCgroups::of(pid)?;
    let dir = match host_cgroup_version() {
        CgroupVersion::V1 => cgroups.v1_dir("freezer"),
        CgroupVersion::V2 => cgroups.v2_dir(),
    }
    .ok_or(CgroupError::NoController {
        pid,
        controller: "freezer",
    })?;
    let path = dir.join("cgroup.procs");
    let text = fs::read_to_string(&path).map_err(|source| CgroupError::Read { path, source })?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Reads the statistics of the cgroup that `pid` (the container's init) belongs to.
pub fn read_stats(pid: i32) -> Result<ContainerStats, CgroupError> {
    let cgroups = ProcCgroups::of(pid)?;
    match host_cgroup_version() {
        CgroupVersion::V1 => read_stats_v1(pid, &cgroups),
        CgroupVersion::V2 => read_stats_v2(pid, &cgroups),
    }
}

fn read_stats_v1(pid: i32, cgroups: &ProcCgroups) -> Result<ContainerStats, CgroupError> {
    let mut stats = ContainerStats::default();
    let memory = cgroups.v1_dir("memory").ok_or(CgroupError::NoController {
        pid,
        controller: "memory",
    })?;
    stats.memory_usage = read_u64(&memory.join("memory.usage_in_bytes"))?;
    stats.memory_limit = read_u64(&memory.join("memory.limit_in_bytes"))?;
    stats.memory_max_usage = read_u64(&memory.join("memory.max_usage_in_bytes"))?;
    stats.memory_failcnt = read_u64(&memory.join("memory.failcnt"))?;
    let memory_stat = read_keyed(&memory.join("memory.stat"))?;
    stats.memory_rss = keyed(&memory_stat, "total_rss");
    stats.memory_cache = keyed(&memory_stat, "total_cache");

    if let Some(cpuacct) = cgroups.v1_dir("cpuacct") {
        stats.cpu_total_ns = read_u64(&cpuacct.join("cpuacct.usage"))?;
        // cpuacct.stat is in USER_HZ ticks.
        let ticks = read_keyed(&cpuacct.join("cpuacct.stat"))?;
        let ns_per_tick = 1_000_000_000 / clock_ticks_per_second();
        stats.cpu_user_ns = keyed(&ticks, "user") * ns_per_tick;
        stats.cpu_kernel_ns = keyed(&ticks, "system") * ns_per_tick;
        if let Ok(per_cpu) = fs::read_to_string(cpuacct.join("cpuacct.usage_percpu")) {
            stats.cpu_per_core_ns = per_cpu
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
        }
    }
    if let Some(pids) = cgroups.v1_dir("pids") {
        // The root cgroup has no pids files; a container's always has.
        stats.pids_current = read_u64(&pids.join("pids.current")).unwrap_or(0);
        stats.pids_limit = read_u64(&pids.join("pids.max")).unwrap_or(0);
    }
    if stats.pids_limit == u64::MAX {
        stats.pids_limit = 0;
    }
    Ok(stats)
}

fn read_stats_v2(pid: i32, cgroups: &ProcCgroups) -> Result<ContainerStats, CgroupError> {
    let dir = cgroups.v2_dir().ok_or(CgroupError::NoController {
        pid,
        controller: "unified",
    })?;
    read_stats_v2_dir(&dir)
}

/// The statistics of one cgroup v2 directory.
pub fn read_stats_v2_dir(dir: &Path) -> Result<ContainerStats, CgroupError> {
    let mut stats = ContainerStats {
        version: CgroupVersion::V2,
        memory_usage: read_u64(&dir.join("memory.current"))?,
        memory_limit: read_u64(&dir.join("memory.max"))?,
        ..Default::default()
    };
    stats.memory_max_usage = read_u64(&dir.join("memory.peak")).unwrap_or(0);
    let memory_stat = read_keyed(&dir.join("memory.stat"))?;
    let m = |key| keyed(&memory_stat, key);
    stats.memory_rss = m("anon");
    stats.memory_cache = m("file");
    stats.memory_inactive_file = m("inactive_file");
    stats.memory_active_file = m("active_file");
    stats.memory_pgfault = m("pgfault");
    stats.memory_pgmajfault = m("pgmajfault");
    stats.memory_file_mapped = m("file_mapped");
    stats.memory_shmem = m("shmem");
    stats.memory_slab = m("slab");
    stats.memory_swap_usage = read_u64(&dir.join("memory.swap.current")).unwrap_or(0);
    stats.memory_swap_limit = read_u64(&dir.join("memory.swap.max")).unwrap_or(0);
    let events = read_keyed(&dir.join("memory.events")).unwrap_or_default();
    stats.memory_failcnt = keyed(&events, "max");
    stats.memory_events_high = keyed(&events, "high");
    stats.memory_events_oom = keyed(&events, "oom");
    stats.memory_events_oom_kill = keyed(&events, "oom_kill");
    let cpu = read_keyed(&dir.join("cpu.stat"))?;
    stats.cpu_total_ns = keyed(&cpu, "usage_usec") * 1000;
    stats.cpu_user_ns = keyed(&cpu, "user_usec") * 1000;
    stats.cpu_kernel_ns = keyed(&cpu, "system_usec") * 1000;
    stats.cpu_nr_periods = keyed(&cpu, "nr_periods");
    stats.cpu_nr_throttled = keyed(&cpu, "nr_throttled");
    stats.cpu_throttled_ns = keyed(&cpu, "throttled_usec") * 1000;
    stats.pids_current = read_u64(&dir.join("pids.current")).unwrap_or(0);
    stats.pids_limit = read_u64(&dir.join("pids.max")).unwrap_or(0);
    if stats.pids_limit == u64::MAX {
        stats.pids_limit = 0; // "max", as for v1
    }
    Ok(stats)
}

fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as u64
    } else {
        100
    }
}

/// A readable descriptor that becomes readable (an eventfd counter, or a v2 `memory.events`
/// change) when the container hits its memory limit.
pub struct OomWatch {
    fd: OwnedFd,
    version: CgroupVersion,
    events_path: PathBuf,
    last_oom_kills: u64,
}

impl OomWatch {
    /// Registers for OOM notifications of `pid`'s memory cgroup.
    pub fn register(pid: i32) -> Result<Self, CgroupError> {
        let cgroups = ProcCgroups::of(pid)?;
        match host_cgroup_version() {
            CgroupVersion::V1 => {
                let dir = cgroups.v1_dir("memory").ok_or(CgroupError::NoController {
                    pid,
                    controller: "memory",
                })?;
                let control_path = dir.join("memory.oom_control");
                let watch_err = |source| CgroupError::Watch {
                    path: control_path.clone(),
                    source,
                };
                // SAFETY: eventfd takes no pointers; we own the returned descriptor.
                let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
                if raw < 0 {
                    return Err(watch_err(io::Error::last_os_error()));
                }
                // SAFETY: raw is a fresh descriptor owned by nobody else.
                let event = unsafe { OwnedFd::from_raw_fd(raw) };
                let control = fs::File::open(&control_path).map_err(watch_err)?;
                fs::write(
                    dir.join("cgroup.event_control"),
                    format!("{} {}", event.as_raw_fd(), control.as_raw_fd()),
                )
                .map_err(watch_err)?;
                // The kernel holds its own reference to the control file once registered.
                Ok(OomWatch {
                    fd: event,
                    version: CgroupVersion::V1,
                    events_path: control_path,
                    last_oom_kills: 0,
                })
            }
            CgroupVersion::V2 => {
                let dir = cgroups.v2_dir().ok_or(CgroupError::NoController {
                    pid,
                    controller: "unified",
                })?;
                let events_path = dir.join("memory.events");
                let file = fs::File::open(&events_path).map_err(|source| CgroupError::Watch {
                    path: events_path.clone(),
                    source,
                })?;
                let last = read_keyed(&events_path)
                    .map(|v| keyed(&v, "oom_kill"))
                    .unwrap_or(0);
                Ok(OomWatch {
                    fd: OwnedFd::from(file),
                    version: CgroupVersion::V2,
                    events_path,
                    last_oom_kills: last,
                })
            }
        }
    }

    /// Blocks until the next OOM event. Returns false when the cgroup is gone (container removed).
    pub fn wait(&mut self) -> bool {
        match self.version {
            CgroupVersion::V1 => {
                let mut counter = [0u8; 8];
                // SAFETY: reads 8 bytes into a buffer of 8 bytes we own.
                let n = unsafe {
                    libc::read(
                        self.fd.as_raw_fd(),
                        counter.as_mut_ptr().cast(),
                        counter.len(),
                    )
                };
                // The kernel also signals the eventfd when the cgroup is removed.
                n == 8 && self.events_path.exists()
            }
            CgroupVersion::V2 => loop {
                let mut pfd = libc::pollfd {
                    fd: self.fd.as_raw_fd(),
                    events: libc::POLLPRI,
                    revents: 0,
                };
                // SAFETY: one pollfd that lives across the call.
                let rc = unsafe { libc::poll(&mut pfd, 1, 1000) };
                if !self.events_path.exists() {
                    return false;
                }
                if rc < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                    return false;
                }
                let kills = read_keyed(&self.events_path)
                    .map(|v| keyed(&v, "oom_kill"))
                    .unwrap_or(0);
                if kills > self.last_oom_kills {
                    self.last_oom_kills = kills;
                    return true;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_v1_and_v2_proc_cgroup() {
        let parsed = ProcCgroups::parse(
            "12:pids:/default/c1\n4:cpu,cpuacct:/default/c1\n1:name=systemd:/x\n0::/unified/c1\n",
        );
        assert_eq!(parsed.entries.len(), 4);
        assert_eq!(
            parsed.v2_dir(),
            Some(PathBuf::from("/sys/fs/cgroup/unified/c1"))
        );
    }

    #[test]
    fn stats_of_own_process_are_readable() {
        let stats = read_stats(std::process::id() as i32).expect("read own cgroup stats");
        assert!(stats.memory_usage > 0, "{stats:?}");
    }

    #[test]
    fn keyed_reads_values() {
        let v = vec![("a".to_string(), 1), ("b".to_string(), 2)];
        assert_eq!(keyed(&v, "b"), 2);
        assert_eq!(keyed(&v, "c"), 0);
    }
}
