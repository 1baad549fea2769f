//! The prefix cache: full KV blocks of earlier sequences, kept on their cards
//! after use and found again by the token ids they hold, so a request whose
//! prompt starts with the same tokens (a long system prompt, the earlier
//! turns of a conversation) skips prefilling them.
//!
//! A cached block is one [`KV_BLOCK`]-token block of every layer on every
//! card. It is found by its ids and its parent entry: the key hashes the
//! parent's serial number (unique for the life of the cache, never reused)
//! with the ids, and a lookup compares both, so two prompts share a block
//! only when every token before its end is equal, and a hash collision can
//! only cause a miss. Cached blocks stay charged to their cards' budgets;
//! the engine evicts the least recently used blocks that no running
//! sequence holds and that have no cached block after them (so a chain is
//! shortened from its end and no entry is left unreachable) when admission
//! needs room. Blocks are shared read-only: a
//! sequence adopts only blocks it has not written yet, and at least the last
//! prompt token is always computed, since its logits start generation.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::Arc;

use cardinal_models::kv::{KV_BLOCK, SeqKv, SharedBlock};

/// One cached block position of a prefix.
struct Entry {
    /// This entry's serial number.
    serial: u64,
    /// Serial of the entry before this one (0 for the first block).
    parent: u64,
    /// Key of the entry before this one (`None` for the first block).
    parent_key: Option<u64>,
    /// Cached entries that follow this one.
    children: usize,
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
    /// Seeded per process, so colliding prompts cannot be prepared offline.
    hasher: RandomState,
    tick: u64,
    /// Last serial number given out.
    serial: u64,
}

impl PrefixCache {
    /// The key of the block holding `tokens` after the entry `parent`.
    fn key(&self, parent: u64, tokens: &[u32]) -> u64 {
        let mut h = self.hasher.build_hasher();
        parent.hash(&mut h);
        tokens.hash(&mut h);
        h.finish()
    }

    /// The entry holding `tokens` after the entry `parent`, if cached.
    fn find(&mut self, parent: u64, tokens: &[u32]) -> Option<&mut Entry> {
        let k = self.key(parent, tokens);
        self.entries
            .get_mut(&k)
            .filter(|e| e.parent == parent && *e.tokens == *tokens)
    }

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

    /// Puts into `caches` (one per card) the cached blocks of the longest
    /// prefix of `prompt` cached in whole blocks, leaving at least the last
    /// token to compute. Blocks before `from` are the caches' own and are
    /// left alone; those from `from` on must be unwritten (reserved, or not
    /// allocated yet) and are replaced. Returns how many leading whole blocks
    /// of `prompt` are cached (the caches gained those past `from`).
    pub fn adopt(&mut self, prompt: &[u32], caches: &mut [SeqKv], from: usize) -> usize {
        self.tick += 1;
        let tick = self.tick;
        let most = prompt.len().saturating_sub(1) / KV_BLOCK;
        let mut parent = 0;
        let mut n = 0;
        while n < most {
            let toks = &prompt[n * KV_BLOCK..(n + 1) * KV_BLOCK];
            let Some(e) = self.find(parent, toks) else {
                break;
            };
            e.used = tick;
            if n >= from {
                for (cache, blocks) in caches.iter_mut().zip(&e.blocks) {
                    cache.put(n, blocks);
                }
            }
            parent = e.serial;
            n += 1;
        }
        n
    }

    /// Remembers the full blocks of a sequence whose first `tokens.len()`
    /// positions are computed into `caches`. Blocks already cached are only
    /// touched.
    pub fn insert(&mut self, tokens: &[u32], caches: &[SeqKv]) {
        self.tick += 1;
        let tick = self.tick;
        let mut parent = 0;
        let mut parent_key = None;
        for (i, toks) in tokens.chunks_exact(KV_BLOCK).enumerate() {
            let k = self.key(parent, toks);
            match self.entries.get_mut(&k) {
                Some(e) if e.parent == parent && *e.tokens == *toks => {
                    e.used = tick;
                    parent = e.serial;
                    parent_key = Some(k);
                    continue;
                }
                // A collision with another prefix: keep the cached one and
                // stop, since no later block of ours could be found past it.
                Some(_) => return,
                None => {}
            }
            if let Some(p) = parent_key.and_then(|pk| self.entries.get_mut(&pk)) {
                p.children += 1;
            }
            self.serial += 1;
            let serial = self.serial;
            self.entries.insert(
                k,
                Entry {
                    serial,
                    parent,
                    parent_key,
                    children: 0,
                    tokens: toks.into(),
                    depth: i,
                    blocks: caches.iter().map(|c| c.share(i)).collect(),
                    used: tick,
                },
            );
            parent = serial;
            parent_key = Some(k);
        }
    }

    /// Forgets every entry; blocks that sequences hold stay theirs.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Blocks no running sequence holds (evicting one frees its memory).
    pub fn idle_len(&self) -> usize {
        self.entries.values().filter(|e| e.idle()).count()
    }

    /// Evicts the least recently used block that no sequence holds and no
    /// cached block follows (so that evicting it frees its memory and leaves
    /// nothing unreachable); returns whether there was one.
    pub fn evict_one(&mut self) -> bool {
        let victim = self
            .entries
            .iter()
            .filter(|(_, e)| e.children == 0 && e.idle())
            .min_by_key(|(_, e)| (e.used, std::cmp::Reverse(e.depth)))
            .map(|(&k, _)| k);
        let Some(k) = victim else {
            return false;
        };
        let gone = self.entries.remove(&k).expect("the victim is cached");
        if let Some(p) = gone.parent_key.and_then(|pk| self.entries.get_mut(&pk)) {
            p.children -= 1;
        }
        true
    }

