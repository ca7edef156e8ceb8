//! One libp2p swarm per process, run by one task; the rest of the process talks to it through a
//! bounded command channel ([`P2pNode`]), with a oneshot reply per request.
//!
//! Behaviours: identify (learn peers' listen addresses, feed them to Kademlia), ping (RTT per
//! peer, kept in a table), Kademlia (worker records and model providers), relay server (on nodes
//! that are reachable: bootstrap nodes and workers by default), relay client, DCUtR (upgrade a
//! relayed connection to a direct one by hole punching), AutoNAT (reports whether we are
//! reachable), and libp2p-stream (stage frames on direct streams).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::identity::Keypair;
use libp2p::kad::store::{MemoryStore, MemoryStoreConfig};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, autonat, connection_limits, dcutr, identify, kad, noise, ping, relay,
    yamux,
};
use specswarm_proto::limits::{
    CONNECTIONS_MAX, CONNECTIONS_PENDING_MAX, CONNECTIONS_PER_PEER_MAX, DHT_PACKET_BYTES_MAX, DHT_REQUEST_TIMEOUT_MS,
    DIAL_TIMEOUT_MS, PENDING_DIALS_MAX, RELAY_CIRCUIT_BYTES_MAX, RELAY_CIRCUIT_SECS_MAX, RELAY_CIRCUITS_MAX,
    RELAY_CIRCUITS_PER_PEER_MAX, WORKER_RECORD_BYTES_MAX, WORKER_RECORD_TTL_SECS, WORKERS_PER_LOOKUP_MAX,
};
use tokio::sync::{mpsc, oneshot};

use crate::P2pError;

/// Kademlia protocol of the specswarm DHT (kept apart from the IPFS DHT).
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/specswarm/kad/1.0.0");
/// Identify protocol version string.
pub const IDENTIFY_PROTOCOL: &str = "/specswarm/id/1.0.0";
/// Commands queued for the swarm task before senders wait.
const COMMAND_QUEUE_MAX: usize = 64;
/// Kademlia records kept per node.
const DHT_RECORDS_MAX: usize = 4096;
/// How long a provider lookup keeps collecting after the first providers arrive.
const PROVIDERS_GRACE: Duration = Duration::from_millis(300);
/// How often ping measures each connection's RTT.
const PING_INTERVAL: Duration = Duration::from_secs(2);

#[derive(NetworkBehaviour)]
struct Behaviour {
    limits: connection_limits::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<MemoryStore>,
    relay_client: relay::client::Behaviour,
    relay: Toggle<relay::Behaviour>,
    dcutr: dcutr::Behaviour,
    autonat: autonat::Behaviour,
    stream: libp2p_stream::Behaviour,
}

/// How to start a node.
#[derive(Clone, Debug, Default)]
pub struct P2pConfig {
    /// Multiaddrs to listen on (`/ip4/0.0.0.0/tcp/0`, `/ip4/0.0.0.0/udp/0/quic-v1`, …).
    pub listen: Vec<Multiaddr>,
    /// Known peers (multiaddrs ending in `/p2p/<peer id>`).
    pub bootstrap: Vec<Multiaddr>,
    /// Serve as a relay for peers behind NAT (also marks the concrete listen addresses as
    /// external, which a relay needs to hand out reservations).
    pub relay_server: bool,
    /// Also listen through these relays (`<relay multiaddr>/p2p-circuit`): for nodes behind NAT.
    pub relay_via: Vec<Multiaddr>,
    /// Answer DHT queries (Kademlia server mode). Clients and NATed nodes leave this off.
    pub dht_server: bool,
}

enum Command {
    Connect { peer: PeerId, addrs: Vec<Multiaddr>, reply: oneshot::Sender<Result<Multiaddr, String>> },
    Provide { key: Vec<u8>, record_key: Vec<u8>, record: Vec<u8> },
    Providers { key: Vec<u8>, reply: oneshot::Sender<Vec<PeerId>> },
    GetRecord { key: Vec<u8>, reply: oneshot::Sender<Option<Vec<u8>>> },
    ListenAddrs { reply: oneshot::Sender<Vec<Multiaddr>> },
    Peers { reply: oneshot::Sender<Vec<PeerId>> },
    Forget { peer: PeerId },
}

