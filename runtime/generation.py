"""Pre-padding generation, independent of what executes a step (the TensorRT engine on a GPU, or the rewritten
ONNX with plugin references on a CPU).

A step function takes ``(input_ids [B, S] int32, pad_lengths [B] int32, step int, extra)`` and returns
``(next_token [B] int32, logits [B, V] or None)``; it owns the KV cache. ``extra`` holds the sampling inputs
(``temperature``, ``top_k``, ``top_p``, ``uniform``, each [B]) for engines built with sampling; a step function
passes on those its graph has. The context phase is one step with the whole
left-padded prompt batch at step 0; each decode step feeds the previous tokens (S = 1) at step = tokens so far.

A step function may instead be a :class:`Pipelined` one (``submit`` / ``collect`` / ``drain``, as the GPT-2
engine is): then :func:`iterate` submits each decode step *before* it reads the previous step's tokens, and the
step feeds those tokens back itself (on the GPU), so the host's work of a step (copies, Python, the caller's
handling of the yielded tokens) overlaps the GPU's work of the next one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from eet.errors import EetError
from eet.runtime.tokens import flatten, sequence_problems

StepFn = Callable[[np.ndarray, np.ndarray, int, dict], "tuple[np.ndarray, np.ndarray]"]


@dataclass(frozen=True)
class Sampling:
    """Sampling settings, the same for every row: ``temperature`` > 0 (0 means greedy), ``top_k`` >= 0 (0: off),
    ``top_p`` in (0, 1] (1: off), and the ``seed`` of the generator that draws one uniform number per row and
    step (the draw on the host; the choice on the GPU, inside the engine)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise EetError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise EetError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise EetError(f"top_p must be in (0, 1], got {self.top_p}")

    def feeds(self, rng: np.random.Generator, batch: int) -> dict[str, np.ndarray]:
        """This step's sampling inputs."""
        return {"temperature": np.full(batch, self.temperature, np.float32),
                "top_k": np.full(batch, self.top_k, np.int32), "top_p": np.full(batch, self.top_p, np.float32),
                "uniform": rng.random(batch, dtype=np.float32)}


GREEDY = Sampling(temperature=0.0)


