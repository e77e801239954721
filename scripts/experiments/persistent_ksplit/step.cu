// Experiment (seventeenth session, not in the product): the GPT-2 small decode step (12 decoder layers, ln_f, the
// LM head and the greedy token; not the embedding gather) as one persistent cooperative kernel, one block of 512
// threads per multiprocessor, grid barriers between phases. RESULTS.md has the measurements and the variants tried.
//
// The eighth session's persistent kernel split only the output columns over the blocks, so every block read the
// whole activation of each phase through L2 (2.5-9.3 us per phase) and it took 657-680 us for the layers. Here a
// linear layer [32, K] x [K, N] is cut into K slices times N slices, 192 x 96 weight tiles (c_attn 4 x 24, c_fc
// 4 x 32, mlp c_proj 16 x 8): each block multiplies a 32-row slice of the activation by its tile (in shared
// memory, fetched a phase or more ahead with cp.async, each fetch issued after the block arrived at the grid
// barrier that ends the phase before, so that the barrier does not wait for it) on tensor cores and adds the
// partial result into an fp32 accumulator with sm_90 vector atomics (red.global.add.v4.f32). The residual stream
// is such an accumulator, so the residual adds cost nothing extra. LayerNorm is folded into the linear after it:
// LN(x) W + b = rstd * (x W' - mean * colsum(W')) + (beta W + b), W' = diag(gamma) W, so the producer multiplies
// the raw x and adds sum(x) and sum(x^2) of its K slice into per-row statistics, and the consumer of the
// accumulator applies mean, rstd, colsum and bias. Attention blocks are grouped by head (132 = 12 heads x 11
// blocks, up to 3 rows each), so the attention output projection needs only that head's 64 rows of c_proj
// (96 KB, in shared memory) and is done in the attention phase. Four phases per layer, a grid barrier after each:
// A (ln_1 + c_attn), B (attention over the KV cache with the cache append, then c_proj + residual),
// D (ln_2 + c_fc), E (GELU + mlp c_proj + residual); then F (ln_f, the LM head streamed through a cp.async ring,
// a 64-bit atomicMax per row for the greedy token).
//
// Shapes are fixed at GPT-2 small, batch 32, head dim 64, fp16 weights and caches, fp32 residual. Build:
//   nvcc -arch=sm_90a -O3 -shared -Xcompiler -fPIC -o /tmp/ksplit.so scripts/experiments/persistent_ksplit/step.cu
#include <cooperative_groups.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <cstdint>

namespace cg = cooperative_groups;
using namespace nvcuda;

constexpr int kB = 32, kHid = 768, kHeads = 12, kHd = 64, kFF = 3072, kQkv = 2304, kLayers = 12;
constexpr int kThreads = 512, kWarps = kThreads / 32;
// One tile shape for all three: 192 x 96 (fp16, 36 KB; rows padded to 104 in shared memory against bank conflicts).
constexpr int kTK = 192, kTN = 96, kTile = kTK * kTN, kTNP = kTN + 8, kTileS = kTK * kTNP;
constexpr int kAKS = kHid / kTK, kANS = kQkv / kTN;   // c_attn   768 x 2304: 4 x 24 = 96 tiles
constexpr int kDKS = kHid / kTK, kDNS = kFF / kTN;    // c_fc     768 x 3072: 4 x 32 = 128 tiles
constexpr int kEKS = kFF / kTK, kENS = kHid / kTN;    // mlp proj 3072 x 768: 16 x 8 = 128 tiles
constexpr int kGemmBlocks = kDKS * kDNS;              // blocks with a c_fc / mlp c_proj tile (the most of the three)

