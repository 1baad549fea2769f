//! The prefix cache: full KV blocks of earlier sequences, kept on their cards
//! after use and found again by the token ids they hold, so a request whose
//! prompt starts with the same tokens (a long system prompt, the earlier
//! turns of a conversation) skips prefilling them.
//!
//! A cached block is one [`KV_BLOCK`]-token block of every layer on every
//! card, keyed by a hash chained over the ids of all blocks up to it and
//! checked against the stored ids, so two prompts share a block only when
//! every token before its end is equal. Cached blocks stay charged to their
//! cards' budgets; when admission needs room, the least recently used blocks
//! that no running sequence holds are evicted (deepest first among equals, so
//! a chain is shortened from its end). Blocks are shared read-only: a
//! sequence writes only positions past its adopted prefix, and at least the
//! last prompt token is always computed, since its logits start generation.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use cardinal_models::kv::{KV_BLOCK, SeqKv, SharedBlock};

/// One cached block position of a prefix.
struct Entry {
    /// Key of the block before this one (0 for the first block).
    parent: u64,
    /// The ids the block holds.
    tokens: Box<[u32]>,
    /// Index of the block in its prefix.
    depth: usize,
    /// Per card, the block of each of its layers.
    blocks: Vec<Vec<SharedBlock>>,
    /// Tick of the last lookup or insertion that touched it.
    used: u64,
}

impl Entry {
    /// Whether only the cache holds the blocks. A sequence that holds one
    /// layer's block of this position holds every layer's on every card.
    fn idle(&self) -> bool {
        self.blocks
            .iter()
            .flatten()
            .next()
            .is_none_or(|b| Arc::strong_count(b) == 1)
    }
}

/// The cache. Owned by the engine thread.
#[derive(Default)]
pub struct PrefixCache {
    entries: HashMap<u64, Entry>,
    tick: u64,
}

/// The key of the block holding `tokens` after the block keyed `parent`.
fn key(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    // 0 marks "no parent"; keep it out of the key space.
    h.finish().max(1)
}

