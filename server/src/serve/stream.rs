//! Turning engine token streams into text: this module owns incremental
//! detokenization, stop strings and the per-request [`Driver`] that merges
//! the `n` sequences of one request into a series of [`Update`]s (text
//! deltas, finishes, errors), records the per-token metrics and computes the
//! usage. Stop strings never leak: text that could be the start of a stop
//! string is held back until it is known not to be one, and a match ends the
//! sequence: the engine is asked to finish it before its next step, and the
//! driver waits for its figures (energy, queue time) before the usage is
//! final.
//!
//! Dropping a `Driver` drops its engine streams, so a client that goes away
//! cancels its sequences; the drop is counted as a cancellation unless the
//! request finished or was ended by the server.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use cardinal_models::tokenizer::{IncrementalDecoder, Tokenizer};
use cardinal_pipeline::engine::Finished;
use cardinal_pipeline::{Event, FinishReason, Stream};
use serde_json::Value;

use super::errors::ApiError;
use super::metrics::Metrics;

/// Holds back text that could be the start of a stop string.
#[derive(Debug, Default)]
pub struct StopBuffer {
    stops: Vec<String>,
    held: String,
    /// Whether a matched stop string is part of the output (vLLM's
    /// `include_stop_str_in_output`).
    include: bool,
}

impl StopBuffer {
    /// A buffer for these (non-empty) stop strings.
    pub fn new(stops: Vec<String>) -> Self {
        StopBuffer {
            stops,
            held: String::new(),
            include: false,
        }
    }

    /// The same, keeping a matched stop string in the output.
    pub fn including(mut self, include: bool) -> Self {
        self.include = include;
        self
    }

    /// Adds `piece`; returns the text now safe to emit and, on a match, the
    /// index of the stop string (the text from the match on is dropped, or
    /// from its end on when the stop string is included).
    pub fn push(&mut self, piece: &str) -> (String, Option<usize>) {
        if self.stops.is_empty() {
            return (piece.to_string(), None);
        }
        self.held.push_str(piece);
        let hit = self
            .stops
            .iter()
            .enumerate()
            .filter_map(|(i, s)| self.held.find(s.as_str()).map(|p| (p, i)))
            .min();
        if let Some((p, i)) = hit {
            let end = if self.include {
                p + self.stops[i].len()
            } else {
                p
            };
            let out = self.held[..end].to_string();
            self.held.clear();
            return (out, Some(i));
        }
        let cut = self.held.len() - self.partial_suffix();
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, None)
    }

    /// Length of the longest suffix of the held text that is a proper
    /// prefix of a stop string.
    fn partial_suffix(&self) -> usize {
        let mut best = 0;
        for s in &self.stops {
            for (l, _) in s.char_indices().skip(1) {
                if l > self.held.len() {
                    break;
                }
                if l > best && self.held.ends_with(&s[..l]) {
                    best = l;
                }
            }
        }
        best
    }

    /// The held text, at the end of a sequence (no stop string matched).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// The stop string with index `i`.
    pub fn stop(&self, i: usize) -> &str {
        &self.stops[i]
    }
}

/// One sampled token with its log-probabilities.
#[derive(Clone, Debug)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Why a choice ended.
#[derive(Clone, Debug)]
pub struct FinishInfo {
    /// "stop" or "length".
    pub reason: &'static str,
    /// vLLM's `stop_reason`: the matched stop string or stop token id, else null.
    pub stop_reason: Value,
}

