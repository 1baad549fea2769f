//! The engine: a thread that owns the cards and runs continuous batching.
//! Callers submit token ids and sampling parameters and get back a bounded
//! stream of token events; dropping the stream cancels the sequence, which
//! frees its KV blocks on every card before the next step (but for the full
//! ones the prefix cache keeps). Admission
//! reserves each sequence's whole KV need (prompt + max tokens) on every
//! card, so a running sequence can never hit `KvExhausted`. Long prompts are
//! prefilled in chunks so decoding sequences keep making progress. With the
//! prefix cache on, a new sequence first adopts the cached blocks of its
//! prompt's longest cached prefix (see [`crate::prefix`]) and prefills only
//! the rest; a prefilling sequence looks again at every block boundary, so
//! requests that arrive together with the same start share what the first
//! one computes. Full blocks are remembered as prefill computes them and
//! when a sequence ends or is cancelled.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cardinal_kernels::{Isa, Pool};
use cardinal_models::forward::BatchRow;
use cardinal_models::kv::{KV_BLOCK, KvShape, SeqKv};
use tokio::sync::mpsc;

mod admission;

pub use crate::api::{Event, FinishReason, Finished, Request, Stream, SubmitError};
use crate::energy::HostEnergy;
use crate::prefix::PrefixCache;
use crate::sampling::{Sampled, Sampler};
use crate::stages::{Cards, StepScratch};

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub max_num_seqs: usize,
    pub max_queue: usize,
    /// Context limit in tokens (prompt + generated).
    pub max_model_len: usize,
    /// Prompt tokens prefilled per step (across sequences).
    pub prefill_chunk: usize,
    pub threads: usize,
    pub isa: Isa,
    /// Watts per busy core for the host energy estimate when RAPL is absent.
    pub host_watts_per_core: f64,
    /// Nice value of the engine and pool threads (0: default priority). A
    /// server sets it above 0 so its HTTP threads, which answer health
    /// checks and shed load with fast 429s, win the cores when they need them.
    pub nice: i32,
    /// Keep full KV blocks after use and reuse them for prompts that start
    /// with the same tokens ([`crate::prefix`]).
    pub prefix_cache: bool,
}

/// Live figures, shared with metrics readers.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub steps: AtomicU64,
    /// Prompt tokens of admitted sequences, cached ones included (as vLLM
    /// counts them).
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens of admitted sequences looked up in the prefix cache.
    pub prefix_query_tokens: AtomicU64,
    /// Of those, the tokens found (adopted instead of computed), at
    /// admission or later in their prefill.
    pub prefix_hit_tokens: AtomicU64,
    /// Blocks held by the prefix cache (each spans every layer on every card).
    pub prefix_blocks: AtomicUsize,
    /// Of those, the blocks no running sequence uses (free to evict).
    pub prefix_idle_blocks: AtomicUsize,
    pub generated_tokens: AtomicU64,
    /// Sequences dropped because their caller cancelled or went away.
    pub cancelled: AtomicU64,
    /// Sequences that ended normally (stop, length or a finish request).
    pub finished: AtomicU64,
    /// Modeled card energy, microjoules.
    pub card_energy_uj: AtomicU64,
    /// Host energy, microjoules.
    pub host_energy_uj: AtomicU64,
    /// Modeled wall time of the cards, nanoseconds.
    pub modeled_ns: AtomicU64,
    /// Unix millis of the last completed step (or of the last idle tick).
    pub last_progress_ms: AtomicU64,
    /// Whether the step loop has failed (panicked).
    pub failed: AtomicBool,
    /// Whether there is work in flight.
    pub busy: AtomicBool,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

enum Cmd {
    Submit(Box<Pending>),
    /// Forget every cached prefix block (running sequences keep theirs).
    ResetPrefixCache,
    Shutdown,
}

struct Pending {
    req: Request,
    tx: mpsc::Sender<Event>,
    cancel: Arc<AtomicBool>,
    /// Set by [`Stream::finish`].
    finish: Arc<AtomicBool>,
    arrived: Instant,
}

