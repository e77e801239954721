// fp16 tensor-core attention core (FlashAttention-2 style), shared by the padding-free varlen kernel
// (varlen_attention.cu) and the pre-padding context kernel (prepad_attention.cu). sm_80+ (mma.sync).
//
// One block owns kBlockM query rows of one (sequence, head): warp w owns kWarpRows (16 or 32: one or
// two m16 tiles) of them. Keys come in tiles of kBlockN rows:
//   - Q (once) and the K, V tiles are copied to shared memory with 16-byte cp.async (zero-filled past
//     the key range), K and V double-buffered: tile i + 1 is in flight while tile i is used.
//   - S = Q K^T with mma.sync.m16n8k16 (fp16 in, fp32 accumulate): Q fragments by ldmatrix (kept in
//     registers for the whole key loop), K fragments by ldmatrix.
//   - online softmax in registers, in the log2 domain (2^(S * scale * log2(e) - max): one FFMA and
//     one MUFU.EX2 per score, see softmax_exp2; a negative scale flips Q's sign instead); each
//     thread holds 2 rows per m16 tile (g and g + 8), row statistics are reduced over the 4 lanes of
//     a quad.
//   - P is converted to fp16 in registers and is directly the A operand of O += P V (the C fragment
//     layout of m16n8 pairs is the A fragment layout of m16k16), V fragments by ldmatrix.trans.
//   - O / l goes through the warp's own rows of the Q buffer to 16-byte global stores.
// Shared-memory rows are padded by 16 bytes (row stride D + 8 halves): the 8 row addresses of an
// ldmatrix phase and the 16-byte cp.async writes then hit distinct banks for every supported D.
// Unaligned inputs (a pointer or row stride that is not a multiple of 16 bytes) take a scalar load /
// store path in the same kernel (block-uniform branch); shared-memory layout and math are the same.
//
// Key masking: keys >= n_end are masked in the last tile (their K/V rows are zero-filled, never read);
// with kCausal, query row r (local) also masks keys j > causal_pos0 + r, and a warp skips a key tile
// that lies wholly above its rows. A row left without any key gets l = 0 and writes zeros (its running
// max -inf is taken as 0 for the exponentials, so nothing becomes NaN, even if its Q row is NaN).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <atomic>
#include <cstdlib>
#include <string>

#include "errors.h"

namespace eet {

// ------------------------------------------------------------------------------------------------
// PTX wrappers (sm_80+)

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1; with valid == false the 16 bytes are zero-filled and src
// is not read.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes)
               : "memory");
}
// An L2 cache policy that evicts the lines it tags first: for data read once and never again soon
// (a decode step's cache keys), so that streaming them does not push out what later kernels reuse.
__device__ __forceinline__ uint64_t l2_evict_first_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}
// cp_async16 with an L2 cache policy (l2_evict_first_policy).
__device__ __forceinline__ void cp_async16_hint(uint32_t dst, const void* src, bool valid, uint64_t policy) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(dst), "l"(src),
               "r"(bytes), "l"(policy)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c += a (16x16, row) * b (16x8, col); fp16 inputs, fp32 accumulators.
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 2^x with subnormal results flushed to zero (one MUFU.EX2; exp2f adds a range check and two
// multiplies for subnormal results). The softmax weights are 2^(s - max) <= 1: a weight below
// 2^-126 is far below what the fp32 row sum or the fp16 P can hold next to the row's weight of 1.
// exp2(-inf) = +0, exp2(NaN) = NaN.
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The softmax exponential of a tile: exp2_ftz, except in the 32-rows-per-warp tiles that sit at 255
// registers (head_dim 128; causal head_dim >= 64), where ptxas hoists the single-instruction
// exponentials far enough to spill (sm_90, nvcc 13.0); exp2f's range check keeps them in place.
template <bool kFast>
__device__ __forceinline__ float softmax_exp2(float x) {
  if constexpr (kFast) {
    return exp2_ftz(x);
  } else {
    return exp2f(x);
  }
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &h, sizeof(u));
  return u;
}

