//! The cards at run time: each [`Card`] owns its parts of the model, a KV
//! budget (its memory minus its weights) and counters for modeled busy time,
//! ops and link traffic. [`Cards::run_step`] pushes one batch of rows
//! through every card in order; between cards the hidden state crosses a
//! link as int8 (A8) and the link charges its modeled cost. The hidden state
//! is rounded to A8 at every part boundary, card edge or not, so the tokens
//! do not depend on how the model is partitioned. A step of decode rows
//! only on a small model may instead be cut into one group of rows per
//! pool thread, each group pushed through every card by its own thread
//! ([`split_parts`]).

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cardinal_kernels::{Isa, Pool, QActs, QMatrix, hadamard32};
use cardinal_models::forward::{self, BatchRow, Workspace};
use cardinal_models::kv::{KvBudget, KvShape, SeqKv};
use cardinal_models::{Model, ModelConfig};

use crate::card::CardSpec;
use crate::plan::{PartKind, Plan};

/// Errors building cards from a plan.
#[derive(Debug, thiserror::Error)]
pub enum CardError {
    #[error("card {card}: weights of {weights} bytes exceed its memory of {memory} bytes")]
    OverBudget {
        card: usize,
        weights: u64,
        memory: u64,
    },
    #[error("card {card}: {what} is not supported by the engine (only the planner models it)")]
    Unsupported { card: usize, what: String },
}

/// Counters of one card, readable from other threads.
#[derive(Debug, Default)]
pub struct CardCounters {
    /// Modeled busy time, nanoseconds.
    pub busy_ns: AtomicU64,
    /// Multiply-accumulates at int4 weights.
    pub ops_int4: AtomicU64,
    /// Multiply-accumulates at int8 weights.
    pub ops_int8: AtomicU64,
    /// Bytes sent on the outgoing link.
    pub link_bytes: AtomicU64,
    /// Messages sent on the outgoing link.
    pub link_messages: AtomicU64,
}

/// One emulated card.
#[derive(Debug)]
pub struct Card {
    pub id: usize,
    pub parts: Vec<PartKind>,
    pub layers: Range<usize>,
    /// Head shard rows held by this card (and the tied embedding rows).
    pub head: Option<Arc<QMatrix>>,
    pub embedding: bool,
    pub weight_bytes: u64,
    pub params: u64,
    pub kv: Arc<KvBudget>,
    pub counters: CardCounters,
    pub stage_seconds: f64,
}

/// All cards of an engine, in pipeline order.
#[derive(Debug)]
pub struct Cards {
    pub cards: Vec<Card>,
    pub spec: CardSpec,
    model: Arc<Model>,
}

/// Per-step scratch: activations and one workspace.
#[derive(Debug, Default)]
pub struct StepScratch {
    x: Vec<f32>,
    ws: Workspace,
    pub logits: Vec<f32>,
    /// One per pool thread, for steps split across the threads.
    parts: Vec<StepScratch>,
}

impl Cards {
    /// Builds the cards of `plan` over `model`.
    pub fn new(model: Arc<Model>, plan: &Plan, spec: &CardSpec) -> Result<Self, CardError> {
        let mut cards = Vec::new();
        for cp in &plan.per_card {
            let mut layers: Option<Range<usize>> = None;
            let mut head = None;
            let mut embedding = false;
            for p in &cp.parts {
                match *p {
                    PartKind::Embedding => embedding = true,
                    PartKind::Layer { layer, of: 1, .. } => {
                        layers = Some(match layers {
                            None => layer..layer + 1,
                            Some(r) => r.start..layer + 1,
                        })
                    }
                    PartKind::Layer { .. } => {
                        return Err(CardError::Unsupported {
                            card: cp.card,
                            what: format!("layer shard {p}"),
                        });
                    }
                    PartKind::Head { shard, of } => {
                        let v = model.head.rows();
                        let rows = v * shard / of..v * (shard + 1) / of;
                        head = Some(if of == 1 {
                            model.head.clone()
                        } else {
                            Arc::new(model.head.slice_rows(rows))
                        });
                        embedding |= model.cfg.tied_embeddings;
                    }
                }
            }
            let weight_bytes = cp.weight_bytes;
            if weight_bytes > spec.memory_bytes {
                return Err(CardError::OverBudget {
                    card: cp.card,
                    weights: weight_bytes,
                    memory: spec.memory_bytes,
                });
            }
            cards.push(Card {
                id: cp.card,
                parts: cp.parts.clone(),
                layers: layers.unwrap_or(0..0),
                head,
                embedding,
                weight_bytes,
                params: cp.params,
                kv: KvBudget::new(
                    format!("card {}", cp.card),
                    (spec.memory_bytes - weight_bytes) as usize,
                ),
                counters: CardCounters::default(),
                stage_seconds: spec.stage_seconds(cp.params),
            });
        }
        Ok(Cards {
            cards,
            spec: spec.clone(),
            model,
        })
    }

