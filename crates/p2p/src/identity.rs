//! A node's persistent ed25519 identity: the peer id is the public key (the identity payouts and
//! receipts will bind to), stored as a libp2p protobuf-encoded keypair in a 0600 file.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;

use crate::P2pError;

/// Largest identity file we read (an encoded ed25519 keypair is ~68 bytes).
const IDENTITY_FILE_BYTES_MAX: u64 = 4096;

/// Load the keypair in `path`, or create one there (mode 0600, parent directories created).
pub fn load_or_create(path: &Path) -> Result<Keypair, P2pError> {
    let io = |e: std::io::Error| P2pError::Identity { path: path.to_path_buf(), reason: e.to_string() };
    match File::open(path) {
        Ok(f) => {
            let mut bytes = Vec::new();
            f.take(IDENTITY_FILE_BYTES_MAX).read_to_end(&mut bytes).map_err(io)?;
            Keypair::from_protobuf_encoding(&bytes)
                .map_err(|e| P2pError::Identity { path: path.to_path_buf(), reason: e.to_string() })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
            let key = Keypair::generate_ed25519();
            let bytes = key
                .to_protobuf_encoding()
                .map_err(|e| P2pError::Identity { path: path.to_path_buf(), reason: e.to_string() })?;
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io)?;
            f.write_all(&bytes).map_err(io)?;
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

/// The default identity of a role (`worker`, `bootstrap`) under `home`: the first of
/// `ROLE.key`, `ROLE-2.key`, … that no other running process holds (an exclusive `flock` kept
/// for the life of the process), so several workers on one machine get distinct peer ids that
/// stay the same across restarts.
pub fn default_path(home: &Path, role: &str) -> Result<PathBuf, P2pError> {
    let dir = home.join("identity");
    std::fs::create_dir_all(&dir).map_err(|e| P2pError::Identity { path: dir.clone(), reason: e.to_string() })?;
    for i in 1..=IDENTITIES_PER_ROLE_MAX {
        let name = if i == 1 { format!("{role}.key") } else { format!("{role}-{i}.key") };
        let lock_path = dir.join(format!("{name}.lock"));
        let Ok(lock) = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path) else {
            continue;
        };
        // SAFETY: flock on a valid, open file descriptor.
        let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            // Held until the process exits.
            std::mem::forget(lock);
            return Ok(dir.join(name));
        }
    }
    Err(P2pError::Identity { path: dir, reason: "every default identity is in use; pass --identity".into() })
}

/// Most default identities of one role on one machine.
const IDENTITIES_PER_ROLE_MAX: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_persists_with_mode_0600() {
        let dir = std::env::temp_dir().join(format!("specswarm-id-{}", std::process::id()));
        let path = dir.join("a.key");
        let a = load_or_create(&path).unwrap();
        let b = load_or_create(&path).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&path, b"garbage").unwrap();
        assert!(load_or_create(&path).is_err());
        let p1 = default_path(&dir, "w").unwrap();
        let p2 = default_path(&dir, "w").unwrap();
        assert_ne!(p1, p2, "a held default identity is not handed out twice");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
