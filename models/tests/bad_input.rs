//! Bad model input gives a clear error that names the file and the problem,
//! never a panic or a huge allocation (which would abort the test): missing
//! and non-GGUF files, GGUF files cut anywhere in the header or the tensor
//! data, absurd tensor shapes, offsets and alignment, unsupported
//! architectures and tensor types, bad tokenizer metadata, `config.json`
//! files with missing or mistyped fields or an unknown `model_type`, broken
//! safetensors, and bad `--model` arguments. The GGUF files are the tiny
//! valid model of `common` with one thing broken.

mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use cardinal_models::gguf::GgufFile;
use cardinal_models::{LoadOptions, ModelSource};
use common::{GGML_Q4_K, Gguf, Md, TempDir, Tiny};

/// The error that loading `path` as a `--model` argument gives.
fn load_err(path: &Path) -> String {
    let src = ModelSource::parse(path.to_str().unwrap())
        .unwrap_or_else(|e| panic!("{} does not parse as a model: {e}", path.display()));
    load_src_err(&src)
}

fn load_src_err(src: &ModelSource) -> String {
    match cardinal_models::load(src, &LoadOptions::default(), &mut |_| {}) {
        Ok(m) => panic!("{src:?} loaded as {}", m.name),
        Err(e) => e.to_string(),
    }
}

/// Asserts `msg` names `path` and contains every piece of `problem`.
fn assert_names(msg: &str, path: &Path, problem: &[&str]) {
    assert!(
        msg.contains(&path.display().to_string()),
        "the error does not name {}: {msg}",
        path.display()
    );
    for p in problem {
        assert!(msg.contains(p), "the error does not say {p:?}: {msg}");
    }
}

/// The tiny valid llama model with Q4_0 matrices.
fn valid() -> Gguf {
    common::tiny(&Tiny::llama(GgmlDType::Q4_0)).0
}

fn write(dir: &TempDir, g: &Gguf) -> PathBuf {
    dir.write("model.gguf", &g.bytes())
}

#[test]
fn the_valid_file_loads() {
    // Every other test breaks one thing in this file.
    let dir = TempDir::new("bad-input");
    let path = write(&dir, &valid());
    let src = ModelSource::parse(path.to_str().unwrap()).unwrap();
    let m = cardinal_models::load(&src, &LoadOptions::default(), &mut |_| {}).unwrap();
    assert_eq!(m.model.cfg.n_layers, common::LAYERS);
}

#[test]
fn missing_file() {
    let dir = TempDir::new("bad-input");
    let path = dir.path().join("absent.gguf");
    let err = GgufFile::open(&path).unwrap_err().to_string();
    assert_names(&err, &path, &["No such file"]);
    let err = load_src_err(&ModelSource::Gguf(path.clone()));
    assert_names(&err, &path, &["No such file"]);
    let absent = dir.path().join("absent-dir");
    let err = load_src_err(&ModelSource::HfDir(absent.clone()));
    assert_names(&err, &absent, &["needs tokenizer.json"]);
}

#[test]
fn not_a_gguf_file() {
    let dir = TempDir::new("bad-input");
    for (name, bytes) in [
        ("notes.txt", &b"this is a text file, not a model\n"[..]),
        ("empty.gguf", &b""[..]),
        ("short.gguf", &b"GG"[..]),
    ] {
        let path = dir.write(name, bytes);
        assert_names(&load_err(&path), &path, &["not a GGUF file"]);
    }
    // The right magic but an unknown version.
    let mut bytes = valid().bytes();
    bytes[4..8].copy_from_slice(&9u32.to_le_bytes());
    let path = dir.write("v9.gguf", &bytes);
    assert_names(&load_err(&path), &path, &["invalid GGUF header", "version"]);
}

