"""Times eet_prepad_attention's decode (fp16, 12 heads, head dim 64) with the library at EET_KERNELS_LIB.

Timer as ``scripts/bench_kernels.py``'s: L2 flushed before every call by reading a 256 MiB buffer, CUDA events,
median of 300 calls (us). Run from the repository root on a GPU machine.

``python3 scripts/experiments/decode_shapes.py TAG`` prints one line per shape, tagged TAG: for A/B runs of two
builds in alternating processes (``decode_ab.sh`` does that for a patch against the checkout).

``python3 scripts/experiments/decode_shapes.py --balance`` asks whether row-length imbalance costs time:
decode-1k's pads (bench_kernels' draw, seed 0) against the same pads sorted both ways, equal pads with the same
bytes, and full rows of 513 and 1024 keys, three rounds in one process.
"""

import os
import random
import statistics
import sys

import torch

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_kernels import CASES, decode_kv_bytes, draw_lengths  # noqa: E402
from eet.plugins import _lib  # noqa: E402

H, D = 12, 64


def median_us(fn, reps=300, warmup=20, clear=None):
    """Median time of fn in us over ``reps`` calls, CUDA events around each; ``clear()`` runs before each."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for _ in range(warmup):
        fn()
    for i in range(reps):
        if clear is not None:
            clear()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) * 1000 for a, b in zip(starts, ends))


def l2_flush():
    """bench_kernels' default flush: reading a 256 MiB buffer."""
    buf = torch.ones((256 << 20) // 2, dtype=torch.float16, device="cuda")
    out = torch.empty((), dtype=torch.float16, device="cuda")
    return lambda: torch.amax(buf, dim=0, out=out)


def decode_call(B, L, s, pads):
    """A decode call at step s over fresh random caches [B, H, L, D] with these pads; returns (fn, valid KV
    bytes). The tensors it uses are kept on fn."""
    kc = torch.randn(B, H, L, D, device="cuda", dtype=torch.float16)
    vc = torch.randn_like(kc)
    q, k, v = (torch.randn(B, 1, H * D, device="cuda", dtype=torch.float16) for _ in range(3))
    out = torch.empty_like(q)
    pd = torch.tensor(pads, dtype=torch.int32, device="cuda")
    sd = torch.tensor([s], dtype=torch.int32, device="cuda")
    ptr = {n: t.data_ptr() for n, t in dict(q=q, k=k, v=v, out=out, k_cache=kc, v_cache=vc).items()}
    prm = _lib.make_prepad_params(dtype=_lib.DTYPE_FP16, num_heads=H, head_dim=D, batch=B, seq=1, max_len=L,
                                  pad_lengths=pd.data_ptr(), step=sd.data_ptr(), **ptr)
    stream = torch.cuda.current_stream().cuda_stream

    def fn():
        _lib.prepad_attention(prm, stream)

    fn.keep = (kc, vc, q, k, v, out, pd, sd)
    return fn, decode_kv_bytes(pads, s, H, D, 2)


def shapes(tag):
    rg = random.Random(1)
    cases = {
        "decode-1k": (32, 1024, 1023, draw_lengths(CASES["decode-1k"], 0)),
        "decode-4k": (32, 4096, 4095, draw_lengths(CASES["decode-4k"], 0)),
        "decode-b128": (128, 512, 511, draw_lengths(CASES["decode-b128"], 0)),
        "gpt2-step": (32, 1024, 512, [0] * 32),
        "ragged-600": (32, 1024, 600, [rg.randrange(0, 496) for _ in range(32)]),
        "b1-4k": (1, 4096, 4095, [0]),
    }
    clear = l2_flush()
    for name, c in cases.items():
        fn, nbytes = decode_call(*c)
        r = median_us(fn, clear=clear)
        print(f"{tag} {name:12s} {r:7.2f} us {nbytes / r / 1e3:6.0f} GB/s", flush=True)
        del fn
        torch.cuda.empty_cache()


def balance():
    B, L = 32, 1024
    pads = draw_lengths(CASES["decode-1k"], 0)
    cases = {
        "decode-1k pads": pads,
        "sorted: long rows first": sorted(pads),
        "sorted: short rows first": sorted(pads, reverse=True),
        "equal pads (same bytes)": [round(sum(pads) / B)] * B,
        "all 513 keys": [511] * B,
        "all 1024 keys": [0] * B,
    }
    calls = {n: decode_call(B, L, L - 1, p) for n, p in cases.items()}
    clear = l2_flush()
    res = {n: [] for n in cases}
    for _ in range(3):
        for n, (fn, _) in calls.items():
            res[n].append(median_us(fn, reps=200, clear=clear))
    for n, (_, nbytes) in calls.items():
        times = " / ".join(f"{x:.1f}" for x in res[n])
        print(f"{n:28s} {nbytes / 1e6:6.1f} MB  {times} us  {nbytes / statistics.median(res[n]) / 1e3:.0f} GB/s")


if __name__ == "__main__":
    if sys.argv[1:] == ["--balance"]:
        balance()
    else:
        shapes(sys.argv[1] if len(sys.argv) > 1 else "run")
