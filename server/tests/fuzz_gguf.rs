//! Hostile GGUF files. A small GGUF writer builds a valid tiny Llama model
//! (one layer, F32/F16/Q8_0/Q4_0 tensors, a byte-level BPE vocabulary and a
//! chat template) that loads and serves; proptest then feeds the loader
//! random bytes, byte-level mutations of that file (flips, 32/64-bit
//! interesting values, truncation, insertion, deletion) and field-level
//! mutations (any metadata value, key or tensor dimension, type and offset
//! replaced, removed or duplicated). `GgufFile::open`, `config`,
//! `load_model` and the whole `cardinal_models::load` must return, never
//! panic. The crashes found are kept as regression cases. Last, chat
//! templates from a GGUF that loop, recurse or blow up their output are
//! served: each chat request fails fast with a 400 (a 500 for the one that
//! escapes minijinja's fuel and is stopped by the render sandbox), and the
//! server keeps serving.

mod http_support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cardinal_models::gguf::GgufFile;
use cardinal_models::template::RENDER_TIMEOUT;
use cardinal_models::{LoadOptions, ModelSource};
use cardinal_server::serve::{AppState, ServeOptions, router};
use cardinal_server::setup::{self, ModelArgs};
use http_support::{call, get, post_json};
use proptest::prelude::*;
use serde_json::json;

/// A metadata value.
#[derive(Clone, Debug)]
enum Md {
    U8(u8),
    U32(u32),
    I32(i32),
    U64(u64),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
    /// A value of a type id the format does not define (written raw).
    BadType(u32),
}

/// A tensor: GGML dims (innermost first), type id, data.
#[derive(Clone, Debug)]
struct Tensor {
    name: String,
    dims: Vec<u64>,
    dtype: u32,
    /// None: the next aligned offset.
    offset: Option<u64>,
    data: Vec<u8>,
}

const F32: u32 = 0;
const F16: u32 = 1;
const Q4_0: u32 = 2;
const Q8_0: u32 = 8;
const ALIGN: usize = 32;

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_md(out: &mut Vec<u8>, v: &Md) {
    let ty = |out: &mut Vec<u8>, t: u32| out.extend_from_slice(&t.to_le_bytes());
    match v {
        Md::U8(x) => {
            ty(out, 0);
            out.push(*x);
        }
        Md::U32(x) => {
            ty(out, 4);
            out.extend_from_slice(&x.to_le_bytes());
        }
        Md::I32(x) => {
            ty(out, 5);
            out.extend_from_slice(&x.to_le_bytes());
        }
        Md::F32(x) => {
            ty(out, 6);
            out.extend_from_slice(&x.to_le_bytes());
        }
        Md::Bool(x) => {
            ty(out, 7);
            out.push(*x as u8);
        }
        Md::Str(s) => {
            ty(out, 8);
            put_str(out, s);
        }
        Md::U64(x) => {
            ty(out, 10);
            out.extend_from_slice(&x.to_le_bytes());
        }
        Md::Strs(v) => {
            ty(out, 9);
            ty(out, 8);
            out.extend_from_slice(&(v.len() as u64).to_le_bytes());
            for s in v {
                put_str(out, s);
            }
        }
        Md::I32s(v) => {
            ty(out, 9);
            ty(out, 5);
            out.extend_from_slice(&(v.len() as u64).to_le_bytes());
            for x in v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        Md::BadType(t) => {
            ty(out, *t);
            out.extend_from_slice(&[0xAB; 8]);
        }
    }
}

/// Serializes a GGUF v3 file; also returns where the tensor data starts.
fn write_gguf(md: &[(String, Md)], tensors: &[Tensor]) -> (Vec<u8>, usize) {
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(md.len() as u64).to_le_bytes());
    for (k, v) in md {
        put_str(&mut out, k);
        put_md(&mut out, v);
    }
    let mut next = 0u64;
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&t.dtype.to_le_bytes());
        out.extend_from_slice(&t.offset.unwrap_or(next).to_le_bytes());
        next += t.data.len().div_ceil(ALIGN) as u64 * ALIGN as u64;
    }
    out.resize(out.len().div_ceil(ALIGN) * ALIGN, 0);
    let data_start = out.len();
    for t in tensors {
        out.extend_from_slice(&t.data);
        out.resize(out.len().div_ceil(ALIGN) * ALIGN, 0);
    }
    (out, data_start)
}

