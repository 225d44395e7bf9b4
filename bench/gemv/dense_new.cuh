// Experimental dense (F16/BF16) one-token product for the microbenchmark: threads own 16-byte
// column chunks of the row, TPR threads per row, the weights loaded into registers *before*
// griddepcontrol.wait (weights are the one input no kernel writes), x kept in registers.
// mode: 0 store, 1 add (residual), 2 silu(a)*b (NM = 2: gate and up).
template <int DT>
__device__ __forceinline__ float dot8(uint4 w, const float* a) {
    if (DT == DT_F16)
        return h2f(w.x & 0xffff) * a[0] + h2f(w.x >> 16) * a[1] + h2f(w.y & 0xffff) * a[2] + h2f(w.y >> 16) * a[3] + h2f(w.z & 0xffff) * a[4] +
               h2f(w.z >> 16) * a[5] + h2f(w.w & 0xffff) * a[6] + h2f(w.w >> 16) * a[7];
    return __uint_as_float(w.x << 16) * a[0] + __uint_as_float(w.x & 0xffff0000u) * a[1] + __uint_as_float(w.y << 16) * a[2] +
           __uint_as_float(w.y & 0xffff0000u) * a[3] + __uint_as_float(w.z << 16) * a[4] + __uint_as_float(w.z & 0xffff0000u) * a[5] +
           __uint_as_float(w.w << 16) * a[6] + __uint_as_float(w.w & 0xffff0000u) * a[7];
}

__device__ __forceinline__ uint4 ld_stream(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// Sum over the TPR threads of a row group (TPR = 1 << tl); every thread of the block must call.
template <int K>
__device__ __forceinline__ void group_sum(float* v, int tl, float* sm /* [8][K] */) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int width = tl < 5 ? (1 << tl) : 32;
#pragma unroll
    for (int k = 0; k < K; k++)
        for (int o = width >> 1; o > 0; o >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], o);
    if (tl <= 5) return;
    __syncthreads();
    if (lane == 0)
#pragma unroll
        for (int k = 0; k < K; k++) sm[warp * K + k] = v[k];
    __syncthreads();
    const int wpg = 1 << (tl - 5), first = (warp >> (tl - 5)) << (tl - 5);
#pragma unroll
    for (int k = 0; k < K; k++) {
        float s = 0.0f;
        for (int w = 0; w < wpg; w++) s += sm[(first + w) * K + k];
        v[k] = s;
    }
}

template <int DT, int CH, int RB, int NM, bool EARLY>
__global__ void __launch_bounds__(256) dmv(const u8* __restrict__ wa, const u8* __restrict__ wb, int rows, i64 row_bytes, int cols,
                                           const float* __restrict__ x, const float* __restrict__ norm_w, float eps, int tl, int mode, float* y) {
    __shared__ float sm[8 * NM * RB];
    const int tid = threadIdx.x, t = tid & ((1 << tl) - 1), g = tid >> tl, G = blockDim.x >> tl;
    const int r0 = (blockIdx.x * G + g) * RB;
    const int tpr = 1 << tl;
    uint4 w[NM][RB][CH];
    float nw[CH][8];
    if (!EARLY) pdl_wait();
#pragma unroll
    for (int m = 0; m < NM; m++)
#pragma unroll
        for (int rb = 0; rb < RB; rb++)
#pragma unroll
            for (int j = 0; j < CH; j++) {
                const int r = r0 + rb, c = t + tpr * j;
                w[m][rb][j] = r < rows && 8 * c < cols ? ld_stream((m ? wb : wa) + (i64)r * row_bytes + 16 * c) : make_uint4(0, 0, 0, 0);
            }
    if (norm_w != nullptr)
#pragma unroll
        for (int j = 0; j < CH; j++) {
            const int c = t + tpr * j;
#pragma unroll
            for (int e = 0; e < 8; e++) nw[j][e] = 8 * c < cols ? norm_w[8 * c + e] : 0.0f;
        }
    if (EARLY) pdl_wait();
    pdl_launch();
    float xv[CH][8];
    float ss = 0.0f;
#pragma unroll
    for (int j = 0; j < CH; j++) {
        const int c = t + tpr * j;
        float4 a = make_float4(0, 0, 0, 0), b = a;
        if (8 * c < cols) {
            a = *(const float4*)(x + 8 * c);
            b = *(const float4*)(x + 8 * c + 4);
        }
        xv[j][0] = a.x; xv[j][1] = a.y; xv[j][2] = a.z; xv[j][3] = a.w;
        xv[j][4] = b.x; xv[j][5] = b.y; xv[j][6] = b.z; xv[j][7] = b.w;
#pragma unroll
        for (int e = 0; e < 8; e++) ss += xv[j][e] * xv[j][e];
    }
    if (norm_w != nullptr) {
        group_sum<1>(&ss, tl, sm);
        const float scale = 1.0f / sqrtf(ss / (float)cols + eps);
#pragma unroll
        for (int j = 0; j < CH; j++)
#pragma unroll
            for (int e = 0; e < 8; e++) xv[j][e] = xv[j][e] * scale * nw[j][e];
    }
#pragma unroll
    for (int j = 0; j < CH; j++)
#pragma unroll
        for (int e = 0; e < 8; e++) xv[j][e] = DT == DT_F16 ? round_f16(xv[j][e]) : round_bf16(xv[j][e]);
    float acc[NM * RB];
#pragma unroll
    for (int m = 0; m < NM; m++)
#pragma unroll
        for (int rb = 0; rb < RB; rb++) {
            float s = 0.0f;
#pragma unroll
            for (int j = 0; j < CH; j++) s += dot8<DT>(w[m][rb][j], xv[j]);
            acc[m * RB + rb] = s;
        }
    group_sum<NM * RB>(acc, tl, sm);
    if (t != 0) return;
#pragma unroll
    for (int rb = 0; rb < RB; rb++) {
        const int r = r0 + rb;
        if (r >= rows) break;
        const float a = acc[rb];
        if (mode == 2) y[r] = a / (1.0f + expf(-a)) * acc[RB + rb];
        else y[r] = mode == 1 ? y[r] + a : a;
    }
}

