//! Elementwise, RoPE and attention kernels: every available ISA against the
//! scalar reference on lengths that hit every vector tail, plus properties of
//! the references themselves (RoPE against the ggml formula, attention against
//! an f64 softmax over the dequantized cache).

mod common;

use cardinal_kernels::{
    AttnState, Isa, KEY_TILE, Rope, add_scaled, attend, attend_finish, attend_group, hadamard32,
    key_len, quantize_kv, quantize_kv_with, rmsnorm, softmax, store_key, swiglu, tile_keys,
};
use common::Rng;

const LENS: [usize; 12] = [1, 7, 8, 9, 15, 16, 17, 31, 64, 576, 1536, 4099];

/// `|a - b| <= rel * max(|a|, |b|) + abs`.
fn close(a: f32, b: f32, rel: f32, abs: f32) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()) + abs || (a.is_infinite() && a == b)
}

#[test]
fn rmsnorm_matches_scalar() {
    let mut rng = Rng::new(1);
    for &n in &LENS {
        let x = rng.vec_normal(n, 2.0);
        let w = rng.vec_normal(n, 1.0);
        let mut want = vec![0.0; n];
        rmsnorm(Isa::Scalar, &x, &w, 1e-5, &mut want);
        for isa in Isa::all_available() {
            let mut got = vec![0.0; n];
            rmsnorm(isa, &x, &w, 1e-5, &mut got);
            // The sum of squares is reordered: relative error <= n*eps in it,
            // half of that in 1/sqrt, plus two roundings in the products.
            let rel = (n as f32 + 4.0) * f32::EPSILON;
            for k in 0..n {
                assert!(
                    close(got[k], want[k], rel, 0.0),
                    "{isa} n {n} k {k}: {} vs {}",
                    got[k],
                    want[k]
                );
            }
        }
    }
}

#[test]
fn hadamard32_matches_scalar_bit_for_bit() {
    let mut rng = Rng::new(12);
    for &n in LENS.iter().chain(&[32, 96]) {
        let mut x = rng.vec_normal(n, 3.0);
        if n > 5 {
            x[5] = 400.0; // an outlier channel, as SmolLM2's residual has
        }
        for scale in [1.0, 1.0 / 32.0, 0.3] {
            let mut want = x.clone();
            hadamard32(Isa::Scalar, &mut want, scale);
            for isa in Isa::all_available() {
                let mut got = x.clone();
                hadamard32(isa, &mut got, scale);
                let (g, w): (Vec<u32>, Vec<u32>) = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a.to_bits(), b.to_bits()))
                    .unzip();
                assert_eq!(g, w, "{isa} n {n} scale {scale}");
            }
            // The tail past the last whole block is untouched.
            assert_eq!(want[n / 32 * 32..], x[n / 32 * 32..], "n {n}");
        }
        // Forward then back with 1/32 restores the input.
        let mut y = x.clone();
        hadamard32(Isa::Scalar, &mut y, 1.0);
        hadamard32(Isa::Scalar, &mut y, 1.0 / 32.0);
        for k in 0..n {
            assert!(
                close(y[k], x[k], 1e-5, 1e-4),
                "n {n} k {k}: {} vs {}",
                y[k],
                x[k]
            );
        }
    }
}

#[test]
fn swiglu_matches_scalar() {
    let mut rng = Rng::new(2);
    for &n in &LENS {
        let mut g = rng.vec_normal(n, 4.0);
        let u = rng.vec_normal(n, 1.0);
        let extremes = [-100.0, 100.0, -88.0, 89.0, 0.0, -0.0, 20.0, -20.0];
        for (k, &e) in extremes.iter().enumerate().take(n) {
            g[k] = e;
        }
        let mut want = vec![0.0; n];
        swiglu(Isa::Scalar, &g, &u, &mut want);
        for isa in Isa::all_available() {
            let mut got = vec![0.0; n];
            swiglu(isa, &g, &u, &mut got);
            // exp is a ~2 ulp polynomial; a division and two products follow.
            for k in 0..n {
                assert!(
                    close(got[k], want[k], 8.0 * f32::EPSILON, 1e-37),
                    "{isa} g {} u {}: {} vs {}",
                    g[k],
                    u[k],
                    got[k],
                    want[k]
                );
            }
        }
    }
}

