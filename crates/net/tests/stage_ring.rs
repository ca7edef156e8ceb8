//! Stage servers and an in-process ring against the single-process model; hostile frames.

use std::sync::Arc;
use std::time::Instant;

use specswarm_engine::chat::{ChatMessage, ChatTemplate};
use specswarm_engine::generate::generate;
use specswarm_engine::hub;
use specswarm_engine::model::{LoadOptions, ModelSlice};
use specswarm_engine::sampling::{Sampler, argmax};
use specswarm_engine::tokenizer::Tokenizer;
use specswarm_net::ring::{LocalLink, RingClient, RingError, RingSpec, StageLink};
use specswarm_net::stage::{StageLimits, StageServer};
use specswarm_proto::wire::{ErrorCode, Frame, Input, Message};

fn path(name: &str) -> std::path::PathBuf {
    hub::ensure(hub::known(name).unwrap(), &mut |m| eprintln!("{m}")).unwrap()
}

fn stage(p: &std::path::Path, id: [u8; 32], start: usize, end: usize, limits: StageLimits) -> StageServer {
    let slice =
        ModelSlice::load(p, &LoadOptions { layers: Some(start..end), threads: 1, ..Default::default() }).unwrap();
    StageServer::new(Arc::new(slice), id, limits)
}

fn ring(p: &std::path::Path, cuts: &[usize]) -> RingClient {
    let id = specswarm_net::model_id(p).unwrap();
    let mut links: Vec<Box<dyn StageLink>> = Vec::new();
    let mut ranges = Vec::new();
    for w in cuts.windows(2) {
        links.push(Box::new(LocalLink(stage(p, id, w[0], w[1], StageLimits::default()))));
        ranges.push((w[0] as u32, w[1] as u32));
    }
    RingClient::new(links, RingSpec { model_id: id, ranges }, 0x5eed)
}

/// Greedy decoding through a ring.
fn ring_greedy(ring: &mut RingClient, prompt: &[u32], n: usize) -> Vec<u32> {
    ring.open((prompt.len() + n) as u32).unwrap();
    let pos: Vec<u32> = (0..prompt.len() as u32).collect();
    let mut logits = ring.forward(prompt, &pos, None).unwrap();
    let mut out = Vec::new();
    loop {
        let t = argmax(&logits);
        out.push(t);
        if out.len() == n {
            break;
        }
        let p = [ring.committed() as u32];
        logits = ring.forward(&[t], &p, None).unwrap();
    }
    ring.close().unwrap();
    out
}

include!("../../../fixtures/prompts/ten.rs");

fn check_ring_equals_local(name: &str) {
    let p = path(name);
    let local = ModelSlice::load(&p, &LoadOptions { threads: 1, ..Default::default() }).unwrap();
    let n_layers = local.config().n_layers;
    let tok = Tokenizer::from_gguf(&p).unwrap();
    let template = ChatTemplate::from_gguf(&p).unwrap();
    let mut r = ring(&p, &[0, n_layers / 3, 2 * n_layers / 3, n_layers]);
    for prompt in PROMPTS_10 {
        let ids = match &template {
            Some(t) => tok
                .encode(
                    &t.render(&[ChatMessage { role: "user".into(), content: prompt.into() }], true).unwrap(),
                    false,
                    true,
                )
                .unwrap(),
            None => tok.encode(prompt, true, false).unwrap(),
        };
        let mut sampler = Sampler::new(Default::default()).unwrap();
        let (want, _, _) = generate(&local, &ids, 24, &mut sampler, &[], &mut |_| true).unwrap();
        assert_eq!(ring_greedy(&mut r, &ids, 24), want, "{name}: {prompt:?}");
    }
}

#[test]
fn smollm2_three_stage_ring_equals_local() {
    check_ring_equals_local("smollm2-135m");
}

#[test]
fn gemma3_three_stage_ring_equals_local() {
    check_ring_equals_local("gemma3-270m");
}

#[test]
fn epochs_positions_and_sessions_are_enforced() {
    let p = path("smollm2-135m");
    let mut r = ring(&p, &[0, 10, 20, 30]);
    r.open(64).unwrap();
    r.forward(&[1, 2, 3], &[0, 1, 2], None).unwrap();
    // Wrong start position.
    match r.forward(&[4], &[7], None) {
        Err(RingError::Refused { stage: 0, code: ErrorCode::PositionMismatch, .. }) => {}
        other => panic!("expected a position mismatch, got {other:?}"),
    }
    r.truncate(1).unwrap();
    r.forward(&[9], &[1], None).unwrap();
    r.close().unwrap();
    match r.forward(&[4], &[2], None) {
        Err(RingError::Refused { code: ErrorCode::UnknownSession, .. }) => {}
        other => panic!("expected an unknown session, got {other:?}"),
    }
}

