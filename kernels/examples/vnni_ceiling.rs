//! How fast can a batched int4 kernel go on this core? Three loops of
//! `vpdpbusd zmm` on cache-resident data, to tell the instruction's peak from
//! what a weight layout lets a kernel reach:
//!
//! 1. `full`: every `vpdpbusd` takes a whole 64-byte activation operand from
//!    memory, as today's batched kernel does (`src/matmul/avx512_batch.rs`);
//! 2. `broadcast`: every `vpdpbusd` takes one 4-byte word broadcast to all
//!    lanes (an embedded broadcast, a narrow load);
//! 3. `panel M`: the inner loop of a *row-panel* layout (16 weight rows
//!    interleaved 4 bytes at a time, so lane `j` of a register is row `j`):
//!    per 32-element group, 4 weight loads expanded to 8 nibble registers
//!    shared by `M` activation rows, 8 broadcast `vpdpbusd` per row, then the
//!    group's scale and min terms in f32. No horizontal reduction, no tail.
//!
//! `cargo run --release -p cardinal-kernels --example vnni_ceiling`
//! (needs AVX-512 VNNI; checked at run time). The figures feed
//! PERFORMANCE.md ("Goals missed").

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::hint::black_box;
    use std::time::Instant;

    /// Groups per row in the panel model (576 = 18 × 32, SmolLM2's width).
    const GROUPS: usize = 18;

    /// Loop 1: 64-byte activation operands, 8 independent accumulators.
    ///
    /// # Safety
    /// AVX-512 F/BW/VNNI available; `buf` holds at least 2048 bytes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn full(n: usize, buf: &[u8]) -> i32 {
        assert!(buf.len() >= 2048);
        let w = [_mm512_set1_epi8(3), _mm512_set1_epi8(5)];
        let mut acc = [_mm512_setzero_si512(); 8];
        let p = buf.as_ptr();
        for it in 0..n {
            let o = (it & 3) * 512;
            for (k, a) in acc.iter_mut().enumerate() {
                // SAFETY: o + 64k + 64 <= 1536 + 512 = 2048 <= buf.len().
                let x = unsafe { _mm512_loadu_si512(p.add(o + 64 * k).cast()) };
                *a = _mm512_dpbusd_epi32(*a, w[k & 1], x);
            }
        }
        let s = acc
            .iter()
            .fold(_mm512_setzero_si512(), |s, &a| _mm512_add_epi32(s, a));
        _mm512_reduce_add_epi32(s)
    }

    /// Loop 2: one broadcast 4-byte word per `vpdpbusd`.
    ///
    /// # Safety
    /// AVX-512 F/BW/VNNI available; `buf` holds at least 512 bytes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn broadcast(n: usize, buf: &[u8]) -> i32 {
        assert!(buf.len() >= 512);
        let w: [__m512i; 8] = std::array::from_fn(|k| _mm512_set1_epi8(k as i8 + 1));
        let mut acc = [_mm512_setzero_si512(); 8];
        let p = buf.as_ptr();
        for it in 0..n {
            let o = (it & 3) * 128;
            for (k, a) in acc.iter_mut().enumerate() {
                // SAFETY: o + 4k + 4 <= 384 + 32 <= buf.len().
                let word = unsafe { p.add(o + 4 * k).cast::<i32>().read_unaligned() };
                *a = _mm512_dpbusd_epi32(*a, w[k], _mm512_set1_epi32(word));
            }
        }
        let s = acc
            .iter()
            .fold(_mm512_setzero_si512(), |s, &a| _mm512_add_epi32(s, a));
        _mm512_reduce_add_epi32(s)
    }

    /// Loop 3: the row-panel inner loop for `M` activation rows (see the
    /// file comment). `w` holds 18 groups × 256 bytes of panel weights, `a`
    /// `M` rows of 576 int8, `sc` the scales (`s`, `m` per group, then `d`
    /// and `d·Σq` per row and group).
    ///
    /// # Safety
    /// AVX-512 F/BW/VNNI and FMA available; the slices have the sizes above.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma")]
    unsafe fn panel<const M: usize>(n: usize, w: &[u8], a: &[i8], sc: &[f32]) -> f32 {
        assert!(w.len() >= GROUPS * 256 && a.len() >= M * GROUPS * 32);
        assert!(sc.len() >= GROUPS * 32 + 2 * M * GROUPS);
        let mask = _mm512_set1_epi8(0x0f);
        let mut facc = [_mm512_setzero_ps(); M];
        let mut macc = [_mm512_setzero_ps(); M];
        let (wp, ap, sp) = (w.as_ptr(), a.as_ptr(), sc.as_ptr());
        let (d_at, sd_at) = (GROUPS * 32, GROUPS * 32 + M * GROUPS);
        for it in 0..n {
            let g = it % GROUPS;
            // SAFETY: every offset is inside the slices asserted above.
            unsafe {
                let wg = wp.add(g * 256);
                let raw: [__m512i; 4] =
                    std::array::from_fn(|k| _mm512_loadu_si512(wg.add(64 * k).cast()));
                let mut e = [_mm512_setzero_si512(); 8];
                for k in 0..4 {
                    e[2 * k] = _mm512_and_si512(raw[k], mask);
                    e[2 * k + 1] = _mm512_and_si512(_mm512_srli_epi16::<4>(raw[k]), mask);
                }
                let s = _mm512_loadu_ps(sp.add(g * 32));
                let m = _mm512_loadu_ps(sp.add(g * 32 + 16));
                for i in 0..M {
                    let row = ap.add((i * GROUPS + g) * 32);
                    let mut x = _mm512_setzero_si512();
                    for (t, &et) in e.iter().enumerate() {
                        let word = row.add(4 * t).cast::<i32>().read_unaligned();
                        x = _mm512_dpbusd_epi32(x, et, _mm512_set1_epi32(word));
                    }
                    let d = _mm512_set1_ps(*sp.add(d_at + i * GROUPS + g));
                    let sd = _mm512_set1_ps(*sp.add(sd_at + i * GROUPS + g));
                    facc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(x), _mm512_mul_ps(s, d), facc[i]);
                    macc[i] = _mm512_fmadd_ps(m, sd, macc[i]);
                }
            }
        }
        let mut r = _mm512_setzero_ps();
        for i in 0..M {
            r = _mm512_add_ps(r, _mm512_add_ps(facc[i], macc[i]));
        }
        _mm512_reduce_add_ps(r)
    }

    fn report(what: &str, dpbusd: usize, secs: f64, peak: f64) {
        let rate = dpbusd as f64 / secs;
        let pct = if peak > 0.0 {
            100.0 * rate / peak
        } else {
            100.0
        };
        println!(
            "{what:<22} {:6.3} G vpdpbusd/s  {:6.1} GMAC/s  {pct:5.1}% of the broadcast loop",
            rate / 1e9,
            rate * 64.0 / 1e9
        );
    }

    pub fn run() {
        if !(is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("fma"))
        {
            eprintln!("this CPU has no AVX-512 VNNI; nothing to measure");
            std::process::exit(2);
        }
        let buf = vec![1u8; 8192];
        let acts = vec![1i8; 8 * GROUPS * 32];
        let sc = vec![0.5f32; GROUPS * 32 + 16 * GROUPS];
        let n = 50_000_000;
        // Best of 3 per loop: the machine may be shared.
        let time = |f: &dyn Fn() -> f64| (0..3).map(|_| f()).fold(f64::MAX, f64::min);
        let t_b = time(&|| {
            let t = Instant::now();
            // SAFETY: features checked above; buf has 8192 bytes.
            black_box(unsafe { broadcast(n, &buf) });
            t.elapsed().as_secs_f64()
        });
        let peak = (n * 8) as f64 / t_b;
        report("broadcast operand", n * 8, t_b, peak);
        let t_f = time(&|| {
            let t = Instant::now();
            // SAFETY: as above.
            black_box(unsafe { full(n, &buf) });
            t.elapsed().as_secs_f64()
        });
        report("64-byte operand", n * 8, t_f, peak);
        let groups = 10_000_000;
        macro_rules! panel {
            ($m:literal) => {{
                let t = time(&|| {
                    let t = Instant::now();
                    // SAFETY: as above; the slices are sized for M = 8.
                    black_box(unsafe { panel::<$m>(groups, &buf, &acts, &sc) });
                    t.elapsed().as_secs_f64()
                });
                report(concat!("panel, M = ", $m), groups * 8 * $m, t, peak);
            }};
        }
        panel!(1);
        panel!(2);
        panel!(4);
        panel!(8);
    }
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    x86::run();
    #[cfg(not(target_arch = "x86_64"))]
    eprintln!("vnni_ceiling measures x86-64 AVX-512 VNNI only");
}
