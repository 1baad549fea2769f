//! The prompts sent: synthetic word sequences fitted to a requested token
//! length (measured with the server's `POST /tokenize` when it exists,
//! estimated at one token per word otherwise), optionally after a system
//! prompt the whole level shares, or lines of a JSONL dataset.
//! Everything random is drawn from `--seed`, with one derived stream per
//! level, so a run is reproducible.

use crate::cli::{Endpoint, InputTokens};
use crate::client::Target;
use crate::rng::Rng;
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::path::Path;

/// Distinct prompts generated per level at most; later requests reuse them.
pub const MAX_PROMPTS_PER_LEVEL: usize = 4096;
/// Prompts per level whose length is checked with `/tokenize`; later ones
/// use the measured tokens-per-word ratio.
pub const MAX_TOKENIZED_PER_LEVEL: usize = 64;
/// Mixed into `--seed` for the shared system prompt's own random stream.
const PREFIX_SEED: u64 = 0x5052_4546_4958; // "PREFIX"

/// Short, common English words: almost every tokenizer maps " word" to one
/// token, which makes the one-token-per-word estimate close when the server
/// has no `/tokenize`, and the fitted line below close when it has.
const WORDS_TEXT: &str = "\
    the of and to in is you that it he was for on are as with his they at be this have \
    from or one had by word but not what all were we when your can said there use an each \
    which she do how their if will up other about out many then them these so some her \
    would make like him into time has look two more write go see number no way could \
    people my than first water been call who oil its now find long down day did get come \
    made may part over new sound take only little work know place year live me back give \
    most very after thing our just name good man think say great where help through much \
    before line right too mean old any same tell boy follow came want show also around \
    form three small set put end does another well large must big even such because turn \
    here why ask went men read need land different home us move try kind hand picture \
    again change off play spell air away animal house point page letter mother answer \
    found study still learn should world high every near add food between own below \
    country plant last school father keep tree never start city earth eye light thought \
    head under story saw left few while along might close something seem next hard open \
    example begin life always those both paper together got group often run";

fn vocab() -> &'static [&'static str] {
    static V: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    V.get_or_init(|| WORDS_TEXT.split_whitespace().collect())
}

/// What a request asks the model.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptBody {
    /// A plain prompt string.
    Text(String),
    /// A chat message list.
    Messages(Vec<Value>),
}

/// One prompt and its length in tokens when known.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    /// The content.
    pub body: PromptBody,
    /// Length measured by the server's tokenizer (or estimated).
    pub tokens: Option<u64>,
}

impl Prompt {
    /// The request fields for `endpoint`: `("messages", [...])` or
    /// `("prompt", "...")`. A dataset prompt string becomes one user message
    /// on the chat endpoint; a message list becomes its contents joined by
    /// newlines on the completions endpoint.
    pub fn request_field(&self, endpoint: Endpoint) -> (&'static str, Value) {
        match (endpoint, &self.body) {
            (Endpoint::Chat, PromptBody::Text(t)) => {
                ("messages", json!([{"role": "user", "content": t}]))
            }
            (Endpoint::Chat, PromptBody::Messages(m)) => ("messages", Value::Array(m.clone())),
            (Endpoint::Completions, PromptBody::Text(t)) => ("prompt", json!(t)),
            (Endpoint::Completions, PromptBody::Messages(m)) => {
                let joined: Vec<String> = m
                    .iter()
                    .filter_map(|msg| msg.get("content"))
                    .map(|c| match c {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .collect();
                ("prompt", json!(joined.join("\n")))
            }
        }
    }
}

/// How prompt text length maps to tokens: tokens ≈ intercept + slope·words.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LengthModel {
    /// Tokens per word of the built-in vocabulary.
    pub tokens_per_word: f64,
    /// Tokens the tokenizer adds regardless of length (for example BOS).
    pub intercept: f64,
    /// The server's `/tokenize` works, so lengths are measured, not estimated.
    pub measured: bool,
}

impl LengthModel {
    /// One token per word, not measured.
    pub const ESTIMATE: LengthModel = LengthModel {
        tokens_per_word: 1.0,
        intercept: 0.0,
        measured: false,
    };

    /// Estimated tokens of `words` words.
    pub fn tokens(&self, words: usize) -> u64 {
        (self.intercept + self.tokens_per_word * words as f64)
            .round()
            .max(0.0) as u64
    }

