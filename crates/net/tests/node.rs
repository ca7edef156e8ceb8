//! `Node` (a worker's session routing) without any network: in-process sinks and a dialer that
//! hands frames straight to the next node. The same code serves TCP and libp2p workers; here a
//! direct-return ring of three nodes gives single-process greedy tokens, and broken next hops
//! become error replies to the client.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use specswarm_engine::generate::generate;
use specswarm_engine::hub;
use specswarm_engine::model::{LoadOptions, ModelSlice};
use specswarm_engine::sampling::Sampler;
use specswarm_engine::tokenizer::Tokenizer;
use specswarm_net::node::{Dialer, FrameSink, Node, Work};
use specswarm_net::stage::{StageLimits, StageServer};
use specswarm_proto::limits::COMPUTE_QUEUE_FRAMES_MAX;
use specswarm_proto::wire::{ErrorCode, Frame, Input, Message};

/// Collects what a node sends to the client.
#[derive(Default)]
struct Inbox(Mutex<Vec<Frame>>);

impl FrameSink for Inbox {
    fn send(&self, frame: &Frame) -> bool {
        self.0.lock().unwrap().push(frame.clone());
        true
    }
}

impl Inbox {
    fn take(&self) -> Vec<Frame> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// A connection that is gone.
struct Dead;

impl FrameSink for Dead {
    fn send(&self, _: &Frame) -> bool {
        false
    }
}

type Registry = Arc<Mutex<HashMap<String, Arc<Node<MapDialer>>>>>;

/// Next hops by name, in this process; "dead" dials but cannot carry frames.
struct MapDialer(Registry);

/// Frames sent to it run on `node` at once; its replies to unrouted frames are dropped.
struct Direct(Arc<Node<MapDialer>>);

impl FrameSink for Direct {
    fn send(&self, frame: &Frame) -> bool {
        let back: Arc<dyn FrameSink> = Arc::new(Inbox::default());
        self.0.on_frame(frame.clone(), &back);
        true
    }
}

impl Dialer for MapDialer {
    fn dial(&self, addr: &str) -> Result<Arc<dyn FrameSink>, String> {
        if addr == "dead" {
            return Ok(Arc::new(Dead));
        }
        let node = self.0.lock().unwrap().get(addr).cloned().ok_or(format!("no stage at {addr}"))?;
        Ok(Arc::new(Direct(node)))
    }
}

fn frame(session: u64, seq: u32, message: Message) -> Frame {
    Frame { session, epoch: 0, seq, message }
}

const CUTS: [usize; 4] = [0, 10, 20, 30];

/// Three nodes serving SmolLM2 in thirds, reachable as `n0`, `n1`, `n2`.
fn ring_of_nodes() -> (std::path::PathBuf, [u8; 32], Vec<Arc<Node<MapDialer>>>) {
    let path = hub::ensure(hub::known("smollm2-135m").unwrap(), &mut |m| eprintln!("{m}")).unwrap();
    let id = specswarm_net::model_id(&path).unwrap();
    let registry: Registry = Arc::default();
    let nodes: Vec<Arc<Node<MapDialer>>> = CUTS
        .windows(2)
        .map(|w| {
            let opts = LoadOptions { layers: Some(w[0]..w[1]), threads: 1, ..Default::default() };
            let slice = ModelSlice::load(&path, &opts).unwrap();
            let server = StageServer::new(Arc::new(slice), id, StageLimits::default());
            Arc::new(Node::new(server, MapDialer(Arc::clone(&registry))))
        })
        .collect();
    for (i, n) in nodes.iter().enumerate() {
        registry.lock().unwrap().insert(format!("n{i}"), Arc::clone(n));
    }
    (path, id, nodes)
}

fn open_message(id: [u8; 32], i: usize, next_hop: Option<&str>) -> Message {
    Message::Open {
        model_id: id,
        start: CUTS[i] as u32,
        end: CUTS[i + 1] as u32,
        max_tokens: 64,
        next_hop: next_hop.map(String::from),
        tail_argmax: i == 2,
        verify: None,
    }
}

#[test]
fn direct_return_ring_of_nodes_equals_local() {
    let (path, id, nodes) = ring_of_nodes();
    let inbox = Arc::new(Inbox::default());
    let client: Arc<dyn FrameSink> = inbox.clone();
    let open = |session: u64, i: usize, next_hop: Option<&str>| {
        nodes[i].on_frame(frame(session, 1, open_message(id, i, next_hop)), &client);
        inbox.take()
    };
    for (i, hop) in [(0, Some("n1")), (1, Some("n2")), (2, None)] {
        let r = open(1, i, hop);
        assert!(matches!(r[..], [Frame { message: Message::Ack { .. }, .. }]), "{r:?}");
    }
    let tok = Tokenizer::from_gguf(&path).unwrap();
    let ids = tok.encode("The quick brown fox", true, false).unwrap();
    let local = ModelSlice::load(&path, &LoadOptions { threads: 1, ..Default::default() }).unwrap();
    let mut s = Sampler::new(Default::default()).unwrap();
    let (want, _, _) = generate(&local, &ids, 8, &mut s, &[], &mut |_| true).unwrap();
    let mut got = Vec::new();
    let (mut feed, mut pos) = (ids.clone(), 0u32);
    while got.len() < 8 {
        let positions: Vec<u32> = (pos..pos + feed.len() as u32).collect();
        pos += feed.len() as u32;
        let m = Message::Forward { positions, tree_parents: None, input: Input::Tokens(feed), spec: None };
        nodes[0].on_frame(frame(1, 2 + got.len() as u32, m), &client);
        // The tail's answer arrives at the client directly (the head only forwards).
        let r = inbox.take();
        let [Frame { message: Message::Output { input: Input::Tokens(t) }, .. }] = &r[..] else { panic!("{r:?}") };
        got.push(t[0]);
        feed = vec![t[0]];
    }
    assert_eq!(got, want);

    // A next hop that cannot be dialed: the open is refused and the session closed.
    let r = open(2, 0, Some("nowhere"));
    assert!(matches!(&r[..], [Frame { message: Message::Error { code: ErrorCode::Internal, .. }, .. }]), "{r:?}");
    // A next hop that dies: the forward becomes an error to the client.
    assert!(matches!(open(3, 0, Some("dead"))[..], [Frame { message: Message::Ack { .. }, .. }]));
    let m = Message::Forward { positions: vec![0], tree_parents: None, input: Input::Tokens(vec![1]), spec: None };
    nodes[0].on_frame(frame(3, 2, m), &client);
    let r = inbox.take();
    assert!(matches!(&r[..], [Frame { message: Message::Error { code: ErrorCode::Internal, .. }, .. }]), "{r:?}");
}

/// Frames of several sessions waiting in a worker's queue run as one batch; each session's
/// output still reaches its client through the ring, and every session decodes exactly what it
/// decodes alone.
#[test]
fn queued_frames_of_many_sessions_equal_local() {
    let (path, id, nodes) = ring_of_nodes();
    let inbox = Arc::new(Inbox::default());
    let client: Arc<dyn FrameSink> = inbox.clone();
    let tok = Tokenizer::from_gguf(&path).unwrap();
    let local = ModelSlice::load(&path, &LoadOptions { threads: 1, ..Default::default() }).unwrap();
    let prompts = ["The quick brown fox", "def quicksort(xs):", "Once upon a time", "List the planets"];
    let mut sessions = Vec::new();
    for (s, prompt) in prompts.iter().enumerate() {
        let session = 10 + s as u64;
        for (i, hop) in [(0, Some("n1")), (1, Some("n2")), (2, None)] {
            nodes[i].on_frame(frame(session, 1, open_message(id, i, hop)), &client);
        }
        assert!(inbox.take().iter().all(|f| matches!(f.message, Message::Ack { .. })));
        let ids = tok.encode(prompt, true, false).unwrap();
        let mut sampler = Sampler::new(Default::default()).unwrap();
        let (want, _, _) = generate(&local, &ids, 6, &mut sampler, &[], &mut |_| true).unwrap();
        sessions.push((session, ids, 0u32, want, Vec::new()));
    }
    for step in 0..6u32 {
        let (queue, mut work) = std::sync::mpsc::sync_channel(COMPUTE_QUEUE_FRAMES_MAX);
        for (session, feed, pos, _, _) in &mut sessions {
            let positions: Vec<u32> = (*pos..*pos + feed.len() as u32).collect();
            *pos += feed.len() as u32;
            let m = Message::Forward { positions, tree_parents: None, input: Input::Tokens(feed.clone()), spec: None };
            queue.send(Work::Frame(frame(*session, 2 + step, m), Arc::clone(&client))).unwrap();
        }
        drop(queue);
        nodes[0].serve_queue(&mut work);
        let replies = inbox.take();
        assert_eq!(replies.len(), sessions.len(), "{replies:?}");
        for (session, feed, _, _, got) in &mut sessions {
            let reply = replies.iter().find(|f| f.session == *session).unwrap();
            let Message::Output { input: Input::Tokens(t) } = &reply.message else { panic!("{reply:?}") };
            got.push(t[0]);
            *feed = vec![t[0]];
        }
    }
    for (session, _, _, want, got) in &sessions {
        assert_eq!(got, want, "session {session}");
    }
}
