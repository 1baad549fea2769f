//! Criterion benches: quantized matvec (m=1) per ISA on SmolLM2 / Llama-8B
//! shapes, batched m=16, threaded matmul, and the elementwise/attention kernels.
//! Matmul throughput is reported as bytes of weights (data+scales+mins) per second.

use std::hint::black_box;
use std::time::Duration;

use cardinal_kernels::{
    AttnState, Isa, Pool, QActs, QMatrix, Rope, attend, attend_group, matmul, matmul_rows,
    quantize_kv, rmsnorm, softmax, swiglu, tile_keys,
};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

/// splitmix64 for bench data.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }
}

/// A random matrix; 8-bit via Q8_0 blocks, 4-bit via Q4_0 blocks.
fn matrix(rng: &mut Rng, rows: usize, cols: usize, bits: u8) -> QMatrix {
    let blocks = rows * cols / 32;
    let (bsz, nq) = if bits == 4 { (18, 16) } else { (34, 32) };
    let mut raw = Vec::with_capacity(blocks * bsz);
    for _ in 0..blocks {
        raw.extend_from_slice(&half::f16::from_f32(0.01 + 0.01 * rng.f32()).to_le_bytes());
        raw.extend((0..nq).map(|_| rng.next() as u8));
    }
    if bits == 4 {
        QMatrix::from_ggml_q4_0(rows, cols, &raw).unwrap()
    } else {
        QMatrix::from_ggml_q8_0(rows, cols, &raw).unwrap()
    }
}

/// Shapes (rows, cols, bits): SmolLM2-135M projections, its tied Q8 head, Llama-3-8B.
const MATVEC: [(usize, usize, u8); 7] = [
    (576, 576, 4),
    (1536, 576, 4),
    (576, 1536, 4),
    (49152, 576, 8),
    (4096, 4096, 4),
    (14336, 4096, 4),
    (4096, 14336, 4),
];

fn isas() -> Vec<Isa> {
    let only = std::env::var("BENCH_ISA").ok();
    Isa::all_available()
        .into_iter()
        .filter(|i| only.as_deref().is_none_or(|o| o == i.name()))
        .collect()
}

fn bench_matvec(c: &mut Criterion) {
    let mut rng = Rng(1);
    let mut g = c.benchmark_group("matvec");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    for &(rows, cols, bits) in &MATVEC {
        let w = matrix(&mut rng, rows, cols, bits);
        let x: Vec<f32> = (0..cols).map(|_| rng.f32()).collect();
        g.throughput(Throughput::Bytes(w.size_bytes() as u64));
        for isa in isas() {
            let mut a = QActs::new();
            a.quantize(isa, &x, 1, cols);
            let mut out = vec![0.0; rows];
            let id = BenchmarkId::new(format!("{isa}"), format!("{rows}x{cols}q{bits}"));
            g.bench_function(id, |b| {
                b.iter(|| matmul_rows(isa, &w, black_box(&a), 0..rows, &mut out))
            });
        }
    }
    g.finish();
}

fn bench_batched(c: &mut Criterion) {
    let mut rng = Rng(2);
    let mut g = c.benchmark_group("matmul_m16");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    for &(rows, cols, bits) in &[(1536, 576, 4), (4096, 4096, 4), (49152, 576, 8)] {
        let w = matrix(&mut rng, rows, cols, bits);
        let m = 16;
        let x: Vec<f32> = (0..m * cols).map(|_| rng.f32()).collect();
        g.throughput(Throughput::Bytes(w.size_bytes() as u64));
        for isa in isas() {
            let mut a = QActs::new();
            a.quantize(isa, &x, m, cols);
            let mut out = vec![0.0; m * rows];
            let id = BenchmarkId::new(format!("{isa}"), format!("{rows}x{cols}q{bits}"));
            g.bench_function(id, |b| {
                b.iter(|| matmul_rows(isa, &w, black_box(&a), 0..rows, &mut out))
            });
        }
    }
    g.finish();
}