    /// Words needed for about `tokens` tokens (at least one).
    pub fn words(&self, tokens: u64) -> usize {
        ((tokens as f64 - self.intercept) / self.tokens_per_word)
            .round()
            .max(1.0) as usize
    }
}

fn words(rng: &mut Rng, n: usize) -> Vec<&'static str> {
    let v = vocab();
    (0..n).map(|_| v[rng.below(v.len())]).collect()
}

/// Fits the length line with the server's tokenizer (two samples of 50 and
/// 250 words), or falls back to the one-token-per-word estimate.
pub async fn calibrate(target: &Target, seed: u64) -> LengthModel {
    let mut rng = Rng::derived(seed, 0xCA11);
    let sample = words(&mut rng, 250);
    let short = target.tokenize(&sample[..50].join(" ")).await;
    let long = target.tokenize(&sample.join(" ")).await;
    match (short, long) {
        (Some(a), Some(b)) if b > a => {
            let slope = (b - a) as f64 / 200.0;
            LengthModel {
                tokens_per_word: slope,
                intercept: a as f64 - 50.0 * slope,
                measured: true,
            }
        }
        _ => LengthModel::ESTIMATE,
    }
}

/// Builds text of about `want` tokens from `pool` (a random word sequence),
/// checking with `/tokenize` when `check` is set: up to four corrections,
/// keeping the closest. Returns the text and its token count (measured or
/// estimated).
async fn fit(
    target: &Target,
    pool: &[&str],
    want: u64,
    lm: LengthModel,
    check: bool,
) -> (String, u64) {
    let est = |n: usize| lm.tokens(n);
    let mut n = lm.words(want).clamp(1, pool.len());
    if !(lm.measured && check) {
        return (pool[..n].join(" "), est(n));
    }
    let mut best: Option<(u64, usize, u64)> = None; // (distance, words, count)
    for _ in 0..4 {
        let text = pool[..n].join(" ");
        let Some(count) = target.tokenize(&text).await else {
            break;
        };
        let dist = count.abs_diff(want);
        if best.is_none_or(|(d, _, _)| dist < d) {
            best = Some((dist, n, count));
        }
        if dist == 0 {
            break;
        }
        let step = ((want as f64 - count as f64) / lm.tokens_per_word).round() as i64;
        let step = if step == 0 {
            if want > count { 1 } else { -1 }
        } else {
            step
        };
        let next = (n as i64 + step).clamp(1, pool.len() as i64) as usize;
        if next == n {
            break;
        }
        n = next;
    }
    match best {
        Some((_, n, count)) => (pool[..n].join(" "), count),
        None => (pool[..n].join(" "), est(n)),
    }
}

/// The shape of a level's synthetic prompts.
#[derive(Debug, Clone, Copy)]
pub struct Synthetic {
    /// Length of each prompt's own part.
    pub lengths: InputTokens,
    /// About this many tokens of system prompt shared by every prompt of
    /// the level (0: none, and prompts are plain text).
    pub shared_prefix_tokens: u64,
}

/// Synthetic prompts for one level: `count` prompts whose lengths are drawn
/// from N(mean, stddev), rounded and clamped to ≥ 1 token, each after the
/// level's shared system prompt when there is one (then the prompt is a
/// system message and a user message).
pub async fn synthetic(
    target: &Target,
    lm: LengthModel,
    shape: Synthetic,
    count: usize,
    seed: u64,
    stream: u64,
) -> Vec<Prompt> {
    let dist = shape.lengths;
    let mut rng = Rng::derived(seed, stream);
    let prefix = (shape.shared_prefix_tokens > 0).then(|| {
        let mut prng = Rng::derived(seed ^ PREFIX_SEED, stream);
        let n = lm.words(shape.shared_prefix_tokens);
        // The words' tokens only: the prompt's own count has the intercept.
        let tokens = (lm.tokens_per_word * n as f64).round() as u64;
        (words(&mut prng, n).join(" "), tokens)
    });
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let want = rng.normal(dist.mean, dist.stddev).round().max(1.0) as u64;
        let pool_len = lm.words(want) * 3 / 2 + 16;
        let pool = words(&mut rng, pool_len);
        let (text, tokens) = fit(target, &pool, want, lm, i < MAX_TOKENIZED_PER_LEVEL).await;
        out.push(match &prefix {
            None => Prompt {
                body: PromptBody::Text(text),
                tokens: Some(tokens),
            },
            Some((system, system_tokens)) => Prompt {
                body: PromptBody::Messages(vec![
                    json!({"role": "system", "content": system}),
                    json!({"role": "user", "content": text}),
                ]),
                tokens: Some(tokens + system_tokens),
            },
        });
    }
    out
}

