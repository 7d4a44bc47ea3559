//! The staging page store: memory of the container being restored, held in local RAM until
//! the lazy-pages server installs it.
//!
//! Pages are keyed by (task pid in the container's pid namespace, page-aligned virtual address).
//! Contents live in large slabs (no allocation per page), each its own anonymous mapping, so a
//! slab whose pages are all installed goes back to the system at once (an allocator's heap may
//! keep it), and a page installed alone is discarded from its slab. The index is dense: a hash
//! map of blocks, each an array of the 512 slots of 2 MiB of a task's address space (a page
//! costs 4 bytes of index, and the map holds 512 times fewer entries than pages). Pages stored
//! in address order occupy consecutive slots, so a run of pages can be installed with one large
//! UFFDIO_COPY straight from the slab. Zero pages are markers that take no slab space.

use std::collections::HashMap;

use crate::page;

/// Pages per slab (4 MiB): large enough for 1 MiB+ copies, small enough to free memory early.
pub const SLAB_PAGES: usize = 1024;
/// Bytes of one slab.
const SLAB_BYTES: u64 = (SLAB_PAGES * page::SIZE) as u64;
/// Pages of address space one index block covers (2 MiB).
const BLOCK_PAGES: usize = 512;
const BLOCK_SPAN: u64 = (BLOCK_PAGES * page::SIZE) as u64;
/// What one index block costs: its slots and count, and the hash map's entry for it (key,
/// pointer, control byte; the map keeps at most 7/8 of its buckets full).
const BLOCK_BYTES: u64 = (std::mem::size_of::<Block>()
    + (std::mem::size_of::<(BlockKey, Box<Block>)>() + 1) * 8 / 7
    + 1) as u64;

/// A task pid as CRIU's images name it (inside the container's pid namespace).
pub type TaskPid = u32;

/// (task, address / 2 MiB).
type BlockKey = (TaskPid, u64);

/// A slot of the index: empty, a zero page, or the slab slot holding the page's data.
const EMPTY: u32 = u32::MAX;
const ZERO: u32 = u32::MAX - 1;
/// Data slots stay below the markers: 2^32 - 2 pages is 16 TiB.
const MAX_DATA_SLOT: u32 = ZERO - 1;

/// The index of 2 MiB of one task's address space.
struct Block {
    slots: [u32; BLOCK_PAGES],
    /// Slots that are not empty.
    used: u16,
}

fn block_key(pid: TaskPid, vaddr: u64) -> (BlockKey, usize) {
    (
        (pid, vaddr / BLOCK_SPAN),
        ((vaddr % BLOCK_SPAN) / page::SIZE_U64) as usize,
    )
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
    #[error("no memory for a staging slab: {0}")]
    NoMemory(String),
}

struct Slab {
    bytes: memmap2::MmapMut,
    live: usize,
}

