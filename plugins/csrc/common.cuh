// Device helpers shared by the EET kernels: element <-> fp32 conversion, 16-byte loads and small stores.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace eet {

// Elements per 16-byte vector.
template <typename T>
struct VecTraits {
  static constexpr int kElems = 16 / static_cast<int>(sizeof(T));
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// 16 bytes at p (16-byte aligned) -> kElems floats.
__device__ __forceinline__ void load16(const float* __restrict__ p, float (&f)[4]) {
  const float4 v = __ldg(reinterpret_cast<const float4*>(p));
  f[0] = v.x;
  f[1] = v.y;
  f[2] = v.z;
  f[3] = v.w;
}

__device__ __forceinline__ void load16(const __half* __restrict__ p, float (&f)[8]) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h;
    static_assert(sizeof(h) == sizeof(w[i]), "__half2 is 4 bytes");
    memcpy(&h, &w[i], sizeof(h));
    const float2 x = __half22float2(h);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}

// Four consecutive elements at p from fp32 values (round to nearest for fp16). With `aligned`, p is
// aligned to 4 elements and one vector store is used.
__device__ __forceinline__ void store4(float* __restrict__ p, float a, float b, float c, float d,
                                       bool aligned) {
  if (aligned) {
    *reinterpret_cast<float4*>(p) = make_float4(a, b, c, d);
  } else {
    p[0] = a;
    p[1] = b;
    p[2] = c;
    p[3] = d;
  }
}

__device__ __forceinline__ void store4(__half* __restrict__ p, float a, float b, float c, float d,
                                       bool aligned) {
  const __half2 lo = __floats2half2_rn(a, b);
  const __half2 hi = __floats2half2_rn(c, d);
  if (aligned) {
    uint2 u;
    memcpy(&u.x, &lo, sizeof(lo));
    memcpy(&u.y, &hi, sizeof(hi));
    *reinterpret_cast<uint2*>(p) = u;
  } else {
    p[0] = __low2half(lo);
    p[1] = __high2half(lo);
    p[2] = __low2half(hi);
    p[3] = __high2half(hi);
  }
}

// Component k (a compile-time constant after unrolling) of a float4.
__device__ __forceinline__ float f4_get(const float4& v, int k) {
  return k == 0 ? v.x : (k == 1 ? v.y : (k == 2 ? v.z : v.w));
}

}  // namespace eet
