//! The shape and hyper-parameters of a decoder-only transformer, in one
//! struct shared by every loader (GGUF, Hugging Face, synthetic) and by the
//! planner, which sizes cards from it without loading any weights.

use crate::{ModelError, Result};

/// Architecture family. Granite is Llama plus four multipliers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Granite,
}

/// Everything the forward pass and the planner need to know about a model.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub n_layers: usize,
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
    /// Trained context length (positions the model supports).
    pub ctx_len: usize,
    /// Multiplies the token embedding (Granite); 1.0 for Llama.
    pub embedding_multiplier: f32,
    /// Softmax scale for attention scores (Granite's `attention_multiplier`);
    /// `1/sqrt(head_dim)` for Llama.
    pub attention_scale: f32,
    /// Multiplies each block's output before the residual add (Granite); 1.0 for Llama.
    pub residual_multiplier: f32,
    /// Logits are divided by this (Granite's `logits_scaling`); 1.0 for Llama.
    pub logits_scaling: f32,
    /// Whether the output head shares the embedding matrix.
    pub tied_embeddings: bool,
}

/// Hard upper limits on any dimension, so a hostile file cannot ask for an
/// absurd allocation before we have read a single weight.
pub const MAX_DIM: usize = 1 << 20;
/// Upper limit on the layer count.
pub const MAX_LAYERS: usize = 4096;

impl ModelConfig {
    /// Checks internal consistency; every message names the value and the rule.
    pub fn validate(&self) -> Result<()> {
        let dims = [
            ("hidden", self.hidden),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("ffn", self.ffn),
            ("vocab", self.vocab),
            ("ctx_len", self.ctx_len),
        ];
        for (name, v) in dims {
            if v == 0 || v > MAX_DIM {
                return Err(ModelError::Invalid(format!(
                    "model {name} = {v}: must be between 1 and {MAX_DIM}"
                )));
            }
        }
        if self.n_layers == 0 || self.n_layers > MAX_LAYERS {
            return Err(ModelError::Invalid(format!(
                "model n_layers = {}: must be between 1 and {MAX_LAYERS}",
                self.n_layers
            )));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(ModelError::Invalid(format!(
                "model n_heads = {} is not a multiple of n_kv_heads = {}",
                self.n_heads, self.n_kv_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(ModelError::Invalid(format!(
                "model head_dim = {}: RoPE needs an even head dimension",
                self.head_dim
            )));
        }
        for (name, v) in [
            ("hidden", self.hidden),
            ("ffn", self.ffn),
            ("n_heads*head_dim", self.q_dim()),
        ] {
            if !v.is_multiple_of(cardinal_kernels::GROUP) {
                return Err(ModelError::Unsupported(format!(
                    "model {name} = {v}: int4 groups need a multiple of {}",
                    cardinal_kernels::GROUP
                )));
            }
        }
        for (name, v) in [
            ("rope_theta", self.rope_theta),
            ("rms_eps", self.rms_eps),
            ("embedding_multiplier", self.embedding_multiplier),
            ("attention_scale", self.attention_scale),
            ("residual_multiplier", self.residual_multiplier),
            ("logits_scaling", self.logits_scaling),
        ] {
            if !v.is_finite() || v <= 0.0 {
                return Err(ModelError::Invalid(format!(
                    "model {name} = {v}: must be a finite positive number"
                )));
            }
        }
        Ok(())
    }

    /// Width of the query projection.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of the key (and value) projection.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Parameters of one decoder layer (projections and norms).
    pub fn layer_params(&self) -> usize {
        let attn = self.hidden * (self.q_dim() + 2 * self.kv_dim()) + self.q_dim() * self.hidden;
        let mlp = 3 * self.hidden * self.ffn;
        attn + mlp + 2 * self.hidden
    }

    /// Parameters of the embedding matrix.
    pub fn embedding_params(&self) -> usize {
        self.vocab * self.hidden
    }

    /// Parameters of the whole model, counting a tied head once.
    pub fn total_params(&self) -> usize {
        let head = if self.tied_embeddings {
            0
        } else {
            self.embedding_params()
        };
        self.embedding_params() + self.n_layers * self.layer_params() + self.hidden + head
    }

    /// Bytes of C8 KV cache per token per layer: K and V, one int8 per value
    /// plus one f32 scale per head.
    pub fn kv_bytes_per_token_layer(&self) -> usize {
        2 * (self.kv_dim() + 4 * self.n_kv_heads)
    }
}
