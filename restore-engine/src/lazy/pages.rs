//! Where a lazy restore takes its pages from: the staging store (a migration's pre-copied
//! memory) or an image set's page files.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::Path;

use super::LazyError;
use crate::images::{self, ImageError, PE_LAZY, PE_PRESENT};
use crate::page;
use crate::staging::StagingStore;

/// Where lazy pages come from.
pub trait PageSource {
    /// Up to `max_pages` consecutive pages of task `pid` at image address `vaddr`, as one
    /// contiguous slice (or a run of zero pages).
    fn chunk(&self, pid: u32, vaddr: u64, max_pages: usize) -> Option<Chunk<'_>>;
    /// Pages that were installed and are no longer needed.
    fn installed(&mut self, _pid: u32, _vaddr: u64, _pages: usize) {}
}

/// Contents of consecutive pages.
#[derive(Debug, PartialEq, Eq)]
pub enum Chunk<'a> {
    Data(&'a [u8]),
    Zero(usize),
}

impl Chunk<'_> {
    pub fn pages(&self) -> usize {
        match self {
            Chunk::Data(d) => d.len() / page::SIZE,
            Chunk::Zero(n) => *n,
        }
    }
}

impl PageSource for StagingStore {
    fn chunk(&self, pid: u32, vaddr: u64, max_pages: usize) -> Option<Chunk<'_>> {
        let run = self.run_at(pid, vaddr, max_pages)?;
        Some(match run.data {
            Some(bytes) => Chunk::Data(bytes),
            None => Chunk::Zero(run.pages),
        })
    }
    fn installed(&mut self, pid: u32, vaddr: u64, pages: usize) {
        self.release(pid, vaddr, pages);
    }
}

/// Copies the lazy pages of an image set into a staging store (for a restore whose images are
/// not to be read while it runs, and the path migration takes: pages arrive in the store).
pub fn stage_images(dir: &Path, store: &mut StagingStore) -> Result<u64, LazyError> {
    let source = ImageSource::open(dir)?;
    let mut bytes = 0u64;
    for (&pid, task) in &source.tasks {
        for range in task
            .ranges
            .iter()
            .filter(|r| r.is(PE_LAZY) && r.is(PE_PRESENT))
        {
            let len = range.nr_pages * page::SIZE_U64;
            let from = range.file_offset as usize;
            let data = task
                .pages
                .as_deref()
                .and_then(|p| p.get(from..from + len as usize))
                .ok_or(LazyError::MissingPage {
                    pid,
                    vaddr: range.vaddr,
                })?;
            store.put(pid, range.vaddr, data).map_err(|e| {
                LazyError::Protocol(format!("staging task {pid} at {:#x}: {e}", range.vaddr))
            })?;
            bytes += len;
        }
    }
    Ok(bytes)
}

/// Lazy pages read straight from an image set's page files (mapped, so installing is one copy
/// from the page cache).
pub struct ImageSource {
    tasks: HashMap<u32, ImageTask>,
}

struct ImageTask {
    ranges: Vec<images::PageRange>,
    pages: Option<memmap2::Mmap>,
}

impl ImageSource {
    /// Maps the pages of every task in `pstree.img`.
    pub fn open(dir: &Path) -> Result<Self, LazyError> {
        let mut tasks = HashMap::new();
        for task in images::read_pstree(dir)? {
            let pagemap = match images::read_pagemap(dir, task.pid) {
                Ok(p) => p,
                // Zombies have no pagemap.
                Err(ImageError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                    continue
                }
                Err(e) => return Err(e.into()),
            };
            let path = dir.join(format!("pages-{}.img", pagemap.pages_id));
            let pages = match fs::File::open(&path) {
                Ok(file) => {
                    let len = file.metadata()?.len();
                    if len < pagemap.present_bytes() {
                        return Err(ImageError::Corrupt {
                            file: path,
                            offset: len,
                            problem: format!(
                                "truncated: the pagemap needs {} bytes",
                                pagemap.present_bytes()
                            ),
                        }
                        .into());
                    }
                    (len > 0)
                        .then(|| {
                            // SAFETY: image files are not modified while the server reads them.
                            unsafe { memmap2::Mmap::map(&file) }
                        })
                        .transpose()?
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(e.into()),
            };
            tasks.insert(
                task.pid,
                ImageTask {
                    ranges: pagemap.ranges,
                    pages,
                },
            );
        }
        Ok(ImageSource { tasks })
    }
}

impl PageSource for ImageSource {
    fn chunk(&self, pid: u32, vaddr: u64, max_pages: usize) -> Option<Chunk<'_>> {
        let task = self.tasks.get(&pid)?;
        let index = task.ranges.partition_point(|r| r.end() <= vaddr);
        let range = task.ranges.get(index).filter(|r| r.vaddr <= vaddr)?;
        if !range.is(PE_PRESENT) {
            return None;
        }
        let pages = ((range.end() - vaddr) / page::SIZE_U64).min(max_pages as u64);
        let from = (range.file_offset + vaddr - range.vaddr) as usize;
        let bytes = task
            .pages
            .as_deref()?
            .get(from..from + (pages * page::SIZE_U64) as usize)?;
        Some(Chunk::Data(bytes))
    }
}
