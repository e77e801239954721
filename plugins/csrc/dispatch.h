// The (dtype, head_dim) tables of the attention ops: per op, the ONE place that maps the runtime pair
// to a template instantiation. An op's launcher (to launch), its *_supported function (to answer) and
// its error messages (to list what is supported) all go through the op's table, so they cannot
// disagree.
//
//   VarlenTable: eet_varlen_attention      PrepadTable: eet_prepad_attention
//
// To build another head_dim for an op, add it to that op's HeadDimList (the kernels need
// head_dim % 16 == 0); to build another element type, define its Dtype* entry below, add it to the
// op's DtypeList (and give it a load/store overload in common.cuh).
//
// A Dtype entry also picks the kernel family: kTensorCores = true runs the fp16 tensor-core kernels
// (mma_attention.cuh: varlen and pre-padding context attention), false the fp32-accumulating
// CUDA-core kernels (tile.cuh). The launchers branch on KernelInstance::kTensorCores at compile time,
// so only the chosen family is instantiated for a dtype.
#pragma once

#include <cuda_fp16.h>
#include <stdint.h>

#include <string>
#include <utility>

#include "eet_attention.h"

namespace eet {

// Element types: the EetDtype code, the C++ type and the short name used in messages.
struct DtypeFp32 {
  static constexpr int32_t kCode = EET_DTYPE_FP32;
  using Element = float;
  static constexpr const char* kName = "fp32";
  static constexpr bool kTensorCores = false;
};
struct DtypeFp16 {
  static constexpr int32_t kCode = EET_DTYPE_FP16;
  using Element = __half;
  static constexpr const char* kName = "fp16";
  static constexpr bool kTensorCores = true;  // mma.sync m16n8k16, fp32 accumulation
};

template <typename... Dtypes>
struct DtypeList {};
template <int... HeadDims>
struct HeadDimList {};

// The compile-time pair handed to a dispatch callback.
template <typename Dtype, int HeadDim>
struct KernelInstance {
  using Element = typename Dtype::Element;
  static constexpr int kHeadDim = HeadDim;
  static constexpr bool kTensorCores = Dtype::kTensorCores;
};
template <typename Dtype, int HeadDim>
using VarlenInstance = KernelInstance<Dtype, HeadDim>;

template <typename Dtypes, typename HeadDims>
struct DispatchTable;

// Every dtype of Dtypes x every head_dim of HeadDims.
template <typename... Dtypes, int... HeadDims>
struct DispatchTable<DtypeList<Dtypes...>, HeadDimList<HeadDims...>> {
  static_assert(sizeof...(Dtypes) > 0 && sizeof...(HeadDims) > 0, "empty dispatch table");
  static_assert(((HeadDims % 16 == 0 && HeadDims > 0) && ...), "head_dim must be a multiple of 16");

  // Calls f(KernelInstance<Dtype, head_dim>{}) and returns true when (dtype, head_dim) is in the table;
  // returns false and calls nothing otherwise.
  template <typename F>
  static bool dispatch(int32_t dtype, int32_t head_dim, F&& f) {
    bool found = false;
    (void)((dtype == Dtypes::kCode
                ? (found = dispatch_head_dim<Dtypes>(head_dim, f), true)
                : false) ||
           ...);
    return found;
  }

  // True when the table knows `dtype` (for at least one head_dim).
  static bool dtype_known(int32_t dtype) { return ((dtype == Dtypes::kCode) || ...); }

  // "0 (fp32), 1 (fp16)"
  static std::string supported_dtypes() {
    std::string s;
    ((s += (s.empty() ? "" : ", ") + std::to_string(Dtypes::kCode) + " (" + Dtypes::kName + ")"),
     ...);
    return s;
  }

  // The short name of a known dtype ("fp16"), or its number.
  static std::string dtype_name(int32_t dtype) {
    std::string s;
    (void)((dtype == Dtypes::kCode ? (s = Dtypes::kName, true) : false) || ...);
    return s.empty() ? std::to_string(dtype) : s;
  }

  // "32, 64, 80": the head dims built for `dtype` ("" for an unknown dtype).
  static std::string supported_head_dims(int32_t dtype) {
    std::string s;
    if (!dtype_known(dtype)) return s;
    ((s += (s.empty() ? "" : ", ") + std::to_string(HeadDims)), ...);
    return s;
  }

 private:
  template <typename Dtype, typename F>
  static bool dispatch_head_dim(int32_t head_dim, F& f) {
    return ((head_dim == HeadDims ? (f(KernelInstance<Dtype, HeadDims>{}), true) : false) || ...);
  }
};

// eet_varlen_attention
using VarlenTable = DispatchTable<DtypeList<DtypeFp32, DtypeFp16>, HeadDimList<32, 64, 80, 96, 128>>;

// eet_prepad_attention
using PrepadTable = DispatchTable<DtypeList<DtypeFp32, DtypeFp16>, HeadDimList<32, 64, 80, 96, 128>>;

// The varlen names used by varlen_attention.cu (thin forwards to VarlenTable).
template <typename F>
inline bool dispatch_varlen(int32_t dtype, int32_t head_dim, F&& f) {
  return VarlenTable::dispatch(dtype, head_dim, std::forward<F>(f));
}
inline bool varlen_dtype_known(int32_t dtype) { return VarlenTable::dtype_known(dtype); }
inline std::string varlen_supported_dtypes() { return VarlenTable::supported_dtypes(); }
inline std::string varlen_dtype_name(int32_t dtype) { return VarlenTable::dtype_name(dtype); }
inline std::string varlen_supported_head_dims(int32_t dtype) {
  return VarlenTable::supported_head_dims(dtype);
}

}  // namespace eet
