//! The `--model` argument: a `.gguf` path, a Hugging Face directory, the
//! default alias, or `synthetic:NAME`. Resolves it, loads the weights, the
//! tokenizer and the chat template, and reports progress.

use std::path::{Path, PathBuf};

use cardinal_kernels::Isa;

use crate::fetch::{DEFAULT_MODEL_ALIAS, default_model_path};
use crate::gguf::GgufFile;
use crate::hf::{self, LoadBits};
use crate::model::Model;
use crate::template::ChatTemplate;
use crate::tokenizer::Tokenizer;
use crate::{ModelError, Result, synthetic};

/// What a `--model` argument names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    Gguf(PathBuf),
    HfDir(PathBuf),
    Synthetic(String),
    DefaultAlias,
}

impl ModelSource {
    /// Parses a `--model` argument without touching the weights.
    pub fn parse(arg: &str) -> Result<Self> {
        if arg.is_empty() {
            return Err(ModelError::Invalid("--model is empty".into()));
        }
        if arg == DEFAULT_MODEL_ALIAS {
            return Ok(ModelSource::DefaultAlias);
        }
        if let Some(name) = arg.strip_prefix("synthetic:") {
            synthetic::config(name)?;
            return Ok(ModelSource::Synthetic(name.to_string()));
        }
        let p = Path::new(arg);
        if p.is_dir() {
            return Ok(ModelSource::HfDir(p.to_owned()));
        }
        if p.is_file() {
            return Ok(ModelSource::Gguf(p.to_owned()));
        }
        Err(ModelError::Invalid(format!(
            "--model {arg}: no such file or directory (expected a .gguf file, a Hugging Face directory, \"{DEFAULT_MODEL_ALIAS}\", or synthetic:{{{}}})",
            synthetic::SYNTHETIC_NAMES.join(",")
        )))
    }

    /// A short display name (the served model name by default).
    pub fn display_name(&self) -> String {
        match self {
            ModelSource::DefaultAlias => DEFAULT_MODEL_ALIAS.to_string(),
            ModelSource::Synthetic(n) => format!("synthetic:{n}"),
            ModelSource::Gguf(p) | ModelSource::HfDir(p) => p
                .file_stem()
                .or(p.file_name())
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| p.display().to_string()),
        }
    }
}

/// Options for loading.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Seed for synthetic weights.
    pub seed: u64,
    /// Bit width for float checkpoints.
    pub hf_bits: LoadBits,
    /// Repack the layers for this ISA's kernels once loaded
    /// ([`Model::repack`]); `None` keeps the portable row storage.
    pub repack_for: Option<Isa>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            seed: 0,
            hf_bits: LoadBits::Int4,
            repack_for: None,
        }
    }
}

/// A model with everything needed to turn text into ids and back.
#[derive(Debug)]
pub struct LoadedModel {
    pub name: String,
    pub model: std::sync::Arc<Model>,
    /// None for synthetic models, which have no vocabulary text.
    pub tokenizer: Option<Tokenizer>,
    pub template: Option<ChatTemplate>,
}

impl LoadedModel {
    /// The tokenizer, or an error saying this model has none.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            ModelError::Invalid(format!(
                "{} has no tokenizer: synthetic models take token ids only (use `cardinal bench`)",
                self.name
            ))
        })
    }

    /// Renders a chat with the model's template (ChatML when it has none),
    /// ending with the assistant's turn. A model's own template renders in
    /// its sandbox (see [`ChatTemplate::render`]): this blocks for at most
    /// [`crate::template::RENDER_TIMEOUT`], and fails with
    /// [`ModelError::TemplateStopped`] once the template broke a limit.
    pub fn render_chat(&self, messages: &[crate::template::ChatMessage]) -> Result<String> {
        self.render_chat_with(messages, true)
    }

    /// [`LoadedModel::render_chat`] with `add_generation_prompt` chosen.
    pub fn render_chat_with(
        &self,
        messages: &[crate::template::ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        match &self.template {
            Some(t) => t.render(messages, add_generation_prompt),
            None => ChatTemplate::chatml().render(messages, add_generation_prompt),
        }
    }
}

