//! The trackers, on this test process's own memory.

use super::carry_over;
use super::*;

#[test]
fn smaps_parsing_keeps_private_anonymous_unlocked_mappings() {
    let smaps = "\
55d0c0000000-55d0c0021000 rw-p 00000000 00:00 0                          [heap]
VmFlags: rd wr mr mw me ac
7f0000000000-7f0000100000 rw-p 00000000 00:00 0 
VmFlags: rd wr mr mw me ac
7f0000100000-7f0000200000 rw-p 00000000 00:00 0 
VmFlags: rd wr mr mw me lo ac
7f0000200000-7f0000300000 rw-s 00000000 00:01 1234                       /dev/zero (deleted)
VmFlags: rd wr sh mr mw me ms
7f0000300000-7f0000301000 r--p 00000000 08:01 99                         /usr/lib/libc.so.6
VmFlags: rd mr mw me
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]
VmFlags: rd wr mr mw me gd ac
7ffc00100000-7ffc00102000 r-xp 00000000 00:00 0                          [vdso]
VmFlags: rd ex mr mw me de
";
    let vmas = parse_lazy_vmas(smaps);
    assert_eq!(
        vmas.iter().map(|v| v.start).collect::<Vec<_>>(),
        vec![0x55d0c0000000, 0x7f0000000000, 0x7ffc00000000]
    );
}

#[test]
fn hashes_carry_over_when_mappings_merge_split_or_grow() {
    let vma = |start: u64, pages: u64| LazyVma {
        start,
        end: start + pages * page::SIZE_U64,
    };
    let previous = vec![
        (vma(0x10000, 2), vec![11, 12]),
        (vma(0x12000, 2), vec![21, 22]),
        (vma(0x20000, 1), vec![31]),
    ];
    // Merged into one mapping that also grew by a page.
    assert_eq!(
        carry_over(&previous, vma(0x10000, 5)),
        vec![11, 12, 21, 22, 0]
    );
    // Split: the second half of the first mapping alone.
    assert_eq!(carry_over(&previous, vma(0x11000, 1)), vec![12]);
    // A new mapping elsewhere starts empty.
    assert_eq!(carry_over(&previous, vma(0x40000, 2)), vec![0, 0]);
}

/// A page-aligned anonymous mapping of our own, as a tracked task's memory.
struct Region {
    ptr: *mut u8,
    len: usize,
}

