// Pre-padding attention with a KV cache (GPT-2 generation, EET): the eet_prepad_attention C ABI of
// eet_attention.h.
//
// Context (seq > 1), fp32: two kernels, 1 then 2a, in this order on the caller's stream (the attention
// of one (row, head) reads keys that other blocks append, so the append must be complete first).
// Context, fp16: one kernel (2a, tensor cores) whose blocks append their own query tile's keys and
// values and read the new tokens' keys from k and v, the older ones from the caches. Decode
// (seq == 1): one kernel (2b) that appends and attends.
//
// 1. prepad_append_kernel: k_cache[b, h, s + i, :] = k[b, i, h, :] (and v likewise).
//    grid = (seq, min(batch, 65535)) blocks of 128 threads, a block per token row (b, i) (looping
//    over b in steps of gridDim.y); its threads copy the row's num_heads * head_dim elements of K
//    and V as raw 16-byte vectors (or element by element when a pointer or row stride does not allow
//    it). Positions outside [0, max_len) are skipped.
//
// 2a. seq > 1 (context, fp32): prepad_context_kernel, the tiling of varlen_attention.cu on the cache
//    (fp16: prepad_context_mma_kernel, below, the same on tensor cores and fused with the append).
//    grid  = (ceil(seq / kBlockM), num_heads, min(batch, 65535)); blocks loop over batch in steps of
//            gridDim.z, and blockIdx.x runs from the last (longest) query tile to the first.
//    block = 128 threads = 32 quads of 4 lanes; kBlockM = 64 query rows of one (b, h), quad g owns
//            rows g and g + 32. Query row r sits at cache position p_r = s + m0 + r.
//    Key tiles (kBlockN = 32 cache rows) run over [pad, min(s + m0 + rows, max_len)): the keys before
//    the row's pad length are not loaded at all, and no tile starts past the tile's last query
//    position. Per tile: K, V to shared memory as fp32 (rows past the range zero-filled, not read),
//    S = Q K^T (2 rows x 8 keys per thread), the causal mask j <= p_r (a row with p_r < pad has no
//    key at all), online softmax in the log2 domain (a running max of -inf is taken as 0, so rows
//    without a key so far stay at l = 0, O = 0, never NaN), P to shared memory, O += P V (2 rows x
//    head_dim / 4 columns per thread, fp32 registers). Rows with l = 0 or a position outside
//    [0, max_len) write zeros.
//    Shared memory as varlen: (kBlockM + 2 kBlockN)(D + 4) + kBlockM (kBlockN + 4) floats.
//
// 2b. seq == 1 (decode, memory bound): prepad_decode_kernel alone (no append kernel: it appends the
//    new key and value itself and reads them from k and v, so no block reads a cache position that
//    this launch writes). grid = (splits, num_heads, min(batch, 65535)), blocks looping over b;
//    4 or 8 warps per block. splits > 1 (flash-decoding, chosen on the host from batch * num_heads,
//    max_len and the resident blocks of the GPU, see launch_decode): on sm_90+ the (b, h)'s blocks
//    form a cluster; before sm_90 (no clusters) they are independent blocks that leave their
//    softmax states in the caller's workspace, and prepad_decode_merge_kernel merges them (without
//    a workspace there is no split). Its valid range [pad, s] is cut on the device into
//    splits * warps even contiguous shares, one per warp (the last one also takes key s, and
//    stores it to the caches from the registers it loaded it into, for every row in range).
//    A cache row of D elements is kVecs 16-byte vectors; a group of kLanesPerKey lanes (4 or 8)
//    reads one key row, lane g vectors g, g + G, ... (kVecsPerLane of them, the last slot empty in
//    some lanes when G does not divide kVecs), so a warp reads 32 / kLanesPerKey adjacent cache
//    rows at a time. Each group handles kKeysPerGroup keys per iteration. When q, out and the caches
//    allow 16-byte accesses (decode_pipe), the cache keys stream through a shared-memory ring of 2
//    or 3 stages per warp: each lane cp.asyncs its own vectors of the next iterations into its own
//    slots and reads back only those (no barrier), so 2-3 iterations of K and V are in flight while
//    one is folded; those copies carry an L2 evict-first policy (a step reads each cache key once).
//    Otherwise (and for key s, which comes from k and v) the lane issues all its K and V loads of
//    an iteration (16-byte read-only path or element by element) before using any; q,
//    key s and the first cache keys go out together. Dot products are reduced over the group's lanes
//    by xor-shuffles; each group keeps its own online-softmax state (m, l and its lanes' slices of O
//    in fp32 registers). At the end the
//    groups of a warp are merged by shuffles, the warps of a block through shared memory, the
//    blocks of a cluster in its first block (each block stores its (m, l, O) into the first block's
//    shared memory, distributed shared memory: no workspace) or, workspace split, by the merge
//    kernel, and O / l is written (zeros when the row has no key).
//
// Every register array is indexed by compile-time constants (fully unrolled loops); no kernel
// spills on sm_90 (see -DEET_PTXAS_VERBOSE=ON); on sm_80 / sm_86 / sm_89 the tensor-core context
// kernel spills 16 bytes for head_dim 96 and 8 bytes for head_dim 80 with 64-row tiles (a tile only
// EET_MMA_TILE selects for head_dim 80) (nvcc 13.0). Global memory outside the rows, columns and cache
// positions described in eet_attention.h is never read or written, whatever *step and pad_lengths
// hold.

#include <cooperative_groups.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>
#include <cmath>
#include <initializer_list>
#include <string>

#include "common.cuh"
#include "tile.cuh"
#include "mma_attention.cuh"
#include "dispatch.h"
#include "eet_attention.h"
#include "errors.h"

#ifndef EET_CUDA_ARCHITECTURES_STR
#define EET_CUDA_ARCHITECTURES_STR "unknown"
#endif

