//! A worker's replies on one TCP connection come back in the order of the frames sent on it,
//! including the reply to bytes that are not a frame.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use specswarm_engine::hub;
use specswarm_engine::model::{LoadOptions, ModelSlice};
use specswarm_net::ring::{forward_message, open_message};
use specswarm_net::stage::{StageLimits, StageServer};
use specswarm_net::tcp::{read_frame, serve};
use specswarm_proto::wire::{ErrorCode, Frame, Input, Message};

fn frame(seq: u32, message: Message) -> Frame {
    Frame { session: 7, epoch: 1, seq, message }
}

/// A long prefill, then a frame with an unknown message kind: the error for the second must not
/// overtake the first's output (it used to be written by the connection's reader at once).
#[test]
fn an_undecodable_frame_is_answered_in_its_turn() {
    let p = hub::ensure(hub::known("smollm2-135m").unwrap(), &mut |m| eprintln!("{m}")).unwrap();
    let slice = ModelSlice::load(&p, &LoadOptions { layers: Some(0..30), threads: 1, ..Default::default() }).unwrap();
    let id = specswarm_net::model_id(&p).unwrap();
    let server = StageServer::new(Arc::new(slice), id, StageLimits::default());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || serve(listener, server));

    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let prompt: Vec<u32> = (0..384).map(|i| 100 + (i * 37) % 4000).collect();
    let positions: Vec<u32> = (0..prompt.len() as u32).collect();
    let mut bytes = frame(1, open_message(0, 1, id, (0, 30), None, 512, true, None)).encode();
    bytes.extend(frame(2, forward_message(Input::Tokens(prompt), &positions, None, None)).encode());
    let mut bad = frame(3, Message::Close).encode();
    bad[5] = 0xEE; // an unknown message kind behind a valid header
    bytes.extend(bad);
    bytes.extend(frame(4, Message::Close).encode());
    s.write_all(&bytes).unwrap();

    let mut replies = Vec::new();
    for _ in 0..4 {
        let b = read_frame(&mut s).unwrap().unwrap();
        replies.push(Frame::decode(&b).unwrap());
    }
    assert!(matches!(replies[0].message, Message::Ack { .. }), "{:?}", replies[0]);
    assert!(
        matches!(replies[1].message, Message::Output { .. }),
        "the prefill's output comes second: {:?}",
        replies[1]
    );
    assert!(
        matches!(&replies[2].message, Message::Error { code: ErrorCode::Malformed, .. }),
        "then the undecodable frame's error: {:?}",
        replies[2]
    );
    assert!(matches!(replies[3].message, Message::Ack { .. }), "and the connection still serves: {:?}", replies[3]);
}
