//! The libp2p side of the swarm.
//!
//! - [`identity`]: the persistent ed25519 identity (peer id) of a node.
//! - [`swarm`]: [`swarm::P2pNode`], one libp2p swarm per process (QUIC and TCP+Noise+Yamux;
//!   identify, ping, Kademlia, relay server and client, DCUtR, AutoNAT, libp2p-stream) run by one
//!   task and driven through a bounded command channel.
//! - [`stage`]: stage frames on direct libp2p streams: a worker serves its
//!   [`specswarm_net::node::Node`] (the same routing as the TCP server) on
//!   [`stage::STAGE_PROTOCOL`], next hops are multiaddrs ending in `/p2p/<peer id>`.
//! - [`record`]: the signed worker records workers publish in the DHT.
//! - [`route`]: the cost model and ring choice from discovered workers.
//! - [`ring`]: [`ring::P2pRing`], the client's direct-return ring over libp2p with discovery and
//!   failover ([`ring::generate_swarm`]).

pub mod identity;
pub mod record;
pub mod ring;
pub mod route;
pub mod stage;
pub mod swarm;

use std::path::PathBuf;

#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum P2pError {
    #[error("identity {path:?}: {reason}")]
    Identity { path: PathBuf, reason: String },
    #[error("starting the libp2p node: {0}")]
    Start(String),
    #[error("bad worker record: {0}")]
    BadRecord(String),
    #[error("no ring covers layers 0..{n_layers} of the model ({workers} workers found; gaps {gaps:?})")]
    NoRing { n_layers: u32, workers: usize, gaps: Vec<(u32, u32)> },
    #[error("{0}")]
    Ring(#[from] specswarm_net::ring::RingError),
}