namespace eet {
namespace {

// What the kernels read; built from EetPrepadAttentionParams once validated.
struct PrepadArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  void* k_cache;
  void* v_cache;
  const int32_t* pad_lengths;
  const int32_t* step;
  int64_t q_stride;
  int64_t k_stride;
  int64_t v_stride;
  int64_t o_stride;
  int32_t batch;
  int32_t seq;
  int32_t num_heads;
  int32_t max_len;
  float scale_log2;        // scale * log2(e): scores are kept in the log2 domain
  int32_t append_vec;      // 1: k, v and both caches allow 16-byte accesses
  int32_t attention_vec;   // 1: q, out and both caches allow 16-byte accesses
  int32_t decode_pipe;     // decode: 0 = registers; 2 .. kStages = cache keys stream through a
                           // shared-memory ring of that many stages per warp (needs attention_vec
                           // and the ring's dynamic shared memory)
};

// The decode split's workspace (without clusters, see launch_decode): per (row, head, split) its O
// [batch * num_heads * splits][D], then its (m, l) [batch * num_heads * splits][2], from ws.
__device__ __forceinline__ int64_t decode_ws_states(const PrepadArgs& a, int splits) {
  return static_cast<int64_t>(a.batch) * a.num_heads * splits;
}

// Merges the n <= kN partial softmax states c = 0, 1, ... (in that order) of a decode row: state c has
// the running max m(c) (log2 domain; -inf: no key), the denominator l(c) and four elements of O, o(c)
// (a float4). Returns the merged max, denominator and elements in mb, den, acc. All loads of a loop
// are independent (unrolled over kN). Used for the warps of a block, the blocks of a cluster and the
// workspace states.
template <int kN, typename M, typename L, typename O>
__device__ __forceinline__ void merge_softmax_states(int n, M m, L l, O o, float& mb, float& den,
                                                     float (&acc)[4]) {
  mb = -INFINITY;
#pragma unroll
  for (int c = 0; c < kN; ++c) {
    if (c < n) mb = fmaxf(mb, m(c));
  }
  den = 0.f;
  acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
#pragma unroll
  for (int c = 0; c < kN; ++c) {
    if (c < n) {
      const float mc = m(c);
      const float fc = mc == -INFINITY ? 0.f : exp2f(mc - mb);
      den = fmaf(fc, l(c), den);
      const float4 x = o(c);
      acc[0] = fmaf(fc, x.x, acc[0]);
      acc[1] = fmaf(fc, x.y, acc[1]);
      acc[2] = fmaf(fc, x.z, acc[2]);
      acc[3] = fmaf(fc, x.w, acc[3]);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Small device helpers

// 16 bytes (one vector of kElems elements) at p as raw bits: one read-only vector load when vec
// (p 16-byte aligned), else element by element.
template <typename T>
__device__ __forceinline__ uint4 load_raw16(const T* __restrict__ p, bool vec) {
  constexpr int E = VecTraits<T>::kElems;
  static_assert(E * sizeof(T) == sizeof(uint4), "16-byte vectors");
  if (vec) return __ldg(reinterpret_cast<const uint4*>(p));
  T tmp[E];
#pragma unroll
  for (int e = 0; e < E; ++e) tmp[e] = p[e];
  uint4 r;
  memcpy(&r, tmp, sizeof(r));
  return r;
}

// Stores a raw 16-byte vector (load_raw16's inverse): one 16-byte store when vec, else element by element.
template <typename T>
__device__ __forceinline__ void store_raw16(T* __restrict__ p, const uint4& r, bool vec) {
  constexpr int E = VecTraits<T>::kElems;
  if (vec) {
    *reinterpret_cast<uint4*>(p) = r;
    return;
  }
  T tmp[E];
  memcpy(tmp, &r, sizeof(r));
#pragma unroll
  for (int e = 0; e < E; ++e) p[e] = tmp[e];
}

// The kElems elements of a raw 16-byte vector as floats.
__device__ __forceinline__ void unpack16(const uint4& r, float (&f)[4], float) {
  f[0] = __uint_as_float(r.x);
  f[1] = __uint_as_float(r.y);
  f[2] = __uint_as_float(r.z);
  f[3] = __uint_as_float(r.w);
}

__device__ __forceinline__ void unpack16(const uint4& r, float (&f)[8], __half) {
  const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h;
    memcpy(&h, &w[i], sizeof(h));
    const float2 x = __half22float2(h);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}

// The cache row (b, h, position 0) of a [batch, num_heads, max_len, D] cache.
template <typename T, int D>
__device__ __forceinline__ T* cache_head(void* cache, int64_t b, int h, int32_t num_heads,
                                         int32_t max_len) {
  return static_cast<T*>(cache) + ((b * num_heads + h) * static_cast<int64_t>(max_len)) * D;
}

// ------------------------------------------------------------------------------------------------
// 1. Append

constexpr int kAppendThreads = 128;

template <typename T, int D>
__global__ void __launch_bounds__(kAppendThreads) prepad_append_kernel(const PrepadArgs a) {
  constexpr int E = VecTraits<T>::kElems;
  constexpr int kVecs = D / E;  // 16-byte vectors per head
  static_assert(D % E == 0, "head_dim must fill whole 16-byte vectors");
  const int64_t pos = __ldg(a.step) + static_cast<int64_t>(blockIdx.x);  // token i = blockIdx.x
  if (pos < 0 || pos >= a.max_len) return;  // block-uniform; only a broken contract gets here
  const bool vec = a.append_vec != 0;

  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    const int64_t bi = b * a.seq + blockIdx.x;
    const T* k_row = static_cast<const T*>(a.k) + bi * a.k_stride;
    const T* v_row = static_cast<const T*>(a.v) + bi * a.v_stride;
    if (vec) {
      for (int c = threadIdx.x; c < a.num_heads * kVecs; c += kAppendThreads) {
        const int h = c / kVecs;
        const int d = (c - h * kVecs) * E;
        const int64_t dst = pos * D + d;
        *reinterpret_cast<uint4*>(cache_head<T, D>(a.k_cache, b, h, a.num_heads, a.max_len) +
                                  dst) = __ldg(reinterpret_cast<const uint4*>(k_row + h * D + d));
        *reinterpret_cast<uint4*>(cache_head<T, D>(a.v_cache, b, h, a.num_heads, a.max_len) +
                                  dst) = __ldg(reinterpret_cast<const uint4*>(v_row + h * D + d));
      }
    } else {
      for (int c = threadIdx.x; c < a.num_heads * D; c += kAppendThreads) {
        const int h = c / D;
        const int64_t dst = pos * D + (c - h * D);
        cache_head<T, D>(a.k_cache, b, h, a.num_heads, a.max_len)[dst] = k_row[c];
        cache_head<T, D>(a.v_cache, b, h, a.num_heads, a.max_len)[dst] = v_row[c];
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// 2a. Context attention (seq > 1)

template <typename T, int D>
__global__ void __launch_bounds__(AttentionTile<D>::kThreads)
    prepad_context_kernel(const PrepadArgs a) {
  using Tile = AttentionTile<D>;
  constexpr int kBlockM = Tile::kBlockM;
  constexpr int kBlockN = Tile::kBlockN;
  constexpr int kLd = Tile::kLd;
  constexpr int kLdP = Tile::kLdP;
  constexpr int kKeys = Tile::kKeys;
  constexpr int kChunks = Tile::kChunks;
  constexpr unsigned kFull = 0xffffffffu;

  extern __shared__ float4 smem_f4[];
  float* const q_s = reinterpret_cast<float*>(smem_f4);  // [kBlockM][kLd]
  float* const k_s = q_s + kBlockM * kLd;                // [kBlockN][kLd]
  float* const v_s = k_s + kBlockN * kLd;                // [kBlockN][kLd]
  float* const p_s = v_s + kBlockN * kLd;                // [kBlockM][kLdP]

  const int tid = threadIdx.x;
  const int quad = tid >> 2;  // the 4 lanes of a quad sit in one warp
  const int t = tid & 3;
  const int rows[2] = {quad, quad + Tile::kQuads};  // this thread's local query rows
  // The last query tiles have the most keys: let them start first.
  const int m0 = (gridDim.x - 1 - blockIdx.x) * kBlockM;
  const int h = blockIdx.y;
  const int valid_m = min(kBlockM, a.seq - m0);  // >= 1: the grid covers seq exactly
  const bool vec = a.attention_vec != 0;
  const int64_t s = __ldg(a.step);
  const int64_t tile_pos = s + m0;  // cache position of local query row 0

  // Keys of the whole tile: [n_start, n_end), n_end = min(last position + 1, max_len) (<= 0: none).
  const int64_t last_excl = tile_pos + valid_m;
  const int n_end = static_cast<int>(last_excl < 0 ? 0 : (last_excl > a.max_len ? a.max_len
                                                                                 : last_excl));
  // Row r sees the keys j in [pad, n_end) with j - r <= pos0 (j <= p_r). pos0 is tile_pos clamped
  // to int: below -kBlockM there is no key at all, and above max_len the mask is moot (j < max_len);
  // rows at positions outside [0, max_len) are zeroed at the end instead.
  const int pos0 = static_cast<int>(tile_pos < -kBlockM ? -kBlockM
                                                        : (tile_pos > a.max_len ? a.max_len
                                                                                : tile_pos));

  for (int64_t b = blockIdx.z; b < a.batch; b += gridDim.z) {
    const int n_start = max(__ldg(a.pad_lengths + b), 0);
    const T* k_head = cache_head<T, D>(a.k_cache, b, h, a.num_heads, a.max_len);
    const T* v_head = cache_head<T, D>(a.v_cache, b, h, a.num_heads, a.max_len);

    float o[2][4 * kChunks];
    float m[2];
    float l[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      m[i] = -INFINITY;
      l[i] = 0.f;
#pragma unroll
      for (int c = 0; c < 4 * kChunks; ++c) o[i][c] = 0.f;
    }

    if (n_start < n_end) {  // block-uniform; else every row of the tile is padding: zeros
      __syncthreads();  // the previous row of this block is done with shared memory
      const T* q = static_cast<const T*>(a.q) + (b * a.seq + m0) * a.q_stride +
                   static_cast<int64_t>(h) * D;
      load_tile<T, D, kBlockM, Tile::kThreads>(q, a.q_stride, valid_m, a.scale_log2, vec, q_s,
                                               kLd);
    }

    for (int n0 = n_start; n0 < n_end; n0 += kBlockN) {
      const int valid_n = min(kBlockN, n_end - n0);  // >= 1
      __syncthreads();  // everyone is done with the previous K, V (and P) tile
      load_tile<T, D, kBlockN, Tile::kThreads>(k_head + static_cast<int64_t>(n0) * D, D, valid_n,
                                               1.f, vec, k_s, kLd);
      load_tile<T, D, kBlockN, Tile::kThreads>(v_head + static_cast<int64_t>(n0) * D, D, valid_n,
                                               1.f, vec, v_s, kLd);
      __syncthreads();  // K, V (and on the first tile Q) are in shared memory

      // S = Q K^T for rows[0..1] x keys {t, t + 4, ..., t + 4 (kKeys - 1)} (log2 domain).
      float sc[2][kKeys];
#pragma unroll
      for (int j = 0; j < kKeys; ++j) sc[0][j] = sc[1][j] = 0.f;
      const float* q0 = q_s + rows[0] * kLd;
      const float* q1 = q_s + rows[1] * kLd;
      const float* kt = k_s + t * kLd;
#pragma unroll
      for (int d = 0; d < D; d += 4) {
        const float4 x = *reinterpret_cast<const float4*>(q0 + d);
        const float4 y = *reinterpret_cast<const float4*>(q1 + d);
#pragma unroll
        for (int j = 0; j < kKeys; ++j) {
          const float4 kv = *reinterpret_cast<const float4*>(kt + 4 * j * kLd + d);
          sc[0][j] = fmaf(x.x, kv.x, sc[0][j]);
          sc[0][j] = fmaf(x.y, kv.y, sc[0][j]);
          sc[0][j] = fmaf(x.z, kv.z, sc[0][j]);
          sc[0][j] = fmaf(x.w, kv.w, sc[0][j]);
          sc[1][j] = fmaf(y.x, kv.x, sc[1][j]);
          sc[1][j] = fmaf(y.y, kv.y, sc[1][j]);
          sc[1][j] = fmaf(y.z, kv.z, sc[1][j]);
          sc[1][j] = fmaf(y.w, kv.w, sc[1][j]);
        }
      }
      // Causal mask j <= p_r; it also masks the keys past valid_n (j >= n_end > p_r for rows inside
      // [0, max_len)). Rows with p_r < pad have no key left: the loop starts at pad. The assignment
      // replaces the NaN that a padded query row may have produced.
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < kKeys; ++j) {
          if (n0 + 4 * j + t - rows[i] > pos0) sc[i][j] = -INFINITY;
        }
      }

      // Online softmax. A row may have no valid key in this tile (or yet): its running max stays
      // -inf, and it is taken as 0 for the exponentials so that they are 0, never NaN.
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float mx = sc[i][0];
#pragma unroll
        for (int j = 1; j < kKeys; ++j) mx = fmaxf(mx, sc[i][j]);
        mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, 2));
        const float m_new = fmaxf(m[i], mx);
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        const float rescale = exp2f(m[i] - m_use);  // 0 while m[i] = -inf
        m[i] = m_new;
#pragma unroll
        for (int c = 0; c < 4 * kChunks; ++c) o[i][c] *= rescale;
        float psum = 0.f;
        float* prow = p_s + rows[i] * kLdP + t;
#pragma unroll
        for (int j = 0; j < kKeys; ++j) {
          const float p = exp2f(sc[i][j] - m_use);  // 0 for masked keys
          psum += p;
          prow[4 * j] = p;
        }
        l[i] = fmaf(l[i], rescale, psum);  // partial over this thread's keys; summed at the end
      }
      // A quad reads only the P rows it wrote itself, and a quad lives in one warp.
      __syncwarp();

      // O += P V over the loaded keys (V rows past valid_n are zero and P is 0 there anyway).
      const float* p0 = p_s + rows[0] * kLdP;
      const float* p1 = p_s + rows[1] * kLdP;
      const float* vt = v_s + 4 * t;
#pragma unroll 2
      for (int j = 0; j < valid_n; j += 4) {
        const float4 pa = *reinterpret_cast<const float4*>(p0 + j);
        const float4 pb = *reinterpret_cast<const float4*>(p1 + j);
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          const float wa = f4_get(pa, kk);
          const float wb = f4_get(pb, kk);
          const float* vrow = vt + (j + kk) * kLd;
#pragma unroll
          for (int c = 0; c < kChunks; ++c) {
            const float4 vv = *reinterpret_cast<const float4*>(vrow + 16 * c);
            o[0][4 * c + 0] = fmaf(wa, vv.x, o[0][4 * c + 0]);
            o[0][4 * c + 1] = fmaf(wa, vv.y, o[0][4 * c + 1]);
            o[0][4 * c + 2] = fmaf(wa, vv.z, o[0][4 * c + 2]);
            o[0][4 * c + 3] = fmaf(wa, vv.w, o[0][4 * c + 3]);
            o[1][4 * c + 0] = fmaf(wb, vv.x, o[1][4 * c + 0]);
            o[1][4 * c + 1] = fmaf(wb, vv.y, o[1][4 * c + 1]);
            o[1][4 * c + 2] = fmaf(wb, vv.z, o[1][4 * c + 2]);
            o[1][4 * c + 3] = fmaf(wb, vv.w, o[1][4 * c + 3]);
          }
        }
      }
      // The __syncthreads at the top of the next tile orders these P and V reads before the rewrites.
    }

    // Full softmax denominators (every lane takes part in the shuffles), then O / l for own rows;
    // l = 0 (no key) gives zeros.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      l[i] += __shfl_xor_sync(kFull, l[i], 1);
      l[i] += __shfl_xor_sync(kFull, l[i], 2);
    }
    T* out = static_cast<T*>(a.out) + (b * a.seq + m0) * a.o_stride + static_cast<int64_t>(h) * D +
             4 * t;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (rows[i] < valid_m) {
        const int64_t pos = tile_pos + rows[i];
        // l >= 1 when the row has a key; l = 0 and out-of-range positions give zeros.
        const float inv = (l[i] > 0.f && pos >= 0 && pos < a.max_len) ? 1.f / l[i] : 0.f;
        T* dst = out + static_cast<int64_t>(rows[i]) * a.o_stride;
#pragma unroll
        for (int c = 0; c < kChunks; ++c) {
          store4(dst + 16 * c, o[i][4 * c] * inv, o[i][4 * c + 1] * inv, o[i][4 * c + 2] * inv,
                 o[i][4 * c + 3] * inv, vec);
        }
      }
    }
  }
}

