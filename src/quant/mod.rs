//! Weight formats: the one table of every fact about each tensor encoding.
//!
//! Part of the ground floor (with [`crate::region`] and [`crate::numeric`]): it imports nothing
//! above it, and the engine, the backends and the file formats all read their per-format facts
//! from here. `DType` names every encoding Driftwood reads or writes: plain floats (F32, F16,
//! BF16) and the ggml block quantizations (Q8_0, Q4_0, Q4_1 and the K-quants Q4_K, Q5_K, Q6_K).
//! Per format, [`FORMATS`] holds its block size and bytes, its GGUF (`ggml_type`) id and
//! llama.cpp file type, the activation encoding its products pair with ([`ActFormat`], ggml's
//! `vec_dot_type`) and the codes the CUDA kernels use; [`codec`] holds the row codec
//! (quantize/dequantize). The ids, block sizes and byte sizes are exactly those of ggml
//! (`ggml.h` / `ggml-common.h`), so a GGUF file written by llama.cpp maps onto these types without
//! conversion. The CUDA kernels get their numbers from [`kernel_prelude`], generated from this
//! table, so no code is written twice by hand.

pub mod codec;
#[cfg(test)]
mod tests;

use std::fmt;

pub use codec::{dequantize_row, quantize_row};

/// A tensor element type, with ggml's numbering and block layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[allow(non_camel_case_types)] // ggml's spelling (Q4_K) is what users and GGUF tools print
pub enum DType {
    /// IEEE-754 binary32.
    F32,
    /// IEEE-754 binary16.
    F16,
    /// bfloat16 (the top 16 bits of an f32).
    BF16,
    /// Blocks of 32: f16 scale `d`, 32 × i8.
    Q8_0,
    /// Blocks of 32: f16 scale `d`, 16 bytes of nibbles; value = (q - 8) · d.
    Q4_0,
    /// Blocks of 32: f16 scale `d`, f16 min `m`, 16 bytes of nibbles; value = q · d + m.
    Q4_1,
    /// Super-blocks of 256: f16 `d`, f16 `dmin`, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles.
    Q4_K,
    /// Super-blocks of 256: f16 `d`, f16 `dmin`, 12 bytes of scales/mins, 32 bytes of high bits,
    /// 128 bytes of nibbles.
    Q5_K,
    /// Super-blocks of 256: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 × i8
    /// scales, f16 `d`.
    Q6_K,
}

/// Elements in one K-quant super-block (ggml's `QK_K`).
pub const QK_K: usize = 256;
/// Elements in one Q8_0 / Q4_0 / Q4_1 block (ggml's `QK8_0`, `QK4_0`, `QK4_1`).
pub const QK: usize = 32;

/// The encoding a product's activations are rounded to before they meet a weight format's rows
/// (ggml's `vec_dot_type`): both devices round the same way, so they compute the same function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActFormat {
    /// f32 as is (F32 weights).
    F32,
    /// f32 values rounded through f16 (F16 weights).
    F16,
    /// f32 values rounded through bf16 (BF16 weights).
    BF16,
    /// 8-bit blocks of 32 carrying the Q8_0 scale and the Q8_1 sum (Q4_0, Q4_1, Q8_0 weights).
    Q8,
    /// 8-bit super-blocks of 256 with sums per 16 (Q8_K, for the K-quants).
    Q8K,
}

impl ActFormat {
    /// Every activation format, in kernel-code order.
    pub const ALL: [ActFormat; 5] = [ActFormat::F32, ActFormat::F16, ActFormat::BF16, ActFormat::Q8, ActFormat::Q8K];

    /// The code kernels.cu uses (`AK_*`).
    pub fn kernel_code(self) -> u32 {
        self as u32
    }

    /// The `AK_*` name in kernels.cu.
    pub fn kernel_name(self) -> &'static str {
        match self {
            ActFormat::F32 => "AK_F32",
            ActFormat::F16 => "AK_F16",
            ActFormat::BF16 => "AK_BF16",
            ActFormat::Q8 => "AK_Q8",
            ActFormat::Q8K => "AK_Q8K",
        }
    }

    /// Values per quantized unit (one scale); 1 for the float formats.
    pub fn block_elems(self) -> usize {
        match self {
            ActFormat::F32 | ActFormat::F16 | ActFormat::BF16 => 1,
            ActFormat::Q8 => QK,
            ActFormat::Q8K => QK_K,
        }
    }
}

