//! memcheck: a workload whose memory proves a checkpoint/restore or migration was exact.
//!
//! It fills a region of private anonymous memory with pages whose content is a pure function of
//! (page index, generation), keeps rewriting random pages with a new generation, and verifies every
//! page in a loop. After each full verification pass it atomically rewrites a status file:
//!
//! ```text
//! pass=12 pages=65536 writes=4312 errors=0 counter=1234
//! ```
//!
//! A zero-filled, stale or torn page fails the check: memcheck then writes `CORRUPT ...` to the status
//! file and exits with code 3, so a restore that lost memory cannot go unnoticed.
//!
//! Usage: `memcheck <MiB> [--status PATH] [--writes-per-tick N] [--tick-ms MS] [--fork-every N] [--churn]`
//!
//! `--fork-every N` forks a short-lived child every N ticks (the child checks one page and
//! exits), so that a restore sees new address spaces appear while it installs memory.
//!
//! `--prot-none MIB` fills a separate mapping of that size and makes one page in eight PROT_NONE
//! (single pages, so the mapping splits into many; the pattern of CRIU's zdtm test maps04);
//! each pass makes them readable for a moment and verifies them. A migration must carry pages
//! the process itself cannot read.
//!
//! `--churn` keeps a second region cycling through mmap → fill → mremap (move and grow) →
//! MADV_DONTNEED of half → munmap, verifying it at each step, so that a restore or migration sees
//! mappings move, shrink and vanish.

use std::env;
use std::fs;
use std::io::Write;
use std::process::exit;
use std::thread::sleep;
use std::time::Duration;

const PAGE_WORDS: usize = 4096 / 8;

fn mix(mut z: u64) -> u64 {
    // splitmix64 finalizer: cheap, and never maps a page to all zeroes in practice.
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn expected_word(page: usize, generation: u32, word: usize) -> u64 {
    mix(((page as u64) << 24) ^ ((generation as u64) << 52) ^ word as u64) | 1
}

fn fill_page(memory: &mut [u64], page: usize, generation: u32) {
    let words = &mut memory[page * PAGE_WORDS..(page + 1) * PAGE_WORDS];
    for (i, w) in words.iter_mut().enumerate() {
        *w = expected_word(page, generation, i);
    }
}

fn page_is_intact(memory: &[u64], page: usize, generation: u32) -> bool {
    memory[page * PAGE_WORDS..(page + 1) * PAGE_WORDS]
        .iter()
        .enumerate()
        .all(|(i, &w)| w == expected_word(page, generation, i))
}

fn write_status(path: &str, line: &str) {
    let tmp = format!("{path}.tmp");
    let written = fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(line.as_bytes()))
        .and_then(|_| fs::rename(&tmp, path));
    if let Err(e) = written {
        eprintln!("memcheck: cannot write status {path}: {e}");
    }
}

const CHURN_BYTES: usize = 8 << 20;

/// A region that is mapped, moved, partly discarded and unmapped in a cycle.
struct Churn {
    id: usize,
    region: Option<(*mut u64, usize)>,
    phase: u8,
    generation: u32,
}

impl Churn {
    fn words(&self) -> &[u64] {
        let (ptr, len) = self.region.expect("mapped");
        // SAFETY: ptr/len describe a live private mapping that only this struct uses.
        unsafe { std::slice::from_raw_parts(ptr, len / 8) }
    }

    fn words_mut(&mut self) -> &mut [u64] {
        let (ptr, len) = self.region.expect("mapped");
        // SAFETY: as above, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(ptr, len / 8) }
    }

    fn fill(&mut self, from_page: usize, to_page: usize) {
        let (id, generation) = (self.id, self.generation);
        let words = self.words_mut();
        for page in from_page..to_page {
            for i in 0..PAGE_WORDS {
                words[page * PAGE_WORDS + i] =
                    expected_word(1 << 20 | id << 16 | page, generation, i);
            }
        }
    }

    fn check(&self, from_page: usize, to_page: usize, zero: bool) -> Result<(), String> {
        let words = self.words();
        for page in from_page..to_page {
            for i in 0..PAGE_WORDS {
                let want = if zero {
                    0
                } else {
                    expected_word(1 << 20 | self.id << 16 | page, self.generation, i)
                };
                if words[page * PAGE_WORDS + i] != want {
                    return Err(format!(
                        "region={} page={page} phase={} zero={zero}",
                        self.id, self.phase
                    ));
                }
            }
        }
        Ok(())
    }

