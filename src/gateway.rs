//! `specswarm gateway` and `specswarm keys`.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use specswarm_gateway::auth::KeyStore;
use specswarm_gateway::local::{LocalBackend, LocalModel};
use specswarm_gateway::swarm::{SwarmBackend, SwarmModel};
use specswarm_gateway::{AppState, GatewayConfig};

use crate::cli::{GatewayArgs, KeysCommand};

/// The id a `--model` value is served under: the known name, or the file stem of a path.
fn model_id(spec: &str) -> String {
    if specswarm_engine::hub::known(spec).is_some() {
        return spec.to_string();
    }
    std::path::Path::new(spec).file_stem().map_or_else(|| spec.to_string(), |s| s.to_string_lossy().into_owned())
}

pub fn run(args: &GatewayArgs) -> Result<()> {
    let specs = if args.model.is_empty() { vec!["smollm2-135m".to_string()] } else { args.model.clone() };
    // The drafter is loaded per model (lens:K and skip:… are cut from that model).
    let draft = |path: &std::path::Path| -> Result<_> {
        args.draft
            .as_deref()
            .map(|d| Ok((crate::speculate::recipe(d, path, args.threads)?, args.draft_len.max(1))))
            .transpose()
    };
    if args.swarm {
        // The swarm backend: this process holds tokenizers and chat templates; workers found in
        // the libp2p DHT hold the weights.
        let node = crate::p2p::client(&args.bootstrap)?;
        let mut models = Vec::new();
        for spec in &specs {
            let path = crate::resolve_model(spec)?;
            let id = model_id(spec);
            let file = specswarm_engine::gguf::GgufFile::open(&path)?;
            let n_layers = specswarm_engine::config::ModelConfig::from_gguf(&file)?.n_layers as u32;
            let factory =
                crate::p2p::P2pRingFactory::start(node.clone(), specswarm_net::model_id(&path)?, &id, n_layers);
            let m = SwarmModel::new(&id, &path, Box::new(factory), draft(&path)?, args.pipeline)
                .map_err(anyhow::Error::msg)?
                .with_tree_budget(args.tree_budget.unwrap_or(0));
            eprintln!("gateway: serving {id} from the swarm (peer {})", node.peer_id);
            models.push(m);
        }
        return serve(args, Arc::new(SwarmBackend::new(models)));
    }
    let mut models = Vec::new();
    for spec in &specs {
        let path = crate::resolve_model(spec)?;
        let id = model_id(spec);
        if models.iter().any(|m: &LocalModel| m.id == id) {
            bail!("model {id:?} given twice");
        }
        let m = LocalModel::load(&id, &path, args.threads, draft(&path)?).map_err(anyhow::Error::msg)?;
        eprintln!("gateway: serving {id} from {}", path.display());
        models.push(m);
    }
    serve(args, Arc::new(LocalBackend::new(models)))
}

fn serve(args: &GatewayArgs, backend: Arc<dyn specswarm_gateway::backend::Backend>) -> Result<()> {
    let keys = if args.no_auth {
        eprintln!("gateway: --no-auth: requests need no API key");
        None
    } else {
        let path = args.keys_db.clone().unwrap_or_else(KeyStore::default_path);
        Some(KeyStore::open(&path).with_context(|| format!("opening {}", path.display()))?)
    };
    let config = GatewayConfig {
        parallel: args.parallel.max(1),
        sessions_max: args.sessions_max.max(1),
        body_bytes_max: args.body_bytes_max,
    };
    let state = AppState::new(backend, keys, config);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.http_threads.max(1))
        .max_blocking_threads(args.parallel.max(1) + 8)
        .enable_all()
        .build()?;
    let exit_on_eof = args.exit_on_stdin_eof;
    rt.block_on(async move {
        let listener =
            tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("binding {}", args.listen))?;
        let addr = listener.local_addr()?;
        println!("gateway listening on http://{addr}");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        if exit_on_eof {
            std::thread::spawn(move || {
                let mut sink = Vec::new();
                let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
                let _ = stop_tx.send(());
            });
        } else {
            std::mem::forget(stop_tx);
        }
        let shutdown = async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = stop_rx => {}
            }
        };
        specswarm_gateway::serve(listener, state, shutdown).await?;
        anyhow::Ok(())
    })?;
    // Open streams may still hold blocking generation threads; do not wait for them.
    rt.shutdown_background();
    Ok(())
}

pub fn keys(cmd: KeysCommand) -> Result<()> {
    let open = |db: Option<std::path::PathBuf>| -> Result<KeyStore> {
        let path = db.unwrap_or_else(KeyStore::default_path);
        KeyStore::open(&path).with_context(|| format!("opening {}", path.display()))
    };
    match cmd {
        KeysCommand::Create { name, rate_per_minute, db } => {
            let store = open(db)?;
            let (key, rec) = store.create(&name, rate_per_minute)?;
            eprintln!(
                "created key {} ({:?}, {} requests/minute); it is shown only once:",
                rec.id, rec.name, rec.rate_per_minute
            );
            println!("{key}");
        }
        KeysCommand::List { db } => {
            for r in open(db)?.list()? {
                println!(
                    "{:>4}  {}…  {:<20} {:>8}/min  {}",
                    r.id,
                    r.prefix,
                    r.name,
                    r.rate_per_minute,
                    if r.revoked { "revoked" } else { "active" }
                );
            }
        }
        KeysCommand::Revoke { id, db } => {
            if !open(db)?.revoke(id)? {
                bail!("no key with id {id}");
            }
            eprintln!("revoked key {id}");
        }
    }
    Ok(())
}