// ------------------------------------------------------------------------------------------------
// Geometry

// D: head dim; BlockM: query rows per block; WarpRows: query rows per warp (16 or 32: one or two
// m16 tiles, the second reuses every K and V fragment); BlockN: keys per tile.
template <int D, int BlockM, int WarpRows, int BlockN = 64>
struct MmaTile {
  static constexpr int kBlockM = BlockM;
  static constexpr int kWarpRows = WarpRows;
  static constexpr int kMTiles = WarpRows / 16;      // m16 tiles per warp
  static constexpr int kWarps = BlockM / WarpRows;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockN = BlockN;
  static constexpr int kLd = D + 8;                  // shared row stride in halves (16-byte pad)
  static constexpr int kChunks = D / 8;              // 16-byte chunks per row
  static constexpr int kQElems = kBlockM * kLd;
  static constexpr int kKVElems = kBlockN * kLd;     // one K or V buffer
  static constexpr size_t kSmemBytes =
      static_cast<size_t>(kQElems + 4 * kKVElems) * sizeof(__half);
  // Q fragments stay in registers for the whole key loop when they take at most 32 registers;
  // otherwise they are re-read from shared memory (ldmatrix) for every key tile.
  static constexpr bool kQInRegisters = kMTiles * (D / 16) * 4 <= 32;

  static_assert(D % 16 == 0, "head_dim must be a multiple of 16");
  static_assert(WarpRows == 16 || WarpRows == 32, "one or two m16 tiles per warp");
  static_assert(BlockM % WarpRows == 0 && kWarps >= 1, "whole warps");
  static_assert(kBlockN % 16 == 0, "key tiles of whole k-steps");
};

// ------------------------------------------------------------------------------------------------
// Rows a fixed stride apart: row r at p + r * stride.
struct StridedRows {
  const __half* p;
  int64_t stride;
  __device__ __forceinline__ const __half* operator()(int r) const { return p + r * stride; }
};

// Where the key / value rows of a key tile lie, for one source of rows a fixed stride apart (row j,
// absolute index, at k + j * k_stride; the varlen kernel). mma_attention_block takes any type with
// these two members (rows of the tile from key n0, as load_rows takes them); the pre-padding context
// kernel's type reads the cache below the step and the new tokens' rows from k / v.
struct StridedKV {
  const __half* k;
  int64_t k_stride;
  const __half* v;
  int64_t v_stride;
  __device__ __forceinline__ StridedRows k_tile(int n0) const {
    return {k + n0 * k_stride, k_stride};
  }
  __device__ __forceinline__ StridedRows v_tile(int n0) const {
    return {v + n0 * v_stride, v_stride};
  }
};

