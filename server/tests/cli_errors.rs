//! The `cardinal` binary on bad input: an empty prompt, a model path that
//! does not exist, a plan with too few cards and an out-of-range
//! `--prefill-chunk` each exit non-zero with one
//! clear line on stderr (exit 2 for the plan, as scripts rely on), and never
//! a panic.

use std::process::{Command, Output};

fn cardinal(args: &[&str]) -> Output {
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
    ] {
        cmd.env_remove(var);
    }
    cmd.output().expect("the cardinal binary runs")
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
