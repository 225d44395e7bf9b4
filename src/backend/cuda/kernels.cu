// Driftwood's CUDA kernels, compiled at run time with NVRTC (see `driver.rs`).
//
// Why hand-written: the weights stay in their block formats in device memory (Q4_0, Q4_K, ...),
// and no library multiplies those blocks directly, nor with the activation rounding the CPU engine
// uses (so that both devices compute the same function); the decode step is memory-bound, so a
// matrix-vector kernel that dequantizes in registers reads each weight byte exactly once, and
// fusing the RMS norm, RoPE, the cache write, SiLU and the residual add into the products saves
// launches that cost as much as the small products themselves. Dense products of many tokens
// (prefill) go to cuBLAS after a dequantizing pass.
//
// Conventions: activations are f32 (rounded per format before products, see `prep_units`), the
// KV cache f16. Kernels that depend on the token ids or the position read them from `Step` in
// device memory, never from launch arguments, so a captured decode graph replays unchanged for
// every token. Every kernel starts with `pdl_wait` (programmatic dependent launch). No CUDA
// headers are included: f16/bf16 conversions and dp4a are single PTX instructions.

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

#define INFINITY __int_as_float(0x7f800000)

// Weight formats (DT_*), activation formats (AK_*), act_kind(dt), block_bytes(dt) and MAX_BATCH
// come from the prelude Rust generates from its format table (src/quant/mod.rs).

// Where a forward pass is: its first position and token ids (written once per pass).
struct Step {
    int pos0;
    int n;
    u32 tokens[MAX_BATCH];
};

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float bf2f(u16 b) { return __uint_as_float(((u32)b) << 16); }

