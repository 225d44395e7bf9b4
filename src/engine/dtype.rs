//! Element types of weight tensors and their ggml block layouts.
//!
//! `DType` names every tensor encoding Driftwood reads or writes: plain floats (F32, F16, BF16)
//! and the ggml block quantizations (Q8_0, Q4_0, Q4_1 and the K-quants Q4_K, Q5_K, Q6_K). The ids,
//! block sizes and byte sizes are exactly those of ggml (`ggml.h` / `ggml-common.h`), so a GGUF file
//! written by llama.cpp maps onto these types without conversion.

use std::fmt;

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

impl DType {
    /// Every type, in ggml id order.
    pub const ALL: [DType; 9] = [DType::F32, DType::F16, DType::Q4_0, DType::Q4_1, DType::Q8_0, DType::Q4_K, DType::Q5_K, DType::Q6_K, DType::BF16];

    /// The type with ggml id `id` (`enum ggml_type`), or `None` for ids Driftwood does not handle.
    pub fn from_ggml(id: u32) -> Option<DType> {
        DType::ALL.into_iter().find(|t| t.ggml_id() == id)
    }

    /// ggml's id for this type (`GGML_TYPE_*`).
    pub fn ggml_id(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Q4_0 => 2,
            DType::Q4_1 => 3,
            DType::Q8_0 => 8,
            DType::Q4_K => 12,
            DType::Q5_K => 13,
            DType::Q6_K => 14,
            DType::BF16 => 30,
        }
    }

    /// llama.cpp's `general.file_type` (`enum llama_ftype`) for a model whose matrices are
    /// mostly this type (`LLAMA_FTYPE_MOSTLY_Q4_K_M` for Q4_K, `…_Q5_K_M` for Q5_K).
    pub fn llama_file_type(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Q4_0 => 2,
            DType::Q4_1 => 3,
            DType::Q8_0 => 7,
            DType::Q4_K => 15,
            DType::Q5_K => 17,
            DType::Q6_K => 18,
            DType::BF16 => 32,
        }
    }

    /// Elements per block (1 for plain floats).
    pub fn block_elems(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => 1,
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => QK,
            DType::Q4_K | DType::Q5_K | DType::Q6_K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q8_0 => 2 + QK,
            DType::Q4_0 => 2 + QK / 2,
            DType::Q4_1 => 4 + QK / 2,
            DType::Q4_K => 4 + 12 + QK_K / 2,
            DType::Q5_K => 4 + 12 + QK_K / 8 + QK_K / 2,
            DType::Q6_K => QK_K / 2 + QK_K / 4 + QK_K / 16 + 2,
        }
    }

    /// Bytes of a row of `n` elements; `None` unless `n` is a multiple of
    /// [`block_elems`](Self::block_elems) (or the size overflows `usize`).
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_elems()) {
            return None;
        }
        (n / self.block_elems()).checked_mul(self.block_bytes())
    }

    /// ggml's name for the type (`ggml_type_name`): `f32`, `q4_K`, ...
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Q8_0 => "q8_0",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
            DType::Q4_K => "q4_K",
            DType::Q5_K => "q5_K",
            DType::Q6_K => "q6_K",
        }
    }

    /// True for the block-quantized types (everything but F32, F16 and BF16).
    pub fn is_quantized(self) -> bool {
        self.block_elems() > 1
    }

    /// Parses a type name as a user would type it: ggml's names, case-insensitive
    /// (`q4_k`, `Q8_0`, `BF16`), plus the aliases `fp32`/`float32`, `fp16`/`float16`, `bfloat16`.
    pub fn parse(s: &str) -> Option<DType> {
        let lower = s.trim().to_ascii_lowercase();
        let t = match lower.as_str() {
            "f32" | "fp32" | "float32" => DType::F32,
            "f16" | "fp16" | "float16" | "half" => DType::F16,
            "bf16" | "bfloat16" => DType::BF16,
            "q8_0" => DType::Q8_0,
            "q4_0" => DType::Q4_0,
            "q4_1" => DType::Q4_1,
            "q4_k" => DType::Q4_K,
            "q5_k" => DType::Q5_K,
            "q6_k" => DType::Q6_K,
            _ => return None,
        };
        Some(t)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ggml_ids_round_trip() {
        for t in DType::ALL {
            assert_eq!(DType::from_ggml(t.ggml_id()), Some(t), "{t}");
            assert_eq!(DType::parse(t.name()), Some(t), "{t}");
            assert_eq!(DType::parse(&t.name().to_ascii_uppercase()), Some(t), "{t}");
        }
        assert_eq!(DType::from_ggml(4), None, "q4_2 was removed from ggml");
        assert_eq!(DType::from_ggml(9), None, "q8_1 is never a tensor type here");
        assert_eq!(DType::parse("q4_K_M"), None);
    }

    #[test]
    fn block_sizes_match_ggml_common_h() {
        // static_asserts of ggml-common.h, spelled out.
        let expect = [
            (DType::F32, 1, 4),
            (DType::F16, 1, 2),
            (DType::BF16, 1, 2),
            (DType::Q8_0, 32, 34),
            (DType::Q4_0, 32, 18),
            (DType::Q4_1, 32, 20),
            (DType::Q4_K, 256, 144),
            (DType::Q5_K, 256, 176),
            (DType::Q6_K, 256, 210),
        ];
        for (t, elems, bytes) in expect {
            assert_eq!(t.block_elems(), elems, "{t}");
            assert_eq!(t.block_bytes(), bytes, "{t}");
            assert_eq!(t.is_quantized(), elems > 1, "{t}");
        }
    }

    #[test]
    fn row_bytes_requires_whole_blocks() {
        assert_eq!(DType::Q4_1.row_bytes(576), Some(18 * 20));
        assert_eq!(DType::Q8_0.row_bytes(576), Some(18 * 34));
        assert_eq!(DType::Q4_1.row_bytes(577), None);
        assert_eq!(DType::Q6_K.row_bytes(576), None);
        assert_eq!(DType::Q6_K.row_bytes(2048), Some(8 * 210));
        assert_eq!(DType::F16.row_bytes(3), Some(6));
        assert_eq!(DType::F32.row_bytes(usize::MAX), None);
    }
}
