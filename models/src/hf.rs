//! Hugging Face directories: `config.json` (model_type `llama` or `granite`,
//! with Granite's four multipliers), one or more `*.safetensors` files in
//! bf16, f16 or f32, and `tokenizer.json`. Projections are quantized to int4
//! (or int8 on request) as they load; the embedding is quantized to int8.
//! Query and key rows are permuted from Hugging Face's rotate-half RoPE
//! layout to the interleaved-pair layout our RoPE kernel (and GGUF) uses.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cardinal_kernels::QMatrix;
use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value as Json;

use crate::config::{Arch, ModelConfig};
use crate::model::{Layer, Linear, Model};
use crate::{ModelError, Result};

/// Bit width for projection weights quantized at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadBits {
    Int4,
    Int8,
}

/// Reads `dir/config.json` into a [`ModelConfig`].
pub fn read_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
        path: path.clone(),
        source,
    })?;
    let j: Json = serde_json::from_str(&text)
        .map_err(|e| ModelError::file(&path, format!("invalid JSON: {e}")))?;
    let field = |k: &str| -> Result<&Json> {
        j.get(k)
            .ok_or_else(|| ModelError::file(&path, format!("missing field \"{k}\"")))
    };
    let uint = |k: &str| -> Result<usize> {
        field(k)?.as_u64().map(|v| v as usize).ok_or_else(|| {
            ModelError::file(
                &path,
                format!("field \"{k}\" must be a non-negative integer"),
            )
        })
    };
    let float_or = |k: &str, d: f32| -> Result<f32> {
        match j.get(k) {
            None | Some(Json::Null) => Ok(d),
            Some(v) => v
                .as_f64()
                .map(|x| x as f32)
                .ok_or_else(|| ModelError::file(&path, format!("field \"{k}\" must be a number"))),
        }
    };
    let model_type = field("model_type")?
        .as_str()
        .ok_or_else(|| ModelError::file(&path, "field \"model_type\" must be a string"))?;
    let arch = match model_type {
        "llama" => Arch::Llama,
        "granite" => Arch::Granite,
        other => {
            return Err(ModelError::Unsupported(format!(
                "{}: model_type \"{other}\" (supported: llama, granite)",
                path.display()
            )));
        }
    };
    let hidden = uint("hidden_size")?;
    let n_heads = uint("num_attention_heads")?;
    if n_heads == 0 {
        return Err(ModelError::file(
            &path,
            "num_attention_heads must be at least 1",
        ));
    }
    let n_kv_heads = match j.get("num_key_value_heads") {
        None | Some(Json::Null) => n_heads,
        Some(_) => uint("num_key_value_heads")?,
    };
    let head_dim = match j.get("head_dim") {
        None | Some(Json::Null) => hidden / n_heads,
        Some(_) => uint("head_dim")?,
    };
    let granite = arch == Arch::Granite;
    let g = |k: &str, d: f32| if granite { float_or(k, d) } else { Ok(d) };
    let attention_scale = if granite && j.get("attention_multiplier").is_some() {
        float_or("attention_multiplier", 1.0)?
    } else {
        1.0 / (head_dim as f32).sqrt()
    };
    let cfg = ModelConfig {
        arch,
        n_layers: uint("num_hidden_layers")?,
        hidden,
        n_heads,
        n_kv_heads,
        head_dim,
        ffn: uint("intermediate_size")?,
        vocab: uint("vocab_size")?,
        rope_theta: match j.get("rope_parameters").and_then(|r| r.get("rope_theta")) {
            Some(v) if j.get("rope_theta").is_none() => {
                v.as_f64().map(|x| x as f32).ok_or_else(|| {
                    ModelError::file(
                        &path,
                        "field \"rope_parameters.rope_theta\" must be a number",
                    )
                })?
            }
            _ => float_or("rope_theta", 10000.0)?,
        },
        rms_eps: float_or("rms_norm_eps", 1e-6)?,
        ctx_len: match j.get("max_position_embeddings") {
            None | Some(Json::Null) => 2048,
            Some(_) => uint("max_position_embeddings")?,
        },
        embedding_multiplier: g("embedding_multiplier", 1.0)?,
        attention_scale,
        residual_multiplier: g("residual_multiplier", 1.0)?,
        logits_scaling: g("logits_scaling", 1.0)?,
        tied_embeddings: j
            .get("tie_word_embeddings")
            .and_then(Json::as_bool)
            .unwrap_or(false),
    };
    cfg.validate()
        .map_err(|e| ModelError::file(&path, e.to_string()))?;
    Ok(cfg)
}

/// All tensors of a directory's safetensors files, converted to f32 on demand.
struct Tensors {
    dir: PathBuf,
    files: Vec<(PathBuf, Vec<u8>)>,
    index: HashMap<String, usize>,
}

impl Tensors {
    fn open(dir: &Path) -> Result<Self> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|source| ModelError::Io {
                path: dir.to_owned(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(ModelError::file(
                dir,
                "no *.safetensors files in the directory",
            ));
        }
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for p in paths {
            let bytes = std::fs::read(&p).map_err(|source| ModelError::Io {
                path: p.clone(),
                source,
            })?;
            let st = SafeTensors::deserialize(&bytes)
                .map_err(|e| ModelError::file(&p, format!("invalid safetensors: {e}")))?;
            for name in st.names() {
                index.insert(name.to_string(), files.len());
            }
            files.push((p, bytes));
        }
        Ok(Tensors {
            dir: dir.to_owned(),
            files,
            index,
        })
    }

    fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The file holding `name` (the directory if no file does).
    fn path_of(&self, name: &str) -> &Path {
        self.index
            .get(name)
            .map_or(self.dir.as_path(), |&i| self.files[i].0.as_path())
    }

    fn get(&self, name: &str, dims: &[usize]) -> Result<Vec<f32>> {
        let &fi = self.index.get(name).ok_or_else(|| {
            ModelError::file(
                &self.dir,
                format!("missing tensor {name} in the *.safetensors files"),
            )
        })?;
        let (path, bytes) = &self.files[fi];
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| ModelError::file(path, format!("invalid safetensors: {e}")))?;
        let t = st
            .tensor(name)
            .map_err(|e| ModelError::file(path, format!("tensor {name}: {e}")))?;
        if t.shape() != dims {
            return Err(ModelError::file(
                path,
                format!("tensor {name}: shape {:?}, expected {dims:?}", t.shape()),
            ));
        }
        let d = t.data();
        Ok(match t.dtype() {
            Dtype::F32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => d
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => d
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(ModelError::Unsupported(format!(
                    "{}: tensor {name} has dtype {other:?} (supported: F32, F16, BF16)",
                    path.display()
                )));
            }
        })
    }
}

/// Permutes the rows of a q or k projection from rotate-half pairs
/// `(i, i + d/2)` to interleaved pairs `(2i, 2i + 1)` within each head.
fn permute_rope_rows(w: &[f32], n_heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; w.len()];
    let half = head_dim / 2;
    for h in 0..n_heads {
        for i in 0..half {
            for j in 0..2 {
                let src = h * head_dim + j * half + i;
                let dst = h * head_dim + 2 * i + j;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Loads the weights of a Hugging Face Llama/Granite directory.
pub fn load_model(
    dir: &Path,
    bits: LoadBits,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Model> {
    let cfg = read_config(dir)?;
    let t = Tensors::open(dir)?;
    let (h, qd, kvd, f) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim(), cfg.ffn);
    // Quantization fails on non-finite or out-of-range weights; say which.
    let named = |name: &str, m: std::result::Result<QMatrix, cardinal_kernels::KernelError>| {
        m.map_err(|e| ModelError::file(t.path_of(name), format!("tensor {name}: {e}")))
    };
    let q = |name: &str, rows: usize, cols: usize, w: &[f32]| -> Result<QMatrix> {
        named(
            name,
            match bits {
                LoadBits::Int4 => QMatrix::quantize_q4(rows, cols, w),
                LoadBits::Int8 => QMatrix::quantize_q8(rows, cols, w),
            },
        )
    };
    let total = cfg.n_layers + 2;
    progress(0, total);
    let emb_name = "model.embed_tokens.weight";
    let emb = t.get(emb_name, &[cfg.vocab, h])?;
    let embedding = Arc::new(named(emb_name, QMatrix::quantize_q8(cfg.vocab, h, &emb))?);
    let mut layers = Vec::with_capacity(cfg.n_layers);
    for i in 0..cfg.n_layers {
        let n = |s: &str| format!("model.layers.{i}.{s}.weight");
        let mat = |s: &str, rows: usize, cols: usize| t.get(&n(s), &[rows, cols]);
        let wq = permute_rope_rows(
            &mat("self_attn.q_proj", qd, h)?,
            cfg.n_heads,
            cfg.head_dim,
            h,
        );
        let wk = permute_rope_rows(
            &mat("self_attn.k_proj", kvd, h)?,
            cfg.n_kv_heads,
            cfg.head_dim,
            h,
        );
        let wv = mat("self_attn.v_proj", kvd, h)?;
        let wo = mat("self_attn.o_proj", h, qd)?;
        let wg = mat("mlp.gate_proj", f, h)?;
        let wu = mat("mlp.up_proj", f, h)?;
        let wd = mat("mlp.down_proj", h, f)?;
        layers.push(Layer {
            attn_norm: t.get(&n("input_layernorm"), &[h])?,
            wqkv: Linear::stack(
                "qkv",
                vec![
                    q(&n("self_attn.q_proj"), qd, h, &wq)?,
                    q(&n("self_attn.k_proj"), kvd, h, &wk)?,
                    q(&n("self_attn.v_proj"), kvd, h, &wv)?,
                ],
            )?,
            wo: Linear::stack("o_proj", vec![q(&n("self_attn.o_proj"), h, qd, &wo)?])?,
            ffn_norm: t.get(&n("post_attention_layernorm"), &[h])?,
            w_gate_up: Linear::stack(
                "gate_up",
                vec![
                    q(&n("mlp.gate_proj"), f, h, &wg)?,
                    q(&n("mlp.up_proj"), f, h, &wu)?,
                ],
            )?,
            w_down: Linear::stack("down_proj", vec![q(&n("mlp.down_proj"), h, f, &wd)?])?,
        });
        progress(i + 2, total);
    }
    let final_norm = t.get("model.norm.weight", &[h])?;
    let head = if cfg.tied_embeddings || !t.has("lm_head.weight") {
        embedding.clone()
    } else {
        let w = t.get("lm_head.weight", &[cfg.vocab, h])?;
        Arc::new(named(
            "lm_head.weight",
            QMatrix::quantize_q8(cfg.vocab, h, &w),
        )?)
    };
    progress(total, total);
    let model = Model {
        cfg,
        embedding,
        layers,
        final_norm,
        head,
    };
    model.validate()?;
    Ok(model)
}