    /// Blocks that evicting as much as possible would free: idle entries
    /// none of whose followers a sequence holds (a held entry keeps every
    /// entry before it).
    pub fn evictable_len(&self) -> usize {
        let mut kept = std::collections::HashSet::new();
        for (k, e) in &self.entries {
            if e.idle() {
                continue;
            }
            let mut at = Some(*k);
            while let Some(key) = at {
                if !kept.insert(key) {
                    break; // Its ancestors are already marked.
                }
                at = self.entries.get(&key).and_then(|e| e.parent_key);
            }
        }
        self.entries.len() - kept.len()
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
        assert_eq!(pc.adopt(&a, &mut c, 0), 2);
        assert!(Arc::ptr_eq(&c[0].blocks(1)[1], &seq[0].blocks(1)[1]));
        // One more token: all three.
        let mut longer = a.clone();
        longer.push(5);
        let mut c = vec![SeqKv::new(SHAPE, 2, budget.clone())];
        assert_eq!(pc.adopt(&longer, &mut c, 0), 3);
        // A change in the first block shares nothing, even with equal later blocks.
        let mut other = longer.clone();
        other[3] += 1;
        let mut c = vec![SeqKv::new(SHAPE, 2, budget.clone())];
        assert_eq!(pc.adopt(&other, &mut c, 0), 0);
        assert_eq!(c[0].n_blocks(), 0);
        // A change in the second block shares the first.
        let mut other = longer;
        other[KV_BLOCK + 3] += 1;
        let mut c = vec![SeqKv::new(SHAPE, 2, budget.clone())];
        assert_eq!(pc.adopt(&other, &mut c, 0), 1);
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
        assert_eq!(pc.adopt(&a1, &mut held, 0), 2);
        assert!(pc.evict_one());
        assert_eq!(budget.used(), 2 * block);
        assert!(!pc.evict_one(), "a's blocks are held");
        drop(held);
        // Now a goes, its second block first.
        assert!(pc.evict_one());
        let mut c = vec![SeqKv::new(SHAPE, 2, budget.clone())];
        assert_eq!(pc.adopt(&a1, &mut c, 0), 1);
        drop(c);
        assert!(pc.evict_one());
        assert!(pc.is_empty());
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn adopting_later_blocks_replaces_reserved_ones_and_returns_their_bytes() {
        let block = 2 * SHAPE.block_bytes();
        let budget = KvBudget::new("card 0", usize::MAX);
        let mut pc = PrefixCache::new();
        let a = ids(3 * KV_BLOCK + 1, 1);
        pc.insert(&a[..3 * KV_BLOCK], &caches(&budget, a.len()));
        assert_eq!(budget.used(), 3 * block);
        // A sequence that computed its first block itself and reserved four.
        let mut seq = caches(&budget, a.len());
        assert_eq!(budget.used(), 7 * block);
        let own = seq[0].share(0);
        assert_eq!(pc.adopt(&a, &mut seq, 1), 3);
        assert!(
            Arc::ptr_eq(&seq[0].share(0)[1], &own[1]),
            "block 0 is left alone"
        );
        assert_eq!(seq[0].n_blocks(), 4);
        assert_eq!(budget.used(), 5 * block, "two reserved blocks went back");
    }

    #[test]
    fn a_block_is_found_only_under_the_entry_it_was_cached_after() {
        let budget = KvBudget::new("card 0", usize::MAX);
        let mut pc = PrefixCache::new();
        let a = ids(2 * KV_BLOCK + 1, 1);
        pc.insert(&a[..2 * KV_BLOCK], &caches(&budget, a.len()));
        // Evict the first block only (the second is held meanwhile), then
        // cache the first again: it is a new entry, and the old second block,
        // cached after the evicted entry, is not reachable from it.
        let mut hold = vec![SeqKv::new(SHAPE, 2, budget.clone())];
        assert_eq!(pc.adopt(&a, &mut hold, 0), 2);
        let first = pc.entries.values().find(|e| e.depth == 0).unwrap().serial;
        pc.entries.retain(|_, e| e.serial != first);
        drop(hold);
        pc.insert(&a[..KV_BLOCK], &caches(&budget, KV_BLOCK));
        let mut c = vec![SeqKv::new(SHAPE, 2, budget.clone())];
        assert_eq!(pc.adopt(&a, &mut c, 0), 1);
    }

    /// Two sequences computed the same first block: the cache keeps the
    /// first one's, and the second's next block is cached after it. While
    /// the second runs, the idle first block is not evicted, since that
    /// would leave the held second block unreachable.
    #[test]
    fn a_block_with_a_cached_follower_is_not_evicted() {
        let budget = KvBudget::new("card 0", usize::MAX);
        let mut pc = PrefixCache::new();
        let a = ids(2 * KV_BLOCK + 1, 1);
        pc.insert(&a[..KV_BLOCK], &caches(&budget, KV_BLOCK));
        let b = caches(&budget, a.len());
        pc.insert(&a[..2 * KV_BLOCK], &b);
        assert_eq!((pc.len(), pc.idle_len(), pc.evictable_len()), (2, 1, 0));
        assert!(!pc.evict_one(), "the first block has a follower in use");
        drop(b);
        assert_eq!(pc.evictable_len(), 2);
        assert!(pc.evict_one());
        let mut c = vec![SeqKv::new(SHAPE, 2, budget.clone())];
        assert_eq!(pc.adopt(&a, &mut c, 0), 1, "the follower went first");
        drop(c);
        assert!(pc.evict_one());
        assert!(pc.is_empty());
        assert_eq!(budget.used(), 0);
    }
}
