//! The OpenAI-compatible API driven through the router without a socket, on
//! the tiny-granite fixture: chat and completions (plain and streaming, with
//! the exact chunk order), prompt forms, `n`, stop strings, logprobs and the
//! small endpoints. Limits and failure paths are in `http_api_limits.rs`.

mod http_support;

use http_support::*;
use serde_json::{Value, json};

fn user(text: &str) -> Value {
    json!([{ "role": "user", "content": text }])
}

#[tokio::test]
async fn chat_non_streaming() {
    let a = app();
    let r = post_json(
        &a.router,
        "/v1/chat/completions",
        json!({"model": "tiny", "messages": user("Hello"), "max_tokens": 8, "temperature": 0}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["model"], "tiny");
    let c = &v["choices"][0];
    assert_eq!(c["index"], 0);
    assert_eq!(c["message"]["role"], "assistant");
    assert!(c["message"]["content"].is_string());
    assert!(matches!(
        c["finish_reason"].as_str(),
        Some("stop" | "length")
    ));
    let u = &v["usage"];
    let (p, n) = (
        u["prompt_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
    );
    assert!(p > 0 && (1..=8).contains(&n));
    assert_eq!(u["total_tokens"].as_u64().unwrap(), p + n);
    let ext = &u["cardinal"];
    for k in [
        "card_joules",
        "host_joules",
        "host_energy_source",
        "decode_tokens_per_second",
        "time_to_first_token_seconds",
    ] {
        assert!(ext.get(k).is_some(), "usage.cardinal.{k} missing: {u}");
    }
    assert!(ext["card_joules"].as_f64().unwrap() > 0.0);
    assert!(matches!(
        ext["host_energy_source"].as_str(),
        Some("measured" | "estimate")
    ));
    assert!(ext["time_to_first_token_seconds"].as_f64().unwrap() > 0.0);
}

#[tokio::test]
async fn chat_stream_chunk_order_with_usage() {
    let a = app();
    let body = json!({
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "max_tokens": 6, "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true},
    });
    let r = post_json(&a.router, "/v1/chat/completions", body).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "text/event-stream");
    let events = sse_data(&r.text());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(
        chunks.iter().all(|c| c["id"] == id),
        "one id for the whole stream"
    );
    // 1. the role chunk
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    // 2. content deltas, 3. the finish chunk, 4. the usage chunk
    let n = chunks.len();
    let finish = &chunks[n - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    let mut text = String::new();
    for c in &chunks[1..n - 2] {
        assert!(c["choices"][0]["finish_reason"].is_null());
        assert!(
            c["usage"].is_null() && c.get("usage").is_some(),
            "usage: null on every chunk but the last"
        );
        text.push_str(c["choices"][0]["delta"]["content"].as_str().unwrap());
    }
    let usage = &chunks[n - 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 6);
    assert!(usage["usage"]["cardinal"]["card_joules"].as_f64().unwrap() > 0.0);
    // The streamed text equals the non-streamed one (greedy, same prompt).
    let body = json!({
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "max_tokens": 6, "ignore_eos": true, "temperature": 0,
    });
    let whole = post_json(&a.router, "/v1/chat/completions", body)
        .await
        .json();
    let streamed_greedy = {
        let r = post_json(
            &a.router,
            "/v1/chat/completions",
            json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "max_tokens": 6, "ignore_eos": true, "temperature": 0, "stream": true}),
        )
        .await;
        let ev = sse_data(&r.text());
        ev[..ev.len() - 1]
            .iter()
            .map(|e| serde_json::from_str::<Value>(e).unwrap())
            .inspect(|c| {
                assert!(
                    c.get("usage").is_none(),
                    "no usage key without include_usage"
                )
            })
            .filter_map(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect::<String>()
    };
    assert_eq!(
        whole["choices"][0]["message"]["content"].as_str().unwrap(),
        streamed_greedy
    );
    let _ = text;
}

#[tokio::test]
async fn completions_prompt_forms_and_n() {
    let a = app();
    let base = json!({"max_tokens": 5, "ignore_eos": true, "temperature": 0});
    let with = |prompt: Value, extra: Value| {
        let mut b = base.clone();
        b["prompt"] = prompt;
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let one = post_json(
        &a.router,
        "/v1/completions",
        with(json!("Once upon a time"), json!({})),
    )
    .await
    .json();
    assert_eq!(one["object"], "text_completion");
    assert!(one["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(one["choices"].as_array().unwrap().len(), 1);
    assert_eq!(one["choices"][0]["finish_reason"], "length");
    assert_eq!(one["usage"]["completion_tokens"], 5);

    let two = post_json(
        &a.router,
        "/v1/completions",
        with(json!(["Once upon a time", "The end"]), json!({})),
    )
    .await
    .json();
    let ch = two["choices"].as_array().unwrap();
    assert_eq!(ch.len(), 2);
    assert_eq!(
        (ch[0]["index"].as_u64(), ch[1]["index"].as_u64()),
        (Some(0), Some(1))
    );
    assert_eq!(two["usage"]["completion_tokens"], 10);
    assert_eq!(
        ch[0]["text"], one["choices"][0]["text"],
        "greedy: same prompt, same text"
    );

    let tokens: Value = post_json(
        &a.router,
        "/tokenize",
        json!({"prompt": "Once upon a time"}),
    )
    .await
    .json();
    let ids = tokens["tokens"].clone();
    assert_eq!(
        tokens["count"].as_u64().unwrap() as usize,
        ids.as_array().unwrap().len()
    );
    let by_ids = post_json(&a.router, "/v1/completions", with(ids.clone(), json!({})))
        .await
        .json();
    assert_eq!(by_ids["choices"][0]["text"], one["choices"][0]["text"]);
    assert_eq!(
        by_ids["usage"]["prompt_tokens"],
        one["usage"]["prompt_tokens"]
    );
    let lists = post_json(
        &a.router,
        "/v1/completions",
        with(json!([ids, [5, 6, 7]]), json!({})),
    )
    .await
    .json();
    assert_eq!(lists["choices"].as_array().unwrap().len(), 2);

    let n2 = post_json(
        &a.router,
        "/v1/completions",
        with(json!("Hi"), json!({"n": 2, "temperature": 1.0, "seed": 7})),
    )
    .await;
    assert_eq!(n2.status, 200);
    let n2 = n2.json();
    assert_eq!(n2["choices"].as_array().unwrap().len(), 2);
    assert_eq!(n2["usage"]["completion_tokens"], 10);
    assert_eq!(
        n2["usage"]["prompt_tokens"],
        post_json(&a.router, "/tokenize", json!({"prompt": "Hi"}))
            .await
            .json()["count"],
        "prompt counted once for n=2"
    );
}

#[tokio::test]
async fn chat_n2_stream_has_both_indexes() {
    let a = app();
    let r = post_json(&a.router, "/v1/chat/completions", json!({"messages": user("Hi"), "n": 2, "max_tokens": 4, "ignore_eos": true, "stream": true, "seed": 1})).await;
    let events = sse_data(&r.text());
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    for i in 0..2 {
        let mine: Vec<&Value> = chunks
            .iter()
            .filter(|c| c["choices"][0]["index"] == i)
            .collect();
        assert_eq!(
            mine[0]["choices"][0]["delta"]["role"], "assistant",
            "choice {i} starts with its role chunk"
        );
        assert_eq!(
            mine.last().unwrap()["choices"][0]["finish_reason"],
            "length"
        );
        assert_eq!(
            mine.iter()
                .filter(|c| !c["choices"][0]["finish_reason"].is_null())
                .count(),
            1
        );
    }
}

/// Greedy text and the per-token texts of a completion.
async fn greedy_tokens(a: &App, prompt: &str, max_tokens: usize) -> (String, Vec<String>) {
    let v = post_json(&a.router, "/v1/completions", json!({"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": true, "temperature": 0, "logprobs": 1})).await.json();
    let c = &v["choices"][0];
    let toks = c["logprobs"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    (c["text"].as_str().unwrap().to_string(), toks)
}

#[tokio::test]
async fn stop_strings_never_leak() {
    let a = app();
    let (text, toks) = greedy_tokens(&a, "The quick brown fox", 40).await;
    // Tokens that are not whole characters are named by their bytes
    // (`bytes:\xfb`, as OpenAI does); with those, the tokens add up to the
    // text (whose stray bytes show as U+FFFD).
    let raw = |t: &str| -> Vec<u8> {
        match t.strip_prefix("bytes:") {
            Some(hex) => hex
                .split("\\x")
                .filter(|h| !h.is_empty())
                .map(|h| u8::from_str_radix(h, 16).unwrap())
                .collect(),
            None => t.as_bytes().to_vec(),
        }
    };
    let bytes: Vec<u8> = toks.iter().flat_map(|t| raw(t)).collect();
    assert_eq!(
        String::from_utf8_lossy(&bytes),
        text,
        "token bytes add up to the text"
    );
    // A stop string spanning a token boundary: the last char of one token's
    // text and the first of the next's (this tiny model's stray bytes each
    // show as one U+FFFD).
    let toks: Vec<String> = toks
        .iter()
        .map(|t| String::from_utf8_lossy(&raw(t)).into_owned())
        .collect();
    let k = (4..toks.len() - 1)
        .find(|&k| !toks[k].is_empty() && !toks[k + 1].is_empty())
        .expect("two non-empty tokens");
    let stop = format!(
        "{}{}",
        toks[k].chars().last().unwrap(),
        toks[k + 1].chars().next().unwrap()
    );
    let cut = text.find(&stop).unwrap();
    let body = |stream: bool| json!({"prompt": "The quick brown fox", "max_tokens": 40, "ignore_eos": true, "temperature": 0, "stop": [stop.clone(), "\u{1F600}never"], "stream": stream});
    let v = post_json(&a.router, "/v1/completions", body(false))
        .await
        .json();
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), &text[..cut]);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["choices"][0]["stop_reason"], stop.as_str());
    // vLLM's include_stop_str_in_output keeps the stop string.
    let mut with_stop = body(false);
    with_stop["include_stop_str_in_output"] = json!(true);
    let w = post_json(&a.router, "/v1/completions", with_stop)
        .await
        .json();
    assert_eq!(
        w["choices"][0]["text"].as_str().unwrap(),
        &text[..cut + stop.len()]
    );
    // The engine still reports the stopped sequence's figures.
    let through_stop = (1..=toks.len())
        .find(|&j| toks[..j].concat().len() >= cut + stop.len())
        .unwrap();
    assert_eq!(v["usage"]["completion_tokens"], through_stop, "{v}");
    assert!(
        v["usage"]["cardinal"]["card_joules"].as_f64().unwrap() > 0.0,
        "{v}"
    );
    assert!(
        v["usage"]["cardinal"]["host_joules"].as_f64().is_some(),
        "{v}"
    );
    let mut streaming = body(true);
    streaming["stream_options"] = json!({"include_usage": true});
    let r = post_json(&a.router, "/v1/completions", streaming).await;
    let events = sse_data(&r.text());
    let mut streamed = String::new();
    let mut usage = Value::Null;
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).unwrap();
        if let Some(piece) = c["choices"][0]["text"].as_str() {
            assert!(!piece.contains(&stop));
            streamed.push_str(piece);
        }
        if !c["usage"].is_null() {
            usage = c["usage"].clone();
        }
    }
    assert_eq!(streamed, &text[..cut]);
    assert!(
        usage["cardinal"]["card_joules"].as_f64().unwrap() > 0.0,
        "{usage}"
    );
    // Chat takes a single string too.
    let v = post_json(
        &a.router,
        "/v1/chat/completions",
        json!({"messages": user("x"), "max_tokens": 3, "stop": "zz"}),
    )
    .await;
    assert_eq!(v.status, 200);
}

