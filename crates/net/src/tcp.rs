//! Stage frames over plain TCP: the transport the local demo and tests use today. (The libp2p
//! transport of the swarm issue implements the same [`StageLink`] seam.)
//!
//! Each connection carries request/reply frames in order. The server reads the fixed header,
//! checks the declared payload against the frame limit before reading it, and answers every
//! frame; a connection that sends garbage gets an error reply and is closed, and the server keeps
//! serving its other connections.

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

/// Serve `server` on `listener` until the process exits: one thread per connection.
pub fn serve(listener: TcpListener, server: Arc<Mutex<StageServer>>) -> std::io::Result<()> {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let server = Arc::clone(&server);
        std::thread::Builder::new().name("stage-conn".into()).spawn(move || {
            let _ = conn.set_nodelay(true);
            loop {
                let bytes = match read_frame(&mut conn) {
                    Ok(Ok(b)) => b,
                    Ok(Err(e)) => {
                        let reply = Frame {
                            session: 0,
                            epoch: 0,
                            seq: 0,
                            message: Message::Error { code: ErrorCode::Malformed, message: e.to_string() },
                        };
                        let _ = conn.write_all(&reply.encode());
                        return;
                    }
                    Err(_) => return,
                };
                let reply = match Frame::decode(&bytes) {
                    Ok(frame) => {
                        let mut s = server.lock().unwrap_or_else(|e| e.into_inner());
                        s.evict_idle(Instant::now());
                        s.handle(&frame, Instant::now())
                    }
                    Err(e) => Frame {
                        session: 0,
                        epoch: 0,
                        seq: 0,
                        message: Message::Error { code: ErrorCode::Malformed, message: e.to_string() },
                    },
                };
                if conn.write_all(&reply.encode()).is_err() {
                    return;
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
