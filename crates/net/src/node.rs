//! A worker's session routing, independent of the transport: the stage server plus, per session,
//! where its outputs go. Both the TCP server ([`crate::tcp::serve`]) and the libp2p server
//! (`specswarm-p2p`) put every frame they read into one bounded queue per worker, which one
//! compute thread serves ([`Node::serve_queue`]: continuous batching across sessions); they
//! differ only in how frames are written ([`FrameSink`]) and how a next hop named in `Open.next_hop` is reached
//! ([`Dialer`]: `ip:port` on TCP, a multiaddr ending in `/p2p/<peer id>` on libp2p).
//!
//! A session opened with a `next_hop` forwards its outputs to that stage (whose own route
//! continues the ring) and the tail sends its output to the connection that opened it: a ring
//! with direct return. Without a next hop, outputs go back to the opener (a client-driven ring).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use specswarm_proto::limits::{
    FORWARD_BATCH_TOKENS_MAX, NEXT_HOPS_PER_NODE_MAX, ROUTES_PER_NODE_MAX, STAGE_BATCH_FRAMES_MAX,
};
use specswarm_proto::wire::{ErrorCode, Frame, Message};

use crate::stage::StageServer;

/// A connection frames can be written to.
pub trait FrameSink: Send + Sync {
    /// Write (or queue) `frame`; false when the connection is gone.
    fn send(&self, frame: &Frame) -> bool;

    /// Whether the connection may still carry frames (routes of closed ones are pruned).
    fn is_open(&self) -> bool {
        true
    }
}

/// Reaches next hops by their address string.
pub trait Dialer: Send + Sync {
    /// A connection to the stage at `addr` (blocking, bounded by the dialer's own timeout).
    fn dial(&self, addr: &str) -> Result<Arc<dyn FrameSink>, String>;
}

/// A frame and the connection it arrived on.
pub type Arrived = (Frame, Arc<dyn FrameSink>);

/// An item of a worker's compute queue: a frame, or bytes read from a connection that were not
/// a frame. The second is answered (an error without a session) in its turn, after the replies
/// to everything queued before it, so it never overtakes a reply on the same connection.
pub enum Work {
    Frame(Frame, Arc<dyn FrameSink>),
    Undecodable { reason: String, from: Arc<dyn FrameSink> },
}

/// The receiving end of a worker's bounded compute queue: connection readers put every frame
/// they read into it (waiting while it is full), one compute thread drains it
/// ([`Node::serve_queue`]). Each transport brings its own channel.
pub trait WorkQueue {
    /// The next frame, waiting for one; `None` once every sender is gone.
    fn wait(&mut self) -> Option<Work>;
    /// A frame already queued, without waiting.
    fn ready(&mut self) -> Option<Work>;
}

impl WorkQueue for std::sync::mpsc::Receiver<Work> {
    fn wait(&mut self) -> Option<Work> {
        self.recv().ok()
    }

    fn ready(&mut self) -> Option<Work> {
        self.try_recv().ok()
    }
}

/// Rows a frame puts through the slice.
fn forward_rows(frame: &Frame) -> usize {
    match &frame.message {
        Message::Forward { positions, .. } => positions.len(),
        _ => 0,
    }
}

/// An `Open` that names a next hop: its route must exist before the session's next frame runs.
fn opens_route(frame: &Frame) -> bool {
    matches!(&frame.message, Message::Open { next_hop: Some(_), .. })
}

/// Where a session's outputs go.
struct Route {
    /// The connection that opened the session: replies, errors, and the tail's output.
    client: Arc<dyn FrameSink>,
    /// The next stage, for a stage that forwards (ring with direct return), and its address.
    next: Option<(String, Arc<dyn FrameSink>)>,
}

/// A worker: the stage server, session routes, and connections to next hops (shared by every
/// session that forwards to the same address).
pub struct Node<D> {
    server: Mutex<StageServer>,
    routes: Mutex<HashMap<u64, Route>>,
    hops: Mutex<HashMap<String, Arc<dyn FrameSink>>>,
    dialer: D,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An error reply to `f`.
pub fn error_frame(f: &Frame, code: ErrorCode, message: String) -> Frame {
    Frame { session: f.session, epoch: f.epoch, seq: f.seq, message: Message::Error { code, message } }
}

/// The reply to bytes that are not a frame (no session to name).
pub fn malformed_frame(reason: String) -> Frame {
    Frame { session: 0, epoch: 0, seq: 0, message: Message::Error { code: ErrorCode::Malformed, message: reason } }
}

impl<D: Dialer> Node<D> {
    pub fn new(server: StageServer, dialer: D) -> Node<D> {
        Node {
            server: Mutex::new(server),
            routes: Mutex::new(HashMap::new()),
            hops: Mutex::new(HashMap::new()),
            dialer,
        }
    }

    /// Run `f` on the stage server (status for discovery records, tests).
    pub fn with_server<R>(&self, f: impl FnOnce(&mut StageServer) -> R) -> R {
        f(&mut lock(&self.server))
    }

    fn hop(&self, addr: &str) -> Result<Arc<dyn FrameSink>, String> {
        if let Some(w) = lock(&self.hops).get(addr) {
            return Ok(Arc::clone(w));
        }
        let w = self.dialer.dial(addr)?;
        let mut hops = lock(&self.hops);
        if hops.len() >= NEXT_HOPS_PER_NODE_MAX {
            // Forget an arbitrary idle connection: sessions that still use it hold their own Arc.
            if let Some(k) = hops.keys().next().cloned() {
                hops.remove(&k);
            }
        }
        hops.insert(addr.to_string(), Arc::clone(&w));
        Ok(w)
    }