// Tile loads: rows [0, valid) of a ROWS x D tile (row r at row_ptr(r)) to shared memory (row stride
// LD halves); rows [valid, ROWS) are zero-filled and not read. vec: 16-byte cp.async (every row
// 16-byte aligned), else element by element.
template <int D, int ROWS, int LD, int THREADS, typename RowPtr>
__device__ __forceinline__ void load_rows(__half* dst, RowPtr row_ptr, int valid, bool vec) {
  constexpr int C = D / 8;
  if (vec) {
    const uint32_t base = smem_addr(dst);
    const __half* const any = row_ptr(0);  // a valid address for the zero-filled (unread) rows
    constexpr int kIters = (ROWS * C + THREADS - 1) / THREADS;
#pragma unroll
    for (int n = 0; n < kIters; ++n) {
      const int i = n * THREADS + static_cast<int>(threadIdx.x);
      if ((ROWS * C) % THREADS != 0 && i >= ROWS * C) break;
      const int r = i / C;
      const int c = i - r * C;
      const bool ok = r < valid;
      const __half* p = ok ? row_ptr(r) + c * 8 : any;
      cp_async16(base + static_cast<uint32_t>((r * LD + c * 8) * sizeof(__half)), p, ok);
    }
  } else {
    for (int i = threadIdx.x; i < ROWS * D; i += THREADS) {
      const int r = i / D;
      const int c = i - r * D;
      dst[r * LD + c] = r < valid ? row_ptr(r)[c] : __float2half(0.f);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// One block's attention (tile Cfg = MmaTile<D, ...>): kBlockM query rows against keys
// [n_start, n_end).
//
//   q, q_stride, valid_m   query rows [0, valid_m) (row r at q + r * q_stride); others are not read
//   kv                     where the key / value rows of a tile lie (StridedKV)
//   n_start, n_end         the keys (n_end <= n_start: none; every row then writes zeros)
//   causal_pos0            kCausal: row r sees key j only if j <= causal_pos0 + r
//   out, o_stride          row r at out + r * o_stride; rows [0, valid_m) are written, rows outside
//                          [row_lo, row_hi) and rows without any key as zeros
//   smem                   MmaTile::kSmemBytes of dynamic shared memory (16-byte aligned)
// Must be called by all threads of the block (it synchronizes); callers that run it more than once
// per block synchronize between calls.
template <typename Cfg, int D, bool kCausal, typename KV>
__device__ __forceinline__ void mma_attention_block(
    const __half* __restrict__ q, int64_t q_stride, int valid_m, const KV& kv, int n_start,
    int n_end, int causal_pos0, float scale_log2, bool vec, __half* __restrict__ out, int64_t o_stride,
    int row_lo, int row_hi, __half* smem) {
  constexpr int kBlockM = Cfg::kBlockM;
  constexpr int kBlockN = Cfg::kBlockN;
  constexpr int kLd = Cfg::kLd;
  constexpr int kThreads = Cfg::kThreads;
  constexpr int kWarpRows = Cfg::kWarpRows;
  constexpr int kMT = Cfg::kMTiles;
  constexpr bool kQRegs = Cfg::kQInRegisters;
  constexpr bool kFastExp = !(kMT == 2 && (D >= 128 || (kCausal && D >= 64)));
  constexpr int kKSteps = D / 16;       // k-steps of S = Q K^T
  constexpr int kNTiles = kBlockN / 8;  // 8-key column tiles of S
  constexpr int kDTiles = D / 8;        // 8-column tiles of O
  constexpr unsigned kFull = 0xffffffffu;

  __half* const q_s = smem;
  __half* const k_s = q_s + Cfg::kQElems;         // [2][kBlockN][kLd]
  __half* const v_s = k_s + 2 * Cfg::kKVElems;    // [2][kBlockN][kLd]

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;  // row within an 8-row half of an m16 tile
  const int t = lane & 3;   // column pair within an 8-column tile
  const int warp_row0 = warp * kWarpRows;  // the warp's first local query row

  float o[kMT][kDTiles][4];
  float m[kMT][2];
  float l[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int i = 0; i < kDTiles; ++i) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.f;
    m[mt][0] = m[mt][1] = -INFINITY;
    l[mt][0] = l[mt][1] = 0.f;
  }

  const int num_tiles = n_end > n_start ? (n_end - n_start + kBlockN - 1) / kBlockN : 0;
  if (num_tiles > 0) {
    const auto load_kv = [&](int tile, int buf) {
      const int n0 = n_start + tile * kBlockN;
      const int valid = min(kBlockN, n_end - n0);
      load_rows<D, kBlockN, kLd, kThreads>(
          k_s + buf * Cfg::kKVElems, kv.k_tile(n0), valid, vec);
      load_rows<D, kBlockN, kLd, kThreads>(
          v_s + buf * Cfg::kKVElems, kv.v_tile(n0), valid, vec);
    };
    load_rows<D, kBlockM, kLd, kThreads>(
        q_s, [&](int r) { return q + static_cast<int64_t>(r) * q_stride; }, valid_m, vec);
    load_kv(0, 0);
    cp_async_commit();

    // Per-lane ldmatrix offsets (halves). Q (A operand): matrices (rows 0-7 | 8-15) x (cols 0-7 |
    // 8-15); K (B operand, non-transposed): (keys 0-7, d 0-7 | 8-15), (keys 8-15, d 0-7 | 8-15);
    // V (B operand, transposed): (keys 0-7 | 8-15) x (d 0-7 | 8-15).
    const int q_off = (warp_row0 + (lane & 7) + 8 * ((lane >> 3) & 1)) * kLd + 8 * (lane >> 4);
    const int k_off = ((lane & 7) + 8 * (lane >> 4)) * kLd + 8 * ((lane >> 3) & 1);
    const int v_off = ((lane & 7) + 8 * ((lane >> 3) & 1)) * kLd + 8 * (lane >> 4);
    const uint32_t q_base = smem_addr(q_s) + q_off * sizeof(__half);
    const uint32_t k_base = smem_addr(k_s) + k_off * sizeof(__half);
    const uint32_t v_base = smem_addr(v_s) + v_off * sizeof(__half);
    constexpr uint32_t kBufBytes = Cfg::kKVElems * sizeof(__half);
    constexpr uint32_t kMTileBytes = 16 * kLd * sizeof(__half);

    uint32_t qf[kQRegs ? kMT : 1][kQRegs ? kKSteps : 1][4];
    // With Q in registers, scores are scaled inside the exponentials (one FFMA per element, as
    // FlashAttention-2). That needs a positive scale: a negative one flips the sign of Q's fp16
    // fragments instead (exact), a zero one becomes 1e-30 (finite scores then vanish against 1, as
    // with 0). Otherwise (Q re-read per tile, register-bound tiles) S is scaled before the softmax.
    constexpr bool kFusedScale = kQRegs;
    const uint32_t q_sign = kFusedScale && scale_log2 < 0.f ? 0x80008000u : 0u;
    const float scale = kFusedScale ? fmaxf(fabsf(scale_log2), 1e-30f) : 1.f;

    for (int it = 0; it < num_tiles; ++it) {
      const int buf = it & 1;
      if (it + 1 < num_tiles) load_kv(it + 1, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();  // everything but the tile just issued has landed
      __syncthreads();     // ... for every thread's copies (and the scalar stores)
      if (kQRegs && it == 0) {
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
          for (int ks = 0; ks < kKSteps; ++ks) {
            ldmatrix_x4(qf[kQRegs ? mt : 0][kQRegs ? ks : 0], q_base + mt * kMTileBytes + ks * 32);
#pragma unroll
            for (int r = 0; r < 4; ++r) qf[kQRegs ? mt : 0][kQRegs ? ks : 0][r] ^= q_sign;
          }
        }
      }
      const int n0 = n_start + it * kBlockN;
      // A warp whose rows all lie before the tile's first key has nothing to do (causal only).
      const bool active = !kCausal || n0 <= causal_pos0 + warp_row0 + kWarpRows - 1;
      if (active) {
        float s[kMT][kNTiles][4];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
          for (int i = 0; i < kNTiles; ++i) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.f;
        }
        const uint32_t kb = k_base + buf * kBufBytes;
#pragma unroll
        for (int ks = 0; ks < kKSteps; ++ks) {
          uint32_t qa[kMT][4];
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            if constexpr (kQRegs) {
#pragma unroll
              for (int r = 0; r < 4; ++r) qa[mt][r] = qf[kQRegs ? mt : 0][kQRegs ? ks : 0][r];
            } else {
              ldmatrix_x4(qa[mt], q_base + mt * kMTileBytes + ks * 32);
            }
          }
#pragma unroll
          for (int np = 0; np < kNTiles / 2; ++np) {
            uint32_t b[4];
            ldmatrix_x4(b, kb + (np * 16 * kLd + ks * 16) * sizeof(__half));
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt) {
              mma_16816(s[mt][2 * np], qa[mt], b[0], b[1]);
              mma_16816(s[mt][2 * np + 1], qa[mt], b[2], b[3]);
            }
          }
        }
        // Mask (with kFusedScale, scores stay unscaled until the exponentials). Element e of tile i
        // of m-tile mt: local row warp_row0 + 16 mt + g + 8 (e >> 1), key n0 + 8 i + 2 t + (e & 1).
        // The assignment also replaces a NaN from a NaN query row.
        const bool edge = n0 + kBlockN > n_end ||
                          (kCausal && n0 + kBlockN - 1 > causal_pos0 + warp_row0);
        if constexpr (!kFusedScale) {
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
            for (int i = 0; i < kNTiles; ++i) {
#pragma unroll
              for (int e = 0; e < 4; ++e) s[mt][i][e] *= scale_log2;
            }
          }
        }
        if (edge) {
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              // The row's last visible key, relative to this lane's first key n0 + 2 t.
              int last = n_end - 1;
              if (kCausal) last = min(last, causal_pos0 + warp_row0 + 16 * mt + g + 8 * r);
              const int rel = last - n0 - 2 * t;
#pragma unroll
              for (int i = 0; i < kNTiles; ++i) {
                if (8 * i > rel) s[mt][i][2 * r] = -INFINITY;
                if (8 * i + 1 > rel) s[mt][i][2 * r + 1] = -INFINITY;
              }
            }
          }
        }
        // Online softmax (rows g and g + 8 of each m-tile).
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          float mx[2] = {s[mt][0][0], s[mt][0][2]};
#pragma unroll
          for (int i = 0; i < kNTiles; ++i) {
            mx[0] = fmaxf(mx[0], fmaxf(s[mt][i][0], s[mt][i][1]));
            mx[1] = fmaxf(mx[1], fmaxf(s[mt][i][2], s[mt][i][3]));
          }
          float rescale[2];
          float m_use[2];
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(kFull, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(kFull, mx[r], 2));
            // log2 domain (-inf * scale = -inf)
            const float m_new = fmaxf(m[mt][r], mx[r] * scale);
            m_use[r] = m_new == -INFINITY ? 0.f : m_new;
            rescale[r] = softmax_exp2<kFastExp>(m[mt][r] - m_use[r]);  // 0 while m = -inf
            m[mt][r] = m_new;
          }
          float psum[2] = {0.f, 0.f};
