"""Start-up and fresh-request timings of a built engine, one process per run (what the README's runtime-cache and
shape-bucket tables report):

    python scripts/bench_startup.py DIR startup [--runtime-cache auto|none]
        load() time, the first call and a second identical call; GPT-2: generate() of 32 prompts U[16, 512) +
        16 tokens, BERT: encode() of 32 sequences U[32, 512] (seed 0)
    python scripts/bench_startup.py DIR stream [--buckets on|off] [--runtime-cache auto|none] [--seed N]
                                               [--batch fixed|random] [--warm-up]
        a stream of fresh requests: BERT 30 encode() calls of 31 sequences U[32, 512], GPT-2 10 generate() of
        32 prompts U[16, 512) + 16 tokens; per-call milliseconds and the total. ``--batch random``: each request
        has U[1, --max-batch] sequences or prompts instead (BERT 30 calls, GPT-2 20). ``--warm-up``: load()
        runs every shape bucket first (``load(warm_up=True)``; its time is in the load time)

On GPUs TensorRT-RTX does not list (H100/H200), set EET_CC_SHIM to the test shim's folder: plans are then
deserialized through it (benchmarks only; the product never loads it). Host wall-clock times (time.perf_counter).
"""
import argparse
import os
import statistics
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory")
    p.add_argument("mode", choices=("startup", "stream"))
    p.add_argument("--buckets", choices=("on", "off"), default="on")
    p.add_argument("--runtime-cache", choices=("auto", "none"), default="auto")
    p.add_argument("--seed", type=int, default=None, help="default: 0 for startup, 1 for stream")
    p.add_argument("--batch", choices=("fixed", "random"), default="fixed", help="stream: request sizes")
    p.add_argument("--warm-up", action="store_true", help="load(warm_up=True): every shape bucket runs at load")
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the source checkout
    hook = None
    if os.environ.get("EET_CC_SHIM"):
        sys.path.insert(0, os.environ["EET_CC_SHIM"])
        import cc_shim

        cc_shim.load()  # before anything initializes CUDA
        hook = cc_shim.faked_capability
    import numpy as np

    import eet.runtime
    from eet.commands.bench import ragged_lengths

    rng = np.random.default_rng(args.seed if args.seed is not None else (0 if args.mode == "startup" else 1))
    cache = None if args.runtime_cache == "none" else "auto"
    t0 = time.perf_counter()
    with eet.runtime.load(args.directory, deserialize_hook=hook, runtime_cache=cache,
                          shape_buckets=args.buckets == "on", warm_up=args.warm_up) as engine:
        loaded = time.perf_counter() - t0
        gpt2 = engine.family == "gpt2"
        vocab = engine.limits.vocab_size

        def request(batch):
            if gpt2:
                prompts = [rng.integers(0, vocab, n).tolist() for n in ragged_lengths(rng, batch, 16, 511)]
                return lambda: engine.generate(prompts, 16, eos_token_id=None)
            seqs = [rng.integers(0, vocab, n).tolist() for n in ragged_lengths(rng, batch, 32, 512)]
            return lambda: engine.encode(seqs)

        def timed(call):
            t = time.perf_counter()
            call()
            return (time.perf_counter() - t) * 1e3

        if args.mode == "startup":
            call = request(32)
            first, second = timed(call), timed(call)
            read = len(engine.runtime_cache.on_disk)
            print(f"{engine.family} runtime cache {args.runtime_cache} (read {read} B): load {loaded:.2f} s, first "
                  f"call {first / 1e3:.2f} s, second {second:.1f} ms")
        else:
            if args.batch == "random":
                sizes = rng.integers(1, engine.limits.max_batch + 1, 20 if gpt2 else 30).tolist()
            else:
                sizes = [32 if gpt2 else 31] * (10 if gpt2 else 30)
            ms = [timed(request(b)) for b in sizes]
            print(f"{engine.family} buckets {args.buckets}, runtime cache {args.runtime_cache} (file "
                  f"{len(engine.runtime_cache.on_disk)} B), warm-up {args.warm_up}, batch {args.batch}: "
                  f"load {loaded:.2f} s, calls {sum(ms) / 1e3:.2f} s in all, median {statistics.median(ms):.1f} ms; "
                  f"{list(zip(sizes, [round(x) for x in ms]))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