fn template_for(tok: &Tokenizer) -> Result<Option<ChatTemplate>> {
    let Some(src) = tok.chat_template() else {
        return Ok(None);
    };
    let bos = tok
        .bos_id()
        .and_then(|i| tok.token_str(i))
        .unwrap_or_default();
    let eos = tok
        .eos_ids()
        .first()
        .and_then(|&i| tok.token_str(i))
        .unwrap_or_default();
    ChatTemplate::new(src, &bos, &eos).map(Some)
}

/// Resolves and loads a model. `log` receives human-readable progress lines.
pub fn load(
    source: &ModelSource,
    opts: &LoadOptions,
    log: &mut dyn FnMut(&str),
) -> Result<LoadedModel> {
    let loaded = load_source(source, opts, log);
    release_freed_memory();
    loaded
}

/// Returns the heap memory freed while loading (the file's raw tensor
/// buffers, the tokenizer's intermediate tables) to the OS. glibc keeps
/// freed chunks resident, and after the first large buffer is freed its
/// dynamic mmap threshold puts every later tensor buffer on the heap: for
/// SmolLM2 that is 8 MB held for the life of the server (idle `cardinal
/// serve`: VmRSS 161.4 MB without the trim, 153.4 with it).
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointer and only walks glibc's own free
    // lists (it madvises free pages away); it is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn load_source(
    source: &ModelSource,
    opts: &LoadOptions,
    log: &mut dyn FnMut(&str),
) -> Result<LoadedModel> {
    let name = source.display_name();
    match source {
        ModelSource::Synthetic(n) => {
            log(&format!(
                "building synthetic model {n} (seed {})",
                opts.seed
            ));
            let model = synthetic::load_model(n, opts.seed, &mut progress_logger(log))?;
            Ok(LoadedModel {
                name,
                model: finish(model, opts),
                tokenizer: None,
                template: None,
            })
        }
        ModelSource::HfDir(dir) => {
            log(&format!(
                "loading Hugging Face checkpoint {}",
                dir.display()
            ));
            let tok = Tokenizer::from_hf_dir(dir)?;
            let model = hf::load_model(dir, opts.hf_bits, &mut progress_logger(log))?;
            check_vocab(&model, &tok, dir)?;
            let template = template_for(&tok)?;
            Ok(LoadedModel {
                name,
                model: finish(model, opts),
                tokenizer: Some(tok),
                template,
            })
        }
        ModelSource::Gguf(path) => load_gguf(name, path, opts, log),
        ModelSource::DefaultAlias => {
            let path = default_model_path(log)?;
            load_gguf(name, &path, opts, log)
        }
    }
}

fn check_vocab(model: &Model, tok: &Tokenizer, at: &Path) -> Result<()> {
    if tok.vocab_size() > model.cfg.vocab {
        return Err(ModelError::file(
            at,
            format!(
                "the tokenizer has {} tokens but the model's vocabulary is {}",
                tok.vocab_size(),
                model.cfg.vocab
            ),
        ));
    }
    Ok(())
}

/// The loaded model, repacked as `opts` asks, ready to share.
fn finish(mut model: Model, opts: &LoadOptions) -> std::sync::Arc<Model> {
    if let Some(isa) = opts.repack_for {
        model.repack(isa);
    }
    std::sync::Arc::new(model)
}

fn load_gguf(
    name: String,
    path: &Path,
    opts: &LoadOptions,
    log: &mut dyn FnMut(&str),
) -> Result<LoadedModel> {
    log(&format!("loading {}", path.display()));
    let mut f = GgufFile::open(path)?;
    let tok = Tokenizer::from_gguf_metadata(f.metadata())
        .map_err(|e| ModelError::file(path, format!("tokenizer metadata: {e}")))?;
    let model = f.load_model(&mut progress_logger(log))?;
    check_vocab(&model, &tok, path)?;
    let template = template_for(&tok)?;
    Ok(LoadedModel {
        name,
        model: finish(model, opts),
        tokenizer: Some(tok),
        template,
    })
}

/// Turns (done, total) part counts into a log line every 25%.
fn progress_logger(log: &mut dyn FnMut(&str)) -> impl FnMut(usize, usize) + '_ {
    let mut logged: Option<usize> = None;
    move |done, total| {
        let pct = done * 100 / total.max(1);
        if logged.is_none_or(|l| pct >= l + 25 || (done == total && l < 100)) {
            logged = Some(pct);
            log(&format!("loading weights: {pct}% ({done}/{total} parts)"));
        }
    }
}
