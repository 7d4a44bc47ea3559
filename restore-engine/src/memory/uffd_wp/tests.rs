//! The write-protect tracker on real processes: a helper process (this test binary run again)
//! maps, writes, discards, forks, starts threads and moves mappings on command, and each round
//! must report exactly the pages written since the last one.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use super::*;
use crate::memory::NoQuiesce;

const HELPER_ENV: &str = "PCLIVE_WP_HELPER";

/// The helper process's main loop (runs only when the test binary is started as a helper).
#[test]
#[ignore = "the helper process of the uffd-wp tests, not a test"]
fn uffd_wp_helper_process() {
    if std::env::var_os(HELPER_ENV).is_none() {
        return;
    }
    helper::serve();
}

/// Commands, one per line; each answers one line (raw descriptor I/O: the harness captures
/// `print!`).
mod helper {
    use std::sync::atomic::{AtomicI32, AtomicU32, Ordering::Relaxed};

    use crate::page;

    fn reply(line: &str) {
        let text = format!("{line}\n");
        // SAFETY: writes our own buffer to our stdout.
        unsafe { libc::write(1, text.as_ptr().cast(), text.len()) };
    }

    fn read_line(fd: i32) -> Option<String> {
        let mut line = Vec::new();
        let mut byte = 0u8;
        loop {
            // SAFETY: reads one byte into `byte`.
            let n = unsafe { libc::read(fd, (&mut byte as *mut u8).cast(), 1) };
            if n <= 0 {
                return None;
            }
            if byte == b'\n' {
                return Some(String::from_utf8_lossy(&line).into_owned());
            }
            line.push(byte);
        }
    }

    fn write_page(addr: u64, value: u8) {
        // SAFETY: the tests only name pages of mappings this process made.
        unsafe { std::ptr::write_bytes(addr as *mut u8, value, page::SIZE) };
    }

    fn map(pages: usize, value: u8) -> u64 {
        // SAFETY: a fresh private anonymous mapping.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                pages * page::SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(at, libc::MAP_FAILED);
        for i in 0..pages {
            write_page(at as u64 + (i * page::SIZE) as u64, value);
        }
        at as u64
    }

    static CYCLES: AtomicU32 = AtomicU32::new(0);
    static ERRORS: AtomicU32 = AtomicU32::new(0);
    static FIRST_ERRNO: AtomicI32 = AtomicI32::new(0);

    fn failed() {
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(-1);
        let _ = FIRST_ERRNO.compare_exchange(0, errno, Relaxed, Relaxed);
        ERRORS.fetch_add(1, Relaxed);
    }

    /// Maps, grows in place, moves and grows, checks and unmaps regions forever, as allocators
    /// do: mappings that grow and merge with their neighbours while the tracker registers.
    fn churn() {
        let size = |pages: usize| pages * page::SIZE;
        loop {
            let p = map(4, 0x5a);
            // SAFETY: our own mapping, grown in place (or moved) by the kernel.
            let mut q = unsafe { libc::mremap(p as *mut libc::c_void, size(4), size(8), 0) };
            if q == libc::MAP_FAILED {
                // SAFETY: as above, allowed to move.
                q = unsafe {
                    libc::mremap(
                        p as *mut libc::c_void,
                        size(4),
                        size(8),
                        libc::MREMAP_MAYMOVE,
                    )
                };
            }
            if q == libc::MAP_FAILED {
                failed();
                continue;
            }
            for i in 4..8 {
                write_page(q as u64 + size(i) as u64, 0x5b);
            }
            // SAFETY: our own mapping of 8 pages, moved and grown by the kernel.
            let r = unsafe { libc::mremap(q, size(8), size(16), libc::MREMAP_MAYMOVE) };
            if r == libc::MAP_FAILED {
                failed();
                continue;
            }
            // SAFETY: the first 8 pages of our 16-page mapping were written above.
            let kept = unsafe { std::slice::from_raw_parts(r as *const u8, size(8)) };
            if kept[..size(4)].iter().any(|b| *b != 0x5a)
                || kept[size(4)..].iter().any(|b| *b != 0x5b)
            {
                let _ = FIRST_ERRNO.compare_exchange(0, libc::EBADMSG, Relaxed, Relaxed);
                ERRORS.fetch_add(1, Relaxed);
            }
            // SAFETY: our own mapping, not used after.
            unsafe { libc::munmap(r, size(16)) };
            CYCLES.fetch_add(1, Relaxed);
        }
    }

