//! Re-encoding a GGUF model's weight matrices into another format (`driftwood convert`).
//!
//! [`convert`] copies a GGUF file with every 2-D weight matrix dequantized to f32 and packed as the
//! target [`DType`] by the reference quantizers (the ones llama-quantize uses without an
//! importance matrix), so a real model runs in F16/BF16/F32 or another quantization. Metadata is
//! copied unchanged (alignment included) except `general.file_type`, and tensors keep their order.
//! A tensor is written in its original encoding when it is not a matrix (norm weights), when it is
//! already in the target format (re-encoding could only lose precision), or when its rows do not
//! fill whole blocks of the target (K-quants need multiples of 256); the [`ConvertReport`] says
//! which and why. Rows are converted in parallel and streamed into the file in batches straight
//! from the input's memory map, so memory stays at a few tens of megabytes whatever the model
//! size, and the output appears under its name only once complete.

use std::cell::{Cell, RefCell};
use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::gguf::{GgufError, GgufFile, GgufWriter, MetaValue, TensorInfo};
use crate::quant;
use crate::quant::DType;

/// Output bytes converted per batch; two batches (one being written, one being filled) are live.
const BATCH_BYTES: usize = 32 << 20;

/// Errors of converting a model; every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("convert: {}: the output would overwrite the input {}; write the converted model to another path", output.display(), input.display())]
    SameFile { input: PathBuf, output: PathBuf },
    #[error("convert: {}: no weight matrix can be stored as {dtype}: {reason}", path.display())]
    NothingFits { path: PathBuf, dtype: DType, reason: String },
    #[error("convert: {}: cannot {op}: {source}", path.display())]
    Io { path: PathBuf, op: &'static str, source: std::io::Error },
}

/// Why a tensor was written in its original encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kept {
    /// Not a 2-D weight matrix (norm weights and RoPE factors are 1-D).
    NotAMatrix { n_dims: usize },
    /// Already in the target format: copied byte for byte.
    AlreadyTarget,
    /// Rows of `cols` elements do not fill whole blocks of the target format.
    RowLength { cols: u64 },
}

/// One tensor written in its original encoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeptTensor {
    pub name: String,
    pub dtype: DType,
    pub why: Kept,
}

/// What [`convert`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct ConvertReport {
    /// The target format.
    pub dtype: DType,
    /// Names of the re-encoded tensors, in file order.
    pub converted: Vec<String>,
    /// Tensors written as they were, in file order.
    pub kept: Vec<KeptTensor>,
    /// Sizes of the input and output files.
    pub input_bytes: u64,
    pub output_bytes: u64,
}

impl ConvertReport {
    /// One line for people: `converted 211 of 272 tensors to f16; kept 61 as they were: 61 vectors (norms)`.
    pub fn summary(&self) -> String {
        let total = self.converted.len() + self.kept.len();
        let mut line = format!("converted {} of {total} tensors to {}", self.converted.len(), self.dtype);
        if self.kept.is_empty() {
            return line;
        }
        let count = |f: &dyn Fn(&Kept) -> bool| self.kept.iter().filter(|k| f(&k.why)).count();
        let mut parts = Vec::new();
        let vectors = count(&|k| *k == Kept::NotAMatrix { n_dims: 1 });
        if vectors > 0 {
            parts.push(format!("{vectors} vectors (norms)"));
        }
        let others = count(&|k| matches!(k, Kept::NotAMatrix { n_dims } if *n_dims != 1));
        if others > 0 {
            parts.push(format!("{others} neither vectors nor matrices"));
        }
        let already = count(&|k| *k == Kept::AlreadyTarget);
        if already > 0 {
            parts.push(format!("{already} already {}", self.dtype));
        }
        let mut widths: Vec<u64> = self.kept.iter().filter_map(|k| if let Kept::RowLength { cols } = k.why { Some(cols) } else { None }).collect();
        if !widths.is_empty() {
            let n = widths.len();
            widths.sort_unstable();
            widths.dedup();
            let widths: Vec<String> = widths.iter().map(u64::to_string).collect();
            parts.push(format!("{n} with rows of {} (not a multiple of the {} block size {})", widths.join(" or "), self.dtype, self.dtype.block_elems()));
        }
        line.push_str(&format!("; kept {} as they were: {}", self.kept.len(), parts.join(", ")));
        line
    }
}