__device__ __forceinline__ float ld_h(const u8* p) { return h2f(*(const u16*)p); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ int warp_sum_i(int v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float round_f16(float v) { return h2f(f2h(v)); }

// Round to nearest even bf16, as the CPU engine rounds activations for BF16 weights.
__device__ __forceinline__ float round_bf16(float v) {
#if __CUDA_ARCH__ >= 800
    u16 b;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"(v));
    return bf2f(b);
#else
    u32 u = __float_as_uint(v);
    u += 0x7fffu + ((u >> 16) & 1u);
    return __uint_as_float(u & 0xffff0000u);
#endif
}

// Programmatic dependent launch (Hopper). The host launches every kernel as allowed to start
// before the previous one finishes; each kernel calls `pdl_wait` before it touches memory an
// earlier kernel writes (and every kernel calls it, so completion stays transitive), and
// `pdl_launch` to let the next kernel's blocks be scheduled. Before the wait a kernel may only
// read what no kernel writes: the weights. On older GPUs (or plain launches) both are no-ops.
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// Scale and min of sub-block j of a Q4_K/Q5_K block (ggml's get_scale_min_k4).
__device__ __forceinline__ void scale_min_k4(int j, const u8* q, float* sc, float* m) {
    if (j < 4) {
        *sc = (float)(q[j] & 63);
        *m = (float)(q[j + 4] & 63);
    } else {
        *sc = (float)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (float)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

// ---- dequantizing one element (embedding rows, the prefill dequantization pass) ----
//
// Q4_0, Q4_1 and Q8_0 rows are repacked when they are uploaded (`repack_rows` in mod.rs): a row
// holds its blocks' quants first (16 bytes per Q4 block, 32 per Q8_0 block, in GGUF's order),
// then their scales (f16 d; for Q4_1 d and m), padded to a multiple of 16 bytes. A lane then
// reads a whole block's quants with aligned 16-byte loads, where GGUF's 18-, 20- and 34-byte
// blocks only allow 2-byte loads.

__device__ float dequant_one(int dt, const u8* row, int i, int cols) {
    const int nb = cols / 32, b = i / 32, j = i % 32;
    switch (dt) {
    case DT_F32: return ((const float*)row)[i];
    case DT_F16: return h2f(((const u16*)row)[i]);
    case DT_BF16: return bf2f(((const u16*)row)[i]);
    // Repacked rows (see above): quants first, then the scales.
    case DT_Q8_0: return ld_h(row + 32 * nb + 2 * b) * (float)(i8)row[32 * b + j];
    case DT_Q4_0: {
        const u8 v = row[16 * b + j % 16];
        return ld_h(row + 16 * nb + 2 * b) * (float)((j < 16 ? v & 0xF : v >> 4) - 8);
    }
    case DT_Q4_1: {
        const u8 v = row[16 * b + j % 16];
        const u8* dm = row + 16 * nb + 4 * b;
        return ld_h(dm) * (float)(j < 16 ? v & 0xF : v >> 4) + ld_h(dm + 2);
    }
    case DT_Q4_K:
    case DT_Q5_K: {
        bool five = dt == DT_Q5_K;
        const u8* b = row + (i / 256) * (five ? 176 : 144);
        int k = i % 256, g = k / 32, l = k % 32;
        const u8* ql = b + (five ? 48 : 16) + 32 * (g / 2);
        int q = (g & 1) ? (ql[l] >> 4) : (ql[l] & 0xF);
        if (five) q += ((b[16 + l] >> g) & 1) << 4;
        float sc, m;
        scale_min_k4(g, b + 4, &sc, &m);
        return ld_h(b) * sc * (float)q - ld_h(b + 2) * m;
    }
    case DT_Q6_K: {
        const u8* b = row + (i / 256) * 210;
        int k = i % 256, n = k / 128, r = k % 128, kq = r / 32, l = r % 32;
        const u8* ql = b + 64 * n;
        u8 h = b[128 + 32 * n + l];
        int lo = (kq & 1) ? ql[l + 32] : ql[l];
        int q = ((kq & 2) ? (lo >> 4) : (lo & 0xF)) | (((h >> (2 * kq)) & 3) << 4);
        return ld_h(b + 208) * (float)(i8)b[192 + 8 * n + l / 16 + 2 * kq] * (float)(q - 32);
    }
    }
    return 0.0f;
}

// out[t][i] = table[tokens[t]][i] for the pass's tokens. Grid: (column blocks, tokens).
extern "C" __global__ void embed(const u8* table, int dt, i64 row_bytes, int cols, const Step* step, float* out) {
    pdl_wait();
    pdl_launch();
    int t = blockIdx.y;
    const u8* row = table + (i64)step->tokens[t] * row_bytes;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < cols; i += gridDim.x * blockDim.x) out[(i64)t * cols + i] = dequant_one(dt, row, i, cols);
}

// out[r][c] = W[r][c] as f32, for rows [row0, row0 + rows). Grid-stride over elements.
extern "C" __global__ void dequant_rows(const u8* w, int dt, i64 row_bytes, int cols, i64 row0, i64 rows, float* out) {
    pdl_wait();
    pdl_launch();
    i64 total = rows * cols;
    for (i64 e = blockIdx.x * (i64)blockDim.x + threadIdx.x; e < total; e += (i64)gridDim.x * blockDim.x) {
        i64 r = e / cols;
        int c = (int)(e % cols);
        out[e] = dequant_one(dt, w + (row0 + r) * row_bytes, c, cols);
    }
}

// ---- activations as the CPU engine rounds them ----
//
// The CPU engine multiplies each weight format with activations rounded the way ggml rounds them
// (its `vec_dot_type`): f16/bf16 values for F16/BF16 weights, 8-bit blocks of 32 (Q8_0/Q8_1) for
// Q4_0/Q4_1/Q8_0, 8-bit super-blocks of 256 (Q8_K) for K-quants. The GPU rounds the same way, so
// both devices compute the same function up to the order of float additions: Q4_0/Q4_1/Q8_0 rows
// take the 8-bit quants in integer dot products (dp4a), as ggml does; K-quant rows and the
// prefill's cuBLAS products take the rounded blocks as f32 values d * q.
// (The pairing is `act_kind(dt)` in the generated prelude.)

// 1 / rms(x) * ... : the RMS-norm scale of one token's row (1 without `norm_w`), computed by the
// whole block, every thread getting it.
__device__ float row_scale(const float* __restrict__ x, int cols, const float* __restrict__ norm_w, float eps) {
    if (norm_w == nullptr) return 1.0f;
    __shared__ float part[32];
    const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) ss += x[i] * x[i];
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) part[warp] = ss;
    __syncthreads();
    float total = 0.0f;
    for (int w = 0; w < warps; w++) total += part[w];
    return 1.0f / sqrtf(total / (float)cols + eps);
}

// Values a warp prepares at once: a Q8_K super-block for K-quants, else 32 (a Q8 block).
__host__ __device__ constexpr int unit_values(int ak) { return ak == AK_Q8K ? 256 : 32; }

// Prepares units first, first + step, ... (< units) of one token's activations, one warp per
// unit: x (times `scale * norm_w` with a norm) rounded for activation kind `ak` into y (if not
// null); for AK_Q8 also the quants q8 and per block (d, s): d = f16(amax / 127) and
// s = f16(d' * sum(q)) with the unrounded d' (ggml's quantize_row_q8_1). A warp takes B units at
// once, so their loads and shuffle reductions overlap instead of queueing (B = 8 where a warp has
// several, 1 where it has one).
template <int B>
__device__ void prep_units(const float* __restrict__ x, int cols, float scale, const float* __restrict__ norm_w, int ak, float* y, i8* q8, float2* ds,
                           int first, int step, int units) {
    const int lane = threadIdx.x & 31;
    if (ak == AK_Q8K) {
        // One super-block of 256 per warp, eight values per lane: ggml's quantize_row_q8_K_ref
        // (the scale comes from the value of largest magnitude, the first one on ties).
        for (int u = first; u < units; u += step) {
            float v[8], amax = 0.0f, big = 0.0f;
            int at = 1 << 30;
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const int i = 256 * u + lane + 32 * j;
                v[j] = norm_w != nullptr ? x[i] * scale * norm_w[i] : x[i];
                if (fabsf(v[j]) > amax) {
                    amax = fabsf(v[j]);
                    big = v[j];
                    at = lane + 32 * j;
                }
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                const float a2 = __shfl_xor_sync(0xffffffffu, amax, o), b2 = __shfl_xor_sync(0xffffffffu, big, o);
                const int at2 = __shfl_xor_sync(0xffffffffu, at, o);
                if (a2 > amax || (a2 == amax && at2 < at)) {
                    amax = a2;
                    big = b2;
                    at = at2;
                }
            }
            const float iscale = amax != 0.0f ? -127.0f / big : 0.0f;
            const float d = amax != 0.0f ? 1.0f / iscale : 0.0f;
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const int i = 256 * u + lane + 32 * j, q = min(__float2int_rn(iscale * v[j]), 127);
                y[i] = d * (float)q;
                if (q8 != nullptr) {
                    // Value j of every lane makes up 32-value group j of the super-block: its
                    // quants, and (d, sum of its quants) per group for the Q4_K dp4a product.
                    q8[i] = (i8)q;
                    const int sum = warp_sum_i(q);
                    if (lane == 0) ds[8 * u + j] = make_float2(d, (float)sum);
                }
            }
        }
        return;
    }
    for (int u0 = first; u0 < units; u0 += B * step) {
        float v[B];
#pragma unroll
        for (int k = 0; k < B; k++) {
            const int u = u0 + k * step, i = 32 * u + lane;
            v[k] = u < units && i < cols ? (norm_w != nullptr ? x[i] * scale * norm_w[i] : x[i]) : 0.0f;
        }
        if (ak != AK_Q8) {
#pragma unroll
            for (int k = 0; k < B; k++) {
                const int u = u0 + k * step, i = 32 * u + lane;
                if (u < units && i < cols) y[i] = ak == AK_F16 ? round_f16(v[k]) : ak == AK_BF16 ? round_bf16(v[k]) : v[k];
            }
            continue;
        }
        float amax[B];
        int q[B], sum[B];
#pragma unroll
        for (int k = 0; k < B; k++) amax[k] = fabsf(v[k]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
#pragma unroll
            for (int k = 0; k < B; k++) amax[k] = fmaxf(amax[k], __shfl_xor_sync(0xffffffffu, amax[k], o));
#pragma unroll
        for (int k = 0; k < B; k++) {
            const float id = amax[k] != 0.0f ? 127.0f / amax[k] : 0.0f;
            q[k] = __float2int_rn(v[k] * id);
            sum[k] = q[k];
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
#pragma unroll
            for (int k = 0; k < B; k++) sum[k] += __shfl_xor_sync(0xffffffffu, sum[k], o);
#pragma unroll
        for (int k = 0; k < B; k++) {
            const int u = u0 + k * step, i = 32 * u + lane;
            if (u >= units) continue;
            const float d = amax[k] / 127.0f, d16 = round_f16(d);
            if (y != nullptr) y[i] = d16 * (float)q[k];
            if (q8 != nullptr) {
                q8[i] = (i8)q[k];
                if (lane == 0) ds[u] = make_float2(d16, round_f16(d * (float)sum[k]));
            }
        }
    }
}

// Activations prepared once for every block of the products that read them, in global memory:
// grid (units / 8, tokens), one unit per warp. y: [tokens][cols]; q8: [tokens][cols] and
// ds: [tokens][cols / 32] for AK_Q8 (may be null).
extern "C" __global__ void act_prep(const float* x, const float* norm_w, float eps, int cols, int ak, float* y, i8* q8, float2* ds) {
    pdl_wait();
    pdl_launch();
    const i64 t = blockIdx.y;
    const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const float scale = row_scale(x + t * cols, cols, norm_w, eps);
    const int units = (cols + unit_values(ak) - 1) / unit_values(ak);
    prep_units<1>(x + t * cols, cols, scale, norm_w, ak, y + t * cols, q8 != nullptr ? q8 + t * cols : nullptr, ds != nullptr ? ds + t * (cols / 32) : nullptr,
               blockIdx.x * warps + warp, gridDim.x * warps, units);
}

// ---- matrix-vector products: one warp per output row, one lane per 32-value group ----

__device__ __forceinline__ float dot8_h(uint4 w, float4 a, float4 b) {
    return h2f(w.x & 0xffff) * a.x + h2f(w.x >> 16) * a.y + h2f(w.y & 0xffff) * a.z + h2f(w.y >> 16) * a.w + h2f(w.z & 0xffff) * b.x +
           h2f(w.z >> 16) * b.y + h2f(w.w & 0xffff) * b.z + h2f(w.w >> 16) * b.w;
}

__device__ __forceinline__ float dot8_bf(uint4 w, float4 a, float4 b) {
    return __uint_as_float(w.x << 16) * a.x + __uint_as_float(w.x & 0xffff0000u) * a.y + __uint_as_float(w.y << 16) * a.z +
           __uint_as_float(w.y & 0xffff0000u) * a.w + __uint_as_float(w.z << 16) * b.x + __uint_as_float(w.z & 0xffff0000u) * b.y +
           __uint_as_float(w.w << 16) * b.z + __uint_as_float(w.w & 0xffff0000u) * b.w;
}

// Dot of 32-value group `g` of a K-quant row (Q4_K, Q5_K, Q6_K) with act_prep's f32 values
// x[32g .. 32g+32). (Dense rows go through dot_dense, repacked Q4/Q8_0 rows through dot_q8act.)
template <int DT>
__device__ __forceinline__ float dot_group(const u8* row, int g, const float* __restrict__ x) {
    const float* xg = x + 32 * g;
    if (DT == DT_Q4_K || DT == DT_Q5_K) {
        const bool five = DT == DT_Q5_K;
        const u8* b = row + (five ? 176 : 144) * (g / 8);
        int sub = g % 8;
        const uint4* qv = (const uint4*)(b + (five ? 48 : 16) + 32 * (sub / 2));
        uint4 q0 = qv[0], q1 = qv[1];
        u32 qs[8] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w};
        u32 hb[8];
        if (five) {
            const uint4* hv = (const uint4*)(b + 16);
            uint4 h0 = hv[0], h1 = hv[1];
            hb[0] = h0.x; hb[1] = h0.y; hb[2] = h0.z; hb[3] = h0.w;
            hb[4] = h1.x; hb[5] = h1.y; hb[6] = h1.z; hb[7] = h1.w;
        }
        int shift = (sub & 1) * 4;
        float s = 0.0f, xs = 0.0f;
#pragma unroll
        for (int k = 0; k < 8; k++) {
#pragma unroll
            for (int j = 0; j < 4; j++) {
                int q = (qs[k] >> (8 * j + shift)) & 0xF;
                if (five) q += ((hb[k] >> (8 * j + sub)) & 1) << 4;
                float xv = xg[4 * k + j];
                s += (float)q * xv;
                xs += xv;
            }
        }
        float sc, m;
        scale_min_k4(sub, b + 4, &sc, &m);
        return ld_h(b) * sc * s - ld_h(b + 2) * m * xs;
    } else {  // DT_Q6_K: bytes are not 16-byte aligned (210-byte blocks): plain byte loads
        const u8* b = row + 210 * (g / 8);
        int sub = g % 8, n = sub / 4, kq = sub % 4;
        const u8* ql = b + 64 * n + ((kq & 1) ? 32 : 0);
        const u8* qh = b + 128 + 32 * n;
        int shift = (kq & 2) ? 4 : 0;
        float s0 = 0.0f, s1 = 0.0f;
#pragma unroll
        for (int l = 0; l < 32; l++) {
            int q = ((ql[l] >> shift) & 0xF) | (((qh[l] >> (2 * kq)) & 3) << 4);
            float v = (float)(q - 32) * xg[l];
            if (l < 16) s0 += v; else s1 += v;
        }
        const i8* sc = (const i8*)(b + 192 + 8 * n);
        return ld_h(b + 208) * ((float)sc[2 * kq] * s0 + (float)sc[1 + 2 * kq] * s1);
    }
}