/// What happened next in a request.
#[derive(Debug)]
pub enum Update {
    /// New text (possibly empty when only logprobs are new) for choice `index`.
    Delta {
        index: usize,
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    /// Choice `index` finished; see [`Choice::finish`].
    Finish { index: usize },
    /// The engine failed; the request is over.
    Error(ApiError),
}

/// One engine sequence of a request.
#[derive(Debug)]
pub struct SeqSpec {
    /// Which prompt of the request it continues.
    pub prompt_index: usize,
    pub prompt_tokens: usize,
    pub stream: Stream,
}

/// The state of one choice.
#[derive(Debug)]
pub struct Choice {
    pub index: usize,
    pub prompt_index: usize,
    pub prompt_tokens: usize,
    stream: Option<Stream>,
    decoder: Option<IncrementalDecoder>,
    stops: StopBuffer,
    /// Tokens generated (including any that completed a stop string).
    pub tokens: usize,
    /// The whole text, when the driver keeps it (non-streaming replies).
    pub text: String,
    /// Every token's logprobs, when the driver keeps them.
    pub logprobs: Vec<TokenLogprob>,
    pending_lps: Vec<TokenLogprob>,
    first_at: Option<Instant>,
    last_at: Option<Instant>,
    last_id: Option<u32>,
    pub finish: Option<FinishInfo>,
    pub stats: Option<Finished>,
    /// Finished by a stop string; the engine's figures are still to come.
    awaiting_stats: bool,
}

/// Request-wide settings of a driver.
#[derive(Debug)]
pub struct DriverConfig {
    pub tokenizer: Option<Tokenizer>,
    pub skip_special_tokens: bool,
    pub stop: Vec<String>,
    /// Keep a matched stop string in the text.
    pub include_stop_str: bool,
    pub stop_token_ids: Vec<u32>,
    /// Whether to report logprobs.
    pub logprobs: bool,
    /// Keep the whole text and logprobs in each [`Choice`].
    pub keep: bool,
    /// HTTP arrival, for time to first token.
    pub arrival: Instant,
}

/// Usage figures of a request.
#[derive(Clone, Debug, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub card_joules: Option<f64>,
    pub host_joules: Option<f64>,
    pub time_to_first_token_seconds: Option<f64>,
    pub decode_tokens_per_second: Option<f64>,
    pub queue_seconds: Option<f64>,
}

/// Merges the sequences of one request into [`Update`]s.
#[derive(Debug)]
pub struct Driver {
    choices: Vec<Choice>,
    cfg: DriverConfig,
    metrics: Arc<Metrics>,
    pending: VecDeque<Update>,
    next_poll: usize,
    open: usize,
    ended: bool,
}

impl Driver {
    /// A driver over `seqs`; choice `i` is `seqs[i]`.
    pub fn new(seqs: Vec<SeqSpec>, cfg: DriverConfig, metrics: Arc<Metrics>) -> Self {
        let choices: Vec<Choice> = seqs
            .into_iter()
            .enumerate()
            .map(|(index, s)| Choice {
                index,
                prompt_index: s.prompt_index,
                prompt_tokens: s.prompt_tokens,
                stream: Some(s.stream),
                decoder: cfg
                    .tokenizer
                    .as_ref()
                    .map(|t| IncrementalDecoder::new(t, cfg.skip_special_tokens)),
                stops: StopBuffer::new(cfg.stop.clone()).including(cfg.include_stop_str),
                tokens: 0,
                text: String::new(),
                logprobs: Vec::new(),
                pending_lps: Vec::new(),
                first_at: None,
                last_at: None,
                last_id: None,
                finish: None,
                stats: None,
                awaiting_stats: false,
            })
            .collect();
        let open = choices.len();
        Driver {
            choices,
            cfg,
            metrics,
            pending: VecDeque::new(),
            next_poll: 0,
            open,
            ended: open == 0,
        }
    }

    /// The choices, in index order.
    pub fn choices(&self) -> &[Choice] {
        &self.choices
    }

    /// Ends the request on the server's initiative (timeout, shutdown):
    /// cancels the sequences without counting a client cancellation.
    pub fn abandon(&mut self) {
        self.ended = true;
        for c in &mut self.choices {
            c.stream = None;
        }
    }

    /// The next update, or None once every choice finished (or after an error).
    pub async fn next(&mut self) -> Option<Update> {
        loop {
            if let Some(u) = self.pending.pop_front() {
                return Some(u);
            }
            if self.ended || (self.open == 0 && !self.choices.iter().any(|c| c.awaiting_stats)) {
                return None;
            }
            let (i, ev) = self.recv_any().await;
            self.handle(i, ev);
        }
    }

