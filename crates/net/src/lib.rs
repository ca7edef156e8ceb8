//! The swarm side of specswarm.
//!
//! - [`stage`]: [`stage::StageServer`], one layer slice serving many sessions through the stage
//!   protocol (`specswarm_proto::wire`), as a pure frame → frame function with bounds on sessions
//!   and KV, epochs, explicit positions and typed errors.
//! - [`ring`]: [`ring::RingClient`], a client session over an ordered ring of stages reached through
//!   [`ring::StageLink`]s, and [`ring::generate_ring`].
//! - [`direct`]: [`direct::DirectRing`], a ring whose stages forward to each other and whose tail
//!   answers the client directly.
//! - [`swarm_spec`]: speculative decoding across a ring (any [`swarm_spec::SpecRing`]): the tail
//!   verifies and returns token ids, rounds can be pipelined, failover replays the committed tokens.
//! - [`delay`]: the in-process WAN emulator (a fixed one-way delay on every frame sent).
//! - [`node`]: [`node::Node`], a worker's per-session routing (next hop, direct return to the
//!   client) over any transport that implements [`node::FrameSink`] and [`node::Dialer`].
//! - [`tcp`]: frames over plain TCP (`specswarm worker --listen ip:port`); the libp2p transport
//!   lives in `specswarm-p2p`.
//! - `wan` (Linux): user-space WAN emulation between network namespaces through TUN devices.
//!

pub mod delay;
pub mod direct;
pub mod node;
pub mod ring;
pub mod stage;
pub mod swarm_spec;
pub mod tcp;
#[cfg(target_os = "linux")]
pub mod wan;

/// The model id stages agree on: the sha256 of the GGUF file.
pub fn model_id(path: &std::path::Path) -> std::io::Result<[u8; 32]> {
    let hex = specswarm_engine::hub::sha256_file(path)?;
    let mut id = [0u8; 32];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("sha256 hex");
    }
    Ok(id)
}
