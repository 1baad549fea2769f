//! Token sampling from logits: logit bias, repetition / presence / frequency
//! penalties, temperature, top-k, top-p and min-p, with a per-sequence
//! seeded generator so the same seed always gives the same tokens.
//! Temperature 0 is greedy (argmax, lowest id on ties).

use std::collections::HashMap;

/// Sampling parameters of one request (OpenAI / vLLM semantics).
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0.0 disables.
    pub min_p: f32,
    /// 1.0 disables; >1 discourages tokens already in prompt or output.
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Added to the logit of each token id.
    pub logit_bias: Vec<(u32, f32)>,
    /// None: seeded from the clock.
    pub seed: Option<u64>,
    /// Compute the chosen token's log-probability even without alternatives
    /// (a log-sum-exp over the vocabulary per token, so off by default).
    pub logprobs: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
            logprobs: false,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }

    /// Checks ranges; the message names the parameter and its limit.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=100.0).contains(&self.temperature) || self.temperature.is_nan() {
            return Err(format!(
                "temperature {} must be between 0 and 100",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p {} must be in (0, 1]", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p {} must be in [0, 1]", self.min_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty <= 10.0) {
            return Err(format!(
                "repetition_penalty {} must be in (0, 10]",
                self.repetition_penalty
            ));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(format!("{name} {v} must be between -2 and 2"));
            }
        }
        Ok(())
    }
}

/// The choice made at one position.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    pub id: u32,
    /// Log-probability of `id` under the model's distribution (after bias
    /// and penalties, before temperature and truncation, as vLLM reports);
    /// NaN unless log-probs were asked for.
    pub logprob: f32,
    /// The most likely alternatives, when asked for.
    pub top: Vec<(u32, f32)>,
}

/// Per-sequence sampler state.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: u64,
    counts: HashMap<u32, u32>,
    seen_prompt: Vec<u32>,
}