#[test]
fn softmax_matches_scalar() {
    let mut rng = Rng::new(3);
    for &n in &LENS {
        let mut x = rng.vec_normal(n, 5.0);
        if n > 3 {
            x[1] = f32::NEG_INFINITY;
            x[n - 1] = -200.0;
        }
        let mut want = x.clone();
        softmax(Isa::Scalar, &mut want);
        assert!((want.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        for isa in Isa::all_available() {
            let mut got = x.clone();
            softmax(isa, &mut got);
            let rel = (n as f32 + 8.0) * f32::EPSILON;
            for k in 0..n {
                assert!(
                    close(got[k], want[k], rel, 1e-38),
                    "{isa} n {n} k {k}: {} vs {}",
                    got[k],
                    want[k]
                );
            }
            if n > 3 {
                assert_eq!(got[1], 0.0, "exp(-inf) is exactly 0");
            }
        }
    }
    let mut empty: [f32; 0] = [];
    softmax(Isa::best(), &mut empty);
}

#[test]
fn add_scaled_matches_scalar() {
    let mut rng = Rng::new(4);
    for &n in &LENS {
        let x = rng.vec_normal(n, 1.0);
        let acc0 = rng.vec_normal(n, 1.0);
        let mut want = acc0.clone();
        add_scaled(Isa::Scalar, &mut want, &x, 0.22);
        for isa in Isa::all_available() {
            let mut got = acc0.clone();
            add_scaled(isa, &mut got, &x, 0.22);
            // FMA skips one rounding: at most 1 ulp of the larger operand.
            for k in 0..n {
                let tol = f32::EPSILON * (acc0[k].abs() + (0.22 * x[k]).abs());
                assert!((got[k] - want[k]).abs() <= tol, "{isa} n {n} k {k}");
            }
        }
    }
}

#[test]
fn rope_follows_the_ggml_formula() {
    let mut rng = Rng::new(5);
    for (hd, heads, base) in [(64, 9, 10000.0f32), (128, 4, 500000.0), (8, 3, 10000.0)] {
        let rope = Rope::new(hd, base);
        for pos in [0, 1, 17, 4095] {
            let x = rng.vec_normal(hd * heads, 1.0);
            let mut y = x.clone();
            rope.apply(&mut y, heads, pos);
            let scale = base.powf(-2.0 / hd as f32);
            for h in 0..heads {
                let mut theta = pos as f32;
                for i in 0..hd / 2 {
                    let (c, s) = (theta.cos(), theta.sin());
                    let (x0, x1) = (x[h * hd + 2 * i], x[h * hd + 2 * i + 1]);
                    assert_eq!(y[h * hd + 2 * i], x0 * c - x1 * s);
                    assert_eq!(y[h * hd + 2 * i + 1], x0 * s + x1 * c);
                    theta *= scale;
                }
            }
            if pos == 0 {
                assert_eq!(x, y);
            }
        }
    }
}

#[test]
fn tabulated_rope_equals_computed_rope() {
    let mut rng = Rng::new(13);
    for (hd, base) in [
        (64, 100000.0f32),
        (128, 500000.0),
        (8, 10000.0),
        (600, 10000.0),
    ] {
        let plain = Rope::new(hd, base);
        let mut tab = Rope::new(hd, base);
        tab.tabulate(40);
        tab.tabulate(20); // never shrinks
        tab.tabulate(70);
        for pos in [0, 1, 39, 40, 69, 70, 1000] {
            let x = rng.vec_normal(hd * 3, 1.0);
            let (mut a, mut b) = (x.clone(), x.clone());
            plain.apply(&mut a, 3, pos);
            tab.apply(&mut b, 3, pos);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b), "hd {hd} pos {pos}");
        }
    }
}

#[test]
fn quantize_kv_error_is_half_a_step() {
    let mut rng = Rng::new(6);
    for n in [1, 64, 128, 80] {
        let x = rng.vec_normal(n, 3.0);
        let mut q = vec![0i8; n];
        let d = quantize_kv(&x, &mut q);
        for k in 0..n {
            assert!((d * q[k] as f32 - x[k]).abs() <= d / 2.0 + 2.0 * f32::EPSILON * x[k].abs());
            assert!(q[k] != -128);
        }
    }
    let mut q = [1i8; 4];
    assert_eq!(quantize_kv(&[0.0; 4], &mut q), 0.0);
    assert_eq!(q, [0; 4]);
}

