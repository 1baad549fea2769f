//! Hostile text on the way in and out, with proptest. Chat templates (the
//! tiny-granite model's own, ChatML, and a Llama-3-style one using
//! `namespace`, `tojson`, `trim` and `raise_exception`) render hostile
//! conversations (template syntax, special-token text and control
//! characters in roles and content, long and over-limit content) without
//! panicking, within a bounded time and output size, and never evaluate
//! what a message says; the rendered prompt then round-trips through the
//! tokenizer. The incremental detokenizer, both its byte-level path and its
//! window path, takes arbitrary ids (out-of-range ones included): no panic,
//! an error exactly for the out-of-range ids, and pieces that add up to
//! `decode` of the valid ids. Last, memory bombs that escape minijinja's
//! fuel (a list doubled past its lazy-concatenation depth, and others):
//! the render sandbox stops each within seconds, with an error naming the
//! memory budget, without the process growing past the budget, and the
//! template is disabled so later renders fail at once.

use std::cell::Cell;
use std::path::Path;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use cardinal_models::sandbox::Limits;
use cardinal_models::template::{ChatMessage, ChatTemplate, MAX_OUTPUT_BYTES, RENDER_MEMORY_BYTES};
use cardinal_models::tokenizer::{IncrementalDecoder, Tokenizer};
use cardinal_models::{LoadOptions, LoadedModel, ModelError, ModelSource};
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};

const TINY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../models/tests/fixtures/tiny-granite"
);

/// A Llama-3-style template: a system prompt pulled out with `namespace`,
/// content trimmed, tool results as JSON, and roles checked.
const LLAMA3_STYLE: &str = r#"{{- bos_token }}
{%- set ns = namespace(system='') %}
{%- for m in messages %}
{%- if m['role'] == 'system' %}{% set ns.system = ns.system ~ m['content'] | trim %}{% endif %}
{%- endfor %}
{%- if ns.system %}<|start_header_id|>system<|end_header_id|>

{{ ns.system }}<|eot_id|>{% endif %}
{%- for m in messages %}
{%- if m['role'] not in ['system', 'user', 'assistant', 'tool'] %}{{ raise_exception('unknown role ' ~ m['role']) }}{% endif %}
{%- if m['role'] == 'tool' %}<|start_header_id|>ipython<|end_header_id|>

{{ {'output': m['content']} | tojson }}<|eot_id|>
{%- elif m['role'] != 'system' %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>

{{ m['content'] | trim }}<|eot_id|>
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"#;

fn tiny() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| {
        cardinal_models::load(
            &ModelSource::HfDir(TINY.into()),
            &LoadOptions::default(),
            &mut |_| {},
        )
        .expect("tiny-granite loads")
    })
}

/// A copy of tiny-granite's tokenizer whose decoder is a one-item sequence
/// around the byte-level one: the same text, but not recognised as plain
/// byte-level, so the incremental decoder takes its window path.
fn window_tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("cardinal-fuzz-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = Path::new(TINY);
        let mut tj: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap())
                .unwrap();
        let inner = tj["decoder"].take();
        tj["decoder"] = serde_json::json!({"type": "Sequence", "decoders": [inner]});
        std::fs::write(dir.join("tokenizer.json"), tj.to_string()).unwrap();
        std::fs::copy(
            src.join("tokenizer_config.json"),
            dir.join("tokenizer_config.json"),
        )
        .unwrap();
        let tok = Tokenizer::from_hf_dir(&dir).expect("window tokenizer");
        let _ = std::fs::remove_dir_all(&dir);
        tok
    })
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    })
}

/// Hostile text: template syntax, special tokens, control characters,
/// bidi and zero-width characters, and long repeats (some past the
/// rendered-prompt limit).
fn hostile_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("{{ 7 * 7 }}".to_string()),
        Just("{% for i in range(99999999) %}x{% endfor %}".to_string()),
        Just("{% raw %}{{{#".to_string()),
        Just("<|end_of_text|>".to_string()),
        Just("<|start_of_role|>system<|end_of_role|>".to_string()),
        Just("<|eot_id|><|start_header_id|>".to_string()),
        Just("\u{0}\u{7}\u{1b}[2J\r\n\t\u{7f}".to_string()),
        Just("\u{202e}\u{200b}\u{feff}\u{fffd}".to_string()),
        Just("é😀ß中".to_string()),
        Just("   ".to_string()),
        "\\PC{0,20}",
        any::<String>(),
    ];
    let repeat = prop_oneof![
        16 => 1usize..4,
        4 => 100usize..2000,
        1 => Just(60_000usize),
    ];
    prop::collection::vec((piece, repeat), 0..4).prop_map(|parts| {
        parts
            .into_iter()
            .map(|(p, n)| p.repeat(n))
            .collect::<String>()
    })
}

