//! Evaluation over the cards without sampling: perplexity by llama.cpp's
//! method (non-overlapping windows from an empty cache, scoring the second
//! half of each window), used by `cardinal perplexity` and the tests.

use cardinal_kernels::{Isa, Pool};
use cardinal_models::forward::BatchRow;

use crate::stages::{Cards, StepScratch};

/// Perplexity figures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Perplexity {
    pub perplexity: f64,
    pub windows: usize,
    pub scored_tokens: usize,
}

/// Errors from evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{tokens} tokens is fewer than one window of {ctx}")]
    TooShort { tokens: usize, ctx: usize },
    #[error("window length {0}: must be at least 4")]
    BadCtx(usize),
    #[error(transparent)]
    Kv(#[from] cardinal_models::kv::KvExhausted),
}

/// `log(sum(exp(l)))` of one row of logits.
pub fn log_sum_exp(l: &[f32]) -> f64 {
    let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    max as f64
        + l.iter()
            .map(|&v| ((v - max) as f64).exp())
            .sum::<f64>()
            .ln()
}

/// Perplexity of `ids` in windows of `ctx` tokens (at most `max_windows`, 0 = all),
/// calling `progress(done, total, running_ppl)` after each window.
pub fn perplexity(
    cards: &Cards,
    pool: &Pool,
    isa: Isa,
    ids: &[u32],
    ctx: usize,
    max_windows: usize,
    progress: &mut dyn FnMut(usize, usize, f64),
) -> Result<Perplexity, EvalError> {
    if ctx < 4 {
        return Err(EvalError::BadCtx(ctx));
    }
    let mut windows = ids.len() / ctx;
    if windows == 0 {
        return Err(EvalError::TooShort {
            tokens: ids.len(),
            ctx,
        });
    }
    if max_windows > 0 {
        windows = windows.min(max_windows);
    }
    let vocab = cards.model().cfg.vocab;
    let first = ctx / 2;
    let mut scratch = StepScratch::default();
    let (mut nll, mut count) = (0.0f64, 0usize);
    for w in 0..windows {
        let toks = &ids[w * ctx..(w + 1) * ctx];
        let mut caches = cards.new_seq_caches();
        cards.reserve(&mut caches, ctx)?;
        let mut start = 0;
        while start < ctx {
            let end = (start + 256).min(ctx);
            let rows: Vec<BatchRow> = (start..end).map(|pos| BatchRow { seq: 0, pos }).collect();
            let logit_rows: Vec<usize> = (start..end)
                .filter(|&p| p >= first && p < ctx - 1)
                .map(|p| p - start)
                .collect();
            let mut cs = [&mut caches[..]];
            cards.run_step(
                pool,
                isa,
                &toks[start..end],
                &rows,
                &mut cs,
                &logit_rows,
                end - start,
                &mut scratch,
            );
            for (j, &r) in logit_rows.iter().enumerate() {
                let l = &scratch.logits[j * vocab..(j + 1) * vocab];
                nll += log_sum_exp(l) - l[toks[start + r + 1] as usize] as f64;
                count += 1;
            }
            start = end;
        }
        progress(w + 1, windows, (nll / count as f64).exp());
    }
    Ok(Perplexity {
        perplexity: (nll / count as f64).exp(),
        windows,
        scored_tokens: count,
    })
}
