// The (dtype, head_dim) table of eet_varlen_attention: the ONE place that maps the runtime pair to a
// template instantiation. eet_varlen_attention (to launch), eet_varlen_attention_supported (to answer)
// and the error messages (to list what is supported) all go through it, so they cannot disagree.
//
// To build another head_dim, add it to EET_VARLEN_HEAD_DIMS (the kernel needs head_dim % 16 == 0);
// to build another element type, add it to EET_VARLEN_DTYPES (and give it a load/store overload in
// common.cuh).
#pragma once

#include <cuda_fp16.h>
#include <stdint.h>

#include <string>

#include "eet_attention.h"

// X(enum value, element type, short name)
#define EET_VARLEN_DTYPES(X)                \
  X(EET_DTYPE_FP32, float, "fp32")          \
  X(EET_DTYPE_FP16, __half, "fp16")

// X(head_dim)
#define EET_VARLEN_HEAD_DIMS(X) X(32) X(64) X(80) X(96) X(128)

namespace eet {

// The compile-time pair handed to a dispatch callback.
template <typename T, int HeadDim>
struct VarlenInstance {
  using Element = T;
  static constexpr int kHeadDim = HeadDim;
};

// The head_dim half of dispatch_varlen (use dispatch_varlen, not this).
template <typename T, typename F>
inline bool dispatch_varlen_head_dim(int32_t head_dim, F& f) {
  switch (head_dim) {
#define EET_VARLEN_HEAD_DIM_CASE(HD)   \
  case HD:                             \
    f(VarlenInstance<T, HD>{});        \
    return true;
    EET_VARLEN_HEAD_DIMS(EET_VARLEN_HEAD_DIM_CASE)
#undef EET_VARLEN_HEAD_DIM_CASE
    default:
      return false;
  }
}

// Calls f(VarlenInstance<T, head_dim>{}) and returns true when (dtype, head_dim) is in the table
// (every dtype of EET_VARLEN_DTYPES x every head_dim of EET_VARLEN_HEAD_DIMS); returns false and calls
// nothing otherwise.
template <typename F>
inline bool dispatch_varlen(int32_t dtype, int32_t head_dim, F&& f) {
  switch (dtype) {
#define EET_VARLEN_DTYPE_CASE(DTYPE, TYPE, NAME) \
  case DTYPE:                                    \
    return dispatch_varlen_head_dim<TYPE>(head_dim, f);
    EET_VARLEN_DTYPES(EET_VARLEN_DTYPE_CASE)
#undef EET_VARLEN_DTYPE_CASE
    default:
      return false;
  }
}

// True when dispatch_varlen knows `dtype` for at least one head_dim.
inline bool varlen_dtype_known(int32_t dtype) {
  bool known = false;
#define EET_VARLEN_PROBE_HEAD_DIM(HD) known = known || dispatch_varlen(dtype, HD, [](auto) {});
  EET_VARLEN_HEAD_DIMS(EET_VARLEN_PROBE_HEAD_DIM)
#undef EET_VARLEN_PROBE_HEAD_DIM
  return known;
}

// "0 (fp32), 1 (fp16)"
inline std::string varlen_supported_dtypes() {
  std::string s;
#define EET_VARLEN_DTYPE_NAME(DTYPE, TYPE, NAME)                                   \
  s += (s.empty() ? "" : ", ") + std::to_string(static_cast<int>(DTYPE)) + " (" + \
       NAME + ")";
  EET_VARLEN_DTYPES(EET_VARLEN_DTYPE_NAME)
#undef EET_VARLEN_DTYPE_NAME
  return s;
}

// The short name of a known dtype ("fp16"), or its number.
inline std::string varlen_dtype_name(int32_t dtype) {
#define EET_VARLEN_DTYPE_NAME_CASE(DTYPE, TYPE, NAME) \
  if (dtype == static_cast<int32_t>(DTYPE)) return NAME;
  EET_VARLEN_DTYPES(EET_VARLEN_DTYPE_NAME_CASE)
#undef EET_VARLEN_DTYPE_NAME_CASE
  return std::to_string(dtype);
}

// "32, 64, 80" : the head dims built for `dtype`.
inline std::string varlen_supported_head_dims(int32_t dtype) {
  std::string s;
#define EET_VARLEN_HEAD_DIM_NAME(HD) \
  if (dispatch_varlen(dtype, HD, [](auto) {})) s += (s.empty() ? "" : ", ") + std::to_string(HD);
  EET_VARLEN_HEAD_DIMS(EET_VARLEN_HEAD_DIM_NAME)
#undef EET_VARLEN_HEAD_DIM_NAME
  return s;
}

}  // namespace eet
