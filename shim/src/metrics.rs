//! A container's statistics as containerd's Stats wants them: `io.containerd.cgroups.v1.Metrics`
//! on a cgroup v1 host, `io.containerd.cgroups.v2.Metrics` on a v2 host (kubelet's CRI stats read
//! the v2 memory usage, inactive_file for the working set, page faults, and the OOM events).

use containerd_shim::protos::cgroups::metrics as v1;
use containerd_shim::protos::cgroups_v2::metrics as v2;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageField};

use crate::cgroups::{CgroupVersion, ContainerStats};

pub const V1_TYPE: &str = "io.containerd.cgroups.v1.Metrics";
pub const V2_TYPE: &str = "io.containerd.cgroups.v2.Metrics";

/// The Metrics message of the hierarchy `stats` came from, in an Any.
pub fn stats_any(stats: &ContainerStats) -> Result<Any, String> {
    let (type_url, value) = match stats.version {
        CgroupVersion::V1 => (V1_TYPE, v1_metrics(stats).write_to_bytes()),
        CgroupVersion::V2 => (V2_TYPE, v2_metrics(stats).write_to_bytes()),
    };
    Ok(Any {
        type_url: type_url.into(),
        value: value.map_err(|e| format!("encode metrics: {e}"))?,
        ..Default::default()
    })
}

fn v1_metrics(stats: &ContainerStats) -> v1::Metrics {
    v1::Metrics {
        memory: MessageField::some(v1::MemoryStat {
            rss: stats.memory_rss,
            cache: stats.memory_cache,
            total_rss: stats.memory_rss,
            total_cache: stats.memory_cache,
            usage: MessageField::some(v1::MemoryEntry {
                usage: stats.memory_usage,
                limit: stats.memory_limit,
                max: stats.memory_max_usage,
                failcnt: stats.memory_failcnt,
                ..Default::default()
            }),
            ..Default::default()
        }),
        cpu: MessageField::some(v1::CPUStat {
            usage: MessageField::some(v1::CPUUsage {
                total: stats.cpu_total_ns,
                kernel: stats.cpu_kernel_ns,
                user: stats.cpu_user_ns,
                per_cpu: stats.cpu_per_core_ns.clone(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        pids: MessageField::some(v1::PidsStat {
            current: stats.pids_current,
            limit: stats.pids_limit,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn v2_metrics(stats: &ContainerStats) -> v2::Metrics {
    v2::Metrics {
        pids: MessageField::some(v2::PidsStat {
            current: stats.pids_current,
            limit: stats.pids_limit,
            ..Default::default()
        }),
        cpu: MessageField::some(v2::CPUStat {
            usage_usec: stats.cpu_total_ns / 1000,
            user_usec: stats.cpu_user_ns / 1000,
            system_usec: stats.cpu_kernel_ns / 1000,
            nr_periods: stats.cpu_nr_periods,
            nr_throttled: stats.cpu_nr_throttled,
            throttled_usec: stats.cpu_throttled_ns / 1000,
            ..Default::default()
        }),
        memory: MessageField::some(v2::MemoryStat {
            anon: stats.memory_rss,
            file: stats.memory_cache,
            shmem: stats.memory_shmem,
            slab: stats.memory_slab,
            file_mapped: stats.memory_file_mapped,
            inactive_file: stats.memory_inactive_file,
            active_file: stats.memory_active_file,
            pgfault: stats.memory_pgfault,
            pgmajfault: stats.memory_pgmajfault,
            usage: stats.memory_usage,
            usage_limit: stats.memory_limit,
            max_usage: stats.memory_max_usage,
            swap_usage: stats.memory_swap_usage,
            swap_limit: stats.memory_swap_limit,
            ..Default::default()
        }),
        memory_events: MessageField::some(v2::MemoryEvents {
            high: stats.memory_events_high,
            max: stats.memory_failcnt,
            oom: stats.memory_events_oom,
            oom_kill: stats.memory_events_oom_kill,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn a_recorded_cgroup_v2_tree_becomes_v2_metrics_with_what_kubelet_reads() {
        let tree = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/cgroup-v2-container");
        let stats = crate::cgroups::read_stats_v2_dir(&tree).unwrap();
        let any = stats_any(&stats).unwrap();
        assert_eq!(any.type_url, V2_TYPE);
        let m = v2::Metrics::parse_from_bytes(&any.value).unwrap();
        let memory = m.memory.as_ref().unwrap();
        assert_eq!(memory.usage, 52_428_800);
        assert_eq!(memory.usage_limit, 268_435_456);
        // kubelet's working set: usage - inactive_file.
        assert_eq!(memory.usage - memory.inactive_file, 52_428_800 - 12_582_912);
        assert_eq!((memory.anon, memory.file), (31_457_280, 18_874_368));
        assert_eq!((memory.pgfault, memory.pgmajfault), (81_234, 17));
        assert_eq!(memory.max_usage, 62_914_560);
        assert_eq!(
            memory.swap_limit,
            u64::MAX,
            "memory.swap.max 'max' is no limit"
        );
        let events = m.memory_events.as_ref().unwrap();
        assert_eq!((events.max, events.oom, events.oom_kill), (3, 1, 1));
        let cpu = m.cpu.as_ref().unwrap();
        assert_eq!(
            (cpu.usage_usec, cpu.user_usec, cpu.system_usec),
            (2_500_000, 2_000_000, 500_000)
        );
        assert_eq!(
            (cpu.nr_periods, cpu.nr_throttled, cpu.throttled_usec),
            (120, 7, 35_000)
        );
        let pids = m.pids.as_ref().unwrap();
        assert_eq!(
            (pids.current, pids.limit),
            (3, 0),
            "pids.max 'max' is no limit (0)"
        );
    }

    #[test]
    fn v1_statistics_stay_v1_metrics() {
        let stats = ContainerStats {
            memory_usage: 7,
            ..Default::default()
        };
        let any = stats_any(&stats).unwrap();
        assert_eq!(any.type_url, V1_TYPE);
        let m = v1::Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(m.memory.usage.usage, 7);
    }
}
