//! Broken models and bad requests get clear, typed errors; nothing panics.

mod common;

use std::path::Path;

use common::{TestRng, Tiny};
use specswarm_engine::EngineError;
use specswarm_engine::generate::generate;
use specswarm_engine::gguf::{GgufFile, MetaValue};
use specswarm_engine::model::{Batch, LoadOptions, ModelSlice, StepInput, Want};
use specswarm_engine::sampling::Sampler;

fn load(path: &Path) -> Result<ModelSlice, EngineError> {
    ModelSlice::load(path, &LoadOptions { layers: None, threads: 1, ..Default::default() })
}

fn write_bytes(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("specswarm-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn truncated_file_is_a_clear_error() {
    let good = std::fs::read(Tiny::new("llama").write(1)).unwrap();
    for cut in [0, 3, 8, 20, 100, 1000, good.len() / 2, good.len() - 1] {
        let p = write_bytes(&format!("cut{cut}.gguf"), &good[..cut]);
        let err = load(&p).expect_err("a truncated file must not load");
        let msg = err.to_string();
        assert!(matches!(err, EngineError::CorruptModel { .. }), "cut at {cut}: {msg}");
        assert!(
            msg.contains("truncated") || msg.contains("not a GGUF") || msg.contains("outside the file"),
            "cut at {cut}: {msg}"
        );
    }
}

#[test]
fn corrupted_bytes_never_panic() {
    let good = std::fs::read(Tiny::new("qwen3").write(2)).unwrap();
    let header_end = 4096.min(good.len());
    let mut rng = TestRng::new(9);
    let mut errors = 0;
    for i in 0..300 {
        let mut bad = good.clone();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(header_end);
            bad[at] = rng.next_u64() as u8;
        }
        let p = write_bytes("corrupt.gguf", &bad);
        match std::panic::catch_unwind(|| load(&p).map(|_| ())) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                errors += 1;
                assert!(!e.to_string().is_empty());
            }
            Err(_) => panic!("iteration {i}: loading a corrupted file panicked"),
        }
    }
    assert!(errors > 50, "corruption should usually be detected, got {errors} errors of 300");
}

#[test]
fn not_gguf_and_hostile_lengths() {
    let p = write_bytes("text.gguf", b"hello, this is not a model file at all");
    assert!(load(&p).unwrap_err().to_string().contains("not a GGUF"));
    // Valid magic/version, then an absurd metadata count and an absurd string length.
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&u64::MAX.to_le_bytes());
    let err = GgufFile::open(&write_bytes("many.gguf", &b)).unwrap_err().to_string();
    assert!(err.contains("exceeds"), "{err}");
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&(1u64 << 62).to_le_bytes());
    let err = GgufFile::open(&write_bytes("longstr.gguf", &b)).unwrap_err().to_string();
    assert!(err.contains("exceeds the limit"), "{err}");
}

#[test]
fn wrong_tensor_shape_names_the_tensor() {
    let mut t = Tiny::new("llama");
    t.extra_meta.push(("llama.attention.head_count".into(), MetaValue::U32(8)));
    t.extra_meta.push(("llama.attention.key_length".into(), MetaValue::U32(16)));
    let err = load(&t.write(3)).unwrap_err();
    match &err {
        EngineError::ShapeMismatch { tensor, .. } => assert_eq!(tensor, "blk.0.attn_q.weight"),
        other => panic!("expected a shape mismatch, got {other}"),
    }
}

#[test]
fn unknown_architecture_lists_supported() {
    let mut t = Tiny::new("llama");
    t.extra_meta.push(("general.architecture".into(), MetaValue::String("mamba".into())));
    let msg = load(&t.write(4)).unwrap_err().to_string();
    assert!(msg.contains("mamba") && msg.contains("llama") && msg.contains("gemma3"), "{msg}");
}

#[test]
fn bad_layer_range() {
    let path = Tiny::new("llama").write(5);
    for r in [3..3, 2..9] {
        let err =
            ModelSlice::load(&path, &LoadOptions { layers: Some(r), threads: 1, ..Default::default() }).unwrap_err();
        assert!(matches!(err, EngineError::BadLayerRange { .. }), "{err}");
    }
}

#[test]
fn prompt_longer_than_context() {
    let t = Tiny::new("llama");
    let model = load(&t.write(6)).unwrap();
    let prompt: Vec<u32> = (0..t.context as u32 + 5).map(|i| i % 100).collect();
    let mut sampler = Sampler::new(Default::default()).unwrap();
    let err = generate(&model, &prompt, 4, &mut sampler, &[], &mut |_| true).unwrap_err();
    assert!(matches!(err, EngineError::ContextExceeded { .. }), "{err}");
    // Directly through forward as well.
    let pos: Vec<u32> = (0..prompt.len() as u32).collect();
    let mut kv = model.new_cache(10_000);
    let err = model
        .forward(
            &mut kv,
            &Batch { input: StepInput::Tokens(&prompt), positions: &pos, tree_parents: None },
            Want::LastLogits,
        )
        .unwrap_err();
    assert!(matches!(err, EngineError::ContextExceeded { .. }), "{err}");
}

#[test]
fn bad_batches_are_refused_and_the_cache_is_unchanged() {
    let model = load(&Tiny::new("llama").write(7)).unwrap();
    let mut kv = model.new_cache(8);
    let fwd = |kv: &mut _, ids: &[u32], pos: &[u32], parents: Option<&[i32]>| {
        model.forward(
            kv,
            &Batch { input: StepInput::Tokens(ids), positions: pos, tree_parents: parents },
            Want::LastLogits,
        )
    };
    assert!(matches!(fwd(&mut kv, &[1, 2], &[0, 2], None), Err(EngineError::PositionMismatch { index: 1, .. })));
    assert!(matches!(fwd(&mut kv, &[99_999], &[0], None), Err(EngineError::TokenOutOfRange { .. })));
    assert!(matches!(fwd(&mut kv, &[1, 2], &[0, 1], Some(&[-1, 1])), Err(EngineError::BadBatch { .. })));
    assert!(matches!(
        fwd(&mut kv, &[1; 9], &(0..9).collect::<Vec<_>>(), None),
        Err(EngineError::KvBudgetExceeded { .. })
    ));
    assert!(matches!(fwd(&mut kv, &[], &[], None), Err(EngineError::BadBatch { .. })));
    assert_eq!(kv.len(), 0);
    fwd(&mut kv, &[1, 2, 3], &[0, 1, 2], None).unwrap();
    assert_eq!(kv.len(), 3);
    let hidden = vec![0f32; 64];
    let err = model.forward(
        &mut kv,
        &Batch { input: StepInput::Hidden(&hidden), positions: &[3], tree_parents: None },
        Want::LastLogits,
    );
    assert!(matches!(err, Err(EngineError::WrongSliceRole { .. })));
    assert_eq!(kv.len(), 3);
}
