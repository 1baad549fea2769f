//! Shared by the GGUF tests: scratch directories that clean up after
//! themselves, a small GGUF v3 writer that can also write what a valid file
//! never holds (absurd dimensions and offsets, unknown tensor types), and a
//! tiny two-layer `llama`/`granite` model with a byte-level GPT-2 vocabulary,
//! whose weights are kept as the exact f32 values the file stores so tests can
//! compare the loader and the forward pass against them.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use cardinal_models::synthetic::SplitMix;

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh, empty directory whose name contains `tag`.
    pub fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "cardinal-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create a temp dir");
        TempDir(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `bytes` to `name` in the directory and returns its path.
    pub fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).expect("write a temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// ggml type ids as stored in GGUF tensor infos.
pub const GGML_F32: u32 = 0;
pub const GGML_F16: u32 = 1;
pub const GGML_Q4_0: u32 = 2;
pub const GGML_Q4_1: u32 = 3;
pub const GGML_Q8_0: u32 = 8;
pub const GGML_Q4_K: u32 = 12;

/// A metadata value (the subset of GGUF value types the tests need).
#[derive(Clone, Debug)]
pub enum Md {
    U32(u32),
    I32(i32),
    F32(f32),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

impl Md {
    fn type_id(&self) -> u32 {
        match self {
            Md::U32(_) => 4,
            Md::I32(_) => 5,
            Md::F32(_) => 6,
            Md::Str(_) => 8,
            Md::Strs(_) | Md::I32s(_) => 9,
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Md) {
    match v {
        Md::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Md::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Md::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Md::Str(s) => put_str(out, s),
        Md::Strs(items) => {
            out.extend_from_slice(&8u32.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for s in items {
                put_str(out, s);
            }
        }
        Md::I32s(items) => {
            out.extend_from_slice(&5u32.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for x in items {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
}

/// One tensor: its GGUF dimensions (`ne0` first, i.e. columns first), ggml
/// type id, raw bytes, and an offset that overrides the computed one.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub name: String,
    pub ne: Vec<u64>,
    pub ggml_type: u32,
    pub data: Vec<u8>,
    pub offset: Option<u64>,
}

/// A GGUF file under construction.
#[derive(Clone, Debug, Default)]
pub struct Gguf {
    pub metadata: Vec<(String, Md)>,
    pub tensors: Vec<TensorEntry>,
}

/// Data alignment (GGUF's default; the writer never sets `general.alignment`).
pub const ALIGN: usize = 32;

impl Gguf {
    /// Sets `key`, replacing an earlier value.
    pub fn set(&mut self, key: &str, v: Md) {
        self.remove(key);
        self.metadata.push((key.to_string(), v));
    }

    /// Removes `key` if present.
    pub fn remove(&mut self, key: &str) {
        self.metadata.retain(|(k, _)| k != key);
    }

    /// The tensor called `name`.
    pub fn tensor_mut(&mut self, name: &str) -> &mut TensorEntry {
        self.tensors
            .iter_mut()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no tensor {name}"))
    }

    /// The header: magic, version 3, counts, metadata and tensor infos,
    /// padded to the data alignment.
    pub fn header(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut out, k);
            out.extend_from_slice(&v.type_id().to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
            for d in &t.ne {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ggml_type.to_le_bytes());
            out.extend_from_slice(&t.offset.unwrap_or(offset).to_le_bytes());
            offset += t.data.len().next_multiple_of(ALIGN) as u64;
        }
        out.resize(out.len().next_multiple_of(ALIGN), 0);
        out
    }

    /// The whole file.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = self.header();
        for t in &self.tensors {
            out.extend_from_slice(&t.data);
            out.resize(out.len().next_multiple_of(ALIGN), 0);
        }
        out
    }
}

/// The tiny model's shape.
pub const HIDDEN: usize = 64;
pub const FFN: usize = 128;
pub const HEADS: usize = 2;
pub const KV_HEADS: usize = 1;
pub const HEAD_DIM: usize = 32;
pub const LAYERS: usize = 2;
/// 256 byte tokens, then `<|endoftext|>` (256) and `<|im_start|>` (257).
pub const VOCAB: usize = 258;
pub const EOS: u32 = 256;

/// GPT-2's printable stand-in for each byte (`bytes_to_unicode`).
pub fn byte_token(b: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        char::from(b)
    } else {
        let n = (0..b).filter(|&x| !printable(x)).count() as u32;
        char::from_u32(256 + n).expect("a valid char")
    }
}

/// Which tiny model to write.
#[derive(Clone, Debug)]
pub struct Tiny {
    /// `general.architecture`.
    pub arch: &'static str,
    /// Type of the layer matrices.
    pub matrices: GgmlDType,
    /// Type of `attn_v` and `ffn_down` when they differ (mixed files).
    pub v_down: Option<GgmlDType>,
    /// Type of the token embedding.
    pub embedding: GgmlDType,
    /// Write a separate `output.weight` of this type.
    pub output: Option<GgmlDType>,
    /// Granite multipliers: embedding, attention, residual, logit.
    pub granite: Option<[f32; 4]>,
    /// Weight seed.
    pub seed: u64,
}

impl Tiny {
    /// A llama model with every matrix of type `t`, tied output.
    pub fn llama(t: GgmlDType) -> Self {
        Tiny {
            arch: "llama",
            matrices: t,
            v_down: None,
            embedding: t,
            output: None,
            granite: None,
            seed: 1,
        }
    }
}

/// One layer's weights as f32, exactly as the file stores them.
#[derive(Clone, Debug)]
pub struct LayerWeights {
    pub attn_norm: Vec<f32>,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub o: Vec<f32>,
    pub ffn_norm: Vec<f32>,
    pub gate: Vec<f32>,
    pub up: Vec<f32>,
    pub down: Vec<f32>,
}

/// The model's weights as f32, exactly as the file stores them
/// (dequantized), with its multipliers.
#[derive(Clone, Debug)]
pub struct Weights {
    pub embedding: Vec<f32>,
    pub layers: Vec<LayerWeights>,
    pub output_norm: Vec<f32>,
    pub head: Vec<f32>,
    pub embedding_multiplier: f32,
    pub attention_scale: f32,
    pub residual_multiplier: f32,
    pub logit_scale: f32,
    pub rope_theta: f32,
    pub rms_eps: f32,
}

/// `rows x cols` values uniform in `[-a, a]`.
fn uniform(rng: &mut SplitMix, n: usize, a: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u = (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
            (2.0 * u - 1.0) * a
        })
        .collect()
}

/// Stores `w` (`rows x cols`, row-major) as a tensor of type `t`; returns the
/// entry and the f32 values the file now holds.
pub fn matrix(
    name: &str,
    rows: usize,
    cols: usize,
    w: &[f32],
    t: GgmlDType,
) -> (TensorEntry, Vec<f32>) {
    let dev = Device::Cpu;
    let src = Tensor::from_vec(w.to_vec(), (rows, cols), &dev).expect("a tensor");
    let q = QTensor::quantize(&src, t).expect("quantize");
    let stored = q
        .dequantize(&dev)
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.to_vec1::<f32>())
        .expect("dequantize");
    let id = match t {
        GgmlDType::F32 => GGML_F32,
        GgmlDType::F16 => GGML_F16,
        GgmlDType::Q4_0 => GGML_Q4_0,
        GgmlDType::Q4_1 => GGML_Q4_1,
        GgmlDType::Q8_0 => GGML_Q8_0,
        other => panic!("the tiny model does not write {other:?}"),
    };
    let entry = TensorEntry {
        name: name.to_string(),
        ne: vec![cols as u64, rows as u64],
        ggml_type: id,
        data: q.data().expect("tensor bytes").into_owned(),
        offset: None,
    };
    (entry, stored)
}

fn vector(name: &str, v: &[f32]) -> TensorEntry {
    TensorEntry {
        name: name.to_string(),
        ne: vec![v.len() as u64],
        ggml_type: GGML_F32,
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        offset: None,
    }
}

/// The tiny model as a GGUF file, and the weights it stores.
pub fn tiny(spec: &Tiny) -> (Gguf, Weights) {
    let mut rng = SplitMix::new(spec.seed);
    let a = spec.arch;
    let mut g = Gguf::default();
    g.set("general.architecture", Md::Str(a.into()));
    g.set("general.name", Md::Str("tiny test model".into()));
    g.set(&format!("{a}.block_count"), Md::U32(LAYERS as u32));
    g.set(&format!("{a}.context_length"), Md::U32(128));
    g.set(&format!("{a}.embedding_length"), Md::U32(HIDDEN as u32));
    g.set(&format!("{a}.feed_forward_length"), Md::U32(FFN as u32));
    g.set(&format!("{a}.attention.head_count"), Md::U32(HEADS as u32));
    g.set(
        &format!("{a}.attention.head_count_kv"),
        Md::U32(KV_HEADS as u32),
    );
    g.set(
        &format!("{a}.rope.dimension_count"),
        Md::U32(HEAD_DIM as u32),
    );
    g.set(&format!("{a}.rope.freq_base"), Md::F32(10000.0));
    g.set(
        &format!("{a}.attention.layer_norm_rms_epsilon"),
        Md::F32(1e-5),
    );
    let [emb_mult, attn_scale, res_mult, logit_scale] =
        spec.granite
            .unwrap_or([1.0, 1.0 / (HEAD_DIM as f32).sqrt(), 1.0, 1.0]);
    if let Some(m) = spec.granite {
        g.set(&format!("{a}.embedding_scale"), Md::F32(m[0]));
        g.set(&format!("{a}.attention.scale"), Md::F32(m[1]));
        g.set(&format!("{a}.residual_scale"), Md::F32(m[2]));
        g.set(&format!("{a}.logit_scale"), Md::F32(m[3]));
    }
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_token(b).to_string()).collect();
    tokens.push("<|endoftext|>".into());
    tokens.push("<|im_start|>".into());
    assert_eq!(tokens.len(), VOCAB);
    let mut types = vec![1i32; 256];
    types.extend([3, 3]);
    g.set("tokenizer.ggml.model", Md::Str("gpt2".into()));
    g.set("tokenizer.ggml.pre", Md::Str("gpt2".into()));
    g.set("tokenizer.ggml.tokens", Md::Strs(tokens));
    g.set("tokenizer.ggml.token_type", Md::I32s(types));
    g.set("tokenizer.ggml.merges", Md::Strs(Vec::new()));
    g.set("tokenizer.ggml.bos_token_id", Md::U32(EOS));
    g.set("tokenizer.ggml.eos_token_id", Md::U32(EOS));

    let scale = |cols: usize| (3.0 / cols as f32).sqrt();
    let (e, embedding) = matrix(
        "token_embd.weight",
        VOCAB,
        HIDDEN,
        &uniform(&mut rng, VOCAB * HIDDEN, 0.3),
        spec.embedding,
    );
    g.tensors.push(e);
    let mut layers = Vec::new();
    for i in 0..LAYERS {
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        let vd = spec.v_down.unwrap_or(spec.matrices);
        let norm = |rng: &mut SplitMix| -> Vec<f32> {
            uniform(rng, HIDDEN, 0.2).iter().map(|x| 1.0 + x).collect()
        };
        let attn_norm = norm(&mut rng);
        g.tensors.push(vector(&n("attn_norm"), &attn_norm));
        let mut m = |name: &str, rows: usize, cols: usize, t: GgmlDType| {
            let (e, w) = matrix(
                &n(name),
                rows,
                cols,
                &uniform(&mut rng, rows * cols, scale(cols)),
                t,
            );
            g.tensors.push(e);
            w
        };
        let q = m("attn_q", HEADS * HEAD_DIM, HIDDEN, spec.matrices);
        let k = m("attn_k", KV_HEADS * HEAD_DIM, HIDDEN, spec.matrices);
        let v = m("attn_v", KV_HEADS * HEAD_DIM, HIDDEN, vd);
        let o = m("attn_output", HIDDEN, HEADS * HEAD_DIM, spec.matrices);
        let gate = m("ffn_gate", FFN, HIDDEN, spec.matrices);
        let up = m("ffn_up", FFN, HIDDEN, spec.matrices);
        let down = m("ffn_down", HIDDEN, FFN, vd);
        let ffn_norm = norm(&mut rng);
        g.tensors.push(vector(&n("ffn_norm"), &ffn_norm));
        layers.push(LayerWeights {
            attn_norm,
            q,
            k,
            v,
            o,
            ffn_norm,
            gate,
            up,
            down,
        });
    }
    let output_norm: Vec<f32> = uniform(&mut rng, HIDDEN, 0.2)
        .iter()
        .map(|x| 1.0 + x)
        .collect();
    g.tensors.push(vector("output_norm.weight", &output_norm));
    let head = match spec.output {
        Some(t) => {
            let (e, w) = matrix(
                "output.weight",
                VOCAB,
                HIDDEN,
                &uniform(&mut rng, VOCAB * HIDDEN, scale(HIDDEN)),
                t,
            );
            g.tensors.push(e);
            w
        }
        None => embedding.clone(),
    };
    let w = Weights {
        embedding,
        layers,
        output_norm,
        head,
        embedding_multiplier: emb_mult,
        attention_scale: attn_scale,
        residual_multiplier: res_mult,
        logit_scale,
        rope_theta: 10000.0,
        rms_eps: 1e-5,
    };
    (g, w)
}