// Dense rows (f32/f16/bf16): each lane reads 16-byte chunks and the warp reads 512 contiguous
// bytes per step, so weight and activation loads are fully coalesced. Needs 16-byte aligned rows
// (the host checks cols and falls back to matvec_any otherwise). NR rows at once share the
// activation loads and keep more weight loads in flight. A row may be split across S warps
// ("k-slices"): warp `ks` takes every S-th step.
template <int DT>
__device__ __forceinline__ float4 round4(float4 a) {
    if (DT == DT_F16) return make_float4(round_f16(a.x), round_f16(a.y), round_f16(a.z), round_f16(a.w));
    if (DT == DT_BF16) return make_float4(round_bf16(a.x), round_bf16(a.y), round_bf16(a.z), round_bf16(a.w));
    return a;
}

// `rx`: x is raw and each value is rounded for DT here (staged or act_prep'd x is already rounded).
template <int DT, int NR>
__device__ __forceinline__ void dot_dense(const u8* const* rows, int cols, const float* __restrict__ x, bool rx, int lane, int ks, int S, float* acc) {
    if (DT == DT_F32) {
#pragma unroll 4
        for (int c = (ks * 32 + lane) * 4; c + 4 <= cols; c += 128 * S) {
            float4 a = *(const float4*)(x + c);
#pragma unroll
            for (int r = 0; r < NR; r++) {
                float4 w = *(const float4*)(rows[r] + 4 * c);
                acc[r] += w.x * a.x + w.y * a.y + w.z * a.z + w.w * a.w;
            }
        }
        if (ks == 0)
            for (int i = (cols / 4) * 4 + lane; i < cols; i += 32)
#pragma unroll
                for (int r = 0; r < NR; r++) acc[r] += ((const float*)rows[r])[i] * x[i];
    } else {
#pragma unroll 4
        for (int c = (ks * 32 + lane) * 8; c + 8 <= cols; c += 256 * S) {
            uint4 w[NR];
#pragma unroll
            for (int r = 0; r < NR; r++) w[r] = *(const uint4*)(rows[r] + 2 * c);
            float4 a = *(const float4*)(x + c), b = *(const float4*)(x + c + 4);
            if (rx) {
                a = round4<DT>(a);
                b = round4<DT>(b);
            }
#pragma unroll
            for (int r = 0; r < NR; r++) acc[r] += DT == DT_F16 ? dot8_h(w[r], a, b) : dot8_bf(w[r], a, b);
        }
        if (ks == 0)
            for (int i = (cols / 8) * 8 + lane; i < cols; i += 32) {
                const float xi = rx ? round4<DT>(make_float4(x[i], 0.0f, 0.0f, 0.0f)).x : x[i];
#pragma unroll
                for (int r = 0; r < NR; r++) acc[r] += dequant_one(DT, rows[r], i, cols) * xi;
            }
    }
}

__device__ __forceinline__ int dp4a(int a, int b, int c) {
    int r;
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}

// Q4_0 / Q4_1 / Q8_0 rows (repacked) times 8-bit activations: one lane per block, its quants in
// one (Q4) or two (Q8_0) 16-byte loads, integer dot products (dp4a) scaled by d_w * d_x as ggml's
// vec_dot_q4_0_q8_0 and friends compute them; Q4_1's min term takes the activation block's
// stored sum. STEPS blocks per row are loaded before any is used.
template <int DT, int NR>
__device__ __forceinline__ void dot_q8act(const u8* const* rows, int cols, const i8* __restrict__ xq, const float2* __restrict__ ds, int lane, int ks, int S,
                                          float* acc) {
    constexpr int QB = DT == DT_Q8_0 ? 32 : 16, SB = DT == DT_Q4_1 ? 4 : 2, STEPS = 4;
    const int nb = cols / 32, stride = 32 * S;
    for (int b0 = ks * 32 + lane; b0 < nb; b0 += STEPS * stride) {
        uint4 w[STEPS][NR][QB / 16];
        u32 sc[STEPS][NR];
#pragma unroll
        for (int u = 0; u < STEPS; u++) {
            const int b = b0 + u * stride;
#pragma unroll
            for (int r = 0; r < NR; r++) {
#pragma unroll
                for (int h = 0; h < QB / 16; h++) w[u][r][h] = b < nb ? ((const uint4*)(rows[r] + QB * b))[h] : make_uint4(0, 0, 0, 0);
                const u8* s = rows[r] + QB * nb + SB * b;
                sc[u][r] = b < nb ? (SB == 4 ? *(const u32*)s : (u32) * (const u16*)s) : 0u;
            }
        }
#pragma unroll
        for (int u = 0; u < STEPS; u++) {
            const int b = b0 + u * stride;
            if (b >= nb) break;
            const int4 xa = ((const int4*)(xq + 32 * b))[0], xb = ((const int4*)(xq + 32 * b))[1];
            const float2 dx = ds[b];
#pragma unroll
            for (int r = 0; r < NR; r++) {
                int sum;
                if (DT == DT_Q8_0) {
                    const uint4 a = w[u][r][0], c = w[u][r][QB / 16 - 1];
                    sum = dp4a((int)a.x, xa.x, dp4a((int)a.y, xa.y, dp4a((int)a.z, xa.z, dp4a((int)a.w, xa.w, 0))));
                    sum = dp4a((int)c.x, xb.x, dp4a((int)c.y, xb.y, dp4a((int)c.z, xb.z, dp4a((int)c.w, xb.w, sum))));
                } else {
                    // Byte j holds values j (low nibble) and j + 16 (high): word k pairs with
                    // activation words k and 4 + k.
                    const u32 q[4] = {w[u][r][0].x, w[u][r][0].y, w[u][r][0].z, w[u][r][0].w};
                    const int xl[4] = {xa.x, xa.y, xa.z, xa.w}, xh[4] = {xb.x, xb.y, xb.z, xb.w};
                    sum = 0;
#pragma unroll
                    for (int k = 0; k < 4; k++) {
                        u32 lo = q[k] & 0x0F0F0F0Fu, hi = (q[k] >> 4) & 0x0F0F0F0Fu;
                        if (DT == DT_Q4_0) {
                            // q - 8 in each byte, as signed bytes: (q + 0x78) ^ 0x80 (no carries).
                            lo = (lo + 0x78787878u) ^ 0x80808080u;
                            hi = (hi + 0x78787878u) ^ 0x80808080u;
                        }
                        sum = dp4a((int)lo, xl[k], dp4a((int)hi, xh[k], sum));
                    }
                }
                acc[r] += h2f((u16)(sc[u][r] & 0xffff)) * dx.x * (float)sum;
                if (DT == DT_Q4_1) acc[r] += h2f((u16)(sc[u][r] >> 16)) * dx.y;
            }
        }
    }
}

// Q4_K rows times Q8_K activations (act_prep's xq, and ds = per 32-value group (d_x, sum of its
// quants)): one lane per group, integer dot products (dp4a) scaled by d * scale and the min term
// from the group sum, as ggml's vec_dot_q4_K_q8_K computes them.
template <int NR>
__device__ __forceinline__ void dot_q4k_q8(const u8* const* rows, int cols, const i8* __restrict__ xq, const float2* __restrict__ ds, int lane, int ks, int S,
                                           float* acc) {
    const int groups = cols / 32;
    for (int g = ks * 32 + lane; g < groups; g += 32 * S) {
        // Sub-blocks 2j and 2j + 1 share 32 quant bytes: low nibbles, then high nibbles.
        const int sub = g % 8, shift = 4 * (sub & 1);
        const int4 x0 = ((const int4*)(xq + 32 * g))[0], x1 = ((const int4*)(xq + 32 * g))[1];
        const int xs[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
        const float2 dx = ds[g];
#pragma unroll
        for (int r = 0; r < NR; r++) {
            const u8* b = rows[r] + 144 * (g / 8);
            const uint4* qv = (const uint4*)(b + 16 + 32 * (sub / 2));
            const uint4 q0 = qv[0], q1 = qv[1];
            const u32 qs[8] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w};
            int sum = 0;
#pragma unroll
            for (int k = 0; k < 8; k++) sum = dp4a((int)((qs[k] >> shift) & 0x0F0F0F0Fu), xs[k], sum);
            float sc, m;
            scale_min_k4(sub, b + 4, &sc, &m);
            acc[r] += ld_h(b) * sc * dx.x * (float)sum - ld_h(b + 2) * m * dx.x * dx.y;
        }
    }
}

