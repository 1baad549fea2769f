//! The OpenAI response shapes: this module owns the JSON of chat and
//! completions replies, their streaming chunks, logprobs and usage, and the
//! SSE framing. The `usage` object carries a documented extension,
//! `usage.cardinal`:
//!
//! | field | meaning |
//! | --- | --- |
//! | `card_joules` | modeled energy of the request on the cards (null only if the engine failed before reporting a sequence's figures) |
//! | `host_joules` | host energy attributed to the request (same caveat) |
//! | `host_energy_source` | `measured` (RAPL) or `estimate` (CPU time × watts per core) |
//! | `decode_tokens_per_second` | tokens after the first, over the time from first to last token |
//! | `time_to_first_token_seconds` | from HTTP arrival to the first token |
//! | `queue_seconds` | time waiting for admission in the engine |

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Bytes;
use cardinal_models::tokenizer::Tokenizer;
use serde_json::{Map, Value, json};

use super::openai::Endpoint;
use super::stream::{Choice, TokenLogprob, Usage};

/// The end-of-stream event.
pub const DONE: &[u8] = b"data: [DONE]\n\n";

/// Identity of one response, shared by all its chunks.
#[derive(Clone, Debug)]
pub struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub endpoint: Endpoint,
    /// Host energy source label for `usage.cardinal`.
    pub energy_source: &'static str,
}

impl Meta {
    /// A fresh response id and timestamp.
    pub fn new(endpoint: Endpoint, model: &str, energy_source: &'static str) -> Meta {
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completions => "cmpl",
        };
        Meta {
            id: format!("{prefix}-{}", random_hex()),
            created: unix_seconds(),
            model: model.to_string(),
            endpoint,
            energy_source,
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Completions, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Vec<Value>) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("id".into(), json!(self.id));
        m.insert("object".into(), json!(self.object(chunk)));
        m.insert("created".into(), json!(self.created));
        m.insert("model".into(), json!(self.model));
        m.insert("system_fingerprint".into(), json!(fingerprint()));
        m.insert("choices".into(), Value::Array(choices));
        m
    }
}

/// `cardinal-<version>`.
pub fn fingerprint() -> &'static str {
    concat!("cardinal-", env!("CARGO_PKG_VERSION"))
}

/// Seconds since the Unix epoch.
pub fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn random_hex() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!("{:016x}", h.finish())
}

/// One SSE event carrying `v`.
pub fn sse(v: &Value) -> Bytes {
    let mut out = b"data: ".to_vec();
    // Serializing a Value cannot fail.
    out.extend_from_slice(&serde_json::to_vec(v).unwrap_or_default());
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// The `usage` object.
pub fn usage(u: &Usage, energy_source: &str) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        "cardinal": {
            "card_joules": u.card_joules,
            "host_joules": u.host_joules,
            "host_energy_source": energy_source,
            "decode_tokens_per_second": u.decode_tokens_per_second,
            "time_to_first_token_seconds": u.time_to_first_token_seconds,
            "queue_seconds": u.queue_seconds,
        }
    })
}

/// Text and bytes of one token, for logprobs. A token that is whole UTF-8
/// text shows as that text. One that holds only part of a character (emoji
/// and CJK text split by a byte-level BPE) shows, as OpenAI's API does, as
/// `bytes:\xf0\x9f`, so distinct tokens never share a name; its `bytes`
/// are the raw ones, from which a client rebuilds the character. A model
/// without a tokenizer shows each token as its id and a space, as in its
/// generated text.
pub fn token_piece(tok: Option<&Tokenizer>, id: u32) -> (String, Vec<u8>) {
    let Some(t) = tok else {
        let s = format!("{id} ");
        let b = s.clone().into_bytes();
        return (s, b);
    };
    let text = t.decode(&[id], false).unwrap_or_default();
    if !text.contains('\u{FFFD}') {
        let b = text.clone().into_bytes();
        return (text, b);
    }
    let raw = t.token_raw_bytes(id);
    match String::from_utf8(raw.clone()) {
        Ok(s) => (s, raw),
        Err(_) => {
            let name = raw.iter().fold(String::from("bytes:"), |mut n, b| {
                n.push_str(&format!("\\x{b:02x}"));
                n
            });
            (name, raw)
        }
    }
}

