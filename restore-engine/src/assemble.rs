//! Eager restore of a migration: completes the final dump's images with the memory staged during
//! pre-copy, so that a plain `criu restore` (no lazy-pages server) can restore them.
//!
//! The final dump is a `--lazy-pages` dump: in each task's `pagemap-<pid>.img` the lazy ranges are
//! marked PE_LAZY without PE_PRESENT and their data is in no `pages-<id>.img`. Assembling rewrites
//! every task's pagemap and pages file so that every range is PE_PRESENT with its data in the
//! pages file: lazy pages from the staging store (their final content, sent by the frozen round),
//! all other pages from the dump's own pages file.
//!
//! CRIU's rules this relies on (criu/mem.c `restore_priv_vma_content`, criu/pagemap.c, CRIU 4.2):
//! - without `--lazy-pages` CRIU reads every pagemap entry's data from the pages file (or the
//!   parent image), whatever its flags: an entry without data would be read from the wrong
//!   offset, so none may remain;
//! - a page in no pagemap entry restores as zero: fresh anonymous memory is zero, and in a child
//!   whose VMA is inherited from its parent, pages the child's pagemap lacks are dropped
//!   (MADV_DONTNEED) after its own pages are read. So staged zero pages are left out as holes,
//!   as CRIU's dump itself leaves out pages mapped to the zero page.
//!
//! Tasks are named by their pid in the container's pid namespace, in CRIU's image names and in
//! the staging store alike; a forked child has its own pagemap, pages file and staged pages, so
//! nothing is shared between tasks here (CRIU shares unchanged pages with the parent itself at
//! restore, by comparing contents).

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::images::{self, ImageError, PageRange, Pagemap, PE_LAZY, PE_PARENT, PE_PRESENT};
use crate::page;
use crate::staging::StagingStore;