// Persistent variant: blocks stride over row groups and load the next group's weights into a
// second register set while the current one is multiplied (software pipelining).
template <int DT, int CH, int RB, int NM>
__global__ void __launch_bounds__(256) dmv2(const u8* __restrict__ wa, const u8* __restrict__ wb, int rows, i64 row_bytes, int cols,
                                            const float* __restrict__ x, const float* __restrict__ norm_w, float eps, int mode, float* y) {
    __shared__ float sm[8 * NM * RB];
    const int tl = 8, tpr = 256, t = threadIdx.x;
    const int groups = (rows + RB - 1) / RB;
    uint4 cur[NM][RB][CH], nxt[NM][RB][CH];
    auto load = [&](uint4 (&w)[NM][RB][CH], int g) {
#pragma unroll
        for (int m = 0; m < NM; m++)
#pragma unroll
            for (int rb = 0; rb < RB; rb++)
#pragma unroll
                for (int j = 0; j < CH; j++) {
                    const int r = g * RB + rb, c = t + tpr * j;
                    w[m][rb][j] = r < rows && 8 * c < cols ? ld_stream((m ? wb : wa) + (i64)r * row_bytes + 16 * c) : make_uint4(0, 0, 0, 0);
                }
    };
    int g = blockIdx.x;
    if (g < groups) load(cur, g);
    float nw[CH][8];
    if (norm_w != nullptr)
#pragma unroll
        for (int j = 0; j < CH; j++) {
            const int c = t + tpr * j;
#pragma unroll
            for (int e = 0; e < 8; e++) nw[j][e] = 8 * c < cols ? norm_w[8 * c + e] : 0.0f;
        }
    pdl_wait();
    pdl_launch();
    float xv[CH][8];
    float ss = 0.0f;
#pragma unroll
    for (int j = 0; j < CH; j++) {
        const int c = t + tpr * j;
        float4 a = make_float4(0, 0, 0, 0), b = a;
        if (8 * c < cols) {
            a = *(const float4*)(x + 8 * c);
            b = *(const float4*)(x + 8 * c + 4);
        }
        xv[j][0] = a.x; xv[j][1] = a.y; xv[j][2] = a.z; xv[j][3] = a.w;
        xv[j][4] = b.x; xv[j][5] = b.y; xv[j][6] = b.z; xv[j][7] = b.w;
#pragma unroll
        for (int e = 0; e < 8; e++) ss += xv[j][e] * xv[j][e];
    }
    if (norm_w != nullptr) {
        group_sum<1>(&ss, tl, sm);
        const float scale = 1.0f / sqrtf(ss / (float)cols + eps);
#pragma unroll
        for (int j = 0; j < CH; j++)
#pragma unroll
            for (int e = 0; e < 8; e++) xv[j][e] = xv[j][e] * scale * nw[j][e];
    }
#pragma unroll
    for (int j = 0; j < CH; j++)
#pragma unroll
        for (int e = 0; e < 8; e++) xv[j][e] = DT == DT_F16 ? round_f16(xv[j][e]) : round_bf16(xv[j][e]);
    for (; g < groups; g += gridDim.x) {
        const int gn = g + gridDim.x;
        if (gn < groups) load(nxt, gn);
        float acc[NM * RB];
#pragma unroll
        for (int m = 0; m < NM; m++)
#pragma unroll
            for (int rb = 0; rb < RB; rb++) {
                float s = 0.0f;
#pragma unroll
                for (int j = 0; j < CH; j++) s += dot8<DT>(cur[m][rb][j], xv[j]);
                acc[m * RB + rb] = s;
            }
        group_sum<NM * RB>(acc, tl, sm);
        if (t == 0)
#pragma unroll
            for (int rb = 0; rb < RB; rb++) {
                const int r = g * RB + rb;
                if (r < rows) {
                    const float a = acc[rb];
                    if (mode == 2) y[r] = a / (1.0f + expf(-a)) * acc[RB + rb];
                    else y[r] = mode == 1 ? y[r] + a : a;
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
