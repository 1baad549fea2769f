//! Running one load level: fixed concurrency (N workers, each sending its
//! next request as soon as the previous one ends) or a request rate
//! (Poisson or constant arrivals, optionally capped in flight), with a
//! linear ramp-up, the `--requests`/`--duration` bounds, Ctrl-C and the
//! consecutive-error stop. Finished requests flow to the aggregator over a
//! bounded channel; nothing here can wait longer than the per-request
//! timeout once a stop is asked for.

use crate::cli::{Arrival, Slo};
use crate::client::Target;
use crate::progress::LevelBar;
use crate::record::RequestRecord;
use crate::rng::Rng;
use crate::stats::LevelAccum;
use crate::workload::Prompt;
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Capacity of the channel from request tasks to the aggregator.
const RESULTS_CHANNEL: usize = 256;

/// How load is offered in a level.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LevelKind {
    /// A fixed number of requests in flight.
    Concurrency(usize),
    /// Arrivals at a rate (requests/s).
    Rate {
        /// Requests per second.
        rate: f64,
        /// Arrival process.
        arrival: Arrival,
        /// In-flight cap; arrivals beyond it wait for a slot.
        max_concurrency: usize,
    },
}

/// One level of the sweep.
#[derive(Debug, Clone)]
pub struct LevelPlan {
    /// Shown in tables and plots ("c=4", "rate=2/s").
    pub label: String,
    /// Offered load.
    pub kind: LevelKind,
    /// Requests to send at most.
    pub requests: usize,
    /// No request starts after this.
    pub duration: Duration,
    /// Linear ramp-up time.
    pub ramp_up: Duration,
    /// Seed stream for arrivals.
    pub seed: u64,
}

/// Why a level ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// All `--requests` were sent.
    Requests,
    /// `--duration` elapsed.
    Duration,
    /// Ctrl-C (or the caller's stop signal).
    Interrupted,
    /// `--max-consecutive-errors` failures in a row.
    ConsecutiveErrors,
}

impl StopReason {
    /// The snake_case name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            StopReason::Requests => "requests",
            StopReason::Duration => "duration",
            StopReason::Interrupted => "interrupted",
            StopReason::ConsecutiveErrors => "consecutive_errors",
        }
    }
}

/// What a level produced.
#[derive(Debug)]
pub struct LevelRun {
    /// The accumulated statistics.
    pub accum: LevelAccum,
    /// First dispatch to last completion, seconds.
    pub wall_s: f64,
    /// Requests started.
    pub dispatched: usize,
    /// Requests abandoned because of a stop.
    pub cancelled: u64,
    /// Why the level ended.
    pub stop_reason: StopReason,
}

enum Outcome {
    Done(Box<RequestRecord>),
    Cancelled,
}

struct Shared {
    target: Arc<Target>,
    prompts: Arc<Vec<Prompt>>,
    next: AtomicUsize,
    requests: usize,
    start: Instant,
    deadline: Instant,
}

/// Resolves when the watch value becomes true (never, if its sender is gone
/// while false).
pub async fn halted(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Seconds after the level start at which the arrival with cumulative
/// unit-rate position `s` happens, for target `rate` reached by a linear
/// ramp over `ramp` seconds. The intensity rises as rate·t/ramp, so the
/// expected arrivals by time t are Λ(t) = rate·t²/(2·ramp) during the ramp
/// and rate·(t − ramp/2) after; this inverts Λ.
pub fn arrival_offset(s: f64, rate: f64, ramp: f64) -> f64 {
    if ramp <= 0.0 {
        return s / rate;
    }
    let during = rate * ramp / 2.0;
    if s < during {
        (2.0 * ramp * s / rate).sqrt()
    } else {
        ramp + (s - during) / rate
    }
}

async fn run_one(sh: &Shared, i: usize, halt: &mut watch::Receiver<bool>) -> Outcome {
    let prompt = &sh.prompts[i % sh.prompts.len()];
    let sent_at = sh.start.elapsed();
    tokio::select! {
        r = sh.target.send(prompt) => {
            let mut r = r;
            r.sent_at = sent_at;
            Outcome::Done(Box::new(r))
        }
        _ = halted(halt) => Outcome::Cancelled,
    }
}

async fn worker(
    sh: Arc<Shared>,
    delay: Duration,
    mut halt: watch::Receiver<bool>,
    tx: mpsc::Sender<Outcome>,
) {
    if !delay.is_zero() {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = halted(&mut halt) => return,
        }
    }
    loop {
        if *halt.borrow() || Instant::now() >= sh.deadline {
            return;
        }
        let i = sh.next.fetch_add(1, Ordering::SeqCst);
        if i >= sh.requests {
            sh.next.fetch_min(sh.requests, Ordering::SeqCst);
            return;
        }
        let outcome = run_one(&sh, i, &mut halt).await;
        if tx.send(outcome).await.is_err() {
            return;
        }
    }
}

