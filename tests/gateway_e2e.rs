//! A real `specswarm gateway` process serving the real SmolLM2-135M, driven by the official
//! `openai` and `anthropic` Python SDKs, by headless Chromium (the web chat and the dashboard),
//! and by raw sockets (a client that disconnects mid-stream, the keys CLI).
//!
//! The tools come from `scripts/test.sh`: a Python venv with both SDKs at `target/pyenv`
//! (override: `SPECSWARM_TEST_PYTHON`), `playwright-core` under `target/node` (override:
//! `SPECSWARM_TEST_PLAYWRIGHT`), and Debian's `chromium` (override: `SPECSWARM_TEST_CHROMIUM`).
//! A missing tool fails the test with the command that installs it. Screenshots go to
//! `target/test-artifacts/`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MODEL: &str = "smollm2-135m";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tool(env: &str, default: PathBuf) -> PathBuf {
    let p = std::env::var_os(env).map_or(default, PathBuf::from);
    assert!(
        p.exists(),
        "{} is missing: run `bash scripts/test.sh` (it installs the test tools) or set {env}",
        p.display()
    );
    p
}

struct Gateway {
    child: Child,
    addr: SocketAddr,
    key: String,
    dir: PathBuf,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_specswarm"))
}

/// Start a gateway with a fresh key database and one key.
fn start(tag: &str, extra: &[&str]) -> Gateway {
    let dir = std::env::temp_dir().join(format!("specswarm-e2e-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("keys.sqlite3");
    let out =
        bin().args(["keys", "create", "--name", tag, "--rate-per-minute", "100000", "--db"]).arg(&db).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(key.starts_with("sk-"), "{key}");
    let mut child = bin()
        .args([
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--model",
            MODEL,
            "--threads",
            "2",
            "--exit-on-stdin-eof",
            "--keys-db",
        ])
        .arg(&db)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("gateway listening on http://")
        .unwrap_or_else(|| panic!("gateway said {line:?}"))
        .parse()
        .unwrap();
    Gateway { child, addr, key, dir }
}

/// One HTTP/1.1 request with `Connection: close`; returns (status, body).
fn http(addr: SocketAddr, method: &str, path: &str, key: Option<&str>, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let status = raw.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = raw.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_string());
    (status, body)
}

fn swarm_state(addr: SocketAddr) -> serde_json::Value {
    let (s, b) = http(addr, "GET", "/v1/swarm", None, "");
    assert_eq!(s, 200, "{b}");
    serde_json::from_str(&b).unwrap()
}

fn run_checked(cmd: &mut Command, what: &str, closing: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(out.status.success(), "{what} failed:\n{text}");
    assert!(text.contains(closing), "{what} did not report {closing:?}:\n{text}");
    text
}

#[test]
fn official_sdks_against_a_real_gateway() {
    let python = tool("SPECSWARM_TEST_PYTHON", root().join("target/pyenv/bin/python"));
    let g = start("sdk", &[]);
    let t0 = Instant::now();
    run_checked(
        Command::new(python)
            .arg(root().join("tests/sdk/sdk_check.py"))
            .arg(format!("http://{}", g.addr))
            .arg(&g.key)
            .arg(MODEL),
        "the SDK checks",
        "sdk: 12 passed, 0 failed",
    );
    println!("SDK checks took {:.1} s", t0.elapsed().as_secs_f64());
    assert_eq!(swarm_state(g.addr)["active_sessions"], 0);
}

#[test]
fn browser_chat_and_dashboard() {
    let playwright = tool("SPECSWARM_TEST_PLAYWRIGHT", root().join("target/node/node_modules/playwright-core"));
    let chromium = tool("SPECSWARM_TEST_CHROMIUM", PathBuf::from("/usr/bin/chromium"));
    let artifacts = root().join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    for f in ["chat.png", "chat-two-turns.png", "swarm.png"] {
        let _ = std::fs::remove_file(artifacts.join(f));
    }
    // With a drafter, so the page has an acceptance rate to show (the text is the same: lossless).
    let g = start("browser", &["--draft", "ngram"]);
    run_checked(
        Command::new("node")
            .arg(root().join("tests/browser/ui_check.cjs"))
            .arg(format!("http://{}", g.addr))
            .arg(&g.key)
            .arg(MODEL)
            .arg(&artifacts)
            .env("PLAYWRIGHT_CORE", &playwright)
            .env("CHROMIUM", &chromium),
        "the browser checks",
        "browser: 3 passed, 0 failed",
    );
    for f in ["chat.png", "chat-two-turns.png", "swarm.png"] {
        let p: &Path = &artifacts.join(f);
        let len = std::fs::metadata(p).map_or(0, |m| m.len());
        assert!(len > 5_000, "screenshot {} missing or empty", p.display());
        println!("screenshot: {} ({len} bytes)", p.display());
    }
}

/// A socket that reads part of a long stream and closes: the server cancels the generation and
/// the session count returns to zero; the key CLI never shows a key again.
#[test]
fn real_socket_disconnect_and_keys_cli() {
    let g = start("disconnect", &[]);
    let body =
        serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": "Tell me a very long story."}],
                                  "max_tokens": 4000, "temperature": 0, "stream": true})
        .to_string();
    for round in 0..3 {
        let mut s = TcpStream::connect(g.addr).unwrap();
        write!(
            s,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            g.key,
            body.len()
        )
        .unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut datas = 0;
        let mut line = String::new();
        while datas < 5 {
            line.clear();
            assert!(r.read_line(&mut line).unwrap() > 0, "stream ended early");
            if line.starts_with("data: ") || line.contains("data: ") {
                datas += 1;
            }
        }
        assert_eq!(swarm_state(g.addr)["active_sessions"], 1, "round {round}");
        drop(r);
        s.shutdown(std::net::Shutdown::Both).unwrap();
        drop(s);
        let t0 = Instant::now();
        loop {
            if swarm_state(g.addr)["active_sessions"] == 0 {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "the session outlived its client");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let (s, m) = http(g.addr, "GET", "/metrics", None, "");
    assert_eq!(s, 200);
    let cancelled: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("specswarm_cancelled_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(cancelled >= 3.0, "{m}");
    // Status codes over a real socket.
    assert_eq!(http(g.addr, "GET", "/v1/models", None, "").0, 401);
    assert_eq!(http(g.addr, "GET", "/v1/models", Some(&g.key), "").0, 200);
    assert_eq!(http(g.addr, "POST", "/v1/chat/completions", Some(&g.key), "{not json").0, 400);
    assert_eq!(http(g.addr, "GET", "/health", None, "").0, 200);
    assert_eq!(http(g.addr, "GET", "/ready", None, "").0, 200);
    // `keys list` shows the prefix, never the key.
    let out = bin().args(["keys", "list", "--db"]).arg(g.dir.join("keys.sqlite3")).output().unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains(&g.key[..7]) && !listing.contains(&g.key), "{listing}");
}
