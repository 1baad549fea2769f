//! The transformer forward pass, one part at a time: token embedding, a
//! decoder layer over a batch of rows (each row one token of some sequence at
//! some position), and the final norm + output head. Every matmul runs A8×W4
//! (or A8×W8) through `cardinal-kernels`; the residual stream stays in f32.
//! A row attends to its own sequence's C8 cache, which already holds every
//! earlier position, including earlier rows of the same batch.

use std::sync::atomic::{AtomicUsize, Ordering};

use cardinal_kernels::{self as k, AttnState, Isa, Pool, QActs, Rope, RowsPtr};

use crate::config::ModelConfig;
use crate::kv::{KV_BLOCK, SeqKv};
use crate::model::{Layer, Linear, Model};

/// One row of a batch: which cache (index into the caches slice) and which position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchRow {
    pub seq: usize,
    pub pos: usize,
}

/// Reusable scratch buffers, one per stage, so steady-state decoding does
/// not allocate.
#[derive(Debug, Default)]
pub struct Workspace {
    acts: QActs,
    xn: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gu: Vec<f32>,
    h: Vec<f32>,
    part: Vec<f32>,
    rope: Option<(usize, u32, Rope)>,
}

impl Workspace {
    /// An empty workspace; buffers grow on first use.
    pub fn new() -> Self {
        Self::default()
    }

    fn rope(&mut self, cfg: &ModelConfig) -> &mut Rope {
        let key = (cfg.head_dim, cfg.rope_theta.to_bits());
        if self.rope.as_ref().map(|r| (r.0, r.1)) != Some(key) {
            self.rope = Some((key.0, key.1, Rope::new(cfg.head_dim, cfg.rope_theta)));
        }
        &mut self.rope.as_mut().expect("set above").2
    }
}

