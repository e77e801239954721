#!/usr/bin/env python3
"""Benchmark of the EET attention kernels against PyTorch's attention (issue 4).

One process times our kernels (libeet_kernels.so through eet/plugins/_lib.py's ctypes launchers, on
torch tensors' data_ptr and torch's current stream) and the baselines on the same inputs, and prints a
markdown table: per case our median time, each baseline's, the speedup against the fastest baseline,
and the fraction of two machine ceilings measured in the same run:

- useful TFLOP/s, counting real tokens only (4 * sum(len_i^2) * H * D for bidirectional attention, half
  of that for causal), against an fp16 GEMM (8192^3 torch.matmul);
- for decode, the valid KV bytes (2 * sum(step + 1 - pad_b) * H * D * element size) per second against
  a device-to-device copy of a 1 GiB tensor (bytes read + written).

Before timing, every output is checked against a float32 reference (max |diff| printed); a kernel
outside the tolerance is reported as WRONG and gets no speedup. Times are medians of CUDA-event timings
with L2 flushed before every run: by reading a 256 MiB buffer (default), or with ``--l2-flush write`` by
triton.testing.do_bench's own flush, which zeroes it and so leaves dirty lines that the timed kernel
then writes back (see Bench.time_ms).

With ``--engine`` each case also runs the plugin the way users meet it, alone in a TensorRT engine
(:mod:`eet.runtime.single_plugin`, plan built without a GPU): timed per ``execute_async_v3`` (TensorRT calls
the plugin's Python ``enqueue`` every time) and replayed from a CUDA graph captured around it, plus the host
time per call of the launcher, of ``execute_async_v3`` and of a graph replay. Where the TensorRT flavour does
not list the GPU (TensorRT-RTX on an H100), set ``EET_CC_SHIM`` to the test shim's folder: the script then
loads it before CUDA starts and deserializes through it, as the GPU tests do (benchmarks only; the product
never loads it).

Usage (from the repository root, on a machine with an NVIDIA GPU):

    EET_KERNELS_LIB=/tmp/eet-build/libeet_kernels.so python3 scripts/bench_kernels.py \\
        [--cases varlen-b32,decode-1k] [--dtype fp16|fp32] [--l2-flush read|write] [--engine] [--json OUT]
        [--seed N]

The module imports only the standard library at import time (torch and triton are imported by main()).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    """One benchmark shape. varlen / context: sequence lengths drawn uniformly from [lo, hi] (inclusive);
    decode: pad lengths drawn uniformly from [lo, hi) and the step at max_len - 1 (a full cache)."""

    name: str
    kind: str  # "varlen" (bidirectional, packed), "decode" (seq = 1, KV cache), "context" (causal, left-padded)
    batch: int
    heads: int
    lo: int
    hi: int
    max_len: int = 0  # decode: cache capacity
    head_dim: int = 64


CASES = {
    c.name: c
    for c in (
        Case("varlen-b32", "varlen", 32, 12, 32, 512),
        Case("varlen-b64", "varlen", 64, 16, 16, 256),
        Case("varlen-b8", "varlen", 8, 16, 128, 2048),
        Case("decode-1k", "decode", 32, 12, 0, 512, max_len=1024),
        Case("decode-4k", "decode", 32, 12, 0, 2048, max_len=4096),
        Case("decode-b128", "decode", 128, 12, 0, 256, max_len=512),
        Case("context", "context", 32, 12, 16, 512),
    )
}

DTYPE_BYTES = {"fp16": 2, "fp32": 4}
TOLERANCE = {"fp16": 1e-2, "fp32": 1e-3}  # max |out - float32 reference|
GEMM_N = 8192
COPY_BYTES = 1 << 30
FLUSH_BYTES = 256 << 20  # L2 flush buffer (H100 / H200 L2: 50 MB)


# ------------------------------------------------------------------------------------------------
# Pure helpers (no torch; tested on the CPU by tests/scripts/test_bench_kernels.py)


def attention_flops(lengths, heads: int, head_dim: int, causal: bool) -> float:
    """Useful FLOPs of attention over sequences of the given lengths (real tokens only): QK^T and PV,
    2 * 2 * len^2 * D per head; causal attention does half of it."""
    total = 4.0 * sum(int(n) ** 2 for n in lengths) * heads * head_dim
    return total / 2 if causal else total


def decode_kv_bytes(pads, step: int, heads: int, head_dim: int, elem_bytes: int) -> int:
    """Bytes of K and V a decode step must read: keys [pad_b, step] of every row (none when the pad is
    past the step), both caches."""
    keys = sum(max(step + 1 - max(int(p), 0), 0) for p in pads)
    return 2 * keys * heads * head_dim * elem_bytes


def copy_bandwidth(nbytes: int, seconds: float) -> float:
    """Bytes per second of a device-to-device copy of nbytes: read plus written."""
    return 2.0 * nbytes / seconds


def gemm_flops(n: int) -> float:
    return 2.0 * n**3


def draw_lengths(case: Case, seed: int) -> list[int]:
    """varlen / context: sequence lengths U[lo, hi]; decode: pad lengths U[lo, hi). Fixed per (case, seed)."""
    rng = random.Random(f"{seed}:{case.name}")
    if case.kind == "decode":
        return [rng.randrange(case.lo, case.hi) for _ in range(case.batch)]
    return [rng.randint(case.lo, case.hi) for _ in range(case.batch)]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time the EET attention kernels against PyTorch's attention backends.")
    parser.add_argument("--cases", default="all",
                        help="comma-separated case names, or 'all' (default); cases: " + ", ".join(CASES))
    parser.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="fp16")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    parser.add_argument("--seed", type=int, default=0, help="input seed (default 0)")
    parser.add_argument("--warmup", type=float, default=25.0, help="warm-up before timing, ms (default 25)")
    parser.add_argument("--rep", type=float, default=200.0, help="timed repetitions, ms (default 200)")
    parser.add_argument("--l2-flush", choices=("read", "write"), default="read",
                        help="how L2 is cleared before every timed run: read a 256 MiB buffer (default: leaves clean "
                             "lines) or zero it (triton do_bench's own flush: leaves dirty lines to write back)")
    parser.add_argument("--no-baselines", action="store_true", help="time our kernels only (still checked)")
    parser.add_argument("--engine", action="store_true",
                        help="also time the plugin alone in a TensorRT engine (per execute_async_v3 and from a CUDA "
                             "graph) and the host time per call; EET_CC_SHIM=DIR deserializes through the test shim")
    args = parser.parse_args(argv)
    names = list(CASES) if args.cases.strip() == "all" else [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown or not names:
        parser.error(f"unknown case(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(CASES)}")
    args.case_list = [CASES[n] for n in names]
    return args


def rejection_reason(messages, exc, about: str = "") -> str:
    """A short reason from PyTorch's warnings (the first that mentions `about`, case-insensitive, else the
    first) or, without warnings, from the exception."""
    import re

    lines = [re.sub(r"\s*\(Triggered internally at .*", "", m.strip().splitlines()[0]) for m in messages if m.strip()]
    lines = [ln for ln in lines if ln]
    picked = [i for i, ln in enumerate(lines) if about and about.lower() in ln.lower()]
    if lines:
        i = picked[0] if picked else 0
        reason = lines[i]
        if picked and reason.endswith(":") and i + 1 < len(lines):  # "... kernel not used because:" + why
            reason = f"{reason} {lines[i + 1]}"
    else:
        text = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {text[0] if text else ''}"
    return reason[:100]


def fmt_us(ms) -> str:
    return f"{ms * 1e3:.1f}" if isinstance(ms, (int, float)) else str(ms)


def markdown_table(rows, baselines) -> str:
    head = (["case", "ours (us)"] + [f"{b} (us)" for b in baselines]
            + ["best baseline / ours", "useful TFLOP/s (% GEMM)", "valid KV GB/s (% copy)",
               "ours back to back: per call, valid KV GB/s (% copy)", "max |diff| ours"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["case"], fmt_us(r["ours_ms"])]
        cells += [fmt_us(r["baselines"].get(b, "-")) for b in baselines]
        cells += [r["speedup"], r["tflops"], r["bandwidth"], r.get("back_to_back", "-"), r["diff"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def engine_table(rows) -> str:
    head = ["case", "launcher (us)", "engine, execute_async_v3 (us)", "engine, CUDA graph (us)",
            "host per call: launcher / execute_async_v3 / graph replay (us)", "max |diff| engine"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        e = r.get("engine")
        if not e:
            continue
        host = f"{e['host_launcher_us']:.1f} / {e['host_engine_us']:.1f} / {e['host_graph_us']:.1f}"
        cells = [r["case"], fmt_us(r["ours_ms"]), fmt_us(e["engine_ms"]), fmt_us(e["graph_ms"]), host,
                 f"{e['diff']:.2g}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# GPU side (torch, triton imported by main)


class Bench:
    """What the cases share: torch, the timer, the library binding, the ceilings."""

    def __init__(self, args):
        import torch
        import torch.nn.functional as F

        self.torch, self.F, self.args = torch, F, args
        self.dtype = {"fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        self.tol = TOLERANCE[args.dtype]
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        from eet.plugins import _lib

        self.lib = _lib
        _lib.load_library()
        self.dtype_code = {"fp16": _lib.DTYPE_FP16, "fp32": _lib.DTYPE_FP32}[args.dtype]
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        self._do_bench = do_bench
        self._flush = None
        self.deserialize_hook = None  # set by main() when EET_CC_SHIM is loaded

    def time_ms(self, fn) -> float:
        """Median time of fn in ms (CUDA events, L2 flushed before every run).

        ``--l2-flush write`` is triton's ``do_bench`` as is: it flushes by zeroing a 256 MiB buffer, which leaves
        L2 full of dirty lines, so a kernel that streams less than about twice L2's size also pays for writing
        them back (measured on the H100: ~8 us on a 50 MB read). ``--l2-flush read`` (default) flushes by reading
        a 256 MiB buffer (clean lines) and times the same way; every kernel and baseline gets the same flush.
        """
        torch = self.torch
        if self.args.l2_flush == "write" and self._do_bench is not None:
            return float(self._do_bench(fn, warmup=self.args.warmup, rep=self.args.rep, return_mode="median"))
        clear = self.l2_clear()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        clear()
        start.record()
        for _ in range(5):
            fn()
        end.record()
        end.synchronize()
        each = max(start.elapsed_time(end) / 5, 1e-3)
        warmup = max(1, int(self.args.warmup / each))
        reps = min(max(10, int(self.args.rep / each)), 2000)
        for _ in range(warmup):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            clear()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
        return times[len(times) // 2]

    def l2_clear(self):
        """The L2 flush of ``--l2-flush``: reading (default) or zeroing a 256 MiB buffer made on first use."""
        torch = self.torch
        if self._flush is None:
            self._flush = torch.ones(FLUSH_BYTES // 2, dtype=torch.float16, device="cuda")
            self._flush_out = torch.empty((), dtype=torch.float16, device="cuda")
        flush, out = self._flush, self._flush_out
        if self.args.l2_flush == "read":
            return lambda: torch.amax(flush, dim=0, out=out)
        return flush.zero_

    def back_to_back_ms(self, fns, launches: int = 48, reps: int = 15) -> float:
        """Median time per call of ``launches`` calls queued back to back, cycling over ``fns`` (one per input
        set, enough sets that each call finds its inputs out of L2): the steady state of a kernel inside a
        decode loop, without the timer's and launch's fixed cost that a single timed call carries (an empty
        kernel times about 4 us with :meth:`time_ms` on an H100). L2 is flushed (:meth:`l2_clear`) before each
        repetition."""
        torch = self.torch
        clear = self.l2_clear()
        for fn in fns:
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(reps):
            clear()
            start.record()
            for i in range(launches):
                fns[i % len(fns)]()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / launches)
        return sorted(times)[len(times) // 2]

    def randn(self, *shape, gen):
        return self.torch.randn(*shape, generator=gen, device="cuda", dtype=self.torch.float32).to(self.dtype)

    def ceilings(self):
        torch = self.torch

        def gemm():  # its operands are freed when it returns
            a = torch.randn(GEMM_N, GEMM_N, device="cuda", dtype=torch.float16)
            b = torch.randn(GEMM_N, GEMM_N, device="cuda", dtype=torch.float16)
            return self.time_ms(lambda: torch.matmul(a, b))

        def copy():
            src = torch.rand(COPY_BYTES // 2, device="cuda", dtype=torch.float32).to(torch.float16)
            dst = torch.empty_like(src)
            return self.time_ms(lambda: dst.copy_(src))

        gemm_ms = gemm()
        copy_ms = copy()
        torch.cuda.empty_cache()
        return {
            "gemm_fp16_tflops": gemm_flops(GEMM_N) / (gemm_ms * 1e-3) / 1e12,
            "copy_gbps": copy_bandwidth(COPY_BYTES, copy_ms * 1e-3) / 1e9,
            "gemm_ms": gemm_ms,
            "copy_ms": copy_ms,
        }

    # -- baselines ---------------------------------------------------------------------------------

    def sdpa_backends(self):
        from torch.nn.attention import SDPBackend

        return {
            "sdpa-flash": SDPBackend.FLASH_ATTENTION,
            "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
            "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
        }

    def try_run(self, fn, about=""):
        """(output, None) or (None, reason): a backend that rejects the inputs is not an error. The reason
        is PyTorch's warning that mentions `about` (e.g. "flash"), else its first warning, else the
        exception."""
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out = fn()
                self.torch.cuda.synchronize()
                return out, None
            except Exception as exc:  # noqa: BLE001 - any rejection is reported, not raised
                return None, rejection_reason([str(w.message) for w in caught], exc, about)

    def sdpa_masked(self, q, k, v, mask_bool):
        """Every SDPA backend with the boolean mask, then (if rejected) an additive one:
        {name: (fn, None) | (None, reason)}."""
        from torch.nn.attention import sdpa_kernel

        F, torch = self.F, self.torch
        additive = torch.zeros(mask_bool.shape, dtype=q.dtype, device="cuda").masked_fill(~mask_bool, float("-inf"))
        found = {}
        for name, backend in self.sdpa_backends().items():
            result = (None, "not run")
            for mask in (mask_bool, additive):
                def fn(mask=mask, backend=backend):
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

                out, reason = self.try_run(fn, about=name.split("-")[1])
                if out is not None:
                    result = (fn, None)
                    break
                if result[0] is None and result[1] == "not run":
                    result = (None, reason)  # the boolean mask's reason
            found[name] = result
        return found


def run_varlen(bench: Bench, case: Case):
    torch, F, lib = bench.torch, bench.F, bench.lib
    H, D = case.heads, case.head_dim
    lengths = draw_lengths(case, bench.args.seed)
    T, S, B = sum(lengths), max(lengths), case.batch
    gen = torch.Generator(device="cuda").manual_seed(bench.args.seed)
    # q, k, v contiguous [T, H, D] for the launcher and the baselines; the one-node engine (--engine) reads them
    # as the plugin does, the thirds of one fused projection qkv [T, 3 * H * D]
    qkv = bench.randn(T, 3, H, D, gen=gen)
    q, k, v = (qkv[:, i].contiguous() for i in range(3))
    out = torch.empty_like(q)
    cu = torch.tensor([0] + list(_cumsum(lengths)), dtype=torch.int32, device="cuda")
    params = lib.make_varlen_params(dtype=bench.dtype_code, num_heads=H, head_dim=D, batch=B, max_seqlen=S,
                                    total_tokens=T, q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(),
                                    out=out.data_ptr(), cu_seqlens=cu.data_ptr())
    stream = torch.cuda.current_stream().cuda_stream

    def ours():
        lib.varlen_attention(params, stream)

    # float32 reference, one sequence at a time
    ref = torch.empty(T, H, D, dtype=torch.float32, device="cuda")
    offs = [0] + list(_cumsum(lengths))
    for b in range(B):
        sl = slice(offs[b], offs[b + 1])
        qs, ks, vs = (x[sl].float().transpose(0, 1)[None] for x in (q, k, v))
        ref[sl] = F.scaled_dot_product_attention(qs, ks, vs)[0].transpose(0, 1)

    # padded batch [B, H, S, D] with a key-padding mask
    idx = torch.zeros(B, S, dtype=torch.long, device="cuda")
    valid = torch.zeros(B, S, dtype=torch.bool, device="cuda")
    for b, n in enumerate(lengths):
        idx[b, :n] = torch.arange(offs[b], offs[b] + n, device="cuda")
        valid[b, :n] = True
    qp, kp, vp = (x[idx].transpose(1, 2).contiguous() for x in (q, k, v))  # [B, H, S, D]
    mask = valid[:, None, None, :]  # keys; padded query rows see the valid keys and are ignored

    def unpad(o):  # [B, H, S, D] -> [T, H, D]
        return o.transpose(1, 2)[valid]

    baselines = {}
    try:
        from torch.nn.attention.varlen import varlen_attn

        def fn_varlen():
            return varlen_attn(q, k, v, cu, cu, S, S)

        out_v, reason = bench.try_run(fn_varlen)
        baselines["varlen_attn"] = (fn_varlen, None, lambda o: o) if out_v is not None else (None, reason, None)
    except ImportError as exc:
        baselines["varlen_attn"] = (None, str(exc)[:90], None)
    for name, (fn, reason) in bench.sdpa_masked(qp, kp, vp, mask).items():
        baselines[name] = (fn, reason, unpad)
    flops = attention_flops(lengths, H, D, causal=False)
    row = finish(bench, case, ours, out, ref, baselines, flops=flops)
    if bench.args.engine:
        from eet.plugins.spec import VARLEN_ATTENTION

        dt = {"fp16": "float16", "fp32": "float32"}[bench.args.dtype]
        eng_out = torch.empty_like(q)
        carrier = torch.empty(S, dtype=torch.int32, device="cuda")
        inputs = [("qkv", dt, ["t", 3 * H * D]), ("cu_seqlens", "int32", ["b1"]), ("max_seqlen", "int32", ["s"])]
        shapes = {"qkv": (T, 3 * H * D), "cu_seqlens": (B + 1,), "max_seqlen": (S,)}
        addresses = {"qkv": qkv.data_ptr(), "cu_seqlens": cu.data_ptr(), "max_seqlen": carrier.data_ptr(),
                     "context": eng_out.data_ptr()}
        row["engine"] = engine_timing(bench, ours, VARLEN_ATTENTION, (inputs, [("context", dt, ["t", H * D])]),
                                      dict(num_heads=H, head_dim=D, scale=D ** -0.5), shapes, addresses,
                                      lambda: eng_out, ref)
    return row


def prepad_launcher(bench: Bench, q, k, v, out, k_cache, v_cache, pads, step: int):
    """A call of eet_prepad_attention on torch tensors (q, k, v, out [B, S, H * D]; caches [B, H, L, D]; pads
    a list of B ints; the new tokens at cache position ``step``) on torch's current stream; its attribute
    ``pad_lengths`` is the int32 device copy of ``pads``."""
    torch = bench.torch
    B, H, L, D = k_cache.shape
    pads_dev = torch.tensor(pads, dtype=torch.int32, device="cuda")
    step_dev = torch.tensor([step], dtype=torch.int32, device="cuda")
    params = bench.lib.make_prepad_params(
        dtype=bench.dtype_code, num_heads=H, head_dim=D, batch=B, seq=q.shape[1], max_len=L, q=q.data_ptr(),
        k=k.data_ptr(), v=v.data_ptr(), out=out.data_ptr(), k_cache=k_cache.data_ptr(),
        v_cache=v_cache.data_ptr(), pad_lengths=pads_dev.data_ptr(), step=step_dev.data_ptr())
    stream = torch.cuda.current_stream().cuda_stream

    def ours():
        bench.lib.prepad_attention(params, stream)

    ours.pad_lengths, ours.step = pads_dev, step_dev  # the device tensors params points at, kept alive
    return ours


def host_us(torch, fn, calls: int = 200) -> float:
    """Host time per call of ``fn`` in us: ``calls`` back-to-back calls without synchronizing (the GPU work
    queues up), after one warm call."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def engine_timing(bench: Bench, ours, spec, io, attrs, shapes, addresses, result, expect):
    """The plugin alone in a TensorRT engine on the case's buffers: its output (``result()``, compared with
    ``expect``), its time per ``execute_async_v3`` and per CUDA-graph replay, and host times per call.

    io: (inputs, outputs) as :func:`eet.runtime.single_plugin.one_node_onnx` takes them; shapes: the profile
    (the case's shapes as min = opt = max); addresses: every I/O name -> device address."""
    torch = bench.torch
    from eet.runtime.single_plugin import SingleNodeEngine

    t0 = time.perf_counter()
    eng = SingleNodeEngine(spec, io[0], io[1], attrs, {k: (v, v, v) for k, v in shapes.items()},
                           deserialize_hook=bench.deserialize_hook)
    eng.bind(shapes, addresses)
    print(f"  one-node {spec.name} engine built and loaded in {time.perf_counter() - t0:.1f} s", flush=True)

    def engine():
        eng.run(torch.cuda.current_stream().cuda_stream)

    engine()
    torch.cuda.synchronize()
    diff = (result().float() - expect.float()).abs().max().item()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        engine()  # the capture must not be the first run of a shape (TensorRT-RTX compiles kernels then)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        engine()
    out = {"engine_ms": bench.time_ms(engine), "graph_ms": bench.time_ms(graph.replay), "diff": diff,
           "host_launcher_us": host_us(torch, ours), "host_engine_us": host_us(torch, engine),
           "host_graph_us": host_us(torch, graph.replay)}
    print(f"  engine: {out['engine_ms'] * 1e3:.1f} us per execute_async_v3, {out['graph_ms'] * 1e3:.1f} us per graph "
          f"replay; host per call: launcher {out['host_launcher_us']:.1f} us, execute_async_v3 "
          f"{out['host_engine_us']:.1f} us, replay {out['host_graph_us']:.1f} us; max |diff| {diff:.3g}", flush=True)
    return out


