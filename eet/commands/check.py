"""``eet check DIR``: accuracy of a built engine's graph, on a machine without a TensorRT GPU.

GPT-2 (:func:`run_check_gpt2`): greedy generation for a left-padded batch of random-length prompts through the
rewritten graph with the plugin references must reproduce Hugging Face ``generate`` token for token, on the
batch and for each prompt alone (fp32), with logits within tolerance.

BERT (:func:`run_check`), three runs on the same random ragged batch:

- ``huggingface``: the Hugging Face model in PyTorch, fp32, padded batch with attention mask;
- ``onnxruntime``: ``original.onnx`` in ONNX Runtime (CPU), same padded batch;
- ``eet-reference``: ``model.onnx`` (packed, the engine's graph and dtype) with each EET plugin run by its
  NumPy reference (``onnx.reference``).

Padded outputs are unpacked to the engine's layout (``hidden_states`` [T, H], ``first_token_states``
[B, H]) and Polygraphy's comparator reports max abs/rel error per output against the tolerances of the
engine's dtype. Exit status 1 on FAIL. The engine itself is not executed here.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eet.errors import EetError

TOLERANCES = {"fp32": (1e-4, 1e-3), "fp16": (2e-2, 2e-2)}
"""dtype -> (atol, rtol), elementwise ``|a - b| <= atol + rtol * |b|`` against ONNX Runtime / Hugging Face
fp32. fp16 allows for fp16 GEMM/GELU rounding through every layer (LayerNorm and softmax are fp32)."""


@dataclass
class RaggedBatch:
    """A batch of B token sequences of different lengths, padded and packed.

    Attributes:
        lengths: int [B].
        ids, token_types: int64 [B, S] (padded with 0), mask: int64 [B, S] (1 = real token).
    """

    lengths: np.ndarray
    ids: np.ndarray
    token_types: np.ndarray
    mask: np.ndarray

    @property
    def positions(self) -> np.ndarray:
        b, s = self.ids.shape
        return np.tile(np.arange(s, dtype=np.int64), (b, 1))

    def unpad(self, x: np.ndarray) -> np.ndarray:
        """[B, S, ...] -> packed [T, ...]."""
        return np.concatenate([x[b, :n] for b, n in enumerate(self.lengths)])

    def packed_feeds(self, max_seqlen: int | None = None) -> dict[str, np.ndarray]:
        """The packed engine inputs (int32)."""
        cu = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int32)
        return {
            "input_ids": self.unpad(self.ids).astype(np.int32),
            "token_type_ids": self.unpad(self.token_types).astype(np.int32),
            "position_ids": np.concatenate([np.arange(n) for n in self.lengths]).astype(np.int32),
            "cu_seqlens": cu,
            "max_seqlen": np.zeros(max_seqlen or int(self.lengths.max()), np.int32),
        }


def ragged_batch(rng: np.random.Generator, batch: int, max_len: int, vocab: int, type_vocab: int = 2,
                 ) -> RaggedBatch:
    """Random lengths in [1, max_len] (one sequence of length 1 and one of max_len when batch >= 2)."""
    lengths = rng.integers(1, max_len + 1, size=batch)
    if batch >= 2:
        lengths[rng.permutation(batch)[:2]] = (1, max_len)
    s = int(lengths.max())
    mask = (np.arange(s)[None, :] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(0, vocab, size=(batch, s)) * mask
    types = rng.integers(0, type_vocab, size=(batch, s)) * mask
    return RaggedBatch(lengths=lengths, ids=ids, token_types=types, mask=mask)


def load_reference_model(info: dict):
    """The Hugging Face model the engine was built from (random weights are rebuilt from their seed and
    checked against the recorded fingerprint)."""
    from eet.commands.build import weights_fingerprint
    from eet.exporter import bert, gpt2
    from eet.exporter.common import set_attention

    load = {"bert": bert.load_bert, "gpt2": gpt2.load_gpt2}[info["family"]]
    source = info["model"]["source"]
    kind = source["kind"]
    if kind == "package":
        loaded = load(None, None)
    elif kind == "directory":
        loaded = load(source["path"], None)
    elif kind in ("preset", "config"):
        loaded = load(None, source.get("name") or source.get("path"), seed=source.get("seed", 0))
    else:
        raise EetError(f"unknown model source {kind!r} in the sidecar")
    if weights_fingerprint(loaded.model) != info["model"]["weights_sha256"]:
        raise EetError("the Hugging Face weights differ from the ones the engine was built from (another "
                       "torch version draws other random weights, or the model directory changed); rebuild")
    set_attention(loaded.model, "eager")
    return loaded


LOGIT_TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2}
"""dtype -> bound of max |logits - Hugging Face fp32 logits| / max |Hugging Face logits| per step (GPT-2)."""


def random_prompts(rng: np.random.Generator, batch: int, max_len: int, vocab: int) -> list[list[int]]:
    """Prompts of random lengths in [1, max_len] (one of length 1 and one of max_len when batch >= 2)."""
    lengths = rng.integers(1, max_len + 1, size=batch)
    if batch >= 2:
        lengths[rng.permutation(batch)[:2]] = (1, max_len)
    return [rng.integers(0, vocab, size=int(n)).tolist() for n in lengths]


def hf_greedy(model, prompts, new_tokens: int):
    """Hugging Face ``generate`` (greedy, fp32) on the left-padded batch: (tokens per prompt, logits per step)."""
    import torch

    from eet.runtime.generation import left_pad

    ids, pads = left_pad(prompts)
    mask = (np.arange(ids.shape[1])[None, :] >= pads[:, None]).astype(np.int64)
    with torch.no_grad():
        out = model.generate(torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True, output_logits=True)
    return out.sequences[:, ids.shape[1]:].tolist(), [x.numpy() for x in out.logits]


def ort_greedy(path, prompts, new_tokens: int, logits_out: list | None = None):
    """Greedy generation with the plain export in ONNX Runtime, recomputing the whole sequence every step
    (appends each step's last-position logits [B, V] to ``logits_out`` when given)."""
    import onnxruntime as ort

    from eet.runtime.generation import left_pad

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids, pads = left_pad(prompts)
    ids = ids.astype(np.int64)
    new = []
    for _ in range(new_tokens):
        mask = (np.arange(ids.shape[1])[None, :] >= pads[:, None]).astype(np.int64)
        positions = np.maximum(np.arange(ids.shape[1])[None, :] - pads[:, None], 0).astype(np.int64)
        (logits,) = session.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": positions})
        token = logits[:, -1].argmax(-1)
        if logits_out is not None:
            logits_out.append(logits[:, -1].astype(np.float64))
        new.append(token)
        ids = np.concatenate([ids, token[:, None]], axis=1)
    return np.stack(new, axis=1).tolist()


def run_check_gpt2(directory: str | Path, batch: int = 4, max_len: int = 24, new_tokens: int = 12,
                   seed: int | None = None, out=print) -> bool:
    """Greedy tokens and logits of the rewritten GPT-2 graph (plugin references) against Hugging Face and
    ONNX Runtime on a left-padded batch of random-length prompts; returns True on PASS."""
    import onnx

    from eet.runtime import sidecar
    from eet.runtime.generation import Limits, ReferenceStep, greedy

    folder = Path(directory)
    info = sidecar.read(folder, verify_plan=False)
    gen, model_info = info["generation"], info["model"]
    if batch < 1 or max_len < 1 or new_tokens < 1:
        raise EetError("--batch, --max-len and --new-tokens must be positive")
    limits = Limits(gen["max_batch"], gen["max_prompt"], gen["max_len"], gen["vocab_size"])
    seed = int(np.random.SeedSequence().entropy % 2**31) if seed is None else seed
    prompts = random_prompts(np.random.default_rng(seed), batch, max_len, gen["vocab_size"])
    limits.check(prompts, new_tokens)
    out(f"prompts: seed {seed}, {batch} prompts, lengths {[len(p) for p in prompts]}, {new_tokens} new tokens")
    loaded = load_reference_model(info)
    hf_batch, hf_logits = hf_greedy(loaded.model, prompts, new_tokens)
    hf_alone = [hf_greedy(loaded.model, [p], new_tokens)[0][0] for p in prompts]
    ort_tokens = ort_greedy(folder / info["files"]["original_onnx"], prompts, new_tokens)
    step = ReferenceStep(onnx.load(str(folder / info["files"]["onnx"])), num_layers=model_info["num_layers"],
                         num_heads=model_info["num_heads"], head_dim=model_info["head_dim"], max_len=gen["max_len"])
    eet_tokens, eet_logits = greedy(step, prompts, new_tokens, limits)

    ok = True
    exact = info["dtype"] == "fp32"
    out(f"{'tokens':<40} {'agreement':>10}  first divergence  verdict")
    for name, a, b in (("eet-reference vs huggingface batch", eet_tokens, hf_batch),
                       ("eet-reference vs huggingface alone", eet_tokens, hf_alone),
                       ("huggingface batch vs alone", hf_batch, hf_alone),
                       ("onnxruntime vs huggingface alone", ort_tokens, hf_alone)):
        a, b = np.array(a), np.array(b)
        agree = (a == b).mean()
        diverged = [int(np.argmax(ra != rb)) for ra, rb in zip(a, b) if (ra != rb).any()]
        passed = agree == 1.0 or (not exact and name.startswith("eet"))
        ok &= passed
        out(f"{name:<40} {agree:>10.1%}  {('step ' + str(min(diverged))) if diverged else '-':<16}  "
            f"{'PASS' if passed else 'FAIL'}")
    # logits: compare the steps before the first token divergence (after it the inputs differ)
    same = np.array(eet_tokens) == np.array(hf_batch)
    steps = int(np.argmin(same.all(axis=0))) if not same.all() else new_tokens
    bound = LOGIT_TOLERANCES[info["dtype"]]
    worst = max((np.abs(eet_logits[i].astype(np.float64) - hf_logits[i]).max() / np.abs(hf_logits[i]).max()
                 for i in range(max(steps, 1))), default=0.0)
    passed = worst <= bound
    ok &= passed
    out(f"{'logits vs huggingface (max abs / max |logit|)':<40} {worst:>10.2e}  over {max(steps, 1)} step(s), "
        f"bound {bound:.0e}  {'PASS' if passed else 'FAIL'}")
    out("PASS" if ok else "FAIL")
    out("note: the TensorRT engine was not executed by this check (no TensorRT-capable GPU is used); it checks the "
        "graph the engine was built from, with the plugins' references")
    return ok


def ort_bert(folder: Path, info: dict, rb: RaggedBatch) -> np.ndarray:
    """``original.onnx`` in ONNX Runtime (CPU) on the padded batch: last_hidden_state [B, S, H]."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / info["files"]["original_onnx"]), providers=["CPUExecutionProvider"])
    (hidden,) = session.run(None, {"input_ids": rb.ids, "attention_mask": rb.mask,
                                   "token_type_ids": rb.token_types, "position_ids": rb.positions})
    return hidden


def compare_bert_runs(runs: dict, comparisons, out) -> bool:
    """Polygraphy's comparator over named runs of BERT outputs (``hidden_states``, ``first_token_states``).

    Args:
        runs: runner name -> {output name: array}, in order.
        comparisons: (runner index, reference runner index, (atol, rtol)) triples; a pair passes where every
            element is finite and ``|a - b| <= atol + rtol * |b|``.
        out: prints one row per comparison and output.

    Returns:
        True when every comparison passes.
    """
    from polygraphy.comparator import Comparator, RunResults, SimpleCompareFunc
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.logger import G_LOGGER

    results = RunResults()
    for name, outputs in runs.items():
        results.append((name, [IterationResult(outputs=outputs, runner_name=name)]))
    G_LOGGER.module_severity = G_LOGGER.WARNING
    names = list(runs)
    ok = True
    out(f"{'comparison':<32} {'output':<19} {'max abs':>10} {'max rel':>10} {'atol':>7} {'rtol':>7}  verdict")
    for i, j, (atol, rtol) in comparisons:
        verdict = Comparator.compare_accuracy(
            results, comparisons=[(i, j)],
            compare_func=SimpleCompareFunc(atol=atol, rtol=rtol, check_error_stat="elemwise"))
        ok &= bool(verdict)
        for output in ("hidden_states", "first_token_states"):
            a = runs[names[i]][output].astype(np.float64)
            b = runs[names[j]][output].astype(np.float64)
            diff = np.abs(a - b)
            passed = bool(np.isfinite(a).all() and (diff <= atol + rtol * np.abs(b)).all())
            ok &= passed
            out(f"{names[i] + ' vs ' + names[j]:<32} {output:<19} {diff.max():>10.3e} "
                f"{(diff / np.maximum(np.abs(b), 1e-6)).max():>10.3e} {atol:>7.0e} {rtol:>7.0e}  "
                f"{'PASS' if passed else 'FAIL'}")
    return ok


def run_check(directory: str | Path, batch: int = 6, max_len: int = 64, seed: int | None = None,
              out=print) -> bool:
    """Run the three models on one ragged batch and compare; returns True on PASS."""
    import onnx
    import torch

    from eet.plugins import onnx_reference
    from eet.runtime import sidecar

    folder = Path(directory)
    info = sidecar.read(folder, verify_plan=False)
    if info["family"] != "bert":
        raise EetError(f"{folder} holds a {info['family']} engine; this check covers BERT")
    build = info["build"]
    if batch < 1 or max_len < 1:
        raise EetError("--batch and --max-len must be positive")
    if batch > build["max_batch"] or max_len > build["max_seq"]:
        raise EetError(f"--batch {batch} / --max-len {max_len} exceed the engine's --max-batch "
                       f"{build['max_batch']} / --max-seq {build['max_seq']}")
    seed = int(np.random.SeedSequence().entropy % 2**31) if seed is None else seed
    rng = np.random.default_rng(seed)
    cfg = info["model"]["config"]
    rb = ragged_batch(rng, batch, max_len, cfg["vocab_size"], cfg.get("type_vocab_size", 2))
    out(f"ragged batch: seed {seed}, {batch} sequences, lengths {rb.lengths.tolist()} ({rb.lengths.sum()} tokens)")

    loaded = load_reference_model(info)
    with torch.no_grad():
        hf = loaded.model(input_ids=torch.from_numpy(rb.ids), attention_mask=torch.from_numpy(rb.mask),
                          token_type_ids=torch.from_numpy(rb.token_types),
                          position_ids=torch.from_numpy(rb.positions)).last_hidden_state.numpy()
    ort_out = ort_bert(folder, info, rb)
    evaluator = onnx_reference.evaluator(onnx.load(str(folder / info["files"]["onnx"])))
    hidden, first = evaluator.run(None, rb.packed_feeds())

    def packed(padded):
        return {"hidden_states": rb.unpad(padded), "first_token_states": np.ascontiguousarray(padded[:, 0])}

    runs = {"huggingface": packed(hf), "onnxruntime": packed(ort_out),
            "eet-reference": {"hidden_states": hidden.astype(np.float32),
                              "first_token_states": first.astype(np.float32)}}
    # (runner, reference runner, tolerances): the export itself is fp32, the rewritten graph has the engine's dtype
    comparisons = [(1, 0, TOLERANCES["fp32"]), (2, 0, TOLERANCES[info["dtype"]]), (2, 1, TOLERANCES[info["dtype"]])]
    ok = compare_bert_runs(runs, comparisons, out)
    out("PASS" if ok else "FAIL")
    out("note: the TensorRT engine was not executed by this check (no TensorRT-capable GPU is used); "
        "it checks the graph the engine was built from, with the plugins' references")
    return ok


ENGINE_TOLERANCES = {"fp32": (2e-2, 1e-2), "fp16": (6e-2, 2e-2)}
"""dtype -> (atol, rtol) of the executed engine against ONNX Runtime fp32, elementwise. Wider than
:data:`TOLERANCES`: TensorRT-RTX 1.7 runs fp32 GEMMs in TF32 whatever the builder flag says, and its fp16
GEMMs round more than PyTorch's (``scripts/trt_gemm_precision.py``); measured engine errors on an H100 are
in README."""
ENGINE_LOGIT_TOLERANCES = {"fp32": 5e-3, "fp16": 3e-2}
"""dtype -> bound of max |engine logits - ONNX Runtime logits| / max |ONNX Runtime logits| per step (GPT-2),
and the top-2 margin under which a greedy token may flip."""


def run_check_engine(directory: str | Path, batch: int, max_len: int, seed: int | None, new_tokens: int = 12,
                     out=print, deserialize_hook=None) -> bool:
    """Execute the engine on the GPU (:func:`eet.runtime.load`) and compare it with ``original.onnx`` in ONNX
    Runtime on the same inputs through Polygraphy's comparator; returns True on PASS.

    BERT: a ragged batch, packed for the engine and padded for ONNX Runtime. GPT-2: greedy generation for a
    left-padded batch; tokens must equal ONNX Runtime's except where ONNX Runtime's own top-2 margin is within
    the dtype's logit tolerance (then the rows continue differently and are compared up to there), and each
    step's logits must be within that tolerance."""
    import eet.runtime

    folder = Path(directory)
    seed = int(np.random.SeedSequence().entropy % 2**31) if seed is None else seed
    rng = np.random.default_rng(seed)
    with eet.runtime.load(folder, deserialize_hook=deserialize_hook) as engine:
        out(f"executing {engine.describe()}")
        info, dtype = engine.info, engine.info["dtype"]
        if engine.family == "bert":
            if batch > engine.limits.max_batch or max_len > engine.limits.max_seq:
                raise EetError(f"--batch {batch} / --max-len {max_len} exceed the engine's --max-batch "
                               f"{engine.limits.max_batch} / --max-seq {engine.limits.max_seq}")
            cfg = info["model"]["config"]
            rb = ragged_batch(rng, batch, max_len, cfg["vocab_size"], cfg.get("type_vocab_size", 2))
            out(f"ragged batch: seed {seed}, {batch} sequences, lengths {rb.lengths.tolist()}")
            hidden, first = engine.run_packed(rb.packed_feeds())
            ref = ort_bert(folder, info, rb)
            runs = {"onnxruntime": {"hidden_states": rb.unpad(ref), "first_token_states": ref[:, 0].copy()},
                    "eet-engine": {"hidden_states": hidden.astype(np.float32),
                                   "first_token_states": first.astype(np.float32)}}
            ok = compare_bert_runs(runs, [(1, 0, ENGINE_TOLERANCES[dtype])], out)
        else:
            gen = info["generation"]
            prompts = random_prompts(rng, batch, max_len, gen["vocab_size"])
            engine.limits.check(prompts, new_tokens)
            out(f"prompts: seed {seed}, {batch} prompts, lengths {[len(p) for p in prompts]}, {new_tokens} new tokens")
            result = engine.generate(prompts, new_tokens, eos_token_id=None, return_logits=True)
            ort_logits: list = []
            ort_tokens = ort_greedy(folder / info["files"]["original_onnx"], prompts, new_tokens, ort_logits)
            ok = True
            bound = ENGINE_LOGIT_TOLERANCES[dtype]
            worst, flips = 0.0, []
            for row, (got, want) in enumerate(zip(result.tokens, ort_tokens)):
                for step in range(new_tokens):
                    ref = ort_logits[step][row]
                    err = np.abs(result.logits[step][row] - ref).max() / np.abs(ref).max()
                    worst = max(worst, float(err))
                    if got[step] != want[step]:
                        top = np.sort(ref)[::-1]
                        margin = float((top[0] - top[1]) / np.abs(ref).max())
                        flips.append((row, step, margin))
                        ok &= margin <= bound
                        break  # the row's inputs differ from here on
            agree = float(np.mean(np.array(result.tokens) == np.array(ort_tokens)))
            ok &= worst <= bound and (dtype != "fp32" or not flips or all(m <= bound for _, _, m in flips))
            out(f"tokens: engine vs onnxruntime {agree:.1%} equal; flips (row, step, onnxruntime top-2 margin): "
                f"{[(r, s, round(m, 5)) for r, s, m in flips] or 'none'} (allowed where margin <= {bound:.0e})")
            out(f"logits: max abs / max |logit| {worst:.2e} before each row's first flip, bound {bound:.0e}  "
                f"{'PASS' if worst <= bound else 'FAIL'}")
    out("PASS" if ok else "FAIL")
    out("the TensorRT engine was executed on the GPU")
    return ok


def main(argv: list[str] | None = None, deserialize_hook=None) -> int:
    """``eet check DIR [--batch B] [--max-len L] [--seed N] [--engine auto|yes|no]``"""
    p = argparse.ArgumentParser(prog="eet check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory", metavar="DIR", help="a directory written by `eet build`")
    p.add_argument("--batch", type=int, default=None, help="sequences / prompts in the batch (default 6 / 4)")
    p.add_argument("--max-len", type=int, default=None, help="longest sequence / prompt (default 64 / 24)")
    p.add_argument("--new-tokens", type=int, default=12, help="GPT-2: tokens to generate (default 12)")
    p.add_argument("--seed", type=int, default=None, help="seed of the batch (default: fresh, printed)")
    p.add_argument("--engine", choices=("auto", "yes", "no"), default="auto",
                   help="execute the engine on the GPU: auto (default) where this machine can, else the reference "
                   "check; yes: fail if it cannot; no: the reference check only")
    args = p.parse_args(argv)
    from eet.runtime import sidecar

    family = sidecar.read(args.directory, verify_plan=False)["family"]
    batch, max_len = args.batch or (6 if family == "bert" else 4), args.max_len or (64 if family == "bert" else 24)
    if args.engine != "no":
        try:
            ok = run_check_engine(args.directory, batch, max_len, args.seed, args.new_tokens,
                                  deserialize_hook=deserialize_hook)
            sys.stdout.flush()
            return 0 if ok else 1
        except EetError as exc:
            if args.engine == "yes":
                raise
            print(f"the engine cannot be executed here ({exc}); checking its graph with the plugin references "
                  "instead")
    if family == "gpt2":
        ok = run_check_gpt2(args.directory, args.batch or 4, args.max_len or 24, args.new_tokens, args.seed)
    else:
        ok = run_check(args.directory, args.batch or 6, args.max_len or 64, args.seed)
    sys.stdout.flush()
    return 0 if ok else 1
