//! `cardinal plan`: places a model on cards and prints the per-card table
//! and the modeled totals (or one JSON object with stable field names).
//! Synthetic shapes are planned from their config alone, without building
//! weights; real models are loaded so the exact bytes are used.

use std::process::ExitCode;

use anyhow::Result;
use cardinal_models::{LoadOptions, ModelSource, synthetic};
use cardinal_pipeline::CardSpec;
use cardinal_pipeline::plan::{self, PlanError};

use super::generate::log_stderr;
use super::outln;

/// Flags of `plan`.
#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// Model to plan (see `cardinal generate --help`).
    #[arg(long, default_value = "smollm2-135m-instruct")]
    pub model: String,
    /// Place onto exactly this many cards (default: the fewest that fit).
    #[arg(long)]
    pub cards: Option<usize>,
    /// Concurrent users whose KV cache must fit.
    #[arg(long, default_value_t = 1)]
    pub users: usize,
    /// Context length per user, tokens.
    #[arg(long, default_value_t = 2048)]
    pub ctx: usize,
    /// TOML file overriding card spec fields.
    #[arg(long)]
    pub card_spec: Option<std::path::PathBuf>,
    /// Card memory for weights and KV, MiB.
    #[arg(long)]
    pub card_memory_mib: Option<u64>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1u64 << 20) as f64)
}

/// Runs `plan`.
pub fn run(a: PlanArgs) -> Result<ExitCode> {
    let mut spec = match &a.card_spec {
        Some(p) => CardSpec::from_toml_file(p)?,
        None => CardSpec::default(),
    };
    if let Some(m) = a.card_memory_mib {
        spec.memory_bytes = m.saturating_mul(1 << 20);
    }
    spec.validate()?;
    let (parts, ctx_len) = match ModelSource::parse(&a.model)? {
        ModelSource::Synthetic(name) => {
            let cfg = synthetic::config(&name)?;
            (plan::parts_of_config(&cfg), cfg.ctx_len)
        }
        source => {
            let m = cardinal_models::load(&source, &LoadOptions::default(), &mut log_stderr)?.model;
            (plan::parts_of_model(&m), m.cfg.ctx_len)
        }
    };
    anyhow::ensure!(
        a.ctx <= ctx_len,
        "--ctx {} is longer than {}'s context length of {ctx_len} tokens",
        a.ctx,
        a.model
    );
    let p = match plan::plan(&parts, &spec, a.users, a.ctx, a.cards) {
        Ok(p) => p,
        Err(e @ PlanError::TooFewCards { .. }) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(2));
        }
        Err(e) => return Err(e.into()),
    };
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&p)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "{} on {} cards ({} server{}), {} users x {} tokens, micro-batch {}",
        a.model,
        p.cards,
        p.servers,
        if p.servers == 1 { "" } else { "s" },
        p.users,
        p.ctx,
        p.micro_batch
    )?;
    outln!(
        "{:>5}  {:<28} {:>10} {:>10} {:>10} {:>12}",
        "card",
        "parts",
        "weights",
        "kv",
        "free",
        "stage"
    )?;
    outln!(
        "{:>5}  {:<28} {:>10} {:>10} {:>10} {:>12}",
        "",
        "",
        "MiB",
        "MiB",
        "MiB",
        "us/pass"
    )?;
    for c in &p.per_card {
        let parts: Vec<String> = c.parts.iter().map(|k| k.to_string()).collect();
        let mut names = parts.join(",");
        if names.len() > 28 {
            names = format!("{}..{} ({})", parts[0], parts[parts.len() - 1], parts.len());
        }
        outln!(
            "{:>5}  {:<28} {:>10} {:>10} {:>10} {:>12.1}",
            c.card,
            names,
            mib(c.weight_bytes),
            mib(c.kv_bytes),
            mib(c.free_bytes),
            c.stage_seconds * 1e6
        )?;
    }
    outln!(
        "modeled inter-token latency per user: {:.3} ms",
        p.modeled_itl_seconds * 1e3
    )?;
    outln!(
        "modeled throughput at {} users: {:.0} tokens/s",
        p.users,
        p.modeled_tokens_per_second
    )?;
    outln!(
        "modeled card power: {:.1} W  ({:.1} W host, not included)",
        p.modeled_power_watts,
        p.modeled_host_watts
    )?;
    outln!(
        "modeled energy: {:.2} mJ/token (cards)",
        p.modeled_joules_per_token * 1e3
    )?;
    Ok(ExitCode::SUCCESS)
}