/// Hook for tests: a step panics when this is set.
pub static INJECT_STEP_PANIC: AtomicBool = AtomicBool::new(false);

/// The engine handle. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Engine {
    tx: SyncSender<Cmd>,
    pub stats: Arc<EngineStats>,
    pub cards: Arc<Cards>,
    pub config: EngineConfig,
    pub host_energy_source: crate::energy::EnergySource,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Engine {
    /// Starts the engine thread over `cards`.
    pub fn start(cards: Cards, config: EngineConfig) -> Engine {
        cards.prepare(config.isa);
        let cards = Arc::new(cards);
        let stats = Arc::new(EngineStats::default());
        stats.last_progress_ms.store(now_ms(), Ordering::Release);
        let (tx, rx) = sync_channel(config.max_queue.max(1));
        let host = HostEnergy::new(config.host_watts_per_core);
        let host_energy_source = host.source();
        let worker = Worker::new(cards.clone(), config.clone(), stats.clone(), host);
        let thread = std::thread::Builder::new()
            .name("cardinal-engine".into())
            .spawn(move || worker.run(rx))
            .expect("spawn engine thread");
        Engine {
            tx,
            stats,
            cards,
            config,
            host_energy_source,
            thread: Mutex::new(Some(thread)),
        }
    }

    /// Submits a request; events arrive on the returned stream.
    pub fn submit(&self, req: Request) -> Result<Stream, SubmitError> {
        if self.stats.failed.load(Ordering::Acquire) {
            return Err(SubmitError::Stopped(
                "a step failed; see the server log".into(),
            ));
        }
        if req.prompt.is_empty() {
            return Err(SubmitError::Invalid(
                "the prompt is empty: at least one token is needed".into(),
            ));
        }
        let vocab = self.cards.model().cfg.vocab;
        if let Some(bad) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(SubmitError::Invalid(format!(
                "token id {bad} is out of range: the vocabulary has {vocab} tokens"
            )));
        }
        if req.max_tokens == 0 {
            return Err(SubmitError::Invalid("max_tokens must be at least 1".into()));
        }
        req.params.validate().map_err(SubmitError::Invalid)?;
        let limit = self.config.max_model_len;
        if req.prompt.len() + req.max_tokens > limit {
            return Err(SubmitError::TooLong {
                prompt: req.prompt.len(),
                max_tokens: req.max_tokens,
                limit,
            });
        }
        let tokens = req.prompt.len() + req.max_tokens;
        for (c, kv) in self.cards.cards.iter().zip(self.cards.new_seq_caches()) {
            let need = kv.bytes_to_reserve(tokens);
            if need > c.kv.limit() {
                return Err(SubmitError::NeverFits {
                    need,
                    card: format!("card {}", c.id),
                    limit: c.kv.limit(),
                });
            }
        }
        // Take a queue slot only if one is free, so `waiting` (and the
        // `requests_waiting` gauge read from it) never exceeds `max_queue`,
        // not even for an instant while a refused request backs out.
        let max_queue = self.config.max_queue;
        if let Err(waiting) =
            self.stats
                .waiting
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                    (w < max_queue).then_some(w + 1)
                })
        {
            return Err(SubmitError::QueueFull(waiting));
        }
        let (tx, rx) = mpsc::channel(req.max_tokens + 4);
        let cancel = Arc::new(AtomicBool::new(false));
        let finish = Arc::new(AtomicBool::new(false));
        let p = Pending {
            req,
            tx,
            cancel: cancel.clone(),
            finish: finish.clone(),
            arrived: Instant::now(),
        };
        match self.tx.try_send(Cmd::Submit(Box::new(p))) {
            Ok(()) => Ok(Stream { rx, cancel, finish }),
            Err(e) => {
                self.stats.waiting.fetch_sub(1, Ordering::AcqRel);
                Err(self.send_error(e))
            }
        }
    }

    /// Why a command could not be queued to the engine thread.
    fn send_error(&self, e: TrySendError<Cmd>) -> SubmitError {
        match e {
            TrySendError::Full(_) => SubmitError::QueueFull(self.config.max_queue),
            TrySendError::Disconnected(_) => {
                SubmitError::Stopped("the engine thread has exited".into())
            }
        }
    }

    /// Asks the engine thread to forget every cached prefix block before its
    /// next step, as vLLM's `/reset_prefix_cache` does (for benchmarks that
    /// must start cold). Blocks running sequences hold stay theirs; the rest
    /// go back to their cards.
    pub fn reset_prefix_cache(&self) -> Result<(), SubmitError> {
        self.tx
            .try_send(Cmd::ResetPrefixCache)
            .map_err(|e| self.send_error(e))
    }

    /// Stops the engine thread after the current step; in-flight sequences end.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Cmd::Shutdown);
        if let Some(t) = self.thread.lock().map(|mut g| g.take()).ok().flatten() {
            let _ = t.join();
        }
    }

    /// Bytes of KV allocated on each card: running sequences' blocks and
    /// the prefix cache's.
    pub fn kv_used(&self) -> Vec<usize> {
        self.cards.cards.iter().map(|c| c.kv.used()).collect()
    }

    /// Bytes of KV the prefix cache holds on each card (some may also be in
    /// use by running sequences). When nothing runs, [`Self::kv_used`]
    /// equals this: every other block has gone back to its card.
    pub fn kv_cached(&self) -> Vec<usize> {
        self.prefix_bytes(self.stats.prefix_blocks.load(Ordering::Acquire))
    }

    /// Bytes of KV running sequences use on each card: [`Self::kv_used`]
    /// without the prefix cache's idle blocks, which are free to evict.
    /// This is what the cache-usage ratio reports, as vLLM's does.
    pub fn kv_in_use(&self) -> Vec<usize> {
        let idle = self.kv_idle_cached();
        self.kv_used()
            .into_iter()
            .zip(idle)
            .map(|(u, i)| u.saturating_sub(i))
            .collect()
    }

    /// Bytes of KV on each card that only the prefix cache holds (free to
    /// evict), as last published by the engine thread.
    pub fn kv_idle_cached(&self) -> Vec<usize> {
        self.prefix_bytes(self.stats.prefix_idle_blocks.load(Ordering::Acquire))
    }

    /// Bytes of `blocks` prefix-cache blocks on each card.
    fn prefix_bytes(&self, blocks: usize) -> Vec<usize> {
        let block = KvShape::of(&self.cards.model().cfg).block_bytes();
        self.cards
            .cards
            .iter()
            .map(|c| blocks * c.layers.len() * block)
            .collect()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Seq {
    p: Pending,
    tokens: Vec<u32>,
    /// Positions already in the cache.
    computed: usize,
    /// Prompt positions adopted from the prefix cache.
    cached: usize,
    generated: usize,
    sampler: Sampler,
    caches: Vec<SeqKv>,
    admitted: Instant,
    first_token: Option<Instant>,
    card_joules: f64,
    host_joules: f64,
}

impl Seq {
    /// The figures of this sequence, ending now for `reason`.
    fn finished(&self, reason: FinishReason, now: Instant) -> Finished {
        let first = self.first_token;
        Finished {
            reason,
            prompt_tokens: self.p.req.prompt.len(),
            cached_tokens: self.cached,
            completion_tokens: self.generated,
            queue_seconds: (self.admitted - self.p.arrived).as_secs_f64(),
            ttft_seconds: first.map_or(0.0, |t| (t - self.p.arrived).as_secs_f64()),
            prefill_seconds: first.map_or(0.0, |t| (t - self.admitted).as_secs_f64()),
            decode_seconds: first.map_or(0.0, |t| (now - t).as_secs_f64()),
            card_joules: self.card_joules,
            host_joules: self.host_joules,
        }
    }
}

struct Worker {
    cards: Arc<Cards>,
    cfg: EngineConfig,
    stats: Arc<EngineStats>,
    host: HostEnergy,
    pool: Pool,
    prefix: RefCell<PrefixCache>,
}

impl Worker {
    fn new(
        cards: Arc<Cards>,
        cfg: EngineConfig,
        stats: Arc<EngineStats>,
        host: HostEnergy,
    ) -> Self {
        let pool = Pool::with_nice(cfg.threads.max(1), cfg.nice);
        Worker {
            cards,
            cfg,
            stats,
            host,
            pool,
            prefix: RefCell::new(PrefixCache::new()),
        }
    }

    fn run(self, rx: Receiver<Cmd>) {
        if let Err(e) = cardinal_kernels::set_thread_nice(self.cfg.nice) {
            tracing::warn!(nice = self.cfg.nice, error = %e, "could not lower the engine thread's priority");
        }
        let mut waiting: VecDeque<Pending> = VecDeque::new();
        let mut running: Vec<Seq> = Vec::new();
        let mut scratch = StepScratch::default();
        loop {
            self.publish_prefix();
            // Take new commands; block only when there is nothing to do.
            let idle = running.is_empty() && waiting.is_empty();
            self.stats.busy.store(!idle, Ordering::Release);
            let first = if idle {
                match rx.recv_timeout(Duration::from_millis(500)) {
                    Ok(c) => Some(c),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        self.stats
                            .last_progress_ms
                            .store(now_ms(), Ordering::Release);
                        continue;
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                }
            } else {
                None
            };
            for cmd in first
                .into_iter()
                .chain(std::iter::from_fn(|| rx.try_recv().ok()))
            {
                match cmd {
                    Cmd::Submit(p) => waiting.push_back(*p),
                    Cmd::ResetPrefixCache => {
                        self.prefix.borrow_mut().clear();
                        self.publish_prefix();
                    }
                    Cmd::Shutdown => {
                        for s in running.drain(..) {
                            let _ =
                                s.p.tx
                                    .try_send(Event::Error("the server is shutting down".into()));
                        }
                        return;
                    }
                }
            }
            self.drop_cancelled(&mut waiting, &mut running);
            self.finish_requested(&mut running);
            self.admit(&mut waiting, &mut running);
            if running.is_empty() {
                continue;
            }
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.step(&mut running, &mut scratch)
            }));
            if result.is_err() {
                self.stats.failed.store(true, Ordering::Release);
                for s in running.drain(..) {
                    let _ =
                        s.p.tx
                            .try_send(Event::Error("internal error: an engine step failed".into()));
                }
                for p in waiting.drain(..) {
                    let _ =
                        p.tx.try_send(Event::Error("internal error: an engine step failed".into()));
                }
                self.stats.running.store(0, Ordering::Release);
                self.stats.waiting.store(0, Ordering::Release);
            }
        }
    }

    fn drop_cancelled(&self, waiting: &mut VecDeque<Pending>, running: &mut Vec<Seq>) {
        let before = waiting.len() + running.len();
        waiting.retain(|p| !p.cancel.load(Ordering::Acquire) && !p.tx.is_closed());
        let removed_waiting = before - running.len() - waiting.len();
        self.stats
            .waiting
            .fetch_sub(removed_waiting, Ordering::AcqRel);
        // Dropping a Seq drops its caches, which returns their blocks to each
        // card (but for full ones the prefix cache keeps).
        running.retain(|s| {
            let keep = !s.p.cancel.load(Ordering::Acquire) && !s.p.tx.is_closed();
            if !keep {
                self.remember(s);
            }
            keep
        });
        let removed = before - waiting.len() - running.len();
        if removed > removed_waiting {
            self.publish_prefix();
        }
        self.stats
            .cancelled
            .fetch_add(removed as u64, Ordering::Relaxed);
        self.stats.running.store(running.len(), Ordering::Release);
    }

    /// Ends, with reason stop, the running sequences whose caller asked for
    /// it ([`Stream::finish`]); their caches go back to the cards (but for
    /// the full blocks the prefix cache keeps).
    fn finish_requested(&self, running: &mut Vec<Seq>) {
        let now = Instant::now();
        let before = running.len();
        let mut i = 0;
        while i < running.len() {
            if running[i].p.finish.load(Ordering::Acquire) {
                let s = running.swap_remove(i);
                self.end(&s, FinishReason::Stop, now);
            } else {
                i += 1;
            }
        }
        if running.len() < before {
            self.publish_prefix();
        }
        self.stats.running.store(running.len(), Ordering::Release);
    }

    /// Samples the next token of every sequence in `owners` that needs
    /// logits (their rows of `logits`, in order), in `owners` order (owners
    /// follow the running order). With several such sequences the samplers
    /// run across the pool: each sequence has its own sampler and random
    /// stream, so where a sampler runs changes nothing.
    fn sample_all(
        &self,
        running: &mut [Seq],
        owners: &[(usize, usize, bool)],
        logits: &mut [f32],
        vocab: usize,
    ) -> Vec<Sampled> {
        struct Job<'a> {
            sampler: &'a mut Sampler,
            logits: &'a mut [f32],
            top: usize,
            out: Option<Sampled>,
        }
        let mut wanted = vec![false; running.len()];
        for &(si, _, needs_logits) in owners {
            wanted[si] = needs_logits;
        }
        let mut rows = logits.chunks_mut(vocab);
        let jobs: Vec<Mutex<Job>> = running
            .iter_mut()
            .zip(wanted)
            .filter(|(_, w)| *w)
            .map(|(s, _)| {
                Mutex::new(Job {
                    top: s.p.req.top_logprobs,
                    sampler: &mut s.sampler,
                    logits: rows.next().expect("a logits row per sampled sequence"),
                    out: None,
                })
            })
            .collect();
        let run = |j: &Mutex<Job>| {
            let mut j = j.lock().unwrap_or_else(|e| e.into_inner());
            let j = &mut *j;
            j.out = Some(j.sampler.sample(j.logits, j.top));
        };
        if jobs.len() >= 2 && self.pool.threads() > 1 {
            self.pool
                .run(&|t, nt| jobs.iter().skip(t).step_by(nt).for_each(run));
        } else {
            jobs.iter().for_each(run);
        }
        jobs.into_iter()
            .map(|j| {
                let j = j.into_inner().unwrap_or_else(|e| e.into_inner());
                j.out.expect("sampled above")
            })
            .collect()
    }

    /// One engine step over the running set.
    fn step(&self, running: &mut Vec<Seq>, scratch: &mut StepScratch) {
        if INJECT_STEP_PANIC.load(Ordering::Acquire) {
            panic!("injected step panic (test hook)");
        }
        if self.cfg.prefix_cache {
            self.adopt_while_prefilling(running);
        }
        let host0 = self.host.joules();
        // Rows: every decoding sequence gives one; prefilling ones share the chunk budget.
        let mut tokens = Vec::new();
        let mut rows = Vec::new();
        let mut logit_rows = Vec::new();
        let mut owners = Vec::new(); // (running index, rows contributed, needs logits)
        let mut budget = self.cfg.prefill_chunk.max(1);
        let mut decode_rows = 0usize;
        let mut prefill_rows = 0usize;
        let mut step_seqs = Vec::new();
        for (si, s) in running.iter().enumerate() {
            let pending = s.tokens.len() - s.computed;
            let take = if pending == 1 {
                1
            } else {
                let t = pending.min(budget);
                budget -= t;
                t
            };
            if take == 0 {
                continue;
            }
            let slot = step_seqs.len();
            step_seqs.push(si);
            for j in 0..take {
                let pos = s.computed + j;
                tokens.push(s.tokens[pos]);
                rows.push(BatchRow { seq: slot, pos });
            }
            let done_prompt = s.computed + take == s.tokens.len();
            if done_prompt {
                logit_rows.push(rows.len() - 1);
            }
            if pending == 1 {
                decode_rows += 1
            } else {
                prefill_rows += take
            }
            owners.push((si, take, done_prompt));
        }
        let n_cards = self.cards.cards.len();
        let micro = running.len().div_ceil(n_cards).max(1);
        let passes = decode_rows.div_ceil(micro) + prefill_rows;
        let mut caches: Vec<&mut [SeqKv]> = Vec::with_capacity(step_seqs.len());
        {
            let mut it = step_seqs.iter().peekable();
            for (si, s) in running.iter_mut().enumerate() {
                if it.peek() == Some(&&si) {
                    it.next();
                    caches.push(&mut s.caches[..]);
                }
            }
        }
        let modeled = self.cards.run_step(
            &self.pool,
            self.cfg.isa,
            &tokens,
            &rows,
            &mut caches,
            &logit_rows,
            passes,
            scratch,
        );
        drop(caches);
        // Energy of this step: cards are active while busy, idle otherwise.
        let spec = &self.cards.spec;
        let card_j: f64 = self
            .cards
            .cards
            .iter()
            .map(|c| {
                let busy = (c.stage_seconds * passes as f64).min(modeled);
                spec.active_watts * busy + spec.idle_watts * (modeled - busy)
            })
            .sum();
        let host_j = (self.host.joules() - host0).max(0.0);
        self.stats
            .card_energy_uj
            .fetch_add((card_j * 1e6) as u64, Ordering::Relaxed);
        self.stats
            .host_energy_uj
            .fetch_add((host_j * 1e6) as u64, Ordering::Relaxed);
        self.stats
            .modeled_ns
            .fetch_add((modeled * 1e9) as u64, Ordering::Relaxed);
        let total_rows = rows.len().max(1) as f64;

        let vocab = self.cards.model().cfg.vocab;
        let mut samples = self
            .sample_all(running, &owners, &mut scratch.logits, vocab)
            .into_iter();
        let mut finished = Vec::new();
        let now = Instant::now();
        for &(si, take, needs_logits) in &owners {
            let s = &mut running[si];
            s.computed += take;
            s.card_joules += card_j * take as f64 / total_rows;
            s.host_joules += host_j * take as f64 / total_rows;
            if s.generated == 0 && s.computed / KV_BLOCK > (s.computed - take) / KV_BLOCK {
                // Prefill completed blocks: others with the same start can
                // adopt them already.
                self.remember(s);
            }
            if !needs_logits {
                continue;
            }
            let sampled = samples
                .next()
                .expect("one sample per sequence that needs logits");
            let id = sampled.id;
            s.sampler.observe(id);
            s.tokens.push(id);
            s.generated += 1;
            s.first_token.get_or_insert(now);
            self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
            let is_stop = !s.p.req.ignore_eos
                && s.generated > s.p.req.min_tokens.saturating_sub(1)
                && s.p.req.stop_ids.contains(&id);
            let reason = if is_stop {
                Some(FinishReason::Stop)
            } else if s.generated >= s.p.req.max_tokens || s.tokens.len() >= self.cfg.max_model_len
            {
                Some(FinishReason::Length)
            } else {
                None
            };
            // The channel holds max_tokens + 4 events, so this cannot be full;
            // a closed channel means the client left, handled as a cancel.
            let _ = s.p.tx.try_send(Event::Token(sampled));
            if let Some(reason) = reason {
                finished.push((si, reason));
            }
        }
        for &(si, reason) in finished.iter().rev() {
            let s = running.swap_remove(si);
            self.end(&s, reason, now);
        }
        if !finished.is_empty() {
            self.publish_prefix();
        }
        self.stats.running.store(running.len(), Ordering::Release);
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        self.stats
            .last_progress_ms
            .store(now_ms(), Ordering::Release);
    }
}
