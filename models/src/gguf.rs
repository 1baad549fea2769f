//! GGUF loading: reads the header with candle-core's hardened reader, maps
//! `llama` and `granite` metadata onto [`ModelConfig`], and repacks each
//! tensor (F32, F16, Q8_0, Q4_0, Q4_1) into the kernels' layout. Every read
//! is bounds-checked against the file size before any allocation, and every
//! error names the file, the tensor and the rule it broke.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use cardinal_kernels::QMatrix;
use half::f16;

use crate::config::{Arch, MAX_DIM, ModelConfig};
use crate::model::{Layer, Linear, Model};
use crate::{ModelError, Result};

/// An opened GGUF file: its header, ready to load tensors from.
pub struct GgufFile {
    path: PathBuf,
    file: BufReader<File>,
    file_len: u64,
    content: Content,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .finish()
    }
}

impl GgufFile {
    /// Opens and parses the header of `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let f = File::open(path).map_err(|source| ModelError::Io {
            path: path.to_owned(),
            source,
        })?;
        let file_len = f
            .metadata()
            .map_err(|source| ModelError::Io {
                path: path.to_owned(),
                source,
            })?
            .len();
        let mut file = BufReader::new(f);
        let mut magic = [0u8; 4];
        if file.read_exact(&mut magic).is_err() || &magic != b"GGUF" {
            return Err(ModelError::file(
                path,
                "not a GGUF file (the first 4 bytes are not \"GGUF\")",
            ));
        }
        let rewind = |file: &mut BufReader<File>| {
            file.seek(SeekFrom::Start(0))
                .map_err(|source| ModelError::Io {
                    path: path.to_owned(),
                    source,
                })
        };
        rewind(&mut file)?;
        // candle's reader divides by `general.alignment` without checking it.
        if declared_alignment(&mut file) == Some(0) {
            return Err(ModelError::file(
                path,
                "invalid GGUF header: general.alignment is 0 (it must be a positive number of bytes)",
            ));
        }
        rewind(&mut file)?;
        let content = Content::read(&mut file).map_err(|e| {
            ModelError::file(
                path,
                format!("invalid GGUF header: {}", header_problem(e, file_len)),
            )
        })?;
        Ok(GgufFile {
            path: path.to_owned(),
            file,
            file_len,
            content,
        })
    }

    /// The metadata key/value pairs.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    fn err(&self, msg: impl Into<String>) -> ModelError {
        ModelError::file(&self.path, msg)
    }

    fn md_u32(&self, key: &str) -> Result<usize> {
        let v = self
            .metadata()
            .get(key)
            .ok_or_else(|| self.err(format!("missing metadata key {key}")))?;
        let n = v
            .to_u32()
            .map(|x| x as usize)
            .or_else(|_| v.to_u64().map(|x| x as usize))
            .or_else(|_| v.to_i32().map(|x| x.max(0) as usize))
            .map_err(|e| self.err(format!("metadata {key}: {e}")))?;
        Ok(n)
    }

    fn md_f32(&self, key: &str) -> Result<Option<f32>> {
        match self.metadata().get(key) {
            None => Ok(None),
            Some(v) => v
                .to_f32()
                .or_else(|_| v.to_f64().map(|x| x as f32))
                .map(Some)
                .map_err(|e| self.err(format!("metadata {key}: {e}"))),
        }
    }

    /// Reads the model configuration from the metadata.
    pub fn config(&self) -> Result<ModelConfig> {
        let arch_name = self
            .metadata()
            .get("general.architecture")
            .and_then(|v| v.to_string().ok().cloned())
            .ok_or_else(|| self.err("missing metadata key general.architecture"))?;
        let arch = match arch_name.as_str() {
            "llama" => Arch::Llama,
            "granite" => Arch::Granite,
            other => {
                return Err(ModelError::Unsupported(format!(
                    "{}: architecture \"{other}\" (supported: llama, granite)",
                    self.path.display()
                )));
            }
        };
        let a = &arch_name;
        let n_layers = self.md_u32(&format!("{a}.block_count"))?;
        let hidden = self.md_u32(&format!("{a}.embedding_length"))?;
        let ffn = self.md_u32(&format!("{a}.feed_forward_length"))?;
        let n_heads = self.md_u32(&format!("{a}.attention.head_count"))?;
        let n_kv_heads = self
            .md_u32(&format!("{a}.attention.head_count_kv"))
            .unwrap_or(n_heads);
        if n_heads == 0 || n_heads > MAX_DIM {
            return Err(self.err(format!("attention.head_count = {n_heads} is out of range")));
        }
        let head_dim = self
            .md_u32(&format!("{a}.rope.dimension_count"))
            .unwrap_or(hidden / n_heads);
        let ctx_len = self.md_u32(&format!("{a}.context_length")).unwrap_or(2048);
        let vocab = match self.md_u32(&format!("{a}.vocab_size")) {
            Ok(v) => v,
            Err(_) => {
                let t = self.info("token_embd.weight")?;
                *t.shape.dims().first().ok_or_else(|| {
                    self.err("tensor token_embd.weight has no dimensions, so the vocabulary size is unknown")
                })?
            }
        };
        let rope_theta = self
            .md_f32(&format!("{a}.rope.freq_base"))?
            .unwrap_or(10000.0);
        let rms_eps = self
            .md_f32(&format!("{a}.attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5);
        let granite = arch == Arch::Granite;
        let opt = |key: &str, default: f32| -> Result<f32> {
            Ok(if granite {
                self.md_f32(&format!("{a}.{key}"))?.unwrap_or(default)
            } else {
                default
            })
        };
        let attention_scale = match (granite, self.md_f32(&format!("{a}.attention.scale"))?) {
            (true, Some(s)) if s != 0.0 => s,
            _ => 1.0 / (head_dim as f32).sqrt(),
        };
        let cfg = ModelConfig {
            arch,
            n_layers,
            hidden,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn,
            vocab,
            rope_theta,
            rms_eps,
            ctx_len,
            embedding_multiplier: opt("embedding_scale", 1.0)?,
            attention_scale,
            residual_multiplier: opt("residual_scale", 1.0)?,
            logits_scaling: opt("logit_scale", 1.0)?,
            tied_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
        };
        cfg.validate()
            .map_err(|e| self.err(format!("invalid model metadata: {e}")))?;
        Ok(cfg)
    }

    fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.content
            .tensor_infos
            .get(name)
            .ok_or_else(|| self.err(format!("missing tensor {name}")))
    }

    /// Reads the raw bytes of a tensor after checking its type, shape and
    /// extent against the file.
    fn raw(&mut self, name: &str, dims: &[usize]) -> Result<(GgmlDType, Vec<u8>)> {
        let info = self.info(name)?;
        let dtype = info.ggml_dtype;
        let shape = info.shape.dims().to_vec();
        let offset = info.offset;
        if shape != dims {
            return Err(self.err(format!("tensor {name}: shape {shape:?}, expected {dims:?}")));
        }
        let elems: usize = dims.iter().product();
        let (block, bytes_per_block) = match dtype {
            GgmlDType::F32 => (1, 4),
            GgmlDType::F16 => (1, 2),
            GgmlDType::Q8_0 => (32, 34),
            GgmlDType::Q4_0 => (32, 18),
            GgmlDType::Q4_1 => (32, 20),
            other => {
                return Err(ModelError::Unsupported(format!(
                    "{}: tensor {name} has type {other:?} (supported: F32, F16, Q8_0, Q4_0, Q4_1)",
                    self.path.display()
                )));
            }
        };
        if !elems.is_multiple_of(block) {
            return Err(self.err(format!(
                "tensor {name}: {elems} elements is not a multiple of the {dtype:?} block of {block}"
            )));
        }
        let size = (elems / block) as u64 * bytes_per_block;
        let start = self.content.tensor_data_offset.checked_add(offset);
        let end = start.and_then(|s| s.checked_add(size));
        match (start, end) {
            (Some(s), Some(e)) if e <= self.file_len => {
                self.file
                    .seek(SeekFrom::Start(s))
                    .and_then(|_| {
                        let mut buf = vec![0u8; size as usize];
                        self.file.read_exact(&mut buf).map(|_| buf)
                    })
                    .map(|buf| (dtype, buf))
                    .map_err(|source| ModelError::Io {
                        path: self.path.clone(),
                        source,
                    })
            }
            _ => Err(self.err(format!(
                "tensor {name}: data at offset {offset} with {size} bytes runs past the end of the file ({} bytes); the file is truncated or corrupt",
                self.file_len
            ))),
        }
    }

    /// Loads a 2-D weight as an int4/int8 matrix: Q4_0, Q4_1 and Q8_0 are
    /// repacked losslessly; F32/F16 are quantized to int8.
    fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<QMatrix> {
        let (dtype, raw) = self.raw(name, &[rows, cols])?;
        from_raw(dtype, rows, cols, &raw).map_err(|e| self.err(format!("tensor {name}: {e}")))
    }

    /// Loads the projections `parts` (tensor name, rows), all `cols` wide,
    /// stacked in order into one [`Linear`]. When they share a type their
    /// raw rows are concatenated and converted once, so no separate part
    /// matrix is built and dropped (dead part buffers would stay pinned in
    /// the kernels' buffer arena next to the fused matrix: 24 MB for
    /// SmolLM2); otherwise each part is its own matrix.
    fn stacked(&mut self, name: &str, parts: &[(String, usize)], cols: usize) -> Result<Linear> {
        let mut raws = Vec::with_capacity(parts.len());
        for (part, rows) in parts {
            raws.push(self.raw(part, &[*rows, cols])?);
        }
        let rows: usize = parts.iter().map(|p| p.1).sum();
        if raws.iter().all(|(d, _)| *d == raws[0].0) {
            let dtype = raws[0].0;
            let mut raw = Vec::with_capacity(raws.iter().map(|r| r.1.len()).sum());
            for (_, r) in raws.drain(..) {
                raw.extend_from_slice(&r);
            }
            let m = from_raw(dtype, rows, cols, &raw)
                .map_err(|e| self.err(format!("tensor {name}: {e}")))?;
            return Linear::stack(name, vec![m]);
        }
        let mut mats = Vec::with_capacity(parts.len());
        for ((part, rows), (dtype, raw)) in parts.iter().zip(raws) {
            let m = from_raw(dtype, *rows, cols, &raw)
                .map_err(|e| self.err(format!("tensor {part}: {e}")))?;
            mats.push(m);
        }
        Linear::stack(name, mats)
    }

    /// Loads a 1-D F32/F16 vector.
    fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>> {
        let (dtype, raw) = self.raw(name, &[len])?;
        match dtype {
            GgmlDType::F32 | GgmlDType::F16 => Ok(floats(dtype, &raw)),
            other => Err(self.err(format!(
                "tensor {name}: type {other:?}, expected F32 or F16"
            ))),
        }
    }

    /// Loads the whole model.
    pub fn load_model(&mut self, progress: &mut dyn FnMut(usize, usize)) -> Result<Model> {
        let cfg = self.config()?;
        let (h, qd, kvd, f) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim(), cfg.ffn);
        let total = cfg.n_layers + 2;
        progress(0, total);
        let embedding = Arc::new(self.matrix("token_embd.weight", cfg.vocab, h)?);
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            let wqkv = self.stacked(
                &n("attn_qkv"),
                &[(n("attn_q"), qd), (n("attn_k"), kvd), (n("attn_v"), kvd)],
                h,
            )?;
            let wo = Linear::stack(
                &n("attn_output"),
                vec![self.matrix(&n("attn_output"), h, qd)?],
            )?;
            let w_gate_up = self.stacked(
                &n("ffn_gate_up"),
                &[(n("ffn_gate"), f), (n("ffn_up"), f)],
                h,
            )?;
            let w_down = Linear::stack(&n("ffn_down"), vec![self.matrix(&n("ffn_down"), h, f)?])?;
            layers.push(Layer {
                attn_norm: self.vector(&n("attn_norm"), h)?,
                wqkv,
                wo,
                ffn_norm: self.vector(&n("ffn_norm"), h)?,
                w_gate_up,
                w_down,
            });
            progress(i + 2, total);
        }
        let final_norm = self.vector("output_norm.weight", h)?;
        let head = if cfg.tied_embeddings {
            embedding.clone()
        } else {
            Arc::new(self.matrix("output.weight", cfg.vocab, h)?)
        };
        progress(total, total);
        let model = Model {
            cfg,
            embedding,
            layers,
            final_norm,
            head,
        };
        model.validate().map_err(|e| self.err(e.to_string()))?;
        Ok(model)
    }
}

