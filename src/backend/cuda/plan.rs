//! Launch plans: how a product or an attention call is cut into blocks and warps, and how weight
//! rows are laid out in device memory. Pure functions of shapes and formats, tested without a GPU.

use super::*;

/// Warps that share a group of rows (1, 2, 4 or 8; the k-slices): enough that a launch has some
/// 4096 warps streaming weights, so small matrices still fill the GPU's memory pipeline.
/// No more warps than a row has loop steps (`steps`), so that every slice has work, and no more
/// than keep the row groups (8 / S row pairs or rows each) within one wave of `max_blocks` blocks
/// (0: no bound), so that no block works through two groups while others idle.
pub(super) fn k_slices(row_groups: usize, steps: usize, max_blocks: usize) -> usize {
    let want = 4096usize.div_ceil(row_groups.max(1));
    let mut s = [1, 2, 4, 8].into_iter().find(|&s| s >= want).unwrap_or(8);
    while s > 1 && max_blocks > 0 && (row_groups * s).div_ceil(8) > max_blocks {
        s /= 2;
    }
    let most = [8, 4, 2, 1].into_iter().find(|&m| m <= steps.max(1)).unwrap_or(1);
    s.min(most)
}

/// Steps of row_dots' loop one warp needs for a whole row of `cols` values (kernels.cu's
/// `warp_step_bytes`): 128 f32 or 256 f16/bf16 values a step, 32 blocks of 32 for the rest.
pub(super) fn warp_steps(d: DType, cols: usize) -> usize {
    cols.div_ceil(match d {
        DType::F32 => 128,
        DType::F16 | DType::BF16 => 256,
        _ => 1024,
    })
}

/// Chunks of 16 bytes a thread holds per row in `dense_mv`, by instance (kernels.cu's DENSE).
pub(super) const DENSE_CHUNKS: [usize; 3] = [1, 2, 4];

/// A `dense_mv` launch: format index (F16, BF16), instance, log2 threads per row, rows per row
/// group, blocks per multiprocessor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct DensePlan {
    pub(super) dtype: usize,
    pub(super) chunks: usize,
    pub(super) tl: i32,
    pub(super) rows_per_group: usize,
    pub(super) per_sm: usize,
}

impl DensePlan {
    /// This plan at `per_sm` blocks a multiprocessor, or at `fit` (the most that are resident at
    /// once, at least one) where fewer fit.
    pub(super) fn fitted(self, per_sm: usize, fit: usize) -> DensePlan {
        DensePlan { per_sm: per_sm.min(fit.max(1)), ..self }
    }

    /// Blocks for `rows` rows: one per block step (256 / threads-per-row groups of
    /// `rows_per_group` rows), at most `per_sm` per multiprocessor; blocks stride over the rest.
    pub(super) fn blocks(&self, rows: usize, sms: usize) -> u32 {
        let groups_per_block = 256 >> self.tl;
        let steps = rows.div_ceil(self.rows_per_group).div_ceil(groups_per_block);
        steps.min(self.per_sm * sms).max(1) as u32
    }
}

/// How `dense_mv` multiplies a `rows × cols` weight (with `matrices` = 2 its twin too: gate and
/// up), if it can: F16/BF16 rows of whole 16-byte chunks, at most 8192 values, in pairs.
pub(super) fn dense_plan(dtype: DType, rows: usize, cols: usize, matrices: usize) -> Option<DensePlan> {
    let dtype = match dtype {
        DType::F16 => 0,
        DType::BF16 => 1,
        _ => return None,
    };
    if !cols.is_multiple_of(8) || !rows.is_multiple_of(2) {
        return None;
    }
    let chunks = cols / 8;
    // Threads per row: a power of two from 32 to 256 covering the row in one chunk each, or 256
    // with 2 or 4 chunks each.
    let (ch, tpr) = match chunks {
        0..=256 => (1, chunks.next_power_of_two().max(32)),
        257..=512 => (2, 256),
        513..=1024 => (4, 256),
        _ => return None,
    };
    let chunks = DENSE_CHUNKS.iter().position(|&c| c == ch)?;
    // Rows a group: 4 where a thread holds one chunk of one matrix, else 2 (kernels.cu's DENSE).
    // Blocks a multiprocessor: 4 where a thread holds one chunk a row (16 KB in flight a block),
    // else 2 (their registers allow no more), which measured fastest on an H200 (bench/gemv, and
    // Llama-3.2-1B decode: 2, 3, 4, 5, 6 blocks gave 877, 944, 957, 923, 938 tok/s).
    let rows_per_group = if matrices == 1 && ch == 1 { 4 } else { 2 };
    let per_sm = if ch == 1 { 4 } else { 2 };
    Some(DensePlan { dtype, chunks, tl: tpr.trailing_zeros() as i32, rows_per_group, per_sm })
}