    /// Readies every card's matrices for the kernels of `isa` (see
    /// [`QMatrix::prepare`]): done once, before the first step.
    pub fn prepare(&self, isa: Isa) {
        for card in &self.cards {
            if let Some(head) = &card.head {
                head.prepare(isa);
            }
            for l in &self.model.layers[card.layers.clone()] {
                for w in [&l.wqkv, &l.wo, &l.w_gate_up, &l.w_down] {
                    w.parts().iter().for_each(|m| m.prepare(isa));
                }
            }
        }
    }

    /// The model.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Fresh, empty caches of one sequence: one per card.
    pub fn new_seq_caches(&self) -> Vec<SeqKv> {
        let shape = KvShape::of(&self.model.cfg);
        self.cards
            .iter()
            .map(|c| SeqKv::new(shape, c.layers.len(), c.kv.clone()))
            .collect()
    }

    /// Bytes every card would need to hold `tokens` tokens more for a sequence.
    pub fn reserve(
        &self,
        caches: &mut [SeqKv],
        tokens: usize,
    ) -> Result<(), cardinal_models::kv::KvExhausted> {
        // Check all cards first so a failure leaves nothing half-reserved.
        for (c, kv) in self.cards.iter().zip(caches.iter()) {
            let need = kv.bytes_to_reserve(tokens);
            if c.kv.used() + need > c.kv.limit() {
                return Err(cardinal_models::kv::KvExhausted {
                    owner: format!("card {}", c.id),
                    need,
                    used: c.kv.used(),
                    limit: c.kv.limit(),
                });
            }
        }
        for kv in caches.iter_mut() {
            kv.reserve(tokens)?;
        }
        Ok(())
    }

    /// Runs one step: `tokens[i]` at `rows[i]` (seq = index into `caches`),
    /// producing logits for `logit_rows` into `scratch.logits`
    /// (`logit_rows.len() x vocab`). `passes` is the number of micro-batch
    /// passes this step stands for on real cards; returns the modeled
    /// seconds the step takes through the pipeline.
    #[allow(clippy::too_many_arguments)]
    pub fn run_step(
        &self,
        pool: &Pool,
        isa: Isa,
        tokens: &[u32],
        rows: &[BatchRow],
        caches: &mut [&mut [SeqKv]],
        logit_rows: &[usize],
        passes: usize,
        scratch: &mut StepScratch,
    ) -> f64 {
        let parts = split_parts(pool, &self.model.cfg, rows, logit_rows);
        // Taken out of the scratch while the step borrows it (put back below).
        let mut logits = std::mem::take(&mut scratch.logits);
        logits.resize(logit_rows.len() * self.model.cfg.vocab, 0.0);
        if parts > 1 {
            self.compute_split(pool, isa, tokens, rows, caches, parts, scratch, &mut logits);
        } else {
            self.compute(
                pool,
                isa,
                tokens,
                rows,
                caches,
                logit_rows,
                scratch,
                &mut logits,
            );
        }
        scratch.logits = logits;
        self.account(rows.len(), logit_rows.len(), passes)
    }

