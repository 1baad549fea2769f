//! The in-memory model: int4/int8 weight matrices grouped into the parts the
//! planner places on cards (embedding, decoder layers, final norm + head).
//! Loaders build a [`Model`]; the forward pass in `forward.rs` reads it.

use std::sync::Arc;

use cardinal_kernels::{Isa, QMatrix};

use crate::config::ModelConfig;
use crate::{ModelError, Result};

/// A linear projection whose output rows may come from several matrices
/// stacked in order (for example q, k and v when their GGUF types differ).
/// One part is the common, fastest case: a single fused matmul.
#[derive(Clone, Debug)]
pub struct Linear {
    parts: Vec<QMatrix>,
    rows: usize,
    cols: usize,
}

impl Linear {
    /// Stacks `mats` (same column count) into one projection, fusing them into
    /// a single matrix when they share a bit width.
    pub fn stack(name: &str, mats: Vec<QMatrix>) -> Result<Self> {
        let cols = mats.first().map(QMatrix::cols).unwrap_or(0);
        if let Some(bad) = mats.iter().find(|m| m.cols() != cols) {
            return Err(ModelError::Invalid(format!(
                "{name}: stacked matrices have {} and {} columns",
                cols,
                bad.cols()
            )));
        }
        let rows = mats.iter().map(QMatrix::rows).sum();
        let parts = if mats.len() > 1 && mats.iter().all(|m| m.bits() == mats[0].bits()) {
            vec![QMatrix::concat_rows(&mats)?]
        } else {
            mats
        };
        Ok(Linear { parts, rows, cols })
    }

    /// Output width.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input width.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The matrices, in output-row order.
    pub fn parts(&self) -> &[QMatrix] {
        &self.parts
    }

    /// Bytes of weights held.
    pub fn size_bytes(&self) -> usize {
        self.parts.iter().map(QMatrix::size_bytes).sum()
    }

    /// Rearranges every matrix for the `isa` kernels ([`QMatrix::repack`]).
    pub fn repack(&mut self, isa: Isa) {
        self.parts.iter_mut().for_each(|m| m.repack(isa));
    }
}

/// One decoder layer.
#[derive(Clone, Debug)]
pub struct Layer {
    pub attn_norm: Vec<f32>,
    /// q, k and v projections stacked: `q_dim + 2*kv_dim` rows.
    pub wqkv: Linear,
    pub wo: Linear,
    pub ffn_norm: Vec<f32>,
    /// gate and up projections stacked: `2*ffn` rows.
    pub w_gate_up: Linear,
    pub w_down: Linear,
}

impl Layer {
    /// Bytes of weights held by this layer (matrices plus f32 norms).
    pub fn size_bytes(&self) -> usize {
        self.wqkv.size_bytes()
            + self.wo.size_bytes()
            + self.w_gate_up.size_bytes()
            + self.w_down.size_bytes()
            + 4 * (self.attn_norm.len() + self.ffn_norm.len())
    }
}

/// A whole model ready to run.
#[derive(Clone, Debug)]
pub struct Model {
    pub cfg: ModelConfig,
    /// `vocab x hidden`; rows are dequantized for lookup.
    pub embedding: Arc<QMatrix>,
    pub layers: Vec<Layer>,
    pub final_norm: Vec<f32>,
    /// `vocab x hidden`; the same allocation as `embedding` when tied.
    pub head: Arc<QMatrix>,
}

impl Model {
    /// Rearranges the decoder layers' matrices for the `isa` kernels, in
    /// place ([`QMatrix::repack`]: on AVX-512, 4-bit matrices become row
    /// panels at no extra memory). The embedding and head, which may be one
    /// shared allocation, are left to [`QMatrix::prepare`]. Do this before
    /// the model is shared: a repacked 4-bit matrix runs only on the kernels
    /// of that ISA (and the scalar reference).
    /// Layers are converted on all cores (the conversion is a one-time
    /// pass over the weights at load).
    pub fn repack(&mut self, isa: Isa) {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let per = self.layers.len().div_ceil(threads).max(1);
        std::thread::scope(|s| {
            for chunk in self.layers.chunks_mut(per) {
                s.spawn(move || {
                    for l in chunk {
                        for w in [&mut l.wqkv, &mut l.wo, &mut l.w_gate_up, &mut l.w_down] {
                            w.repack(isa);
                        }
                    }
                });
            }
        });
    }

    /// Checks that every matrix has the shape the config promises.
    pub fn validate(&self) -> Result<()> {
        let c = &self.cfg;
        c.validate()?;
        let check = |name: &str, rows: usize, cols: usize, want_r: usize, want_c: usize| {
            if rows != want_r || cols != want_c {
                Err(ModelError::Invalid(format!(
                    "{name}: shape {rows}x{cols}, expected {want_r}x{want_c}"
                )))
            } else {
                Ok(())
            }
        };
        check(
            "token embedding",
            self.embedding.rows(),
            self.embedding.cols(),
            c.vocab,
            c.hidden,
        )?;
        check(
            "output head",
            self.head.rows(),
            self.head.cols(),
            c.vocab,
            c.hidden,
        )?;
        if self.layers.len() != c.n_layers {
            return Err(ModelError::Invalid(format!(
                "model has {} layers, config says {}",
                self.layers.len(),
                c.n_layers
            )));
        }
        if self.final_norm.len() != c.hidden {
            return Err(ModelError::Invalid(format!(
                "output norm has {} values, expected {}",
                self.final_norm.len(),
                c.hidden
            )));
        }
        for (i, l) in self.layers.iter().enumerate() {
            let n = |s: &str| format!("layer {i} {s}");
            check(
                &n("qkv"),
                l.wqkv.rows(),
                l.wqkv.cols(),
                c.q_dim() + 2 * c.kv_dim(),
                c.hidden,
            )?;
            check(
                &n("attn_output"),
                l.wo.rows(),
                l.wo.cols(),
                c.hidden,
                c.q_dim(),
            )?;
            check(
                &n("gate/up"),
                l.w_gate_up.rows(),
                l.w_gate_up.cols(),
                2 * c.ffn,
                c.hidden,
            )?;
            check(
                &n("ffn_down"),
                l.w_down.rows(),
                l.w_down.cols(),
                c.hidden,
                c.ffn,
            )?;
            if l.attn_norm.len() != c.hidden || l.ffn_norm.len() != c.hidden {
                return Err(ModelError::Invalid(format!(
                    "layer {i}: norm weights must have {} values",
                    c.hidden
                )));
            }
        }
        Ok(())
    }

    /// Bytes of the embedding matrix.
    pub fn embedding_bytes(&self) -> usize {
        self.embedding.size_bytes()
    }

    /// Bytes of the final norm and output head (the head counts even when
    /// tied: the card that runs it must hold a copy).
    pub fn head_bytes(&self) -> usize {
        self.head.size_bytes() + 4 * self.final_norm.len()
    }
}