#pragma unroll
          for (int i = 0; i < kNTiles; ++i) {
            // 0 for masked keys (-inf)
            s[mt][i][0] = softmax_exp2<kFastExp>(fmaf(s[mt][i][0], scale, -m_use[0]));
            s[mt][i][1] = softmax_exp2<kFastExp>(fmaf(s[mt][i][1], scale, -m_use[0]));
            s[mt][i][2] = softmax_exp2<kFastExp>(fmaf(s[mt][i][2], scale, -m_use[1]));
            s[mt][i][3] = softmax_exp2<kFastExp>(fmaf(s[mt][i][3], scale, -m_use[1]));
            psum[0] += s[mt][i][0] + s[mt][i][1];
            psum[1] += s[mt][i][2] + s[mt][i][3];
          }
#pragma unroll
          for (int r = 0; r < 2; ++r) l[mt][r] = fmaf(l[mt][r], rescale[r], psum[r]);  // per lane
#pragma unroll
          for (int i = 0; i < kDTiles; ++i) {
            o[mt][i][0] *= rescale[0];
            o[mt][i][1] *= rescale[0];
            o[mt][i][2] *= rescale[1];
            o[mt][i][3] *= rescale[1];
          }
        }
        // O += P V: P (fp16, registers) is the A operand, 16 keys per k-step; each V fragment
        // serves every m-tile of the warp.
        const uint32_t vb = v_base + buf * kBufBytes;
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
          uint32_t a[kMT][4];
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            a[mt][0] = pack_half2(s[mt][2 * kk][0], s[mt][2 * kk][1]);
            a[mt][1] = pack_half2(s[mt][2 * kk][2], s[mt][2 * kk][3]);
            a[mt][2] = pack_half2(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
            a[mt][3] = pack_half2(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
          }
#pragma unroll
          for (int dp = 0; dp < D / 16; ++dp) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, vb + (kk * 16 * kLd + dp * 16) * sizeof(__half));
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt) {
              mma_16816(o[mt][2 * dp], a[mt], b[0], b[1]);
              mma_16816(o[mt][2 * dp + 1], a[mt], b[2], b[3]);
            }
          }
        }
      }
      __syncthreads();  // everyone is done with buffer buf (and Q) before the next tile refills it
    }
  }

  // Epilogue: full row sums over the quad, O / l (zeros without a key or outside [row_lo, row_hi)),
  // staged in the warp's own rows of the Q buffer (only this warp ever read them), then 16-byte
  // stores of the rows [0, valid_m).
  __half* const o_s = q_s + warp_row0 * kLd;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float sum = l[mt][r];
      sum += __shfl_xor_sync(kFull, sum, 1);
      sum += __shfl_xor_sync(kFull, sum, 2);
      const int row = warp_row0 + 16 * mt + g + 8 * r;
      inv[r] = (sum > 0.f && row >= row_lo && row < row_hi) ? 1.f / sum : 0.f;
    }
