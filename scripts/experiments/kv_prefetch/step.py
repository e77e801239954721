"""Experiment (fourteenth session, not in the product): does prefetching the next layer's KV cache into L2 while
the layer's linears run shorten the GPT-2 small decode step?

The step is rebuilt in PyTorch around the EET decode kernel (12 layers, batch 32, cuBLAS linears, CUDA graph).
After each attention kernel, prefetch.cu's kernel issues ``cp.async.bulk.prefetch.L2`` for part of the next
layer's valid K/V ranges (the next step's layer 0 after layer 11), which then streams in while the latency-bound
linears use a fraction of the memory bandwidth. Every variant must produce the same tokens.

Run from the repository root on a GPU machine, with the library built (``cmake --build``):

    nvcc -arch=sm_90 -O3 -shared -Xcompiler -fPIC -o /tmp/pf.so scripts/experiments/kv_prefetch/prefetch.cu
    EET_KERNELS_LIB=/tmp/eet-build/libeet_kernels.so PF_LIB=/tmp/pf.so \
        python3 scripts/experiments/kv_prefetch/step.py full,ragged 0:0:0:4,0.5:0:0:4

Shapes: ``full`` (past 512, no padding) and ``ragged`` (step 600, pads U[0, 496)). A config is
``fraction:where:policy:warps``: where 0 = the tail of each warp's share, 1 = its head, 2 = the head of the row;
policy 0 = none, 1 = evict_last, 2 = evict_normal; warps = the decode kernel's warps per (row, head).
Prints medians (us) of single graph replays and of 20 back to back, three rounds. Results: README.
"""

import ctypes
import os
import sys
import torch
import torch.nn.functional as F

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from eet.plugins import _lib  # noqa: E402
from decode_shapes import median_us  # noqa: E402

pf = ctypes.CDLL(os.environ["PF_LIB"])


class PfArgs(ctypes.Structure):
    _fields_ = [
        ("kc", ctypes.c_void_p),
        ("vc", ctypes.c_void_p),
        ("pads", ctypes.c_void_p),
        ("step", ctypes.c_void_p),
        ("B", ctypes.c_int),
        ("H", ctypes.c_int),
        ("L", ctypes.c_int),
        ("row_bytes", ctypes.c_int),
        ("frac", ctypes.c_float),
        ("warps", ctypes.c_int),
        ("where", ctypes.c_int),
        ("policy", ctypes.c_int),
    ]


pf.kv_prefetch_launch.argtypes = [ctypes.POINTER(PfArgs), ctypes.c_void_p]

torch.manual_seed(0)
dev = "cuda"
dt = torch.float16
NL, B, H, D, L, V = 12, 32, 12, 64, 1024, 50257
C = H * D
g = lambda *s: (torch.randn(*s, device=dev) * 0.02).to(dt)
W = [
    dict(
        ln1w=torch.ones(C, device=dev, dtype=dt),
        ln1b=g(C),
        wqkv=g(C, 3 * C),
        bqkv=g(3 * C),
        wproj=g(C, C),
        bproj=g(C),
        ln2w=torch.ones(C, device=dev, dtype=dt),
        ln2b=g(C),
        wfc=g(C, 4 * C),
        bfc=g(4 * C),
        wp2=g(4 * C, C),
        bp2=g(C),
    )
    for _ in range(NL)
]
wte = g(V, C)
lnfw = torch.ones(C, device=dev, dtype=dt)
lnfb = g(C)
kcs = [torch.randn(B, H, L, D, device=dev, dtype=dt) for _ in range(NL)]
vcs = [torch.randn(B, H, L, D, device=dev, dtype=dt) for _ in range(NL)]
x0 = torch.randn(B, C, device=dev, dtype=dt)
qkv = torch.empty(B, 3 * C, device=dev, dtype=dt)
ctx = torch.empty(B, C, device=dev, dtype=dt)