// One lane's share of the dot products of NR rows with x over k-slice `ks` of `S` (summed over
// the warp, then over the slices, by the caller).
template <int DT, int NR>
__device__ __forceinline__ void row_dots(const u8* const* rows, int cols, const float* __restrict__ x, const i8* __restrict__ xq, const float2* __restrict__ ds,
                                         bool rx, int lane, int ks, int S, float* acc) {
#pragma unroll
    for (int r = 0; r < NR; r++) acc[r] = 0.0f;
    if (DT == DT_F32 || DT == DT_F16 || DT == DT_BF16) {
        dot_dense<DT, NR>(rows, cols, x, rx, lane, ks, S, acc);
    } else if (DT == DT_Q4_0 || DT == DT_Q4_1 || DT == DT_Q8_0) {
        dot_q8act<DT, NR>(rows, cols, xq, ds, lane, ks, S, acc);
    } else if (DT == DT_Q4_K && xq != nullptr) {
        dot_q4k_q8<NR>(rows, cols, xq, ds, lane, ks, S, acc);
    } else {
        // Other K-quants: one lane per 32-value group, on act_prep's f32 values.
        for (int g = ks * 32 + lane; g < cols / 32; g += 32 * S)
#pragma unroll
            for (int r = 0; r < NR; r++) acc[r] += dot_group<DT>(rows[r], g, x);
    }
}

// Sums each warp's NR partial results over the warp and the S k-slices of its rows; returns
// true in the one thread per row group that holds the totals in acc.
template <int NR>
__device__ __forceinline__ bool reduce_slices(float* acc, int S) {
    __shared__ float red[8][NR];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int r = 0; r < NR; r++) acc[r] = warp_sum(acc[r]);
    if (S == 1) return lane == 0;
    if (lane == 0)
#pragma unroll
        for (int r = 0; r < NR; r++) red[warp][r] = acc[r];
    __syncthreads();
    if (lane != 0 || warp % S != 0) return false;
    for (int w = 1; w < S; w++)
#pragma unroll
        for (int r = 0; r < NR; r++) acc[r] += red[warp + w][r];
    return true;
}

// Up to three products of the same input (q/k/v), rows laid end to end across the grid, one
// warp per row. `add`: y += W·x (a residual connection) instead of y = W·x.
struct Seg {
    const u8* w;
    float* y;
    int rows;
};

// Bytes one warp reads from each of its rows per step of row_dots' loop.
template <int DT>
__device__ constexpr int warp_step_bytes() {
    // Dense: 16 bytes a lane; repacked Q4/Q8_0: one block's quants a lane; K-quants: 32 groups.
    return DT <= DT_BF16 ? 512 : DT == DT_Q8_0 ? 32 * 32 : DT == DT_Q4_0 || DT == DT_Q4_1 ? 32 * 16 : DT == DT_Q6_K ? 4 * 210 : DT == DT_Q5_K ? 4 * 176 : 4 * 144;
}

#define PREFETCH_STEPS 4

// Warms L2 with the first steps of this warp's rows. Weights are the one input no kernel writes,
// so this runs before pdl_wait, while the previous kernel is still finishing.
template <int DT, int NR>
__device__ __forceinline__ void prefetch_rows(const u8* const* rows, i64 row_bytes, int lane, int ks, int S) {
    const int wb = warp_step_bytes<DT>();
    if (lane * 128 >= wb) return;
#pragma unroll
    for (int r = 0; r < NR; r++)
#pragma unroll
        for (int i = 0; i < PREFETCH_STEPS; i++) {
            const i64 off = (i64)(ks + i * S) * wb + lane * 128;
            if (off < row_bytes) prefetch_l2(rows[r] + off);
        }
}

// The input side of a one-token product. With `prep`, the block stages x in shared memory the
// way the CPU engine sees it: RMS-normalized with `norm_w` when given (the norm that precedes
// every projection of a layer, fused: no separate launch, no round trip), then rounded for DT:
// f32 values for F32/F16/BF16, 8-bit quants and (d, s) pairs for Q4_0/Q4_1/Q8_0 (xq, ds).
// Without it x (or xq/ds) is read from global memory: prepared by act_prep, or raw F32/F16/BF16
// input that row_dots rounds as it reads.
template <int DT>
__device__ __forceinline__ const float* stage_input(const float* x, int cols, const float* norm_w, float eps, int prep, const i8** xq, const float2** ds) {
    extern __shared__ float xs[];
    if (!prep) return x;
    const int ak = act_kind(DT), warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const float scale = row_scale(x, cols, norm_w, eps);
    const int units = (cols + unit_values(ak) - 1) / unit_values(ak);
    if (ak == AK_Q8) {
        i8* q = (i8*)xs;
        float2* d = (float2*)((char*)xs + ((cols + 15) & ~15));
        prep_units<8>(x, cols, scale, norm_w, ak, nullptr, q, d, warp, warps, units);
        __syncthreads();
        *xq = q;
        *ds = d;
        return x;
    }
    prep_units<8>(x, cols, scale, norm_w, ak, xs, nullptr, nullptr, warp, warps, units);
    __syncthreads();
    return xs;
}

// Blocks of 8 warps; each group of S warps (S = 1, 2, 4 or 8, the k-slices) computes a pair of
// rows. Small matrices use large S so that enough warps stream the weights.
// Decode-step epilogue of the q/k/v product (GGUF pair layout, rows 2i and 2i+1 rotate
// together): q is rotated in place, k rotated and v copied into the f16 cache at step->pos0.
struct RopeStore {
    const float* inv_freq;  // null: plain products
    u16* kc;
    u16* vc;
    int kv_dim;
    int head_dim;
    const Step* step;
};

// Finds row r (of the three segments laid end to end) in its segment.
__device__ __forceinline__ int locate(Seg s0, Seg s1, Seg s2, int r, Seg* s) {
    if (r < s0.rows) {
        *s = s0;
        return 0;
    }
    r -= s0.rows;
    if (r < s1.rows) {
        *s = s1;
        return 1;
    }
    *s = s2;
    return 2;
}

// Row r (of the three segments laid end to end) as a row of its segment: *s and *seg say which.
// Call it in a statement of its own: in `s.w + local_row(.., &s, ..)` the compiler may read s.w
// before the call sets it (unsequenced operands; it did, and dense_mv read through garbage).
__device__ __forceinline__ int local_row(Seg s0, Seg s1, Seg s2, int r, Seg* s, int* seg) {
    *seg = locate(s0, s1, s2, r, s);
    return r - (*seg > 0 ? s0.rows : 0) - (*seg > 1 ? s1.rows : 0);
}

// Writes the products of rows r, r+1 of segment `seg`: plainly (or added, for a residual), or
// for q/k/v with the rotation and the cache write.
__device__ __forceinline__ void store_pair(Seg s, int seg, int r, float a0, float a1, int add, const RopeStore& rs) {
    if (rs.inv_freq == nullptr) {
        s.y[r] = add ? s.y[r] + a0 : a0;
        s.y[r + 1] = add ? s.y[r + 1] + a1 : a1;
        return;
    }
    const int pos = rs.step->pos0;
    float y0 = a0, y1 = a1;
    if (seg < 2) {
        float sn, cs;
        sincosf((float)pos * rs.inv_freq[(r % rs.head_dim) / 2], &sn, &cs);
        y0 = a0 * cs - a1 * sn;
        y1 = a0 * sn + a1 * cs;
    }
    if (seg == 0) {
        s.y[r] = y0;
        s.y[r + 1] = y1;
    } else {
        u16* dst = (seg == 1 ? rs.kc : rs.vc) + (i64)pos * rs.kv_dim;
        dst[r] = f2h(y0);
        dst[r + 1] = f2h(y1);
    }
}

