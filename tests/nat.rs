//! A worker behind NAT serves the middle of a ring through a relay circuit.
//!
//! Three network namespaces: `sswn-pub` (the "internet": bootstrap/relay node, the head and tail
//! workers, the client) — `sswn-nat` (a router that masquerades outgoing traffic and drops
//! incoming connections) — `sswn-priv` (the middle worker; no inbound port, and the public side
//! has no route to its addresses). The middle worker listens through the relay
//! (`--relay`), publishes its relayed address in the DHT, and the client in `sswn-pub` generates
//! through head → middle (via the relay or a hole-punched connection) → tail with output
//! token-identical to one process. Needs root, `ip` and `iptables`; skipped otherwise.

mod common;

use std::process::{Command, Stdio};

use common::{Procs, model_path};
use specswarm_engine::generate::generate;
use specswarm_engine::model::{LoadOptions, ModelSlice};
use specswarm_engine::sampling::Sampler;
use specswarm_engine::tokenizer::Tokenizer;

const NS: [&str; 3] = ["sswn-pub", "sswn-nat", "sswn-priv"];

fn sh(cmd: &str) -> bool {
    Command::new("sh").args(["-c", cmd]).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

fn must(cmd: &str) {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The three namespaces; deleted when dropped.
struct Net;

impl Net {
    fn up() -> Option<Net> {
        for ns in NS {
            let _ = sh(&format!("ip netns del {ns}"));
        }
        if !sh("ip netns add sswn-probe && ip netns del sswn-probe") || !sh("command -v iptables") {
            return None;
        }
        let net = Net;
        for ns in NS {
            must(&format!("ip netns add {ns} && ip -n {ns} link set lo up"));
        }
        must("ip link add ssw-pubnat netns sswn-pub type veth peer name ssw-natpub netns sswn-nat");
        must("ip link add ssw-natpriv netns sswn-nat type veth peer name ssw-privnat netns sswn-priv");
        must("ip -n sswn-pub addr add 10.78.0.1/24 dev ssw-pubnat && ip -n sswn-pub link set ssw-pubnat up");
        must("ip -n sswn-nat addr add 10.78.0.2/24 dev ssw-natpub && ip -n sswn-nat link set ssw-natpub up");
        must("ip -n sswn-nat addr add 192.168.78.1/24 dev ssw-natpriv && ip -n sswn-nat link set ssw-natpriv up");
        must("ip -n sswn-priv addr add 192.168.78.2/24 dev ssw-privnat && ip -n sswn-priv link set ssw-privnat up");
        must("ip -n sswn-priv route add default via 192.168.78.1");
        must("ip netns exec sswn-nat sysctl -qw net.ipv4.ip_forward=1");
        // Masquerade outgoing; inbound only for connections the private side started.
        must("ip netns exec sswn-nat iptables -t nat -A POSTROUTING -o ssw-natpub -j MASQUERADE");
        must(
            "ip netns exec sswn-nat iptables -A FORWARD -i ssw-natpub -o ssw-natpriv -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        );
        must("ip netns exec sswn-nat iptables -A FORWARD -i ssw-natpub -o ssw-natpriv -j DROP");
        Some(net)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in NS {
            let _ = sh(&format!("ip netns del {ns}"));
        }
    }
}

/// Start `specswarm ARGS` inside namespace `ns`; the address it listens on.
fn start(procs: &mut Procs, ns: &str, home: &std::path::Path, args: &[&str]) -> String {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_specswarm")]).args(args).env("SPECSWARM_HOME", home);
    let (child, line) = common::start(cmd);
    procs.0.push(child);
    common::second_word(&line).to_string()
}

#[test]
fn worker_behind_nat_serves_a_ring_through_the_relay() {
    let Some(_net) = Net::up() else {
        eprintln!("cannot create network namespaces or no iptables here (not root?): skipped");
        return;
    };
    let path = model_path("smollm2-135m");
    let model = path.to_str().unwrap();
    let home = std::env::temp_dir().join(format!("specswarm-nat-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir_all(&home).unwrap();
    let mut procs = Procs(Vec::new());
    let bs = start(&mut procs, "sswn-pub", &home, &["bootstrap", "--listen", "/ip4/10.78.0.1/tcp/4001"]);
    assert!(bs.contains("/p2p/"), "{bs}");
    let public = ["--listen", "/ip4/10.78.0.1/tcp/0", "--bootstrap", &bs];
    let _head = start(
        &mut procs,
        "sswn-pub",
        &home,
        &[&["worker", "--model", model, "--layers", "0:10"][..], &public].concat(),
    );
    let _tail = start(
        &mut procs,
        "sswn-pub",
        &home,
        &[&["worker", "--model", model, "--layers", "20:30"][..], &public].concat(),
    );
    let middle = start(
        &mut procs,
        "sswn-priv",
        &home,
        &[
            "worker",
            "--model",
            model,
            "--layers",
            "10:20",
            "--listen",
            "/ip4/0.0.0.0/tcp/0",
            "--bootstrap",
            &bs,
            "--relay",
            &bs,
        ],
    );
    eprintln!("the middle worker behind NAT is reachable at {middle}");
    assert!(middle.contains("/p2p-circuit/"), "the NATed worker advertises a relayed address: {middle}");
    // The private side really is unreachable from the public side.
    assert!(!sh("ip netns exec sswn-pub ip route get 192.168.78.2"), "the public side has a route to the private one");

    let tok = Tokenizer::from_gguf(&path).unwrap();
    let prompt = "The history of the printing press begins";
    let ids = tok.encode(prompt, true, false).unwrap();
    let local = ModelSlice::load(&path, &LoadOptions { threads: 1, ..Default::default() }).unwrap();
    let mut s = Sampler::new(Default::default()).unwrap();
    let (want, _, _) = generate(&local, &ids, 16, &mut s, &[], &mut |_| true).unwrap();
    let out = Command::new("ip")
        .args(["netns", "exec", "sswn-pub", env!("CARGO_BIN_EXE_specswarm")])
        .args(["generate", "--swarm", "--bootstrap", &bs, "--model", model, "--prompt", prompt])
        .args(["--max-tokens", "16", "--json"])
        .env("SPECSWARM_HOME", &home)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    eprintln!("ring: {}", v["ring"]);
    let got: Vec<u32> = v["token_ids"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
    // The stop rule of generate --swarm cuts at an end-of-text token; compare the common prefix.
    assert!(!got.is_empty() && want.starts_with(&got), "through NAT {got:?} vs one process {want:?}");
    let ring: Vec<String> = v["ring"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect();
    assert_eq!(ring.len(), 3, "{ring:?}");
    assert!(ring[1].starts_with("10:20"), "{ring:?}");
    let _ = std::fs::remove_dir_all(&home);
}
