//! The OpenAI-compatible API's limits and failure paths, driven through
//! the router without a socket on the tiny-granite fixture: every bad-input
//! case of the spec with its status and `param`, auth, metric names after
//! traffic, 429 with Retry-After, request timeouts, CORS and drain, the
//! loading state, aborts, and a model whose chat template is a memory bomb
//! (a 500 in the OpenAI shape, fast, while raw prompts keep being served).

mod http_support;

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use cardinal_models::template::{ChatTemplate, RENDER_TIMEOUT};
use cardinal_server::serve::{ApiKey, ServeOptions};
use http_support::*;
use serde_json::{Value, json};

fn user(text: &str) -> Value {
    json!([{ "role": "user", "content": text }])
}

#[tokio::test]
async fn bad_input_is_rejected_with_the_field_named() {
    let a = app();
    let chat = "/v1/chat/completions";
    let raw = |body: &'static [u8], ct: &str| {
        Request::post(chat)
            .header("content-type", ct)
            .body(Body::from(body))
            .unwrap()
    };
    let m = user("hi");
    // Malformed JSON, invalid UTF-8, wrong content type.
    call(&a.router, raw(b"{\"messages\": [", "application/json"))
        .await
        .assert_error(400, None);
    let r = call(
        &a.router,
        raw(
            b"{\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}",
            "application/json",
        ),
    )
    .await;
    assert!(
        r.assert_error(400, None)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("UTF-8")
    );
    call(&a.router, raw(b"{}", "text/plain"))
        .await
        .assert_error(415, None);
    call(
        &a.router,
        raw(b"messages=1", "application/x-www-form-urlencoded"),
    )
    .await
    .assert_error(415, None);
    // A compressed body is refused by name, not read as bad UTF-8.
    let gz = Request::post(chat)
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(Body::from(vec![0x1f, 0x8b, 0x08, 0x00]))
        .unwrap();
    let e = call(&a.router, gz).await.assert_error(415, None);
    assert!(
        e["error"]["message"].as_str().unwrap().contains("gzip"),
        "{e}"
    );
    // A wrong JSON type per field.
    for (field, value) in [
        ("temperature", json!("hot")),
        ("max_tokens", json!("10")),
        ("stream", json!("yes")),
        ("n", json!(1.5)),
        ("stop", json!(3)),
        ("seed", json!([1])),
    ] {
        let mut b = json!({"messages": m});
        b[field] = value;
        post_json(&a.router, chat, b)
            .await
            .assert_error(400, Some(field));
    }
    post_json(&a.router, chat, json!({"messages": "hi"}))
        .await
        .assert_error(400, Some("messages"));
    post_json(
        &a.router,
        chat,
        json!({"messages": [{"role": "user", "content": 5}]}),
    )
    .await
    .assert_error(400, Some("messages[0].content"));
    // Empty messages, unknown role, unsupported features.
    post_json(&a.router, chat, json!({"messages": []}))
        .await
        .assert_error(400, Some("messages"));
    post_json(
        &a.router,
        chat,
        json!({"messages": [{"role": "wizard", "content": "x"}]}),
    )
    .await
    .assert_error(400, Some("messages[0].role"));
    post_json(
        &a.router,
        chat,
        json!({"messages": m, "tools": [{"type": "function", "function": {"name": "f"}}]}),
    )
    .await
    .assert_error(400, Some("tools"));
    post_json(&a.router, chat, json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}))
        .await
        .assert_error(400, Some("messages[0].content[0].type"));
    post_json(
        &a.router,
        chat,
        json!({"messages": m, "response_format": {"type": "json_object"}}),
    )
    .await
    .assert_error(400, Some("response_format"));
    // Out-of-range values.
    for (field, value) in [
        ("max_tokens", json!(-1)),
        ("max_tokens", json!(0)),
        ("max_tokens", json!(1_000_000_000_000u64)),
        ("max_tokens", json!(1e300)),
        ("temperature", json!(-0.1)),
        ("top_p", json!(1.5)),
        ("top_p", json!(0)),
        ("n", json!(0)),
        ("n", json!(9)),
        ("top_logprobs", json!(21)),
        ("presence_penalty", json!(3)),
        ("min_p", json!(2)),
    ] {
        let mut b = json!({"messages": m, "logprobs": true});
        b[field] = value.clone();
        let e = post_json(&a.router, chat, b)
            .await
            .assert_error(400, Some(field));
        // The limit named is a real one, not the integer type's.
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(!msg.contains("9223372036854775807"), "{msg}");
        assert!(
            !msg.contains("170141183460469231731687303715884105727"),
            "{msg}"
        );
    }
    // A prompt over the context (256 tokens), and prompt + max_tokens over it.
    let long: Vec<u32> = (0..300).map(|i| 10 + i % 400).collect();
    let r = post_json(
        &a.router,
        "/v1/completions",
        json!({"prompt": long, "max_tokens": 4}),
    )
    .await;
    let e = r.assert_error(400, Some("prompt"));
    assert_eq!(e["error"]["code"], "context_length_exceeded");
    assert_eq!(
        (
            e["error"]["n_prompt_tokens"].as_u64(),
            e["error"]["n_ctx"].as_u64()
        ),
        (Some(300), Some(256))
    );
    assert!(e["error"]["message"].as_str().unwrap().contains("256"));
    let r = post_json(
        &a.router,
        "/v1/completions",
        json!({"prompt": [1, 2, 3], "max_tokens": 255}),
    )
    .await;
    assert_eq!(
        r.assert_error(400, Some("prompt"))["error"]["code"],
        "context_length_exceeded"
    );
    // A 10 MB body.
    let big = format!(
        "{{\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}",
        "a".repeat(10 << 20)
    );
    let r = call(
        &a.router,
        Request::post(chat)
            .header("content-type", "application/json")
            .body(Body::from(big))
            .unwrap(),
    )
    .await;
    r.assert_error(413, None);
    // An unknown model.
    let r = post_json(&a.router, chat, json!({"model": "gpt-9", "messages": m})).await;
    assert_eq!(
        r.assert_error(404, Some("model"))["error"]["code"],
        "model_not_found"
    );
    // An unknown field is ignored, and the server still serves.
    let r = post_json(
        &a.router,
        chat,
        json!({"messages": m, "max_tokens": 2, "some_future_extension": {"x": 1}}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // The errors were counted.
    let metrics = call(&a.router, get("/metrics")).await.text();
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("cardinal_request_errors_total{")
                && l.contains("type=\"invalid_request\"")
        })
        .unwrap();
    assert!(
        line.rsplit(' ').next().unwrap().parse::<f64>().unwrap() >= 20.0,
        "{line}"
    );
}

