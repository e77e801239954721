// Padding-free (variable-length) bidirectional attention: the eet_varlen_attention C ABI of
// eet_attention.h. Two kernel families, chosen per dtype by dispatch.h (DtypeX::kTensorCores):
//
// fp16: varlen_mma_kernel, tensor cores (mma.sync m16n8k16, fp32 accumulation; mma_attention.cuh).
//   grid  = (ceil(min(max_seqlen, total_tokens) / kBlockM), num_heads, min(batch, 65535)); kBlockM =
//           64 query rows, 16 per warp (4 warps), or 128, 32 per warp (4 warps; head_dim >= 80 and long
//           sequences), see launch_varlen_mma. Block (x, y, z) owns query rows [x kBlockM,
//           (x + 1) kBlockM) of head y of sequence b(z) against all keys of that sequence; blocks
//           whose tile starts past the sequence's end return at once. With batch <= kSortMax, b(z) is the z-th longest sequence,
//           so the blocks of long sequences (the most work per block) are dispatched first; otherwise
//           b(z) = z and blocks loop over batch in steps of gridDim.z.
//
// fp32: varlen_attention_kernel (CUDA cores, fp32 math), described below.
//   grid  = (ceil(min(max_seqlen, total_tokens) / kBlockM), num_heads, min(batch, 65535)); a block
//           loops over batch in steps of gridDim.z, so any batch size works.
//   block = 128 threads = 32 "quads" of 4 adjacent lanes. A block owns kBlockM = 64 query rows of one
//           (sequence, head); quad g owns rows g and g + 32 of that tile. Blocks whose tile starts at or
//           past the sequence's length do nothing.
//   Per key tile (kBlockN = 32 keys of the same sequence):
//     - K and V rows are loaded to shared memory as fp32 (rows past the sequence are zero-filled, never
//       read from global memory); Q was loaded once, pre-multiplied by scale * log2(e).
//     - S = Q K^T: thread t of a quad computes its 2 rows x 8 keys (keys t, t+4, ..., t+28).
//     - online softmax in the log2 domain: row max over the quad by two xor-shuffles, running max m and
//       (per-thread partial) running sum l, O rescaled by exp2(m_old - m_new); P goes to shared memory.
//     - O += P V: thread t of a quad owns its 2 rows x head_dim/4 output columns (float4 chunks
//       16c + 4t .. 16c + 4t + 3), accumulated in fp32 registers.
//   Finally l is summed over the quad and O / l is written in the element type, only for rows of the
//   sequence. Global memory outside the sequence's own rows [cu_seqlens[b], cu_seqlens[b+1]) (clamped
//   to [0, total_tokens)) is never read or written, nor are columns outside [h*D, (h+1)*D).
// Shared memory per block: (kBlockM + 2 kBlockN) (D + 4) + kBlockM (kBlockN + 4) floats
//   (27.6 KB at D = 32, 44 KB at D = 64, 76.8 KB at D = 128). The +4 pads make the float4 accesses
//   of a quarter warp hit distinct banks.
// Global accesses are 16-byte vectors when every pointer is 16-byte aligned and every row stride is a
// multiple of 16 bytes; otherwise a scalar path is used (same kernel, block-uniform branch).

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include <atomic>
#include <cmath>
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

// What the kernel reads; built from EetVarlenAttentionParams once validated.
struct VarlenArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  const int32_t* cu_seqlens;
  int64_t q_stride;
  int64_t k_stride;
  int64_t v_stride;
  int64_t o_stride;
  int32_t batch;
  int32_t total_tokens;
  float scale_log2;    // scale * log2(e): scores are kept in the log2 domain
  int32_t vectorized;  // 1: all pointers and row strides allow 16-byte accesses
};

