"""``eet run DIR``: run a built engine on the GPU from the command line.

BERT: ``eet run DIR --text "a sentence" --text "another"`` (with a tokenizer) or ``--ids "101 2023 102"``
(repeatable); prints each sequence's length and the first values of its first-token vector, and with
``--save OUT.npz`` writes ``first_token`` [B, H], ``mean_pooled`` [B, H] and ``hidden_<i>`` [L_i, H].

GPT-2: ``eet run DIR --prompt "Hello" --max-new-tokens 32`` or ``--ids "15496 11"`` (repeatable), greedy by
default or ``--temperature/--top-k/--top-p/--seed`` (engines built with --sample-candidates); tokens are
printed as they are produced (``--random N`` makes N random prompts, for engines with random weights).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from eet.errors import EetError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eet run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory", metavar="DIR", help="a directory written by `eet build`")
    p.add_argument("--text", "--prompt", action="append", default=[], dest="texts", metavar="TEXT",
                   help="an input text (repeatable; needs the model's tokenizer)")
    p.add_argument("--ids", action="append", default=[], metavar="'ID ID ...'",
                   help="an input as space-separated token ids (repeatable)")
    p.add_argument("--random", type=int, default=0, metavar="N", help="N random inputs of random length")
    p.add_argument("--seed", type=int, default=0, help="seed of --random and of sampling (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="GPT-2: tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="GPT-2: 0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="GPT-2 sampling: keep the k most likely (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="GPT-2 sampling: nucleus mass (1: off)")
    p.add_argument("--eos", type=int, default=None, metavar="ID",
                   help="GPT-2: stop a row at this token (default: the model's EOS; -1: never)")
    p.add_argument("--save", metavar="OUT.npz", help="BERT: write the outputs to this file")
    p.add_argument("--device", type=int, default=0, help="CUDA device ordinal (default 0)")
    p.add_argument("--runtime-cache", default="auto", metavar="FILE|auto|none",
                   help="file of TensorRT-RTX's compiled kernels, read at load and written at exit (default auto: "
                        "DIR/runtime_cache/, named by plan and GPU; none: compile in every run)")
    return p


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError as exc:
        raise EetError(f"--ids takes space-separated integers, got {text!r}") from exc
    if not ids:
        raise EetError("--ids got an empty list")
    return ids


def inputs_from_args(args, engine) -> list:
    """The batch from --text / --ids / --random (exactly one kind)."""
    given = [bool(args.texts), bool(args.ids), args.random > 0]
    if sum(given) != 1:
        raise EetError("give the inputs with exactly one of --text/--prompt, --ids or --random N")
    if args.texts:
        return list(args.texts)
    if args.ids:
        return [parse_ids(s) for s in args.ids]
    rng = np.random.default_rng(args.seed)
    if engine.family == "bert":
        longest, vocab = min(engine.limits.max_seq, 128), engine.limits.vocab_size
    else:
        longest, vocab = min(engine.limits.max_prompt, 32), engine.limits.vocab_size
    return [rng.integers(0, vocab, int(rng.integers(1, longest + 1))).tolist() for _ in range(args.random)]


def run_bert(engine, batch, args, out=print) -> None:
    enc = engine.encode(batch)
    out(f"{len(batch)} sequences, {int(enc.lengths.sum())} tokens, {enc.calls} engine call(s)")
    for i, (n, vec) in enumerate(zip(enc.lengths, enc.first_token)):
        out(f"  [{i}] {int(n):4d} tokens  first token: [{', '.join(f'{v:+.4f}' for v in vec[:6])}, ...]  "
            f"norm {np.linalg.norm(vec):.4f}")
    if args.save:
        arrays = {"first_token": enc.first_token, "mean_pooled": enc.mean_pooled(), "lengths": enc.lengths}
        arrays.update({f"hidden_{i}": h for i, h in enumerate(enc.hidden_states)})
        np.savez(args.save, **arrays)
        out(f"saved {args.save}")


def run_gpt2(engine, batch, args, out=print) -> None:
    from eet.runtime.gpt2 import MODEL_EOS

    eos = MODEL_EOS if args.eos is None else (None if args.eos < 0 else args.eos)
    tokenizer = engine.tokenizer()
    single = len(batch) == 1

    def show(step):  # stream a single prompt's text (or ids) as it is produced
        if single and step.tokens[0] >= 0:
            t = int(step.tokens[0])
            sys.stdout.write(tokenizer.decode([t]) if tokenizer is not None else f"{t} ")
            sys.stdout.flush()

    result = engine.generate(batch, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, seed=args.seed, eos_token_id=eos, on_step=show)
    if single:
        out("")
    else:
        for i, tokens in enumerate(result.tokens):
            text = f"  {result.texts[i]!r}" if result.texts is not None else ""
            out(f"[{i}] {tokens}{text}")
    out(f"{result.new_tokens} new tokens in {result.steps} steps, {result.seconds * 1e3:.1f} ms "
        f"({result.new_tokens / result.seconds:.0f} tokens/s, first call included)")


def main(argv: list[str] | None = None, deserialize_hook=None) -> int:
    """``eet run DIR ...`` (``deserialize_hook``: see :func:`eet.runtime.engine.load`)."""
    args = parser().parse_args(argv)
    import eet.runtime

    cache = None if args.runtime_cache == "none" else args.runtime_cache
    with eet.runtime.load(args.directory, device=args.device, runtime_cache=cache,
                          deserialize_hook=deserialize_hook) as engine:
        print(engine.describe())
        batch = inputs_from_args(args, engine)
        (run_bert if engine.family == "bert" else run_gpt2)(engine, batch, args)
    return 0