    /// One step of the cycle.
    fn step(&mut self) -> Result<(), String> {
        let pages = |bytes: usize| bytes / 4096;
        match self.phase {
            0 => {
                // SAFETY: a fresh anonymous private mapping; no existing memory is affected.
                let ptr = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        CHURN_BYTES,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                if ptr == libc::MAP_FAILED {
                    return Err("mmap failed".into());
                }
                self.generation = self.generation.wrapping_add(1);
                self.region = Some((ptr.cast(), CHURN_BYTES));
                self.fill(0, pages(CHURN_BYTES));
            }
            1 => {
                // Move first, check after: pages not yet restored move with the mapping.
                let (ptr, len) = self.region.expect("mapped");
                // Reserve a new place so the mapping really moves (growing in place would not).
                // SAFETY: a fresh inaccessible reservation; nothing else is affected.
                let target = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        2 * len,
                        libc::PROT_NONE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                if target == libc::MAP_FAILED {
                    return Err("mmap of the remap target failed".into());
                }
                // SAFETY: moves and grows our own mapping over our own reservation; the old
                // address is not used again.
                let moved = unsafe {
                    libc::mremap(
                        ptr.cast(),
                        len,
                        2 * len,
                        libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                        target,
                    )
                };
                if moved == libc::MAP_FAILED {
                    return Err("mremap failed".into());
                }
                self.region = Some((moved.cast(), 2 * len));
                self.check(0, pages(CHURN_BYTES), false)?;
                self.fill(pages(CHURN_BYTES), pages(2 * CHURN_BYTES));
            }
            2 => {
                // Discard before looking: the discarded half must read as zero, never as data.
                let (ptr, _) = self.region.expect("mapped");
                // SAFETY: discards the second half of our own mapping.
                unsafe {
                    libc::madvise(
                        ptr.cast::<u8>().add(CHURN_BYTES).cast(),
                        CHURN_BYTES,
                        libc::MADV_DONTNEED,
                    )
                };
                self.check(0, pages(CHURN_BYTES), false)?;
                self.check(pages(CHURN_BYTES), pages(2 * CHURN_BYTES), true)?;
            }
            _ => {
                // Unmap without touching: whatever was not restored yet simply goes.
                let (ptr, len) = self.region.take().expect("mapped");
                // SAFETY: unmaps our own mapping, which nothing references any more.
                unsafe { libc::munmap(ptr.cast(), len) };
            }
        }
        self.phase = (self.phase + 1) % 4;
        Ok(())
    }
}

/// A mapping with scattered PROT_NONE pages.
struct ProtNone {
    ptr: *mut u64,
    pages: usize,
    protected: Vec<bool>,
}

impl ProtNone {
    fn new(mib: usize) -> Self {
        let pages = mib * 256;
        // SAFETY: a fresh anonymous private mapping; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                pages * 4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap of the PROT_NONE region failed");
        let mut this = ProtNone {
            ptr: ptr.cast(),
            pages,
            protected: vec![false; pages],
        };
        // SAFETY: the whole mapping is ours and writable.
        let words = unsafe { std::slice::from_raw_parts_mut(this.ptr, pages * PAGE_WORDS) };
        for page in 0..pages {
            for i in 0..PAGE_WORDS {
                words[page * PAGE_WORDS + i] = expected_word(2 << 20 | page, 0, i);
            }
        }
        let mut rng = 0x0bad_5eed_u64;
        for _ in 0..pages / 8 {
            rng = mix(rng);
            let page = (rng % pages as u64) as usize;
            this.protect(page, libc::PROT_NONE);
            this.protected[page] = true;
        }
        this
    }

    fn protect(&self, page: usize, prot: libc::c_int) {
        // SAFETY: changes the protection of one page of our own mapping.
        let rc = unsafe { libc::mprotect(self.ptr.add(page * PAGE_WORDS).cast(), 4096, prot) };
        assert_eq!(rc, 0, "mprotect failed");
    }

    fn check(&self) -> Result<(), String> {
        for page in 0..self.pages {
            if self.protected[page] {
                self.protect(page, libc::PROT_READ);
            }
            // SAFETY: the page is readable now.
            let words =
                unsafe { std::slice::from_raw_parts(self.ptr.add(page * PAGE_WORDS), PAGE_WORDS) };
            let intact = words
                .iter()
                .enumerate()
                .all(|(i, &w)| w == expected_word(2 << 20 | page, 0, i));
            if self.protected[page] {
                self.protect(page, libc::PROT_NONE);
            }
            if !intact {
                return Err(format!(
                    "prot-none region page={page} protected={}",
                    self.protected[page]
                ));
            }
        }
        Ok(())
    }
}

/// Forks a child that verifies one page of the inherited memory and exits (3 if it is wrong).
fn fork_and_check(memory: &[u64], generations: &[u32], page: usize) {
    // SAFETY: memcheck is single-threaded, so the child may run arbitrary code after fork.
    let pid = unsafe { libc::fork() };
    match pid {
        0 => {
            let code = if page_is_intact(memory, page, generations[page]) {
                0
            } else {
                3
            };
            // SAFETY: _exit is always safe to call; it skips destructors in the child.
            unsafe { libc::_exit(code) }
        }
        pid if pid > 0 => {
            let mut status = 0;
            // SAFETY: waits for our own child; status points to a live int.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 3 {
                eprintln!("memcheck: forked child saw a corrupt page {page}");
                exit(3);
            }
        }
        _ => eprintln!("memcheck: fork failed: {}", std::io::Error::last_os_error()),
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: memcheck <MiB> [--status PATH] [--writes-per-tick N] [--tick-ms MS] [--fork-every N] [--churn] [--prot-none MIB]"
    );
    exit(2)
}