/// Handle to a running node: cheap to clone, usable from any thread that is not a runtime
/// thread (the methods block on the node's runtime).
#[derive(Clone)]
pub struct P2pNode {
    pub peer_id: PeerId,
    pub keypair: Keypair,
    rt: tokio::runtime::Handle,
    commands: mpsc::Sender<Command>,
    control: libp2p_stream::Control,
    rtts: Arc<Mutex<HashMap<PeerId, Duration>>>,
    _runtime: Arc<RuntimeOwner>,
}

/// Keeps the runtime alive while any handle exists.
struct RuntimeOwner(Option<tokio::runtime::Runtime>);

impl Drop for RuntimeOwner {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

fn relay_config() -> relay::Config {
    relay::Config {
        max_reservations: RELAY_CIRCUITS_MAX,
        max_reservations_per_peer: RELAY_CIRCUITS_PER_PEER_MAX,
        reservation_duration: Duration::from_secs(RELAY_CIRCUIT_SECS_MAX),
        reservation_rate_limiters: Vec::new(),
        max_circuits: RELAY_CIRCUITS_MAX,
        max_circuits_per_peer: RELAY_CIRCUITS_PER_PEER_MAX,
        max_circuit_duration: Duration::from_secs(RELAY_CIRCUIT_SECS_MAX),
        max_circuit_bytes: RELAY_CIRCUIT_BYTES_MAX,
        circuit_src_rate_limiters: Vec::new(),
    }
}

fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().filter_map(|p| if let Protocol::P2p(id) = p { Some(id) } else { None }).last()
}

/// `addr` with `/p2p/<peer>` at the end (unless it already ends with it).
pub fn with_peer(addr: &Multiaddr, peer: PeerId) -> Multiaddr {
    match addr.iter().last() {
        Some(Protocol::P2p(p)) if p == peer => addr.clone(),
        _ => addr.clone().with(Protocol::P2p(peer)),
    }
}

fn is_unspecified(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}