// Where a context block's keys and values lie (row b, head h; fp16): key j < s in the caches (rows
// D apart from k_cache / v_cache, cache row (b, h, 0)), j >= s new token j - s (rows k_stride /
// v_stride apart from k_new / v_new, new token 0). Kept in shared memory, written by one thread per
// row: the tile loop reads it when it issues a tile's loads instead of holding four more pointers in
// registers.
struct ContextSources {
  const __half* k_cache;
  const __half* v_cache;
  const __half* k_new;
  const __half* v_new;
  int64_t k_stride;
  int64_t v_stride;
  int64_t s;  // the step (< 0: every key is a new token)
};

template <int D>
struct ContextKV {
  const ContextSources* src;  // shared memory, read per row (not held in registers)
  template <bool kKeys>
  struct Rows {  // the rows of the tile from key n0
    const ContextSources* src;
    int n0;
    __device__ __forceinline__ const __half* operator()(int r) const {
      const int64_t j = n0 + r;
      return j < src->s ? (kKeys ? src->k_cache : src->v_cache) + j * D
                        : (kKeys ? src->k_new : src->v_new) +
                              (j - src->s) * (kKeys ? src->k_stride : src->v_stride);
    }
  };
  __device__ __forceinline__ Rows<true> k_tile(int n0) const { return {src, n0}; }
  __device__ __forceinline__ Rows<false> v_tile(int n0) const { return {src, n0}; }
};

// The fused context kernel's shared memory: the attention tile's, plus, when that keeps a block within
// 64 KB (three blocks per multiprocessor on sm_90: head_dim <= 64 with 64-row tiles), a staging area
// for the append's kBlockM rows of K and V, whose copies then start with the block (in flight with Q
// and the first key tile). Otherwise the append stages in the K / V buffers after the attention.
template <int D, int BlockM, int WarpRows>
struct ContextMma {
  using Tile = MmaTile<D, BlockM, WarpRows>;
  static constexpr size_t kStageBytes = 2 * BlockM * D * sizeof(__half);
  static constexpr bool kEarlyAppend = Tile::kSmemBytes + kStageBytes <= 64 * 1024;
  static constexpr size_t kSmemBytes = Tile::kSmemBytes + (kEarlyAppend ? kStageBytes : 0);
  static_assert(kStageBytes <= 4 * Tile::kKVElems * sizeof(__half),
                "the late append stages in the K / V buffers");
  static_assert(Tile::kSmemBytes % 16 == 0, "16-byte staging slots");
};

