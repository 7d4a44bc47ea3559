//! Test support: a running "task" whose memory keeps changing, and the image files a lazy dump
//! of it would have.

use std::fs;
use std::path::Path;
use std::thread;
use std::time::Duration;

/// Tests that register a userfaultfd over this test process's own memory, and tests that fork
/// it, must not overlap. A fork waits until the reader of such a userfaultfd has read the fork
/// event (`userfaultfd_event_wait_completion`); when that reader has stopped reading, or the
/// child kept a copy of the descriptor, the fork waits forever (seen: a test thread stuck in
/// clone for minutes). Userfaultfd tests hold this exclusively for their whole run, forks
/// shared.
pub static OWN_MEMORY_UFFD: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Holds off forks of this process while a test registers its own memory with a userfaultfd.
pub fn own_memory_uffd() -> std::sync::RwLockWriteGuard<'static, ()> {
    OWN_MEMORY_UFFD.write().unwrap_or_else(|e| e.into_inner())
}

/// A fresh private anonymous read-write mapping of `len` bytes of this process.
pub fn map_anonymous(len: usize) -> u64 {
    // SAFETY: mmap with a null hint creates a new mapping and touches nothing else.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(base, libc::MAP_FAILED, "mmap of {len} bytes");
    base as u64
}

/// A private anonymous region of this process registered (missing mode) with a userfaultfd
/// opened as CRIU's restorer opens it. Hold [`own_memory_uffd`] while it lives. Dropping it
/// closes the userfaultfd first, then unmaps the region: with the descriptor open, the unmap
/// would wait for someone to read its unmap event.
pub struct UffdRegion {
    pub base: u64,
    pub len: usize,
    /// Taken by a test that hands it to a server.
    pub uffd: Option<crate::uffd::Uffd>,
}

impl UffdRegion {
    pub fn new(pages: usize) -> Self {
        let len = pages * crate::page::SIZE;
        let base = map_anonymous(len);
        let uffd = crate::uffd::open_like_criu().expect("userfaultfd");
        uffd.register_missing(base, len as u64).unwrap();
        UffdRegion {
            base,
            len,
            uffd: Some(uffd),
        }
    }

    /// The address of page `i`.
    pub fn page(&self, i: usize) -> u64 {
        self.base + (i * crate::page::SIZE) as u64
    }

    /// Reads the u64 at the start of page `i` (a fault the server must serve, if missing).
    pub fn read_u64(&self, i: usize) -> u64 {
        assert!(i * crate::page::SIZE < self.len);
        // SAFETY: within our own mapping; a missing page is installed by the test's server.
        unsafe { std::ptr::read_volatile(self.page(i) as *const u64) }
    }
}

