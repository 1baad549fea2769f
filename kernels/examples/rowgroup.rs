//! Kernel cost in TSC ticks per row-group (8 weight rows × 32 columns × one
//! activation row, 256 multiply-adds), as the minimum over 400 single calls:
//! on a VM whose cores slow down for seconds at a time, a minimum of short
//! calls is steadier than a mean of long runs. For comparing kernel
//! variants, alternate two builds (see PERFORMANCE.md).
//!
//! `cargo run --release -p cardinal-kernels --example rowgroup ISA M
//! ROWS,COLS,BITS` times one Q4_1 (4-bit) or Q8_0 (8-bit) matrix of random
//! values, repacked as the engine does, on one thread; `ISA M layers` times
//! SmolLM2's 120 layer matrices in turn (weights streamed from memory).

use std::hint::black_box;

use cardinal_kernels::{Isa, QActs, QMatrix, matmul_rows};

/// Xorshift state for reproducible random bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The time-stamp counter.
fn tsc() -> u64 {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `rdtsc` has no preconditions.
    return unsafe { core::arch::x86_64::_rdtsc() };
    #[cfg(not(target_arch = "x86_64"))]
    return std::time::UNIX_EPOCH
        .elapsed()
        .map_or(0, |d| d.as_nanos() as u64);
}

/// A `rows x cols` matrix of random quantized values, repacked for `isa`.
fn matrix(rng: &mut Rng, isa: Isa, rows: usize, cols: usize, bits: u8) -> QMatrix {
    let mut raw = Vec::new();
    for _ in 0..rows * cols / 32 {
        raw.extend_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
        if bits == 4 {
            raw.extend_from_slice(&half::f16::from_f32(-0.05).to_le_bytes());
        }
        let n = if bits == 4 { 16 } else { 32 };
        raw.extend((0..n).map(|_| rng.next() as u8));
    }
    let mut w = if bits == 4 {
        QMatrix::from_ggml_q4_1(rows, cols, &raw).expect("q4_1 matrix")
    } else {
        QMatrix::from_ggml_q8_0(rows, cols, &raw).expect("q8_0 matrix")
    };
    w.repack(isa);
    w
}

/// Activations for `m` rows of `cols`.
fn acts(isa: Isa, m: usize, cols: usize) -> QActs {
    let x: Vec<f32> = (0..m * cols)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let mut a = QActs::new();
    a.quantize(isa, &x, m, cols);
    a
}

/// Row-groups of one `m`-row product with `w`.
fn row_groups(w: &QMatrix, m: usize) -> f64 {
    (m * w.rows() / 8 * w.cols() / 32) as f64
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: rowgroup ISA M (ROWS,COLS,BITS | layers)";
    let isa: Isa = args.get(1).expect(usage).parse().expect("isa");
    let m: usize = args.get(2).expect(usage).parse().expect("m");
    let what = args.get(3).expect(usage);
    let mut rng = Rng(1);
    if what == "layers" {
        let mut mats = Vec::new();
        for _ in 0..30 {
            for (rows, cols) in [(960, 576), (576, 576), (3072, 576), (576, 1536)] {
                mats.push(matrix(&mut rng, isa, rows, cols, 4));
            }
        }
        let (a576, a1536) = (acts(isa, m, 576), acts(isa, m, 1536));
        let mut out = vec![0.0; m * 3072];
        let rg: f64 = mats.iter().map(|w| row_groups(w, m)).sum();
        for _ in 0..5 {
            let t0 = tsc();
            for w in &mats {
                let a = if w.cols() == 576 { &a576 } else { &a1536 };
                matmul_rows(isa, w, black_box(a), 0..w.rows(), &mut out[..m * w.rows()]);
            }
            println!(
                "{isa} m={m} layers: {:.2} ticks/row-group",
                (tsc() - t0) as f64 / rg
            );
        }
        return;
    }
    let v: Vec<usize> = what.split(',').map(|x| x.parse().expect(usage)).collect();
    let [rows, cols, bits] = v[..] else {
        panic!("{usage}")
    };
    let w = matrix(&mut rng, isa, rows, cols, bits as u8);
    let a = acts(isa, m, cols);
    let mut out = vec![0.0; m * rows];
    let rg = row_groups(&w, m);
    let mut best = f64::MAX;
    for _ in 0..400 {
        let t0 = tsc();
        matmul_rows(isa, &w, black_box(&a), 0..rows, &mut out);
        best = best.min((tsc() - t0) as f64 / rg);
    }
    println!("{isa} m={m} {rows}x{cols} q{bits}: {best:.2} ticks/row-group");
}
