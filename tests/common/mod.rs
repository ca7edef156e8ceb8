//! Helpers shared by the process-level tests: models, prompts, and child processes that die
//! with the test.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use specswarm_engine::chat::{ChatMessage, ChatTemplate};
use specswarm_engine::hub;
use specswarm_engine::tokenizer::Tokenizer;

include!("../../fixtures/prompts/ten.rs");

/// A known model, pulled and verified on first use.
pub fn model_path(name: &str) -> PathBuf {
    hub::ensure(hub::known(name).unwrap(), &mut |m| eprintln!("{m}")).unwrap()
}

/// `prompt` as a user turn through the model's chat template, or raw text when it has none.
pub fn encode(path: &Path, tok: &Tokenizer, prompt: &str) -> Vec<u32> {
    match ChatTemplate::from_gguf(path).unwrap() {
        Some(t) => {
            let text = t.render(&[ChatMessage { role: "user".into(), content: prompt.into() }], true).unwrap();
            tok.encode(&text, false, true).unwrap()
        }
        None => tok.encode(prompt, true, false).unwrap(),
    }
}

/// Child processes, killed when dropped.
pub struct Procs(pub Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Start `cmd` with `--exit-on-stdin-eof` (it dies with the test even if the test is killed);
/// returns once it prints its first line (which names the address it listens on), with that
/// line. Its stderr is shown when `SPECSWARM_TEST_WORKER_LOGS` is set.
pub fn start(mut cmd: Command) -> (Child, String) {
    let mut child = cmd
        .arg("--exit-on-stdin-eof")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(if std::env::var_os("SPECSWARM_TEST_WORKER_LOGS").is_some() { Stdio::inherit() } else { Stdio::null() })
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    (child, line.trim().to_string())
}

/// The address in a first line of the form `<what> <address> …`.
pub fn second_word(line: &str) -> &str {
    line.split_whitespace().nth(1).unwrap_or_else(|| panic!("no address in {line:?}"))
}

/// Start `specswarm worker` on a free loopback port serving `layers` of `path`, with `extra`
/// arguments; returns once it listens.
pub fn spawn_worker(path: &Path, layers: (usize, usize), extra: &[&str]) -> (Child, SocketAddr) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_specswarm"));
    cmd.args(["worker", "--model"]).arg(path).args(["--layers", &format!("{}:{}", layers.0, layers.1)]).args(extra);
    let (child, line) = start(cmd);
    (child, second_word(&line).parse().unwrap())
}

/// xorshift64: a tiny seeded generator for test choices.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