#[tokio::test]
async fn api_key_is_required_except_on_health() {
    let opts = ServeOptions {
        api_key: Some(ApiKey::new("s3cret")),
        served_model_name: Some("tiny".into()),
        ..Default::default()
    };
    let a = app_with(opts);
    // Capture every log line of this test (the runtime is single-threaded).
    let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || Capture(sink.clone()))
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let body = json!({"messages": user("hi"), "max_tokens": 2});
    post_json(&a.router, "/v1/chat/completions", body.clone())
        .await
        .assert_error(401, None);
    let with_key = |k: &str| {
        Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {k}"))
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let r = call(&a.router, with_key("wrong")).await;
    r.assert_error(401, None);
    assert!(!r.text().contains("s3cret"));
    assert_eq!(call(&a.router, with_key("s3cret")).await.status, 200);
    assert_eq!(call(&a.router, get("/health")).await.status, 200);
    let ready = call(&a.router, get("/ready")).await;
    assert_eq!(ready.status, 200);
    assert!(
        ready.json().get("model").is_none(),
        "no model name without the key"
    );
    assert_eq!(call(&a.router, get("/metrics")).await.status, 200);
    call(&a.router, get("/v1/models"))
        .await
        .assert_error(401, None);
    assert!(
        !format!("{:?}", a.state).contains("s3cret"),
        "the key never shows in Debug output"
    );
    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(logs.contains("status=401"), "requests are logged: {logs}");
    assert!(
        !logs.contains("s3cret") && !logs.contains("wrong"),
        "no key in the logs: {logs}"
    );
}

