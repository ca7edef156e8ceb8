//! What a worker publishes in the DHT, and how a client checks it.
//!
//! Two kinds of DHT entries: the worker *provides* the key [`model_key`] (so clients find every
//! worker of a model with one provider lookup), and puts a [`WorkerRecord`] under
//! [`worker_key`]`(peer id)`. The record is signed with the worker's identity key and carries
//! the public key, so a client accepts it only if the signature holds and the key hashes to the
//! peer id the record was looked up for: a hostile node can withhold records but not forge them.
//! Records expire ([`WORKER_RECORD_TTL_SECS`]) and are republished while the worker runs.

use libp2p::PeerId;
use libp2p::identity::{Keypair, PublicKey};
use serde::{Deserialize, Serialize};
use specswarm_proto::limits::{
    WORKER_RECORD_ADDR_BYTES_MAX, WORKER_RECORD_ADDRS_MAX, WORKER_RECORD_BYTES_MAX, WORKER_RECORD_TTL_SECS,
};

use crate::P2pError;

/// What a worker serves and how well, as published.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// Hex sha256 of the GGUF file (`specswarm_net::model_id`).
    pub model_id: String,
    /// Layers served, half-open.
    pub start: u32,
    pub end: u32,
    /// Layers of the whole model.
    pub n_layers: u32,
    /// KV tokens not reserved by open sessions.
    pub free_kv_tokens: u64,
    /// Measured decode speed of the slice: one token through all its layers, tokens per second.
    pub throughput_tps: f64,
    /// Listen addresses (multiaddrs ending in `/p2p/<peer id>`; relayed ones included).
    pub addrs: Vec<String>,
    /// Publication time and expiry, unix milliseconds.
    pub published_unix_ms: u64,
    pub expires_unix_ms: u64,
}

/// Provider key of a model.
pub fn model_key(model_id: &[u8; 32]) -> Vec<u8> {
    let mut k = b"/specswarm/model/".to_vec();
    k.extend_from_slice(model_id);
    k
}

