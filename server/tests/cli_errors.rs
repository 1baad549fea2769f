//! The `cardinal` binary on bad input: an empty prompt, a model path that
//! does not exist, a plan with too few cards and an out-of-range
//! `--prefill-chunk` each exit non-zero with one
//! clear line on stderr (exit 2 for the plan, as scripts rely on), and never
//! a panic. Numeric flags out of range (negative ones included) are refused
//! when parsed, before any model is loaded or port bound (clap's exit 2). A
//! closed stdout ends a command quietly with exit 0; `tokenize` shows no
//! weight-loading progress; logs carry no ANSI colours off a terminal, and
//! JSON request logs have the path as text and the duration as a number.

use std::io::{BufRead, Read, Write};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn cardinal(args: &[&str]) -> Output {
    command(args).output().expect("the cardinal binary runs")
}

/// The binary with `args`, and no `CARDINAL_*` settings from the
/// environment.
fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cardinal"));
    cmd.args(args);
    // Settings from the environment must not change what is tested.
    for var in [
        "CARDINAL_MODEL",
        "CARDINAL_CARDS",
        "CARDINAL_CARD_SPEC",
        "CARDINAL_THREADS",
        "CARDINAL_ISA",
        "RUST_BACKTRACE",
        "CARDINAL_LOG",
        "CARDINAL_LOG_FORMAT",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Asserts a failure with `code` whose stderr has every piece of `want` and
/// no panic.
fn assert_fails(out: &Output, code: i32, want: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "it panicked: {stderr}");
    for w in want {
        assert!(stderr.contains(w), "stderr does not say {w:?}: {stderr}");
    }
    stderr
}