fn main() {
    let args: Vec<String> = env::args().skip(1).collect();
    let mib: usize = args
        .first()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| usage());
    let mut status_path = String::from("/status");
    let mut writes_per_tick = 64usize;
    let mut tick = Duration::from_millis(5);
    let mut fork_every = 0u64;
    let mut churn = false;
    let mut prot_none_mib = 0usize;
    let mut rest = args[1..].iter();
    while let Some(flag) = rest.next() {
        if flag == "--churn" {
            churn = true;
            continue;
        }
        let value = rest.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--status" => status_path = value.clone(),
            "--writes-per-tick" => writes_per_tick = value.parse().unwrap_or_else(|_| usage()),
            "--tick-ms" => tick = Duration::from_millis(value.parse().unwrap_or_else(|_| usage())),
            "--fork-every" => fork_every = value.parse().unwrap_or_else(|_| usage()),
            "--prot-none" => prot_none_mib = value.parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }

    let pages = mib * 256;
    let mut memory = vec![0u64; pages * PAGE_WORDS];
    let mut generations = vec![0u32; pages];
    for page in 0..pages {
        fill_page(&mut memory, page, 0);
    }

    // Four regions a phase apart: whenever memcheck is checkpointed, one region is about to be
    // moved, one discarded and one unmapped.
    let mut churn_regions: Vec<Churn> = (0..4)
        .map(|id| Churn {
            id,
            region: None,
            phase: 0,
            generation: 0,
        })
        .collect();
    if churn {
        for (k, region) in churn_regions.iter_mut().enumerate() {
            for _ in 0..k {
                region.step().expect("a fresh region verifies");
            }
        }
    }
    let prot_none = (prot_none_mib > 0).then(|| ProtNone::new(prot_none_mib));
    let mut rng = 0x1234_5678_9abc_def0u64;
    let mut writes = 0u64;
    let mut pass = 0u64;
    let mut counter = 0u64;
    // Verify in slices between write bursts, so writes keep happening at a steady rate while a
    // full pass takes a while on large regions.
    let verify_per_tick = (pages / 64).max(256);
    let mut cursor = 0usize;
    loop {
        for _ in 0..writes_per_tick {
            rng = mix(rng);
            let page = (rng % pages as u64) as usize;
            generations[page] = generations[page].wrapping_add(1);
            fill_page(&mut memory, page, generations[page]);
            writes += 1;
        }
        let end = (cursor + verify_per_tick).min(pages);
        for page in cursor..end {
            if !page_is_intact(&memory, page, generations[page]) {
                let line = format!(
                    "CORRUPT page={page} generation={} first_word={:#x} pass={pass}\n",
                    generations[page],
                    memory[page * PAGE_WORDS]
                );
                write_status(&status_path, &line);
                eprint!("memcheck: {line}");
                exit(3);
            }
        }
        cursor = end;
        if cursor == pages {
            if let Some(Err(problem)) = prot_none.as_ref().map(ProtNone::check) {
                let line = format!("CORRUPT {problem} pass={pass}\n");
                write_status(&status_path, &line);
                eprint!("memcheck: {line}");
                exit(3);
            }
            cursor = 0;
            pass += 1;
            write_status(
                &status_path,
                &format!("pass={pass} pages={pages} writes={writes} errors=0 counter={counter}\n"),
            );
        }
        if churn && counter.is_multiple_of(10) {
            for region in churn_regions.iter_mut() {
                if let Err(problem) = region.step() {
                    let line = format!("CORRUPT churn {problem} pass={pass}\n");
                    write_status(&status_path, &line);
                    eprint!("memcheck: {line}");
                    exit(3);
                }
            }
        }
        if fork_every > 0 && counter.is_multiple_of(fork_every) {
            fork_and_check(&memory, &generations, (counter as usize * 7919) % pages);
        }
        counter += 1;
        sleep(tick);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filled_page_verifies_and_zeroed_or_stale_pages_do_not() {
        let mut memory = vec![0u64; 3 * PAGE_WORDS];
        for page in 0..3 {
            fill_page(&mut memory, page, 5);
        }
        assert!(page_is_intact(&memory, 1, 5));
        // A page that came back zero-filled (a lost lazy page) is caught.
        memory[PAGE_WORDS..2 * PAGE_WORDS].fill(0);
        assert!(!page_is_intact(&memory, 1, 5));
        // So is a page with an older generation's content (a missed dirty page).
        fill_page(&mut memory, 2, 4);
        assert!(!page_is_intact(&memory, 2, 5));
        // And a single flipped word.
        memory[7] ^= 1;
        assert!(!page_is_intact(&memory, 0, 5));
    }

    #[test]
    fn no_page_content_is_all_zero() {
        assert!((0..PAGE_WORDS).all(|i| expected_word(0, 0, i) != 0));
    }
}
