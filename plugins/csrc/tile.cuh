// Shared by the tiled attention kernels (varlen_attention.cu, prepad_attention.cu): the tile geometry and
// the global -> shared-memory tile loader.
#pragma once

#include <stdint.h>

#include "common.cuh"

namespace eet {

template <int D>
struct AttentionTile {
  static constexpr int kThreads = 128;
  static constexpr int kBlockM = 64;                     // query rows per block
  static constexpr int kBlockN = 32;                     // keys per shared-memory tile
  static constexpr int kQuads = kThreads / 4;            // groups of 4 adjacent lanes
  static constexpr int kRows = kBlockM / kQuads;         // query rows per thread (2)
  static constexpr int kKeys = kBlockN / 4;              // keys per thread per tile (8)
  static constexpr int kChunks = D / 16;                 // float4 output chunks per thread and row
  static constexpr int kLd = D + 4;                      // row stride (floats) of the Q, K, V tiles
  static constexpr int kLdP = kBlockN + 4;               // row stride (floats) of the P tile
  static constexpr int kSmemFloats = (kBlockM + 2 * kBlockN) * kLd + kBlockM * kLdP;
  static constexpr size_t kSmemBytes = static_cast<size_t>(kSmemFloats) * sizeof(float);

  static_assert(D % 16 == 0, "head_dim must be a multiple of 16");
  static_assert(kRows == 2, "the kernel is written for 2 query rows per thread");
  static_assert(kBlockN % 4 == 0 && kLd % 4 == 0 && kLdP % 4 == 0, "float4 alignment");
};

// Loads rows [0, valid_rows) of a ROWS x D tile (row r at src + r * stride) into dst (row stride ld,
// fp32), multiplied by mul; rows [valid_rows, ROWS) are zero-filled and not read.
template <typename T, int D, int ROWS, int THREADS>
__device__ __forceinline__ void load_tile(const T* __restrict__ src, int64_t stride, int valid_rows,
                                          float mul, bool vectorized, float* __restrict__ dst,
                                          int ld) {
  if (vectorized) {
    constexpr int E = VecTraits<T>::kElems;
    constexpr int VPR = D / E;  // vectors per row
    static_assert(D % E == 0, "head_dim must fill whole 16-byte vectors");
    for (int i = threadIdx.x; i < ROWS * VPR; i += THREADS) {
      const int r = i / VPR;
      const int c = (i - r * VPR) * E;
      float f[E];
      if (r < valid_rows) {
        load16(src + r * stride + c, f);
#pragma unroll
        for (int e = 0; e < E; ++e) f[e] *= mul;
      } else {
#pragma unroll
        for (int e = 0; e < E; ++e) f[e] = 0.f;
      }
      float* d = dst + r * ld + c;
#pragma unroll
      for (int e = 0; e < E; e += 4) {
        *reinterpret_cast<float4*>(d + e) = make_float4(f[e], f[e + 1], f[e + 2], f[e + 3]);
      }
    }
  } else {
    for (int i = threadIdx.x; i < ROWS * D; i += THREADS) {
      const int r = i / D;
      const int c = i - r * D;
      dst[r * ld + c] = r < valid_rows ? to_float(src[r * stride + c]) * mul : 0.f;
    }
  }
}

}  // namespace eet