/// The character GPT-2's byte-level alphabet writes byte `b` as.
fn byte_char(b: u8) -> char {
    let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    if printable {
        return b as char;
    }
    let rank = (0..b)
        .filter(|&x| !((33..=126).contains(&x) || (161..=172).contains(&x) || x >= 174))
        .count() as u32;
    char::from_u32(256 + rank).unwrap()
}

/// Deterministic weights in [-0.5, 0.5).
fn weights(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

/// IEEE half-precision bits of `x` (truncated; tiny values flush to 0).
fn f16_bits(x: f32) -> [u8; 2] {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xFF) as i32 - 127 + 15;
    let h = match exp {
        ..=0 => sign,
        31.. => sign | 0x7C00,
        e => sign | ((e as u16) << 10) | ((b >> 13) & 0x3FF) as u16,
    };
    h.to_le_bytes()
}

/// `rows x cols` weights in GGML type `dtype`.
fn tensor(name: &str, rows: usize, cols: usize, dtype: u32, seed: u64) -> Tensor {
    let w = weights(rows * cols, seed);
    let data = match dtype {
        F32 => w.iter().flat_map(|x| x.to_le_bytes()).collect(),
        F16 => w.iter().flat_map(|&x| f16_bits(x)).collect(),
        Q8_0 => w
            .chunks(32)
            .flat_map(|b| {
                let d = b.iter().fold(0f32, |a, x| a.max(x.abs())) / 127.0;
                let mut blk = f16_bits(d).to_vec();
                blk.extend(b.iter().map(|x| (x / d).round() as i8 as u8));
                blk
            })
            .collect(),
        Q4_0 => w
            .chunks(32)
            .flat_map(|b| {
                let d = b.iter().fold(0f32, |a, x| a.max(x.abs())) / 8.0;
                let q = |x: f32| ((x / d).round() as i32 + 8).clamp(0, 15) as u8;
                let mut blk = f16_bits(d).to_vec();
                blk.extend((0..16).map(|j| q(b[j]) | (q(b[16 + j]) << 4)));
                blk
            })
            .collect(),
        _ => unreachable!(),
    };
    let dims = if rows == 1 {
        vec![cols as u64]
    } else {
        vec![cols as u64, rows as u64]
    };
    Tensor {
        name: name.into(),
        dims,
        dtype,
        offset: None,
        data,
    }
}

