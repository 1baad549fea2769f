//! Every available ISA's matmul against the scalar reference: on random data
//! within a summation-order tolerance, and bit-exactly on data where every f32
//! operation is exact (so the integer dot products are proven identical).
//! AVX-512 and AVX2 run twice: on the row storage and on matrices repacked into row
//! panels (`QMatrix::repack`), which the engine uses.

mod common;

use cardinal_kernels::{GROUP, Isa, Pool, QActs, QMatrix, matmul, matmul_rows};
use common::{Rng, dequantize, random_matrix};

const COLS: [usize; 8] = [32, 64, 96, 224, 256, 576, 1536, 32 * 27];

/// Every available ISA, with `false`; and those whose `repack` changes a
/// 4-bit matrix again, with `true`.
fn targets() -> Vec<(Isa, bool)> {
    let probe = QMatrix::quantize_q4(1, 32, &[0.5; 32]).unwrap();
    let mut out = Vec::new();
    for isa in Isa::all_available() {
        out.push((isa, false));
        let mut p = probe.clone();
        p.repack(isa);
        if p.is_panelled() {
            out.push((isa, true));
        }
    }
    out
}

/// `w` as the `isa` kernels will see it: repacked when `repack`.
fn form(w: &QMatrix, isa: Isa, repack: bool) -> QMatrix {
    let mut w = w.clone();
    if repack {
        w.repack(isa);
        assert!(w.bits() == 8 || w.is_panelled());
    }
    w
}

/// Σ over groups of s·d·Σ|uq| + |m·d|·Σ|q|, in f64: an upper bound on the
/// magnitude of every partial sum any kernel forms, whatever its lane split
/// and order (the two per-group terms may cancel, the roundings do not).
fn abs_terms(w: &QMatrix, r: usize, a: &QActs, i: usize) -> f64 {
    let cols = w.cols();
    let mut q = vec![0i8; cols];
    a.row_quants(i, &mut q);
    let d = a.row_scales(i);
    (0..cols / GROUP)
        .map(|g| {
            let (s, m) = w.group_params(r, g);
            let (mut uq, mut sq) = (0i64, 0i64);
            for c in g * GROUP..(g + 1) * GROUP {
                uq += (w.quant(r, c) as i64 * q[c] as i64).abs();
                sq += (q[c] as i64).abs();
            }
            (s as f64 * d[g] as f64 * uq as f64).abs() + (m as f64 * d[g] as f64 * sq as f64).abs()
        })
        .sum()
}

fn check_isa_vs_scalar(
    (isa, repack): (Isa, bool),
    rows: usize,
    cols: usize,
    m: usize,
    kind: usize,
    seed: u64,
) {
    let mut rng = Rng::new(seed);
    let w = random_matrix(&mut rng, rows, cols, kind);
    let wk = form(&w, isa, repack);
    let x = rng.vec_normal(m * cols, 1.0);
    let mut a_ref = QActs::new();
    a_ref.quantize(Isa::Scalar, &x, m, cols);
    let mut a = QActs::new();
    a.quantize(isa, &x, m, cols);
    let mut want = vec![0.0; m * rows];
    matmul_rows(Isa::Scalar, &w, &a_ref, 0..rows, &mut want);
    let mut got = vec![f32::NAN; m * rows];
    matmul_rows(isa, &wk, &a, 0..rows, &mut got);
    let groups = cols / GROUP;
    // Each group term s*(d*isum) + m*sd carries ~3 roundings; the scalar sum and
    // the SIMD sum (lane-parallel, then a tree) each add at most `groups`
    // roundings of partial sums bounded by Σ|terms|. So |got - want| <=
    // 2 * (groups + 4) * 2^-24 * Σ|terms| (a standard γ_n bound).
    let eps = f32::EPSILON as f64 / 2.0;
    for i in 0..m {
        for r in 0..rows {
            let k = i * rows + r;
            let bound = 2.0 * (groups as f64 + 4.0) * eps * abs_terms(&w, r, &a_ref, i);
            let diff = (got[k] as f64 - want[k] as f64).abs();
            assert!(
                diff <= bound,
                "{isa} (panels {repack}) bits {} {rows}x{cols} m {m} row {r} act {i}: got {} want {} diff {diff:e} bound {bound:e}",
                w.bits(),
                got[k],
                want[k]
            );
        }
    }
}

#[test]
fn all_isas_match_scalar_on_random_data() {
    let mut seed = 1;
    for isa in targets() {
        for &cols in &COLS {
            // From 64 rows a single row walks several panels at once.
            for rows in (1..=17).chain([49, 64, 100, 161]) {
                for kind in 0..3 {
                    let m = 1 + (rows + kind) % 5;
                    check_isa_vs_scalar(isa, rows, cols, m, kind, seed);
                    seed += 1;
                }
            }
            for m in [1, 2, 3, 4, 5, 16] {
                for kind in 0..3 {
                    check_isa_vs_scalar(isa, 9, cols, m, kind, seed);
                    seed += 1;
                }
            }
        }
    }
}