template <typename T, int D>
__global__ void __launch_bounds__(AttentionTile<D>::kThreads)
    varlen_attention_kernel(const VarlenArgs args) {
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
  const int m0 = blockIdx.x * kBlockM;
  const int64_t head_off = static_cast<int64_t>(blockIdx.y) * D;
  const bool vec = args.vectorized != 0;
  const int total = args.total_tokens;

  for (int b = blockIdx.z; b < args.batch; b += gridDim.z) {
    // Clamp so that even inconsistent cu_seqlens never take us outside [0, total_tokens).
    int start = __ldg(args.cu_seqlens + b);
    int end = __ldg(args.cu_seqlens + b + 1);
    start = min(max(start, 0), total);
    end = min(max(end, start), total);
    const int len = end - start;
    if (m0 >= len) continue;  // block-uniform: no query row of this tile exists
    const int valid_m = min(kBlockM, len - m0);

    __syncthreads();  // the previous sequence of this block is done with shared memory
    {
      const T* q = static_cast<const T*>(args.q) +
                   static_cast<int64_t>(start + m0) * args.q_stride + head_off;
      load_tile<T, D, kBlockM, Tile::kThreads>(q, args.q_stride, valid_m, args.scale_log2, vec,
                                               q_s, kLd);
    }
    const T* k_seq = static_cast<const T*>(args.k) + static_cast<int64_t>(start) * args.k_stride +
                     head_off;
    const T* v_seq = static_cast<const T*>(args.v) + static_cast<int64_t>(start) * args.v_stride +
                     head_off;

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

    for (int n0 = 0; n0 < len; n0 += kBlockN) {
      const int valid_n = min(kBlockN, len - n0);  // >= 1
      __syncthreads();  // everyone is done with the previous K, V (and P) tile
      load_tile<T, D, kBlockN, Tile::kThreads>(k_seq + static_cast<int64_t>(n0) * args.k_stride,
                                               args.k_stride, valid_n, 1.f, vec, k_s, kLd);
      load_tile<T, D, kBlockN, Tile::kThreads>(v_seq + static_cast<int64_t>(n0) * args.v_stride,
                                               args.v_stride, valid_n, 1.f, vec, v_s, kLd);
      __syncthreads();  // K, V (and on the first tile Q) are in shared memory

      // S = Q K^T for rows[0..1] x keys {t, t + 4, ..., t + 4 (kKeys - 1)} (log2 domain).
      float s[2][kKeys];
#pragma unroll
      for (int j = 0; j < kKeys; ++j) s[0][j] = s[1][j] = 0.f;
      const float* q0 = q_s + rows[0] * kLd;
      const float* q1 = q_s + rows[1] * kLd;
      const float* kt = k_s + t * kLd;
#pragma unroll
      for (int d = 0; d < D; d += 4) {
        const float4 a = *reinterpret_cast<const float4*>(q0 + d);
        const float4 c = *reinterpret_cast<const float4*>(q1 + d);
#pragma unroll
        for (int j = 0; j < kKeys; ++j) {
          const float4 kv = *reinterpret_cast<const float4*>(kt + 4 * j * kLd + d);
          s[0][j] = fmaf(a.x, kv.x, s[0][j]);
          s[0][j] = fmaf(a.y, kv.y, s[0][j]);
          s[0][j] = fmaf(a.z, kv.z, s[0][j]);
          s[0][j] = fmaf(a.w, kv.w, s[0][j]);
          s[1][j] = fmaf(c.x, kv.x, s[1][j]);
          s[1][j] = fmaf(c.y, kv.y, s[1][j]);
          s[1][j] = fmaf(c.z, kv.z, s[1][j]);
          s[1][j] = fmaf(c.w, kv.w, s[1][j]);
        }
      }
      if (valid_n < kBlockN) {
#pragma unroll
        for (int j = 0; j < kKeys; ++j) {
          if (4 * j + t >= valid_n) s[0][j] = s[1][j] = -INFINITY;
        }
      }

      // Online softmax. Key 0 of the tile is valid, so each row's tile max (over the quad) is finite
      // and m_new is finite; on the first tile m = -inf and the rescale factor exp2(-inf) = 0.
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float mx = s[i][0];
#pragma unroll
        for (int j = 1; j < kKeys; ++j) mx = fmaxf(mx, s[i][j]);
        mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, 2));
        const float m_new = fmaxf(m[i], mx);
        const float rescale = exp2f(m[i] - m_new);
        m[i] = m_new;
#pragma unroll
        for (int c = 0; c < 4 * kChunks; ++c) o[i][c] *= rescale;
        float psum = 0.f;
        float* prow = p_s + rows[i] * kLdP + t;
#pragma unroll
        for (int j = 0; j < kKeys; ++j) {
          const float p = exp2f(s[i][j] - m_new);  // 0 for masked keys
          psum += p;
          prow[4 * j] = p;
        }
        l[i] = fmaf(l[i], rescale, psum);  // partial over this thread's keys; summed at the end
      }
      // A quad reads only the P rows it wrote itself, and a quad lives in one warp.
      __syncwarp();

      // O += P V over the valid keys (V rows past valid_n are zero and P is 0 there anyway).
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

    // Full softmax denominators (every lane takes part in the shuffles), then O / l for own rows.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      l[i] += __shfl_xor_sync(kFull, l[i], 1);
      l[i] += __shfl_xor_sync(kFull, l[i], 2);
    }
    T* out = static_cast<T*>(args.out) + static_cast<int64_t>(start + m0) * args.o_stride +
             head_off + 4 * t;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (rows[i] < valid_m) {
        const float inv = 1.f / l[i];  // l >= 1: the row max contributes exp2(0)
        T* dst = out + static_cast<int64_t>(rows[i]) * args.o_stride;
#pragma unroll
        for (int c = 0; c < kChunks; ++c) {
          store4(dst + 16 * c, o[i][4 * c] * inv, o[i][4 * c + 1] * inv, o[i][4 * c + 2] * inv,
                 o[i][4 * c + 3] * inv, vec);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// fp16: tensor-core kernel

constexpr int kSortMax = 64;  // longest-first block order for batches up to this size

template <int D, int BlockM, int WarpRows>
__global__ void __launch_bounds__(MmaTile<D, BlockM, WarpRows>::kThreads)
    varlen_mma_kernel(const VarlenArgs args) {
  using Cfg = MmaTile<D, BlockM, WarpRows>;
  static_assert(Cfg::kThreads >= kSortMax, "one thread per sequence when sorting");
  extern __shared__ uint4 smem_u4[];
  __half* const smem = reinterpret_cast<__half*>(smem_u4);

  const int m0 = blockIdx.x * BlockM;
  const int64_t head_off = static_cast<int64_t>(blockIdx.y) * D;
  const bool vec = args.vectorized != 0;
  const int total = args.total_tokens;
  const auto bounds = [&](int b, int* start, int* end) {
    // Clamp so that even inconsistent cu_seqlens never take us outside [0, total_tokens).
    int s0 = __ldg(args.cu_seqlens + b);
    int s1 = __ldg(args.cu_seqlens + b + 1);
    s0 = min(max(s0, 0), total);
    *start = s0;
    *end = min(max(s1, s0), total);
  };

  int b_first = blockIdx.z;
  int b_step = gridDim.z;
  if (args.batch <= kSortMax) {  // gridDim.z == batch: b(z) = the z-th longest sequence
    __shared__ int s_len[kSortMax];
    __shared__ int s_b;
    const int i = threadIdx.x;
    if (i < args.batch) {
      int s0, s1;
      bounds(i, &s0, &s1);
      s_len[i] = s1 - s0;
    }
    __syncthreads();
    if (i < args.batch) {
      const int li = s_len[i];
      int rank = 0;
      for (int j = 0; j < args.batch; ++j) {
        const int lj = s_len[j];
        rank += (lj > li || (lj == li && j < i)) ? 1 : 0;
      }
      if (rank == static_cast<int>(blockIdx.z)) s_b = i;  // ranks are a permutation
    }
    __syncthreads();
    b_first = s_b;
    b_step = args.batch;  // one sequence per block
  }

  for (int b = b_first; b < args.batch; b += b_step) {
    int start, end;
    bounds(b, &start, &end);
    const int len = end - start;
    if (m0 >= len) continue;  // block-uniform: no query row of this tile exists
    const int valid_m = min(BlockM, len - m0);
    __syncthreads();  // a previous sequence of this block is done with shared memory
    const __half* q = static_cast<const __half*>(args.q) +
                      static_cast<int64_t>(start + m0) * args.q_stride + head_off;
    const __half* k = static_cast<const __half*>(args.k) +
                      static_cast<int64_t>(start) * args.k_stride + head_off;
    const __half* v = static_cast<const __half*>(args.v) +
                      static_cast<int64_t>(start) * args.v_stride + head_off;
    __half* out = static_cast<__half*>(args.out) +
                  static_cast<int64_t>(start + m0) * args.o_stride + head_off;
    mma_attention_block<Cfg, D, false>(q, args.q_stride, valid_m,
                                       StridedKV{k, args.k_stride, v, args.v_stride}, 0, len, 0,
                                       args.scale_log2, vec, out, args.o_stride, 0, valid_m, smem);
  }
}

// ------------------------------------------------------------------------------------------------
// Host side

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

cudaError_t launch_failed(const EetVarlenAttentionParams& p, int head_dim, cudaError_t err) {
  return fail(err, "kernel launch failed (dtype " + varlen_dtype_name(p.dtype) + ", head_dim " +
                       std::to_string(head_dim) + "): " + cuda_error_text(err) +
                       "; this library holds code for CUDA architectures " +
                       EET_CUDA_ARCHITECTURES_STR);
}

template <int D, int BlockM, int WarpRows>
cudaError_t launch_varlen_mma_tile(const EetVarlenAttentionParams& p, const VarlenArgs& a,
                                   cudaStream_t stream) {
  using Cfg = MmaTile<D, BlockM, WarpRows>;
  const auto kernel = varlen_mma_kernel<D, BlockM, WarpRows>;
  static std::atomic<uint64_t> configured_devices{0};
  cudaError_t err = allow_dynamic_smem(kernel, Cfg::kSmemBytes, D, configured_devices);
  if (err != cudaSuccess) return err;
  // No sequence is longer than total_tokens, so the grid need not cover more query rows than that.
  const int64_t rows = p.max_seqlen < p.total_tokens ? p.max_seqlen : p.total_tokens;
  const dim3 grid(static_cast<unsigned>((rows + BlockM - 1) / BlockM),
                  static_cast<unsigned>(p.num_heads),
                  static_cast<unsigned>(p.batch < 65535 ? p.batch : 65535));
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(a);
  err = cudaGetLastError();
  return err == cudaSuccess ? err : launch_failed(p, D, err);
}

template <int D>
cudaError_t launch_varlen_mma(const EetVarlenAttentionParams& p, const VarlenArgs& a,
                              cudaStream_t stream) {
  // 128 query rows per block, 32 per warp (each K/V fragment feeds two m16 tiles, half the L2
  // traffic per query) for head_dim >= 80 and for long sequences; else 64 rows, 16 per warp (less
  // work lost to partial tiles of short sequences, more blocks per multiprocessor). Measured on
  // H100/H200, see mma_attention.cuh.
  int tile = mma_tile_override();
  if (tile == 0) tile = (D >= 80 || p.max_seqlen >= 1024) ? 3 : 1;
  return tile == 3 ? launch_varlen_mma_tile<D, 128, 32>(p, a, stream)
                   : launch_varlen_mma_tile<D, 64, 16>(p, a, stream);
}

template <typename T, int D>
cudaError_t launch_varlen_cuda_cores(const EetVarlenAttentionParams& p, const VarlenArgs& a,
                                     cudaStream_t stream) {
  using Tile = AttentionTile<D>;
  constexpr size_t kSmem = Tile::kSmemBytes;
  const auto kernel = varlen_attention_kernel<T, D>;
  static std::atomic<uint64_t> configured_devices{0};
  cudaError_t err = allow_dynamic_smem(kernel, kSmem, D, configured_devices);
  if (err != cudaSuccess) return err;

  // No sequence is longer than total_tokens, so the grid need not cover more query rows than that.
  const int64_t rows = p.max_seqlen < p.total_tokens ? p.max_seqlen : p.total_tokens;
  const dim3 grid(static_cast<unsigned>((rows + Tile::kBlockM - 1) / Tile::kBlockM),
                  static_cast<unsigned>(p.num_heads),
                  static_cast<unsigned>(p.batch < 65535 ? p.batch : 65535));
  kernel<<<grid, Tile::kThreads, kSmem, stream>>>(a);
  err = cudaGetLastError();
  return err == cudaSuccess ? err : launch_failed(p, D, err);
}

template <typename T, int D, bool kTensorCores>
cudaError_t launch_varlen(const EetVarlenAttentionParams& p, cudaStream_t stream) {
  VarlenArgs a;
  a.q = p.q;
  a.k = p.k;
  a.v = p.v;
  a.out = p.out;
  a.cu_seqlens = p.cu_seqlens;
  a.q_stride = p.q_row_stride;
  a.k_stride = p.k_row_stride;
  a.v_stride = p.v_row_stride;
  a.o_stride = p.out_row_stride;
  a.batch = p.batch;
  a.total_tokens = p.total_tokens;
  a.scale_log2 = p.scale * 1.4426950408889634f;
  constexpr int64_t kVecElems = VecTraits<T>::kElems;
  a.vectorized = aligned16(p.q) && aligned16(p.k) && aligned16(p.v) && aligned16(p.out) &&
                 p.q_row_stride % kVecElems == 0 && p.k_row_stride % kVecElems == 0 &&
                 p.v_row_stride % kVecElems == 0 && p.out_row_stride % kVecElems == 0;
  if constexpr (kTensorCores) {
    static_assert(sizeof(T) == 2, "the tensor-core kernels are fp16");
    return launch_varlen_mma<D>(p, a, stream);
  } else {
    return launch_varlen_cuda_cores<T, D>(p, a, stream);
  }
}

// Checks everything without touching the CUDA runtime, so that it is safe without a GPU.
// Order: dtype/head_dim, sizes, strides; total_tokens == 0 then succeeds (pointers may be NULL
// for empty tensors); then the pointers.
cudaError_t validate(const EetVarlenAttentionParams& p, bool* nothing_to_do) {
  *nothing_to_do = false;
  if (!varlen_dtype_known(p.dtype)) {
    return invalid("dtype " + std::to_string(p.dtype) +
                   " is not supported (supported dtypes: " + varlen_supported_dtypes() + ")");
  }
  if (!dispatch_varlen(p.dtype, p.head_dim, [](auto) {})) {
    return invalid("head_dim " + std::to_string(p.head_dim) + " is not supported for dtype " +
                   varlen_dtype_name(p.dtype) + " (supported head_dim: " +
                   varlen_supported_head_dims(p.dtype) + ")");
  }
  if (p.batch < 1) return invalid("batch must be >= 1, got " + std::to_string(p.batch));
  if (p.num_heads < 1) {
    return invalid("num_heads must be >= 1, got " + std::to_string(p.num_heads));
  }
  if (p.num_heads > 65535) {
    return invalid("num_heads must be <= 65535 (one grid dimension), got " +
                   std::to_string(p.num_heads));
  }
  if (p.max_seqlen < 1) {
    return invalid("max_seqlen must be >= 1, got " + std::to_string(p.max_seqlen));
  }
  if (p.total_tokens < 0) {
    return invalid("total_tokens must be >= 0, got " + std::to_string(p.total_tokens));
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
  }
  if (p.total_tokens == 0) {
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
                  {"cu_seqlens", p.cu_seqlens}};
  for (const auto& ptr : pointers) {
    if (ptr.ptr == nullptr) {
      return invalid(std::string(ptr.name) + " is NULL (total_tokens = " +
                     std::to_string(p.total_tokens) + ")");
    }
  }
  return cudaSuccess;
}

}  // namespace
}  // namespace eet

