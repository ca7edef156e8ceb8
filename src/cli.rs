//! Command-line surface.

use clap::{Args, Parser, Subcommand};
use specswarm_engine::sampling::SamplerConfig;

#[derive(Parser, Debug)]
#[command(name = "specswarm", version, about = "Speculative decoding over a swarm of layer-sharded workers")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Manage cached models.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Generate text with a whole model in this process.
    Generate(GenerateArgs),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Pull the default model, start a local swarm of worker processes, and run a few prompts
    /// through it, printing what ran where and how fast.
    Demo {
        #[arg(long, default_value_t = 48)]
        max_tokens: usize,
        /// Number of worker processes (layer slices).
        #[arg(long, default_value_t = 3)]
        workers: usize,
        /// Plain TCP workers at fixed addresses instead of the libp2p swarm with discovery.
        #[arg(long)]
        tcp: bool,
    },
    /// Serve a slice of a model's layers to the swarm.
    Worker(WorkerArgs),
    /// Serve models over OpenAI- and Anthropic-compatible HTTP APIs, with a web chat at `/` and
    /// a swarm dashboard at `/swarm`.
    Gateway(GatewayArgs),
    /// Manage the gateway's API keys (stored hashed in `$SPECSWARM_HOME/gateway.sqlite3`).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// A libp2p node with no model: DHT bootstrap peer and relay for the swarm.
    Bootstrap(BootstrapArgs),
    /// Look at the libp2p swarm.
    Swarm {
        #[command(subcommand)]
        command: SwarmCommand,
    },
    /// WAN emulation between network namespaces (needs root).
    Wan {
        #[command(subcommand)]
        command: WanCommand,
    },
}

#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// A known model name (pulled on first use) or a path to a GGUF file.
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// Layer range A:B (half-open); default: the whole model.
    #[arg(long)]
    pub layers: Option<String>,
    /// Where to listen. `ip:port` serves the stage protocol over plain TCP; multiaddrs
    /// (`/ip4/0.0.0.0/tcp/0`, `/ip4/0.0.0.0/udp/0/quic-v1`; repeatable) join the libp2p swarm.
    /// Port 0 picks a free one; the chosen addresses are printed.
    #[arg(long, default_values_t = vec!["127.0.0.1:0".to_string()])]
    pub listen: Vec<String>,
    /// libp2p: peers to join the swarm through (multiaddrs ending in /p2p/<peer id>).
    #[arg(long)]
    pub bootstrap: Vec<String>,
    /// libp2p: the identity key file (created on first run, mode 0600); default: the first free
    /// `worker*.key` under $SPECSWARM_HOME/identity.
    #[arg(long)]
    pub identity: Option<std::path::PathBuf>,
    /// libp2p: also listen through this relay (for a worker behind NAT; its DHT record then
    /// carries the relayed address, and the DHT runs in client mode).
    #[arg(long)]
    pub relay: Vec<String>,
    /// libp2p: do not act as a relay for others.
    #[arg(long)]
    pub no_relay_server: bool,
    /// Compute threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Most concurrent sessions.
    #[arg(long, default_value_t = 64)]
    pub sessions_max: usize,
    /// Exit when standard input closes (the demo uses this so workers never outlive it).
    #[arg(long)]
    pub exit_on_stdin_eof: bool,
    /// In-process WAN emulation: delay every frame this worker sends by this many milliseconds.
    #[arg(long, default_value_t = 0.0)]
    pub delay_ms: f64,
}

