//! The tokenizer against llama.cpp's reference ids for SmolLM2-135M-Instruct
//! (`smollm2_public.json`): raw and templated encodings, decode round-trips,
//! the Hugging Face `tokenizer.json` path, and the streaming decoder.
//!
//! The model and fixtures are found as `smollm2_common` says (the fixtures
//! from `CARDINAL_FIXTURES_DIR` or `tests/fixtures/smollm2`; the model from
//! `CARDINAL_TEST_GGUF` or fetched like a user's first start). A missing
//! model or fixture fails the test; nothing is skipped.

mod smollm2_common;

use smollm2_common::{fixtures, model_path};

use std::collections::HashMap;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::{Content, Value};
use cardinal_models::ModelError;
use cardinal_models::tokenizer::{IncrementalDecoder, Tokenizer};

fn metadata() -> &'static HashMap<String, Value> {
    static M: OnceLock<HashMap<String, Value>> = OnceLock::new();
    M.get_or_init(|| {
        let p = model_path();
        let mut f =
            std::fs::File::open(&p).unwrap_or_else(|e| panic!("opening {}: {e}", p.display()));
        Content::read(&mut f)
            .unwrap_or_else(|e| panic!("reading GGUF metadata of {}: {e}", p.display()))
            .metadata
    })
}

fn tok() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        Tokenizer::from_gguf_metadata(metadata()).expect("tokenizer from GGUF metadata")
    })
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("an id array")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

fn s(v: &serde_json::Value) -> &str {
    v.as_str().expect("a string")
}

/// Checks one tokenizer against every fixture entry.
fn check_all_fixtures(t: &Tokenizer, label: &str) {
    for e in fixtures() {
        let name = s(&e["name"]);
        let raw = t.encode(s(&e["prompt_text"]), false).unwrap();
        assert_eq!(raw, ids(&e["raw_prompt_ids"]), "{label}: raw ids of {name}");
        let templated = t.encode(s(&e["templated_prompt"]), true).unwrap();
        assert_eq!(
            templated,
            ids(&e["templated_ids"]),
            "{label}: templated ids of {name}"
        );
        assert_eq!(
            t.decode(&raw, false).unwrap(),
            s(&e["prompt_text"]),
            "{label}: decode raw {name}"
        );
        assert_eq!(
            t.decode(&templated, false).unwrap(),
            s(&e["templated_prompt"]),
            "{label}: decode templated {name}"
        );
        let greedy = ids(&e["greedy_ids"]);
        assert_eq!(
            t.decode(&greedy, true).unwrap(),
            s(&e["greedy_text"]),
            "{label}: greedy text {name}"
        );
        assert_eq!(
            t.decode(&greedy, false).unwrap(),
            s(&e["greedy_detokenized_with_special"]),
            "{label}: greedy text with specials {name}"
        );
    }
}

#[test]
fn gguf_tokenizer_matches_all_fixtures() {
    check_all_fixtures(tok(), "gguf");
}

#[test]
fn shareable_across_threads() {
    fn send_sync<T: Send + Sync + Clone>() {}
    fn send<T: Send>() {}
    send_sync::<Tokenizer>();
    send::<IncrementalDecoder>();
    send_sync::<cardinal_models::template::ChatTemplate>();
}

#[test]
fn gguf_metadata_facts_and_eos_rule() {
    let t = tok();
    assert_eq!(t.vocab_size(), 49152);
    assert_eq!(t.bos_id(), Some(1));
    assert_eq!(
        t.eos_ids(),
        &[2, 0],
        "declared EOS <|im_end|> first, then <|endoftext|>"
    );
    assert!(!t.add_bos());
    assert_eq!(t.token_str(1).as_deref(), Some("<|im_start|>"));
    assert_eq!(t.token_str(2).as_deref(), Some("<|im_end|>"));
    assert!(t.is_special(0) && t.is_special(1) && t.is_special(16));
    assert!(!t.is_special(17) && !t.is_special(4093) && !t.is_special(u32::MAX));
    assert!(
        t.chat_template()
            .is_some_and(|c| c.contains("<|im_start|>"))
    );
    let dbg = format!("{t:?}");
    assert!(dbg.len() < 300, "Debug is short: {dbg}");
}