/// Chat logprobs: `{"content":[{token, logprob, bytes, top_logprobs}]}`.
pub fn chat_logprobs(tok: Option<&Tokenizer>, lps: &[TokenLogprob]) -> Value {
    let entry = |id: u32, lp: f32| {
        let (t, b) = token_piece(tok, id);
        json!({ "token": t, "logprob": finite(lp), "bytes": b })
    };
    let content: Vec<Value> = lps
        .iter()
        .map(|l| {
            let mut e = entry(l.id, l.logprob);
            e["top_logprobs"] = Value::Array(l.top.iter().map(|&(id, lp)| entry(id, lp)).collect());
            e
        })
        .collect();
    json!({ "content": content })
}

/// Where tokens' text starts in a choice's text, in characters (as vLLM's
/// Python offsets count), carried from chunk to chunk: the characters begun
/// so far, and how many continuation bytes the last one still expects. A
/// byte that cannot start or continue a character shows as one U+FFFD and
/// counts one; a skipped special token shows nothing and counts none.
#[derive(Clone, Copy, Debug, Default)]
pub struct CharCursor {
    chars: usize,
    pending: u8,
    skip_special: bool,
}

impl CharCursor {
    /// A cursor at the start of a text whose special tokens are skipped
    /// (`skip_special_tokens`) or not.
    pub fn new(skip_special: bool) -> Self {
        CharCursor {
            skip_special,
            ..Self::default()
        }
    }

    /// Advances past a token's bytes; returns the offset of the character
    /// its first byte belongs to (a token holding the tail of an emoji
    /// points at the emoji).
    fn feed(&mut self, bytes: &[u8]) -> usize {
        let continues = bytes.first().is_some_and(|&b| b & 0xC0 == 0x80);
        let start = if continues && self.pending > 0 {
            self.chars - 1
        } else {
            self.chars
        };
        for &b in bytes {
            let (counts, pending) = match b {
                0x80..=0xBF if self.pending > 0 => (false, self.pending - 1),
                0xC2..=0xDF => (true, 1),
                0xE0..=0xEF => (true, 2),
                0xF0..=0xF4 => (true, 3),
                _ => (true, 0),
            };
            self.chars += usize::from(counts);
            self.pending = pending;
        }
        start
    }
}

