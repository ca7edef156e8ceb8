//! Helpers shared by the process-level tests: worker processes that die with the test.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

/// Worker processes, killed when dropped.
pub struct Workers(pub Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Start `specswarm worker` on a free loopback port serving `layers` of `path`, with `extra`
/// arguments; returns once it listens.
pub fn spawn_worker(path: &std::path::Path, layers: (usize, usize), extra: &[&str]) -> (Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_specswarm"))
        .args(["worker", "--model"])
        .arg(path)
        .args(["--layers", &format!("{}:{}", layers.0, layers.1), "--exit-on-stdin-eof"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(if std::env::var_os("SPECSWARM_TEST_WORKER_LOGS").is_some() { Stdio::inherit() } else { Stdio::null() })
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.split_whitespace().nth(1).unwrap_or_else(|| panic!("worker said {line:?}")).parse().unwrap();
    (child, addr)
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
