//! Choosing a ring from discovered workers: a pure function of the records and measured RTTs.
//!
//! Cost model (predicted time of one decode step through a ring, milliseconds):
//!
//! ```text
//! T(ring) = Σ_stages ( RTT_i / 2  +  1000 / throughput_i )  +  RTT_tail / 2
//! ```
//!
//! `RTT_i` is the client's ping RTT to stage i, standing in for the one-way hop into stage i
//! (RTT_i / 2: the client cannot measure worker-to-worker links, and on a WAN both ends of a hop
//! are far from each other about as much as from the client); the tail's answer travels back to
//! the client once more (`RTT_tail / 2`). `throughput_i` is the worker's advertised decode speed of
//! its whole slice (tokens/s, measured at start-up), so `1000 / throughput_i` is its compute per
//! token = per-layer compute × layers. A worker with no RTT sample costs [`RTT_UNKNOWN_MS`]; one
//! without a throughput costs [`COMPUTE_UNKNOWN_MS`]. Workers already in the ring get a discount
//! ([`STICKY_FACTOR`]) so placement stays put unless another choice is clearly better.
//!
//! Stages serve whole advertised slices; a ring is a chain of slices whose ranges tile [0, L)
//! exactly. The minimum over all chains is a shortest path over layer boundaries (dynamic
//! programming, O(boundaries × workers)).

use std::collections::HashSet;
use std::time::Duration;

use libp2p::PeerId;

use crate::record::WorkerRecord;

/// Cost of a hop into a worker whose RTT is unknown (ms, one way).
pub const RTT_UNKNOWN_MS: f64 = 250.0;
/// Compute cost of a worker that advertises no throughput (ms per token).
pub const COMPUTE_UNKNOWN_MS: f64 = 1000.0;
/// Cost multiplier of workers already in use.
pub const STICKY_FACTOR: f64 = 0.9;

/// A discovered worker.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub peer: PeerId,
    pub record: WorkerRecord,
    pub rtt: Option<Duration>,
}

impl Candidate {
    fn one_way_ms(&self) -> f64 {
        self.rtt.map_or(RTT_UNKNOWN_MS, |d| d.as_secs_f64() * 1000.0 / 2.0)
    }

    fn compute_ms(&self) -> f64 {
        if self.record.throughput_tps > 0.0 { 1000.0 / self.record.throughput_tps } else { COMPUTE_UNKNOWN_MS }
    }

    /// This worker's share of T as a stage (without the return hop).
    pub fn stage_cost_ms(&self) -> f64 {
        self.one_way_ms() + self.compute_ms()
    }
}

/// A chosen ring: candidate indices in layer order and the predicted step time.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub stages: Vec<usize>,
    pub predicted_ms: f64,
}

/// The cheapest ring covering [0, `n_layers`) from `cands`, skipping `exclude`, preferring
/// `sticky`, using only workers with at least `kv_tokens` free.
pub fn choose_ring(
    cands: &[Candidate],
    n_layers: u32,
    kv_tokens: u64,
    exclude: &HashSet<PeerId>,
    sticky: &HashSet<PeerId>,
) -> Option<Plan> {
    let l = n_layers as usize;
    // best[b]: cheapest chain covering [0, b), with the candidate that ends it.
    let mut best: Vec<Option<(f64, usize)>> = vec![None; l + 1];
    let usable = |c: &Candidate| {
        c.record.n_layers == n_layers
            && (c.record.end as usize) <= l
            && c.record.start < c.record.end
            && c.record.free_kv_tokens >= kv_tokens
            && !exclude.contains(&c.peer)
    };
    for b in 0..l {
        let base = if b == 0 {
            0.0
        } else {
            match best[b] {
                Some((cost, _)) => cost,
                None => continue,
            }
        };
        for (i, c) in cands.iter().enumerate() {
            if c.record.start as usize != b || !usable(c) {
                continue;
            }
            let factor = if sticky.contains(&c.peer) { STICKY_FACTOR } else { 1.0 };
            let cost = base + factor * c.stage_cost_ms();
            let e = c.record.end as usize;
            let better = match best[e] {
                None => true,
                Some((old, _)) => cost < old,
            };
            if better {
                best[e] = Some((cost, i));
            }
        }
    }
    let (_, mut last) = best[l]?;
    let mut stages = vec![last];
    while cands[last].record.start > 0 {
        last = best[cands[last].record.start as usize].expect("a chain reaches every boundary it ends at").1;
        stages.push(last);
    }
    stages.reverse();
    let tail = *stages.last().expect("non-empty");
    let predicted_ms = stages.iter().map(|&i| cands[i].stage_cost_ms()).sum::<f64>() + cands[tail].one_way_ms();
    Some(Plan { stages, predicted_ms })
}

/// Layer ranges of [0, `n_layers`) that no candidate serves.
pub fn coverage_gaps(cands: &[Candidate], n_layers: u32) -> Vec<(u32, u32)> {
    let mut covered = vec![false; n_layers as usize];
    for c in cands {
        for l in c.record.start..c.record.end.min(n_layers) {
            covered[l as usize] = true;
        }
    }
    let mut gaps = Vec::new();
    let mut l = 0;
    while l < n_layers {
        if covered[l as usize] {
            l += 1;
            continue;
        }
        let s = l;
        while l < n_layers && !covered[l as usize] {
            l += 1;
        }
        gaps.push((s, l));
    }
    gaps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(start: u32, end: u32, rtt_ms: u64, tps: f64) -> Candidate {
        Candidate {
            peer: PeerId::random(),
            record: WorkerRecord {
                model_id: String::new(),
                start,
                end,
                n_layers: 30,
                free_kv_tokens: 1000,
                throughput_tps: tps,
                addrs: vec![],
                published_unix_ms: 0,
                expires_unix_ms: 0,
            },
            rtt: Some(Duration::from_millis(rtt_ms)),
        }
    }

    #[test]
    fn picks_the_cheapest_tiling() {
        let c = vec![
            cand(0, 10, 10, 100.0),  // 5 + 10
            cand(10, 30, 10, 50.0),  // 5 + 20
            cand(0, 30, 200, 100.0), // 100 + 10, + 100 back
            cand(10, 20, 2, 100.0),
            cand(20, 30, 2, 100.0),
            cand(5, 30, 1, 1000.0), // does not chain with anything from 0
        ];
        let none = HashSet::new();
        let p = choose_ring(&c, 30, 10, &none, &none).unwrap();
        assert_eq!(p.stages, vec![0, 3, 4]);
        assert!((p.predicted_ms - (15.0 + 11.0 + 11.0 + 1.0)).abs() < 1e-9, "{p:?}");
        let ex: HashSet<PeerId> = [c[3].peer].into();
        assert_eq!(choose_ring(&c, 30, 10, &ex, &none).unwrap().stages, vec![0, 1]);
        // Not enough KV anywhere: no ring.
        assert!(choose_ring(&c, 30, 5000, &none, &none).is_none());
        assert_eq!(coverage_gaps(&c[1..2], 30), vec![(0, 10)]);
        assert_eq!(coverage_gaps(&c, 30), vec![]);
    }
}
