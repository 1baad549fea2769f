//! `cardinal bench` and `cardinal perplexity`: speed of prefill and decode
//! (single stream, or K concurrent streams) with measured CPU figures next
//! to the modeled card figures, and perplexity over a text file by
//! llama.cpp's method.

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use cardinal_kernels::Pool;
use cardinal_pipeline::energy::peak_rss_bytes;
use cardinal_pipeline::engine::Finished;
use cardinal_pipeline::{Event, Request, SamplingParams};

use super::generate::log_stderr;
use super::{int_at_least, outln};
use crate::setup::{self, CLI_PREFILL_CHUNK, Limits, ModelArgs, Runtime};

/// Flags of `bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt tokens for the prefill measurement (at least 1).
    #[arg(long, default_value_t = 128, value_parser = int_at_least(1), allow_negative_numbers = true)]
    pub prompt_tokens: usize,
    /// Tokens generated per stream (at least 2).
    #[arg(long, default_value_t = 128, value_parser = int_at_least(2), allow_negative_numbers = true)]
    pub gen_tokens: usize,
    /// Concurrent streams for the aggregate decode measurement (at least 1).
    #[arg(long, default_value_t = 1, value_parser = int_at_least(1), allow_negative_numbers = true)]
    pub concurrency: usize,
    /// Repetitions; the median is reported (at least 1).
    #[arg(long, default_value_t = 3, value_parser = int_at_least(1), allow_negative_numbers = true)]
    pub reps: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `perplexity`.
#[derive(clap::Args, Debug)]
#[command(
    long_about = "Perplexity by llama.cpp's method: tokenize the whole file without BOS; \
split it into non-overlapping windows of --ctx tokens, dropping the tail; evaluate each window \
from an empty cache; score only the second half of each window (each position from ctx/2 to \
ctx-2 predicts the next token); PPL = exp(mean negative log-likelihood)."
)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text file.
    #[arg(long)]
    pub file: std::path::PathBuf,
    /// Window length in tokens (at least 4).
    #[arg(long, default_value_t = 512, value_parser = int_at_least(MIN_PPL_CTX), allow_negative_numbers = true)]
    pub ctx: usize,
    /// Stop after this many windows (0 = all).
    #[arg(long, default_value_t = 0, value_parser = int_at_least(0), allow_negative_numbers = true)]
    pub max_chunks: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Shortest perplexity window: `cardinal_pipeline::eval` scores the second
/// half of each window but its last position, so below 4 nothing is scored.
const MIN_PPL_CTX: usize = 4;

fn synthetic_prompt(n: usize, vocab: usize, salt: u64) -> Vec<u32> {
    let mut rng = cardinal_models::synthetic::SplitMix::new(0xBE9C ^ salt);
    // Skip the first 100 ids, where tokenizers keep their special tokens.
    (0..n)
        .map(|_| 100 + (rng.next_u64() % (vocab as u64 - 100)) as u32)
        .collect()
}

struct Round {
    prefill_tps: f64,
    decode_tps: f64,
    span_tps: f64,
    wall_tokens_per_s: f64,
    modeled_tps: f64,
    card_jpt: f64,
    host_jpt: f64,
}

