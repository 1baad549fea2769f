//! The one error type of `cardinal-models`: every failure names the file or
//! value at fault and the limit it broke, so the CLI and the server can show
//! it to the user unchanged.

use std::path::PathBuf;

/// Errors from loading, tokenizing, templating or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A model file exists but its contents are wrong (truncated, bad shape, bad offset...).
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    /// A file could not be opened or read.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The tokenizer could not be built or failed to encode/decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template failed to compile or render.
    #[error("chat template: {0}")]
    Template(String),
    /// The chat template's render sandbox stopped it (memory budget, time
    /// limit) or refuses to run it after such a stop: a fault of the model's
    /// template, not of the request.
    /// (Not a `#[source]`: the message already says it all, and error
    /// chains printed with their causes would say it twice.)
    #[error("chat template: {0}")]
    TemplateStopped(crate::sandbox::Stopped),
    /// The default model could not be fetched or verified.
    #[error("default model: {0}")]
    Fetch(String),
    /// A model argument, config value or input that is not valid.
    #[error("{0}")]
    Invalid(String),
    /// A valid but unsupported feature (architecture, tensor type...).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A kernel-level failure (bad matrix shape, unavailable ISA...).
    #[error(transparent)]
    Kernel(#[from] cardinal_kernels::KernelError),
}

/// Shorthand for results in this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl From<crate::sandbox::Stopped> for ModelError {
    fn from(e: crate::sandbox::Stopped) -> Self {
        ModelError::TemplateStopped(e)
    }
}

impl ModelError {
    /// A [`ModelError::File`] for `path` with a message.
    pub fn file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        ModelError::File {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