/// A log sink shared with the test.
struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn metrics_after_traffic() {
    let a = app();
    for stream in [false, true] {
        let r = post_json(
            &a.router,
            "/v1/chat/completions",
            json!({"messages": user("hi"), "max_tokens": 4, "ignore_eos": true, "stream": stream}),
        )
        .await;
        assert_eq!(r.status, 200);
    }
    post_json(&a.router, "/v1/chat/completions", json!({"messages": []}))
        .await
        .assert_error(400, Some("messages"));
    let r = call(&a.router, get("/metrics")).await;
    assert!(
        r.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let t = r.text();
    // For `promtool check metrics` (run by .ci/run): CARDINAL_METRICS_DUMP=path.
    if let Ok(path) = std::env::var("CARDINAL_METRICS_DUMP") {
        std::fs::write(path, &t).unwrap();
    }
    for name in [
        "time_to_first_token_seconds_bucket",
        "inter_token_latency_seconds_bucket",
        "e2e_request_latency_seconds_bucket",
        "request_queue_time_seconds_bucket",
        "request_prompt_tokens_bucket",
        "request_generation_tokens_bucket",
        "prompt_tokens_total",
        "generation_tokens_total",
        "requests_total",
        "request_errors_total",
        "requests_rejected_total",
        "requests_cancelled_total",
        "energy_joules_total",
        "card_busy_seconds_total",
        "link_bytes_total",
        "requests_running",
        "requests_waiting",
        "generation_tokens_per_second",
        "joules_per_token",
        "card_memory_bytes",
        "kv_cache_usage_ratio",
        "card_utilization_ratio",
        "build_info",
    ] {
        assert!(
            t.contains(&format!("\ncardinal_{name}{{")),
            "cardinal_{name} missing"
        );
    }
    let value = |prefix: &str| -> f64 {
        t.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("{prefix} missing"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(value("cardinal_generation_tokens_total{"), 8.0);
    assert_eq!(
        value("cardinal_requests_total{finish_reason=\"length\""),
        2.0
    );
    assert_eq!(value("cardinal_time_to_first_token_seconds_count{"), 2.0);
    assert_eq!(value("cardinal_inter_token_latency_seconds_count{"), 6.0);
    assert!(
        value("cardinal_energy_joules_total{model_name=\"tiny\",source=\"cards_modeled\"}") > 0.0
    );
    assert!(t.contains("le=\"2560\""), "vLLM TTFT buckets");
    assert!(t.contains("sliding window of the last 30 s"));
    assert!(t.contains("card=\"0\",kind=\"weights\""));
}

#[tokio::test]
async fn queue_full_gets_429_with_retry_after() {
    let a = app_with(ServeOptions {
        max_num_seqs: 1,
        max_queue: 1,
        ..Default::default()
    });
    let body = json!({"prompt": [5, 6, 7], "max_tokens": 200, "ignore_eos": true});
    let calls = (0..6).map(|_| post_json(&a.router, "/v1/completions", body.clone()));
    let replies = futures_join(calls).await;
    let rejected: Vec<&Reply> = replies.iter().filter(|r| r.status == 429).collect();
    assert!(!rejected.is_empty(), "some requests are shed");
    assert!(replies.iter().all(|r| r.status == 200 || r.status == 429));
    for r in &rejected {
        assert_eq!(r.headers["retry-after"], "1");
        assert_eq!(
            r.assert_error(429, None)["error"]["code"],
            "rate_limit_exceeded"
        );
    }
    let t = call(&a.router, get("/metrics")).await.text();
    assert!(t.contains(&format!(
        "cardinal_requests_rejected_total{{model_name=\"tiny-granite\",reason=\"queue_full\"}} {}",
        rejected.len()
    )));
}

/// Runs futures concurrently on this task and collects their outputs in order.
async fn futures_join<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let handles: Vec<_> = futs.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = handles.iter().map(|_| None).collect();
    let mut handles: Vec<_> = handles.into_iter().map(Some).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (h, o) in handles.iter_mut().zip(out.iter_mut()) {
            if let Some(f) = h {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        *o = Some(v);
                        *h = None;
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(Option::unwrap).collect()
}

#[tokio::test]
async fn request_timeout_ends_requests() {
    let a = app_with(ServeOptions {
        request_timeout: 0.002,
        ..Default::default()
    });
    let body = json!({"prompt": [5, 6, 7], "max_tokens": 250, "ignore_eos": true});
    let r = post_json(&a.router, "/v1/completions", body.clone()).await;
    assert_eq!(
        r.assert_error(504, None)["error"]["code"],
        "request_timeout"
    );
    let mut b = body;
    b["stream"] = json!(true);
    let events = sse_data(&post_json(&a.router, "/v1/completions", b).await.text());
    let n = events.len();
    assert_eq!(events[n - 1], "[DONE]");
    let e: Value = serde_json::from_str(&events[n - 2]).unwrap();
    assert_eq!(
        e["error"]["code"], "request_timeout",
        "one error event, then [DONE]"
    );
    assert_eq!(events.iter().filter(|e| e.contains("\"error\"")).count(), 1);
}

/// Doubles a list 40 times: past minijinja's lazy-concatenation depth every
/// doubling copies all items without charging fuel.
const LIST_DOUBLING: &str = "{% set ns = namespace(l=[1]) %}{% for i in range(40) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l | length }}";

#[tokio::test]
async fn a_template_memory_bomb_is_a_server_error_and_raw_prompts_still_work() {
    // The real sandbox limits: the memory budget or the time limit stops
    // the render, whichever comes first on this machine.
    let a = app_with_template(ChatTemplate::new(LIST_DOUBLING, "", "").unwrap());
    let chat = json!({"messages": user("hi"), "max_tokens": 2});
    let t = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        post_json(&a.router, "/v1/chat/completions", chat.clone()),
    )
    .await
    .expect("the chat request is answered");
    let took = t.elapsed();
    let v = r.assert_error(500, None);
    let msg = v["error"]["message"].as_str().unwrap();
    eprintln!(
        "bomb template: 500 in {:.0} ms: {msg}",
        took.as_secs_f64() * 1e3
    );
    assert_eq!(v["error"]["type"], "server_error");
    assert_eq!(v["error"]["code"], "chat_template_error");
    assert!(
        msg.contains("memory budget") || msg.contains("time limit"),
        "{msg}"
    );
    assert!(
        msg.contains("/v1/completions"),
        "the way out is named: {msg}"
    );
    assert!(took < RENDER_TIMEOUT + Duration::from_secs(2), "{took:?}");

    // Text prompts do not need the template and are still served.
    let r = post_json(
        &a.router,
        "/v1/completions",
        json!({"prompt": "Hello there", "max_tokens": 3}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["choices"][0]["text"].is_string());

    // The template is disabled: chat and /tokenize with messages fail at once.
    for (path, body) in [
        ("/v1/chat/completions", chat.clone()),
        ("/tokenize", json!({"messages": user("hi")})),
    ] {
        let t = Instant::now();
        let r = post_json(&a.router, path, body).await;
        let took = t.elapsed();
        let v = r.assert_error(500, None);
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("disabled"), "{path}: {msg}");
        assert!(took < Duration::from_millis(500), "{path}: {took:?}");
    }
    assert_eq!(
        post_json(&a.router, "/tokenize", json!({"prompt": "Hello"}))
            .await
            .status,
        200
    );
    let metrics = call(&a.router, get("/metrics")).await.text();
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("cardinal_request_errors_total{") && l.contains("type=\"template\"")
        })
        .expect("template errors are counted");
    assert!(line.ends_with(" 3"), "{line}");
}

#[tokio::test]
async fn cors_only_with_allowed_origins_and_drain_refuses() {
    let preflight = || {
        Request::builder()
            .method("OPTIONS")
            .uri("/v1/chat/completions")
            .header("origin", "http://ui.example")
            .header("access-control-request-method", "POST")
            .body(Body::empty())
            .unwrap()
    };
    let plain = app();
    let r = call(&plain.router, preflight()).await;
    assert!(
        !r.headers.contains_key("access-control-allow-origin"),
        "CORS is off by default"
    );
    let with = app_with(ServeOptions {
        allowed_origins: vec!["http://ui.example".into()],
        ..Default::default()
    });
    let r = call(&with.router, preflight()).await;
    assert_eq!(
        r.headers["access-control-allow-origin"],
        "http://ui.example"
    );
    // Draining: the API answers 503, /health stays up.
    plain.state.start_drain();
    let r = post_json(
        &plain.router,
        "/v1/chat/completions",
        json!({"messages": user("hi")}),
    )
    .await;
    r.assert_error(503, None);
    assert_eq!(r.headers["connection"], "close");
    assert_eq!(call(&plain.router, get("/health")).await.status, 200);
    assert_eq!(call(&plain.router, get("/ready")).await.status, 503);
}

#[tokio::test]
async fn while_loading_only_health_and_metrics_answer() {
    let state = cardinal_server::serve::AppState::loading(ServeOptions::default(), "m", 256);
    let r = cardinal_server::serve::router(state.clone());
    assert_eq!(call(&r, get("/health")).await.status, 200);
    assert_eq!(call(&r, get("/metrics")).await.status, 200);
    call(&r, get("/ready")).await.assert_error(503, None);
    call(&r, get("/v1/models")).await.assert_error(503, None);
    call(&r, get("/v1/models/m")).await.assert_error(503, None);
    let reply = post_json(&r, "/v1/chat/completions", json!({"messages": user("hi")})).await;
    reply.assert_error(503, None);
    assert_eq!(reply.headers["retry-after"], "1");
    // Once the model is set, it serves.
    let rt = runtime(&ServeOptions::default());
    assert!(state.set_runtime(rt));
    let reply = post_json(
        &r,
        "/v1/chat/completions",
        json!({"messages": user("hi"), "max_tokens": 2}),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let models = call(&r, get("/v1/models")).await.json();
    assert_eq!(models["data"][0]["max_model_len"], 256);
}

#[tokio::test]
async fn abort_ends_requests_with_an_error() {
    let a = app();
    a.state.inner.abort.send_replace(true);
    let body = json!({"prompt": [5, 6, 7], "max_tokens": 50, "ignore_eos": true});
    post_json(&a.router, "/v1/completions", body.clone())
        .await
        .assert_error(503, None);
    let mut b = body;
    b["stream"] = json!(true);
    let events = sse_data(&post_json(&a.router, "/v1/completions", b).await.text());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let e: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(e["error"]["type"], "unavailable_error");
    assert!(kv_is_free(&a).await);
}

async fn kv_is_free(a: &App) -> bool {
    for _ in 0..200 {
        if a.engine.kv_in_use().iter().all(|&b| b == 0) {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    false
}