fn hostile_messages() -> impl Strategy<Value = Vec<ChatMessage>> {
    let role = prop_oneof![
        4 => prop::sample::select(vec!["system", "user", "assistant", "tool"]).prop_map(str::to_string),
        1 => hostile_text(),
    ];
    prop::collection::vec(
        (role, hostile_text()).prop_map(|(r, c)| ChatMessage::new(r, c)),
        0..6,
    )
}

#[test]
fn templates_render_hostile_messages_safely() {
    let granite = tiny()
        .template
        .clone()
        .expect("tiny-granite has a template");
    let templates = [
        ("tiny-granite", granite, true),
        ("chatml", ChatTemplate::chatml(), true),
        (
            "llama3-style",
            ChatTemplate::new(LLAMA3_STYLE, "<|begin_of_text|>", "<|eot_id|>").unwrap(),
            false,
        ),
    ];
    let tok = tiny().tokenizer().unwrap();
    for (name, tmpl, verbatim) in templates {
        let (ok, refused) = (Cell::new(0usize), Cell::new(0usize));
        let (slowest, biggest) = (Cell::new(Duration::ZERO), Cell::new(0usize));
        let t0 = Instant::now();
        let result = runner(256).run(&(hostile_messages(), any::<bool>()), |(msgs, add_gen)| {
            let t = Instant::now();
            let r = tmpl.render(&msgs, add_gen);
            let took = t.elapsed();
            slowest.set(slowest.get().max(took));
            prop_assert!(
                took < Duration::from_secs(2),
                "{name}: render took {took:?}"
            );
            match r {
                Err(e) => {
                    refused.set(refused.get() + 1);
                    prop_assert!(!e.to_string().is_empty());
                }
                Ok(out) => {
                    ok.set(ok.get() + 1);
                    biggest.set(biggest.get().max(out.len()));
                    prop_assert!(
                        out.len() <= MAX_OUTPUT_BYTES + 64,
                        "{name}: {} bytes",
                        out.len()
                    );
                    if verbatim {
                        // What a message says is copied, never evaluated.
                        for m in &msgs {
                            prop_assert!(out.contains(&m.content), "{name}: content lost");
                            prop_assert!(out.contains(&m.role), "{name}: role lost");
                        }
                    }
                    // The prompt goes through the tokenizer and back (the
                    // larger ones too slowly for a test, in a dev build).
                    if out.len() > 64 << 10 {
                        return Ok(());
                    }
                    let ids = tok
                        .encode(&out, true)
                        .map_err(|e| TestCaseError::fail(format!("encode: {e}")))?;
                    let back = tok
                        .decode(&ids, false)
                        .map_err(|e| TestCaseError::fail(format!("decode: {e}")))?;
                    prop_assert_eq!(back, out, "{} does not round-trip", name);
                }
            }
            Ok(())
        });
        eprintln!(
            "template {name}: 256 hostile conversations in {:.1} s: {} rendered (largest {} bytes), \
             {} refused with an error; slowest render {:.1} ms, most memory {:.1} MiB",
            t0.elapsed().as_secs_f64(),
            ok.get(),
            biggest.get(),
            refused.get(),
            slowest.get().as_secs_f64() * 1e3,
            tmpl.peak_render_bytes() as f64 / (1 << 20) as f64
        );
        if let Err(e) = result {
            panic!("{name}: {e}");
        }
        // Real templates stay far from the render memory budget.
        assert!(
            tmpl.peak_render_bytes() < RENDER_MEMORY_BYTES / 4,
            "{name}: a render held {} bytes",
            tmpl.peak_render_bytes()
        );
    }
}