    /// Waits for an event on any open choice, polling them in turn.
    fn recv_any(&mut self) -> impl Future<Output = (usize, Option<Event>)> + '_ {
        let start = self.next_poll;
        std::future::poll_fn(move |cx| {
            let n = self.choices.len();
            for k in 0..n {
                let i = (start + k) % n;
                let c = &mut self.choices[i];
                if c.finish.is_some() && !c.awaiting_stats {
                    continue;
                }
                if let Some(s) = c.stream.as_mut() {
                    // A fresh recv future per poll is fine: tokio's recv is
                    // cancel-safe and the waker stays registered on the channel.
                    let fut = std::pin::pin!(s.recv());
                    if let Poll::Ready(ev) = fut.poll(cx) {
                        self.next_poll = (i + 1) % n;
                        return Poll::Ready((i, ev));
                    }
                }
            }
            Poll::Pending
        })
    }

    fn handle(&mut self, i: usize, ev: Option<Event>) {
        let c = &mut self.choices[i];
        if c.awaiting_stats {
            // Tokens past the stop string are not part of the answer; the
            // figures are, whether they come or the engine failed first.
            match ev {
                Some(Event::Token(_)) => return,
                Some(Event::Done(f)) => c.stats = Some(f),
                Some(Event::Error(_)) | None => {}
            }
            c.awaiting_stats = false;
            c.stream = None;
            return;
        }
        match ev {
            Some(Event::Token(t)) => self.on_token(
                i,
                TokenLogprob {
                    id: t.id,
                    logprob: t.logprob,
                    top: t.top,
                },
            ),
            Some(Event::Done(f)) => self.on_done(i, f),
            Some(Event::Error(m)) => {
                self.fail(ApiError::internal(format!("generation failed: {m}")))
            }
            None => self.fail(ApiError::internal(
                "the engine stopped before the sequence finished",
            )),
        }
    }

    fn fail(&mut self, e: ApiError) {
        self.abandon();
        self.pending.push_back(Update::Error(e));
    }

    fn on_token(&mut self, i: usize, lp: TokenLogprob) {
        let now = Instant::now();
        let c = &mut self.choices[i];
        match c.last_at {
            None => self
                .metrics
                .ttft
                .observe((now - self.cfg.arrival).as_secs_f64()),
            Some(t) => self.metrics.itl.observe((now - t).as_secs_f64()),
        }
        c.first_at.get_or_insert(now);
        c.last_at = Some(now);
        c.tokens += 1;
        c.last_id = Some(lp.id);
        let piece = match c.decoder.as_mut() {
            Some(d) => d.push(lp.id).unwrap_or_default(),
            None => format!("{} ", lp.id),
        };
        if self.cfg.logprobs {
            c.pending_lps.push(lp);
        }
        let (text, hit) = c.stops.push(&piece);
        if let Some(s) = hit {
            let stop = c.stops.stop(s).to_string();
            // The engine ends the sequence before its next step and still
            // reports its figures (energy), which `next` waits for.
            if let Some(st) = &c.stream {
                st.finish();
                c.awaiting_stats = true;
            }
            self.emit(i, text, true);
            self.finish(
                i,
                FinishInfo {
                    reason: "stop",
                    stop_reason: Value::String(stop),
                },
            );
        } else {
            self.emit(i, text, false);
        }
    }

    fn on_done(&mut self, i: usize, f: Finished) {
        let c = &mut self.choices[i];
        let tail = c
            .decoder
            .as_mut()
            .map(|d| d.finish().unwrap_or_default())
            .unwrap_or_default();
        let (mut text, hit) = c.stops.push(&tail);
        let info = match hit {
            Some(s) => FinishInfo {
                reason: "stop",
                stop_reason: Value::String(c.stops.stop(s).to_string()),
            },
            None => {
                text.push_str(&c.stops.flush());
                let stop_reason = match (f.reason, c.last_id) {
                    (FinishReason::Stop, Some(id)) if self.cfg.stop_token_ids.contains(&id) => {
                        Value::from(id)
                    }
                    _ => Value::Null,
                };
                FinishInfo {
                    reason: f.reason.as_str(),
                    stop_reason,
                }
            }
        };
        c.stream = None;
        c.stats = Some(f);
        self.emit(i, text, true);
        self.finish(i, info);
    }

    /// Queues a delta of `text` plus the pending logprobs (if any, or `force`).
    fn emit(&mut self, i: usize, text: String, force: bool) {
        let c = &mut self.choices[i];
        if text.is_empty() && (c.pending_lps.is_empty() || !force) {
            return;
        }
        let lps = std::mem::take(&mut c.pending_lps);
        if self.cfg.keep {
            c.text.push_str(&text);
            c.logprobs.extend(lps.iter().cloned());
        }
        self.pending.push_back(Update::Delta {
            index: i,
            text,
            logprobs: lps,
        });
    }

    fn finish(&mut self, i: usize, info: FinishInfo) {
        let c = &mut self.choices[i];
        let m = &self.metrics;
        m.requests.with_label_values(&[info.reason]).inc();
        m.generation_tokens.observe(c.tokens as f64);
        if let Some(s) = &c.stats {
            m.queue_time.observe(s.queue_seconds);
        }
        c.finish = Some(info);
        self.open -= 1;
        if self.open == 0 {
            m.e2e.observe(self.cfg.arrival.elapsed().as_secs_f64());
        }
        self.pending.push_back(Update::Finish { index: i });
    }

    /// Usage so far (final once [`Driver::complete`]).
    pub fn usage(&self) -> Usage {
        let mut u = Usage::default();
        let mut seen = Vec::new();
        let (mut card, mut host, mut queue) = (Some(0.0), Some(0.0), None::<f64>);
        let (mut first, mut last) = (None::<Instant>, None::<Instant>);
        let mut decode_tokens = 0usize;
        for c in &self.choices {
            if !seen.contains(&c.prompt_index) {
                seen.push(c.prompt_index);
                u.prompt_tokens += c.prompt_tokens;
                u.cached_tokens += c.stats.as_ref().map_or(0, |s| s.cached_tokens);
            }
            u.completion_tokens += c.tokens;
            decode_tokens += c.tokens.saturating_sub(1);
            match &c.stats {
                Some(s) => {
                    card = card.map(|j| j + s.card_joules);
                    host = host.map(|j| j + s.host_joules);
                    queue = Some(queue.map_or(s.queue_seconds, |q| q.max(s.queue_seconds)));
                }
                None => (card, host) = (None, None),
            }
            if let Some(f) = c.first_at {
                first = Some(first.map_or(f, |x| x.min(f)));
            }
            if let Some(l) = c.last_at {
                last = Some(last.map_or(l, |x| x.max(l)));
            }
        }
        u.card_joules = card;
        u.host_joules = host;
        u.queue_seconds = queue;
        u.time_to_first_token_seconds = first.map(|f| (f - self.cfg.arrival).as_secs_f64());
        if let (Some(f), Some(l)) = (first, last) {
            let span = (l - f).as_secs_f64();
            if span > 0.0 && decode_tokens > 0 {
                u.decode_tokens_per_second = Some(decode_tokens as f64 / span);
            }
        }
        u
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if self.open > 0 && !self.ended {
            self.metrics.cancelled.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, Option<String>) {
        let mut b = StopBuffer::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (t, hit) = b.push(p);
            out.push_str(&t);
            if let Some(i) = hit {
                return (out, Some(b.stop(i).to_string()));
            }
        }
        out.push_str(&b.flush());
        (out, None)
    }

    #[test]
    fn stop_across_pieces_never_leaks() {
        assert_eq!(
            run(&["END"], &["hello E", "N", "D more"]),
            ("hello ".into(), Some("END".into()))
        );
        assert_eq!(
            run(&["END"], &["hello EN", "x"]),
            ("hello ENx".into(), None)
        );
        assert_eq!(
            run(&["\n\n"], &["a\n", "\nb"]),
            ("a".into(), Some("\n\n".into()))
        );
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), None));
    }

    #[test]
    fn earliest_stop_wins_and_multibyte_is_safe() {
        assert_eq!(
            run(&["c", "ab"], &["xabc"]),
            ("x".into(), Some("ab".into()))
        );
        assert_eq!(run(&["é!"], &["caf", "é", "?"]), ("café?".into(), None));
        assert_eq!(
            run(&["é!"], &["caf", "é", "!"]),
            ("caf".into(), Some("é!".into()))
        );
    }

    /// With `include_stop_str_in_output`, the match ends the text, across
    /// pieces too, and the earliest stop still wins.
    #[test]
    fn included_stop_string_ends_the_text() {
        let mut b = StopBuffer::new(vec!["STOP".into(), "OP!".into()]).including(true);
        assert_eq!(b.push("abcST").0, "abc");
        assert_eq!(b.push("OP! and more"), ("STOP".into(), Some(0)));
    }

    #[test]
    fn held_text_is_only_a_stop_prefix() {
        let mut b = StopBuffer::new(vec!["STOP".into()]);
        assert_eq!(b.push("abcST").0, "abc");
        assert_eq!(b.push("x").0, "STx");
    }
}