impl Region {
    fn new(pages: usize) -> Self {
        let len = pages * page::SIZE;
        // SAFETY: a fresh private anonymous mapping. (Not testsupport's helper: testsupport
        // imports the source module, which imports this one.)
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        Region {
            ptr: ptr.cast(),
            len,
        }
    }
    fn addr(&self, page: usize) -> u64 {
        self.ptr as u64 + page as u64 * page::SIZE_U64
    }
    fn write(&self, page: usize, value: u8) {
        // SAFETY: within our mapping.
        unsafe { std::ptr::write_bytes(self.ptr.add(page * page::SIZE), value, page::SIZE) };
    }
    fn in_region(&self, addr: u64) -> bool {
        addr >= self.ptr as u64 && addr < self.ptr as u64 + self.len as u64
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmaps our own mapping.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn ours(delta: &Delta, region: &Region) -> (Vec<u64>, Vec<u64>) {
    let mut data = Vec::new();
    for (start, bytes) in delta.runs() {
        for k in 0..bytes.len() as u64 / page::SIZE_U64 {
            let addr = start + k * page::SIZE_U64;
            if region.in_region(addr) {
                data.push(addr);
            }
        }
    }
    let zero = delta
        .zero
        .iter()
        .copied()
        .filter(|a| region.in_region(*a))
        .collect();
    (data, zero)
}

fn exercise(tracker: &mut dyn DirtyTracker) {
    let region = Region::new(64);
    for page in 0..64 {
        region.write(page, page as u8 + 1);
    }
    let me = std::process::id();
    let (first, _) = ours(&tracker.round(me).unwrap(), &region);
    assert_eq!(first.len(), 64, "the first round sends every present page");

    region.write(3, 0xaa);
    region.write(10, 0xbb);
    region.write(20, 0);
    // SAFETY: discards one page of our own mapping.
    unsafe {
        libc::madvise(
            region.ptr.add(30 * page::SIZE).cast(),
            page::SIZE,
            libc::MADV_DONTNEED,
        )
    };
    let delta = tracker.round(me).unwrap();
    let (data, zero) = ours(&delta, &region);
    assert_eq!(
        data,
        vec![region.addr(3), region.addr(10)],
        "{}",
        tracker.name()
    );
    assert!(
        zero.contains(&region.addr(20)),
        "a zeroed page is a zero marker"
    );
    assert!(
        zero.contains(&region.addr(30)),
        "a discarded page is a zero marker"
    );
    let content = delta
        .runs()
        .find(|(start, _)| *start == region.addr(3))
        .map(|(_, bytes)| bytes[0]);
    assert_eq!(content, Some(0xaa));

    let (quiet, _) = ours(&tracker.round(me).unwrap(), &region);
    assert!(quiet.is_empty(), "nothing changed: {quiet:x?}");
}

#[test]
fn hash_tracker_reports_exactly_the_changed_pages_of_our_own_process() {
    exercise(&mut HashTracker::default());
}

#[test]
fn a_round_streams_in_bounded_pieces_and_its_consumer_can_stop_it() {
    // 40 MiB of our own memory, every page present and non-zero.
    let region = std::hint::black_box(vec![0x5au8; 40 << 20]);
    let me = std::process::id();
    let mut tracker = HashTracker::default();
    let mut pieces = Vec::new();
    tracker
        .round_into(me, &mut |piece: &mut Delta| {
            pieces.push(piece.data_pages() * page::SIZE_U64);
            Ok(())
        })
        .unwrap();
    assert!(pieces.len() >= 3, "{pieces:?}");
    assert!(
        pieces.iter().all(|&b| b as usize <= DELTA_PIECE_BYTES),
        "no piece holds more than DELTA_PIECE_BYTES: {pieces:?}"
    );
    assert!(pieces.iter().sum::<u64>() >= region.len() as u64);
    let mut calls = 0;
    let stopped = HashTracker::default().round_into(me, &mut |_| {
        calls += 1;
        Err(())
    });
    assert!(matches!(stopped, Err(TrackError::Stopped)), "{stopped:?}");
    assert_eq!(calls, 1, "nothing is read after the consumer gave up");
    drop(region);
}

#[test]
fn hash_tracker_with_threads_reports_the_same() {
    // Shares split mappings in the middle (our heap and the test region included).
    exercise(&mut HashTracker::with_threads(3));
}

#[test]
fn partition_cuts_mappings_into_equal_ordered_shares() {
    let vma = |start: u64, pages: u64| LazyVma {
        start: start * page::SIZE_U64,
        end: (start + pages) * page::SIZE_U64,
    };
    let vmas = [vma(0, 10), vma(100, 1), vma(200, 5)];
    let groups = partition(&vmas, 2);
    assert_eq!(
        groups,
        [
            vec![Slice {
                vma: 0,
                from: 0,
                to: 8
            }],
            vec![
                Slice {
                    vma: 0,
                    from: 8,
                    to: 10
                },
                Slice {
                    vma: 1,
                    from: 0,
                    to: 1
                },
                Slice {
                    vma: 2,
                    from: 0,
                    to: 5
                },
            ],
        ]
    );
    // Every page exactly once, whatever the number of parts.
    for parts in 1..20 {
        let groups = partition(&vmas, parts);
        assert!(groups.len() <= parts, "{parts}: {groups:?}");
        let covered: usize = groups.iter().flatten().map(|s| s.to - s.from).sum();
        assert_eq!(covered, 16);
        let flat: Vec<_> = groups.into_iter().flatten().collect();
        for pair in flat.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            assert!(
                a.vma < b.vma || (a.vma == b.vma && a.to == b.from),
                "{a:?} {b:?}"
            );
        }
    }
    assert_eq!(partition(&[], 4), [Vec::<Slice>::new()]);
}

#[test]
fn soft_dirty_tracker_reports_exactly_the_changed_pages_where_the_kernel_has_it() {
    match SoftDirtyTracker::new() {
        Ok(mut tracker) => exercise(&mut tracker),
        Err(e) => eprintln!(
            "SKIPPED soft_dirty_tracker test: {e} (this kernel lacks CONFIG_MEM_SOFT_DIRTY)"
        ),
    }
}

// ---- Soft-dirty through a seam that replays the kernel (this machine has no soft-dirty). ----

mod soft_dirty_seam {
    use super::super::*;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    const PAGES: usize = 6;
    const BASE: u64 = 0x7f00_0000_0000;
    const PM_PRESENT: u64 = 1 << 63;

    #[derive(Clone, Copy, Debug)]
    enum Op {
        Write(usize, u8),
        Discard(usize),
    }

    /// One task's memory as the kernel would keep it, with soft-dirty marks, a freezer, and
    /// writes the test schedules at exact points of the tracker's work.
    struct Sim {
        pages: Vec<u8>,
        present: Vec<bool>,
        soft_dirty: Vec<bool>,
        frozen: bool,
        deferred: Vec<Op>,
        schedule: Vec<(usize, Op)>,
        calls: usize,
    }

