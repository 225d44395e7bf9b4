//! The `.dws` snapshot file: one valid safetensors container holding everything needed to resume
//! an actor between messages (see DESIGN.md, "The snapshot file"). This module owns the byte
//! layout, the crash-safe write and the validating read; it knows nothing about Wasmtime or the
//! engine, which convert their state to and from [`Snapshot`].
//!
//! Tensors (all little-endian, row-major; tensors that would be empty are omitted, because not
//! every safetensors reader accepts zero-sized tensors):
//!
//! | name                     | dtype | shape              | present when                      |
//! |--------------------------|-------|--------------------|-----------------------------------|
//! | `actor.module`           | U8    | `[module_len]`     | always                            |
//! | `actor.memory.pages`     | U8    | `[n_pages, 65536]` | some 64 KiB page is non-zero      |
//! | `actor.memory.page_index`| U32   | `[n_pages]`        | with `actor.memory.pages`         |
//! | `conversation.tokens`    | U32   | `[kv_len]`         | `kv_len > 0`                      |
//! | `kv.{layer}.k`           | F16   | `[kv_len, kv_dim]` | `kv_len > 0`, layer `0..n_layers` |
//! | `kv.{layer}.v`           | F16   | `[kv_len, kv_dim]` | `kv_len > 0`, layer `0..n_layers` |
//! | `conversation.logits`    | F32   | `[vocab_size]`     | the snapshot has logits           |
//!
//! Linear memory is stored sparsely: only non-zero 64 KiB pages, with `page_index` (strictly
//! increasing page numbers) saying where each goes; every other page of the `memory_bytes`-long
//! memory is zero. `__metadata__` holds `format` (`driftwood-snapshot`), `format_version`, and
//! `driftwood`: the JSON of [`SnapshotMeta`], which carries every other field.
//!
//! [`write`] goes through a temp file in the target's directory, fsyncs it, renames it over the
//! final name and fsyncs the directory, so a crash leaves either the old file or the new one
//! (plus, at worst, a stray `.{name}.tmp-*` file, which the next save to that name removes).
//! [`read`] validates the whole file against its metadata before returning, and never panics or allocates more than the file's size (plus the
//! zero-filled memory, which is capped at 4 GiB) on a corrupt or hostile file.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;
use sha2::{Digest, Sha256};

/// Version of the layout described above; bumped on any incompatible change.
pub const FORMAT_VERSION: u32 = 1;

/// Size of a Wasm page, and of each stored memory page.
pub const PAGE_BYTES: usize = 65536;

/// Largest linear memory a snapshot may describe (a full wasm32 address space).
pub const MAX_MEMORY_BYTES: u64 = 1 << 32;

/// Largest layer count accepted, so a lying header cannot make `read` allocate without bound.
pub const MAX_LAYERS: usize = 1 << 16;

/// Value of the `format` key in `__metadata__`.
const FORMAT_NAME: &str = "driftwood-snapshot";

/// Longest header accepted; the same limit the safetensors crate applies.
const MAX_HEADER_BYTES: u64 = 100_000_000;

const T_MODULE: &str = "actor.module";
const T_PAGES: &str = "actor.memory.pages";
const T_PAGE_INDEX: &str = "actor.memory.page_index";
const T_TOKENS: &str = "conversation.tokens";
const T_LOGITS: &str = "conversation.logits";

/// Identity and shape of the model whose KV cache the snapshot carries.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelRef {
    pub name: String,
    pub architecture: String,
    pub weights_hash: String,
    pub tokenizer_hash: String,
    pub n_layers: usize,
    /// Width of one K (or V) row per layer: n_kv_heads × head_dim.
    pub kv_dim: usize,
    pub vocab_size: usize,
}

/// A mutable global's value; floats are kept as bits so NaN payloads survive.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum GlobalValue {
    I32(i32),
    I64(i64),
    F32(u32),
    F64(u64),
}

