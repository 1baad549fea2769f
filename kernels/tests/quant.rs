//! Quantization: lossless ggml repacking (dequantize equals ggml's formula bit
//! for bit), quantize_q4/q8 error bounds, activation quantization error and
//! cross-ISA exactness, row slicing/stacking, and the error messages.

mod common;

use cardinal_kernels::{GROUP, Isa, KernelError, Pool, QActs, QMatrix, matmul};
use common::{Rng, dequantize};
use half::f16;

const COLS: [usize; 6] = [32, 64, 96, 288, 576, 1536];

/// A random finite f16 with |v| < 60 (so -128*v still fits f16), any exponent.
fn rand_f16(rng: &mut Rng) -> f16 {
    loop {
        let h = f16::from_bits(rng.next_u64() as u16);
        if h.is_finite() && h.to_f32().abs() < 60.0 {
            return h;
        }
    }
}

/// Bit-identical, except that a zero may differ in sign (ggml's `d*(q-8)` gives
/// -0 for negative d; `scale*u + min` gives +0): equal as f32 values either way.
fn same(got: f32, want: f32, block: usize, elem: usize) {
    let ok = if want == 0.0 {
        got == 0.0
    } else {
        got.to_bits() == want.to_bits()
    };
    assert!(ok, "block {block} elem {elem}: got {got:e} want {want:e}");
}

#[test]
fn ggml_q4_0_is_lossless() {
    let mut rng = Rng::new(10);
    for &cols in &COLS {
        for rows in [1, 3, 17] {
            let nb = rows * cols / GROUP;
            let mut raw = Vec::new();
            for _ in 0..nb {
                raw.extend_from_slice(&rand_f16(&mut rng).to_le_bytes());
                raw.extend(rng.bytes(16));
            }
            let w = QMatrix::from_ggml_q4_0(rows, cols, &raw).unwrap();
            assert_eq!((w.rows(), w.cols(), w.bits()), (rows, cols, 4));
            let got = dequantize(&w);
            for b in 0..nb {
                let blk = &raw[b * 18..(b + 1) * 18];
                let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                for j in 0..GROUP {
                    let q = if j < 16 {
                        blk[2 + j] & 0xF
                    } else {
                        blk[2 + j - 16] >> 4
                    };
                    let want = d * (q as i32 - 8) as f32;
                    same(got[b * GROUP + j], want, b, j);
                }
            }
        }
    }
}

#[test]
fn ggml_q4_1_is_lossless() {
    let mut rng = Rng::new(11);
    for &cols in &COLS {
        for rows in [1, 2, 9] {
            let nb = rows * cols / GROUP;
            let mut raw = Vec::new();
            for _ in 0..nb {
                raw.extend_from_slice(&rand_f16(&mut rng).to_le_bytes());
                raw.extend_from_slice(&rand_f16(&mut rng).to_le_bytes());
                raw.extend(rng.bytes(16));
            }
            let w = QMatrix::from_ggml_q4_1(rows, cols, &raw).unwrap();
            let got = dequantize(&w);
            for b in 0..nb {
                let blk = &raw[b * 20..(b + 1) * 20];
                let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                let m = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
                for j in 0..GROUP {
                    let q = if j < 16 {
                        blk[4 + j] & 0xF
                    } else {
                        blk[4 + j - 16] >> 4
                    };
                    let want = d * q as f32 + m;
                    same(got[b * GROUP + j], want, b, j);
                }
            }
        }
    }
}

#[test]
fn ggml_q8_0_is_lossless() {
    let mut rng = Rng::new(12);
    for &cols in &COLS {
        for rows in [1, 4, 11] {
            let nb = rows * cols / GROUP;
            let mut raw = Vec::new();
            for _ in 0..nb {
                raw.extend_from_slice(&rand_f16(&mut rng).to_le_bytes());
                raw.extend(rng.bytes(32));
            }
            let w = QMatrix::from_ggml_q8_0(rows, cols, &raw).unwrap();
            assert_eq!(w.bits(), 8);
            let got = dequantize(&w);
            for b in 0..nb {
                let blk = &raw[b * 34..(b + 1) * 34];
                let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                for j in 0..GROUP {
                    let want = d * (blk[2 + j] as i8) as f32;
                    same(got[b * GROUP + j], want, b, j);
                }
            }
        }
    }
}