fn resize(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

/// `out[m x lin.rows()] = acts · linᵀ`, part by part.
pub fn linear(
    pool: &Pool,
    isa: Isa,
    lin: &Linear,
    acts: &QActs,
    out: &mut [f32],
    part: &mut Vec<f32>,
) {
    let m = acts.m();
    if let [only] = lin.parts() {
        k::matmul(pool, isa, only, acts, &mut out[..m * lin.rows()]);
        return;
    }
    let mut off = 0;
    for p in lin.parts() {
        resize(part, m * p.rows());
        k::matmul(pool, isa, p, acts, &mut part[..m * p.rows()]);
        for i in 0..m {
            out[i * lin.rows() + off..i * lin.rows() + off + p.rows()]
                .copy_from_slice(&part[i * p.rows()..(i + 1) * p.rows()]);
        }
        off += p.rows();
    }
}

/// Writes the scaled embedding of each token into consecutive rows of `out`.
pub fn embed(model: &Model, tokens: &[u32], out: &mut [f32]) {
    let h = model.cfg.hidden;
    for (i, &t) in tokens.iter().enumerate() {
        let row = &mut out[i * h..(i + 1) * h];
        model.embedding.dequantize_row(t as usize, row);
        if model.cfg.embedding_multiplier != 1.0 {
            row.iter_mut()
                .for_each(|v| *v *= model.cfg.embedding_multiplier);
        }
    }
}

/// A pass over one row of hidden values, run on the kernel pool.
pub type RowFn = dyn Fn(&mut [f32]) + Sync;

/// Runs decoder layer `layer` (local index `local` in the caches) over the
/// rows of `x` (`rows.len() x hidden`), updating `x` in place. Each row's
/// cache must have capacity for its position. `row_out`, if given, is
/// applied to each row of `x` at the end, in the same pass as the residual
/// add (the pipeline rounds rows through its link format there).
///
/// Layers can hand over their first pass: with `next_norm` (the next
/// layer's `attn_norm`), the last pass also normalizes and quantizes each
/// finished row for the next layer into `ws`, and that next call, given
/// `normed_input`, skips its own first pass. Same operations, one fork-join
/// fewer per layer.
#[allow(clippy::too_many_arguments)]
pub fn forward_layer(
    pool: &Pool,
    isa: Isa,
    cfg: &ModelConfig,
    layer: &Layer,
    local: usize,
    x: &mut [f32],
    rows: &[BatchRow],
    caches: &mut [&mut SeqKv],
    ws: &mut Workspace,
    row_out: Option<&RowFn>,
    normed_input: bool,
    next_norm: Option<&[f32]>,
) {
    let n = rows.len();
    let hd = cfg.hidden;
    let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
    let qkv_w = qd + 2 * kvd;
    let rotate_kv = rotates_kv(cfg);
    assert!(
        x.len() >= n * hd,
        "forward_layer: x has {} values for {n} rows of {hd}",
        x.len()
    );
    resize(&mut ws.xn, n * hd);
    resize(&mut ws.qkv, n * qkv_w);
    resize(&mut ws.attn, n * qd);
    resize(&mut ws.proj, n * hd);
    resize(&mut ws.gu, n * 2 * cfg.ffn);
    resize(&mut ws.h, n * cfg.ffn);

    // Attention block: norm and quantize each row in one pass (done by the
    // previous layer's last pass when `normed_input`).
    assert!(
        !normed_input || (ws.acts.m() == n && ws.acts.cols() == hd),
        "forward_layer: normed_input, but the workspace holds {} x {} activations",
        ws.acts.m(),
        ws.acts.cols()
    );
    if !normed_input {
        let (xs, xn) = (&*x, RowsPtr::new(&mut ws.xn));
        let acts = ws.acts.rows(isa, n, hd);
        for_rows(pool, n, &|i| {
            // SAFETY: row i of xn (sized n*hd above) and of acts belong to
            // this call of i only.
            let out = unsafe { xn.row(i, hd) };
            k::rmsnorm(
                isa,
                &xs[i * hd..(i + 1) * hd],
                &layer.attn_norm,
                cfg.rms_eps,
                out,
            );
            // SAFETY: row i of acts is this call's alone (as above).
            unsafe { acts.quantize(i, out) };
        });
    }
    linear(pool, isa, &layer.wqkv, &ws.acts, &mut ws.qkv, &mut ws.part);
    ws.rope(cfg)
        .tabulate(rows.iter().map(|r| r.pos + 1).max().unwrap_or(0));
    let rope = &ws.rope.as_ref().expect("rope set").2;
    // Attention over H·v gives H·(attention over v): each row's output is
    // rotated back, then quantized for the output projection.
    let finish_row = |row: &mut [f32], acts: &k::QActsRows<'_>, i: usize| {
        if rotate_kv {
            k::hadamard32(isa, row, 1.0 / 32.0);
        }
        // SAFETY: the callers hand each row index i to one call only.
        unsafe { acts.quantize(i, row) };
    };
    if distinct_rows(rows, caches.len()) && n >= 2 * pool.threads() {
        // All rows decode, one per sequence: RoPE, the cache write, the
        // attention and the rotation back run per row in one fork-join.
        let (qkv, attn) = (RowsPtr::new(&mut ws.qkv), RowsPtr::new(&mut ws.attn));
        let (cs, acts) = (RowsPtr::new(caches), ws.acts.rows(isa, n, qd));
        let next = AtomicUsize::new(0);
        pool.run(&|_, _| {
            let mut sts: Vec<AttnState> = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let r = rows[i];
                // SAFETY: the counter hands out each row index once; row i is
                // the only row of sequence r.seq (`distinct_rows`), so no other
                // task touches its qkv row, its output row or its cache.
                let (row, out, cache) = unsafe {
                    (
                        qkv.row(i, qkv_w),
                        attn.row(i, qd),
                        &mut cs.range(r.seq, 1)[0],
                    )
                };
                rope_row(isa, cfg, rope, rotate_kv, r.pos, row);
                cache.write(isa, local, r.pos, &row[qd..qd + kvd], &row[qd + kvd..]);
                attend_heads(
                    isa,
                    cfg,
                    local,
                    r,
                    cache,
                    &row[..qd],
                    0..cfg.n_heads,
                    &mut sts,
                    out,
                );
                finish_row(out, &acts, i);
            }
        });
    } else {
        rope_and_write_kv(
            pool,
            isa,
            cfg,
            rope,
            rotate_kv,
            local,
            rows,
            caches,
            &mut ws.qkv,
        );
        attention(pool, isa, cfg, local, rows, caches, &ws.qkv, &mut ws.attn);
        let (attn, acts) = (RowsPtr::new(&mut ws.attn), ws.acts.rows(isa, n, qd));
        for_rows(pool, n, &|i| {
            // SAFETY: row i of attn (sized n*qd above) belongs to this call
            // of i only.
            finish_row(unsafe { attn.row(i, qd) }, &acts, i);
        });
    }
    linear(pool, isa, &layer.wo, &ws.acts, &mut ws.proj, &mut ws.part);

    // Residual add, then the MLP block's norm and quantization, in one pass.
    {
        let (xs, xn, proj) = (RowsPtr::new(x), RowsPtr::new(&mut ws.xn), &ws.proj);
        let acts = ws.acts.rows(isa, n, hd);
        for_rows(pool, n, &|i| {
            // SAFETY: rows i of x (n*hd, the caller's), of xn (sized above)
            // and of acts belong to this call of i only.
            let (xr, out) = unsafe { (xs.row(i, hd), xn.row(i, hd)) };
            k::add_scaled(
                isa,
                xr,
                &proj[i * hd..(i + 1) * hd],
                cfg.residual_multiplier,
            );
            k::rmsnorm(isa, xr, &layer.ffn_norm, cfg.rms_eps, out);
            // SAFETY: row i of acts is this call's alone (as above).
            unsafe { acts.quantize(i, out) };
        });
    }
    linear(
        pool,
        isa,
        &layer.w_gate_up,
        &ws.acts,
        &mut ws.gu,
        &mut ws.part,
    );
    let f = cfg.ffn;
    {
        let (gus, h) = (&ws.gu, RowsPtr::new(&mut ws.h));
        let acts = ws.acts.rows(isa, n, f);
        for_rows(pool, n, &|i| {
            let gu = &gus[i * 2 * f..(i + 1) * 2 * f];
            // SAFETY: row i of h (sized n*f above) and of acts belong to
            // this call of i only.
            let hr = unsafe { h.row(i, f) };
            k::swiglu(isa, &gu[..f], &gu[f..], hr);
            // SAFETY: row i of acts is this call's alone (as above).
            unsafe { acts.quantize(i, hr) };
        });
    }
    linear(
        pool,
        isa,
        &layer.w_down,
        &ws.acts,
        &mut ws.proj,
        &mut ws.part,
    );
    let (xs, xn, proj) = (RowsPtr::new(x), RowsPtr::new(&mut ws.xn), &ws.proj);
    let next = next_norm.map(|norm| (norm, ws.acts.rows(isa, n, hd)));
    for_rows(pool, n, &|i| {
        // SAFETY: row i of x (n*hd, the caller's) and of xn (sized n*hd
        // above) belong to this call of i only.
        let (xr, out) = unsafe { (xs.row(i, hd), xn.row(i, hd)) };
        k::add_scaled(
            isa,
            xr,
            &proj[i * hd..(i + 1) * hd],
            cfg.residual_multiplier,
        );
        if let Some(f) = row_out {
            f(xr);
        }
        if let Some((norm, acts)) = &next {
            k::rmsnorm(isa, xr, norm, cfg.rms_eps, out);
            // SAFETY: row i of acts is this call's alone (as above).
            unsafe { acts.quantize(i, out) };
        }
    });
}

