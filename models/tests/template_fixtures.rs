//! Chat templates against the reference prompts of `smollm2_public.json`
//! (the GGUF's own template rendered by Python Jinja2), Python-compatible
//! helpers (`tojson`, `raise_exception`, string methods), and the sandbox:
//! hostile templates must fail fast instead of hanging (fuel, recursion
//! limit, output cap, and the render memory budget for a string doubling).
//!
//! The model and fixtures are found as `smollm2_common` says. Nothing is
//! skipped.

mod smollm2_common;

use smollm2_common::{fixtures, model_path};

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file::Content;
use cardinal_models::ModelError;
use cardinal_models::template::{ChatMessage, ChatTemplate};
use cardinal_models::tokenizer::Tokenizer;

fn tok() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let p = model_path();
        let mut f =
            std::fs::File::open(&p).unwrap_or_else(|e| panic!("opening {}: {e}", p.display()));
        let md = Content::read(&mut f)
            .unwrap_or_else(|e| panic!("reading GGUF metadata of {}: {e}", p.display()))
            .metadata;
        Tokenizer::from_gguf_metadata(&md).expect("tokenizer from GGUF metadata")
    })
}

/// The GGUF's template with its BOS/EOS strings, as the loader builds it.
fn model_template() -> ChatTemplate {
    let t = tok();
    let src = t
        .chat_template()
        .expect("the SmolLM2 GGUF has a chat template");
    let bos = t.bos_id().and_then(|i| t.token_str(i)).unwrap_or_default();
    let eos = t
        .eos_ids()
        .first()
        .and_then(|&i| t.token_str(i))
        .unwrap_or_default();
    ChatTemplate::new(src, &bos, &eos).expect("the GGUF template compiles")
}

fn messages(v: &serde_json::Value) -> Vec<ChatMessage> {
    serde_json::from_value(v.clone()).expect("chat_messages are role/content objects")
}

#[test]
fn gguf_template_matches_all_fixtures() {
    let tmpl = model_template();
    for e in fixtures() {
        let name = e["name"].as_str().unwrap();
        let got = tmpl.render(&messages(&e["chat_messages"]), true).unwrap();
        assert_eq!(
            got,
            e["templated_prompt"].as_str().unwrap(),
            "templated prompt of {name}"
        );
    }
}

#[test]
fn generation_prompt_and_chatml_fallback() {
    let tmpl = model_template();
    let msgs = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "Hi"),
    ];
    let with = tmpl.render(&msgs, true).unwrap();
    let without = tmpl.render(&msgs, false).unwrap();
    assert_eq!(format!("{without}<|im_start|>assistant\n"), with);
    // SmolLM2's template is ChatML with a default system prompt; with a
    // system message present the fallback renders the same text.
    assert_eq!(ChatTemplate::chatml().render(&msgs, true).unwrap(), with);
    assert_eq!(ChatTemplate::chatml().render(&[], false).unwrap(), "");
}

