//! API keys and per-key rate limits.
//!
//! Keys look like `sk-` + 48 hex digits (192 random bits from the OS). Only their sha256 is
//! stored, in a SQLite database (`$SPECSWARM_HOME/gateway.sqlite3` by default); the key itself is
//! printed once at creation. Each key has a token bucket of `rate_per_minute` requests that
//! refills continuously; an empty bucket answers 429.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};
use specswarm_proto::limits::{GATEWAY_KEY_NAME_BYTES_MAX, GATEWAY_KEY_RATE_PER_MINUTE_MAX};

#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("cannot read randomness: {0}")]
    Random(#[from] std::io::Error),
    #[error("invalid key setting: {0}")]
    Invalid(String),
}

/// A stored key (never the key itself).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KeyRecord {
    pub id: i64,
    pub name: String,
    /// The first characters of the key, to tell keys apart in listings.
    pub prefix: String,
    pub rate_per_minute: u32,
    pub created_unix_s: i64,
    pub revoked: bool,
}

/// The key database.
pub struct KeyStore {
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore").finish_non_exhaustive()
    }
}

pub fn hash_key(key: &str) -> String {
    Sha256::digest(key.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

impl KeyStore {
    /// Open (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<KeyStore, KeyError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE IF NOT EXISTS api_keys (
                 id INTEGER PRIMARY KEY,
                 name TEXT NOT NULL,
                 key_sha256 TEXT NOT NULL UNIQUE,
                 prefix TEXT NOT NULL,
                 rate_per_minute INTEGER NOT NULL,
                 created_unix_s INTEGER NOT NULL,
                 revoked INTEGER NOT NULL DEFAULT 0
             );",
        )?;
        Ok(KeyStore { conn: Mutex::new(conn) })
    }

    /// The default database under the model store's home.
    pub fn default_path() -> std::path::PathBuf {
        specswarm_engine::hub::home().join("gateway.sqlite3")
    }

    /// Create a key; returns the key (shown once) and its record.
    pub fn create(&self, name: &str, rate_per_minute: u32) -> Result<(String, KeyRecord), KeyError> {
        if name.len() > GATEWAY_KEY_NAME_BYTES_MAX {
            return Err(KeyError::Invalid(format!("name longer than {GATEWAY_KEY_NAME_BYTES_MAX} bytes")));
        }
        if rate_per_minute == 0 || rate_per_minute > GATEWAY_KEY_RATE_PER_MINUTE_MAX {
            return Err(KeyError::Invalid(format!("rate per minute must be in 1..={GATEWAY_KEY_RATE_PER_MINUTE_MAX}")));
        }
        let mut raw = [0u8; 24];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut raw)?;
        let key = format!("sk-{}", raw.iter().map(|b| format!("{b:02x}")).collect::<String>());
        let prefix = key[..7].to_string();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        let conn = self.conn.lock().expect("key db lock");
        conn.execute(
            "INSERT INTO api_keys (name, key_sha256, prefix, rate_per_minute, created_unix_s) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![name, hash_key(&key), prefix, rate_per_minute, now],
        )?;
        let id = conn.last_insert_rowid();
        Ok((
            key,
            KeyRecord { id, name: name.to_string(), prefix, rate_per_minute, created_unix_s: now, revoked: false },
        ))
    }

    /// The live (not revoked) record of `key`, if any.
    pub fn lookup(&self, key: &str) -> Result<Option<KeyRecord>, KeyError> {
        let conn = self.conn.lock().expect("key db lock");
        Ok(conn
            .query_row(
                "SELECT id, name, prefix, rate_per_minute, created_unix_s, revoked FROM api_keys
                 WHERE key_sha256 = ?1 AND revoked = 0",
                params![hash_key(key)],
                row_to_record,
            )
            .optional()?)
    }

    pub fn list(&self) -> Result<Vec<KeyRecord>, KeyError> {
        let conn = self.conn.lock().expect("key db lock");
        let mut st = conn
            .prepare("SELECT id, name, prefix, rate_per_minute, created_unix_s, revoked FROM api_keys ORDER BY id")?;
        let rows = st.query_map([], row_to_record)?.collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Revoke key `id`; `false` if there is none.
    pub fn revoke(&self, id: i64) -> Result<bool, KeyError> {
        let conn = self.conn.lock().expect("key db lock");
        Ok(conn.execute("UPDATE api_keys SET revoked = 1 WHERE id = ?1", params![id])? == 1)
    }
}

fn row_to_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyRecord> {
    Ok(KeyRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        prefix: r.get(2)?,
        rate_per_minute: r.get(3)?,
        created_unix_s: r.get(4)?,
        revoked: r.get::<_, i64>(5)? != 0,
    })
}

/// Token buckets, one per key id.
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<i64, (f64, Instant)>>,
}

impl RateLimiter {
    /// Take one request from key `id`'s bucket (capacity and refill `rate_per_minute`);
    /// `Err(seconds)` until a request would be allowed.
    pub fn take(&self, id: i64, rate_per_minute: u32, now: Instant) -> Result<(), f64> {
        let cap = f64::from(rate_per_minute);
        let per_s = cap / 60.0;
        let mut b = self.buckets.lock().expect("rate lock");
        let (tokens, last) = b.entry(id).or_insert((cap, now));
        *tokens = (*tokens + now.saturating_duration_since(*last).as_secs_f64() * per_s).min(cap);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err((1.0 - *tokens) / per_s)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stored_hashed_and_revocable() {
        let dir = std::env::temp_dir().join(format!("specswarm-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = KeyStore::open(&dir.join("k.sqlite3")).unwrap();
        let (key, rec) = store.create("ci", 5).unwrap();
        assert!(key.starts_with("sk-") && key.len() == 51);
        assert_eq!(store.lookup(&key).unwrap(), Some(rec.clone()));
        assert_eq!(store.lookup("sk-nope").unwrap(), None);
        // The database holds the hash, never the key.
        let bytes = std::fs::read(dir.join("k.sqlite3")).unwrap();
        let wal = std::fs::read(dir.join("k.sqlite3-wal")).unwrap_or_default();
        let hay = [bytes, wal].concat();
        assert!(!hay.windows(key.len()).any(|w| w == key.as_bytes()));
        assert!(store.revoke(rec.id).unwrap());
        assert_eq!(store.lookup(&key).unwrap(), None);
        assert!(store.create("x", 0).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn token_bucket_refills() {
        let rl = RateLimiter::default();
        let t = Instant::now();
        for _ in 0..3 {
            rl.take(1, 3, t).unwrap();
        }
        let wait = rl.take(1, 3, t).unwrap_err();
        assert!((wait - 20.0).abs() < 1e-6, "{wait}");
        rl.take(2, 3, t).unwrap();
        rl.take(1, 3, t + std::time::Duration::from_secs(20)).unwrap();
    }
}
