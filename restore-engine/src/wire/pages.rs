//! Page runs on the wire: a run of consecutive pages of one task goes raw, or LZ4-compressed
//! when that pays; the receiver refuses anything that is not whole pages of at most one frame.

use std::borrow::Cow;

use super::{PageRun, WireError};
use crate::page;

/// Page data of one frame at most (8 MiB, under the frame limit).
pub const BATCH_BYTES: usize = 8 << 20;

/// A compressed run is sent only if it is at most 7/8 of the raw size: below that saving,
/// decompressing costs the destination more than the link time it saves.
fn worth_compressing(raw: usize, compressed: usize) -> bool {
    compressed * 8 <= raw * 7
}

/// A run of pages for the wire, LZ4-compressed if asked and worth it.
pub fn encode_run(vaddr: u64, data: &[u8], compress: bool) -> PageRun {
    if compress {
        let lz4 = lz4_flex::block::compress(data);
        if worth_compressing(data.len(), lz4.len()) {
            return PageRun {
                vaddr,
                lz4,
                lz4_len: data.len() as u32,
                ..Default::default()
            };
        }
    }
    PageRun {
        vaddr,
        data: data.to_vec(),
        ..Default::default()
    }
}

/// The pages of a received run (decompressed), refusing anything that is not whole pages of
/// at most one batch.
pub fn decode_run<'r>(pid: u32, run: &'r PageRun) -> Result<Cow<'r, [u8]>, WireError> {
    let bad = |problem: String| WireError::BadRun {
        pid,
        vaddr: run.vaddr,
        problem,
    };
    let data = if run.lz4.is_empty() {
        Cow::Borrowed(&run.data[..])
    } else {
        if !run.data.is_empty() {
            return Err(bad("both raw and compressed data".into()));
        }
        let len = run.lz4_len as usize;
        if len > BATCH_BYTES {
            return Err(bad(format!("{len} bytes claimed, over the batch limit")));
        }
        if len == 0 || len % page::SIZE != 0 {
            return Err(bad(format!("{len} bytes claimed: not whole pages")));
        }
        // Bounded by the declared size: exactly that much is allocated, a block that would
        // decompress to more fails (the output is full), one that decompresses to less is
        // corrupt too.
        let mut data = vec![0u8; len];
        let decompressed = lz4_flex::block::decompress_into(&run.lz4, &mut data)
            .map_err(|e| bad(format!("LZ4: {e} ({len} bytes claimed)")))?;
        if decompressed != len {
            return Err(bad(format!(
                "{decompressed} bytes decompressed, {len} claimed"
            )));
        }
        Cow::Owned(data)
    };
    if data.len() % page::SIZE != 0 || !page::is_aligned(run.vaddr) {
        return Err(bad("not whole pages".into()));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_runs_round_trip_and_corrupt_ones_are_refused() {
        let text: Vec<u8> = (0..4 * page::SIZE).map(|i| (i / 64 % 7) as u8).collect();
        let run = encode_run(0x10000, &text, true);
        assert!(
            run.data.is_empty() && run.lz4.len() < text.len() / 8,
            "compressible"
        );
        assert_eq!(&decode_run(1, &run).unwrap()[..], &text[..]);
        // Incompressible data goes raw.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..2 * page::SIZE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let raw = encode_run(0x10000, &noise, true);
        assert!(raw.lz4.is_empty() && raw.data == noise);
        // A lie about the length, a truncated block, half pages, both forms at once.
        let mut lie = run.clone();
        lie.lz4_len += page::SIZE as u32;
        let mut cut = run.clone();
        cut.lz4.truncate(cut.lz4.len() / 2);
        let mut huge = run.clone();
        huge.lz4_len = u32::MAX;
        let half = PageRun {
            vaddr: 0x10000,
            data: vec![1; 100],
            ..Default::default()
        };
        let mut both = run.clone();
        both.data = vec![0; page::SIZE];
        for bad in [lie, cut, huge, half, both] {
            assert!(
                matches!(decode_run(1, &bad), Err(WireError::BadRun { .. })),
                "{:?}",
                bad.lz4_len
            );
        }
    }

    #[test]
    fn an_lz4_bomb_is_refused_within_its_declared_size() {
        // 8 MiB of zeros in a block of about 32 KiB, declared as one page: decompression stops
        // when the declared page is full, and only that page was allocated.
        let bomb = lz4_flex::block::compress(&vec![0u8; BATCH_BYTES]);
        assert!(bomb.len() < 64 << 10);
        let run = PageRun {
            vaddr: 0x10000,
            lz4: bomb.clone(),
            lz4_len: page::SIZE as u32,
            ..Default::default()
        };
        let before = crate::testsupport::largest_allocation_reset();
        assert!(matches!(decode_run(1, &run), Err(WireError::BadRun { .. })));
        let largest = crate::testsupport::largest_allocation_reset();
        assert!(
            largest <= 2 * page::SIZE,
            "{largest} bytes allocated for a run declaring one page (before: {before})"
        );
        // Declaring more than a batch is refused before anything is allocated for it.
        let run = PageRun {
            lz4_len: !(page::SIZE as u32 - 1),
            ..run
        };
        crate::testsupport::largest_allocation_reset();
        assert!(matches!(decode_run(1, &run), Err(WireError::BadRun { .. })));
        assert!(crate::testsupport::largest_allocation_reset() < 64 << 10);
        // Declared truthfully, it is a valid (if odd) run of 8 MiB.
        let run = PageRun {
            lz4_len: BATCH_BYTES as u32,
            ..run
        };
        assert_eq!(decode_run(1, &run).unwrap().len(), BATCH_BYTES);
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
            let run = PageRun { vaddr: 0, data: Vec::new(), lz4, lz4_len };
            crate::testsupport::largest_allocation_reset();
            if let Ok(decoded) = decode_run(1, &run) {
                proptest::prop_assert_eq!(decoded.len(), lz4_len as usize);
                proptest::prop_assert_eq!(&decoded[..], &data[..]);
            }
            proptest::prop_assert!(crate::testsupport::largest_allocation_reset() <= (lz4_len as usize).max(page::SIZE) + 4096);
        }

        #[test]
        fn the_run_decoder_never_panics(
            lz4 in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            lz4_len in proptest::prelude::any::<u32>(),
        ) {
            let run = PageRun { vaddr: 0, data: Vec::new(), lz4, lz4_len };
            let _ = decode_run(1, &run);
        }
    }
}
