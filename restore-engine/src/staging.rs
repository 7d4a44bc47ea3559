//! The staging page store: memory of the container being restored, held in local RAM until
//! the lazy-pages server installs it.
//!
//! Pages are keyed by (task pid in the container's pid namespace, page-aligned virtual address).
//! Contents live in large slabs (no allocation per page); a hash map gives O(1) lookup from a
//! page to its slot. Pages stored in address order occupy consecutive slots, so a run of pages
//! can be installed with one large UFFDIO_COPY straight from the slab. Zero pages are markers
//! that take no slab space. Installed pages are released; a slab whose pages are all released
//! is freed.

use std::collections::HashMap;

use crate::page;

/// Pages per slab (4 MiB): large enough for 1 MiB+ copies, small enough to free memory early.
pub const SLAB_PAGES: usize = 1024;
/// Bytes of one slab.
const SLAB_BYTES: u64 = (SLAB_PAGES * page::SIZE) as u64;
/// What one index entry costs in the hash map: the key and slot, plus hashbrown's control byte.
const INDEX_ENTRY_BYTES: u64 = (std::mem::size_of::<((TaskPid, u64), Slot)>() + 1) as u64;

/// Bytes a hash map with room for `capacity` entries holds (hashbrown keeps at most 7/8 of its
/// buckets full, and has a power of two of them).
fn index_bytes(capacity: usize) -> u64 {
    if capacity == 0 {
        return 0;
    }
    (capacity as u64 * 8).div_ceil(7).next_power_of_two() * INDEX_ENTRY_BYTES
}

/// A task pid as CRIU's images name it (inside the container's pid namespace).
pub type TaskPid = u32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Zero,
    Data(u32),
}

/// A page's content as the store holds it.
#[derive(Debug, PartialEq, Eq)]
pub enum PageRef<'a> {
    Zero,
    Data(&'a [u8]),
}

/// A run of pages that can be installed with one copy: consecutive addresses, contiguous memory
/// (or all zero).
#[derive(Debug, PartialEq, Eq)]
pub struct Run<'a> {
    pub vaddr: u64,
    pub pages: usize,
    /// `None` for a run of zero pages.
    pub data: Option<&'a [u8]>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StagingError {
    #[error("address {0:#x} is not page aligned")]
    Unaligned(u64),
    #[error("page content of {0} bytes is not a whole number of pages")]
    PartialPage(usize),
    #[error("the staging store is full ({0} pages of data): raise its limit or free memory")]
    Full(usize),
}

struct Slab {
    bytes: Vec<u8>,
    live: usize,
}

/// The store. Not thread-safe by itself; the server owns it.
pub struct StagingStore {
    index: HashMap<(TaskPid, u64), Slot>,
    slabs: Vec<Option<Slab>>,
    /// Next free slot at the end of the newest slab (slots are not reused inside a slab: a run
    /// stays contiguous, and a released slab goes back to the OS at once).
    next_slot: u32,
    max_data_pages: usize,
    data_pages: usize,
}

impl Default for StagingStore {
    fn default() -> Self {
        Self::new(usize::MAX)
    }
}

impl StagingStore {
    /// A store that holds at most `max_data_pages` pages of data (zero pages are free).
    pub fn new(max_data_pages: usize) -> Self {
        StagingStore {
            index: HashMap::new(),
            slabs: Vec::new(),
            next_slot: 0,
            max_data_pages,
            data_pages: 0,
        }
    }

    /// Pages currently held (data and zero markers).
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Bytes of page data currently held.
    pub fn data_bytes(&self) -> usize {
        self.data_pages * page::SIZE
    }

    /// Bytes the store holds: every live slab whole (a partly used slab is counted in full), the
    /// index at its capacity and the slab table. What a receiver limits
    /// ([`crate::destination::limits`]).
    pub fn footprint(&self) -> u64 {
        let live = self.slabs.iter().filter(|s| s.is_some()).count() as u64;
        live * SLAB_BYTES
            + index_bytes(self.index.capacity())
            + (self.slabs.capacity() * std::mem::size_of::<Option<Slab>>()) as u64
    }

