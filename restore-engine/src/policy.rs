//! When pre-copy stops and the final (frozen) round begins: the convergence policy, and the
//! projection of the time left until the pause that progress reports show.

use std::time::Duration;

use serde::Serialize;

/// When to stop iterating and do the final (frozen) round.
#[derive(Debug, Clone, Serialize)]
pub struct ConvergencePolicy {
    /// Stop when the next round's data would cross the link within this time.
    pub target_downtime: Duration,
    /// Stop after this many rounds whatever happens.
    pub max_rounds: u32,
    /// Stop when a round is not at least this much smaller than the previous one (the dirty
    /// rate matches the link: more rounds would not converge).
    pub min_shrink: f64,
}

impl Default for ConvergencePolicy {
    fn default() -> Self {
        ConvergencePolicy {
            target_downtime: Duration::from_millis(300),
            max_rounds: 10,
            min_shrink: 0.8,
        }
    }
}

/// Why pre-copy stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopReason {
    /// The remaining dirty memory fits the downtime target.
    Converged,
    /// Rounds stopped shrinking.
    NotShrinking,
    /// The round limit.
    RoundLimit,
}

/// Page bytes a round must send for its rate to be the link's: a round of a few MiB finishes its
/// writes into the socket buffers at once.
pub const LINK_SAMPLE_BYTES: u64 = 32 << 20;

/// The link's rate as pre-copy sees it: page bytes a round sent over the time it spent sending
/// them, from the latest round that sent at least [`LINK_SAMPLE_BYTES`]. Reading and hashing are
/// not link time: a late round rescans all memory to send a few MiB, and dividing those by its
/// whole time made a 1 Gbit/s link look like 20 MB/s, so pre-copy ran rounds that could no
/// longer shorten the pause (each a full rescan with the content-hash tracker).
#[derive(Debug, Default, Clone, Copy)]
pub struct LinkRate {
    bytes_per_second: Option<f64>,
}

impl LinkRate {
    /// A round sent `bytes` of pages in `send_seconds`.
    pub fn observe(&mut self, bytes: u64, send_seconds: f64) {
        if bytes >= LINK_SAMPLE_BYTES && send_seconds > 0.0 {
            self.bytes_per_second = Some(bytes as f64 / send_seconds);
        }
    }

    /// The estimate, or `fallback` while no round has sent enough to measure the link.
    pub fn or(&self, fallback: f64) -> f64 {
        self.bytes_per_second.unwrap_or(fallback)
    }
}

impl ConvergencePolicy {
    /// Decides after a round that sent `last_bytes` (the previous one `previous_bytes`) at
    /// `bandwidth` bytes/s, with `rounds` done so far. `None`: do another round.
    pub fn decide(
        &self,
        rounds: u32,
        last_bytes: u64,
        previous_bytes: Option<u64>,
        bandwidth: f64,
    ) -> Option<StopReason> {
        // The next round carries roughly what the last one did (pages dirtied meanwhile).
        let next_transfer = if bandwidth > 0.0 {
            Duration::from_secs_f64(last_bytes as f64 / bandwidth)
        } else {
            Duration::MAX
        };
        if rounds > 1 && next_transfer <= self.target_downtime {
            return Some(StopReason::Converged);
        }
        if rounds >= self.max_rounds {
            return Some(StopReason::RoundLimit);
        }
        if let Some(previous) = previous_bytes {
            if rounds > 2 && last_bytes as f64 > previous as f64 * self.min_shrink {
                return Some(StopReason::NotShrinking);
            }
        }
        None
    }

