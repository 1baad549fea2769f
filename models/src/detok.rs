//! The streaming detokenizer ([`IncrementalDecoder`], re-exported from
//! `tokenizer`): generated ids in, complete UTF-8 text out, never half a
//! character, the pieces always adding up to `Tokenizer::decode` of all ids.

use crate::error::Result;
use crate::tokenizer::Tokenizer;

/// Streaming detokenizer: push generated ids one at a time and get back only
/// complete text, never half a UTF-8 character.
///
/// For byte-level tokenizers (all GGUF ones) each id is turned into its raw
/// bytes and the longest valid UTF-8 prefix is emitted; an incomplete
/// trailing sequence is held back until it completes, and bytes that can never
/// be valid become U+FFFD exactly as in [`Tokenizer::decode`]. So the pieces
/// concatenated always equal `decode(all ids)`. Other decoders use the
/// prefix-offset method of vLLM/TGI (decode a small window twice, emit the
/// growth once it no longer ends in U+FFFD).
#[derive(Debug)]
pub struct IncrementalDecoder {
    tok: Tokenizer,
    skip_special: bool,
    state: DecodeState,
}

#[derive(Debug)]
enum DecodeState {
    /// Raw bytes not yet emitted (an incomplete character).
    Bytes(Vec<u8>),
    /// The window of ids still needed; text of `ids[..read]` was emitted.
    Window { ids: Vec<u32>, read: usize },
}

impl IncrementalDecoder {
    /// A decoder for `tok`; special tokens are dropped with `skip_special`.
    pub fn new(tok: &Tokenizer, skip_special: bool) -> Self {
        let state = match tok.byte_level() {
            true => DecodeState::Bytes(Vec::new()),
            false => DecodeState::Window {
                ids: Vec::new(),
                read: 0,
            },
        };
        IncrementalDecoder {
            tok: tok.clone(),
            skip_special,
            state,
        }
    }

    /// Adds one id; returns the text that became complete (often empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.tok.check_id(id)?;
        if self.skip_special && self.tok.is_special(id) {
            return Ok(String::new());
        }
        match &mut self.state {
            DecodeState::Bytes(pending) => {
                self.tok.token_bytes(id, pending);
                Ok(take_utf8(pending, false))
            }
            DecodeState::Window { ids, read } => {
                ids.push(id);
                window_text(&self.tok, ids, read, self.skip_special, false)
            }
        }
    }

    /// Flushes what is held back (an incomplete character becomes U+FFFD) and
    /// resets the decoder for a new stream.
    pub fn finish(&mut self) -> Result<String> {
        match &mut self.state {
            DecodeState::Bytes(pending) => Ok(take_utf8(pending, true)),
            DecodeState::Window { ids, read } => {
                window_text(&self.tok, ids, read, self.skip_special, true)
            }
        }
    }
}

/// Prefix-offset step: the text `ids` add beyond `ids[..read]`, once it does
/// not end in U+FFFD (or at `flush`); then the window slides forward.
fn window_text(
    tok: &Tokenizer,
    ids: &mut Vec<u32>,
    read: &mut usize,
    skip: bool,
    flush: bool,
) -> Result<String> {
    let before = tok.decode(&ids[..*read], skip)?;
    let now = tok.decode(ids, skip)?;
    let ready = now.len() > before.len() && now.is_char_boundary(before.len());
    let out = match ready && (flush || !now.ends_with('\u{FFFD}')) {
        true => now[before.len()..].to_string(),
        false if flush => String::new(),
        false => return Ok(String::new()),
    };
    if flush {
        ids.clear();
    } else {
        ids.drain(..*read);
    }
    *read = ids.len();
    Ok(out)
}

/// Removes and returns the complete UTF-8 text at the front of `buf`, with
/// invalid bytes as U+FFFD (as `String::from_utf8_lossy` does). An incomplete
/// sequence at the end stays in `buf` unless `flush`.
fn take_utf8(buf: &mut Vec<u8>, flush: bool) -> String {
    let mut out = String::new();
    let mut pos = 0;
    while pos < buf.len() {
        match std::str::from_utf8(&buf[pos..]) {
            Ok(s) => {
                out.push_str(s);
                pos = buf.len();
            }
            Err(e) => {
                let valid = e.valid_up_to();
                out.push_str(std::str::from_utf8(&buf[pos..pos + valid]).unwrap_or_default());
                pos += valid;
                match e.error_len() {
                    Some(n) => {
                        out.push('\u{FFFD}');
                        pos += n;
                    }
                    None if flush => {
                        out.push('\u{FFFD}');
                        pos = buf.len();
                    }
                    None => break,
                }
            }
        }
    }
    buf.drain(..pos);
    out
}
