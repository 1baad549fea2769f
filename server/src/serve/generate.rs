//! `POST /v1/chat/completions` and `POST /v1/completions`: this module owns
//! one generation request from body to reply. It parses and validates the
//! body, turns the prompt(s) into token ids (chat template, BOS), checks the
//! context, submits `n` sequences per prompt to the engine, and answers
//! either with one JSON object or with an SSE stream fed by a task through a
//! bounded channel. The stream ends on its own, on an engine error (one
//! error event), on `--request-timeout`, or at the end of a drain; a client
//! that disconnects closes the channel, which ends the task and cancels its
//! sequences.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use cardinal_pipeline::{Request as EngineRequest, SamplingParams};
use http_body::Frame;
use serde_json::Value;
use tokio::sync::mpsc;

use super::errors::ApiError;
use super::openai::{self, Bounds, Endpoint, GenRequest, Prompt};
use super::render::{self, ChunkUsage, Meta};
use super::routes::{Arrival, check_model, read_json, served};
use super::stream::{Driver, DriverConfig, SeqSpec, Update};
use super::{AppState, InflightGuard, ServeOptions, Served};

/// SSE events buffered between the generating task and the connection.
const SSE_BUFFER: usize = 32;

pub async fn chat(State(s): State<AppState>, req: Request) -> Response {
    handle(s, Endpoint::Chat, req)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

pub async fn completions(State(s): State<AppState>, req: Request) -> Response {
    handle(s, Endpoint::Completions, req)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn handle(s: AppState, endpoint: Endpoint, req: Request) -> Result<Response, ApiError> {
    let arrival = req
        .extensions()
        .get::<Arrival>()
        .map_or_else(Instant::now, |a| a.0);
    let sv = served(&s)?;
    // Shed load before doing any work (reading and parsing the body, the
    // chat template, the tokenizer on a blocking thread): with the queue
    // full now, or sure to be once the requests already preparing are
    // submitted, the submit below would refuse too, and under a flood the
    // 429 must come fast. (So a full server answers 429 even to a body that
    // would have been a 400.)
    let preparing = s
        .inner
        .admit(
            &sv.engine.stats,
            sv.engine.config.max_num_seqs,
            sv.engine.config.max_queue,
        )
        .map_err(ApiError::queue_full)?;
    let body = read_json(&s, req).await?;
    let g = openai::parse(
        endpoint,
        &body,
        Bounds {
            max_model_len: sv.max_model_len,
            vocab: sv.vocab,
        },
    )?;
    drop(body);
    let path = match endpoint {
        Endpoint::Chat => "/v1/chat/completions",
        Endpoint::Completions => "/v1/completions",
    };
    s.inner.warn_unknown(path, &g.unknown);
    check_model(&s, g.model.as_deref())?;
    if sv
        .engine
        .stats
        .failed
        .load(std::sync::atomic::Ordering::Acquire)
    {
        return Err(ApiError::unavailable(
            "engine_failed",
            "an engine step failed; the server must be restarted",
        ));
    }
    let prompts = prompt_ids(sv, &g).await?;
    // Preparing ends before the engine counts the request as waiting, so it
    // is never counted twice (see `Shared::admit`).
    drop(preparing);
    let seqs = submit(&s, sv, &g, &prompts)?;
    let inflight = s.inner.inflight_guard();
    let tok = sv.loaded.tokenizer.clone();
    let cfg = DriverConfig {
        tokenizer: tok.clone(),
        skip_special_tokens: g.skip_special_tokens,
        stop: g.stop.clone(),
        include_stop_str: g.include_stop_str,
        stop_token_ids: g.stop_token_ids.clone(),
        logprobs: g.logprobs.is_some(),
        keep: !g.stream,
        arrival,
    };
    let driver = Driver::new(seqs, cfg, s.inner.metrics.clone());
    let meta = Meta::new(
        endpoint,
        &s.inner.served_name,
        sv.engine.host_energy_source.label(),
    );
    let deadline = ServeOptions::secs(s.inner.opts.request_timeout).map(|t| arrival + t);
    let job = Job {
        s: s.clone(),
        g,
        meta,
        driver,
        tok,
        deadline,
        inflight: Some(inflight),
    };
    if job.g.stream {
        Ok(job.stream())
    } else {
        job.collect().await
    }
}

/// Token ids of every prompt of `g` (tokenizing on a blocking thread).
async fn prompt_ids(sv: &Served, g: &GenRequest) -> Result<Vec<Vec<u32>>, ApiError> {
    if let Prompt::Ids(ids) = &g.prompt {
        return Ok(ids.clone());
    }
    let loaded = sv.loaded.clone();
    let prompt = g.prompt.clone();
    let param = g.prompt_param();
    let work = move || -> Result<Vec<Vec<u32>>, ApiError> {
        let tok = loaded.tokenizer().map_err(|e| {
            ApiError::invalid(
                param,
                format!("{e}; send the prompt as token ids to /v1/completions"),
            )
        })?;
        let with_bos = |mut ids: Vec<u32>| {
            if let Some(bos) = tok.bos_id().filter(|_| tok.add_bos())
                && ids.first() != Some(&bos)
            {
                ids.insert(0, bos);
            }
            ids
        };
        match prompt {
            Prompt::Ids(ids) => Ok(ids),
            Prompt::Texts(texts) => texts
                .iter()
                .map(|t| {
                    tok.encode(t, true)
                        .map(with_bos)
                        .map_err(|e| ApiError::invalid(param, e.to_string()))
                })
                .collect(),
            Prompt::Chat(msgs) => {
                let text = loaded
                    .render_chat(&msgs)
                    .map_err(|e| ApiError::from_render(e, param))?;
                Ok(vec![with_bos(
                    tok.encode(&text, true)
                        .map_err(|e| ApiError::invalid(param, e.to_string()))?,
                )])
            }
        }
    };
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::internal(format!("tokenizing failed: {e}")))?
}

/// Checks the context and submits `n` sequences per prompt. On any refusal
/// the sequences already submitted are dropped, which cancels them.
fn submit(
    s: &AppState,
    sv: &Served,
    g: &GenRequest,
    prompts: &[Vec<u32>],
) -> Result<Vec<SeqSpec>, ApiError> {
    let limit = sv.max_model_len;
    let param = g.prompt_param();
    let mut stop_ids: Vec<u32> = sv
        .loaded
        .tokenizer
        .as_ref()
        .map(|t| t.eos_ids().to_vec())
        .unwrap_or_default();
    stop_ids.extend(&g.stop_token_ids);
    let mut plan = Vec::with_capacity(prompts.len());
    for p in prompts {
        if p.len() >= limit {
            return Err(ApiError::context(
                param,
                p.len(),
                g.max_tokens.unwrap_or(1),
                limit,
            ));
        }
        let room = limit - p.len();
        let max_tokens = match (g.max_tokens, g.endpoint) {
            (Some(m), _) => m,
            (None, Endpoint::Chat) => room,
            (None, Endpoint::Completions) => openai::COMPLETIONS_DEFAULT_MAX_TOKENS.min(room),
        };
        if max_tokens > room {
            return Err(ApiError::context(param, p.len(), max_tokens, limit));
        }
        plan.push(max_tokens);
    }
    let mut seqs = Vec::with_capacity(prompts.len() * g.n);
    for (pi, (p, &max_tokens)) in prompts.iter().zip(&plan).enumerate() {
        s.inner.metrics.prompt_tokens.observe(p.len() as f64);
        for j in 0..g.n {
            let params = SamplingParams {
                seed: g.params.seed.map(|seed| choice_seed(seed, j)),
                logprobs: g.logprobs.is_some(),
                ..g.params.clone()
            };
            let req = EngineRequest {
                prompt: p.clone(),
                max_tokens,
                min_tokens: g.min_tokens.min(max_tokens),
                ignore_eos: g.ignore_eos,
                stop_ids: stop_ids.clone(),
                params,
                top_logprobs: g.logprobs.unwrap_or(0),
            };
            let stream = sv
                .engine
                .submit(req)
                .map_err(|e| ApiError::from_submit(e, param))?;
            seqs.push(SeqSpec {
                prompt_index: pi,
                prompt_tokens: p.len(),
                stream,
            });
        }
    }
    Ok(seqs)
}

/// Choice `j`'s seed: the request's seed for the first, distinct ones after.
fn choice_seed(seed: u64, j: usize) -> u64 {
    seed.wrapping_add((j as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// One admitted request.
struct Job {
    s: AppState,
    g: GenRequest,
    meta: Meta,
    driver: Driver,
    tok: Option<cardinal_models::tokenizer::Tokenizer>,
    deadline: Option<Instant>,
    /// Held until the reply is complete: by the job for a JSON reply, by the
    /// body for a stream (so a drain waits until slow clients got it all).
    inflight: Option<InflightGuard>,
}

/// What ended the wait for the next update.
enum Next {
    Update(Option<Update>),
    Timeout,
    Abort,
}

impl Job {
    async fn next(&mut self, abort: &mut tokio::sync::watch::Receiver<bool>) -> Next {
        let deadline = self.deadline;
        let timeout = async move {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            u = self.driver.next() => Next::Update(u),
            _ = timeout => Next::Timeout,
            _ = abort.wait_for(|a| *a) => Next::Abort,
        }
    }

    fn timeout_error(&self) -> ApiError {
        ApiError::timeout(self.s.inner.opts.request_timeout)
    }

    /// Waits for the whole reply.
    async fn collect(mut self) -> Result<Response, ApiError> {
        let mut abort = self.s.inner.abort.subscribe();
        loop {
            match self.next(&mut abort).await {
                Next::Update(None) => break,
                Next::Update(Some(Update::Error(e))) => return Err(e),
                Next::Update(Some(_)) => {}
                Next::Timeout => {
                    self.driver.abandon();
                    return Err(self.timeout_error());
                }
                Next::Abort => {
                    self.driver.abandon();
                    return Err(ApiError::unavailable(
                        "draining",
                        "the server is shutting down",
                    ));
                }
            }
        }
        let usage = render::usage(&self.driver.usage(), self.meta.energy_source);
        let body = render::full(
            &self.meta,
            self.driver.choices(),
            usage,
            self.tok.as_ref(),
            self.g.logprobs.is_some(),
            self.g.skip_special_tokens,
        );
        Ok(axum::Json(body).into_response())
    }

    /// Starts the SSE task and returns the streaming response.
    fn stream(mut self) -> Response {
        let (tx, rx) = mpsc::channel(SSE_BUFFER);
        let inflight = self.inflight.take();
        tokio::spawn(self.pump(tx));
        let mut resp = Response::new(Body::new(SseBody {
            rx,
            _inflight: inflight,
        }));
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        h.insert("x-accel-buffering", HeaderValue::from_static("no"));
        resp
    }

    fn chunk_usage<'a>(&self, now: &'a mut Option<Value>) -> ChunkUsage<'a> {
        if !self.g.include_usage {
            return ChunkUsage::Absent;
        }
        if self.g.continuous_usage {
            let v = now.insert(render::usage(&self.driver.usage(), self.meta.energy_source));
            return ChunkUsage::Some(v);
        }
        ChunkUsage::Null
    }

    /// Feeds the SSE channel until the request ends or the client leaves.
    async fn pump(mut self, tx: mpsc::Sender<Bytes>) {
        let mut abort = self.s.inner.abort.subscribe();
        let mut u = None;
        if self.meta.endpoint == Endpoint::Chat {
            for i in 0..self.driver.choices().len() {
                let v = render::role_chunk(&self.meta, i, self.chunk_usage(&mut u));
                if tx.send(render::sse(&v)).await.is_err() {
                    return;
                }
            }
        }
        let mut offsets =
            vec![render::CharCursor::new(self.g.skip_special_tokens); self.driver.choices().len()];
        loop {
            let next = tokio::select! {
                biased;
                _ = tx.closed() => return, // The client left: dropping self cancels.
                n = self.next(&mut abort) => n,
            };
            let event = match next {
                Next::Update(None) => {
                    if self.g.include_usage {
                        let usage = render::usage(&self.driver.usage(), self.meta.energy_source);
                        let _ = tx
                            .send(render::sse(&render::usage_chunk(&self.meta, usage)))
                            .await;
                    }
                    break;
                }
                Next::Update(Some(Update::Delta {
                    index,
                    text,
                    logprobs,
                })) => {
                    let lp = match (self.g.logprobs.is_some(), self.meta.endpoint) {
                        (false, _) => Value::Null,
                        (true, Endpoint::Chat) => {
                            render::chat_logprobs(self.tok.as_ref(), &logprobs)
                        }
                        (true, Endpoint::Completions) => render::completion_logprobs(
                            self.tok.as_ref(),
                            &logprobs,
                            &mut offsets[index],
                        ),
                    };
                    render::delta_chunk(&self.meta, index, &text, lp, self.chunk_usage(&mut u))
                }
                Next::Update(Some(Update::Finish { index })) => render::finish_chunk(
                    &self.meta,
                    &self.driver.choices()[index],
                    self.chunk_usage(&mut u),
                ),
                Next::Update(Some(Update::Error(e))) => {
                    self.s
                        .inner
                        .metrics
                        .errors
                        .with_label_values(&[e.metric_type()])
                        .inc();
                    let _ = tx.send(render::sse(&e.body())).await;
                    break;
                }
                Next::Timeout => {
                    self.driver.abandon();
                    let e = self.timeout_error();
                    self.s
                        .inner
                        .metrics
                        .errors
                        .with_label_values(&[e.metric_type()])
                        .inc();
                    let _ = tx.send(render::sse(&e.body())).await;
                    break;
                }
                Next::Abort => {
                    self.driver.abandon();
                    let e = ApiError::unavailable("draining", "the server is shutting down");
                    let _ = tx.send(render::sse(&e.body())).await;
                    break;
                }
            };
            if tx.send(render::sse(&event)).await.is_err() {
                return;
            }
        }
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            tx.send(Bytes::from_static(render::DONE)),
        )
        .await;
    }
}

/// The response body of a stream: the receiving end of the SSE channel.
struct SseBody {
    rx: mpsc::Receiver<Bytes>,
    _inflight: Option<InflightGuard>,
}

impl http_body::Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_choice_keeps_the_seed() {
        assert_eq!(choice_seed(42, 0), 42);
        assert_ne!(choice_seed(42, 1), 42);
        assert_ne!(choice_seed(42, 1), choice_seed(42, 2));
    }
}
