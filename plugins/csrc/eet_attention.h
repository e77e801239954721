// EET attention kernels: a plain C ABI, independent of TensorRT.
//
// Every launcher takes a parameter struct and a CUDA stream and returns a cudaError_t:
//   cudaSuccess             the kernel was launched (errors inside the kernel surface on the stream);
//   cudaErrorInvalidValue   the parameters are invalid or the (dtype, head_dim) combination is not built;
//                           eet_last_error_message() then names the problem;
//   anything else           the launch itself failed (cudaGetLastError after the launch).
#pragma once
#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define EET_API __declspec(dllexport)
#else
#define EET_API __attribute__((visibility("default")))
#endif

// Element types of Q, K, V and the output (all four share one type).
typedef enum EetDtype { EET_DTYPE_FP32 = 0, EET_DTYPE_FP16 = 1 } EetDtype;

// Padding-free (variable-length) bidirectional attention for BERT.
// Sequences are packed back to back: sequence b owns token rows [cu_seqlens[b], cu_seqlens[b+1]).
// A token row of Q/K/V holds num_heads * head_dim elements, head-major: element (t, h, d) lives at
// ptr[t * row_stride + h * head_dim + d]. Row strides are in elements and let Q, K, V be column slices
// of one fused [total_tokens, 3 * num_heads * head_dim] tensor.
typedef struct EetVarlenAttentionParams {
  const void* q;               // [total_tokens, num_heads, head_dim], row stride q_row_stride (elements)
  const void* k;               // [total_tokens, num_heads, head_dim], row stride k_row_stride
  const void* v;               // [total_tokens, num_heads, head_dim], row stride v_row_stride
  void* out;                   // [total_tokens, num_heads, head_dim], row stride out_row_stride
  const int32_t* cu_seqlens;   // [batch + 1] on the device, cu_seqlens[0] = 0, non-decreasing,
                               // cu_seqlens[batch] = total_tokens; every length <= max_seqlen
  int64_t q_row_stride;
  int64_t k_row_stride;
  int64_t v_row_stride;
  int64_t out_row_stride;
  int32_t batch;               // number of sequences, >= 1
  int32_t num_heads;           // >= 1
  int32_t head_dim;            // 32, 64, 80, 96 or 128
  int32_t max_seqlen;          // upper bound of every sequence length, >= 1 (sizes the grid)
  int32_t total_tokens;        // cu_seqlens[batch]
  float scale;                 // softmax scale, usually 1/sqrt(head_dim)
  int32_t dtype;               // EetDtype
} EetVarlenAttentionParams;

// out[t, h, :] = sum_j softmax_j(scale * q[t, h, :] . k[j, h, :]) v[j, h, :] over j in t's own sequence.
// Softmax statistics and accumulation are fp32 whatever the element type. Tokens of length-0 sequences
// do not exist; rows outside [0, total_tokens) are never touched.
EET_API cudaError_t eet_varlen_attention(const EetVarlenAttentionParams* params, cudaStream_t stream);

// 1 when eet_varlen_attention is built for (dtype, head_dim), else 0.
EET_API int eet_varlen_attention_supported(int32_t dtype, int32_t head_dim);

// A NUL-terminated description of the last cudaErrorInvalidValue returned on this thread ("" if none).
// (Implementation: every eet_varlen_attention call resets it to ""; a call that fails with any code,
// a launch failure included, sets it. The pointer stays valid until the next call on this thread.)
EET_API const char* eet_last_error_message(void);

// Version of this library's ABI; bumped when a parameter struct changes.
EET_API int32_t eet_abi_version(void);

#ifdef __cplusplus
}
#endif
