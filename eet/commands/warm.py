"""``eet warm DIR``: run every shape bucket of a built engine once on this GPU and keep TensorRT-RTX's compiled
kernels in the engine's runtime cache file.

TensorRT-RTX compiles kernels the first time a context meets an input shape (0.1-2 s per shape on an H100), and
``encode()`` / ``generate()`` round every call up to a few shape buckets, so without a cache the first request
of each bucket pays that. Run this once per plan and kind of GPU (the file is named by both, under
``DIR/runtime_cache/`` by default); every later :func:`eet.runtime.load` with the same file reads the kernels
back. Measured on an H100: BERT's first requests then run at full speed; GPT-2's still take 0.3-0.6 s per new
shape (against 0.3-5 s), which ``eet.runtime.load(DIR, warm_up=True)`` removes by running every bucket at
start-up (13.6 s for GPT-2 small's 54 buckets with the file, 35 s without).

Prints one line per bucket as it runs (BERT: packed tokens x sequences; GPT-2: the context phase at rows x
prompt width, the decode step at rows x 1) and the file written.
"""
from __future__ import annotations

import argparse
import time


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eet warm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory", metavar="DIR", help="a directory written by `eet build`")
    p.add_argument("--device", type=int, default=0, help="CUDA device ordinal (default 0)")
    p.add_argument("--runtime-cache", default="auto", metavar="FILE|auto",
                   help="the runtime cache file to fill (default auto: DIR/runtime_cache/, named by plan and GPU; "
                        "give the same file to load() / `eet run --runtime-cache`)")
    return p


def main(argv: list[str] | None = None, deserialize_hook=None, out=print) -> int:
    """``eet warm DIR ...`` (``deserialize_hook``: see :func:`eet.runtime.engine.load`)."""
    args = parser().parse_args(argv)
    from eet.errors import EetError

    if args.runtime_cache == "none":
        raise EetError("eet warm keeps the compiled kernels in the runtime cache file; with --runtime-cache none "
                       "they would be lost at exit: give a file or leave the default (auto)")
    import eet.runtime

    t0 = time.perf_counter()
    with eet.runtime.load(args.directory, device=args.device, runtime_cache=args.runtime_cache,
                          deserialize_hook=deserialize_hook) as engine:
        out(engine.describe())
        cache = engine.runtime_cache
        if cache.cache is None:
            raise EetError(f"{engine.trt.flavour} {engine.trt.version} keeps no runtime cache here, so nothing "
                           "that eet warm compiles would outlive this process: use "
                           "eet.runtime.load(DIR, warm_up=True) in the serving process instead")
        before = cache.on_disk
        out(f"runtime cache {cache.path}: " + (f"read {len(before):,} B" if before else "none yet"))
        shapes = engine.warm_up(on_shape=lambda s: out(f"  {s}"))
        seconds = sum(s.seconds for s in shapes)
        slowest = max(shapes, key=lambda s: s.seconds)
        out(f"{len(shapes)} shape buckets in {seconds:.1f} s (slowest: {slowest})")
        out(f"runtime cache {cache.path}: {len(cache.on_disk):,} B after the warm-up ({len(before):,} B before)")
    out(f"done in {time.perf_counter() - t0:.1f} s")
    return 0