const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// A valid tiny model: metadata and tensors.
fn valid_model(template: &str) -> (Vec<(String, Md)>, Vec<Tensor>) {
    let (h, ffn, heads, kv_heads) = (64usize, 128usize, 4usize, 2usize);
    let head_dim = h / heads;
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
    let merges = ["h e", "l l", "o Ġ", "he ll"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    tokens.extend(specials.iter().map(|s| s.to_string()));
    let vocab = tokens.len();
    let mut types = vec![1i32; vocab];
    for t in &mut types[vocab - 3..] {
        *t = 3;
    }
    let s = |k: &str, v: Md| (k.to_string(), v);
    let md = vec![
        s("general.architecture", Md::Str("llama".into())),
        s("general.alignment", Md::U32(ALIGN as u32)),
        s("llama.block_count", Md::U32(1)),
        s("llama.embedding_length", Md::U32(h as u32)),
        s("llama.feed_forward_length", Md::U32(ffn as u32)),
        s("llama.attention.head_count", Md::U32(heads as u32)),
        s("llama.attention.head_count_kv", Md::U32(kv_heads as u32)),
        s("llama.context_length", Md::U32(128)),
        s("llama.rope.freq_base", Md::F32(10000.0)),
        s("llama.attention.layer_norm_rms_epsilon", Md::F32(1e-5)),
        s("llama.vocab_size", Md::U32(vocab as u32)),
        s("tokenizer.ggml.model", Md::Str("gpt2".into())),
        s("tokenizer.ggml.pre", Md::Str("smollm".into())),
        s("tokenizer.ggml.tokens", Md::Strs(tokens)),
        s("tokenizer.ggml.token_type", Md::I32s(types)),
        s(
            "tokenizer.ggml.merges",
            Md::Strs(merges.iter().map(|m| m.to_string()).collect()),
        ),
        s("tokenizer.ggml.bos_token_id", Md::U32(vocab as u32 - 3)),
        s("tokenizer.ggml.eos_token_id", Md::U32(vocab as u32 - 1)),
        s("tokenizer.ggml.add_bos_token", Md::Bool(false)),
        s("tokenizer.chat_template", Md::Str(template.into())),
    ];
    let mut t = vec![tensor("token_embd.weight", vocab, h, Q8_0, 1)];
    let n = |x: &str| format!("blk.0.{x}.weight");
    t.push(tensor(&n("attn_norm"), 1, h, F32, 2));
    t.push(tensor(&n("attn_q"), heads * head_dim, h, Q8_0, 3));
    t.push(tensor(&n("attn_k"), kv_heads * head_dim, h, Q4_0, 4));
    t.push(tensor(&n("attn_v"), kv_heads * head_dim, h, F16, 5));
    t.push(tensor(&n("attn_output"), h, heads * head_dim, F32, 6));
    t.push(tensor(&n("ffn_gate"), ffn, h, Q8_0, 7));
    t.push(tensor(&n("ffn_up"), ffn, h, Q4_0, 8));
    t.push(tensor(&n("ffn_down"), h, ffn, Q8_0, 9));
    t.push(tensor(&n("ffn_norm"), 1, h, F16, 10));
    t.push(tensor("output_norm.weight", 1, h, F32, 11));
    (md, t)
}

fn valid_file(template: &str) -> (Vec<u8>, usize) {
    let (md, t) = valid_model(template);
    write_gguf(&md, &t)
}

/// A fresh path under the temp dir (removed on drop).
struct TempFile(PathBuf);

impl TempFile {
    fn with(bytes: &[u8]) -> TempFile {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "cardinal-fuzz-{}-{}.gguf",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&p, bytes).unwrap();
        TempFile(p)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Everything the server does with a GGUF before serving it. Returns
/// whether the whole load succeeded; any panic fails the property.
fn load_all(path: &Path) -> bool {
    if let Ok(mut f) = GgufFile::open(path) {
        let _ = f.config();
        let _ = f.load_model(&mut |_, _| {});
    }
    cardinal_models::load(
        &ModelSource::Gguf(path.to_owned()),
        &LoadOptions::default(),
        &mut |_| {},
    )
    .is_ok()
}

/// One byte-level mutation.
#[derive(Clone, Debug)]
enum Mutation {
    Set(usize, u8),
    U32(usize, u32),
    U64(usize, u64),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
}

fn interesting_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        Just(1),
        Just(3),
        Just(12),
        Just(13),
        Just(31),
        Just(32),
        Just(0x7FFF_FFFF),
        Just(u32::MAX),
        any::<u32>(),
    ]
}

fn interesting_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(1 << 20),
        Just((1 << 30) + 1),
        Just(1 << 40),
        Just(u32::MAX as u64),
        Just(u64::MAX),
        Just(u64::MAX / 2 + 1),
        any::<u64>(),
    ]
}