/// Ids: mostly in the vocabulary (special ones and single bytes often),
/// some just past it, a few anywhere.
fn ids(vocab: u32) -> impl Strategy<Value = Vec<u32>> {
    let id = prop_oneof![
        6 => 0..vocab,
        2 => 0u32..4,
        1 => vocab..vocab + 64,
        1 => any::<u32>(),
    ];
    prop::collection::vec(id, 0..48)
}

fn check_decoder(name: &str, tok: &Tokenizer, cases: u32) {
    let vocab = tok.vocab_size() as u32;
    let t0 = Instant::now();
    let (out_of_range, with_fffd) = (Cell::new(0usize), Cell::new(0usize));
    let result = runner(cases).run(&(ids(vocab), any::<bool>()), |(ids, skip)| {
        let mut d = IncrementalDecoder::new(tok, skip);
        let mut text = String::new();
        let mut valid = Vec::new();
        for &id in &ids {
            match d.push(id) {
                Ok(piece) => {
                    prop_assert!(id < vocab, "{name}: id {id} accepted");
                    valid.push(id);
                    text.push_str(&piece);
                }
                Err(_) => {
                    prop_assert!(id >= vocab, "{name}: id {id} refused");
                    out_of_range.set(out_of_range.get() + 1);
                }
            }
        }
        text.push_str(&d.finish().map_err(|e| TestCaseError::fail(e.to_string()))?);
        let whole = tok
            .decode(&valid, skip)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        with_fffd.set(with_fffd.get() + usize::from(whole.contains('\u{FFFD}')));
        prop_assert_eq!(
            &text,
            &whole,
            "{}: pieces differ from decode({:?})",
            name,
            valid
        );
        // After finish the decoder starts afresh.
        let again = d.push(valid.first().copied().unwrap_or(0));
        prop_assert!(again.is_ok());
        Ok(())
    });
    eprintln!(
        "detokenizer ({name}): {cases} id sequences in {:.1} s, {} out-of-range ids refused, \
         {} sequences with invalid UTF-8 (U+FFFD) decoded the same piecewise",
        t0.elapsed().as_secs_f64(),
        out_of_range.get(),
        with_fffd.get()
    );
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

#[test]
fn incremental_decoder_byte_level_path() {
    check_decoder("byte-level", tiny().tokenizer().unwrap(), 1024);
}

#[test]
fn incremental_decoder_window_path() {
    check_decoder("window", window_tokenizer(), 512);
}

/// Memory bombs run one test at a time, so the RSS measured around one
/// is not another's. (Stopped render threads keep what they hold, at most
/// their budget, for the life of the process.)
static BOMBS: Mutex<()> = Mutex::new(());

fn bomb_lane() -> std::sync::MutexGuard<'static, ()> {
    BOMBS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// This process's resident set size, from /proc/self/status.
fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib << 10
}

/// minijinja keeps `list + list` lazy until the chain is 32 deep, then
/// copies every item into a new list without charging fuel: 40 doublings
/// ask for 2^40 items. The render sandbox's memory budget stops it.
const LIST_DOUBLING: &str = "{% set ns = namespace(l=[1]) %}{% for i in range(40) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l | length }}";

fn hi() -> [ChatMessage; 1] {
    [ChatMessage::new("user", "hi")]
}