    /// The step's rows cut into `parts` contiguous groups, one per pool
    /// thread, each pushed through every card by its own thread with no
    /// fork-join inside (see [`split_parts`]); each group writes its rows'
    /// logits straight into its part of `logits` (every row has logits
    /// here). Each row's logits are the same as in [`Self::compute`]: every
    /// kernel computes a row with the same operations whatever batch it is
    /// in.
    #[allow(clippy::too_many_arguments)]
    fn compute_split(
        &self,
        pool: &Pool,
        isa: Isa,
        tokens: &[u32],
        rows: &[BatchRow],
        caches: &mut [&mut [SeqKv]],
        parts: usize,
        scratch: &mut StepScratch,
        logits: &mut [f32],
    ) {
        let n = rows.len();
        let vocab = self.model.cfg.vocab;
        debug_assert_eq!(logits.len(), n * vocab);
        let bounds: Vec<usize> = (0..=parts).map(|p| p * n / parts).collect();
        scratch.parts.resize_with(parts, StepScratch::default);
        let mut groups = Vec::with_capacity(parts);
        let (mut rest, mut rest_logits) = (caches, logits);
        for (p, part) in scratch.parts.iter_mut().enumerate() {
            let rows_p = bounds[p + 1] - bounds[p];
            let (group, tail) = rest.split_at_mut(rows_p);
            let (out, tail_logits) = rest_logits.split_at_mut(rows_p * vocab);
            (rest, rest_logits) = (tail, tail_logits);
            groups.push(Mutex::new((group, part, out)));
        }
        pool.run(&|t, _| {
            let (r0, r1) = (bounds[t], bounds[t + 1]);
            // Uncontended: thread t is the only one to take group t.
            let mut g = groups[t].lock().unwrap_or_else(|e| e.into_inner());
            let (cs, sc, out) = &mut *g;
            let local: Vec<BatchRow> = rows[r0..r1]
                .iter()
                .map(|r| BatchRow {
                    seq: r.seq - r0,
                    pos: r.pos,
                })
                .collect();
            let all: Vec<usize> = (0..r1 - r0).collect();
            // Nested inside this job, every `pool.run` of the forward pass
            // runs on this thread alone.
            self.compute(pool, isa, &tokens[r0..r1], &local, cs, &all, sc, out);
        });
    }

    /// The arithmetic of a step (see [`Self::run_step`]), without the
    /// modeled accounting; writes `logit_rows.len() x vocab` logits.
    #[allow(clippy::too_many_arguments)]
    fn compute(
        &self,
        pool: &Pool,
        isa: Isa,
        tokens: &[u32],
        rows: &[BatchRow],
        caches: &mut [&mut [SeqKv]],
        logit_rows: &[usize],
        scratch: &mut StepScratch,
        logits: &mut [f32],
    ) {
        let m = &self.model;
        let cfg = &m.cfg;
        let h = cfg.hidden;
        let n = rows.len();
        scratch.x.resize(n * h, 0.0);
        forward::embed(m, tokens, &mut scratch.x[..n * h]);
        // Whether the previous layer's last pass already normalized and
        // quantized the rows for the next layer (see `forward_layer`).
        let mut normed = false;
        for (ci, card) in self.cards.iter().enumerate() {
            if card.layers.is_empty() {
                continue;
            }
            let mut seq_caches: Vec<&mut SeqKv> = caches.iter_mut().map(|c| &mut c[ci]).collect();
            for (local, li) in card.layers.clone().enumerate() {
                // Every part boundary rounds the hidden state through the
                // link format, row by row in the layer's last pass.
                forward::forward_layer(
                    pool,
                    isa,
                    cfg,
                    &m.layers[li],
                    local,
                    &mut scratch.x[..n * h],
                    rows,
                    &mut seq_caches,
                    &mut scratch.ws,
                    Some(&move |row: &mut [f32]| a8_roundtrip(isa, row)),
                    normed,
                    m.layers.get(li + 1).map(|l| &l.attn_norm[..]),
                );
                normed = li + 1 < m.layers.len();
            }
        }
        if !logit_rows.is_empty() {
            let heads: Vec<&QMatrix> = self
                .cards
                .iter()
                .filter_map(|c| c.head.as_deref())
                .collect();
            forward::forward_head(
                pool,
                isa,
                cfg,
                &m.final_norm,
                &heads,
                &scratch.x[..n * h],
                logit_rows,
                logits,
                &mut scratch.ws,
            );
        }
    }

