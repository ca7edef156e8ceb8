//! Tokenizers built from a GGUF file's `tokenizer.ggml.*` metadata.
//!
//! Encoding is delegated to `shimmytok`, which follows llama.cpp's vocabulary code (BPE with the
//! pre-tokenizer table, e.g. SmolLM2's `smollm`; SentencePiece for `llama`-type vocabularies such
//! as Gemma's) and is tested against llama.cpp's own ids (`fixtures/reference`). Decoding is ours:
//! every token maps to its exact bytes (GPT-2 byte-level pieces are mapped back, SentencePiece `▁`
//! is a space and `<0xAB>` is one byte), so streaming never splits a UTF-8 character.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use shimmytok::{EncodeOptions, TokenType};
use specswarm_proto::limits::PROMPT_BYTES_MAX;

#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read the tokenizer from {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("text of {bytes} bytes exceeds the {max}-byte limit")]
    TooLong { bytes: usize, max: usize },
    #[error("tokenization failed: {reason}")]
    Encode { reason: String },
}

/// Names of tokens that end a turn in common chat formats.
const STOP_PIECES: &[&str] =
    &["<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|end_of_text|>"];

pub struct Tokenizer {
    inner: shimmytok::Tokenizer,
    /// Exact bytes of each token's piece.
    bytes: Vec<Vec<u8>>,
    special: Vec<bool>,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    strip_leading_space: bool,
    add_eos: bool,
    stop: Vec<u32>,
    /// User-defined tokens, longest first: always matched in raw text before the model's
    /// algorithm runs (llama.cpp's special-token partition).
    user_defined: Vec<(String, u32)>,
    /// Control tokens, longest first: matched only with `parse_special`.
    control: Vec<(String, u32)>,
}

/// A piece of input during the special-token partition.
enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("model", &self.inner.model_type()).field("vocab", &self.bytes.len()).finish()
    }
}

impl Tokenizer {
    pub fn from_gguf(path: &Path) -> Result<Tokenizer, TokenizerError> {
        let load_err = |reason: String| TokenizerError::Load { path: path.display().to_string(), reason };
        let inner = catch_unwind(|| shimmytok::Tokenizer::from_gguf_file(path))
            .map_err(|_| load_err("the tokenizer metadata is malformed".into()))?
            .map_err(|e| load_err(e.to_string()))?;
        let byte_level = matches!(inner.model_type(), "gpt2" | "qwen" | "qwen2");
        let unicode_to_bytes = shimmytok::byte_encoder::unicode_to_bytes();
        let n = inner.vocab_size();
        let mut bytes = Vec::with_capacity(n);
        let mut special = Vec::with_capacity(n);
        let (mut user_defined, mut control) = (Vec::new(), Vec::new());
        for id in 0..n as u32 {
            let piece = inner.token_to_piece(id).unwrap_or_default();
            let ty = inner.token_type(id);
            let b = match ty {
                TokenType::Control | TokenType::UserDefined | TokenType::Unknown => piece.clone().into_bytes(),
                TokenType::Byte => parse_byte_token(&piece).map_or_else(|| piece.clone().into_bytes(), |b| vec![b]),
                _ if byte_level => {
                    let mut out = Vec::with_capacity(piece.len());
                    for c in piece.chars() {
                        match unicode_to_bytes.get(&c) {
                            Some(&b) => out.push(b),
                            None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                        }
                    }
                    out
                }
                _ => piece.replace('\u{2581}', " ").into_bytes(),
            };
            match ty {
                TokenType::UserDefined if !piece.is_empty() => user_defined.push((piece.clone(), id)),
                TokenType::Control if !piece.is_empty() => control.push((piece.clone(), id)),
                _ => {}
            }
            bytes.push(b);
            special.push(inner.is_special_token(id) || ty == TokenType::Control);
        }
        let valid = |id: u32| ((id as usize) < n).then_some(id);
        let bos = valid(inner.bos_token());
        let eos = valid(inner.eos_token());
        let add_bos = meta_bool(&inner, "tokenizer.ggml.add_bos_token").unwrap_or(!byte_level);
        let strip_leading_space = !byte_level && meta_bool(&inner, "tokenizer.ggml.add_space_prefix").unwrap_or(true);
        let add_eos = meta_bool(&inner, "tokenizer.ggml.add_eos_token").unwrap_or(false);
        let longest_first =
            |v: &mut Vec<(String, u32)>| v.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        longest_first(&mut user_defined);
        longest_first(&mut control);
        let mut stop: Vec<u32> = eos.into_iter().collect();
        for p in STOP_PIECES {
            if let Some(id) = inner.get_token(p) {
                stop.push(id);
            }
        }
        stop.sort_unstable();
        stop.dedup();
        Ok(Tokenizer {
            inner,
            bytes,
            special,
            bos,
            eos,
            add_bos,
            strip_leading_space,
            add_eos,
            stop,
            user_defined,
            control,
        })
    }

