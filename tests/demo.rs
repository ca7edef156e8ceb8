//! The README's main command, `specswarm demo`, end to end: a libp2p swarm of worker processes
//! found through the DHT, generation checked against one process, then the gateway in front of
//! the same workers answering over HTTP.

use std::process::Command;

#[test]
fn the_demo_runs_the_swarm_and_the_gateway() {
    let out = Command::new(env!("CARGO_BIN_EXE_specswarm"))
        .args(["demo", "--max-tokens", "24"])
        .output()
        .expect("running specswarm demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.matches("identical to one process: yes").count(), 3, "{stdout}");
    assert!(stdout.contains("gateway found a complete ring"), "{stdout}");
    assert!(stdout.contains("[first: ") && stdout.contains("[again: "), "{stdout}");
    assert!(stdout.contains("workers and gateway stopped."), "{stdout}");
}
