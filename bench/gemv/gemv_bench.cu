// Microbenchmark: one Llama-3.2-1B decode layer's products (q/k/v, o, gate/up, down; F16/BF16)
// through Driftwood's kernels (kernels.cu, included): the warp-per-row-pair `matvec` kernels,
// the persistent `dense_mv` that decode uses for F16/BF16, and a plain kernel that only reads the
// same weight bytes (the speed to beat). 16 layers of distinct weights are captured in a CUDA
// graph with programmatic dependent launch, as the decode step runs them; each product is also
// timed alone (16 launches a graph). The first variant is the reference for the relative
// differences printed after one layer. Build and run: bench/gemv/run.sh (nvcc, sm_90).
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include <functional>
#include <string>
#include <cmath>
#undef INFINITY
#include "../../src/backend/cuda/kernels.cu"

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); exit(1); } } while (0)

static bool g_pdl = true;
template <typename... KArgs, typename... Args>
void launch(void (*k)(KArgs...), unsigned grid, unsigned block, size_t smem, cudaStream_t s, Args... args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(grid);
    cfg.blockDim = dim3(block);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s;
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[0].val.programmaticStreamSerializationAllowed = g_pdl ? 1 : 0;
    cfg.attrs = at;
    cfg.numAttrs = 1;
    CK(cudaLaunchKernelEx(&cfg, k, (KArgs)args...));
}

__global__ void fill_w(u16* w, i64 n, u32 seed, int bf) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        u32 h = (u32)i * 2654435761u ^ seed;
        h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
        float v = ((float)(h & 0xffff) / 65535.0f - 0.5f) * 0.06f;
        w[i] = bf ? (u16)(__float_as_uint(v) >> 16) : f2h(v);
    }
}
__global__ void fill_f(float* x, int n, u32 seed, float base, float amp) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { u32 h = (u32)i * 2246822519u ^ seed; h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15; x[i] = base + ((float)(h & 0xffff) / 65535.0f - 0.5f) * amp; }
}
__global__ void read_bw(const uint4* p, i64 n, u32* out) {
    u32 a = 0;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) { uint4 v = p[i]; a ^= v.x ^ v.y ^ v.z ^ v.w; }
    if (a == 0x12345678u) *out = a;
}

const int L = 16, D = 2048, QKV = 3072, F = 8192;
struct Layer { u16 *qkv, *k, *v, *o, *g, *u, *d; float* nw1; float* nw2; };

static int sms;
static int k_slices(int groups, int steps, int max_blocks) {
    int want = (4096 + groups - 1) / groups, s = 8;
    for (int c : {1, 2, 4, 8}) if (c >= want) { s = c; break; }
    while (s > 1 && (groups * s + 7) / 8 > max_blocks) s /= 2;
    int most = 1;
    for (int m : {8, 4, 2, 1}) if (m <= std::max(steps, 1)) { most = m; break; }
    return std::min(s, most);
}

// Current kernels: what mod.rs launches for one decode layer (minus attention).
template <int DT>
void old_kernel(int which, const Layer& l, float* x, float* y, float* h, cudaStream_t s) {
    auto mv = DT == DT_F16 ? matvec_f16 : matvec_bf16;
    auto fu = DT == DT_F16 ? ffn_f16 : ffn_bf16;
    const int maxb = 4 * sms;
    RopeStore rs = {nullptr, nullptr, nullptr, 0, 0, nullptr};
    Seg none = {nullptr, nullptr, 0};
    if (which == 0) {
        int S = k_slices(QKV / 2, D / 256, maxb), grid = std::min((QKV / 2 + 8 / S - 1) / (8 / S), maxb);
        Seg a = {(const u8*)l.qkv, y, D}, b = {(const u8*)l.k, y + D, 512}, c = {(const u8*)l.v, y + D + 512, 512};
        launch(mv, grid, 256, 4 * D, s, a, b, c, (i64)2 * D, D, (const float*)x, 0, (const float*)l.nw1, 1e-5f, S, rs, 1, (const i8*)nullptr, (const float2*)nullptr);
    } else if (which == 1) {
        int S = k_slices(D / 2, D / 256, maxb), grid = std::min((D / 2 + 8 / S - 1) / (8 / S), maxb);
        Seg a = {(const u8*)l.o, x, D};
        launch(mv, grid, 256, 0, s, a, none, none, (i64)2 * D, D, (const float*)y, 1, (const float*)nullptr, 0.0f, S, rs, 0, (const i8*)nullptr, (const float2*)nullptr);
    } else if (which == 2) {
        int S = k_slices(F, D / 256, maxb), grid = std::min((F + 8 / S - 1) / (8 / S), maxb);
        launch(fu, grid, 256, 4 * D, s, (const u8*)l.g, (const u8*)l.u, h, F, (i64)2 * D, D, (const float*)x, (const float*)l.nw2, 1e-5f, S, 1, (const i8*)nullptr, (const float2*)nullptr);
    } else {
        int S = k_slices(D / 2, F / 256, maxb), grid = std::min((D / 2 + 8 / S - 1) / (8 / S), maxb);
        Seg a = {(const u8*)l.d, x, D};
        launch(mv, grid, 256, 0, s, a, none, none, (i64)2 * F, F, (const float*)h, 1, (const float*)nullptr, 0.0f, S, rs, 0, (const i8*)nullptr, (const float2*)nullptr);
    }
}