impl P2pNode {
    /// Build the swarm, start listening and bootstrapping, and run it on a runtime with one
    /// worker thread.
    pub fn start(keypair: Keypair, cfg: P2pConfig) -> Result<P2pNode, P2pError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("p2p")
            .enable_all()
            .build()
            .map_err(|e| P2pError::Start(e.to_string()))?;
        let peer_id = keypair.public().to_peer_id();
        let start = |e: &dyn std::fmt::Display| P2pError::Start(e.to_string());
        // Transports bind their sockets on the runtime: everything below runs inside it.
        let guard = rt.enter();
        let mut swarm = {
            libp2p::SwarmBuilder::with_existing_identity(keypair.clone())
                .with_tokio()
                .with_tcp(libp2p::tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
                .map_err(|e| start(&e))?
                .with_quic()
                .with_relay_client(noise::Config::new, yamux::Config::default)
                .map_err(|e| start(&e))?
                .with_behaviour(|key, relay_client| {
                    let id = key.public().to_peer_id();
                    let mut kcfg = kad::Config::new(KAD_PROTOCOL);
                    kcfg.set_query_timeout(Duration::from_millis(specswarm_proto::limits::DHT_LOOKUP_TIMEOUT_MS));
                    // A peer that stalls must not hold a lookup for long.
                    kcfg.set_substreams_timeout(Duration::from_millis(DHT_REQUEST_TIMEOUT_MS));
                    kcfg.set_max_packet_size(DHT_PACKET_BYTES_MAX);
                    kcfg.set_record_ttl(Some(Duration::from_secs(WORKER_RECORD_TTL_SECS)));
                    kcfg.set_provider_record_ttl(Some(Duration::from_secs(WORKER_RECORD_TTL_SECS)));
                    // Workers republish on their own schedule (records carry changing status).
                    kcfg.set_publication_interval(None);
                    kcfg.set_provider_publication_interval(None);
                    let store = MemoryStore::with_config(
                        id,
                        MemoryStoreConfig {
                            max_records: DHT_RECORDS_MAX,
                            max_value_bytes: WORKER_RECORD_BYTES_MAX,
                            max_providers_per_key: WORKERS_PER_LOOKUP_MAX,
                            max_provided_keys: 64,
                        },
                    );
                    let limits = connection_limits::ConnectionLimits::default()
                        .with_max_established(Some(CONNECTIONS_MAX))
                        .with_max_established_per_peer(Some(CONNECTIONS_PER_PEER_MAX))
                        .with_max_pending_incoming(Some(CONNECTIONS_PENDING_MAX))
                        .with_max_pending_outgoing(Some(PENDING_DIALS_MAX as u32));
                    Behaviour {
                        limits: connection_limits::Behaviour::new(limits),
                        identify: identify::Behaviour::new(
                            identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public()).with_cache_size(256),
                        ),
                        ping: ping::Behaviour::new(ping::Config::new().with_interval(PING_INTERVAL)),
                        kad: kad::Behaviour::with_config(id, store, kcfg),
                        relay_client,
                        relay: Toggle::from(cfg.relay_server.then(|| relay::Behaviour::new(id, relay_config()))),
                        dcutr: dcutr::Behaviour::new(id),
                        autonat: autonat::Behaviour::new(id, autonat::Config::default()),
                        stream: libp2p_stream::Behaviour::new(),
                    }
                })
                .map_err(|e| start(&e))?
                .with_swarm_config(|c| {
                    c.with_idle_connection_timeout(Duration::from_secs(120))
                        .with_max_negotiating_inbound_streams(CONNECTIONS_PENDING_MAX as usize)
                        .with_dial_concurrency_factor(std::num::NonZeroU8::new(4).expect("4 > 0"))
                })
                .build()
        };
        swarm.behaviour_mut().kad.set_mode(Some(if cfg.dht_server { kad::Mode::Server } else { kad::Mode::Client }));
        for a in &cfg.listen {
            swarm.listen_on(a.clone()).map_err(|e| P2pError::Start(format!("listen {a}: {e}")))?;
        }
        for b in &cfg.bootstrap {
            let Some(peer) = peer_of(b) else {
                return Err(P2pError::Start(format!("bootstrap address {b} lacks /p2p/<peer id>")));
            };
            swarm.behaviour_mut().kad.add_address(&peer, b.clone());
            let _ = swarm.dial(DialOpts::peer_id(peer).addresses(vec![b.clone()]).build());
        }
        for r in &cfg.relay_via {
            // Listening through the relay waits for a connection to it (see `run`).
            let Some(peer) = peer_of(r) else {
                return Err(P2pError::Start(format!("relay address {r} lacks /p2p/<peer id>")));
            };
            let _ = swarm.dial(DialOpts::peer_id(peer).addresses(vec![r.clone()]).build());
        }
        let control = swarm.behaviour().stream.new_control();
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE_MAX);
        let rtts = Arc::new(Mutex::new(HashMap::new()));
        rt.spawn(run(swarm, rx, Arc::clone(&rtts), cfg));
        drop(guard);
        Ok(P2pNode {
            peer_id,
            keypair,
            rt: rt.handle().clone(),
            commands: tx,
            control,
            rtts,
            _runtime: Arc::new(RuntimeOwner(Some(rt))),
        })
    }

    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.rt
    }

    pub fn control(&self) -> libp2p_stream::Control {
        self.control.clone()
    }

    fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command, wait: Duration) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        let commands = self.commands.clone();
        self.rt.block_on(async move {
            commands.send(make(tx)).await.ok()?;
            tokio::time::timeout(wait, rx).await.ok()?.ok()
        })
    }

    /// Listen addresses (with `/p2p/<our id>`), waiting up to `wait` for at least `min` of them.
    pub fn listen_addrs(&self, min: usize, wait: Duration) -> Vec<Multiaddr> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            let addrs = self.ask(|reply| Command::ListenAddrs { reply }, wait).unwrap_or_default();
            if addrs.len() >= min || std::time::Instant::now() >= deadline {
                return addrs.into_iter().map(|a| with_peer(&a, self.peer_id)).collect();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Peers we hold connections to.
    pub fn peers(&self) -> Vec<PeerId> {
        self.ask(|reply| Command::Peers { reply }, Duration::from_secs(5)).unwrap_or_default()
    }

    /// Connect to `peer` at one of `addrs` (or known addresses); the address the connection
    /// uses (with `/p2p/<peer>`).
    pub async fn connect(&self, peer: PeerId, addrs: Vec<Multiaddr>) -> Result<Multiaddr, String> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Connect { peer, addrs, reply: tx })
            .await
            .map_err(|_| "the node has stopped".to_string())?;
        match tokio::time::timeout(Duration::from_millis(DIAL_TIMEOUT_MS), rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err("the node has stopped".into()),
            Err(_) => Err(format!("dialing {peer} timed out")),
        }
    }

    /// Publish: provide `key` and put `record` under `record_key` (both expire unless
    /// republished).
    pub fn publish(&self, key: Vec<u8>, record_key: Vec<u8>, record: Vec<u8>) {
        let commands = self.commands.clone();
        self.rt.block_on(async move {
            let _ = commands.send(Command::Provide { key, record_key, record }).await;
        });
    }

    /// Peers that provide `key`.
    pub fn providers(&self, key: Vec<u8>, wait: Duration) -> Vec<PeerId> {
        self.ask(|reply| Command::Providers { key, reply }, wait).unwrap_or_default()
    }

    /// A record's value.
    pub fn get_record(&self, key: Vec<u8>, wait: Duration) -> Option<Vec<u8>> {
        self.ask(|reply| Command::GetRecord { key, reply }, wait).flatten()
    }

    /// [`P2pNode::get_record`] as a future (lookups run concurrently).
    pub async fn get_record_async(&self, key: Vec<u8>, wait: Duration) -> Option<Vec<u8>> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::GetRecord { key, reply: tx }).await.ok()?;
        tokio::time::timeout(wait, rx).await.ok()?.ok().flatten()
    }

    /// Drop `peer` from the routing table and close our connections to it (a worker found
    /// dead or stalled: later lookups should not wait on it).
    pub fn forget(&self, peer: PeerId) {
        let commands = self.commands.clone();
        self.rt.block_on(async move {
            let _ = commands.send(Command::Forget { peer }).await;
        });
    }

    /// The latest ping RTT to `peer`, if measured.
    pub fn rtt(&self, peer: &PeerId) -> Option<Duration> {
        self.rtts.lock().unwrap_or_else(|e| e.into_inner()).get(peer).copied()
    }
}