/// Everything about one weight format, in one row.
#[derive(Debug, Clone, Copy)]
pub struct Format {
    pub dtype: DType,
    /// ggml's name (`ggml_type_name`): `f32`, `q4_K`, ...
    pub name: &'static str,
    /// ggml's id (`enum ggml_type`), as GGUF files store it.
    pub ggml_id: u32,
    /// llama.cpp's `general.file_type` (`enum llama_ftype`) for a model whose matrices are mostly
    /// this type (`LLAMA_FTYPE_MOSTLY_Q4_K_M` for Q4_K, `..._Q5_K_M` for Q5_K).
    pub llama_file_type: u32,
    /// Elements per block (1 for plain floats).
    pub block_elems: usize,
    /// Bytes per block.
    pub block_bytes: usize,
    /// The activation encoding its products use.
    pub activation: ActFormat,
}

/// The table, indexed by `DType as usize` (which is also the code kernels.cu uses, `DT_*`).
pub const FORMATS: [Format; 9] = [
    Format { dtype: DType::F32, name: "f32", ggml_id: 0, llama_file_type: 0, block_elems: 1, block_bytes: 4, activation: ActFormat::F32 },
    Format { dtype: DType::F16, name: "f16", ggml_id: 1, llama_file_type: 1, block_elems: 1, block_bytes: 2, activation: ActFormat::F16 },
    Format { dtype: DType::BF16, name: "bf16", ggml_id: 30, llama_file_type: 32, block_elems: 1, block_bytes: 2, activation: ActFormat::BF16 },
    // [d f16][32 × i8]
    Format { dtype: DType::Q8_0, name: "q8_0", ggml_id: 8, llama_file_type: 7, block_elems: QK, block_bytes: 2 + QK, activation: ActFormat::Q8 },
    // [d f16][16 bytes of nibbles]
    Format { dtype: DType::Q4_0, name: "q4_0", ggml_id: 2, llama_file_type: 2, block_elems: QK, block_bytes: 2 + QK / 2, activation: ActFormat::Q8 },
    // [d f16][m f16][16 bytes of nibbles]
    Format { dtype: DType::Q4_1, name: "q4_1", ggml_id: 3, llama_file_type: 3, block_elems: QK, block_bytes: 4 + QK / 2, activation: ActFormat::Q8 },
    // [d f16][dmin f16][12 bytes of 6-bit scales/mins][128 bytes of nibbles]
    Format {
        dtype: DType::Q4_K,
        name: "q4_K",
        ggml_id: 12,
        llama_file_type: 15,
        block_elems: QK_K,
        block_bytes: 4 + 12 + QK_K / 2,
        activation: ActFormat::Q8K,
    },
    // as Q4_K, plus 32 bytes of high bits before the nibbles
    Format {
        dtype: DType::Q5_K,
        name: "q5_K",
        ggml_id: 13,
        llama_file_type: 17,
        block_elems: QK_K,
        block_bytes: 4 + 12 + QK_K / 8 + QK_K / 2,
        activation: ActFormat::Q8K,
    },
    // [128 bytes of low nibbles][64 bytes of high 2-bit pairs][16 × i8 scales][d f16]
    Format {
        dtype: DType::Q6_K,
        name: "q6_K",
        ggml_id: 14,
        llama_file_type: 18,
        block_elems: QK_K,
        block_bytes: QK_K / 2 + QK_K / 4 + QK_K / 16 + 2,
        activation: ActFormat::Q8K,
    },
];

impl DType {
    /// Every type, in ggml id order.
    pub const ALL: [DType; 9] = [DType::F32, DType::F16, DType::Q4_0, DType::Q4_1, DType::Q8_0, DType::Q4_K, DType::Q5_K, DType::Q6_K, DType::BF16];