#[test]
fn list_doubling_template_is_stopped() {
    let _lane = bomb_lane();
    // The default memory budget, but a time limit long enough that the
    // budget, not the clock, stops this bomb however slow the machine is.
    // (With the default time limit as well, whichever comes first stops
    // it: see the HTTP test in http_api_limits.rs.)
    let limits = Limits {
        memory_bytes: RENDER_MEMORY_BYTES,
        timeout: Duration::from_secs(60),
    };
    let t = ChatTemplate::with_limits(LIST_DOUBLING, "", "", limits).unwrap();
    let rss0 = rss_bytes();
    let t0 = Instant::now();
    let err = t.render(&hi(), true).expect_err("the render is refused");
    let took = t0.elapsed();
    let grew = rss_bytes().saturating_sub(rss0);
    let msg = err.to_string();
    eprintln!(
        "list doubling: refused in {:.0} ms, RSS grew {:.1} MiB (budget {} MiB): {msg}",
        took.as_secs_f64() * 1e3,
        grew as f64 / (1 << 20) as f64,
        RENDER_MEMORY_BYTES >> 20
    );
    assert!(
        matches!(err, ModelError::TemplateStopped(_)),
        "stopped by the sandbox: {err:?}"
    );
    assert!(msg.contains("memory budget"), "{msg}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(
        grew < RENDER_MEMORY_BYTES + (64 << 20),
        "RSS grew by {grew} bytes"
    );
    // The template is now disabled: the next render fails at once, for the
    // same reason, and leaves no other thread behind.
    let t1 = Instant::now();
    let again = t.render(&hi(), false).expect_err("disabled");
    assert!(
        t1.elapsed() < Duration::from_millis(100),
        "{:?}",
        t1.elapsed()
    );
    let again = again.to_string();
    assert!(
        again.contains("disabled") && again.contains("memory budget"),
        "{again}"
    );
    assert!(t.disabled().is_some());
}

#[test]
fn a_disabled_template_fails_fast_everywhere() {
    let _lane = bomb_lane();
    let limits = Limits {
        memory_bytes: 16 << 20,
        timeout: Duration::from_secs(2),
    };
    let t = ChatTemplate::with_limits(LIST_DOUBLING, "", "", limits).unwrap();
    let copy = t.clone();
    let first = t.render(&hi(), true).unwrap_err().to_string();
    assert!(first.contains("memory budget of 16.0 MiB"), "{first}");
    // Clones share the state; many threads at once all fail at once.
    let t0 = Instant::now();
    let errors: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| s.spawn(|| copy.render(&hi(), true).unwrap_err().to_string()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let took = t0.elapsed();
    eprintln!(
        "8 renders of a disabled template in {:.2} ms",
        took.as_secs_f64() * 1e3
    );
    assert!(took < Duration::from_millis(200), "{took:?}");
    for e in errors {
        assert!(
            e.starts_with(
                "chat template: disabled: an earlier render was stopped at its memory budget"
            ),
            "{e}"
        );
    }
    // A slow render is stopped by the time limit and disables its template.
    let slow = ChatTemplate::with_limits(
        "{% for i in range(100000) %}{{ i }}{% endfor %}",
        "",
        "",
        Limits {
            memory_bytes: 64 << 20,
            timeout: Duration::from_millis(1),
        },
    )
    .unwrap();
    let e = slow.render(&hi(), true).unwrap_err().to_string();
    assert!(e.contains("time limit of 0.001 s"), "{e}");
    let e = slow.render(&hi(), true).unwrap_err().to_string();
    assert!(e.contains("disabled") && e.contains("time limit"), "{e}");
}

#[test]
fn other_memory_bombs_are_stopped() {
    let _lane = bomb_lane();
    let limits = Limits {
        memory_bytes: 32 << 20,
        timeout: Duration::from_secs(2),
    };
    let bombs = [
        (
            "string doubling (~)",
            "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}",
        ),
        (
            "string doubling (+)",
            "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s | length }}",
        ),
        ("string repeat", "{{ ('x' * 999999999) | length }}"),
        ("list repeat", "{{ ([1] * 999999999) | list | length }}"),
        (
            "list repeat joined",
            "{{ (['xxxxxxxx'] * 99999999) | join | length }}",
        ),
        ("huge range", "{{ range(999999999) | list | length }}"),
        (
            "list doubling, sorted",
            "{% set ns = namespace(l=[3, 1]) %}{% for i in range(40) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l | sort | length }}",
        ),
        (
            "list of lists",
            "{% set ns = namespace(l=[[1, 2, 3, 4]]) %}{% for i in range(40) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l | map('length') | sum }}",
        ),
    ];
    for (name, src) in bombs {
        let t = ChatTemplate::with_limits(src, "", "", limits).unwrap();
        let t0 = Instant::now();
        let r = t.render(&hi(), true);
        let took = t0.elapsed();
        let err = r.expect_err(name);
        eprintln!(
            "{name}: refused in {:.0} ms: {err}",
            took.as_secs_f64() * 1e3
        );
        assert!(took < Duration::from_secs(3), "{name}: took {took:?}");
    }
}
