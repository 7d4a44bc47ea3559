//! Page frames: how the pages of one task travel.
//!
//! A page frame's payload is the bytes of its runs, one after the other, then the descriptor
//! ([`Pages`]: task, round, each run's address and length, zero pages), then the descriptor's
//! length (u32, little-endian):
//!
//! ```text
//! run bytes ... | Pages (protobuf) | descriptor length u32
//! ```
//!
//! The bytes go first so that the sender appends pages straight into the buffer the frame is
//! sealed and written from, and the receiver stages them from the buffer they were read and
//! decrypted into: one copy in user space on each side, besides the kernel's. A run is raw
//! pages, or an LZ4 block when compression was asked for and pays. The receiver refuses
//! anything that is not whole pages of at most one batch, and a descriptor whose runs do not
//! add up to the data it precedes.

use std::borrow::Cow;

use prost::Message;

use super::{PageRun, Pages, WireError, HEADER_LEN, TAG_LEN};
use crate::page;

/// Page data of one frame at most (8 MiB, under the frame limit).
pub const BATCH_BYTES: usize = 8 << 20;

/// A compressed run is sent only if it is at most 7/8 of the raw size: below that saving,
/// decompressing costs the destination more than the link time it saves.
fn worth_compressing(raw: usize, compressed: usize) -> bool {
    compressed * 8 <= raw * 7
}

/// A page frame being built, in the buffer it will be sealed and written from (room for the
/// frame header in front). Reused frame after frame.
pub struct PageFrame {
    buf: Vec<u8>,
    pages: Pages,
    /// Bytes of pages the runs hold (decompressed).
    page_bytes: usize,
}

impl Default for PageFrame {
    fn default() -> Self {
        let mut buf = Vec::with_capacity(HEADER_LEN + BATCH_BYTES + (64 << 10) + TAG_LEN);
        buf.resize(HEADER_LEN, 0);
        PageFrame {
            buf,
            pages: Pages::default(),
            page_bytes: 0,
        }
    }
}

impl PageFrame {
    /// Begins a frame of task `pid`'s pages for `round` (the frame must be empty).
    pub fn start(&mut self, pid: u32, round: u32) {
        debug_assert!(self.is_empty(), "a frame is started only when empty");
        self.pages.pid = pid;
        self.pages.round = round;
    }

    pub fn is_empty(&self) -> bool {
        self.pages.runs.is_empty() && self.pages.zero_pages.is_empty()
    }

    /// Bytes of pages the frame holds (decompressed).
    pub fn page_bytes(&self) -> usize {
        self.page_bytes
    }

    /// Bytes of the frame's data section: what crosses the link for its pages (less than
    /// [`Self::page_bytes`] where compression paid). Flow control counts these.
    pub fn wire_bytes(&self) -> usize {
        self.buf.len() - HEADER_LEN
    }

    /// Appends a run of pages at `vaddr`, LZ4-compressed if `compress` and worth it. The caller
    /// keeps a frame within [`BATCH_BYTES`] of pages.
    pub fn push_run(&mut self, vaddr: u64, data: &[u8], compress: bool) {
        let at = self.buf.len();
        let mut lz4_len = 0;
        if compress {
            self.buf
                .resize(at + lz4_flex::block::get_maximum_output_size(data.len()), 0);
            match lz4_flex::block::compress_into(data, &mut self.buf[at..]) {
                Ok(n) if worth_compressing(data.len(), n) => {
                    self.buf.truncate(at + n);
                    lz4_len = data.len() as u32;
                }
                _ => self.buf.truncate(at),
            }
        }
        if lz4_len == 0 {
            self.buf.extend_from_slice(data);
        }
        self.pages.runs.push(PageRun {
            vaddr,
            lz4_len,
            len: (self.buf.len() - at) as u32,
        });
        self.page_bytes += data.len();
    }

    /// Appends an LZ4 block made elsewhere that claims to decompress to `lz4_len` bytes (the
    /// receiver checks the claim; tests of hostile sources use this).
    pub fn push_lz4_block(&mut self, vaddr: u64, block: &[u8], lz4_len: u32) {
        self.buf.extend_from_slice(block);
        self.pages.runs.push(PageRun {
            vaddr,
            lz4_len,
            len: block.len() as u32,
        });
        self.page_bytes += lz4_len as usize;
    }

    /// Zero pages the frame names.
    pub fn zero_pages(&self) -> usize {
        self.pages.zero_pages.len()
    }

    /// Marks the page at `addr` as zero.
    pub fn push_zero(&mut self, addr: u64) {
        self.pages.zero_pages.push(addr);
    }

