//! Frames round-trip, and hostile bytes never panic or allocate past the limits.

use specswarm_proto::limits;
use specswarm_proto::wire::{
    Commit, Dtype, ErrorCode, Frame, HEADER_BYTES, Input, Message, SpecRound, VerifySpec, WireError,
};

fn frames() -> Vec<Frame> {
    let f = |message| Frame { session: 0xDEAD_BEEF_0000_0001, epoch: 7, seq: 42, message };
    vec![
        f(Message::Open {
            model_id: [9; 32],
            start: 0,
            end: 10,
            max_tokens: 4096,
            next_hop: None,
            tail_argmax: false,
            verify: None,
        }),
        f(Message::Open {
            model_id: [1; 32],
            start: 10,
            end: 20,
            max_tokens: 64,
            next_hop: Some("127.0.0.1:7002".into()),
            tail_argmax: true,
            verify: Some(VerifySpec {
                temperature: 0.7,
                top_k: 40,
                top_p: 0.9,
                min_p: 0.05,
                repetition_penalty: 1.1,
                frequency_penalty: 0.5,
                presence_penalty: -0.25,
                penalty_last_n: 64,
                seed: 0x1234_5678_9ABC_DEF0,
            }),
        }),
        f(Message::Forward {
            positions: vec![5, 6, 7],
            tree_parents: None,
            input: Input::Tokens(vec![1, 2, 3]),
            spec: None,
        }),
        f(Message::Forward {
            positions: vec![5, 6, 6],
            tree_parents: Some(vec![-1, 0, 0]),
            input: Input::Hidden { dtype: Dtype::F16, rows: 3, dim: 4, data: (0..24).collect() },
            spec: None,
        }),
        f(Message::Forward {
            positions: vec![9, 10, 10],
            tree_parents: Some(vec![-1, 0, 0]),
            input: Input::Hidden { dtype: Dtype::F32, rows: 3, dim: 1, data: (0..12).collect() },
            spec: Some(SpecRound { tokens: vec![5, 6, 7], commit: Commit::Path(vec![0, 1, 3]), verify: true }),
        }),
        f(Message::Forward {
            positions: vec![4, 5],
            tree_parents: None,
            input: Input::Tokens(vec![8, 9]),
            spec: Some(SpecRound { tokens: vec![8, 9], commit: Commit::Len(4), verify: true }),
        }),
        f(Message::Forward {
            positions: vec![4],
            tree_parents: None,
            input: Input::Tokens(vec![8]),
            spec: Some(SpecRound { tokens: vec![8], commit: Commit::Keep, verify: false }),
        }),
        f(Message::Verdict { accepted: vec![0, 2, 5], next: 49151 }),
        f(Message::Accept { path: vec![0, 2] }),
        f(Message::Truncate { len: 17 }),
        f(Message::Close),
        f(Message::Ack { committed: 99 }),
        f(Message::Output { input: Input::Hidden { dtype: Dtype::F32, rows: 1, dim: 2, data: vec![0; 8] } }),
        f(Message::Error { code: ErrorCode::StaleEpoch, message: "epoch 6 < 7".into() }),
    ]
}

#[test]
fn round_trip() {
    for fr in frames() {
        let bytes = fr.encode();
        assert_eq!(Frame::decode(&bytes).unwrap(), fr);
    }
}

#[test]
fn truncations_and_extensions_are_errors() {
    for fr in frames() {
        let bytes = fr.encode();
        for cut in 0..bytes.len() {
            assert!(Frame::decode(&bytes[..cut]).is_err(), "{fr:?} cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(Frame::decode(&longer), Err(WireError::TrailingBytes(1))));
    }
}

#[test]
fn oversized_lengths_are_refused_before_allocation() {
    let mut b = Frame { session: 1, epoch: 1, seq: 1, message: Message::Close }.encode();
    b[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(Frame::decode_header(&b), Err(WireError::TooLarge { .. })));
    // A forward claiming 4 billion positions in a tiny payload.
    let mut p = vec![0xFF, 0xFF, 0xFF, 0xFF];
    p.push(0);
    let mut b = Frame { session: 1, epoch: 1, seq: 1, message: Message::Close }.encode();
    b[5] = 2;
    b[24..28].copy_from_slice(&(p.len() as u32).to_le_bytes());
    b.extend_from_slice(&p);
    assert!(matches!(Frame::decode(&b), Err(WireError::TooLarge { what: "positions", .. })));
    // Hidden rows × dim beyond the limits.
    let fr = Frame {
        session: 1,
        epoch: 1,
        seq: 1,
        message: Message::Output { input: Input::Hidden { dtype: Dtype::F16, rows: 1, dim: 1, data: vec![0; 2] } },
    };
    let mut b = fr.encode();
    let dim_at = HEADER_BYTES + 1 + 1 + 4;
    b[dim_at..dim_at + 4].copy_from_slice(&((limits::ROW_VALUES_MAX + 1) as u32).to_le_bytes());
    assert!(matches!(Frame::decode(&b), Err(WireError::TooLarge { what: "hidden dim", .. })));
}

#[test]
fn random_bytes_never_panic() {
    let mut x = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let valid: Vec<Vec<u8>> = frames().iter().map(Frame::encode).collect();
    let mut errors = 0;
    for i in 0..20_000 {
        let mut b = valid[i % valid.len()].clone();
        // Flip a few bytes, sometimes in the header, sometimes in the payload.
        for _ in 0..1 + next() % 4 {
            let at = (next() as usize) % b.len();
            b[at] = next() as u8;
        }
        if next() % 5 == 0 {
            b.truncate((next() as usize) % (b.len() + 1));
        }
        if Frame::decode(&b).is_err() {
            errors += 1;
        }
    }
    assert!(errors > 10_000, "most corruptions are detected ({errors})");
    for _ in 0..5_000 {
        let n = (next() % 200) as usize;
        let b: Vec<u8> = (0..n).map(|_| next() as u8).collect();
        let _ = Frame::decode(&b);
    }
}
