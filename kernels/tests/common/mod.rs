//! Test helpers shared by the integration tests: a tiny seeded RNG
//! (splitmix64) and random-matrix builders. No external crates.

#![allow(dead_code)]

use cardinal_kernels::QMatrix;

/// splitmix64: small, seedable, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.f32()
    }

    /// Uniform integer in 0..n.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Roughly normal (sum of uniforms), mean 0, std ~1.
    pub fn normal(&mut self) -> f32 {
        (0..4).map(|_| self.f32()).sum::<f32>() * 1.732 - 3.464
    }

    pub fn vec_normal(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * scale).collect()
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// Little-endian bytes of an f16 made from `v`.
pub fn f16_bytes(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_le_bytes()
}

/// Random ggml Q4_0 blocks for a rows x cols matrix.
pub fn raw_q4_0(rng: &mut Rng, rows: usize, cols: usize) -> Vec<u8> {
    let mut raw = Vec::new();
    for _ in 0..rows * cols / 32 {
        raw.extend_from_slice(&f16_bytes(rng.range(0.001, 0.05)));
        raw.extend(rng.bytes(16));
    }
    raw
}

/// Random ggml Q4_1 blocks.
pub fn raw_q4_1(rng: &mut Rng, rows: usize, cols: usize) -> Vec<u8> {
    let mut raw = Vec::new();
    for _ in 0..rows * cols / 32 {
        raw.extend_from_slice(&f16_bytes(rng.range(0.001, 0.05)));
        raw.extend_from_slice(&f16_bytes(rng.range(-0.4, 0.1)));
        raw.extend(rng.bytes(16));
    }
    raw
}

/// Random ggml Q8_0 blocks (q in -128..=127, including the extremes).
pub fn raw_q8_0(rng: &mut Rng, rows: usize, cols: usize) -> Vec<u8> {
    let mut raw = Vec::new();
    for _ in 0..rows * cols / 32 {
        raw.extend_from_slice(&f16_bytes(rng.range(0.0001, 0.002)));
        raw.extend(rng.bytes(32));
    }
    raw
}

/// A random matrix of the given bits built through the ggml importers.
pub fn random_matrix(rng: &mut Rng, rows: usize, cols: usize, kind: usize) -> QMatrix {
    match kind % 3 {
        0 => QMatrix::from_ggml_q4_0(rows, cols, &raw_q4_0(rng, rows, cols)).unwrap(),
        1 => QMatrix::from_ggml_q4_1(rows, cols, &raw_q4_1(rng, rows, cols)).unwrap(),
        _ => QMatrix::from_ggml_q8_0(rows, cols, &raw_q8_0(rng, rows, cols)).unwrap(),
    }
}

/// All rows of `w` dequantized, row-major.
pub fn dequantize(w: &QMatrix) -> Vec<f32> {
    let mut out = vec![0.0; w.rows() * w.cols()];
    for r in 0..w.rows() {
        w.dequantize_row(r, &mut out[r * w.cols()..(r + 1) * w.cols()]);
    }
    out
}