    pub fn serve() {
        // The forked child's command and answer pipes.
        let mut child: Option<(i32, i32)> = None;
        while let Some(line) = read_line(0) {
            let words: Vec<&str> = line.split_whitespace().collect();
            let num = |i: usize| -> u64 {
                let w = words[i];
                w.strip_prefix("0x")
                    .map(|h| u64::from_str_radix(h, 16).unwrap())
                    .unwrap_or_else(|| w.parse().unwrap())
            };
            match words[0] {
                "map" => reply(&format!("{:#x}", map(num(1) as usize, num(2) as u8))),
                "map-alone" => {
                    // A mapping between two PROT_NONE pages, so that the kernel never merges it
                    // with a neighbour: what maps shows of it stays the same when it is
                    // replaced in place.
                    let pages = num(1) as usize;
                    let whole = (pages + 2) * page::SIZE;
                    // SAFETY: a fresh private anonymous mapping, then a fixed one inside it.
                    let at = unsafe {
                        let at = libc::mmap(
                            std::ptr::null_mut(),
                            whole,
                            libc::PROT_NONE,
                            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                            -1,
                            0,
                        );
                        assert_ne!(at, libc::MAP_FAILED);
                        let inner = at as u64 + page::SIZE_U64;
                        libc::mprotect(
                            inner as *mut libc::c_void,
                            pages * page::SIZE,
                            libc::PROT_READ | libc::PROT_WRITE,
                        );
                        inner
                    };
                    for i in 0..pages {
                        write_page(at + (i * page::SIZE) as u64, num(2) as u8);
                    }
                    reply(&format!("{at:#x}"));
                }
                "remap" => {
                    // Unmaps a mapping and maps a new one at the same place, of the same size.
                    let (addr, pages) = (num(1), num(2) as usize);
                    // SAFETY: our own mapping, replaced by a fresh one at the same address.
                    unsafe {
                        assert_eq!(
                            libc::munmap(addr as *mut libc::c_void, pages * page::SIZE),
                            0
                        );
                        let at = libc::mmap(
                            addr as *mut libc::c_void,
                            pages * page::SIZE,
                            libc::PROT_READ | libc::PROT_WRITE,
                            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                            -1,
                            0,
                        );
                        assert_eq!(at as u64, addr);
                    }
                    for i in 0..pages {
                        write_page(addr + (i * page::SIZE) as u64, num(3) as u8);
                    }
                    reply("ok");
                }
                "reserve" => {
                    // A malloc arena's shape: a large PROT_NONE reserve whose first page is
                    // made writable and written.
                    let pages = num(1) as usize;
                    // SAFETY: a fresh private anonymous mapping, then its first page.
                    let at = unsafe {
                        let at = libc::mmap(
                            std::ptr::null_mut(),
                            pages * page::SIZE,
                            libc::PROT_NONE,
                            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                            -1,
                            0,
                        );
                        assert_ne!(at, libc::MAP_FAILED);
                        libc::mprotect(at, page::SIZE, libc::PROT_READ | libc::PROT_WRITE);
                        at as u64
                    };
                    write_page(at, num(2) as u8);
                    reply(&format!("{at:#x}"));
                }
                "write" => {
                    write_page(num(1), num(2) as u8);
                    reply("ok");
                }
                "thread-write" => {
                    let (addr, value) = (num(1), num(2) as u8);
                    std::thread::spawn(move || write_page(addr, value))
                        .join()
                        .unwrap();
                    reply("ok");
                }
                "discard" => {
                    // SAFETY: one page of our own mapping.
                    unsafe {
                        libc::madvise(num(1) as *mut libc::c_void, page::SIZE, libc::MADV_DONTNEED)
                    };
                    reply("ok");
                }
                "move" => {
                    // Grows it so that it must move: glibc's realloc of a large block.
                    let (addr, pages) = (num(1), num(2) as usize);
                    // SAFETY: our own mapping, moved and grown by the kernel.
                    let to = unsafe {
                        libc::mremap(
                            addr as *mut libc::c_void,
                            pages * page::SIZE,
                            pages * page::SIZE * 64,
                            libc::MREMAP_MAYMOVE,
                        )
                    };
                    assert_ne!(to, libc::MAP_FAILED);
                    reply(&format!("{:#x}", to as u64));
                }
                "fork" => {
                    let mut to_child = [0i32; 2];
                    let mut from_child = [0i32; 2];
                    // SAFETY: two fresh pipes.
                    unsafe {
                        libc::pipe(to_child.as_mut_ptr());
                        libc::pipe(from_child.as_mut_ptr());
                    }
                    // SAFETY: this process is single-threaded here (threads are joined); the
                    // child only reads commands, writes its memory and answers.
                    let pid = unsafe { libc::fork() };
                    if pid == 0 {
                        // SAFETY: dies with its parent (the helper), which the test kills.
                        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
                        while let Some(line) = read_line(to_child[0]) {
                            let w: Vec<&str> = line.split_whitespace().collect();
                            let addr = u64::from_str_radix(&w[0][2..], 16).unwrap();
                            write_page(addr, w[1].parse().unwrap());
                            // SAFETY: one byte to the answer pipe.
                            unsafe { libc::write(from_child[1], b"k".as_ptr().cast(), 1) };
                        }
                        // SAFETY: leave without running the parent's atexit handlers.
                        unsafe { libc::_exit(0) };
                    }
                    child = Some((to_child[1], from_child[0]));
                    reply(&pid.to_string());
                }
                "child-write" => {
                    let (to, from) = child.expect("forked first");
                    let text = format!("{:#x} {}\n", num(1), num(2));
                    let mut byte = 0u8;
                    // SAFETY: our pipes to and from the child.
                    unsafe {
                        libc::write(to, text.as_ptr().cast(), text.len());
                        libc::read(from, (&mut byte as *mut u8).cast(), 1);
                    }
                    reply("ok");
                }
                "churn" => {
                    for _ in 0..num(1) {
                        std::thread::spawn(churn);
                    }
                    reply("ok");
                }
                "churn-cycles" => reply(&CYCLES.load(Relaxed).to_string()),
                "churn-errors" => {
                    let errno = FIRST_ERRNO.load(Relaxed);
                    reply(&ERRORS.load(Relaxed).to_string());
                    if errno != 0 {
                        eprintln!(
                            "first churn error: {}",
                            std::io::Error::from_raw_os_error(errno)
                        );
                    }
                }
                _ => reply("?"),
            }
        }
    }
}

