//! A whole run: resolve the model, measure how the server tokenizes, probe
//! the length-forcing extensions, warm up, then for each level generate its
//! prompts, scrape `/metrics`, run the level, scrape again, and collect
//! everything into a [`Report`]. A stop request (Ctrl-C) or a dead server
//! ends the run early with a partial report rather than an error.

use crate::cli::Args;
use crate::client::Target;
use crate::progress::ProgressMode;
use crate::prom::server_side;
use crate::report::{LevelReport, Report, RunStatus, TargetInfo, WarmupInfo};
use crate::runner::{LevelKind, LevelPlan, StopReason, halted, run_level};
use crate::workload::{self, LengthModel, MAX_PROMPTS_PER_LEVEL, Prompt, PromptBody};
use anyhow::{Result, anyhow};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// The levels the flags describe.
pub fn plans(args: &Args) -> Vec<LevelPlan> {
    let base = |label: String, kind: LevelKind, i: usize| LevelPlan {
        label,
        kind,
        requests: args.requests,
        duration: Duration::from_secs_f64(args.duration),
        ramp_up: Duration::from_secs_f64(args.ramp_up),
        seed: args.seed.wrapping_add(i as u64 * 7919),
    };
    match &args.rate {
        Some(rates) => rates
            .iter()
            .enumerate()
            .map(|(i, &rate)| {
                let kind = LevelKind::Rate {
                    rate,
                    arrival: args.arrival,
                    max_concurrency: args.max_concurrency,
                };
                base(format!("rate={rate}/s"), kind, i)
            })
            .collect(),
        None => args
            .concurrency
            .iter()
            .enumerate()
            .map(|(i, &c)| base(format!("c={c}"), LevelKind::Concurrency(c), i))
            .collect(),
    }
}

enum Source {
    Synthetic(LengthModel),
    Dataset(Vec<PromptBody>),
}

async fn prompts_for(
    target: &Target,
    args: &Args,
    source: &Source,
    count: usize,
    stream: u64,
) -> Vec<Prompt> {
    let count = count.clamp(1, MAX_PROMPTS_PER_LEVEL);
    match source {
        Source::Synthetic(lm) => {
            let shape = workload::Synthetic {
                lengths: args.input_tokens,
                shared_prefix_tokens: args.shared_prefix_tokens,
            };
            workload::synthetic(target, *lm, shape, count, args.seed, stream).await
        }
        Source::Dataset(rows) => workload::from_dataset(rows, count, args.seed, stream),
    }
}

fn is_stopped(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow()
}