#[derive(Args, Debug)]
pub struct GatewayArgs {
    /// Address to listen on (port 0 picks a free one; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Models to serve: known names (pulled on first use) or GGUF paths; repeat for several.
    /// Default: smollm2-135m.
    #[arg(long)]
    pub model: Vec<String>,
    /// Serve the models from the libp2p swarm (workers found through --bootstrap) instead of
    /// loading them here; `--model` then names the model (its tokenizer and chat template).
    #[arg(long, requires = "bootstrap")]
    pub swarm: bool,
    /// Swarm peers to join through (multiaddrs ending in /p2p/<peer id>), with --swarm.
    #[arg(long)]
    pub bootstrap: Vec<String>,
    /// With --swarm and --draft: most speculative rounds in flight (chains or trees).
    #[arg(long, default_value_t = 1)]
    pub pipeline: usize,
    /// With --swarm and --draft: tree node budget B per round (default: the draft length, i.e.
    /// a chain; larger drafts trees with up to 3 children per node).
    #[arg(long, requires = "swarm")]
    pub tree_budget: Option<usize>,
    /// Compute threads per model (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Generations computed at once; the others wait in the queue. The local backend runs them
    /// as one batch per step.
    #[arg(long, default_value_t = specswarm_proto::limits::GATEWAY_PARALLEL_DEFAULT)]
    pub parallel: usize,
    /// Generations held at once (running or queued); beyond this requests get 503.
    #[arg(long, default_value_t = specswarm_proto::limits::GATEWAY_SESSIONS_MAX)]
    pub sessions_max: usize,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, default_value_t = specswarm_proto::limits::GATEWAY_REQUEST_BODY_BYTES_MAX)]
    pub body_bytes_max: usize,
    /// Speculative decoding (lossless) with this drafter: ngram, suffix (also reads the same API
    /// key's earlier answers), self:K, lens:K, skip:LAYERS, model:PATH_OR_NAME or FIRST/SECOND
    /// (e.g. suffix/lens:27). A model drafter is loaded once per model and shared by requests.
    #[arg(long)]
    pub draft: Option<String>,
    /// Draft length per round.
    #[arg(long, default_value_t = 5)]
    pub draft_len: usize,
    /// Accept requests without an API key (local demo only).
    #[arg(long)]
    pub no_auth: bool,
    /// The API key database (default: $SPECSWARM_HOME/gateway.sqlite3).
    #[arg(long)]
    pub keys_db: Option<std::path::PathBuf>,
    /// Tokio worker threads for HTTP (generation runs on its own blocking threads).
    #[arg(long, default_value_t = 2)]
    pub http_threads: usize,
    /// Exit when standard input closes (tests use this so the gateway never outlives them).
    #[arg(long)]
    pub exit_on_stdin_eof: bool,
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Create a key and print it (it is shown only this once; only its sha256 is stored).
    Create {
        #[arg(long, default_value = "default")]
        name: String,
        /// Requests per minute (token bucket).
        #[arg(long, default_value_t = specswarm_proto::limits::GATEWAY_KEY_RATE_PER_MINUTE_DEFAULT)]
        rate_per_minute: u32,
        #[arg(long)]
        db: Option<std::path::PathBuf>,
    },
    /// List keys (prefix, name, rate; never the key).
    List {
        #[arg(long)]
        db: Option<std::path::PathBuf>,
    },
    /// Revoke a key by id.
    Revoke {
        id: i64,
        #[arg(long)]
        db: Option<std::path::PathBuf>,
    },
}

#[derive(Args, Debug)]
pub struct BootstrapArgs {
    /// Multiaddrs to listen on (repeatable).
    #[arg(long, default_values_t = vec!["/ip4/0.0.0.0/tcp/0".to_string(), "/ip4/0.0.0.0/udp/0/quic-v1".to_string()])]
    pub listen: Vec<String>,
    /// Other bootstrap peers.
    #[arg(long)]
    pub bootstrap: Vec<String>,
    /// Identity key file; default: the first free `bootstrap*.key` under $SPECSWARM_HOME/identity.
    #[arg(long)]
    pub identity: Option<std::path::PathBuf>,
    /// Exit when standard input closes.
    #[arg(long)]
    pub exit_on_stdin_eof: bool,
}