#[tokio::test]
async fn logprobs_shapes() {
    let a = app();
    let v = post_json(&a.router, "/v1/chat/completions", json!({"messages": user("Hi"), "max_tokens": 3, "ignore_eos": true, "logprobs": true, "top_logprobs": 2})).await.json();
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 3);
    for t in content {
        assert!(t["logprob"].as_f64().unwrap() <= 0.0);
        assert!(t["token"].is_string() && t["bytes"].is_array());
        assert_eq!(t["top_logprobs"].as_array().unwrap().len(), 2);
    }
    let v = post_json(
        &a.router,
        "/v1/completions",
        json!({"prompt": "Hi", "max_tokens": 3, "ignore_eos": true, "logprobs": 2}),
    )
    .await
    .json();
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 3);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 3);
    assert_eq!(lp["text_offset"][0], 0);
}

#[tokio::test]
async fn small_endpoints() {
    let a = app();
    let m = call(&a.router, get("/v1/models")).await.json();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], "tiny");
    assert_eq!(m["data"][0]["max_model_len"], 256);
    assert_eq!(call(&a.router, get("/v1/models/tiny")).await.status, 200);
    call(&a.router, get("/v1/models/other"))
        .await
        .assert_error(404, Some("model"));
    assert_eq!(call(&a.router, get("/health")).await.json()["status"], "ok");
    assert_eq!(
        call(&a.router, get("/ready")).await.json()["status"],
        "ready"
    );
    let t = post_json(&a.router, "/tokenize", json!({"prompt": "hello world"}))
        .await
        .json();
    let back = post_json(&a.router, "/detokenize", json!({"tokens": t["tokens"]}))
        .await
        .json();
    assert_eq!(back["prompt"], "hello world");
    let chat = post_json(&a.router, "/tokenize", json!({"messages": user("hello")}))
        .await
        .json();
    assert!(chat["count"].as_u64().unwrap() > t["count"].as_u64().unwrap());
    call(&a.router, get("/v1/nothing"))
        .await
        .assert_error(404, None);
    let r = call(&a.router, get("/v1/chat/completions")).await;
    r.assert_error(405, None);
}

