//! The kernel table: the CUDA C++ source (the generated format prelude, then kernels.cu), its
//! compilation, and the function handles resolved from the loaded module.

use super::*;

/// The kernels' hand-written source; [`kernel_source`] puts the generated format table in front.
pub(super) const KERNELS: &str = include_str!("kernels.cu");

/// The source NVRTC compiles: the numbers shared with Rust ([`crate::quant::kernel_prelude`]),
/// then kernels.cu.
pub(super) fn kernel_source() -> String {
    crate::quant::kernel_prelude() + KERNELS
}

/// Kernel handles, resolved once.
pub(super) struct Kernels {
    pub(super) embed: CUfunction,
    pub(super) dequant_rows: CUfunction,
    /// Indexed by [`DType::kernel_code`].
    pub(super) matvec: [CUfunction; 9],
    /// Fused gate/up/SiLU for one token, indexed by [`DType::kernel_code`].
    pub(super) ffn: [CUfunction; 9],
    /// Dense one-token products (`dense_mv`), by [F16, BF16] and chunks per thread [1, 2, 4].
    pub(super) dense: [[CUfunction; 3]; 2],
    pub(super) dense_ffn: [[CUfunction; 3]; 2],
    /// Blocks of 256 threads of each `dense` / `dense_ffn` instance that fit on one
    /// multiprocessor (the driver's occupancy of the compiled kernel): a persistent grid larger
    /// than what fits would run its surplus as a second wave.
    pub(super) dense_fit: [[usize; 3]; 2],
    pub(super) dense_ffn_fit: [[usize; 3]; 2],
    pub(super) matvec_any: CUfunction,
    pub(super) rope_store: CUfunction,
    pub(super) rms_norm: CUfunction,
    pub(super) rope: CUfunction,
    pub(super) silu_mul: CUfunction,
    pub(super) add: CUfunction,
    pub(super) kv_store: CUfunction,
    pub(super) attn_partial: CUfunction,
    pub(super) attn_combine: CUfunction,
    pub(super) attn_small: CUfunction,
    pub(super) act_prep: CUfunction,
    pub(super) copy_f32: CUfunction,
    pub(super) argmax_f32: CUfunction,
    pub(super) to_half: CUfunction,
    pub(super) _module: Module,
}

// SAFETY: function handles are immutable and valid in every thread that binds the context.
unsafe impl Send for Kernels {}
// SAFETY: as above.
unsafe impl Sync for Kernels {}

impl Kernels {
    /// Compiles (or takes from the cache) the kernels for `arch` and resolves every function.
    pub(super) fn load(ctx: &Arc<CudaContext>, arch: &str) -> Result<Kernels, String> {
        let ptx = driver::compile_cached(&kernel_source(), arch, kernel_cache_dir())?;
        let module = Module::load_ptx(ctx, &ptx)?;
        let f = |n: &str| module.function(n);
        let suffixes = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k"];
        let (mut matvec, mut ffn) = ([std::ptr::null_mut(); 9], [std::ptr::null_mut(); 9]);
        for (i, suffix) in suffixes.iter().enumerate() {
            matvec[i] = f(&format!("matvec_{suffix}"))?;
            ffn[i] = f(&format!("ffn_{suffix}"))?;
        }
        let (mut dense, mut dense_ffn) = ([[std::ptr::null_mut(); 3]; 2], [[std::ptr::null_mut(); 3]; 2]);
        let (mut dense_fit, mut dense_ffn_fit) = ([[0; 3]; 2], [[0; 3]; 2]);
        for (i, suffix) in ["f16", "bf16"].iter().enumerate() {
            for (j, ch) in DENSE_CHUNKS.iter().enumerate() {
                dense[i][j] = f(&format!("dense_{suffix}_c{ch}"))?;
                dense_ffn[i][j] = f(&format!("dense_ffn_{suffix}_c{ch}"))?;
                dense_fit[i][j] = module.resident_blocks(dense[i][j], 256)?;
                dense_ffn_fit[i][j] = module.resident_blocks(dense_ffn[i][j], 256)?;
            }
        }
        Ok(Kernels {
            embed: f("embed")?,
            dequant_rows: f("dequant_rows")?,
            matvec,
            ffn,
            dense,
            dense_ffn,
            dense_fit,
            dense_ffn_fit,
            matvec_any: f("matvec_any")?,
            rope_store: f("rope_store")?,
            rms_norm: f("rms_norm")?,
            rope: f("rope")?,
            silu_mul: f("silu_mul")?,
            add: f("add")?,
            kv_store: f("kv_store")?,
            attn_partial: f("attn_partial")?,
            attn_combine: f("attn_combine")?,
            attn_small: f("attn_small")?,
            act_prep: f("act_prep")?,
            copy_f32: f("copy_f32")?,
            argmax_f32: f("argmax_f32")?,
            to_half: f("to_half")?,
            _module: module,
        })
    }
}

/// Compiles the kernels to PTX for `arch` with NVRTC alone (no GPU needed): a check that the
/// kernel source builds, for tests and for machines that only have NVRTC.
pub fn compile_kernels(arch: &str) -> Result<String, String> {
    if !driver::libraries_present().0 {
        return Err("NVRTC (libnvrtc.so) is not installed".into());
    }
    driver::compile(&kernel_source(), &[format!("--gpu-architecture={arch}"), "--std=c++17".into(), "-default-device".into()])
}