#[test]
fn truncated_in_the_header() {
    let dir = TempDir::new("bad-input");
    let g = valid();
    let header = g.header();
    let bytes = g.bytes();
    let path = dir.path().join("cut.gguf");
    // Cut after every byte of the header: each cut is an error naming the
    // file, from the header reader or, once the header is whole, from the
    // first tensor whose data is missing.
    std::fs::write(&path, &bytes).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    for cut in (4..header.len()).rev() {
        file.set_len(cut as u64).unwrap();
        let err = match GgufFile::open(&path) {
            Err(e) => e.to_string(),
            Ok(_) => load_err(&path),
        };
        assert_names(&err, &path, &[]);
        assert!(
            err.contains("truncated") || err.contains("remaining"),
            "cut at {cut}: {err}"
        );
    }
    // Cut inside a fixed-size field: said in so many words. (Cuts inside a
    // string or an array say how many bytes it needs and how few remain.)
    let cut = 20;
    std::fs::write(&path, &bytes[..cut]).unwrap();
    let err = GgufFile::open(&path).unwrap_err().to_string();
    assert_names(
        &err,
        &path,
        &["invalid GGUF header", "ends inside the header", "truncated"],
    );
}

#[test]
fn truncated_in_the_tensor_data() {
    let dir = TempDir::new("bad-input");
    let g = valid();
    let header = g.header().len();
    let bytes = g.bytes();
    let path = dir.path().join("cut.gguf");
    // Cut inside the first tensor (the embedding, right after the header).
    std::fs::write(&path, &bytes[..header + 100]).unwrap();
    assert_names(
        &load_err(&path),
        &path,
        &[
            "token_embd.weight",
            "runs past the end of the file",
            "truncated",
        ],
    );
    // And every 61 bytes through the data: always an error naming the file.
    std::fs::write(&path, &bytes).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    for cut in (header..bytes.len()).rev().step_by(61) {
        file.set_len(cut as u64).unwrap();
        let err = load_err(&path);
        assert_names(&err, &path, &["truncated"]);
    }
}

#[test]
fn absurd_tensor_shape() {
    let dir = TempDir::new("bad-input");
    // A layer weight 2^40 columns wide.
    let mut g = valid();
    g.tensor_mut("blk.0.attn_q.weight").ne = vec![1 << 40, 64];
    let path = write(&dir, &g);
    assert_names(
        &load_err(&path),
        &path,
        &["blk.0.attn_q.weight", "1099511627776", "expected [64, 64]"],
    );
    // Both dimensions 2^40: the element count overflows 64 bits.
    let mut g = valid();
    g.tensor_mut("blk.1.ffn_down.weight").ne = vec![1 << 40, 1 << 40];
    let path = write(&dir, &g);
    assert_names(&load_err(&path), &path, &["blk.1.ffn_down.weight", "shape"]);
    // The vocabulary is read from the embedding's shape: 2^40 rows.
    let mut g = valid();
    g.tensor_mut("token_embd.weight").ne = vec![64, 1 << 40];
    let path = write(&dir, &g);
    assert_names(&load_err(&path), &path, &["vocab = 1099511627776"]);
    // An embedding with no dimensions at all.
    let mut g = valid();
    g.tensor_mut("token_embd.weight").ne = vec![];
    let path = write(&dir, &g);
    assert_names(&load_err(&path), &path, &["token_embd.weight"]);
    // More dimensions than GGUF allows.
    let mut g = valid();
    g.tensor_mut("blk.0.ffn_up.weight").ne = vec![1; 9];
    let path = write(&dir, &g);
    assert_names(
        &load_err(&path),
        &path,
        &["invalid GGUF header", "blk.0.ffn_up.weight", "dimensions"],
    );
    // An absurd metadata dimension.
    let mut g = valid();
    g.set("llama.feed_forward_length", Md::U32(u32::MAX));
    let path = write(&dir, &g);
    assert_names(&load_err(&path), &path, &["ffn = 4294967295"]);
}

#[test]
fn zero_alignment() {
    // candle's header reader divides by general.alignment.
    let dir = TempDir::new("bad-input");
    let mut g = valid();
    g.set("general.alignment", Md::U32(0));
    let path = write(&dir, &g);
    assert_names(&load_err(&path), &path, &["general.alignment is 0"]);
}