/// Rows from which per-row work (norms, RoPE, KV rotation and writes,
/// SwiGLU, residual adds, activation quantization) is split across the
/// pool; with fewer, a fork-join costs more than the work.
const PAR_ROWS: usize = 8;

/// Runs `f(i)` for every row `i < n`, in contiguous ranges across the pool
/// when there are at least [`PAR_ROWS`] rows.
fn for_rows(pool: &Pool, n: usize, f: &(dyn Fn(usize) + Sync)) {
    if n >= PAR_ROWS {
        pool.run(&|t, nt| (t * n / nt..(t + 1) * n / nt).for_each(f));
    } else {
        (0..n).for_each(f);
    }
}

/// `acts.quantize`, across the pool from [`PAR_ROWS`] rows (same result).
fn quantize(pool: &Pool, isa: Isa, acts: &mut QActs, x: &[f32], n: usize, cols: usize) {
    if n >= PAR_ROWS {
        acts.quantize_pool(pool, isa, x, n, cols);
    } else {
        acts.quantize(isa, x, n, cols);
    }
}

/// Applies RoPE to each row's query and key in `qkv` (and, when the cache
/// is rotated, the Hadamard rotation to query, key and value), then writes
/// the key and value into the row's sequence's cache. When every row belongs
/// to a different sequence (all decoding) and there are at least
/// [`PAR_ROWS`], each row does both in one task across the pool; rows of one
/// sequence (a prefill chunk) are written in order after the rotations.
#[allow(clippy::too_many_arguments)]
fn rope_and_write_kv(
    pool: &Pool,
    isa: Isa,
    cfg: &ModelConfig,
    rope: &Rope,
    rotate_kv: bool,
    local: usize,
    rows: &[BatchRow],
    caches: &mut [&mut SeqKv],
    qkv: &mut [f32],
) {
    let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
    let qkv_w = qd + 2 * kvd;
    let rotate = |i: usize, row: &mut [f32]| rope_row(isa, cfg, rope, rotate_kv, rows[i].pos, row);
    if distinct_rows(rows, caches.len()) {
        let (cs, rs) = (RowsPtr::new(caches), RowsPtr::new(qkv));
        for_rows(pool, rows.len(), &|i| {
            let r = rows[i];
            // SAFETY: row i of qkv belongs to this call of i only, and row i
            // is the only row of sequence r.seq (checked above), so no other
            // task touches this cache.
            let (row, cache) = unsafe { (rs.row(i, qkv_w), &mut cs.range(r.seq, 1)[0]) };
            rotate(i, row);
            cache.write(isa, local, r.pos, &row[qd..qd + kvd], &row[qd + kvd..]);
        });
    } else {
        {
            let rs = RowsPtr::new(&mut *qkv);
            for_rows(pool, rows.len(), &|i| {
                // SAFETY: row i of qkv belongs to this call of i only.
                rotate(i, unsafe { rs.row(i, qkv_w) });
            });
        }
        for (i, r) in rows.iter().enumerate() {
            let row = &qkv[i * qkv_w..(i + 1) * qkv_w];
            caches[r.seq].write(isa, local, r.pos, &row[qd..qd + kvd], &row[qd + kvd..]);
        }
    }
}

