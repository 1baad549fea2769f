//! The C8 key/value cache: int8 values with one f32 scale per token per KV
//! head, stored in fixed-size blocks of [`KV_BLOCK`] tokens. Every block is
//! charged to a [`KvBudget`] (a card's memory) when allocated and returns its
//! bytes when its last holder drops it, so finished and cancelled sequences
//! can never leak cache memory. Blocks are reference-counted so that a full
//! block of a shared prompt prefix can be held by several sequences and by
//! the engine's prefix cache at once; such a block is never written again.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use cardinal_kernels::Isa;

use crate::config::ModelConfig;

/// Tokens per cache block: a whole number of the kernels' key tiles.
pub const KV_BLOCK: usize = 64;
const _: () = assert!(KV_BLOCK.is_multiple_of(cardinal_kernels::KEY_TILE));

/// The cache budget was exhausted.
#[derive(Debug, Clone, thiserror::Error)]
#[error("KV cache exhausted on {owner}: need {need} more bytes, {used} of {limit} bytes in use")]
pub struct KvExhausted {
    pub owner: String,
    pub need: usize,
    pub used: usize,
    pub limit: usize,
}

/// A byte budget shared by every sequence cache on one card.
#[derive(Debug)]
pub struct KvBudget {
    owner: String,
    limit: usize,
    used: AtomicUsize,
}

