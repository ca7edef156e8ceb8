//! The `specswarm` command: models, generation, benchmarks and the demo.

mod bench;
mod bench_swarm;
mod cli;
mod gateway;
mod p2p;
mod prompts;
mod speculate;
mod swarm;

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use specswarm_engine::chat::{ChatMessage, ChatTemplate};
use specswarm_engine::generate::{FinishReason, generate};
use specswarm_engine::hub;
use specswarm_engine::model::{LoadOptions, ModelSlice};
use specswarm_engine::sampling::Sampler;
use specswarm_engine::tokenizer::{StreamDecoder, Tokenizer};

use crate::cli::{Cli, Command, GenerateArgs, ModelCommand};

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Model { command } => match command {
            ModelCommand::Pull { name, force } => {
                let k = hub::known(&name).with_context(|| {
                    format!(
                        "unknown model {name:?}; known: {}",
                        hub::KNOWN_MODELS.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
                    )
                })?;
                let cached = hub::cached_path(k);
                let valid = !force && cached.is_file() && hub::sha256_file(&cached).is_ok_and(|h| h == k.sha256);
                let path = if valid {
                    eprintln!("{} is cached and its sha256 matches", k.name);
                    cached
                } else {
                    hub::pull(k, &mut |m| eprintln!("{m}"))?
                };
                println!("{}", path.display());
                Ok(())
            }
            ModelCommand::List => {
                println!("cache: {}", hub::home().display());
                for k in hub::KNOWN_MODELS {
                    let p = hub::cached_path(k);
                    let state = if p.is_file() { format!("cached at {}", p.display()) } else { "not pulled".into() };
                    println!("{:<14} {:<70} {state}", k.name, k.description);
                }
                Ok(())
            }
        },
        Command::Generate(args) => cmd_generate(&args),
        Command::Bench { command } => bench::run(command),
        Command::Demo { max_tokens, workers, tcp } => swarm::demo(max_tokens, workers, tcp),
        Command::Worker(args) if args.listen.iter().any(|a| a.starts_with('/')) => p2p::worker(&args),
        Command::Worker(args) => swarm::worker(&args),
        Command::Bootstrap(args) => p2p::bootstrap(&args),
        Command::Swarm { command } => p2p::swarm(&command),
        Command::Wan { command } => swarm::wan(&command),
        Command::Gateway(args) => gateway::run(&args),
        Command::Keys { command } => gateway::keys(command),
    }
}

/// Resolve `--model` (a name pulled on first use, or a path), printing download progress.
pub(crate) fn resolve_model(spec: &str) -> Result<PathBuf> {
    Ok(hub::resolve(spec, &mut |m| eprintln!("{m}"))?)
}

pub(crate) fn load_model(path: &std::path::Path, threads: usize) -> Result<ModelSlice> {
    ModelSlice::load(path, &LoadOptions { layers: None, threads, ..Default::default() })
        .with_context(|| format!("loading {}", path.display()))
}

/// Turn a prompt into ids: raw text, or one user turn through the model's chat template.
pub(crate) fn encode_prompt(path: &std::path::Path, tok: &Tokenizer, prompt: &str, chat: bool) -> Result<Vec<u32>> {
    if !chat {
        return Ok(tok.encode(prompt, true, false)?);
    }
    let arch = specswarm_engine::gguf::GgufFile::open(path)?.get_str("general.architecture").unwrap_or("").to_string();
    let template = match ChatTemplate::from_gguf(path)? {
        Some(t) => t,
        None => ChatTemplate::fallback_for(&arch)?,
    };
    let text = template.render(&[ChatMessage { role: "user".into(), content: prompt.into() }], true)?;
    let mut ids = tok.encode(&text, false, true)?;
    if let Some(bos) = tok.bos_id().filter(|&b| tok.add_bos() && ids.first() != Some(&b)) {
        ids.insert(0, bos);
    }
    Ok(ids)
}

