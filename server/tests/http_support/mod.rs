//! Helpers shared by the HTTP tests: a tiny-granite runtime, a router over
//! it, one-shot requests without a socket, and SSE parsing.

#![allow(dead_code)]

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Request, StatusCode};
use cardinal_pipeline::Engine;
use cardinal_server::serve::{AppState, ServeOptions, router};
use cardinal_server::setup::{self, ModelArgs, Runtime};
use serde_json::Value;
use tower::ServiceExt;

/// The tiny random Granite checkpoint (vocab 512, context 256).
pub fn tiny_granite() -> ModelArgs {
    ModelArgs {
        model: concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/tests/fixtures/tiny-granite"
        )
        .into(),
        cards: None,
        card_spec: None,
        card_memory_mib: None,
        threads: Some(1),
        weight_seed: 0,
        hf_int8: false,
    }
}

/// A started runtime for `opts`' limits.
pub fn runtime(opts: &ServeOptions) -> Runtime {
    setup::start(&tiny_granite(), &opts.limits(), &mut |_| {}).expect("tiny-granite starts")
}

/// A router, its engine and state.
pub struct App {
    pub router: Router,
    pub engine: Arc<Engine>,
    pub state: AppState,
}

/// An app over tiny-granite with `opts`.
pub fn app_with(opts: ServeOptions) -> App {
    let rt = runtime(&opts);
    serve(opts, rt)
}

/// An app serving `rt` with `opts`.
fn serve(opts: ServeOptions, rt: Runtime) -> App {
    let engine = rt.engine.clone();
    let state = AppState::new(opts, rt);
    App {
        router: router(state.clone()),
        engine,
        state,
    }
}

/// An app over tiny-granite whose chat template is `template` instead of
/// its own (as a GGUF or tokenizer_config.json could carry), served as "tiny".
pub fn app_with_template(template: cardinal_models::template::ChatTemplate) -> App {
    let opts = ServeOptions {
        served_model_name: Some("tiny".into()),
        ..Default::default()
    };
    let mut rt = runtime(&opts);
    Arc::get_mut(&mut rt.loaded)
        .expect("only the runtime holds the loaded model")
        .template = Some(template);
    serve(opts, rt)
}

/// An app with default options, served as "tiny".
pub fn app() -> App {
    app_with(ServeOptions {
        served_model_name: Some("tiny".into()),
        ..Default::default()
    })
}

/// A reply: status, headers, body.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts an OpenAI-shaped error with this status and `param`.
    pub fn assert_error(&self, status: u16, param: Option<&str>) -> Value {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text());
        let v = self.json();
        let e = &v["error"];
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "no message: {v}"
        );
        assert!(e["type"].is_string(), "no type: {v}");
        assert!(
            e.get("code").is_some() && e.get("param").is_some(),
            "shape: {v}"
        );
        match param {
            Some(p) => assert_eq!(e["param"], p, "param in {v}"),
            None => assert!(e["param"].is_null(), "param should be null: {v}"),
        }
        v
    }
}

/// Sends one request through the router.
pub async fn call(app: &Router, req: Request<Body>) -> Reply {
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .expect("body");
    Reply {
        status,
        headers,
        body,
    }
}

/// A JSON POST.
pub fn post(path: &str, body: &Value) -> Request<Body> {
    Request::post(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// A GET.
pub fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

/// POSTs JSON and returns the reply.
pub async fn post_json(app: &Router, path: &str, body: Value) -> Reply {
    call(app, post(path, &body)).await
}

/// The `data:` payloads of an SSE body, in order.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not an SSE data event: {e:?}"))
                .to_string()
        })
        .collect()
}