    /// Makes the pages in `buffer` the frame (the frame must be empty): `buffer` holds a frame
    /// header's room, then runs of `runs` (address, length) one after the other, raw. The
    /// frame's own buffer goes to `buffer` meanwhile; [`Self::give_back`] swaps them again
    /// once the frame is sent. No page is copied.
    pub fn adopt(
        &mut self,
        buffer: &mut Vec<u8>,
        pid: u32,
        round: u32,
        runs: impl Iterator<Item = (u64, usize)>,
        zero_pages: &[u64],
    ) {
        debug_assert!(self.is_empty(), "a frame adopts pages only when empty");
        std::mem::swap(&mut self.buf, buffer);
        self.start(pid, round);
        for (vaddr, len) in runs {
            self.pages.runs.push(PageRun {
                vaddr,
                lz4_len: 0,
                len: len as u32,
            });
            self.page_bytes += len;
        }
        self.pages.zero_pages.extend_from_slice(zero_pages);
        debug_assert_eq!(self.wire_bytes(), self.page_bytes);
    }

    /// After an adopted frame was sent: the buffers go back where they came from (the frame is
    /// empty; `buffer` keeps its header room).
    pub fn give_back(&mut self, buffer: &mut Vec<u8>) {
        std::mem::swap(&mut self.buf, buffer);
        self.clear();
        buffer.truncate(HEADER_LEN);
    }

    /// Appends the descriptor: the buffer is then the frame's header room and payload.
    pub(super) fn finish(&mut self) -> &mut Vec<u8> {
        let at = self.buf.len();
        self.pages
            .encode(&mut self.buf)
            .expect("a Vec grows to hold any message");
        let descriptor = (self.buf.len() - at) as u32;
        self.buf.extend_from_slice(&descriptor.to_le_bytes());
        &mut self.buf
    }

    /// Empties the frame, keeping its buffer.
    pub(super) fn clear(&mut self) {
        self.buf.truncate(HEADER_LEN);
        self.pages.runs.clear();
        self.pages.zero_pages.clear();
        self.page_bytes = 0;
    }
}

/// A received page frame: its descriptor and the bytes of its runs, in the buffer it was
/// decrypted in.
pub struct ReceivedPages<'a> {
    pub pages: Pages,
    data: &'a [u8],
}

impl<'a> ReceivedPages<'a> {
    /// Splits a page frame's payload into descriptor and run bytes, refusing a descriptor that
    /// does not fit or whose runs do not add up to exactly the bytes before it.
    pub fn parse(payload: &'a [u8]) -> Result<Self, WireError> {
        let bad = |problem: String| WireError::BadPageFrame(problem);
        let Some(split) = payload.len().checked_sub(4) else {
            return Err(bad(format!("{} bytes: no descriptor", payload.len())));
        };
        let descriptor = u32::from_le_bytes(payload[split..].try_into().expect("4 bytes")) as usize;
        let Some(data_len) = split.checked_sub(descriptor) else {
            return Err(bad(format!(
                "a descriptor of {descriptor} bytes in a frame of {}",
                payload.len()
            )));
        };
        let pages =
            Pages::decode(&payload[data_len..split]).map_err(|source| WireError::Decode {
                kind: super::Kind::Pages,
                source,
            })?;
        let declared = pages
            .runs
            .iter()
            .try_fold(0usize, |sum, run| sum.checked_add(run.len as usize));
        if declared != Some(data_len) {
            return Err(bad(format!(
                "its runs claim {} bytes, it carries {data_len}",
                declared.map_or("more than 2^64".into(), |d| d.to_string())
            )));
        }
        Ok(ReceivedPages {
            pages,
            data: &payload[..data_len],
        })
    }