/// Everything in the snapshot that is not a tensor; stored as JSON in `__metadata__`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotMeta {
    pub format_version: u32,
    pub driftwood_version: String,
    pub created_unix: u64,
    pub actor_name: String,
    /// Lower-case hex SHA-256 of `Snapshot::module` (see [`module_sha256`]).
    pub module_sha256: String,
    /// Linear memory size in bytes; a multiple of 65536, at most 4 GiB.
    pub memory_bytes: u64,
    /// (global index, value) for every mutable defined global, strictly increasing by index.
    pub globals: Vec<(u32, GlobalValue)>,
    /// `None` for an actor that never loaded a model; then `kv_len` is 0.
    pub model: Option<ModelRef>,
    pub sampler: Option<serde_json::Value>,
    /// Tokens in the KV cache, which is also the length of the token history.
    pub kv_len: usize,
    /// The conversation as text, so a different model can rebuild its KV cache by prefill.
    pub conversation_text: Option<String>,
}

/// A whole snapshot in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub meta: SnapshotMeta,
    /// The actor's original (uninstrumented) module bytes.
    pub module: Vec<u8>,
    /// The full linear memory, `meta.memory_bytes` long.
    pub memory: Vec<u8>,
    /// Token history, `meta.kv_len` long.
    pub tokens: Vec<u32>,
    /// Per layer (K, V) as f16 bits, each `kv_len × kv_dim` row-major; `n_layers` entries when
    /// there is a model (empty vectors when `kv_len` is 0), none without one.
    pub kv: Vec<(Vec<u16>, Vec<u16>)>,
    /// Logits after the last token, `vocab_size` long.
    pub logits: Option<Vec<f32>>,
}

/// What [`write`] stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteStats {
    pub file_bytes: u64,
    /// Logical linear memory size.
    pub memory_bytes: u64,
    /// Bytes of memory actually stored (non-zero pages only).
    pub stored_memory_bytes: u64,
    pub kv_bytes: u64,
}

/// One tensor as listed by [`read_meta`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSummary {
    pub name: String,
    /// safetensors dtype name, e.g. `F16`.
    pub dtype: String,
    pub shape: Vec<usize>,
    pub bytes: u64,
}

