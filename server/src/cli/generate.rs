//! `cardinal generate` and `cardinal tokenize`: one prompt through the
//! engine, streamed to stdout as it is generated (or one JSON object), and
//! the token ids of a text, raw or chat-templated.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use cardinal_models::template::ChatMessage;
use cardinal_models::tokenizer::IncrementalDecoder;
use cardinal_models::{LoadOptions, LoadedModel, ModelSource};
use cardinal_pipeline::{Event, Request, SamplingParams};

use super::{float_in, int_at_least, outln, stdout_error};
use crate::setup::{self, CLI_PREFILL_CHUNK, Limits, ModelArgs};

/// Highest `--temperature`, the engine's own limit
/// ([`SamplingParams::validate`]).
const MAX_TEMPERATURE: f32 = 100.0;

/// Flags of `generate`.
#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt (the user message with --chat).
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// A system message (implies --chat).
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens to generate (at least 1).
    #[arg(long, default_value_t = 128, value_parser = int_at_least(1), allow_negative_numbers = true)]
    pub max_tokens: usize,
    /// Sampling temperature, 0 to 100; 0 is greedy.
    #[arg(long, default_value_t = 0.0, value_parser = float_in(0.0, MAX_TEMPERATURE, false), allow_negative_numbers = true)]
    pub temperature: f32,
    /// Sample from the k most likely tokens only; 0 is no limit.
    #[arg(long, default_value_t = 0, value_parser = int_at_least(0), allow_negative_numbers = true)]
    pub top_k: usize,
    /// Nucleus sampling: the smallest set of tokens whose probabilities
    /// reach top_p, in (0, 1]; 1 is no limit.
    #[arg(long, default_value_t = 1.0, value_parser = float_in(0.0, 1.0, true), allow_negative_numbers = true)]
    pub top_p: f32,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `tokenize`.
#[derive(clap::Args, Debug)]
pub struct TokenizeArgs {
    /// The model whose tokenizer to use (weights are not run).
    #[arg(long, env = "CARDINAL_MODEL", default_value = "smollm2-135m-instruct")]
    pub model: String,
    /// Tokenize the chat-templated single user message.
    #[arg(long)]
    pub chat: bool,
    /// Print a JSON array.
    #[arg(long)]
    pub json: bool,
    /// The text.
    pub text: String,
}

/// Prompt ids for a text: raw (special tokens not parsed) or templated.
pub fn prompt_ids(
    loaded: &LoadedModel,
    text: &str,
    chat: bool,
    system: Option<&str>,
) -> Result<Vec<u32>> {
    let tok = loaded.tokenizer()?;
    if text.is_empty() {
        bail!("the prompt is empty: pass a non-empty --prompt");
    }
    let mut ids = if chat || system.is_some() {
        let mut msgs = Vec::new();
        if let Some(s) = system {
            msgs.push(ChatMessage {
                role: "system".into(),
                content: s.into(),
            });
        }
        msgs.push(ChatMessage {
            role: "user".into(),
            content: text.into(),
        });
        tok.encode(&loaded.render_chat(&msgs)?, true)?
    } else {
        tok.encode(text, false)?
    };
    if let Some(bos) = tok.bos_id().filter(|_| tok.add_bos())
        && ids.first() != Some(&bos)
    {
        ids.insert(0, bos);
    }
    Ok(ids)
}

pub(crate) fn log_stderr(line: &str) {
    eprintln!("{line}");
}