/// Weights with scale 1 and min -8 (or -128) and integer activations with
/// amax 127 make every product and partial sum an integer below 2^24, so all
/// ISAs must agree bit for bit: this pins the integer parts exactly.
fn exact_case((isa, repack): (Isa, bool), rows: usize, cols: usize, m: usize, bits: u8, seed: u64) {
    let mut rng = Rng::new(seed);
    let groups = cols / GROUP;
    let w = if bits == 4 {
        let mut raw = Vec::new();
        for _ in 0..rows * groups {
            raw.extend_from_slice(&half::f16::from_f32(1.0).to_le_bytes());
            raw.extend(rng.bytes(16));
        }
        QMatrix::from_ggml_q4_0(rows, cols, &raw).unwrap()
    } else {
        let mut raw = Vec::new();
        for _ in 0..rows * groups {
            raw.extend_from_slice(&half::f16::from_f32(1.0).to_le_bytes());
            raw.extend(rng.bytes(32));
        }
        QMatrix::from_ggml_q8_0(rows, cols, &raw).unwrap()
    };
    let mut x: Vec<f32> = (0..m * cols)
        .map(|_| rng.below(255) as f32 - 127.0)
        .collect();
    for g in 0..m * groups {
        x[g * GROUP] = if g % 2 == 0 { 127.0 } else { -127.0 };
    }
    let mut a = QActs::new();
    a.quantize(Isa::Scalar, &x, m, cols);
    let mut want = vec![0.0; m * rows];
    matmul_rows(Isa::Scalar, &w, &a, 0..rows, &mut want);
    let wd = dequantize(&w);
    for i in 0..m {
        for r in 0..rows {
            let exact: f64 = (0..cols)
                .map(|c| wd[r * cols + c] as f64 * x[i * cols + c] as f64)
                .sum();
            assert_eq!(want[i * rows + r] as f64, exact, "scalar not exact");
        }
    }
    let mut a2 = QActs::new();
    a2.quantize(isa, &x, m, cols);
    let mut got = vec![f32::NAN; m * rows];
    matmul_rows(isa, &form(&w, isa, repack), &a2, 0..rows, &mut got);
    assert_eq!(
        got, want,
        "{isa} (panels {repack}) {bits}-bit {rows}x{cols} m {m}"
    );
}

#[test]
fn all_isas_exact_on_integer_data() {
    let mut seed = 1000;
    for isa in targets() {
        for &cols in &COLS {
            for bits in [4, 8] {
                for (rows, m) in [
                    (1, 1),
                    (3, 2),
                    (7, 5),
                    (17, 16),
                    (49, 3),
                    (100, 1),
                    (161, 1),
                ] {
                    exact_case(isa, rows, cols, m, bits, seed);
                    seed += 1;
                }
            }
        }
    }
}

#[test]
fn pooled_matmul_equals_matmul_rows() {
    let mut rng = Rng::new(77);
    for threads in [1, 2, 3] {
        let pool = Pool::new(threads);
        for (isa, repack) in targets() {
            for (rows, cols, m) in [
                (1, 32, 1),
                (33, 64, 2),
                (600, 576, 1),
                (1537, 576, 3),
                (256, 1536, 16),
            ] {
                let w = form(&random_matrix(&mut rng, rows, cols, rows), isa, repack);
                let x = rng.vec_normal(m * cols, 1.0);
                let mut a = QActs::new();
                a.quantize(isa, &x, m, cols);
                let mut want = vec![0.0; m * rows];
                matmul_rows(isa, &w, &a, 0..rows, &mut want);
                let mut got = vec![f32::NAN; m * rows];
                matmul(&pool, isa, &w, &a, &mut got);
                assert_eq!(
                    got, want,
                    "{isa} (panels {repack}) threads {threads} {rows}x{cols} m {m}"
                );
            }
        }
    }
}

