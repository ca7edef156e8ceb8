//! The user-space WAN emulator applies the configured delay: UDP round trips between two
//! network namespaces are within 10% of twice the one-way delay. Needs root; skipped otherwise.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_specswarm")
}

fn can_make_namespaces() -> bool {
    let ok = Command::new("ip").args(["netns", "add", "ssw-probe"]).status().is_ok_and(|s| s.success());
    if ok {
        let _ = Command::new("ip").args(["netns", "del", "ssw-probe"]).status();
    }
    ok
}

#[test]
fn emulated_rtt_is_twice_the_one_way_delay() {
    if !can_make_namespaces() {
        eprintln!("cannot create network namespaces here (not root?): skipped");
        return;
    }
    for delay_ms in [10.0f64, 25.0] {
        let mut router = Command::new(bin())
            .args(["wan", "router", "--hosts", "2", "--delay-ms", &delay_ms.to_string(), "--exit-on-stdin-eof"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(router.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert!(line.starts_with("ready"), "router said {line:?}");
        let mut echo = Command::new("ip")
            .args(["netns", "exec", "ssw1", bin(), "wan", "echo", "--listen", "10.77.0.1:9000"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        let out = Command::new("ip")
            .args(["netns", "exec", "ssw2", bin(), "wan", "ping", "--to", "10.77.0.1:9000", "--count", "20"])
            .output()
            .unwrap();
        let _ = echo.kill();
        let _ = echo.wait();
        drop(router.stdin.take()); // the router deletes its namespaces and exits
        let _ = router.wait();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {:?}", out));
        let median = v["median_ms"].as_f64().unwrap();
        assert!(v["received"].as_u64().unwrap() >= 18, "{v}");
        let want = 2.0 * delay_ms;
        eprintln!("one-way {delay_ms} ms: median RTT {median:.2} ms (want {want} ms ± 10%)");
        assert!((median - want).abs() <= 0.1 * want, "median RTT {median} ms vs {want} ms");
    }
    let left = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&left.stdout).contains("ssw1"), "namespaces are cleaned up");
}