#[derive(Subcommand, Debug)]
pub enum SwarmCommand {
    /// Peers, layer ranges, RTT, free KV, and coverage gaps of the workers in the DHT.
    Status {
        #[arg(long, required = true)]
        bootstrap: Vec<String>,
        /// Only this model (a known name or a GGUF path); default: the known models.
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum WanCommand {
    /// Create namespaces ssw1..sswN (10.77.0.i) joined through a delaying router; runs until
    /// interrupted or until standard input closes, then deletes the namespaces.
    Router {
        #[arg(long, default_value_t = 2)]
        hosts: usize,
        /// One-way delay per link, milliseconds.
        #[arg(long, default_value_t = 25.0)]
        delay_ms: f64,
        #[arg(long, default_value_t = 0.0)]
        jitter_ms: f64,
        /// Packet loss probability (0..1).
        #[arg(long, default_value_t = 0.0)]
        loss: f64,
        /// Link rate in kbit/s (0: unlimited).
        #[arg(long, default_value_t = 0)]
        rate_kbps: u64,
        /// Also stop when standard input closes (for tests that own the process).
        #[arg(long)]
        exit_on_stdin_eof: bool,
    },
    /// Echo UDP datagrams (run inside a namespace with `ip netns exec`).
    Echo {
        #[arg(long)]
        listen: String,
    },
    /// Measure UDP round trips to an echo server; prints JSON.
    Ping {
        #[arg(long)]
        to: String,
        #[arg(long, default_value_t = 20)]
        count: usize,
    },
}

#[derive(Subcommand, Debug)]
pub enum ModelCommand {
    /// Download, verify and cache a named model (skipped when the cached copy verifies).
    Pull {
        name: String,
        /// Download again even if a verified copy is cached.
        #[arg(long)]
        force: bool,
    },
    /// Show known models and what is cached.
    List,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Prefill (128 and 512 tokens) and decode (128 tokens) speed of the local engine.
    Engine(BenchEngineArgs),
    /// Speculative decoding on the prompt suites: acceptance, tokens per round, and local speedup
    /// over plain decoding (outputs are checked to be identical).
    Spec(BenchSpecArgs),
    /// Worker processes under WAN emulation: plain, speculative chain, tree, pipelined chains and
    /// pipelined trees, and concurrent streams in one run, each next to its ceiling 1/((1 − a)·T).
    Swarm(BenchSwarmArgs),
    /// The client half of `bench swarm` against workers already running (the netns emulator
    /// runs it inside the client's namespace).
    Ring(BenchRingArgs),
}

/// What a swarm benchmark's client runs: the same for `bench swarm` and its client half
/// `bench ring`.
#[derive(Args, Clone, Debug)]
pub struct SwarmRunArgs {
    /// Prompt suite: chat, code, agentic or copy.
    #[arg(long, default_value = "chat")]
    pub prompts: String,
    /// Tokens per prompt.
    #[arg(long, default_value_t = 48)]
    pub max_tokens: usize,
    /// Drafter for the speculative modes (ngram, suffix, self:K, lens:K, skip:LAYERS, model:PATH_OR_NAME, FIRST/SECOND).
    #[arg(long, default_value = "suffix")]
    pub draft: String,
    /// Compute threads of the client's draft model (model drafters only). The ring is
    /// latency-bound, so the client's cores are mostly idle while rounds travel.
    #[arg(long, default_value_t = 2)]
    pub draft_threads: usize,
    /// Draft depth γ.
    #[arg(long, default_value_t = 8)]
    pub draft_len: usize,
    /// Tree node budget B of the tree modes (tree, pipelined-tree).
    #[arg(long, default_value_t = 24)]
    pub tree_budget: usize,
    /// Tree modes: children per expanded node, and nodes a model drafter expands per draft
    /// forward.
    #[arg(long, default_value_t = 3)]
    pub branch: usize,
    /// Most rounds in flight in the pipelined modes.
    #[arg(long, default_value_t = 4)]
    pub depth: usize,
    /// Comma-separated concurrent stream counts (empty: none).
    #[arg(long, default_value = "1,4,8")]
    pub streams: String,
    /// Comma-separated modes to measure: plain, chain, tree, pipelined (chains),
    /// pipelined-tree.
    #[arg(long, default_value = "plain,chain,tree,pipelined,pipelined-tree")]
    pub modes: String,
    /// Suffix drafters' corpus of earlier answers: `fresh` (each request starts empty) or
    /// `shared` (within a mode, each request reads the answers of the requests before it, as the
    /// gateway's per-key corpus does for an agent's session).
    #[arg(long, default_value = "fresh", value_parser = ["fresh", "shared"])]
    pub corpus: String,
}

impl SwarmRunArgs {
    /// The same settings as command-line flags (to start a client in another process).
    pub fn to_flags(&self) -> Vec<String> {
        let flags = [
            ("--prompts", self.prompts.clone()),
            ("--max-tokens", self.max_tokens.to_string()),
            ("--draft", self.draft.clone()),
            ("--draft-threads", self.draft_threads.to_string()),
            ("--draft-len", self.draft_len.to_string()),
            ("--corpus", self.corpus.clone()),
            ("--tree-budget", self.tree_budget.to_string()),
            ("--branch", self.branch.to_string()),
            ("--depth", self.depth.to_string()),
            ("--streams", self.streams.clone()),
            ("--modes", self.modes.clone()),
        ];
        flags.into_iter().flat_map(|(flag, value)| [flag.to_string(), value]).collect()
    }
}

#[derive(Args, Debug)]
pub struct BenchRingArgs {
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// Comma-separated worker addresses, in layer order (each serves an equal share of layers).
    #[arg(long)]
    pub workers: String,
    #[command(flatten)]
    pub run: SwarmRunArgs,
    /// One-way delay this client adds to every frame it sends (in-process emulator), ms.
    #[arg(long, default_value_t = 0.0)]
    pub delay_ms: f64,
}

#[derive(Args, Debug)]
pub struct BenchSwarmArgs {
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// Number of stages (worker processes, equal layer shares).
    #[arg(long, default_value_t = 4)]
    pub stages: usize,
    /// One-way delay per hop, milliseconds.
    #[arg(long, default_value_t = 25.0)]
    pub latency_ms: f64,
    /// WAN emulator: `inproc` (every process delays what it sends; no root) or `netns`
    /// (namespaces joined by the user-space TUN router; root).
    #[arg(long, default_value = "inproc")]
    pub emulator: String,
    #[command(flatten)]
    pub run: SwarmRunArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BenchSpecArgs {
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// Comma-separated drafters (ngram, suffix, self:K, lens:K, skip:LAYERS, model:PATH_OR_NAME, FIRST/SECOND).
    #[arg(long, default_value = "ngram,suffix,self:8")]
    pub drafters: String,
    /// Comma-separated suites: chat, code, agentic, copy.
    #[arg(long, default_value = "chat,code,agentic,copy")]
    pub prompts: String,
    #[arg(long, default_value_t = 96)]
    pub max_tokens: usize,
    /// Draft depth γ.
    #[arg(long, default_value_t = 6)]
    pub draft_len: usize,
    /// Tree node budget B (equal to the draft length: a chain).
    #[arg(long)]
    pub tree_budget: Option<usize>,
    /// Trees: children per expanded node, and nodes a model drafter expands per draft forward.
    #[arg(long, default_value_t = 3)]
    pub branch: usize,
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BenchEngineArgs {
    /// A known model name or a path to a GGUF file.
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// Compute threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Repetitions; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A known model name (pulled on first use) or a path to a GGUF file.
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user turn in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 disables.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Compute threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Speculative decoding with this drafter: ngram, suffix, self:K (the target's first K
    /// layers), lens:K (the first K layers read through a tuned lens, calibrated once and
    /// cached), skip:LAYERS (the target without those layers, e.g. skip:14-15), model:PATH_OR_NAME
    /// (a smaller model with the same vocabulary), or FIRST/SECOND (e.g. suffix/lens:20: the
    /// second drafts when the first has nothing).
    #[arg(long)]
    pub draft: Option<String>,
    /// Tree node budget B per round (default: the draft length, i.e. a chain).
    #[arg(long)]
    pub tree_budget: Option<usize>,
    /// Draft depth γ per round.
    #[arg(long)]
    pub draft_len: Option<usize>,
    /// Most children per tree node (default 1 for a chain, 3 when --tree-budget exceeds --draft-len).
    #[arg(long)]
    pub branch: Option<usize>,
    /// Choose chain/tree and sizes per round from measured acceptance (within the given limits).
    #[arg(long)]
    pub adaptive: bool,
    /// Generate through a ring of workers discovered in the libp2p swarm (needs --bootstrap);
    /// this process loads only the tokenizer.
    #[arg(long, requires = "bootstrap")]
    pub swarm: bool,
    /// With --swarm and --draft: most speculative rounds in flight (1: wait for each verdict;
    /// more pipelines the rounds, chains or trees as --tree-budget says, adapting the depth to
    /// how often rounds survive).
    #[arg(long, default_value_t = 1)]
    pub pipeline: usize,
    /// Swarm peers to join through (multiaddrs ending in /p2p/<peer id>).
    #[arg(long)]
    pub bootstrap: Vec<String>,
}

impl GenerateArgs {
    pub fn sampler_config(&self) -> SamplerConfig {
        SamplerConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            seed: self.seed,
            ..SamplerConfig::default()
        }
    }
}
