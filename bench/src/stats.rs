//! What a run measured, reduced to numbers: percentiles, the longest probe gap, 100 ms buckets.
//!
//! Everything here is pure (times are unix microseconds taken by the caller), so it is tested
//! without a server.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Wall-clock time that never goes backwards: the unix time at start plus a monotonic offset.
/// Timelines from two hosts' tools are compared by unix time, but an NTP step during a run must
/// not create (or hide) a gap.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
    start_unix_us: u64,
}

impl Clock {
    pub fn start() -> Self {
        let start_unix_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        Clock {
            start: Instant::now(),
            start_unix_us,
        }
    }

    pub fn now_us(&self) -> u64 {
        self.at_us(Instant::now())
    }

    pub fn at_us(&self, instant: Instant) -> u64 {
        self.start_unix_us + instant.saturating_duration_since(self.start).as_micros() as u64
    }

    pub fn start_us(&self) -> u64 {
        self.start_unix_us
    }
}

pub fn us_to_unix_seconds(us: u64) -> f64 {
    us as f64 / 1e6
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Read,
    Write,
    Error,
}

/// One load operation, as the load thread saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpRecord {
    /// When the reply (or the failure) came, unix µs.
    pub done_us: u64,
    /// From sending the request to its reply; 0 for errors.
    pub latency_us: u32,
    pub outcome: Outcome,
    /// The endpoint that answered (or failed).
    pub endpoint: u8,
}

/// One successful probe PING.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeSample {
    pub reply_us: u64,
    pub endpoint: u8,
}

/// Nearest-rank percentile of sorted values (`p` in 0..=100); `None` for no values.
pub fn percentile(sorted: &[u32], p: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LatencySummary {
    pub p50: Option<u32>,
    pub p90: Option<u32>,
    pub p99: Option<u32>,
    pub max: Option<u32>,
    pub ops: usize,
}

pub fn summarize(mut latencies_us: Vec<u32>) -> LatencySummary {
    latencies_us.sort_unstable();
    LatencySummary {
        p50: percentile(&latencies_us, 50.0),
        p90: percentile(&latencies_us, 90.0),
        p99: percentile(&latencies_us, 99.0),
        max: latencies_us.last().copied(),
        ops: latencies_us.len(),
    }
}

/// The longest time without a successful probe reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    pub start_us: u64,
    pub end_us: u64,
    /// The endpoint whose reply ended the gap (after a migration: the destination).
    pub endpoint_after: u8,
}

impl Gap {
    pub fn seconds(&self) -> f64 {
        (self.end_us - self.start_us) as f64 / 1e6
    }
}

/// The longest gap between consecutive successful replies (samples in time order); `None`
/// with fewer than two replies.
/// [`longest_gap`] counting the time from the last reply to `end_us` too: a client that never
/// got an answer again (stuck on a connection nobody serves) waited until the end.
pub fn longest_gap_until(samples: &[ProbeSample], end_us: u64) -> Option<Gap> {
    let mut samples = samples.to_vec();
    if let Some(last) = samples.last() {
        samples.push(ProbeSample {
            reply_us: end_us.max(last.reply_us),
            endpoint: NO_ENDPOINT,
        });
    }
    longest_gap(&samples)
}

/// The endpoint of [`longest_gap_until`]'s end-of-run sample: nobody answered.
pub const NO_ENDPOINT: u8 = u8::MAX;

pub fn longest_gap(samples: &[ProbeSample]) -> Option<Gap> {
    samples
        .windows(2)
        .map(|pair| Gap {
            start_us: pair[0].reply_us,
            end_us: pair[1].reply_us.max(pair[0].reply_us),
            endpoint_after: pair[1].endpoint,
        })
        // On ties keep the first gap: the migration is usually the first long one.
        .fold(None, |best: Option<Gap>, gap| match best {
            Some(b) if b.end_us - b.start_us >= gap.end_us - gap.start_us => Some(b),
            _ => Some(gap),
        })
}

/// Latency of the successful load operations that completed in `(from_us, from_us + window_us]`.
pub fn latency_after(ops: &[OpRecord], from_us: u64, window_us: u64) -> LatencySummary {
    summarize(
        ops.iter()
            .filter(|op| op.outcome != Outcome::Error)
            .filter(|op| op.done_us > from_us && op.done_us <= from_us + window_us)
            .map(|op| op.latency_us)
            .collect(),
    )
}

/// One line of the timeline file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Bucket {
    /// Start of the bucket, unix seconds.
    pub t: f64,
    pub reads: u64,
    pub writes: u64,
    pub errors: u64,
    pub p50_us: Option<u32>,
    pub p99_us: Option<u32>,
    /// The endpoint that answered the last successful operation of the bucket.
    pub endpoint: Option<u8>,
    /// Successful probe PINGs (about 1 per ms while the service answers).
    pub probes: u64,
}

