//! The lazy ranges still to install in one restored address space, kept as the address space
//! changes (installed pages, mremap, MADV_DONTNEED, munmap, fork).

use std::collections::BTreeMap;

/// A lazy range still to install: `[start, end)` in the task now, read from `img_start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Pending {
    pub(super) end: u64,
    pub(super) img_start: u64,
}

/// Ranges still to install for one address space, keyed by start.
#[derive(Debug, Default, Clone)]
pub(crate) struct PendingRanges(BTreeMap<u64, Pending>);

impl PendingRanges {
    pub(super) fn insert(&mut self, start: u64, end: u64, img_start: u64) {
        if start < end {
            self.0.insert(start, Pending { end, img_start });
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(super) fn bytes(&self) -> u64 {
        self.0.iter().map(|(s, p)| p.end - s).sum()
    }

    /// The pending range containing `addr`.
    pub(super) fn find(&self, addr: u64) -> Option<(u64, Pending)> {
        let (&start, &p) = self.0.range(..=addr).next_back()?;
        (addr < p.end).then_some((start, p))
    }

    /// Removes `[start, end)` from the pending ranges, splitting as needed.
    pub(super) fn remove(&mut self, start: u64, end: u64) {
        let overlapping: Vec<(u64, Pending)> = self
            .0
            .range(..end)
            .filter(|(s, p)| **s < end && p.end > start)
            .map(|(s, p)| (*s, *p))
            .collect();
        for (s, p) in overlapping {
            self.0.remove(&s);
            if s < start {
                self.insert(s, start, p.img_start);
            }
            if p.end > end {
                self.insert(end, p.end, p.img_start + (end - s));
            }
        }
    }

    /// Moves pending pieces inside `[from, from + len)` to `to` (mremap in the task); the data
    /// still comes from the original image addresses.
    pub(super) fn remap(&mut self, from: u64, to: u64, len: u64) {
        let end = from + len;
        let inside: Vec<(u64, Pending)> = self
            .0
            .range(..end)
            .filter(|(s, p)| **s < end && p.end > from)
            .map(|(s, p)| (*s, *p))
            .collect();
        self.remove(from, end);
        for (s, p) in inside {
            let piece_start = s.max(from);
            let piece_end = p.end.min(end);
            let img = p.img_start + (piece_start - s);
            self.insert(piece_start - from + to, piece_end - from + to, img);
        }
    }

    pub(super) fn first(&self) -> Option<(u64, Pending)> {
        self.0.iter().next().map(|(s, p)| (*s, *p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_ranges_split_on_remove() {
        let mut p = PendingRanges::default();
        p.insert(0x1000, 0x9000, 0x1000);
        p.remove(0x3000, 0x5000);
        assert_eq!(
            p.find(0x2000),
            Some((
                0x1000,
                Pending {
                    end: 0x3000,
                    img_start: 0x1000
                }
            ))
        );
        assert_eq!(p.find(0x3000), None);
        assert_eq!(
            p.find(0x8000),
            Some((
                0x5000,
                Pending {
                    end: 0x9000,
                    img_start: 0x5000
                }
            ))
        );
        assert_eq!(p.bytes(), 0x6000);
    }

    #[test]
    fn remap_moves_pending_pieces_and_keeps_image_addresses() {
        let mut p = PendingRanges::default();
        p.insert(0x10000, 0x14000, 0x10000);
        p.remap(0x12000, 0x80000, 0x4000);
        assert_eq!(
            p.find(0x10000).map(|(s, e)| (s, e.end, e.img_start)),
            Some((0x10000, 0x12000, 0x10000))
        );
        assert_eq!(
            p.find(0x81000).map(|(s, e)| (s, e.end, e.img_start)),
            Some((0x80000, 0x82000, 0x12000))
        );
        assert_eq!(p.find(0x13000), None);
    }
}
