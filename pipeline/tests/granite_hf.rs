//! The tiny random Granite checkpoint in `models/tests/fixtures/tiny-granite`
//! (Hugging Face `GraniteForCausalLM`, bf16, non-trivial multipliers) run
//! through the Hugging Face loader and two cards on every ISA of the machine,
//! against the `transformers` reference in its `logits.json`: last-position
//! logits within bounds derived from the quantization, the argmax at every
//! prompt position, every teacher-forced greedy step and our own 16 greedy
//! tokens. With int8 weights every token must match except at near-ties of
//! the reference (margin below [`NEAR_TIE`]); int4 is held to its larger
//! error budget and to a majority of matching argmaxes.

use std::path::PathBuf;
use std::sync::Arc;

use cardinal_kernels::{Isa, Pool};
use cardinal_models::forward::BatchRow;
use cardinal_models::hf::LoadBits;
use cardinal_models::kv::SeqKv;
use cardinal_models::{LoadOptions, LoadedModel, ModelSource};
use cardinal_pipeline::CardSpec;
use cardinal_pipeline::plan;
use cardinal_pipeline::stages::{Cards, StepScratch};
use serde_json::Value;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tests/fixtures/tiny-granite")
}

fn reference() -> Value {
    let path = fixture_dir().join("logits.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("logits.json is JSON")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("an array of ids")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("an array of numbers")
        .iter()
        .map(|x| x.as_f64().expect("a number") as f32)
        .collect()
}

fn load(bits: LoadBits) -> LoadedModel {
    let dir = fixture_dir();
    let src = ModelSource::parse(dir.to_str().unwrap()).unwrap();
    assert!(matches!(src, ModelSource::HfDir(_)), "{src:?}");
    cardinal_models::load(
        &src,
        &LoadOptions {
            hf_bits: bits,
            ..Default::default()
        },
        &mut |_| {},
    )
    .expect("the tiny Granite checkpoint loads")
}

/// The model on two cards, so the hidden state also crosses a link.
fn cards(loaded: &LoadedModel) -> Cards {
    let spec = CardSpec::default();
    let parts = plan::parts_of_model(&loaded.model);
    let p = plan::plan(&parts, &spec, 1, 256, Some(2)).expect("plan");
    Cards::new(loaded.model.clone(), &p, &spec).expect("cards")
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Logits at every position of `tokens`, run as one prefill batch.
fn logits_at_every_position(cards: &Cards, pool: &Pool, isa: Isa, tokens: &[u32]) -> Vec<Vec<f32>> {
    let vocab = cards.model().cfg.vocab;
    let mut seq: Vec<SeqKv> = cards.new_seq_caches();
    cards.reserve(&mut seq, tokens.len()).unwrap();
    let mut scratch = StepScratch::default();
    let rows: Vec<BatchRow> = (0..tokens.len())
        .map(|pos| BatchRow { seq: 0, pos })
        .collect();
    let all: Vec<usize> = (0..tokens.len()).collect();
    cards.run_step(
        pool,
        isa,
        tokens,
        &rows,
        &mut [&mut seq[..]],
        &all,
        1,
        &mut scratch,
    );
    assert_eq!(scratch.logits.len(), tokens.len() * vocab);
    scratch.logits.chunks(vocab).map(<[f32]>::to_vec).collect()
}

/// `steps` greedy tokens: the prompt prefilled in one batch, then one token
/// per step through the KV cache.
fn greedy(cards: &Cards, pool: &Pool, isa: Isa, prompt: &[u32], steps: usize) -> Vec<u32> {
    let vocab = cards.model().cfg.vocab;
    let mut seq: Vec<SeqKv> = cards.new_seq_caches();
    cards.reserve(&mut seq, prompt.len() + steps).unwrap();
    let mut scratch = StepScratch::default();
    let rows: Vec<BatchRow> = (0..prompt.len())
        .map(|pos| BatchRow { seq: 0, pos })
        .collect();
    let last = prompt.len() - 1;
    cards.run_step(
        pool,
        isa,
        prompt,
        &rows,
        &mut [&mut seq[..]],
        &[last],
        1,
        &mut scratch,
    );
    let mut out = vec![argmax(&scratch.logits[..vocab])];
    for pos in prompt.len()..prompt.len() + steps - 1 {
        let next = *out.last().unwrap();
        cards.run_step(
            pool,
            isa,
            &[next],
            &[BatchRow { seq: 0, pos }],
            &mut [&mut seq[..]],
            &[0],
            1,
            &mut scratch,
        );
        out.push(argmax(&scratch.logits[..vocab]));
    }
    out
}

fn correlation(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len() as f64;
    let ma = a.iter().map(|&x| x as f64).sum::<f64>() / n;
    let mb = b.iter().map(|&x| x as f64).sum::<f64>() / n;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (dx, dy) = (x as f64 - ma, y as f64 - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    sab / (saa * sbb).sqrt()
}

/// How one prompt compares with the reference.
struct Agreement {
    prompt: String,
    /// Last prompt position: max and RMS of |ours - reference|, and correlation.
    max_abs: f32,
    rms: f64,
    corr: f64,
    /// Prompt positions whose argmax equals `all_argmax`.
    argmax_ok: usize,
    positions: usize,
    /// Teacher forcing (the reference's greedy tokens fed as input): for each
    /// of the 16 steps, whether our argmax is the reference's next token.
    forced_ok: Vec<bool>,
    /// The reference's top-1 margin at each greedy step.
    margins: Vec<f32>,
    /// Leading tokens of our own greedy run equal to `greedy_ids`.
    greedy_lead: usize,
}

/// Compares every prompt on every ISA this CPU has (the tokens of a
/// quantized model may differ between ISAs, see [`NEAR_TIE`]).
fn compare(bits: LoadBits) -> Vec<(Isa, Vec<Agreement>)> {
    let loaded = load(bits);
    let cfg = &loaded.model.cfg;
    // The multipliers of config.json reach the model (the fixture README lists them).
    assert_eq!(cfg.embedding_multiplier, 12.0);
    assert_eq!(cfg.attention_scale, 0.0078125);
    assert_eq!(cfg.residual_multiplier, 0.22);
    assert_eq!(cfg.logits_scaling, 8.0);
    assert_eq!(cfg.rope_theta, 10000.0);
    assert_eq!(cfg.rms_eps, 1e-5);
    assert!(cfg.tied_embeddings);
    assert!(Arc::ptr_eq(&loaded.model.embedding, &loaded.model.head));
    let cards = cards(&loaded);
    let tok = loaded.tokenizer().unwrap();
    let r = reference();
    let pool = Pool::new(2);
    let mut per_isa = Vec::new();
    for isa in Isa::all_available() {
        let mut out = Vec::new();
        for p in r["prompts"].as_array().unwrap() {
            let text = p["prompt"].as_str().unwrap();
            let prompt = ids(&p["ids"]);
            assert_eq!(tok.encode(text, false).unwrap(), prompt, "ids of {text:?}");
            let want_last = floats(&p["last_logits"]);
            let want_argmax = ids(&p["all_argmax"]);
            let want_greedy = ids(&p["greedy_ids"]);
            let margins = floats(&p["greedy_top1_margins"]);
            assert_eq!(want_greedy.len(), 16);
            assert_eq!(margins.len(), 16);
            let n = prompt.len();
            let mut forced = prompt.clone();
            forced.extend_from_slice(&want_greedy[..15]);
            let logits = logits_at_every_position(&cards, &pool, isa, &forced);
            let last = &logits[n - 1];
            assert_eq!(last.len(), want_last.len());
            let diffs: Vec<f32> = last.iter().zip(&want_last).map(|(a, b)| a - b).collect();
            let max_abs = diffs.iter().fold(0.0f32, |m, d| m.max(d.abs()));
            let rms = (diffs.iter().map(|&d| (d as f64).powi(2)).sum::<f64>() / diffs.len() as f64)
                .sqrt();
            let argmax_ok = logits[..n]
                .iter()
                .zip(&want_argmax)
                .filter(|(l, w)| argmax(l) == **w)
                .count();
            let forced_ok: Vec<bool> = (0..16)
                .map(|i| argmax(&logits[n - 1 + i]) == want_greedy[i])
                .collect();
            let ours = greedy(&cards, &pool, isa, &prompt, 16);
            let greedy_lead = ours
                .iter()
                .zip(&want_greedy)
                .take_while(|(a, b)| a == b)
                .count();
            let a = Agreement {
                prompt: text.to_string(),
                max_abs,
                rms,
                corr: correlation(last, &want_last),
                argmax_ok,
                positions: want_argmax.len(),
                forced_ok,
                margins,
                greedy_lead,
            };
            eprintln!(
                "{bits:?} {isa:?} {:>24}: last logits max |err| {:.4}, rms {:.4}, correlation {:.6}; \
             argmax {}/{} prompt positions, {}/16 teacher-forced steps; greedy lead {}/16 (ours {:?})",
                format!("{:?}", a.prompt),
                a.max_abs,
                a.rms,
                a.corr,
                a.argmax_ok,
                a.positions,
                a.forced_ok.iter().filter(|&&ok| ok).count(),
                a.greedy_lead,
                ours
            );
            if a.greedy_lead < 16 {
                eprintln!(
                    "    greedy diverges at step {}, where the reference's top-1 margin is {}",
                    a.greedy_lead, a.margins[a.greedy_lead]
                );
            }
            out.push(a);
        }
        assert_eq!(out.len(), 4, "logits.json holds four prompts");
        per_isa.push((isa, out));
    }
    per_isa
}

/// A reference top-1 margin below this is a tie at int8 precision. The RMS
/// error of one int8 logit is about 0.25 here (measured below), so a
/// difference of two logits is off by about 0.35 RMS; 1.0 is about three of
/// those. This fixture's high-gain random weights make the quantized model
/// jumpy: a single activation or cache value rounding the other way (which
/// float summation order alone can cause) moves some logits by up to 0.8. So
/// the ISAs differ at a few steps: measured, greedy steps with reference
/// margins 0.54 (AVX-512) and 0.72 (scalar) flip, never one of 1.0 or more;
/// and on "1 2 3 4 5" step 3 (margin 0.025) every ISA, and an exact f64
/// forward pass over the same int8-rounded weights, takes the other branch.
const NEAR_TIE: f32 = 1.0;

#[test]
fn int8_matches_transformers() {
    for (isa, res) in compare(LoadBits::Int8) {
        let mut full = 0;
        for a in &res {
            // Bound on the last-position logits. The reference is exact f32
            // math on the bf16 weights; ours rounds the weights to int8
            // (symmetric, per group of 32: each weight within amax/254 of its
            // bf16 value), every matmul input to A8, the cache to C8 and the
            // residual stream to A8 after each layer. This fixture's weights
            // are large on purpose (q/k std 0.7, other projections 0.6, final
            // norm x30, see its README), so rounding errors grow through the
            // layers: an exact f64 forward over the int8-rounded weights alone
            // is already 0.34-0.68 off; the full A8-C8-W8 pass measures
            // 0.68-0.91 (RMS 0.22-0.28, correlation >= 0.9995). 1.25 is about
            // 1.4x the worst measured value and five times below the error
            // of q/k rows left in Hugging Face's RoPE layout (measured here
            // 6.7-17, RMS 2-5.6); the fixture's table puts wrong multipliers
            // at 16 to 165.
            assert!(
                a.max_abs < 1.25,
                "{isa:?} {:?}: last-position logits differ by up to {}",
                a.prompt,
                a.max_abs
            );
            assert!(a.rms < 0.4, "{isa:?} {:?}: RMS error {}", a.prompt, a.rms);
            assert!(
                a.corr > 0.999,
                "{isa:?} {:?}: correlation {}",
                a.prompt,
                a.corr
            );
            // The reference's prompt-position margins are all >= 0.18, and
            // every ISA measured agrees at all of them.
            assert_eq!(
                a.argmax_ok, a.positions,
                "{isa:?} {:?}: the argmax differs at some prompt position",
                a.prompt
            );
            for (i, (&ok, &m)) in a.forced_ok.iter().zip(&a.margins).enumerate() {
                assert!(
                    ok || m < NEAR_TIE,
                    "{isa:?} {:?}: teacher-forced step {i} picks another token although the reference margin is {m}",
                    a.prompt
                );
            }
            // Our own greedy run equals the reference at least until the
            // first near-tie, and a divergence is always at a near-tie.
            let first_tie = a.margins.iter().position(|&m| m < NEAR_TIE).unwrap_or(16);
            assert!(
                a.greedy_lead >= first_tie,
                "{isa:?} {:?}: greedy tokens diverge at step {} (reference margin {}), before the first near-tie at step {first_tie}",
                a.prompt,
                a.greedy_lead,
                a.margins[a.greedy_lead]
            );
            if a.greedy_lead < 16 {
                assert!(
                    a.margins[a.greedy_lead] < NEAR_TIE,
                    "{isa:?} {:?}: greedy tokens diverge at step {} where the reference margin is {}",
                    a.prompt,
                    a.greedy_lead,
                    a.margins[a.greedy_lead]
                );
            } else {
                full += 1;
            }
        }
        // Measured: two of the four prompts (three on AVX2) match all 16
        // greedy tokens on every ISA; "1 2 3 4 5" never can (see NEAR_TIE).
        assert!(
            full >= 2,
            "{isa:?}: only {full} prompts match all 16 greedy tokens"
        );
    }
}

#[test]
fn int4_stays_close_to_transformers() {
    for (isa, res) in compare(LoadBits::Int4) {
        let (mut agree, mut total) = (0, 0);
        for a in &res {
            // 4-bit weights have 15 levels per group where int8 has 254, a
            // rounding step ~17x larger; an exact f64 pass over the
            // int4-rounded weights (no other rounding) is already 4.9-7.2
            // off, and the engine measures 4.7-7.1 (RMS 1.7-2.4, correlation
            // 0.960-0.983). With the q/k rows left in Hugging Face's RoPE
            // layout it measures 10.4-21.6 (RMS 3.3-6.1, correlation
            // 0.77-0.92). The bounds sit between the two, each with about 25%
            // room above the correct model, and each check alone catches
            // that layout bug.
            assert!(
                a.max_abs < 9.0,
                "{isa:?} {:?}: last-position logits differ by up to {}",
                a.prompt,
                a.max_abs
            );
            assert!(a.rms < 3.0, "{isa:?} {:?}: RMS error {}", a.prompt, a.rms);
            assert!(
                a.corr > 0.95,
                "{isa:?} {:?}: correlation {}",
                a.prompt,
                a.corr
            );
            agree += a.forced_ok.iter().filter(|&&ok| ok).count() + a.argmax_ok;
            total += a.forced_ok.len() + a.positions;
        }
        // Int4 noise (RMS 1.7-2.4 per logit, so ~3 on a difference of two)
        // is larger than nearly every reference margin, so no single token is
        // asserted, not even the first greedy token (margins 0.18 to 3.7).
        // Across all 84 positions (prompt positions and teacher-forced greedy
        // steps) most argmaxes still agree (measured 60-61/84; 39/84 with
        // the RoPE layout bug; 1 in 512 by chance for a broken loader).
        eprintln!("Int4 {isa:?}: argmax agrees at {agree}/{total} positions");
        assert!(
            agree * 2 > total,
            "{isa:?}: int4 argmax agrees at only {agree}/{total} positions"
        );
    }
}
