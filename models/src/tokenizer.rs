//! The text side of a model: this module owns turning text into token ids and
//! back. It builds a byte-level BPE tokenizer (Hugging Face `tokenizers`) from
//! GGUF metadata or from a Hugging Face `tokenizer.json`, knows the model's
//! BOS/EOS ids, whether it wants a BOS, which ids are special, and its chat
//! template source. [`IncrementalDecoder`] (in `detok.rs`) turns a stream of generated ids into
//! text pieces that never split a UTF-8 character.
//!
//! Special tokens: GGUF tokens of type 3 (control) and Hugging Face added
//! tokens marked `special` are matched whole only when `parse_special` is
//! true (templated prompts); in raw text they are tokenized as plain text.
//!
//! End-of-generation rule ([`Tokenizer::eos_ids`]): the declared EOS id comes
//! first, then the GGUF `eot`/`eom` ids (or the ids of `generation_config.json`
//! for Hugging Face), then every special token whose text is one of
//! [`END_TOKEN_NAMES`] (for SmolLM2 this gives `[2 <|im_end|>, 0 <|endoftext|>]`),
//! without duplicates. This mirrors llama.cpp's end-of-generation set.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{ModelError, Result};

/// Special-token texts that end a generation (see the module docs).
pub const END_TOKEN_NAMES: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<end_of_turn>",
    "<|end|>",
    "<|return|>",
    "<EOT>",
    "</s>",
    "<｜end▁of▁sentence｜>",
];

/// GGUF `tokenizer.ggml.token_type` of a control (special) token.
const TOKEN_TYPE_CONTROL: i64 = 3;
/// GGUF `tokenizer.ggml.token_type` of a user-defined token (always matched whole).
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The Llama 3 pre-tokenizer regex (llama.cpp `LLAMA_VOCAB_PRE_TYPE_LLAMA3`).
const REGEX_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The Qwen2 pre-tokenizer regex (llama.cpp `LLAMA_VOCAB_PRE_TYPE_QWEN2`).
const REGEX_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A model's tokenizer. Cheap to clone (the tables are shared).
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

struct Inner {
    /// Matches special tokens whole (templated prompts).
    parse: tokenizers::Tokenizer,
    /// The same tokenizer with special-token matching off, built on first use.
    plain: OnceLock<tokenizers::Tokenizer>,
    vocab_size: usize,
    bos: Option<u32>,
    eos: Vec<u32>,
    add_bos: bool,
    special: Vec<bool>,
    chat_template: Option<String>,
    /// The decoder is plain byte-level: ids map to raw bytes.
    byte_level: bool,
    source: String,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = &self.inner;
        f.debug_struct("Tokenizer")
            .field("source", &i.source)
            .field("vocab_size", &i.vocab_size)
            .field("bos", &i.bos)
            .field("eos", &i.eos)
            .field("add_bos", &i.add_bos)
            .field("chat_template", &i.chat_template.is_some())
            .finish()
    }
}

fn tk_err(what: &str, e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(format!("{what}: {e}"))
}