/// A conversation that repeats a long system prompt reuses its cached KV
/// blocks: the usage says how many prompt tokens were cached, the greedy
/// reply is the one a server without the cache gives, and /metrics counts
/// the hits. `--no-prefix-cache` turns it off.
#[tokio::test]
async fn prefix_cache_reuses_a_long_system_prompt() {
    let system = "You are a careful assistant who answers in one short sentence. ".repeat(5);
    let body = |q: &str| {
        json!({"model": "tiny", "max_tokens": 8, "temperature": 0, "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": q},
        ]})
    };
    let ask = |a: &App, q: &str| reply_and_usage(a.router.clone(), body(q));
    let a = app();
    let cold = app_with(cardinal_server::serve::ServeOptions {
        served_model_name: Some("tiny".into()),
        no_prefix_cache: true,
        ..Default::default()
    });
    let (text, prompt, cached) = ask(&a, "What is a card?").await;
    assert!(
        prompt > 128,
        "the system prompt should span whole blocks: {prompt}"
    );
    assert_eq!(cached, 0);
    let (again, _, cached) = ask(&a, "What is a card?").await;
    assert_eq!(again, text, "a cache hit changed the greedy reply");
    assert!(
        cached >= 128 && cached % 64 == 0 && cached < prompt,
        "{cached} of {prompt} cached"
    );
    // Another question after the same system prompt shares its blocks.
    let (other, _, shared) = ask(&a, "And what is a link?").await;
    assert!(shared >= 64 && shared <= cached, "{shared}");
    let (cold_other, _, none) = ask(&cold, "And what is a link?").await;
    assert_eq!((cold_other, none), (other, 0), "the cache changed a reply");
    let m = call(&a.router, get("/metrics")).await.text();
    let hits = m
        .lines()
        .find(|l| l.starts_with("cardinal_prefix_cache_hits_total"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .expect("prefix_cache_hits_total in /metrics");
    assert_eq!(hits, cached + shared);
    assert!(m.contains("kind=\"kv_prefix_cache\""), "{m}");
    // vLLM's /reset_prefix_cache: the next request starts cold again (the
    // reset is queued to the engine ahead of it), with the same reply.
    let r = post_json(&a.router, "/reset_prefix_cache", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "ok");
    let (after, _, none) = ask(&a, "What is a card?").await;
    assert_eq!((after, none), (text, 0), "the reset left cached blocks");
}

/// A chat reply's text, prompt tokens and cached prompt tokens.
async fn reply_and_usage(router: axum::Router, body: Value) -> (String, u64, u64) {
    let r = post_json(&router, "/v1/chat/completions", body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let u = &v["usage"];
    (
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned(),
        u["prompt_tokens"].as_u64().unwrap(),
        u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap(),
    )
}