#[test]
fn matmul_rows_writes_only_its_rows() {
    let mut rng = Rng::new(5);
    // Ranges starting and ending inside 4-row storage blocks and 16-row
    // panels; from 4 whole panels a single row walks several at once.
    let small: &[std::ops::Range<usize>] = &[10..25, 3..4, 0..1, 37..40, 5..5];
    let large: &[std::ops::Range<usize>] = &[10..140, 16..96, 0..150, 33..97, 64..128];
    for (rows, cols, kind, m) in [
        (40, 96, 1, 3),
        (40, 96, 0, 1),
        (40, 96, 2, 1),
        (40, 96, 2, 2),
        (150, 64, 0, 1),
        (150, 64, 2, 1),
    ] {
        let ranges = if rows == 40 { small } else { large };
        let w0 = random_matrix(&mut rng, rows, cols, kind);
        let x = rng.vec_normal(m * cols, 1.0);
        for (isa, repack) in targets() {
            let w = form(&w0, isa, repack);
            let mut a = QActs::new();
            a.quantize(isa, &x, m, cols);
            let mut full = vec![0.0; m * rows];
            matmul_rows(isa, &w, &a, 0..rows, &mut full);
            for range in ranges {
                let mut out = vec![-7.0; m * rows];
                matmul_rows(isa, &w, &a, range.clone(), &mut out);
                for i in 0..m {
                    for r in 0..rows {
                        let v = out[i * rows + r];
                        if range.contains(&r) {
                            assert_eq!(v, full[i * rows + r], "{isa} m {m} {range:?} i {i} r {r}");
                        } else {
                            assert_eq!(v, -7.0, "{isa} m {m} {range:?} i {i} r {r}");
                        }
                    }
                }
            }
        }
    }
}

/// Against f32: y = Σ w·x with the dequantized weights and the ORIGINAL
/// activations. The kernels use x' with |x' - x| <= d_g/2 per element, so
/// |y_kernel - y| <= Σ_g d_g/2 · Σ_i |w_gi|, plus the kernel's f32 rounding
/// (the γ bound of `check_isa_vs_scalar` for one evaluation) and the f64 sum.
#[test]
fn matmul_matches_f32_reference_within_activation_error() {
    let mut rng = Rng::new(99);
    let pool = Pool::new(2);
    for (isa, repack) in targets() {
        for (rows, cols, m, kind) in [
            (7, 32, 1, 0),
            (33, 576, 2, 1),
            (64, 1536, 3, 2),
            (17, 96, 16, 0),
        ] {
            let w = form(&random_matrix(&mut rng, rows, cols, kind), isa, repack);
            let wd = dequantize(&w);
            let x = rng.vec_normal(m * cols, 2.0);
            let mut a = QActs::new();
            a.quantize(isa, &x, m, cols);
            let mut y = vec![0.0; m * rows];
            matmul(&pool, isa, &w, &a, &mut y);
            for i in 0..m {
                let d = a.row_scales(i);
                for r in 0..rows {
                    let wr = &wd[r * cols..(r + 1) * cols];
                    let xr = &x[i * cols..(i + 1) * cols];
                    let exact: f64 = wr.iter().zip(xr).map(|(&p, &q)| p as f64 * q as f64).sum();
                    let quant_err: f64 = (0..cols)
                        .map(|c| {
                            (d[c / GROUP] as f64 / 2.0
                                + 2.0 * f32::EPSILON as f64 * xr[c].abs() as f64)
                                * wr[c].abs() as f64
                        })
                        .sum();
                    let mag: f64 = wr
                        .iter()
                        .zip(xr)
                        .map(|(&p, &q)| (p as f64 * q as f64).abs())
                        .sum();
                    let eps = f32::EPSILON as f64 / 2.0;
                    let rounding = ((cols / GROUP) as f64 + 4.0) * eps * abs_terms(&w, r, &a, i);
                    let bound = quant_err * (1.0 + 1e-9) + rounding + 1e-12 * mag;
                    let got = y[i * rows + r] as f64;
                    assert!(
                        (got - exact).abs() <= bound,
                        "{isa} {rows}x{cols} m {m} r {r} i {i}: got {got} exact {exact} bound {bound}"
                    );
                }
            }
        }
    }
}

/// A row's result does not depend on the batch it is computed in: row i of
/// an m-row matmul equals, bit for bit, the same activation row alone, on
/// every ISA, for 4- and 8-bit weights and widths with and without tails.
/// (The engine's batch invariance rests on this.)
#[test]
fn each_row_is_the_same_alone_and_in_a_batch() {
    let mut rng = Rng::new(4242);
    for (isa, repack) in targets() {
        for &cols in &[96, 576, 1536] {
            for kind in 0..3 {
                let rows = 37;
                let w = form(&random_matrix(&mut rng, rows, cols, kind), isa, repack);
                for m in [2, 5, 16] {
                    let x = rng.vec_normal(m * cols, 1.5);
                    let mut a = QActs::new();
                    a.quantize(isa, &x, m, cols);
                    let mut all = vec![0.0; m * rows];
                    matmul_rows(isa, &w, &a, 0..rows, &mut all);
                    for i in 0..m {
                        let mut one = QActs::new();
                        one.quantize(isa, &x[i * cols..(i + 1) * cols], 1, cols);
                        let mut y = vec![0.0; rows];
                        matmul_rows(isa, &w, &one, 0..rows, &mut y);
                        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                        assert_eq!(
                            bits(&y),
                            bits(&all[i * rows..(i + 1) * rows]),
                            "{isa} (panels {repack}) {}-bit {rows}x{cols} row {i} of {m}",
                            w.bits()
                        );
                    }
                }
            }
        }
    }
}