/// `quantize_kv_with` gives `quantize_kv`'s bits on every ISA: head sizes
/// on and off the SIMD path (multiples of 16 or not), exact half-step ties,
/// an all-zero head and random heads.
#[test]
fn quantize_kv_with_equals_quantize_kv_on_every_isa() {
    let mut rng = Rng::new(10);
    let mut cases: Vec<Vec<f32>> = vec![vec![0.0; 64]];
    let mut ties: Vec<f32> = (-63..=64)
        .map(|i| i as f32 / 2.0 + 0.25 * (i % 2) as f32)
        .collect();
    ties[0] = 127.0;
    cases.push(ties);
    for n in [16, 32, 64, 128, 80, 12, 1] {
        for _ in 0..20 {
            cases.push(rng.vec_normal(n, 3.0));
        }
    }
    for x in &cases {
        let mut want = vec![0i8; x.len()];
        let d = quantize_kv(x, &mut want);
        for isa in Isa::all_available() {
            let mut got = vec![1i8; x.len()];
            let dg = quantize_kv_with(isa, x, &mut got);
            assert_eq!(dg.to_bits(), d.to_bits(), "{isa} n {}", x.len());
            assert_eq!(got, want, "{isa} n {}", x.len());
        }
    }
}

/// Rounding is to nearest, ties to even, exactly as `f32::round_ties_even`
/// (the kernel avoids the libm call): checked on exact half steps and on
/// random values.
#[test]
fn quantize_kv_rounds_half_to_even() {
    // amax 127 makes d exactly 1, so q = round(x) with ties on the .5s.
    let mut x: Vec<f32> = (-254..=254).map(|i| i as f32 / 2.0).collect();
    x.push(127.0);
    let mut q = vec![0i8; x.len()];
    assert_eq!(quantize_kv(&x, &mut q), 1.0);
    for (k, &v) in x.iter().enumerate() {
        assert_eq!(
            q[k] as f32,
            v.round_ties_even().clamp(-127.0, 127.0),
            "x {v}"
        );
    }
    let mut rng = Rng::new(9);
    for _ in 0..200 {
        let x = rng.vec_normal(64, 2.0);
        let mut q = vec![0i8; 64];
        let d = quantize_kv(&x, &mut q);
        let id = 1.0 / d;
        for (k, &v) in x.iter().enumerate() {
            assert_eq!(q[k] as f32, (v * id).round_ties_even().clamp(-127.0, 127.0));
        }
    }
}

/// `store_key` writes what `quantize_kv` gives, at the slots `tile_keys`
/// puts it, on every ISA, for head sizes on and off the vector widths; the
/// tile layout is byte `d * 16 + u` of tile `t / 16` for element `d` of
/// token `t = 16 * tile + u`.
#[test]
fn store_key_writes_the_tile_layout() {
    let mut rng = Rng::new(5);
    for hd in [64, 80, 12, 320] {
        let n = 37;
        let xs: Vec<Vec<f32>> = (0..n).map(|_| rng.vec_normal(hd, 1.5)).collect();
        let mut rows = vec![0i8; n * hd];
        let scales: Vec<f32> = xs
            .iter()
            .enumerate()
            .map(|(t, x)| quantize_kv(x, &mut rows[t * hd..(t + 1) * hd]))
            .collect();
        let want = tile_keys(&rows, hd);
        assert_eq!(want.len(), key_len(n, hd));
        assert_eq!(want.len(), 48 * hd);
        for t in 0..n {
            for d in 0..hd {
                let at = t / KEY_TILE * KEY_TILE * hd + d * KEY_TILE + t % KEY_TILE;
                assert_eq!(want[at], rows[t * hd + d]);
            }
        }
        for isa in Isa::all_available() {
            let mut got = vec![0i8; key_len(n, hd)];
            for (t, x) in xs.iter().enumerate() {
                assert_eq!(
                    store_key(isa, x, &mut got, t),
                    scales[t],
                    "{isa} hd {hd} t {t}"
                );
            }
            assert_eq!(got, want, "{isa} hd {hd}");
        }
    }
}

/// A random int8 cache of `n` tokens.
fn cache(rng: &mut Rng, n: usize, hd: usize) -> (Vec<i8>, Vec<f32>) {
    let mut k = vec![0i8; n * hd];
    let mut s = Vec::new();
    for t in 0..n {
        let x = rng.vec_normal(hd, 1.0 + (t % 3) as f32);
        s.push(quantize_kv(&x, &mut k[t * hd..(t + 1) * hd]));
    }
    (k, s)
}