#[test]
fn hostile_frames_are_refused_and_a_live_session_is_unharmed() {
    let p = path("smollm2-135m");
    let id = specswarm_net::model_id(&p).unwrap();
    let limits = StageLimits { sessions_max: 8, kv_tokens_total_max: 4096, ..StageLimits::default() };
    let mut server = stage(&p, id, 0, 30, limits);
    let now = Instant::now();
    let frame = |session, epoch, message| Frame { session, epoch, seq: 1, message };
    let open = |_session: u64| Message::Open {
        model_id: id,
        start: 0,
        end: 30,
        max_tokens: 256,
        next_hop: None,
        tail_argmax: false,
        verify: None,
    };
    // The control session: decode a few tokens, remembering the logits.
    let reply = server.handle(&frame(1, 5, open(1)), now);
    assert!(matches!(reply.message, Message::Ack { .. }));
    let mut control = Vec::new();
    let mut tokens = vec![1u32, 4093, 198];
    let mut pos = 0u32;
    let step = |server: &mut StageServer, toks: &[u32], pos: u32| {
        let positions: Vec<u32> = (pos..pos + toks.len() as u32).collect();
        server.handle(
            &frame(
                1,
                5,
                Message::Forward { positions, tree_parents: None, input: Input::Tokens(toks.to_vec()), spec: None },
            ),
            now,
        )
    };
    let r = step(&mut server, &tokens, pos);
    pos += tokens.len() as u32;
    control.push(r.clone());
    let baseline_bytes = server.kv_bytes();

    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let valid = [
        frame(
            2,
            0,
            Message::Forward { positions: vec![0], tree_parents: None, input: Input::Tokens(vec![5]), spec: None },
        )
        .encode(),
        frame(
            2,
            5,
            Message::Forward {
                positions: vec![3, 4],
                tree_parents: Some(vec![-1, 0]),
                input: Input::Tokens(vec![1, 2]),
                spec: None,
            },
        )
        .encode(),
        frame(
            3,
            0,
            Message::Open {
                model_id: [7; 32],
                start: 0,
                end: 30,
                max_tokens: 10,
                next_hop: None,
                tail_argmax: false,
                verify: None,
            },
        )
        .encode(),
    ];
    let mut link = LocalLink(server);
    let mut refused = 0;
    for i in 0..5_000 {
        let bytes = match i % 5 {
            // Random bytes.
            0 => (0..(next() % 96) as usize).map(|_| next() as u8).collect(),
            // Corrupted valid frames.
            1 | 2 => {
                let mut b = valid[(next() % 3) as usize].clone();
                let at = (next() as usize) % b.len();
                b[at] = next() as u8;
                b
            }
            // Stale epoch on the live session.
            3 => frame(
                1,
                4,
                Message::Forward {
                    positions: vec![pos],
                    tree_parents: None,
                    input: Input::Tokens(vec![1]),
                    spec: None,
                },
            )
            .encode(),
            // Wrong positions / unknown sessions / bad shapes.
            _ => frame(
                1 + next() % 3,
                // Session 1 only ever gets positions it does not hold.
                5,
                Message::Forward {
                    positions: vec![(next() % 1000) as u32 + 1000],
                    tree_parents: None,
                    input: Input::Hidden {
                        dtype: specswarm_proto::wire::Dtype::F32,
                        rows: 1,
                        dim: 576,
                        data: vec![0; 2304],
                    },
                    spec: None,
                },
            )
            .encode(),
        };
        let reply = Frame::decode(&link.exchange(&bytes).unwrap()).unwrap();
        if matches!(reply.message, Message::Error { .. }) {
            refused += 1;
        }
    }
    let mut server = link.0;
    assert!(refused > 4_500, "hostile frames must be refused ({refused} of 5000)");
    assert!(server.sessions() <= 8, "sessions stay bounded");
    assert_eq!(server.kv_bytes(), baseline_bytes, "hostile frames leave no KV behind");
    // The live session still works and matches a fresh server bit for bit.
    tokens = vec![520, 9531];
    let after = step(&mut server, &tokens, pos);
    let mut fresh = stage(&p, id, 0, 30, StageLimits::default());
    fresh.handle(&frame(1, 5, open(1)), now);
    let f1 = step(&mut fresh, &[1, 4093, 198], 0);
    assert_eq!(f1.message, control[0].message);
    let f2 = step(&mut fresh, &tokens, 3);
    assert_eq!(f2.message, after.message, "the live session's output is unchanged by the hostile traffic");
}