// 2a (fp16). Context attention on tensor cores (mma_attention.cuh), fused with the append: same tiles,
// key range, causal mask and zero rows as prepad_context_kernel; 64 query rows per block (16 per warp)
// or 128 (32 per warp), chosen in launch_context.
// Each block attends and appends its own query tile's keys and values (head h, new tokens m0 ..
// m0 + valid_m - 1, positions in [0, max_len)) to the caches: keys below the step s come from the
// caches (written by earlier launches, never by this one), keys at s and after from k and v (row
// j - s), so no block waits for another block's append.
// Blocks are ordered so that the last query tile of every (row, head) (the one with the most keys)
// is dispatched first, then the one before it, and so on.
template <int D, int BlockM, int WarpRows>
__global__ void __launch_bounds__(MmaTile<D, BlockM, WarpRows>::kThreads)
    prepad_context_mma_kernel(const PrepadArgs a) {
  using Fused = ContextMma<D, BlockM, WarpRows>;
  using Cfg = typename Fused::Tile;
  extern __shared__ uint4 smem_u4[];
  __half* const smem = reinterpret_cast<__half*>(smem_u4);
  __shared__ ContextSources sources;
  // Linear block id -> (query tile, from the last; head; first row).
  const uint64_t heads_rows = static_cast<uint64_t>(gridDim.y) * gridDim.z;
  const uint64_t lin =
      blockIdx.x + static_cast<uint64_t>(gridDim.x) * (blockIdx.y + static_cast<uint64_t>(gridDim.y) *
                                                                        blockIdx.z);
  const int tile = static_cast<int>(gridDim.x - 1 - lin / heads_rows);
  const int rem = static_cast<int>(lin % heads_rows);
  const int h = rem % static_cast<int>(gridDim.y);
  const int b_first = rem / static_cast<int>(gridDim.y);

  const int m0 = tile * BlockM;
  const int valid_m = min(BlockM, a.seq - m0);  // >= 1: the grid covers seq exactly
  // 16-byte accesses: q, out and the caches (attention) and k, v (keys from the new tokens, append).
  const bool vec = a.attention_vec != 0 && a.append_vec != 0;
  const int64_t s = __ldg(a.step);
  const int64_t tile_pos = s + m0;  // cache position of local query row 0
  // Keys of the whole tile: [pad, n_end), n_end = min(last position + 1, max_len) (<= 0: none).
  const int64_t last_excl = tile_pos + valid_m;
  const int n_end = static_cast<int>(last_excl < 0 ? 0 : (last_excl > a.max_len ? a.max_len
                                                                                 : last_excl));
  // Row r sees key j only if j <= pos0 + r (pos0: tile_pos clamped to int, as in the CUDA-core
  // kernel); rows whose position lies outside [0, max_len) write zeros and are not appended.
  const int pos0 = static_cast<int>(tile_pos < -BlockM ? -BlockM
                                                       : (tile_pos > a.max_len ? a.max_len
                                                                               : tile_pos));
  const int64_t lo = -tile_pos;
  const int64_t hi = a.max_len - tile_pos;
  const int row_lo = static_cast<int>(lo < 0 ? 0 : (lo > BlockM ? BlockM : lo));
  const int row_hi = static_cast<int>(hi < 0 ? 0 : (hi > BlockM ? BlockM : hi));

  for (int64_t b = b_first; b < a.batch; b += gridDim.z) {
    const int n_start = max(__ldg(a.pad_lengths + b), 0);  // keys before the pad length: never read
    const int64_t tok0 = b * a.seq;  // the row's first new token
    const int64_t col = static_cast<int64_t>(h) * D;
    const __half* k_new = static_cast<const __half*>(a.k) + tok0 * a.k_stride + col;  // token 0
    const __half* v_new = static_cast<const __half*>(a.v) + tok0 * a.v_stride + col;
    __half* k_head = cache_head<__half, D>(a.k_cache, b, h, a.num_heads, a.max_len);
    __half* v_head = cache_head<__half, D>(a.v_cache, b, h, a.num_heads, a.max_len);

    // The append copies the tile's rows [row_lo, app_hi) (valid and inside the cache), D / 8 vectors
    // each of K and V, to the caches through shared memory: loads issued with the block's first ones
    // (kEarlyAppend) or after the attention, stores after it (whose registers are then free).
    constexpr int C = Cfg::kChunks;  // 16-byte vectors per row of K or V
    const int app_hi = min(row_hi, valid_m);
    uint4* const k_stage = reinterpret_cast<uint4*>(
        reinterpret_cast<char*>(smem) +
        (Fused::kEarlyAppend ? Cfg::kSmemBytes : Cfg::kQElems * sizeof(__half)));
    uint4* const v_stage = k_stage + BlockM * C;
    const auto append_issue = [&] {
#pragma unroll 1
      for (int i = row_lo * C + static_cast<int>(threadIdx.x); i < app_hi * C; i += Cfg::kThreads) {
        const int r = i / C;
        const int64_t src = static_cast<int64_t>(m0 + r);
        const int c = (i - r * C) * 8;
        cp_async16(smem_addr(k_stage + i), k_new + src * a.k_stride + c, true);
        cp_async16(smem_addr(v_stage + i), v_new + src * a.v_stride + c, true);
      }
      cp_async_commit();
    };
    __syncthreads();  // a previous row of this block is done with shared memory
    if (vec && Fused::kEarlyAppend) append_issue();
    if (threadIdx.x == 0) {
      sources = ContextSources{k_head, v_head, k_new, v_new, a.k_stride, a.v_stride, s};
    }
    __syncthreads();
    const __half* q = static_cast<const __half*>(a.q) + (tok0 + m0) * a.q_stride + col;
    __half* out = static_cast<__half*>(a.out) + (tok0 + m0) * a.o_stride + col;
    // n_start >= n_end (every query of the tile is padding): no key tile at all, zeros written.
    mma_attention_block<Cfg, D, true>(q, a.q_stride, valid_m, ContextKV<D>{&sources}, n_start,
                                      n_end, pos0, a.scale_log2, vec, out, a.o_stride, row_lo,
                                      row_hi, smem);
    // Append, 16-byte path: every thread cp.asyncs its vectors into its own staging slots (all in
    // flight at once) and later stores what it copied (no barrier between: a thread reads back only
    // its own copies).
    if (vec && !Fused::kEarlyAppend) {
      __syncthreads();  // every warp is done with the K / V buffers, the staging area now
      append_issue();
    }
    if (vec) {
      cp_async_wait<0>();
#pragma unroll 1
      for (int i = row_lo * C + static_cast<int>(threadIdx.x); i < app_hi * C; i += Cfg::kThreads) {
        const int r = i / C;
        const int64_t dst = (tile_pos + r) * D + (i - r * C) * 8;
        *reinterpret_cast<uint4*>(k_head + dst) = k_stage[i];
        *reinterpret_cast<uint4*>(v_head + dst) = v_stage[i];
      }
    } else {
#pragma unroll 1
      for (int i = row_lo * D + static_cast<int>(threadIdx.x); i < app_hi * D; i += Cfg::kThreads) {
        const int r = i / D;
        const int c = i - r * D;
        const int64_t src = static_cast<int64_t>(m0 + r);
        k_head[(tile_pos + r) * D + c] = k_new[src * a.k_stride + c];
        v_head[(tile_pos + r) * D + c] = v_new[src * a.v_stride + c];
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// 2b. Decode attention (seq == 1)

// Tuning knobs of the decode kernel and its split (flash-decoding) launch; see launch_decode.
#ifndef EET_DECODE_SPLIT_FILL
#define EET_DECODE_SPLIT_FILL 50  // split until the grid fills this percentage of resident blocks
#endif
#ifndef EET_DECODE_KEYS_PER_GROUP
#define EET_DECODE_KEYS_PER_GROUP 4  // keys per lane group and iteration at one vector per lane
#endif
#ifndef EET_DECODE_STAGES
#define EET_DECODE_STAGES 3  // decode: per warp, at most this many iterations of cache keys in flight
#endif
#ifndef EET_DECODE_MIN_SPLIT_KEYS
#define EET_DECODE_MIN_SPLIT_KEYS 128  // ... while a full cache still gives each block this many keys
#endif

template <typename T, int D>
struct DecodeConfig {
  static constexpr int kElems = VecTraits<T>::kElems;  // elements per 16-byte vector
  static constexpr int kVecs = D / kElems;             // vectors per cache row (4 .. 32)
  // Lanes per key: a power of two; lane g of a key's group reads vectors g, g + G, ... (< kVecs).
  static constexpr int kLanesPerKey = kVecs <= 4 ? 4 : 8;
  static constexpr int kVecsPerLane = (kVecs + kLanesPerKey - 1) / kLanesPerKey;
  static constexpr bool kRagged = kVecs % kLanesPerKey != 0;  // some lanes own one vector less
  // Keys per group and iteration: about 8 vectors of K and V together in flight per lane.
  static constexpr int kKeysPerGroup =
      kVecsPerLane == 1 ? EET_DECODE_KEYS_PER_GROUP
                        : (kVecsPerLane == 2 ? EET_DECODE_KEYS_PER_GROUP / 2 : 1);
  static constexpr int kGroups = 32 / kLanesPerKey;            // key groups per warp
  static constexpr int kKeysPerWarp = kGroups * kKeysPerGroup;  // keys per warp and iteration
  // The shared-memory ring (decode_pipe): per warp 2 .. kStages stages of one iteration's K and V
  // vectors; lane-private slots (a lane reads back only what its own cp.async wrote: no barrier).
  static constexpr int kStages = EET_DECODE_STAGES;
  static constexpr int kStageVecs = 2 * kKeysPerGroup * kVecsPerLane;  // 16-byte vectors per lane
  static constexpr int kStageBytesPerWarp = kStageVecs * 32 * 16;
  static_assert(kStages == 2 || kStages == 3, "prepad_decode_kernel waits on rings of 2 or 3 stages");
  static constexpr int kSplitWarps = 4;  // warps per block of a split launch (and of a large grid)
  static constexpr int kMaxWarps = 8;
  static constexpr int kMaxThreads = 32 * kMaxWarps;
  static constexpr int kMaxSplits = 8;  // blocks per (row, head): the portable cluster size
  // The largest ring launched: kStages stages only for split launches (kSplitWarps warps), else 2.
  static constexpr int kRingBytesMax =
      (kSplitWarps * kStages > 2 * kMaxWarps ? kSplitWarps * kStages : 2 * kMaxWarps) *
      kStageBytesPerWarp;
  // Blocks of kMaxThreads per multiprocessor the registers must allow (<= 128 registers per thread).
  // The shared-memory ring bounds residency anyway (per warp 2 or kStages stages of 4 KB for fp16,
  // head_dim 64).
  static constexpr int kMinBlocks = 2;

  static_assert(D % kElems == 0, "head_dim must fill whole 16-byte vectors");
  static_assert(kVecs >= kLanesPerKey / 2, "every lane of a group but the ragged tail owns a vector");
  static_assert(D % 4 == 0 && D / 4 <= 32, "output written 4 elements per thread by one warp");
};

// Vector slot v of lane g (vector v * G + g of a row) exists.
template <typename Cfg>
__device__ __forceinline__ bool decode_slot(int v, int g) {
  return !Cfg::kRagged || v < Cfg::kVecsPerLane - 1 || v * Cfg::kLanesPerKey + g < Cfg::kVecs;
}

// Block `c` of this block's cluster's copy of the shared-memory variable at p (sm_90+).
template <typename P>
__device__ __forceinline__ P* decode_remote(P* p, int c) {
#if __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().map_shared_rank(p, c);
#else
  (void)c;
  return p;
#endif
}

// The K and V vectors of one warp iteration (keys i = u * kGroups + grp, u < kKeysPerGroup).
template <typename T, int D>
struct DecodeRegs {
  uint4 k[DecodeConfig<T, D>::kKeysPerGroup][DecodeConfig<T, D>::kVecsPerLane];
  uint4 v[DecodeConfig<T, D>::kKeysPerGroup][DecodeConfig<T, D>::kVecsPerLane];
};

// The vectors of one warp iteration for this lane: f(u, v, ok, offset) for key i = u * kGroups + grp
// (u < kKeysPerGroup) and slot v (< kVecsPerLane); ok: i < count and the slot exists; offset: elements
// from the rows' start (row i, vector v * G + g), meaningful when ok. For a fixed u the warp covers
// kGroups adjacent rows.
template <typename T, int D, typename F>
__device__ __forceinline__ void decode_for_vectors(int count, int g, int grp, F&& f) {
  using Cfg = DecodeConfig<T, D>;
#pragma unroll
  for (int u = 0; u < Cfg::kKeysPerGroup; ++u) {
    const int i = u * Cfg::kGroups + grp;
#pragma unroll
    for (int v = 0; v < Cfg::kVecsPerLane; ++v) {
      f(u, v, i < count && decode_slot<Cfg>(v, g),
        static_cast<int64_t>(i) * D + (v * Cfg::kLanesPerKey + g) * Cfg::kElems);
    }
  }
}

// Issues the loads of the keys i < count (>= 1) of the rows at k_rows / v_rows (D elements apart)
// into registers; the others are zero.
template <typename T, int D>
__device__ __forceinline__ void decode_load(const T* __restrict__ k_rows,
                                            const T* __restrict__ v_rows, int count, bool vec,
                                            int g, int grp, DecodeRegs<T, D>& r) {
  decode_for_vectors<T, D>(count, g, grp, [&](int u, int v, bool ok, int64_t off) {
    if (ok) {
      r.k[u][v] = load_raw16(k_rows + off, vec);
      r.v[u][v] = load_raw16(v_rows + off, vec);
    } else {
      r.k[u][v] = r.v[u][v] = make_uint4(0u, 0u, 0u, 0u);  // 0.0 in fp32 and fp16
    }
  });
}

// Writes the key and value that decode_load(k_new, v_new, count = 1, ...) left in r (key 0: the lanes of group
// 0) to cache rows k_row / v_row; vec: k, v and the caches allow 16-byte accesses (as for that load).
template <typename T, int D>
__device__ __forceinline__ void decode_append(T* __restrict__ k_row, T* __restrict__ v_row, bool vec, int g,
                                              int grp, const DecodeRegs<T, D>& r) {
  decode_for_vectors<T, D>(1, g, grp, [&](int u, int v, bool ok, int64_t off) {
    if (ok) {
      store_raw16(k_row + off, r.k[u][v], vec);
      store_raw16(v_row + off, r.v[u][v], vec);
    }
  });
}

// decode_load into the shared-memory ring instead of registers: cp.async of the same vectors (zero
// fill for keys i >= count and empty slots) into this lane's slots of one stage (vec only), tagged
// with the L2 `policy` (evict first: a step reads each cache key once, and the layers' kernels that
// follow reuse what the stream would otherwise push out of L2; H100, GPT-2 small engine, batch 32,
// past 512: decode step 734 -> 722 us).
template <typename T, int D>
__device__ __forceinline__ void decode_issue(const T* __restrict__ k_rows,
                                             const T* __restrict__ v_rows, int count, int g,
                                             int grp, int lane, uint4* stage, uint64_t policy) {
  decode_for_vectors<T, D>(count, g, grp, [&](int u, int v, bool ok, int64_t off) {
    const int slot = (u * DecodeConfig<T, D>::kVecsPerLane + v) * 2;
    cp_async16_hint(smem_addr(stage + slot * 32 + lane), ok ? k_rows + off : k_rows, ok, policy);
    cp_async16_hint(smem_addr(stage + (slot + 1) * 32 + lane), ok ? v_rows + off : v_rows, ok, policy);
  });
}

// The stage written by decode_issue (this lane's slots, its copies complete) -> registers.
template <typename T, int D>
__device__ __forceinline__ void decode_read(const uint4* stage, int lane, DecodeRegs<T, D>& r) {
  using Cfg = DecodeConfig<T, D>;
#pragma unroll
  for (int u = 0; u < Cfg::kKeysPerGroup; ++u) {
#pragma unroll
    for (int v = 0; v < Cfg::kVecsPerLane; ++v) {
      const int slot = (u * Cfg::kVecsPerLane + v) * 2;
      r.k[u][v] = stage[slot * 32 + lane];
      r.v[u][v] = stage[(slot + 1) * 32 + lane];
    }
  }
}

// Folds the loaded keys i < count into the group's online softmax state (m, l, o; log2 domain, qf
// pre-scaled by scale * log2(e)).
template <typename T, int D>
__device__ __forceinline__ void decode_fold(
    const DecodeRegs<T, D>& r, int count, int grp,
    const float (&qf)[DecodeConfig<T, D>::kVecsPerLane][DecodeConfig<T, D>::kElems], float& m,
    float& l, float (&o)[DecodeConfig<T, D>::kVecsPerLane][DecodeConfig<T, D>::kElems]) {
  using Cfg = DecodeConfig<T, D>;
  constexpr int E = Cfg::kElems;
  constexpr int G = Cfg::kLanesPerKey;
  constexpr int NV = Cfg::kVecsPerLane;
  constexpr int U = Cfg::kKeysPerGroup;
  constexpr unsigned kFull = 0xffffffffu;

  // Scores, reduced over the group's lanes.
  float sc[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    float dot = 0.f;
#pragma unroll
    for (int v = 0; v < NV; ++v) {
      float kf[E];
      unpack16(r.k[u][v], kf, T());
#pragma unroll
      for (int e = 0; e < E; ++e) dot = fmaf(qf[v][e], kf[e], dot);
    }
#pragma unroll
    for (int off = G / 2; off > 0; off >>= 1) dot += __shfl_xor_sync(kFull, dot, off);
    sc[u] = u * Cfg::kGroups + grp < count ? dot : -INFINITY;
  }
  // Online softmax of the group (its key u = 0 may be invalid: m can stay -inf).
  float mx = sc[0];
#pragma unroll
  for (int u = 1; u < U; ++u) mx = fmaxf(mx, sc[u]);
  const float m_new = fmaxf(m, mx);
  const float m_use = m_new == -INFINITY ? 0.f : m_new;
  const float rescale = exp2f(m - m_use);  // 0 while m = -inf
  m = m_new;
  l *= rescale;
#pragma unroll
  for (int v = 0; v < NV; ++v) {
#pragma unroll
    for (int e = 0; e < E; ++e) o[v][e] *= rescale;
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const float p = exp2f(sc[u] - m_use);  // 0 for invalid keys
    l += p;
#pragma unroll
    for (int v = 0; v < NV; ++v) {
      float vf[E];
      unpack16(r.v[u][v], vf, T());
#pragma unroll
      for (int e = 0; e < E; ++e) o[v][e] = fmaf(p, vf[e], o[v][e]);
    }
  }
}

// grid = (splits, num_heads, min(batch, 65535)); blocks loop over rows in steps of gridDim.z.
// splits > 1 only on sm_90+, launched as clusters of (splits, 1, 1): the blocks of a cluster share
// one (row, head) and each takes an even share of its keys; every block merges its warps in shared
// memory and sends its partial softmax state (m, l, O) to the first block's shared memory
// (distributed shared memory: no workspace), which merges them and writes the output.
template <typename T, int D, bool kWorkspace>
__global__ void __launch_bounds__(DecodeConfig<T, D>::kMaxThreads, DecodeConfig<T, D>::kMinBlocks)
    prepad_decode_kernel(const PrepadArgs a, float* __restrict__ ws) {
  using Cfg = DecodeConfig<T, D>;
  constexpr int E = Cfg::kElems;
  constexpr int G = Cfg::kLanesPerKey;
  constexpr int NV = Cfg::kVecsPerLane;
  constexpr int kW = Cfg::kMaxWarps;
  constexpr int kS = Cfg::kMaxSplits;
  constexpr unsigned kFull = 0xffffffffu;

  __shared__ __align__(16) float o_s[kW][D];  // per warp: its merged O
  __shared__ float m_s[kW];                   // per warp: its running max
  __shared__ float l_s[kW];                   // per warp: its softmax denominator
  __shared__ __align__(16) float xo_s[kS][D];  // first block of a cluster: per block, its O
  __shared__ float xm_s[kS];                   // ... its max
  __shared__ float xl_s[kS];                   // ... its denominator
  extern __shared__ __align__(16) unsigned char decode_ring_smem[];  // a.decode_pipe: the ring

  // splits > 1: a cluster of (splits, 1, 1) per (row, head) (sm_90+), or, kWorkspace (any
  // architecture), independent blocks that leave their states in ws for prepad_decode_merge_kernel
  const int splits = static_cast<int>(gridDim.x);
  const int split = static_cast<int>(blockIdx.x);  // = the block's rank in its cluster
  constexpr bool via_ws = kWorkspace;
#if __CUDA_ARCH__ < 900
  if (splits > 1 && !via_ws) return;  // the host never launches that: no clusters before sm_90
#endif
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  const int g = lane & (G - 1);  // lane within the key group
  const int grp = lane / G;      // key group within the warp
  const int h = blockIdx.y;
  const bool vec = a.attention_vec != 0;   // q, out and the caches allow 16-byte accesses
  const bool new_vec = a.append_vec != 0;  // k, v and the caches allow 16-byte accesses
  const int64_t s = __ldg(a.step);
  // The new token's position; keys [pad, n_end). n_end = 0 (no key) if the position is out of range.
  const bool in_range = s >= 0 && s < a.max_len;
  const int n_end = in_range ? static_cast<int>(s) + 1 : 0;
  const int parts = splits * warps;  // contiguous key ranges per (row, head): one per warp
  const int part = split * warps + warp;
#if __CUDA_ARCH__ >= 900
  // Another block's shared memory may be written only once that block runs: every block of the
  // cluster has started after this barrier.
  if (splits > 1 && !via_ws) cooperative_groups::this_cluster().sync();
#endif

  for (int64_t b = blockIdx.z; b < a.batch; b += gridDim.z) {
    // The new key and value (position s) come from k and v: this launch also appends them.
    const T* k_new = static_cast<const T*>(a.k) + b * a.k_stride + static_cast<int64_t>(h) * D;
    const T* v_new = static_cast<const T*>(a.v) + b * a.v_stride + static_cast<int64_t>(h) * D;
    T* const k_head = cache_head<T, D>(a.k_cache, b, h, a.num_heads, a.max_len);
    T* const v_head = cache_head<T, D>(a.v_cache, b, h, a.num_heads, a.max_len);

    // This warp's keys [lo, hi): part `part` of `parts` even shares of [pad, n_end). Keys before
    // the pad are never read; key s is read from k / v (by the last part), the others (< s) from
    // the caches, which this launch writes only at position s: no ordering between blocks is needed (the
    // last part stores key s to the caches once its own cache loads are out).
    const int n_start = max(__ldg(a.pad_lengths + b), 0);
    const int64_t len = n_end > n_start ? n_end - n_start : 0;
    const int lo = n_start + static_cast<int>(len * part / parts);
    const int hi = n_start + static_cast<int>(len * (part + 1) / parts);
    // The last part appends key s to the caches (every row, padded ones too), from the registers its fold of
    // key s reads too (the last part owns key s whenever the row has keys): no load after the keys.
    const bool appender = in_range && part == parts - 1;  // warp-uniform
    DecodeRegs<T, D> fresh;
    if (appender) decode_load<T, D>(k_new, v_new, 1, new_vec, g, grp, fresh);

    float o[NV][E];
    float m = -INFINITY;  // the group's running max (identical in its lanes)
    float l = 0.f;        // the group's softmax denominator (identical in its lanes)
#pragma unroll
    for (int v = 0; v < NV; ++v) {
#pragma unroll
      for (int e = 0; e < E; ++e) o[v][e] = 0.f;
    }

    if (lo < hi) {  // warp-uniform; all trip counts below are too (every lane shuffles)
      const int cache_hi = min(hi, n_end - 1);  // keys [lo, cache_hi) from the caches
      const bool owns_s = hi == n_end;          // the last part: key s, from k and v
      // One round trip for q, key s and the first cache keys: all their loads go out first.
      const T* q = static_cast<const T*>(a.q) + b * a.q_stride + static_cast<int64_t>(h) * D;
      uint4 qr[NV];
#pragma unroll
      for (int v = 0; v < NV; ++v) {
        qr[v] = decode_slot<Cfg>(v, g) ? load_raw16(q + (v * G + g) * E, vec)
                                       : make_uint4(0u, 0u, 0u, 0u);
      }
      DecodeRegs<T, D> r;
      // The ring: this warp's `stages` stages; iteration j of [lo, cache_hi) lives in stage j % stages.
      const int stages = a.decode_pipe;      // block-uniform
      const bool pipe = stages != 0;
      const uint64_t policy = l2_evict_first_policy();
      uint4* ring = reinterpret_cast<uint4*>(decode_ring_smem) +
                    static_cast<int64_t>(warp) * stages * Cfg::kStageVecs * 32;
      const int iters = lo < cache_hi ? (cache_hi - lo + Cfg::kKeysPerWarp - 1) / Cfg::kKeysPerWarp : 0;
      if (pipe) {
        // One cp.async group per stage, empty ones too: waiting until stages - 1 groups are pending
        // then means "the oldest stage has landed" in every iteration.
        for (int j = 0; j < stages; ++j) {
          if (j < iters) {
            const int base = lo + j * Cfg::kKeysPerWarp;
            decode_issue<T, D>(k_head + static_cast<int64_t>(base) * D,
                               v_head + static_cast<int64_t>(base) * D, cache_hi - base, g, grp, lane,
                               ring + j * Cfg::kStageVecs * 32, policy);
          }
          cp_async_commit();
        }
      } else if (lo < cache_hi) {
        decode_load<T, D>(k_head + static_cast<int64_t>(lo) * D,
                          v_head + static_cast<int64_t>(lo) * D, cache_hi - lo, vec, g, grp, r);
      }
      // This lane's slices of q, pre-multiplied by scale * log2(e) (zero in empty slots).
      float qf[NV][E];
#pragma unroll
      for (int v = 0; v < NV; ++v) {
        unpack16(qr[v], qf[v], T());
#pragma unroll
        for (int e = 0; e < E; ++e) qf[v][e] *= a.scale_log2;
      }
      if (owns_s) decode_fold<T, D>(fresh, 1, grp, qf, m, l, o);
      // After the cache loads went out; nothing in this launch reads cache position s.
      if (appender) decode_append<T, D>(k_head + s * D, v_head + s * D, new_vec, g, grp, fresh);
      if (pipe) {
        for (int j = 0; j < iters; ++j) {
          if (stages == 3) {
            cp_async_wait<2>();
          } else {
            cp_async_wait<1>();
          }
          uint4* stage = ring + (j % stages) * Cfg::kStageVecs * 32;
          decode_read<T, D>(stage, lane, r);
          const int base = lo + j * Cfg::kKeysPerWarp;
          decode_fold<T, D>(r, cache_hi - base, grp, qf, m, l, o);
          // The registers were consumed by the fold: the stage may be refilled.
          const int next = j + stages;
          if (next < iters) {
            const int nb = lo + next * Cfg::kKeysPerWarp;
            decode_issue<T, D>(k_head + static_cast<int64_t>(nb) * D,
                               v_head + static_cast<int64_t>(nb) * D, cache_hi - nb, g, grp, lane, stage,
                               policy);
          }
          cp_async_commit();
        }
        cp_async_wait<0>();
      }
      for (int base = lo; !pipe && base < cache_hi;) {
        decode_fold<T, D>(r, cache_hi - base, grp, qf, m, l, o);
        base += Cfg::kKeysPerWarp;
        if (base < cache_hi) {
          decode_load<T, D>(k_head + static_cast<int64_t>(base) * D,
                            v_head + static_cast<int64_t>(base) * D, cache_hi - base, vec, g, grp,
                            r);
        }
      }
    }

    // A row without keys (its pad past the step) still gets key s appended.
    if (appender && lo >= hi) decode_append<T, D>(k_head + s * D, v_head + s * D, new_vec, g, grp, fresh);

    // Merge the groups of the warp: lanes with the same g hold the same slice of O.
    float m_w = m;
#pragma unroll
    for (int off = G; off < 32; off <<= 1) m_w = fmaxf(m_w, __shfl_xor_sync(kFull, m_w, off));
    const float f = m == -INFINITY ? 0.f : exp2f(m - m_w);  // m finite => m_w finite
    l *= f;
#pragma unroll
    for (int v = 0; v < NV; ++v) {
#pragma unroll
      for (int e = 0; e < E; ++e) o[v][e] *= f;
    }
#pragma unroll
    for (int off = G; off < 32; off <<= 1) {
      l += __shfl_xor_sync(kFull, l, off);
#pragma unroll
      for (int v = 0; v < NV; ++v) {
#pragma unroll
        for (int e = 0; e < E; ++e) o[v][e] += __shfl_xor_sync(kFull, o[v][e], off);
      }
    }

    // The previous row is done with o_s, m_s, l_s (the barrier that ends each row).
    if (grp == 0) {
#pragma unroll
      for (int v = 0; v < NV; ++v) {
        if (decode_slot<Cfg>(v, g)) {
#pragma unroll
          for (int e = 0; e < E; ++e) o_s[warp][(v * G + g) * E + e] = o[v][e];
        }
      }
      if (lane == 0) {
        m_s[warp] = m_w;
        l_s[warp] = l;
      }
    }
    __syncthreads();

    // Merge the block's warps: thread t < D / 4 owns elements 4t .. 4t + 3 (all its loads are
    // independent: the loops are unrolled over kMaxWarps / kMaxSplits).
    const int t = threadIdx.x;
    float mb = -INFINITY;
    float den = 0.f;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    if (t < D / 4) {
      merge_softmax_states<kW>(
          warps, [&](int w) { return m_s[w]; }, [&](int w) { return l_s[w]; },
          [&](int w) { return *reinterpret_cast<const float4*>(&o_s[w][4 * t]); }, mb, den, acc);
    }
    const bool last_row = b + gridDim.z >= a.batch;
    if (splits > 1 && via_ws) {
      // The block's state to the workspace; prepad_decode_merge_kernel merges and writes the output.
      if (t < D / 4) {
        const int64_t slot = (b * a.num_heads + h) * splits + split;
        *reinterpret_cast<float4*>(ws + slot * D + 4 * t) = make_float4(acc[0], acc[1], acc[2], acc[3]);
        if (t == 0) {
          *reinterpret_cast<float2*>(ws + decode_ws_states(a, splits) * D + 2 * slot) = make_float2(mb, den);
        }
      }
    } else if (splits > 1) {
      // Send the block's state to the first block, then merge the blocks there.
      if (t < D / 4) {
        *reinterpret_cast<float4*>(decode_remote(&xo_s[split][4 * t], 0)) =
            make_float4(acc[0], acc[1], acc[2], acc[3]);
        if (t == 0) {
          *decode_remote(&xm_s[split], 0) = mb;
          *decode_remote(&xl_s[split], 0) = den;
        }
      }
#if __CUDA_ARCH__ >= 900
      cooperative_groups::this_cluster().sync();  // the states are in the first block
#endif
      if (split == 0 && t < D / 4) {
        merge_softmax_states<kS>(
            splits, [&](int c) { return xm_s[c]; }, [&](int c) { return xl_s[c]; },
            [&](int c) { return *reinterpret_cast<const float4*>(&xo_s[c][4 * t]); }, mb, den, acc);
      }
    }
    if (split == 0 && !(splits > 1 && via_ws) && t < D / 4) {
      const float inv = den > 0.f ? 1.f / den : 0.f;  // den >= 1 when the row has a key
      T* dst = static_cast<T*>(a.out) + b * a.o_stride + static_cast<int64_t>(h) * D + 4 * t;
      store4(dst, acc[0] * inv, acc[1] * inv, acc[2] * inv, acc[3] * inv, vec);
    }
    // Before the next row: the block's warps are done with o_s, m_s, l_s, and the first block with
    // xo_s, xm_s, xl_s. After the last row the other blocks may leave: nothing reads their shared
    // memory, and their stores into the first block's are complete (the cluster barrier).
    if (!last_row) {
#if __CUDA_ARCH__ >= 900
      if (splits > 1 && !via_ws) {
        cooperative_groups::this_cluster().sync();
      } else {
        __syncthreads();
      }
#else
      __syncthreads();
#endif
    }
  }
}

// The workspace split's second kernel: grid = (num_heads, min(batch, 65535)), D / 4 threads; thread t
// merges elements 4t .. 4t + 3 of the `splits` states of its (row, head) and writes the output (zeros
// when the row has no key), as the cluster merge does.
template <typename T, int D>
__global__ void __launch_bounds__(D / 4)
    prepad_decode_merge_kernel(const PrepadArgs a, const float* __restrict__ ws, const int splits) {
  constexpr int kS = DecodeConfig<T, D>::kMaxSplits;
  const int h = blockIdx.x;
  const int t = threadIdx.x;
  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    const int64_t base = (b * a.num_heads + h) * splits;
    const float* ml = ws + decode_ws_states(a, splits) * D + 2 * base;  // (m, l) of each split
    float mb, den, acc[4];
    merge_softmax_states<kS>(
        splits, [&](int c) { return ml[2 * c]; }, [&](int c) { return ml[2 * c + 1]; },
        [&](int c) { return *reinterpret_cast<const float4*>(ws + (base + c) * D + 4 * t); }, mb, den, acc);
    const float inv = den > 0.f ? 1.f / den : 0.f;
    T* dst = static_cast<T*>(a.out) + b * a.o_stride + static_cast<int64_t>(h) * D + 4 * t;
    store4(dst, acc[0] * inv, acc[1] * inv, acc[2] * inv, acc[3] * inv, a.attention_vec != 0);
  }
}

// ------------------------------------------------------------------------------------------------
// Host side

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

std::string launch_failure(const char* kernel, int32_t dtype, int head_dim, cudaError_t err) {
  return std::string(kernel) + " launch failed (dtype " + PrepadTable::dtype_name(dtype) +
         ", head_dim " + std::to_string(head_dim) + "): " + cuda_error_text(err) +
         "; this library holds code for CUDA architectures " + EET_CUDA_ARCHITECTURES_STR;
}

// The current device's multiprocessor count (queried once per device).
cudaError_t multiprocessor_count(int* count) {
  static std::atomic<int> counts[64];  // 0: not queried yet
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return fail(err, "cudaGetDevice failed: " + cuda_error_text(err));
  const bool cached = device >= 0 && device < 64;
  if (cached) {
    *count = counts[device].load(std::memory_order_relaxed);
    if (*count > 0) return cudaSuccess;
  }
  err = cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) {
    return fail(err, "cudaDeviceGetAttribute(MultiProcessorCount) failed: " +
                         cuda_error_text(err));
  }
  if (cached) counts[device].store(*count, std::memory_order_relaxed);
  return cudaSuccess;
}

template <int D, int BlockM, int WarpRows>
cudaError_t launch_context_mma(const EetPrepadAttentionParams& p, const PrepadArgs& a,
                               cudaStream_t stream) {
  using Fused = ContextMma<D, BlockM, WarpRows>;
  using Cfg = typename Fused::Tile;
  const auto kernel = prepad_context_mma_kernel<D, BlockM, WarpRows>;
  static std::atomic<uint64_t> configured_devices{0};
  cudaError_t err = allow_dynamic_smem(kernel, Fused::kSmemBytes, D, configured_devices);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((p.seq + BlockM - 1) / BlockM),
                  static_cast<unsigned>(p.num_heads),
                  static_cast<unsigned>(p.batch < 65535 ? p.batch : 65535));
  kernel<<<grid, Cfg::kThreads, Fused::kSmemBytes, stream>>>(a);
  err = cudaGetLastError();
  if (err != cudaSuccess) return fail(err, launch_failure("context kernel", p.dtype, D, err));
  return cudaSuccess;
}

// fp16 (kTensorCores): prepad_context_mma_kernel, 128 query rows per block (32 per warp) for
// head_dim >= 80 or prompts of 1024 tokens or more, else 64 (16 per warp); fp32: prepad_context_kernel.
template <typename T, int D, bool kTensorCores>
cudaError_t launch_context(const EetPrepadAttentionParams& p, const PrepadArgs& a,
                           cudaStream_t stream) {
  if constexpr (kTensorCores) {
    static_assert(sizeof(T) == 2, "the tensor-core kernels are fp16");
    int tile = mma_tile_override();  // the varlen kernel's choice (varlen_attention.cu)
    if (tile == 0) tile = (D >= 80 || p.seq >= 1024) ? 3 : 1;
    return tile == 3 ? launch_context_mma<D, 128, 32>(p, a, stream)
                     : launch_context_mma<D, 64, 16>(p, a, stream);
  }
  using Tile = AttentionTile<D>;
  constexpr size_t kSmem = Tile::kSmemBytes;
  const auto kernel = prepad_context_kernel<T, D>;
  static std::atomic<uint64_t> configured_devices{0};
  cudaError_t err = allow_dynamic_smem(kernel, kSmem, D, configured_devices);
  if (err != cudaSuccess) return err;

  const dim3 grid(static_cast<unsigned>((p.seq + Tile::kBlockM - 1) / Tile::kBlockM),
                  static_cast<unsigned>(p.num_heads),
                  static_cast<unsigned>(p.batch < 65535 ? p.batch : 65535));
  kernel<<<grid, Tile::kThreads, kSmem, stream>>>(a);
  err = cudaGetLastError();
  if (err != cudaSuccess) return fail(err, launch_failure("context kernel", p.dtype, D, err));
  return cudaSuccess;
}

// For the decode kernel <T, D> on `device` (queried once per device): resident blocks of kSplitWarps
// warps per multiprocessor, and whether it may be launched in clusters (a device of compute
// capability 9.0+ running code compiled for sm_90+, which holds the kernel's cluster merge).
template <typename T, int D>
cudaError_t decode_device_info(int device, int32_t dtype, int* blocks_per_sm, bool* clusters) {
  static std::atomic<int> cache[64];  // 0: not queried yet; else 1 + 2 * blocks_per_sm + clusters
  const bool cached = device >= 0 && device < 64;
  if (cached) {
    const int c = cache[device].load(std::memory_order_relaxed);
    if (c > 0) {
      *blocks_per_sm = (c - 1) >> 1;
      *clusters = ((c - 1) & 1) != 0;
      return cudaSuccess;
    }
  }
  const auto kernel = prepad_decode_kernel<T, D, false>;
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
  if (err != cudaSuccess) {
    return fail(err, launch_failure("decode kernel (cudaFuncGetAttributes)", dtype, D,
                                    err));
  }
  int major = 0;
  err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess) {
    return fail(err, "cudaDeviceGetAttribute(ComputeCapabilityMajor) failed: " +
                         cuda_error_text(err));
  }
  int n = 0;
  // (with the two-stage shared-memory ring of kSplitWarps warps: the path of 16-byte aligned caches)
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &n, kernel, 32 * DecodeConfig<T, D>::kSplitWarps,
      static_cast<size_t>(DecodeConfig<T, D>::kSplitWarps) * 2 * DecodeConfig<T, D>::kStageBytesPerWarp);
  if (err != cudaSuccess) {
    return fail(err, "cudaOccupancyMaxActiveBlocksPerMultiprocessor failed for the decode kernel: " +
                         cuda_error_text(err));
  }
  *blocks_per_sm = n > 1 ? n : 1;
  *clusters = major >= 9 && attr.ptxVersion >= 90 && attr.binaryVersion >= 90;
  if (cached) {
    cache[device].store(1 + 2 * *blocks_per_sm + (*clusters ? 1 : 0), std::memory_order_relaxed);
  }
  return cudaSuccess;
}