    /// Encode `text`. `add_special` adds BOS (and EOS) as the model's metadata asks, as llama.cpp
    /// does; `parse_special` turns special-token text such as `<|im_start|>` into that token (use
    /// it only for text a template produced, never for raw user input).
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<u32>, TokenizerError> {
        if text.len() > PROMPT_BYTES_MAX {
            return Err(TokenizerError::TooLong { bytes: text.len(), max: PROMPT_BYTES_MAX });
        }
        let mut fragments = vec![Fragment::Text(text)];
        let specials = self.user_defined.iter().chain(self.control.iter().filter(|_| parse_special));
        for (piece, id) in specials {
            if !text.contains(piece.as_str()) {
                continue;
            }
            let mut next = Vec::with_capacity(fragments.len());
            for f in fragments {
                match f {
                    Fragment::Text(t) if t.contains(piece.as_str()) => {
                        let mut rest = t;
                        while let Some(at) = rest.find(piece.as_str()) {
                            if at > 0 {
                                next.push(Fragment::Text(&rest[..at]));
                            }
                            next.push(Fragment::Token(*id));
                            rest = &rest[at + piece.len()..];
                        }
                        if !rest.is_empty() {
                            next.push(Fragment::Text(rest));
                        }
                    }
                    other => next.push(other),
                }
            }
            fragments = next;
        }
        let mut out = Vec::new();
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        let opts = EncodeOptions::with_parse_special(false, false);
        for f in fragments {
            match f {
                Fragment::Token(id) => out.push(id),
                Fragment::Text(t) => {
                    let ids = catch_unwind(AssertUnwindSafe(|| self.inner.encode_with_options(t, &opts)))
                        .map_err(|_| TokenizerError::Encode { reason: "the tokenizer failed on this input".into() })?
                        .map_err(|e| TokenizerError::Encode { reason: e.to_string() })?;
                    out.extend(ids);
                }
            }
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        Ok(out)
    }

    /// Decode ids to text (invalid UTF-8 is replaced at the end only).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let mut d = StreamDecoder::new(self, skip_special);
        let mut s: String = ids.iter().map(|&id| d.push(id)).collect();
        s.push_str(&d.finish());
        s
    }

    /// The exact bytes of one token (empty for an unknown id).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.bytes.get(id as usize).map_or(&[], Vec::as_slice)
    }

    pub fn vocab_size(&self) -> usize {
        self.bytes.len()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Whether the model wants a BOS token at the start of a prompt.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Tokens that end generation (EOS and end-of-turn tokens present in the vocabulary).
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop
    }

    pub fn token_id(&self, piece: &str) -> Option<u32> {
        self.inner.get_token(piece)
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }
}

fn meta_bool(t: &shimmytok::Tokenizer, key: &str) -> Option<bool> {
    match t.metadata().get(key)? {
        shimmytok::GGUFValue::Bool(b) => Some(*b),
        _ => None,
    }
}

fn parse_byte_token(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}

/// Incremental detokenizer: push ids, get the text that is complete so far. Bytes of a UTF-8
/// character split across tokens are held back until the character is whole.
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    skip_special: bool,
    pending: Vec<u8>,
    at_start: bool,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tok: &'a Tokenizer, skip_special: bool) -> Self {
        StreamDecoder { tok, skip_special, pending: Vec::new(), at_start: true }
    }

    pub fn push(&mut self, id: u32) -> String {
        if self.skip_special && self.tok.is_special(id) {
            return String::new();
        }
        let mut b = self.tok.token_bytes(id);
        if self.at_start && self.tok.strip_leading_space && b.first() == Some(&b' ') {
            b = &b[1..];
        }
        self.at_start = false;
        self.pending.extend_from_slice(b);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            // An incomplete character at the end waits; an invalid sequence is emitted lossily.
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => self.pending.len(),
        };
        let out: Vec<u8> = self.pending.drain(..valid).collect();
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Flush whatever is held back (lossily).
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}