#[test]
fn special_tokens_only_parsed_when_asked() {
    let t = tok();
    let text = "<|im_start|>user\nhi<|im_end|>";
    let parsed = t.encode(text, true).unwrap();
    assert_eq!(parsed.first(), Some(&1));
    assert_eq!(parsed.last(), Some(&2));
    let plain = t.encode(text, false).unwrap();
    assert!(
        plain.iter().all(|id| !t.is_special(*id)),
        "raw text must not produce special ids: {plain:?}"
    );
    assert_eq!(t.decode(&plain, false).unwrap(), text);
    assert_eq!(
        t.decode(&plain, true).unwrap(),
        text,
        "plain-text specials survive skip_special"
    );
    assert_eq!(t.decode(&parsed, true).unwrap(), "user\nhi");
    // The recipe example from the crate notes.
    let q = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(
        t.encode(q, true).unwrap(),
        [
            1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198
        ]
    );
    assert_eq!(
        t.encode("", true).unwrap(),
        Vec::<u32>::new(),
        "no BOS is ever added"
    );
}

#[test]
fn bad_ids_and_metadata_are_errors() {
    let t = tok();
    let err = t.decode(&[5, 49152], false).unwrap_err().to_string();
    assert!(err.contains("49152") && err.contains("vocabulary"), "{err}");
    let mut dec = IncrementalDecoder::new(t, false);
    assert!(dec.push(u32::MAX).is_err());

    let mut md = metadata().clone();
    md.insert("tokenizer.ggml.pre".into(), Value::String("mystery".into()));
    let err = Tokenizer::from_gguf_metadata(&md).unwrap_err();
    assert!(
        matches!(err, ModelError::Unsupported(ref m) if m.contains("mystery")),
        "{err}"
    );

    let mut md = metadata().clone();
    md.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
    let err = Tokenizer::from_gguf_metadata(&md).unwrap_err();
    assert!(
        matches!(err, ModelError::Unsupported(ref m) if m.contains("`llama`")),
        "{err}"
    );

    let mut md = metadata().clone();
    md.remove("tokenizer.ggml.merges");
    let err = Tokenizer::from_gguf_metadata(&md).unwrap_err().to_string();
    assert!(err.contains("tokenizer.ggml.merges"), "{err}");

    let mut md = metadata().clone();
    md.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(70_000));
    let err = Tokenizer::from_gguf_metadata(&md).unwrap_err().to_string();
    assert!(err.contains("70000") && err.contains("49152"), "{err}");

    let mut md = metadata().clone();
    md.insert(
        "tokenizer.ggml.token_type".into(),
        Value::Array(vec![Value::I32(1)]),
    );
    let err = Tokenizer::from_gguf_metadata(&md).unwrap_err().to_string();
    assert!(err.contains("token_type") && err.contains("49152"), "{err}");
}

