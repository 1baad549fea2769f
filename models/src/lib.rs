//! `cardinal-models`: everything about a model that is not a card. It loads
//! weights (GGUF, Hugging Face directories, seeded synthetic shapes) into the
//! int4/int8 layout of `cardinal-kernels`, builds the tokenizer and chat
//! template, fetches the default model, and runs the transformer forward pass
//! one part (embedding, decoder layer, head) at a time so that the pipeline
//! crate can place parts on cards.
//!
//! It also installs the process's global allocator, [`alloc_guard::GuardedAlloc`]
//! (the system allocator plus per-thread memory budgets), so that every
//! binary that can render a chat template (the server, the `cardinal`
//! binary, every test binary of this workspace that links this crate) has
//! it exactly once: a second `#[global_allocator]` anywhere in a binary is a
//! link error, never a silent miss. Chat templates render under a budget
//! with it (see [`template`]).

pub mod alloc_guard;
pub mod config;
mod detok;
pub mod error;
pub mod fetch;
pub mod forward;
pub mod gguf;
pub mod hf;
pub mod kv;
pub mod load;
pub mod model;
pub mod sandbox;
pub mod synthetic;
pub mod template;
pub mod tokenizer;

pub use config::{Arch, ModelConfig};
pub use error::{ModelError, Result};
pub use load::{LoadOptions, LoadedModel, ModelSource, load};
pub use model::Model;

/// The global allocator of every binary linking this crate (see the crate
/// docs and [`alloc_guard`]).
#[global_allocator]
static GLOBAL: alloc_guard::GuardedAlloc = alloc_guard::GuardedAlloc;