/// Why a snapshot could not be written or read. Every message starts with the file's path.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{file}: cannot {op}: {source}")]
    Io {
        file: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{file}: {len}-byte file is too short for a safetensors header")]
    TooShort { file: String, len: u64 },
    #[error("{file}: header length {header_len} does not fit in a {file_len}-byte file")]
    HeaderLength { file: String, header_len: u64, file_len: u64 },
    #[error("{file}: invalid safetensors header: {reason}")]
    Header { file: String, reason: String },
    #[error("{file}: header describes {data_len} bytes of tensor data, file has {available}")]
    DataLength { file: String, data_len: u64, available: u64 },
    #[error("{file}: not a driftwood snapshot: __metadata__ has no '{key}'")]
    NotSnapshot { file: String, key: &'static str },
    #[error("{file}: __metadata__ '{key}' is invalid: {reason}")]
    BadMetadata { file: String, key: &'static str, reason: String },
    #[error("{file}: format version {found}, this driftwood reads version {FORMAT_VERSION}")]
    Version { file: String, found: String },
    #[error("{file}: missing tensor '{name}' ({reason})")]
    MissingTensor { file: String, name: String, reason: String },
    #[error("{file}: unexpected tensor '{name}' ({reason})")]
    UnexpectedTensor { file: String, name: String, reason: String },
    #[error("{file}: tensor '{name}' has dtype {found}, expected {expected}")]
    TensorDtype { file: String, name: String, found: String, expected: String },
    #[error("{file}: tensor '{name}' has shape {shape:?}, metadata says {expected}")]
    TensorShape { file: String, name: String, shape: Vec<usize>, expected: String },
    #[error("{file}: module sha256 is {actual}, metadata says {expected}")]
    ModuleHash { file: String, actual: String, expected: String },
    /// The metadata contradicts itself or the tensor contents.
    #[error("{file}: {what}")]
    Invalid { file: String, what: String },
    /// [`write`] was handed a snapshot whose parts disagree with its metadata.
    #[error("{file}: snapshot to write is inconsistent: {what}")]
    Inconsistent { file: String, what: String },
}

/// Lower-case hex SHA-256, the form `SnapshotMeta::module_sha256` takes.
pub fn module_sha256(module: &[u8]) -> String {
    let digest = Sha256::digest(module);
    let mut hex = String::with_capacity(64);
    for byte in digest {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

fn file_name(path: &Path) -> String {
    path.display().to_string()
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io { file: file_name(path), op, source }
}

fn kv_name(layer: usize, which: char) -> String {
    format!("kv.{layer}.{which}")
}

/// Checks the metadata on its own; shared by `write` and `read`. `fail` builds the error.
fn check_meta(meta: &SnapshotMeta, fail: &dyn Fn(String) -> SnapshotError) -> Result<(), SnapshotError> {
    if !meta.memory_bytes.is_multiple_of(PAGE_BYTES as u64) || meta.memory_bytes > MAX_MEMORY_BYTES {
        return Err(fail(format!("memory_bytes {} is not a multiple of 65536 up to 4 GiB", meta.memory_bytes)));
    }
    if let Some(pair) = meta.globals.windows(2).find(|w| w[0].0 >= w[1].0) {
        return Err(fail(format!("globals are not strictly increasing by index: {} then {}", pair[0].0, pair[1].0)));
    }
    match &meta.model {
        None if meta.kv_len != 0 => Err(fail(format!("kv_len is {} but there is no model", meta.kv_len))),
        None => Ok(()),
        Some(m) => {
            if m.n_layers == 0 || m.n_layers > MAX_LAYERS {
                return Err(fail(format!("model.n_layers {} is not in 1..={MAX_LAYERS}", m.n_layers)));
            }
            if m.kv_dim == 0 || m.vocab_size == 0 {
                return Err(fail(format!("model.kv_dim {} and model.vocab_size {} must be non-zero", m.kv_dim, m.vocab_size)));
            }
            let too_big = meta.kv_len.checked_mul(m.kv_dim).and_then(|n| n.checked_mul(2 * m.n_layers)).and_then(|n| n.checked_mul(2)).is_none();
            if too_big {
                return Err(fail(format!("kv_len {} × kv_dim {} × {} layers overflows", meta.kv_len, m.kv_dim, m.n_layers)));
            }
            Ok(())
        }
    }
}

/// Checks that the parts of `snap` agree with its metadata before anything touches the disk.
fn check_snapshot(path: &Path, snap: &Snapshot) -> Result<(), SnapshotError> {
    let fail = |what: String| SnapshotError::Inconsistent { file: file_name(path), what };
    let meta = &snap.meta;
    if meta.format_version != FORMAT_VERSION {
        return Err(fail(format!("format_version is {}, expected {FORMAT_VERSION}", meta.format_version)));
    }
    check_meta(meta, &fail)?;
    if snap.module.is_empty() {
        return Err(fail("module is empty".into()));
    }
    let actual = module_sha256(&snap.module);
    if actual != meta.module_sha256 {
        return Err(fail(format!("module sha256 is {actual}, meta.module_sha256 is {}", meta.module_sha256)));
    }
    if snap.memory.len() as u64 != meta.memory_bytes {
        return Err(fail(format!("memory is {} bytes, memory_bytes is {}", snap.memory.len(), meta.memory_bytes)));
    }
    if snap.tokens.len() != meta.kv_len {
        return Err(fail(format!("{} tokens, kv_len is {}", snap.tokens.len(), meta.kv_len)));
    }
    let (n_layers, kv_dim, vocab) = match &meta.model {
        Some(m) => (m.n_layers, m.kv_dim, Some(m.vocab_size)),
        None => (0, 0, None),
    };
    if snap.kv.len() != n_layers {
        return Err(fail(format!("kv has {} layers, model has {n_layers}", snap.kv.len())));
    }
    let per_layer = meta.kv_len * kv_dim;
    for (layer, (k, v)) in snap.kv.iter().enumerate() {
        for (which, t) in [('k', k), ('v', v)] {
            if t.len() != per_layer {
                return Err(fail(format!("{} has {} values, expected kv_len {} × kv_dim {kv_dim}", kv_name(layer, which), t.len(), meta.kv_len)));
            }
        }
    }
    match (&snap.logits, vocab) {
        (None, _) => Ok(()),
        (Some(_), None) => Err(fail("logits without a model".into())),
        (Some(l), Some(v)) if l.len() != v => Err(fail(format!("{} logits, vocab_size is {v}", l.len()))),
        (Some(_), Some(_)) => Ok(()),
    }
}

/// Where a tensor's bytes come from when writing.
enum Source<'a> {
    Bytes(&'a [u8]),
    Pages(&'a [u8], &'a [u32]),
    U16(&'a [u16]),
    U32(&'a [u32]),
    F32(&'a [f32]),
}

struct Planned<'a> {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: usize,
    source: Source<'a>,
}

fn is_zero(page: &[u8]) -> bool {
    // Comparing u64 words lets the compiler vectorise; a page is always a multiple of 8 bytes.
    page.chunks_exact(8).all(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) == 0)
}

/// Writes `items` as little-endian bytes through a bounded scratch buffer.
fn write_le<T: Copy, const N: usize>(out: &mut impl Write, items: &[T], to_le: impl Fn(T) -> [u8; N]) -> io::Result<()> {
    const CHUNK_ITEMS: usize = 1 << 16;
    let mut buf = Vec::with_capacity(CHUNK_ITEMS.min(items.len()) * N);
    for chunk in items.chunks(CHUNK_ITEMS) {
        buf.clear();
        for &x in chunk {
            buf.extend_from_slice(&to_le(x));
        }
        out.write_all(&buf)?;
    }
    Ok(())
}

fn write_source(out: &mut impl Write, source: &Source<'_>) -> io::Result<()> {
    match *source {
        Source::Bytes(b) => out.write_all(b),
        Source::Pages(memory, index) => {
            for &page in index {
                let start = page as usize * PAGE_BYTES;
                out.write_all(&memory[start..start + PAGE_BYTES])?;
            }
            Ok(())
        }
        Source::U16(v) => write_le(out, v, u16::to_le_bytes),
        Source::U32(v) => write_le(out, v, u32::to_le_bytes),
        Source::F32(v) => write_le(out, v, f32::to_le_bytes),
    }
}

/// Names temp files uniquely within this process; the pid separates processes.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `snap` to `path` atomically: temp file in the same directory, fsync, rename, fsync of
/// the directory. On any error the previous file at `path`, if any, is untouched.
pub fn write(path: &Path, snap: &Snapshot) -> Result<WriteStats, SnapshotError> {
    check_snapshot(path, snap)?;
    let meta = &snap.meta;

    let page_index: Vec<u32> = snap
        .memory
        .chunks_exact(PAGE_BYTES)
        .enumerate()
        .filter(|(_, page)| !is_zero(page))
        // Memory is at most 4 GiB (checked), so a page number fits in u32.
        .map(|(i, _)| i as u32)
        .collect();

    let mut planned = vec![Planned {
        name: T_MODULE.into(),
        dtype: Dtype::U8,
        shape: vec![snap.module.len()],
        bytes: snap.module.len(),
        source: Source::Bytes(&snap.module),
    }];
    if !page_index.is_empty() {
        planned.push(Planned {
            name: T_PAGES.into(),
            dtype: Dtype::U8,
            shape: vec![page_index.len(), PAGE_BYTES],
            bytes: page_index.len() * PAGE_BYTES,
            source: Source::Pages(&snap.memory, &page_index),
        });
        planned.push(Planned {
            name: T_PAGE_INDEX.into(),
            dtype: Dtype::U32,
            shape: vec![page_index.len()],
            bytes: page_index.len() * 4,
            source: Source::U32(&page_index),
        });
    }
    let mut kv_bytes = 0u64;
    if meta.kv_len > 0 {
        planned.push(Planned { name: T_TOKENS.into(), dtype: Dtype::U32, shape: vec![meta.kv_len], bytes: meta.kv_len * 4, source: Source::U32(&snap.tokens) });
        let kv_dim = meta.model.as_ref().map_or(0, |m| m.kv_dim);
        for (layer, (k, v)) in snap.kv.iter().enumerate() {
            for (which, t) in [('k', k), ('v', v)] {
                kv_bytes += t.len() as u64 * 2;
                planned.push(Planned {
                    name: kv_name(layer, which),
                    dtype: Dtype::F16,
                    shape: vec![meta.kv_len, kv_dim],
                    bytes: t.len() * 2,
                    source: Source::U16(t),
                });
            }
        }
    }
    if let Some(logits) = &snap.logits {
        planned.push(Planned { name: T_LOGITS.into(), dtype: Dtype::F32, shape: vec![logits.len()], bytes: logits.len() * 4, source: Source::F32(logits) });
    }
    // The safetensors crate's own order: widest dtype first (keeps every tensor aligned to its
    // element size, since the header is padded to 8), then by name.
    planned.sort_by(|a, b| b.dtype.cmp(&a.dtype).then_with(|| a.name.cmp(&b.name)));

    let mut offset = 0usize;
    let infos: Vec<(String, TensorInfo)> = planned
        .iter()
        .map(|p| {
            let info = TensorInfo { dtype: p.dtype, shape: p.shape.clone(), data_offsets: (offset, offset + p.bytes) };
            offset += p.bytes;
            (p.name.clone(), info)
        })
        .collect();
    let data_len = offset as u64;

    let meta_json = serde_json::to_string(meta)
        .map_err(|e| SnapshotError::Inconsistent { file: file_name(path), what: format!("metadata does not encode as json: {e}") })?;
    let kv: HashMap<String, String> =
        [("format".to_string(), FORMAT_NAME.to_string()), ("format_version".to_string(), FORMAT_VERSION.to_string()), ("driftwood".to_string(), meta_json)]
            .into();
    let header_err = |e: &dyn std::fmt::Display| SnapshotError::Inconsistent { file: file_name(path), what: format!("cannot build safetensors header: {e}") };
    let metadata = Metadata::new(Some(kv), infos).map_err(|e| header_err(&e))?;
    let mut header = serde_json::to_vec(&metadata).map_err(|e| header_err(&e))?;
    header.resize(header.len().next_multiple_of(8), b' ');
    if header.len() as u64 > MAX_HEADER_BYTES {
        return Err(header_err(&format!("header is {} bytes, limit is {MAX_HEADER_BYTES}", header.len())));
    }

    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let base = path
        .file_name()
        .ok_or_else(|| SnapshotError::Io { file: file_name(path), op: "write", source: io::Error::new(io::ErrorKind::InvalidInput, "path has no file name") })?
        .to_string_lossy()
        .into_owned();
    let temp = dir.join(format!(".{base}.tmp-{}-{}", std::process::id(), TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)));

    let result = (|| {
        let file = File::options().write(true).create_new(true).open(&temp).map_err(io_err(path, "create temp file"))?;
        let mut out = io::BufWriter::with_capacity(1 << 20, file);
        let written: io::Result<()> = (|| {
            out.write_all(&(header.len() as u64).to_le_bytes())?;
            out.write_all(&header)?;
            for p in &planned {
                write_source(&mut out, &p.source)?;
            }
            out.flush()
        })();
        written.map_err(io_err(path, "write temp file"))?;
        let file = out.into_inner().map_err(|e| io_err(path, "write temp file")(e.into_error()))?;
        file.sync_all().map_err(io_err(path, "fsync temp file"))?;
        drop(file);
        std::fs::rename(&temp, path).map_err(io_err(path, "rename temp file over it"))
    })();
    if let Err(e) = result {
        // Best effort: the temp file is garbage whether or not it can be removed.
        let _ = std::fs::remove_file(&temp);
        return Err(e);
    }
    File::open(&dir).and_then(|d| d.sync_all()).map_err(io_err(path, "fsync its directory"))?;
    remove_stale_temps(&dir, &base);

    Ok(WriteStats {
        file_bytes: 8 + header.len() as u64 + data_len,
        memory_bytes: meta.memory_bytes,
        stored_memory_bytes: (page_index.len() * PAGE_BYTES) as u64,
        kv_bytes,
    })
}

/// Removes temp files of earlier saves to the same name whose writer process is gone (a save
/// killed midway leaves one behind). Best effort: anything unreadable is left alone.
fn remove_stale_temps(dir: &Path, base: &str) {
    let prefix = format!(".{base}.tmp-");
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(&prefix)).and_then(|rest| rest.split('-').next()).and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if pid != std::process::id() as i32 && !process_alive(pid) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Whether a process with this id exists (signal 0 probes without sending anything).
fn process_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 performs only the existence and permission check.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// A parsed, validated header: everything but the tensor data.
struct Header {
    meta: SnapshotMeta,
    metadata: Metadata,
    /// File offset of the first tensor byte.
    data_start: u64,
    n_pages: usize,
}

/// Reads and validates the header of `file` (whose length is `file_len`): the safetensors
/// structure, the driftwood metadata, and every tensor's name, dtype and shape.
fn read_header(path: &Path, file: &mut File, file_len: u64) -> Result<Header, SnapshotError> {
    let fname = || file_name(path);
    if file_len < 8 {
        return Err(SnapshotError::TooShort { file: fname(), len: file_len });
    }
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes).map_err(io_err(path, "read header length"))?;
    let header_len = u64::from_le_bytes(len_bytes);
    // Checked before allocating, so a huge length cannot exhaust memory.
    if header_len > file_len - 8 || header_len > MAX_HEADER_BYTES {
        return Err(SnapshotError::HeaderLength { file: fname(), header_len, file_len });
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(io_err(path, "read header"))?;
    let metadata: Metadata = serde_json::from_slice(&header).map_err(|e| SnapshotError::Header { file: fname(), reason: e.to_string() })?;
    let data_start = 8 + header_len;
    let available = file_len - data_start;
    if metadata.data_len() as u64 != available {
        return Err(SnapshotError::DataLength { file: fname(), data_len: metadata.data_len() as u64, available });
    }

    let kv = metadata.metadata().as_ref();
    let get = |key: &'static str| kv.and_then(|m| m.get(key)).ok_or_else(|| SnapshotError::NotSnapshot { file: fname(), key });
    let format = get("format")?;
    if format != FORMAT_NAME {
        return Err(SnapshotError::BadMetadata { file: fname(), key: "format", reason: format!("is '{format}', expected '{FORMAT_NAME}'") });
    }
    let version = get("format_version")?;
    if version.parse::<u32>().ok() != Some(FORMAT_VERSION) {
        return Err(SnapshotError::Version { file: fname(), found: version.clone() });
    }
    let meta: SnapshotMeta =
        serde_json::from_str(get("driftwood")?).map_err(|e| SnapshotError::BadMetadata { file: fname(), key: "driftwood", reason: e.to_string() })?;
    if meta.format_version != FORMAT_VERSION {
        return Err(SnapshotError::Version { file: fname(), found: meta.format_version.to_string() });
    }
    let invalid = |what: String| SnapshotError::Invalid { file: fname(), what };
    check_meta(&meta, &invalid)?;

    let n_pages = check_tensors(path, &meta, &metadata)?;
    Ok(Header { meta, metadata, data_start, n_pages })
}

/// Checks that the file holds exactly the tensors `meta` calls for, with the right dtypes and
/// shapes. Returns the number of stored memory pages.
fn check_tensors(path: &Path, meta: &SnapshotMeta, metadata: &Metadata) -> Result<usize, SnapshotError> {
    let fname = || file_name(path);
    let tensors = metadata.tensors();
    let total_pages = (meta.memory_bytes / PAGE_BYTES as u64) as usize;

    // The page count is the one shape the metadata does not fix; take it from page_index.
    let n_pages = match tensors.get(T_PAGE_INDEX) {
        Some(info) => match info.shape.as_slice() {
            [n] if *n >= 1 && *n <= total_pages => *n,
            _ => {
                return Err(SnapshotError::TensorShape {
                    file: fname(),
                    name: T_PAGE_INDEX.into(),
                    shape: info.shape.clone(),
                    expected: format!("[n_pages] with 1 ≤ n_pages ≤ {total_pages} memory pages"),
                })
            }
        },
        None => 0,
    };

    // (name, dtype, shape, why the shape is what it is)
    let mut expected: Vec<(String, Dtype, Vec<usize>, String)> = Vec::new();
    const MODULE_SHAPE: &str = "[module_len] with module_len ≥ 1";
    match tensors.get(T_MODULE) {
        None => return Err(SnapshotError::MissingTensor { file: fname(), name: T_MODULE.into(), reason: "every snapshot carries its module".into() }),
        Some(info) if !matches!(info.shape.as_slice(), [n] if *n >= 1) => {
            return Err(SnapshotError::TensorShape { file: fname(), name: T_MODULE.into(), shape: info.shape.clone(), expected: MODULE_SHAPE.into() })
        }
        Some(info) => expected.push((T_MODULE.into(), Dtype::U8, info.shape.clone(), MODULE_SHAPE.into())),
    }
    if n_pages > 0 {
        let why = format!("{n_pages} pages in {T_PAGE_INDEX}");
        expected.push((T_PAGES.into(), Dtype::U8, vec![n_pages, PAGE_BYTES], why.clone()));
        expected.push((T_PAGE_INDEX.into(), Dtype::U32, vec![n_pages], why));
    }
    if let (Some(m), true) = (&meta.model, meta.kv_len > 0) {
        expected.push((T_TOKENS.into(), Dtype::U32, vec![meta.kv_len], format!("kv_len {}", meta.kv_len)));
        for layer in 0..m.n_layers {
            for which in ['k', 'v'] {
                expected.push((kv_name(layer, which), Dtype::F16, vec![meta.kv_len, m.kv_dim], format!("kv_len {} × kv_dim {}", meta.kv_len, m.kv_dim)));
            }
        }
    }
    if let (Some(m), Some(_)) = (&meta.model, tensors.get(T_LOGITS)) {
        expected.push((T_LOGITS.into(), Dtype::F32, vec![m.vocab_size], format!("vocab_size {}", m.vocab_size)));
    }

    for (name, dtype, shape, why) in &expected {
        let Some(info) = tensors.get(name.as_str()) else {
            return Err(SnapshotError::MissingTensor { file: fname(), name: name.clone(), reason: format!("metadata says {why}") });
        };
        if info.dtype != *dtype {
            return Err(SnapshotError::TensorDtype { file: fname(), name: name.clone(), found: info.dtype.to_string(), expected: dtype.to_string() });
        }
        if info.shape != *shape {
            return Err(SnapshotError::TensorShape { file: fname(), name: name.clone(), shape: info.shape.clone(), expected: why.clone() });
        }
    }
    if tensors.len() != expected.len() {
        let mut extra: Vec<&String> = tensors.keys().filter(|k| !expected.iter().any(|(name, ..)| name == *k)).collect();
        extra.sort();
        let name = extra.first().map_or_else(String::new, |s| (*s).clone());
        let reason = match (&meta.model, meta.kv_len) {
            (None, _) => "metadata has no model".to_string(),
            (Some(m), kv_len) => format!("metadata says {} layers, kv_len {kv_len}, {n_pages} memory pages", m.n_layers),
        };
        return Err(SnapshotError::UnexpectedTensor { file: fname(), name, reason });
    }
    Ok(n_pages)
}

fn open(path: &Path) -> Result<(File, u64), SnapshotError> {
    let file = File::open(path).map_err(io_err(path, "open"))?;
    let len = file.metadata().map_err(io_err(path, "stat"))?.len();
    Ok((file, len))
}

/// Reads the metadata and the tensor list without loading tensor data (for `driftwood inspect`).
/// The header is validated as fully as [`read`] does; tensor contents are not.
pub fn read_meta(path: &Path) -> Result<(SnapshotMeta, Vec<TensorSummary>), SnapshotError> {
    let (mut file, file_len) = open(path)?;
    let header = read_header(path, &mut file, file_len)?;
    let tensors = header.metadata.tensors();
    let mut summaries: Vec<(usize, TensorSummary)> = tensors
        .iter()
        .map(|(name, info)| {
            (
                info.data_offsets.0,
                TensorSummary {
                    name: name.clone(),
                    dtype: info.dtype.to_string(),
                    shape: info.shape.clone(),
                    bytes: (info.data_offsets.1 - info.data_offsets.0) as u64,
                },
            )
        })
        .collect();
    summaries.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.name.cmp(&b.1.name)));
    Ok((header.meta, summaries.into_iter().map(|(_, s)| s).collect()))
}

/// Reads `name`'s bytes. The header check guarantees the tensor exists and lies inside the file.
fn tensor_bytes(path: &Path, file: &mut File, header: &Header, name: &str, buf: &mut Vec<u8>) -> Result<(), SnapshotError> {
    let (start, end) = header.metadata.info(name).map(|i| i.data_offsets).ok_or_else(|| SnapshotError::MissingTensor {
        file: file_name(path),
        name: name.into(),
        reason: "lost after validation".into(),
    })?;
    buf.clear();
    buf.resize(end - start, 0);
    file.seek(SeekFrom::Start(header.data_start + start as u64)).and_then(|_| file.read_exact(buf)).map_err(io_err(path, "read tensor data"))
}

fn decode<T, const N: usize>(bytes: &[u8], from_le: impl Fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            from_le(a)
        })
        .collect()
}