#[test]
fn absurd_tensor_offset() {
    let dir = TempDir::new("bad-input");
    for offset in [1 << 40, u64::MAX - 8] {
        let mut g = valid();
        g.tensor_mut("blk.1.ffn_down.weight").offset = Some(offset);
        let path = write(&dir, &g);
        assert_names(
            &load_err(&path),
            &path,
            &[
                "blk.1.ffn_down.weight",
                &format!("offset {offset}"),
                "runs past the end of the file",
            ],
        );
    }
}

#[test]
fn unsupported_architecture() {
    let dir = TempDir::new("bad-input");
    let mut g = valid();
    g.set("general.architecture", Md::Str("mamba".into()));
    let path = write(&dir, &g);
    assert_names(
        &load_err(&path),
        &path,
        &["unsupported", "architecture \"mamba\"", "llama, granite"],
    );
    let mut g = valid();
    g.remove("general.architecture");
    let path = write(&dir, &g);
    assert_names(&load_err(&path), &path, &["general.architecture"]);
}

#[test]
fn unsupported_tensor_type() {
    let dir = TempDir::new("bad-input");
    // Q4_K (256-element super-blocks of 144 bytes) for a layer weight.
    let mut g = valid();
    let t = g.tensor_mut("blk.0.attn_k.weight");
    t.ggml_type = GGML_Q4_K;
    t.data = vec![0; 32 * 64 / 256 * 144];
    let path = write(&dir, &g);
    assert_names(
        &load_err(&path),
        &path,
        &[
            "unsupported",
            "blk.0.attn_k.weight",
            "Q4K",
            "F32, F16, Q8_0, Q4_0, Q4_1",
        ],
    );
    // A type id that does not exist.
    let mut g = valid();
    g.tensor_mut("blk.0.attn_k.weight").ggml_type = 99;
    let path = write(&dir, &g);
    assert_names(&load_err(&path), &path, &["invalid GGUF header", "99"]);
}

#[test]
fn bad_tokenizer_metadata() {
    let dir = TempDir::new("bad-input");
    let mut g = valid();
    g.set("tokenizer.ggml.model", Md::Str("llama".into()));
    let path = write(&dir, &g);
    assert_names(&load_err(&path), &path, &["tokenizer.ggml.model", "gpt2"]);
    let mut g = valid();
    g.set("tokenizer.ggml.eos_token_id", Md::U32(100_000));
    let path = write(&dir, &g);
    assert_names(&load_err(&path), &path, &["eos_token_id", "out of range"]);
}

/// A Hugging Face directory with the tiny Granite's tokenizer and `config`.
fn hf_dir(config: &serde_json::Value) -> TempDir {
    let dir = TempDir::new("bad-hf");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-granite");
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        std::fs::copy(fixture.join(f), dir.path().join(f)).unwrap();
    }
    dir.write(
        "config.json",
        serde_json::to_string_pretty(config).unwrap().as_bytes(),
    );
    dir
}