/// Completions logprobs: parallel `tokens`, `token_logprobs`,
/// `top_logprobs` and `text_offset` lists, the offsets in characters of
/// the choice's text ([`CharCursor`], carried across chunks).
pub fn completion_logprobs(
    tok: Option<&Tokenizer>,
    lps: &[TokenLogprob],
    cursor: &mut CharCursor,
) -> Value {
    let (mut tokens, mut logprobs, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for l in lps {
        let (t, bytes) = token_piece(tok, l.id);
        let hidden = cursor.skip_special && tok.is_some_and(|t| t.is_special(l.id));
        offsets.push(cursor.feed(if hidden { &[] } else { &bytes }));
        let mut top = Map::new();
        for &(id, lp) in &l.top {
            top.insert(token_piece(tok, id).0, finite(lp));
        }
        top.entry(t.clone()).or_insert_with(|| finite(l.logprob));
        tokens.push(json!(t));
        logprobs.push(finite(l.logprob));
        tops.push(Value::Object(top));
    }
    json!({ "tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets })
}

/// -inf logprobs (impossible tokens) as the most negative f32, since JSON
/// has no infinity.
fn finite(lp: f32) -> Value {
    json!(if lp.is_finite() { lp } else { f32::MIN })
}

/// How usage rides on chunks.
#[derive(Clone, Copy, Debug)]
pub enum ChunkUsage<'a> {
    /// No `usage` key (include_usage off).
    Absent,
    /// `"usage": null` (include_usage on, not the usage chunk).
    Null,
    /// Usage on this chunk (continuous_usage_stats).
    Some(&'a Value),
}

fn with_usage(mut m: Map<String, Value>, u: ChunkUsage) -> Value {
    match u {
        ChunkUsage::Absent => {}
        ChunkUsage::Null => {
            m.insert("usage".into(), Value::Null);
        }
        ChunkUsage::Some(v) => {
            m.insert("usage".into(), v.clone());
        }
    }
    Value::Object(m)
}

/// The first chunk of a chat choice: `delta: {role: "assistant", content: ""}`.
pub fn role_chunk(meta: &Meta, index: usize, u: ChunkUsage) -> Value {
    let choice = json!({ "index": index, "delta": { "role": "assistant", "content": "" }, "logprobs": null, "finish_reason": null });
    with_usage(meta.envelope(true, vec![choice]), u)
}

/// A content chunk.
pub fn delta_chunk(meta: &Meta, index: usize, text: &str, logprobs: Value, u: ChunkUsage) -> Value {
    let choice = match meta.endpoint {
        Endpoint::Chat => {
            json!({ "index": index, "delta": { "content": text }, "logprobs": logprobs, "finish_reason": null })
        }
        Endpoint::Completions => {
            json!({ "index": index, "text": text, "logprobs": logprobs, "finish_reason": null })
        }
    };
    with_usage(meta.envelope(true, vec![choice]), u)
}

/// The chunk that ends a choice.
pub fn finish_chunk(meta: &Meta, c: &Choice, u: ChunkUsage) -> Value {
    let (reason, stop_reason) = c
        .finish
        .as_ref()
        .map_or(("stop", Value::Null), |f| (f.reason, f.stop_reason.clone()));
    let choice = match meta.endpoint {
        Endpoint::Chat => {
            json!({ "index": c.index, "delta": {}, "logprobs": null, "finish_reason": reason, "stop_reason": stop_reason })
        }
        Endpoint::Completions => {
            json!({ "index": c.index, "text": "", "logprobs": null, "finish_reason": reason, "stop_reason": stop_reason })
        }
    };
    with_usage(meta.envelope(true, vec![choice]), u)
}

/// The final usage chunk: empty `choices`, same `id`.
pub fn usage_chunk(meta: &Meta, usage: Value) -> Value {
    let mut m = meta.envelope(true, vec![]);
    m.insert("usage".into(), usage);
    Value::Object(m)
}

/// A whole non-streaming reply.
pub fn full(
    meta: &Meta,
    choices: &[Choice],
    usage: Value,
    tok: Option<&Tokenizer>,
    logprobs: bool,
    skip_special: bool,
) -> Value {
    let out = choices
        .iter()
        .map(|c| {
            let (reason, stop_reason) = c
                .finish
                .as_ref()
                .map_or(("stop", Value::Null), |f| (f.reason, f.stop_reason.clone()));
            let lp = match (logprobs, meta.endpoint) {
                (false, _) => Value::Null,
                (true, Endpoint::Chat) => chat_logprobs(tok, &c.logprobs),
                (true, Endpoint::Completions) => {
                    completion_logprobs(tok, &c.logprobs, &mut CharCursor::new(skip_special))
                }
            };
            match meta.endpoint {
                Endpoint::Chat => json!({
                    "index": c.index,
                    "message": { "role": "assistant", "content": c.text },
                    "logprobs": lp,
                    "finish_reason": reason,
                    "stop_reason": stop_reason,
                }),
                Endpoint::Completions => json!({
                    "index": c.index,
                    "text": c.text,
                    "logprobs": lp,
                    "finish_reason": reason,
                    "stop_reason": stop_reason,
                }),
            }
        })
        .collect();
    let mut m = meta.envelope(false, out);
    m.insert("usage".into(), usage);
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_sse() {
        let a = Meta::new(Endpoint::Chat, "m", "estimate");
        let b = Meta::new(Endpoint::Chat, "m", "estimate");
        assert!(a.id.starts_with("chatcmpl-"));
        assert_ne!(a.id, b.id);
        assert_eq!(&sse(&json!({"a":1}))[..], b"data: {\"a\":1}\n\n");
        let u = usage_chunk(&a, json!({"prompt_tokens":1}));
        assert_eq!(u["choices"], json!([]));
        assert_eq!(u["id"], json!(a.id));
    }

    #[test]
    fn completion_offsets_advance() {
        let lps = vec![
            TokenLogprob {
                id: 1,
                logprob: -0.5,
                top: vec![],
            },
            TokenLogprob {
                id: 22,
                logprob: f32::NEG_INFINITY,
                top: vec![(3, -1.0)],
            },
        ];
        let mut cursor = CharCursor::new(true);
        let v = completion_logprobs(None, &lps, &mut cursor);
        assert_eq!(v["text_offset"], json!([0, 2]));
        assert_eq!(cursor.chars, 5);
        assert_eq!(v["tokens"], json!(["1 ", "22 "]));
    }

    /// Tokens holding parts of one character (the tiny Granite tokenizer
    /// splits an emoji into its bytes) get distinct `bytes:` names and
    /// their raw bytes, top logprobs keep one entry per token, and text
    /// offsets count characters, a character's tail pointing at its start.
    #[test]
    fn partial_character_tokens() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/tests/fixtures/tiny-granite"
        );
        let tok = Tokenizer::from_hf_dir(std::path::Path::new(dir)).unwrap();
        let ids = tok.encode("a🐧b", false).unwrap();
        let pieces: Vec<(String, Vec<u8>)> =
            ids.iter().map(|&id| token_piece(Some(&tok), id)).collect();
        let bytes: Vec<u8> = pieces.iter().flat_map(|p| p.1.clone()).collect();
        assert_eq!(bytes, "a🐧b".as_bytes());
        let partial: Vec<&String> = pieces
            .iter()
            .map(|p| &p.0)
            .filter(|n| n.starts_with("bytes:"))
            .collect();
        assert!(partial.len() >= 2, "{pieces:?}");
        assert!(
            partial
                .iter()
                .any(|n| n.as_str() == "bytes:\\xf0" || n.starts_with("bytes:\\xf0\\x")),
            "{partial:?}"
        );
        let lps: Vec<TokenLogprob> = ids
            .iter()
            .map(|&id| TokenLogprob {
                id,
                logprob: -1.0,
                top: ids.iter().map(|&t| (t, -2.0)).collect(),
            })
            .collect();
        let mut cursor = CharCursor::new(true);
        let v = completion_logprobs(Some(&tok), &lps, &mut cursor);
        assert_eq!(cursor.chars, 3);
        let offsets: Vec<u64> = v["text_offset"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_u64().unwrap())
            .collect();
        assert_eq!(offsets.first(), Some(&0));
        assert_eq!(offsets.last(), Some(&2));
        assert!(
            offsets[1..ids.len() - 1].iter().all(|&o| o == 1),
            "{offsets:?}"
        );
        let distinct: std::collections::HashSet<u32> = ids.iter().copied().collect();
        for top in v["top_logprobs"].as_array().unwrap() {
            assert_eq!(top.as_object().unwrap().len(), distinct.len(), "{top}");
        }
        // Stray bytes count one character each, as the text shows them.
        let mut c = CharCursor::new(true);
        let offs: Vec<usize> = [
            &b"a"[..],
            &[0x9f],
            &[0xfb, 0xfb],
            &[0xf0, 0x9f],
            &[0x90, 0xa7],
            b"b",
        ]
        .iter()
        .map(|b| c.feed(b))
        .collect();
        assert_eq!(offs, [0, 1, 2, 4, 4, 5]);
        assert_eq!(
            String::from_utf8_lossy(b"a\x9f\xfb\xfb\xf0\x9f\x90\xa7b")
                .chars()
                .count(),
            c.chars
        );
        let chat = chat_logprobs(Some(&tok), &lps);
        let raw: Vec<u8> = chat["content"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|e| {
                e["bytes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| b.as_u64().unwrap() as u8)
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(raw, "a🐧b".as_bytes());
    }
}
