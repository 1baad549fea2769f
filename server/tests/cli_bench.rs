//! `cardinal bench --json` on a synthetic model: the fields scripts read
//! (issue 2's `prefill_tokens_per_second`, `decode_tokens_per_second`,
//! `peak_rss_bytes`, `isa`, `threads`) are present and measured, for one
//! stream and for concurrent streams, where the all-streams decode rate and
//! the span rate are both reported.

use std::process::Command;

use serde_json::Value;

fn bench(extra: &[&str]) -> Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cardinal"));
    cmd.args([
        "bench",
        "--model",
        "synthetic:tiny",
        "--threads",
        "2",
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "24",
        "--reps",
        "1",
        "--json",
    ])
    .args(extra);
    for var in [
        "CARDINAL_MODEL",
        "CARDINAL_CARDS",
        "CARDINAL_CARD_SPEC",
        "CARDINAL_ISA",
    ] {
        cmd.env_remove(var);
    }
    let out = cmd.output().expect("the cardinal binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("not one JSON object ({e}): {stdout}"))
}

fn positive(v: &Value, key: &str) -> f64 {
    let x = v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing: {v}"));
    assert!(x > 0.0 && x.is_finite(), "{key} = {x}");
    x
}

#[test]
fn single_stream_fields() {
    let v = bench(&[]);
    positive(&v, "prefill_tokens_per_second");
    positive(&v, "decode_tokens_per_second");
    positive(&v, "peak_rss_bytes");
    assert_eq!(v["threads"], 2);
    assert_eq!(v["concurrency"], 1);
    assert!(!v["isa"].as_str().unwrap_or("").is_empty(), "{v}");
}

#[test]
fn concurrent_streams_report_both_decode_rates() {
    let v = bench(&["--concurrency", "4"]);
    positive(&v, "decode_tokens_per_second");
    positive(&v, "decode_span_tokens_per_second");
    positive(&v, "measured_tokens_per_second");
    assert_eq!(v["concurrency"], 4);
}
