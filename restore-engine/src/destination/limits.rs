//! What a source may make the receiving host store. The source is authenticated, but it may
//! still be broken or hostile: without limits it could fill the receiving host's memory (the
//! staging store) and its /run (the image files), and an LZ4 run can expand about 255:1. The
//! receive loop asks a [`Budget`] before it decompresses or stores anything; exceeding a limit
//! ends the migration with `ReceiveError::Limit` (the source is told to resume, the staging
//! store is dropped and the received images are removed with the container).

use std::collections::HashMap;

use crate::page;
use crate::staging::StagingStore;
use crate::wire::pages::BATCH_BYTES;
use crate::wire::Pages;

/// A limit the source exceeded: what, the limit, and what to do (the receive turns it into
/// [`super::receive::ReceiveError::Limit`]).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct LimitExceeded(pub String);

/// The most page data one `Pages` frame carries: a pclive source never builds a frame over its
/// batch size ([`BATCH_BYTES`], see `source::rounds`).
pub const MAX_FRAME_PAGE_BYTES: u64 = BATCH_BYTES as u64;

const MIB: u64 = 1 << 20;

/// What receiving frames holds besides the store: the frame as read, its decoded copy, and
/// what the allocator keeps of the previous ones (the memory limit covers them too).
pub const FRAME_BYTES_IN_FLIGHT: u64 = 3 * crate::wire::MAX_PAYLOAD as u64;

/// What the receiving end of one migration may be made to store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes the receive may hold in memory: the staging store (page data, plus its index and
    /// slab table, see [`StagingStore::footprint`]) and the frame being received
    /// ([`FRAME_BYTES_IN_FLIGHT`]). The shim sets the receiving container's memory limit plus
    /// a margin (or, without one, the host's available memory): the container could not use
    /// more anyway.
    pub memory_bytes: u64,
    /// Distinct image files the final dump may bring (a CRIU image set has a few per task).
    pub image_files: usize,
    /// Bytes of image files on disk, all files together (the pages travel in the staging store;
    /// the rest of a CRIU image set is small).
    pub image_bytes: u64,
}

impl Limits {
    /// No limits: for tests and local use only, never for a receiver a network can reach.
    pub fn unlimited() -> Self {
        Limits {
            memory_bytes: u64::MAX,
            image_files: usize::MAX,
            image_bytes: u64::MAX,
        }
    }
}

fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(MIB)
}

/// The limits of one migration as its receive goes on: what the image files take so far.
#[derive(Debug)]
pub struct Budget {
    limits: Limits,
    /// Each received image file's size so far (its highest written end).
    files: HashMap<String, u64>,
    image_bytes: u64,
}

