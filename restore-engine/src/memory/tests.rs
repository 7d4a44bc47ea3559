//! The trackers, on this test process's own memory.

use super::hash::carry_over;
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
        // SAFETY: a fresh private anonymous mapping.
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
    for (start, bytes) in &delta.runs {
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
        .runs
        .iter()
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
        .round_into(me, &mut |piece: Delta| {
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