/// RoPE on one row's query and key at `pos` (and, when the cache is
/// rotated, the Hadamard rotation of query, key and value).
fn rope_row(
    isa: Isa,
    cfg: &ModelConfig,
    rope: &Rope,
    rotate_kv: bool,
    pos: usize,
    row: &mut [f32],
) {
    let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
    let (q, kv) = row.split_at_mut(qd);
    let (kk, vv) = kv.split_at_mut(kvd);
    rope.apply(q, cfg.n_heads, pos);
    rope.apply(kk, cfg.n_kv_heads, pos);
    if rotate_kv {
        // The cache holds H·k and H·v; with q' = H·q/32, q'·(H·k) = q·k.
        k::hadamard32(isa, q, 1.0 / 32.0);
        k::hadamard32(isa, kk, 1.0);
        k::hadamard32(isa, vv, 1.0);
    }
}

/// Whether there are at least [`PAR_ROWS`] rows and each belongs to a
/// different sequence (all decoding), so rows can be handled independently.
fn distinct_rows(rows: &[BatchRow], n_caches: usize) -> bool {
    rows.len() >= PAR_ROWS && {
        let mut seen = vec![false; n_caches];
        rows.iter()
            .all(|r| r.seq < seen.len() && !std::mem::replace(&mut seen[r.seq], true))
    }
}

