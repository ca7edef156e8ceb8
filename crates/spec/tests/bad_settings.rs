//! Bad speculative settings are refused with clear errors.

use specswarm_engine::hub;
use specswarm_engine::model::{LoadOptions, ModelSlice};
use specswarm_engine::sampling::Sampler;
use specswarm_spec::SpecError;
use specswarm_spec::decode::generate_speculative;
use specswarm_spec::drafter::DraftBudget;
use specswarm_spec::drafter::model::ModelDrafter;
use specswarm_spec::policy::{Policy, PolicyMode};

fn path(name: &str) -> std::path::PathBuf {
    hub::ensure(hub::known(name).unwrap(), &mut |m| eprintln!("{m}")).unwrap()
}

#[test]
fn zero_budget_is_refused() {
    let smol = path("smollm2-135m");
    let target = ModelSlice::load(&smol, &LoadOptions { threads: 1, ..Default::default() }).unwrap();
    let mut drafter = ModelDrafter::self_draft(&smol, 4, 30, 1).unwrap();
    for budget in [
        DraftBudget { max_nodes: 0, max_depth: 3, max_branch: 1 },
        DraftBudget { max_nodes: 4, max_depth: 0, max_branch: 1 },
        DraftBudget { max_nodes: 4, max_depth: 3, max_branch: 0 },
    ] {
        let mut policy = Policy::new(PolicyMode::Fixed(budget));
        let mut sampler = Sampler::new(Default::default()).unwrap();
        let err =
            generate_speculative(&target, &mut drafter, &mut policy, &[1, 2, 3], 4, &mut sampler, &[], &mut |_| true)
                .unwrap_err();
        assert!(matches!(err, SpecError::InvalidSetting(_)), "{budget:?}: {err}");
        assert!(err.to_string().contains("budget"), "{err}");
    }
}

#[test]
fn draft_model_with_another_vocabulary_is_refused() {
    let err = match ModelDrafter::from_file(&path("gemma3-270m"), 49_152, 1) {
        Err(e) => e,
        Ok(_) => panic!("a 262144-token draft model must not pair with a 49152-token target"),
    };
    assert!(matches!(err, SpecError::VocabularyMismatch { draft: 262_144, target: 49_152 }), "{err}");
    assert!(err.to_string().contains("vocabulary"));
}

#[test]
fn self_draft_needs_fewer_layers_than_the_target() {
    let smol = path("smollm2-135m");
    for k in [0, 30, 31] {
        let err = match ModelDrafter::self_draft(&smol, k, 30, 1) {
            Err(e) => e,
            Ok(_) => panic!("self:{k} must be refused for a 30-layer model"),
        };
        assert!(err.to_string().contains("1 <= K < 30"), "{err}");
    }
}

#[test]
fn lens_and_skip_settings_are_checked() {
    let smol = path("smollm2-135m");
    for k in [0, 30] {
        let err = match specswarm_spec::drafter::lens::calibrate(&smol, k, 1, &mut |_, _| {}) {
            Err(e) => e,
            Ok(_) => panic!("lens:{k} must be refused for a 30-layer model"),
        };
        assert!(err.to_string().contains("1 <= K < 30"), "{err}");
    }
    for (skip, why) in [((0..30).collect::<Vec<_>>(), "every layer"), (vec![30], "cannot skip layer 30")] {
        let err = match ModelDrafter::skip_draft(&smol, &skip, 1) {
            Err(e) => e,
            Ok(_) => panic!("skipping {skip:?} must be refused"),
        };
        assert!(err.to_string().contains(why), "{err}");
    }
    use specswarm_spec::drafter::model::{format_layers, parse_layers};
    assert_eq!(parse_layers("4-7+12").unwrap(), vec![4, 5, 6, 7, 12]);
    assert_eq!(format_layers(&[12, 4, 5, 6, 7]), "4-7+12");
    for bad in ["", "7-4", "a", "1-", "3+"] {
        assert!(parse_layers(bad).is_err(), "{bad:?} must be refused");
    }
}