impl Tokenizer {
    /// Builds the tokenizer from GGUF metadata (`tokenizer.ggml.*`).
    ///
    /// `tokenizer.ggml.model` must be `gpt2` (byte-level BPE) and
    /// `tokenizer.ggml.pre` one of `smollm`/`starcoder`/`refact` (digits split
    /// one by one, then the GPT-2 regex), `gpt2`, `llama3`/`llama-bpe`/
    /// `llama-v3`/`smaug-bpe` or `qwen2`. Only `smollm` is checked against
    /// reference ids in this crate's tests; the others follow llama.cpp.
    pub fn from_gguf_metadata(md: &HashMap<String, Value>) -> Result<Self> {
        let model = md_str(md, "tokenizer.ggml.model")?.ok_or_else(|| {
            ModelError::Invalid("GGUF metadata has no `tokenizer.ggml.model`".into())
        })?;
        if model != "gpt2" {
            return Err(ModelError::Unsupported(format!(
                "GGUF tokenizer model `{model}` (tokenizer.ggml.model): only `gpt2` byte-level BPE \
                 is supported; use a Hugging Face directory with tokenizer.json instead"
            )));
        }
        let pre = md_str(md, "tokenizer.ggml.pre")?.ok_or_else(|| {
            ModelError::Unsupported(
                "GGUF metadata has no `tokenizer.ggml.pre`, so the pre-tokenizer is unknown".into(),
            )
        })?;
        let family = PreFamily::from_name(pre)?;

        let tokens = md_str_array(md, "tokenizer.ggml.tokens")?;
        if tokens.is_empty() || tokens.len() > u32::MAX as usize {
            return Err(ModelError::Invalid(format!(
                "`tokenizer.ggml.tokens` has {} entries (need 1 to {})",
                tokens.len(),
                u32::MAX
            )));
        }
        let types = match md.get("tokenizer.ggml.token_type") {
            Some(v) => md_array(v, "tokenizer.ggml.token_type", "an integer", int_of)?,
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(ModelError::Invalid(format!(
                "`tokenizer.ggml.token_type` has {} entries but `tokenizer.ggml.tokens` has {}",
                types.len(),
                tokens.len()
            )));
        }
        let merges = md_str_array(md, "tokenizer.ggml.merges")?
            .iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| {
                        ModelError::Invalid(format!(
                            "`tokenizer.ggml.merges[{i}]` = {m:?} is not two tokens separated by a space"
                        ))
                    })
            })
            .collect::<Result<Vec<_>>>()?;

        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(family == PreFamily::Llama3)
            .build()
            .map_err(|e| tk_err("building the BPE model from GGUF metadata", e))?;
        let mut tok = tokenizers::Tokenizer::new(bpe);
        family.configure(&mut tok)?;
        tok.with_decoder(Some(ByteLevelDecoder::default()));

        let n = tokens.len();
        let mut special = vec![false; n];
        let mut control = Vec::new();
        let mut user = Vec::new();
        for (i, (t, &ty)) in tokens.iter().zip(&types).enumerate() {
            if t.is_empty() {
                continue;
            }
            if ty == TOKEN_TYPE_CONTROL {
                special[i] = true;
                control.push(AddedToken::from(t.clone(), true));
            } else if ty == TOKEN_TYPE_USER_DEFINED {
                user.push(AddedToken::from(t.clone(), false).normalized(false));
            }
        }
        tok.add_special_tokens(control)
            .map_err(|e| tk_err("registering control tokens", e))?;
        tok.add_tokens(user)
            .map_err(|e| tk_err("registering user-defined tokens", e))?;

        let id_in_range = |key: &str| -> Result<Option<u32>> {
            match md_u32(md, key)? {
                Some(id) if (id as usize) < n => Ok(Some(id)),
                Some(id) => Err(ModelError::Invalid(format!(
                    "`{key}` = {id} is out of range (the vocabulary has {n} tokens)"
                ))),
                None => Ok(None),
            }
        };
        let bos = id_in_range("tokenizer.ggml.bos_token_id")?;
        let mut eos = Vec::new();
        for key in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            if let Some(id) = id_in_range(key)? {
                push_unique(&mut eos, id);
            }
        }
        for (i, t) in tokens.iter().enumerate() {
            if special[i] && END_TOKEN_NAMES.contains(&t.as_str()) {
                push_unique(&mut eos, i as u32);
            }
        }
        let add_bos = match md.get("tokenizer.ggml.add_bos_token") {
            Some(v) => v.to_bool().map_err(|_| {
                ModelError::Invalid(format!(
                    "`tokenizer.ggml.add_bos_token` is not a bool: {v:?}"
                ))
            })?,
            None => family == PreFamily::Llama3,
        } && bos.is_some();
        let chat_template = md_str(md, "tokenizer.chat_template")?.map(str::to_string);

        Ok(Self::assemble(Inner {
            parse: tok,
            plain: OnceLock::new(),
            vocab_size: n,
            bos,
            eos,
            add_bos,
            special,
            chat_template,
            byte_level: true,
            source: format!("gguf gpt2/{pre}"),
        }))
    }

    /// Builds the tokenizer from a Hugging Face directory: `tokenizer.json`
    /// (required), plus `tokenizer_config.json` for `bos_token`, `eos_token`,
    /// `add_bos_token` and `chat_template` (strings or `{"content": ..}`
    /// objects), `chat_template.jinja`/`chat_template.json` when the config has
    /// no template, and `generation_config.json` for extra EOS ids.
    ///
    /// When `add_bos_token` is absent, the model wants a BOS if the file's
    /// post-processor would add one. Padding and truncation are turned off.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        if !tj.is_file() {
            return Err(ModelError::file(
                &tj,
                "missing: a Hugging Face model directory needs tokenizer.json",
            ));
        }
        let mut tok = tokenizers::Tokenizer::from_file(&tj)
            .map_err(|e| ModelError::file(&tj, e.to_string()))?;
        tok.with_padding(None);
        tok.with_truncation(None)
            .map_err(|e| ModelError::file(&tj, e.to_string()))?;

        let config = read_json_opt(&dir.join("tokenizer_config.json"))?;
        let gen_config = read_json_opt(&dir.join("generation_config.json"))?;
        let token_of = |key: &str| -> Option<String> {
            let v = config.as_ref()?.get(key)?;
            match v {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
                _ => None,
            }
        };
        let id_of = |name: &str, key: &str| -> Result<u32> {
            tok.token_to_id(name).ok_or_else(|| {
                ModelError::file(
                    dir.join("tokenizer_config.json"),
                    format!("{key} {name:?} is not in the vocabulary of tokenizer.json"),
                )
            })
        };
        let bos = token_of("bos_token")
            .map(|s| id_of(&s, "bos_token"))
            .transpose()?;
        let mut eos = Vec::new();
        if let Some(s) = token_of("eos_token") {
            eos.push(id_of(&s, "eos_token")?);
        }
        let vocab_size = tok.get_vocab_size(true);
        if let Some(v) = gen_config.as_ref().and_then(|g| g.get("eos_token_id")) {
            let ids: Vec<u64> = match v {
                serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_u64()).collect(),
                other => other.as_u64().into_iter().collect(),
            };
            for id in ids {
                if id < vocab_size as u64 {
                    push_unique(&mut eos, id as u32);
                }
            }
        }
        let mut added: Vec<_> = tok.get_added_tokens_decoder().into_iter().collect();
        added.sort_by_key(|(id, _)| *id);
        let mut special = vec![false; vocab_size];
        for (id, t) in added
            .into_iter()
            .filter(|(id, t)| t.special && (*id as usize) < vocab_size)
        {
            special[id as usize] = true;
            if END_TOKEN_NAMES.contains(&t.content.as_str()) {
                push_unique(&mut eos, id);
            }
        }
        let add_bos = match config.as_ref().and_then(|c| c.get("add_bos_token")) {
            Some(serde_json::Value::Bool(b)) => *b,
            _ => match bos {
                Some(b) => {
                    let probe = tok
                        .encode_fast("", true)
                        .map_err(|e| ModelError::file(&tj, e.to_string()))?;
                    probe.get_ids().first() == Some(&b)
                }
                None => false,
            },
        } && bos.is_some();

        let chat_template = crate::template::hf_template_source(dir, config.as_ref())?;
        let byte_level = matches!(tok.get_decoder(), Some(DecoderWrapper::ByteLevel(_)));
        Ok(Self::assemble(Inner {
            parse: tok,
            plain: OnceLock::new(),
            vocab_size,
            bos,
            eos,
            add_bos,
            special,
            chat_template,
            byte_level,
            source: format!("hf {}", dir.display()),
        }))
    }

    fn assemble(inner: Inner) -> Self {
        let tok = Tokenizer {
            inner: Arc::new(inner),
        };
        tracing::debug!(tokenizer = ?tok, "tokenizer ready");
        tok
    }

    fn plain(&self) -> &tokenizers::Tokenizer {
        self.inner.plain.get_or_init(|| {
            let mut t = self.inner.parse.clone();
            t.set_encode_special_tokens(true);
            t
        })
    }

    /// Token ids of `text`. With `parse_special`, special-token texts such as
    /// `<|im_start|>` become their ids (for templated prompts); without, they
    /// are tokenized as plain text (for user input). Never adds a BOS: check
    /// [`Tokenizer::add_bos`] and prepend [`Tokenizer::bos_id`] yourself.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let t = if parse_special {
            &self.inner.parse
        } else {
            self.plain()
        };
        let enc = t
            .encode_fast(text, false)
            .map_err(|e| tk_err(&format!("encoding {} bytes of text", text.len()), e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`; special tokens are left out with `skip_special`.
    /// Invalid UTF-8 (e.g. half a character at the end) becomes U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        for &id in ids {
            self.check_id(id)?;
        }
        self.inner
            .parse
            .decode(ids, skip_special)
            .map_err(|e| tk_err(&format!("decoding {} ids", ids.len()), e))
    }

    pub(crate) fn check_id(&self, id: u32) -> Result<()> {
        if (id as usize) < self.inner.vocab_size {
            Ok(())
        } else {
            Err(ModelError::Tokenizer(format!(
                "token id {id} is out of range: the vocabulary has {} tokens",
                self.inner.vocab_size
            )))
        }
    }

    /// Number of token ids (including added and special tokens).
    pub fn vocab_size(&self) -> usize {
        self.inner.vocab_size
    }

    /// The BOS id, if the model declares one (whether or not it wants it).
    pub fn bos_id(&self) -> Option<u32> {
        self.inner.bos
    }

    /// Ids that end a generation, declared EOS first (see the module docs).
    pub fn eos_ids(&self) -> &[u32] {
        &self.inner.eos
    }

    /// Whether prompts should start with [`Tokenizer::bos_id`] (false for
    /// SmolLM2). Applies to raw prompts; a chat template that already emits
    /// the BOS text makes it appear through `encode(.., true)` instead.
    pub fn add_bos(&self) -> bool {
        self.inner.add_bos
    }

    /// The vocabulary entry of `id`: the literal text for special tokens (e.g.
    /// `<|im_end|>`), the byte-level form for ordinary ones (`Ġthe`); use
    /// [`Tokenizer::decode`] for text.
    pub fn token_str(&self, id: u32) -> Option<String> {
        self.inner.parse.id_to_token(id)
    }

    /// Whether the tokenizer is byte-level (GPT-2's alphabet, all GGUF ones).
    pub(crate) fn byte_level(&self) -> bool {
        self.inner.byte_level
    }

    /// Whether `id` is a special (control) token.
    pub fn is_special(&self, id: u32) -> bool {
        self.inner
            .special
            .get(id as usize)
            .copied()
            .unwrap_or(false)
    }

    /// The model's Jinja chat template source, if it has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.inner.chat_template.as_deref()
    }

    /// The underlying Hugging Face tokenizer (with special-token parsing on),
    /// e.g. to save it as `tokenizer.json`.
    pub fn hf(&self) -> &tokenizers::Tokenizer {
        &self.inner.parse
    }

    /// The raw bytes token `id` stands for (for a byte-level tokenizer, a
    /// token may hold only part of a UTF-8 character, as in emoji and CJK
    /// text; logprobs report these bytes). Empty for an unknown id.
    pub fn token_raw_bytes(&self, id: u32) -> Vec<u8> {
        let mut out = Vec::new();
        self.token_bytes(id, &mut out);
        out
    }

    /// The raw bytes `id` stands for, for byte-level tokenizers (the same
    /// mapping as the byte-level decoder: a token whose characters are not all
    /// byte-level symbols counts as its UTF-8 text).
    pub(crate) fn token_bytes(&self, id: u32, out: &mut Vec<u8>) {
        let Some(tok) = self.inner.parse.id_to_token(id) else {
            return;
        };
        // A SentencePiece byte-fallback token (`<0xF0>`) is its one byte.
        if let Some(b) = tok
            .strip_prefix("<0x")
            .and_then(|h| h.strip_suffix('>'))
            .filter(|h| h.len() == 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            return;
        }
        let table = char_to_byte();
        let start = out.len();
        for c in tok.chars() {
            match table.get(&c) {
                Some(&b) => out.push(b),
                None => {
                    out.truncate(start);
                    out.extend_from_slice(tok.as_bytes());
                    return;
                }
            }
        }
    }
}

/// How a GGUF `tokenizer.ggml.pre` splits text before BPE.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PreFamily {
    /// Digits one by one, then the GPT-2 regex (smollm, starcoder, refact).
    StarCoder,
    /// The GPT-2 regex.
    Gpt2,
    /// The Llama 3 regex, BPE `ignore_merges`, BOS by default.
    Llama3,
    /// NFC, then the Qwen2 regex.
    Qwen2,
}

impl PreFamily {
    fn from_name(pre: &str) -> Result<Self> {
        Ok(match pre {
            "smollm" | "starcoder" | "refact" => PreFamily::StarCoder,
            "gpt2" | "gpt-2" => PreFamily::Gpt2,
            "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" => PreFamily::Llama3,
            "qwen2" => PreFamily::Qwen2,
            other => {
                return Err(ModelError::Unsupported(format!(
                    "GGUF pre-tokenizer `{other}` (tokenizer.ggml.pre); supported: smollm, starcoder, \
                     refact, gpt2, llama3, llama-bpe, llama-v3, smaug-bpe, qwen2"
                )));
            }
        })
    }

    fn configure(self, tok: &mut tokenizers::Tokenizer) -> Result<()> {
        let split = |re: &str| -> Result<PreTokenizerWrapper> {
            Split::new(
                SplitPattern::Regex(re.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map(Into::into)
            .map_err(|e| tk_err("compiling the pre-tokenizer regex", e))
        };
        match self {
            PreFamily::StarCoder => {
                tok.with_pre_tokenizer(Some(Sequence::new(vec![
                    Digits::new(true).into(),
                    ByteLevel::new(false, true, true).into(),
                ])));
            }
            PreFamily::Gpt2 => {
                tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
            }
            PreFamily::Llama3 => {
                tok.with_pre_tokenizer(Some(Sequence::new(vec![
                    split(REGEX_LLAMA3)?,
                    ByteLevel::new(false, true, false).into(),
                ])));
            }
            PreFamily::Qwen2 => {
                tok.with_normalizer(Some(NFC))
                    .map_err(|e| tk_err("setting the NFC normalizer", e))?;
                tok.with_pre_tokenizer(Some(Sequence::new(vec![
                    split(REGEX_QWEN2)?,
                    ByteLevel::new(false, false, false).into(),
                ])));
            }
        }
        Ok(())
    }
}

fn push_unique(v: &mut Vec<u32>, id: u32) {
    if !v.contains(&id) {
        v.push(id);
    }
}

fn md_str<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<Option<&'a str>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(ModelError::Invalid(format!(
            "GGUF `{key}` is not a string: {}",
            short(v)
        ))),
    }
}

fn md_str_array(md: &HashMap<String, Value>, key: &str) -> Result<Vec<String>> {
    let v = md
        .get(key)
        .ok_or_else(|| ModelError::Invalid(format!("GGUF metadata has no `{key}`")))?;
    md_array(v, key, "a string", |x| match x {
        Value::String(s) => Some(s.clone()),
        _ => None,
    })
}

/// The elements of array `v` (metadata `key`) converted by `f`.
fn md_array<T>(
    v: &Value,
    key: &str,
    what: &str,
    f: impl Fn(&Value) -> Option<T>,
) -> Result<Vec<T>> {
    let Value::Array(items) = v else {
        return Err(ModelError::Invalid(format!(
            "GGUF `{key}` is not an array: {}",
            short(v)
        )));
    };
    let conv = |(i, x): (usize, &Value)| {
        f(x).ok_or_else(|| {
            ModelError::Invalid(format!("GGUF `{key}[{i}]` is not {what}: {}", short(x)))
        })
    };
    items.iter().enumerate().map(conv).collect()
}

fn int_of(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(x) => i64::from(*x),
        Value::I8(x) => i64::from(*x),
        Value::U16(x) => i64::from(*x),
        Value::I16(x) => i64::from(*x),
        Value::U32(x) => i64::from(*x),
        Value::I32(x) => i64::from(*x),
        Value::U64(x) => i64::try_from(*x).ok()?,
        Value::I64(x) => *x,
        _ => return None,
    })
}

/// A token id; negative values (some converters write -1) mean "none".
fn md_u32(md: &HashMap<String, Value>, key: &str) -> Result<Option<u32>> {
    let Some(v) = md.get(key) else {
        return Ok(None);
    };
    let x = int_of(v).ok_or_else(|| {
        ModelError::Invalid(format!("GGUF `{key}` is not an integer: {}", short(v)))
    })?;
    if x < 0 {
        return Ok(None);
    }
    u32::try_from(x).map(Some).map_err(|_| {
        ModelError::Invalid(format!(
            "GGUF `{key}` = {x} does not fit a token id (max {})",
            u32::MAX
        ))
    })
}

/// A short description of a metadata value for error messages.
fn short(v: &Value) -> String {
    match v {
        Value::Array(a) => format!("an array of {} values", a.len()),
        Value::String(s) if s.len() > 40 => format!("a string of {} bytes", s.len()),
        other => format!("{other:?}"),
    }
}

fn read_json_opt(path: &Path) -> Result<Option<serde_json::Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| ModelError::file(path, format!("not valid JSON: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ModelError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// GPT-2's byte-level alphabet, reversed: the printable character each byte
/// is written as in the vocabulary, mapped back to the byte.
fn char_to_byte() -> &'static HashMap<char, u8> {
    static TABLE: OnceLock<HashMap<char, u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut map = HashMap::with_capacity(256);
        let mut extra = 0u32;
        for b in 0u32..256 {
            let printable =
                (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
            let cp = if printable {
                b
            } else {
                extra += 1;
                255 + extra
            };
            if let Some(c) = char::from_u32(cp) {
                map.insert(c, b as u8);
            }
        }
        map
    })
}

pub use crate::detok::IncrementalDecoder;