/// The helper, killed on drop (its forked child dies with it).
struct Helper {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Helper {
    fn start() -> Helper {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "memory::uffd_wp::tests::uffd_wp_helper_process",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(HELPER_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Helper {
            child,
            stdin,
            stdout,
        }
    }
    fn pid(&self) -> u32 {
        self.child.id()
    }
    fn ask(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").unwrap();
        loop {
            let mut line = String::new();
            assert!(self.stdout.read_line(&mut line).unwrap() > 0, "helper died");
            // libtest's own lines ("running 1 test") come first, and its "test ... " has no
            // line end: the answer is the line's last word.
            let word = line.split_whitespace().last().unwrap_or("");
            if word.starts_with("0x") || word == "ok" || word.parse::<u32>().is_ok() {
                return word.to_string();
            }
        }
    }
    fn addr(&mut self, command: &str) -> u64 {
        let answer = self.ask(command);
        u64::from_str_radix(answer.trim_start_matches("0x"), 16).unwrap()
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One round over `pids`: each task's delta.
fn round(tracker: &mut UffdWpTracker, pids: &[u32]) -> HashMap<u32, Delta> {
    tracker.begin_round(pids, &mut NoQuiesce, false).unwrap();
    let mut out = HashMap::new();
    for &pid in pids {
        let mut all = Delta::default();
        tracker
            .round_into(pid, &mut |piece: &mut Delta| {
                all.extend_from(piece);
                Ok(())
            })
            .unwrap();
        out.insert(pid, all);
    }
    out
}

/// Pages of `delta` inside `[base, base + pages)`: data pages (address, first byte) and zero
/// pages, as page numbers.
fn within(delta: &Delta, base: u64, pages: u64) -> (Vec<(u64, u8)>, Vec<u64>) {
    let inside = |a: u64| a >= base && a < base + pages * page::SIZE_U64;
    let mut data = Vec::new();
    for (start, bytes) in delta.runs() {
        for (k, p) in bytes.chunks_exact(page::SIZE).enumerate() {
            let addr = start + (k * page::SIZE) as u64;
            if inside(addr) {
                data.push(((addr - base) / page::SIZE_U64, p[0]));
            }
        }
    }
    let mut zero: Vec<u64> = delta
        .zero
        .iter()
        .filter(|a| inside(**a))
        .map(|a| (a - base) / page::SIZE_U64)
        .collect();
    zero.sort_unstable();
    (data, zero)
}

fn holds_userfaultfd(pid: u32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .any(|e| {
            std::fs::read_link(e.path())
                .map(|l| l.to_string_lossy().contains("userfaultfd"))
                .unwrap_or(false)
        })
}

/// A tracker and a helper process, or `None` (after saying so loudly) where the kernel has no
/// uffd-wp.
fn tracker_and_helper() -> Option<(UffdWpTracker, Helper)> {
    if let Err(why) = uffd_wp_support() {
        eprintln!("SKIPPED (LOUDLY): this kernel has no uffd-wp tracker: {why}");
        return None;
    }
    Some((UffdWpTracker::new().unwrap(), Helper::start()))
}

fn carries_uw(pid: u32) -> bool {
    parse_lazy_vmas_flagged(&read_smaps(pid).unwrap())
        .iter()
        .any(|(_, wp)| *wp)
}

#[test]
fn reports_exactly_the_pages_written_by_tasks_threads_fork_children_and_in_new_mappings() {
    let Some((mut tracker, mut h)) = tracker_and_helper() else {
        return;
    };
    let hp = h.pid();
    let a = h.addr("map 64 1");
    let reserve = h.addr("reserve 4096 2");

    // The first round: every page.
    let r = round(&mut tracker, &[hp]);
    let (data, _) = within(&r[&hp], a, 64);
    assert_eq!(data.len(), 64, "{data:?}");
    // Of a reserve, only what was written (its first scan marks the holes protected, and
    // pagemap shows those markers as swapped pages: they must not be read).
    assert_eq!(within(&r[&hp], reserve, 4096), (vec![(0, 2)], vec![]));
    let r = round(&mut tracker, &[hp]);
    assert_eq!(within(&r[&hp], reserve, 4096), (vec![], vec![]));
    assert!(data.iter().all(|(_, v)| *v == 1));
    assert!(
        !holds_userfaultfd(hp),
        "the task must not hold the userfaultfd (CRIU refuses to dump it)"
    );
    assert!(carries_uw(hp), "its mappings are registered");

    // Written by the task, by one of its threads, zeroed, discarded; and a fork child.
    let child: u32 = h.ask("fork").parse().unwrap();
    h.ask(&format!("write {:#x} 170", a + 3 * page::SIZE_U64));
    h.ask(&format!("thread-write {:#x} 187", a + 11 * page::SIZE_U64));
    h.ask(&format!("write {:#x} 0", a + 20 * page::SIZE_U64));
    h.ask(&format!("discard {:#x}", a + 30 * page::SIZE_U64));
    h.ask(&format!("child-write {:#x} 85", a + 5 * page::SIZE_U64));
    let r = round(&mut tracker, &[hp, child]);
    let (data, zero) = within(&r[&hp], a, 64);
    assert_eq!(data, vec![(3, 170), (11, 187)]);
    assert_eq!(zero, vec![20, 30]);
    let (data, _) = within(&r[&child], a, 64);
    assert_eq!(data.len(), 64, "a fork child's first round is all of it");
    assert!(
        data.contains(&(5, 85)) && data.contains(&(3, 1)),
        "{data:?}"
    );

    // A new mapping in the task, a write in the child.
    let b = h.addr("map 8 7");
    h.ask(&format!("child-write {:#x} 102", a + 6 * page::SIZE_U64));
    let r = round(&mut tracker, &[hp, child]);
    assert_eq!(within(&r[&hp], a, 64), (vec![], vec![]));
    let (data, _) = within(&r[&hp], b, 8);
    assert_eq!(data, (0..8).map(|i| (i, 7)).collect::<Vec<_>>());
    assert_eq!(within(&r[&child], a, 64), (vec![(6, 102)], vec![]));

    // Nothing written: nothing.
    let r = round(&mut tracker, &[hp, child]);
    assert_eq!(within(&r[&hp], a, 64), (vec![], vec![]));
    assert_eq!(within(&r[&hp], b, 8), (vec![], vec![]));
    assert_eq!(within(&r[&child], a, 64), (vec![], vec![]));

    // A moved mapping (mremap) lost its registration: all of it, at its new place, and
    // tracked again from there.
    let moved = h.addr(&format!("move {a:#x} 64"));
    let r = round(&mut tracker, &[hp, child]);
    let (data, _) = within(&r[&hp], moved, 64);
    // Every page but the discarded one (30) and the zeroed one (20, a zero marker).
    assert_eq!(data.len(), 62, "{data:?}");
    h.ask(&format!("write {:#x} 9", moved + 40 * page::SIZE_U64));
    let r = round(&mut tracker, &[hp, child]);
    assert_eq!(within(&r[&hp], moved, 64), (vec![(40, 9)], vec![]));

    // Released: no registration left, and no marker that CRIU would take for a swapped page.
    tracker.release();
    assert!(!carries_uw(hp) && !carries_uw(child));
    assert!(!holds_userfaultfd(hp));
    assert_no_markers(hp);
}

/// Pages of `pid`'s lazy mappings whose pagemap entry carries the uffd-wp bit: (markers,
/// protected pages). A marker is what protection leaves on a page not there; pagemap shows it
/// as a swapped page, which CRIU would dump. glibc's guard regions are markers too and show
/// the bit: they are not ours, and are not counted.
fn uffd_wp_entries(pid: u32) -> (usize, usize) {
    const PM_UFFD_WP: u64 = 1 << 57;
    const PM_GUARD_REGION: u64 = 1 << 58;
    const PM_PRESENT: u64 = 1 << 63;
    let pagemap = open_pagemap(pid).unwrap();
    let (mut markers, mut protected) = (0, 0);
    for (vma, _) in parse_lazy_vmas_flagged(&read_smaps(pid).unwrap()) {
        for e in pagemap_entries(pid, &pagemap, vma.start, vma.end).unwrap() {
            if e & PM_UFFD_WP == 0 || e & PM_GUARD_REGION != 0 {
                continue;
            }
            if e & PM_PRESENT != 0 {
                protected += 1;
            } else {
                markers += 1;
            }
        }
    }
    (markers, protected)
}

/// Released: no page of `pid` carries a marker or protection.
fn assert_no_markers(pid: u32) {
    assert_eq!(
        uffd_wp_entries(pid),
        (0, 0),
        "markers and protected pages left"
    );
}

#[test]
fn a_stopped_task_is_left_alone_and_compared_by_content() {
    let Some((mut tracker, mut h)) = tracker_and_helper() else {
        return;
    };
    let hp = h.pid();
    let a = h.addr("map 16 3");
    // SAFETY: signals our own child.
    unsafe { libc::kill(hp as i32, libc::SIGSTOP) };
    while !std::fs::read_to_string(format!("/proc/{hp}/stat"))
        .unwrap()
        .contains(") T ")
    {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let r = round(&mut tracker, &[hp]);
    assert_eq!(within(&r[&hp], a, 16).0.len(), 16);
    assert!(!carries_uw(hp) && !holds_userfaultfd(hp));
    let state = std::fs::read_to_string(format!("/proc/{hp}/stat")).unwrap();
    assert!(state.contains(") T "), "still stopped: {state}");
    // SAFETY: signals our own child.
    unsafe { libc::kill(hp as i32, libc::SIGCONT) };
    h.ask(&format!("write {:#x} 4", a + page::SIZE_U64));
    let r = round(&mut tracker, &[hp]);
    assert_eq!(within(&r[&hp], a, 16), (vec![(1, 4)], vec![]));
}

#[test]
fn the_frozen_round_reads_unregistered_tasks_whole_and_injects_nothing() {
    let Some((mut tracker, mut h)) = tracker_and_helper() else {
        return;
    };
    let hp = h.pid();
    let a = h.addr("map 16 3");
    round(&mut tracker, &[hp]);
    // A mapping made after the last live round, and a write.
    let b = h.addr("map 4 5");
    h.ask(&format!("write {:#x} 6", a + 2 * page::SIZE_U64));
    tracker.begin_round(&[hp], &mut NoQuiesce, true).unwrap();
    let mut all = Delta::default();
    let r = tracker.round_into(hp, &mut |piece: &mut Delta| {
        all.extend_from(piece);
        Ok(())
    });
    if r.is_err() {
        eprintln!(
            "{}",
            std::fs::read_to_string(format!("/proc/{hp}/smaps")).unwrap()
        );
    }
    r.unwrap();
    assert_eq!(within(&all, a, 16), (vec![(2, 6)], vec![]));
    assert_eq!(within(&all, b, 4).0.len(), 4);
    assert!(
        !parse_lazy_vmas_flagged(&read_smaps(hp).unwrap())
            .iter()
            .any(|(v, wp)| v.start <= b && b < v.end && *wp),
        "nothing is registered while frozen"
    );
    tracker.release();
    assert!(!carries_uw(hp));
    assert_no_markers(hp);
}

#[test]
fn registering_never_splits_a_mapping_the_task_is_growing_or_moving() {
    let Some((mut tracker, mut h)) = tracker_and_helper() else {
        return;
    };
    let hp = h.pid();
    // Threads that map, grow in place, move and unmap all the time: a registration of a range
    // read while they run would split a mapping that grew since, and their next mremap of it
    // would fail with EFAULT.
    h.ask("churn 3");
    let started = std::time::Instant::now();
    let mut rounds = 0;
    while started.elapsed() < std::time::Duration::from_secs(3) {
        round(&mut tracker, &[hp]);
        rounds += 1;
    }
    let cycles: u32 = h.ask("churn-cycles").parse().unwrap();
    let errors: u32 = h.ask("churn-errors").parse().unwrap();
    eprintln!("{rounds} rounds, {cycles} churn cycles, {errors} errors");
    assert!(
        rounds > 20 && cycles > 1000,
        "the test did not race: {rounds} rounds, {cycles} cycles"
    );
    assert_eq!(
        errors, 0,
        "the task saw mremap fail or lose content (its stderr says how)"
    );
    tracker.release();
    assert!(!carries_uw(hp));
    assert_no_markers(hp);
}

#[test]
fn before_the_dump_only_the_markers_go_and_the_rest_waits_for_the_release() {
    let Some((mut tracker, mut h)) = tracker_and_helper() else {
        return;
    };
    let hp = h.pid();
    let a = h.addr("map 64 1");
    let reserve = h.addr("reserve 4096 2");
    round(&mut tracker, &[hp]);
    round(&mut tracker, &[hp]);
    let (markers, protected) = uffd_wp_entries(hp);
    assert!(
        markers >= 4000 && protected >= 64,
        "the scans protect the pages and mark the reserve's holes: {markers} markers, \
         {protected} protected"
    );
    h.ask(&format!("write {:#x} 6", a + 2 * page::SIZE_U64));
    tracker.begin_round(&[hp], &mut NoQuiesce, true).unwrap();
    let mut all = Delta::default();
    tracker
        .round_into(hp, &mut |piece: &mut Delta| {
            all.extend_from(piece);
            Ok(())
        })
        .unwrap();
    assert_eq!(within(&all, a, 64), (vec![(2, 6)], vec![]));
    let started = std::time::Instant::now();
    tracker.prepare_dump();
    eprintln!("prepare_dump took {:?}", started.elapsed());
    // What CRIU reads next: no page the task never had looks swapped. The protection of the
    // pages it has, and the registrations, stay until the release (after the pause).
    let (markers, protected) = uffd_wp_entries(hp);
    assert_eq!(markers, 0, "markers left for CRIU to dump");
    assert!(protected >= 64, "{protected}");
    assert!(carries_uw(hp));
    let pagemap = open_pagemap(hp).unwrap();
    let entries = pagemap_entries(hp, &pagemap, reserve, reserve + 4096 * page::SIZE_U64).unwrap();
    assert_eq!(entries.iter().filter(|e| has_page(**e)).count(), 1);
    // The task goes on (a failed migration resumes it): its writes are not held up.
    h.ask(&format!("write {:#x} 7", a + 3 * page::SIZE_U64));
    h.ask(&format!("write {reserve:#x} 3"));
    tracker.release();
    assert!(!carries_uw(hp));
    assert_no_markers(hp);
}

/// The maps lines of `pid` that overlap `[start, end)`.
fn maps_lines(pid: u32, start: u64, end: u64) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .filter(|l| {
            crate::memory::parse_range(l.split_whitespace().next().unwrap())
                .is_some_and(|(s, e)| s < end && e > start)
        })
        .map(str::to_string)
        .collect()
}

/// Rounds read the mappings from /proc/PID/maps and trust the latest round's registrations
/// while maps shows the same layout (smaps walks every page table entry). A mapping replaced
/// at the same place shows the same layout without the registration: its scan fails, it is
/// read whole, registered again (and read whole once more), and tracked exactly from there.
#[test]
fn a_mapping_replaced_at_the_same_place_is_read_whole_and_tracked_again() {
    let Some((mut tracker, mut h)) = tracker_and_helper() else {
        return;
    };
    let hp = h.pid();
    let a = h.addr("map-alone 16 1");
    let end = a + 16 * page::SIZE_U64;
    let r = round(&mut tracker, &[hp]);
    assert_eq!(within(&r[&hp], a, 16).0.len(), 16);
    let r = round(&mut tracker, &[hp]);
    assert_eq!(within(&r[&hp], a, 16), (vec![], vec![]));
    let before = maps_lines(hp, a, end);

    h.ask(&format!("remap {a:#x} 16 4"));
    assert_eq!(
        maps_lines(hp, a, end),
        before,
        "the replaced mapping does not look the same in maps: this test needs it to"
    );
    let r = round(&mut tracker, &[hp]);
    let (data, _) = within(&r[&hp], a, 16);
    assert_eq!(data, (0..16).map(|i| (i, 4)).collect::<Vec<_>>());
    // The next round reads smaps (the scan failed), registers it again and reads it whole
    // once more (what was written before the registration is not known); then only what is
    // written.
    let r = round(&mut tracker, &[hp]);
    assert_eq!(within(&r[&hp], a, 16).0.len(), 16);
    assert!(carries_uw(hp));
    let r = round(&mut tracker, &[hp]);
    assert_eq!(within(&r[&hp], a, 16), (vec![], vec![]));
    h.ask(&format!("write {:#x} 6", a + 2 * page::SIZE_U64));
    let r = round(&mut tracker, &[hp]);
    assert_eq!(within(&r[&hp], a, 16), (vec![(2, 6)], vec![]));
}