/// `None` if `t` is re-encoded as `dtype`, otherwise why it is kept.
fn plan(t: &TensorInfo, dtype: DType) -> Option<Kept> {
    if t.dims.len() != 2 {
        return Some(Kept::NotAMatrix { n_dims: t.dims.len() });
    }
    if t.dtype == dtype {
        return Some(Kept::AlreadyTarget);
    }
    let cols = t.dims[0];
    if !cols.is_multiple_of(dtype.block_elems() as u64) {
        return Some(Kept::RowLength { cols });
    }
    None
}

/// `path` with its directory resolved (symlinks, `..`), whether or not the file exists; `None`
/// when the directory does not exist (then nothing can be written there anyway).
fn resolved(path: &Path) -> Option<PathBuf> {
    if let Ok(p) = std::fs::canonicalize(path) {
        return Some(p);
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Some(std::fs::canonicalize(dir).ok()?.join(path.file_name()?))
}

/// Refuses an output that is the input or whose temporary file would be (creating it truncates
/// the file being read through the memory map).
fn check_distinct(input: &Path, output: &Path) -> Result<(), ConvertError> {
    let same = ConvertError::SameFile { input: input.to_owned(), output: output.to_owned() };
    let input_real = std::fs::canonicalize(input).map_err(|source| ConvertError::Io { path: input.to_owned(), op: "resolve the path", source })?;
    for candidate in [output.to_owned(), GgufWriter::temp_path(output)] {
        if resolved(&candidate).is_some_and(|p| p == input_real) {
            return Err(same);
        }
    }
    Ok(())
}

/// Why nothing in `file` can be stored as `dtype`.
fn nothing_fits(file: &GgufFile, dtype: DType) -> ConvertError {
    let mut widths: Vec<u64> = file.tensors.iter().filter(|t| t.dims.len() == 2).map(|t| t.dims[0]).collect();
    widths.sort_unstable();
    widths.dedup();
    let reason = if widths.is_empty() {
        "the file has no 2-D tensor".to_owned()
    } else {
        let widths: Vec<String> = widths.iter().map(u64::to_string).collect();
        format!("its rows of {} are not multiples of the {dtype} block size {}", widths.join(", "), dtype.block_elems())
    };
    ConvertError::NothingFits { path: file.path.clone(), dtype, reason }
}

/// One matrix to re-encode: `rows × cols` packed rows of `from`, borrowed from the input's map.
struct Reencode<'a> {
    src: &'a [u8],
    from: DType,
    to: DType,
    rows: usize,
    cols: usize,
}

impl Reencode<'_> {
    /// Writes the rows as `to` into `out`, one batch at a time, converting the next batch while
    /// the current one is written. `progress` gets the bytes of each batch written. The two batch
    /// buffers are reused from matrix to matrix; their old contents are overwritten.
    fn stream(&self, out: &mut (dyn Write + Send), progress: &dyn Fn(u64), buffers: &mut [Vec<u8>; 2]) -> std::io::Result<()> {
        let Reencode { src, from, to, rows, cols } = *self;
        let invalid = |msg: String| std::io::Error::new(std::io::ErrorKind::InvalidData, msg);
        let (Some(src_row), Some(dst_row)) = (from.row_bytes(cols), to.row_bytes(cols)) else {
            return Err(invalid(format!("rows of {cols} do not fill whole blocks of {from} and {to}")));
        };
        if rows == 0 || dst_row == 0 {
            return Ok(());
        }
        if src.len() != rows * src_row {
            return Err(invalid(format!("{} bytes for {rows} rows of {cols} {from}, expected {}", src.len(), rows * src_row)));
        }
        let fill = |first: usize, buf: &mut [u8]| {
            let n = buf.len() / dst_row;
            let src = &src[first * src_row..(first + n) * src_row];
            buf.par_chunks_mut(dst_row).zip(src.par_chunks(src_row)).with_min_len(8).for_each_init(
                || vec![0f32; cols],
                |values, (dst, src)| {
                    quant::dequantize_row(from, src, values);
                    quant::quantize_row(to, values, dst);
                },
            );
        };
        crate::engine::gguf::stream_batches(out, rows, dst_row, BATCH_BYTES, buffers, progress, &fill)
    }
}

