//! CPU kernels for every weight format: activation rounding, dot products, matvec and matmul.
//!
//! Weights stay in ggml's packed block layout (straight from the GGUF mapping, never repacked).
//! Activations are quantized once per matvec into the type ggml pairs with each weight type
//! (its `vec_dot_type`) and reused for every row: Q4_0/Q4_1/Q8_0 weights meet Q8 activations,
//! K-quants meet Q8_K, F16/BF16 weights meet activations rounded to f16/bf16, F32 meets f32. The
//! activation quantizer reproduces ggml's x86 one bit for bit (scale `amax/127`, multiplier
//! `127/amax`, round half to even), so integer block sums equal llama.cpp's and only the order of
//! float additions differs.
//!
//! Every dtype has a scalar reference ([`dot_row_reference`]); every dtype also has SIMD
//! kernels chosen at run time ([`isa`]): AVX-512 VNNI for Q4_0/Q4_1/Q8_0 and F32/F16/BF16, AVX2
//! (maddubs) for all of them plus Q4_K/Q5_K/Q6_K. Decode is memory-bound, so [`matvec`] walks
//! rows one after another (one sequential stream, which the prefetchers follow best) and splits
//! them over the current rayon pool; [`matvec_many`] runs several matrices in one dispatch;
//! [`matmul`] (prefill) tiles four rows × four tokens so each weight block is unpacked once per
//! sixteen dot products.

//!
//! The row codec (quantize/dequantize) and the per-format facts are the ground floor's
//! ([`crate::quant`]); this folder holds only what computes: [`isa`] (SIMD level), [`act`]
//! (activation rounding), [`dot`] (scalar reference dots), [`matvec`] (row kernels and parallel
//! drivers) and `x86` (the SIMD kernels).

mod act;
mod dot;
mod isa;
mod matvec;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

#[allow(unused_imports)]
use half::f16;
use rayon::prelude::*;

#[allow(unused_imports)]
use crate::quant::codec::{bf16_bits, bf16_to_f32, check_row, f16_at, f16_bits, f16_round, nearest_int, q6_quad, scale_min_k4};
#[allow(unused_imports)]
use crate::quant::{dequantize_row, quantize_row, ActFormat, DType, QK, QK_K};

pub use act::QuantizedActivations;
use act::*;
use dot::*;
pub use dot::{dot_row, dot_row_reference};
#[allow(unused_imports)]
use isa::*;
pub use isa::{isa, Isa};
use matvec::*;
pub use matvec::{matmul, matmul_with, matvec, matvec_many, matvec_many_with, MatvecJob};
