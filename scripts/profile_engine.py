"""Where an engine's GPU time goes: the CUDA kernels of a GPT-2 decode step (or a BERT call) under
torch.profiler, top 25 by total GPU time. Tests/benchmarks infrastructure: TensorRT-RTX plans go through the
test shim on GPUs it does not list (EET_CC_SHIM, as scripts/with_cc_shim.py).

    EET_CC_SHIM=... python scripts/profile_engine.py DIR [--batch 32] [--past 512] [--iters 20] [--layers [N]]

With ``--layers``, TensorRT's own per-layer times instead (an ``IProfiler`` on the decode / BERT context;
TensorRT then times every layer of every call, so the total is above the un-profiled step): the N slowest
layers by mean time (``--layers N``, default 30), with the names TensorRT gave them, which say which ONNX nodes a
kernel came from.
"""
import argparse
import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    hook = None
    if os.environ.get("EET_CC_SHIM"):
        sys.path.insert(0, os.environ["EET_CC_SHIM"])
        import cc_shim

        cc_shim.load()
        hook = cc_shim.faked_capability
    p = argparse.ArgumentParser()
    p.add_argument("directory")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--past", type=int, default=512)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--cuda-graphs", default="off")
    p.add_argument("--specialization", default="auto")
    p.add_argument("--layers", type=int, nargs="?", const=30, default=0, metavar="N",
                   help="per-layer times from TensorRT's IProfiler: the N slowest layers (default 30)")
    args = p.parse_args()
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    import eet.runtime
    from eet.runtime.bert import pack

    torch.cuda.init()
    with eet.runtime.load(args.directory, deserialize_hook=hook, cuda_graphs=args.cuda_graphs,
                          specialization=args.specialization) as engine:
        rng = np.random.default_rng(0)
        if engine.family == "gpt2":
            ids = rng.integers(0, engine.limits.vocab_size, (args.batch, args.past)).astype(np.int32)
            pads = np.zeros(args.batch, np.int32)
            engine(ids, pads, 0, {})
            tok = np.zeros((args.batch, 1), np.int32)
            for _ in range(3):
                engine(tok, pads, args.past, {})
            run = lambda: engine(tok, pads, args.past, {})  # noqa: E731
        else:
            lengths = rng.integers(32, 513, args.batch)
            feeds = pack([rng.integers(0, engine.limits.vocab_size, n).tolist() for n in lengths])
            engine.run_packed(feeds)
            run = lambda: engine.run_packed(feeds, copy=False)  # noqa: E731
        if args.layers:
            trt = engine.trt.module
            times = {}

            class LayerTimes(trt.IProfiler):
                def __init__(self):
                    trt.IProfiler.__init__(self)

                def report_layer_time(self, name, ms):
                    times.setdefault(name, []).append(ms)

            context = engine.contexts[-1].context  # GPT-2: the decode profile; BERT: its only one
            context.profiler = LayerTimes()
            for _ in range(args.iters):
                run()
            total = sum(sum(v) for v in times.values()) / args.iters
            print(f"{len(times)} layers, {total * 1e3:.1f} us per call (profiled)")
            for name, v in sorted(times.items(), key=lambda kv: -sum(kv[1]))[:args.layers]:
                print(f"{sum(v) / len(v) * 1e3:8.2f} us  x{len(v) // args.iters}  {name[:100]}")
            sys.exit(0)
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(args.iters):
                run()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90))