// Gate/up instantiated for 256 threads a row only, without the shipped kernel's run-time-width
// fallback: does that second instance cost the shipped gate/up its speed? (A prototype ran this
// product in 16.5 µs where the shipped kernel takes 21.1, bench/results/h200-2026-11-28.)
template <int DT>
__global__ void __launch_bounds__(256) ffn_tl8_only(Seg gate, const u8* wu, i64 row_bytes, int cols, const float* x, const float* norm_w, float eps) {
    const Seg none = {nullptr, nullptr, 0};
    const RopeStore rs = {nullptr, nullptr, nullptr, 0, 0, nullptr};
    dense_mv<DT, 1, 2, 2, 8>(gate, none, none, wu, row_bytes, cols, x, 0, norm_w, eps, 8, rs);
}

// The shipped F16/BF16 kernel (kernels.cu's dense_mv) at `per_sm` blocks per SM where a thread
// holds one chunk a row (mod.rs's dense_plan; 2 per SM otherwise).
template <int DT>
void dense_kernel(int which, int per_sm, const Layer& l, float* x, float* y, float* h, cudaStream_t s, bool tl8_only = false) {
    auto c1 = DT == DT_F16 ? dense_f16_c1 : dense_bf16_c1;
    auto c4 = DT == DT_F16 ? dense_f16_c4 : dense_bf16_c4;
    auto f1 = DT == DT_F16 ? dense_ffn_f16_c1 : dense_ffn_bf16_c1;
    RopeStore rs = {nullptr, nullptr, nullptr, 0, 0, nullptr};
    Seg none = {nullptr, nullptr, 0};
    // Blocks: one per block step of (256 / threads a row) groups of `rpg` rows, capped.
    auto blocks = [](int rows, int rpg, int cap) { return std::max(1, std::min((rows + rpg - 1) / rpg, cap)); };
    if (which == 0) {
        Seg a = {(const u8*)l.qkv, y, D}, b = {(const u8*)l.k, y + D, 512}, c = {(const u8*)l.v, y + D + 512, 512};
        launch(c1, blocks(QKV, 4, per_sm * sms), 256, 0, s, a, b, c, (i64)2 * D, D, (const float*)x, 0, (const float*)l.nw1, 1e-5f, 8, rs);
    } else if (which == 1) {
        Seg a = {(const u8*)l.o, x, D};
        launch(c1, blocks(D, 4, per_sm * sms), 256, 0, s, a, none, none, (i64)2 * D, D, (const float*)y, 1, (const float*)nullptr, 0.0f, 8, rs);
    } else if (which == 2) {
        Seg g = {(const u8*)l.g, h, F};
        if (tl8_only)
            launch(ffn_tl8_only<DT>, blocks(F, 2, 4 * sms), 256, 0, s, g, (const u8*)l.u, (i64)2 * D, D, (const float*)x, (const float*)l.nw2, 1e-5f);
        else
            launch(f1, blocks(F, 2, 4 * sms), 256, 0, s, g, (const u8*)l.u, (i64)2 * D, D, (const float*)x, (const float*)l.nw2, 1e-5f, 8);
    } else {
        Seg a = {(const u8*)l.d, x, D};
        launch(c4, blocks(D, 2, 2 * sms), 256, 0, s, a, none, none, (i64)2 * F, F, (const float*)h, 1, (const float*)nullptr, 0.0f, 8, rs);
    }
}

float time_graph(std::function<void(cudaStream_t)> body, cudaStream_t s, int reps = 50) {
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    body(s);
    CK(cudaStreamEndCapture(s, &g));
    CK(cudaGraphInstantiate(&ge, g, 0));
    for (int i = 0; i < 5; i++) CK(cudaGraphLaunch(ge, s));
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    std::vector<float> ts;
    for (int k = 0; k < 7; k++) {
        CK(cudaEventRecord(a, s));
        for (int i = 0; i < reps; i++) CK(cudaGraphLaunch(ge, s));
        CK(cudaEventRecord(b, s));
        CK(cudaEventSynchronize(b));
        float ms;
        CK(cudaEventElapsedTime(&ms, a, b));
        ts.push_back(ms * 1000.0f / reps);
    }
    CK(cudaGetLastError());
    std::sort(ts.begin(), ts.end());
    CK(cudaGraphExecDestroy(ge));
    CK(cudaGraphDestroy(g));
    return ts[ts.size() / 2];
}