fn bench_pool(c: &mut Criterion) {
    let mut rng = Rng(3);
    let pool = Pool::new(std::thread::available_parallelism().map_or(2, |n| n.get()));
    let mut g = c.benchmark_group("matvec_pool");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    let isa = Isa::best();
    for &(rows, cols, bits) in &[
        (576, 576, 4),
        (1536, 576, 4),
        (49152, 576, 8),
        (14336, 4096, 4),
    ] {
        let w = matrix(&mut rng, rows, cols, bits);
        let x: Vec<f32> = (0..cols).map(|_| rng.f32()).collect();
        let mut a = QActs::new();
        a.quantize(isa, &x, 1, cols);
        let mut out = vec![0.0; rows];
        g.throughput(Throughput::Bytes(w.size_bytes() as u64));
        let id = BenchmarkId::new(
            format!("{isa}x{}", pool.threads()),
            format!("{rows}x{cols}q{bits}"),
        );
        g.bench_function(id, |b| {
            b.iter(|| matmul(&pool, isa, &w, black_box(&a), &mut out))
        });
    }
    g.finish();
    let mut g = c.benchmark_group("pool");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    g.bench_function(format!("empty_run_x{}", pool.threads()), |b| {
        b.iter(|| {
            pool.run(&|t, n| {
                black_box((t, n));
            })
        })
    });
    g.finish();
}

fn bench_small(c: &mut Criterion) {
    let mut rng = Rng(4);
    let mut g = c.benchmark_group("elementwise");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(500));
    let n = 1536;
    let x: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
    let y: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
    let mut out = vec![0.0; n];
    let (hd, ctx) = (64, 1024);
    let q: Vec<f32> = (0..hd).map(|_| rng.f32()).collect();
    let kf: Vec<f32> = (0..hd * ctx).map(|_| rng.f32()).collect();
    let mut k = vec![0i8; hd * ctx];
    let ks: Vec<f32> = kf
        .chunks(hd)
        .zip(k.chunks_mut(hd))
        .map(|(s, d)| quantize_kv(s, d))
        .collect();
    let kt = tile_keys(&k, hd);
    let mut st = AttnState::new(hd);
    let qs: Vec<f32> = (0..3 * hd).map(|_| rng.f32()).collect();
    let mut sts: Vec<AttnState> = (0..3).map(|_| AttnState::new(hd)).collect();
    let rope = Rope::new(hd, 10000.0);
    let mut heads = vec![0.5f32; 9 * hd];
    for isa in isas() {
        g.bench_function(BenchmarkId::new("rmsnorm", isa), |b| {
            b.iter(|| rmsnorm(isa, black_box(&x), &y, 1e-5, &mut out))
        });
        g.bench_function(BenchmarkId::new("swiglu", isa), |b| {
            b.iter(|| swiglu(isa, black_box(&x), &y, &mut out))
        });
        g.bench_function(BenchmarkId::new("softmax", isa), |b| {
            b.iter(|| softmax(isa, black_box(&mut out)))
        });
        let xs: Vec<f32> = (0..16 * 576).map(|_| rng.f32()).collect();
        let mut qa = QActs::new();
        g.bench_function(BenchmarkId::new("quantize_16x576", isa), |b| {
            b.iter(|| qa.quantize(isa, black_box(&xs), 16, 576))
        });
        g.bench_function(BenchmarkId::new("attend_1024", isa), |b| {
            b.iter(|| {
                st.reset();
                attend(isa, black_box(&q), &kt, &ks, &k, &ks, 0.125, &mut st)
            })
        });
        // SmolLM2's grouping: three query heads per KV head.
        g.bench_function(BenchmarkId::new("attend_group_3x1024", isa), |b| {
            b.iter(|| {
                sts.iter_mut().for_each(AttnState::reset);
                attend_group(isa, black_box(&qs), &kt, &ks, &k, &ks, 0.125, &mut sts)
            })
        });
    }
    g.bench_function("rope_9x64", |b| {
        b.iter(|| rope.apply(black_box(&mut heads), 9, 100))
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_matvec,
    bench_batched,
    bench_pool,
    bench_small
);
criterion_main!(benches);