@dataclass(frozen=True)
class Limits:
    """What an engine was built for: ``max_batch`` rows, prompts up to ``max_prompt`` tokens, ``max_len``
    cache positions (prompt + generated), token ids below ``vocab_size``."""

    max_batch: int
    max_prompt: int
    max_len: int
    vocab_size: int

    def check(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        """Raise :class:`EetError` naming the first prompt or size that does not fit."""
        if not prompts:
            raise EetError("no prompts: give at least one")
        if len(prompts) > self.max_batch:
            raise EetError(f"{len(prompts)} prompts exceed the engine's --max-batch {self.max_batch}; "
                           "split the batch or rebuild with a larger --max-batch")
        if max_new_tokens < 1:
            raise EetError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        flat, lengths = flatten(prompts, "prompt")
        found = sequence_problems(flat, lengths, max_len=self.max_prompt, vocab_size=self.vocab_size, what="prompt",
                                  limit="--max-prompt")
        if found:
            raise EetError(found[min(found)])
        longest = int(lengths.max())
        if longest + max_new_tokens > self.max_len:
            raise EetError(f"the longest prompt ({longest} tokens) + {max_new_tokens} new tokens = "
                           f"{longest + max_new_tokens} exceeds the engine's --max-len {self.max_len}")


PROMPT_BUCKET = 64
"""Engines left-pad prompt batches to a multiple of this many tokens (:func:`prompt_width`)."""


def prompt_width(longest: int, max_new_tokens: int, limits: Limits, multiple: int = PROMPT_BUCKET) -> int:
    """The width S a batch whose longest prompt has ``longest`` tokens is left-padded to: the next multiple of
    ``multiple``, within the engine's --max-prompt and leaving room for ``max_new_tokens`` in --max-len (never
    below ``longest``). TensorRT-RTX prepares each new input shape once (0.1-1.7 s on an H100); this keeps the
    context phase to a few shapes per batch size. The pre-padding attention skips the extra pads; the other
    layers compute them (at most ``multiple - 1`` tokens per row)."""
    width = -(-longest // multiple) * multiple
    return max(longest, min(width, limits.max_prompt, limits.max_len - max_new_tokens))


def batch_bucket(rows: int, limits: Limits) -> int:
    """The batch size a generation of ``rows`` prompts runs at with shape buckets: the next power of two, at most
    --max-batch (e.g. 1, 2, 4, 8, 16, 32 for --max-batch 32). A new batch size costs TensorRT-RTX 0.7-4.7 s the
    first time (GPT-2 small, H100: kernels for the new shapes); filler rows cost the decode steps next to nothing
    (their attention reads only the keys of their one token and of the steps so far; the linear layers read the
    same weights for 17 rows as for 32) and the context phase their share of its tokens."""
    return min(1 << max(rows - 1, 0).bit_length(), limits.max_batch)


def bucket_shapes(limits: Limits, multiple: int = PROMPT_BUCKET) -> list[tuple[int, int]]:
    """Every context-phase shape (rows, width) that a generation with shape buckets runs at: the rows of
    :func:`batch_bucket` (1, 2, 4, ... --max-batch) times the widths of :func:`prompt_width` (the multiples of
    ``multiple`` below --max-prompt, and --max-prompt). Complete for every request whose longest prompt plus
    ``max_new_tokens`` leaves the padded width within --max-len (always when ``max_new_tokens`` <= --max-len -
    --max-prompt); a request without that room runs at a width of its own. Rows first, widths ascending."""
    rows = sorted({batch_bucket(n, limits) for n in range(1, limits.max_batch + 1)})
    top = min(limits.max_prompt, limits.max_len - 1)
    widths = sorted({min(w, top) for w in range(multiple, top + multiple, multiple)})
    return [(r, w) for r in rows for w in widths]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, width: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids int32 [B, S], pad_lengths int32 [B]): each prompt right-aligned in a row of S tokens; S is the
    longest prompt's length, or ``width`` (at least that)."""
    longest = max(len(p) for p in prompts)
    if width is not None:
        if width < longest:
            raise EetError(f"a prompt width of {width} is below the longest prompt ({longest} tokens)")
        longest = width
    ids = np.full((len(prompts), longest), pad_id, dtype=np.int32)
    pads = np.empty(len(prompts), dtype=np.int32)
    for row, prompt in enumerate(prompts):
        pads[row] = longest - len(prompt)
        ids[row, pads[row]:] = prompt
    return ids, pads


def greedy(step_fn: StepFn, prompts: Sequence[Sequence[int]], max_new_tokens: int, limits: Limits | None = None,
           eos_token_id: int | None = None) -> tuple[list[list[int]], list[np.ndarray]]:
    """Greedy generation: :func:`generate` with temperature 0."""
    return generate(step_fn, prompts, max_new_tokens, limits, eos_token_id, GREEDY)


@dataclass
class StepTokens:
    """What one generation step produced, as :func:`iterate` yields it.

    Attributes:
        index: 0 for the first new token (the context phase), then 1, 2, ...
        tokens: int32 [B], the new token of each row; -1 for rows that had already finished (EOS) before.
        finished: bool [B], rows done after this step (their EOS has been produced).
        logits: [B, V] of this step when the step function returned them, else None.
    """

    index: int
    tokens: np.ndarray
    finished: np.ndarray
    logits: np.ndarray | None = None


@runtime_checkable
class Pipelined(Protocol):
    """A step function that runs asynchronously: :func:`iterate` keeps one decode step in flight ahead of the
    one whose tokens it reads.

    ``submit(input_ids, pad_lengths, step, extra)`` enqueues a step and returns a handle at once; ``input_ids``
    None means "this row's token of the previously submitted step" (S = 1), fed back without the host.
    ``collect(handle)`` waits for that step and returns ``(next_token [B] int32, logits [B, V] or None)``.
    ``drain()`` waits for everything submitted (a step submitted ahead and never collected included).
    """

    def submit(self, ids: np.ndarray | None, pads: np.ndarray, step: int, extra: dict) -> Any: ...

    def collect(self, handle: Any) -> "tuple[np.ndarray, np.ndarray | None]": ...

    def drain(self) -> None: ...


class Deferred:
    """A plain :data:`StepFn` seen as :class:`Pipelined`: a step runs when it is collected (submission order),
    so a step submitted ahead and never collected (every row finished) costs nothing."""

    def __init__(self, step_fn: StepFn):
        self.step_fn = step_fn
        self.token: np.ndarray | None = None

    def submit(self, ids, pads, step, extra):
        return ids, pads, step, extra

    def collect(self, handle):
        ids, pads, step, extra = handle
        if ids is None:
            if self.token is None:
                raise EetError("a step that feeds back the previous tokens needs a previous step")
            ids = self.token.reshape(-1, 1)
        token, logits = self.step_fn(ids, pads, step, extra)
        self.token = np.asarray(token).reshape(-1).astype(np.int32)
        return token, logits

    def drain(self) -> None:
        pass


def iterate(step_fn: StepFn | Pipelined, prompts: Sequence[Sequence[int]], max_new_tokens: int,
            limits: Limits | None = None, eos_token_id: int | None = None, sampling: Sampling = GREEDY,
            width: int | None = None, rows: int | None = None):
    """Yield a :class:`StepTokens` per step, as soon as the step's tokens are known (streaming).

    The batch runs left-padded at one step for all rows. A row that produces ``eos_token_id`` is finished: its
    later tokens are reported as -1 (the engine still computes the row, since every row decodes at the same
    step, but nobody sees it), and the loop stops once every row is finished or ``max_new_tokens`` were made.
    With a :class:`Pipelined` step function, the next step is already submitted when a step's tokens are
    yielded (it is drained, unused, when the loop stops early); the sampling draws are the same either way.
    ``width``: left-pad the prompts to this many tokens (default: the longest prompt's length).
    ``rows``: run the batch as this many rows (default: one per prompt): filler rows after the prompts' rows,
    each a one-token prompt (token 0), whose tokens are computed and dropped (they never stop the loop); the
    prompts' sampling draws are the same as without them.
    """
    if limits is not None:
        limits.check(prompts, max_new_tokens)
    elif not prompts:
        raise EetError("no prompts: give at least one")
    runner = step_fn if isinstance(step_fn, Pipelined) else Deferred(step_fn)
    n = len(prompts)
    fillers = max(0, (rows or n) - n)
    ids, pads = left_pad([*prompts, *[[0]] * fillers], width=width)
    rng = np.random.default_rng(sampling.seed)

    def draws() -> dict[str, np.ndarray]:  # the prompts' rows draw as without fillers; fillers repeat the last
        return {k: np.pad(v, (0, fillers), mode="edge") for k, v in sampling.feeds(rng, n).items()}

    finished = np.zeros(n, dtype=bool)
    try:
        pending = runner.submit(ids, pads, 0, draws())
        position = ids.shape[1]
        for index in range(max_new_tokens):
            ahead = None
            if index + 1 < max_new_tokens:  # out before this step's tokens are read: it feeds them back itself
                ahead = runner.submit(None, pads, position, draws())
                position += 1
            token, logits = runner.collect(pending)
            token = np.asarray(token).reshape(-1).astype(np.int32)[:n]
            logits = None if logits is None else np.asarray(logits)[:n]
            shown = np.where(finished, -1, token).astype(np.int32)
            if eos_token_id is not None:
                finished = finished | (token == eos_token_id)
            yield StepTokens(index, shown, finished.copy(), logits)
            if finished.all():
                return
            pending = ahead
    finally:
        runner.drain()  # nothing stays in flight once the loop ends (early stop, error, or a closed generator)


def generate(step_fn: StepFn | Pipelined, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             limits: Limits | None = None, eos_token_id: int | None = None, sampling: Sampling = GREEDY,
             ) -> tuple[list[list[int]], list[np.ndarray]]:
    """Generate up to ``max_new_tokens`` for every prompt in one left-padded batch (see :func:`iterate`).

    Returns:
        (the new tokens of each prompt, ending with its first ``eos_token_id`` when it produced one; the
        logits [B, V] of every step, where the step function returns them).
    """
    rows: list[list[int]] = [[] for _ in prompts]
    all_logits = []
    for out in iterate(step_fn, prompts, max_new_tokens, limits, eos_token_id, sampling):
        for row, t in enumerate(out.tokens.tolist()):
            if t >= 0:
                rows[row].append(t)
        if out.logits is not None:
            all_logits.append(out.logits)
    return rows, all_logits


class ReferenceStep:
    """A step function over the rewritten GPT-2 ONNX with the plugin references (CPU, ``onnx.reference``).

    Args:
        model: the rewritten ``onnx.ModelProto`` (see :func:`eet.exporter.rewrite.rewrite_gpt2`).
        num_layers, num_heads, head_dim, max_len: the cache geometry [B, heads, max_len, head_dim] per layer.
    """

    def __init__(self, model, *, num_layers: int, num_heads: int, head_dim: int, max_len: int):
        from eet.plugins import onnx_reference

        self.evaluator = onnx_reference.evaluator(model)
        self.geometry = (num_heads, max_len, head_dim)
        self.layers = num_layers
        inputs = {i.name: i for i in model.graph.input}
        elem = inputs["past_key.0"].type.tensor_type.elem_type
        self.dtype = np.float16 if elem == 10 else np.float32
        self.caches: dict[str, np.ndarray] = {}
        self.outputs = ["next_token", "logits"] + [f"present_{k}.{i}" for i in range(num_layers)
                                                     for k in ("key", "value")]
        self.input_names = set(inputs)

    def __call__(self, ids: np.ndarray, pads: np.ndarray, step: int, extra: dict | None = None):
        if step == 0:  # a new batch: fresh caches
            shape = (ids.shape[0], *self.geometry)
            self.caches = {f"past_{k}.{i}": np.zeros(shape, self.dtype) for i in range(self.layers)
                           for k in ("key", "value")}
        feeds = {"input_ids": ids, "pad_lengths": pads, "step": np.array([step], np.int32), **self.caches,
                 **{k: v for k, v in (extra or {}).items() if k in self.input_names}}
        results = dict(zip(self.outputs, self.evaluator.run(self.outputs, feeds)))
        self.caches = {name.replace("present_", "past_"): value for name, value in results.items()
                       if name.startswith("present_")}
        return results["next_token"], results["logits"]