/// Downloads of at least this many bytes go through pinned staging memory.
pub(super) const DOWNLOAD_STAGED: usize = 64 * 1024;

/// Shared memory a block gets without opting in: the most a product kernel stages.
pub(super) const STAGE_LIMIT: usize = 48 * 1024;

/// Bytes a product kernel stages for an input of `cols` values of activation kind `ak`: f32
/// values, or for 8-bit blocks the quants (padded to 16 bytes) and a (d, s) pair per block.
pub(super) fn stage_bytes(cols: usize, ak: ActFormat) -> usize {
    if ak == ActFormat::Q8 {
        cols.next_multiple_of(16) + cols / 32 * 8
    } else {
        4 * cols
    }
}

/// Whether the one-token kernels can fuse an RMS norm in front: the staged input must fit the
/// shared memory a block gets without opting in.
pub(super) fn fusable_norm(ws: &[&Linear]) -> bool {
    let first = ws[0];
    ws.len() <= 3 && stage_bytes(first.cols, ActFormat::F32) <= STAGE_LIMIT && ws.iter().all(|w| fast_rows(w) && w.dtype == first.dtype && w.cols == first.cols)
}

/// Formats whose rows are stored on the device in the repacked layout of kernels.cu: each row's
/// block quants first, then the block scales, padded to 16 bytes.
pub(super) fn repacked(d: DType) -> bool {
    matches!(d, DType::Q4_0 | DType::Q4_1 | DType::Q8_0)
}

/// Bytes per row in device memory: the GGUF row size, padded to 16 for repacked formats.
pub(super) fn device_row_bytes(d: DType, cols: usize) -> usize {
    let bytes = d.row_bytes(cols).unwrap_or(0);
    if repacked(d) {
        bytes.next_multiple_of(16)
    } else {
        bytes
    }
}

/// GGUF rows of a repacked format (Q4_0: [d f16][16 quant bytes], Q4_1: [d][m][16], Q8_0: [d][32])
/// rearranged as kernels.cu reads them: per row, every block's quant bytes in order, then every
/// block's scale bytes (d, or d and m), then zero padding up to [`device_row_bytes`].
pub(super) fn repack_rows(d: DType, cols: usize, src: &[u8]) -> Result<Vec<u8>, String> {
    let (block, scale) = (d.block_bytes(), if d == DType::Q4_1 { 4 } else { 2 });
    let (quants, nb) = (block - scale, cols / 32);
    let (row, dev_row) = (nb * block, device_row_bytes(d, cols));
    if !cols.is_multiple_of(32) || row == 0 || !src.len().is_multiple_of(row) {
        return Err(format!("{} bytes are not whole rows of {cols} {d} values", src.len()));
    }
    let mut out = vec![0u8; src.len() / row * dev_row];
    for (s, o) in src.chunks_exact(row).zip(out.chunks_exact_mut(dev_row)) {
        let (qs, sc) = o.split_at_mut(nb * quants);
        for (b, blk) in s.chunks_exact(block).enumerate() {
            sc[b * scale..(b + 1) * scale].copy_from_slice(&blk[..scale]);
            qs[b * quants..(b + 1) * quants].copy_from_slice(&blk[scale..]);
        }
    }
    Ok(out)
}

/// Whether the specialized matvec kernels can read this weight's rows (16-byte aligned dense rows).
pub(super) fn fast_rows(w: &Linear) -> bool {
    // The kernels also take rows in pairs.
    w.rows.is_multiple_of(2)
        && match w.dtype {
            DType::F32 => w.cols.is_multiple_of(4),
            DType::F16 | DType::BF16 => w.cols.is_multiple_of(8),
            _ => true,
        }
}
