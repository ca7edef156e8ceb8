//! Stage frames over plain TCP: the transport the local demo and tests use today. (The libp2p
//! transport of the swarm issue implements the same [`StageLink`] seam.)
//!
//! Each connection carries request/reply frames in order. The server reads the fixed header,
//! checks the declared payload against the frame limit before reading it, and answers every
//! frame; a connection that sends garbage gets an error reply and is closed, and the server keeps
//! serving its other connections.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use specswarm_proto::wire::{ErrorCode, Frame, HEADER_BYTES, Message};

use crate::ring::StageLink;
use crate::stage::StageServer;

/// Read one frame's bytes (header + payload) from `s`, enforcing the payload limit first.
pub fn read_frame(s: &mut impl Read) -> std::io::Result<Result<Vec<u8>, specswarm_proto::wire::WireError>> {
    let mut buf = vec![0u8; HEADER_BYTES];
    s.read_exact(&mut buf)?;
    let len = match Frame::decode_header(&buf) {
        Ok((_, _, _, _, len)) => len,
        Err(e) => return Ok(Err(e)),
    };
    buf.resize(HEADER_BYTES + len, 0);
    s.read_exact(&mut buf[HEADER_BYTES..])?;
    Ok(Ok(buf))
}

type Writer = Arc<crate::delay::Sender>;

/// Where a session's outputs go.
struct Route {
    /// The connection that opened the session: replies, errors, and the tail's output.
    client: Writer,
    /// The next stage, for a stage that forwards (ring with direct return).
    next: Option<Writer>,
}

/// A worker: the stage server plus session routes and connections to next hops.
struct Node {
    server: Mutex<StageServer>,
    routes: Mutex<HashMap<u64, Route>>,
    hops: Mutex<HashMap<String, Writer>>,
}

fn send(w: &Writer, frame: &Frame) -> bool {
    w.send(frame.encode()).is_ok()
}

fn error_frame(f: &Frame, code: ErrorCode, message: String) -> Frame {
    Frame { session: f.session, epoch: f.epoch, seq: f.seq, message: Message::Error { code, message } }
}

impl Node {
    fn hop(&self, addr: &str) -> std::io::Result<Writer> {
        let mut hops = self.hops.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = hops.get(addr) {
            return Ok(Arc::clone(w));
        }
        let sa: SocketAddr = addr.parse().map_err(|_| std::io::Error::other(format!("bad next hop {addr:?}")))?;
        let s = TcpStream::connect_timeout(&sa, Duration::from_secs(5))?;
        s.set_nodelay(true)?;
        s.set_write_timeout(Some(Duration::from_secs(30)))?;
        let w = Arc::new(crate::delay::Sender::new(s));
        hops.insert(addr.to_string(), Arc::clone(&w));
        Ok(w)
    }

    /// Handle one frame that arrived on connection `from`.
    fn on_frame(&self, frame: Frame, from: &Writer) {
        let now = Instant::now();
        let reply = {
            let mut s = self.server.lock().unwrap_or_else(|e| e.into_inner());
            s.evict_idle(now);
            s.handle(&frame, now)
        };
        match (&frame.message, reply.message) {
            (Message::Open { next_hop, .. }, Message::Ack { committed }) => {
                let next = match next_hop.as_deref().map(|a| self.hop(a)) {
                    None => None,
                    Some(Ok(w)) => Some(w),
                    Some(Err(e)) => {
                        let close = Frame { message: Message::Close, ..frame.clone() };
                        self.server.lock().unwrap_or_else(|e| e.into_inner()).handle(&close, now);
                        send(
                            from,
                            &error_frame(&frame, ErrorCode::Internal, format!("cannot reach the next stage: {e}")),
                        );
                        return;
                    }
                };
                self.routes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(frame.session, Route { client: Arc::clone(from), next });
                send(from, &Frame { message: Message::Ack { committed }, ..reply });
            }
            (Message::Forward { positions, tree_parents, spec, .. }, message) => {
                let route = self
                    .routes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&frame.session)
                    .map(|r| (Arc::clone(&r.client), r.next.clone()));
                let Some((client, next)) = route else {
                    send(from, &Frame { message, ..reply });
                    return;
                };
                match (message, next) {
                    (Message::Output { input }, Some(next)) => {
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
                        if !send(&next, &fwd) {
                            send(
                                &client,
                                &error_frame(&frame, ErrorCode::Internal, "the next stage is unreachable".into()),
                            );
                        }
                    }
                    (message, _) => {
                        send(&client, &Frame { message, ..reply });
                    }
                }
            }
            (Message::Close, message) => {
                self.routes.lock().unwrap_or_else(|e| e.into_inner()).remove(&frame.session);
                send(from, &Frame { message, ..reply });
            }
            (_, message) => {
                send(from, &Frame { message, ..reply });
            }
        }
    }
}

/// Serve `server` on `listener` until the process exits: one thread per connection.
///
/// A session opened with a `next_hop` forwards its outputs to that stage (whose own route
/// continues the ring) and the tail sends its output to the client that opened it: a ring with
/// direct return. Without a next hop, outputs go back to the opener (a client-driven ring).
pub fn serve(listener: TcpListener, server: StageServer) -> std::io::Result<()> {
    let node = Arc::new(Node {
        server: Mutex::new(server),
        routes: Mutex::new(HashMap::new()),
        hops: Mutex::new(HashMap::new()),
    });
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let node = Arc::clone(&node);
        std::thread::Builder::new().name("stage-conn".into()).spawn(move || {
            let _ = conn.set_nodelay(true);
            let Ok(write_half) = conn.try_clone() else { return };
            let writer: Writer = Arc::new(crate::delay::Sender::new(write_half));
            let mut reader = conn;
            loop {
                let bytes = match read_frame(&mut reader) {
                    Ok(Ok(b)) => b,
                    Ok(Err(e)) => {
                        let reply = Frame {
                            session: 0,
                            epoch: 0,
                            seq: 0,
                            message: Message::Error { code: ErrorCode::Malformed, message: e.to_string() },
                        };
                        send(&writer, &reply);
                        return;
                    }
                    Err(_) => return,
                };
                match Frame::decode(&bytes) {
                    Ok(frame) => node.on_frame(frame, &writer),
                    Err(e) => {
                        let reply = Frame {
                            session: 0,
                            epoch: 0,
                            seq: 0,
                            message: Message::Error { code: ErrorCode::Malformed, message: e.to_string() },
                        };
                        send(&writer, &reply);
                    }
                }
            }
        })?;
    }
    Ok(())
}

/// A client connection to one stage.
pub struct TcpLink {
    addr: SocketAddr,
    stream: TcpStream,
}

impl TcpLink {
    /// Connect, retrying until `wait` has passed (a worker may still be loading).
    pub fn connect(addr: SocketAddr, wait: Duration, timeout: Duration) -> std::io::Result<TcpLink> {
        let deadline = Instant::now() + wait;
        loop {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                Ok(stream) => {
                    stream.set_nodelay(true)?;
                    stream.set_read_timeout(Some(timeout))?;
                    stream.set_write_timeout(Some(timeout))?;
                    return Ok(TcpLink { addr, stream });
                }
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl StageLink for TcpLink {
    fn exchange(&mut self, frame: &[u8]) -> Result<Vec<u8>, String> {
        self.stream.write_all(frame).map_err(|e| format!("{}: {e}", self.addr))?;
        match read_frame(&mut self.stream) {
            Ok(Ok(b)) => Ok(b),
            Ok(Err(e)) => Err(format!("{}: {e}", self.addr)),
            Err(e) => Err(format!("{}: {e}", self.addr)),
        }
    }
}
