"""Times eet_prepad_attention's decode on several shapes with the library at EET_KERNELS_LIB; one line per case,
tagged with the first argument. For A/B runs of two builds in alternating processes, e.g.:

    for i in 1 2 3; do
      EET_KERNELS_LIB=/tmp/old/libeet_kernels.so python3 scripts/experiments/decode_shapes.py old$i
      EET_KERNELS_LIB=/tmp/new/libeet_kernels.so python3 scripts/experiments/decode_shapes.py new$i
    done | sort -k2,2 -k1,1

Timer as bench_kernels (read flush, CUDA events, medians of 300); fp16, 12 heads, head dim 64.
"""

import os, random, statistics, sys
import torch

sys.path.insert(0, os.getcwd())
from eet.plugins import _lib

H, D = 12, 64
flush = torch.ones((256 << 20) // 2, dtype=torch.float16, device="cuda")
fo = torch.empty((), dtype=torch.float16, device="cuda")


def t(fn, reps=300):
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


def case(B, L, s, pads):
    kc = torch.randn(B, H, L, D, device="cuda", dtype=torch.float16)
    vc = torch.randn_like(kc)
    q, k, v = (torch.randn(B, 1, H * D, device="cuda", dtype=torch.float16) for _ in range(3))
    out = torch.empty_like(q)
    pd = torch.tensor(pads, dtype=torch.int32, device="cuda")
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
    r = t(lambda: _lib.prepad_attention(prm, st))
    nbytes = 2 * sum(s + 1 - min(p, s + 1) for p in pads) * H * D * 2
    del kc, vc
    torch.cuda.empty_cache()
    return r, nbytes


def draw(name, B, lo, hi):
    rng = random.Random(f"0:{name}")
    return [rng.randrange(lo, hi) for _ in range(B)]


rg = random.Random(1)
cases = {
    "decode-1k": (32, 1024, 1023, draw("decode-1k", 32, 0, 512)),
    "decode-4k": (32, 4096, 4095, draw("decode-4k", 32, 0, 2048)),
    "decode-b128": (128, 512, 511, draw("decode-b128", 128, 0, 256)),
    "gpt2-step": (32, 1024, 512, [0] * 32),
    "ragged-600": (32, 1024, 600, [rg.randrange(0, 496) for _ in range(32)]),
    "b1-4k": (1, 4096, 4095, [0]),
}
tag = sys.argv[1]
for n, c in cases.items():
    r, nb = case(*c)
    print(f"{tag} {n:12s} {r:7.2f} us {nb / r / 1e3:6.0f} GB/s", flush=True)