/// Writes a copy of the GGUF model `input` to `output` with every weight matrix that fits whole
/// blocks of `dtype` re-encoded as `dtype` (see the module docs for what is kept and why).
/// `progress(done, total)` reports tensor bytes written. Refuses an `output` that is the input,
/// and a conversion that would change no tensor's format. The file appears under `output` only
/// once complete; on any error nothing is left there.
pub fn convert(input: &Path, output: &Path, dtype: DType, progress: impl Fn(u64, u64)) -> Result<ConvertReport, ConvertError> {
    let file = GgufFile::open(input)?;
    check_distinct(input, output)?;

    let plans: Vec<Option<Kept>> = file.tensors.iter().map(|t| plan(t, dtype)).collect();
    let mut converted = Vec::new();
    let mut kept = Vec::new();
    for (t, p) in file.tensors.iter().zip(&plans) {
        match p {
            None => converted.push(t.name.clone()),
            Some(why) => kept.push(KeptTensor { name: t.name.clone(), dtype: t.dtype, why: *why }),
        }
    }
    if converted.is_empty() && !kept.iter().any(|k| k.why == Kept::AlreadyTarget) {
        return Err(nothing_fits(&file, dtype));
    }

    let out_bytes = |t: &TensorInfo, p: &Option<Kept>| match p {
        Some(_) => t.nbytes,
        // `plan` checked that the rows fit; the writer checks the total again.
        None => dtype.row_bytes(t.dims[0] as usize).unwrap_or(0) as u64 * t.dims[1],
    };
    let total: u64 = file.tensors.iter().zip(&plans).map(|(t, p)| out_bytes(t, p)).sum();
    let done = Cell::new(0u64);
    let advance = |n: u64| {
        done.set(done.get() + n);
        progress(done.get(), total);
    };
    let buffers = &RefCell::new([Vec::new(), Vec::new()]);

    let mut w = GgufWriter::new();
    for (key, value) in &file.metadata {
        let value = match key.as_str() {
            "general.file_type" => MetaValue::U32(dtype.llama_file_type()),
            _ => value.clone(),
        };
        w.add_meta(key.as_str(), value);
    }
    for (t, p) in file.tensors.iter().zip(&plans) {
        let src = file.tensor_bytes(t);
        match p {
            Some(_) => w.add_tensor_streamed(t.name.as_str(), t.dtype, &t.dims, |out| {
                for chunk in src.chunks(BATCH_BYTES) {
                    out.write_all(chunk)?;
                    advance(chunk.len() as u64);
                }
                Ok(())
            }),
            None => {
                let matrix = Reencode { src, from: t.dtype, to: dtype, rows: t.dims[1] as usize, cols: t.dims[0] as usize };
                w.add_tensor_streamed(t.name.as_str(), dtype, &t.dims, move |out| matrix.stream(out, &advance, &mut buffers.borrow_mut()))
            }
        };
    }
    progress(0, total);
    w.write(output)?;

    let size =
        |path: &Path| std::fs::metadata(path).map(|m| m.len()).map_err(|source| ConvertError::Io { path: path.to_owned(), op: "read the size of", source });
    Ok(ConvertReport { dtype, converted, kept, input_bytes: file.mmap().len() as u64, output_bytes: size(output)? })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows of `cols` values spread like weights (and one all-zero row), packed as `dtype`.
    fn packed_rows(dtype: DType, rows: usize, cols: usize) -> Vec<u8> {
        let row_bytes = dtype.row_bytes(cols).unwrap();
        let mut out = vec![0u8; rows * row_bytes];
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        for (r, dst) in out.chunks_exact_mut(row_bytes).enumerate() {
            let values: Vec<f32> = (0..cols)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                    // Row 0 is zeros; the others vary in scale and offset, like real weight rows.
                    if r == 0 {
                        0.0
                    } else {
                        u * 0.2 * r as f32 + 0.01 * (r % 3) as f32
                    }
                })
                .collect();
            quant::quantize_row(dtype, &values, dst);
        }
        out
    }

    fn reencode(src: &[u8], from: DType, to: DType, rows: usize, cols: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buffers = [Vec::new(), Vec::new()];
        Reencode { src, from, to, rows, cols }.stream(&mut out, &|_| {}, &mut buffers).unwrap();
        out
    }

    #[test]
    fn reencoding_the_reference_quantizers_output_is_idempotent_where_the_format_allows() {
        // quantize(dequantize(x)) == x holds for the float formats and for the 32-element block
        // formats packed by the reference quantizers: the block's extreme value decodes to a
        // number that gives back the same f16 scale (and min), and every other value decodes to
        // within a small fraction of a step of its level. The K-quants search their sub-block
        // scales, and a second search over the decoded values may choose others: on 400 such
        // rows Q5_K and Q6_K changed bytes, and Q4_K did not only by luck, so none is asserted.
        let (rows, cols) = (64, 512);
        for dtype in DType::ALL {
            let src = packed_rows(dtype, rows, cols);
            let again = reencode(&src, dtype, dtype, rows, cols);
            let differing = src.iter().zip(&again).filter(|(a, b)| a != b).count();
            println!("{dtype} -> {dtype}: {differing} of {} bytes differ", src.len());
            if !matches!(dtype, DType::Q4_K | DType::Q5_K | DType::Q6_K) {
                assert!(src == again, "{dtype} re-encoded into itself changed {differing} bytes");
            }
        }
    }

    #[test]
    fn reencoding_to_floats_decodes_exactly_and_back_again() {
        // Every Q4_1 value is q·d + m with f16 d and m: f32 holds it exactly, so Q4_1 -> F32 ->
        // Q4_1 gives back the bytes (and batches split anywhere give the same result).
        let (rows, cols) = (5, 64);
        let q = packed_rows(DType::Q4_1, rows, cols);
        let f = reencode(&q, DType::Q4_1, DType::F32, rows, cols);
        let mut want = vec![0f32; rows * cols];
        for (r, o) in q.chunks_exact(DType::Q4_1.row_bytes(cols).unwrap()).zip(want.chunks_exact_mut(cols)) {
            quant::dequantize_row(DType::Q4_1, r, o);
        }
        let got: Vec<f32> = f.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        assert_eq!(got, want);
        assert!(reencode(&f, DType::F32, DType::Q4_1, rows, cols) == q);
    }

    #[test]
    fn plan_keeps_vectors_targets_and_rows_that_do_not_fit() {
        let t = |dims: &[u64], dtype| TensorInfo { name: "t".into(), dtype, dims: dims.to_vec(), offset: 0, nbytes: 0 };
        assert_eq!(plan(&t(&[576], DType::F32), DType::F16), Some(Kept::NotAMatrix { n_dims: 1 }));
        assert_eq!(plan(&t(&[64, 2, 2], DType::F32), DType::F16), Some(Kept::NotAMatrix { n_dims: 3 }));
        assert_eq!(plan(&t(&[576, 576], DType::Q8_0), DType::Q8_0), Some(Kept::AlreadyTarget));
        assert_eq!(plan(&t(&[576, 576], DType::Q4_1), DType::Q4_K), Some(Kept::RowLength { cols: 576 }));
        assert_eq!(plan(&t(&[1536, 576], DType::Q4_1), DType::Q4_K), None);
        assert_eq!(plan(&t(&[576, 576], DType::Q4_1), DType::F16), None);
    }

    #[test]
    fn summary_counts_each_reason() {
        let k = |why| KeptTensor { name: "x".into(), dtype: DType::Q4_1, why };
        let report = ConvertReport {
            dtype: DType::Q4_K,
            converted: vec!["a".into(), "b".into()],
            kept: vec![k(Kept::NotAMatrix { n_dims: 1 }), k(Kept::RowLength { cols: 576 }), k(Kept::RowLength { cols: 576 }), k(Kept::AlreadyTarget)],
            input_bytes: 0,
            output_bytes: 0,
        };
        assert_eq!(
            report.summary(),
            "converted 2 of 6 tensors to q4_K; kept 4 as they were: 1 vectors (norms), 1 already q4_K, \
             2 with rows of 576 (not a multiple of the q4_K block size 256)"
        );
    }
}