struct StepParams {
    const float* x_in;      // [32, 768] fp32: the layer-0 input (embeddings), row-major
    float* x;               // [32, 768] fp32: the residual stream, written; after the kernel, layer 11's output
    half* kcache;           // [12, 32, 12, L, 64] fp16: keys, (layer, row, head, position, dim); pos is written
    half* vcache;           // [12, 32, 12, L, 64] fp16: values, same layout
    const int* pads;        // [32] int32: keys before pads[b] are skipped
    int L;                  // cache length (positions)
    int pos;                // position of this step's token (past keys are [pads[b], pos))
    const half* wA;         // [12, 96, 192, 96] fp16: diag(gamma_1) c_attn.weight tiles, tile (ks, ns) = ks * 24 + ns
    const half* wO;         // [12, 768, 768] fp16: attn c_proj.weight [in, out] (head h's rows 64 h .. 64 h + 63)
    const half* wD;         // [12, 128, 192, 96] fp16: diag(gamma_2) c_fc.weight tiles, tile (ks, ns) = ks * 32 + ns
    const half* wE;         // [12, 128, 192, 96] fp16: mlp c_proj.weight tiles, tile (ks, ns) = ks * 8 + ns
    const float* colA;      // [12, 2304] fp32: column sums of the fp16 wA
    const float* biasA;     // [12, 2304] fp32: beta_1 c_attn.weight + c_attn.bias
    const float* biasO;     // [12, 768] fp32: attn c_proj.bias
    const float* colD;      // [12, 3072] fp32: column sums of the fp16 wD
    const float* biasD;     // [12, 3072] fp32: beta_2 c_fc.weight + c_fc.bias
    const float* biasE;     // [12, 768] fp32
    float* accA;            // [2, 32, 2304] fp32: c_attn accumulators by layer parity; parity 0 zero at entry
    float* accD;            // [2, 32, 3072] fp32: c_fc accumulators by layer parity; parity 0 zero at entry
    float* stats;           // [2, 2, 32, 2] fp32: (parity, ln_1 / ln_2, row, sum / sum of squares); parity 0 zero
    unsigned long long* times;  // [50] or null: block 0's %globaltimer at the start, after each barrier and at the end
    unsigned long long* sub;    // [12, 20] or null: block 0's %globaltimer inside each phase (see the kernel)
    unsigned long long* blkt;   // [grid, 2] or null: every block's %globaltimer around layer 5's attention phase
    const float* lnf_g;     // [768] fp32: ln_f weight (null: stop after layer 11, no LM head)
    const float* lnf_b;     // [768] fp32: ln_f bias
    const half* wte;        // [vocab, 768] fp16: the tied embedding, the LM head's weight (logits = ln_f(x) wte^T)
    int vocab;
    unsigned long long* best;   // [32]: per row max over the vocab of (orderable logit << 32 | ~token), the greedy
                                // token; zeroed by the kernel before layer 0's attention phase
};

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void red_add4(float* addr, float4 v) {
    asm volatile("red.relaxed.gpu.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(addr), "f"(v.x), "f"(v.y),
                 "f"(v.z), "f"(v.w) : "memory");
}

__device__ __forceinline__ unsigned long long gtimer() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t)::"memory");
    return t;
}

// Copy `halves` fp16 from global to shared memory with cp.async (one group is committed by the caller).
__device__ __forceinline__ void fetch(half* dst, const half* src, int halves) {
    for (int i = threadIdx.x; i < halves / 8; i += kThreads) cp_async16(dst + i * 8, src + i * 8);
}

// A [192, 96] weight tile into shared memory rows of kTNP.
__device__ __forceinline__ void fetch_tile(half* dst, const half* src) {
    for (int i = threadIdx.x; i < kTile / 8; i += kThreads)
        cp_async16(dst + (i / (kTN / 8)) * kTNP + (i % (kTN / 8)) * 8, src + i * 8);
}

// c_s[32, NT] (ldm NT + 4) = a_s[32, KT] (ldm KT + 8) x w_s[KT, NT] (ldm NT + 8), fp16 in, fp32 out.
template <int KT, int NT>
__device__ void mma_tile(const half* a_s, const half* w_s, float* c_s) {
    constexpr int kNTiles = NT / 16, kTiles = 2 * kNTiles;
    const int warp = threadIdx.x / 32;
    for (int t = warp; t < kTiles; t += kWarps) {
        const int mi = t / kNTiles, ni = t % kNTiles;
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::fill_fragment(acc, 0.f);
#pragma unroll 3
        for (int k = 0; k < KT; k += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> fa;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::row_major> fb;
            wmma::load_matrix_sync(fa, a_s + mi * 16 * (KT + 8) + k, KT + 8);
            wmma::load_matrix_sync(fb, w_s + k * (NT + 8) + ni * 16, NT + 8);
            wmma::mma_sync(acc, fa, fb, acc);
        }
        wmma::store_matrix_sync(c_s + mi * 16 * (NT + 4) + ni * 16, acc, NT + 4, wmma::mem_row_major);
    }
}

// out[32, ld] (columns n0 .. n0 + NT) += c_s (+ bias[n0 ..] when bias is not null), float4 atomics.
template <int NT>
__device__ void add_out(const float* c_s, float* out, int ld, int n0, const float* bias) {
    for (int i = threadIdx.x; i < 32 * NT / 4; i += kThreads) {
        const int r = i / (NT / 4), c = (i % (NT / 4)) * 4;
        float4 v = *reinterpret_cast<const float4*>(c_s + r * (NT + 4) + c);
        if (bias) {
            v.x += bias[n0 + c]; v.y += bias[n0 + c + 1]; v.z += bias[n0 + c + 2]; v.w += bias[n0 + c + 3];
        }
        red_add4(out + r * ld + n0 + c, v);
    }
}

