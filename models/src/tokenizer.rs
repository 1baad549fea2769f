//! Placeholder for the tokenizer module (being written).
