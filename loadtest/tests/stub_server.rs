//! End-to-end tests of the load generator against the scripted stub server
//! in `common/`: measured TTFT, per-token ITL and token counts against the
//! script, every error class, server-side figures from /metrics, output
//! files, Ctrl-C, a server that dies mid-run, and the binary's exit code
//! against `--max-error-rate`.
//!
//! Tolerances. The stub sleeps with tokio timers (1 ms granularity, and a
//! sleep never ends early), and this 2-core machine may be compiling other
//! crates meanwhile, so single samples can be late by several ms but never
//! early. Medians are therefore checked one-sided-tight: TTFT p50 in
//! [scripted, scripted + 15 ms]; per-token ITL p50 within ±20 % of the
//! scripted per-token gap (a late chunk makes one gap longer and the next
//! shorter, so the error is symmetric); token counts exactly; server-side
//! ratios exactly (they are computed from the stub's own counters).

mod common;

use cardinal_loadtest::progress::ProgressMode;
use cardinal_loadtest::report::RunStatus;
use cardinal_loadtest::{Args, Report, run};
use clap::Parser;
use common::{Behavior, Script, Stub, refused_url};
use std::time::{Duration, Instant};
use tokio::sync::watch;

const BOUND: Duration = Duration::from_secs(25);

fn args(url: &str, extra: &[&str]) -> Args {
    let mut v = vec!["cardinal-loadtest", "--url", url, "--progress", "none"];
    v.extend_from_slice(extra);
    Args::try_parse_from(v).expect("valid flags")
}

async fn run_ok(a: Args) -> Report {
    let (_tx, rx) = watch::channel(false);
    tokio::time::timeout(BOUND, run(a, rx, ProgressMode::Quiet))
        .await
        .expect("run finished within the bound")
        .expect("run started")
}