    /// Seconds until the pause if the workload keeps dirtying `dirty_rate` bytes/s and the
    /// link carries `bandwidth` bytes/s: the rounds this policy would still run, simulated
    /// (each round carries what was dirtied while the previous one was sent), after round
    /// `rounds_done`, which sent `last_bytes` in `last_seconds` after a round of
    /// `previous_bytes`. `None` when either rate is unknown.
    pub fn projected_seconds_to_pause(
        &self,
        rounds_done: u32,
        previous_bytes: Option<u64>,
        last_bytes: u64,
        last_seconds: f64,
        dirty_rate: f64,
        bandwidth: f64,
    ) -> Option<f64> {
        if !(bandwidth.is_finite() && bandwidth > 0.0 && dirty_rate.is_finite()) {
            return None;
        }
        let (mut rounds, mut previous, mut bytes, mut seconds) =
            (rounds_done, previous_bytes, last_bytes, last_seconds);
        let mut total = 0.0;
        // The first decision repeats the one taken on the round just done (go on); the loop
        // projects the rounds after it.
        while self.decide(rounds, bytes, previous, bandwidth).is_none() {
            previous = Some(bytes);
            bytes = (dirty_rate * seconds) as u64;
            seconds = bytes as f64 / bandwidth;
            total += seconds;
            rounds += 1;
        }
        Some(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_stops_on_convergence_stagnation_or_limit() {
        let policy = ConvergencePolicy::default();
        // 1 GB/s link, 100 MB left: 0.1 s < 0.3 s target.
        assert_eq!(
            policy.decide(3, 100_000_000, Some(400_000_000), 1e9),
            Some(StopReason::Converged)
        );
        // The first round never counts as converged (it is the bulk copy).
        assert_eq!(policy.decide(1, 1_000, None, 1e9), None);
        // Not shrinking: 900 MB after 1 GB.
        assert_eq!(
            policy.decide(3, 900_000_000, Some(1_000_000_000), 1e9),
            Some(StopReason::NotShrinking)
        );
        // Shrinking well but slow link: go on.
        assert_eq!(
            policy.decide(3, 500_000_000, Some(1_000_000_000), 1e9),
            None
        );
        assert_eq!(
            policy.decide(10, 500_000_000, Some(1_000_000_000), 1e9),
            Some(StopReason::RoundLimit)
        );
    }

    #[test]
    fn the_link_is_measured_on_rounds_that_send_enough_and_only_while_sending() {
        // Measured at 1 Gbit/s: the first round sent 1303 MiB in 11.6 s (of which ~0.5 s
        // reading and hashing), the third 6 MiB in 0.32 s of which 0.27 s rescanning memory.
        let mut link = LinkRate::default();
        assert_eq!(link.or(5.0), 5.0, "nothing measured yet");
        link.observe(1303 << 20, 11.1);
        link.observe(6 << 20, 0.05);
        let rate = link.or(0.0);
        assert!((120e6..125e6).contains(&rate), "{rate}");
        // With the link's rate, 6 MiB cross in 0.05 s: pre-copy has converged. With the
        // round's whole time (19 MB/s) it would have run another full rescan.
        let policy = ConvergencePolicy::default();
        assert_eq!(
            policy.decide(3, 6 << 20, Some(41 << 20), rate),
            Some(StopReason::Converged)
        );
        assert_eq!(
            policy.decide(3, 6 << 20, Some(41 << 20), (6 << 20) as f64 / 0.32),
            None
        );
    }

    #[test]
    fn the_projection_runs_the_policy_forward() {
        let policy = ConvergencePolicy::default();
        // 1 GB/s link, 100 MB/s dirtied, 1 s round of 1 GB just done: 100 MB (0.1 s) next,
        // which converges.
        let eta = policy
            .projected_seconds_to_pause(1, None, 1_000_000_000, 1.0, 1e8, 1e9)
            .unwrap();
        assert!((eta - 0.1).abs() < 1e-6, "{eta}");
        // Dirtying as fast as the link: the rounds stop shrinking after the third.
        let eta = policy
            .projected_seconds_to_pause(1, None, 1_000_000_000, 1.0, 1e9, 1e9)
            .unwrap();
        assert!((eta - 2.0).abs() < 1e-6, "{eta}");
        // A round limit bounds it even when nothing converges.
        let eta = policy
            .projected_seconds_to_pause(1, None, 1_000_000_000, 1.0, 2e9, 1e9)
            .unwrap();
        assert!(eta.is_finite());
        assert_eq!(
            policy.projected_seconds_to_pause(1, None, 1, 1.0, 1e6, 0.0),
            None,
            "no bandwidth, no projection"
        );
    }

    #[test]
    fn a_later_rounds_projection_compares_it_with_the_round_before() {
        // The demo (512 MiB rewritten at ~86 MB/s over 1 Gbit/s) printed "pause in ~0.0s"
        // after rounds 3, 4 and 5 and paused after round 6: the projection compared the round
        // just done with itself, which the policy reads as "not shrinking" from round 3 on.
        let policy = ConvergencePolicy::default();
        let mib = |m: f64| (m * (1 << 20) as f64) as u64;
        let eta = policy
            .projected_seconds_to_pause(3, Some(mib(246.6)), mib(138.7), 1.219, 85.9e6, 119.3e6)
            .unwrap();
        // Rounds 4 to 8 projected (0.88 + 0.63 + 0.46 + 0.33 + 0.24 s); the real ones took 2.7 s
        // with a pause after round 6.
        assert!((2.0..3.0).contains(&eta), "{eta}");
        // A round that did stop shrinking ends the projection at once.
        assert_eq!(
            policy.projected_seconds_to_pause(4, Some(mib(100.0)), mib(95.0), 1.0, 1e8, 1e8),
            Some(0.0)
        );
    }
}