    /// An upper bound of [`Self::footprint`] after storing `data_pages` pages of data and
    /// `zero_pages` zero markers, all assumed new (a page stored again reuses its slot): new
    /// slabs, and the index grown (while it grows, the old and the new table are both held).
    pub fn footprint_after(&self, data_pages: usize, zero_pages: usize) -> u64 {
        let slots = self.next_slot as u64 + data_pages as u64;
        let new_slabs = slots
            .div_ceil(SLAB_PAGES as u64)
            .saturating_sub(self.slabs.len() as u64);
        let entries = self.index.len() + data_pages + zero_pages;
        let index = if entries > self.index.capacity() {
            let grown = entries.max(self.index.capacity().saturating_mul(2));
            index_bytes(self.index.capacity()) + index_bytes(grown)
        } else {
            0
        };
        let table = if new_slabs > 0 {
            (self.slabs.len() + new_slabs as usize) * std::mem::size_of::<Option<Slab>>() * 2
        } else {
            0
        };
        self.footprint()
            .saturating_add(new_slabs.saturating_mul(SLAB_BYTES))
            .saturating_add(index)
            .saturating_add(table as u64)
    }

    fn slot_location(slot: u32) -> (usize, usize) {
        let slot = slot as usize;
        (slot / SLAB_PAGES, (slot % SLAB_PAGES) * page::SIZE)
    }

    fn page_bytes(&self, slot: u32) -> &[u8] {
        let (slab, offset) = Self::slot_location(slot);
        let slab = self.slabs[slab]
            .as_ref()
            .expect("a live slot points into a live slab");
        &slab.bytes[offset..offset + page::SIZE]
    }

    fn allocate_slot(&mut self) -> Result<u32, StagingError> {
        if self.data_pages >= self.max_data_pages {
            return Err(StagingError::Full(self.data_pages));
        }
        let slot = self.next_slot;
        let (slab, _) = Self::slot_location(slot);
        if slab == self.slabs.len() {
            self.slabs.push(Some(Slab {
                // calloc'd: the kernel provides zero pages lazily, nothing is touched here.
                bytes: vec![0u8; SLAB_PAGES * page::SIZE],
                live: 0,
            }));
        }
        self.next_slot += 1;
        self.data_pages += 1;
        if let Some(s) = self.slabs[slab].as_mut() {
            s.live += 1;
        }
        Ok(slot)
    }

    fn release_slot(&mut self, slot: Slot) {
        if let Slot::Data(slot) = slot {
            let (slab_index, _) = Self::slot_location(slot);
            self.data_pages -= 1;
            let is_current = slab_index == (self.next_slot as usize).saturating_sub(1) / SLAB_PAGES;
            if let Some(slab) = self.slabs[slab_index].as_mut() {
                slab.live -= 1;
                if slab.live == 0 && !is_current {
                    self.slabs[slab_index] = None;
                }
            }
        }
    }

    /// Stores (or replaces) the contents of consecutive pages starting at `vaddr`.
    pub fn put(&mut self, pid: TaskPid, vaddr: u64, data: &[u8]) -> Result<(), StagingError> {
        if vaddr % page::SIZE_U64 != 0 {
            return Err(StagingError::Unaligned(vaddr));
        }
        if data.len() % page::SIZE != 0 {
            return Err(StagingError::PartialPage(data.len()));
        }
        for (i, page) in data.chunks_exact(page::SIZE).enumerate() {
            let addr = vaddr + (i * page::SIZE) as u64;
            let existing = self.index.get(&(pid, addr)).copied();
            let slot = match existing {
                // Rewrite in place: a newer round's content for the same page.
                Some(Slot::Data(slot)) => slot,
                other => {
                    let slot = self.allocate_slot()?;
                    if other.is_some() {
                        self.index.remove(&(pid, addr));
                    }
                    self.index.insert((pid, addr), Slot::Data(slot));
                    slot
                }
            };
            let (slab, offset) = Self::slot_location(slot);
            let slab = self.slabs[slab].as_mut().expect("slot in a live slab");
            slab.bytes[offset..offset + page::SIZE].copy_from_slice(page);
        }
        Ok(())
    }