/// Positions mostly in the header (`head` bytes), sometimes anywhere.
fn mutation(head: usize, len: usize) -> impl Strategy<Value = Mutation> {
    let pos = prop_oneof![4 => 0..head, 1 => 0..len];
    prop_oneof![
        (pos.clone(), any::<u8>()).prop_map(|(p, b)| Mutation::Set(p, b)),
        (pos.clone(), interesting_u32()).prop_map(|(p, v)| Mutation::U32(p, v)),
        (pos.clone(), interesting_u64()).prop_map(|(p, v)| Mutation::U64(p, v)),
        (0..len).prop_map(Mutation::Truncate),
        (pos.clone(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(p, b)| Mutation::Insert(p, b)),
        (pos, 1usize..64).prop_map(|(p, n)| Mutation::Delete(p, n)),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let put = |bytes: &mut Vec<u8>, p: usize, v: &[u8]| {
        for (i, b) in v.iter().enumerate() {
            if let Some(x) = bytes.get_mut(p + i) {
                *x = *b;
            }
        }
    };
    match m {
        Mutation::Set(p, b) => put(bytes, *p, &[*b]),
        Mutation::U32(p, v) => put(bytes, *p, &v.to_le_bytes()),
        Mutation::U64(p, v) => put(bytes, *p, &v.to_le_bytes()),
        Mutation::Truncate(n) => bytes.truncate(*n),
        Mutation::Insert(p, b) => {
            let p = (*p).min(bytes.len());
            bytes.splice(p..p, b.iter().copied());
        }
        Mutation::Delete(p, n) => {
            let p = (*p).min(bytes.len());
            let e = (p + n).min(bytes.len());
            bytes.drain(p..e);
        }
    }
}

/// A metadata value of any type, biased to the ones that break things.
fn any_md() -> impl Strategy<Value = Md> {
    prop_oneof![
        interesting_u32().prop_map(Md::U32),
        any::<i32>().prop_map(Md::I32),
        interesting_u64().prop_map(Md::U64),
        any::<u8>().prop_map(Md::U8),
        prop_oneof![
            Just(f32::NAN),
            Just(f32::INFINITY),
            Just(0.0f32),
            Just(-1.0f32),
            any::<f32>()
        ]
        .prop_map(Md::F32),
        any::<bool>().prop_map(Md::Bool),
        prop_oneof![
            Just(String::new()),
            Just("llama".to_string()),
            Just("granite".to_string()),
            Just("{% for x in y %}".to_string()),
            ".{0,40}"
        ]
        .prop_map(Md::Str),
        prop::collection::vec(".{0,8}", 0..8).prop_map(Md::Strs),
        prop::collection::vec(any::<i32>(), 0..8).prop_map(Md::I32s),
        (13u32..1000).prop_map(Md::BadType),
    ]
}

/// The integers that break sizes and divisions, as u32 or i32 values.
fn small_int() -> impl Strategy<Value = Md> {
    let v = prop_oneof![
        Just(0i64),
        Just(1),
        Just(2),
        Just(3),
        Just(-1),
        Just(31),
        Just(33),
        Just(1 << 20),
        Just((1 << 20) + 1),
        Just(u32::MAX as i64),
    ];
    (v, any::<bool>()).prop_map(|(v, signed)| match signed {
        true => Md::I32(v as i32),
        false => Md::U32(v as u32),
    })
}

/// One field-level change to the valid model.
#[derive(Clone, Debug)]
enum Edit {
    SetMd(usize, Md),
    DropMd(usize),
    DupMd(usize),
    RenameMd(usize, String),
    Dims(usize, Vec<u64>),
    Dtype(usize, u32),
    Offset(usize, u64),
    DropTensor(usize),
    TruncData(usize, usize),
}

fn edit(n_md: usize, n_t: usize) -> impl Strategy<Value = Edit> {
    let dim = prop_oneof![
        Just(0u64),
        Just(1),
        Just(16),
        Just(31),
        Just(32),
        Just(64),
        Just(1 << 20),
        Just((1 << 20) + 1),
        Just(u32::MAX as u64),
        Just(u64::MAX),
    ];
    prop_oneof![
        4 => (0..n_md, any_md()).prop_map(|(i, v)| Edit::SetMd(i, v)),
        4 => (0..n_md, small_int()).prop_map(|(i, v)| Edit::SetMd(i, v)),
        1 => (0..n_md).prop_map(Edit::DropMd),
        1 => (0..n_md).prop_map(Edit::DupMd),
        1 => (0..n_md, "[a-z.]{0,30}").prop_map(|(i, k)| Edit::RenameMd(i, k)),
        2 => (0..n_t, prop::collection::vec(dim, 0..6)).prop_map(|(i, d)| Edit::Dims(i, d)),
        2 => (0..n_t, prop_oneof![Just(0u32), Just(1), Just(2), Just(3), Just(6), Just(8), Just(12), Just(30), Just(1000)])
            .prop_map(|(i, d)| Edit::Dtype(i, d)),
        1 => (0..n_t, interesting_u64()).prop_map(|(i, o)| Edit::Offset(i, o)),
        1 => (0..n_t).prop_map(Edit::DropTensor),
        1 => (0..n_t, 0usize..4096).prop_map(|(i, n)| Edit::TruncData(i, n)),
    ]
}

fn apply_edit(md: &mut Vec<(String, Md)>, t: &mut Vec<Tensor>, e: &Edit) {
    let (nm, nt) = (md.len(), t.len());
    let im = |i: usize| i.min(nm.saturating_sub(1));
    let it = |i: usize| i.min(nt.saturating_sub(1));
    match e {
        Edit::SetMd(i, v) if nm > 0 => md[im(*i)].1 = v.clone(),
        Edit::DropMd(i) if nm > 0 => {
            md.remove(im(*i));
        }
        Edit::DupMd(i) if nm > 0 => md.push(md[im(*i)].clone()),
        Edit::RenameMd(i, k) if nm > 0 => md[im(*i)].0 = k.clone(),
        Edit::Dims(i, d) if nt > 0 => t[it(*i)].dims = d.clone(),
        Edit::Dtype(i, d) if nt > 0 => t[it(*i)].dtype = *d,
        Edit::Offset(i, o) if nt > 0 => t[it(*i)].offset = Some(*o),
        Edit::DropTensor(i) if nt > 0 => {
            t.remove(it(*i));
        }
        Edit::TruncData(i, n) if nt > 0 => t[it(*i)].data.truncate(*n),
        _ => {}
    }
}

#[test]
fn the_valid_file_loads() {
    let (bytes, data_start) = valid_file(CHATML);
    let f = TempFile::with(&bytes);
    let m = cardinal_models::load(
        &ModelSource::Gguf(f.0.clone()),
        &LoadOptions::default(),
        &mut |_| {},
    )
    .expect("the generated GGUF is valid");
    assert_eq!(m.model.cfg.vocab, 263);
    let tok = m.tokenizer().unwrap();
    let ids = tok.encode("hello", false).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), "hello");
    eprintln!(
        "valid GGUF: {} bytes ({} of header), vocab {}, `hello` -> {ids:?}",
        bytes.len(),
        data_start,
        m.model.cfg.vocab
    );
}