#[test]
fn python_compatible_helpers() {
    let render = |src: &str, msgs: &[ChatMessage]| {
        ChatTemplate::new(src, "<s>", "</s>")
            .unwrap()
            .render(msgs, false)
    };
    let m = [ChatMessage::new("user", "  It's <b>\"x\" & y</b> 😀\n ")];

    let out = render("{{ messages[0].content | tojson }}", &m).unwrap();
    assert_eq!(out, r#""  It's <b>\"x\" & y</b> 😀\n ""#);
    let out = render("{{ messages[0] | tojson }}", &m).unwrap();
    assert_eq!(
        out,
        r#"{"role": "user", "content": "  It's <b>\"x\" & y</b> 😀\n "}"#
    );
    let out = render(
        "{{ {'b': [1, 2.5, none, true], 'a': {}} | tojson(indent=2) }}",
        &[],
    )
    .unwrap();
    assert_eq!(
        out,
        "{\n  \"b\": [\n    1,\n    2.5,\n    null,\n    true\n  ],\n  \"a\": {}\n}"
    );
    let out = render(
        "{{ {'b': 1, 'a': 'é'} | tojson(sort_keys=true, ensure_ascii=true) }}",
        &[],
    )
    .unwrap();
    assert_eq!(out, r#"{"a": "\u00e9", "b": 1}"#);
    let out = render("{{ [1, 2] | tojson(separators=(',', ':')) }}", &[]).unwrap();
    assert_eq!(out, "[1,2]");

    let out = render(
        "{{ messages[0].content.strip() }}|{{ 'a,b'.split(',') | join('+') }}",
        &m,
    )
    .unwrap();
    assert_eq!(out, "It's <b>\"x\" & y</b> 😀|a+b");
    let out = render("{{ bos_token }}{{ eos_token }}{{ undefined_thing }}", &[]).unwrap();
    assert_eq!(out, "<s></s>");
    let out = render("{{ strftime_now('%Y') }}", &[]).unwrap();
    assert!(out.len() == 4 && out.starts_with("20"), "{out}");

    // trim_blocks and lstrip_blocks, as in Hugging Face.
    let out = render("{% for m in messages %}\n    {% if true %}\n[{{ m.role }}]\n    {% endif %}\n{% endfor %}\n", &m)
        .unwrap();
    assert_eq!(out, "[user]\n");
}

#[test]
fn raise_exception_and_compile_errors_are_template_errors() {
    let tmpl = ChatTemplate::new(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with a user message') }}{% endif %}ok",
        "",
        "",
    )
    .unwrap();
    assert_eq!(
        tmpl.render(&[ChatMessage::new("user", "x")], true).unwrap(),
        "ok"
    );
    let err = tmpl
        .render(&[ChatMessage::new("assistant", "x")], true)
        .unwrap_err();
    match err {
        ModelError::Template(m) => {
            assert!(
                m.contains("Conversations must start with a user message"),
                "{m}"
            )
        }
        other => panic!("expected a template error, got {other:?}"),
    }

    let err = ChatTemplate::new("line one\n{% for m in messages %}{{ m }", "", "").unwrap_err();
    match err {
        ModelError::Template(m) => assert!(m.contains("line 2"), "{m}"),
        other => panic!("expected a template error, got {other:?}"),
    }
    let big = "x".repeat(2 << 20);
    let err = ChatTemplate::new(&big, "", "").unwrap_err().to_string();
    assert!(err.contains("1048576"), "{err}");
}

/// Renders a hostile template on a separate thread with a deadline, so a
/// regression shows as a failure instead of a hung test run.
fn hostile(src: &str) -> (String, Duration) {
    let src = src.to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let start = Instant::now();
        let r = ChatTemplate::new(&src, "", "")
            .and_then(|t| t.render(&[ChatMessage::new("user", "hi")], true));
        let _ = tx.send((r, start.elapsed()));
    });
    let (r, took) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the hostile template did not finish within 10 s");
    let err = r.expect_err("a hostile template must fail");
    assert!(
        matches!(
            err,
            ModelError::Template(_) | ModelError::TemplateStopped(_)
        ),
        "{err:?}"
    );
    assert!(took < Duration::from_secs(2), "took {took:?}: {err}");
    (err.to_string(), took)
}

#[test]
fn hostile_templates_fail_fast() {
    let cases = [
        (
            "huge range",
            "{% for i in range(1000000000) %}x{% endfor %}",
        ),
        (
            "nested loops",
            "{% for i in range(10000) %}{% for j in range(10000) %}{{ i }}{% endfor %}{% endfor %}",
        ),
        (
            "recursive macro",
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        ),
        (
            "output bomb",
            "{% for i in range(10000) %}{{ 'x' * 100000 }}{% endfor %}",
        ),
        (
            "memory bomb",
            "{% set s = namespace(x='y') %}{% for i in range(60) %}{% set s.x = s.x ~ s.x %}{% endfor %}{{ s.x | length }}",
        ),
        (
            "busy loops",
            "{% set ns = namespace(n=0) %}{% for i in range(10000) %}{% for j in range(10000) %}{% set ns.n = ns.n + 1 %}{% endfor %}{% endfor %}{{ ns.n }}",
        ),
        (
            "recursive loop",
            "{% for a in [1] recursive %}{{ loop([a]) }}{% endfor %}",
        ),
    ];
    for (name, src) in cases {
        let (err, took) = hostile(src);
        eprintln!("{name}: {took:?}: {err}");
    }
    let (err, _) = hostile(cases[3].1);
    assert!(err.contains("1048576"), "output cap: {err}");
    let (err, _) = hostile(cases[5].1);
    assert!(err.contains("fuel"), "fuel: {err}");
    let (err, _) = hostile(cases[2].1);
    assert!(err.contains("recursion"), "{err}");
    // Doubling a string grows faster than fuel is charged for the bytes
    // produced: the render sandbox's memory budget stops it.
    let (err, _) = hostile(cases[4].1);
    assert!(err.contains("memory budget"), "memory budget: {err}");
    let (err, _) = hostile(cases[6].1);
    assert!(err.contains("recursion"), "{err}");
}
