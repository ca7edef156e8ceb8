//! The specswarm inference engine: everything needed to run any layer slice of a GGUF model on
//! one machine, with no networking.
//!
//! - [`gguf`]: a bounded GGUF reader (metadata, tensor directory, lazy tensor reads) and writer.
//! - [`config`]: per-architecture switches ([`config::ModelConfig`]) for llama, qwen2, qwen3, gemma3.
//! - [`model`]: [`model::ModelSlice`], layers `[a, b)` of a model behind one transformer block,
//!   with explicit positions, causal or tree attention, hidden-state or logits output.
//! - [`kv`]: the per-session [`kv::KvCache`] with truncate and accept-a-tree-path.
//! - [`tokenizer`], [`chat`]: vocabularies and chat templates read from the GGUF.
//! - [`sampling`]: the seeded sampler chain.
//! - [`generate`]: plain decoding, the reference for every faster path.
//! - [`hub`]: the local model store (named models fetched from Python package indexes).

pub mod chat;
pub mod config;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod hub;
pub mod kv;
pub mod model;
pub mod rng;
pub mod sampling;
pub mod tokenizer;

pub use error::EngineError;