// Rows come in groups of 8/S pairs, one pair per S warps; a block takes groups blockIdx.x,
// blockIdx.x + gridDim.x, ... (the host launches about one wave of blocks, so each block stages
// its input once and then streams weights), warming L2 with its next group while it works.
template <int DT>
__device__ void matvec(Seg s0, Seg s1, Seg s2, i64 row_bytes, int cols, const float* __restrict__ x, int add, const float* norm_w, float eps, int S,
                       RopeStore rs, int prep, const i8* xq, const float2* ds) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, per = 8 / S;
    const int pairs = (s0.rows + s1.rows + s2.rows) / 2, groups = (pairs + per - 1) / per;
    for (int g = blockIdx.x, first = 1; g < groups; g += gridDim.x, first = 0) {
        Seg s;
        const int p = g * per + warp / S, next = p + gridDim.x * per;
        const bool valid = p < pairs;  // no early exit: reduce_slices synchronizes the block
        int seg;
        const int r = local_row(s0, s1, s2, 2 * (valid ? p : 0), &s, &seg);
        const u8* rows[2] = {s.w + (i64)r * row_bytes, s.w + (i64)(r + 1) * row_bytes};
        if (first) {
            if (valid) prefetch_rows<DT, 2>(rows, row_bytes, lane, warp % S, S);
            pdl_wait();
            pdl_launch();
            x = stage_input<DT>(x, cols, norm_w, eps, prep, &xq, &ds);
        }
        if (next < pairs) {
            Seg sn;
            int nseg;
            const int nr = local_row(s0, s1, s2, 2 * next, &sn, &nseg);
            const u8* nrows[2] = {sn.w + (i64)nr * row_bytes, sn.w + (i64)(nr + 1) * row_bytes};
            prefetch_rows<DT, 2>(nrows, row_bytes, lane, warp % S, S);
        }
        float acc[2] = {0.0f, 0.0f};
        if (valid) row_dots<DT, 2>(rows, cols, x, xq, ds, !prep, lane, warp % S, S, acc);
        if (reduce_slices<2>(acc, S) && valid) store_pair(s, seg, r, acc[0], acc[1], add, rs);
        if (S > 1) __syncthreads();  // reduce_slices' shared memory is reused by the next group
    }
}

// The feed-forward's first half for one token: out[r] = silu(gate_r · x) * (up_r · x); the gate
// and up rows are read together. Groups of 8/S rows, as in matvec.
template <int DT>
__device__ void ffn_up(const u8* wg, const u8* wu, float* out, int rows, i64 row_bytes, int cols, const float* __restrict__ x, const float* norm_w, float eps,
                       int S, int prep, const i8* xq, const float2* ds) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, per = 8 / S;
    const int groups = (rows + per - 1) / per;
    for (int g = blockIdx.x, first = 1; g < groups; g += gridDim.x, first = 0) {
        const int r = g * per + warp / S, next = r + gridDim.x * per;
        const bool valid = r < rows;
        const int rr = valid ? r : 0;
        const u8* both[2] = {wg + (i64)rr * row_bytes, wu + (i64)rr * row_bytes};
        if (first) {
            if (valid) prefetch_rows<DT, 2>(both, row_bytes, lane, warp % S, S);
            pdl_wait();
            pdl_launch();
            x = stage_input<DT>(x, cols, norm_w, eps, prep, &xq, &ds);
        }
        if (next < rows) {
            const u8* nboth[2] = {wg + (i64)next * row_bytes, wu + (i64)next * row_bytes};
            prefetch_rows<DT, 2>(nboth, row_bytes, lane, warp % S, S);
        }
        float acc[2] = {0.0f, 0.0f};
        if (valid) row_dots<DT, 2>(both, cols, x, xq, ds, !prep, lane, warp % S, S, acc);
        if (reduce_slices<2>(acc, S) && valid) out[r] = acc[0] / (1.0f + expf(-acc[0])) * acc[1];
        if (S > 1) __syncthreads();
    }
}

#define MATVEC(suffix, DT)                                                                                                                \
    extern "C" __global__ void matvec_##suffix(Seg s0, Seg s1, Seg s2, i64 row_bytes, int cols, const float* __restrict__ x, int add,   \
                                               const float* norm_w, float eps, int S, RopeStore rs, int prep, const i8* xq,               \
                                               const float2* ds) {                                                                        \
        matvec<DT>(s0, s1, s2, row_bytes, cols, x, add, norm_w, eps, S, rs, prep, xq, ds);                                                \
    }                                                                                                                                     \
    extern "C" __global__ void ffn_##suffix(const u8* wg, const u8* wu, float* out, int rows, i64 row_bytes, int cols, const float* x,     \
                                            const float* norm_w, float eps, int S, int prep, const i8* xq, const float2* ds) {            \
        ffn_up<DT>(wg, wu, out, rows, row_bytes, cols, x, norm_w, eps, S, prep, xq, ds);                                                  \
    }
MATVEC(f32, DT_F32)
MATVEC(f16, DT_F16)
MATVEC(bf16, DT_BF16)
MATVEC(q8_0, DT_Q8_0)
MATVEC(q4_0, DT_Q4_0)
MATVEC(q4_1, DT_Q4_1)
MATVEC(q4_k, DT_Q4_K)
MATVEC(q5_k, DT_Q5_K)
MATVEC(q6_k, DT_Q6_K)

// ---- dense one-token products (F16/BF16): persistent blocks, weights double-buffered ----
//
// A row group of TPR = 1 << tl threads owns RB rows (of NM matrices: gate and up for the
// feed-forward); thread t holds 16-byte chunks t, t + TPR, ... (CH of them) of each row and the
// matching input values in registers, so the input is read and normalized once per block and no
// shared-memory staging stands between the weights and the arithmetic. Blocks stride over the
// row groups (about two waves' worth of blocks stay resident) and load the next group's weights
// into a second register set while the current one is multiplied, so every thread keeps loads in
// flight the whole time; the first group's loads are issued before `pdl_wait`, while the
// previous kernel still runs. On an H200 a Llama-3.2-1B layer's four products take 36.5 µs this
// way against 47.8 µs with `matvec`'s warp-per-row-pair shape; a plain kernel that only reads
// those weights takes 37.9 µs (bench/gemv, 2026-12-02).

__device__ __forceinline__ uint4 ld_stream(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// Sums K values over each row group of 1 << tl threads (every thread of the block must call it;
// sm holds 8 * K floats).
template <int K>
__device__ __forceinline__ void group_sum(float* v, int tl, float* sm) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int width = tl < 5 ? 1 << tl : 32;
#pragma unroll
    for (int k = 0; k < K; k++)
#pragma unroll
        for (int o = width >> 1; o > 0; o >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], o);
    if (tl <= 5) return;
    __syncthreads();  // the previous call's readers are done with sm
    if (lane == 0)
#pragma unroll
        for (int k = 0; k < K; k++) sm[warp * K + k] = v[k];
    __syncthreads();
    const int per = 1 << (tl - 5), first = warp & ~(per - 1);
#pragma unroll
    for (int k = 0; k < K; k++) {
        float total = 0.0f;
#pragma unroll
        for (int w = 0; w < per; w++) total += sm[(first + w) * K + k];
        v[k] = total;
    }
}

// Loads the chunks of rows r0 .. r0 + RB of this thread (zeros past the end or the row).
template <int CH, int RB, int NM>
__device__ __forceinline__ void dense_load(uint4 (&w)[NM][RB][CH], Seg s0, Seg s1, Seg s2, const u8* wu, i64 row_bytes, int cols, int rows, int r0, int t,
                                           int tpr) {
#pragma unroll
    for (int rb = 0; rb < RB; rb++) {
        const int r = r0 + rb;
        const u8* p[NM];
        if (NM == 2) {
            p[0] = s0.w + (i64)r * row_bytes;
            p[NM - 1] = wu + (i64)r * row_bytes;
        } else {
            Seg s;
            int seg;
            const int local = local_row(s0, s1, s2, r, &s, &seg);  // sets s: not in the same expression as s.w
            p[0] = s.w + (i64)local * row_bytes;
        }
#pragma unroll
        for (int m = 0; m < NM; m++)
#pragma unroll
            for (int j = 0; j < CH; j++) {
                const int c = t + tpr * j;
                w[m][rb][j] = r < rows && 8 * c < cols ? ld_stream(p[m] + 16 * c) : make_uint4(0, 0, 0, 0);
            }
    }
}

__device__ __forceinline__ float dot8_v(int dt, uint4 w, const float* a) {
    return dt == DT_F16 ? dot8_h(w, make_float4(a[0], a[1], a[2], a[3]), make_float4(a[4], a[5], a[6], a[7]))
                        : dot8_bf(w, make_float4(a[0], a[1], a[2], a[3]), make_float4(a[4], a[5], a[6], a[7]));
}