/// A zero-filled buffer of `len` bytes, or `None` if the allocator refuses. Zeroed allocation
/// maps fresh pages lazily, so a 4 GiB memory with two stored pages costs two pages of RSS.
fn zeroed(len: u64) -> Option<Vec<u8>> {
    let len = usize::try_from(len).ok()?;
    if len == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<u8>(len).ok()?;
    // SAFETY: `layout` has non-zero size (len > 0 checked above).
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    if ptr.is_null() {
        return None;
    }
    // SAFETY: `ptr` was allocated by the global allocator with the layout of `[u8; len]`, so
    // capacity `len` matches; all `len` bytes are initialised (zeroed); we hand over ownership.
    Some(unsafe { Vec::from_raw_parts(ptr, len, len) })
}

/// Reads and fully validates a snapshot.
pub fn read(path: &Path) -> Result<Snapshot, SnapshotError> {
    let (mut file, file_len) = open(path)?;
    let header = read_header(path, &mut file, file_len)?;
    let meta = &header.meta;
    let fname = || file_name(path);
    let mut buf = Vec::new();

    let mut module = Vec::new();
    tensor_bytes(path, &mut file, &header, T_MODULE, &mut module)?;
    let actual = module_sha256(&module);
    if actual != meta.module_sha256 {
        return Err(SnapshotError::ModuleHash { file: fname(), actual, expected: meta.module_sha256.clone() });
    }

    let mut memory = zeroed(meta.memory_bytes)
        .ok_or_else(|| SnapshotError::Invalid { file: fname(), what: format!("cannot allocate {} bytes of linear memory", meta.memory_bytes) })?;
    if header.n_pages > 0 {
        tensor_bytes(path, &mut file, &header, T_PAGE_INDEX, &mut buf)?;
        let index = decode(&buf, u32::from_le_bytes);
        let total_pages = memory.len() / PAGE_BYTES;
        let mut prev: Option<u32> = None;
        for &page in &index {
            let what = if page as usize >= total_pages {
                format!("{T_PAGE_INDEX} entry {page} is out of range (memory has {total_pages} pages)")
            } else if let Some(p) = prev.filter(|&p| p >= page) {
                format!("{T_PAGE_INDEX} is not strictly increasing: {p} then {page}")
            } else {
                prev = Some(page);
                continue;
            };
            return Err(SnapshotError::Invalid { file: fname(), what });
        }
        tensor_bytes(path, &mut file, &header, T_PAGES, &mut buf)?;
        for (&page, data) in index.iter().zip(buf.chunks_exact(PAGE_BYTES)) {
            let start = page as usize * PAGE_BYTES;
            memory[start..start + PAGE_BYTES].copy_from_slice(data);
        }
    }

    let mut tokens = Vec::new();
    let mut kv = Vec::new();
    let mut logits = None;
    if let Some(m) = &meta.model {
        if meta.kv_len > 0 {
            tensor_bytes(path, &mut file, &header, T_TOKENS, &mut buf)?;
            tokens = decode(&buf, u32::from_le_bytes);
        }
        kv.reserve(m.n_layers);
        for layer in 0..m.n_layers {
            let mut pair = (Vec::new(), Vec::new());
            if meta.kv_len > 0 {
                tensor_bytes(path, &mut file, &header, &kv_name(layer, 'k'), &mut buf)?;
                pair.0 = decode(&buf, u16::from_le_bytes);
                tensor_bytes(path, &mut file, &header, &kv_name(layer, 'v'), &mut buf)?;
                pair.1 = decode(&buf, u16::from_le_bytes);
            }
            kv.push(pair);
        }
        if header.metadata.info(T_LOGITS).is_some() {
            tensor_bytes(path, &mut file, &header, T_LOGITS, &mut buf)?;
            logits = Some(decode(&buf, f32::from_le_bytes));
        }
    }

    Ok(Snapshot { meta: header.meta, module, memory, tokens, kv, logits })
}

#[cfg(test)]
mod tests;