def run_context(bench: Bench, case: Case):
    torch, F = bench.torch, bench.F
    H, D = case.heads, case.head_dim
    lengths = draw_lengths(case, bench.args.seed)
    B, S = case.batch, max(lengths)
    pads = [S - n for n in lengths]
    gen = torch.Generator(device="cuda").manual_seed(bench.args.seed)
    q, k, v = (bench.randn(B, S, H * D, gen=gen) for _ in range(3))
    out = torch.empty_like(q)
    k_cache = torch.zeros(B, H, S, D, dtype=bench.dtype, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    ours = prepad_launcher(bench, q, k, v, out, k_cache, v_cache, pads, step=0)

    qh, kh, vh = (x.view(B, S, H, D).transpose(1, 2).contiguous() for x in (q, k, v))  # [B, H, S, D]
    ref = torch.zeros(B, H, S, D, dtype=torch.float32, device="cuda")
    for b, p in enumerate(pads):
        ref[b, :, p:] = F.scaled_dot_product_attention(qh[b:b + 1, :, p:].float(), kh[b:b + 1, :, p:].float(),
                                                       vh[b:b + 1, :, p:].float(), is_causal=True)[0]
    i = torch.arange(S, device="cuda")
    pad_t = torch.tensor(pads, device="cuda")
    allowed = (i[None, None, :] >= pad_t[:, None, None]) & (i[None, None, :] <= i[None, :, None])  # [B, S, S]
    allowed |= (i[None, None, :] == i[None, :, None])  # padded query rows: themselves (ignored; no NaN)
    mask = allowed[:, None]
    valid_q = i[None, :] >= pad_t[:, None]  # [B, S]

    def select(o_bhsd):  # [B, H, S, D] -> [n_valid, H, D]
        return o_bhsd.transpose(1, 2)[valid_q]

    baselines = {}
    # varlen_attn (causal) on the packed real tokens
    try:
        from torch.nn.attention.varlen import varlen_attn

        idx = valid_q.nonzero(as_tuple=True)
        qv, kv_, vv = (x.view(B, S, H, D)[idx].contiguous() for x in (q, k, v))
        cu = torch.tensor([0] + list(_cumsum(lengths)), dtype=torch.int32, device="cuda")
        attempts = [dict(is_causal=True), dict(window_size=(-1, 0))]
        fn_v, reason = None, "no causal option"
        for kw in attempts:
            def fn(kw=kw):
                return varlen_attn(qv, kv_, vv, cu, cu, S, S, **kw)

            o, reason = bench.try_run(fn)
            if o is not None:
                fn_v = fn
                break
        baselines["varlen_attn"] = (fn_v, reason if fn_v is None else None, lambda o: o)
    except ImportError as exc:
        baselines["varlen_attn"] = (None, str(exc)[:90], None)
    for name, (fn, reason) in bench.sdpa_masked(qh, kh, vh, mask).items():
        baselines[name] = (fn, reason, select)
    flops = attention_flops(lengths, H, D, causal=True)
    ours_view = lambda: select(out.view(B, S, H, D).transpose(1, 2))  # noqa: E731
    return finish(bench, case, ours, ours_view, select(ref), baselines, flops=flops)


def run_decode(bench: Bench, case: Case):
    torch, F = bench.torch, bench.F
    H, D, B, L = case.heads, case.head_dim, case.batch, case.max_len
    pads = draw_lengths(case, bench.args.seed)
    s = L - 1  # the full cache
    gen = torch.Generator(device="cuda").manual_seed(bench.args.seed)
    k_cache = bench.randn(B, H, L, D, gen=gen)
    v_cache = bench.randn(B, H, L, D, gen=gen)
    q, k, v = (bench.randn(B, 1, H * D, gen=gen) for _ in range(3))
    out = torch.empty_like(q)
    ours = prepad_launcher(bench, q, k, v, out, k_cache, v_cache, pads, step=s)

    ours()  # appends the new key/value at s: the baselines read the same cache
    torch.cuda.synchronize()
    qh = q.view(B, 1, H, D).transpose(1, 2).contiguous()  # [B, H, 1, D]
    kk, vv = k_cache[:, :, : s + 1], v_cache[:, :, : s + 1]
    j = torch.arange(s + 1, device="cuda")
    mask = (j[None, :] >= ours.pad_lengths[:, None].clamp(min=0)).view(B, 1, 1, s + 1)
    ref = F.scaled_dot_product_attention(qh.float(), kk.float(), vv.float(), attn_mask=mask)  # [B, H, 1, D]

    def as_ours(o):  # [B, H, 1, D] -> [B, 1, H * D]
        return o.transpose(1, 2).reshape(B, 1, H * D)

    baselines = {name: (fn, reason, as_ours) for name, (fn, reason) in bench.sdpa_masked(qh, kk, vv, mask).items()}
    nbytes = decode_kv_bytes(pads, s, H, D, DTYPE_BYTES[bench.args.dtype])
    row = finish(bench, case, ours, out, as_ours(ref), baselines, kv_bytes=nbytes)
    if row["ours_ok"]:
        # back to back over copies of the caches, together at least 4x L2, so that no call finds its keys in L2
        l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 50 << 20)
        sets = max(2, math.ceil(4 * l2 / nbytes))
        copies = [(k_cache, v_cache)] + [(k_cache.clone(), v_cache.clone()) for _ in range(sets - 1)]
        fns = [prepad_launcher(bench, q, k, v, out, kc, vc, pads, step=s) for kc, vc in copies]
        b2b = bench.back_to_back_ms(fns)
        gbps = nbytes / (b2b * 1e-3) / 1e9
        row["b2b_ms"], row["b2b_kv_gbps"], row["b2b_copy_fraction"] = b2b, gbps, gbps / bench.ceil["copy_gbps"]
        row["back_to_back"] = f"{b2b * 1e3:.1f} us, {gbps:.0f} ({100 * row['b2b_copy_fraction']:.1f}%)"
        print(f"[{case.name}] ours back to back over {sets} cache sets: {b2b * 1e3:.1f} us per call, {gbps:.0f} GB/s",
              flush=True)
        del copies, fns
    if bench.args.engine:
        from eet.plugins.spec import PREPAD_ATTENTION

        dt = {"fp16": "float16", "fp32": "float32"}[bench.args.dtype]
        qkv = torch.cat([q, k, v], dim=-1).contiguous()  # the plugin's fused input [B, 1, 3 * H * D]
        eng_out = torch.empty_like(q)
        cache = ["b", H, L, D]
        inputs = [("qkv", dt, ["b", 1, 3 * H * D]), ("pad_lengths", "int32", ["b"]), ("step", "int32", [1]),
                  ("past_key", dt, cache), ("past_value", dt, cache)]
        shapes = {"qkv": (B, 1, 3 * H * D), "pad_lengths": (B,), "past_key": (B, H, L, D), "past_value": (B, H, L, D)}
        addresses = {"qkv": qkv.data_ptr(), "pad_lengths": ours.pad_lengths.data_ptr(), "step": ours.step.data_ptr(),
                     "past_key": k_cache.data_ptr(), "past_value": v_cache.data_ptr(), "context": eng_out.data_ptr()}
        row["engine"] = engine_timing(bench, ours, PREPAD_ATTENTION, (inputs, [("context", dt, ["b", 1, H * D])]),
                                      dict(num_heads=H, head_dim=D, scale=D ** -0.5), shapes, addresses,
                                      lambda: eng_out, as_ours(ref))
    return row