    /// Each run with its bytes as they travelled (raw or LZ4: see [`decode_run`]).
    pub fn runs(&self) -> impl Iterator<Item = (&PageRun, &'a [u8])> + '_ {
        let mut at = 0usize;
        self.pages.runs.iter().map(move |run| {
            let bytes = &self.data[at..at + run.len as usize];
            at += run.len as usize;
            (run, bytes)
        })
    }

    /// Bytes the runs took on the link (what flow control counts).
    pub fn wire_bytes(&self) -> u64 {
        self.data.len() as u64
    }
}

/// The pages of a received run (decompressed), refusing anything that is not whole pages of
/// at most one batch.
pub fn decode_run<'r>(
    pid: u32,
    run: &PageRun,
    bytes: &'r [u8],
) -> Result<Cow<'r, [u8]>, WireError> {
    let bad = |problem: String| WireError::BadRun {
        pid,
        vaddr: run.vaddr,
        problem,
    };
    let data = if run.lz4_len == 0 {
        Cow::Borrowed(bytes)
    } else {
        let len = run.lz4_len as usize;
        if len > BATCH_BYTES {
            return Err(bad(format!("{len} bytes claimed, over the batch limit")));
        }
        if len % page::SIZE != 0 {
            return Err(bad(format!("{len} bytes claimed: not whole pages")));
        }
        // Bounded by the declared size: exactly that much is allocated, a block that would
        // decompress to more fails (the output is full), one that decompresses to less is
        // corrupt too.
        let mut data = vec![0u8; len];
        let decompressed = lz4_flex::block::decompress_into(bytes, &mut data)
            .map_err(|e| bad(format!("LZ4: {e} ({len} bytes claimed)")))?;
        if decompressed != len {
            return Err(bad(format!(
                "{decompressed} bytes decompressed, {len} claimed"
            )));
        }
        Cow::Owned(data)
    };
    if data.is_empty() || data.len() % page::SIZE != 0 || !page::is_aligned(run.vaddr) {
        return Err(bad("not whole pages".into()));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The payload of `frame` as the receiver sees it (the header room dropped).
    fn payload(frame: &mut PageFrame) -> Vec<u8> {
        frame.finish()[HEADER_LEN..].to_vec()
    }

    fn noise(bytes: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..bytes)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// The runs of a received frame, decoded: (address, pages).
    fn decoded(payload: &[u8]) -> Result<Vec<(u64, Vec<u8>)>, WireError> {
        let received = ReceivedPages::parse(payload)?;
        received
            .runs()
            .map(|(run, bytes)| Ok((run.vaddr, decode_run(1, run, bytes)?.into_owned())))
            .collect()
    }

    #[test]
    fn runs_raw_and_compressed_travel_in_one_frame() {
        let text: Vec<u8> = (0..4 * page::SIZE).map(|i| (i / 64 % 7) as u8).collect();
        let random = noise(2 * page::SIZE);
        let mut frame = PageFrame::default();
        frame.start(3, 2);
        frame.push_run(0x10000, &text, true);
        frame.push_run(0x40000, &random, true);
        frame.push_run(0x90000, &text, false);
        frame.push_zero(0x5000);
        assert_eq!(frame.page_bytes(), 10 * page::SIZE);
        assert!(frame.wire_bytes() < 7 * page::SIZE, "the text compressed");
        let bytes = payload(&mut frame);
        let received = ReceivedPages::parse(&bytes).unwrap();
        assert_eq!((received.pages.pid, received.pages.round), (3, 2));
        assert_eq!(received.pages.zero_pages, vec![0x5000]);
        assert_eq!(received.pages.runs[1].lz4_len, 0, "noise goes raw");
        assert_eq!(
            decoded(&bytes).unwrap(),
            vec![(0x10000, text.clone()), (0x40000, random), (0x90000, text)]
        );
        // The buffer is reused.
        frame.clear();
        assert!(frame.is_empty() && frame.wire_bytes() == 0);
    }

    #[test]
    fn corrupt_runs_and_descriptors_are_refused() {
        let text: Vec<u8> = (0..4 * page::SIZE).map(|i| (i / 64 % 7) as u8).collect();
        let block = lz4_flex::block::compress(&text);
        let frame_with = |push: &dyn Fn(&mut PageFrame)| {
            let mut frame = PageFrame::default();
            frame.start(1, 1);
            push(&mut frame);
            payload(&mut frame)
        };
        // A lie about the length, a truncated block, a huge claim, half pages.
        let bad_runs = [
            frame_with(&|f| f.push_lz4_block(0x10000, &block, (5 * page::SIZE) as u32)),
            frame_with(&|f| {
                f.push_lz4_block(0x10000, &block[..block.len() / 2], text.len() as u32)
            }),
            frame_with(&|f| f.push_lz4_block(0x10000, &block, u32::MAX)),
            frame_with(&|f| f.push_run(0x10000, &[1u8; 100], false)),
            frame_with(&|f| f.push_run(0x10001, &text, false)),
        ];
        for bytes in bad_runs {
            assert!(
                matches!(decoded(&bytes), Err(WireError::BadRun { .. })),
                "{:?}",
                decoded(&bytes).map(|r| r.len())
            );
        }
        // Descriptors that do not match the data before them.
        let good = frame_with(&|f| f.push_run(0x10000, &text, false));
        let mut short = good.clone();
        short.remove(0);
        let mut long = good.clone();
        long.insert(0, 7);
        let mut oversized = good.clone();
        let n = oversized.len();
        oversized[n - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
        for bytes in [short, long, oversized, vec![1, 2], Vec::new()] {
            assert!(
                matches!(
                    ReceivedPages::parse(&bytes),
                    Err(WireError::BadPageFrame(_) | WireError::Decode { .. })
                ),
                "{} bytes",
                bytes.len()
            );
        }
    }

    #[test]
    fn an_lz4_bomb_is_refused_within_its_declared_size() {
        // 8 MiB of zeros in a block of about 32 KiB, declared as one page: decompression stops
        // when the declared page is full, and only that page was allocated.
        let bomb = lz4_flex::block::compress(&vec![0u8; BATCH_BYTES]);
        assert!(bomb.len() < 64 << 10);
        let run = |lz4_len: u32| PageRun {
            vaddr: 0x10000,
            lz4_len,
            len: bomb.len() as u32,
        };
        let before = crate::testsupport::largest_allocation_reset();
        assert!(matches!(
            decode_run(1, &run(page::SIZE as u32), &bomb),
            Err(WireError::BadRun { .. })
        ));
        let largest = crate::testsupport::largest_allocation_reset();
        assert!(
            largest <= 2 * page::SIZE,
            "{largest} bytes allocated for a run declaring one page (before: {before})"
        );
        // Declaring more than a batch is refused before anything is allocated for it.
        crate::testsupport::largest_allocation_reset();
        assert!(matches!(
            decode_run(1, &run(!(page::SIZE as u32 - 1)), &bomb),
            Err(WireError::BadRun { .. })
        ));
        assert!(crate::testsupport::largest_allocation_reset() < 64 << 10);
        // Declared truthfully, it is a valid (if odd) run of 8 MiB.
        assert_eq!(
            decode_run(1, &run(BATCH_BYTES as u32), &bomb)
                .unwrap()
                .len(),
            BATCH_BYTES
        );
    }

    proptest::proptest! {
        #[test]
        fn decoded_runs_are_exactly_their_declared_size(
            data in proptest::collection::vec(0u8..3, 0..(3 * page::SIZE)),
            pages in 0u32..4,
            slack in 0u32..8,
        ) {
            // Real blocks with a right or wrong declared size: what decodes is exactly the
            // declared size, and never more than what was declared is allocated.
            let lz4 = lz4_flex::block::compress(&data);
            let lz4_len = pages * page::SIZE as u32 + slack;
            let run = PageRun { vaddr: 0, lz4_len, len: lz4.len() as u32 };
            crate::testsupport::largest_allocation_reset();
            if let Ok(decoded) = decode_run(1, &run, &lz4) {
                if lz4_len == 0 {
                    // A declared size of 0 means a raw run: the block itself, when it happens
                    // to be whole pages, is the run.
                    proptest::prop_assert_eq!(&decoded[..], &lz4[..]);
                } else {
                    proptest::prop_assert_eq!(decoded.len(), lz4_len as usize);
                    proptest::prop_assert_eq!(&decoded[..], &data[..]);
                }
            }
            proptest::prop_assert!(crate::testsupport::largest_allocation_reset() <= (lz4_len as usize).max(page::SIZE) + 4096);
        }

        #[test]
        fn the_run_decoder_never_panics(
            lz4 in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            lz4_len in proptest::prelude::any::<u32>(),
        ) {
            let run = PageRun { vaddr: 0, lz4_len, len: lz4.len() as u32 };
            let _ = decode_run(1, &run, &lz4);
        }

        #[test]
        fn the_page_frame_parser_never_panics(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
        ) {
            if let Ok(received) = ReceivedPages::parse(&bytes) {
                for (run, data) in received.runs() {
                    let _ = decode_run(1, run, data);
                }
            }
        }

        #[test]
        fn mutated_page_frames_never_pass_as_other_pages(
            at in 0usize..4096,
            byte in proptest::prelude::any::<u8>(),
        ) {
            // A frame whose bytes changed (what a checksum-only --insecure session could let
            // through) either fails to parse or parses to runs that add up to its data.
            let mut frame = PageFrame::default();
            frame.start(1, 1);
            frame.push_run(0x1000, &[5u8; page::SIZE], false);
            frame.push_zero(0x9000);
            let mut bytes = payload(&mut frame);
            let at = at % bytes.len();
            bytes[at] ^= byte | 1;
            if let Ok(received) = ReceivedPages::parse(&bytes) {
                let total: usize = received.runs().map(|(_, d)| d.len()).sum();
                proptest::prop_assert_eq!(total as u64, received.wire_bytes());
            }
        }
    }
}
