//! Start-up shared by every subcommand: parse the model argument, load the
//! model, plan its cards (the fewest that fit unless `--cards` is given),
//! build the cards and start the engine.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use cardinal_kernels::Isa;
use cardinal_models::{LoadOptions, LoadedModel, ModelSource};
use cardinal_pipeline::plan::{self, Plan};
use cardinal_pipeline::stages::Cards;
use cardinal_pipeline::{CardSpec, Engine, EngineConfig};

/// Flags shared by every subcommand that runs a model.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// A .gguf file, a Hugging Face directory (config.json + *.safetensors +
    /// tokenizer.json), "smollm2-135m-instruct" (fetched on first use with
    /// pip), or synthetic:tiny | synthetic:granite-3b | synthetic:granite-8b.
    #[arg(long, env = "CARDINAL_MODEL", default_value = "smollm2-135m-instruct")]
    pub model: String,
    /// Number of emulated cards (default: the fewest that fit).
    #[arg(long, env = "CARDINAL_CARDS", value_parser = crate::cli::int_at_least(1), allow_negative_numbers = true)]
    pub cards: Option<usize>,
    /// TOML file overriding card spec fields (see ARCHITECTURE.md).
    #[arg(long, env = "CARDINAL_CARD_SPEC")]
    pub card_spec: Option<PathBuf>,
    /// Card memory for weights and KV, MiB (overrides the spec file).
    #[arg(long, env = "CARDINAL_CARD_MEMORY_MIB")]
    pub card_memory_mib: Option<u64>,
    /// Worker threads for the kernels, 1 to 256 (default: all cores).
    #[arg(long, env = "CARDINAL_THREADS", value_parser = crate::cli::int_in(1, MAX_THREADS), allow_negative_numbers = true)]
    pub threads: Option<usize>,
    /// Seed for synthetic weights.
    #[arg(long, env = "CARDINAL_WEIGHT_SEED", default_value_t = 0)]
    pub weight_seed: u64,
    /// Quantize float checkpoints to int8 instead of int4.
    #[arg(long, env = "CARDINAL_HF_INT8")]
    pub hf_int8: bool,
}

/// Most kernel worker threads accepted by `--threads`.
pub const MAX_THREADS: usize = 256;

impl ModelArgs {
    /// Checks what can be checked without loading the model: the model
    /// argument, the thread count and the card spec (file and flags).
    /// `serve` calls it before binding its port.
    pub fn check(&self) -> Result<()> {
        ModelSource::parse(&self.model)?;
        self.threads()?;
        self.spec()?;
        if self.cards == Some(0) {
            bail!("--cards 0: must be at least 1");
        }
        Ok(())
    }

    /// The card spec from defaults, the file and single flags.
    pub fn spec(&self) -> Result<CardSpec> {
        let mut spec = match &self.card_spec {
            Some(p) => CardSpec::from_toml_file(p)?,
            None => CardSpec::default(),
        };
        if let Some(m) = self.card_memory_mib {
            spec.memory_bytes = m
                .checked_mul(1 << 20)
                .context("--card-memory-mib is too large")?;
        }
        spec.validate()?;
        Ok(spec)
    }

    /// Threads to use.
    pub fn threads(&self) -> Result<usize> {
        let all = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        match self.threads {
            Some(0) => bail!("--threads 0: must be at least 1"),
            Some(t) if t > MAX_THREADS => bail!("--threads {t}: must be at most {MAX_THREADS}"),
            Some(t) => Ok(t),
            None => Ok(all),
        }
    }
}

/// A loaded model running on its cards.
pub struct Runtime {
    pub loaded: Arc<LoadedModel>,
    pub plan: Plan,
    pub engine: Arc<Engine>,
    pub isa: Isa,
    pub threads: usize,
}

/// Engine limits for a runtime.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_num_seqs: usize,
    pub max_queue: usize,
    pub max_model_len: Option<usize>,
    /// Most prompt tokens computed per engine step (chunked prefill).
    pub prefill_chunk: usize,
    /// Nice value of the compute threads (0 for the CLI; the server uses
    /// [`SERVE_COMPUTE_NICE`]).
    pub compute_nice: i32,
    /// Reuse cached KV blocks of earlier prompts (the server; off for the
    /// one-shot CLI commands, whose repeated runs must measure prefill).
    pub prefix_cache: bool,
}