async fn dispatcher(
    sh: Arc<Shared>,
    rate: f64,
    arrival: Arrival,
    max_concurrency: usize,
    ramp: f64,
    seed: u64,
    mut halt: watch::Receiver<bool>,
    tx: mpsc::Sender<Outcome>,
) {
    let slots = Arc::new(Semaphore::new(max_concurrency));
    let mut rng = Rng::derived(seed, 0xA771);
    let mut tasks = JoinSet::new();
    let mut s = 0.0;
    for i in 0..sh.requests {
        if i > 0 {
            s += match arrival {
                Arrival::Poisson => rng.exp1(),
                Arrival::Constant => 1.0,
            };
        }
        let at = sh.start + Duration::from_secs_f64(arrival_offset(s, rate, ramp));
        if at >= sh.deadline {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(at) => {}
            _ = halted(&mut halt) => break,
        }
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = halted(&mut halt) => break,
        };
        if Instant::now() >= sh.deadline {
            break;
        }
        sh.next.store(i + 1, Ordering::SeqCst);
        let (sh2, tx2, mut halt2) = (sh.clone(), tx.clone(), halt.clone());
        tasks.spawn(async move {
            let outcome = run_one(&sh2, i, &mut halt2).await;
            let _ = tx2.send(outcome).await;
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

/// Runs one level to its end and returns what was measured.
pub async fn run_level(
    target: Arc<Target>,
    prompts: Arc<Vec<Prompt>>,
    plan: &LevelPlan,
    stop: &watch::Receiver<bool>,
    slo: &Slo,
    requested_output: Option<u32>,
    max_consecutive_errors: usize,
    bar: &mut LevelBar,
) -> LevelRun {
    let start = Instant::now();
    let sh = Arc::new(Shared {
        target,
        prompts,
        next: AtomicUsize::new(0),
        requests: plan.requests,
        start,
        deadline: start + plan.duration,
    });
    let (halt_tx, halt_rx) = watch::channel(false);
    let (tx, mut rx) = mpsc::channel::<Outcome>(RESULTS_CHANNEL);
    let mut tasks = JoinSet::new();
    match plan.kind {
        LevelKind::Concurrency(n) => {
            for w in 0..n {
                let delay = plan.ramp_up.mul_f64(w as f64 / n as f64);
                tasks.spawn(worker(sh.clone(), delay, halt_rx.clone(), tx.clone()));
            }
        }
        LevelKind::Rate {
            rate,
            arrival,
            max_concurrency,
        } => {
            tasks.spawn(dispatcher(
                sh.clone(),
                rate,
                arrival,
                max_concurrency,
                plan.ramp_up.as_secs_f64(),
                plan.seed,
                halt_rx.clone(),
                tx.clone(),
            ));
        }
    }
    drop(tx);
    let mut accum = LevelAccum::default();
    let mut stop_rx = stop.clone();
    let mut reason: Option<StopReason> = None;
    let mut consecutive = 0usize;
    let mut cancelled = 0u64;
    let mut last_end = Duration::ZERO;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let tok_s =
        |acc: &LevelAccum| acc.output_tokens() as f64 / start.elapsed().as_secs_f64().max(1e-3);
    loop {
        tokio::select! {
            o = rx.recv() => match o {
                None => break,
                Some(Outcome::Cancelled) => cancelled += 1,
                Some(Outcome::Done(r)) => {
                    last_end = last_end.max(r.sent_at + r.e2e);
                    accum.add(&r, slo, requested_output);
                    if r.ok() {
                        consecutive = 0;
                    } else {
                        consecutive += 1;
                        if max_consecutive_errors > 0 && consecutive >= max_consecutive_errors && reason.is_none() {
                            reason = Some(StopReason::ConsecutiveErrors);
                            let _ = halt_tx.send(true);
                        }
                    }
                    bar.update(accum.ok() + accum.errors(), accum.errors(), tok_s(&accum));
                }
            },
            _ = halted(&mut stop_rx), if reason.is_none() => {
                reason = Some(StopReason::Interrupted);
                let _ = halt_tx.send(true);
            }
            _ = tick.tick() => bar.update(accum.ok() + accum.errors(), accum.errors(), tok_s(&accum)),
        }
    }
    while tasks.join_next().await.is_some() {}
    let dispatched = sh.next.load(Ordering::SeqCst).min(plan.requests);
    let wall = if last_end.is_zero() {
        start.elapsed()
    } else {
        last_end
    };
    bar.finish(
        accum.ok() + accum.errors(),
        accum.errors(),
        accum.output_tokens() as f64 / wall.as_secs_f64().max(1e-9),
    );
    let stop_reason = reason.unwrap_or(if dispatched >= plan.requests {
        StopReason::Requests
    } else {
        StopReason::Duration
    });
    LevelRun {
        accum,
        wall_s: wall.as_secs_f64(),
        dispatched,
        cancelled,
        stop_reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrivals_without_ramp_are_s_over_rate() {
        assert_eq!(arrival_offset(0.0, 4.0, 0.0), 0.0);
        assert_eq!(arrival_offset(2.0, 4.0, 0.0), 0.5);
    }

    #[test]
    fn ramp_inverts_the_integrated_rate() {
        let (rate, ramp) = (10.0, 4.0);
        // During the ramp Λ(t) = rate t² / (2 ramp); at t = ramp it is 20.
        assert!((arrival_offset(20.0, rate, ramp) - 4.0).abs() < 1e-12);
        assert!((arrival_offset(5.0, rate, ramp) - 2.0).abs() < 1e-12);
        // After the ramp arrivals come at the full rate.
        assert!((arrival_offset(30.0, rate, ramp) - 5.0).abs() < 1e-12);
        // Monotone.
        let mut prev = -1.0;
        for k in 0..100 {
            let t = arrival_offset(k as f64, rate, ramp);
            assert!(t > prev);
            prev = t;
        }
    }
}
