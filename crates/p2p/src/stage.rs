//! Stage frames on libp2p streams. A stream carries frames like a TCP connection does (fixed
//! 32-byte header, payload length checked against `FRAME_PAYLOAD_BYTES_MAX` before the buffer
//! exists). A worker accepts streams on [`STAGE_PROTOCOL`] and feeds every frame through one
//! bounded queue to one compute thread that serves the [`Node`] (the session routing shared with
//! the TCP server), batching the frames waiting for it; next hops are dialed by multiaddr. Writes
//! go through a bounded queue per stream to a writer task.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId, Stream, StreamProtocol};
use specswarm_net::node::{Dialer, FrameSink, Node, Work, WorkQueue};
use specswarm_net::stage::StageServer;
use specswarm_proto::limits::{
    COMPUTE_QUEUE_FRAMES_MAX, DIAL_TIMEOUT_MS, STAGE_STREAMS_PER_PEER_MAX, STAGE_STREAMS_TOTAL_MAX,
    STREAM_SEND_QUEUE_FRAMES_MAX, STREAM_SEND_STALL_MS,
};
use specswarm_proto::wire::{Frame, HEADER_BYTES, WireError};
use tokio::sync::mpsc;

use crate::swarm::P2pNode;

/// The stage protocol on libp2p streams.
pub const STAGE_PROTOCOL: StreamProtocol = StreamProtocol::new("/specswarm/stage/1");

/// Read one frame: `Ok(Err)` for bytes that are not a frame (the stream should be closed).
pub async fn read_frame<R: futures::AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Result<Frame, WireError>> {
    let mut buf = vec![0u8; HEADER_BYTES];
    r.read_exact(&mut buf).await?;
    let len = match Frame::decode_header(&buf) {
        Ok((_, _, _, _, len)) => len,
        Err(e) => return Ok(Err(e)),
    };
    buf.resize(HEADER_BYTES + len, 0);
    r.read_exact(&mut buf[HEADER_BYTES..]).await?;
    Ok(Frame::decode(&buf))
}

/// A stream's write side: frames queue (bounded) for a writer task.
pub struct StreamSink(pub mpsc::Sender<Vec<u8>>);