    impl Sim {
        fn new() -> Self {
            Sim {
                pages: (0..PAGES).map(|p| p as u8 + 1).collect(),
                present: vec![true; PAGES],
                soft_dirty: vec![true; PAGES],
                frozen: false,
                deferred: Vec::new(),
                schedule: Vec::new(),
                calls: 0,
            }
        }

        fn apply(&mut self, op: Op) {
            if self.frozen {
                self.deferred.push(op);
                return;
            }
            match op {
                Op::Write(p, v) => {
                    self.pages[p] = v;
                    self.present[p] = true;
                    self.soft_dirty[p] = true;
                }
                // MADV_DONTNEED: the page and its mark are gone.
                Op::Discard(p) => {
                    self.pages[p] = 0;
                    self.present[p] = false;
                    self.soft_dirty[p] = false;
                }
            }
        }

        /// Every call of the tracker into the kernel or the freezer is a point where the task
        /// may write (if it is not frozen).
        fn tick(&mut self) {
            let now = self.calls;
            self.calls += 1;
            let due: Vec<Op> = self
                .schedule
                .iter()
                .filter(|(at, _)| *at == now)
                .map(|(_, op)| *op)
                .collect();
            for op in due {
                self.apply(op);
            }
        }
    }

    struct Kernel(Arc<Mutex<Sim>>);

    impl SoftDirtyKernel for Kernel {
        fn vmas(&mut self, _pid: u32) -> Result<Vec<LazyVma>, TrackError> {
            self.0.lock().unwrap().tick();
            Ok(vec![LazyVma {
                start: BASE,
                end: BASE + PAGES as u64 * page::SIZE_U64,
            }])
        }
        fn pagemap(&mut self, _pid: u32, start: u64, end: u64) -> Result<Vec<u64>, TrackError> {
            let mut sim = self.0.lock().unwrap();
            sim.tick();
            let from = ((start - BASE) / page::SIZE_U64) as usize;
            let to = ((end - BASE) / page::SIZE_U64) as usize;
            Ok((from..to)
                .map(|p| {
                    (if sim.present[p] { PM_PRESENT } else { 0 })
                        | (if sim.soft_dirty[p] { PM_SOFT_DIRTY } else { 0 })
                })
                .collect())
        }
        fn clear(&mut self, _pid: u32) -> Result<(), TrackError> {
            let mut sim = self.0.lock().unwrap();
            sim.tick();
            sim.soft_dirty.iter_mut().for_each(|d| *d = false);
            Ok(())
        }
        fn read(&mut self, _pid: u32, addr: u64, page: &mut [u8]) -> Result<(), TrackError> {
            let mut sim = self.0.lock().unwrap();
            sim.tick();
            let p = ((addr - BASE) / page::SIZE_U64) as usize;
            // An absent anonymous page reads as zeroes.
            page.fill(if sim.present[p] { sim.pages[p] } else { 0 });
            Ok(())
        }
    }

    struct Freezer(Arc<Mutex<Sim>>);

    impl Quiesce for Freezer {
        fn freeze(&mut self) -> Result<(), TrackError> {
            let mut sim = self.0.lock().unwrap();
            sim.tick();
            sim.frozen = true;
            Ok(())
        }
        fn thaw(&mut self) -> Result<(), TrackError> {
            let mut sim = self.0.lock().unwrap();
            sim.frozen = false;
            for op in std::mem::take(&mut sim.deferred) {
                sim.apply(op);
            }
            sim.tick();
            Ok(())
        }
    }

    /// The destination's view: pages as received.
    fn apply(dst: &mut HashMap<u64, u8>, delta: &Delta) {
        for (start, data) in delta.runs() {
            for (i, page) in data.chunks_exact(page::SIZE).enumerate() {
                dst.insert(start + (i * page::SIZE) as u64, page[0]);
            }
        }
        for &addr in &delta.zero {
            dst.insert(addr, 0);
        }
    }