// y = W·x for the rows of up to three segments (q/k/v: `rs` rotates and caches them, as
// store_pair does; `add`: a residual), or with NM = 2 the feed-forward's first half,
// s0.y[r] = silu(gate_r · x) * (up_r · x) (gate rows in s0.w, up rows in wu). x is normalized
// with norm_w when given, then rounded for DT as the CPU engine rounds it.
// TL: log2 threads a row when known at compile time (8: the common 256), else 0 and `tl_rt`
// says; the known case folds the row-group arithmetic and unrolls group_sum's shuffles: a
// Llama-3.2-1B layer's products went from 44.9 to 40.6 µs (bench/gemv), decode from 983 to 1148
// tok/s (H200).
template <int DT, int CH, int RB, int NM, int TL>
__device__ __forceinline__ void dense_mv(Seg s0, Seg s1, Seg s2, const u8* wu, i64 row_bytes, int cols, const float* __restrict__ x, int add,
                                         const float* norm_w, float eps, int tl_rt, RopeStore rs) {
    __shared__ float sm[8 * NM * RB];
    const int tl = TL ? TL : tl_rt;
    const int tpr = 1 << tl, t = threadIdx.x & (tpr - 1), G = blockDim.x >> tl, gi = threadIdx.x >> tl;
    const int rows = s0.rows + s1.rows + s2.rows, groups = (rows + RB - 1) / RB, steps = (groups + G - 1) / G;
    uint4 cur[NM][RB][CH], nxt[NM][RB][CH];
    int b = blockIdx.x;
    if (b < steps) dense_load<CH, RB, NM>(cur, s0, s1, s2, wu, row_bytes, cols, rows, (b * G + gi) * RB, t, tpr);
    float nw[CH][8];
#pragma unroll
    for (int j = 0; j < CH; j++)
#pragma unroll
        for (int e = 0; e < 8; e++) nw[j][e] = norm_w != nullptr && 8 * (t + tpr * j) < cols ? norm_w[8 * (t + tpr * j) + e] : 1.0f;
    pdl_wait();
    pdl_launch();
    // The input: this group's chunks (the group covers the whole row), normalized and rounded.
    float xv[CH][8];
    float ss = 0.0f;
#pragma unroll
    for (int j = 0; j < CH; j++) {
        const int c = t + tpr * j;
        const float4 a = 8 * c < cols ? *(const float4*)(x + 8 * c) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        const float4 d = 8 * c < cols ? *(const float4*)(x + 8 * c + 4) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        const float v[8] = {a.x, a.y, a.z, a.w, d.x, d.y, d.z, d.w};
#pragma unroll
        for (int e = 0; e < 8; e++) {
            xv[j][e] = v[e];
            ss += v[e] * v[e];
        }
    }
    float scale = 1.0f;
    if (norm_w != nullptr) {
        group_sum<1>(&ss, tl, sm);
        scale = 1.0f / sqrtf(ss / (float)cols + eps);
    }
#pragma unroll
    for (int j = 0; j < CH; j++)
#pragma unroll
        for (int e = 0; e < 8; e++) {
            const float v = norm_w != nullptr ? xv[j][e] * scale * nw[j][e] : xv[j][e];
            xv[j][e] = DT == DT_F16 ? round_f16(v) : round_bf16(v);
        }
    for (; b < steps; b += gridDim.x) {
        const int r0 = (b * G + gi) * RB;
        if (b + gridDim.x < steps) dense_load<CH, RB, NM>(nxt, s0, s1, s2, wu, row_bytes, cols, rows, ((b + gridDim.x) * G + gi) * RB, t, tpr);
        float acc[NM * RB];
#pragma unroll
        for (int m = 0; m < NM; m++)
#pragma unroll
            for (int rb = 0; rb < RB; rb++) {
                float a = 0.0f;
#pragma unroll
                for (int j = 0; j < CH; j++) a += dot8_v(DT, cur[m][rb][j], xv[j]);
                acc[m * RB + rb] = a;
            }
        group_sum<NM * RB>(acc, tl, sm);
        if (t == 0) {
            if (NM == 2) {
#pragma unroll
                for (int rb = 0; rb < RB; rb++)
                    if (r0 + rb < rows) s0.y[r0 + rb] = acc[rb] / (1.0f + expf(-acc[rb])) * acc[NM * RB - RB + rb];
            } else if (rs.inv_freq != nullptr) {
                // Row pairs rotate together (segments have even rows, r0 is even).
#pragma unroll
                for (int rb = 0; rb + 1 < RB; rb += 2)
                    if (r0 + rb + 1 < rows) {
                        Seg s;
                        int seg;
                        const int local = local_row(s0, s1, s2, r0 + rb, &s, &seg);
                        store_pair(s, seg, local, acc[rb], acc[rb + 1], add, rs);
                    }
            } else {
#pragma unroll
                for (int rb = 0; rb < RB; rb++)
                    if (r0 + rb < rows) {
                        Seg s;
                        int seg;
                        const int local = local_row(s0, s1, s2, r0 + rb, &s, &seg);
                        float* y = s.y + local;
                        *y = add ? *y + acc[rb] : acc[rb];
                    }
            }
        }
#pragma unroll
        for (int m = 0; m < NM; m++)
#pragma unroll
            for (int rb = 0; rb < RB; rb++)
#pragma unroll
                for (int j = 0; j < CH; j++) cur[m][rb][j] = nxt[m][rb][j];
    }
}

// Instances: CH chunks a thread (input widths up to 2048 * CH); four rows a group where one
// row's chunks are few, else two, so a thread holds at most 4 chunks per register set.
// DENSE_MIN_BLOCKS: the blocks per SM the host plans for (mod.rs's dense_plan), promised to the
// compiler so that they fit: without it the one-chunk gate/up took 70 registers, 3 blocks of 256
// threads fit where 4 were planned, and a quarter of the grid ran as a second wave. The host
// also caps its grid at the occupancy the driver reports, so a kernel that still misses the
// bound only loses speed. The four-chunk gate/up (inputs over 4096 wide) asks for one: at two
// its double-buffered registers spill.
#define DENSE_MIN_BLOCKS(CH, NM) ((CH) == 1 ? 4 : (CH) == 4 && (NM) == 2 ? 1 : 2)
#define DENSE(suffix, DT, CH)                                                                                                           \
    extern "C" __global__ void __launch_bounds__(256, DENSE_MIN_BLOCKS(CH, 1)) dense_##suffix##_c##CH(Seg s0, Seg s1, Seg s2, i64 row_bytes, int cols, const float* x, \
                                                                           int add, const float* norm_w, float eps, int tl, RopeStore rs) { \
        if (tl == 8)                                                                                                                    \
            dense_mv<DT, CH, CH == 1 ? 4 : 2, 1, 8>(s0, s1, s2, nullptr, row_bytes, cols, x, add, norm_w, eps, tl, rs);                 \
        else                                                                                                                            \
            dense_mv<DT, CH, CH == 1 ? 4 : 2, 1, 0>(s0, s1, s2, nullptr, row_bytes, cols, x, add, norm_w, eps, tl, rs);                 \
    }                                                                                                                                   \
    extern "C" __global__ void __launch_bounds__(256, DENSE_MIN_BLOCKS(CH, 2)) dense_ffn_##suffix##_c##CH(Seg gate, const u8* wu, i64 row_bytes, int cols, const float* x, \
                                                                               const float* norm_w, float eps, int tl) {             \
        const Seg none = {nullptr, nullptr, 0};                                                                                         \
        const RopeStore rs = {nullptr, nullptr, nullptr, 0, 0, nullptr};                                                                \
        if (tl == 8)                                                                                                                    \
            dense_mv<DT, CH, 2, 2, 8>(gate, none, none, wu, row_bytes, cols, x, 0, norm_w, eps, tl, rs);                                 \
        else                                                                                                                            \
            dense_mv<DT, CH, 2, 2, 0>(gate, none, none, wu, row_bytes, cols, x, 0, norm_w, eps, tl, rs);                                 \
    }
DENSE(f16, DT_F16, 1)
DENSE(f16, DT_F16, 2)
DENSE(f16, DT_F16, 4)
DENSE(bf16, DT_BF16, 1)
DENSE(bf16, DT_BF16, 2)
DENSE(bf16, DT_BF16, 4)

// Any format, any width (rows not 16-byte aligned): element by element. Rare; correct, not fast.
extern "C" __global__ void matvec_any(Seg s0, int dt, i64 row_bytes, int cols, const float* __restrict__ x, int add) {
    pdl_wait();
    pdl_launch();
    int r = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (r >= s0.rows) return;
    const u8* row = s0.w + (i64)r * row_bytes;
    float acc = 0.0f;
    for (int i = lane; i < cols; i += 32) acc += dequant_one(dt, row, i, cols) * x[i];
    acc = warp_sum(acc);
    if (lane == 0) s0.y[r] = add ? s0.y[r] + acc : acc;
}