impl FrameSink for StreamSink {
    /// Called from the compute thread (never from a runtime thread): waits while the queue is
    /// full (the back-pressure of a slow reader), but at most `STREAM_SEND_STALL_MS`; a peer that
    /// stops reading loses its stream instead of stalling every session of the worker.
    fn send(&self, frame: &Frame) -> bool {
        let mut bytes = frame.encode();
        let deadline = std::time::Instant::now() + Duration::from_millis(STREAM_SEND_STALL_MS);
        loop {
            match self.0.try_send(bytes) {
                Ok(()) => return true,
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
                Err(mpsc::error::TrySendError::Full(b)) => {
                    if std::time::Instant::now() >= deadline {
                        return false;
                    }
                    bytes = b;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }

    fn is_open(&self) -> bool {
        !self.0.is_closed()
    }
}

/// Split `stream` and start its writer task; returns the read half and the write queue.
pub fn start_writer(rt: &tokio::runtime::Handle, stream: Stream) -> (ReadHalf<Stream>, mpsc::Sender<Vec<u8>>) {
    let (r, w) = stream.split();
    let (tx, rx) = mpsc::channel(STREAM_SEND_QUEUE_FRAMES_MAX);
    rt.spawn(write_loop(w, rx));
    (r, tx)
}

async fn write_loop(mut w: WriteHalf<Stream>, mut rx: mpsc::Receiver<Vec<u8>>) {
    while let Some(bytes) = rx.recv().await {
        if w.write_all(&bytes).await.is_err() || w.flush().await.is_err() {
            return;
        }
    }
    let _ = w.close().await;
}

/// The peer id at the end of a multiaddr.
pub fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().filter_map(|p| if let Protocol::P2p(id) = p { Some(id) } else { None }).last()
}

/// Open a stage stream to `peer` (connecting through `addrs` if needed); the address used.
pub async fn open_stage_stream(
    node: &P2pNode,
    peer: PeerId,
    addrs: Vec<Multiaddr>,
) -> Result<(Stream, Multiaddr), String> {
    let fut = async {
        let used = node.connect(peer, addrs).await?;
        let s = node.control().open_stream(peer, STAGE_PROTOCOL).await.map_err(|e| e.to_string())?;
        Ok::<_, String>((s, used))
    };
    tokio::time::timeout(Duration::from_millis(DIAL_TIMEOUT_MS), fut)
        .await
        .map_err(|_| format!("opening a stream to {peer} timed out"))?
}

/// Dials next hops given as multiaddrs ending in `/p2p/<peer id>`.
pub struct P2pDialer(pub P2pNode);

impl Dialer for P2pDialer {
    fn dial(&self, addr: &str) -> Result<Arc<dyn FrameSink>, String> {
        let ma: Multiaddr = addr.parse().map_err(|e| format!("bad next hop {addr:?}: {e}"))?;
        let peer = peer_of(&ma).ok_or_else(|| format!("next hop {addr:?} lacks /p2p/<peer id>"))?;
        let node = self.0.clone();
        let rt = node.runtime().clone();
        let (stream, _) = rt.block_on(open_stage_stream(&node, peer, vec![ma]))?;
        let (mut r, tx) = start_writer(&rt, stream);
        // The next stage answers frames it has no route for on this stream; drain them so the
        // stream never stalls.
        rt.spawn(async move { while let Ok(Ok(_)) = read_frame(&mut r).await {} });
        Ok(Arc::new(StreamSink(tx)))
    }
}

/// The compute thread's end of the frame queue.
struct ComputeQueue(mpsc::Receiver<Work>);

impl WorkQueue for ComputeQueue {
    fn wait(&mut self) -> Option<Work> {
        self.0.blocking_recv()
    }

    fn ready(&mut self) -> Option<Work> {
        self.0.try_recv().ok()
    }
}

/// Serve `server` on `node`'s stage protocol until the process exits. Frames from every stream
/// go through one bounded queue to one compute thread, which batches what is waiting
/// ([`Node::serve_queue`]); streams are bounded per peer and in total.
pub fn serve(node: &P2pNode, server: StageServer) -> Result<Arc<Node<P2pDialer>>, String> {
    let stage = Arc::new(Node::new(server, P2pDialer(node.clone())));
    let (work_tx, work_rx) = mpsc::channel::<Work>(COMPUTE_QUEUE_FRAMES_MAX);
    let compute = Arc::clone(&stage);
    std::thread::Builder::new()
        .name("stage-compute".into())
        .spawn(move || compute.serve_queue(&mut ComputeQueue(work_rx)))
        .map_err(|e| e.to_string())?;
    let mut incoming = node.control().accept(STAGE_PROTOCOL).map_err(|e| e.to_string())?;
    let rt = node.runtime().clone();
    let streams: Arc<Mutex<HashMap<PeerId, usize>>> = Arc::new(Mutex::new(HashMap::new()));
    node.runtime().spawn(async move {
        use futures::StreamExt;
        while let Some((peer, stream)) = incoming.next().await {
            {
                let mut s = streams.lock().unwrap_or_else(|e| e.into_inner());
                let total: usize = s.values().sum();
                let mine = s.entry(peer).or_insert(0);
                if *mine >= STAGE_STREAMS_PER_PEER_MAX || total >= STAGE_STREAMS_TOTAL_MAX {
                    continue; // dropped: the peer sees the stream closed
                }
                *mine += 1;
            }
            let (mut r, tx) = start_writer(&rt, stream);
            let sink: Arc<dyn FrameSink> = Arc::new(StreamSink(tx.clone()));
            let work_tx = work_tx.clone();
            let streams = Arc::clone(&streams);
            rt.spawn(async move {
                loop {
                    match read_frame(&mut r).await {
                        Ok(Ok(frame)) => {
                            if work_tx.send(Work::Frame(frame, Arc::clone(&sink))).await.is_err() {
                                break;
                            }
                        }
                        Ok(Err(e)) => {
                            // Answered in its turn (after the replies to frames before it), then
                            // the stream closes.
                            let from = Arc::clone(&sink);
                            let _ = work_tx.send(Work::Undecodable { reason: e.to_string(), from }).await;
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let mut s = streams.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(n) = s.get_mut(&peer) {
                    *n -= 1;
                    if *n == 0 {
                        s.remove(&peer);
                    }
                }
            });
        }
    });
    Ok(stage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use specswarm_proto::wire::Message;

    fn read(bytes: Vec<u8>) -> std::io::Result<Result<Frame, WireError>> {
        futures::executor::block_on(read_frame(&mut futures::io::Cursor::new(bytes)))
    }

    #[test]
    fn frames_are_checked_before_allocation() {
        let f = Frame { session: 7, epoch: 1, seq: 2, message: Message::Close };
        assert_eq!(read(f.encode()).unwrap().unwrap(), f);
        // A declared 4 GiB payload is refused from the header alone.
        let mut big = f.encode();
        big[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(read(big).unwrap(), Err(WireError::TooLarge { .. })));
        assert!(matches!(read(vec![0u8; 64]).unwrap(), Err(WireError::BadMagic)));
        // A stream that ends early is an I/O error (the stream is dropped), not a panic.
        let bytes = f.encode();
        for cut in 0..bytes.len() {
            assert!(read(bytes[..cut].to_vec()).is_err());
        }
    }
}