// a_s[32, KT] = fp16(x[:, k0 .. k0 + KT]) (x read through L2); when stats is not null, adds each row's sum and
// sum of squares of the slice into stats[row, 0 / 1].
// This thread's share of src[32, ld] columns k0 .. k0 + KT (read through L2): rows warp + 16 rr, columns
// k0 + lane + 32 i into v[rr][i]. Every load goes out before any is used (one round trip to L2).
template <int KT>
__device__ __forceinline__ void load_slice(const float* src, int ld, int k0, float (&v)[32 / kWarps][KT / 32]) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int rr = 0; rr < 32 / kWarps; ++rr)
#pragma unroll
        for (int i = 0; i < KT / 32; ++i) v[rr][i] = __ldcg(src + (warp + rr * kWarps) * ld + k0 + lane + 32 * i);
}

template <int KT>
__device__ void load_x(const float* x, int k0, half* a_s, float* stats) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    constexpr int kR = 32 / kWarps, kC = KT / 32;
    float v[kR][kC];
    load_slice<KT>(x, kHid, k0, v);
#pragma unroll
    for (int rr = 0; rr < kR; ++rr) {
        const int r = warp + rr * kWarps;
        float s = 0.f, ss = 0.f;
#pragma unroll
        for (int i = 0; i < kC; ++i) {
            a_s[r * (KT + 8) + lane + 32 * i] = __float2half(v[rr][i]);
            s += v[rr][i];
            ss += v[rr][i] * v[rr][i];
        }
        if (stats) {
#pragma unroll
            for (int o = 16; o; o >>= 1) {
                s += __shfl_xor_sync(0xffffffffu, s, o);
                ss += __shfl_xor_sync(0xffffffffu, ss, o);
            }
            if (lane == 0) {
                atomicAdd(stats + r * 2, s);
                atomicAdd(stats + r * 2 + 1, ss);
            }
        }
    }
}

// The common tail of a linear phase: wait for its weight tile (cp.async groups: at most WAIT newer ones pending),
// multiply a_s by it into c_s, add c_s into out[:, n0 ..] (+ bias). sb: block 0's timers at sb[0 .. 3] (or null).
template <int WAIT>
__device__ __forceinline__ void linear_tail(const half* a_s, const half* w_s, float* c_s, float* out, int ld, int n0,
                                            const float* bias, unsigned long long* sb) {
    if (sb) sb[0] = gtimer();
    cp_wait<WAIT>();
    __syncthreads();
    if (sb) sb[1] = gtimer();
    mma_tile<kTK, kTN>(a_s, w_s, c_s);
    __syncthreads();
    if (sb) sb[2] = gtimer();
    add_out<kTN>(c_s, out, ld, n0, bias);
    if (sb) sb[3] = gtimer();
}

// The end of a phase: arrive at the grid barrier (its release waits for this block's atomics), then issue() the
// fetch into the shared memory this phase freed and commit the phase's cp.async group, then wait for the other
// blocks. The fetch goes out after the arrival, so that the barrier does not wait for it.
template <class Issue>
__device__ __forceinline__ void end_phase(const cg::grid_group& grid, Issue&& issue) {
    auto token = grid.barrier_arrive();
    __syncthreads();   // the arrival (thread 0's atomic) before the fetch's loads
    issue();
    cp_commit();
    grid.barrier_wait(std::move(token));
}

// A row's LayerNorm mean and 1 / std from its sum s and sum of squares ss over the 768 features.
__device__ __forceinline__ void row_norm(float s, float ss, float& mean, float& rstd) {
    mean = s * (1.f / kHid);
    const float var = fmaxf(ss * (1.f / kHid) - mean * mean, 0.f);
    rstd = rsqrtf(var + 1e-5f);
}