// ---- normalization, rotary embedding, activations ----

// out[r] = x[r] / rms(x[r]) * w. One block per row.
extern "C" __global__ void rms_norm(const float* x, const float* w, float* out, int dim, float eps) {
    pdl_wait();
    pdl_launch();
    __shared__ float part[32];
    const float* xr = x + (i64)blockIdx.x * dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : 0.0f;
        v = warp_sum(v);
        if (threadIdx.x == 0) part[0] = v;
    }
    __syncthreads();
    float scale = 1.0f / sqrtf(part[0] / (float)dim + eps);
    float* o = out + (i64)blockIdx.x * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = xr[i] * scale * w[i];
}

// Rotary embedding in place on [n tokens][heads][head_dim] at positions step->pos0 + t.
// `half_split`: pairs (i, i + d/2) (Hugging Face); otherwise (2i, 2i + 1) (GGUF).
extern "C" __global__ void rope(float* x, const float* inv_freq, int n, int heads, int head_dim, int half_split, const Step* step) {
    pdl_wait();
    pdl_launch();
    int half = head_dim / 2;
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n * heads * half) return;
    int i = idx % half, th = idx / half, t = th / heads;
    float s, c;
    sincosf((float)(step->pos0 + t) * inv_freq[i], &s, &c);
    float* v = x + (i64)th * head_dim;
    int a = half_split ? i : 2 * i, b = half_split ? i + half : 2 * i + 1;
    float x0 = v[a], x1 = v[b];
    v[a] = x0 * c - x1 * s;
    v[b] = x0 * s + x1 * c;
}

// One token step's rotary embedding and cache write in one launch: rotates q in place, rotates
// k into the f16 cache and copies v there, at positions step->pos0 + t.
extern "C" __global__ void rope_store(float* q, const float* k, const float* v, u16* kc, u16* vc, const float* inv_freq, int n, int n_heads,
                                      int n_kv_heads, int head_dim, int half_split, const Step* step) {
    pdl_wait();
    pdl_launch();
    const int half = head_dim / 2, kv_dim = n_kv_heads * head_dim;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    const int q_pairs = n * n_heads * half, k_pairs = n * n_kv_heads * half;
    const i64 base = (i64)step->pos0 * kv_dim;
    if (idx < n * kv_dim) vc[base + idx] = f2h(v[idx]);
    if (idx >= q_pairs + k_pairs) return;
    const bool is_q = idx < q_pairs;
    const int j = is_q ? idx : idx - q_pairs, heads = is_q ? n_heads : n_kv_heads;
    const int i = j % half, th = j / half, t = th / heads;
    float s, c;
    sincosf((float)(step->pos0 + t) * inv_freq[i], &s, &c);
    const int a = half_split ? i : 2 * i, b = half_split ? i + half : 2 * i + 1;
    const float* src = (is_q ? q : k) + (i64)th * head_dim;
    float x0 = src[a], x1 = src[b];
    float y0 = x0 * c - x1 * s, y1 = x0 * s + x1 * c;
    if (is_q) {
        q[(i64)th * head_dim + a] = y0;
        q[(i64)th * head_dim + b] = y1;
    } else {
        u16* dst = kc + base + (i64)th * head_dim;  // th = t * n_kv_heads + h, rows of kv_dim
        dst[a] = f2h(y0);
        dst[b] = f2h(y1);
    }
}

// gate[i] = silu(gate[i]) * up[i]
extern "C" __global__ void silu_mul(float* gate, const float* up, i64 n) {
    pdl_wait();
    pdl_launch();
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// dst[i] = src[i]: device results written straight into host-registered memory (an actor's
// linear memory), which kernels may address across registrations where cuMemcpy may not.
extern "C" __global__ void copy_f32(const float* src, float* dst, i64 n) {
    pdl_wait();
    pdl_launch();
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) dst[i] = src[i];
}

// The index of the largest of x[0..n), the first on ties, NaNs and -inf never win (the host's
// `argmax`, which answers 0 when nothing beats -inf): greedy decoding reads back this index
// instead of the logits. Every block reduces its share to one (value, index) key and merges it
// into *key with one 64-bit atomicMax: the value's bits made order-preserving above, the
// complemented index below, so equal values keep the smaller index. *key starts at 0 (the host
// clears it); 0 means nothing won.
extern "C" __global__ void argmax_f32(const float* x, i64 n, unsigned long long* key) {
    pdl_wait();
    pdl_launch();
    __shared__ unsigned long long part[32];
    unsigned long long best = 0;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const float v = x[i];
        if (!(v > -INFINITY)) continue;  // NaN or -inf
        const u32 b = __float_as_uint(v), ordered = (b & 0x80000000u) ? ~b : b | 0x80000000u;
        const unsigned long long k = ((unsigned long long)ordered << 32) | (u32)~(u32)i;
        best = k > best ? k : best;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const unsigned long long other = __shfl_xor_sync(0xffffffffu, best, o);
        best = other > best ? other : best;
    }
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = best;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); w++) best = part[w] > best ? part[w] : best;
        if (best != 0) atomicMax(key, best);
    }
}

// out[i] = x[i] as f16 (bf = 0) or bf16 bits: activations already rounded for F16/BF16 weights
// (act_prep), so the conversion is exact, for cuBLAS's 16-bit tensor-core products (prefill).
extern "C" __global__ void to_half(const float* x, u16* out, i64 n, int bf) {
    pdl_wait();
    pdl_launch();
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        out[i] = bf ? (u16)(__float_as_uint(round_bf16(x[i])) >> 16) : f2h(x[i]);
}

// x[i] += y[i]
extern "C" __global__ void add(float* x, const float* y, i64 n) {
    pdl_wait();
    pdl_launch();
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) x[i] += y[i];
}

// ---- attention over the f16 KV cache ----

// Writes the pass's K and V rows ([n][kv_dim] f32) into the cache at positions step->pos0 + t.
extern "C" __global__ void kv_store(const float* k, const float* v, u16* kc, u16* vc, int n, int kv_dim, const Step* step) {
    pdl_wait();
    pdl_launch();
    i64 total = (i64)n * kv_dim;
    i64 base = (i64)step->pos0 * kv_dim;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        kc[base + i] = f2h(k[i]);
        vc[base + i] = f2h(v[i]);
    }
}

#define MAX_HD_PER_LANE 8  // head_dim up to 256

// Split-context ("flash decoding") attention, first half. Block (head, token, split) covers
// positions [split*chunk, min(split*chunk + chunk, ctx)) of token t's causal context
// ctx = pos0 + t + 1; each warp runs an online softmax over every 4th position, then the warps
// merge. Writes the split's running max, sum and unnormalized output.
extern "C" __global__ void attn_partial(const float* q, const u16* kc, const u16* vc, float* part, int n_heads, int n_kv_heads, int head_dim, int chunk,
                                        float scale, const Step* step) {
    pdl_wait();
    pdl_launch();
    const int h = blockIdx.x, t = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    const int per = head_dim / 32;  // values per lane
    const int kv_dim = n_kv_heads * head_dim, kvh = h / (n_heads / n_kv_heads);
    const int ctx = step->pos0 + t + 1;
    const int start = split * chunk, end = min(start + chunk, ctx);
    float* out = part + (((i64)t * n_heads + h) * splits + split) * (head_dim + 2);

    float qv[MAX_HD_PER_LANE], acc[MAX_HD_PER_LANE];
    const float* qh = q + ((i64)t * n_heads + h) * head_dim;
#pragma unroll
    for (int j = 0; j < MAX_HD_PER_LANE; j++) {
        qv[j] = j < per ? qh[lane * per + j] : 0.0f;
        acc[j] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    for (int p = start + warp; p < end; p += warps) {
        const u16* kr = kc + (i64)p * kv_dim + kvh * head_dim + lane * per;
        float s = 0.0f;
#pragma unroll
        for (int j = 0; j < MAX_HD_PER_LANE; j++)
            if (j < per) s += qv[j] * h2f(kr[j]);
        s = warp_sum(s) * scale;
        float m_new = fmaxf(m, s);
        float corr = expf(m - m_new), e = expf(s - m_new);
        const u16* vr = vc + (i64)p * kv_dim + kvh * head_dim + lane * per;
#pragma unroll
        for (int j = 0; j < MAX_HD_PER_LANE; j++)
            if (j < per) acc[j] = acc[j] * corr + e * h2f(vr[j]);
        l = l * corr + e;
        m = m_new;
    }
    // Merge the warps of this block through shared memory.
    __shared__ float sm_m[32], sm_l[32];
    __shared__ float sm_acc[32 * 256];
    if (lane == 0) {
        sm_m[warp] = m;
        sm_l[warp] = l;
    }
#pragma unroll
    for (int j = 0; j < MAX_HD_PER_LANE; j++)
        if (j < per) sm_acc[warp * head_dim + lane * per + j] = acc[j];
    __syncthreads();
    float big = -INFINITY, sum = 0.0f;
    for (int w = 0; w < warps; w++) big = fmaxf(big, sm_m[w]);
    for (int w = 0; w < warps; w++)
        if (sm_m[w] > -INFINITY) sum += sm_l[w] * expf(sm_m[w] - big);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float a = 0.0f;
        for (int w = 0; w < warps; w++)
            if (sm_m[w] > -INFINITY) a += sm_acc[w * head_dim + d] * expf(sm_m[w] - big);
        out[2 + d] = a;
    }
    if (threadIdx.x == 0) {
        out[0] = big;
        out[1] = sum;
    }
}