fn cmd_generate(args: &GenerateArgs) -> Result<()> {
    if args.swarm {
        return p2p::generate(args);
    }
    let path = resolve_model(&args.model)?;
    let t_load = Instant::now();
    let model = load_model(&path, args.threads)?;
    let tok = Tokenizer::from_gguf(&path)?;
    let load_s = t_load.elapsed().as_secs_f64();
    let prompt = encode_prompt(&path, &tok, &args.prompt, args.chat)?;
    let mut sampler = Sampler::new(args.sampler_config()).context("invalid sampler settings")?;
    let mut decoder = StreamDecoder::new(&tok, true);
    let mut stdout = std::io::stdout().lock();
    let stream = !args.json;
    let mut emit = |id: u32| {
        if stream {
            let piece = decoder.push(id);
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        }
        true
    };
    let mut spec_report = None;
    let (ids, finish, stats) = match &args.draft {
        None => generate(&model, &prompt, args.max_tokens, &mut sampler, tok.stop_ids(), &mut emit)?,
        Some(name) => {
            let mut drafter = speculate::drafter(name, &path, args.threads)?;
            let mut policy = speculate::policy(args)?;
            let (ids, finish, s) = specswarm_spec::decode::generate_speculative(
                &model,
                drafter.as_mut(),
                &mut policy,
                &prompt,
                args.max_tokens,
                &mut sampler,
                tok.stop_ids(),
                &mut emit,
            )?;
            let plain = specswarm_engine::generate::GenerateStats {
                prompt_tokens: s.prompt_tokens,
                generated_tokens: s.generated_tokens,
                prefill: s.prefill,
                decode: s.decode,
            };
            spec_report = Some((drafter.name(), s));
            (ids, finish, plain)
        }
    };
    let text = tok.decode(&ids, true);
    let finish = match finish {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "cancelled",
    };
    if args.json {
        let out = serde_json::json!({
            "model": args.model,
            "text": text,
            "token_ids": ids,
            "prompt_tokens": stats.prompt_tokens,
            "generated_tokens": stats.generated_tokens,
            "finish_reason": finish,
            "prefill_tokens_per_s": stats.prefill_tokens_per_s(),
            "decode_tokens_per_s": stats.decode_tokens_per_s(),
            "load_s": load_s,
            "threads": model.threads(),
        });
        let mut out = out;
        if let Some((name, s)) = &spec_report {
            out["drafter"] = name.clone().into();
            out["acceptance_rate"] = s.acceptance_rate().into();
            out["tokens_per_round"] = s.tokens_per_round().into();
            out["rounds"] = s.rounds.into();
            out["drafted_nodes"] = s.drafted_nodes.into();
            out["accepted_tokens"] = s.accepted_tokens.into();
            out["draft_s"] = s.draft.as_secs_f64().into();
            out["verify_s"] = s.verify.as_secs_f64().into();
            // Whole-generation rate (speculation has no separate "first token" step).
            out["decode_tokens_per_s"] = s.decode_tokens_per_s().into();
        }
        println!("{out}");
    } else {
        let tail = decoder.finish();
        let _ = writeln!(stdout, "{tail}");
        if let Some((name, s)) = &spec_report {
            eprintln!(
                "[speculative {name}: {} rounds, {:.2} tokens/round, acceptance {:.2}, draft {:.2}s, verify {:.2}s]",
                s.rounds,
                s.tokens_per_round(),
                s.acceptance_rate(),
                s.draft.as_secs_f64(),
                s.verify.as_secs_f64()
            );
        }
        eprintln!(
            "[{} prompt tokens, prefill {:.1} tok/s | {} generated, decode {:.1} tok/s | finish: {finish} | {} threads]",
            stats.prompt_tokens,
            stats.prefill_tokens_per_s(),
            stats.generated_tokens,
            stats.decode_tokens_per_s(),
            model.threads()
        );
    }
    Ok(())
}
