//! The planner: maps a model's parts (embedding, each decoder layer, final
//! norm + head) onto cards in order, so that each card's weights plus the C8
//! KV cache it must hold for `users` sequences at `ctx` tokens fit its
//! memory. Parts too large for one card are split (head row-wise, a layer by
//! heads/FFN columns); small parts share cards. With a card count it
//! balances modeled stage time; without one it finds the fewest cards.
//! It also models inter-token latency, throughput, power and joules/token.

use serde::Serialize;

use cardinal_models::{Model, ModelConfig};

use crate::card::CardSpec;

/// What a part of the model is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PartKind {
    /// The token embedding (untied models; a tied embedding lives with the head).
    Embedding,
    /// Decoder layer `layer`, whole (`of == 1`) or shard `shard` of `of`.
    Layer {
        layer: usize,
        shard: usize,
        of: usize,
    },
    /// Final norm + output head rows `shard` of `of` (and the tied embedding rows).
    Head { shard: usize, of: usize },
}

impl std::fmt::Display for PartKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PartKind::Embedding => write!(f, "embed"),
            PartKind::Layer { layer, of: 1, .. } => write!(f, "L{layer}"),
            PartKind::Layer { layer, shard, of } => write!(f, "L{layer}[{}/{of}]", shard + 1),
            PartKind::Head { of: 1, .. } => write!(f, "head"),
            PartKind::Head { shard, of } => write!(f, "head[{}/{of}]", shard + 1),
        }
    }
}

/// Size of one part.
#[derive(Clone, Debug, Serialize)]
pub struct PartSize {
    pub kind: PartKind,
    pub weight_bytes: u64,
    pub params: u64,
    /// KV bytes per token per user this part must hold (layers only).
    pub kv_bytes_per_token: u64,
}

/// Part sizes from a loaded model (exact bytes held).
pub fn parts_of_model(m: &Model) -> Vec<PartSize> {
    let c = &m.cfg;
    let mut v = Vec::new();
    if !c.tied_embeddings {
        v.push(PartSize {
            kind: PartKind::Embedding,
            weight_bytes: m.embedding_bytes() as u64,
            params: c.embedding_params() as u64,
            kv_bytes_per_token: 0,
        });
    }
    for (i, l) in m.layers.iter().enumerate() {
        v.push(PartSize {
            kind: PartKind::Layer {
                layer: i,
                shard: 0,
                of: 1,
            },
            weight_bytes: l.size_bytes() as u64,
            params: c.layer_params() as u64,
            kv_bytes_per_token: c.kv_bytes_per_token_layer() as u64,
        });
    }
    v.push(PartSize {
        kind: PartKind::Head { shard: 0, of: 1 },
        weight_bytes: m.head_bytes() as u64,
        params: (c.embedding_params() + c.hidden) as u64,
        kv_bytes_per_token: 0,
    });
    v
}

/// Part sizes from a config alone, in Cardinal's format: W4 layers (4 bits +
/// f16 scale and min per 32) and a W8 head/embedding (8 bits + the same).
pub fn parts_of_config(c: &ModelConfig) -> Vec<PartSize> {
    let w4 = |p: usize| (p / 2 + p / 32 * 4) as u64;
    let w8 = |p: usize| (p + p / 32 * 4) as u64;
    let mut v = Vec::new();
    if !c.tied_embeddings {
        v.push(PartSize {
            kind: PartKind::Embedding,
            weight_bytes: w8(c.embedding_params()),
            params: c.embedding_params() as u64,
            kv_bytes_per_token: 0,
        });
    }
    for i in 0..c.n_layers {
        let p = c.layer_params();
        v.push(PartSize {
            kind: PartKind::Layer {
                layer: i,
                shard: 0,
                of: 1,
            },
            weight_bytes: w4(p - 2 * c.hidden) + 8 * c.hidden as u64,
            params: p as u64,
            kv_bytes_per_token: c.kv_bytes_per_token_layer() as u64,
        });
    }
    v.push(PartSize {
        kind: PartKind::Head { shard: 0, of: 1 },
        weight_bytes: w8(c.embedding_params()) + 4 * c.hidden as u64,
        params: (c.embedding_params() + c.hidden) as u64,
        kv_bytes_per_token: 0,
    });
    v
}

/// Planning failures.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(
        "the model needs at least {needed} cards for {users} users at context {ctx}, but --cards is {given}"
    )]
    TooFewCards {
        needed: usize,
        given: usize,
        users: usize,
        ctx: usize,
    },
    #[error("--cards {given} is more than the {max} parts this model can be split into")]
    TooManyCards { given: usize, max: usize },
    #[error("invalid plan request: {0}")]
    Invalid(String),
    #[error(
        "{users} users at context {ctx} need at least {needed} cards, more than the planner's limit of {MAX_CARDS}"
    )]
    TooLarge {
        needed: u128,
        users: usize,
        ctx: usize,
    },
}

