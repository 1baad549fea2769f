//! `cardinal-models`: everything about a model that is not a card. It loads
//! weights (GGUF, Hugging Face directories, seeded synthetic shapes) into the
//! int4/int8 layout of `cardinal-kernels`, builds the tokenizer and chat
//! template, fetches the default model, and runs the transformer forward pass
//! one part (embedding, decoder layer, head) at a time so that the pipeline
//! crate can place parts on cards.

pub mod config;
pub mod error;
pub mod fetch;
pub mod forward;
pub mod gguf;
pub mod hf;
pub mod kv;
pub mod load;
pub mod model;
pub mod synthetic;
pub mod template;
pub mod tokenizer;

pub use config::{Arch, ModelConfig};
pub use error::{ModelError, Result};
pub use load::{LoadOptions, LoadedModel, ModelSource, load};
pub use model::Model;