    /// Forget a broken next-hop connection so that the next session dials again.
    fn drop_hop(&self, addr: &str) {
        lock(&self.hops).remove(addr);
    }

    /// Handle one frame that arrived on connection `from`.
    pub fn on_frame(&self, frame: Frame, from: &Arc<dyn FrameSink>) {
        self.on_frames(vec![(frame, Arc::clone(from))]);
    }

    /// Handle frames that arrived together, in arrival order, as one batch: `Forward` frames of
    /// different sessions run through the slice together ([`StageServer::handle_many`]); every
    /// reply and every output forwarded to a next hop then goes out frame by frame, in order.
    pub fn on_frames(&self, work: Vec<Arrived>) {
        let now = Instant::now();
        let (frames, senders): (Vec<Frame>, Vec<Arc<dyn FrameSink>>) = work.into_iter().unzip();
        let replies = {
            let mut s = lock(&self.server);
            s.evict_idle(now);
            s.handle_many(&frames, now)
        };
        for ((frame, from), reply) in frames.iter().zip(&senders).zip(replies) {
            self.route(frame, from, reply, now);
        }
    }

    /// Serve the frames of a worker's compute queue until every sender is gone (continuous
    /// batching). Each batch is the first frame waiting plus every frame already queued behind
    /// it — never waiting for more — up to [`STAGE_BATCH_FRAMES_MAX`] frames and
    /// [`FORWARD_BATCH_TOKENS_MAX`] rows, so an idle worker answers a lone frame at once and a
    /// busy one batches what piled up during its last compute. An `Open` that names a next hop
    /// ends its batch: its connection is dialed before the session's later frames run.
    pub fn serve_queue(&self, queue: &mut impl WorkQueue) {
        let mut held: Option<Work> = None;
        while let Some(first) = held.take().or_else(|| queue.wait()) {
            let first = match first {
                Work::Frame(frame, from) => (frame, from),
                Work::Undecodable { reason, from } => {
                    from.send(&malformed_frame(reason));
                    continue;
                }
            };
            let mut rows = forward_rows(&first.0);
            let mut ends = opens_route(&first.0);
            let mut batch = vec![first];
            while !ends && batch.len() < STAGE_BATCH_FRAMES_MAX {
                let Some(work) = queue.ready() else { break };
                let Work::Frame(frame, from) = work else {
                    held = Some(work); // answered after this batch's replies
                    break;
                };
                let r = forward_rows(&frame);
                if rows + r > FORWARD_BATCH_TOKENS_MAX {
                    held = Some(Work::Frame(frame, from));
                    break;
                }
                rows += r;
                ends = opens_route(&frame);
                batch.push((frame, from));
            }
            self.on_frames(batch);
        }
    }

    /// Send the reply to `frame` where its session's route says (or forward its output).
    fn route(&self, frame: &Frame, from: &Arc<dyn FrameSink>, reply: Frame, now: Instant) {
        match (&frame.message, reply.message) {
            (Message::Open { next_hop, .. }, Message::Ack { committed }) => {
                let next = match next_hop.as_deref().map(|a| (a, self.hop(a))) {
                    None => None,
                    Some((a, Ok(w))) => Some((a.to_string(), w)),
                    Some((_, Err(e))) => {
                        let close = Frame { message: Message::Close, ..frame.clone() };
                        lock(&self.server).handle(&close, now);
                        from.send(&error_frame(
                            frame,
                            ErrorCode::Internal,
                            format!("cannot reach the next stage: {e}"),
                        ));
                        return;
                    }
                };
                let mut routes = lock(&self.routes);
                if routes.len() >= ROUTES_PER_NODE_MAX {
                    // Sessions evicted while idle leave routes behind: drop those whose client is
                    // gone, then (a flood of opens) the rest.
                    routes.retain(|_, r| r.client.is_open());
                    if routes.len() >= ROUTES_PER_NODE_MAX {
                        routes.clear();
                    }
                }
                routes.insert(frame.session, Route { client: Arc::clone(from), next });
                drop(routes);
                from.send(&Frame { message: Message::Ack { committed }, ..reply });
            }
            (Message::Forward { positions, tree_parents, spec, .. }, message) => {
                let route = lock(&self.routes).get(&frame.session).map(|r| (Arc::clone(&r.client), r.next.clone()));
                let Some((client, next)) = route else {
                    from.send(&Frame { message, ..reply });
                    return;
                };
                match (message, next) {
                    (Message::Output { input }, Some((addr, next))) => {
                        let fwd = Frame {
                            message: Message::Forward {
                                positions: positions.clone(),
                                tree_parents: tree_parents.clone(),
                                input,
                                // The next stages apply the same commit; the tail needs the tokens.
                                spec: spec.clone(),
                            },
                            ..reply
                        };
                        if !next.send(&fwd) {
                            self.drop_hop(&addr);
                            client.send(&error_frame(
                                frame,
                                ErrorCode::Internal,
                                "the next stage is unreachable".into(),
                            ));
                        }
                    }
                    (message, _) => {
                        client.send(&Frame { message, ..reply });
                    }
                }
            }
            (Message::Close, message) => {
                lock(&self.routes).remove(&frame.session);
                from.send(&Frame { message, ..reply });
            }
            (_, message) => {
                from.send(&Frame { message, ..reply });
            }
        }
    }
}