template <typename T, int D>
cudaError_t launch_decode(const EetPrepadAttentionParams& p, const PrepadArgs& a,
                          cudaStream_t stream) {
  using Cfg = DecodeConfig<T, D>;
  const auto kernel = prepad_decode_kernel<T, D, false>;
  int sms = 0;
  cudaError_t err = multiprocessor_count(&sms);
  if (err != cudaSuccess) return err;
  int device = 0;
  err = cudaGetDevice(&device);
  if (err != cudaSuccess) return fail(err, "cudaGetDevice failed: " + cuda_error_text(err));
  int blocks_per_sm = 1;
  bool clusters = false;
  err = decode_device_info<T, D>(device, p.dtype, &blocks_per_sm, &clusters);
  if (err != cudaSuccess) return err;

  // Split each (row, head)'s keys over `splits` blocks (a cluster, sm_90+) while twice as many blocks
  // still fill at most EET_DECODE_SPLIT_FILL percent of the resident blocks of kSplitWarps warps and a
  // full cache still gives every block at least EET_DECODE_MIN_SPLIT_KEYS keys. A row's valid range
  // [pad, step] is known on the device only (each block takes an even share of it there); max_len
  // bounds it. (H100, fp16, head_dim 64, forced splits 1 / 2 / 4 / 8: 32 rows x 12 heads of 1024
  // keys 23.7 / 27.8 / 31.1 / 42.4 us, so none; 4 rows x 16 heads of a 2048 cache 17.6 / 18.1 /
  // 16.9 / 19.8 us: 4; 2 x 12 heads of 8192 keys 41.2 / 38.5 / 26.9 / 24.9 us: 8. This rule picks
  // those: 4 resident blocks per multiprocessor, 528 on the H100.)
  const int64_t pairs = static_cast<int64_t>(p.batch) * p.num_heads;
  const int64_t slots = static_cast<int64_t>(sms) * blocks_per_sm;
  // Without clusters (before sm_90; on sm_90 too when EET_DECODE_SPLIT_MODE=workspace asks to
  // behave so, for tests of that path) the split needs the caller's workspace; without one, no split.
  const char* mode = getenv("EET_DECODE_SPLIT_MODE");
  if (mode != nullptr && strcmp(mode, "workspace") == 0) clusters = false;
  const bool via_ws = !clusters && p.workspace != nullptr &&
                      p.workspace_bytes >= eet_prepad_attention_workspace_size(p.batch, p.num_heads, D);
  int splits = 1;
  while ((clusters || via_ws) && splits < Cfg::kMaxSplits &&
         100 * pairs * (2 * splits) <= static_cast<int64_t>(EET_DECODE_SPLIT_FILL) * slots &&
         p.max_len / (2 * splits) >= EET_DECODE_MIN_SPLIT_KEYS) {
    splits *= 2;
  }
#ifdef EET_DECODE_TUNING  // benchmarking builds only: EET_DECODE_SPLITS=n forces n splits
  if (const char* env = getenv("EET_DECODE_SPLITS")) {
    const int forced = atoi(env);
    if (forced >= 1 && forced <= Cfg::kMaxSplits && (clusters || via_ws || forced == 1)) splits = forced;
  }
#endif
  // kSplitWarps warps per block for split launches and grids that fill the GPU, else kMaxWarps;
  // never more warps than the keys of a full cache need.
  int warps = (splits > 1 || pairs >= 2 * static_cast<int64_t>(sms)) ? Cfg::kSplitWarps
                                                                       : Cfg::kMaxWarps;
#ifdef EET_DECODE_TUNING  // benchmarking builds only: EET_DECODE_WARPS=n forces n warps per block
  if (const char* env = getenv("EET_DECODE_WARPS")) {
    const int forced = atoi(env);
    if (forced >= 1 && forced <= Cfg::kMaxWarps) warps = forced;
  }
#endif
  const int64_t block_keys = (static_cast<int64_t>(p.max_len) + splits - 1) / splits;
  const int64_t useful = (block_keys + Cfg::kKeysPerWarp - 1) / Cfg::kKeysPerWarp;  // >= 1
  if (useful < warps) warps = static_cast<int>(useful);

  const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(p.num_heads),
                  static_cast<unsigned>(p.batch < 65535 ? p.batch : 65535));
  // Cache keys stream through the shared-memory ring when the caches allow 16-byte accesses: two
  // stages per warp, kStages when the rows are split over 4 or more blocks (few rows: each warp has
  // few iterations, and keeping them all in flight pays). H100, fp16, head_dim 64, stages 2 / 3 / 4
  // (compile-time stage counts of a trial build): 32 rows x 12 heads of 513 keys 23.4 / 24.2 / 23.7 us,
  // of up to 1024 keys 34.2 / 34.8 / 35.4 us. EET_DECODE_PIPE=0: the register path (tests and benchmarks only).
  PrepadArgs args = a;
  const char* pipe_env = getenv("EET_DECODE_PIPE");
  const bool use_ring = a.attention_vec != 0 && !(pipe_env != nullptr && strcmp(pipe_env, "0") == 0);
  args.decode_pipe = use_ring ? (splits >= 4 ? Cfg::kStages : 2) : 0;
  if (static_cast<int64_t>(warps) * args.decode_pipe * Cfg::kStageBytesPerWarp > Cfg::kRingBytesMax) {
    args.decode_pipe = 2;  // only a forced warp count (EET_DECODE_WARPS, tuning builds) gets here
  }
  const size_t ring = static_cast<size_t>(warps) * args.decode_pipe * Cfg::kStageBytesPerWarp;
  if (ring > 0) {  // static and dynamic shared memory together may pass 48 KB: the largest ring launched
    static std::atomic<uint64_t> configured{0}, configured_ws{0};
    err = via_ws ? allow_dynamic_smem(prepad_decode_kernel<T, D, true>, Cfg::kRingBytesMax, D, configured_ws)
                 : allow_dynamic_smem(kernel, Cfg::kRingBytesMax, D, configured);
    if (err != cudaSuccess) return err;
  }
  if (splits == 1) {
    kernel<<<grid, 32 * warps, ring, stream>>>(args, nullptr);
    err = cudaGetLastError();
  } else if (via_ws) {  // independent blocks, then the merge
    float* ws = static_cast<float*>(p.workspace);
    prepad_decode_kernel<T, D, true><<<grid, 32 * warps, ring, stream>>>(args, ws);
    err = cudaGetLastError();
    if (err == cudaSuccess) {
      const dim3 merge_grid(static_cast<unsigned>(p.num_heads),
                            static_cast<unsigned>(p.batch < 65535 ? p.batch : 65535));
      prepad_decode_merge_kernel<T, D><<<merge_grid, D / 4, 0, stream>>>(a, ws, splits);
      err = cudaGetLastError();
    }
  } else {
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = dim3(static_cast<unsigned>(32 * warps), 1, 1);
    config.dynamicSmemBytes = ring;
    config.stream = stream;
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = static_cast<unsigned>(splits);
    attribute[0].val.clusterDim.y = 1;
    attribute[0].val.clusterDim.z = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
    err = cudaLaunchKernelEx(&config, kernel, args, static_cast<float*>(nullptr));
    const cudaError_t last = cudaGetLastError();
    if (err == cudaSuccess) err = last;
  }
  if (err != cudaSuccess) return fail(err, launch_failure("decode kernel", p.dtype, D, err));
  return cudaSuccess;
}