/// Most cards a plan may use (the paper's largest instance is 96): a bound
/// that keeps an absurd `users × ctx` an error instead of a table of
/// millions of cards.
pub const MAX_CARDS: usize = 65_536;

/// One card of a plan.
#[derive(Clone, Debug, Serialize)]
pub struct CardPlan {
    pub card: usize,
    pub parts: Vec<PartKind>,
    pub weight_bytes: u64,
    pub kv_bytes: u64,
    pub free_bytes: u64,
    pub params: u64,
    /// Modeled seconds for one micro-batch pass through this card.
    pub stage_seconds: f64,
}

/// A placement with modeled totals. Field names are a stable interface.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub cards: usize,
    pub servers: usize,
    pub users: usize,
    pub ctx: usize,
    pub micro_batch: usize,
    pub per_card: Vec<CardPlan>,
    pub modeled_itl_seconds: f64,
    pub modeled_tokens_per_second: f64,
    pub modeled_power_watts: f64,
    pub modeled_joules_per_token: f64,
    pub modeled_host_watts: f64,
}

/// Splits parts larger than one card into shards; with `min_parts`, keeps
/// splitting the part with the most parameters per shard (layers by heads
/// and FFN columns, the head row-wise) until there are that many parts.
fn shard(
    parts: &[PartSize],
    budget: u64,
    users: usize,
    ctx: usize,
    min_parts: usize,
) -> Vec<PartSize> {
    let mut k: Vec<usize> = parts
        .iter()
        .map(|p| {
            (p.weight_bytes + p.kv_bytes_per_token * (users * ctx) as u64)
                .div_ceil(budget)
                .max(1) as usize
        })
        .collect();
    let splittable = |p: &PartSize| !matches!(p.kind, PartKind::Embedding);
    while k.iter().sum::<usize>() < min_parts {
        let best = (0..parts.len())
            .filter(|&i| splittable(&parts[i]))
            .max_by(|&a, &b| {
                (parts[a].params as f64 / k[a] as f64)
                    .total_cmp(&(parts[b].params as f64 / k[b] as f64))
            });
        match best {
            Some(i) => k[i] += 1,
            None => break,
        }
    }
    let mut out = Vec::new();
    for (p, &k) in parts.iter().zip(&k) {
        if k == 1 {
            out.push(p.clone());
            continue;
        }
        for s in 0..k {
            let kind = match p.kind {
                PartKind::Layer { layer, .. } => PartKind::Layer {
                    layer,
                    shard: s,
                    of: k,
                },
                PartKind::Head { .. } => PartKind::Head { shard: s, of: k },
                PartKind::Embedding => PartKind::Embedding,
            };
            out.push(PartSize {
                kind,
                weight_bytes: p.weight_bytes.div_ceil(k as u64),
                params: p.params.div_ceil(k as u64),
                kv_bytes_per_token: p.kv_bytes_per_token.div_ceil(k as u64),
            });
        }
    }
    out
}

/// Places `parts` on cards. `cards = None` finds the fewest.
pub fn plan(
    parts: &[PartSize],
    spec: &CardSpec,
    users: usize,
    ctx: usize,
    cards: Option<usize>,
) -> Result<Plan, PlanError> {
    if users == 0 || ctx == 0 {
        return Err(PlanError::Invalid(format!(
            "users ({users}) and ctx ({ctx}) must be at least 1"
        )));
    }
    spec.validate()
        .map_err(|e| PlanError::Invalid(e.to_string()))?;
    // A lower bound on the cards needed, in exact arithmetic, before any
    // sharding allocates per card.
    let total: u128 = parts
        .iter()
        .map(|p| {
            p.weight_bytes as u128 + p.kv_bytes_per_token as u128 * users as u128 * ctx as u128
        })
        .sum();
    let needed = total.div_ceil(u128::from(spec.memory_bytes));
    if needed > MAX_CARDS as u128 {
        return Err(PlanError::TooLarge { needed, users, ctx });
    }
    if let Some(n) = cards.filter(|&n| n > MAX_CARDS) {
        return Err(PlanError::Invalid(format!(
            "--cards {n} is more than the planner's limit of {MAX_CARDS}"
        )));
    }
    let budget = spec.memory_bytes;
    let original = parts;
    let mut parts = shard(original, budget, users, ctx, 0);
    let need = |p: &PartSize| p.weight_bytes + p.kv_bytes_per_token * (users * ctx) as u64;
    // Shards of one part never share a card with anything else.
    let alone = |p: &PartSize| matches!(p.kind, PartKind::Layer { of, .. } | PartKind::Head { of, .. } if of > 1);
    // Fewest cards: next-fit in order is optimal for contiguous groups.
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut used = 0u64;
    for (i, p) in parts.iter().enumerate() {
        let fits = groups
            .last()
            .is_some_and(|g| !alone(p) && !alone(&parts[g[0]]) && used + need(p) <= budget);
        if fits {
            groups.last_mut().expect("non-empty").push(i);
            used += need(p);
        } else {
            groups.push(vec![i]);
            used = need(p);
        }
    }
    if groups.len() > MAX_CARDS {
        // Parts that each need a card of their own can exceed the bound.
        return Err(PlanError::TooLarge {
            needed: groups.len() as u128,
            users,
            ctx,
        });
    }
    if let Some(n) = cards {
        if n < groups.len() {
            return Err(PlanError::TooFewCards {
                needed: groups.len(),
                given: n,
                users,
                ctx,
            });
        }
        // More cards than parts: split the heaviest parts further.
        if n > parts.len() {
            parts = shard(original, budget, users, ctx, n);
        }
        if n > parts.len() {
            return Err(PlanError::TooManyCards {
                given: n,
                max: parts.len(),
            });
        }
        groups = balance(&parts, n, budget, &need, &alone).ok_or(PlanError::TooFewCards {
            needed: groups.len() + 1,
            given: n,
            users,
            ctx,
        })?;
    }
    Ok(totals(&parts, groups, spec, users, ctx, &need))
}

