//! Stage frames over plain TCP: the transport of `specswarm worker --listen ip:port` and of the
//! TCP tests. (The libp2p transport in `specswarm-p2p` shares [`Node`] and [`StageLink`].)
//!
//! Each connection carries request/reply frames in order. The server reads the fixed header,
//! checks the declared payload against the frame limit before reading it, and answers every
//! frame; a connection that sends garbage gets an error reply and is closed, and the server keeps
//! serving its other connections.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use specswarm_proto::limits::COMPUTE_QUEUE_FRAMES_MAX;
use specswarm_proto::wire::{Frame, HEADER_BYTES};

use crate::node::{Dialer, FrameSink, Node, Work};
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

/// A TCP connection's write half (delayed when the in-process WAN emulator is on).
struct TcpSink(crate::delay::Sender);

impl FrameSink for TcpSink {
    fn send(&self, frame: &Frame) -> bool {
        self.0.send(frame.encode()).is_ok()
    }
}

/// Dials next hops given as `ip:port`.
struct TcpDialer;

impl Dialer for TcpDialer {
    fn dial(&self, addr: &str) -> Result<Arc<dyn FrameSink>, String> {
        let sa: SocketAddr = addr.parse().map_err(|_| format!("bad next hop {addr:?}"))?;
        let s = TcpStream::connect_timeout(&sa, Duration::from_secs(5)).map_err(|e| e.to_string())?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
        Ok(Arc::new(TcpSink(crate::delay::Sender::new(s))))
    }
}

/// Serve `server` on `listener` until the process exits: one reader thread per connection puts
/// frames into the worker's bounded compute queue, one compute thread serves it
/// ([`Node::serve_queue`]); frames are routed by [`Node`] (next hops are `ip:port`).
pub fn serve(listener: TcpListener, server: StageServer) -> std::io::Result<()> {
    let node = Arc::new(Node::new(server, TcpDialer));
    let (queue, mut work) = std::sync::mpsc::sync_channel::<Work>(COMPUTE_QUEUE_FRAMES_MAX);
    std::thread::Builder::new().name("stage-compute".into()).spawn(move || node.serve_queue(&mut work))?;
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let queue = queue.clone();
        std::thread::Builder::new().name("stage-conn".into()).spawn(move || {
            let _ = conn.set_nodelay(true);
            let Ok(write_half) = conn.try_clone() else { return };
            let writer: Arc<dyn FrameSink> = Arc::new(TcpSink(crate::delay::Sender::new(write_half)));
            let mut reader = conn;
            loop {
                let bytes = match read_frame(&mut reader) {
                    Ok(Ok(b)) => b,
                    Ok(Err(e)) => {
                        // A bad header: the stream cannot be resynchronised; answer, then close.
                        let _ = queue.send(Work::Undecodable { reason: e.to_string(), from: writer });
                        return;
                    }
                    Err(_) => return,
                };
                let work = match Frame::decode(&bytes) {
                    Ok(frame) => Work::Frame(frame, Arc::clone(&writer)),
                    Err(e) => Work::Undecodable { reason: e.to_string(), from: Arc::clone(&writer) },
                };
                if queue.send(work).is_err() {
                    return; // the compute thread is gone
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