/// The message of a header error from candle's reader, without the
/// backtrace candle attaches when `RUST_BACKTRACE` is set, and saying so
/// plainly when the file ends inside the header.
fn header_problem(e: candle_core::Error, file_len: u64) -> String {
    let mut e = e;
    while let candle_core::Error::WithBacktrace { inner, .. } = e {
        e = *inner;
    }
    match e {
        candle_core::Error::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            format!("the file ends inside the header after {file_len} bytes: it is truncated")
        }
        other => other.to_string(),
    }
}

/// The integer value of `general.alignment`, found by walking the metadata
/// without building it. None when absent, not an integer, or the walk hits
/// something odd (candle's reader then reports it properly).
fn declared_alignment(r: &mut BufReader<File>) -> Option<i64> {
    fn bytes<const N: usize>(r: &mut BufReader<File>) -> Option<[u8; N]> {
        let mut b = [0u8; N];
        r.read_exact(&mut b).ok().map(|_| b)
    }
    fn len(r: &mut BufReader<File>, v1: bool) -> Option<u64> {
        if v1 {
            bytes::<4>(r).map(|b| u32::from_le_bytes(b) as u64)
        } else {
            bytes::<8>(r).map(u64::from_le_bytes)
        }
    }
    fn skip(r: &mut BufReader<File>, n: u64) -> Option<()> {
        r.seek_relative(i64::try_from(n).ok()?).ok()
    }
    fn fixed_size(ty: u32) -> Option<u64> {
        match ty {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        }
    }
    fn skip_value(r: &mut BufReader<File>, ty: u32, v1: bool, depth: usize) -> Option<()> {
        if let Some(n) = fixed_size(ty) {
            return skip(r, n);
        }
        match ty {
            8 => {
                let n = len(r, v1)?;
                skip(r, n)
            }
            9 if depth < 4 => {
                let elem = u32::from_le_bytes(bytes(r)?);
                let n = len(r, v1)?;
                match fixed_size(elem) {
                    Some(size) => skip(r, n.checked_mul(size)?),
                    None => (0..n).try_for_each(|_| skip_value(r, elem, v1, depth + 1)),
                }
            }
            _ => None,
        }
    }
    let _magic = bytes::<4>(r)?;
    let v1 = u32::from_le_bytes(bytes(r)?) == 1;
    let _tensors = len(r, v1)?;
    let kvs = len(r, v1)?;
    for _ in 0..kvs {
        let key_len = len(r, v1)?;
        let is_alignment = if key_len == 17 {
            &bytes::<17>(r)? == b"general.alignment"
        } else {
            skip(r, key_len)?;
            false
        };
        let ty = u32::from_le_bytes(bytes(r)?);
        if is_alignment {
            return match ty {
                0 => bytes::<1>(r).map(|b| b[0] as i64),
                1 => bytes::<1>(r).map(|b| b[0] as i8 as i64),
                2 => bytes::<2>(r).map(|b| u16::from_le_bytes(b) as i64),
                3 => bytes::<2>(r).map(|b| i16::from_le_bytes(b) as i64),
                4 => bytes::<4>(r).map(|b| u32::from_le_bytes(b) as i64),
                5 => bytes::<4>(r).map(|b| i32::from_le_bytes(b) as i64),
                _ => None,
            };
        }
        skip_value(r, ty, v1, 0)?;
    }
    None
}

/// A matrix from a tensor's raw ggml bytes: quantized types repacked
/// losslessly, float types quantized to int8.
fn from_raw(
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    raw: &[u8],
) -> std::result::Result<QMatrix, cardinal_kernels::KernelError> {
    match dtype {
        GgmlDType::Q4_0 => QMatrix::from_ggml_q4_0(rows, cols, raw),
        GgmlDType::Q4_1 => QMatrix::from_ggml_q4_1(rows, cols, raw),
        GgmlDType::Q8_0 => QMatrix::from_ggml_q8_0(rows, cols, raw),
        _ => QMatrix::quantize_q8(rows, cols, &floats(dtype, raw)),
    }
}

fn floats(dtype: GgmlDType, raw: &[u8]) -> Vec<f32> {
    match dtype {
        GgmlDType::F16 => raw
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    }
}
