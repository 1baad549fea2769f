//! Seeded synthetic models: random int4 weights at a named shape, for
//! planning cards and measuring speed at scale without a checkpoint. The
//! weights are generated directly as Q4_0/Q8_0 blocks (no float pass), so a
//! 3B-parameter model builds in seconds, and the same seed always gives the
//! same bytes.

use std::sync::Arc;

use cardinal_kernels::QMatrix;
use half::f16;

use crate::config::{Arch, ModelConfig};
use crate::model::{Layer, Linear, Model};
use crate::{ModelError, Result};

/// Names accepted after `synthetic:`.
pub const SYNTHETIC_NAMES: &[&str] = &["tiny", "granite-3b", "granite-8b"];

/// The config of a named synthetic shape.
pub fn config(name: &str) -> Result<ModelConfig> {
    let granite = |n_layers, ffn, vocab| ModelConfig {
        arch: Arch::Granite,
        n_layers,
        hidden: 4096,
        n_heads: 32,
        n_kv_heads: 8,
        head_dim: 128,
        ffn,
        vocab,
        rope_theta: 10000.0,
        rms_eps: 1e-5,
        ctx_len: 4096,
        embedding_multiplier: 1.0,
        attention_scale: 1.0 / (128f32).sqrt(),
        residual_multiplier: 1.0,
        logits_scaling: 1.0,
        tied_embeddings: true,
    };
    let cfg = match name {
        // The HPEC 2024 3B model: Granite-8B-Code-Base blocks, 14 layers.
        "granite-3b" => granite(14, 14336, 49152),
        // Granite-3.3-8B-instruct: 40 layers, FFN 12800, vocab 49155.
        "granite-8b" => granite(40, 12800, 49155),
        "tiny" => ModelConfig {
            arch: Arch::Llama,
            n_layers: 8,
            hidden: 128,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 32,
            ffn: 256,
            vocab: 512,
            rope_theta: 10000.0,
            rms_eps: 1e-5,
            ctx_len: 1024,
            embedding_multiplier: 1.0,
            attention_scale: 1.0 / (32f32).sqrt(),
            residual_multiplier: 1.0,
            logits_scaling: 1.0,
            tied_embeddings: true,
        },
        other => {
            return Err(ModelError::Invalid(format!(
                "unknown synthetic model \"{other}\" (known: {})",
                SYNTHETIC_NAMES.join(", ")
            )));
        }
    };
    cfg.validate()?;
    Ok(cfg)
}

/// SplitMix64: a tiny, well-mixed, seedable generator.
#[derive(Clone, Debug)]
pub struct SplitMix(u64);

impl SplitMix {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let r = self.next_u64().to_le_bytes();
            c.copy_from_slice(&r[..c.len()]);
        }
    }
}

/// Random Q4_0 blocks whose weights have standard deviation ~ 1/sqrt(cols).
fn q4(rng: &mut SplitMix, rows: usize, cols: usize) -> Result<QMatrix> {
    let blocks = rows * cols / 32;
    let mut raw = vec![0u8; blocks * 18];
    // Uniform q-8 in [-8, 7] has standard deviation ~4.6.
    let d = f16::from_f32(1.0 / (4.6 * (cols as f32).sqrt())).to_le_bytes();
    for b in raw.chunks_exact_mut(18) {
        b[..2].copy_from_slice(&d);
        rng.fill(&mut b[2..]);
    }
    Ok(QMatrix::from_ggml_q4_0(rows, cols, &raw)?)
}

/// Random Q8_0 blocks with unit-variance values.
fn q8(rng: &mut SplitMix, rows: usize, cols: usize) -> Result<QMatrix> {
    let blocks = rows * cols / 32;
    let mut raw = vec![0u8; blocks * 34];
    let d = f16::from_f32(1.0 / 73.0).to_le_bytes();
    for b in raw.chunks_exact_mut(34) {
        b[..2].copy_from_slice(&d);
        rng.fill(&mut b[2..]);
    }
    Ok(QMatrix::from_ggml_q8_0(rows, cols, &raw)?)
}

/// Builds the named synthetic model from `seed`.
pub fn load_model(name: &str, seed: u64, progress: &mut dyn FnMut(usize, usize)) -> Result<Model> {
    let cfg = config(name)?;
    let mut rng = SplitMix::new(seed);
    let (h, qd, kvd, f) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim(), cfg.ffn);
    let total = cfg.n_layers + 1;
    progress(0, total);
    let embedding = Arc::new(q8(&mut rng, cfg.vocab, h)?);
    let mut layers = Vec::with_capacity(cfg.n_layers);
    for i in 0..cfg.n_layers {
        layers.push(Layer {
            attn_norm: vec![1.0; h],
            wqkv: Linear::stack("qkv", vec![q4(&mut rng, qd + 2 * kvd, h)?])?,
            wo: Linear::stack("o", vec![q4(&mut rng, h, qd)?])?,
            ffn_norm: vec![1.0; h],
            w_gate_up: Linear::stack("gate_up", vec![q4(&mut rng, 2 * f, h)?])?,
            w_down: Linear::stack("down", vec![q4(&mut rng, h, f)?])?,
        });
        progress(i + 1, total);
    }
    let model = Model {
        head: embedding.clone(),
        embedding,
        layers,
        final_norm: vec![1.0; h],
        cfg,
    };
    progress(total, total);
    model.validate()?;
    Ok(model)
}