#[test]
fn hf_dir_gives_the_same_ids() {
    let t = tok();
    let dir = std::env::temp_dir().join(format!("cardinal-tok-hf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    t.hf().save(dir.join("tokenizer.json"), false).unwrap();
    let config = serde_json::json!({
        "bos_token": {"content": "<|im_start|>", "special": true},
        "eos_token": "<|im_end|>",
        "add_bos_token": false,
        "chat_template": t.chat_template().unwrap(),
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    let hf = Tokenizer::from_hf_dir(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    let hf = hf.unwrap();
    check_all_fixtures(&hf, "hf");
    assert_eq!(hf.vocab_size(), 49152);
    assert_eq!(hf.bos_id(), Some(1));
    assert_eq!(hf.eos_ids(), &[2, 0]);
    assert!(!hf.add_bos());
    assert_eq!(hf.chat_template(), t.chat_template());
    assert!(hf.is_special(2) && !hf.is_special(100));

    let empty = std::env::temp_dir().join(format!("cardinal-tok-empty-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let err = Tokenizer::from_hf_dir(&empty).unwrap_err().to_string();
    let _ = std::fs::remove_dir_all(&empty);
    assert!(err.contains("tokenizer.json"), "{err}");
}

#[test]
fn hf_dir_variants_bos_probe_eos_and_templates() {
    let t = tok();
    let mut json: serde_json::Value =
        serde_json::from_str(&t.hf().to_string(false).unwrap()).unwrap();
    // A decoder that is not plain byte-level sends IncrementalDecoder down
    // its prefix-offset path; the text stays the same.
    let byte_level = json["decoder"].clone();
    json["decoder"] = serde_json::json!({"type": "Sequence", "decoders": [byte_level]});
    // A post-processor that adds BOS: the model "wants" one, encode() still adds none.
    let bos = serde_json::json!({"SpecialToken": {"id": "<|im_start|>", "type_id": 0}});
    json["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}},
    });
    let dir = std::env::temp_dir().join(format!("cardinal-tok-hf2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
    let config = serde_json::json!({
        "bos_token": "<|im_start|>",
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"eos_token_id": [2, 5]}"#,
    )
    .unwrap();
    let a = Tokenizer::from_hf_dir(&dir).unwrap();
    assert!(a.add_bos(), "BOS detected from the post-processor");
    assert_eq!(a.bos_id(), Some(1));
    assert_eq!(a.eos_ids(), &[2, 5, 0]);
    assert_eq!(a.chat_template(), Some("D"));
    check_all_fixtures(&a, "hf-window");
    for e in fixtures() {
        for key in ["templated_ids", "raw_prompt_ids", "greedy_ids"] {
            let ids = ids(&e[key]);
            assert_eq!(
                stream(&a, &ids, true).concat(),
                a.decode(&ids, true).unwrap(),
                "window {key}"
            );
        }
    }
    let emoji = a.encode("🙂 漢字 👩‍👩‍👧‍👦", false).unwrap();
    let pieces = stream(&a, &emoji, false);
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
    assert_eq!(pieces.concat(), "🙂 漢字 👩‍👩‍👧‍👦");

    // No config at all, template from chat_template.jinja.
    std::fs::remove_file(dir.join("tokenizer_config.json")).unwrap();
    std::fs::remove_file(dir.join("generation_config.json")).unwrap();
    std::fs::write(dir.join("chat_template.jinja"), "J").unwrap();
    let b = Tokenizer::from_hf_dir(&dir).unwrap();
    assert_eq!(b.bos_id(), None);
    assert!(!b.add_bos());
    assert_eq!(b.eos_ids(), &[0, 2], "end-named special tokens by id");
    assert_eq!(b.chat_template(), Some("J"));

    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"eos_token": "<|nope|>"}"#,
    )
    .unwrap();
    let err = Tokenizer::from_hf_dir(&dir).unwrap_err().to_string();
    assert!(
        err.contains("<|nope|>") && err.contains("tokenizer_config.json"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Streams `ids` through an incremental decoder; returns the pieces.
fn stream(t: &Tokenizer, ids: &[u32], skip: bool) -> Vec<String> {
    let mut dec = IncrementalDecoder::new(t, skip);
    let mut pieces: Vec<String> = ids.iter().map(|&id| dec.push(id).unwrap()).collect();
    pieces.push(dec.finish().unwrap());
    pieces
}

#[test]
fn incremental_decoder_never_splits_characters() {
    let t = tok();
    let texts = [
        "你好！今日は。🙂 Please reply in English.",
        "Emoji: 👩‍👩‍👧‍👦 🇫🇷 🙂🙃 and CJK 漢字かなカナ한국어",
        "Café, naïve, Zürich, São Paulo, Kraków",
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝟙𝟚𝟛 and \u{200d}\u{fe0f}",
    ];
    let mut held_back = false;
    for text in texts {
        let ids = t.encode(text, false).unwrap();
        let pieces = stream(t, &ids, false);
        held_back |= pieces.iter().any(String::is_empty);
        assert!(
            pieces.iter().all(|p| !p.contains('\u{FFFD}')),
            "no U+FFFD for {text:?}: {pieces:?}"
        );
        assert_eq!(pieces.concat(), t.decode(&ids, false).unwrap());
        assert_eq!(pieces.concat(), text);
    }
    assert!(
        held_back,
        "multi-byte characters split over tokens must be held back"
    );

    for e in fixtures() {
        for (key, skip) in [
            ("templated_ids", false),
            ("templated_ids", true),
            ("greedy_ids", true),
        ] {
            let ids = ids(&e[key]);
            let got = stream(t, &ids, skip).concat();
            assert_eq!(
                got,
                t.decode(&ids, skip).unwrap(),
                "{} {key} skip={skip}",
                s(&e["name"])
            );
        }
    }
}

#[test]
fn incremental_decoder_matches_decode_on_invalid_bytes() {
    let t = tok();
    // Byte-level symbols for raw bytes: 0x80 is `Ģ`, 0xE4 is `ä`, 0xF0 is `ð`.
    let id = |sym: &str| {
        t.hf()
            .token_to_id(sym)
            .unwrap_or_else(|| panic!("no token {sym:?}"))
    };
    let cont = id("Ģ");
    let lead3 = id("ä");
    let lead4 = id("ð");
    let a = t.encode("A", false).unwrap()[0];
    for ids in [
        vec![cont, a],
        vec![lead3, a, lead4],
        vec![a, lead4, cont, cont],
        vec![lead4, cont, cont, cont, lead3],
    ] {
        let pieces = stream(t, &ids, false);
        assert_eq!(pieces.concat(), t.decode(&ids, false).unwrap(), "{ids:?}");
    }
    // A stream can be reused after finish().
    let mut dec = IncrementalDecoder::new(t, true);
    assert_eq!(dec.push(lead4).unwrap(), "");
    assert_eq!(dec.finish().unwrap(), "\u{FFFD}");
    assert_eq!(dec.push(a).unwrap(), "A");
}