/// Whether the C8 cache holds keys and values in the Hadamard-rotated basis
/// (every 32 values of a head mixed by `H₃₂`, see [`k::hadamard32`]): true
/// when a head is a whole number of 32-value blocks, so that no block mixes
/// two heads. Rotation spreads the few large channels of a key over the
/// block before its int8 rounding, which cuts the cache's rounding error.
pub fn rotates_kv(cfg: &ModelConfig) -> bool {
    cfg.head_dim.is_multiple_of(k::HADAMARD_BLOCK)
}

/// KV blocks requested ahead of the one being attended: 128 tokens (for one
/// KV head of SmolLM2, 16 KiB of keys and values, well inside L2).
const PREFETCH_BLOCKS: usize = 128usize.div_ceil(KV_BLOCK);

/// Causal GQA attention for every (row, query head), split across the pool.
fn attention(
    pool: &Pool,
    isa: Isa,
    cfg: &ModelConfig,
    local: usize,
    rows: &[BatchRow],
    caches: &[&mut SeqKv],
    qkv: &[f32],
    out: &mut [f32],
) {
    let (qd, kvd, hdim) = (cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
    let qkv_w = qd + 2 * kvd;
    // One task per (row, KV head): its `group` query heads are attended
    // together, so each cached key and value is widened once for all of them.
    // With too few such tasks to keep the threads evenly busy (one sequence
    // decoding), each row's query heads are cut into one contiguous range per
    // thread instead, attended KV group by KV group within the range.
    let parts = if rows.len() * cfg.n_kv_heads >= 2 * pool.threads() {
        cfg.n_kv_heads
    } else {
        pool.threads().min(cfg.n_heads)
    };
    let tasks = rows.len() * parts;
    let out = RowsPtr::new(out);
    let caches: &[&mut SeqKv] = caches;
    // Threads claim tasks from a shared counter as they finish, so one slowed
    // by the other load of its core does not hold the others at the join.
    let next = AtomicUsize::new(0);
    let work = |_: usize, _: usize| {
        let mut sts: Vec<AttnState> = Vec::new();
        loop {
            let task = next.fetch_add(1, Ordering::Relaxed);
            if task >= tasks {
                break;
            }
            let (i, part) = (task / parts, task % parts);
            let heads = part * cfg.n_heads / parts..(part + 1) * cfg.n_heads / parts;
            // SAFETY: the task owns out[i*qd + heads.start*hdim ..
            // i*qd + heads.end*hdim] (its heads of row i), and each task is
            // claimed by one thread only (the counter hands out every index once).
            let dst = unsafe { out.range(i * qd + heads.start * hdim, heads.len() * hdim) };
            let q = &qkv[i * qkv_w..i * qkv_w + qd];
            attend_heads(
                isa,
                cfg,
                local,
                rows[i],
                caches[rows[i].seq],
                q,
                heads,
                &mut sts,
                dst,
            );
        }
    };
    if tasks >= pool.threads() && rows.iter().map(|r| r.pos).max().unwrap_or(0) >= 64 {
        pool.run(&work);
    } else {
        work(0, 1);
    }
}

/// Attends query heads `heads` of one row (`q`: the row's `q_dim` query
/// values, rotated) over its sequence's cache in local layer `local`,
/// KV group by KV group, and writes their outputs into `out`
/// (`heads.len() * head_dim` values). `sts` is scratch, grown as needed.
#[allow(clippy::too_many_arguments)]
fn attend_heads(
    isa: Isa,
    cfg: &ModelConfig,
    local: usize,
    r: BatchRow,
    cache: &SeqKv,
    q: &[f32],
    heads: std::ops::Range<usize>,
    sts: &mut Vec<AttnState>,
    out: &mut [f32],
) {
    let hdim = cfg.head_dim;
    let group = cfg.n_heads / cfg.n_kv_heads;
    if sts.len() < group {
        sts.resize_with(group, || AttnState::new(hdim));
    }
    let n_tok = r.pos + 1;
    let blocks = &cache.blocks(local)[..n_tok.div_ceil(KV_BLOCK)];
    let mut h0 = heads.start;
    while h0 < heads.end {
        let kvh = h0 / group;
        let h1 = heads.end.min((kvh + 1) * group);
        let sts = &mut sts[..h1 - h0];
        let qs = &q[h0 * hdim..h1 * hdim];
        sts.iter_mut().for_each(AttnState::reset);
        let base = kvh * KV_BLOCK * hdim;
        let sb = kvh * KV_BLOCK;
        // The blocks are small and scattered, and the weights streamed
        // since the last layer have evicted them: ask for them a few
        // blocks ahead of use, so each does not start with a miss.
        let ahead = |b: usize| {
            if let Some(block) = blocks.get(b) {
                k::prefetch(&block.k[base..base + KV_BLOCK * hdim]);
                k::prefetch(&block.v[base..base + KV_BLOCK * hdim]);
                k::prefetch(&block.k_scale[sb..sb + KV_BLOCK]);
                k::prefetch(&block.v_scale[sb..sb + KV_BLOCK]);
            }
        };
        (0..PREFETCH_BLOCKS).for_each(ahead);
        for (b, block) in blocks.iter().enumerate() {
            ahead(b + PREFETCH_BLOCKS);
            let start = b * KV_BLOCK;
            let len = (n_tok - start).min(KV_BLOCK);
            k::attend_group(
                isa,
                qs,
                &block.k[base..base + k::key_len(len, hdim)],
                &block.k_scale[sb..sb + len],
                &block.v[base..base + len * hdim],
                &block.v_scale[sb..sb + len],
                cfg.attention_scale,
                sts,
            );
        }
        let dst = &mut out[(h0 - heads.start) * hdim..(h1 - heads.start) * hdim];
        for (j, st) in sts.iter().enumerate() {
            k::attend_finish(st, &mut dst[j * hdim..(j + 1) * hdim]);
        }
        h0 = h1;
    }
}

/// Final norm and output head for the given rows of `x`; writes
/// `rows.len() x vocab` logits into `logits` (exactly that long), already
/// divided by `logits_scaling`. The head may be split row-wise into `heads`
/// (shards in order, as on several cards).
pub fn forward_head(
    pool: &Pool,
    isa: Isa,
    cfg: &ModelConfig,
    final_norm: &[f32],
    heads: &[&k::QMatrix],
    x: &[f32],
    rows: &[usize],
    logits: &mut [f32],
    ws: &mut Workspace,
) {
    let hd = cfg.hidden;
    let n = rows.len();
    resize(&mut ws.xn, n * hd);
    for (j, &i) in rows.iter().enumerate() {
        k::rmsnorm(
            isa,
            &x[i * hd..(i + 1) * hd],
            final_norm,
            cfg.rms_eps,
            &mut ws.xn[j * hd..(j + 1) * hd],
        );
    }
    quantize(pool, isa, &mut ws.acts, &ws.xn[..n * hd], n, hd);
    let vocab: usize = heads.iter().map(|h| h.rows()).sum();
    assert_eq!(
        logits.len(),
        n * vocab,
        "forward_head: {n} rows of {vocab} logits need {} values",
        n * vocab
    );
    if let [only] = heads {
        k::matmul(pool, isa, only, &ws.acts, logits);
    } else {
        let mut off = 0;
        for h in heads {
            resize(&mut ws.part, n * h.rows());
            k::matmul(pool, isa, h, &ws.acts, &mut ws.part[..n * h.rows()]);
            for i in 0..n {
                logits[i * vocab + off..i * vocab + off + h.rows()]
                    .copy_from_slice(&ws.part[i * h.rows()..(i + 1) * h.rows()]);
            }
            off += h.rows();
        }
    }
    if cfg.logits_scaling != 1.0 {
        let inv = 1.0 / cfg.logits_scaling;
        logits.iter_mut().for_each(|v| *v *= inv);
    }
}