template <typename T, int D, bool kTensorCores>
cudaError_t launch_prepad(const EetPrepadAttentionParams& p, cudaStream_t stream) {
  PrepadArgs a;
  a.q = p.q;
  a.k = p.k;
  a.v = p.v;
  a.out = p.out;
  a.k_cache = p.k_cache;
  a.v_cache = p.v_cache;
  a.pad_lengths = p.pad_lengths;
  a.step = p.step;
  a.q_stride = p.q_row_stride;
  a.k_stride = p.k_row_stride;
  a.v_stride = p.v_row_stride;
  a.o_stride = p.out_row_stride;
  a.batch = p.batch;
  a.seq = p.seq;
  a.num_heads = p.num_heads;
  a.max_len = p.max_len;
  a.scale_log2 = p.scale * 1.4426950408889634f;
  // Cache rows are head_dim elements, a whole number of 16-byte vectors: only the base pointers of
  // the caches matter.
  constexpr int64_t kVecElems = VecTraits<T>::kElems;
  static_assert(D % kVecElems == 0, "cache rows must be whole 16-byte vectors");
  const bool caches = aligned16(p.k_cache) && aligned16(p.v_cache);
  a.append_vec = caches && aligned16(p.k) && aligned16(p.v) && p.k_row_stride % kVecElems == 0 &&
                 p.v_row_stride % kVecElems == 0;
  a.attention_vec = caches && aligned16(p.q) && aligned16(p.out) &&
                    p.q_row_stride % kVecElems == 0 && p.out_row_stride % kVecElems == 0;
  a.decode_pipe = 0;  // launch_decode decides

  // Decode: one kernel appends the new key and value and attends (reading them from k and v).
  if (p.seq == 1) return launch_decode<T, D>(p, a, stream);

  // fp32: 1. append the new keys and values; 2. attention over the caches (stream order puts it after
  // the append). fp16: one kernel appends and attends (each block appends its own query tile).
  if constexpr (!kTensorCores) {
    const dim3 append_grid(static_cast<unsigned>(p.seq),
                           static_cast<unsigned>(p.batch < 65535 ? p.batch : 65535));
    prepad_append_kernel<T, D><<<append_grid, kAppendThreads, 0, stream>>>(a);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return fail(err, launch_failure("append kernel", p.dtype, D, err));
  }
  return launch_context<T, D, kTensorCores>(p, a, stream);
}