    /// This type's row of [`FORMATS`].
    #[inline]
    pub fn format(self) -> &'static Format {
        &FORMATS[self as usize]
    }

    /// The type with ggml id `id` (`enum ggml_type`), or `None` for ids Driftwood does not handle.
    pub fn from_ggml(id: u32) -> Option<DType> {
        FORMATS.iter().find(|f| f.ggml_id == id).map(|f| f.dtype)
    }

    /// ggml's id for this type (`GGML_TYPE_*`).
    pub fn ggml_id(self) -> u32 {
        self.format().ggml_id
    }

    /// llama.cpp's `general.file_type` for a model whose matrices are mostly this type.
    pub fn llama_file_type(self) -> u32 {
        self.format().llama_file_type
    }

    /// Elements per block (1 for plain floats).
    #[inline]
    pub fn block_elems(self) -> usize {
        self.format().block_elems
    }

    /// Bytes per block.
    #[inline]
    pub fn block_bytes(self) -> usize {
        self.format().block_bytes
    }

    /// The activation encoding products with this type's rows use.
    #[inline]
    pub fn activation(self) -> ActFormat {
        self.format().activation
    }

    /// The code kernels.cu uses for this type (`DT_*`).
    #[inline]
    pub fn kernel_code(self) -> u32 {
        self as u32
    }

    /// Bytes of a row of `n` elements; `None` unless `n` is a multiple of
    /// [`block_elems`](Self::block_elems) (or the size overflows `usize`).
    #[inline]
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_elems()) {
            return None;
        }
        (n / self.block_elems()).checked_mul(self.block_bytes())
    }

    /// ggml's name for the type (`ggml_type_name`): `f32`, `q4_K`, ...
    pub fn name(self) -> &'static str {
        self.format().name
    }

    /// True for the block-quantized types (everything but F32, F16 and BF16).
    #[inline]
    pub fn is_quantized(self) -> bool {
        self.block_elems() > 1
    }

    /// Parses a type name as a user would type it: ggml's names, case-insensitive
    /// (`q4_k`, `Q8_0`, `BF16`), plus the aliases `fp32`/`float32`, `fp16`/`float16`/`half`,
    /// `bfloat16`.
    pub fn parse(s: &str) -> Option<DType> {
        let lower = s.trim().to_ascii_lowercase();
        let alias = match lower.as_str() {
            "fp32" | "float32" => Some(DType::F32),
            "fp16" | "float16" | "half" => Some(DType::F16),
            "bfloat16" => Some(DType::BF16),
            _ => None,
        };
        alias.or_else(|| FORMATS.iter().find(|f| f.name.eq_ignore_ascii_case(&lower)).map(|f| f.dtype))
    }

    /// The `DT_*` name in kernels.cu.
    fn kernel_name(self) -> String {
        format!("DT_{}", self.name().to_ascii_uppercase())
    }
}

/// Longest forward pass, in tokens, the engine runs at once; the CUDA step record holds this many
/// token ids.
pub const MAX_PASS_TOKENS: usize = 512;

/// C preprocessor definitions of every number kernels.cu shares with Rust, generated from the
/// table: `DT_*` (weight formats), `AK_*` (activation formats), `act_kind(dt)` (the pairing),
/// `block_bytes(dt)` and `MAX_BATCH`. The CUDA backend puts this in front of the kernel source.
pub fn kernel_prelude() -> String {
    use std::fmt::Write;
    let mut s = String::from("// Generated from src/quant/mod.rs (the format table): do not edit.\n");
    let _ = writeln!(s, "#define MAX_BATCH {MAX_PASS_TOKENS}");
    for f in &FORMATS {
        let _ = writeln!(s, "#define {} {}", f.dtype.kernel_name(), f.dtype.kernel_code());
    }
    for a in ActFormat::ALL {
        let _ = writeln!(s, "#define {} {}", a.kernel_name(), a.kernel_code());
    }
    let table = |value: &dyn Fn(&Format) -> String| {
        let mut e = String::from("-1");
        for f in FORMATS.iter().rev() {
            e = format!("dt == {} ? {} : {e}", f.dtype.kernel_name(), value(f));
        }
        e
    };
    let _ = writeln!(s, "__host__ __device__ constexpr int act_kind(int dt) {{ return {}; }}", table(&|f| f.activation.kernel_name().to_string()));
    let _ = writeln!(s, "__host__ __device__ constexpr int block_bytes(int dt) {{ return {}; }}", table(&|f| f.block_bytes.to_string()));
    s
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
