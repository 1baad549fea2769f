//! Memory read bandwidth of this machine, now: the denominator of every
//! "fraction of the bandwidth limit" in PERFORMANCE.md, measured in the same
//! minutes as the figures it divides (the fixtures README's 43–48 GB/s are
//! another machine's, and this one's varies from minute to minute).
//!
//! Like the fixtures' STREAM-like C benchmark: a 512 MiB buffer summed as
//! 64-bit words, split into one contiguous slice per thread of the kernel
//! pool, best of 5, for 1 and 2 threads (or the counts given). Then the same
//! with each thread's slice read from 4 places 64 KiB apart at once, a cache
//! line of each in turn, as the single-row matmul reads its weights: on the
//! Zen 3 VM of PERFORMANCE.md that draws ~30% more from memory than one
//! stream.
//!
//! `cargo run --release -p cardinal-kernels --example bandwidth [threads...]`

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use cardinal_kernels::Pool;

const BYTES: usize = 512 << 20;
const REPS: usize = 5;
/// Streams per thread in the interleaved mode.
const WAYS: usize = 4;
/// Bytes between the streams of a thread in the interleaved mode: about a
/// quarter of one thread's rows of a SmolLM2 layer matrix.
const SPACING: usize = 64 << 10;
/// 64-bit words per cache line.
const LINE: usize = 8;

/// The wrapping sum of `slice`'s whole cache lines, in blocks of `ways`
/// parts of `SPACING` bytes read side by side, a line of each in turn (the
/// lines left over last).
fn sum(slice: &[u64], ways: usize) -> u64 {
    let lines = slice.as_chunks::<LINE>().0;
    let part = SPACING / (LINE * 8);
    // Eight independent sums keep several loads in flight.
    let mut acc = [0u64; LINE];
    let mut add = |line: &[u64; LINE]| {
        for (a, &w) in acc.iter_mut().zip(line) {
            *a = a.wrapping_add(w);
        }
    };
    let blocks = lines.chunks_exact(ways * part);
    let rest = blocks.remainder();
    for block in blocks {
        for at in 0..part {
            for k in 0..ways {
                add(&block[k * part + at]);
            }
        }
    }
    rest.iter().for_each(add);
    acc.iter().fold(0u64, |x, &y| x.wrapping_add(y))
}

fn main() {
    let counts: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("thread counts are whole numbers"))
        .collect();
    let counts = if counts.is_empty() {
        vec![1, 2]
    } else {
        counts
    };
    // Written once, so every page is resident before timing.
    let words: Vec<u64> = (0..BYTES / 8).map(|i| i as u64).collect();
    for (threads, ways) in counts.iter().flat_map(|&t| [(t, 1), (t, WAYS)]) {
        let pool = Pool::new(threads);
        let mut best = 0.0f64;
        for _ in 0..REPS {
            let total = AtomicU64::new(0);
            let start = Instant::now();
            pool.run(&|t, n| {
                let per = words.len().div_ceil(n);
                let slice = &words[(t * per).min(words.len())..((t + 1) * per).min(words.len())];
                total.fetch_add(sum(slice, ways), Ordering::Relaxed);
            });
            let secs = start.elapsed().as_secs_f64();
            black_box(total.load(Ordering::Relaxed));
            best = best.max(BYTES as f64 / secs / 1e9);
        }
        let how = if ways == 1 {
            "one stream".to_string()
        } else {
            format!("{ways} streams")
        };
        println!(
            "{threads} thread(s), {how} each: {best:.1} GB/s read (best of {REPS}, {} MiB)",
            BYTES >> 20
        );
    }
}
