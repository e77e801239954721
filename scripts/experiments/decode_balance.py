"""Experiment (fourteenth session): does row-length imbalance cost the decode kernel time?

decode-1k's pads (bench_kernels' draw, seed 0) against the same pads sorted both ways, equal pads with the same
bytes, and full rows of 513 and 1024 keys. Same timer as bench_kernels (L2 flushed by reading 256 MiB, CUDA
events, medians), three rounds. Run from the repository root on a GPU machine:

    EET_KERNELS_LIB=/tmp/eet-build/libeet_kernels.so python3 scripts/experiments/decode_balance.py
"""

import os, random, statistics, sys
import torch

sys.path.insert(0, os.getcwd())
from eet.plugins import _lib

B, H, L, D = 32, 12, 1024, 64
s = L - 1
rng = random.Random("0:decode-1k")
pads = [rng.randrange(0, 512) for _ in range(B)]
mean_pad = round(sum(pads) / B)
kc = torch.randn(B, H, L, D, device="cuda", dtype=torch.float16)
vc = torch.randn_like(kc)
q, k, v = (torch.randn(B, 1, H * D, device="cuda", dtype=torch.float16) for _ in range(3))
out = torch.empty_like(q)
flush = torch.ones((256 << 20) // 2, dtype=torch.float16, device="cuda")
fo = torch.empty((), dtype=torch.float16, device="cuda")


def launcher(p):
    pd = torch.tensor(p, dtype=torch.int32, device="cuda")
    sd = torch.tensor([s], dtype=torch.int32, device="cuda")
    prm = _lib.make_prepad_params(
        dtype=_lib.DTYPE_FP16,
        num_heads=H,
        head_dim=D,
        batch=B,
        seq=1,
        max_len=L,
        q=q.data_ptr(),
        k=k.data_ptr(),
        v=v.data_ptr(),
        out=out.data_ptr(),
        k_cache=kc.data_ptr(),
        v_cache=vc.data_ptr(),
        pad_lengths=pd.data_ptr(),
        step=sd.data_ptr(),
    )
    st = torch.cuda.current_stream().cuda_stream
    f = lambda: _lib.prepad_attention(prm, st)
    f.keep = (pd, sd)
    return f


def t(fn, reps=200):
    st = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    en = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for _ in range(20):
        fn()
    for i in range(reps):
        torch.amax(flush, dim=0, out=fo)
        st[i].record()
        fn()
        en[i].record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) * 1000 for a, b in zip(st, en))


def kv_bytes(p):
    return 2 * sum(s + 1 - x for x in p) * H * D * 2


cases = {
    "decode-1k pads": pads,
    "sorted: long rows first": sorted(pads),
    "sorted: short rows first": sorted(pads, reverse=True),
    "equal pads (same bytes)": [mean_pad] * B,
    "all 513 keys": [511] * B,
    "all 1024 keys": [0] * B,
}
fns = {n: launcher(p) for n, p in cases.items()}
res = {n: [] for n in cases}
for r in range(3):
    for n, f in fns.items():
        res[n].append(t(f))
for n, p in cases.items():
    b = kv_bytes(p)
    print(
        f"{n:28s} {b/1e6:6.1f} MB  "
        + " / ".join(f"{x:.1f}" for x in res[n])
        + f" us  {b/statistics.median(res[n])/1e3:.0f} GB/s"
    )