def setup(shape):
    if shape == "full":
        pads, step = [0] * B, 512
    else:
        gen = torch.Generator().manual_seed(1)
        pads, step = torch.randint(0, 496, (B,), generator=gen).tolist(), 600
    pads_d = torch.tensor(pads, dtype=torch.int32, device=dev)
    step_d = torch.tensor([step], dtype=torch.int32, device=dev)
    params = [
        _lib.make_prepad_params(
            dtype=_lib.DTYPE_FP16,
            num_heads=H,
            head_dim=D,
            batch=B,
            seq=1,
            max_len=L,
            q=qkv.data_ptr(),
            k=qkv.data_ptr() + C * 2,
            v=qkv.data_ptr() + 2 * C * 2,
            out=ctx.data_ptr(),
            k_cache=kcs[l].data_ptr(),
            v_cache=vcs[l].data_ptr(),
            pad_lengths=pads_d.data_ptr(),
            step=step_d.data_ptr(),
            q_row_stride=3 * C,
            k_row_stride=3 * C,
            v_row_stride=3 * C,
            out_row_stride=C,
        )
        for l in range(NL)
    ]
    return pads_d, step_d, params


def make_step(params, pads_d, step_d, pfcfg):
    pfargs = None
    if pfcfg is not None:
        frac, where, policy, warps = pfcfg
        pfargs = [
            PfArgs(
                kcs[l].data_ptr(),
                vcs[l].data_ptr(),
                pads_d.data_ptr(),
                step_d.data_ptr(),
                B,
                H,
                L,
                D * 2,
                frac,
                warps,
                where,
                policy,
            )
            for l in range(NL)
        ]

    def step():
        x = x0
        st = torch.cuda.current_stream().cuda_stream
        for l in range(NL):
            w = W[l]
            h = F.layer_norm(x, (C,), w["ln1w"], w["ln1b"])
            torch.addmm(w["bqkv"], h, w["wqkv"], out=qkv)
            _lib.prepad_attention(params[l], st)
            if pfargs is not None:
                rc = pf.kv_prefetch_launch(ctypes.byref(pfargs[(l + 1) % NL]), st)
                assert rc == 0, rc
            x = torch.addmm(w["bproj"], ctx, w["wproj"]) + x
            h2 = F.layer_norm(x, (C,), w["ln2w"], w["ln2b"])
            f = F.gelu(torch.addmm(w["bfc"], h2, w["wfc"]), approximate="tanh")
            x = torch.addmm(w["bp2"], f, w["wp2"]) + x
        hf = F.layer_norm(x, (C,), lnfw, lnfb)
        return F.linear(hf, wte).argmax(-1)

    return step


def graph_of(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        out = fn()
    return gr, out


def time_graph(gr, n=40):
    """Median of n single replays (us), CUDA events around each."""
    return median_us(gr.replay, reps=n, warmup=5)


def time_graph_b2b(gr, n=20):
    a = torch.cuda.Event(enable_timing=True)
    b = torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        gr.replay()
    a.record()
    for _ in range(n):
        gr.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1000 / n


configs = [None] + [tuple(map(float, c.split(":"))) for c in sys.argv[2].split(",")]
for shape in sys.argv[1].split(","):
    pads_d, step_d, params = setup(shape)
    graphs = {}
    ref = None
    for cfg in configs:
        c = None if cfg is None else (cfg[0], int(cfg[1]), int(cfg[2]), int(cfg[3]))
        gr, out = graph_of(make_step(params, pads_d, step_d, c))
        gr.replay()
        torch.cuda.synchronize()
        if ref is None:
            ref = out.clone()
        assert torch.equal(out, ref), "prefetch changed the tokens"
        graphs[c] = gr
    res = {c: [] for c in graphs}
    for rep in range(3):
        for c, gr in graphs.items():
            res[c].append((time_graph(gr), time_graph_b2b(gr)))
    for c, v in res.items():
        print(
            f"{shape:6s} prefetch={c}: single "
            + " / ".join(f"{a:.1f}" for a, _ in v)
            + "   back-to-back "
            + " / ".join(f"{b:.1f}" for _, b in v),
            flush=True,
        )