impl Sampler {
    /// A sampler for a sequence whose prompt is `prompt`.
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let seed = params.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x5eed)
        });
        let mut seen_prompt = if params.repetition_penalty != 1.0 {
            prompt.to_vec()
        } else {
            Vec::new()
        };
        seen_prompt.sort_unstable();
        seen_prompt.dedup();
        Sampler {
            params,
            rng: seed ^ 0x9E37_79B9_7F4A_7C15,
            counts: HashMap::new(),
            seen_prompt,
        }
    }

    fn next_f32(&mut self) -> f32 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Records a generated token (for penalties).
    pub fn observe(&mut self, id: u32) {
        *self.counts.entry(id).or_insert(0) += 1;
    }

    /// Picks the next token from `logits` (modified in place).
    /// `top_n` alternatives are returned with their log-probabilities.
    pub fn sample(&mut self, logits: &mut [f32], top_n: usize) -> Sampled {
        let p = &self.params;
        for &(id, b) in &p.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += b;
            }
        }
        if p.repetition_penalty != 1.0 {
            let rp = p.repetition_penalty;
            let penalize = |l: &mut f32| *l = if *l > 0.0 { *l / rp } else { *l * rp };
            for &id in &self.seen_prompt {
                if let Some(l) = logits.get_mut(id as usize) {
                    penalize(l);
                }
            }
            for &id in self.counts.keys() {
                if self.seen_prompt.binary_search(&id).is_err()
                    && let Some(l) = logits.get_mut(id as usize)
                {
                    penalize(l);
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&id, &c) in &self.counts {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * c as f32;
                }
            }
        }
        // Greedy needs one pass (the argmax, whose logit is the max); the
        // max is a second pass over the vocabulary only when used.
        let greedy = p.temperature == 0.0 || p.top_k == 1;
        let best = greedy.then(|| argmax(logits));
        let max = match best {
            Some(i) if !logits[i].is_nan() => logits[i],
            _ => logits.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        };
        // Log-softmax normaliser of the processed logits: an f64 exp per
        // vocabulary entry (~0.5 ms for 49k), so only when log-probs are asked.
        let lse = if p.logprobs || top_n > 0 {
            max + logits
                .iter()
                .map(|&l| ((l - max) as f64).exp())
                .sum::<f64>()
                .ln() as f32
        } else {
            f32::NAN
        };
        let top = if top_n > 0 {
            top_indices(logits, top_n)
                .into_iter()
                .map(|i| (i as u32, logits[i] - lse))
                .collect()
        } else {
            Vec::new()
        };
        let id = match best {
            Some(i) => i,
            None => self.draw(logits, max),
        };
        Sampled {
            id: id as u32,
            logprob: logits[id] - lse,
            top,
        }
    }

    /// Draw a token with temperature, top-k, min-p and top-p applied.
    ///
    /// No step sorts the whole vocabulary: candidates are first cut to those
    /// within 30 nats (at this temperature) of the best, which carry all but
    /// 1e-13 of the mass; top-k is a selection; min-p a filter; and top-p sorts
    /// only a growing prefix (64, 256, ... candidates) until it holds the
    /// requested mass. The draw walks the candidates in a deterministic order,
    /// so a seed always gives the same token.
    fn draw(&mut self, logits: &[f32], max: f32) -> usize {
        let p = &self.params;
        let t = p.temperature;
        let (top_k, min_p, top_p) = (p.top_k, p.min_p, p.top_p);
        let floor = max - 30.0 * t;
        let inv_t = 1.0 / t;
        // (token, weight exp((logit - max) / t)); the best token has weight 1.
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|&(_, &l)| l >= floor)
            .map(|(i, &l)| (i as u32, ((l - max) * inv_t).exp()))
            .collect();
        // Larger weight first; ties: lower id first.
        let cmp = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if top_k > 0 && top_k < cand.len() {
            cand.select_nth_unstable_by(top_k - 1, cmp);
            cand.truncate(top_k);
        }
        let total: f64 = cand.iter().map(|c| c.1 as f64).sum();
        if min_p > 0.0 {
            cand.retain(|c| c.1 >= min_p);
        }
        if top_p < 1.0 {
            let need = top_p as f64 * total;
            let mut n = 64;
            loop {
                let len = cand.len();
                let m = n.min(len);
                if m < len {
                    cand.select_nth_unstable_by(m - 1, cmp);
                }
                cand[..m].sort_by(cmp);
                let mut acc = 0.0;
                let hit = cand[..m].iter().position(|c| {
                    acc += c.1 as f64;
                    acc >= need
                });
                if let Some(j) = hit {
                    cand.truncate(j + 1);
                    break;
                }
                if m == len {
                    break;
                }
                n *= 4;
            }
        }
        let kept: f64 = cand.iter().map(|c| c.1 as f64).sum();
        let mut r = self.next_f32() as f64 * kept;
        for c in &cand {
            r -= c.1 as f64;
            if r <= 0.0 {
                return c.0 as usize;
            }
        }
        cand.last().expect("at least one candidate").0 as usize
    }
}