/// Every metadata value set, in turn, to every boundary integer, and every
/// tensor given every boundary dimension and every type: a deterministic
/// sweep of the single-field changes the random search may miss.
#[test]
fn every_single_field_change_is_an_error_not_a_panic() {
    let ints = [
        0i64,
        1,
        2,
        3,
        -1,
        31,
        33,
        1 << 20,
        (1 << 20) + 1,
        u32::MAX as i64,
    ];
    let (md0, t0) = valid_model(CHATML);
    let t = Instant::now();
    let (mut cases, mut loaded) = (0, 0);
    let mut check = |md: &[(String, Md)], t: &[Tensor]| {
        let f = TempFile::with(&write_gguf(md, t).0);
        cases += 1;
        loaded += usize::from(load_all(&f.0));
    };
    for i in 0..md0.len() {
        for v in ints {
            for value in [Md::U32(v as u32), Md::I32(v as i32), Md::U64(v as u64)] {
                let mut md = md0.clone();
                md[i].1 = value;
                check(&md, &t0);
            }
        }
        let mut md = md0.clone();
        md.remove(i);
        check(&md, &t0);
    }
    let dims: [&[u64]; 8] = [
        &[],
        &[0],
        &[1],
        &[0, 64],
        &[64, 0],
        &[64, 1 << 40],
        &[u64::MAX, 2],
        &[32, 32, 32, 32],
    ];
    for i in 0..t0.len() {
        for d in dims {
            let mut t = t0.clone();
            t[i].dims = d.to_vec();
            check(&md0, &t);
        }
        for dtype in [0u32, 1, 2, 3, 6, 8, 10, 12, 14, 30, 31, 1000] {
            let mut t = t0.clone();
            t[i].dtype = dtype;
            check(&md0, &t);
        }
        for off in [1u64, 31, u32::MAX as u64, u64::MAX - 7] {
            let mut t = t0.clone();
            t[i].offset = Some(off);
            check(&md0, &t);
        }
    }
    eprintln!(
        "single-field sweep: {cases} files in {:.1} s, {loaded} still loaded (harmless changes)",
        t.elapsed().as_secs_f64()
    );
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn random_bytes_never_panic(
        magic in any::<bool>(),
        body in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        let mut bytes = if magic { b"GGUF\x03\x00\x00\x00".to_vec() } else { Vec::new() };
        bytes.extend(body);
        let f = TempFile::with(&bytes);
        load_all(&f.0);
    }
}

proptest! {
    #![proptest_config(config(384))]

    #[test]
    fn mutated_bytes_never_panic(muts in {
        let (bytes, head) = valid_file(CHATML);
        prop::collection::vec(mutation(head, bytes.len()), 1..6)
    }) {
        let (mut bytes, _) = valid_file(CHATML);
        for m in &muts {
            apply(&mut bytes, m);
        }
        let f = TempFile::with(&bytes);
        load_all(&f.0);
    }

    #[test]
    fn mutated_fields_never_panic(edits in {
        let (md, t) = valid_model(CHATML);
        prop::collection::vec(edit(md.len(), t.len()), 1..4)
    }) {
        let (mut md, mut t) = valid_model(CHATML);
        for e in &edits {
            apply_edit(&mut md, &mut t, e);
        }
        let (bytes, _) = write_gguf(&md, &t);
        let f = TempFile::with(&bytes);
        load_all(&f.0);
    }
}

