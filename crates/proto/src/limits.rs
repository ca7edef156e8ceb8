//! Every bound specswarm enforces, in one place. Units are the last word of each name.
//!
//! A limit is checked *before* the allocation it protects (a length prefix is compared with its
//! maximum before a buffer of that length exists).

/// Largest GGUF metadata string (a chat template, a token) we accept.
pub const GGUF_STRING_BYTES_MAX: u64 = 16 * 1024 * 1024;
/// Largest number of elements in one GGUF metadata array (vocabularies are ~262k tokens).
pub const GGUF_ARRAY_ELEMENTS_MAX: u64 = 16 * 1024 * 1024;
/// Largest number of metadata key/value pairs in one GGUF header.
pub const GGUF_METADATA_ENTRIES_MAX: u64 = 65_536;
/// Largest number of tensors in one GGUF file.
pub const GGUF_TENSORS_MAX: u64 = 1_000_000;
/// Largest number of dimensions of one GGUF tensor (the format defines at most 4).
pub const GGUF_TENSOR_DIMS_MAX: u32 = 4;
/// Largest single tensor we load (bytes).
pub const GGUF_TENSOR_BYTES_MAX: u64 = 64 * 1024 * 1024 * 1024;

/// Default KV-cache budget of one session, in tokens, when the caller does not set one.
pub const KV_TOKENS_PER_SESSION_DEFAULT: usize = 8192;
/// Hard ceiling of the KV-cache budget of one session, in tokens.
pub const KV_TOKENS_PER_SESSION_MAX: usize = 1 << 20;
/// Largest number of tokens (or tree nodes) in one forward batch.
pub const FORWARD_BATCH_TOKENS_MAX: usize = 8192;
/// Largest number of tokens a single generate request may produce.
pub const GENERATE_TOKENS_MAX: usize = 1 << 20;
/// Largest prompt we tokenize, in bytes.
pub const PROMPT_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Largest payload of one stage-protocol frame (a prefill chunk of hidden states fits well).
pub const FRAME_PAYLOAD_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Widest row a frame may carry: a hidden state, or a row of logits (vocabularies reach ~262k).
pub const ROW_VALUES_MAX: usize = 1 << 20;
/// Longest error message carried in a frame.
pub const ERROR_MESSAGE_BYTES_MAX: usize = 4096;
/// Longest next-hop address in an `Open` frame.
pub const NEXT_HOP_BYTES_MAX: usize = 256;

/// Largest HTTP request body the gateway reads; larger bodies are answered 413.
pub const GATEWAY_REQUEST_BODY_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Largest `max_tokens` (or `max_completion_tokens`) a gateway request may ask for.
pub const GATEWAY_COMPLETION_TOKENS_MAX: usize = 8192;
/// `max_tokens` of an OpenAI request that sets none.
pub const GATEWAY_COMPLETION_TOKENS_DEFAULT: usize = 256;
/// Most generations the gateway holds at once, running or queued; beyond it requests get 503.
pub const GATEWAY_SESSIONS_MAX: usize = 256;
/// Most stop sequences in one request.
pub const GATEWAY_STOP_SEQUENCES_MAX: usize = 16;
/// Longest stop sequence, in bytes.
pub const GATEWAY_STOP_SEQUENCE_BYTES_MAX: usize = 256;
/// Most alternatives per token in `top_logprobs`.
pub const GATEWAY_TOP_LOGPROBS_MAX: usize = 20;
/// Most messages in one chat request.
pub const GATEWAY_MESSAGES_MAX: usize = 4096;
/// Most tools in one request.
pub const GATEWAY_TOOLS_MAX: usize = 128;
/// Default per-key rate limit, in requests per minute (a token bucket of this capacity).
pub const GATEWAY_KEY_RATE_PER_MINUTE_DEFAULT: u32 = 600;
/// Highest per-key rate limit, in requests per minute.
pub const GATEWAY_KEY_RATE_PER_MINUTE_MAX: u32 = 1_000_000;
/// Longest API key name, in bytes.
pub const GATEWAY_KEY_NAME_BYTES_MAX: usize = 128;
/// Window of the "recent tokens/s" figure, in seconds.
pub const GATEWAY_THROUGHPUT_WINDOW_S: u64 = 10;
/// Events buffered between a running generation and its HTTP response; a slow client holds the
/// generation back (backpressure) instead of growing a queue.
pub const GATEWAY_STREAM_EVENTS_BUFFERED_MAX: usize = 64;