/// Parses one JSONL dataset line.
pub fn parse_dataset_line(line: &str) -> Result<PromptBody> {
    let v: Value = serde_json::from_str(line).context("not JSON")?;
    if let Some(m) = v.get("messages") {
        match m {
            Value::Array(list) if !list.is_empty() && list.iter().all(Value::is_object) => {
                return Ok(PromptBody::Messages(list.clone()));
            }
            _ => bail!("`messages` must be a non-empty array of objects"),
        }
    }
    match v.get("prompt") {
        Some(Value::String(s)) => Ok(PromptBody::Text(s.clone())),
        Some(_) => bail!("`prompt` must be a string"),
        None => bail!("line has neither `messages` nor `prompt`"),
    }
}

/// Loads a JSONL dataset (blank lines skipped).
pub fn load_dataset(path: &Path) -> Result<Vec<PromptBody>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading dataset {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let body =
            parse_dataset_line(line).with_context(|| format!("{}:{}", path.display(), i + 1))?;
        out.push(body);
    }
    if out.is_empty() {
        bail!("dataset {} has no entries", path.display());
    }
    Ok(out)
}

/// Dataset prompts for one level: the dataset in a seeded random order,
/// repeated as needed to give `count` prompts.
pub fn from_dataset(rows: &[PromptBody], count: usize, seed: u64, stream: u64) -> Vec<Prompt> {
    let mut order: Vec<usize> = (0..rows.len()).collect();
    Rng::derived(seed, stream).shuffle(&mut order);
    (0..count)
        .map(|i| Prompt {
            body: rows[order[i % order.len()]].clone(),
            tokens: None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataset_lines() {
        assert_eq!(
            parse_dataset_line(r#"{"prompt":"hi"}"#).unwrap(),
            PromptBody::Text("hi".into())
        );
        let m = parse_dataset_line(
            r#"{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]}"#,
        )
        .unwrap();
        let p = Prompt {
            body: m,
            tokens: None,
        };
        assert_eq!(p.request_field(Endpoint::Completions).1, json!("a\nb"));
        assert_eq!(p.request_field(Endpoint::Chat).0, "messages");
        assert!(parse_dataset_line(r#"{"messages":[]}"#).is_err());
        assert!(parse_dataset_line(r#"{"x":1}"#).is_err());
        assert!(parse_dataset_line("nope").is_err());
    }

    #[test]
    fn dataset_order_is_seeded() {
        let rows: Vec<PromptBody> = (0..10).map(|i| PromptBody::Text(i.to_string())).collect();
        let a = from_dataset(&rows, 25, 3, 1);
        let b = from_dataset(&rows, 25, 3, 1);
        let c = from_dataset(&rows, 25, 4, 1);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 25);
        assert_eq!(a[0], a[10]);
    }

    /// With a shared prefix every prompt of a level starts with the same
    /// system message of about the requested length; levels differ.
    #[tokio::test]
    async fn shared_prefix_is_one_system_message_per_level() {
        let t = Target::new(
            "http://127.0.0.1:9".into(),
            None,
            None,
            std::time::Duration::from_secs(1),
            true,
        )
        .unwrap();
        let shape = Synthetic {
            lengths: InputTokens {
                mean: 20.0,
                stddev: 0.0,
            },
            shared_prefix_tokens: 300,
        };
        let lm = LengthModel::ESTIMATE;
        let level = synthetic(&t, lm, shape, 5, 7, 1).await;
        let system = |p: &Prompt| match &p.body {
            PromptBody::Messages(m) => {
                assert_eq!(
                    (m[0]["role"].as_str(), m[1]["role"].as_str()),
                    (Some("system"), Some("user"))
                );
                m[0]["content"].as_str().unwrap().to_owned()
            }
            other => panic!("expected messages, got {other:?}"),
        };
        let first = system(&level[0]);
        assert_eq!(first.split(' ').count(), 300);
        assert!(level.iter().all(|p| system(p) == first));
        assert!(level.iter().all(|p| p.tokens == Some(320)));
        let other = synthetic(&t, lm, shape, 1, 7, 2).await;
        assert_ne!(system(&other[0]), first, "levels share a prefix");
        let plain = Synthetic {
            shared_prefix_tokens: 0,
            ..shape
        };
        let p = synthetic(&t, lm, plain, 1, 7, 1).await;
        assert!(matches!(p[0].body, PromptBody::Text(_)));
    }
}
