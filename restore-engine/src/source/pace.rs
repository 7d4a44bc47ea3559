//! Bounds a host owner puts on the live pre-copy rounds, so that a migration does not take what
//! the host's other work needs: `--max-bandwidth` on what they put on the link ([`Pacer`]), and
//! `--max-cpu` on the CPU they use ([`CpuBudget`]). As QEMU's `max-bandwidth`, neither applies
//! while the container is frozen: the last round goes as fast as it can, since it is downtime.

use std::time::{Duration, Instant};

use crate::clock::process_cpu_seconds;
#[cfg(test)]
use crate::clock::thread_cpu_seconds;

/// How much may go at once after a pause in sending (the tracker's scans): a short burst, not
/// the whole idle time's worth.
const BURST: Duration = Duration::from_millis(100);

/// A leaky bucket over bytes sent.
#[derive(Debug)]
pub struct Pacer {
    /// Bytes per second; None: no bound.
    rate: Option<f64>,
    /// When the link is free again at the bound's rate.
    free_at: Instant,
    /// The container is frozen: no bound.
    frozen: bool,
}

impl Pacer {
    pub fn new(bytes_per_second: Option<u64>) -> Self {
        Pacer {
            rate: bytes_per_second.filter(|r| *r > 0).map(|r| r as f64),
            free_at: Instant::now(),
            frozen: false,
        }
    }

    /// The rounds from now on run with the container frozen (or not).
    pub fn frozen(&mut self, frozen: bool) {
        self.frozen = frozen;
    }

    /// Waits until `bytes` more may go without exceeding the bound.
    pub fn pace(&mut self, bytes: u64) {
        let Some(rate) = self.rate.filter(|_| !self.frozen) else {
            return;
        };
        let now = Instant::now();
        let start = self.free_at.max(now.checked_sub(BURST).unwrap_or(now));
        self.free_at = start + Duration::from_secs_f64(bytes as f64 / rate);
        if self.free_at > now + BURST {
            std::thread::sleep(self.free_at - now - BURST);
        }
    }
}

/// `--max-cpu`: the live rounds use at most this many cores. The reading thread reads and
/// hashes, and seals and sends unless page streams do that on threads of their own; after each
/// piece it sleeps until the process's CPU time since the round began (its threads and the
/// streams', the shim's others being idle meanwhile) is within the bound of the wall time.
#[derive(Debug)]
pub struct CpuBudget {
    /// Cores; None: no bound.
    cores: Option<f64>,
    /// CPU seconds so far (the process's).
    clock: fn() -> f64,
    started: Instant,
    cpu_at_start: f64,
    frozen: bool,
}

impl CpuBudget {
    pub fn new(cores: Option<f64>) -> Self {
        CpuBudget {
            cores: cores.filter(|c| *c > 0.0),
            clock: process_cpu_seconds,
            started: Instant::now(),
            cpu_at_start: process_cpu_seconds(),
            frozen: false,
        }
    }

    /// Counts CPU time on `clock` instead (tests: this thread's alone).
    #[cfg(test)]
    fn clock(mut self, clock: fn() -> f64) -> Self {
        self.clock = clock;
        self.cpu_at_start = clock();
        self
    }

    /// A round begins, with the container frozen (no bound) or not.
    pub fn round(&mut self, frozen: bool) {
        self.frozen = frozen;
        self.started = Instant::now();
        self.cpu_at_start = (self.clock)();
    }

    /// Waits until the CPU used since the round began is within the bound.
    pub fn keep(&mut self) {
        let Some(cores) = self.cores.filter(|_| !self.frozen) else {
            return;
        };
        let used = (self.clock)() - self.cpu_at_start;
        let due = Duration::from_secs_f64(used / cores);
        let elapsed = self.started.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_live_rounds_keep_to_the_cpu_budget_and_the_frozen_round_does_not() {
        let burn = |budget: &mut CpuBudget| {
            for _ in 0..20 {
                let cpu = thread_cpu_seconds();
                while thread_cpu_seconds() - cpu < 0.01 {
                    std::hint::black_box(0u64);
                }
                budget.keep();
            }
        };
        // 200 ms of CPU at a quarter of a core: at least 0.8 s.
        let mut budget = CpuBudget::new(Some(0.25)).clock(thread_cpu_seconds);
        budget.round(false);
        let started = Instant::now();
        burn(&mut budget);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(750) && took < Duration::from_secs(3),
            "{took:?}"
        );
        budget.round(true);
        let started = Instant::now();
        burn(&mut budget);
        assert!(
            started.elapsed() < Duration::from_millis(600),
            "frozen: no bound"
        );
    }

    #[test]
    fn the_live_rounds_keep_to_the_bound_and_the_frozen_round_does_not() {
        let mut pacer = Pacer::new(Some(20 << 20));
        let started = Instant::now();
        for _ in 0..10 {
            pacer.pace(1 << 20);
        }
        // 10 MiB at 20 MiB/s: half a second, less the burst allowed up front.
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(350) && took < Duration::from_millis(1500),
            "{took:?}"
        );
        pacer.frozen(true);
        let started = Instant::now();
        for _ in 0..10 {
            pacer.pace(1 << 20);
        }
        assert!(started.elapsed() < Duration::from_millis(50));
        let mut unbounded = Pacer::new(None);
        let started = Instant::now();
        unbounded.pace(1 << 30);
        assert!(started.elapsed() < Duration::from_millis(50));
    }
}