fn within(v: f64, lo: f64, hi: f64, what: &str) {
    assert!(
        v >= lo && v <= hi,
        "{what} = {v}, expected within [{lo}, {hi}]"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_stream_matches_the_script() {
    let script = Script::default(); // TTFT 50 ms, 2-token chunks every 40 ms
    let n = script.output_tokens();
    let stub = Stub::start(script.clone()).await;
    let r = run_ok(args(
        &stub.url,
        &[
            "--concurrency",
            "2",
            "--requests",
            "8",
            "--output-tokens",
            &n.to_string(),
            "--input-tokens",
            "40",
            "--slo",
            "ttft=5000,itl=1000",
        ],
    ))
    .await;
    assert_eq!(r.status, RunStatus::Complete);
    let target = r.target.as_ref().unwrap();
    assert_eq!(target.model, "stub-model");
    assert_eq!(target.tokenize_available, Some(true));
    let l = &r.levels[0];
    let s = &l.stats;
    assert_eq!((s.requests, s.ok, s.errors.total), (8, 8, 0));
    assert_eq!(s.output_tokens, 8 * n);
    assert_eq!(s.token_count_source, "usage");
    assert!(s.continuous_usage);
    // Prompts were fitted with /tokenize: the stub counts 40 tokens exactly.
    assert_eq!(s.mean_input_tokens, 40.0);
    let ttft = s.ttft_ms.unwrap();
    within(ttft.p50, 50.0, 65.0, "TTFT p50");
    // 2 tokens per 40 ms chunk: 20 ms per token; N − 1 samples per request.
    let itl = s.itl_ms.unwrap();
    assert_eq!(itl.count, 8 * (n - 1));
    within(itl.p50, 16.0, 24.0, "ITL p50");
    within(itl.mean, 16.0, 24.0, "ITL mean");
    let tpot = s.tpot_ms.unwrap();
    within(tpot.p50, 16.0, 24.0, "TPOT p50");
    let e2e = s.e2e_ms.unwrap();
    within(e2e.p50, 250.0, 250.0 * 1.2, "E2E p50");
    let f = s.output_forcing.as_ref().unwrap();
    assert_eq!((f.honoured, f.of), (8, 8));
    assert_eq!(s.goodput.as_ref().unwrap().good_requests, 8);
    // Server side: the stub charges 0.5 J (cards) and 2 J (host) per token.
    let srv = &l.server;
    assert_eq!(srv.generation_tokens, Some((8 * n) as f64));
    assert_eq!(srv.joules_per_token_cards, Some(0.5));
    assert_eq!(srv.joules_per_token_host, Some(2.0));
    within(srv.ttft_mean_ms.unwrap(), 49.999, 50.001, "server TTFT");
    // The per-request usage.cardinal extension is aggregated per field.
    let ext = &s.usage_extension;
    assert_eq!(ext["cards_modeled_joules"].per_output_token, 0.5);
    assert_eq!(ext["host.joules"].requests, 8);
    assert_eq!(ext["host.joules"].per_output_token, 2.0);
    assert!(srv.generation_tok_s.unwrap() > 0.0);
    // The request asked for usage, continuous usage and length forcing.
    let body = stub.bodies().pop().unwrap();
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"]["include_usage"], true);
    assert_eq!(body["stream_options"]["continuous_usage_stats"], true);
    assert_eq!(body["max_tokens"], n);
    assert_eq!(body["min_tokens"], n);
    assert_eq!(body["ignore_eos"], true);
    assert_eq!(body["model"], "stub-model");
    assert!(body.get("temperature").is_none(), "not sent unless asked");
    let line = r.summary_line();
    assert!(
        line.starts_with("SUMMARY status=complete levels=1 requests=8 errors=0 "),
        "{line}"
    );
    assert!(line.contains("joules_per_token_cards=0.50000"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_without_usage_counts_chunks() {
    let script = Script {
        ttft_ms: 30,
        gap_ms: 20,
        chunks: 8,
        tokens_per_chunk: 1,
        continuous_usage: false,
        final_usage: false,
        tokenize: false,
        metrics: false,
        ..Script::default()
    };
    let stub = Stub::start(script).await;
    let r = run_ok(args(
        &stub.url,
        &[
            "--endpoint",
            "completions",
            "--requests",
            "4",
            "--model",
            "m",
        ],
    ))
    .await;
    let s = &r.levels[0].stats;
    assert_eq!((s.ok, s.errors.total), (4, 0));
    assert_eq!(s.token_count_source, "chunks");
    assert_eq!(s.output_tokens, 4 * 8);
    assert!(!s.continuous_usage);
    within(s.ttft_ms.unwrap().p50, 30.0, 45.0, "TTFT p50");
    within(s.itl_ms.unwrap().p50, 16.0, 24.0, "ITL p50");
    assert!(stub.bodies()[0].get("prompt").is_some());
    // No /tokenize and no /metrics: said so, and server figures are n/a.
    assert!(
        r.notes.iter().any(|n| n.contains("approximated")),
        "{:?}",
        r.notes
    );
    assert!(r.levels[0].server.generation_tok_s.is_none());
    assert!(r.table().contains("n/a"));
    assert!(r.summary_line().contains("server_tok_s=na"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_server_and_non_streaming() {
    // A server that rejects the vLLM extensions: the probe drops them, the
    // run goes on with max_tokens only, and the report says so.
    let script = Script {
        ttft_ms: 10,
        gap_ms: 10,
        reject_extensions: true,
        ..Script::default()
    };
    let stub = Stub::start(script.clone()).await;
    let r = run_ok(args(
        &stub.url,
        &[
            "--requests",
            "3",
            "--output-tokens",
            "11",
            "--temperature",
            "0",
        ],
    ))
    .await;
    let s = &r.levels[0].stats;
    assert_eq!((s.ok, s.errors.total), (3, 0));
    assert_eq!(r.target.as_ref().unwrap().temperature, Some(0.0));
    assert!(s.output_forcing.is_none());
    assert!(!r.target.as_ref().unwrap().length_forcing_sent);
    assert!(
        r.notes.iter().any(|n| n.contains("continuous_usage_stats")),
        "{:?}",
        r.notes
    );
    assert!(
        r.notes.iter().any(|n| n.contains("not forced")),
        "{:?}",
        r.notes
    );
    let last = stub.bodies().pop().unwrap();
    assert!(last.get("ignore_eos").is_none() && last["max_tokens"] == 11);
    assert_eq!(last["temperature"], 0.0);
    // Without streaming: E2E and usage counts, no TTFT or ITL.
    let stub = Stub::start(script).await;
    let r = run_ok(args(
        &stub.url,
        &[
            "--requests",
            "3",
            "--no-stream",
            "--no-extensions",
            "--slo",
            "ttft=10000",
        ],
    ))
    .await;
    let s = &r.levels[0].stats;
    assert_eq!(s.ok, 3);
    assert!(s.ttft_ms.is_none() && s.itl_ms.is_none());
    within(s.e2e_ms.unwrap().p50, 60.0, 80.0, "E2E p50");
    assert_eq!(s.output_tokens, 3 * 11);
    assert_eq!(s.token_count_source, "usage");
    assert_eq!(s.goodput.as_ref().unwrap().good_requests, 3);
    assert!(stub.bodies()[0].get("stream_options").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_class_is_counted() {
    let script = Script {
        ttft_ms: 10,
        gap_ms: 10,
        behaviors: vec![
            Behavior::Ok,
            Behavior::Status500,
            Behavior::Malformed,
            Behavior::CutBeforeDone,
            Behavior::EndWithoutDone,
            Behavior::Hang,
            Behavior::StreamError,
            Behavior::NoFinishReason,
        ],
        ..Script::default()
    };
    let stub = Stub::start(script).await;
    let r = run_ok(args(
        &stub.url,
        &["--requests", "8", "--timeout", "0.5", "--no-extensions"],
    ))
    .await;
    let e = &r.levels[0].stats.errors;
    assert_eq!(r.levels[0].stats.ok, 1, "{e:?}");
    assert_eq!(e.http_status, 1);
    assert_eq!(e.by_status.get(&500), Some(&1));
    assert_eq!(e.malformed_sse, 1);
    assert_eq!(e.early_end, 3, "cut, no [DONE], no finish_reason: {e:?}");
    assert_eq!(e.timeout, 1);
    assert_eq!(e.stream_error, 1);
    assert_eq!(e.connect, 0);
    assert_eq!(e.total, 7);
    let body = &stub.bodies()[0];
    assert!(body.get("ignore_eos").is_none() && body.get("min_tokens").is_none());
    assert!(r.details().contains("timeout=1"));

    let refused = refused_url().await;
    let r = run_ok(args(&refused, &["--requests", "5", "--model", "m"])).await;
    assert_eq!(r.levels[0].stats.errors.connect, 5);
    assert_eq!(r.levels[0].stats.ok, 0);
    assert!(r.summary_line().contains("errors=5"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_dies_mid_run_ends_with_a_report() {
    let script = Script {
        ttft_ms: 20,
        gap_ms: 20,
        die_at_request: Some(7),
        ..Script::default()
    };
    let stub = Stub::start(script).await;
    let t0 = Instant::now();
    // Completion requests 1 and 2 are the extension probe and the warmup,
    // so the level's 5th request kills the server.
    let r = run_ok(args(
        &stub.url,
        &[
            "--concurrency",
            "3",
            "--requests",
            "40",
            "--warmup",
            "1",
            "--timeout",
            "5",
        ],
    ))
    .await;
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
    let s = &r.levels[0].stats;
    assert_eq!(s.requests, 40);
    assert!(s.ok >= 1 && s.ok <= 4, "ok = {}", s.ok);
    assert!(s.errors.connect >= 30, "{:?}", s.errors);
    assert!(
        s.errors.early_end >= 1,
        "in-flight streams were cut: {:?}",
        s.errors
    );
    assert_eq!(r.status, RunStatus::Complete);
    // The metrics scrape after the level failed, so server figures are n/a.
    assert!(r.levels[0].server.generation_tok_s.is_none());

    // With a consecutive-error limit the sweep stops early and says so.
    let refused = refused_url().await;
    let t0 = Instant::now();
    let r = run_ok(args(
        &refused,
        &[
            "--model",
            "m",
            "--concurrency",
            "2,4",
            "--requests",
            "100000",
            "--max-consecutive-errors",
            "10",
        ],
    ))
    .await;
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert_eq!(r.status, RunStatus::Aborted);
    assert_eq!(r.levels.len(), 1);
    assert!(
        r.summary_line()
            .starts_with("SUMMARY status=aborted levels=1 ")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_signal_gives_a_partial_report() {
    let stub = Stub::start(Script::default()).await;
    let (tx, rx) = watch::channel(false);
    let a = args(&stub.url, &["--concurrency", "2,4", "--requests", "1000"]);
    let handle = tokio::spawn(run(a, rx, ProgressMode::Quiet));
    tokio::time::sleep(Duration::from_millis(900)).await;
    tx.send(true).unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), handle)
        .await
        .expect("stopped promptly")
        .unwrap()
        .unwrap();
    assert_eq!(r.status, RunStatus::Interrupted);
    assert_eq!(r.levels.len(), 1);
    let l = &r.levels[0];
    assert!(l.stats.ok >= 2 && l.stats.ok < 1000, "ok = {}", l.stats.ok);
    assert_eq!(l.stats.errors.total, 0, "cancelled requests are not errors");
    assert!(l.cancelled <= 2);
    assert!(r.summary_line().starts_with("SUMMARY status=interrupted"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_mode_paces_arrivals() {
    let script = Script {
        ttft_ms: 10,
        gap_ms: 10,
        chunks: 3,
        ..Script::default()
    };
    let stub = Stub::start(script).await;
    // Constant arrivals at 20/s: 10 requests are sent over 0.45 s.
    let r = run_ok(args(
        &stub.url,
        &["--rate", "20", "--arrival", "constant", "--requests", "10"],
    ))
    .await;
    let l = &r.levels[0];
    assert_eq!((l.stats.ok, l.dispatched), (10, 10));
    within(l.stats.wall_s, 0.45, 0.9, "wall");
    // A duration bound stops a slow Poisson level early; ramp-up is accepted.
    let r = run_ok(args(
        &stub.url,
        &[
            "--rate",
            "5",
            "--requests",
            "1000",
            "--duration",
            "0.6",
            "--ramp-up",
            "0.2",
            "--seed",
            "3",
        ],
    ))
    .await;
    let l = &r.levels[0];
    assert_eq!(format!("{:?}", l.stop_reason), "Duration");
    assert!(l.dispatched >= 1 && l.dispatched < 15, "{}", l.dispatched);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_writes_reports_and_plots() {
    let script = Script {
        ttft_ms: 10,
        gap_ms: 10,
        ..Script::default()
    };
    let stub = Stub::start(script).await;
    let dir = std::env::temp_dir().join(format!("loadtest-out-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let r = run_ok(args(
        &stub.url,
        &[
            "--concurrency",
            "1,3",
            "--requests",
            "6",
            "--dataset",
            &write_dataset(&dir),
            "--seed",
            "9",
        ],
    ))
    .await;
    assert_eq!(r.levels.len(), 2);
    assert_eq!(r.levels[1].concurrency, Some(3));
    let out = dir.join("out");
    r.write_dir(&out).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(json["config"]["concurrency"], serde_json::json!([1, 3]));
    assert_eq!(json["levels"][1]["ok"], 6);
    assert!(json["levels"][0]["ttft_ms"]["p99"].as_f64().unwrap() > 0.0);
    let csv = std::fs::read_to_string(out.join("report.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3);
    for svg in ["latency_vs_throughput.svg", "ttft_cdf.svg", "itl_cdf.svg"] {
        let text = std::fs::read_to_string(out.join(svg)).unwrap();
        assert!(text.contains("<svg") && text.contains("</svg>"), "{svg}");
        assert!(text.contains("c=3"), "{svg} labels the levels");
    }
    // Dataset prompts were sent as chat messages.
    let bodies = stub.bodies();
    let contents: Vec<&str> = bodies
        .iter()
        .filter_map(|b| b["messages"][0]["content"].as_str())
        .collect();
    assert!(contents.contains(&"first question") && contents.contains(&"second question"));
    let _ = std::fs::remove_dir_all(&dir);
}

fn write_dataset(dir: &std::path::Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join("data.jsonl");
    std::fs::write(
        &p,
        "{\"prompt\": \"first question\"}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"second question\"}]}\n",
    )
    .unwrap();
    p.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_prints_table_then_summary_last() {
    let script = Script {
        ttft_ms: 10,
        gap_ms: 10,
        ..Script::default()
    };
    let stub = Stub::start(script).await;
    let url = stub.url.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_cardinal-loadtest"))
            .args(["--url", &url, "--concurrency", "1,2", "--requests", "3"])
            .env("CI", "true")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last = stdout.lines().last().unwrap();
    assert!(
        last.starts_with("SUMMARY status=complete levels=2 requests=6 errors=0 output_tok_s="),
        "{last}"
    );
    assert!(stdout.contains("TTFT p50") && stdout.contains("c=2"));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("[c=1]"),
        "plain progress lines under CI=true: {stderr}"
    );
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_cardinal-loadtest"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    assert!(help.contains("inter-token latency, per token") && help.contains("SUMMARY status="));
}

/// Runs the binary against `url` with `extra` flags; returns the exit code,
/// stdout and stderr.
async fn run_binary(url: &str, extra: &[&str]) -> (Option<i32>, String, String) {
    let mut v: Vec<String> = ["--url", url, "--progress", "none", "--no-extensions"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_cardinal-loadtest"))
            .args(&v)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    (
        out.status.code(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_exits_1_when_requests_fail_beyond_the_error_budget() {
    // Every request fails: exit 1 with the default budget of 0, a clear
    // stderr line, and the report files still written.
    let failing = Stub::start(Script {
        ttft_ms: 5,
        gap_ms: 5,
        behaviors: vec![Behavior::Status500],
        ..Script::default()
    })
    .await;
    let dir = std::env::temp_dir().join(format!("loadtest-budget-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out_dir = dir.display().to_string();
    let (code, stdout, stderr) =
        run_binary(&failing.url, &["--requests", "2", "--out", &out_dir]).await;
    assert_eq!(code, Some(1), "stdout: {stdout}\nstderr: {stderr}");
    let last = stdout.lines().last().unwrap();
    assert!(
        last.starts_with("SUMMARY status=complete levels=1 requests=2 errors=2 "),
        "{last}"
    );
    assert!(
        stderr.contains("error: 2 of 2 requests failed (100.0%), more than --max-error-rate 0"),
        "{stderr}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(json["config"]["max_error_rate"], 0.0);
    assert!(json["notes"].to_string().contains("exit code 1"), "{json}");
    let _ = std::fs::remove_dir_all(&dir);
    // --max-error-rate 1 tolerates every failure.
    let (code, _, stderr) =
        run_binary(&failing.url, &["--requests", "2", "--max-error-rate", "1"]).await;
    assert_eq!(code, Some(0), "{stderr}");

    // Half the requests fail (the stub alternates ok and 500 at
    // concurrency 1): a budget of exactly 0.5 passes, 0.25 does not.
    let half = Stub::start(Script {
        ttft_ms: 5,
        gap_ms: 5,
        behaviors: vec![Behavior::Ok, Behavior::Status500],
        ..Script::default()
    })
    .await;
    let (code, stdout, stderr) =
        run_binary(&half.url, &["--requests", "4", "--max-error-rate", "0.5"]).await;
    assert_eq!(code, Some(0), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("requests=4 errors=2 "), "{stdout}");
    let (code, _, stderr) =
        run_binary(&half.url, &["--requests", "4", "--max-error-rate", "0.25"]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("2 of 4 requests failed (50.0%)"),
        "{stderr}"
    );

    // No failure: exit 0 with the default budget.
    let healthy = Stub::start(Script {
        ttft_ms: 5,
        gap_ms: 5,
        ..Script::default()
    })
    .await;
    let (code, stdout, stderr) = run_binary(&healthy.url, &["--requests", "2"]).await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert!(stdout.contains("requests=2 errors=0 "), "{stdout}");
    assert!(!stderr.contains("--max-error-rate"), "{stderr}");

    // A budget outside [0, 1] is refused before anything is sent.
    let (code, _, stderr) = run_binary(&healthy.url, &["--max-error-rate", "1.5"]).await;
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("--max-error-rate") && stderr.contains("1.5 is outside [0, 1]"),
        "{stderr}"
    );
}