fn one_round(rt: &Runtime, a: &BenchArgs, salt: u64) -> Result<Round> {
    let vocab = rt.loaded.model.cfg.vocab;
    let st = &rt.engine.stats;
    let (tok0, modeled0, card0, host0) = (
        st.generated_tokens.load(Ordering::Acquire),
        st.modeled_ns.load(Ordering::Acquire),
        st.card_energy_uj.load(Ordering::Acquire),
        st.host_energy_uj.load(Ordering::Acquire),
    );
    let t0 = Instant::now();
    let mut streams = Vec::new();
    for k in 0..a.concurrency {
        let req = Request {
            prompt: synthetic_prompt(a.prompt_tokens, vocab, salt * 1000 + k as u64),
            max_tokens: a.gen_tokens,
            min_tokens: 0,
            ignore_eos: true,
            stop_ids: Vec::new(),
            params: SamplingParams::greedy(),
            top_logprobs: 0,
        };
        streams.push(rt.engine.submit(req)?);
    }
    // One receiver thread per stream, so each token's arrival time is real.
    let received: Vec<Result<(Vec<Instant>, Finished)>> = std::thread::scope(|sc| {
        let handles: Vec<_> = streams
            .into_iter()
            .map(|mut s| {
                sc.spawn(move || {
                    let mut times = Vec::new();
                    loop {
                        match s.blocking_recv().context("engine stopped")? {
                            Event::Token(_) => times.push(Instant::now()),
                            Event::Done(f) => return Ok((times, f)),
                            Event::Error(e) => bail!("bench request failed: {e}"),
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| bail!("a bench receiver panicked"))
            })
            .collect()
    });
    let (times, fins): (Vec<Vec<Instant>>, Vec<Finished>) = received
        .into_iter()
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .unzip();
    let wall = t0.elapsed().as_secs_f64();
    let generated = (st.generated_tokens.load(Ordering::Acquire) - tok0) as f64;
    let modeled = (st.modeled_ns.load(Ordering::Acquire) - modeled0) as f64 / 1e9;
    let f = &fins[0];
    // Tokens after each stream's first, over the span from the first stream's
    // first token to the last stream's last: later streams' prefill included.
    let span_tps = {
        let first = times.iter().filter_map(|t| t.first()).min();
        let last = times.iter().filter_map(|t| t.last()).max();
        let tokens: usize = times.iter().map(|t| t.len().saturating_sub(1)).sum();
        match (first, last) {
            (Some(&a), Some(&b)) if b > a => tokens as f64 / (b - a).as_secs_f64(),
            _ => 0.0,
        }
    };
    let decode_tps = if a.concurrency == 1 {
        (f.completion_tokens - 1) as f64 / f.decode_seconds.max(1e-9)
    } else {
        all_decoding_tps(&times).unwrap_or(span_tps)
    };
    // With several streams, one stream's prefill time holds the chunks of
    // the others it was batched with: report all prompts' tokens over the
    // time to the last stream's first token instead (all were submitted at t0).
    let prefill_tps = if a.concurrency == 1 {
        f.prompt_tokens as f64 / f.prefill_seconds.max(1e-9)
    } else {
        let prompts: usize = fins.iter().map(|f| f.prompt_tokens).sum();
        match times.iter().filter_map(|t| t.first()).max() {
            Some(&last) => prompts as f64 / (last - t0).as_secs_f64().max(1e-9),
            None => 0.0,
        }
    };
    Ok(Round {
        prefill_tps,
        decode_tps,
        span_tps,
        wall_tokens_per_s: generated / wall,
        modeled_tps: generated / modeled.max(1e-12),
        card_jpt: (st.card_energy_uj.load(Ordering::Acquire) - card0) as f64 / 1e6 / generated,
        host_jpt: (st.host_energy_uj.load(Ordering::Acquire) - host0) as f64 / 1e6 / generated,
    })
}

/// Aggregate decode rate while every stream is decoding, as
/// `llama-batched-bench` measures its generation phase: the tokens that
/// arrive after the last stream's first token and up to the first stream's
/// last, over that window. None when the window is empty (streams too short
/// to overlap).
fn all_decoding_tps(times: &[Vec<Instant>]) -> Option<f64> {
    let start = *times.iter().map(|t| t.first()).max()??;
    let end = *times.iter().map(|t| t.last()).min()??;
    if end <= start {
        return None;
    }
    let tokens = times
        .iter()
        .flatten()
        .filter(|&&t| t > start && t <= end)
        .count();
    Some(tokens as f64 / (end - start).as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `bench`.
pub fn run(a: BenchArgs) -> Result<ExitCode> {
    // The flags' parsers refuse these; the check stays for callers that
    // build the arguments in code.
    if a.concurrency == 0 || a.reps == 0 || a.gen_tokens < 2 || a.prompt_tokens == 0 {
        bail!(
            "--concurrency {}, --reps {}, --prompt-tokens {}, --gen-tokens {}: the first three must be at least 1, --gen-tokens at least 2",
            a.concurrency,
            a.reps,
            a.prompt_tokens,
            a.gen_tokens
        );
    }
    let limits = Limits {
        max_num_seqs: a.concurrency,
        max_queue: a.concurrency.max(4),
        prefill_chunk: CLI_PREFILL_CHUNK,
        ..Default::default()
    };
    let rt = setup::start(&a.model, &limits, &mut log_stderr)?;
    // Warm-up: page in weights and grow buffers.
    one_round(
        &rt,
        &BenchArgs {
            gen_tokens: 8,
            reps: 1,
            json: a.json,
            concurrency: 1,
            prompt_tokens: a.prompt_tokens,
            model: a.model.clone(),
        },
        999,
    )?;
    let rounds: Vec<Round> = (0..a.reps)
        .map(|r| one_round(&rt, &a, r as u64))
        .collect::<Result<_>>()?;
    let m = |f: fn(&Round) -> f64| median(rounds.iter().map(f).collect());
    let modeled_s = rt.engine.stats.modeled_ns.load(Ordering::Acquire) as f64 / 1e9;
    let spec = &rt.engine.cards.spec;
    let per_card: Vec<serde_json::Value> = rt
        .engine
        .cards
        .cards
        .iter()
        .map(|c| {
            let busy = c.counters.busy_ns.load(Ordering::Acquire) as f64 / 1e9;
            serde_json::json!({
                "card": c.id,
                "parts": c.parts.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                "modeled_busy_seconds": busy,
                "utilization": busy / modeled_s.max(1e-12),
                "ops_int4_macs": c.counters.ops_int4.load(Ordering::Acquire),
                "ops_int8_macs": c.counters.ops_int8.load(Ordering::Acquire),
                "link_bytes": c.counters.link_bytes.load(Ordering::Acquire),
                "link_messages": c.counters.link_messages.load(Ordering::Acquire),
                "modeled_joules": spec.active_watts * busy + spec.idle_watts * (modeled_s - busy).max(0.0),
            })
        })
        .collect();
    let util: Vec<f64> = per_card
        .iter()
        .map(|c| c["utilization"].as_f64().unwrap_or(0.0))
        .collect();
    let j = serde_json::json!({
        "model": rt.loaded.name,
        "cards": rt.plan.cards,
        "concurrency": a.concurrency,
        "prompt_tokens": a.prompt_tokens,
        "gen_tokens": a.gen_tokens,
        "prefill_tokens_per_second": m(|r| r.prefill_tps),
        "decode_tokens_per_second": m(|r| r.decode_tps),
        "decode_span_tokens_per_second": m(|r| r.span_tps),
        "measured_tokens_per_second": m(|r| r.wall_tokens_per_s),
        "modeled_card_tokens_per_second": m(|r| r.modeled_tps),
        "modeled_card_joules_per_token": m(|r| r.card_jpt),
        "host_joules_per_token": m(|r| r.host_jpt),
        "host_energy_source": rt.engine.host_energy_source.label(),
        "card_utilization": util,
        "per_card": per_card,
        "peak_rss_bytes": peak_rss_bytes(),
        "isa": rt.isa.to_string(),
        "threads": rt.threads,
    });
    if a.json {
        outln!("{j}")?;
    } else {
        outln!(
            "model {}  cards {}  isa {}  threads {}  concurrency {}",
            rt.loaded.name,
            rt.plan.cards,
            rt.isa,
            rt.threads,
            a.concurrency
        )?;
        if a.concurrency == 1 {
            outln!(
                "prefill  {:>9.1} tok/s  ({} prompt tokens, median of {})",
                j["prefill_tokens_per_second"].as_f64().unwrap_or(0.0),
                a.prompt_tokens,
                a.reps
            )?;
        } else {
            outln!(
                "prefill  {:>9.1} tok/s  aggregate: {} prompts of {} tokens, up to the last stream's first token (median of {})",
                j["prefill_tokens_per_second"].as_f64().unwrap_or(0.0),
                a.concurrency,
                a.prompt_tokens,
                a.reps
            )?;
        }
        if a.concurrency == 1 {
            outln!(
                "decode   {:>9.1} tok/s  ({} tokens)",
                j["decode_tokens_per_second"].as_f64().unwrap_or(0.0),
                a.gen_tokens
            )?;
        } else {
            outln!(
                "decode   {:>9.1} tok/s  aggregate while all {} streams decode ({} tokens per stream)",
                j["decode_tokens_per_second"].as_f64().unwrap_or(0.0),
                a.concurrency,
                a.gen_tokens
            )?;
            outln!(
                "span     {:>9.1} tok/s  from the first stream's first token to the last one's last (prefill of later streams included)",
                j["decode_span_tokens_per_second"].as_f64().unwrap_or(0.0)
            )?;
        }
        outln!(
            "measured {:>9.1} tok/s end to end on this CPU",
            j["measured_tokens_per_second"].as_f64().unwrap_or(0.0)
        )?;
        outln!(
            "modeled  {:>9.1} tok/s on the cards",
            j["modeled_card_tokens_per_second"].as_f64().unwrap_or(0.0)
        )?;
        outln!(
            "energy   {:.3} mJ/token modeled cards, {:.3} mJ/token host ({})",
            1e3 * j["modeled_card_joules_per_token"].as_f64().unwrap_or(0.0),
            1e3 * j["host_joules_per_token"].as_f64().unwrap_or(0.0),
            rt.engine.host_energy_source.label()
        )?;
        outln!(
            "util     {}",
            util.iter()
                .map(|u| format!("{:.0}%", u * 100.0))
                .collect::<Vec<_>>()
                .join(" ")
        )?;
        outln!(
            "peak RSS {:.1} MiB",
            peak_rss_bytes() as f64 / (1 << 20) as f64
        )?;
    }
    rt.engine.shutdown();
    Ok(ExitCode::SUCCESS)
}

/// Runs `perplexity` over the cards directly (no sampling).
pub fn perplexity(a: PerplexityArgs) -> Result<ExitCode> {
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {}", a.file.display()))?;
    let rt = setup::start(
        &a.model,
        &Limits {
            max_num_seqs: 1,
            max_queue: 1,
            prefill_chunk: CLI_PREFILL_CHUNK,
            ..Default::default()
        },
        &mut log_stderr,
    )?;
    let ids = rt.loaded.tokenizer()?.encode(&text, false)?;
    let pool = Pool::new(rt.threads);
    let t0 = Instant::now();
    let json = a.json;
    let r = cardinal_pipeline::eval::perplexity(
        &rt.engine.cards,
        &pool,
        rt.isa,
        &ids,
        a.ctx,
        a.max_chunks,
        &mut |done, total, ppl| {
            if !json {
                eprintln!("[{done}/{total}] running ppl = {ppl:.4}");
            }
        },
    )
    .with_context(|| format!("{}", a.file.display()))?;
    let tps = (r.windows * a.ctx) as f64 / t0.elapsed().as_secs_f64();
    if a.json {
        outln!(
            "{}",
            serde_json::json!({"perplexity": r.perplexity, "chunks": r.windows, "ctx": a.ctx, "scored_tokens": r.scored_tokens, "tokens_per_second": tps})
        )?;
    } else {
        outln!(
            "perplexity {:.4} over {} windows of {} tokens ({} scored), {tps:.1} tok/s",
            r.perplexity,
            r.windows,
            a.ctx,
            r.scored_tokens
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn all_decoding_window_counts_only_tokens_while_every_stream_runs() {
        let t0 = Instant::now();
        let ms = |v: &[u64]| -> Vec<Instant> {
            v.iter().map(|&m| t0 + Duration::from_millis(m)).collect()
        };
        // Stream b starts at 30 ms, stream a ends at 70 ms: the window is
        // (30, 70] and holds a's 40, 50, 60, 70 and b's 40, 50, 60, 70.
        let times = vec![
            ms(&[0, 10, 20, 30, 40, 50, 60, 70]),
            ms(&[30, 40, 50, 60, 70, 80]),
        ];
        let tps = all_decoding_tps(&times).unwrap();
        assert!((tps - 8.0 / 0.040).abs() < 1e-6, "{tps}");
        // No overlap: no window.
        assert_eq!(all_decoding_tps(&[ms(&[0, 10]), ms(&[20, 30])]), None);
        assert_eq!(all_decoding_tps(&[ms(&[0, 10]), Vec::new()]), None);
    }
}
