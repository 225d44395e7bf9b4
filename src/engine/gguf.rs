//! GGUF files: a validating, zero-copy reader and a small writer.
//!
//! The reader memory-maps the file, parses the header, metadata and tensor table, and checks
//! everything a later stage would otherwise trust: counts and lengths are bounded by the bytes
//! left in the file before anything is allocated, each tensor's type, shape, alignment and extent
//! is verified, and duplicate keys or names are refused. Tensor data is never copied:
//! [`GgufFile::tensor_bytes`] hands out slices of the mapping. Versions 2 and 3 are read (they
//! share a layout); version 1 and big-endian files are refused with a clear message.
//!
//! The writer produces GGUF v3 files (used for synthesized test and benchmark models), aligned to
//! 32 bytes or to `general.alignment` when that key is set. A tensor's bytes may be given up front
//! or streamed at write time, so a multi-gigabyte model never has to sit in memory whole.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::quant::DType;

/// GGUF magic, the first four bytes of every file.
const MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of tensor data when `general.alignment` is absent (`GGUF_DEFAULT_ALIGNMENT`).
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions (`GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;
/// Arrays of arrays deeper than this are refused (ggml itself writes none).
const MAX_ARRAY_DEPTH: u32 = 4;
/// Largest capacity reserved up front from a count in the file; beyond it vectors grow as
/// entries actually parse, so a corrupt count cannot make us reserve memory the file does not
/// back (counts are also checked against the bytes left).
const PREALLOC_MAX: usize = 4096;

/// GGUF metadata value type ids (`enum gguf_type`).
mod ty {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    /// Elements all have one type (GGUF arrays are homogeneous).
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// The GGUF type name, for error messages (`u32`, `string`, `array of string`, ...).
    pub fn type_name(&self) -> String {
        match self {
            MetaValue::Array(items) => match items.first() {
                Some(first) => format!("array of {}", first.type_name()),
                None => "empty array".to_string(),
            },
            other => Self::scalar_type_name(other.type_id()).to_string(),
        }
    }

    fn scalar_type_name(id: u32) -> &'static str {
        match id {
            ty::U8 => "u8",
            ty::I8 => "i8",
            ty::U16 => "u16",
            ty::I16 => "i16",
            ty::U32 => "u32",
            ty::I32 => "i32",
            ty::F32 => "f32",
            ty::BOOL => "bool",
            ty::STRING => "string",
            ty::ARRAY => "array",
            ty::U64 => "u64",
            ty::I64 => "i64",
            ty::F64 => "f64",
            _ => "unknown",
        }
    }

    fn type_id(&self) -> u32 {
        match self {
            MetaValue::U8(_) => ty::U8,
            MetaValue::I8(_) => ty::I8,
            MetaValue::U16(_) => ty::U16,
            MetaValue::I16(_) => ty::I16,
            MetaValue::U32(_) => ty::U32,
            MetaValue::I32(_) => ty::I32,
            MetaValue::U64(_) => ty::U64,
            MetaValue::I64(_) => ty::I64,
            MetaValue::F32(_) => ty::F32,
            MetaValue::F64(_) => ty::F64,
            MetaValue::Bool(_) => ty::BOOL,
            MetaValue::String(_) => ty::STRING,
            MetaValue::Array(_) => ty::ARRAY,
        }
    }

    /// Any integer value, widened to i128 so every GGUF integer fits.
    fn as_int(&self) -> Option<i128> {
        Some(match *self {
            MetaValue::U8(v) => v.into(),
            MetaValue::I8(v) => v.into(),
            MetaValue::U16(v) => v.into(),
            MetaValue::I16(v) => v.into(),
            MetaValue::U32(v) => v.into(),
            MetaValue::I32(v) => v.into(),
            MetaValue::U64(v) => v.into(),
            MetaValue::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// The value as u32, if it is an integer of any type that fits.
    pub fn as_u32(&self) -> Option<u32> {
        self.as_int().and_then(|v| u32::try_from(v).ok())
    }

    /// The value as u64, if it is a non-negative integer of any type.
    pub fn as_u64(&self) -> Option<u64> {
        self.as_int().and_then(|v| u64::try_from(v).ok())
    }

    /// The value as i32, if it is an integer of any type that fits.
    pub fn as_i32(&self) -> Option<i32> {
        self.as_int().and_then(|v| i32::try_from(v).ok())
    }

    /// The value as f32: floats (f64 rounded) and integers.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            MetaValue::F32(v) => Some(v),
            MetaValue::F64(v) => Some(v as f32),
            _ => self.as_int().map(|v| v as f32),
        }
    }

    /// The value as bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// The value as a string slice.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The elements, if the value is an array.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(items) => Some(items),
            _ => None,
        }
    }
}

/// One entry of the tensor table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    /// ggml order: `dims[0]` is the row length (the contiguous dimension).
    pub dims: Vec<u64>,
    /// Absolute file offset of the first byte.
    pub offset: u64,
    /// Size of the data in bytes.
    pub nbytes: u64,
}

impl TensorInfo {
    /// Number of elements (product of `dims`; validated not to overflow when read).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Row length (`dims[0]`) and number of rows (product of the other dims).
    pub fn rows_cols(&self) -> (u64, u64) {
        let cols = self.dims.first().copied().unwrap_or(1);
        let rows = self.dims.iter().skip(1).product();
        (rows, cols)
    }
}

/// Errors of reading or writing a GGUF file; every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("gguf: {}: cannot {op}: {err}", path.display())]
    Io { path: PathBuf, op: &'static str, err: std::io::Error },
    #[error("gguf: {}: not a gguf file (starts with {magic:02x?}, expected \"GGUF\")", path.display())]
    NotGguf { path: PathBuf, magic: Vec<u8> },
    #[error("gguf: {}: {reason}", path.display())]
    Version { path: PathBuf, reason: String },
    #[error("gguf: {}: {what} needs {need} bytes at offset {offset}, file has {left} left", path.display())]
    Truncated { path: PathBuf, what: String, offset: u64, need: u64, left: u64 },
    #[error("gguf: {}: {msg}", path.display())]
    Invalid { path: PathBuf, msg: String },
    #[error("gguf: {}: missing metadata key '{key}'", path.display())]
    MissingKey { path: PathBuf, key: String },
    #[error("gguf: {}: metadata key '{key}' is {found}, expected {expected}", path.display())]
    WrongType { path: PathBuf, key: String, expected: &'static str, found: String },
}

/// An open, validated GGUF file. Tensor data stays in the memory map.
#[derive(Debug)]
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub alignment: u64,
    /// Absolute file offset of the tensor data section.
    pub data_offset: u64,
    /// Metadata in file order.
    pub metadata: Vec<(String, MetaValue)>,
    /// Tensor table in file order.
    pub tensors: Vec<TensorInfo>,
    meta_index: HashMap<String, usize>,
    tensor_index: HashMap<String, usize>,
    mmap: Arc<memmap2::Mmap>,
}

/// Bounds-checked little-endian cursor over the mapped file.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn left(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn truncated(&self, what: String, need: u64) -> GgufError {
        GgufError::Truncated { path: self.path.to_path_buf(), what, offset: self.pos as u64, need, left: self.left() as u64 }
    }

    fn invalid(&self, msg: String) -> GgufError {
        GgufError::Invalid { path: self.path.to_path_buf(), msg }
    }

    fn take(&mut self, n: u64, what: impl FnOnce() -> String) -> Result<&'a [u8], GgufError> {
        if n > self.left() as u64 {
            return Err(self.truncated(what(), n));
        }
        let n = n as usize;
        let bytes = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, what: impl FnOnce() -> String) -> Result<[u8; N], GgufError> {
        let bytes = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u32(&mut self, what: impl FnOnce() -> String) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: impl FnOnce() -> String) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A GGUF string: u64 length, then bytes. Invalid UTF-8 is replaced (values only).
    fn string_lossy(&mut self, what: impl Fn() -> String) -> Result<String, GgufError> {
        let len = self.u64(|| format!("length of {}", what()))?;
        let bytes = self.take(len, &what)?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    /// A GGUF string that must be valid UTF-8 (keys and tensor names).
    fn string_strict(&mut self, what: impl Fn() -> String) -> Result<String, GgufError> {
        let len = self.u64(|| format!("length of {}", what()))?;
        let start = self.pos;
        let bytes = self.take(len, &what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_string()),
            Err(_) => Err(self.invalid(format!("{} at offset {start} is not valid utf-8", what()))),
        }
    }

    /// Smallest encoding of one value of type `t`, used to bound counts before allocating.
    fn min_size(t: u32) -> u64 {
        match t {
            ty::U8 | ty::I8 | ty::BOOL => 1,
            ty::U16 | ty::I16 => 2,
            ty::U32 | ty::I32 | ty::F32 => 4,
            ty::U64 | ty::I64 | ty::F64 | ty::STRING => 8,
            _ => 12, // array: element type + count
        }
    }

    fn value(&mut self, t: u32, key: &str, depth: u32) -> Result<MetaValue, GgufError> {
        let what = || format!("metadata '{key}'");
        Ok(match t {
            ty::U8 => MetaValue::U8(u8::from_le_bytes(self.array(what)?)),
            ty::I8 => MetaValue::I8(i8::from_le_bytes(self.array(what)?)),
            ty::U16 => MetaValue::U16(u16::from_le_bytes(self.array(what)?)),
            ty::I16 => MetaValue::I16(i16::from_le_bytes(self.array(what)?)),
            ty::U32 => MetaValue::U32(u32::from_le_bytes(self.array(what)?)),
            ty::I32 => MetaValue::I32(i32::from_le_bytes(self.array(what)?)),
            ty::U64 => MetaValue::U64(u64::from_le_bytes(self.array(what)?)),
            ty::I64 => MetaValue::I64(i64::from_le_bytes(self.array(what)?)),
            ty::F32 => MetaValue::F32(f32::from_le_bytes(self.array(what)?)),
            ty::F64 => MetaValue::F64(f64::from_le_bytes(self.array(what)?)),
            ty::BOOL => {
                let start = self.pos;
                match self.array::<1>(what)?[0] {
                    0 => MetaValue::Bool(false),
                    1 => MetaValue::Bool(true),
                    b => return Err(self.invalid(format!("metadata '{key}' has bool byte {b} at offset {start}, expected 0 or 1"))),
                }
            }
            ty::STRING => MetaValue::String(self.string_lossy(what)?),
            ty::ARRAY => {
                let start = self.pos;
                let elem = self.u32(|| format!("array type of metadata '{key}'"))?;
                if elem > ty::F64 {
                    return Err(self.invalid(format!("metadata '{key}' is an array of unknown type {elem} at offset {start}, expected 0..=12")));
                }
                if elem == ty::ARRAY && depth + 1 >= MAX_ARRAY_DEPTH {
                    return Err(self.invalid(format!("metadata '{key}' nests arrays deeper than {MAX_ARRAY_DEPTH} levels")));
                }
                let n = self.u64(|| format!("array length of metadata '{key}'"))?;
                let need = n.saturating_mul(Self::min_size(elem));
                if need > self.left() as u64 {
                    return Err(self.truncated(format!("metadata '{key}' ({n} elements of {})", MetaValue::scalar_type_name(elem)), need));
                }
                // Grow as elements actually parse rather than trusting the count.
                let mut items = Vec::with_capacity((n as usize).min(PREALLOC_MAX));
                for _ in 0..n {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            other => return Err(self.invalid(format!("metadata '{key}' has unknown value type {other}, expected 0..=12"))),
        })
    }
}

/// ggml's names for tensor types Driftwood does not read, for a clearer refusal.
fn ggml_type_name(id: u32) -> &'static str {
    match id {
        6 => "q5_0",
        7 => "q5_1",
        9 => "q8_1",
        10 => "q2_K",
        11 => "q3_K",
        15 => "q8_K",
        16 => "iq2_xxs",
        17 => "iq2_xs",
        18 => "iq3_xxs",
        19 => "iq1_s",
        20 => "iq4_nl",
        21 => "iq3_s",
        22 => "iq2_s",
        23 => "iq4_xs",
        24 => "i8",
        25 => "i16",
        26 => "i32",
        27 => "i64",
        28 => "f64",
        29 => "iq1_m",
        34 => "tq1_0",
        35 => "tq2_0",
        39 => "mxfp4",
        _ => "unknown",
    }
}

/// Bytes of a tensor of `dtype` and `dims`, or why the shape is unusable.
fn tensor_nbytes(dtype: DType, dims: &[u64]) -> Result<u64, String> {
    let mut elems: u64 = 1;
    for &d in dims {
        if d > i64::MAX as u64 {
            return Err(format!("dimension {d} exceeds {}", i64::MAX));
        }
        elems = elems.checked_mul(d).filter(|&e| e <= i64::MAX as u64).ok_or_else(|| format!("shape {dims:?} has more than {} elements", i64::MAX))?;
    }
    let row = dims.first().copied().unwrap_or(1);
    let block = dtype.block_elems() as u64;
    if !row.is_multiple_of(block) {
        return Err(format!("row length {row} is not a multiple of the {dtype} block size {block}"));
    }
    (elems / block).checked_mul(dtype.block_bytes() as u64).ok_or_else(|| format!("shape {dims:?} of {dtype} overflows the byte size"))
}

fn align_up(v: u64, align: u64) -> Option<u64> {
    v.checked_add(align - 1).map(|x| x / align * align)
}

impl GgufFile {
    /// Maps `path` and validates its header, metadata and tensor table.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let io = |op: &'static str| move |err: std::io::Error| GgufError::Io { path: path.to_path_buf(), op, err };
        let file = File::open(path).map_err(io("open"))?;
        // SAFETY: the mapping is read-only and private to this process; like every mmap-based
        // model loader we rely on the file not being truncated or rewritten while it is open.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io("mmap"))?;
        let p = parse(path, &mmap)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            version: p.version,
            alignment: p.alignment,
            data_offset: p.data_offset,
            metadata: p.metadata,
            tensors: p.tensors,
            meta_index: p.meta_index,
            tensor_index: p.tensor_index,
            mmap: Arc::new(mmap),
        })
    }

    /// The metadata value under `key`.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// The value under `key` converted by `conv`; `Ok(None)` when the key is absent.
    fn typed<'s, T>(&'s self, key: &str, expected: &'static str, conv: impl FnOnce(&'s MetaValue) -> Option<T>) -> Result<Option<T>, GgufError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        conv(v).map(Some).ok_or_else(|| GgufError::WrongType { path: self.path.clone(), key: key.to_string(), expected, found: describe(v) })
    }

    fn required<T>(&self, key: &str, v: Result<Option<T>, GgufError>) -> Result<T, GgufError> {
        v?.ok_or_else(|| GgufError::MissingKey { path: self.path.clone(), key: key.to_string() })
    }

    /// String value of `key`; `Ok(None)` if absent, an error if present with another type.
    pub fn get_str_opt(&self, key: &str) -> Result<Option<&str>, GgufError> {
        self.typed(key, "a string", MetaValue::as_str)
    }

    /// Integer value of `key` (any integer type whose value fits in u32).
    pub fn get_u32_opt(&self, key: &str) -> Result<Option<u32>, GgufError> {
        self.typed(key, "an integer that fits in u32", MetaValue::as_u32)
    }

    /// Integer value of `key` (any non-negative integer).
    pub fn get_u64_opt(&self, key: &str) -> Result<Option<u64>, GgufError> {
        self.typed(key, "a non-negative integer", MetaValue::as_u64)
    }

    /// Numeric value of `key` as f32 (f32, f64 or an integer).
    pub fn get_f32_opt(&self, key: &str) -> Result<Option<f32>, GgufError> {
        self.typed(key, "a number", MetaValue::as_f32)
    }

    /// Bool value of `key`.
    pub fn get_bool_opt(&self, key: &str) -> Result<Option<bool>, GgufError> {
        self.typed(key, "a bool", MetaValue::as_bool)
    }

    /// Array of strings under `key`.
    pub fn get_str_array_opt(&self, key: &str) -> Result<Option<Vec<&str>>, GgufError> {
        self.typed(key, "an array of strings", |v| v.as_array()?.iter().map(MetaValue::as_str).collect())
    }

    /// Array of integers (each fitting in i32) under `key`.
    pub fn get_i32_array_opt(&self, key: &str) -> Result<Option<Vec<i32>>, GgufError> {
        self.typed(key, "an array of integers that fit in i32", |v| v.as_array()?.iter().map(MetaValue::as_i32).collect())
    }

    /// Array of numbers under `key`, as f32.
    pub fn get_f32_array_opt(&self, key: &str) -> Result<Option<Vec<f32>>, GgufError> {
        self.typed(key, "an array of numbers", |v| v.as_array()?.iter().map(MetaValue::as_f32).collect())
    }

    /// Required string value of `key`.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        self.required(key, self.get_str_opt(key))
    }

    /// Required integer value of `key` that fits in u32.
    pub fn get_u32(&self, key: &str) -> Result<u32, GgufError> {
        self.required(key, self.get_u32_opt(key))
    }

    /// Required non-negative integer value of `key`.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.required(key, self.get_u64_opt(key))
    }

    /// Required numeric value of `key` as f32.
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        self.required(key, self.get_f32_opt(key))
    }

    /// Required bool value of `key`.
    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        self.required(key, self.get_bool_opt(key))
    }

    /// Required array of strings under `key`.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        self.required(key, self.get_str_array_opt(key))
    }

    /// Required array of i32-sized integers under `key`.
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>, GgufError> {
        self.required(key, self.get_i32_array_opt(key))
    }

    /// Required array of numbers under `key`, as f32.
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>, GgufError> {
        self.required(key, self.get_f32_array_opt(key))
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of `t`, straight from the mapping. `t` must come from this file's table (its
    /// extent was validated there); a foreign `TensorInfo` that does not fit gives an empty slice.
    pub fn tensor_bytes(&self, t: &TensorInfo) -> &[u8] {
        let range = usize::try_from(t.offset).ok().zip(usize::try_from(t.nbytes).ok()).and_then(|(o, n)| Some(o..o.checked_add(n)?));
        let bytes = range.and_then(|r| self.mmap.get(r));
        debug_assert!(bytes.is_some(), "tensor '{}' lies outside {}", t.name, self.path.display());
        bytes.unwrap_or(&[])
    }

    /// The whole mapping (shared, so weights can outlive this struct).
    pub fn mmap(&self) -> &Arc<memmap2::Mmap> {
        &self.mmap
    }
}

/// Everything [`parse`] learns from a file's bytes.
#[derive(Debug)]
struct Parsed {
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<TensorInfo>,
    meta_index: HashMap<String, usize>,
    tensor_index: HashMap<String, usize>,
}

/// Parses and validates the header, metadata and tensor table of a GGUF image `buf`.
fn parse(path: &Path, buf: &[u8]) -> Result<Parsed, GgufError> {
    let mut c = Cursor { buf, pos: 0, path };

    let magic = c.array::<4>(|| "magic".to_string())?;
    if magic != MAGIC {
        return Err(GgufError::NotGguf { path: path.to_path_buf(), magic: magic.to_vec() });
    }
    let version = c.u32(|| "version".to_string())?;
    let version_error = |reason: String| GgufError::Version { path: path.to_path_buf(), reason };
    match version {
        2 | 3 => {}
        1 => return Err(version_error("gguf version 1 is not supported, expected version 2 or 3 (re-convert the model with a current llama.cpp)".to_string())),
        v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
            return Err(version_error(format!("big-endian gguf (version {}) is not supported, expected a little-endian file", v.swap_bytes())))
        }
        v => return Err(version_error(format!("unsupported gguf version {v}, expected 2 or 3"))),
    }
    let n_tensors = c.u64(|| "tensor count".to_string())?;
    let n_kv = c.u64(|| "metadata count".to_string())?;

    // Each metadata entry takes at least 13 bytes (key length, type, one-byte value).
    if n_kv.saturating_mul(13) > c.left() as u64 {
        return Err(c.truncated(format!("{n_kv} metadata entries"), n_kv.saturating_mul(13)));
    }
    let mut metadata = Vec::with_capacity((n_kv as usize).min(PREALLOC_MAX));
    let mut meta_index = HashMap::with_capacity((n_kv as usize).min(PREALLOC_MAX));
    for i in 0..n_kv {
        let key = c.string_strict(|| format!("key of metadata entry {i}"))?;
        let t = c.u32(|| format!("type of metadata '{key}'"))?;
        let value = c.value(t, &key, 0)?;
        if meta_index.insert(key.clone(), metadata.len()).is_some() {
            return Err(c.invalid(format!("metadata key '{key}' appears more than once")));
        }
        metadata.push((key, value));
    }

    let alignment = match meta_index.get("general.alignment").map(|&i| &metadata[i].1) {
        None => DEFAULT_ALIGNMENT,
        Some(MetaValue::U32(a)) if a.is_power_of_two() => u64::from(*a),
        Some(other) => return Err(c.invalid(format!("general.alignment is {}, expected a u32 power of two", describe(other)))),
    };

    // Each tensor entry takes at least 24 bytes (name length, n_dims, type, offset).
    if n_tensors.saturating_mul(24) > c.left() as u64 {
        return Err(c.truncated(format!("{n_tensors} tensor entries"), n_tensors.saturating_mul(24)));
    }
    let mut raw = Vec::with_capacity((n_tensors as usize).min(PREALLOC_MAX));
    for i in 0..n_tensors {
        let name = c.string_strict(|| format!("name of tensor {i}"))?;
        let n_dims = c.u32(|| format!("dimension count of tensor '{name}'"))?;
        if n_dims > MAX_DIMS {
            return Err(c.invalid(format!("tensor '{name}' has {n_dims} dimensions, expected at most {MAX_DIMS}")));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64(|| format!("dimensions of tensor '{name}'"))?);
        }
        let type_id = c.u32(|| format!("type of tensor '{name}'"))?;
        let offset = c.u64(|| format!("offset of tensor '{name}'"))?;
        raw.push((name, dims, type_id, offset));
    }

    let file_len = buf.len() as u64;
    let data_offset = align_up(c.pos as u64, alignment).ok_or_else(|| c.invalid("data section offset overflows".to_string()))?;
    let mut tensors = Vec::with_capacity(raw.len());
    let mut tensor_index = HashMap::with_capacity(raw.len());
    for (name, dims, type_id, rel) in raw {
        let dtype = DType::from_ggml(type_id).ok_or_else(|| {
            c.invalid(format!(
                "tensor '{name}' has ggml type {type_id} ({}), expected one of f32, f16, bf16, q8_0, q4_0, q4_1, q4_K, q5_K, q6_K",
                ggml_type_name(type_id)
            ))
        })?;
        let nbytes = tensor_nbytes(dtype, &dims).map_err(|e| c.invalid(format!("tensor '{name}': {e}")))?;
        if !rel.is_multiple_of(alignment) {
            return Err(c.invalid(format!("tensor '{name}' data offset {rel} is not a multiple of the alignment {alignment}")));
        }
        let offset = data_offset.checked_add(rel).filter(|&o| o <= file_len);
        let left = offset.map_or(0, |o| file_len - o);
        let offset = match offset {
            Some(o) if nbytes <= left => o,
            _ => {
                return Err(GgufError::Truncated {
                    path: path.to_path_buf(),
                    what: format!("tensor '{name}'"),
                    offset: data_offset.saturating_add(rel),
                    need: nbytes,
                    left,
                })
            }
        };
        if tensor_index.insert(name.clone(), tensors.len()).is_some() {
            return Err(c.invalid(format!("tensor '{name}' appears more than once")));
        }
        tensors.push(TensorInfo { name, dtype, dims, offset, nbytes });
    }

    Ok(Parsed { version, alignment, data_offset, metadata, tensors, meta_index, tensor_index })
}

/// A short description of a value's type for "wrong type" errors.
fn describe(v: &MetaValue) -> String {
    match v {
        MetaValue::Array(items) => {
            let first_bad = items.iter().position(|x| x.type_id() != items[0].type_id());
            match first_bad {
                Some(i) => format!("a mixed array (element {i} differs)"),
                None => format!("{} ({} elements)", v.type_name(), items.len()),
            }
        }
        MetaValue::String(_) => "a string".to_string(),
        MetaValue::U8(x) => format!("u8 {x}"),
        MetaValue::I8(x) => format!("i8 {x}"),
        MetaValue::U16(x) => format!("u16 {x}"),
        MetaValue::I16(x) => format!("i16 {x}"),
        MetaValue::U32(x) => format!("u32 {x}"),
        MetaValue::I32(x) => format!("i32 {x}"),
        MetaValue::U64(x) => format!("u64 {x}"),
        MetaValue::I64(x) => format!("i64 {x}"),
        MetaValue::F32(x) => format!("f32 {x}"),
        MetaValue::F64(x) => format!("f64 {x}"),
        MetaValue::Bool(x) => format!("bool {x}"),
    }
}

/// Writes one tensor's bytes, in order, into the file being written (see
/// [`GgufWriter::add_tensor_streamed`]).
pub type TensorFill<'a> = Box<dyn Fn(&mut (dyn Write + Send)) -> std::io::Result<()> + 'a>;

/// Where a pending tensor's bytes come from.
enum TensorData<'a> {
    Bytes(Cow<'a, [u8]>),
    /// Produced while the file is written; the byte count is checked afterwards.
    Streamed(TensorFill<'a>),
}

/// Writes `rows` packed rows of `row_bytes` each to `out` in batches of about `batch_bytes`,
/// producing the next batch (`fill(first_row, buf)`) while the current one is written, for the
/// streamed tensors of [`GgufWriter::add_tensor_streamed`]. `progress` gets the bytes of each batch
/// written. The two batch buffers are reused from tensor to tensor (no fresh pages to zero for
/// each); their old contents are overwritten.
pub(crate) fn stream_batches(
    out: &mut (dyn Write + Send),
    rows: usize,
    row_bytes: usize,
    batch_bytes: usize,
    buffers: &mut [Vec<u8>; 2],
    progress: &dyn Fn(u64),
    fill: &(dyn Fn(usize, &mut [u8]) + Sync),
) -> std::io::Result<()> {
    if rows == 0 || row_bytes == 0 {
        return Ok(());
    }
    let batch_rows = (batch_bytes / row_bytes).clamp(1, rows);
    let batch = |first: usize, buf: &mut Vec<u8>| {
        buf.resize(batch_rows.min(rows - first) * row_bytes, 0);
        fill(first, buf);
    };
    let [current, next] = buffers;
    batch(0, current);
    let mut first = 0;
    while first < rows {
        let after = first + current.len() / row_bytes;
        let written = if after < rows {
            let (written, ()) = rayon::join(|| out.write_all(current), || batch(after, next));
            written
        } else {
            out.write_all(current)
        };
        written?;
        progress(current.len() as u64);
        std::mem::swap(current, next);
        first = after;
    }
    Ok(())
}

/// A tensor waiting to be written.
struct PendingTensor<'a> {
    name: String,
    dtype: DType,
    dims: Vec<u64>,
    data: TensorData<'a>,
}

/// Builds a GGUF v3 file: metadata and tensors in insertion order.
#[derive(Default)]
pub struct GgufWriter<'a> {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<PendingTensor<'a>>,
}

impl<'a> GgufWriter<'a> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `key` to `value`; a key set twice keeps its first position and the last value.
    pub fn add_meta(&mut self, key: impl Into<String>, value: MetaValue) -> &mut Self {
        let key = key.into();
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key, value)),
        }
        self
    }

    /// Queues a tensor. `dims` are in ggml order (`dims[0]` is the row length); `data` holds the
    /// packed rows. Shapes and sizes are checked by [`write`](Self::write).
    pub fn add_tensor(&mut self, name: impl Into<String>, dtype: DType, dims: &[u64], data: impl Into<Cow<'a, [u8]>>) -> &mut Self {
        self.tensors.push(PendingTensor { name: name.into(), dtype, dims: dims.to_vec(), data: TensorData::Bytes(data.into()) });
        self
    }

    /// Queues a tensor whose packed rows `fill` writes when the file is written, so only the
    /// tensor being produced needs memory. `fill` must write exactly the bytes `dtype` and `dims`
    /// call for (checked: a mismatch fails the write and leaves no file behind).
    pub fn add_tensor_streamed(
        &mut self,
        name: impl Into<String>,
        dtype: DType,
        dims: &[u64],
        fill: impl Fn(&mut (dyn Write + Send)) -> std::io::Result<()> + 'a,
    ) -> &mut Self {
        self.tensors.push(PendingTensor { name: name.into(), dtype, dims: dims.to_vec(), data: TensorData::Streamed(Box::new(fill)) });
        self
    }

    /// The temporary sibling [`write`](Self::write) fills before renaming it onto `path`
    /// (`path` + `.tmp`); it is replaced if it exists.
    pub fn temp_path(path: &Path) -> PathBuf {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".tmp");
        path.with_file_name(name)
    }

    /// Writes the file to a temporary sibling, syncs it and renames it over `path`, so a failure
    /// never leaves a partial file under the final name.
    pub fn write(&self, path: &Path) -> Result<(), GgufError> {
        let invalid = |msg: String| GgufError::Invalid { path: path.to_path_buf(), msg };
        let alignment = match self.metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some((_, MetaValue::U32(a))) if a.is_power_of_two() => u64::from(*a),
            Some((_, other)) => return Err(invalid(format!("general.alignment is {}, expected a u32 power of two", describe(other)))),
        };
        for (key, value) in &self.metadata {
            check_homogeneous(value).map_err(|e| invalid(format!("metadata '{key}': {e}")))?;
        }
        let mut offsets = Vec::with_capacity(self.tensors.len());
        let mut sizes = Vec::with_capacity(self.tensors.len());
        let mut next: u64 = 0;
        for (i, t) in self.tensors.iter().enumerate() {
            if self.tensors[..i].iter().any(|o| o.name == t.name) {
                return Err(invalid(format!("tensor '{}' added more than once", t.name)));
            }
            if t.dims.len() > MAX_DIMS as usize {
                return Err(invalid(format!("tensor '{}' has {} dimensions, expected at most {MAX_DIMS}", t.name, t.dims.len())));
            }
            let need = tensor_nbytes(t.dtype, &t.dims).map_err(|e| invalid(format!("tensor '{}': {e}", t.name)))?;
            if let TensorData::Bytes(data) = &t.data {
                if need != data.len() as u64 {
                    return Err(invalid(format!("tensor '{}' has {} bytes, expected {need} for {} {:?}", t.name, data.len(), t.dtype, t.dims)));
                }
            }
            offsets.push(next);
            sizes.push(need);
            next = align_up(next + need, alignment).ok_or_else(|| invalid("tensor data exceeds u64".to_string()))?;
        }

        let tmp = Self::temp_path(path);
        let io = |op: &'static str| {
            let p = tmp.clone();
            move |err: std::io::Error| GgufError::Io { path: p, op, err }
        };
        let file = File::create(&tmp).map_err(io("create"))?;
        let mut w = CountingWriter { inner: BufWriter::with_capacity(1 << 20, file), written: 0 };
        let result = (|| -> std::io::Result<()> {
            w.put(&MAGIC)?;
            w.put(&3u32.to_le_bytes())?;
            w.put(&(self.tensors.len() as u64).to_le_bytes())?;
            w.put(&(self.metadata.len() as u64).to_le_bytes())?;
            for (key, value) in &self.metadata {
                write_str(&mut w, key)?;
                w.put(&value.type_id().to_le_bytes())?;
                write_value(&mut w, value)?;
            }
            for (t, off) in self.tensors.iter().zip(&offsets) {
                write_str(&mut w, &t.name)?;
                w.put(&(t.dims.len() as u32).to_le_bytes())?;
                for d in &t.dims {
                    w.put(&d.to_le_bytes())?;
                }
                w.put(&t.dtype.ggml_id().to_le_bytes())?;
                w.put(&off.to_le_bytes())?;
            }
            let data_start = align_up(w.written, alignment).unwrap_or(w.written);
            w.pad_to(data_start)?;
            for ((t, off), &need) in self.tensors.iter().zip(&offsets).zip(&sizes) {
                w.pad_to(data_start + off)?;
                match &t.data {
                    TensorData::Bytes(data) => w.put(data)?,
                    TensorData::Streamed(fill) => {
                        fill(&mut w)?;
                        let wrote = w.written - (data_start + off);
                        if wrote != need {
                            let msg = format!("tensor '{}' streamed {wrote} bytes, expected {need} for {} {:?}", t.name, t.dtype, t.dims);
                            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, msg));
                        }
                    }
                }
            }
            w.pad_to(align_up(w.written, alignment).unwrap_or(w.written))?;
            let file = w.inner.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()
        })();
        if let Err(err) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(io("write")(err));
        }
        std::fs::rename(&tmp, path).map_err(|err| GgufError::Io { path: path.to_path_buf(), op: "rename the temporary file onto", err })
    }
}

/// Every array in `v` (recursively) must have elements of a single type.
fn check_homogeneous(v: &MetaValue) -> Result<(), String> {
    if let MetaValue::Array(items) = v {
        if let Some(first) = items.first() {
            if let Some(i) = items.iter().position(|x| x.type_id() != first.type_id()) {
                return Err(format!("array element {i} is {}, expected {} like element 0", items[i].type_name(), first.type_name()));
            }
        }
        items.iter().try_for_each(check_homogeneous)?;
    }
    Ok(())
}

struct CountingWriter<W: Write> {
    inner: W,
    written: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<W: Write> CountingWriter<W> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.inner.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad_to(&mut self, pos: u64) -> std::io::Result<()> {
        const ZEROS: [u8; 64] = [0; 64];
        while self.written < pos {
            let n = (pos - self.written).min(ZEROS.len() as u64) as usize;
            self.put(&ZEROS[..n])?;
        }
        Ok(())
    }
}

fn write_str<W: Write>(w: &mut CountingWriter<W>, s: &str) -> std::io::Result<()> {
    w.put(&(s.len() as u64).to_le_bytes())?;
    w.put(s.as_bytes())
}

fn write_value<W: Write>(w: &mut CountingWriter<W>, v: &MetaValue) -> std::io::Result<()> {
    match v {
        MetaValue::U8(x) => w.put(&x.to_le_bytes()),
        MetaValue::I8(x) => w.put(&x.to_le_bytes()),
        MetaValue::U16(x) => w.put(&x.to_le_bytes()),
        MetaValue::I16(x) => w.put(&x.to_le_bytes()),
        MetaValue::U32(x) => w.put(&x.to_le_bytes()),
        MetaValue::I32(x) => w.put(&x.to_le_bytes()),
        MetaValue::U64(x) => w.put(&x.to_le_bytes()),
        MetaValue::I64(x) => w.put(&x.to_le_bytes()),
        MetaValue::F32(x) => w.put(&x.to_le_bytes()),
        MetaValue::F64(x) => w.put(&x.to_le_bytes()),
        MetaValue::Bool(x) => w.put(&[u8::from(*x)]),
        MetaValue::String(s) => write_str(w, s),
        MetaValue::Array(items) => {
            // An empty array has no element to take a type from. It is written as an array of
            // strings: llama.cpp checks that type even when empty (`tokenizer.ggml.merges` of a
            // byte-level vocabulary without merges), and no reader needs another for no elements.
            let elem = items.first().map_or(ty::STRING, MetaValue::type_id);
            w.put(&elem.to_le_bytes())?;
            w.put(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|x| write_value(w, x))
        }
    }
}

#[cfg(test)]
mod tests;