// Every call resets this thread's message; a call that fails sets it (for launch failures too, not
// only cudaErrorInvalidValue), so after a failing call eet_last_error_message() describes that call.
extern "C" cudaError_t eet_varlen_attention(const EetVarlenAttentionParams* params,
                                            cudaStream_t stream) {
  try {
    eet::clear_last_error();
    if (params == nullptr) return eet::invalid("params is NULL");
    const EetVarlenAttentionParams p = *params;
    bool nothing_to_do = false;
    cudaError_t err = eet::validate(p, &nothing_to_do);
    if (err != cudaSuccess || nothing_to_do) return err;
    err = cudaErrorInvalidValue;  // unreachable: validate() checked the pair against the same table
    eet::dispatch_varlen(p.dtype, p.head_dim, [&](auto instance) {
      using Instance = decltype(instance);
      err = eet::launch_varlen<typename Instance::Element, Instance::kHeadDim,
                               Instance::kTensorCores>(p, stream);
    });
    return err;
  } catch (...) {  // std::string allocation failed: no exception may cross the C ABI
    return eet::out_of_host_memory();
  }
}

extern "C" int eet_varlen_attention_supported(int32_t dtype, int32_t head_dim) {
  return eet::dispatch_varlen(dtype, head_dim, [](auto) {}) ? 1 : 0;
}

// eet_last_error_message() lives in errors.cu, with the message every launcher shares.

// 2: EetPrepadAttentionParams and eet_prepad_attention were added.
extern "C" int32_t eet_abi_version(void) { return 3; }