    /// Charges a step of `n` rows, `logit_rows` of them through the head,
    /// standing for `passes` micro-batch passes, to the cards' counters;
    /// returns the modeled seconds it takes through the pipeline.
    fn account(&self, n: usize, logit_rows: usize, passes: usize) -> f64 {
        let cfg = &self.model.cfg;
        let h = cfg.hidden;
        let mut link_seconds = 0.0;
        let last = self.cards.len() - 1;
        for (ci, card) in self.cards.iter().enumerate() {
            let macs = (n * cfg.layer_params() * card.layers.len()) as u64;
            card.counters.ops_int4.fetch_add(macs, Ordering::Relaxed);
            // The next card receives the hidden states as int8 plus one scale per group.
            if ci < last {
                let bytes = (n * (h + 4 * h / 32)) as u64;
                card.counters.link_bytes.fetch_add(bytes, Ordering::Relaxed);
                card.counters.link_messages.fetch_add(1, Ordering::Relaxed);
                link_seconds += self.spec.link_seconds(ci, bytes);
            }
            let busy = card.stage_seconds * passes as f64;
            card.counters
                .busy_ns
                .fetch_add((busy * 1e9) as u64, Ordering::Relaxed);
            if let Some(head) = &card.head {
                card.counters
                    .ops_int8
                    .fetch_add((logit_rows * head.rows() * h) as u64, Ordering::Relaxed);
            }
        }
        // Pipelined: the first pass crosses every stage, later passes follow
        // at the pace of the slowest stage.
        let chain: f64 = self.cards.iter().map(|c| c.stage_seconds).sum();
        let slowest = self
            .cards
            .iter()
            .map(|c| c.stage_seconds)
            .fold(0.0, f64::max);
        chain + link_seconds + passes.saturating_sub(1) as f64 * slowest
    }
}

/// Rounds a batch of hidden states through the link format and back: each
/// block of 32 values is rotated by `H₃₂` (spreading the residual stream's
/// few huge channels over the block), rounded to A8 (int8 per group of 32,
/// one scale per group) and rotated back on arrival. The rotation costs no
/// link bytes and cuts the round trip's error 2.3× on SmolLM2's hidden states.
fn a8_roundtrip(isa: Isa, x: &mut [f32]) {
    hadamard32(isa, x, 1.0);
    QActs::round_trip(isa, x);
    hadamard32(isa, x, 1.0 / 32.0);
}

/// Rows per thread from which a step of decode rows only (one per
/// sequence, each needing logits) may be split across the pool's threads,
/// each thread running its rows through the whole model on its own: the
/// batched matmul kernel then still fills its 8-row tiles.
const SPLIT_ROWS_PER_THREAD: usize = 8;

/// Largest layer (parameters) for which a step is split. Splitting reads
/// every weight once per thread instead of once per step, and saves the
/// fork-join after every matmul and per-row pass (8 per layer) and the
/// waiting at each join. Small layers make many short phases, so the joins
/// cost more than the second read: SmolLM2 (3.5 M parameters a layer), 16
/// streams, 5 alternating pairs 1,166-1,193 -> 1,266-1,280 tok/s. Large
/// ones make few long phases: granite-3b (218 M), 16 streams, 83 -> 62
/// tok/s. The bound sits between the two on a log scale.
const SPLIT_MAX_LAYER_PARAMS: usize = 32_000_000;

/// Groups to split a step into ([`Cards::compute_split`]): the pool's
/// threads, or 1 to run it whole with every pass split across the threads.
pub fn split_parts(
    pool: &Pool,
    cfg: &ModelConfig,
    rows: &[BatchRow],
    logit_rows: &[usize],
) -> usize {
    let t = pool.threads();
    let decode_only = rows.iter().enumerate().all(|(i, r)| r.seq == i)
        && logit_rows.len() == rows.len()
        && logit_rows.iter().enumerate().all(|(i, &r)| r == i);
    if t > 1
        && decode_only
        && rows.len() >= SPLIT_ROWS_PER_THREAD * t
        && cfg.layer_params() <= SPLIT_MAX_LAYER_PARAMS
    {
        t
    } else {
        1
    }
}
