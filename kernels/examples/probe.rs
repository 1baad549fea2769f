//! Quick best-of-N matvec throughput probe (less noisy than criterion on a busy
//! machine): `cargo run --release -p cardinal-kernels --example probe [isa] [m]
//! [rows,cols,bits | smollm2]`. `smollm2` times one decode token's worth of
//! matvecs (30 layers of fused qkv, o, fused gate+up, down, plus the Q8 head;
//! ~96 MB streamed from RAM) on 1 and 2 threads. Matrices are repacked for
//! the ISA as the engine does (`QMatrix::repack`); `PROBE_ROWS=1` keeps the
//! row storage instead.

use std::hint::black_box;
use std::time::Instant;

use cardinal_kernels::{Isa, Pool, QActs, QMatrix, matmul, matmul_rows};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let isa: Isa = args.get(1).map_or(Isa::best(), |s| s.parse().expect("isa"));
    let m: usize = args.get(2).map_or(1, |s| s.parse().expect("m"));
    let mut seed = 1u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    if args.get(3).map(String::as_str) == Some("smollm2") {
        smollm2(isa, m, &mut next);
        return;
    }
    let custom: Option<(usize, usize, u8)> = args.get(3).map(|s| {
        let v: Vec<usize> = s
            .split(',')
            .map(|x| x.parse().expect("rows,cols,bits"))
            .collect();
        (v[0], v[1], v[2] as u8)
    });
    let default = [
        (576, 576, 4),
        (1536, 576, 4),
        (576, 1536, 4),
        (49152, 576, 8),
        (4096, 4096, 4),
        (14336, 4096, 4),
        (4096, 14336, 4),
    ];
    let shapes: Vec<(usize, usize, u8)> = custom.map_or(default.to_vec(), |c| vec![c]);
    for (rows, cols, bits) in shapes {
        let (bsz, nq) = if bits == 4 { (18, 16) } else { (34, 32) };
        let mut raw = Vec::with_capacity(rows * cols / 32 * bsz);
        for _ in 0..rows * cols / 32 {
            raw.extend_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
            raw.extend((0..nq).map(|_| next() as u8));
        }
        let mut w = if bits == 4 {
            QMatrix::from_ggml_q4_0(rows, cols, &raw).unwrap()
        } else {
            QMatrix::from_ggml_q8_0(rows, cols, &raw).unwrap()
        };
        repack(&mut w, isa);
        let x: Vec<f32> = (0..m * cols)
            .map(|_| (next() % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let mut a = QActs::new();
        a.quantize(isa, &x, m, cols);
        let mut out = vec![0.0; m * rows];
        let reps = (200_000_000 / w.size_bytes()).clamp(3, 2000);
        let mut best = f64::MAX;
        for _ in 0..7 {
            let t = Instant::now();
            for _ in 0..reps {
                matmul_rows(isa, &w, black_box(&a), 0..rows, &mut out);
            }
            best = best.min(t.elapsed().as_secs_f64() / reps as f64);
        }
        println!(
            "{isa} m={m} {rows}x{cols} q{bits}: {:8.1} us  {:6.1} GB/s",
            best * 1e6,
            w.size_bytes() as f64 / best / 1e9
        );
    }
}

fn repack(w: &mut QMatrix, isa: Isa) {
    if std::env::var_os("PROBE_ROWS").is_none() {
        w.repack(isa);
    }
}

fn build(rows: usize, cols: usize, bits: u8, next: &mut impl FnMut() -> u64) -> QMatrix {
    let (bsz, nq) = if bits == 4 { (18, 16) } else { (34, 32) };
    let mut raw = Vec::with_capacity(rows * cols / 32 * bsz);
    for _ in 0..rows * cols / 32 {
        raw.extend_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
        raw.extend((0..nq).map(|_| next() as u8));
    }
    if bits == 4 {
        QMatrix::from_ggml_q4_0(rows, cols, &raw).unwrap()
    } else {
        QMatrix::from_ggml_q8_0(rows, cols, &raw).unwrap()
    }
}

fn smollm2(isa: Isa, m: usize, next: &mut impl FnMut() -> u64) {
    let mut mats = Vec::new();
    for _ in 0..30 {
        mats.push(build(960, 576, 4, next));
        mats.push(build(576, 576, 4, next));
        mats.push(build(3072, 576, 4, next));
        mats.push(build(576, 1536, 4, next));
    }
    mats.push(build(49152, 576, 8, next));
    mats.iter_mut().for_each(|w| repack(w, isa));
    let bytes: usize = mats.iter().map(QMatrix::size_bytes).sum();
    let x: Vec<f32> = (0..1536 * m)
        .map(|_| (next() % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let (mut a576, mut a1536) = (QActs::new(), QActs::new());
    a576.quantize(isa, &x[..576 * m], m, 576);
    a1536.quantize(isa, &x, m, 1536);
    let mut out = vec![0.0; 49152 * m];
    for threads in [1, 2] {
        let pool = Pool::new(threads);
        let mut best = f64::MAX;
        for _ in 0..(20 / m).max(5) {
            let t = Instant::now();
            for w in &mats {
                let a = if w.cols() == 576 { &a576 } else { &a1536 };
                matmul(&pool, isa, w, black_box(a), &mut out[..m * w.rows()]);
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{isa} smollm2 m={m} token ({:.1} MB) on {threads} thread(s): {:.3} ms  {:.1} GB/s",
            bytes as f64 / 1e6,
            best * 1e3,
            bytes as f64 / best / 1e9
        );
    }
}
