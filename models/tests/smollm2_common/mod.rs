//! Shared by the SmolLM2 fixture tests: where llama.cpp's fixtures live
//! (`CARDINAL_FIXTURES_DIR`, else the copy in `tests/fixtures/smollm2`) and
//! the real model, fetched by the same code path users get unless
//! `CARDINAL_TEST_GGUF` names a file. Neither is ever silently skipped: a
//! missing fixture or model fails the test with a message.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

/// Path of `smollm2_public.json`.
pub fn fixtures_path() -> PathBuf {
    let name = "smollm2_public.json";
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut candidates = Vec::new();
    if let Some(d) = std::env::var_os("CARDINAL_FIXTURES_DIR") {
        candidates.push(PathBuf::from(d).join(name));
    }
    candidates.push(root.join("tests/fixtures/smollm2").join(name));
    match candidates.iter().find(|p| p.is_file()) {
        Some(p) => p.clone(),
        None => panic!("{name} not found; set CARDINAL_FIXTURES_DIR (looked at {candidates:?})"),
    }
}

/// The 12 fixture entries, parsed once.
pub fn fixtures() -> &'static Vec<serde_json::Value> {
    static F: OnceLock<Vec<serde_json::Value>> = OnceLock::new();
    F.get_or_init(|| {
        let p = fixtures_path();
        let text =
            std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
        let v: Vec<serde_json::Value> =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", p.display()));
        assert_eq!(
            v.len(),
            12,
            "expected 12 fixture prompts in {}",
            p.display()
        );
        v
    })
}

/// Path of the SmolLM2 GGUF.
pub fn model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("CARDINAL_TEST_GGUF") {
        return PathBuf::from(p);
    }
    cardinal_models::fetch::default_model_path(&mut |line| eprintln!("[fetch] {line}")).unwrap_or_else(|e| {
        panic!("the SmolLM2 test model is not available: {e}\n(set CARDINAL_TEST_GGUF=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf)")
    })
}