def _cumsum(xs):
    total = 0
    for x in xs:
        total += x
        yield total


def finish(bench: Bench, case: Case, ours, ours_out, ref, baselines, flops=None, kv_bytes=None):
    """Checks every output against ref, times what is correct, and returns the case's row."""
    torch = bench.torch
    ceil = bench.ceil
    ours()
    torch.cuda.synchronize()
    got = ours_out() if callable(ours_out) else ours_out
    diff = (got.float() - ref.float()).abs().max().item()
    ok = math.isfinite(diff) and diff <= bench.tol
    row = {"case": case.name, "kind": case.kind, "shape": asdict(case), "ours_diff": diff, "ours_ok": ok,
           "baselines": {}, "baseline_diffs": {}, "baseline_na": {}}
    print(f"[{case.name}] ours: max |diff| vs float32 reference {diff:.3g} "
          f"({'ok' if ok else 'WRONG'}, tolerance {bench.tol:g})", flush=True)
    for name, (fn, reason, convert) in baselines.items():
        if bench.args.no_baselines:
            continue
        if fn is None:
            row["baseline_na"][name] = reason
            row["baselines"][name] = f"n/a ({reason})"
            print(f"[{case.name}] {name}: n/a ({reason})", flush=True)
            continue
        o = fn()
        torch.cuda.synchronize()
        bd = (convert(o).float() - ref.float()).abs().max().item()
        row["baseline_diffs"][name] = bd
        ms = bench.time_ms(fn)
        row["baselines"][name] = ms
        print(f"[{case.name}] {name}: {ms * 1e3:.1f} us, max |diff| vs reference {bd:.3g}", flush=True)
    ours_ms = bench.time_ms(ours)
    row["ours_ms"] = ours_ms if ok else f"WRONG ({ours_ms * 1e3:.1f} us)"
    timed = [ms for ms in row["baselines"].values() if isinstance(ms, float)]
    best = min(timed) if timed else None
    row["best_baseline_ms"] = best
    row["speedup"] = f"{best / ours_ms:.2f}x" if (ok and best) else "-"
    if flops is not None:
        tf = flops / (ours_ms * 1e-3) / 1e12
        row["useful_tflops"] = tf
        row["tflops"] = f"{tf:.1f} ({100 * tf / ceil['gemm_fp16_tflops']:.1f}%)" if ok else "-"
    else:
        row["tflops"] = "-"
    if kv_bytes is not None:
        gbps = kv_bytes / (ours_ms * 1e-3) / 1e9
        row["kv_bytes"] = kv_bytes
        row["kv_gbps"] = gbps
        row["copy_fraction"] = gbps / ceil["copy_gbps"]
        row["bandwidth"] = f"{gbps:.0f} ({100 * gbps / ceil['copy_gbps']:.1f}%)" if ok else "-"
    else:
        row["bandwidth"] = "-"
    row["diff"] = f"{diff:.2g}"
    print(f"[{case.name}] ours: {ours_ms * 1e3:.1f} us" + ("" if ok else " (WRONG: not compared)"), flush=True)
    return row