/// Index of the largest value (the lowest index on ties).
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// Indices of the `k` largest values, largest first (ties: lower index first).
pub fn top_indices(x: &[f32], k: usize) -> Vec<usize> {
    let k = k.min(x.len());
    let mut idx: Vec<usize> = (0..x.len()).collect();
    let cmp = |a: &usize, b: &usize| x[*b].total_cmp(&x[*a]).then(a.cmp(b));
    if k < idx.len() {
        idx.select_nth_unstable_by(k, cmp);
        idx.truncate(k);
    }
    idx.sort_by(cmp);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_argmax_and_reports_logprob() {
        let mut s = Sampler::new(SamplingParams::greedy(), &[]);
        let mut l = vec![0.0, 2.0, 1.0];
        let r = s.sample(&mut l, 2);
        assert_eq!(r.id, 1);
        assert_eq!(r.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        let z: f32 = [0.0f32, 2.0, 1.0].iter().map(|v| v.exp()).sum();
        assert!((r.logprob - (2.0 - z.ln())).abs() < 1e-5);
    }

    #[test]
    fn same_seed_same_tokens_and_penalties_apply() {
        let params = SamplingParams {
            temperature: 1.0,
            seed: Some(7),
            top_k: 40,
            top_p: 0.9,
            ..Default::default()
        };
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let run = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone(), &[]);
            (0..20)
                .map(|_| {
                    let id = s.sample(&mut logits.clone(), 0).id;
                    s.observe(id);
                    id
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(&params), run(&params));
        let other = SamplingParams {
            seed: Some(8),
            ..params.clone()
        };
        assert_ne!(run(&params), run(&other));
        // A large logit bias forces a token.
        let forced = SamplingParams {
            logit_bias: vec![(3, 100.0)],
            ..params
        };
        assert!(run(&forced).iter().all(|&t| t == 3));
        // Frequency penalty moves greedy off a repeated token.
        let mut s = Sampler::new(
            SamplingParams {
                frequency_penalty: 2.0,
                ..SamplingParams::greedy()
            },
            &[],
        );
        let mut l = vec![1.0, 0.5];
        assert_eq!(s.sample(&mut l.clone(), 0).id, 0);
        s.observe(0);
        assert_eq!(s.sample(&mut l, 0).id, 1);
    }

    /// Empirical token frequencies over `n` draws.
    fn freqs(params: SamplingParams, logits: &[f32], n: usize) -> Vec<f64> {
        let mut s = Sampler::new(params, &[]);
        let mut c = vec![0usize; logits.len()];
        for _ in 0..n {
            c[s.sample(&mut logits.to_vec(), 0).id as usize] += 1;
        }
        c.iter().map(|&x| x as f64 / n as f64).collect()
    }

    #[test]
    fn draws_follow_the_filtered_distribution() {
        // 1000 tokens, so top-p must grow its sorted prefix past 64 and 256.
        let logits: Vec<f32> = (0..1000).map(|i| -(i as f32) * 0.003).collect();
        let w: Vec<f64> = logits.iter().map(|&l| (l as f64).exp()).collect();
        let total: f64 = w.iter().sum();
        let base = SamplingParams {
            temperature: 1.0,
            seed: Some(3),
            ..Default::default()
        };
        let n = 60_000;
        // Plain temperature sampling: frequencies match softmax.
        let f = freqs(base.clone(), &logits, n);
        for (i, &x) in f.iter().enumerate().step_by(97) {
            let want = w[i] / total;
            assert!(
                (x - want).abs() < 5.0 * (want / n as f64).sqrt() + 1e-4,
                "token {i}: {x} vs {want}"
            );
        }
        // top-p 0.9: exactly the smallest prefix (by logit) holding 90% of the mass.
        let mut acc = 0.0;
        let keep = w.iter().position(|&x| {
            acc += x;
            acc >= 0.9 * total
        });
        let keep = keep.unwrap() + 1;
        assert!(keep > 256, "the case exercises prefix growth");
        let f = freqs(
            SamplingParams {
                top_p: 0.9,
                ..base.clone()
            },
            &logits,
            n,
        );
        assert!(
            f[keep..].iter().all(|&x| x == 0.0),
            "nothing past the nucleus"
        );
        assert!(
            f[keep - 5..keep].iter().any(|&x| x > 0.0),
            "the nucleus edge is drawn"
        );
        // top-k 7: only the 7 best.
        let f = freqs(
            SamplingParams {
                top_k: 7,
                ..base.clone()
            },
            &logits,
            5_000,
        );
        assert!(f[7..].iter().all(|&x| x == 0.0));
        assert!(f[..7].iter().all(|&x| x > 0.0));
        // min-p 0.5: weights >= half of the best, i.e. logits >= -ln 2.
        let f = freqs(SamplingParams { min_p: 0.5, ..base }, &logits, 20_000);
        let cut = logits.iter().position(|&l| (l as f64).exp() < 0.5).unwrap();
        assert!(f[cut..].iter().all(|&x| x == 0.0));
        assert!(f[cut - 1] > 0.0);
    }

    #[test]
    fn validation_names_the_parameter() {
        let p = SamplingParams {
            top_p: 1.5,
            ..Default::default()
        };
        assert!(p.validate().unwrap_err().contains("top_p"));
        let p = SamplingParams {
            temperature: -1.0,
            ..Default::default()
        };
        assert!(p.validate().unwrap_err().contains("temperature"));
    }
}