impl Drop for UffdRegion {
    fn drop(&mut self) {
        drop(self.uffd.take());
        // SAFETY: unmaps our own region; nothing refers to it any more.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

use crate::images::{
    encode_entries, Header, MmEntry, PageRange, Pagemap, PstreeEntry, VmaEntry, MM_MAGIC, PE_LAZY,
    PSTREE_MAGIC,
};
use crate::page::SIZE_U64 as PAGE;
use crate::policy::ConvergencePolicy;
use crate::record::Store;
use crate::source::{HookError, MigrateParams, SourceHooks, TaskIds};
use crate::wire::Auth;

/// Writes the images a `--lazy-pages` dump of task `pid` with one private anonymous mapping
/// `[base, base + pages)` would contain as far as memory goes: pstree, mm, and a pagemap whose
/// range is PE_LAZY without data; and as far as the grant check goes (inventory, core, ids): a
/// task of uid 0 without capabilities in namespaces of its own, within `Grant::default()`.
pub fn write_lazy_images(dir: &Path, pid: u32, base: u64, pages: u64) {
    let page = PAGE;
    write_task_images(dir, pid);
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

/// The images the grant check reads for task `pid` ([`crate::grant::check`]).
pub fn write_task_images(dir: &Path, pid: u32) {
    use crate::grant::creds::{CoreEntry, CredsEntry, TaskCoreEntry, ThreadCoreEntry};
    use crate::grant::namespaces::IDS_MAGIC;
    use crate::images::{InventoryEntry, TaskKobjIdsEntry, CORE_MAGIC};
    let ids = |ns: u32| TaskKobjIdsEntry {
        vm_id: 1,
        files_id: 1,
        fs_id: 1,
        sighand_id: 1,
        pid_ns_id: Some(ns),
        net_ns_id: Some(ns + 1),
        ..Default::default()
    };
    let inventory = InventoryEntry {
        img_version: 2,
        root_ids: Some(ids(1)),
        ..Default::default()
    };
    fs::write(
        dir.join("inventory.img"),
        encode_entries(Header::Inventory, &[inventory]),
    )
    .unwrap();
    fs::write(
        dir.join(format!("ids-{pid}.img")),
        encode_entries(Header::Common(IDS_MAGIC), &[ids(10)]),
    )
    .unwrap();
    let core = CoreEntry {
        mtype: 1,
        tc: Some(TaskCoreEntry {
            task_state: 1,
            comm: "writer".into(),
            old_seccomp_mode: None,
        }),
        ids: None,
        thread_core: Some(ThreadCoreEntry {
            creds: Some(CredsEntry::default()),
            seccomp_mode: None,
        }),
    };
    fs::write(
        dir.join(format!("core-{pid}.img")),
        encode_entries(Header::Common(CORE_MAGIC), &[core]),
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
        // Inherited by the child at fork.
        let base = map_anonymous(len);
        // Populate every page before the fork: the child starts with 16 MiB resident.
        // SAFETY: within the mapping we just made.
        unsafe { std::ptr::write_bytes(base as *mut u8, 0x5a, len) };
        let pid = {
            let _no_userfaultfd = OWN_MEMORY_UFFD.read().unwrap_or_else(|e| e.into_inner());
            // SAFETY: the child only writes its own memory and sleeps (async-signal-safe work)
            // until it is killed; it never returns into the test harness.
            unsafe { libc::fork() }
        };
        assert!(pid >= 0);
        if pid == 0 {
            // The child only writes its memory: it must not keep the test's sockets open.
            // SAFETY: close_range only closes descriptors of this (child) process.
            unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
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

/// Stops our child `pid` (the writer's freeze) and gives the signal a moment to take effect.
pub fn stop(pid: libc::pid_t) {
    // SAFETY: stops our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    thread::sleep(Duration::from_millis(50));
}

/// The runtime's part of a migration, played on a forked writer: SIGSTOP freezes it, the final
/// dump writes stand-in lazy-dump images, SIGCONT resumes it.
pub struct WriterHooks {
    pid: libc::pid_t,
    base: u64,
    len: usize,
    pub frozen: bool,
    pub resumed: bool,
}

impl WriterHooks {
    pub fn new(writer: &Writer) -> Self {
        WriterHooks {
            pid: writer.pid,
            base: writer.base,
            len: writer.len,
            frozen: false,
            resumed: false,
        }
    }
}

impl SourceHooks for WriterHooks {
    fn tasks(&mut self) -> Result<Vec<TaskIds>, HookError> {
        Ok(vec![TaskIds {
            host_pid: self.pid as u32,
            ns_pid: 1,
        }])
    }
    fn freeze(&mut self) -> Result<(), HookError> {
        stop(self.pid);
        self.frozen = true;
        Ok(())
    }
    fn final_dump(
        &mut self,
        image_dir: &std::path::Path,
        _connections: crate::source::ConnectionDump,
    ) -> Result<(), HookError> {
        write_lazy_images(image_dir, 1, self.base, self.len as u64 / PAGE);
        Ok(())
    }
    fn resume(&mut self) -> Result<(), HookError> {
        // SAFETY: continues our own child.
        unsafe { libc::kill(self.pid, libc::SIGCONT) };
        self.resumed = true;
        Ok(())
    }
}

/// Migration parameters for tests: 3 rounds at most, records under `work_dir/state`, a 2 s
/// resolve timeout.
pub fn params(work_dir: &std::path::Path, key: &Auth) -> MigrateParams {
    MigrateParams {
        migration_id: crate::record::new_migration_id().unwrap(),
        container: "writer".into(),
        destination: "test".into(),
        auth: key.clone(),
        key_file: None,
        store: Store::new(&work_dir.join("state")),
        resolve_timeout: Duration::from_secs(2),
        layer: None,
        external_mounts: Vec::new(),
        move_address: false,
        policy: ConvergencePolicy {
            max_rounds: 3,
            ..Default::default()
        },
        tracker: Some("content-hash".into()),
        compress: false,
        max_bandwidth: None,
        max_cpu: None,
        streams: 1,
        work_dir: work_dir.to_owned(),
    }
}

/// The largest single allocation this thread made since the last call (and resets it): lets a
/// test check that a decoder never allocates what a hostile peer merely claims.
pub fn largest_allocation_reset() -> usize {
    LARGEST_ALLOCATION.with(|l| l.replace(0))
}

thread_local! {
    static LARGEST_ALLOCATION: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The system allocator, noting each thread's largest allocation (tests only).
struct Tracking;

fn note(size: usize) {
    let _ = LARGEST_ALLOCATION.try_with(|l| l.set(l.get().max(size)));
}

// SAFETY: every call is passed on unchanged to the system allocator, which upholds
// GlobalAlloc's contract; noting the size touches only a const-initialised thread-local Cell
// (no allocation, no reentrancy).
unsafe impl std::alloc::GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's layout is passed on as GlobalAlloc::alloc requires.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as in alloc.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: ptr was allocated by System with this layout (every allocation goes there).
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: ptr was allocated by System with layout; the caller upholds realloc's contract.
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// Every page of `writer`'s region is staged (task 1) as `expected` has it; a page never
/// staged must be zero.
pub fn assert_staged(store: &crate::staging::StagingStore, writer: &Writer, expected: &[u8]) {
    for (i, page) in expected.chunks(crate::page::SIZE).enumerate() {
        let addr = writer.base + (i * crate::page::SIZE) as u64;
        match store.get(1, addr) {
            Some(crate::staging::PageRef::Data(staged)) => {
                assert_eq!(staged, page, "page {addr:#x}")
            }
            Some(crate::staging::PageRef::Zero) => {
                assert!(page.iter().all(|&b| b == 0), "page {addr:#x}")
            }
            None => assert!(
                page.iter().all(|&b| b == 0),
                "page {addr:#x} was never staged but is not zero"
            ),
        }
    }
}

/// Reads the writer's whole region (stopped) into a buffer.
pub fn region_of(writer: &Writer) -> Vec<u8> {
    let mut bytes = vec![0u8; writer.len];
    let local = libc::iovec {
        iov_base: bytes.as_mut_ptr().cast(),
        iov_len: bytes.len(),
    };
    let remote = libc::iovec {
        iov_base: writer.base as *mut libc::c_void,
        iov_len: writer.len,
    };
    // SAFETY: reads the region of our stopped child into `bytes`, which is as long.
    let n = unsafe { libc::process_vm_readv(writer.pid, &local, 1, &remote, 1, 0) };
    assert_eq!(n, writer.len as isize);
    bytes
}

/// A receiver on a free loopback port that waits 30 s for its source (`configure` changes the
/// rest); its address.
pub fn loopback_receiver(
    store: &Store,
    key: &Auth,
    configure: impl FnOnce(&mut crate::destination::ReceiveOptions),
) -> (crate::destination::Receiver, String) {
    let mut options =
        crate::destination::ReceiveOptions::new("127.0.0.1:0", key.clone(), store.clone());
    options.accept_timeout = Duration::from_secs(30);
    configure(&mut options);
    let mut address = String::new();
    let receiver =
        crate::destination::Receiver::bind(options, crate::cancel::Cancel::default(), |event| {
            if let crate::events::ServerEvent::Listening { address: a } = event {
                address = a;
            }
        })
        .unwrap();
    (receiver, address)
}