// a * b * ... fits int64_t (all factors >= 0).
bool product_fits(std::initializer_list<int64_t> factors) {
  int64_t acc = 1;
  for (const int64_t f : factors) {
    if (__builtin_mul_overflow(acc, f, &acc)) return false;
  }
  return true;
}

// Checks everything without touching the CUDA runtime, so that it is safe without a GPU.
// Order: dtype/head_dim, sizes, strides, index ranges; seq == 0 then succeeds (pointers may be NULL
// for empty tensors); then the pointers.
cudaError_t validate(const EetPrepadAttentionParams& p, bool* nothing_to_do) {
  *nothing_to_do = false;
  if (!PrepadTable::dtype_known(p.dtype)) {
    return invalid("dtype " + std::to_string(p.dtype) + " is not supported (supported dtypes: " +
                   PrepadTable::supported_dtypes() + ")");
  }
  if (!PrepadTable::dispatch(p.dtype, p.head_dim, [](auto) {})) {
    return invalid("head_dim " + std::to_string(p.head_dim) + " is not supported for dtype " +
                   PrepadTable::dtype_name(p.dtype) + " (supported head_dim: " +
                   PrepadTable::supported_head_dims(p.dtype) + ")");
  }
  if (p.batch < 1) return invalid("batch must be >= 1, got " + std::to_string(p.batch));
  if (p.num_heads < 1) {
    return invalid("num_heads must be >= 1, got " + std::to_string(p.num_heads));
  }
  if (p.num_heads > 65535) {
    return invalid("num_heads must be <= 65535 (one grid dimension), got " +
                   std::to_string(p.num_heads));
  }
  if (p.max_len < 1) return invalid("max_len must be >= 1, got " + std::to_string(p.max_len));
  if (p.seq < 0) return invalid("seq must be >= 0, got " + std::to_string(p.seq));
  if (p.seq > p.max_len) {
    return invalid("seq (" + std::to_string(p.seq) + ") must be <= max_len (" +
                   std::to_string(p.max_len) + "): the new tokens must fit in the cache");
  }
  if (!std::isfinite(p.scale)) {
    return invalid("scale must be finite, got " + std::to_string(p.scale));
  }
  const int64_t row = static_cast<int64_t>(p.num_heads) * p.head_dim;
  const struct {
    const char* name;
    int64_t value;
  } strides[] = {{"q_row_stride", p.q_row_stride},
                 {"k_row_stride", p.k_row_stride},
                 {"v_row_stride", p.v_row_stride},
                 {"out_row_stride", p.out_row_stride}};
  for (const auto& s : strides) {
    if (s.value < row) {
      return invalid(std::string(s.name) + " (" + std::to_string(s.value) +
                     " elements) must be >= num_heads * head_dim (" + std::to_string(row) + ")");
    }
    if (!product_fits({p.batch, p.seq, s.value, 4})) {
      return invalid(std::string(s.name) + " (" + std::to_string(s.value) +
                     ") times batch * seq overflows 64-bit byte offsets");
    }
  }
  if (!product_fits({p.batch, p.num_heads, p.max_len, p.head_dim, 4})) {
    return invalid("the caches (batch * num_heads * max_len * head_dim = " +
                   std::to_string(p.batch) + " * " + std::to_string(p.num_heads) + " * " +
                   std::to_string(p.max_len) + " * " + std::to_string(p.head_dim) +
                   ") overflow 64-bit byte offsets");
  }
  if (p.seq == 0) {
    *nothing_to_do = true;
    return cudaSuccess;
  }
  const struct {
    const char* name;
    const void* ptr;
  } pointers[] = {{"q", p.q},
                  {"k", p.k},
                  {"v", p.v},
                  {"out", p.out},
                  {"k_cache", p.k_cache},
                  {"v_cache", p.v_cache},
                  {"pad_lengths", p.pad_lengths},
                  {"step", p.step}};
  for (const auto& ptr : pointers) {
    if (ptr.ptr == nullptr) {
      return invalid(std::string(ptr.name) + " is NULL (seq = " + std::to_string(p.seq) + ")");
    }
  }
  if (p.workspace != nullptr && (!aligned16(p.workspace) || p.workspace_bytes < 0)) {
    return invalid("workspace must be 16-byte aligned with workspace_bytes >= 0 (got " +
                   std::to_string(p.workspace_bytes) + " bytes); pass NULL for none");
  }
  return cudaSuccess;
}

}  // namespace
}  // namespace eet