RUNNERS = {"varlen": run_varlen, "decode": run_decode, "context": run_context}


def main(argv=None) -> int:
    args = parse_args(argv)
    shim = None
    if args.engine and os.environ.get("EET_CC_SHIM"):  # before anything initializes CUDA
        sys.path.insert(0, os.environ["EET_CC_SHIM"])
        import cc_shim as shim

        shim.load()
    try:
        import torch
    except ImportError:
        print("error: bench_kernels.py needs PyTorch with CUDA (import torch failed)", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: bench_kernels.py needs an NVIDIA GPU: torch.cuda.is_available() is False "
              f"(torch {torch.__version__})", file=sys.stderr)
        return 2
    try:
        bench = Bench(args)
    except RuntimeError as exc:  # the kernel library is missing or stale
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if shim is not None:
        bench.deserialize_hook = shim.faked_capability
    name = torch.cuda.get_device_name()
    print(f"device: {name} | torch {torch.__version__} | dtype {args.dtype} | seed {args.seed}", flush=True)
    bench.ceil = bench.ceilings()
    c = bench.ceil
    print(f"ceilings: fp16 GEMM {GEMM_N}^3 {c['gemm_fp16_tflops']:.0f} TFLOP/s; device copy of 1 GiB "
          f"{c['copy_gbps']:.0f} GB/s (read + write)", flush=True)
    rows = []
    with torch.cuda.stream(torch.cuda.Stream()):  # not the default stream, which TensorRT synchronizes around
        for case in args.case_list:
            rows.append(RUNNERS[case.kind](bench, case))
            torch.cuda.empty_cache()
    names = []
    for r in rows:
        names += [n for n in r["baselines"] if n not in names]
    print()
    print(f"{name}, {args.dtype}, head dim 64, medians of CUDA-event timings (L2 flushed by a {args.l2_flush}); "
          f"fp16 GEMM {c['gemm_fp16_tflops']:.0f} TFLOP/s, copy {c['copy_gbps']:.0f} GB/s")
    print()
    print(markdown_table(rows, names))
    if any(r.get("engine") for r in rows):
        shim_note = " (plans deserialized through the test shim)" if shim is not None else ""
        print()
        print(f"The plugin alone in a TensorRT engine{shim_note}: time per call (same flush) and host time per call")
        print()
        print(engine_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "torch": torch.__version__, "dtype": args.dtype,
                                               "seed": args.seed, "ceilings": c, "rows": rows}, indent=2,
                                              default=str))
    return 0 if all(r["ours_ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
