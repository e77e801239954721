"""``eet bench DIR``: the engine's latency and throughput against what a user runs without EET, in one process
on one GPU, the same inputs for all.

BERT (a ragged batch of ``--batch`` sequences with lengths U[``--min-len``, ``--max-len``]):
  - EET engine: one engine call on the packed batch (device time, CUDA events), and ``encode()`` end to end
    (token-id lists in; NumPy out, and CUDA tensors out with ``output="torch"``);
  - Hugging Face PyTorch (SDPA, the engine's dtype) on the padded batch with its attention mask: the model call
    alone (inputs already on the GPU, device time), and end to end as a user writes it (id lists padded and
    copied in, hidden states copied out to NumPy and cut to each sequence's length);
  - the plain TensorRT engine of the same export without the EET rewrite (``plain.plan``, padded batch with
    the mask; build it with ``eet build bert --plain-baseline``).
  Real tokens/s count the sequences' own tokens only.

GPT-2 (``--batch`` prompts with lengths U[``--min-len``, ``--max-len``), ``--new-tokens`` generated):
  - a decode step at past length ``--past`` for the whole batch: EET engine (CUDA-graph replay, device time;
    and one host-driven step with its copies), Hugging Face (one forward with a KV cache of that length), and
    the plain TensorRT engine of the export with the KV cache as inputs and outputs (``plain.plan``, built by
    ``eet build gpt2 --plain-baseline``);
  - ``generate()``: new tokens/s for the batch, EET vs Hugging Face ``generate`` (greedy, left-padded), with SDPA
    and with eager attention (the issue's baseline).

Times are medians of ``--iters`` runs after warm-up (CUDA events for device times, perf_counter with a
synchronize for end-to-end times); ``generate`` (EET and Hugging Face alike) is the median of
:data:`GENERATE_RUNS` runs after one warm-up run.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import numpy as np

from eet.errors import EetError

GENERATE_RUNS = 3
"""Timed ``generate`` runs per side (Hugging Face's time moves between runs: one run is not enough)."""


def median_ms(fn: Callable[[], None], iters: int, warmup: int = 3, events=None, sync=None) -> float:
    """Median milliseconds of ``fn``: timed with a (start, end, stream) of CUDA events when given, else with
    perf_counter and ``sync()`` after each call."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(iters):
        if events is not None:
            start, end, record = events
            record(start)
            fn()
            record(end)
            end.synchronize()
            times.append(start.time_till(end) if hasattr(start, "time_till") else start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def ragged_lengths(rng, batch: int, lo: int, hi: int) -> list[int]:
    return rng.integers(lo, hi + 1, size=batch).tolist()


def _torch_events(torch):
    stream = torch.cuda.current_stream()
    return (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True),
            lambda e: e.record(stream))


def _pycuda_events(engine, ctx):
    start, end = engine.device.event(), engine.device.event()
    return (start, end, lambda e: e.record(ctx.stream))


def _hf_model(info, dtype: str):
    import torch

    from eet.commands.check import load_reference_model
    from eet.exporter.common import set_attention

    model = load_reference_model(info).model.cuda().eval()
    set_attention(model, "sdpa")
    return model.half() if dtype == "fp16" else model, torch


def bench_bert(engine, args, out=print, deserialize_hook=None) -> list[dict]:
    from eet.runtime.bert import pack

    rng = np.random.default_rng(args.seed)
    lim = engine.limits
    hi = min(args.max_len, lim.max_seq)
    lengths = ragged_lengths(rng, min(args.batch, lim.max_batch), min(args.min_len, hi), hi)
    if sum(lengths) > lim.max_tokens:
        raise EetError(f"the batch has {sum(lengths)} tokens, over the engine's --max-tokens {lim.max_tokens}; "
                       "lower --batch / --max-len or rebuild with a larger --max-tokens")
    seqs = [rng.integers(0, lim.vocab_size, n).tolist() for n in lengths]
    tokens = sum(lengths)
    out(f"BERT {engine.info['dtype']}: {len(seqs)} sequences, lengths U[{min(lengths)}, {max(lengths)}], "
        f"{tokens} real tokens ({len(seqs) * max(lengths)} padded)")
    rows = []
    # EET: one engine call on the packed batch (inputs already on the device), and encode() end to end
    feeds = pack(seqs)
    engine.run_packed(feeds)
    ctx = engine.contexts[0]
    eet_ms = median_ms(ctx.execute, args.iters, events=_pycuda_events(engine, ctx))
    e2e_iters = max(3, args.iters // 4)
    e2e_ms = median_ms(lambda: engine.encode(seqs), e2e_iters, sync=ctx.stream.synchronize)
    rows.append({"case": "EET engine (packed)", "ms": eet_ms})
    rows.append({"case": "EET encode() end to end (id lists in, NumPy out)", "ms": e2e_ms})
    # Hugging Face PyTorch, padded batch with mask
    model, torch = _hf_model(engine.info, engine.info["dtype"])
    torch_ms = median_ms(lambda: engine.encode(seqs, output="torch"), e2e_iters, sync=torch.cuda.synchronize)
    rows.append({"case": "EET encode(output='torch') end to end (id lists in, CUDA tensors out)", "ms": torch_ms})
    s = max(lengths)

    def hf_inputs():
        ids = torch.zeros((len(seqs), s), dtype=torch.long)
        mask = torch.zeros((len(seqs), s), dtype=torch.long)
        for i, q in enumerate(seqs):
            ids[i, : len(q)] = torch.tensor(q)
            mask[i, : len(q)] = 1
        return ids.cuda(), mask.cuda()

    def hf_end_to_end():  # what a Hugging Face user writes for encode(): pad, run, copy out, cut the padding off
        ids, mask = hf_inputs()
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state.cpu().numpy()
        return [hidden[i, : len(q)] for i, q in enumerate(seqs)]

    ids, mask = hf_inputs()
    with torch.no_grad():
        hf_ms = median_ms(lambda: model(input_ids=ids, attention_mask=mask), args.iters, events=_torch_events(torch))
        hf_e2e_ms = median_ms(hf_end_to_end, e2e_iters, sync=torch.cuda.synchronize)
    rows.append({"case": f"Hugging Face PyTorch SDPA ({engine.info['dtype']}, padded)", "ms": hf_ms})
    rows.append({"case": "Hugging Face end to end (id lists in, padded, NumPy out)", "ms": hf_e2e_ms})
    model = None  # frees the Hugging Face weights before the plain engine loads
    torch.cuda.empty_cache()
    # the plain TensorRT engine (no EET rewrite), padded batch with mask
    if (engine.directory / "plain.plan").is_file():
        host = {"input_ids": ids.cpu().numpy(), "attention_mask": mask.cpu().numpy(),
                "token_type_ids": np.zeros_like(ids.cpu().numpy()),
                "position_ids": np.tile(np.arange(s), (len(seqs), 1))}
        plain_ms = plain_engine_ms(engine.directory, lambda names: host, args, deserialize_hook)
        rows.append({"case": "plain TensorRT engine (no EET rewrite, padded)", "ms": plain_ms})
    else:
        out("(plain TensorRT baseline skipped: build with `eet build bert --plain-baseline`)")
    for r in rows:
        r["real_tokens_per_s"] = tokens / (r["ms"] / 1e3)
        r["speedup_vs_hf"] = hf_ms / r["ms"]
    return rows


def plain_engine_ms(directory, inputs: Callable[[list[str]], dict], args, deserialize_hook=None) -> float:
    """Device time (CUDA events, median of ``args.iters``) of one call of ``DIR/plain.plan`` (``eet build
    --plain-baseline``) on ``inputs(input names)``: name -> array, cast to the engine's dtypes."""
    from eet.runtime.engine import load_plain

    with load_plain(directory, specialization=args.specialization, deserialize_hook=deserialize_hook) as plain:
        ctx = plain.contexts[0]
        for name, value in inputs(plain.input_names).items():
            arr = np.ascontiguousarray(value.astype(plain.io[name].dtype))
            plain.upload(ctx, name, arr)
            ctx.set_shapes({name: arr.shape})
        ctx.stream.synchronize()
        return median_ms(ctx.execute, args.iters, events=_pycuda_events(plain, ctx))


def plain_decode_step_ms(engine, batch: int, past: int, args, deserialize_hook=None) -> float:
    """:func:`plain_engine_ms` of the GPT-2 plain decode step: ``batch`` rows, one new token each, a past of
    ``past`` positions fed as inputs (random values)."""
    rng = np.random.default_rng(args.seed)
    heads, _, head_dim = engine.cache_geometry
    token = {"input_ids": rng.integers(0, engine.limits.vocab_size, (batch, 1)),
             "attention_mask": np.ones((batch, past + 1)), "position_ids": np.full((batch, 1), past)}

    def inputs(names):  # the rest are past_key.l / past_value.l
        return {name: token[name] if name in token else rng.standard_normal((batch, heads, past, head_dim))
                for name in names}

    return plain_engine_ms(engine.directory, inputs, args, deserialize_hook)


def bench_gpt2(engine, args, out=print, deserialize_hook=None) -> list[dict]:
    lim = engine.limits
    rng = np.random.default_rng(args.seed)
    batch = min(args.batch, lim.max_batch)
    past = min(args.past, lim.max_len - 1, lim.max_prompt)
    dtype = engine.info["dtype"]
    out(f"GPT-2 {dtype}: decode step with batch {batch}, past {past}; generate {batch} prompts "
        f"U[{args.min_len}, {min(args.max_len, lim.max_prompt)}) + {args.new_tokens} tokens")
    rows = []
    # EET decode step: fill the cache with a full-length prompt batch, then replay the step at position `past`
    prompts = [rng.integers(0, lim.vocab_size, past).tolist() for _ in range(batch)]
    ids, pads = np.array(prompts, dtype=np.int32), np.zeros(batch, np.int32)
    engine(ids, pads, 0, {})
    token = np.zeros((batch, 1), np.int32)
    for _ in range(3):  # warm, then captured
        engine(token, pads, past, {})
    ctx = engine.contexts[engine.DECODE]
    graph = engine._graphs.get(batch)
    replay = graph.launch if graph is not None else ctx.execute
    step_ms = median_ms(replay, args.iters, events=_pycuda_events(engine, ctx))
    host_ms = median_ms(lambda: engine(token, pads, past, {}), args.iters, sync=lambda: None)
    rows.append({"case": f"EET decode step, device (graphs: {engine.graphs})", "ms": step_ms})
    rows.append({"case": "EET decode step, host-driven (copies + sync)", "ms": host_ms})
    # Hugging Face decode step with a KV cache of `past`
    from eet.exporter.common import cache_kwargs, output_cache

    model, torch = _hf_model(engine.info, dtype)
    with torch.no_grad():
        t_ids = torch.tensor(prompts, device="cuda")
        cache = output_cache(model(input_ids=t_ids, use_cache=True))
        nxt = torch.zeros((batch, 1), dtype=torch.long, device="cuda")
        mask = torch.ones((batch, past + 1), dtype=torch.long, device="cuda")

        def hf_step():
            model(input_ids=nxt, attention_mask=mask, use_cache=True, **cache_kwargs(model, cache))
            cache.crop(past)

        hf_step_ms = median_ms(hf_step, args.iters, events=_torch_events(torch))
    rows.append({"case": f"Hugging Face decode step (SDPA, {dtype})", "ms": hf_step_ms})
    if (engine.directory / "plain.plan").is_file():
        rows.append({"case": "plain TensorRT engine decode step (no EET rewrite: past in, presents out)",
                     "ms": plain_decode_step_ms(engine, batch, past, args, deserialize_hook)})
    else:
        out("(plain TensorRT baseline skipped: build with `eet build gpt2 --plain-baseline`)")
    for r in rows:
        r["speedup_vs_hf"] = hf_step_ms / r["ms"]
    # generate: new tokens/s
    hi = min(args.max_len, lim.max_prompt)
    lengths = ragged_lengths(rng, batch, min(args.min_len, hi - 1), hi - 1)
    gen_prompts = [rng.integers(0, lim.vocab_size, n).tolist() for n in lengths]
    new = min(args.new_tokens, lim.max_len - max(lengths))
    engine.generate(gen_prompts, new, eos_token_id=None)  # warm: kernels for these shapes, graphs
    eet_s = statistics.median(engine.generate(gen_prompts, new, eos_token_id=None).seconds
                              for _ in range(GENERATE_RUNS))
    from eet.runtime.generation import left_pad

    pids, ppads = left_pad(gen_prompts)
    hmask = (np.arange(pids.shape[1])[None, :] >= ppads[:, None]).astype(np.int64)
    hids, hmask = torch.from_numpy(pids.astype(np.int64)).cuda(), torch.from_numpy(hmask).cuda()

    def hf_generate_s() -> float:
        """Median seconds of GENERATE_RUNS Hugging Face generate runs after a warm-up run."""
        return median_ms(lambda: model.generate(hids, attention_mask=hmask, max_new_tokens=new, min_new_tokens=new,
                                                do_sample=False, pad_token_id=0),
                         GENERATE_RUNS, warmup=1, sync=torch.cuda.synchronize) / 1e3

    from eet.exporter.common import set_attention

    with torch.no_grad():
        hf_s = hf_generate_s()
        set_attention(model, "eager")  # the generate baseline: Hugging Face's eager attention
        eager_s = hf_generate_s()
        set_attention(model, "sdpa")
    n_new = batch * new
    gen_rows = [{"case": f"EET generate() ({batch} prompts, +{new} tokens)", "ms": eet_s * 1e3,
                 "new_tokens_per_s": n_new / eet_s, "speedup_vs_hf": hf_s / eet_s, "speedup_vs_eager": eager_s / eet_s},
                {"case": f"Hugging Face generate (SDPA, {dtype}, greedy, left-padded)", "ms": hf_s * 1e3,
                 "new_tokens_per_s": n_new / hf_s, "speedup_vs_hf": 1.0},
                {"case": f"Hugging Face generate (eager attention, {dtype}, greedy, left-padded)", "ms": eager_s * 1e3,
                 "new_tokens_per_s": n_new / eager_s, "speedup_vs_hf": hf_s / eager_s}]
    return rows + gen_rows


def table(rows: list[dict]) -> str:
    cols = [c for c in ("ms", "real_tokens_per_s", "new_tokens_per_s", "speedup_vs_hf") if any(c in r for r in rows)]
    head = "| case | " + " | ".join({"ms": "time (ms)", "real_tokens_per_s": "real tokens/s",
                                      "new_tokens_per_s": "new tokens/s", "speedup_vs_hf": "x Hugging Face"}[c]
                                     for c in cols) + " |"
    lines = [head, "|" + " --- |" * (len(cols) + 1)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("-" if v is None else f"{v:.3f}" if c == "ms" else f"{v:.2f}x" if c == "speedup_vs_hf"
                         else f"{v:,.0f}")
        lines.append(f"| {r['case']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eet bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory", metavar="DIR", help="a directory written by `eet build`")
    p.add_argument("--batch", type=int, default=32, help="sequences / prompts (default 32)")
    p.add_argument("--min-len", type=int, default=None, help="shortest sequence / prompt (default 32 / 16)")
    p.add_argument("--max-len", type=int, default=512, help="longest sequence / prompt (default 512)")
    p.add_argument("--past", type=int, default=512, help="GPT-2: past length of the decode step (default 512)")
    p.add_argument("--new-tokens", type=int, default=128, help="GPT-2: tokens to generate (default 128)")
    p.add_argument("--iters", type=int, default=50, help="timed runs per measurement (default 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="also write the rows as JSON")
    p.add_argument("--device", type=int, default=0)
    p.add_argument("--cuda-graphs", choices=("auto", "engine", "stream", "off"), default="auto",
                   help="CUDA graphs: the GPT-2 decode step, BERT calls per shape bucket "
                   "(see eet.runtime.engine.GRAPH_MODES)")
    p.add_argument("--specialization", choices=("auto", "lazy", "eager", "none"), default="eager",
                   help="TensorRT-RTX shape-specialized kernels (eet.runtime.engine.SPECIALIZATION_MODES); default "
                   "eager: every timed shape runs its specialized kernels, as a fixed-shape service gets them")
    return p


def main(argv: list[str] | None = None, deserialize_hook=None) -> int:
    """``eet bench DIR ...`` (``deserialize_hook``: see :func:`eet.runtime.engine.load`)."""
    args = parser().parse_args(argv)
    import json

    import eet.runtime

    with eet.runtime.load(args.directory, device=args.device, deserialize_hook=deserialize_hook,
                          cuda_graphs=args.cuda_graphs, specialization=args.specialization) as engine:
        print(engine.describe())
        import torch

        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
        if engine.family == "bert":
            args.min_len = 32 if args.min_len is None else args.min_len
            rows = bench_bert(engine, args, deserialize_hook=deserialize_hook)
        else:
            args.min_len = 16 if args.min_len is None else args.min_len
            rows = bench_gpt2(engine, args, deserialize_hook=deserialize_hook)
    print(f"kernel specialization: {args.specialization}")
    print(table(rows))
    for r in rows:
        if "speedup_vs_eager" in r:
            print(f"{r['case']}: {r['speedup_vs_eager']:.2f}x Hugging Face generate with eager attention")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0
