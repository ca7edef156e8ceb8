use std::path::PathBuf;

/// Everything the engine can refuse, with the fields a caller needs to explain it.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("corrupt model file {path}: {reason}")]
    CorruptModel { path: PathBuf, reason: String },
    #[error("model metadata key {key:?} is missing or has the wrong type")]
    MissingMetadata { key: String },
    #[error("model tensor {name:?} is missing")]
    MissingTensor { name: String },
    #[error("tensor {tensor:?} has shape {got:?}, expected {expected:?}")]
    ShapeMismatch { tensor: String, expected: Vec<u64>, got: Vec<u64> },
    #[error("unsupported architecture {arch:?}; supported: {}", supported.join(", "))]
    UnsupportedArchitecture { arch: String, supported: &'static [&'static str] },
    #[error("invalid model configuration: {reason}")]
    InvalidConfig { reason: String },
    #[error("invalid layer range {start}..{end} for a model with {n_layers} layers")]
    BadLayerRange { start: usize, end: usize, n_layers: usize },
    #[error("KV cache budget exceeded: {needed} tokens needed, budget is {budget}")]
    KvBudgetExceeded { needed: usize, budget: usize },
    #[error("context length exceeded: {needed} tokens needed, the model's context is {context}")]
    ContextExceeded { needed: usize, context: usize },
    #[error("position mismatch at batch index {index}: expected {expected}, got {got}")]
    PositionMismatch { index: usize, expected: u64, got: u64 },
    #[error("invalid batch: {reason}")]
    BadBatch { reason: String },
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("this slice does not {what}")]
    WrongSliceRole { what: &'static str },
}