// Loads `per` consecutive f16 values (at most 8): in one load, aligned to its size, when per is
// 1, 2, 4 or 8; one by one otherwise (head_dim 96, 160, ...).
__device__ __forceinline__ void load_halves(const u16* p, int per, float* out) {
    if (per != 1 && per != 2 && per != 4 && per != 8) {
        for (int j = 0; j < per; j++) out[j] = h2f(p[j]);
    } else if (per == 8) {
        const uint4 w = *(const uint4*)p;
        const u32 ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int k = 0; k < 4; k++) {
            out[2 * k] = h2f(ws[k] & 0xffff);
            out[2 * k + 1] = h2f(ws[k] >> 16);
        }
    } else if (per == 4) {
        const uint2 w = *(const uint2*)p;
        out[0] = h2f(w.x & 0xffff);
        out[1] = h2f(w.x >> 16);
        out[2] = h2f(w.y & 0xffff);
        out[3] = h2f(w.y >> 16);
    } else if (per == 2) {
        const u32 w = *(const u32*)p;
        out[0] = h2f(w & 0xffff);
        out[1] = h2f(w >> 16);
    } else {
        out[0] = h2f(*p);
    }
}

// Attention over a short context (ctx <= 1024) in one block per (head, token), with no split and
// no combine pass: each thread scores whole positions (a full q·k dot from one 16-byte-loaded K
// row) into shared memory, the block takes an exact softmax, then each warp accumulates V over
// every 8th position with lanes owning dimensions, and the warps merge.
extern "C" __global__ void attn_small(const float* q, const u16* kc, const u16* vc, float* out, int n_heads, int n_kv_heads, int head_dim, float scale,
                                      const Step* step) {
    pdl_wait();
    pdl_launch();
    __shared__ float qs[256];
    __shared__ float sc[1024];
    __shared__ float red[32];
    __shared__ float acc_s[8][256];
    const int h = blockIdx.x, t = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
    const int kv_dim = n_kv_heads * head_dim, kvh = h / (n_heads / n_kv_heads);
    const int ctx = step->pos0 + t + 1;
    const float* qh = q + ((i64)t * n_heads + h) * head_dim;
    for (int d = tid; d < head_dim; d += blockDim.x) qs[d] = qh[d];
    __syncthreads();
    // Scores, and their maximum.
    float mx = -INFINITY;
    for (int p = tid; p < ctx; p += blockDim.x) {
        const uint4* kr = (const uint4*)(kc + (i64)p * kv_dim + kvh * head_dim);
        float s = 0.0f;
        for (int c = 0; c < head_dim / 8; c++) {
            uint4 w = kr[c];
            const float* qc = qs + 8 * c;
            s += h2f(w.x & 0xffff) * qc[0] + h2f(w.x >> 16) * qc[1] + h2f(w.y & 0xffff) * qc[2] + h2f(w.y >> 16) * qc[3] + h2f(w.z & 0xffff) * qc[4] +
                 h2f(w.z >> 16) * qc[5] + h2f(w.w & 0xffff) * qc[6] + h2f(w.w >> 16) * qc[7];
        }
        s *= scale;
        sc[p] = s;
        mx = fmaxf(mx, s);
    }
    mx = warp_max(mx);
    if (lane == 0) red[warp] = mx;
    __syncthreads();
    mx = -INFINITY;
    for (int w = 0; w < warps; w++) mx = fmaxf(mx, red[w]);
    __syncthreads();
    // Exponentials and their sum.
    float sum = 0.0f;
    for (int p = tid; p < ctx; p += blockDim.x) {
        float e = expf(sc[p] - mx);
        sc[p] = e;
        sum += e;
    }
    sum = warp_sum(sum);
    if (lane == 0) red[warp] = sum;
    __syncthreads();
    sum = 0.0f;
    for (int w = 0; w < warps; w++) sum += red[w];
    // Weighted V. Where head_dim / 8 is a power of two up to 32 (64, 128, 256), a lane reads 8
    // dims in one 16-byte load, so a warp covers 32 * 8 / head_dim positions per step (4 for
    // head_dim 64) and the lanes of one dim chunk are summed at the end; otherwise lanes own
    // `per` consecutive dims of one position per step. Warps take every warps-th step.
    const int lpr = head_dim / 8;  // lanes per row in the 16-byte layout
    if (head_dim % 8 == 0 && lpr <= 32 && (lpr & (lpr - 1)) == 0) {
        const int rows = 32 / lpr, sub = lane / lpr, chunk = lane % lpr;
        float a[8];
#pragma unroll
        for (int j = 0; j < 8; j++) a[j] = 0.0f;
        const u16* vbase = vc + kvh * head_dim + chunk * 8;
#pragma unroll 4
        for (int p = warp * rows + sub; p < ctx; p += warps * rows) {
            float v[8];
            load_halves(vbase + (i64)p * kv_dim, 8, v);
            const float e = sc[p];
#pragma unroll
            for (int j = 0; j < 8; j++) a[j] += e * v[j];
        }
        for (int o = lpr; o < 32; o <<= 1)
#pragma unroll
            for (int j = 0; j < 8; j++) a[j] += __shfl_xor_sync(0xffffffffu, a[j], o);
        if (sub == 0)
#pragma unroll
            for (int j = 0; j < 8; j++) acc_s[warp][chunk * 8 + j] = a[j];
    } else {
        float a[MAX_HD_PER_LANE];
#pragma unroll
        for (int j = 0; j < MAX_HD_PER_LANE; j++) a[j] = 0.0f;
        const int per = head_dim / 32;
        const u16* vbase = vc + kvh * head_dim + lane * per;
#pragma unroll 4
        for (int p = warp; p < ctx; p += warps) {
            float v[MAX_HD_PER_LANE];
            load_halves(vbase + (i64)p * kv_dim, per, v);
            const float e = sc[p];
#pragma unroll
            for (int j = 0; j < MAX_HD_PER_LANE; j++)
                if (j < per) a[j] += e * v[j];
        }
#pragma unroll
        for (int j = 0; j < MAX_HD_PER_LANE; j++)
            if (j < per) acc_s[warp][lane * per + j] = a[j];
    }
    __syncthreads();
    const float inv = 1.0f / sum;
    for (int d = tid; d < head_dim; d += blockDim.x) {
        float v = 0.0f;
        for (int w = 0; w < warps; w++) v += acc_s[w][d];
        out[((i64)t * n_heads + h) * head_dim + d] = v * inv;
    }
}

// Second half: merges the splits of (head, token) into out[t][h][:]. Block: head_dim threads.
extern "C" __global__ void attn_combine(const float* part, float* out, int n_heads, int head_dim, int splits) {
    pdl_wait();
    pdl_launch();
    const int h = blockIdx.x, t = blockIdx.y, d = threadIdx.x;
    const float* p = part + ((i64)t * n_heads + h) * splits * (head_dim + 2);
    float big = -INFINITY;
    for (int s = 0; s < splits; s++) big = fmaxf(big, p[s * (head_dim + 2)]);
    float sum = 0.0f, a = 0.0f;
    for (int s = 0; s < splits; s++) {
        const float* ps = p + s * (head_dim + 2);
        if (ps[0] > -INFINITY) {
            float w = expf(ps[0] - big);
            sum += ps[1] * w;
            a += ps[2 + d] * w;
        }
    }
    if (d < head_dim) out[((i64)t * n_heads + h) * head_dim + d] = a / sum;
}