/// The store. Not thread-safe by itself; the server owns it.
pub struct StagingStore {
    index: HashMap<BlockKey, Box<Block>>,
    /// Pages held (data and zero markers).
    entries: usize,
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
            entries: 0,
            slabs: Vec::new(),
            next_slot: 0,
            max_data_pages: max_data_pages.min(MAX_DATA_SLOT as usize),
            data_pages: 0,
        }
    }

    /// Pages currently held (data and zero markers).
    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Bytes of page data currently held.
    pub fn data_bytes(&self) -> usize {
        self.data_pages * page::SIZE
    }

    /// Bytes the store holds: every live slab whole (a partly used slab is counted in full), the
    /// index blocks and the slab table. What a receiver limits ([`crate::destination::limits`]).
    pub fn footprint(&self) -> u64 {
        self.live_slabs() * SLAB_BYTES
            + self.index.capacity().max(self.index.len()) as u64 * BLOCK_BYTES
            + (self.slabs.capacity() * std::mem::size_of::<Option<Slab>>()) as u64
    }

    /// An upper bound of [`Self::footprint`] after storing `data_pages` pages of data of task
    /// `pid`, all assumed new (a page stored again reuses its slot), with the pages stored (data
    /// or zero) at the addresses `addresses` gives: new slabs, new index blocks (while the map
    /// grows, the old and the new table are both held) and a grown slab table.
    pub fn footprint_after(
        &self,
        pid: TaskPid,
        data_pages: usize,
        addresses: impl IntoIterator<Item = (u64, usize)>,
    ) -> u64 {
        let slots = self.next_slot as u64 + data_pages as u64;
        let new_slabs = slots
            .div_ceil(SLAB_PAGES as u64)
            .saturating_sub(self.slabs.len() as u64);
        let mut new_blocks = std::collections::HashSet::new();
        for (vaddr, pages) in addresses {
            let first = vaddr / BLOCK_SPAN;
            let last = vaddr
                .saturating_add((pages as u64).saturating_mul(page::SIZE_U64))
                .saturating_sub(1)
                / BLOCK_SPAN;
            for block in first..=last.max(first) {
                if !self.index.contains_key(&(pid, block)) {
                    new_blocks.insert(block);
                }
            }
        }
        let blocks = self.index.len() + new_blocks.len();
        let index = if blocks > self.index.capacity() {
            // Growing: both tables for a moment (the blocks themselves are counted once).
            // (hashbrown's small tables grow by more than twice: 3 → 7 entries.)
            (blocks.max(self.index.capacity() * 2 + 8) + self.index.capacity()) as u64 * BLOCK_BYTES
        } else {
            self.index.capacity() as u64 * BLOCK_BYTES
        };
        let table = if new_slabs > 0 {
            // (A Vec's first allocation holds 4.)
            (self.slabs.len() + new_slabs as usize + 4) * std::mem::size_of::<Option<Slab>>() * 2
        } else {
            0
        };
        (self.live_slabs() + new_slabs)
            .saturating_mul(SLAB_BYTES)
            .saturating_add(index)
            .saturating_add(
                (self.slabs.capacity() * std::mem::size_of::<Option<Slab>>()) as u64 + table as u64,
            )
    }

    /// Slabs still mapped.
    fn live_slabs(&self) -> u64 {
        self.slabs.iter().filter(|s| s.is_some()).count() as u64
    }

    fn slot_location(slot: u32) -> (usize, usize) {
        let slot = slot as usize;
        (slot / SLAB_PAGES, (slot % SLAB_PAGES) * page::SIZE)
    }

    fn slab_bytes(&self, slot: u32, pages: usize) -> &[u8] {
        let (slab, offset) = Self::slot_location(slot);
        let slab = self.slabs[slab]
            .as_ref()
            .expect("a live slot points into a live slab");
        &slab.bytes[offset..offset + pages * page::SIZE]
    }

    fn slot(&self, pid: TaskPid, vaddr: u64) -> u32 {
        let (key, i) = block_key(pid, vaddr);
        self.index.get(&key).map_or(EMPTY, |b| b.slots[i])
    }

    fn allocate_slot(&mut self) -> Result<u32, StagingError> {
        if self.data_pages >= self.max_data_pages || self.next_slot >= MAX_DATA_SLOT {
            return Err(StagingError::Full(self.data_pages));
        }
        let slot = self.next_slot;
        let (slab, _) = Self::slot_location(slot);
        if slab == self.slabs.len() {
            // Its own mapping: the kernel provides zero pages lazily, nothing is touched here,
            // and unmapping it returns the memory whatever the allocator does. Not huge pages:
            // a page released alone (installed by a fault) must give its memory back at once,
            // and discarding 4 KiB of a huge page only queues it for a split.
            let bytes = memmap2::MmapMut::map_anon(SLAB_BYTES as usize)
                .map_err(|e| StagingError::NoMemory(e.to_string()))?;
            self.slabs.push(Some(Slab { bytes, live: 0 }));
        }
        self.next_slot += 1;
        self.data_pages += 1;
        if let Some(s) = self.slabs[slab].as_mut() {
            s.live += 1;
        }
        Ok(slot)
    }

    /// Releases a data slot (markers need nothing). Returns where its page lies when its slab
    /// stays mapped (other pages of the slab are still held), for the caller to give that
    /// page's memory back.
    fn release_slot(&mut self, slot: u32) -> Option<(usize, usize)> {
        if slot == EMPTY || slot == ZERO {
            return None;
        }
        let (slab_index, offset) = Self::slot_location(slot);
        self.data_pages -= 1;
        let is_current = slab_index == (self.next_slot as usize).saturating_sub(1) / SLAB_PAGES;
        let slab = self.slabs[slab_index].as_mut()?;
        slab.live -= 1;
        if slab.live == 0 && !is_current {
            self.slabs[slab_index] = None;
            return None;
        }
        Some((slab_index, offset))
    }

    /// Gives the memory of `len` bytes at `offset` in a slab back to the system.
    fn discard(&self, slab: usize, offset: usize, len: usize) {
        if let Some(slab) = self.slabs[slab].as_ref() {
            // SAFETY: the range holds released pages only: no index entry points to them and a
            // slab's slots are never handed out again, so nothing reads their (now zero)
            // contents.
            let _ = unsafe {
                slab.bytes
                    .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len)
            };
        }
    }

    /// Sets the slot of one page, returning what it held (emptying a page of no block creates
    /// none).
    fn set(&mut self, pid: TaskPid, vaddr: u64, slot: u32) -> u32 {
        let (key, i) = block_key(pid, vaddr);
        let block = if slot == EMPTY {
            match self.index.get_mut(&key) {
                Some(block) => block,
                None => return EMPTY,
            }
        } else {
            self.index.entry(key).or_insert_with(|| {
                Box::new(Block {
                    slots: [EMPTY; BLOCK_PAGES],
                    used: 0,
                })
            })
        };
        let old = std::mem::replace(&mut block.slots[i], slot);
        match (old == EMPTY, slot == EMPTY) {
            (true, false) => {
                block.used += 1;
                self.entries += 1;
            }
            (false, true) => {
                block.used -= 1;
                self.entries -= 1;
                if block.used == 0 {
                    self.index.remove(&key);
                }
            }
            _ => {}
        }
        old
    }

    /// Stores (or replaces) the contents of consecutive pages starting at `vaddr`.
    pub fn put(&mut self, pid: TaskPid, vaddr: u64, data: &[u8]) -> Result<(), StagingError> {
        if vaddr % page::SIZE_U64 != 0 {
            return Err(StagingError::Unaligned(vaddr));
        }
        if data.len() % page::SIZE != 0 {
            return Err(StagingError::PartialPage(data.len()));
        }
        for (i, content) in data.chunks_exact(page::SIZE).enumerate() {
            let addr = vaddr + (i * page::SIZE) as u64;
            let slot = match self.slot(pid, addr) {
                // Rewrite in place: a newer round's content for the same page.
                slot if slot < ZERO => slot,
                _ => {
                    let slot = self.allocate_slot()?;
                    self.set(pid, addr, slot);
                    slot
                }
            };
            let (slab, offset) = Self::slot_location(slot);
            let slab = self.slabs[slab].as_mut().expect("slot in a live slab");
            slab.bytes[offset..offset + page::SIZE].copy_from_slice(content);
        }
        Ok(())
    }

    /// Marks `pages` pages from `vaddr` as zero-filled.
    pub fn put_zero(&mut self, pid: TaskPid, vaddr: u64, pages: usize) -> Result<(), StagingError> {
        if vaddr % page::SIZE_U64 != 0 {
            return Err(StagingError::Unaligned(vaddr));
        }
        for i in 0..pages {
            let old = self.set(pid, vaddr + (i * page::SIZE) as u64, ZERO);
            if let Some((slab, offset)) = self.release_slot(old) {
                self.discard(slab, offset, page::SIZE);
            }
        }
        Ok(())
    }

    /// The content of one page, if staged.
    pub fn get(&self, pid: TaskPid, vaddr: u64) -> Option<PageRef<'_>> {
        match self.slot(pid, vaddr & !(page::SIZE_U64 - 1)) {
            EMPTY => None,
            ZERO => Some(PageRef::Zero),
            slot => Some(PageRef::Data(self.slab_bytes(slot, 1))),
        }
    }

    /// The longest installable run starting at `vaddr` (at most `max_pages`): consecutive staged
    /// pages whose data is contiguous in one slab, or consecutive zero pages.
    pub fn run_at(&self, pid: TaskPid, vaddr: u64, max_pages: usize) -> Option<Run<'_>> {
        let first = self.slot(pid, vaddr);
        if first == EMPTY {
            return None;
        }
        // The slot the page `pages` pages on must hold to continue the run.
        let next = |pages: usize| {
            if first == ZERO {
                ZERO
            } else {
                first + pages as u32
            }
        };
        let limit = if first == ZERO {
            max_pages
        } else {
            max_pages.min(SLAB_PAGES - Self::slot_location(first).1 / page::SIZE)
        };
        let mut pages = 1;
        while pages < limit && self.slot(pid, vaddr + (pages * page::SIZE) as u64) == next(pages) {
            pages += 1;
        }
        Some(Run {
            vaddr,
            pages,
            data: (first != ZERO).then(|| self.slab_bytes(first, pages)),
        })
    }

    /// Releases `pages` pages from `vaddr` (installed, or no longer needed). Their memory goes
    /// back to the system at once: a slab whose pages are all released is unmapped, and the
    /// pages of a slab that still holds others are discarded, so a page faulted in ahead of the
    /// background fill is not held twice (in the container and here) until the fill reaches
    /// its slab.
    pub fn release(&mut self, pid: TaskPid, vaddr: u64, pages: usize) {
        // Consecutive pages of one slab are discarded together.
        let mut pending: Option<(usize, usize, usize)> = None;
        for i in 0..pages {
            let old = self.set(pid, vaddr + (i * page::SIZE) as u64, EMPTY);
            let Some((slab, offset)) = self.release_slot(old) else {
                continue;
            };
            pending = match pending {
                Some((s, start, len)) if s == slab && start + len == offset => {
                    Some((s, start, len + page::SIZE))
                }
                other => {
                    if let Some((s, start, len)) = other {
                        self.discard(s, start, len);
                    }
                    Some((slab, offset, page::SIZE))
                }
            };
        }
        if let Some((s, start, len)) = pending {
            self.discard(s, start, len);
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
    fn a_page_released_alone_gives_its_memory_back() {
        let mut store = StagingStore::default();
        store.put(1, 0, &vec![7u8; 4 * page::SIZE]).unwrap();
        let base = store.slabs[0].as_ref().unwrap().bytes.as_ptr();
        let resident = |i: usize| {
            let mut vec = [0u8];
            // SAFETY: asks about one page of the slab, which stays mapped (the store holds
            // other pages of it); `vec` has room for the one answer.
            let ret = unsafe {
                libc::mincore(
                    base.add(i * page::SIZE) as *mut libc::c_void,
                    page::SIZE,
                    vec.as_mut_ptr(),
                )
            };
            assert_eq!(ret, 0);
            vec[0] & 1 == 1
        };
        assert!((0..4).all(resident));
        // Two pages installed by faults: their memory goes back, the others stay.
        store.release(1, page::SIZE_U64, 2);
        assert!(!resident(1) && !resident(2), "released pages are discarded");
        assert!(resident(0) && resident(3));
        assert_eq!(store.get(1, 0), Some(PageRef::Data(&page(7)[..])));
        assert_eq!(
            store.get(1, 3 * page::SIZE_U64),
            Some(PageRef::Data(&page(7)[..]))
        );
        assert_eq!(store.get(1, page::SIZE_U64), None);
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
        let zeros = (0..1000).map(|i| ((1u64 << 30) + i * page::SIZE_U64, 1));
        let before = store.footprint_after(
            1,
            SLAB_PAGES + 1,
            [(0, SLAB_PAGES + 1)].into_iter().chain(zeros),
        );
        // Two slabs; blocks for 4 MiB + 4 KiB of data (3) and 1000 zero pages (2).
        assert!(before >= 2 * SLAB_BYTES + 5 * BLOCK_BYTES, "{before}");
        store
            .put(1, 0, &vec![1u8; (SLAB_PAGES + 1) * page::SIZE])
            .unwrap();
        store.put_zero(1, 1 << 30, 1000).unwrap();
        let held = store.footprint();
        assert!(held >= 2 * SLAB_BYTES + 5 * BLOCK_BYTES, "{held}");
        assert!(held <= before, "{held} > {before}: the bound was not one");
        // Pages stored again take no new room; freed slabs are no longer counted.
        assert_eq!(store.footprint_after(1, 0, [(0, 1), (1 << 30, 1)]), held);
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

    #[derive(Debug, Clone)]
    enum Op {
        Put {
            pid: u32,
            page: u64,
            pages: usize,
            fill: u8,
        },
        Zero {
            pid: u32,
            page: u64,
            pages: usize,
        },
        Release {
            pid: u32,
            page: u64,
            pages: usize,
        },
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        // Pages 0..1600 of two tasks: runs cross the 512-page index blocks and 1024-page slabs.
        let at = (1u32..3, 0u64..1600, 1usize..40);
        prop_oneof![
            (at.clone(), any::<u8>()).prop_map(|((pid, page, pages), fill)| Op::Put {
                pid,
                page,
                pages,
                fill
            }),
            at.clone()
                .prop_map(|(pid, page, pages)| Op::Zero { pid, page, pages }),
            at.prop_map(|(pid, page, pages)| Op::Release { pid, page, pages }),
        ]
    }

    proptest::proptest! {
        #[test]
        fn the_store_holds_what_a_map_of_pages_holds(ops in proptest::collection::vec(op(), 1..60)) {
            // The model: (pid, page) → Some(fill) for data, None for a zero page.
            let mut model: std::collections::HashMap<(u32, u64), Option<u8>> = Default::default();
            let mut store = StagingStore::default();
            let addr = |page: u64| page * page::SIZE_U64;
            for op in ops {
                match op {
                    Op::Put { pid, page, pages, fill } => {
                        store.put(pid, addr(page), &vec![fill; pages * page::SIZE]).unwrap();
                        for p in page..page + pages as u64 {
                            model.insert((pid, p), Some(fill));
                        }
                    }
                    Op::Zero { pid, page, pages } => {
                        store.put_zero(pid, addr(page), pages).unwrap();
                        for p in page..page + pages as u64 {
                            model.insert((pid, p), None);
                        }
                    }
                    Op::Release { pid, page, pages } => {
                        store.release(pid, addr(page), pages);
                        for p in page..page + pages as u64 {
                            model.remove(&(pid, p));
                        }
                    }
                }
            }
            proptest::prop_assert_eq!(store.len(), model.len());
            let data = model.values().filter(|v| v.is_some()).count();
            proptest::prop_assert_eq!(store.data_bytes(), data * page::SIZE);
            for pid in 1..3 {
                for page in 0..1700u64 {
                    let want = model.get(&(pid, page));
                    let got = store.get(pid, addr(page));
                    match (want, &got) {
                        (None, None) | (Some(None), Some(PageRef::Zero)) => {}
                        (Some(Some(fill)), Some(PageRef::Data(bytes))) => {
                            proptest::prop_assert!(bytes.iter().all(|b| b == fill));
                        }
                        _ => proptest::prop_assert!(false, "page {page} of {pid}: {want:?} vs {got:?}"),
                    }
                    // A run starting here holds exactly the pages the model has after it.
                    if let Some(run) = store.run_at(pid, addr(page), 64) {
                        for k in 0..run.pages as u64 {
                            let expected = model.get(&(pid, page + k)).copied();
                            match run.data {
                                None => proptest::prop_assert_eq!(expected, Some(None)),
                                Some(bytes) => {
                                    let fill = bytes[k as usize * page::SIZE];
                                    proptest::prop_assert_eq!(expected, Some(Some(fill)));
                                }
                            }
                        }
                    }
                }
            }
            // Releasing everything frees every slab but the one being filled, and the index.
            for pid in 1..3 {
                store.release(pid, 0, 1700);
            }
            proptest::prop_assert!(store.is_empty());
            proptest::prop_assert!(store.index.is_empty());
            proptest::prop_assert!(store.slabs.iter().filter(|s| s.is_some()).count() <= 1);
        }
    }
}
