//! Greedy generation of the real default model (SmolLM2-135M-Instruct
//! Q4_1, fetched by the same code path users get) against llama.cpp's
//! greedy continuations in `shared/fixtures/smollm2_public.json`. For each
//! prompt it counts the leading generated ids equal to llama.cpp's and, at a
//! divergence, reports llama.cpp's top-2 log-prob gap there and checks that
//! both engines hesitate between the same tokens (llama.cpp's choice is in
//! our top 3). Along shared prefixes it measures the top-1 log-prob error.

use cardinal_pipeline::{Event, Request, SamplingParams};
use cardinal_server::setup::{self, Limits, ModelArgs};

fn fixtures() -> serde_json::Value {
    let dir = std::env::var("CARDINAL_FIXTURES_DIR").unwrap_or_else(|_| {
        format!(
            "{}/../models/tests/fixtures/smollm2",
            env!("CARGO_MANIFEST_DIR")
        )
    });
    let path = format!("{dir}/smollm2_public.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("fixtures at {path}: {e} (set CARDINAL_FIXTURES_DIR)"));
    serde_json::from_str(&text).expect("fixture JSON")
}

fn default_model(cards: Option<usize>) -> ModelArgs {
    ModelArgs {
        model: std::env::var("CARDINAL_TEST_GGUF")
            .unwrap_or_else(|_| "smollm2-135m-instruct".into()),
        cards,
        card_spec: None,
        card_memory_mib: None,
        threads: None,
        weight_seed: 0,
        hf_int8: false,
    }
}

/// Prompts that must match llama.cpp over every generated id (measured: 5
/// with AVX-512 VNNI on row panels and 64-token KV blocks, which the server
/// uses; 3 with 16-token blocks, 5 on the row storage, 5 scalar, 4 AVX2;
/// llama.cpp's own batched path matches its decode path on 5; the rest
/// diverge at near-ties, see ARCHITECTURE.md, "Agreement with llama.cpp").
/// The count swings between 3 and 7 with the summation order alone, at
/// equal mean error: the error bounds below are the firmer test.
const MIN_FULL: usize = 3;
/// Mean |top-1 log-prob difference| allowed along shared prefixes (measured
/// 0.040 with AVX-512 VNNI on row panels, 0.039 with 16-token KV blocks,
/// 0.037 on the row storage, 0.043 AVX2, 0.040 scalar; 0.054-0.066 before
/// the link and the cache rounded in the Hadamard-rotated basis).
const MAX_MEAN_LOGPROB_ERR: f64 = 0.05;
/// Largest |top-1 log-prob difference| at any shared position (measured
/// 0.35 AVX-512 on row panels, 0.45 with 16-token KV blocks, 0.26 on the
/// row storage, 0.43 AVX2, 0.27 scalar; 0.52 before the rotation).
const MAX_LOGPROB_ERR: f64 = 0.5;

#[test]
fn greedy_agrees_with_llama_cpp_up_to_swapped_runner_ups() {
    let fx = fixtures();
    let rt = setup::start(
        &default_model(None),
        &Limits {
            max_num_seqs: 4,
            max_queue: 16,
            max_model_len: Some(2048),
            ..Default::default()
        },
        &mut |l| eprintln!("{l}"),
    )
    .expect("load the default model");
    let tok = rt.loaded.tokenizer.as_ref().expect("tokenizer");
    let mut full = 0;
    let mut report = Vec::new();
    let mut failures = Vec::new();
    let (mut lp_err, mut gap_err): (Vec<f64>, Vec<f64>) = (Vec::new(), Vec::new());
    let mut top2_mismatch: Vec<String> = Vec::new();
    for e in fx.as_array().expect("array") {
        let name = e["name"].as_str().unwrap();
        let prompt: Vec<u32> = e["templated_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let want: Vec<u32> = e["greedy_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        // `greedy_top2` holds one entry per chunk llama.cpp's server streamed;
        // where it merged byte tokens into one character (cjk_emoji: 21
        // entries for 64 ids) entry i is not about token i, so such a prompt
        // has no per-token reference.
        let top2: &[serde_json::Value] = match e["greedy_top2"].as_array() {
            Some(a) if a.len() == want.len() => a,
            _ => &[],
        };
        let mut s = rt
            .engine
            .submit(Request {
                prompt,
                max_tokens: want.len().max(1),
                min_tokens: 0,
                ignore_eos: false,
                stop_ids: tok.eos_ids().to_vec(),
                params: SamplingParams::greedy(),
                top_logprobs: 3,
            })
            .expect("submit");
        let mut got = Vec::new();
        while let Some(ev) = s.blocking_recv() {
            match ev {
                Event::Token(t) => {
                    let i = got.len();
                    got.push(t.id);
                    if got.len() <= want.len() && got[i] != want[i] && got[..i] == want[..i] {
                        // At the divergence: are both engines choosing between the same two tokens?
                        let f = top2.get(i).unwrap_or(&serde_json::Value::Null);
                        let theirs: Vec<u64> = f["top2_ids"]
                            .as_array()
                            .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
                            .unwrap_or_default();
                        let ours: Vec<u64> = t.top.iter().map(|p| p.0 as u64).collect();
                        eprintln!(
                            "{name} @{i}: our top-3 {:?}; llama.cpp top-2 {theirs:?}, top-1 log-prob {}, gap {}",
                            t.top, f["logprob_top1"], f["logprob_gap_top1_top2"]
                        );
                        if !top2.is_empty() && theirs.first().is_none_or(|c| !ours.contains(c)) {
                            top2_mismatch.push(format!(
                                "{name} @{i}: our top-3 {ours:?} vs llama.cpp's top-2 {theirs:?}"
                            ));
                        }
                    }
                    // Along the shared prefix, compare our top-1 log-prob and top-2 gap with llama.cpp's.
                    if let (true, Some(f)) =
                        (got[..] == want[..got.len().min(want.len())], top2.get(i))
                    {
                        let gap = t
                            .top
                            .first()
                            .zip(t.top.get(1))
                            .map_or(0.0, |(a, b)| (a.1 - b.1) as f64);
                        if let (Some(lp), Some(g)) = (
                            f["logprob_top1"].as_f64(),
                            f["logprob_gap_top1_top2"].as_f64(),
                        ) {
                            lp_err.push((t.logprob as f64 - lp).abs());
                            gap_err.push((gap - g).abs());
                        }
                    }
                }
                Event::Done(_) => break,
                Event::Error(err) => panic!("{name}: {err}"),
            }
        }
        let same = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        if same == want.len() && got.len() == want.len() {
            full += 1;
            report.push(format!("{name}: all {} ids equal", want.len()));
        } else {
            let gap = top2
                .get(same)
                .and_then(|f| f["logprob_gap_top1_top2"].as_f64())
                .unwrap_or(f64::NAN);
            report.push(format!("{name}: {same}/{} equal; diverges at {same} where llama.cpp's top-2 gap is {gap:.4}", want.len()));
            if same >= want.len() {
                failures.push(format!(
                    "{name}: diverged at {same}, past llama.cpp's output"
                ));
            }
        }
    }
    eprintln!("{}", report.join("\n"));
    eprintln!("{full}/12 prompts match all ids");
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    eprintln!(
        "over {} shared positions: |top-1 log-prob - llama.cpp| mean {:.4} max {:.4}; |top-2 gap - llama.cpp| mean {:.4} max {:.4}",
        lp_err.len(),
        mean(&lp_err),
        max(&lp_err),
        mean(&gap_err),
        max(&gap_err)
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Every divergence is a near-swap: llama.cpp's choice is among our top 3
    // (in 7 of the 8 measured divergences ours is also llama.cpp's runner-up).
    assert!(
        top2_mismatch.is_empty(),
        "divergences between different candidates:\n{}",
        top2_mismatch.join("\n")
    );
    assert!(full >= MIN_FULL, "only {full}/12 prompts match fully");
    assert!(
        mean(&lp_err) < MAX_MEAN_LOGPROB_ERR,
        "mean top-1 log-prob error {:.4}",
        mean(&lp_err)
    );
    assert!(
        max(&lp_err) < MAX_LOGPROB_ERR,
        "largest top-1 log-prob error {:.4}",
        max(&lp_err)
    );
}