/// Runs the load test described by `args`. Returns `Err` only when the run
/// cannot start (bad flags, unreadable dataset, no model to use).
pub async fn run(args: Args, stop: watch::Receiver<bool>, mode: ProgressMode) -> Result<Report> {
    args.validate().map_err(|e| anyhow!(e))?;
    let timeout = Duration::from_secs_f64(args.timeout);
    let mut target = Target::new(
        args.base_url(),
        args.metrics_url.clone(),
        args.api_key.clone(),
        timeout,
        !args.no_keep_alive,
    )?;
    target.model = match &args.model {
        Some(m) => m.clone(),
        None => target.first_model().await?,
    };
    target.endpoint = args.endpoint;
    target.stream = !args.no_stream;
    target.max_tokens = (args.output_tokens > 0).then_some(args.output_tokens);
    target.force_length = !args.no_extensions && target.max_tokens.is_some();
    target.continuous_usage = !args.no_extensions && target.stream;
    target.temperature = args.temperature;
    let mut notes = Vec::new();
    let source = match &args.dataset {
        Some(path) => Source::Dataset(workload::load_dataset(path)?),
        None => {
            let lm = if target.detect_tokenize().await {
                workload::calibrate(&target, args.seed).await
            } else {
                workload::LengthModel::ESTIMATE
            };
            if !lm.measured {
                notes.push("the server has no working POST /tokenize: synthetic prompt lengths are approximated at one token per word".to_string());
            } else if args.requests > workload::MAX_TOKENIZED_PER_LEVEL {
                notes.push(format!(
                    "prompt lengths were checked with /tokenize for the first {} prompts of each level; later ones use the fitted line of {:.3} tokens/word + {:.1}",
                    workload::MAX_TOKENIZED_PER_LEVEL, lm.tokens_per_word, lm.intercept
                ));
            }
            Source::Synthetic(lm)
        }
    };
    if args.no_extensions && target.max_tokens.is_some() {
        notes.push("--no-extensions: output length not forced (max_tokens only)".to_string());
    }
    if !args.no_extensions && !is_stopped(&stop) {
        let mut stop_rx = stop.clone();
        tokio::select! {
            probe = target.probe_extensions() => {
                target.apply_probe(&probe);
                notes.extend(probe.notes);
            }
            _ = halted(&mut stop_rx) => {}
        }
    }
    let requested_output = target.force_length.then_some(args.output_tokens);
    let slo = args.slo.unwrap_or_default();
    let info = TargetInfo {
        base_url: args.base_url(),
        model: target.model.clone(),
        endpoint: target.endpoint,
        stream: target.stream,
        max_tokens: target.max_tokens,
        temperature: target.temperature,
        length_forcing_sent: target.force_length,
        continuous_usage_requested: target.continuous_usage,
        tokenize_available: match &source {
            Source::Synthetic(lm) => Some(lm.measured),
            Source::Dataset(_) => None,
        },
        tokens_per_word: match &source {
            Source::Synthetic(lm) => Some(lm.tokens_per_word),
            Source::Dataset(_) => None,
        },
    };
    let target = Arc::new(target);
    let plans = plans(&args);
    let mut status = RunStatus::Complete;
    let mut warmup = None;

    if args.warmup > 0 && !is_stopped(&stop) {
        let conc = match plans[0].kind {
            LevelKind::Concurrency(c) => c,
            LevelKind::Rate {
                max_concurrency, ..
            } => max_concurrency,
        }
        .min(args.warmup);
        let plan = LevelPlan {
            label: "warmup".into(),
            kind: LevelKind::Concurrency(conc),
            requests: args.warmup,
            duration: Duration::from_secs_f64(args.duration),
            ramp_up: Duration::ZERO,
            seed: args.seed,
        };
        let prompts = Arc::new(prompts_for(&target, &args, &source, args.warmup, 0xFFFF).await);
        let mut bar = mode.level("warmup", args.warmup as u64);
        let run = run_level(
            target.clone(),
            prompts,
            &plan,
            &stop,
            &slo,
            None,
            args.max_consecutive_errors,
            &mut bar,
        )
        .await;
        warmup = Some(WarmupInfo {
            requests: run.accum.ok() + run.accum.errors(),
            errors: run.accum.errors(),
        });
        match run.stop_reason {
            StopReason::Interrupted => status = RunStatus::Interrupted,
            StopReason::ConsecutiveErrors => {
                status = RunStatus::Aborted;
                notes.push(
                    "warmup stopped after too many consecutive errors; no level was run".into(),
                );
            }
            _ => {}
        }
    }

    let mut levels = Vec::new();
    for (i, plan) in plans.iter().enumerate() {
        if status != RunStatus::Complete || is_stopped(&stop) {
            if status == RunStatus::Complete {
                status = RunStatus::Interrupted;
            }
            break;
        }
        let prompts =
            Arc::new(prompts_for(&target, &args, &source, plan.requests, i as u64 + 1).await);
        let before = if args.no_metrics {
            None
        } else {
            target.scrape().await
        };
        let t0 = Instant::now();
        let mut bar = mode.level(&plan.label, plan.requests as u64);
        let run = run_level(
            target.clone(),
            prompts,
            plan,
            &stop,
            &slo,
            requested_output,
            args.max_consecutive_errors,
            &mut bar,
        )
        .await;
        let after = if args.no_metrics || before.is_none() {
            None
        } else {
            target.scrape().await
        };
        let interval = t0.elapsed().as_secs_f64();
        let mut server = server_side(before.as_ref(), after.as_ref(), interval);
        if args.no_metrics {
            server.notes = vec!["--no-metrics".into()];
        }
        let (concurrency, rate, arrival) = match plan.kind {
            LevelKind::Concurrency(c) => (Some(c), None, None),
            LevelKind::Rate { rate, arrival, .. } => (None, Some(rate), Some(arrival)),
        };
        levels.push(LevelReport {
            label: plan.label.clone(),
            concurrency,
            rate,
            arrival,
            dispatched: run.dispatched,
            cancelled: run.cancelled,
            stop_reason: run.stop_reason,
            stats: run.accum.finish(run.wall_s, &slo, requested_output),
            server,
        });
        match run.stop_reason {
            StopReason::Interrupted => status = RunStatus::Interrupted,
            StopReason::ConsecutiveErrors => {
                status = RunStatus::Aborted;
                notes.push(format!(
                    "level {} stopped after {} consecutive failed requests; later levels were not run",
                    plan.label, args.max_consecutive_errors
                ));
            }
            _ => {}
        }
    }
    Ok(Report {
        tool: "cardinal-loadtest",
        version: env!("CARGO_PKG_VERSION"),
        status,
        config: args,
        target: Some(info),
        notes,
        warmup,
        levels,
    })
}

/// The report of a run that could not start.
pub fn failed_report(args: Args, why: String) -> Report {
    Report {
        tool: "cardinal-loadtest",
        version: env!("CARGO_PKG_VERSION"),
        status: RunStatus::Failed,
        config: args,
        target: None,
        notes: vec![why],
        warmup: None,
        levels: Vec::new(),
    }
}