#pragma unroll
    for (int i = 0; i < kDTiles; ++i) {
      *reinterpret_cast<__half2*>(o_s + (16 * mt + g) * kLd + 8 * i + 2 * t) =
          __floats2half2_rn(o[mt][i][0] * inv[0], o[mt][i][1] * inv[0]);
      *reinterpret_cast<__half2*>(o_s + (16 * mt + g + 8) * kLd + 8 * i + 2 * t) =
          __floats2half2_rn(o[mt][i][2] * inv[1], o[mt][i][3] * inv[1]);
    }
  }
  __syncwarp();
  constexpr int C = Cfg::kChunks;
  static_assert((kWarpRows * C) % 32 == 0, "whole output chunks per lane");
#pragma unroll
  for (int n = 0; n < kWarpRows * C / 32; ++n) {
    const int i = n * 32 + lane;
    const int r = i / C;
    const int c = i - r * C;
    const int row = warp_row0 + r;
    if (row < valid_m) {
      const uint4 x = *reinterpret_cast<const uint4*>(o_s + r * kLd + c * 8);
      __half* dst = out + row * o_stride + c * 8;
      if (vec) {
        *reinterpret_cast<uint4*>(dst) = x;
      } else {
        __half h[8];
        memcpy(h, &x, sizeof(h));
#pragma unroll
        for (int e = 0; e < 8; ++e) dst[e] = h[e];
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Host: opt a kernel in to `bytes` of dynamic shared memory, once per device (needed once its static
// and dynamic shared memory together pass 48 KB; done whatever the size, so kernels with static shared
// memory are covered too); the caller keeps one `configured_devices` bit set per kernel (a static of its
// launcher instantiation).
template <typename Kernel>
cudaError_t allow_dynamic_smem(Kernel kernel, size_t bytes, int head_dim,
                               std::atomic<uint64_t>& configured_devices) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return fail(err, "cudaGetDevice failed: " + cuda_error_text(err));
  const uint64_t bit = (device >= 0 && device < 64) ? (uint64_t{1} << device) : 0;
  if (bit != 0 && (configured_devices.load(std::memory_order_relaxed) & bit) != 0) {
    return cudaSuccess;
  }
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(bytes));
  if (err != cudaSuccess) {
    return fail(err, "cudaFuncSetAttribute(MaxDynamicSharedMemorySize, " + std::to_string(bytes) +
                         ") failed for head_dim " + std::to_string(head_dim) + ": " +
                         cuda_error_text(err));
  }
  configured_devices.fetch_or(bit, std::memory_order_relaxed);
  return cudaSuccess;
}

// Host: EET_MMA_TILE = "64x16" or "128x32" (query rows per block x per warp) forces the tile of the
// tensor-core kernels (for tuning and tests); unset or anything else: the launchers' own choice (0).
// Read once.
inline int mma_tile_override() {
  static const int value = [] {
    const char* env = std::getenv("EET_MMA_TILE");
    if (env == nullptr) return 0;
    const std::string v(env);
    return v == "64x16" ? 1 : v == "128x32" ? 3 : 0;
  }();
  return value;
}

}  // namespace eet
