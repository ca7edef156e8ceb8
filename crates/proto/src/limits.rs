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
/// Generations computed at once by default (`--parallel`). The local backend runs them as one
/// batch: a decode step of eight sequences costs little more than one on a CPU.
pub const GATEWAY_PARALLEL_DEFAULT: usize = 8;
/// Generations waiting for a local model's batch scheduler before their threads wait too.
pub const GATEWAY_BATCH_QUEUE_REQUESTS_MAX: usize = 64;
/// Most sequences one local model decodes together (the rest wait in its queue).
pub const GATEWAY_BATCH_SEQUENCES_MAX: usize = 64;
/// Most rows (decode tokens plus prompt chunks) in one batched step of a local model: a long
/// prompt is prefilled in chunks so that the sequences decoding beside it wait at most one
/// chunk's compute per token.
pub const GATEWAY_BATCH_STEP_TOKENS_MAX: usize = 256;

// ---- The libp2p swarm (`specswarm-p2p`) and worker routing (`specswarm-net::node`).

/// Most session routes one worker keeps (at least the stage's session limit; routes of evicted
/// sessions are pruned when this is reached).
pub const ROUTES_PER_NODE_MAX: usize = 4096;
/// Most next-hop connections one worker keeps open (sessions share them by address).
pub const NEXT_HOPS_PER_NODE_MAX: usize = 256;
/// Most stage-protocol streams one peer may hold open to a worker at once.
pub const STAGE_STREAMS_PER_PEER_MAX: usize = 8;
/// Most stage-protocol streams a worker serves at once, all peers together.
pub const STAGE_STREAMS_TOTAL_MAX: usize = 512;
/// Frames queued for sending on one stream before the sender waits.
pub const STREAM_SEND_QUEUE_FRAMES_MAX: usize = 16;
/// Longest a worker waits for room in a stream's send queue before dropping the stream, ms.
pub const STREAM_SEND_STALL_MS: u64 = 5_000;
/// Frames queued for a worker's compute thread, all connections together, before readers wait.
pub const COMPUTE_QUEUE_FRAMES_MAX: usize = 64;
/// Most frames one compute of a worker takes from its queue as one batch (their rows together
/// stay within `FORWARD_BATCH_TOKENS_MAX`).
pub const STAGE_BATCH_FRAMES_MAX: usize = 64;
/// Dials (and stream opens) a node runs at once; further ones wait.
pub const PENDING_DIALS_MAX: usize = 16;
/// Bound on a single dial plus stream negotiation, milliseconds.
pub const DIAL_TIMEOUT_MS: u64 = 10_000;
/// Largest worker record (signed, serialized) accepted from the DHT, bytes.
pub const WORKER_RECORD_BYTES_MAX: usize = 4096;
/// Most listen addresses carried in one worker record.
pub const WORKER_RECORD_ADDRS_MAX: usize = 8;
/// Longest address string in a worker record, bytes (fits `NEXT_HOP_BYTES_MAX`).
pub const WORKER_RECORD_ADDR_BYTES_MAX: usize = 256;
/// How long a worker record stays valid after it is published, seconds.
pub const WORKER_RECORD_TTL_SECS: u64 = 120;
/// How often a worker republishes its record (free KV and throughput change), seconds.
pub const WORKER_RECORD_REFRESH_SECS: u64 = 20;
/// Most workers a client considers for one model (records fetched from the DHT).
pub const WORKERS_PER_LOOKUP_MAX: usize = 64;
/// Bound on one DHT request to one peer (a stalled peer costs a lookup at most this), ms.
pub const DHT_REQUEST_TIMEOUT_MS: u64 = 2_000;
/// Largest DHT message, bytes (records are at most `WORKER_RECORD_BYTES_MAX`).
pub const DHT_PACKET_BYTES_MAX: usize = 64 * 1024;
/// Bound on one DHT lookup (providers, then records), milliseconds.
pub const DHT_LOOKUP_TIMEOUT_MS: u64 = 10_000;
/// Bound on the client's wait for ping RTTs of the workers it considers, milliseconds.
pub const PING_WAIT_MS: u64 = 3_000;
/// Most circuits a relay node serves at once, and per peer.
pub const RELAY_CIRCUITS_MAX: usize = 64;
pub const RELAY_CIRCUITS_PER_PEER_MAX: usize = 8;
/// Bytes one relayed circuit may carry before the relay closes it (activations are ~2-4 KiB
/// per token per hop on the small models; a prefill chunk is larger).
pub const RELAY_CIRCUIT_BYTES_MAX: u64 = 256 * 1024 * 1024;
/// Longest a relayed circuit lives, seconds.
pub const RELAY_CIRCUIT_SECS_MAX: u64 = 3600;
/// Most connections a node keeps, all peers together; per peer; and pending incoming ones.
pub const CONNECTIONS_MAX: u32 = 1024;
pub const CONNECTIONS_PER_PEER_MAX: u32 = 8;
pub const CONNECTIONS_PENDING_MAX: u32 = 128;
/// Past outputs a gateway keeps for suffix drafting, per model and API key, tokens (whole
/// answers dropped oldest first; ~7 index entries per token).
pub const GATEWAY_SUFFIX_CORPUS_TOKENS_MAX: usize = 16_384;
/// Suffix corpora a gateway keeps per model (one per API key; least recently used dropped).
pub const GATEWAY_SUFFIX_CORPORA_MAX: usize = 8;
/// Longest context tail a gateway's suffix corpus indexes, tokens.
pub const GATEWAY_SUFFIX_CORPUS_MATCH_TOKENS_MAX: usize = 8;