// Every call resets this thread's message; a call that fails sets it (for launch failures too, not
// only cudaErrorInvalidValue), so after a failing call eet_last_error_message() describes that call.
extern "C" cudaError_t eet_prepad_attention(const EetPrepadAttentionParams* params,
                                            cudaStream_t stream) {
  try {
    eet::clear_last_error();
    if (params == nullptr) return eet::invalid("params is NULL");
    const EetPrepadAttentionParams p = *params;
    bool nothing_to_do = false;
    cudaError_t err = eet::validate(p, &nothing_to_do);
    if (err != cudaSuccess || nothing_to_do) return err;
    err = cudaErrorInvalidValue;  // unreachable: validate() checked the pair against the same table
    eet::PrepadTable::dispatch(p.dtype, p.head_dim, [&](auto instance) {
      using Instance = decltype(instance);
      err = eet::launch_prepad<typename Instance::Element, Instance::kHeadDim,
                               Instance::kTensorCores>(p, stream);
    });
    return err;
  } catch (...) {  // std::string allocation failed: no exception may cross the C ABI
    return eet::out_of_host_memory();
  }
}

extern "C" int64_t eet_prepad_attention_workspace_size(int32_t batch, int32_t num_heads,
                                                       int32_t head_dim) {
  if (batch <= 0 || num_heads <= 0 || head_dim <= 0) return 0;
  // kMaxSplits states of (head_dim + 2) floats per (row, head); the same for every DecodeConfig
  constexpr int64_t kSplits = eet::DecodeConfig<float, 64>::kMaxSplits;
  return static_cast<int64_t>(batch) * num_heads * kSplits * (head_dim + 2) * 4;
}

extern "C" int eet_prepad_attention_supported(int32_t dtype, int32_t head_dim) {
  return eet::PrepadTable::dispatch(dtype, head_dim, [](auto) {}) ? 1 : 0;
}