/// Cuts `[start_us, end_us)` into buckets of `width_us`, empty ones included (a migration's
/// downtime shows as buckets with no operations). Records outside the range are ignored.
pub fn buckets(
    ops: &[OpRecord],
    probes: &[ProbeSample],
    start_us: u64,
    end_us: u64,
    width_us: u64,
) -> Vec<Bucket> {
    let count = end_us.saturating_sub(start_us).div_ceil(width_us) as usize;
    let index_of = |t: u64| -> Option<usize> {
        let i = (t.checked_sub(start_us)? / width_us) as usize;
        (i < count).then_some(i)
    };
    let mut latencies: Vec<Vec<u32>> = vec![Vec::new(); count];
    let mut out: Vec<Bucket> = (0..count)
        .map(|i| Bucket {
            t: us_to_unix_seconds(start_us + i as u64 * width_us),
            reads: 0,
            writes: 0,
            errors: 0,
            p50_us: None,
            p99_us: None,
            endpoint: None,
            probes: 0,
        })
        .collect();
    for op in ops {
        let Some(i) = index_of(op.done_us) else {
            continue;
        };
        let bucket = &mut out[i];
        match op.outcome {
            Outcome::Read => bucket.reads += 1,
            Outcome::Write => bucket.writes += 1,
            Outcome::Error => {
                bucket.errors += 1;
                continue;
            }
        }
        bucket.endpoint = Some(op.endpoint);
        latencies[i].push(op.latency_us);
    }
    for probe in probes {
        if let Some(i) = index_of(probe.reply_us) {
            out[i].probes += 1;
        }
    }
    for (bucket, mut lat) in out.iter_mut().zip(latencies) {
        lat.sort_unstable();
        bucket.p50_us = percentile(&lat, 50.0);
        bucket.p99_us = percentile(&lat, 99.0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_that_never_got_an_answer_again_waited_until_the_end() {
        let samples: Vec<ProbeSample> = [1_000, 2_000, 3_000]
            .iter()
            .map(|&reply_us| ProbeSample {
                reply_us,
                endpoint: 0,
            })
            .collect();
        assert_eq!(longest_gap(&samples).unwrap().seconds(), 0.001);
        let gap = longest_gap_until(&samples, 5_003_000).unwrap();
        assert_eq!((gap.seconds(), gap.endpoint_after), (5.0, NO_ENDPOINT));
        assert!(longest_gap_until(&[], 10).is_none());
    }

    fn op(done_us: u64, latency_us: u32, outcome: Outcome) -> OpRecord {
        OpRecord {
            done_us,
            latency_us,
            outcome,
            endpoint: 0,
        }
    }

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&values, 50.0), Some(50));
        assert_eq!(percentile(&values, 99.0), Some(99));
        assert_eq!(percentile(&values, 100.0), Some(100));
        assert_eq!(percentile(&values, 0.0), Some(1));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[], 50.0), None);
        let s = summarize(vec![5, 1, 3]);
        assert_eq!((s.p50, s.max, s.ops), (Some(3), Some(5), 3));
    }

    #[test]
    fn finds_the_longest_gap_and_who_ended_it() {
        let samples: Vec<ProbeSample> =
            [(0, 0), (1_000, 0), (2_000, 0), (350_000, 1), (351_000, 1)]
                .iter()
                .map(|&(reply_us, endpoint)| ProbeSample { reply_us, endpoint })
                .collect();
        let gap = longest_gap(&samples).unwrap();
        assert_eq!(
            (gap.start_us, gap.end_us, gap.endpoint_after),
            (2_000, 350_000, 1)
        );
        assert!((gap.seconds() - 0.348).abs() < 1e-9);
        assert_eq!(longest_gap(&samples[..1]), None);
        assert_eq!(longest_gap(&[]), None);
    }

    #[test]
    fn latency_after_resume_takes_the_window_only() {
        let ops = [
            op(100, 9, Outcome::Read),
            op(200, 1, Outcome::Read),
            op(300, 2, Outcome::Write),
            op(400, 0, Outcome::Error),
            op(1_300, 3, Outcome::Read),
        ];
        let s = latency_after(&ops, 100, 1_000);
        assert_eq!((s.ops, s.max, s.p50), (2, Some(2), Some(1)));
    }

    #[test]
    fn buckets_include_empty_ones_and_split_outcomes() {
        let start = 1_000_000_000;
        let ops = [
            op(start + 10, 100, Outcome::Read),
            op(start + 20, 300, Outcome::Write),
            op(start + 30, 0, Outcome::Error),
            op(start + 250_000, 50, Outcome::Read),
            op(start - 1, 50, Outcome::Read),
        ];
        let probes = [ProbeSample {
            reply_us: start + 5,
            endpoint: 0,
        }];
        let b = buckets(&ops, &probes, start, start + 300_000, 100_000);
        assert_eq!(b.len(), 3);
        assert_eq!(
            (b[0].reads, b[0].writes, b[0].errors, b[0].probes),
            (1, 1, 1, 1)
        );
        assert_eq!((b[0].p50_us, b[0].p99_us), (Some(100), Some(300)));
        assert_eq!(b[0].endpoint, Some(0));
        assert_eq!((b[1].reads, b[1].p50_us, b[1].endpoint), (0, None, None));
        assert_eq!(b[2].reads, 1);
        assert!((b[1].t - 1000.1).abs() < 1e-9);
    }
}
