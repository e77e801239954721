// Experiment (not in the product; see step.py): prefetch part of a layer's valid KV ranges into L2 with
// cp.async.bulk.prefetch.L2 (sm_90), one thread per (row, head, warp share, K or V). Fire and forget: the
// kernel ends once the prefetches are issued.
#include <cuda_runtime.h>
#include <cstdint>
struct PfArgs {
  const char* kc; const char* vc; const int* pads; const int* step;
  int B, H, L, row_bytes; float frac; int warps; int where; int policy;
};
__global__ void kv_prefetch(PfArgs a) {
  int idx = blockIdx.x * blockDim.x + threadIdx.x;
  int total = a.B * a.H * a.warps * 2;
  if (idx >= total) return;
  int kv = idx & 1; int t = idx >> 1;
  int w = t % a.warps; t /= a.warps;
  int h = t % a.H; int b = t / a.H;
  int s = *a.step; int pad = max(a.pads[b], 0);
  int len = s - pad; if (len <= 0) return;
  int wlo = pad + (int)((long long)len * w / a.warps), whi = pad + (int)((long long)len * (w + 1) / a.warps);
  int lo, hi;
  if (a.where == 0) { int n = (int)ceilf((whi - wlo) * a.frac); lo = whi - n; hi = whi; }
  else if (a.where == 1) { int n = (int)ceilf((whi - wlo) * a.frac); lo = wlo; hi = wlo + n; }
  else { if (w) return; int n = (int)ceilf(len * a.frac); lo = pad; hi = pad + n; }
  if (lo >= hi) return;
  const char* base = (kv ? a.vc : a.kc) + ((size_t)(b * a.H + h) * a.L + lo) * a.row_bytes;
  size_t bytes = (size_t)(hi - lo) * a.row_bytes;
  uint64_t pol = 0;
  if (a.policy == 1) asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(pol));
  if (a.policy == 2) asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;" : "=l"(pol));
  for (size_t off = 0; off < bytes; off += 16384) {
    uint32_t n = (uint32_t)(bytes - off < 16384 ? bytes - off : 16384);
    if (a.policy)
      asm volatile("cp.async.bulk.prefetch.L2.global.L2::cache_hint [%0], %1, %2;"
                   :: "l"(base + off), "r"(n), "l"(pol) : "memory");
    else asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(base + off), "r"(n) : "memory");
  }
}
extern "C" int kv_prefetch_launch(const PfArgs* a, cudaStream_t st) {
  int total = a->B * a->H * a->warps * 2;
  kv_prefetch<<<(total + 127) / 128, 128, 0, st>>>(*a);
  return (int)cudaGetLastError();
}