impl Budget {
    pub fn new(limits: &Limits) -> Self {
        Budget {
            limits: *limits,
            files: HashMap::new(),
            image_bytes: 0,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Before a `Pages` frame is decoded: every run's declared size (raw, or what its LZ4 block
    /// claims to decompress to) and the frame's sum must be within one sender batch, and the
    /// staging store with all of it must stay within [`Limits::memory_bytes`]. Nothing has been
    /// allocated for the frame's pages yet.
    pub fn check_pages(&self, pages: &Pages, store: &StagingStore) -> Result<(), LimitExceeded> {
        let mut frame = 0u64;
        for run in &pages.runs {
            let declared = run.declared_len();
            if declared > MAX_FRAME_PAGE_BYTES {
                return Err(LimitExceeded(format!(
                    "a page run of task {} at {:#x} declares {declared} bytes, over the \
                     {MAX_FRAME_PAGE_BYTES}-byte maximum of a frame a pclive source sends: \
                     the source is corrupt or hostile; check it (and that both hosts run the \
                     same pclive)",
                    pages.pid, run.vaddr
                )));
            }
            frame += declared;
        }
        if frame > MAX_FRAME_PAGE_BYTES {
            return Err(LimitExceeded(format!(
                "a page frame of task {} declares {frame} bytes of pages in {} runs, over the \
                 {MAX_FRAME_PAGE_BYTES}-byte maximum of a frame a pclive source sends: the \
                 source is corrupt or hostile; check it (and that both hosts run the same \
                 pclive)",
                pages.pid,
                pages.runs.len()
            )));
        }
        let data_pages = frame.div_ceil(page::SIZE_U64) as usize;
        let runs = pages.runs.iter().map(|run| {
            (
                run.vaddr,
                run.declared_len().div_ceil(page::SIZE_U64) as usize,
            )
        });
        let zeros = pages.zero_pages.iter().map(|&addr| (addr, 1));
        let need = store.footprint_after(pages.pid, data_pages, runs.chain(zeros));
        self.memory(need)
    }

    /// After a frame was staged: the store's actual footprint within the limit.
    pub fn check_staged(&self, store: &StagingStore) -> Result<(), LimitExceeded> {
        self.memory(store.footprint())
    }

    fn memory(&self, store: u64) -> Result<(), LimitExceeded> {
        let need = store.saturating_add(FRAME_BYTES_IN_FLIGHT);
        if need <= self.limits.memory_bytes {
            return Ok(());
        }
        Err(LimitExceeded(format!(
            "the source sent more memory than the receiving container may use: staging it \
             would take {} MiB, over the limit of {} MiB (the container's memory limit + {} \
             MiB margin, or the host's available memory if it has none); raise the \
             container's memory limit or check the source",
            mib(need),
            self.limits.memory_bytes / MIB,
            MEMORY_MARGIN_MIB
        )))
    }

    /// Before `len` bytes are written at `offset` of image file `name` (a write at offset 0
    /// truncates the file first, as the receiver does): within the number of files, without a
    /// hole after the file's end (a source writes each file in order), within the bytes of all
    /// files together. Counts the write.
    pub fn image_write(&mut self, name: &str, offset: u64, len: u64) -> Result<(), LimitExceeded> {
        let end = self.files.get(name).copied();
        if end.is_none() && self.files.len() >= self.limits.image_files {
            return Err(LimitExceeded(format!(
                "the source sent more than {} image files (--max-image-files), far more than \
                 the CRIU image set of a container has: check the source, or raise the limit \
                 if the container really has that many tasks and files",
                self.limits.image_files
            )));
        }
        let size = end.unwrap_or(0);
        let base = if offset == 0 { 0 } else { size };
        if offset > base {
            return Err(LimitExceeded(format!(
                "image file {name}: a write at offset {offset} would leave a hole after its \
                 {size} bytes (a pclive source writes each file in order): the source is \
                 corrupt or hostile; check it"
            )));
        }
        let new_size = offset
            .checked_add(len)
            .ok_or_else(|| {
                LimitExceeded(format!("image file {name}: offset {offset} + {len} bytes"))
            })?
            .max(base);
        let total = self.image_bytes - size + new_size;
        if total > self.limits.image_bytes {
            return Err(LimitExceeded(format!(
                "the source sent more than {} MiB of image files (the limit of the receiving \
                 container: its memory limit + {MEMORY_MARGIN_MIB} MiB margin): raise the \
                 container's memory limit or check the source",
                self.limits.image_bytes / MIB
            )));
        }
        self.files.insert(name.to_string(), new_size);
        self.image_bytes = total;
        Ok(())
    }
}

/// The margin over the receiving container's memory limit that the shim grants the staging
/// store (index, partly used slabs); named in the limit errors.
pub const MEMORY_MARGIN_MIB: u64 = 64;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::PageRun;
    use proptest::prelude::*;

    fn limits(memory_mib: u64, files: usize, image_mib: u64) -> Limits {
        Limits {
            memory_bytes: memory_mib * MIB,
            image_files: files,
            image_bytes: image_mib * MIB,
        }
    }

    fn run(vaddr: u64, raw: usize, lz4_len: u32) -> PageRun {
        PageRun {
            vaddr,
            lz4_len,
            len: if lz4_len > 0 { 16 } else { raw as u32 },
        }
    }

    fn pages(runs: Vec<PageRun>, zero_pages: Vec<u64>) -> Pages {
        Pages {
            pid: 1,
            round: 1,
            runs,
            zero_pages,
        }
    }

    fn is_limit(r: Result<(), LimitExceeded>, what: &str) {
        match r {
            Err(LimitExceeded(m)) => assert!(m.contains(what), "{m}"),
            other => panic!("expected a limit about {what}, got {other:?}"),
        }
    }

    #[test]
    fn frames_that_claim_more_than_a_batch_are_refused_before_decoding() {
        let budget = Budget::new(&Limits::unlimited());
        let store = StagingStore::default();
        // One run claiming 4 GiB; many runs each within the batch but over it together (the
        // LZ4 bomb: tiny blocks, each claiming 8 MiB).
        is_limit(
            budget.check_pages(&pages(vec![run(0, 0, u32::MAX)], vec![]), &store),
            "declares 4294967295 bytes",
        );
        let bomb = (0..300)
            .map(|i| run(i * BATCH_BYTES as u64, 0, BATCH_BYTES as u32))
            .collect();
        is_limit(
            budget.check_pages(&pages(bomb, vec![]), &store),
            "in 300 runs",
        );
        // A full batch, raw or compressed, is fine.
        let ok = vec![
            run(0, BATCH_BYTES / 2, 0),
            run(1 << 30, 0, (BATCH_BYTES / 2) as u32),
        ];
        budget.check_pages(&pages(ok, vec![]), &store).unwrap();
    }

    #[test]
    fn the_staging_footprint_is_limited() {
        let budget = Budget::new(&limits(64, 10, 10));
        let mut store = StagingStore::default();
        let batch = vec![1u8; BATCH_BYTES];
        let mut staged = 0;
        loop {
            let frame = pages(vec![run(staged, BATCH_BYTES, 0)], vec![]);
            match budget.check_pages(&frame, &store) {
                Ok(()) => {
                    store.put(1, staged, &batch).unwrap();
                    budget.check_staged(&store).unwrap();
                    staged += BATCH_BYTES as u64;
                }
                Err(e) => {
                    assert!(e.to_string().contains("limit of 64 MiB"), "{e}");
                    break;
                }
            }
        }
        assert!((32 << 20..=64 << 20).contains(&staged), "{staged}");
        assert!(store.footprint() <= 64 << 20);
        // Zero pages cost index room: millions of them are refused too.
        let zeros = (0..4_000_000u64).map(|i| (i + (1 << 20)) << 12).collect();
        is_limit(
            budget.check_pages(&pages(vec![], zeros), &store),
            "more memory than the receiving container may use",
        );
    }

    #[test]
    fn image_files_are_limited_in_number_size_and_offsets() {
        let mut budget = Budget::new(&limits(64, 3, 2));
        budget.image_write("a.img", 0, 1 << 20).unwrap();
        budget.image_write("a.img", 1 << 20, 100).unwrap();
        // Written again from the start: the file is truncated, its old size no longer counts.
        budget.image_write("a.img", 0, 10).unwrap();
        budget.image_write("b.img", 0, 0).unwrap();
        budget.image_write("c.img", 0, 1 << 20).unwrap();
        is_limit(budget.image_write("d.img", 0, 1), "more than 3 image files");
        is_limit(budget.image_write("b.img", 1 << 40, 1), "hole");
        is_limit(budget.image_write("b.img", 1, 1), "hole");
        is_limit(budget.image_write("c.img", 1 << 20, 1 << 20), "2 MiB");
        is_limit(budget.image_write("c.img", u64::MAX, 1), "hole");
        budget
            .image_write("c.img", 1 << 20, (1 << 20) - 10)
            .unwrap();
    }

    proptest! {
        #[test]
        fn the_budget_never_panics_and_bounds_what_it_lets_through(
            runs in proptest::collection::vec((0usize..(3 * page::SIZE), any::<u32>(), any::<bool>()), 0..20),
            writes in proptest::collection::vec((0u8..6, any::<u64>(), 0u64..(1 << 22)), 0..30),
        ) {
            let budget = Budget::new(&limits(16, 4, 4));
            let store = StagingStore::default();
            let runs: Vec<PageRun> = runs
                .into_iter()
                .map(|(raw, lz4_len, compressed)| if compressed { run(0, 0, lz4_len) } else { run(0, raw, 0) })
                .collect();
            let declared: u64 = runs.iter().map(|r| r.declared_len()).sum();
            if budget.check_pages(&pages(runs, vec![]), &store).is_ok() {
                prop_assert!(declared <= MAX_FRAME_PAGE_BYTES);
            }
            let mut budget = budget;
            for (name, offset, len) in writes {
                let offset = offset % (8 << 20);
                let _ = budget.image_write(&format!("{name}.img"), offset, len);
                prop_assert!(budget.files.len() <= 4);
                prop_assert!(budget.image_bytes <= 4 * MIB);
                prop_assert_eq!(budget.image_bytes, budget.files.values().sum::<u64>());
            }
        }
    }
}