/// Errors completing the images. Any of them means the images cannot be restored eagerly; the
/// image directory is left as it was.
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("task {pid}: lazy page {vaddr:#x} is not in the staging store: pre-copy never delivered it, so the images cannot be completed (it is not replaced with zeros); migrate again")]
    MissingPage { pid: u32, vaddr: u64 },
    #[error("task {pid}: {} holds {size} bytes but its pagemap needs {needed}: the image files arrived incomplete; migrate again", file.display())]
    TruncatedPages {
        pid: u32,
        file: PathBuf,
        size: u64,
        needed: u64,
    },
    #[error("task {pid}: pagemap range {vaddr:#x} is in a parent image, but a migration's final dump has no parent: these are not the images of a migration")]
    ParentRange { pid: u32, vaddr: u64 },
    #[error("task {pid}: pagemap range {vaddr:#x} has flags {flags:#x} (neither present, lazy nor in a parent), so there is no data for it: the pagemap is corrupt")]
    NoData { pid: u32, vaddr: u64, flags: u32 },
    #[error("tasks {first} and {second} both name pages-{pages_id}.img, but CRIU gives every task a pages file of its own: the images are corrupt")]
    SharedPagesFile {
        pages_id: u32,
        first: u32,
        second: u32,
    },
    #[error("writing {}: {source}", file.display())]
    Write {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What assembling did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AssembleReport {
    /// Tasks whose pagemap and pages file were rewritten.
    pub tasks: usize,
    /// Lazy pages written from the staging store.
    pub pages_from_staging: u64,
    /// Lazy pages that were staged as zero pages: left out (holes read as zero).
    pub zero_pages: u64,
    /// Pages copied from the dump's own pages files (the non-lazy memory).
    pub pages_from_images: u64,
    /// Bytes of all pages files written.
    pub bytes_written: u64,
    pub seconds: f64,
}

/// Rewrites the pagemap and pages file of every task of the image set in `dir` so that every
/// range is present in its pages file, taking lazy pages from `staging`. Files are replaced only
/// once every task is assembled; on error nothing in `dir` has changed.
pub fn assemble(dir: &Path, staging: &StagingStore) -> Result<AssembleReport, AssembleError> {
    let started = Instant::now();
    let mut report = AssembleReport::default();
    let mut replacements = Replacements::default();
    let mut pages_file_owner: HashMap<u32, u32> = HashMap::new();
    for task in images::read_pstree(dir)? {
        let pid = task.pid;
        let pagemap = match images::read_pagemap(dir, pid) {
            Ok(pagemap) => pagemap,
            // A zombie has no memory and no pagemap.
            Err(ImageError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                continue
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(first) = pages_file_owner.insert(pagemap.pages_id, pid) {
            return Err(AssembleError::SharedPagesFile {
                pages_id: pagemap.pages_id,
                first,
                second: pid,
            });
        }
        let pages_name = format!("pages-{}.img", pagemap.pages_id);
        let dumped = DumpedPages::open(&dir.join(&pages_name), pid, &pagemap)?;
        let mut out = TaskWriter::new(
            replacements.create(dir, &pages_name)?,
            &dir.join(&pages_name),
        );
        for range in &pagemap.ranges {
            if range.is(PE_PARENT) {
                return Err(AssembleError::ParentRange {
                    pid,
                    vaddr: range.vaddr,
                });
            } else if range.is(PE_PRESENT) {
                let data = dumped.range(range);
                out.push(range.vaddr, data)?;
                report.pages_from_images += range.nr_pages;
            } else if range.is(PE_LAZY) {
                let end = range.end();
                let mut vaddr = range.vaddr;
                while vaddr < end {
                    let left = ((end - vaddr) / page::SIZE_U64) as usize;
                    let run = staging
                        .run_at(pid, vaddr, left)
                        .ok_or(AssembleError::MissingPage { pid, vaddr })?;
                    match run.data {
                        Some(data) => {
                            out.push(vaddr, data)?;
                            report.pages_from_staging += run.pages as u64;
                        }
                        None => report.zero_pages += run.pages as u64,
                    }
                    vaddr += run.pages as u64 * page::SIZE_U64;
                }
            } else {
                return Err(AssembleError::NoData {
                    pid,
                    vaddr: range.vaddr,
                    flags: range.flags,
                });
            }
        }
        let (ranges, bytes) = out.finish()?;
        report.bytes_written += bytes;
        let pagemap_name = format!("pagemap-{pid}.img");
        let assembled = Pagemap {
            pages_id: pagemap.pages_id,
            ranges,
        };
        let mut pagemap_file = replacements.create(dir, &pagemap_name)?;
        pagemap_file
            .write_all(&assembled.encode())
            .map_err(|source| AssembleError::Write {
                file: dir.join(&pagemap_name),
                source,
            })?;
        report.tasks += 1;
    }
    replacements.commit()?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// A task's pages file as the dump wrote it (the non-lazy pages), mapped.
struct DumpedPages {
    map: Option<memmap2::Mmap>,
}

impl DumpedPages {
    /// Opens `path` and checks that it holds every present range of `pagemap`.
    fn open(path: &Path, pid: u32, pagemap: &Pagemap) -> Result<Self, AssembleError> {
        let needed = pagemap.present_bytes();
        let file = match fs::File::open(path) {
            Ok(file) => Some(file),
            // CRIU leaves no pages file for a task without non-lazy pages.
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(ImageError::Io {
                    file: path.to_owned(),
                    source,
                }
                .into())
            }
        };
        let size = match &file {
            Some(file) => file
                .metadata()
                .map_err(|source| ImageError::Io {
                    file: path.to_owned(),
                    source,
                })?
                .len(),
            None => 0,
        };
        if size < needed {
            return Err(AssembleError::TruncatedPages {
                pid,
                file: path.to_owned(),
                size,
                needed,
            });
        }
        let map = match file.filter(|_| size > 0) {
            Some(file) => {
                // SAFETY: the received image files are not modified while they are assembled
                // (the rewritten files are new files, renamed over them afterwards).
                let map = unsafe { memmap2::Mmap::map(&file) };
                Some(map.map_err(|source| ImageError::Io {
                    file: path.to_owned(),
                    source,
                })?)
            }
            None => None,
        };
        Ok(DumpedPages { map })
    }

    /// The data of a present range (its bounds were checked against the file size at open).
    fn range(&self, range: &PageRange) -> &[u8] {
        let from = range.file_offset as usize;
        let len = (range.nr_pages * page::SIZE_U64) as usize;
        &self.map.as_deref().unwrap_or(&[])[from..from + len]
    }
}

/// The pages file being written for one task, and the (all present) ranges that describe it.
struct TaskWriter {
    file: PathBuf,
    writer: BufWriter<fs::File>,
    ranges: Vec<PageRange>,
    offset: u64,
}

impl TaskWriter {
    fn new(file: fs::File, final_path: &Path) -> Self {
        TaskWriter {
            file: final_path.to_owned(),
            writer: BufWriter::with_capacity(1 << 20, file),
            ranges: Vec::new(),
            offset: 0,
        }
    }

    /// Appends pages at `vaddr`, extending the last range when they follow it.
    fn push(&mut self, vaddr: u64, data: &[u8]) -> Result<(), AssembleError> {
        let pages = data.len() as u64 / page::SIZE_U64;
        match self.ranges.last_mut() {
            Some(last) if last.end() == vaddr => last.nr_pages += pages,
            _ => self.ranges.push(PageRange {
                vaddr,
                nr_pages: pages,
                flags: PE_PRESENT,
                file_offset: self.offset,
            }),
        }
        self.writer
            .write_all(data)
            .map_err(|source| AssembleError::Write {
                file: self.file.clone(),
                source,
            })?;
        self.offset += data.len() as u64;
        Ok(())
    }

    fn finish(mut self) -> Result<(Vec<PageRange>, u64), AssembleError> {
        self.writer.flush().map_err(|source| AssembleError::Write {
            file: self.file.clone(),
            source,
        })?;
        Ok((self.ranges, self.offset))
    }
}

/// New versions of image files, written beside the originals under temporary names and renamed
/// over them only when all are complete. Whatever is not committed is removed on drop.
#[derive(Default)]
struct Replacements {
    /// (temporary path, final path)
    files: Vec<(PathBuf, PathBuf)>,
}

impl Replacements {
    fn create(&mut self, dir: &Path, name: &str) -> Result<fs::File, AssembleError> {
        // Hidden and without CRIU's prefixes, so nothing takes it for an image file.
        let temporary = dir.join(format!(".{name}.assembling"));
        let file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temporary)
            .map_err(|source| AssembleError::Write {
                file: temporary.clone(),
                source,
            })?;
        self.files.push((temporary, dir.join(name)));
        Ok(file)
    }

    /// Renames every new file over its original. No fsync: the restore reads the files on this
    /// host right away, and after a crash the migration is aborted anyway.
    fn commit(mut self) -> Result<(), AssembleError> {
        for (temporary, final_path) in std::mem::take(&mut self.files) {
            fs::rename(&temporary, &final_path).map_err(|source| AssembleError::Write {
                file: final_path,
                source,
            })?;
        }
        Ok(())
    }
}

impl Drop for Replacements {
    fn drop(&mut self) {
        for (temporary, _) in &self.files {
            let _ = fs::remove_file(temporary);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::{encode_entries, Header, PstreeEntry, PSTREE_MAGIC};

    const PS: u64 = page::SIZE_U64;

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; page::SIZE]
    }

    fn write_pstree(dir: &Path, pids: &[(u32, u32)]) {
        let entries: Vec<PstreeEntry> = pids
            .iter()
            .map(|&(pid, ppid)| PstreeEntry {
                pid,
                ppid,
                pgid: 1,
                sid: 1,
                threads: vec![pid],
            })
            .collect();
        fs::write(
            dir.join("pstree.img"),
            encode_entries(Header::Common(PSTREE_MAGIC), &entries),
        )
        .unwrap();
    }

    fn range(vaddr: u64, nr_pages: u64, flags: u32) -> PageRange {
        PageRange {
            vaddr,
            nr_pages,
            flags,
            file_offset: 0,
        }
    }

    /// What a lazy dump of a parent (pid 1) and its forked child (pid 7) writes: both map the
    /// same addresses (the child inherited them); a non-lazy stack page each (PE_PRESENT, data
    /// in their pages files) and lazy heap ranges without data.
    fn forked_lazy_dump(dir: &Path) {
        write_pstree(dir, &[(1, 0), (7, 1), (9, 1)]);
        for (pid, pages_id, stack) in [(1u32, 1u32, b'S'), (7, 2, b's')] {
            fs::write(
                dir.join(format!("pagemap-{pid}.img")),
                Pagemap {
                    pages_id,
                    ranges: vec![
                        range(0x10000, 4, PE_LAZY),
                        range(0x20000, 2, PE_LAZY),
                        range(0x7f000, 1, PE_PRESENT),
                    ],
                }
                .encode(),
            )
            .unwrap();
            fs::write(dir.join(format!("pages-{pages_id}.img")), page(stack)).unwrap();
        }
        // Pid 9 is a zombie: no pagemap, no memory.
        fs::write(dir.join("core-1.img"), b"opaque").unwrap();
    }

    /// The staged memory of both tasks: different contents at the same addresses; page 0x12000
    /// of the parent and 0x21000 of the child are zero pages.
    fn staged() -> StagingStore {
        let mut store = StagingStore::default();
        for (pid, base) in [(1u32, 0x10u8), (7, 0x70)] {
            for i in 0..4u64 {
                store
                    .put(pid, 0x10000 + i * PS, &page(base + i as u8))
                    .unwrap();
            }
            store.put(pid, 0x20000, &page(base + 8)).unwrap();
            store.put(pid, 0x21000, &page(base + 9)).unwrap();
        }
        store.put_zero(1, 0x12000, 1).unwrap();
        store.put_zero(7, 0x21000, 1).unwrap();
        // A page pre-copy sent that the final dump no longer has (unmapped since): ignored.
        store.put(1, 0x90000, &page(0xee)).unwrap();
        store
    }

    /// The content of `[vaddr, vaddr + PS)` in an assembled task, or None for a hole.
    fn read_page(dir: &Path, pid: u32, vaddr: u64) -> Option<Vec<u8>> {
        let map = images::read_pagemap(dir, pid).unwrap();
        let data = fs::read(dir.join(format!("pages-{}.img", map.pages_id))).unwrap();
        let r = map
            .ranges
            .iter()
            .find(|r| r.vaddr <= vaddr && vaddr < r.end())?;
        let from = (r.file_offset + vaddr - r.vaddr) as usize;
        Some(data[from..from + page::SIZE].to_vec())
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".assembling"))
            .collect()
    }

    #[test]
    fn forked_tasks_get_their_own_staged_pages_and_keep_their_dumped_ones() {
        let dir = tempfile::tempdir().unwrap();
        forked_lazy_dump(dir.path());
        let report = assemble(dir.path(), &staged()).unwrap();
        assert_eq!(report.tasks, 2);
        assert_eq!(report.pages_from_staging, 2 * 6 - 2);
        assert_eq!(report.zero_pages, 2);
        assert_eq!(report.pages_from_images, 2);
        assert_eq!(report.bytes_written, (2 * 6 - 2 + 2) * PS);

        for (pid, base, stack) in [(1u32, 0x10u8, b'S'), (7, 0x70, b's')] {
            let map = images::read_pagemap(dir.path(), pid).unwrap();
            assert!(
                map.ranges.iter().all(|r| r.flags == PE_PRESENT),
                "task {pid}: every range present, none lazy: {map:?}"
            );
            let size = fs::metadata(dir.path().join(format!("pages-{}.img", map.pages_id)))
                .unwrap()
                .len();
            assert_eq!(size, map.present_bytes(), "task {pid}");
            for i in 0..4u64 {
                let got = read_page(dir.path(), pid, 0x10000 + i * PS);
                if pid == 1 && i == 2 {
                    assert_eq!(got, None, "a zero page is a hole");
                } else {
                    assert_eq!(got, Some(page(base + i as u8)), "task {pid} page {i}");
                }
            }
            assert_eq!(read_page(dir.path(), pid, 0x20000), Some(page(base + 8)));
            let second = read_page(dir.path(), pid, 0x21000);
            assert_eq!(second, (pid == 1).then(|| page(base + 9)));
            assert_eq!(read_page(dir.path(), pid, 0x7f000), Some(page(stack)));
            assert_eq!(read_page(dir.path(), pid, 0x90000), None);
        }
        // Adjacent pages become one range (parent: 0x10000-0x12000, 0x13000, 0x20000-0x22000).
        let parent = images::read_pagemap(dir.path(), 1).unwrap();
        let spans: Vec<(u64, u64)> = parent
            .ranges
            .iter()
            .map(|r| (r.vaddr, r.nr_pages))
            .collect();
        assert_eq!(
            spans,
            [(0x10000, 2), (0x13000, 1), (0x20000, 2), (0x7f000, 1)]
        );
        assert_eq!(fs::read(dir.path().join("core-1.img")).unwrap(), b"opaque");
        assert!(leftovers(dir.path()).is_empty());
    }

    /// The files of the image directory, by name, with their contents.
    fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<(String, Vec<u8>)> = fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        files.sort();
        files
    }

    #[test]
    fn a_lazy_page_missing_from_staging_fails_naming_task_and_address() {
        let dir = tempfile::tempdir().unwrap();
        forked_lazy_dump(dir.path());
        let before = snapshot(dir.path());
        let mut store = staged();
        // The child's third heap page never arrived.
        store.release(7, 0x12000, 1);
        let err = assemble(dir.path(), &store).unwrap_err();
        assert!(
            matches!(
                err,
                AssembleError::MissingPage {
                    pid: 7,
                    vaddr: 0x12000
                }
            ),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("task 7") && text.contains("0x12000"),
            "{text}"
        );
        // Nothing was replaced (the parent, assembled first, included), nothing left behind.
        assert_eq!(snapshot(dir.path()), before);
    }

    #[test]
    fn a_truncated_pages_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        forked_lazy_dump(dir.path());
        fs::write(dir.path().join("pages-2.img"), &page(b's')[..100]).unwrap();
        let before = snapshot(dir.path());
        let err = assemble(dir.path(), &staged()).unwrap_err();
        match &err {
            AssembleError::TruncatedPages {
                pid, size, needed, ..
            } => assert_eq!((*pid, *size, *needed), (7, 100, PS)),
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("pages-2.img"), "{err}");
        assert_eq!(snapshot(dir.path()), before);

        // A missing pages file where the pagemap has present pages is truncated too.
        fs::remove_file(dir.path().join("pages-2.img")).unwrap();
        let err = assemble(dir.path(), &staged()).unwrap_err();
        assert!(
            matches!(err, AssembleError::TruncatedPages { size: 0, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn parent_ranges_and_shared_pages_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        forked_lazy_dump(dir.path());
        fs::write(
            dir.path().join("pagemap-7.img"),
            Pagemap {
                pages_id: 2,
                ranges: vec![range(0x10000, 1, PE_PARENT)],
            }
            .encode(),
        )
        .unwrap();
        let err = assemble(dir.path(), &staged()).unwrap_err();
        assert!(
            matches!(
                err,
                AssembleError::ParentRange {
                    pid: 7,
                    vaddr: 0x10000
                }
            ),
            "{err:?}"
        );

        fs::write(
            dir.path().join("pagemap-7.img"),
            Pagemap {
                pages_id: 1,
                ranges: vec![],
            }
            .encode(),
        )
        .unwrap();
        let err = assemble(dir.path(), &staged()).unwrap_err();
        assert!(
            matches!(
                err,
                AssembleError::SharedPagesFile {
                    pages_id: 1,
                    first: 1,
                    second: 7
                }
            ),
            "{err:?}"
        );
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn a_task_without_non_lazy_pages_needs_no_pages_file() {
        let dir = tempfile::tempdir().unwrap();
        write_pstree(dir.path(), &[(1, 0)]);
        fs::write(
            dir.path().join("pagemap-1.img"),
            Pagemap {
                pages_id: 4,
                ranges: vec![range(0x10000, 2, PE_LAZY)],
            }
            .encode(),
        )
        .unwrap();
        let mut store = StagingStore::default();
        store.put(1, 0x10000, &[page(1), page(2)].concat()).unwrap();
        assemble(dir.path(), &store).unwrap();
        assert_eq!(read_page(dir.path(), 1, 0x11000), Some(page(2)));
    }
}
