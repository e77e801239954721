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
// (Implementation: every eet_varlen_attention / eet_prepad_attention call resets it to ""; a call that
// fails with any code, a launch failure included, sets it. The pointer stays valid until the next call
// on this thread.)
EET_API const char* eet_last_error_message(void);

// Version of this library's ABI; bumped when a parameter struct changes or is added (2: the pre-padding
// attention below; 3: its decode workspace, EetPrepadAttentionParams.workspace).
EET_API int32_t eet_abi_version(void);

// Pre-padding attention for GPT-2 style generation with a KV cache (EET). Prompts are left-padded so
// that all sequences of a batch decode at the same step: row b's first pad_lengths[b] cache positions
// are padding, and the keys there cost nothing (they are skipped, not masked).
//
// Let s = *step (read on the device, so a captured CUDA graph picks up a new step). For every row b,
// head h and new token i in [0, seq), at cache position p = s + i:
//   1. the new key/value is written to the caches, for every row (padded positions too):
//        k_cache[b, h, p, :] = k[b, i, h, :],   v_cache[b, h, p, :] = v[b, i, h, :];
//   2. out[b, i, h, :] = sum over j in [pad_lengths[b], p] of
//                          softmax_j(scale * q[b, i, h, :] . k_cache[b, h, j, :]) v_cache[b, h, j, :]
//      (causal within the row). Keys j < pad_lengths[b] are never read; if pad_lengths[b] > p the
//      output row is all zeros (finite, never NaN).
// Cache positions past s + seq - 1 are never read; cache entries outside [s, s + seq) are never
// written. Context phase: seq = prompt length, s = 0. Decode phase: seq = 1, s = tokens so far.
// Softmax statistics and accumulation are fp32 whatever the element type.
//
// The caller guarantees 0 <= s, s + seq <= max_len and 0 <= pad_lengths[b]. If these are violated the
// kernels still stay in bounds: a negative pad length counts as 0, and a token whose position lies
// outside [0, max_len) is neither appended nor attended to (its output row is all zeros).
// Decode calls (seq == 1) and fp16 context calls run one kernel that appends and attends (it reads the
// new keys and values from k and v; a workspace split adds a merge kernel); fp32 context calls append
// in one kernel and attend in a second one, on the same stream.
// The caches must not alias q, k, v or out.
typedef struct EetPrepadAttentionParams {
  const void* q;               // [batch, seq, num_heads, head_dim]: element (b, i, h, d) at
                               // q[(b * seq + i) * q_row_stride + h * head_dim + d]
  const void* k;               // new keys, same layout, row stride k_row_stride
  const void* v;               // new values, same layout, row stride v_row_stride
  void* out;                   // [batch, seq, num_heads, head_dim], row stride out_row_stride
  void* k_cache;               // [batch, num_heads, max_len, head_dim], contiguous, updated in place
  void* v_cache;               // [batch, num_heads, max_len, head_dim], contiguous, updated in place
  const int32_t* pad_lengths;  // [batch] on the device: row b's first pad_lengths[b] cache positions
                               // are padding
  const int32_t* step;         // [1] on the device: cache position of the first new token (same for
                               // all rows)
  int64_t q_row_stride;        // elements between consecutive tokens (Q, K, V may be column slices
  int64_t k_row_stride;        // of one fused [batch, seq, 3 * num_heads * head_dim] tensor)
  int64_t v_row_stride;
  int64_t out_row_stride;
  int32_t batch;               // >= 1
  int32_t seq;                 // new tokens per row, 0 <= seq <= max_len (0: nothing to do)
  int32_t num_heads;           // >= 1
  int32_t head_dim;            // 32, 64, 80, 96 or 128
  int32_t max_len;             // cache capacity in tokens, >= 1
  float scale;                 // softmax scale, usually 1/sqrt(head_dim)
  int32_t dtype;               // EetDtype (Q, K, V, out and both caches)
  void* workspace;             // decode (seq == 1) without thread-block clusters (before sm_90):
                               // scratch that lets a long row's keys be split over several blocks
                               // (their softmax states go here, a second kernel merges them);
                               // 16-byte aligned, or NULL (no split there). Written and read within
                               // the call only. On sm_90+ the split uses clusters and no workspace.
  int64_t workspace_bytes;     // its size: a split needs eet_prepad_attention_workspace_size() bytes
} EetPrepadAttentionParams;

EET_API cudaError_t eet_prepad_attention(const EetPrepadAttentionParams* params, cudaStream_t stream);

// 1 when eet_prepad_attention is built for (dtype, head_dim), else 0.
EET_API int eet_prepad_attention_supported(int32_t dtype, int32_t head_dim);

// Bytes of workspace the decode split may use: batch * num_heads * 8 * (head_dim + 2) * 4 (8 splits of
// a (row, head), each an fp32 O of head_dim plus its max and denominator); 0 for a non-positive argument.
EET_API int64_t eet_prepad_attention_workspace_size(int32_t batch, int32_t num_heads, int32_t head_dim);

#ifdef __cplusplus
}
#endif
