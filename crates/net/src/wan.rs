//! WAN emulation in user space (this kernel has no `netem`): hosts in network namespaces joined
//! through TUN devices to a router process that delays, jitters, drops and rate-limits packets.
//!
//! [`WanRouter::start`] creates namespaces `ssw{i}` (i = 1..=n), one TUN device per namespace
//! with address `10.77.0.{i}/24`, and a thread per device that reads IPv4 packets and schedules
//! them to the destination's device after the link's one-way delay (plus jitter and the
//! serialization delay of the link's rate). Dropping the router deletes the namespaces.
//!
//! Needs root (network namespaces, TUN). `specswarm wan router` runs it as a process;
//! `specswarm wan echo` / `specswarm wan ping` measure RTT between namespaces over UDP.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Per-link impairments (applied to each direction).
#[derive(Clone, Copy, Debug)]
pub struct LinkSpec {
    pub one_way: Duration,
    /// Uniform jitter in ±`jitter`.
    pub jitter: Duration,
    /// Probability of dropping a packet.
    pub loss: f64,
    /// Bits per second (0: unlimited).
    pub rate_bps: u64,
}

/// Namespace name of host `i` (1-based).
pub fn netns_name(i: usize) -> String {
    format!("ssw{i}")
}

/// Address of host `i` (1-based).
pub fn host_addr(i: usize) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(10, 77, 0, i as u8)
}

/// Largest number of emulated hosts.
pub const HOSTS_MAX: usize = 200;
/// Largest packet the router forwards (bytes; TUN MTU is 1500).
const PACKET_BYTES_MAX: usize = 65_536;
/// Most packets queued in the router before new ones are dropped.
const QUEUE_PACKETS_MAX: usize = 100_000;

struct Queued {
    due: Instant,
    seq: u64,
    dst: usize,
    packet: Vec<u8>,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(o.due, o.seq))
    }
}

struct Shared {
    queue: Mutex<(BinaryHeap<Reverse<Queued>>, u64, Vec<Instant>)>,
    wake: Condvar,
    stop: AtomicBool,
}

/// A running emulated WAN. Dropping it stops the router and deletes the namespaces.
pub struct WanRouter {
    hosts: usize,
    shared: Arc<Shared>,
}