impl KvBudget {
    /// A budget of `limit` bytes, named `owner` in errors (e.g. "card 3").
    pub fn new(owner: impl Into<String>, limit: usize) -> Arc<Self> {
        Arc::new(KvBudget {
            owner: owner.into(),
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// A budget that never runs out (tests, single-card CLI without a plan).
    pub fn unlimited() -> Arc<Self> {
        Self::new("host", usize::MAX)
    }

    /// Bytes currently allocated.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// The limit in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    fn charge(&self, bytes: usize) -> Result<(), KvExhausted> {
        let mut cur = self.used.load(Ordering::Acquire);
        loop {
            let next = cur.checked_add(bytes).filter(|&n| n <= self.limit);
            let Some(next) = next else {
                return Err(KvExhausted {
                    owner: self.owner.clone(),
                    need: bytes,
                    used: cur,
                    limit: self.limit,
                });
            };
            match self
                .used
                .compare_exchange(cur, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(()),
                Err(seen) => cur = seen,
            }
        }
    }

    fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// One block of one layer: per KV head, `KV_BLOCK` keys in the kernels'
/// key-tile layout (`KV_BLOCK * head_dim` int8, dimension-major within tiles
/// of 16 tokens, see `cardinal_kernels::KEY_TILE`) and `[KV_BLOCK][head_dim]`
/// int8 values; `[kv_head][KV_BLOCK]` scales for each. Its bytes go back to
/// the budget it was charged to when it is dropped.
#[derive(Debug)]
pub struct KvBlock {
    pub k: Vec<i8>,
    pub v: Vec<i8>,
    pub k_scale: Vec<f32>,
    pub v_scale: Vec<f32>,
    /// Held for its `Drop`, which returns the bytes.
    _charge: Charge,
}

/// Bytes charged to a budget, released on drop.
#[derive(Debug)]
struct Charge {
    budget: Arc<KvBudget>,
    bytes: usize,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

/// A shared handle to a block.
pub type SharedBlock = Arc<KvBlock>;

/// The geometry of a cache, from the model config.
#[derive(Clone, Copy, Debug)]
pub struct KvShape {
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl KvShape {
    /// From a model config.
    pub fn of(cfg: &ModelConfig) -> Self {
        KvShape {
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
        }
    }

    /// Bytes of one block of one layer.
    pub fn block_bytes(&self) -> usize {
        2 * KV_BLOCK * self.n_kv_heads * (self.head_dim + 4)
    }
}

/// The cache of one sequence for a contiguous range of layers (the layers
/// one card holds). Its full blocks may be shared, with a prefix cache and
/// through it with other sequences (adopted from it, or its own given to
/// it); a shared block is only read.
#[derive(Debug)]
pub struct SeqKv {
    shape: KvShape,
    /// `layers[l]` holds the blocks of local layer `l`.
    layers: Vec<Vec<SharedBlock>>,
    budget: Arc<KvBudget>,
}

impl SeqKv {
    /// An empty cache for `n_layers` layers charged to `budget`.
    pub fn new(shape: KvShape, n_layers: usize, budget: Arc<KvBudget>) -> Self {
        SeqKv {
            shape,
            layers: (0..n_layers).map(|_| Vec::new()).collect(),
            budget,
        }
    }

    /// Tokens that fit without allocating.
    pub fn capacity(&self) -> usize {
        self.layers
            .first()
            .map_or(usize::MAX, |l| l.len() * KV_BLOCK)
    }

    /// Blocks per layer (every layer has the same number).
    pub fn n_blocks(&self) -> usize {
        self.layers.first().map_or(0, Vec::len)
    }

    /// Makes `blocks` (one per local layer, full, from another cache of the
    /// same geometry on the same card) this cache's block `i`: appended when
    /// `i` is the number of blocks, else replacing block `i`, which must not
    /// have been written (its bytes go back to the budget when dropped).
    pub fn put(&mut self, i: usize, blocks: &[SharedBlock]) {
        assert_eq!(
            blocks.len(),
            self.layers.len(),
            "put: one block per local layer"
        );
        for (layer, b) in self.layers.iter_mut().zip(blocks) {
            match i.cmp(&layer.len()) {
                std::cmp::Ordering::Less => layer[i] = b.clone(),
                std::cmp::Ordering::Equal => layer.push(b.clone()),
                std::cmp::Ordering::Greater => {
                    panic!("put: block {i} of a cache of {} blocks", layer.len())
                }
            }
        }
    }

    /// Block `i` of every local layer, shared (for a prefix cache).
    pub fn share(&self, i: usize) -> Vec<SharedBlock> {
        self.layers.iter().map(|l| l[i].clone()).collect()
    }

    /// Bytes needed to grow to hold `tokens` tokens.
    pub fn bytes_to_reserve(&self, tokens: usize) -> usize {
        let have = self.n_blocks();
        let want = tokens.div_ceil(KV_BLOCK);
        want.saturating_sub(have) * self.layers.len() * self.shape.block_bytes()
    }

    /// Makes room for `tokens` tokens in every layer, charging the budget.
    pub fn reserve(&mut self, tokens: usize) -> Result<(), KvExhausted> {
        let need = self.bytes_to_reserve(tokens);
        if need == 0 {
            return Ok(());
        }
        // One charge for all, then each block carries its own share back.
        self.budget.charge(need)?;
        let want = tokens.div_ceil(KV_BLOCK);
        let s = self.shape;
        for layer in &mut self.layers {
            while layer.len() < want {
                layer.push(Arc::new(KvBlock {
                    k: vec![0; s.n_kv_heads * KV_BLOCK * s.head_dim],
                    v: vec![0; s.n_kv_heads * KV_BLOCK * s.head_dim],
                    k_scale: vec![0.0; s.n_kv_heads * KV_BLOCK],
                    v_scale: vec![0.0; s.n_kv_heads * KV_BLOCK],
                    _charge: Charge {
                        budget: self.budget.clone(),
                        bytes: s.block_bytes(),
                    },
                }));
            }
        }
        Ok(())
    }

    /// Stores the K and V vectors (all KV heads, `kv_dim` values each) of the
    /// token at `pos` in local layer `layer`. The capacity must have been reserved.
    pub fn write(&mut self, isa: Isa, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let s = self.shape;
        let block = Arc::get_mut(&mut self.layers[layer][pos / KV_BLOCK])
            .expect("a shared KV block is full and never written");
        let t = pos % KV_BLOCK;
        for h in 0..s.n_kv_heads {
            let src = h * s.head_dim..(h + 1) * s.head_dim;
            let dst = (h * KV_BLOCK + t) * s.head_dim;
            // A head's keys in a block are KV_BLOCK tokens in the kernels'
            // key-tile layout (KV_BLOCK is a whole number of tiles).
            block.k_scale[h * KV_BLOCK + t] = cardinal_kernels::store_key(
                isa,
                &k[src.clone()],
                &mut block.k[h_range(h, s.head_dim)],
                t,
            );
            block.v_scale[h * KV_BLOCK + t] = cardinal_kernels::quantize_kv_with(
                isa,
                &v[src],
                &mut block.v[dst..dst + s.head_dim],
            );
        }
    }

    /// The cached key and value of KV head `head` at `pos` in local layer
    /// `layer`, as int8 values (token order, whatever the storage layout)
    /// and their scales: `(k, k_scale, v, v_scale)`.
    pub fn read(&self, layer: usize, pos: usize, head: usize) -> (Vec<i8>, f32, Vec<i8>, f32) {
        let (s, t) = (self.shape, pos % KV_BLOCK);
        let block = &self.layers[layer][pos / KV_BLOCK];
        let keys = h_range(head, s.head_dim);
        let at = keys.start + cardinal_kernels::key_offset(t, s.head_dim);
        let k = (0..s.head_dim)
            .map(|d| block.k[at + d * cardinal_kernels::KEY_TILE])
            .collect();
        let row = keys.start + t * s.head_dim;
        let v = block.v[row..row + s.head_dim].to_vec();
        let at = head * KV_BLOCK + t;
        (k, block.k_scale[at], v, block.v_scale[at])
    }

    /// The blocks of local layer `layer`.
    pub fn blocks(&self, layer: usize) -> &[SharedBlock] {
        &self.layers[layer]
    }

    /// The geometry.
    pub fn shape(&self) -> KvShape {
        self.shape
    }
}

/// The bytes of KV head `h`'s keys (or values) in a block.
fn h_range(h: usize, head_dim: usize) -> std::ops::Range<usize> {
    h * KV_BLOCK * head_dim..(h + 1) * KV_BLOCK * head_dim
}
