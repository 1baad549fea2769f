//! Admission and the prefix cache's part of the engine thread: admitting
//! waiting sequences (adopting their prompt's cached prefix, reserving
//! their whole KV need, evicting idle cached blocks only when that makes
//! room), adopting more cached blocks while a sequence prefills, ending a
//! sequence, and giving computed blocks to the prefix cache.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::Instant;

use cardinal_models::kv::{KV_BLOCK, KvShape, SeqKv};

use super::{Event, FinishReason, Pending, Seq, Worker};
use crate::sampling::Sampler;

impl Worker {
    /// Admits waiting sequences in order while a slot is free and their
    /// whole KV need fits (after adopting their cached prefix).
    pub(super) fn admit(&self, waiting: &mut VecDeque<Pending>, running: &mut Vec<Seq>) {
        while running.len() < self.cfg.max_num_seqs {
            let Some(p) = waiting.front() else { break };
            let mut caches = self.cards.new_seq_caches();
            let need = p.req.prompt.len() + p.req.max_tokens;
            let cached = if self.cfg.prefix_cache {
                self.prefix
                    .borrow_mut()
                    .adopt(&p.req.prompt, &mut caches, 0)
                    * KV_BLOCK
            } else {
                0
            };
            if !self.reserve_evicting(&mut caches, need) {
                break; // Wait for running sequences to free their blocks.
            }
            let p = waiting.pop_front().expect("front exists");
            self.stats.waiting.fetch_sub(1, Ordering::AcqRel);
            self.stats
                .prompt_tokens
                .fetch_add(p.req.prompt.len() as u64, Ordering::Relaxed);
            if self.cfg.prefix_cache {
                self.stats
                    .prefix_query_tokens
                    .fetch_add(p.req.prompt.len() as u64, Ordering::Relaxed);
                self.stats
                    .prefix_hit_tokens
                    .fetch_add(cached as u64, Ordering::Relaxed);
            }
            let sampler = Sampler::new(p.req.params.clone(), &p.req.prompt);
            running.push(Seq {
                tokens: p.req.prompt.clone(),
                computed: cached,
                cached,
                generated: 0,
                sampler,
                caches,
                admitted: Instant::now(),
                first_token: None,
                card_joules: 0.0,
                host_joules: 0.0,
                p,
            });
        }
        self.stats.running.store(running.len(), Ordering::Release);
    }

    /// Reserves `tokens` positions in `caches`, evicting idle prefix-cache
    /// blocks (least recently used first) if that makes room. When even
    /// evicting every idle block would not, nothing is evicted: the request
    /// waits for running sequences, and the cache keeps its blocks.
    pub(super) fn reserve_evicting(&self, caches: &mut [SeqKv], tokens: usize) -> bool {
        if self.cards.reserve(caches, tokens).is_ok() {
            return true;
        }
        let mut prefix = self.prefix.borrow_mut();
        // Blocks `caches` adopted are held, so they (and the entries before
        // them) are not evictable.
        let idle = prefix.evictable_len() * KvShape::of(&self.cards.model().cfg).block_bytes();
        let room = self.cards.cards.iter().zip(caches.iter()).all(|(c, kv)| {
            let free =
                c.kv.limit()
                    .saturating_sub(c.kv.used())
                    .saturating_add(idle * c.layers.len());
            kv.bytes_to_reserve(tokens) <= free
        });
        let fits = room
            && loop {
                if !prefix.evict_one() {
                    break false;
                }
                if self.cards.reserve(caches, tokens).is_ok() {
                    break true;
                }
            };
        drop(prefix);
        self.publish_prefix();
        fits
    }

    /// Lets every sequence still prefilling at a block boundary adopt the
    /// cached blocks that continue its prompt (computed meanwhile by a
    /// sequence with the same start); its own blocks there are unwritten.
    pub(super) fn adopt_while_prefilling(&self, running: &mut [Seq]) {
        let mut prefix = self.prefix.borrow_mut();
        for s in running.iter_mut() {
            let len = s.p.req.prompt.len();
            if s.generated > 0
                || !s.computed.is_multiple_of(KV_BLOCK)
                || s.computed / KV_BLOCK >= (len - 1) / KV_BLOCK
            {
                continue;
            }
            let from = s.computed / KV_BLOCK;
            let found = prefix.adopt(&s.tokens[..len], &mut s.caches, from);
            if found > from {
                let gained = (found - from) * KV_BLOCK;
                s.computed += gained;
                s.cached += gained;
                self.stats
                    .prefix_hit_tokens
                    .fetch_add(gained as u64, Ordering::Relaxed);
            }
        }
    }

    /// Ends a sequence normally: sends its figures and counts it as
    /// finished (its caches go back to the cards when `s` is dropped, but
    /// for the full blocks the prefix cache keeps).
    pub(super) fn end(&self, s: &Seq, reason: FinishReason, now: Instant) {
        let _ = s.p.tx.try_send(Event::Done(s.finished(reason, now)));
        self.stats.finished.fetch_add(1, Ordering::Relaxed);
        self.remember(s);
    }

    /// Publishes the prefix cache's sizes: at the top of every loop of the
    /// engine thread, and within a loop only where sequences were dropped
    /// (the idle count depends on who still holds blocks) or blocks evicted. Each call counts the
    /// idle entries, a pass over the cache (a few hundred entries for
    /// SmolLM2 at the default card budgets).
    pub(super) fn publish_prefix(&self) {
        let prefix = self.prefix.borrow();
        self.stats
            .prefix_blocks
            .store(prefix.len(), Ordering::Release);
        self.stats
            .prefix_idle_blocks
            .store(prefix.idle_len(), Ordering::Release);
    }

    /// Gives the full blocks of `s` computed so far to the prefix cache.
    pub(super) fn remember(&self, s: &Seq) {
        if !self.cfg.prefix_cache {
            return;
        }
        let mut prefix = self.prefix.borrow_mut();
        prefix.insert(&s.tokens[..s.computed], &s.caches);
        self.stats
            .prefix_blocks
            .store(prefix.len(), Ordering::Release);
    }
}