#[test]
fn attention_over_blocks_matches_f64_softmax() {
    let mut rng = Rng::new(7);
    for hd in [64, 128, 80, 12] {
        for n in [1, 5, 33, 300] {
            let q = rng.vec_normal(hd, 1.0);
            let (k, ks) = cache(&mut rng, n, hd);
            let (v, vs) = cache(&mut rng, n, hd);
            let scale = 1.0 / (hd as f32).sqrt();
            // f64 reference over the dequantized cache.
            let sc: Vec<f64> = (0..n)
                .map(|t| {
                    let dot: f64 = (0..hd)
                        .map(|i| q[i] as f64 * k[t * hd + i] as f64 * ks[t] as f64)
                        .sum();
                    dot * scale as f64
                })
                .collect();
            let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let p: Vec<f64> = sc.iter().map(|s| (s - mx).exp()).collect();
            let z: f64 = p.iter().sum();
            let want: Vec<f64> = (0..hd)
                .map(|i| {
                    (0..n)
                        .map(|t| p[t] / z * v[t * hd + i] as f64 * vs[t] as f64)
                        .sum()
                })
                .collect();
            let vmax = (0..n * hd)
                .map(|j| (v[j] as f64 * vs[j / hd] as f64).abs())
                .fold(0.0, f64::max);
            for isa in Isa::all_available() {
                for block in [1, 7, 64, n] {
                    let mut st = AttnState::new(hd);
                    let mut t0 = 0;
                    while t0 < n {
                        let t1 = (t0 + block).min(n);
                        attend(
                            isa,
                            &q,
                            &tile_keys(&k[t0 * hd..t1 * hd], hd),
                            &ks[t0..t1],
                            &v[t0 * hd..t1 * hd],
                            &vs[t0..t1],
                            scale,
                            &mut st,
                        );
                        t0 = t1;
                    }
                    let mut out = vec![0.0; hd];
                    attend_finish(&st, &mut out);
                    for i in 0..hd {
                        let err = (out[i] as f64 - want[i]).abs();
                        assert!(
                            err <= 1e-5 * vmax,
                            "{isa} hd {hd} n {n} block {block} i {i}: {} vs {}",
                            out[i],
                            want[i]
                        );
                    }
                    st.reset();
                    attend_finish(&st, &mut out);
                    assert!(out.iter().all(|&x| x == 0.0));
                }
            }
        }
    }
}

/// `attend_group` over the query heads of one KV head equals `attend` called
/// head by head, bit for bit, on every ISA: over several blocks, with token
/// counts that hit whole and partial key tiles, group sizes 1 to 8
/// (several register chunks of heads) and head sizes on and off the AVX-512
/// fast path.
#[test]
fn grouped_attention_equals_per_head_attention() {
    let mut rng = Rng::new(11);
    for hd in [64, 128, 256, 32, 48, 8] {
        for g in [1, 2, 3, 4, 5, 8] {
            for blocks in [[1, 0, 0], [16, 16, 3], [5, 2, 9]] {
                let n: usize = blocks.iter().sum();
                let qs = rng.vec_normal(g * hd, 1.0);
                let (k, ks) = cache(&mut rng, n, hd);
                let (v, vs) = cache(&mut rng, n, hd);
                let scale = 1.0 / (hd as f32).sqrt();
                for isa in Isa::all_available() {
                    let mut grouped: Vec<AttnState> = (0..g).map(|_| AttnState::new(hd)).collect();
                    let mut single: Vec<AttnState> = (0..g).map(|_| AttnState::new(hd)).collect();
                    let mut t0 = 0;
                    for &len in blocks.iter().filter(|&&l| l > 0) {
                        let kb = &tile_keys(&k[t0 * hd..(t0 + len) * hd], hd);
                        let kbs = &ks[t0..t0 + len];
                        let (vb, vbs) = (&v[t0 * hd..(t0 + len) * hd], &vs[t0..t0 + len]);
                        attend_group(isa, &qs, kb, kbs, vb, vbs, scale, &mut grouped);
                        for (j, st) in single.iter_mut().enumerate() {
                            attend(isa, &qs[j * hd..(j + 1) * hd], kb, kbs, vb, vbs, scale, st);
                        }
                        t0 += len;
                    }
                    for j in 0..g {
                        let (mut a, mut b) = (vec![0.0; hd], vec![0.0; hd]);
                        attend_finish(&grouped[j], &mut a);
                        attend_finish(&single[j], &mut b);
                        assert_eq!(a, b, "{isa} hd {hd} g {g} blocks {blocks:?} head {j}");
                    }
                }
            }
        }
    }
}