/// Exactly `n` contiguous groups minimising the largest group's parameters,
/// under the memory budget (dynamic programming over prefixes).
fn balance(
    parts: &[PartSize],
    n: usize,
    budget: u64,
    need: &dyn Fn(&PartSize) -> u64,
    alone: &dyn Fn(&PartSize) -> bool,
) -> Option<Vec<Vec<usize>>> {
    let p = parts.len();
    const INF: u64 = u64::MAX;
    // best[k][j]: minimal max-params splitting parts[..j] into k groups.
    let mut best = vec![vec![INF; p + 1]; n + 1];
    let mut cut = vec![vec![0usize; p + 1]; n + 1];
    best[0][0] = 0;
    for k in 1..=n {
        for j in k..=p {
            let (mut mem, mut params) = (0u64, 0u64);
            for i in (k - 1..j).rev() {
                mem += need(&parts[i]);
                params += parts[i].params;
                let multi = j - i > 1;
                if mem > budget || (multi && parts[i..j].iter().any(alone)) {
                    break;
                }
                if best[k - 1][i] == INF {
                    continue;
                }
                let cand = best[k - 1][i].max(params);
                if cand < best[k][j] {
                    best[k][j] = cand;
                    cut[k][j] = i;
                }
            }
        }
    }
    if best[n][p] == INF {
        return None;
    }
    let mut groups = Vec::new();
    let mut j = p;
    for k in (1..=n).rev() {
        let i = cut[k][j];
        groups.push((i..j).collect());
        j = i;
    }
    groups.reverse();
    Some(groups)
}

fn totals(
    parts: &[PartSize],
    groups: Vec<Vec<usize>>,
    spec: &CardSpec,
    users: usize,
    ctx: usize,
    need: &dyn Fn(&PartSize) -> u64,
) -> Plan {
    let n = groups.len();
    let per_card: Vec<CardPlan> = groups
        .iter()
        .enumerate()
        .map(|(c, g)| {
            let weight_bytes: u64 = g.iter().map(|&i| parts[i].weight_bytes).sum();
            let total: u64 = g.iter().map(|&i| need(&parts[i])).sum();
            let params: u64 = g.iter().map(|&i| parts[i].params).sum();
            CardPlan {
                card: c,
                parts: g.iter().map(|&i| parts[i].kind.clone()).collect(),
                weight_bytes,
                kv_bytes: total - weight_bytes,
                free_bytes: spec.memory_bytes.saturating_sub(total),
                params,
                stage_seconds: spec.stage_seconds(params),
            }
        })
        .collect();
    let m = users.div_ceil(n).max(1);
    let chain: f64 = per_card.iter().map(|c| c.stage_seconds).sum();
    let slowest = per_card.iter().map(|c| c.stage_seconds).fold(0.0, f64::max);
    let itl = chain.max(users.div_ceil(m) as f64 * slowest);
    let tps = users as f64 / itl;
    let passes_per_s = users.div_ceil(m) as f64 / itl;
    let power: f64 = per_card
        .iter()
        .map(|c| {
            let busy = (c.stage_seconds * passes_per_s).min(1.0);
            spec.idle_watts + (spec.active_watts - spec.idle_watts) * busy
        })
        .sum();
    let servers = n.div_ceil(spec.cards_per_server as usize);
    Plan {
        cards: n,
        servers,
        users,
        ctx,
        micro_batch: m,
        per_card,
        modeled_itl_seconds: itl,
        modeled_tokens_per_second: tps,
        modeled_power_watts: power,
        modeled_joules_per_token: power / tps,
        modeled_host_watts: servers as f64 * spec.host_watts_per_server,
    }
}
