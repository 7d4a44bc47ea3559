//! `--max-bandwidth`: a bound on what the live pre-copy rounds put on the link, so that a
//! migration does not take a link (or the CPU that feeds it) other work on the host needs. As
//! QEMU's `max-bandwidth`, it does not apply while the container is frozen: the last round goes
//! as fast as it can, since it is downtime.

use std::time::{Duration, Instant};

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

#[cfg(test)]
mod tests {
    use super::*;

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