/// Record key of a worker.
pub fn worker_key(peer: &PeerId) -> Vec<u8> {
    let mut k = b"/specswarm/worker/".to_vec();
    k.extend_from_slice(&peer.to_bytes());
    k
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn invalid(reason: impl Into<String>) -> P2pError {
    P2pError::BadRecord(reason.into())
}

impl WorkerRecord {
    /// A fresh record expiring [`WORKER_RECORD_TTL_SECS`] from now.
    pub fn stamp(mut self) -> WorkerRecord {
        self.published_unix_ms = unix_ms();
        self.expires_unix_ms = self.published_unix_ms + WORKER_RECORD_TTL_SECS * 1000;
        self
    }

    fn check(&self) -> Result<(), P2pError> {
        if self.start >= self.end || self.end > self.n_layers {
            return Err(invalid(format!("layers {}..{} of {}", self.start, self.end, self.n_layers)));
        }
        if self.addrs.len() > WORKER_RECORD_ADDRS_MAX
            || self.addrs.iter().any(|a| a.len() > WORKER_RECORD_ADDR_BYTES_MAX)
        {
            return Err(invalid("too many or too long addresses"));
        }
        if !self.throughput_tps.is_finite() || self.throughput_tps < 0.0 {
            return Err(invalid("throughput"));
        }
        Ok(())
    }

    /// Signed bytes: `u16 key length | protobuf public key | u16 signature length | signature |
    /// JSON body`.
    pub fn sign(&self, key: &Keypair) -> Result<Vec<u8>, P2pError> {
        let mut rec = self.clone();
        rec.addrs.truncate(WORKER_RECORD_ADDRS_MAX);
        rec.check()?;
        let body = serde_json::to_vec(&rec).map_err(|e| invalid(e.to_string()))?;
        let sig = key.sign(&body).map_err(|e| invalid(e.to_string()))?;
        let pk = key.public().encode_protobuf();
        let mut out = Vec::with_capacity(4 + pk.len() + sig.len() + body.len());
        out.extend_from_slice(&(pk.len() as u16).to_le_bytes());
        out.extend_from_slice(&pk);
        out.extend_from_slice(&(sig.len() as u16).to_le_bytes());
        out.extend_from_slice(&sig);
        out.extend_from_slice(&body);
        if out.len() > WORKER_RECORD_BYTES_MAX {
            return Err(invalid(format!("{} bytes (limit {WORKER_RECORD_BYTES_MAX})", out.len())));
        }
        Ok(out)
    }

    /// Check `bytes` as the record of `peer`, unexpired at `now_unix_ms`.
    pub fn verify(bytes: &[u8], peer: &PeerId, now_unix_ms: u64) -> Result<WorkerRecord, P2pError> {
        if bytes.len() > WORKER_RECORD_BYTES_MAX {
            return Err(invalid("too large"));
        }
        let mut rest = bytes;
        let mut take = |what: &str| -> Result<&[u8], P2pError> {
            if rest.len() < 2 {
                return Err(invalid(format!("truncated {what}")));
            }
            let n = u16::from_le_bytes([rest[0], rest[1]]) as usize;
            if rest.len() < 2 + n {
                return Err(invalid(format!("truncated {what}")));
            }
            let (v, r) = rest[2..].split_at(n);
            rest = r;
            Ok(v)
        };
        let pk = take("key")?;
        let sig = take("signature")?;
        let body = rest;
        let pk = PublicKey::try_decode_protobuf(pk).map_err(|e| invalid(e.to_string()))?;
        if pk.to_peer_id() != *peer {
            return Err(invalid("signed by another peer"));
        }
        if !pk.verify(body, sig) {
            return Err(invalid("bad signature"));
        }
        let rec: WorkerRecord = serde_json::from_slice(body).map_err(|e| invalid(e.to_string()))?;
        rec.check()?;
        if rec.expires_unix_ms < now_unix_ms {
            return Err(invalid("expired"));
        }
        Ok(rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> WorkerRecord {
        WorkerRecord {
            model_id: "ab".repeat(32),
            start: 0,
            end: 10,
            n_layers: 30,
            free_kv_tokens: 1000,
            throughput_tps: 50.0,
            addrs: vec!["/ip4/127.0.0.1/tcp/1".into()],
            published_unix_ms: 0,
            expires_unix_ms: 0,
        }
        .stamp()
    }

    #[test]
    fn records_verify_only_for_their_signer() {
        let k = Keypair::generate_ed25519();
        let other = Keypair::generate_ed25519();
        let bytes = rec().sign(&k).unwrap();
        let me = k.public().to_peer_id();
        assert_eq!(WorkerRecord::verify(&bytes, &me, unix_ms()).unwrap(), rec_eq(&bytes, &me));
        assert!(WorkerRecord::verify(&bytes, &other.public().to_peer_id(), unix_ms()).is_err());
        assert!(WorkerRecord::verify(&bytes, &me, u64::MAX).is_err(), "expired");
        let mut forged = bytes.clone();
        let n = forged.len();
        forged[n - 3] ^= 1;
        assert!(WorkerRecord::verify(&forged, &me, unix_ms()).is_err());
        // Hostile bytes: errors, never panics.
        for cut in 0..bytes.len() {
            let _ = WorkerRecord::verify(&bytes[..cut], &me, unix_ms());
        }
        assert!(WorkerRecord::verify(&[0xff; 5000], &me, unix_ms()).is_err());
        let bad = WorkerRecord { start: 9, end: 3, ..rec() };
        assert!(bad.sign(&k).is_err());
    }

    fn rec_eq(bytes: &[u8], me: &PeerId) -> WorkerRecord {
        WorkerRecord::verify(bytes, me, 0).unwrap()
    }
}