fn granite_config() -> serde_json::Value {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-granite/config.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn config_json_missing_or_mistyped_fields() {
    // The unbroken directory loads.
    let dir = hf_dir(&granite_config());
    let src = ModelSource::parse(dir.path().to_str().unwrap()).unwrap();
    cardinal_models::load(&src, &LoadOptions::default(), &mut |_| {}).unwrap();

    for field in [
        "hidden_size",
        "num_hidden_layers",
        "vocab_size",
        "model_type",
    ] {
        let mut c = granite_config();
        c.as_object_mut().unwrap().remove(field);
        let dir = hf_dir(&c);
        let cfg = dir.path().join("config.json");
        assert_names(
            &load_err(dir.path()),
            &cfg,
            &[&format!("missing field \"{field}\"")],
        );
    }
    for (field, value, problem) in [
        (
            "hidden_size",
            serde_json::json!("64"),
            "must be a non-negative integer",
        ),
        (
            "num_attention_heads",
            serde_json::json!(-4),
            "must be a non-negative integer",
        ),
        (
            "rms_norm_eps",
            serde_json::json!("small"),
            "must be a number",
        ),
        (
            "embedding_multiplier",
            serde_json::json!([12]),
            "must be a number",
        ),
        ("model_type", serde_json::json!(7), "must be a string"),
    ] {
        let mut c = granite_config();
        c[field] = value;
        let dir = hf_dir(&c);
        let cfg = dir.path().join("config.json");
        assert_names(&load_err(dir.path()), &cfg, &[field, problem]);
    }
    // Well-typed but absurd: checked before anything is allocated.
    let mut c = granite_config();
    c["hidden_size"] = serde_json::json!(1u64 << 40);
    let dir = hf_dir(&c);
    let cfg = dir.path().join("config.json");
    assert_names(
        &load_err(dir.path()),
        &cfg,
        &["hidden = 1099511627776", "must be between 1 and"],
    );
    let dir = hf_dir(&granite_config());
    let cfg = dir.write("config.json", b"{\"model_type\": \"granite\",");
    assert_names(&load_err(dir.path()), &cfg, &["invalid JSON"]);
}

#[test]
fn unknown_model_type() {
    let mut c = granite_config();
    c["model_type"] = serde_json::json!("mamba");
    let dir = hf_dir(&c);
    let cfg = dir.path().join("config.json");
    assert_names(
        &load_err(dir.path()),
        &cfg,
        &["unsupported", "model_type \"mamba\"", "llama, granite"],
    );
}

#[test]
fn broken_safetensors() {
    // No weights at all.
    let dir = hf_dir(&granite_config());
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    assert_names(
        &load_err(dir.path()),
        dir.path(),
        &["no *.safetensors files"],
    );
    // Weights cut in half.
    let dir = hf_dir(&granite_config());
    let st = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    assert_names(&load_err(dir.path()), &st, &["invalid safetensors"]);
    // A header claiming an absurd length.
    let mut bytes = bytes.clone();
    bytes[..8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    std::fs::write(&st, &bytes).unwrap();
    assert_names(&load_err(dir.path()), &st, &["invalid safetensors"]);
    // A tensor missing (its name changed in place, so offsets stay valid).
    let dir = hf_dir(&granite_config());
    let st = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    let name = b"model.layers.1.mlp.up_proj.weight";
    let at = bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("the tensor is in the header");
    bytes[at + name.len() - 1] = b'X';
    std::fs::write(&st, &bytes).unwrap();
    assert_names(
        &load_err(dir.path()),
        dir.path(),
        &["missing tensor model.layers.1.mlp.up_proj.weight"],
    );
    // A NaN weight.
    let dir = hf_dir(&granite_config());
    let st = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    let off = {
        let parsed = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let data = parsed
            .tensor("model.layers.0.mlp.down_proj.weight")
            .unwrap()
            .data();
        data.as_ptr() as usize - bytes.as_ptr() as usize
    };
    bytes[off + 140..off + 142].copy_from_slice(&half::bf16::NAN.to_le_bytes());
    std::fs::write(&st, &bytes).unwrap();
    assert_names(
        &load_err(dir.path()),
        &st,
        &["model.layers.0.mlp.down_proj.weight", "NaN"],
    );
    // A tensor of the wrong shape: the config asks for a wider FFN.
    let mut c = granite_config();
    c["intermediate_size"] = serde_json::json!(256);
    let dir = hf_dir(&c);
    let st = dir.path().join("model.safetensors");
    assert_names(
        &load_err(dir.path()),
        &st,
        &[
            "model.layers.0.mlp.gate_proj.weight",
            "shape [128, 64], expected [256, 64]",
        ],
    );
}

#[test]
fn bad_model_arguments() {
    let err = ModelSource::parse("").unwrap_err().to_string();
    assert!(err.contains("--model is empty"), "{err}");
    let dir = TempDir::new("bad-input");
    let path = dir.path().join("no-such-model.gguf");
    let err = ModelSource::parse(path.to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert_names(&err, &path, &["no such file or directory"]);
    let err = ModelSource::parse("synthetic:nope")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unknown synthetic model \"nope\"") && err.contains("tiny, granite-3b"),
        "{err}"
    );
}