fn run(cmd: &[&str]) -> std::io::Result<()> {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "{}: {}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Open a TUN device named `name` (IFF_TUN | IFF_NO_PI) in the current network namespace.
fn open_tun(name: &str) -> std::io::Result<File> {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const IFF_TUN: libc::c_short = 0x0001;
    const IFF_NO_PI: libc::c_short = 0x1000;
    let file = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
    // struct ifreq: 16-byte name, then the flags (short) at offset 16; 40 bytes in all.
    let mut ifr = [0u8; 40];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    ifr[16..18].copy_from_slice(&(IFF_TUN | IFF_NO_PI).to_ne_bytes());
    // SAFETY: a valid fd and a 40-byte ifreq buffer, as TUNSETIFF expects.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

impl WanRouter {
    /// Create `hosts` namespaces joined by links with `spec` and start routing.
    pub fn start(hosts: usize, spec: LinkSpec, seed: u64) -> std::io::Result<WanRouter> {
        if hosts == 0 || hosts > HOSTS_MAX {
            return Err(std::io::Error::other(format!("hosts must be 1..={HOSTS_MAX}")));
        }
        let shared = Arc::new(Shared {
            queue: Mutex::new((BinaryHeap::new(), 0, vec![Instant::now(); hosts])),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let router = WanRouter { hosts, shared: Arc::clone(&shared) };
        let mut writers = Vec::new();
        for i in 1..=hosts {
            let ns = netns_name(i);
            let dev = format!("sswtun{i}");
            let _ = run(&["ip", "netns", "del", &ns]);
            run(&["ip", "netns", "add", &ns])?;
            let tun = open_tun(&dev)?;
            run(&["ip", "link", "set", &dev, "netns", &ns])?;
            run(&["ip", "-n", &ns, "addr", "add", &format!("{}/24", host_addr(i)), "dev", &dev])?;
            run(&["ip", "-n", &ns, "link", "set", &dev, "up"])?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            // SAFETY: dup of a valid descriptor we own; the File takes ownership of the copy.
            let writer = unsafe { File::from_raw_fd(libc::dup(tun.as_raw_fd())) };
            writers.push(writer);
            let shared = Arc::clone(&shared);
            let mut rng = seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            std::thread::Builder::new().name(format!("wan-rx-{i}")).spawn(move || {
                let mut tun = tun;
                let mut buf = vec![0u8; PACKET_BYTES_MAX];
                while let Ok(n) = tun.read(&mut buf) {
                    if shared.stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let p = &buf[..n];
                    // IPv4 only; destination 10.77.0.x.
                    if n < 20 || p[0] >> 4 != 4 || p[16..19] != [10, 77, 0] {
                        continue;
                    }
                    let dst = p[19] as usize;
                    if dst == 0 || dst > hosts {
                        continue;
                    }
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let u = (rng >> 11) as f64 / (1u64 << 53) as f64;
                    if u < spec.loss {
                        continue;
                    }
                    let u2 = (rng & 0xF_FFFF) as f64 / f64::from(0x10_0000);
                    let jitter = spec.jitter.as_secs_f64() * (2.0 * u2 - 1.0);
                    let now = Instant::now();
                    let mut q = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
                    if q.0.len() >= QUEUE_PACKETS_MAX {
                        continue;
                    }
                    // Serialization on the sender's link: packets leave one after another.
                    let tx = if spec.rate_bps > 0 {
                        Duration::from_secs_f64(n as f64 * 8.0 / spec.rate_bps as f64)
                    } else {
                        Duration::ZERO
                    };
                    let start = q.2[i - 1].max(now);
                    q.2[i - 1] = start + tx;
                    let due = start + tx + spec.one_way;
                    let due = if jitter >= 0.0 {
                        due + Duration::from_secs_f64(jitter)
                    } else {
                        due.checked_sub(Duration::from_secs_f64(-jitter)).unwrap_or(due)
                    };
                    q.1 += 1;
                    let seq = q.1;
                    q.0.push(Reverse(Queued { due, seq, dst, packet: p.to_vec() }));
                    drop(q);
                    shared.wake.notify_one();
                }
            })?;
        }
        let shared_tx = Arc::clone(&shared);
        std::thread::Builder::new().name("wan-tx".into()).spawn(move || {
            let mut writers = writers;
            let mut q = shared_tx.queue.lock().unwrap_or_else(|e| e.into_inner());
            while !shared_tx.stop.load(Ordering::Relaxed) {
                let now = Instant::now();
                match q.0.peek() {
                    Some(Reverse(head)) if head.due <= now => {
                        let Reverse(item) = q.0.pop().expect("peeked");
                        let _ = writers[item.dst - 1].write_all(&item.packet);
                    }
                    Some(Reverse(head)) => {
                        let wait = head.due - now;
                        q = shared_tx.wake.wait_timeout(q, wait).unwrap_or_else(|e| e.into_inner()).0;
                    }
                    None => {
                        q = shared_tx
                            .wake
                            .wait_timeout(q, Duration::from_millis(100))
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                }
            }
        })?;
        Ok(router)
    }

    pub fn hosts(&self) -> usize {
        self.hosts
    }
}

impl Drop for WanRouter {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.wake.notify_all();
        for i in 1..=self.hosts {
            let _ = run(&["ip", "netns", "del", &netns_name(i)]);
        }
    }
}

/// Answer UDP datagrams on `addr` by echoing them back, forever.
pub fn udp_echo(addr: &str) -> std::io::Result<()> {
    let sock = std::net::UdpSocket::bind(addr)?;
    let mut buf = [0u8; 2048];
    loop {
        let (n, from) = sock.recv_from(&mut buf)?;
        let _ = sock.send_to(&buf[..n], from);
    }
}

/// Send `count` UDP probes to `to`, return the measured round-trip times.
pub fn udp_ping(to: &str, count: usize, timeout: Duration) -> std::io::Result<Vec<Duration>> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
    sock.set_read_timeout(Some(timeout))?;
    let mut rtts = Vec::with_capacity(count);
    let mut buf = [0u8; 64];
    for i in 0..count as u64 {
        let t = Instant::now();
        sock.send_to(&i.to_le_bytes(), to)?;
        loop {
            match sock.recv(&mut buf) {
                Ok(8) if buf[..8] == i.to_le_bytes() => {
                    rtts.push(t.elapsed());
                    break;
                }
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(rtts)
}
