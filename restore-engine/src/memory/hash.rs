//! Content-hash dirty tracking.

use std::collections::HashMap;

use xxhash_rust::xxh3::xxh3_64;

use super::{
    carry_over, for_each_present_page, lazy_vmas, partition, Delta, DeltaSink, DirtyTracker,
    LazyVma, Quiesce, Slice, TrackError, DELTA_PIECE_BYTES,
};
use crate::page;

/// Content-hash dirty tracking: works everywhere, costs a read of resident memory per round.
///
/// Hashes live in one vector per mapping (indexed by page), so a round costs an array access
/// per page, not a hash-map operation. Mappings may merge, split, grow or move between rounds:
/// each round carries the previous hashes over by address. A hash is stored with its low bit
/// set; 0 means "not present".
#[derive(Default)]
pub struct HashTracker {
    /// The tasks are frozen for the last round: every page must be read.
    frozen: bool,
    tasks: HashMap<u32, Vec<(LazyVma, Vec<u64>)>>,
    /// Threads that read and hash (0 or 1: the calling thread alone).
    threads: usize,
}

/// One thread's share of a round: new hashes of its slices (one vector per slice), and what
/// changed there.
type Share = (Vec<Vec<u64>>, Delta);

/// With a `sink`, the delta is handed on whenever it holds a piece's worth; without one it is
/// returned whole (threads that share a round return theirs).
fn hash_slices(
    pid: u32,
    vmas: &[LazyVma],
    old: &[Vec<u64>],
    slices: &[Slice],
    strict: bool,
    mut sink: Option<&mut DeltaSink>,
) -> Result<Share, TrackError> {
    let mut new: Vec<Vec<u64>> = slices.iter().map(|s| vec![0u64; s.to - s.from]).collect();
    // Streaming, one piece's buffer is reused; a share returned whole grows as it must.
    let mut delta = if sink.is_some() {
        Delta::for_pieces()
    } else {
        Delta::default()
    };
    let mut held = 0usize;
    let mut stopped = false;
    for_each_present_page(pid, vmas, slices, strict, |slice, index, page| {
        if stopped {
            return;
        }
        let s = slices[slice];
        let Some(page) = page else {
            // Not readable now: keep what the destination has (no zero is sent for it), and
            // look again next round.
            new[slice][index - s.from] = old[s.vma][index];
            return;
        };
        let hash = xxh3_64(page) | 1;
        new[slice][index - s.from] = hash;
        if old[s.vma][index] != hash {
            delta.push_page(vmas[s.vma].start + index as u64 * page::SIZE_U64, page);
            held += page::SIZE;
            if held >= DELTA_PIECE_BYTES {
                if let Some(sink) = sink.as_mut() {
                    stopped = sink(&mut delta).is_err();
                    delta.clear();
                    held = 0;
                }
            }
        }
    })?;
    if stopped {
        return Err(TrackError::Stopped);
    }
    Ok((new, delta))
}

impl HashTracker {
    /// Reads and hashes with this many threads (while the tasks are frozen their cores are
    /// free; while they run, one thread keeps pre-copy from taking more than a core from them).
    pub fn with_threads(threads: usize) -> Self {
        HashTracker {
            threads,
            ..Default::default()
        }
    }
}

impl DirtyTracker for HashTracker {
    fn name(&self) -> &'static str {
        "content-hash"
    }

    fn set_threads(&mut self, threads: usize) {
        self.threads = threads;
    }

    fn begin_round(
        &mut self,
        _pids: &[u32],
        _quiesce: &mut dyn Quiesce,
        frozen: bool,
    ) -> Result<(), TrackError> {
        self.frozen = frozen;
        Ok(())
    }

    fn round_into(&mut self, pid: u32, sink: &mut DeltaSink) -> Result<(), TrackError> {
        let previous = self.tasks.remove(&pid).unwrap_or_default();
        let vmas = lazy_vmas(pid)?;
        let old: Vec<Vec<u64>> = vmas.iter().map(|v| carry_over(&previous, *v)).collect();
        drop(previous);
        let groups = partition(&vmas, self.threads.max(1));
        // One thread streams its pieces as it goes. Several threads (the frozen round: only the
        // pages dirtied since the last round) each read a consecutive share and return what
        // changed; shares are in address order, so their deltas follow one another.
        let shares: Vec<Result<Share, TrackError>> = if groups.len() == 1 {
            vec![hash_slices(
                pid,
                &vmas,
                &old,
                &groups[0],
                self.frozen,
                Some(&mut *sink),
            )]
        } else {
            std::thread::scope(|scope| {
                let workers: Vec<_> = groups
                    .iter()
                    .map(|slices| {
                        scope.spawn(|| hash_slices(pid, &vmas, &old, slices, self.frozen, None))
                    })
                    .collect();
                workers
                    .into_iter()
                    .map(|w| w.join().expect("a hashing thread panicked"))
                    .collect()
            })
        };
        let mut new: Vec<Vec<u64>> = old.iter().map(|o| vec![0u64; o.len()]).collect();
        for (slices, share) in groups.iter().zip(shares) {
            let (hashes, mut part) = share?;
            for (slice, hashes) in slices.iter().zip(hashes) {
                new[slice.vma][slice.from..slice.to].copy_from_slice(&hashes);
            }
            if !part.is_empty() {
                sink(&mut part).map_err(|()| TrackError::Stopped)?;
            }
        }
        // Present before, absent now (discarded with MADV_DONTNEED): zero on the destination.
        let mut gone = Delta::default();
        for (v, (o, n)) in vmas.iter().zip(old.iter().zip(&new)) {
            for (index, (before, now)) in o.iter().zip(n).enumerate() {
                if *before != 0 && *now == 0 {
                    gone.zero.push(v.start + index as u64 * page::SIZE_U64);
                }
            }
        }
        self.tasks.insert(pid, vmas.into_iter().zip(new).collect());
        if !gone.is_empty() {
            sink(&mut gone).map_err(|()| TrackError::Stopped)?;
        }
        Ok(())
    }
}
