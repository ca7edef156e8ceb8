//! What the gateway's test files share: the real SmolLM2-135M behind a local backend.

use std::sync::{Arc, OnceLock};

use specswarm_engine::hub;
use specswarm_gateway::local::{LocalBackend, LocalModel};

pub const MODEL: &str = "smollm2-135m";

pub fn model_path() -> std::path::PathBuf {
    hub::ensure(hub::known(MODEL).unwrap(), &mut |m| eprintln!("{m}")).unwrap()
}

/// One loaded model shared by every test in a file (loading is the slow part).
pub fn backend() -> Arc<LocalBackend> {
    static B: OnceLock<Arc<LocalBackend>> = OnceLock::new();
    B.get_or_init(|| Arc::new(LocalBackend::new(vec![LocalModel::load(MODEL, &model_path(), 2, None).unwrap()])))
        .clone()
}