__device__ __forceinline__ float gelu_new(float x) {
    return 0.5f * x * (1.f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

// 16 keys of one (row, head): lane i holds dims 32 (i % 2) .. + 32 of key i / 2 and dims 2 i, 2 i + 1 of all 16
// values.
struct Chunk {
    uint4 k[4];
    unsigned v[16];
};

__device__ __forceinline__ void load_chunk(Chunk& c, const half* K, const half* V, int start, int pos, int lane) {
    const int key = start + lane / 2;
    if (key < pos) {
        const uint4* kp = reinterpret_cast<const uint4*>(K + static_cast<size_t>(key) * kHd + (lane % 2) * 32);
#pragma unroll
        for (int i = 0; i < 4; ++i) c.k[i] = __ldcs(kp + i);
    }
#pragma unroll
    for (int t = 0; t < 16; ++t)
        c.v[t] = (start + t < pos)
            ? __ldcs(reinterpret_cast<const unsigned*>(V + static_cast<size_t>(start + t) * kHd) + lane) : 0u;
}

// One warp's work item: sub-chunk u of the block's row slot r; keys start at
// pads + (u / 2) * 512 + warp * 32 + (u % 2) * 16.
struct Item {
    int r, u, start;
    bool valid;
};

constexpr int kMaxRows = 4;   // rows per block in the attention phase (gridDim.x / 12 >= 8)
constexpr int kQPad = 72;     // q of a row in shared memory: dims 0-31 at 0, 32-63 at 36 (no bank conflict)
constexpr int kPart = kHd + 2;

__device__ __forceinline__ Item make_item(int r, int u, int nrows, const int* pad, int pos, int warp) {
    for (; r < nrows; ++r, u = 0) {
        const int start = pad[r] + (u / 2) * (kWarps * 32) + warp * 32 + (u % 2) * 16;
        if (start < pos) return Item{r, u, start, true};
    }
    return Item{r, 0, 0, false};
}

struct Online {
    float m = -INFINITY, l = 0.f, o0 = 0.f, o1 = 0.f;
};

__device__ __forceinline__ void consume(const Chunk& c, const Item& it, int pos, int lane, const float* q, Online& st) {
    const int key = it.start + lane / 2;
    const bool ok = key < pos;
    const float4* q4 = reinterpret_cast<const float4*>(q + (lane % 2) * 36);
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const half2* k2 = reinterpret_cast<const half2*>(&c.k[i]);
        const float4 qa = q4[2 * i], qb = q4[2 * i + 1];
        float2 f = __half22float2(k2[0]);
        s += qa.x * f.x + qa.y * f.y;
        f = __half22float2(k2[1]);
        s += qa.z * f.x + qa.w * f.y;
        f = __half22float2(k2[2]);
        s += qb.x * f.x + qb.y * f.y;
        f = __half22float2(k2[3]);
        s += qb.z * f.x + qb.w * f.y;
    }
    s += __shfl_xor_sync(0xffffffffu, s, 1);
    s = ok ? s : -INFINITY;
    float cm = s;
#pragma unroll
    for (int o = 16; o; o >>= 1) cm = fmaxf(cm, __shfl_xor_sync(0xffffffffu, cm, o));
    const float mn = fmaxf(st.m, cm);
    const float alpha = __expf(st.m - mn);
    const float pj = ok ? __expf(s - mn) : 0.f;
    float ps = (lane % 2 == 0) ? pj : 0.f;
#pragma unroll
    for (int o = 16; o; o >>= 1) ps += __shfl_xor_sync(0xffffffffu, ps, o);
    st.l = st.l * alpha + ps;
    st.o0 *= alpha;
    st.o1 *= alpha;
#pragma unroll
    for (int t = 0; t < 16; ++t) {
        const float pt = __shfl_sync(0xffffffffu, pj, 2 * t);
        const float2 vf = __half22float2(*reinterpret_cast<const half2*>(&c.v[t]));
        st.o0 += pt * vf.x;
        st.o1 += pt * vf.y;
    }
    st.m = mn;
}

__device__ __forceinline__ void flush(Online& st, float* part, int lane) {
    if (lane == 0) { part[0] = st.m; part[1] = st.l; }
    part[2 + 2 * lane] = st.o0;
    part[3 + 2 * lane] = st.o1;
    st = Online();
}

// Attention phase of one block: head h for rows j, j + nbh, ... (at most kMaxRows), keys [pads[b], pos) of the
// cache plus this step's key; then the rows' contexts times c_proj rows [64 h, 64 h + 64) (in shared memory, sO)
// added into the residual stream (with c_proj's bias from the head-0 blocks).
__device__ void attention_phase(const StepParams& p, int layer, int h, int j, int nbh, const float* acc,
                                const float* stats, const float* col, const float* bias, const float* biasO,
                                const half* sO, float* scratch, unsigned long long* sb) {
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    float* qs = scratch;                              // [kMaxRows, kQPad]
    float* kvs = qs + kMaxRows * kQPad;               // [kMaxRows, 2, 64]: this step's key and value
    float* part = kvs + kMaxRows * 2 * kHd;           // [kMaxRows, kWarps + 1, kPart]
    float* ctx = part + kMaxRows * (kWarps + 1) * kPart;  // [kMaxRows, 64]
    __shared__ int rows[kMaxRows], pad[kMaxRows];
    const int nrows = min(kMaxRows, (kB - j + nbh - 1) / nbh);
    if (tid < kMaxRows) {
        rows[tid] = j + tid * nbh;
        pad[tid] = rows[tid] < kB ? p.pads[rows[tid]] : 0;
    }
    __syncthreads();
    const int pos = p.pos;
    const size_t L = static_cast<size_t>(p.L);
    auto base = [&](int r) { return ((static_cast<size_t>(layer) * kB + rows[r]) * kHeads + h) * L * kHd; };
    for (int t = tid; t < nrows * 3 * kHd; t += kThreads) {  // q (scaled), k, v of this step
        const int r = t / (3 * kHd), which = (t / kHd) % 3, d = t % kHd, n = which * kHid + h * kHd + d, b = rows[r];
        float mean, rstd;
        row_norm(__ldcg(stats + b * 2), __ldcg(stats + b * 2 + 1), mean, rstd);
        float v = (__ldcg(acc + b * kQkv + n) - mean * col[n]) * rstd + bias[n];
        if (which == 0) {
            qs[r * kQPad + (d / 32) * 36 + d % 32] = v * 0.125f;
        } else {
            const half hv = __float2half(v);
            (which == 1 ? p.kcache : p.vcache)[base(r) + static_cast<size_t>(pos) * kHd + d] = hv;
            kvs[(r * 2 + which - 1) * kHd + d] = __half2float(hv);
        }
    }
    for (int r = 0; r < nrows; ++r)
        if (lane == 0) part[(r * (kWarps + 1) + warp) * kPart + 1] = 0.f;
    __syncthreads();
    if (sb) sb[5] = gtimer();
    // the first two items' loads go out after q, k, v (whose L2 loads would otherwise queue behind them)
    Chunk ca, cb;
    Item ia = make_item(0, 0, nrows, pad, pos, warp);
    if (ia.valid) load_chunk(ca, p.kcache + base(ia.r), p.vcache + base(ia.r), ia.start, pos, lane);
    Item ib = ia.valid ? make_item(ia.r, ia.u + 1, nrows, pad, pos, warp) : ia;
    if (ib.valid) load_chunk(cb, p.kcache + base(ib.r), p.vcache + base(ib.r), ib.start, pos, lane);
    Online st;
    while (ia.valid) {
        consume(ca, ia, pos, lane, qs + ia.r * kQPad, st);
        if (!ib.valid || ib.r != ia.r) flush(st, part + (ia.r * (kWarps + 1) + warp) * kPart, lane);
        if (!ib.valid) break;
        ia = make_item(ib.r, ib.u + 1, nrows, pad, pos, warp);
        if (ia.valid) load_chunk(ca, p.kcache + base(ia.r), p.vcache + base(ia.r), ia.start, pos, lane);
        consume(cb, ib, pos, lane, qs + ib.r * kQPad, st);
        if (!ia.valid || ia.r != ib.r) flush(st, part + (ib.r * (kWarps + 1) + warp) * kPart, lane);
        if (!ia.valid) break;
        ib = make_item(ia.r, ia.u + 1, nrows, pad, pos, warp);
        if (ib.valid) load_chunk(cb, p.kcache + base(ib.r), p.vcache + base(ib.r), ib.start, pos, lane);
    }
    if (sb) sb[6] = gtimer();
    if (warp < nrows) {  // this step's own key
        const int r = warp;
        const float* q = qs + r * kQPad;
        float s = q[lane] * kvs[r * 2 * kHd + lane] + q[36 + lane] * kvs[r * 2 * kHd + 32 + lane];
#pragma unroll
        for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        float* own = part + (r * (kWarps + 1) + kWarps) * kPart;
        if (lane == 0) { own[0] = s; own[1] = 1.f; }
        own[2 + lane] = kvs[(r * 2 + 1) * kHd + lane];
        own[2 + 32 + lane] = kvs[(r * 2 + 1) * kHd + 32 + lane];
    }
    __syncthreads();
    if (tid < nrows * kHd) {
        const int r = tid / kHd, d = tid % kHd;
        const float* pr = part + r * (kWarps + 1) * kPart;
        float mx = -INFINITY;
        for (int w = 0; w <= kWarps; ++w)
            if (pr[w * kPart + 1] > 0.f) mx = fmaxf(mx, pr[w * kPart]);
        float den = 0.f, num = 0.f;
        for (int w = 0; w <= kWarps; ++w) {
            const float* pw = pr + w * kPart;
            if (pw[1] > 0.f) {
                const float e = __expf(pw[0] - mx);
                den += pw[1] * e;
                num += pw[2 + d] * e;
            }
        }
        ctx[r * kHd + d] = num / den;
    }
    cp_wait<2>();   // sO
    __syncthreads();
    if (sb) sb[7] = gtimer();
    // c_proj rows of head h: thread t < 384 owns output columns 2 t, 2 t + 1
    if (tid < kHid / 2) {
        float2 o[kMaxRows];
#pragma unroll
        for (int r = 0; r < kMaxRows; ++r) o[r] = make_float2(0.f, 0.f);
#pragma unroll 8
        for (int k = 0; k < kHd; ++k) {
            const float2 w = __half22float2(reinterpret_cast<const half2*>(sO + k * kHid)[tid]);
#pragma unroll
            for (int r = 0; r < kMaxRows; ++r) {
                const float c = ctx[r * kHd + k];
                o[r].x += c * w.x;
                o[r].y += c * w.y;
            }
        }
        for (int r = 0; r < nrows; ++r) {
            float2 v = o[r];
            if (h == 0) { v.x += biasO[2 * tid]; v.y += biasO[2 * tid + 1]; }
            float* addr = p.x + rows[r] * kHid + 2 * tid;
            asm volatile("red.relaxed.gpu.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(addr), "f"(v.x), "f"(v.y)
                         : "memory");
        }
    }
    __syncthreads();
}

// ---- F: ln_f, the LM head and the greedy token. Every block normalizes all 32 rows itself (it needs all of K),
// then streams its share of the vocabulary (32 tokens of wte per stage, 3-stage cp.async ring): 4 output tiles of
// 16 x 16 per stage, K split 4 ways over the 16 warps and summed in shared memory; each thread keeps the best
// (logit, token) of its row and columns; the row's best goes out with a 64-bit atomicMax.
constexpr int kVC = 32, kVP = kHid + 8, kStages = 3;
constexpr size_t kLmSmem = sizeof(half) * (1 + kStages) * kVC * kVP + sizeof(float) * kWarps * 256;

__device__ __forceinline__ unsigned long long pack_best(float v, int token) {
    unsigned u = __float_as_uint(v);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return (static_cast<unsigned long long>(u) << 32) | (0xffffffffu - static_cast<unsigned>(token));
}

__device__ void lm_head_phase(const StepParams& p, unsigned char* smem) {
    half* xs = reinterpret_cast<half*>(smem);                  // [32, 768 + 8] fp16 ln_f(x)
    half* ring = xs + kB * kVP;                                // [3, 32, 768 + 8] wte rows
    float* red = reinterpret_cast<float*>(ring + kStages * kVC * kVP);  // [16 warps, 16, 16]
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int nchunks = (p.vocab + kVC - 1) / kVC;
    const int c0 = static_cast<int>(static_cast<long long>(blockIdx.x) * nchunks / gridDim.x);
    const int c1 = static_cast<int>(static_cast<long long>(blockIdx.x + 1) * nchunks / gridDim.x);
    auto issue = [&](int c) {
        if (c < c1) {
            half* dst = ring + ((c - c0) % kStages) * kVC * kVP;
            for (int i = tid; i < kVC * kHid / 8; i += kThreads) {
                const int row = i / (kHid / 8), col = (i % (kHid / 8)) * 8;
                const int token = min(c * kVC + row, p.vocab - 1);
                cp_async16(dst + row * kVP + col, p.wte + static_cast<size_t>(token) * kHid + col);
            }
        }
        cp_commit();
    };
    __syncthreads();   // the layers' shared memory is free now
    issue(c0);
    issue(c0 + 1);
    // ln_f of all rows: warp w normalizes rows w and w + 16 from registers
#pragma unroll
    for (int rr = 0; rr < kB / kWarps; ++rr) {
        const int r = warp + rr * kWarps;
        float v[kHid / 32], s = 0.f;
#pragma unroll
        for (int i = 0; i < kHid / 32; ++i) {
            v[i] = __ldcg(p.x + r * kHid + lane + 32 * i);
            s += v[i];
        }
#pragma unroll
        for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        const float mean = s * (1.f / kHid);
        float ss = 0.f;
#pragma unroll
        for (int i = 0; i < kHid / 32; ++i) ss += (v[i] - mean) * (v[i] - mean);
#pragma unroll
        for (int o = 16; o; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        const float rstd = rsqrtf(ss * (1.f / kHid) + 1e-5f);
#pragma unroll
        for (int i = 0; i < kHid / 32; ++i) {
            const int k = lane + 32 * i;
            xs[r * kVP + k] = __float2half((v[i] - mean) * rstd * p.lnf_g[k] + p.lnf_b[k]);
        }
    }
    const int t = warp % 4, mi = t / 2, ni = t % 2, kq = warp / 4;   // output tile and K quarter of this warp
    const int orow = tid / 16, ocol = (tid % 16) * 2;                // this thread's row and 2 columns of a stage
    float bestv = -INFINITY;
    int bestt = 0;
    for (int c = c0; c < c1; ++c) {
        issue(c + 2);
        cp_wait<2>();
        __syncthreads();
        const half* w = ring + ((c - c0) % kStages) * kVC * kVP;
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::fill_fragment(acc, 0.f);
#pragma unroll 4
        for (int k = kq * (kHid / 4); k < (kq + 1) * (kHid / 4); k += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> fa;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> fb;
            wmma::load_matrix_sync(fa, xs + mi * 16 * kVP + k, kVP);
            wmma::load_matrix_sync(fb, w + ni * 16 * kVP + k, kVP);
            wmma::mma_sync(acc, fa, fb, acc);
        }
        wmma::store_matrix_sync(red + warp * 256, acc, 16, wmma::mem_row_major);
        __syncthreads();
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int n = ocol + j, tile = (orow / 16) * 2 + n / 16, e = (orow % 16) * 16 + n % 16;
            float v = 0.f;
#pragma unroll
            for (int q = 0; q < 4; ++q) v += red[(q * 4 + tile) * 256 + e];
            const int token = c * kVC + n;
            if (token < p.vocab && v > bestv) { bestv = v; bestt = token; }
        }
    }
    unsigned long long key = bestv > -INFINITY ? pack_best(bestv, bestt) : 0ull;
#pragma unroll
    for (int o = 8; o; o >>= 1) {
        const unsigned long long other = __shfl_xor_sync(0xffffffffu, key, o);
        key = other > key ? other : key;
    }
    if (tid % 16 == 0 && key) atomicMax(p.best + orow, key);
    cp_wait<0>();
}

__global__ void __launch_bounds__(kThreads, 1) ksplit_step(StepParams p) {
    extern __shared__ __align__(128) unsigned char smem[];
    half* sA = reinterpret_cast<half*>(smem);            // c_attn tile [192, 104]
    half* sO = sA + kTileS;                               // attn c_proj rows of this block's head [64, 768]
    half* sDE = sO + kHd * kHid;                          // c_fc tile, then mlp c_proj tile [192, 104]
    half* a_s = sDE + kTileS;                             // [32, 192 + 8] fp16 activation slice
    float* c_s = reinterpret_cast<float*>(a_s + 32 * (kTK + 8));  // [32, 96 + 4] tile result; attention scratch

    cg::grid_group grid = cg::this_grid();
    const int blk = blockIdx.x;
    const bool gemmA = blk < kAKS * kANS, gemm = blk < kGemmBlocks;
    static_assert(kDKS * kDNS == kEKS * kENS, "c_fc and mlp c_proj use the same blocks");
    const int nbh = gridDim.x / kHeads, head = blk / nbh, hj = blk % nbh;
    const bool attn = head < kHeads;
    const bool t0 = blk == 0 && threadIdx.x == 0;
    unsigned long long* times = t0 ? p.times : nullptr;
    unsigned long long* sub = t0 ? p.sub : nullptr;
    int tick = 0;
    if (times) times[tick++] = gtimer();
    // cp.async groups, in commit order: A0, O0, D0, then per layer l: A(l+1) after A, O(l+1) after B, E(l) after
    // D, D(l+1) after E. Blocks that skip a fetch still commit (an empty group), so the waits below hold for all.
    if (gemmA) fetch_tile(sA, p.wA + static_cast<size_t>(blk) * kTile);
    cp_commit();
    if (attn) fetch(sO, p.wO + static_cast<size_t>(head) * kHd * kHid, kHd * kHid);
    cp_commit();
    if (gemm) fetch_tile(sDE, p.wD + static_cast<size_t>(blk) * kTile);
    cp_commit();
    for (int layer = 0; layer < kLayers; ++layer) {
        const int par = layer & 1;
        float* accA = p.accA + par * kB * kQkv;
        float* accD = p.accD + par * kB * kFF;
        float* st1 = p.stats + (par * 2 + 0) * kB * 2;
        float* st2 = p.stats + (par * 2 + 1) * kB * 2;
        const bool more = layer + 1 < kLayers;
        unsigned long long* sb = sub ? sub + layer * 20 : nullptr;
        // ---- A: ln_1 folded into c_attn ----
        if (gemmA) {
            const int ks = blk / kANS, ns = blk % kANS;
            const float* xsrc = layer == 0 ? p.x_in : p.x;
            load_x<kTK>(xsrc, ks * kTK, a_s, ns == 0 ? st1 : nullptr);
            if (layer == 0 && ns == 0)
                for (int i = threadIdx.x; i < 32 * kTK; i += kThreads)
                    p.x[(i / kTK) * kHid + ks * kTK + i % kTK] = p.x_in[(i / kTK) * kHid + ks * kTK + i % kTK];
            linear_tail<2>(a_s, sA, c_s, accA, kQkv, ns * kTN, nullptr, sb);
        }
        end_phase(grid, [&] {
            if (gemmA && more) fetch_tile(sA, p.wA + (static_cast<size_t>(layer + 1) * kAKS * kANS + blk) * kTile);
        });
        if (times) times[tick++] = gtimer();
        // ---- B: attention, attn c_proj, residual; zero the other parity's accumulators ----
        {
            float* zA = p.accA + (par ^ 1) * kB * kQkv;
            float* zD = p.accD + (par ^ 1) * kB * kFF;
            float* zS = p.stats + (par ^ 1) * 2 * kB * 2;
            const int n = gridDim.x * kThreads;
            const int g = blk * kThreads + threadIdx.x;
            const float4 z = make_float4(0.f, 0.f, 0.f, 0.f);
            for (int i = g; i < kB * kQkv / 4; i += n) reinterpret_cast<float4*>(zA)[i] = z;
            for (int i = g; i < kB * kFF / 4; i += n) reinterpret_cast<float4*>(zD)[i] = z;
            if (g < 2 * kB * 2) zS[g] = 0.f;
            if (layer == 0 && g < kB && p.best) p.best[g] = 0ull;
            if (sb) sb[4] = gtimer();
            if (p.blkt && layer == 5 && threadIdx.x == 0) p.blkt[blk * 2] = gtimer();
            if (attn)
                attention_phase(p, layer, head, hj, nbh, accA, st1, p.colA + layer * kQkv, p.biasA + layer * kQkv,
                                p.biasO + layer * kHid, sO, c_s, sb);
            if (sb) sb[8] = gtimer();
            if (p.blkt && layer == 5 && threadIdx.x == 0) p.blkt[blk * 2 + 1] = gtimer();
        }
        end_phase(grid, [&] {
            if (attn && more) fetch(sO, p.wO + (static_cast<size_t>(layer + 1) * kHid + head * kHd) * kHid, kHd * kHid);
        });
        if (times) times[tick++] = gtimer();
        // ---- D: ln_2 folded into c_fc ----
        if (gemm) {
            const int ks = blk / kDNS, ns = blk % kDNS;
            load_x<kTK>(p.x, ks * kTK, a_s, ns == 0 ? st2 : nullptr);
            linear_tail<2>(a_s, sDE, c_s, accD, kFF, ns * kTN, nullptr, sb ? sb + 10 : nullptr);
        }
        end_phase(grid, [&] {
            if (gemm) fetch_tile(sDE, p.wE + (static_cast<size_t>(layer) * kEKS * kENS + blk) * kTile);
        });
        if (times) times[tick++] = gtimer();
        // ---- E: GELU + mlp c_proj + residual ----
        if (gemm) {
            const int ks = blk / kENS, ns = blk % kENS;
            const float* colD = p.colD + layer * kFF + ks * kTK;
            const float* biasD = p.biasD + layer * kFF + ks * kTK;
            const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
            constexpr int kPer = kTK / 32, kRows = 32 / kWarps;
            float v[kRows][kPer], sm[kRows][2], cd[kPer], bd[kPer];
            // every load goes out before any is used: the accumulator slice first, then the row statistics and
            // the constants
            load_slice<kTK>(accD, kFF, ks * kTK, v);
#pragma unroll
            for (int rr = 0; rr < kRows; ++rr) {
                sm[rr][0] = __ldcg(st2 + (warp + rr * kWarps) * 2);
                sm[rr][1] = __ldcg(st2 + (warp + rr * kWarps) * 2 + 1);
            }
#pragma unroll
            for (int i = 0; i < kPer; ++i) {
                cd[i] = colD[lane + 32 * i];
                bd[i] = biasD[lane + 32 * i];
            }
#pragma unroll
            for (int rr = 0; rr < kRows; ++rr) {
                float mean, rstd;
                row_norm(sm[rr][0], sm[rr][1], mean, rstd);
#pragma unroll
                for (int i = 0; i < kPer; ++i)
                    a_s[(warp + rr * kWarps) * (kTK + 8) + lane + 32 * i] =
                        __float2half(gelu_new((v[rr][i] - mean * cd[i]) * rstd + bd[i]));
            }
            linear_tail<0>(a_s, sDE, c_s, p.x, kHid, ns * kTN, ks == 0 ? p.biasE + layer * kHid : nullptr,
                           sb ? sb + 15 : nullptr);
        }
        if (more || p.lnf_g) {
            end_phase(grid, [&] {
                if (gemm && more) fetch_tile(sDE, p.wD + (static_cast<size_t>(layer + 1) * kDKS * kDNS + blk) * kTile);
            });
            if (times) times[tick++] = gtimer();
        }
    }
    cp_wait<0>();
    if (p.lnf_g) lm_head_phase(p, smem);
    if (times) times[tick++] = gtimer();
}

constexpr size_t kScratch = (kMaxRows * (kQPad + 2 * kHd + (kWarps + 1) * kPart + kHd)) * sizeof(float);
constexpr size_t kCs = 32 * (kTN + 4) * sizeof(float);
constexpr size_t kLayerSmem =
    sizeof(half) * (2 * kTileS + kHd * kHid + 32 * (kTK + 8)) + (kScratch > kCs ? kScratch : kCs);

constexpr size_t kSmem = kLayerSmem > kLmSmem ? kLayerSmem : kLmSmem;
static_assert(kSmem <= 227 * 1024, "shared memory");

extern "C" int ksplit_smem_bytes() { return static_cast<int>(kSmem); }

// The weight tiling the host must pack: K slices and N slices of c_attn, c_fc and mlp c_proj.
extern "C" void ksplit_tiling(int* out) {
    const int t[6] = {kAKS, kANS, kDKS, kDNS, kEKS, kENS};
    for (int i = 0; i < 6; ++i) out[i] = t[i];
}

// Launch on `stream` with one block per multiprocessor (at least 128). Returns a cudaError_t.
extern "C" int ksplit_step_launch(const StepParams* params, int blocks, cudaStream_t stream) {
    if (blocks < kGemmBlocks) return static_cast<int>(cudaErrorInvalidConfiguration);
    cudaError_t e = cudaFuncSetAttribute(ksplit_step, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(kSmem));
    if (e != cudaSuccess) return static_cast<int>(e);
    StepParams copy = *params;
    void* args[] = {&copy};
    return static_cast<int>(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(ksplit_step), dim3(blocks),
                                                        dim3(kThreads), args, kSmem, stream));
}
