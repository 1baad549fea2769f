//! Memory read bandwidth of this machine, now: the denominator of every
//! "fraction of the bandwidth limit" in PERFORMANCE.md, measured in the same
//! minutes as the figures it divides (the fixtures README's 43–48 GB/s are
//! another machine's, and this one's varies from minute to minute).
//!
//! Like the fixtures' STREAM-like C benchmark: a 512 MiB buffer summed as
//! 64-bit words, split into one contiguous slice per thread of the kernel
//! pool, best of 5, for 1 and 2 threads (or the counts given).
//!
//! `cargo run --release -p cardinal-kernels --example bandwidth [threads...]`

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use cardinal_kernels::Pool;

const BYTES: usize = 512 << 20;
const REPS: usize = 5;

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
    for threads in counts {
        let pool = Pool::new(threads);
        let mut best = 0.0f64;
        for _ in 0..REPS {
            let total = AtomicU64::new(0);
            let start = Instant::now();
            pool.run(&|t, n| {
                let per = words.len().div_ceil(n);
                let slice = &words[(t * per).min(words.len())..((t + 1) * per).min(words.len())];
                // Four independent sums keep several loads in flight.
                let mut acc = [0u64; 4];
                for c in slice.chunks_exact(4) {
                    for (a, &w) in acc.iter_mut().zip(c) {
                        *a = a.wrapping_add(w);
                    }
                }
                let s = acc.iter().fold(0u64, |x, &y| x.wrapping_add(y));
                total.fetch_add(s, Ordering::Relaxed);
            });
            let secs = start.elapsed().as_secs_f64();
            black_box(total.load(Ordering::Relaxed));
            best = best.max(BYTES as f64 / secs / 1e9);
        }
        println!(
            "{threads} thread(s): {best:.1} GB/s read (best of {REPS}, {} MiB)",
            BYTES >> 20
        );
    }
}