enum Pending {
    /// The reply, providers so far, and when the first ones came.
    Providers(oneshot::Sender<Vec<PeerId>>, Vec<PeerId>, Option<std::time::Instant>),
    Record(oneshot::Sender<Option<Vec<u8>>>),
}

async fn run(
    mut swarm: Swarm<Behaviour>,
    mut commands: mpsc::Receiver<Command>,
    rtts: Arc<Mutex<HashMap<PeerId, Duration>>>,
    cfg: P2pConfig,
) {
    let mut queries: HashMap<kad::QueryId, Pending> = HashMap::new();
    let mut dials: HashMap<PeerId, Vec<oneshot::Sender<Result<Multiaddr, String>>>> = HashMap::new();
    // The address of the first live connection to each peer.
    let mut connected: HashMap<PeerId, Multiaddr> = HashMap::new();
    let mut bootstrap = tokio::time::interval(Duration::from_secs(30));
    // Relayed listeners: one per relay, (re)opened once the relay is connected and has told us
    // who we are (identify), retried every tick while missing.
    let mut relays: Vec<(PeerId, Multiaddr, Option<libp2p::core::transport::ListenerId>)> =
        cfg.relay_via.iter().filter_map(|r| Some((peer_of(r)?, r.clone(), None))).collect();
    let mut relay_tick = tokio::time::interval(Duration::from_secs(2));
    let mut grace_tick = tokio::time::interval(PROVIDERS_GRACE / 2);
    // SPECSWARM_P2P_DEBUG=1 prints every swarm event not handled above (for operators).
    let debug = std::env::var_os("SPECSWARM_P2P_DEBUG").is_some();
    loop {
        tokio::select! {
            cmd = commands.recv() => {
                let Some(cmd) = cmd else { return };
                match cmd {
                    Command::Connect { peer, addrs, reply } => {
                        if let Some(addr) = connected.get(&peer) {
                            let _ = reply.send(Ok(with_peer(addr, peer)));
                            continue;
                        }
                        if swarm.is_connected(&peer) {
                            // Only inbound connections: name the first address we were given.
                            if let Some(a) = addrs.first() {
                                let _ = reply.send(Ok(with_peer(a, peer)));
                                continue;
                            }
                        }
                        if dials.len() >= PENDING_DIALS_MAX && !dials.contains_key(&peer) {
                            let _ = reply.send(Err("too many dials in progress".into()));
                            continue;
                        }
                        let opts = DialOpts::peer_id(peer)
                            .addresses(addrs)
                            .condition(PeerCondition::DisconnectedAndNotDialing)
                            .build();
                        match swarm.dial(opts) {
                            // Another dial to the peer is under way (ours, or a behaviour's): its
                            // outcome answers this request too.
                            Ok(()) | Err(libp2p::swarm::DialError::DialPeerConditionFalse(_)) => {
                                let waiters = dials.entry(peer).or_default();
                                waiters.retain(|w| !w.is_closed());
                                waiters.push(reply);
                            }
                            Err(e) => { let _ = reply.send(Err(e.to_string())); }
                        }
                    }
                    Command::Provide { key, record_key, record } => {
                        let k = swarm.behaviour_mut();
                        let _ = k.kad.start_providing(kad::RecordKey::new(&key));
                        let rec = kad::Record {
                            key: kad::RecordKey::new(&record_key),
                            value: record,
                            publisher: None,
                            expires: Some(std::time::Instant::now() + Duration::from_secs(WORKER_RECORD_TTL_SECS)),
                        };
                        let _ = k.kad.put_record(rec, kad::Quorum::One);
                    }
                    Command::Providers { key, reply } => {
                        let id = swarm.behaviour_mut().kad.get_providers(kad::RecordKey::new(&key));
                        queries.insert(id, Pending::Providers(reply, Vec::new(), None));
                    }
                    Command::GetRecord { key, reply } => {
                        let id = swarm.behaviour_mut().kad.get_record(kad::RecordKey::new(&key));
                        queries.insert(id, Pending::Record(reply));
                    }
                    Command::ListenAddrs { reply } => {
                        let _ = reply.send(swarm.listeners().cloned().collect());
                    }
                    Command::Peers { reply } => {
                        let _ = reply.send(swarm.connected_peers().copied().collect());
                    }
                    Command::Forget { peer } => {
                        swarm.behaviour_mut().kad.remove_peer(&peer);
                        let _ = swarm.disconnect_peer_id(peer);
                        connected.remove(&peer);
                        rtts.lock().unwrap_or_else(|e| e.into_inner()).remove(&peer);
                    }
                }
            }
            _ = bootstrap.tick() => {
                let _ = swarm.behaviour_mut().kad.bootstrap();
            }
            _ = grace_tick.tick() => {
                // A provider lookup answers shortly after the first providers arrive instead of
                // waiting for every peer on the path (a stalled one would hold it to the timeout).
                let due: Vec<kad::QueryId> = queries
                    .iter()
                    .filter_map(|(id, q)| match q {
                        Pending::Providers(_, _, Some(t)) if t.elapsed() >= PROVIDERS_GRACE => Some(*id),
                        _ => None,
                    })
                    .collect();
                for id in due {
                    if let Some(mut q) = swarm.behaviour_mut().kad.query_mut(&id) {
                        q.finish();
                    }
                    if let Some(Pending::Providers(reply, acc, _)) = queries.remove(&id) {
                        let _ = reply.send(acc);
                    }
                }
            }
            _ = relay_tick.tick(), if !relays.is_empty() => {
                for (peer, addr, listener) in relays.iter_mut() {
                    if listener.is_some() {
                        continue;
                    }
                    if swarm.is_connected(peer) {
                        *listener = swarm.listen_on(addr.clone().with(Protocol::P2pCircuit)).ok();
                    } else {
                        let _ = swarm.dial(DialOpts::peer_id(*peer).addresses(vec![addr.clone()]).build());
                    }
                }
            }
            event = swarm.select_next_some() => match event {
                SwarmEvent::NewListenAddr { address, .. }
                    if cfg.relay_server && !is_unspecified(&address) && !address.iter().any(|p| p == Protocol::P2pCircuit) =>
                {
                    swarm.add_external_address(address);
                }
                SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } => {
                    if let ConnectedPoint::Dialer { address, .. } = &endpoint {
                        if connected.len() < CONNECTIONS_MAX as usize {
                            connected.entry(peer_id).or_insert_with(|| address.clone());
                        }
                        if let Some(waiters) = dials.remove(&peer_id) {
                            for w in waiters {
                                let _ = w.send(Ok(with_peer(address, peer_id)));
                            }
                        }
                    }
                    if cfg.bootstrap.iter().any(|b| peer_of(b) == Some(peer_id)) {
                        let _ = swarm.behaviour_mut().kad.bootstrap();
                    }
                }
                SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                    connected.remove(&peer_id);
                    rtts.lock().unwrap_or_else(|e| e.into_inner()).remove(&peer_id);
                }
                SwarmEvent::OutgoingConnectionError { peer_id: Some(peer), error, .. } if !swarm.is_connected(&peer) => {
                    for w in dials.remove(&peer).unwrap_or_default() {
                        let _ = w.send(Err(error.to_string()));
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event { peer, result: Ok(rtt), .. })) => {
                    rtts.lock().unwrap_or_else(|e| e.into_inner()).insert(peer, rtt);
                }
                SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) => {
                    for (peer, addr, listener) in relays.iter_mut() {
                        if *peer == peer_id && listener.is_none() {
                            *listener = swarm.listen_on(addr.clone().with(Protocol::P2pCircuit)).ok();
                        }
                    }
                    if info.protocols.contains(&KAD_PROTOCOL) {
                        for a in info.listen_addrs.into_iter().filter(|a| !is_unspecified(a)) {
                            swarm.behaviour_mut().kad.add_address(&peer_id, a);
                        }
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Autonat(autonat::Event::StatusChanged { new, .. })) => {
                    // Reported, not acted on: a node behind NAT is started with --relay.
                    let hint = if matches!(new, autonat::NatStatus::Private) && relays.is_empty() {
                        " (not reachable from outside: start it with --relay <bootstrap multiaddr>)"
                    } else {
                        ""
                    };
                    eprintln!("autonat: reachability {new:?}{hint}");
                }
                SwarmEvent::ListenerClosed { listener_id, .. } => {
                    for (_, _, listener) in relays.iter_mut() {
                        if *listener == Some(listener_id) {
                            *listener = None;
                        }
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed { id, result, step, .. })) => {
                    on_query(&mut swarm, &mut queries, id, result, step.last);
                }
                other => {
                    if debug {
                        eprintln!("p2p: {other:?}");
                    }
                }
            }
        }
    }
}