/// Runs `generate`.
pub fn run(a: GenerateArgs) -> Result<ExitCode> {
    let rt = setup::start(
        &a.model,
        &Limits {
            max_num_seqs: 1,
            prefill_chunk: CLI_PREFILL_CHUNK,
            ..Default::default()
        },
        &mut log_stderr,
    )?;
    let ids = prompt_ids(&rt.loaded, &a.prompt, a.chat, a.system.as_deref())?;
    let tok = rt.loaded.tokenizer()?;
    let req = Request {
        prompt: ids.clone(),
        max_tokens: a.max_tokens,
        min_tokens: 0,
        ignore_eos: a.ignore_eos,
        stop_ids: tok.eos_ids().to_vec(),
        params: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
            ..Default::default()
        },
        top_logprobs: 0,
    };
    let mut stream = rt.engine.submit(req)?;
    let mut dec = IncrementalDecoder::new(tok, true);
    let mut out = std::io::stdout().lock();
    let mut generated = Vec::new();
    let finished = loop {
        match stream
            .blocking_recv()
            .context("the engine stopped without finishing the sequence")?
        {
            Event::Token(t) => {
                generated.push(t.id);
                let piece = dec.push(t.id)?;
                if !a.json {
                    out.write_all(piece.as_bytes())
                        .and_then(|()| out.flush())
                        .map_err(stdout_error)?;
                }
            }
            Event::Done(f) => break f,
            Event::Error(e) => bail!("generation failed: {e}"),
        }
    };
    let tail = dec.finish()?;
    if a.json {
        let text = tok.decode(&generated, true)?;
        let decode_tps = if finished.decode_seconds > 0.0 {
            (finished.completion_tokens.saturating_sub(1)) as f64 / finished.decode_seconds
        } else {
            0.0
        };
        let j = serde_json::json!({
            "prompt_ids": ids,
            "generated_ids": generated,
            "text": text,
            "finish_reason": finished.reason.as_str(),
            "prefill_tokens_per_second": finished.prompt_tokens as f64 / finished.prefill_seconds.max(1e-9),
            "decode_tokens_per_second": decode_tps,
            "modeled_card_joules": finished.card_joules,
            "host_joules": finished.host_joules,
        });
        writeln!(out, "{j}").map_err(stdout_error)?;
    } else {
        writeln!(out, "{tail}").map_err(stdout_error)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `tokenize`.
pub fn tokenize(a: TokenizeArgs) -> Result<ExitCode> {
    let source = ModelSource::parse(&a.model)?;
    if let ModelSource::Synthetic(name) = &source {
        bail!(
            "synthetic:{name} has no tokenizer: synthetic models take token ids only (use `cardinal bench`)"
        );
    }
    // Tokenizing needs no weights, but loading is the one code path that
    // validates the file; the default model loads in under a second. Its
    // weight-loading progress would only suggest they are run, so it is
    // not shown (other lines, such as the first-use download, are).
    let loaded = cardinal_models::load(&source, &LoadOptions::default(), &mut |line: &str| {
        if !is_weight_progress(line) {
            log_stderr(line);
        }
    })?;
    let ids = if a.chat {
        prompt_ids(&loaded, &a.text, true, None)?
    } else {
        if a.text.is_empty() {
            bail!("the text is empty: pass a non-empty TEXT");
        }
        loaded.tokenizer()?.encode(&a.text, false)?
    };
    if a.json {
        outln!("{}", serde_json::to_string(&ids)?)?;
    } else {
        outln!(
            "{}",
            ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// A loader progress line about weights ("loading weights: 25% (…)").
fn is_weight_progress(line: &str) -> bool {
    line.starts_with("loading weights:")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        generate: GenerateArgs,
    }

    fn parse_error(flags: &[&str]) -> String {
        let mut v = vec!["cardinal", "--prompt", "hi"];
        v.extend_from_slice(flags);
        Cli::try_parse_from(v).unwrap_err().to_string()
    }

    #[test]
    fn sampling_flags_are_range_checked_when_parsed() {
        let ok = Cli::try_parse_from(["cardinal", "--prompt", "hi"]).unwrap();
        assert_eq!(ok.generate.max_tokens, 128);
        assert_eq!(ok.generate.top_p, 1.0);
        for (flags, want) in [
            (
                ["--max-tokens", "0"],
                "invalid value '0' for '--max-tokens <MAX_TOKENS>': must be ≥ 1",
            ),
            (
                ["--max-tokens", "-1"],
                "invalid value '-1' for '--max-tokens <MAX_TOKENS>': must be ≥ 1",
            ),
            (
                ["--temperature", "-1"],
                "invalid value '-1' for '--temperature <TEMPERATURE>': must be ≥ 0 and ≤ 100",
            ),
            (["--temperature", "101"], "must be ≥ 0 and ≤ 100"),
            (
                ["--top-p", "5"],
                "invalid value '5' for '--top-p <TOP_P>': must be > 0 and ≤ 1",
            ),
            (["--top-p", "0"], "must be > 0 and ≤ 1"),
            (
                ["--top-k", "-1"],
                "invalid value '-1' for '--top-k <TOP_K>': must be ≥ 0",
            ),
            (
                ["--threads", "0"],
                "invalid value '0' for '--threads <THREADS>': must be ≥ 1",
            ),
            (["--threads", "300"], "must be ≤ 256"),
            (
                ["--cards", "0"],
                "invalid value '0' for '--cards <CARDS>': must be ≥ 1",
            ),
        ] {
            let e = parse_error(&flags);
            assert!(e.contains(want), "{flags:?}: {e}");
        }
    }

    #[test]
    fn weight_progress_is_recognised() {
        assert!(is_weight_progress("loading weights: 25% (3/12 parts)"));
        assert!(!is_weight_progress("loading /models/a.gguf"));
    }
}
