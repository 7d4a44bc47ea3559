//! `PAGEMAP_SCAN` on /proc/PID/pagemap (fs/proc/task_mmu.c, Linux 6.7+): what the
//! write-protect tracker asks each round. (Its `UFFDIO_API` and `UFFDIO_REGISTER` calls are
//! crate::uffd's.)

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `struct pm_scan_arg` (linux/fs.h).
#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region`: pages `[start, end)` that share `categories`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

/// Write-protect the pages reported (atomically with the report).
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Fail (EPERM) on a mapping that is not registered for asynchronous write-protect, rather
/// than skip it.
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
/// Written since it was last protected (or never protected).
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
/// A guard region (MADV_GUARD_INSTALL, glibc ≥ 2.41 thread stacks): its marker looks like a
/// swapped page, but there is nothing to read (Linux 6.14+; older kernels have no guard
/// regions and refuse the bit).
pub const PAGE_IS_GUARD: u64 = 1 << 8;

/// Whether this kernel knows [`PAGE_IS_GUARD`] (0: not asked yet, 1: yes, 2: no).
static GUARD_CATEGORY: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

nix::ioctl_readwrite!(pagemap_scan, b'f', 16, PmScanArg);

/// Whether the PAGEMAP_SCAN ioctl on /proc/PID/pagemap exists (Linux 6.7+).
pub fn pagemap_scan_available() -> bool {
    let Ok(file) = File::open("/proc/self/pagemap") else {
        return false;
    };
    let probe_page = [0u8; 1];
    let start = probe_page.as_ptr() as u64 & !4095;
    let mut arg = PmScanArg {
        size: std::mem::size_of::<PmScanArg>() as u64,
        flags: 0,
        start,
        end: start + 4096,
        walk_end: 0,
        vec: 0,
        vec_len: 0,
        max_pages: 0,
        category_inverted: 0,
        category_mask: 0,
        category_anyof_mask: 0,
        return_mask: 0,
    };
    // SAFETY: a valid pm_scan_arg with no output vector; the kernel only reads it and writes
    // walk_end.
    unsafe { pagemap_scan(file.as_raw_fd(), &mut arg) }.is_ok()
}

/// Reports the written pages of `[start, end)` (one mapping registered for asynchronous
/// write-protect) and protects them again, in one step: `visit` gets each range with its
/// categories (present or swapped and not a guard: it has content; neither: it was discarded
/// or never touched).
/// `regions` is a reused output buffer. EPERM: the mapping is not registered (any more).
pub fn take_written(
    pagemap: &File,
    start: u64,
    end: u64,
    regions: &mut Vec<PageRegion>,
    visit: impl FnMut(&PageRegion),
) -> io::Result<()> {
    scan(
        pagemap,
        (start, end),
        PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
        Ask {
            inverted: 0,
            mask: PAGE_IS_WRITTEN,
            returned: PAGE_IS_WRITTEN | PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
        },
        regions,
        visit,
    )
}

/// Reports the pages of `[start, end)` that pagemap shows as swapped, guard regions left out:
/// on a host without swap, the uffd-wp markers that protection left on pages never there.
/// Changes nothing.
pub fn swapped(
    pagemap: &File,
    start: u64,
    end: u64,
    regions: &mut Vec<PageRegion>,
    visit: impl FnMut(&PageRegion),
) -> io::Result<()> {
    scan(
        pagemap,
        (start, end),
        0,
        Ask {
            // Swapped and (where the kernel knows guard regions) not a guard.
            inverted: PAGE_IS_GUARD,
            mask: PAGE_IS_SWAPPED | PAGE_IS_GUARD,
            returned: PAGE_IS_SWAPPED,
        },
        regions,
        visit,
    )
}

/// Which pages a scan reports: those whose categories, with `inverted` flipped, have every
/// bit of `mask`; `returned`: the categories reported. [`PAGE_IS_GUARD`] is dropped from all
/// three on a kernel without guard regions.
struct Ask {
    inverted: u64,
    mask: u64,
    returned: u64,
}

fn scan(
    pagemap: &File,
    (start, end): (u64, u64),
    flags: u64,
    ask: Ask,
    regions: &mut Vec<PageRegion>,
    mut visit: impl FnMut(&PageRegion),
) -> io::Result<()> {
    use std::sync::atomic::Ordering;
    if regions.is_empty() {
        regions.resize(4096, PageRegion::default());
    }
    let mut guard = GUARD_CATEGORY.load(Ordering::Relaxed) != 2;
    let mut at = start;
    while at < end {
        let guard_bit = if guard { PAGE_IS_GUARD } else { 0 };
        let no_guard = !PAGE_IS_GUARD | guard_bit;
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags,
            start: at,
            end,
            walk_end: 0,
            vec: regions.as_mut_ptr() as u64,
            vec_len: regions.len() as u64,
            max_pages: 0,
            category_inverted: ask.inverted & no_guard,
            category_mask: ask.mask & no_guard,
            category_anyof_mask: 0,
            return_mask: (ask.returned | guard_bit) & no_guard,
        };
        // SAFETY: `arg` is a valid pm_scan_arg whose vector is `regions` (vec_len entries of
        // struct page_region, which the kernel fills).
        let filled = match unsafe { pagemap_scan(pagemap.as_raw_fd(), &mut arg) } {
            Ok(n) => {
                GUARD_CATEGORY.store(if guard { 1 } else { 2 }, Ordering::Relaxed);
                n as usize
            }
            // A kernel before guard regions refuses the category (before doing anything).
            Err(nix::errno::Errno::EINVAL)
                if guard && GUARD_CATEGORY.load(Ordering::Relaxed) == 0 =>
            {
                guard = false;
                GUARD_CATEGORY.store(2, Ordering::Relaxed);
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        for region in &regions[..filled.min(regions.len())] {
            visit(region);
        }
        if arg.walk_end <= at {
            break;
        }
        at = arg.walk_end;
    }
    Ok(())
}