fn on_query(
    swarm: &mut Swarm<Behaviour>,
    queries: &mut HashMap<kad::QueryId, Pending>,
    id: kad::QueryId,
    result: kad::QueryResult,
    last: bool,
) {
    match result {
        kad::QueryResult::GetProviders(Ok(kad::GetProvidersOk::FoundProviders { providers, .. })) => {
            if let Some(Pending::Providers(_, acc, first)) = queries.get_mut(&id) {
                first.get_or_insert_with(std::time::Instant::now);
                for p in providers {
                    if acc.len() < WORKERS_PER_LOOKUP_MAX && !acc.contains(&p) {
                        acc.push(p);
                    }
                }
            }
        }
        kad::QueryResult::GetRecord(Ok(kad::GetRecordOk::FoundRecord(r))) => {
            if let Some(Pending::Record(reply)) = queries.remove(&id) {
                let _ = reply.send(Some(r.record.value));
            }
            if let Some(mut q) = swarm.behaviour_mut().kad.query_mut(&id) {
                q.finish();
            }
            return;
        }
        _ => {}
    }
    if last {
        match queries.remove(&id) {
            Some(Pending::Providers(reply, acc, _)) => {
                let _ = reply.send(acc);
            }
            Some(Pending::Record(reply)) => {
                let _ = reply.send(None);
            }
            None => {}
        }
    }
}
