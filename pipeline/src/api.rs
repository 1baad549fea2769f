//! The engine's text-free API: a [`Request`] of token ids and sampling
//! parameters goes in, and a bounded [`Stream`] of [`Event`]s (sampled
//! tokens, then the sequence's [`Finished`] figures or an error) comes out;
//! dropping the stream cancels the sequence. [`SubmitError`] says why a
//! request was refused.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::mpsc;

use crate::sampling::{Sampled, SamplingParams};

/// A generation request, in token ids.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    /// EOS is ignored until this many tokens were generated.
    pub min_tokens: usize,
    pub ignore_eos: bool,
    /// Token ids that end generation (the model's EOS ids).
    pub stop_ids: Vec<u32>,
    pub params: SamplingParams,
    /// Number of alternatives to report per token (0 = none).
    pub top_logprobs: usize,
}

/// Why a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    /// "stop" or "length".
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Figures of a finished sequence.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Finished {
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache (not computed).
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub queue_seconds: f64,
    pub ttft_seconds: f64,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// Modeled card energy attributed to this sequence (its share of each step).
    pub card_joules: f64,
    /// Host energy attributed to this sequence.
    pub host_joules: f64,
}

/// One event on a sequence's stream.
#[derive(Clone, Debug)]
pub enum Event {
    Token(Sampled),
    Done(Finished),
    Error(String),
}

/// Why a submission was refused.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full ({0} requests waiting)")]
    QueueFull(usize),
    #[error("{0}")]
    Invalid(String),
    #[error(
        "the prompt has {prompt} tokens and max_tokens is {max_tokens}: together they exceed the context limit of {limit} tokens"
    )]
    TooLong {
        prompt: usize,
        max_tokens: usize,
        limit: usize,
    },
    #[error(
        "the request needs {need} bytes of KV cache on {card}, more than it has in total ({limit}); lower max_tokens or use more cards"
    )]
    NeverFits {
        need: usize,
        card: String,
        limit: usize,
    },
    #[error("the engine is not running: {0}")]
    Stopped(String),
}

/// A sequence's event stream. Dropping it cancels the sequence.
#[derive(Debug)]
pub struct Stream {
    pub(crate) rx: mpsc::Receiver<Event>,
    pub(crate) cancel: Arc<AtomicBool>,
    pub(crate) finish: Arc<AtomicBool>,
}

impl Stream {
    /// The next event (async).
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// The next event, blocking the thread (not for async contexts).
    pub fn blocking_recv(&mut self) -> Option<Event> {
        self.rx.blocking_recv()
    }

    /// Cancels the sequence without dropping the stream.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Release);
    }

    /// Ends the sequence before its next step with reason `stop`, as when the
    /// caller matched a stop string: unlike a cancel, the stream still gets
    /// [`Event::Done`] with the sequence's figures (tokens, energy). Tokens
    /// already in flight may arrive before it.
    pub fn finish(&self) {
        self.finish.store(true, Ordering::Release);
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Release);
    }
}