int main(int argc, char** argv) {
    cudaDeviceProp p;
    CK(cudaGetDeviceProperties(&p, 0));
    sms = p.multiProcessorCount;
    printf("device %s, %d SMs, L2 %d MB\n", p.name, sms, p.l2CacheSize >> 20);
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    // Bandwidth: read 4 GB.
    {
        i64 n = (4ll << 30) / 16;
        uint4* buf;
        u32* o;
        CK(cudaMalloc(&buf, n * 16));
        CK(cudaMalloc(&o, 4));
        CK(cudaMemset(buf, 1, n * 16));
        float us = time_graph([&](cudaStream_t st) { read_bw<<<sms * 8, 256, 0, st>>>(buf, n, o); }, s, 5);
        printf("read bandwidth: %.0f GB/s\n", n * 16 / us / 1e3);
        float us2 = time_graph([&](cudaStream_t st) { CK(cudaMemcpyAsync(buf + n / 2, buf, n * 8, cudaMemcpyDeviceToDevice, st)); }, s, 5);
        printf("copy bandwidth (read+write): %.0f GB/s\n", n * 16 / us2 / 1e3);
        CK(cudaFree(buf));
    }
    for (int bf = 0; bf < 2; bf++) {
        std::vector<Layer> ls(L);
        u32 seed = 1;
        auto walloc = [&](i64 n) { u16* w; CK(cudaMalloc(&w, n * 2)); fill_w<<<1024, 256>>>(w, n, seed++ * 0x9e3779b9u, bf); return w; };
        auto falloc = [&](int n, float base, float amp) { float* f; CK(cudaMalloc(&f, n * 4)); fill_f<<<(n + 255) / 256, 256>>>(f, n, seed++ * 0x85ebca6bu, base, amp); return f; };
        for (auto& l : ls) {
            l.qkv = walloc((i64)QKV * D); l.k = l.qkv + (i64)D * D; l.v = l.k + (i64)512 * D; l.o = walloc((i64)D * D); l.g = walloc((i64)F * D); l.u = walloc((i64)F * D); l.d = walloc((i64)D * F);
            l.nw1 = falloc(D, 1.0f, 0.5f); l.nw2 = falloc(D, 1.0f, 0.5f);
        }
        float* x0 = falloc(D, 0.0f, 2.0f);
        float *x, *y, *h;
        CK(cudaMalloc(&x, D * 4)); CK(cudaMalloc(&y, QKV * 4)); CK(cudaMalloc(&h, F * 4));
        CK(cudaDeviceSynchronize());
        const double bytes_layer = 2.0 * ((double)QKV * D + (double)D * D + 2.0 * F * D + (double)D * F);
        const double kbytes[4] = {2.0 * QKV * D, 2.0 * D * D, 4.0 * F * D, 2.0 * D * F};
        const char* names[4] = {"qkv", "o", "ffn", "down"};
        printf("\n== %s ==\n", bf ? "BF16" : "F16");
        using KernFn = std::function<void(int, const Layer&, float*, float*, float*, cudaStream_t)>;
        std::vector<std::pair<std::string, KernFn>> variants;
        if (bf) variants.push_back({"old", [](int w, const Layer& l, float* x, float* y, float* h, cudaStream_t s) { old_kernel<DT_BF16>(w, l, x, y, h, s); }});
        else variants.push_back({"old", [](int w, const Layer& l, float* x, float* y, float* h, cudaStream_t s) { old_kernel<DT_F16>(w, l, x, y, h, s); }});
        for (int per_sm : {2, 4, 6}) {
            char nm[64];
            snprintf(nm, sizeof nm, "dense_mv x%d", per_sm);
            if (bf) variants.push_back({nm, [per_sm](int w, const Layer& l, float* x, float* y, float* h, cudaStream_t s) { dense_kernel<DT_BF16>(w, per_sm, l, x, y, h, s); }});
            else variants.push_back({nm, [per_sm](int w, const Layer& l, float* x, float* y, float* h, cudaStream_t s) { dense_kernel<DT_F16>(w, per_sm, l, x, y, h, s); }});
        }
        if (bf) variants.push_back({"dense_mv x4, ffn tl8", [](int w, const Layer& l, float* x, float* y, float* h, cudaStream_t s) { dense_kernel<DT_BF16>(w, 4, l, x, y, h, s, true); }});
        else variants.push_back({"dense_mv x4, ffn tl8", [](int w, const Layer& l, float* x, float* y, float* h, cudaStream_t s) { dense_kernel<DT_F16>(w, 4, l, x, y, h, s, true); }});
        // Reference: reading each product's weight bytes with a plain streaming kernel.
        variants.push_back({"read only", [](int w, const Layer& l, float* x, float* y, float* h, cudaStream_t s) {
            const u16* p = w == 0 ? l.qkv : w == 1 ? l.o : w == 2 ? l.g : l.d;
            i64 n = w == 0 ? (i64)QKV * D : w == 1 ? (i64)D * D : w == 2 ? (i64)F * D : (i64)D * F;
            launch(read_bw, sms * 8, 256, 0, s, (const uint4*)p, n * 2 / 16, (u32*)y);
            if (w == 2) launch(read_bw, sms * 8, 256, 0, s, (const uint4*)l.u, n * 2 / 16, (u32*)y);
        }});
        // Correctness: one pass of all 16 layers from x0, compare x, y, h with the old kernels.
        std::vector<float> ref_x(D), ref_h(F), ref_y(QKV), got(F);
        for (size_t v = 0; v < variants.size(); v++) {
            CK(cudaMemcpy(x, x0, D * 4, cudaMemcpyDeviceToDevice));
            CK(cudaMemset(y, 0xff, QKV * 4));
            CK(cudaMemset(h, 0xff, F * 4));
            for (int k = 0; k < 4; k++) variants[v].second(k, ls[0], x, y, h, s);
            CK(cudaStreamSynchronize(s));
            CK(cudaGetLastError());
            std::vector<float> cx(D), cy(QKV), ch(F);
            CK(cudaMemcpy(cx.data(), x, D * 4, cudaMemcpyDeviceToHost));
            CK(cudaMemcpy(cy.data(), y, QKV * 4, cudaMemcpyDeviceToHost));
            CK(cudaMemcpy(ch.data(), h, F * 4, cudaMemcpyDeviceToHost));
            if (v == 0) { ref_x = cx; ref_y = cy; ref_h = ch; }
            auto rel = [](const std::vector<float>& a, const std::vector<float>& b) {
                double num = 0, den = 0; for (size_t i = 0; i < a.size(); i++) { double d = a[i] - b[i]; num += d * d; den += (double)b[i] * b[i]; if (!(a[i] == a[i])) return 1e9; } return sqrt(num / den); };
            float t_all = time_graph([&](cudaStream_t st) { for (int li = 0; li < L; li++) for (int k = 0; k < 4; k++) variants[v].second(k, ls[li], x, y, h, st); }, s);
            float tk[4];
            for (int k = 0; k < 4; k++) tk[k] = time_graph([&](cudaStream_t st) { for (int li = 0; li < L; li++) variants[v].second(k, ls[li], x, y, h, st); }, s) / L;
            printf("%-22s layer %6.2f us (%4.0f GB/s) | qkv %5.2f (%4.0f) o %5.2f (%4.0f) ffn %5.2f (%4.0f) down %5.2f (%4.0f) | rel x %.1e y %.1e h %.1e\n", variants[v].first.c_str(),
                   t_all / L, bytes_layer * L / t_all / 1e3, tk[0], kbytes[0] / tk[0] / 1e3, tk[1], kbytes[1] / tk[1] / 1e3, tk[2], kbytes[2] / tk[2] / 1e3, tk[3], kbytes[3] / tk[3] / 1e3,
                   rel(cx, ref_x), rel(cy, ref_y), rel(ch, ref_h));
        }
        g_pdl = false;
        {
            float t_all = time_graph([&](cudaStream_t st) { for (int li = 0; li < L; li++) for (int k = 0; k < 4; k++) variants[0].second(k, ls[li], x, y, h, st); }, s);
            float t_new = time_graph([&](cudaStream_t st) { for (int li = 0; li < L; li++) for (int k = 0; k < 4; k++) variants[1].second(k, ls[li], x, y, h, st); }, s);
            printf("without PDL: old layer %.2f us, %s layer %.2f us\n", t_all / L, variants[1].first.c_str(), t_new / L);
        }
        g_pdl = true;
        for (auto& l : ls) { cudaFree(l.qkv); cudaFree(l.o); cudaFree(l.g); cudaFree(l.u); cudaFree(l.d); cudaFree(l.nw1); cudaFree(l.nw2); }
        cudaFree(x0); cudaFree(x); cudaFree(y); cudaFree(h);
    }
    return 0;
}