fn tiny_granite() -> String {
    format!(
        "{}/../models/tests/fixtures/tiny-granite",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[test]
fn empty_prompt() {
    let model = tiny_granite();
    let out = cardinal(&[
        "generate",
        "--model",
        &model,
        "--threads",
        "1",
        "--prompt",
        "",
    ]);
    assert_fails(&out, 1, &["error:", "the prompt is empty"]);
    assert!(out.stdout.is_empty(), "nothing is generated");
    // With --chat too: an empty user message is still an empty prompt.
    let out = cardinal(&[
        "generate",
        "--model",
        &model,
        "--threads",
        "1",
        "--chat",
        "--prompt",
        "",
    ]);
    assert_fails(&out, 1, &["the prompt is empty"]);
    // The same model with a prompt works, so the failure above is the prompt's.
    let out = cardinal(&[
        "generate",
        "--model",
        &model,
        "--threads",
        "1",
        "--prompt",
        "hello world",
        "--max-tokens",
        "4",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stderr: {stderr}");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(j["prompt_ids"], serde_json::json!([261, 310, 404]));
    assert_eq!(j["generated_ids"].as_array().map(Vec::len), Some(4));
}

#[test]
fn model_path_that_does_not_exist() {
    let out = cardinal(&["generate", "--model", "/nonexistent.gguf", "--prompt", "hi"]);
    assert_fails(&out, 1, &["/nonexistent.gguf", "no such file or directory"]);
    let out = cardinal(&["generate", "--model", "", "--prompt", "hi"]);
    assert_fails(&out, 1, &["--model is empty"]);
    let out = cardinal(&["generate", "--model", "synthetic:nope", "--prompt", "hi"]);
    assert_fails(&out, 1, &["unknown synthetic model \"nope\""]);
}

#[test]
fn plan_with_too_few_cards() {
    let out = cardinal(&["plan", "--model", "synthetic:granite-3b", "--cards", "3"]);
    let stderr = assert_fails(
        &out,
        2,
        &["the model needs at least 16 cards for 1 users at context 2048, but --cards is 3"],
    );
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn serve_with_a_bad_prefill_chunk() {
    let model = tiny_granite();
    for (v, want) in [
        ("0", "--prefill-chunk 0: must be between 1 and 4096"),
        ("5000", "--prefill-chunk 5000: must be between 1 and 4096"),
    ] {
        let out = cardinal(&[
            "serve",
            "--model",
            &model,
            "--threads",
            "1",
            "--port",
            "0",
            "--prefill-chunk",
            v,
        ]);
        assert_fails(&out, 1, &[want]);
    }
}

#[test]
fn numeric_flags_out_of_range_are_refused_before_loading() {
    // The model does not exist: had the flags been checked after loading,
    // the error would be about the file.
    let gen_flags = |flag: &'static str, v: &'static str| {
        vec![
            "generate",
            "--model",
            "/nonexistent.gguf",
            "--prompt",
            "hi",
            flag,
            v,
        ]
    };
    for (args, want) in [
        (
            gen_flags("--max-tokens", "0"),
            "invalid value '0' for '--max-tokens <MAX_TOKENS>': must be ≥ 1",
        ),
        (
            gen_flags("--max-tokens", "-1"),
            "invalid value '-1' for '--max-tokens <MAX_TOKENS>': must be ≥ 1",
        ),
        (
            gen_flags("--temperature", "-1"),
            "invalid value '-1' for '--temperature <TEMPERATURE>': must be ≥ 0 and ≤ 100",
        ),
        (
            gen_flags("--top-p", "5"),
            "invalid value '5' for '--top-p <TOP_P>': must be > 0 and ≤ 1",
        ),
        (
            gen_flags("--top-k", "-2"),
            "invalid value '-2' for '--top-k <TOP_K>': must be ≥ 0",
        ),
        (
            gen_flags("--threads", "0"),
            "invalid value '0' for '--threads <THREADS>': must be ≥ 1",
        ),
        (
            gen_flags("--threads", "1000"),
            "invalid value '1000' for '--threads <THREADS>': must be ≤ 256",
        ),
        (
            gen_flags("--cards", "0"),
            "invalid value '0' for '--cards <CARDS>': must be ≥ 1",
        ),
        (
            vec!["bench", "--model", "/nonexistent.gguf", "--gen-tokens", "1"],
            "invalid value '1' for '--gen-tokens <GEN_TOKENS>': must be ≥ 2",
        ),
        (
            vec![
                "bench",
                "--model",
                "/nonexistent.gguf",
                "--concurrency",
                "0",
            ],
            "invalid value '0' for '--concurrency <CONCURRENCY>': must be ≥ 1",
        ),
        (
            vec![
                "perplexity",
                "--model",
                "/nonexistent.gguf",
                "--file",
                "/dev/null",
                "--ctx",
                "2",
            ],
            "invalid value '2' for '--ctx <CTX>': must be ≥ 4",
        ),
    ] {
        let out = cardinal(&args);
        let stderr = assert_fails(&out, 2, &[want]);
        assert!(
            !stderr.contains("no such file"),
            "{args:?} loaded: {stderr}"
        );
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn serve_refuses_bad_model_flags_before_binding() {
    let model = tiny_granite();
    let serve = |extra: &[&str]| {
        let mut args = vec!["serve", "--model", &model, "--port", "0"];
        args.extend_from_slice(extra);
        cardinal(&args)
    };
    let out = serve(&["--threads", "0"]);
    let stderr = assert_fails(
        &out,
        2,
        &["invalid value '0' for '--threads <THREADS>': must be ≥ 1"],
    );
    assert!(!stderr.contains("listening"), "bound a port: {stderr}");
    // The same from the environment.
    let out = command(&["serve", "--model", &model, "--port", "0"])
        .env("CARDINAL_THREADS", "-1")
        .output()
        .unwrap();
    let stderr = assert_fails(
        &out,
        2,
        &["invalid value '-1' for '--threads <THREADS>': must be ≥ 1"],
    );
    assert!(!stderr.contains("listening"), "bound a port: {stderr}");
    // A card spec that cannot be read is found before binding too.
    let out = serve(&["--threads", "1", "--card-spec", "/nonexistent.toml"]);
    let stderr = assert_fails(&out, 1, &["/nonexistent.toml"]);
    assert!(!stderr.contains("listening"), "bound a port: {stderr}");
}

/// `cardinal serve` (tiny-granite, 1 thread, port 0, JSON logs) with the
/// environment `env`, and its stderr lines as they come.
fn serve_json(env: &[(&str, &str)]) -> (std::process::Child, mpsc::Receiver<String>) {
    let mut cmd = command(&[
        "serve",
        "--model",
        &tiny_granite(),
        "--threads",
        "1",
        "--port",
        "0",
        "--log-format",
        "json",
    ]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the cardinal binary runs");
    let (tx, rx) = mpsc::sync_channel::<String>(4096);
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// The first JSON log line of `cardinal serve` with the environment `env`
/// that has field `field`, or `None` after 30 s.
fn serve_log_field(env: &[(&str, &str)], field: &str) -> Option<serde_json::Value> {
    let (mut child, rx) = serve_json(env);
    let end = Instant::now() + Duration::from_secs(30);
    let mut found = None;
    while let Ok(line) = rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
            && !v["fields"][field].is_null()
        {
            found = Some(v["fields"][field].clone());
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    found
}

/// Boolean flags take the usual spellings from the environment, with their
/// meaning (the server logs its prefix-cache setting when it starts), and a
/// misspelt value is refused instead of read as true.
#[test]
fn boolean_flags_from_the_environment() {
    for (value, cache_on) in [("1", false), ("yes", false), ("0", true), ("no", true)] {
        let got = serve_log_field(&[("CARDINAL_NO_PREFIX_CACHE", value)], "prefix_cache")
            .unwrap_or_else(|| panic!("no prefix_cache field in the log with {value}"));
        let on = got
            .as_bool()
            .or_else(|| got.as_str().and_then(|s| s.parse().ok()));
        assert_eq!(
            on,
            Some(cache_on),
            "CARDINAL_NO_PREFIX_CACHE={value}: {got}"
        );
    }
    for var in ["CARDINAL_NO_PREFIX_CACHE", "CARDINAL_METRICS_REQUIRE_AUTH"] {
        let out = command(&["serve", "--model", &tiny_granite(), "--port", "0"])
            .env(var, "disabled")
            .output()
            .unwrap();
        assert_fails(&out, 2, &["invalid value 'disabled'"]);
    }
}

/// Runs `args` with stdout's reader gone before the command writes.
fn with_stdout_closed(args: &[&str]) -> Output {
    let mut child = command(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the cardinal binary runs");
    drop(child.stdout.take());
    child.wait_with_output().unwrap()
}

#[test]
fn a_closed_stdout_ends_quietly() {
    let model = tiny_granite();
    for args in [
        vec!["tokenize", "--model", &model, "hello world"],
        vec![
            "generate",
            "--model",
            &model,
            "--threads",
            "1",
            "--prompt",
            "hello",
            "--max-tokens",
            "4",
        ],
        vec![
            "generate",
            "--model",
            &model,
            "--threads",
            "1",
            "--prompt",
            "hello",
            "--max-tokens",
            "2",
            "--json",
        ],
        vec![
            "bench",
            "--model",
            "synthetic:tiny",
            "--threads",
            "1",
            "--prompt-tokens",
            "8",
            "--gen-tokens",
            "4",
            "--reps",
            "1",
        ],
        vec!["plan", "--model", "synthetic:granite-3b", "--users", "28"],
    ] {
        let out = with_stdout_closed(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        assert!(!stderr.contains("error"), "{args:?}: {stderr}");
    }
}

/// A context past the model's own, or a plan past the planner's card
/// limit, is refused at once with the value and the limit.
#[test]
fn plan_refuses_absurd_sizes() {
    let out = cardinal(&["plan", "--model", "synthetic:granite-3b", "--ctx", "100000"]);
    assert_fails(&out, 1, &["--ctx 100000", "4096"]);
    let out = cardinal(&[
        "plan",
        "--model",
        "synthetic:granite-3b",
        "--ctx",
        "4096",
        "--users",
        "100000000",
    ]);
    assert_fails(&out, 1, &["100000000 users", "65536"]);
}

#[test]
fn tokenize_shows_no_weight_progress() {
    let out = cardinal(&["tokenize", "--model", &tiny_granite(), "hello world"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "261 310 404\n");
    assert!(!stderr.contains("loading weights"), "{stderr}");
    // A synthetic model has no tokenizer: said before building any weights.
    let out = cardinal(&["tokenize", "--model", "synthetic:tiny", "hi"]);
    let stderr = assert_fails(&out, 1, &["synthetic:tiny has no tokenizer"]);
    assert!(!stderr.contains("building"), "{stderr}");
}

#[test]
fn logs_to_a_pipe_have_no_colour() {
    let out = cardinal(&[
        "generate",
        "--model",
        &tiny_granite(),
        "--threads",
        "1",
        "--prompt",
        "hello",
        "--max-tokens",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("INFO"),
        "a tracing line was logged: {stderr}"
    );
    assert!(!stderr.contains('\x1b'), "ANSI codes: {stderr:?}");
}

#[test]
fn json_request_logs_have_plain_fields() {
    let (mut child, rx) = serve_json(&[]);
    let mut lines = Vec::new();
    let mut wait_for = |f: &dyn Fn(&serde_json::Value) -> bool| -> Option<serde_json::Value> {
        let end = Instant::now() + Duration::from_secs(30);
        while let Ok(line) = rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
            lines.push(line.clone());
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && f(&v)
            {
                return Some(v);
            }
        }
        None
    };
    let listening = wait_for(&|v| {
        v["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("listening on http://"))
    });
    let request = listening.and_then(|v| {
        let msg = v["fields"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let addr = msg.trim_start_matches("listening on http://");
        let mut sock = std::net::TcpStream::connect(addr).ok()?;
        sock.write_all(b"GET /no/such/path HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut resp = String::new();
        let _ = sock.read_to_string(&mut resp);
        wait_for(&|v| v["fields"]["message"] == "request")
    });
    let _ = child.kill();
    let _ = child.wait();
    let log = lines.join("\n");
    let request = request.unwrap_or_else(|| panic!("no request log line: {log}"));
    let f = &request["fields"];
    assert_eq!(f["path"], "/no/such/path", "{request}");
    assert_eq!(f["method"], "GET", "{request}");
    assert_eq!(f["status"], 404, "{request}");
    assert!(
        f["ms"].as_f64().is_some_and(|ms| ms >= 0.0),
        "ms is a number: {request}"
    );
    assert!(!log.contains('\x1b'), "ANSI codes in JSON logs: {log:?}");
}