/// Starts a server over the GGUF at `path` (None if the load fails).
fn serve(path: &Path) -> Option<axum::Router> {
    let args = ModelArgs {
        model: path.to_string_lossy().into_owned(),
        cards: None,
        card_spec: None,
        card_memory_mib: None,
        threads: Some(1),
        weight_seed: 0,
        hf_int8: false,
    };
    let opts = ServeOptions {
        served_model_name: Some("tiny".into()),
        ..Default::default()
    };
    let rt = setup::start(&args, &opts.limits(), &mut |_| {}).ok()?;
    Some(router(AppState::new(opts, rt)))
}

#[tokio::test]
async fn hostile_templates_in_a_gguf_fail_fast() {
    let chat = json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4});
    // The same file with a plain template serves a chat.
    let f = TempFile::with(&valid_file(CHATML).0);
    let app = serve(&f.0).expect("the valid GGUF serves");
    let r = post_json(&app, "/v1/chat/completions", chat.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text());

    // 400 when minijinja's own limits stop the render (fuel, recursion,
    // output cap) or the template raises; 500 when it escapes them and the
    // render sandbox stops it (a 100 MB repeat or a string doubling
    // allocates before fuel is charged for the bytes produced; materialising
    // `list + list` is not charged at all): the model's template is at
    // fault, not the request.
    let hostile = [
        (
            "nested loops",
            "{% for i in range(99999999) %}{% for j in range(99999999) %}x{% endfor %}{% endfor %}",
            400,
        ),
        (
            "recursive macro",
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            400,
        ),
        (
            "recursive loop",
            "{% for m in messages recursive %}{{ loop(messages) }}{% endfor %}",
            400,
        ),
        (
            "output doubling",
            "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
            500,
        ),
        ("huge repeat", "{{ 'x' * 99999999 }}", 500),
        (
            "repeat in a loop",
            "{% for i in range(100000) %}{% set s = 'y' * 9999999 %}{% endfor %}",
            400,
        ),
        (
            "lazy list growth",
            "{% set ns = namespace(l=[1]) %}{% for i in range(30) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{% for x in ns.l %}{{ x }}{% endfor %}",
            400,
        ),
        ("raise", "{{ raise_exception('no chat for you') }}", 400),
        (
            "list doubling",
            "{% set ns = namespace(l=[1]) %}{% for i in range(40) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l | length }}",
            500,
        ),
    ];
    let mut figures = Vec::new();
    for (name, src, status) in hostile {
        let t = Instant::now();
        let f = TempFile::with(&valid_file(src).0);
        let Some(app) = serve(&f.0) else {
            figures.push(format!(
                "{name}: refused at load in {:.0} ms",
                t.elapsed().as_secs_f64() * 1e3
            ));
            continue;
        };
        let t = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            post_json(&app, "/v1/chat/completions", chat.clone()),
        )
        .await
        .unwrap_or_else(|_| panic!("{name}: the render hangs"));
        let took = t.elapsed();
        let limit = if status == 500 {
            RENDER_TIMEOUT + Duration::from_secs(2)
        } else {
            Duration::from_secs(2)
        };
        let v = r.assert_error(status, (status == 400).then_some("messages"));
        figures.push(format!(
            "{name}: {status} in {:.0} ms ({})",
            took.as_secs_f64() * 1e3,
            v["error"]["message"]
                .as_str()
                .unwrap_or("")
                .chars()
                .take(70)
                .collect::<String>()
        ));
        assert!(took < limit, "{name}: took {took:?}");
        // The server still serves: health, and a prompt given as token ids.
        assert_eq!(call(&app, get("/health")).await.status, 200);
        let r = post_json(
            &app,
            "/v1/completions",
            json!({"prompt": [1, 2, 3], "max_tokens": 2}),
        )
        .await;
        assert_eq!(r.status, 200, "{name}: {}", r.text());
    }
    eprintln!("hostile GGUF templates:\n  {}", figures.join("\n  "));
}