/// Nice value of the server's engine and kernel-pool threads. On 2 cores the
/// compute threads would otherwise hold both cores while the HTTP runtime
/// waits to accept, reject (429) or answer /health; at nice 5 the scheduler
/// gives a runnable HTTP thread about 3x their weight, and compute keeps
/// every cycle the HTTP side does not use.
pub const SERVE_COMPUTE_NICE: i32 = 5;

/// Prefill chunk of the one-shot CLI commands (generate, bench, perplexity):
/// no other stream waits on them, so prefill runs in large, fast chunks.
pub const CLI_PREFILL_CHUNK: usize = 512;

/// Largest accepted prefill chunk (activation buffers grow with it).
pub const MAX_PREFILL_CHUNK: usize = 4096;

/// Default prefill chunk: on 2 cores a 64-token chunk plus 16 decode rows is
/// a ~70 ms step, so a long prompt costs running streams at most that per
/// token instead of the ~300 ms of a 256-token chunk, for ~5% lower prefill
/// throughput (measured; see PERFORMANCE.md).
pub const DEFAULT_PREFILL_CHUNK: usize = 64;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_num_seqs: 16,
            max_queue: 64,
            max_model_len: None,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            compute_nice: 0,
            prefix_cache: false,
        }
    }
}

/// Loads the model, plans the cards and starts the engine.
pub fn start(args: &ModelArgs, limits: &Limits, log: &mut dyn FnMut(&str)) -> Result<Runtime> {
    let isa = cardinal_kernels::init_isa()?;
    let threads = args.threads()?;
    let spec = args.spec()?;
    let source = ModelSource::parse(&args.model)?;
    let opts = LoadOptions {
        seed: args.weight_seed,
        hf_bits: if args.hf_int8 {
            cardinal_models::hf::LoadBits::Int8
        } else {
            cardinal_models::hf::LoadBits::Int4
        },
        repack_for: Some(isa),
    };
    let loaded = cardinal_models::load(&source, &opts, log)?;
    let cfg = &loaded.model.cfg;
    let max_model_len = match limits.max_model_len {
        Some(0) => bail!("--max-model-len 0: must be at least 1"),
        Some(l) if l > cfg.ctx_len => bail!(
            "--max-model-len {l} exceeds the model's context length of {}",
            cfg.ctx_len
        ),
        Some(l) => l,
        None => cfg.ctx_len.min(8192),
    };
    if limits.max_num_seqs == 0 {
        bail!("--max-num-seqs 0: must be at least 1");
    }
    if !(1..=MAX_PREFILL_CHUNK).contains(&limits.prefill_chunk) {
        bail!(
            "--prefill-chunk {}: must be between 1 and {MAX_PREFILL_CHUNK}",
            limits.prefill_chunk
        );
    }
    // Plan for every running sequence at a typical context: a quarter of the
    // limit, so cards hold weights plus a realistic cache (admission enforces
    // the real per-request need at run time).
    let parts = plan::parts_of_model(&loaded.model);
    let plan_ctx = (max_model_len / 4).max(256).min(max_model_len);
    let plan =
        plan::plan(&parts, &spec, limits.max_num_seqs, plan_ctx, args.cards).or_else(|e| {
            if args.cards.is_none() {
                plan::plan(&parts, &spec, 1, 256.min(max_model_len), None)
            } else {
                Err(e)
            }
        })?;
    let loaded = Arc::new(loaded);
    let model = loaded.model.clone();
    let cards = Cards::new(model, &plan, &spec)?;
    let engine = Engine::start(
        cards,
        EngineConfig {
            max_num_seqs: limits.max_num_seqs,
            max_queue: limits.max_queue,
            max_model_len,
            prefill_chunk: limits.prefill_chunk,
            threads,
            isa,
            host_watts_per_core: 10.0,
            nice: limits.compute_nice,
            prefix_cache: limits.prefix_cache,
        },
    );
    Ok(Runtime {
        loaded,
        plan,
        engine: Arc::new(engine),
        isa,
        threads,
    })
}
