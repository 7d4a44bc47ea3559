//! Test support: a running "task" whose memory keeps changing, and the image files a lazy dump
//! of it would have.

use std::fs;
use std::path::Path;

use crate::images::{
    encode_entries, Header, MmEntry, PageRange, Pagemap, PstreeEntry, VmaEntry, MM_MAGIC, PE_LAZY,
    PSTREE_MAGIC,
};
use crate::page::SIZE_U64 as PAGE;

/// Writes the images a `--lazy-pages` dump of task `pid` with one private anonymous mapping
/// `[base, base + pages)` would contain as far as memory goes: pstree, mm, and a pagemap whose
/// range is PE_LAZY without data.
pub fn write_lazy_images(dir: &Path, pid: u32, base: u64, pages: u64) {
    let page = PAGE;
    fs::write(
        dir.join("pstree.img"),
        encode_entries(
            Header::Common(PSTREE_MAGIC),
            &[PstreeEntry {
                pid,
                ppid: 0,
                pgid: pid,
                sid: pid,
                threads: vec![pid],
            }],
        ),
    )
    .unwrap();
    let mm = MmEntry {
        vmas: vec![VmaEntry {
            start: base,
            end: base + pages * page,
            pgoff: 0,
            shmid: 0,
            prot: 3,
            flags: 0x22,
            status: 0x201,
            fd: -1,
            madv: None,
            fdflags: None,
        }],
        ..Default::default()
    };
    fs::write(
        dir.join(format!("mm-{pid}.img")),
        encode_entries(Header::Common(MM_MAGIC), &[mm]),
    )
    .unwrap();
    fs::write(
        dir.join(format!("pagemap-{pid}.img")),
        Pagemap {
            pages_id: 1,
            ranges: vec![PageRange {
                vaddr: base,
                nr_pages: pages,
                flags: PE_LAZY,
                file_offset: 0,
            }],
        }
        .encode(),
    )
    .unwrap();
}

/// A child process that keeps rewriting pages of a 16 MiB region, as a running task.
pub struct Writer {
    pub pid: libc::pid_t,
    pub base: u64,
    pub len: usize,
}

impl Writer {
    pub fn start() -> Self {
        let len = 16 << 20;
        // SAFETY: a fresh private anonymous mapping, inherited by the child at fork.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        } as u64;
        assert_ne!(base as *mut libc::c_void, libc::MAP_FAILED);
        // Populate every page before the fork: the child starts with 16 MiB resident.
        // SAFETY: within the mapping we just made.
        unsafe { std::ptr::write_bytes(base as *mut u8, 0x5a, len) };
        // SAFETY: the child only writes its own memory and sleeps (async-signal-safe work)
        // until it is killed; it never returns into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let mut x = 0x9e37_79b9u64;
            loop {
                for _ in 0..64 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let page = (x % (len as u64 / PAGE)) * PAGE;
                    // SAFETY: within the child's copy of the region.
                    unsafe { std::ptr::write_volatile((base + page + 8) as *mut u64, x) };
                }
                // SAFETY: plain syscall.
                unsafe { libc::usleep(1000) };
            }
        }
        // Drop our (the parent's) copy of the data but keep the addresses reserved, so a test
        // can later map a stand-in for the restored task exactly there.
        // SAFETY: replaces our own mapping with an inaccessible reservation of the same range;
        // the child's copy is unaffected.
        let reserved = unsafe {
            libc::mmap(
                base as *mut libc::c_void,
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_eq!(reserved as u64, base);
        Writer { pid, base, len }
    }
}

impl Writer {
    /// Maps fresh read-write memory over the reserved range in this process (for a stand-in of
    /// the restored task) and returns its address.
    pub fn map_stand_in(&self) -> u64 {
        // SAFETY: replaces our own reservation of exactly this range.
        let at = unsafe {
            libc::mmap(
                self.base as *mut libc::c_void,
                self.len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        assert_eq!(at as u64, self.base);
        self.base
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // SAFETY: our own child.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
            libc::munmap(self.base as *mut libc::c_void, self.len);
        }
    }
}
