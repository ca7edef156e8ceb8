//! The in-process WAN emulator: every frame a process sends waits a fixed one-way delay first.
//!
//! Set once per process ([`set_send_delay`]; `specswarm worker --delay-ms`, and the benchmark
//! client). A [`Sender`] then writes through a thread that holds each frame until its due time;
//! the delay is constant, so frames keep their order and several in flight overlap (a pipe with
//! latency, not a slower link). Used where network namespaces (`net::wan`, root) are not
//! available; benchmarks say which emulator they used.

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

static SEND_DELAY_US: AtomicU64 = AtomicU64::new(0);

/// Delay every frame this process sends from now on by `delay` (one way).
pub fn set_send_delay(delay: Duration) {
    SEND_DELAY_US.store(delay.as_micros() as u64, Ordering::Relaxed);
}

pub fn send_delay() -> Duration {
    Duration::from_micros(SEND_DELAY_US.load(Ordering::Relaxed))
}

/// The write side of a connection, delayed or not.
pub enum Sender {
    Direct(Mutex<TcpStream>),
    Delayed(Mutex<mpsc::Sender<(Instant, Vec<u8>)>>),
}

impl Sender {
    /// Wrap `stream`, with the process's send delay if one is set.
    pub fn new(stream: TcpStream) -> Sender {
        let delay = send_delay();
        if delay.is_zero() {
            return Sender::Direct(Mutex::new(stream));
        }
        let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
        let mut stream = stream;
        std::thread::Builder::new()
            .name("delayed-send".into())
            .spawn(move || {
                while let Ok((due, bytes)) = rx.recv() {
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                    if stream.write_all(&bytes).is_err() {
                        return;
                    }
                }
            })
            .expect("spawn the delayed sender");
        Sender::Delayed(Mutex::new(tx))
    }

    /// Send `bytes` (after the delay); an error once the connection has failed.
    pub fn send(&self, bytes: Vec<u8>) -> std::io::Result<()> {
        match self {
            Sender::Direct(s) => s.lock().unwrap_or_else(|e| e.into_inner()).write_all(&bytes),
            Sender::Delayed(tx) => tx
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .send((Instant::now() + send_delay(), bytes))
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "connection closed")),
        }
    }
}