    /// Pre-copy rounds over the simulated task with `op` at tracker call `at` of round 2, then
    /// the frozen round; returns (what the destination has, the memory at the freeze).
    fn migrate(at: usize, op: Op) -> (HashMap<u64, u8>, Vec<u8>) {
        let sim = Arc::new(Mutex::new(Sim::new()));
        let mut tracker = SoftDirtyTracker::with_kernel(Kernel(Arc::clone(&sim)));
        let mut freezer = Freezer(Arc::clone(&sim));
        let mut dst = HashMap::new();
        let mut round = |tracker: &mut SoftDirtyTracker<Kernel>, frozen: bool| {
            tracker.begin_round(&[1], &mut freezer, frozen).unwrap();
            tracker
                .round_into(1, &mut |delta: &mut Delta| {
                    apply(&mut dst, delta);
                    Ok(())
                })
                .unwrap();
        };
        round(&mut tracker, false);
        {
            let mut s = sim.lock().unwrap();
            let base = s.calls;
            s.schedule = vec![(base + at, op)];
        }
        round(&mut tracker, false);
        // The migration freezes the task for the last round.
        sim.lock().unwrap().frozen = true;
        round(&mut tracker, true);
        let s = sim.lock().unwrap();
        let memory = (0..PAGES)
            .map(|p| if s.present[p] { s.pages[p] } else { 0 })
            .collect();
        (dst, memory)
    }

    #[test]
    fn a_write_or_a_discard_at_any_step_of_a_round_reaches_the_destination() {
        // Round 2 makes at most a dozen calls; schedule the event at each of them.
        let mut cases = 0;
        for at in 0..14 {
            for page in 0..PAGES {
                for op in [Op::Write(page, 0xA0 + page as u8), Op::Discard(page)] {
                    let (dst, memory) = migrate(at, op);
                    for (p, want) in memory.iter().enumerate() {
                        let addr = BASE + p as u64 * page::SIZE_U64;
                        let got = dst.get(&addr).copied().unwrap_or(0);
                        assert_eq!(
                            got, *want,
                            "{op:?} at call {at}: page {p} is {got:#x} on the destination, {want:#x} at the freeze"
                        );
                    }
                    cases += 1;
                }
            }
        }
        assert_eq!(cases, 14 * PAGES * 2);
    }

    /// The order the old tracker used (read the marks and the pages of a running task, then
    /// clear) loses a write between the read and the clear: the seam sees it.
    #[test]
    fn reading_then_clearing_without_a_freeze_would_lose_writes() {
        let sim = Arc::new(Mutex::new(Sim::new()));
        let mut kernel = Kernel(Arc::clone(&sim));
        // Round 1 as the old tracker did it: marks, contents, clear.
        let entries = kernel
            .pagemap(1, BASE, BASE + PAGES as u64 * page::SIZE_U64)
            .unwrap();
        assert!(entries.iter().all(|e| e & PM_SOFT_DIRTY != 0));
        // The task writes page 2 between the read and the clear...
        sim.lock().unwrap().apply(Op::Write(2, 0xEE));
        kernel.clear(1).unwrap();
        // ...and the next round cannot see it.
        let entries = kernel
            .pagemap(1, BASE, BASE + PAGES as u64 * page::SIZE_U64)
            .unwrap();
        assert_eq!(
            entries[2] & PM_SOFT_DIRTY,
            0,
            "the write's mark was cleared unseen"
        );
    }
}

/// A task that exits while a round reads it: the kernel answers reads of its pagemap with end
/// of file (not an error number). That is a task gone, to be skipped, not a failed migration.
#[test]
fn reading_a_task_that_exited_counts_as_vanished() {
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("start sleep");
    let pid = child.id();
    let vma = lazy_vmas(pid).expect("smaps of a live task")[0];
    let pagemap = open_pagemap(pid).expect("pagemap of a live task");
    child.kill().unwrap();
    child.wait().unwrap();
    let err = pagemap_entries(pid, &pagemap, vma.start, vma.end).expect_err("it exited");
    assert!(err.task_vanished(), "{err}");
}

#[test]
fn a_run_read_in_place_equals_one_copied_page_by_page() {
    let region = Region::new(8);
    for (page, value) in [1u8, 0, 0, 4, 5, 0, 7, 8].into_iter().enumerate() {
        region.write(page, value);
    }
    let me = std::process::id();
    let mut in_place = Delta::for_pieces();
    in_place
        .read_run(me, region.addr(0), 8 * page::SIZE)
        .unwrap();
    let mut copied = Delta::for_pieces();
    let mut page = vec![0u8; page::SIZE];
    for i in 0..8 {
        super::read_remote(me, region.addr(i), &mut page).unwrap();
        copied.push_page(region.addr(i), &page);
    }
    assert_eq!(in_place, copied);
    assert_eq!(
        in_place.zero,
        vec![region.addr(1), region.addr(2), region.addr(5)]
    );
    // A read that fails appends nothing.
    let before = in_place.clone();
    assert!(in_place.read_run(me, 8, page::SIZE).is_err());
    assert_eq!(in_place, before);
}