#[test]
fn ggml_raw_length_is_checked_exactly() {
    let e = QMatrix::from_ggml_q4_0(2, 64, &[0u8; 4 * 18 - 1]).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(
            e,
            KernelError::RawLength {
                expected: 72,
                got: 71,
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("71") && msg.contains("72") && msg.contains("2x64"),
        "{msg}"
    );
    assert!(QMatrix::from_ggml_q4_1(2, 64, &[0u8; 4 * 20 + 1]).is_err());
    assert!(QMatrix::from_ggml_q8_0(1, 32, &[0u8; 34]).is_ok());
    let e = QMatrix::from_ggml_q8_0(576, 100, &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("576x100") && e.contains("multiple of 32"), "{e}");
    let e = QMatrix::quantize_q4(1, 0, &[]).unwrap_err().to_string();
    assert!(e.contains("1x0"), "{e}");
    let e = QMatrix::quantize_q8(2, 32, &[0.0; 63])
        .unwrap_err()
        .to_string();
    assert!(e.contains("63") && e.contains("64"), "{e}");
    let mut w = vec![0.0; 64];
    w[40] = f32::NAN;
    let e = QMatrix::quantize_q4(2, 32, &w).unwrap_err().to_string();
    assert!(e.contains("row 1 col 8"), "{e}");
}

/// Largest |x - dequantized| allowed: half a step, plus f32 rounding of the
/// dequantization `s*u + m` and of the quantizer's own arithmetic (a few ulps
/// of the largest magnitude involved).
fn step_bound(scale: f32, min: f32, x: f32) -> f32 {
    scale / 2.0 + 4.0 * f32::EPSILON * (x.abs() + min.abs() + 255.0 * scale)
}

#[test]
fn quantize_q4_error_is_at_most_half_a_step() {
    let mut rng = Rng::new(13);
    for &cols in &COLS {
        for rows in [1, 5] {
            let mut x = rng.vec_normal(rows * cols, 0.05);
            // Some awkward groups: constant, tiny range far from zero, all negative.
            x[..GROUP].fill(0.3);
            if x.len() >= 3 * GROUP {
                for (i, v) in x[GROUP..2 * GROUP].iter_mut().enumerate() {
                    *v = 100.0 + i as f32 * 1e-4;
                }
                for v in &mut x[2 * GROUP..3 * GROUP] {
                    *v = -v.abs() - 1.0;
                }
            }
            let w = QMatrix::quantize_q4(rows, cols, &x).unwrap();
            assert_eq!(w.bits(), 4);
            let got = dequantize(&w);
            for r in 0..rows {
                for c in 0..cols {
                    let (s, m) = w.group_params(r, c / GROUP);
                    let k = r * cols + c;
                    let err = (got[k] - x[k]).abs();
                    assert!(
                        err <= step_bound(s, m, x[k]),
                        "r {r} c {c}: x {} got {} scale {s}",
                        x[k],
                        got[k]
                    );
                    assert!(w.quant(r, c) <= 15);
                }
            }
        }
    }
}

#[test]
fn quantize_q8_error_is_at_most_half_a_step() {
    let mut rng = Rng::new(14);
    for &cols in &COLS {
        let rows = 3;
        let mut x = rng.vec_normal(rows * cols, 0.02);
        x[..GROUP].fill(0.0);
        let w = QMatrix::quantize_q8(rows, cols, &x).unwrap();
        assert_eq!(w.bits(), 8);
        let got = dequantize(&w);
        for r in 0..rows {
            for c in 0..cols {
                let (s, m) = w.group_params(r, c / GROUP);
                assert_eq!(m, -128.0 * s, "q8 min is -128*scale");
                let k = r * cols + c;
                assert!(
                    (got[k] - x[k]).abs() <= step_bound(s, m, x[k]),
                    "r {r} c {c}"
                );
            }
        }
        assert!(got[..GROUP].iter().all(|&v| v == 0.0));
    }
}

#[test]
fn activation_quantization_is_exact_across_isas_and_within_half_a_step() {
    let mut rng = Rng::new(15);
    for &cols in &COLS {
        for m in [1, 2, 5, 16] {
            let mut x = rng.vec_normal(m * cols, 3.0);
            // Exact ties: amax 127 makes d = 1, so k + 0.5 must round half to even.
            for (k, v) in x[..GROUP].iter_mut().enumerate() {
                *v = if k == 0 {
                    127.0
                } else {
                    (k as f32 - 16.0) + 0.5
                };
            }
            if cols > GROUP {
                x[GROUP..2 * GROUP].fill(0.0);
            }
            let mut want = QActs::new();
            want.quantize(Isa::Scalar, &x, m, cols);
            assert_eq!((want.m(), want.cols()), (m, cols));
            let mut qs = vec![0i8; cols];
            want.row_quants(0, &mut qs);
            for k in 1..GROUP {
                let t = (k as f32 - 16.0) + 0.5;
                assert_eq!(qs[k] as f32, t.round_ties_even(), "tie {t}");
            }
            // A scalar matmul reads the per-group sums (the min term) too.
            let w = common::random_matrix(&mut rng, 5, cols, 1);
            let pool = Pool::new(1);
            let mut y_want = vec![0.0; m * 5];
            matmul(&pool, Isa::Scalar, &w, &want, &mut y_want);
            for isa in Isa::all_available() {
                let mut got = QActs::new();
                got.quantize(isa, &x, m, cols);
                let (mut a, mut b) = (vec![0i8; cols], vec![0i8; cols]);
                for i in 0..m {
                    want.row_quants(i, &mut a);
                    got.row_quants(i, &mut b);
                    assert_eq!(a, b, "{isa} cols {cols} row {i}");
                    assert_eq!(want.row_scales(i), got.row_scales(i), "{isa}");
                }
                let mut y = vec![0.0; m * 5];
                matmul(&pool, Isa::Scalar, &w, &got, &mut y);
                assert_eq!(y, y_want, "{isa} cols {cols}: group sums");
            }
            let mut deq = vec![0.0; cols];
            for i in 0..m {
                want.dequantize_row(i, &mut deq);
                let d = want.row_scales(i);
                for c in 0..cols {
                    let x0 = x[i * cols + c];
                    let bound = d[c / GROUP] / 2.0 + 2.0 * f32::EPSILON * x0.abs();
                    assert!(
                        (deq[c] - x0).abs() <= bound,
                        "row {i} col {c}: {x0} -> {}",
                        deq[c]
                    );
                }
            }
        }
    }
}

#[test]
fn quantize_pool_equals_quantize() {
    let mut rng = Rng::new(18);
    for threads in [2, 3] {
        let pool = Pool::new(threads);
        for &cols in &COLS {
            let w = common::random_matrix(&mut rng, 9, cols, 1);
            for m in [1, 7, 16, 33] {
                let x = rng.vec_normal(m * cols, 2.0);
                for isa in Isa::all_available() {
                    let mut a = QActs::new();
                    a.quantize(isa, &x, m, cols);
                    let mut b = QActs::new();
                    b.quantize(isa, &rng.vec_normal(3 * cols, 1.0), 3, cols); // stale contents
                    b.quantize_pool(&pool, isa, &x, m, cols);
                    assert_eq!((b.m(), b.cols()), (m, cols));
                    let (mut qa, mut qb) = (vec![0i8; cols], vec![0i8; cols]);
                    for i in 0..m {
                        a.row_quants(i, &mut qa);
                        b.row_quants(i, &mut qb);
                        assert_eq!(qa, qb, "{isa} threads {threads} cols {cols} row {i}");
                        assert_eq!(a.row_scales(i), b.row_scales(i));
                    }
                    // The per-group sums feed the min term: same products.
                    let (mut ya, mut yb) = (vec![0.0; m * 9], vec![0.0; m * 9]);
                    matmul(&pool, isa, &w, &a, &mut ya);
                    matmul(&pool, isa, &w, &b, &mut yb);
                    assert_eq!(ya, yb, "{isa} threads {threads} cols {cols} m {m}");
                }
            }
        }
    }
}

#[test]
fn round_trip_equals_quantize_then_dequantize_on_every_isa() {
    let mut rng = Rng::new(17);
    for &cols in &COLS {
        let m = 3;
        let mut x = rng.vec_normal(m * cols, 3.0);
        x[1] = 250.0; // an outlier group
        x[cols..cols + GROUP].fill(0.0); // an all-zero group
        let mut q = QActs::new();
        q.quantize(Isa::Scalar, &x, m, cols);
        let mut want = vec![0.0; m * cols];
        for i in 0..m {
            q.dequantize_row(i, &mut want[i * cols..(i + 1) * cols]);
        }
        for isa in Isa::all_available() {
            let mut got = x.clone();
            QActs::round_trip(isa, &mut got);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{isa} cols {cols}");
        }
    }
    // A tail shorter than a group is left alone.
    let mut t = vec![0.3f32; GROUP + 5];
    QActs::round_trip(Isa::Scalar, &mut t);
    assert_eq!(t[GROUP..], [0.3f32; 5]);
}

#[test]
#[should_panic(expected = "multiple of 32")]
fn activation_cols_must_be_a_multiple_of_32() {
    QActs::new().quantize(Isa::Scalar, &[0.0; 40], 1, 40);
}

#[test]
fn slice_and_concat_rows_round_trip() {
    let mut rng = Rng::new(16);
    for kind in 0..3 {
        for &cols in &COLS {
            let w = common::random_matrix(&mut rng, 13, cols, kind);
            let full = dequantize(&w);
            let parts = [w.slice_rows(0..4), w.slice_rows(4..5), w.slice_rows(5..13)];
            assert_eq!(parts[2].rows(), 8);
            assert_eq!(dequantize(&parts[2]), full[5 * cols..13 * cols]);
            let back = QMatrix::concat_rows(&parts).unwrap();
            assert_eq!(back.rows(), 13);
            assert_eq!(dequantize(&back), full);
            assert_eq!(back.size_bytes(), w.size_bytes());
            assert_eq!(w.slice_rows(3..3).rows(), 0);
        }
    }
    let a = QMatrix::quantize_q4(1, 64, &[0.5; 64]).unwrap();
    let b = QMatrix::quantize_q8(1, 64, &[0.5; 64]).unwrap();
    let c = QMatrix::quantize_q4(1, 32, &[0.5; 32]).unwrap();
    let e = QMatrix::concat_rows(&[a.clone(), b])
        .unwrap_err()
        .to_string();
    assert!(e.contains("part 1") && e.contains("8-bit"), "{e}");
    assert!(QMatrix::concat_rows(&[a, c]).is_err());
    assert!(matches!(
        QMatrix::concat_rows(&[]),
        Err(KernelError::ConcatEmpty)
    ));
}

#[test]
fn debug_does_not_dump_data() {
    let w = QMatrix::quantize_q4(64, 1536, &vec![0.25; 64 * 1536]).unwrap();
    let s = format!("{w:?}");
    assert!(s.len() < 120 && s.contains("1536"), "{s}");
    assert_eq!(w.size_bytes(), 64 * 1536 / 2 + 64 * 48 * 4);
    let mut a = QActs::new();
    a.quantize(Isa::Scalar, &vec![1.0; 4 * 576], 4, 576);
    assert!(format!("{a:?}").len() < 80);
}
