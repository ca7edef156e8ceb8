//! The swarm benchmark command runs end to end and reports what the issue asks for: one entry
//! per mode with tokens/s, acceptance, tokens per round, traversal time and the ceiling, and the
//! concurrent-stream aggregates. (Numbers are measured, not asserted: only their presence and
//! sanity are checked here.)

use std::process::Command;

#[test]
fn bench_swarm_json_has_every_mode_and_field() {
    let out = Command::new(env!("CARGO_BIN_EXE_specswarm"))
        .args(["bench", "swarm", "--stages", "2", "--latency-ms", "5", "--prompts", "copy", "--max-tokens", "8"])
        .args(["--draft", "suffix", "--streams", "1,2", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for mode in ["plain", "chain", "tree", "pipelined", "pipelined-tree"] {
        let m = &r["modes"][mode];
        for field in ["tokens_per_s", "acceptance_rate", "tokens_per_round", "traversal_ms"] {
            let v = m[field].as_f64().unwrap_or_else(|| panic!("{mode}.{field} missing in {m}"));
            assert!(v.is_finite() && v >= 0.0, "{mode}.{field} = {v}");
        }
        assert!(m["tokens_per_s"].as_f64().unwrap() > 0.0, "{mode}: no tokens");
        assert!(m["tokens_per_round"].as_f64().unwrap() >= 1.0, "{mode}: a round emits at least one token");
        // A round crosses three 5 ms hops (client → stage 1 → stage 2 → client).
        assert!(m["traversal_ms"].as_f64().unwrap() >= 14.0, "{mode}: T below the emulated delay");
        assert!(m.get("ceiling_tokens_per_s").is_some(), "{mode}: no ceiling");
    }
    assert_eq!(r["modes"]["plain"]["acceptance_rate"].as_f64(), Some(0.0), "plain decoding drafts nothing");
    for k in ["1", "2"] {
        assert!(r["streams"][k]["tokens_per_s"].as_f64().unwrap() > 0.0, "{k} streams: {}", r["streams"]);
    }
}