impl PrefixCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Blocks cached (each spans every layer on every card).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends to the empty `caches` (one per card) the cached blocks of the
    /// longest prefix of `prompt` that is cached in whole blocks, leaving at
    /// least the last token to compute; returns the tokens adopted.
    pub fn adopt(&mut self, prompt: &[u32], caches: &mut [SeqKv]) -> usize {
        debug_assert!(caches.iter().all(|c| c.n_blocks() == 0));
        self.tick += 1;
        let most = prompt.len().saturating_sub(1) / KV_BLOCK;
        let mut parent = 0;
        let mut n = 0;
        while n < most {
            let toks = &prompt[n * KV_BLOCK..(n + 1) * KV_BLOCK];
            let k = key(parent, toks);
            let Some(e) = self.entries.get_mut(&k) else {
                break;
            };
            if e.parent != parent || *e.tokens != *toks {
                break; // A hash collision: not our block.
            }
            e.used = self.tick;
            for (cache, blocks) in caches.iter_mut().zip(&e.blocks) {
                cache.adopt(blocks);
            }
            parent = k;
            n += 1;
        }
        n * KV_BLOCK
    }

    /// Remembers the full blocks of a sequence whose first `tokens.len()`
    /// positions are computed into `caches`. Blocks already cached are only
    /// touched.
    pub fn insert(&mut self, tokens: &[u32], caches: &[SeqKv]) {
        self.tick += 1;
        let mut parent = 0;
        for (i, toks) in tokens.chunks_exact(KV_BLOCK).enumerate() {
            let k = key(parent, toks);
            match self.entries.get_mut(&k) {
                Some(e) if e.parent == parent && *e.tokens == *toks => e.used = self.tick,
                // A collision with another prefix: keep the cached one and
                // stop, since no later block of ours could be found past it.
                Some(_) => return,
                None => {
                    self.entries.insert(
                        k,
                        Entry {
                            parent,
                            tokens: toks.into(),
                            depth: i,
                            blocks: caches.iter().map(|c| c.share(i)).collect(),
                            used: self.tick,
                        },
                    );
                }
            }
            parent = k;
        }
    }

    /// Blocks no running sequence holds (evicting one frees its memory).
    pub fn idle_len(&self) -> usize {
        self.entries.values().filter(|e| e.idle()).count()
    }

    /// Evicts the least recently used block that no sequence holds (so that
    /// evicting it frees its memory); returns whether there was one.
    pub fn evict_one(&mut self) -> bool {
        let victim = self
            .entries
            .iter()
            .filter(|(_, e)| e.idle())
            .min_by_key(|(_, e)| (e.used, std::cmp::Reverse(e.depth)))
            .map(|(&k, _)| k);
        match victim {
            Some(k) => {
                self.entries.remove(&k);
                true
            }
            None => false,
        }
    }

    /// Drops every cached block.
    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cardinal_models::kv::{KvBudget, KvShape};

    const SHAPE: KvShape = KvShape {
        n_kv_heads: 1,
        head_dim: 16,
    };

    fn caches(budget: &Arc<KvBudget>, tokens: usize) -> Vec<SeqKv> {
        let mut c = vec![SeqKv::new(SHAPE, 2, budget.clone())];
        c[0].reserve(tokens).unwrap();
        c
    }

    fn ids(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + salt).collect()
    }

    #[test]
    fn finds_whole_blocks_and_leaves_the_last_token() {
        let budget = KvBudget::new("card 0", usize::MAX);
        let mut pc = PrefixCache::new();
        let a = ids(3 * KV_BLOCK, 1);
        let seq = caches(&budget, a.len());
        pc.insert(&a, &seq);
        assert_eq!(pc.len(), 3);
        // The same prompt: two blocks, since its last token must be computed.
        let mut c = vec![SeqKv::new(SHAPE, 2, budget.clone())];
        assert_eq!(pc.adopt(&a, &mut c), 2 * KV_BLOCK);
        assert!(Arc::ptr_eq(&c[0].blocks(1)[1], &seq[0].blocks(1)[1]));
        // One more token: all three.
        let mut longer = a.clone();
        longer.push(5);
        let mut c = vec![SeqKv::new(SHAPE, 2, budget.clone())];
        assert_eq!(pc.adopt(&longer, &mut c), 3 * KV_BLOCK);
        // A change in the first block shares nothing, even with equal later blocks.
        let mut other = longer.clone();
        other[3] += 1;
        let mut c = vec![SeqKv::new(SHAPE, 2, budget.clone())];
        assert_eq!(pc.adopt(&other, &mut c), 0);
        assert_eq!(c[0].n_blocks(), 0);
        // A change in the second block shares the first.
        let mut other = longer;
        other[KV_BLOCK + 3] += 1;
        let mut c = vec![SeqKv::new(SHAPE, 2, budget.clone())];
        assert_eq!(pc.adopt(&other, &mut c), KV_BLOCK);
    }

    #[test]
    fn eviction_frees_only_unheld_blocks_least_recent_and_deepest_first() {
        let block = 2 * SHAPE.block_bytes();
        let budget = KvBudget::new("card 0", usize::MAX);
        let mut pc = PrefixCache::new();
        let a = ids(2 * KV_BLOCK, 1);
        let b = ids(KV_BLOCK, 2);
        pc.insert(&a, &caches(&budget, a.len()));
        pc.insert(&b, &caches(&budget, b.len()));
        assert_eq!(budget.used(), 3 * block);
        // A running sequence holds a's blocks: only b can go.
        let mut held = vec![SeqKv::new(SHAPE, 2, budget.clone())];
        let mut a1 = a.clone();
        a1.push(0);
        assert_eq!(pc.adopt(&a1, &mut held), 2 * KV_BLOCK);
        assert!(pc.evict_one());
        assert_eq!(budget.used(), 2 * block);
        assert!(!pc.evict_one(), "a's blocks are held");
        drop(held);
        // Now a goes, its second block first.
        assert!(pc.evict_one());
        let mut c = vec![SeqKv::new(SHAPE, 2, budget.clone())];
        assert_eq!(pc.adopt(&a1, &mut c), KV_BLOCK);
        drop(c);
        assert!(pc.evict_one());
        assert!(pc.is_empty());
        assert_eq!(budget.used(), 0);
    }
}