    /// Marks `pages` pages from `vaddr` as zero-filled.
    pub fn put_zero(&mut self, pid: TaskPid, vaddr: u64, pages: usize) -> Result<(), StagingError> {
        if vaddr % page::SIZE_U64 != 0 {
            return Err(StagingError::Unaligned(vaddr));
        }
        for i in 0..pages {
            let addr = vaddr + (i * page::SIZE) as u64;
            if let Some(old) = self.index.insert((pid, addr), Slot::Zero) {
                self.release_slot(old);
            }
        }
        Ok(())
    }

    /// The content of one page, if staged.
    pub fn get(&self, pid: TaskPid, vaddr: u64) -> Option<PageRef<'_>> {
        let page = vaddr & !(page::SIZE_U64 - 1);
        match self.index.get(&(pid, page))? {
            Slot::Zero => Some(PageRef::Zero),
            Slot::Data(slot) => Some(PageRef::Data(self.page_bytes(*slot))),
        }
    }

    /// The longest installable run starting at `vaddr` (at most `max_pages`): consecutive staged
    /// pages whose data is contiguous in one slab, or consecutive zero pages.
    pub fn run_at(&self, pid: TaskPid, vaddr: u64, max_pages: usize) -> Option<Run<'_>> {
        let first = *self.index.get(&(pid, vaddr))?;
        let mut pages = 1;
        match first {
            Slot::Zero => {
                while pages < max_pages
                    && self.index.get(&(pid, vaddr + (pages * page::SIZE) as u64))
                        == Some(&Slot::Zero)
                {
                    pages += 1;
                }
                Some(Run {
                    vaddr,
                    pages,
                    data: None,
                })
            }
            Slot::Data(slot) => {
                let (slab, offset) = Self::slot_location(slot);
                let room = SLAB_PAGES - offset / page::SIZE;
                while pages < max_pages.min(room)
                    && self.index.get(&(pid, vaddr + (pages * page::SIZE) as u64))
                        == Some(&Slot::Data(slot + pages as u32))
                {
                    pages += 1;
                }
                let bytes = &self.slabs[slab].as_ref().expect("live slab").bytes
                    [offset..offset + pages * page::SIZE];
                Some(Run {
                    vaddr,
                    pages,
                    data: Some(bytes),
                })
            }
        }
    }

    /// Releases `pages` pages from `vaddr` (installed, or no longer needed).
    pub fn release(&mut self, pid: TaskPid, vaddr: u64, pages: usize) {
        for i in 0..pages {
            if let Some(slot) = self.index.remove(&(pid, vaddr + (i * page::SIZE) as u64)) {
                self.release_slot(slot);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; page::SIZE]
    }

    #[test]
    fn put_get_and_replace() {
        let mut store = StagingStore::default();
        store.put(1, 0x1000, &page(7)).unwrap();
        assert_eq!(store.get(1, 0x1000), Some(PageRef::Data(&page(7)[..])));
        assert_eq!(store.get(1, 0x1abc), Some(PageRef::Data(&page(7)[..])));
        assert_eq!(store.get(2, 0x1000), None);
        store.put(1, 0x1000, &page(8)).unwrap();
        assert_eq!(store.get(1, 0x1000), Some(PageRef::Data(&page(8)[..])));
        assert_eq!(store.len(), 1);
        assert_eq!(store.data_bytes(), page::SIZE);
    }

    #[test]
    fn consecutive_pages_form_one_contiguous_run() {
        let mut store = StagingStore::default();
        let mut data = Vec::new();
        for i in 0..10u8 {
            data.extend_from_slice(&page(i));
        }
        store.put(1, 0x10000, &data).unwrap();
        let run = store.run_at(1, 0x10000, 64).unwrap();
        assert_eq!(run.pages, 10);
        assert_eq!(run.data.unwrap(), &data[..]);
        let capped = store.run_at(1, 0x10000, 4).unwrap();
        assert_eq!(capped.pages, 4);
    }

    #[test]
    fn zero_pages_take_no_data_and_form_runs() {
        let mut store = StagingStore::default();
        store.put_zero(3, 0x4000, 5).unwrap();
        assert_eq!(store.data_bytes(), 0);
        assert_eq!(store.get(3, 0x5000), Some(PageRef::Zero));
        let run = store.run_at(3, 0x4000, 100).unwrap();
        assert_eq!((run.pages, run.data), (5, None));
        // Data replacing a zero page, and zero replacing data.
        store.put(3, 0x4000, &page(1)).unwrap();
        assert_eq!(store.data_bytes(), page::SIZE);
        store.put_zero(3, 0x4000, 1).unwrap();
        assert_eq!(store.data_bytes(), 0);
    }

    #[test]
    fn releasing_every_page_of_a_slab_frees_it() {
        let mut store = StagingStore::default();
        let data = vec![9u8; page::SIZE * SLAB_PAGES];
        store.put(1, 0, &data).unwrap();
        store
            .put(1, (SLAB_PAGES * page::SIZE) as u64, &page(1))
            .unwrap();
        assert!(store.slabs[0].is_some());
        store.release(1, 0, SLAB_PAGES);
        assert!(store.slabs[0].is_none(), "a fully released slab is freed");
        assert_eq!(store.len(), 1);
        assert_eq!(store.data_bytes(), page::SIZE);
    }

    #[test]
    fn runs_never_cross_a_slab_boundary() {
        let mut store = StagingStore::default();
        let data = vec![1u8; page::SIZE * (SLAB_PAGES + 10)];
        store.put(1, 0, &data).unwrap();
        assert_eq!(store.run_at(1, 0, usize::MAX).unwrap().pages, SLAB_PAGES);
        let second = store
            .run_at(1, (SLAB_PAGES * page::SIZE) as u64, usize::MAX)
            .unwrap();
        assert_eq!(second.pages, 10);
    }

    #[test]
    fn the_footprint_counts_slabs_and_the_index_and_bounds_what_comes() {
        let mut store = StagingStore::default();
        let empty = store.footprint();
        assert!(empty < 4096, "{empty}");
        let before = store.footprint_after(SLAB_PAGES + 1, 1000);
        assert!(
            before >= 2 * SLAB_BYTES + 1000 * INDEX_ENTRY_BYTES,
            "{before}"
        );
        store
            .put(1, 0, &vec![1u8; (SLAB_PAGES + 1) * page::SIZE])
            .unwrap();
        store.put_zero(1, 1 << 30, 1000).unwrap();
        let held = store.footprint();
        assert!(held >= 2 * SLAB_BYTES + 2025 * INDEX_ENTRY_BYTES, "{held}");
        assert!(held <= before, "{held} > {before}: the bound was not one");
        // Pages stored again take no new room; freed slabs are no longer counted.
        assert_eq!(store.footprint_after(0, 0), held);
        store.release(1, 0, SLAB_PAGES);
        assert!(store.footprint() <= held - SLAB_BYTES);
    }

    #[test]
    fn limits_and_alignment_are_enforced() {
        let mut store = StagingStore::new(2);
        assert_eq!(
            store.put(1, 0x123, &page(0)),
            Err(StagingError::Unaligned(0x123))
        );
        assert_eq!(
            store.put(1, 0x1000, &[0u8; 100]),
            Err(StagingError::PartialPage(100))
        );
        store.put(1, 0x1000, &page(1)).unwrap();
        store.put(1, 0x2000, &page(1)).unwrap();
        assert_eq!(store.put(1, 0x3000, &page(1)), Err(StagingError::Full(2)));
    }
}
