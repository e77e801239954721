"""GPT-2 engines: :meth:`Gpt2Engine.generate` and :meth:`Gpt2Engine.stream` with pre-padding.

The prompts of a batch are left-padded to the longest one (with shape buckets, the default: to a multiple of
64 tokens, :func:`~eet.runtime.generation.prompt_width`, and to a power-of-two number of rows by one-token filler
prompts, :func:`~eet.runtime.generation.batch_bucket`); the ``context`` profile runs them all at step 0
and fills the KV cache (owned by the runtime, updated in place by the plugin), then the ``decode`` profile
runs one token per row per step. The decode step is captured in a CUDA graph once per batch size and
replayed (see :data:`eet.runtime.engine.GRAPH_MODES`); ``step`` and the token ids live in device buffers
the graph reads, refreshed by small asynchronous copies from pinned memory before each replay.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from eet.errors import EetError
from eet.runtime.engine import Engine, InFlight, Staging
from eet.runtime.generation import GREEDY, Limits, Sampling, StepTokens, batch_bucket, iterate, prompt_width
from eet.runtime.generation import bucket_shapes as generation_bucket_shapes

MODEL_EOS = "model"
"""Default ``eos_token_id``: the model's own (from the sidecar); pass None to never stop early."""


@dataclass
class Generation:
    """The result of :meth:`Gpt2Engine.generate`.

    Attributes:
        tokens: the new token ids of each prompt (ending with EOS where one was produced).
        texts: the decoded new tokens of each prompt, where the engine has a tokenizer (else None).
        logits: per step, the float32 logits [B, V] of the last position (only with ``return_logits``).
        steps: steps run (the context phase counts as one).
        seconds: wall time of the whole generation.
    """

    tokens: list[list[int]]
    texts: list[str] | None = None
    logits: list[np.ndarray] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


class Gpt2Engine(Engine):
    """A GPT-2 engine built by ``eet build gpt2``; make one with :func:`eet.runtime.load`.

    Attributes:
        limits: the :class:`~eet.runtime.generation.Limits` it was built for (batch, prompt, cache length).
        sample_candidates: K of ``--sample-candidates`` (0: greedy only).
        eos_token_id: the model's EOS token (None if unknown).
    """

    family = "gpt2"
    CONTEXT, DECODE = 0, 1

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        gen = self.info["generation"]
        self.limits = Limits(gen["max_batch"], gen["max_prompt"], gen["max_len"], gen["vocab_size"])
        self.sample_candidates = int(gen.get("sample_candidates") or 0)
        self.eos_token_id = gen.get("eos_token_id")
        cache = gen["cache"]
        self.cache_names = [f"past_{k}.{i}" for i in range(cache["layers"]) for k in ("key", "value")]
        self.cache_geometry = (cache["heads"], gen["max_len"], cache["head_dim"])
        self.sampling_inputs = [n for n in ("temperature", "top_k", "top_p", "uniform") if n in self.io]
        self._staging = Staging(self.device, self._host_buffers)  # a step in flight keeps its own buffers
        self._last: InFlight | None = None  # the step submitted last (.batch, .logits, .stream)
        self.want_logits = False

    def _host_buffers(self) -> dict:
        """One set of pinned staging buffers for a step (inputs to upload, outputs to download)."""
        d, b = self.device, self.limits.max_batch
        bufs = {"input_ids": d.pinned(b * self.limits.max_prompt, np.int32), "pad_lengths": d.pinned(b, np.int32),
                "step": d.pinned(1, np.int32), "next_token": d.pinned(b, np.int32),
                "logits": d.pinned(b * self.limits.vocab_size, self.io["logits"].dtype)}
        bufs.update({name: d.pinned(b, self.io[name].dtype) for name in self.sampling_inputs})
        return bufs

    def _runtime_config(self, profile: int):
        config = super()._runtime_config(profile)
        if config is not None and profile == self.DECODE and self.graphs == "engine":
            config.cuda_graph_strategy = self.trt.module.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
        return config

    # ---- one step (the generation loop's step function)
    def __call__(self, ids: np.ndarray, pads: np.ndarray, step: int, extra: dict | None = None):
        """Run one step: ``ids`` int32 [B, S] at cache position ``step`` (0: the context phase over the
        left-padded prompts; else S = 1). Returns (next_token int32 [B], float32 logits [B, V] or None)."""
        return self.collect(self.submit(ids, pads, step, extra))

    def submit(self, ids: np.ndarray | None, pads: np.ndarray, step: int, extra: dict | None = None) -> InFlight:
        """Enqueue one step without waiting for it (:class:`~eet.runtime.generation.Pipelined`): arguments as
        :meth:`__call__`, except that ``ids`` None feeds back the tokens of the step submitted last, device to
        device (a decode step of the same batch). Returns the handle :meth:`collect` takes. Two submitted steps
        may be in flight; submitting a third waits for the oldest (whose tokens then can no longer be collected).
        """
        self._require_open()
        if ids is None:
            if self._last is None:
                raise EetError("a step that feeds back the previous tokens needs a previous step: give token ids")
            batch, seq = self._last.batch, 1
        else:
            batch, seq = ids.shape
        decode = step > 0
        if decode and seq != 1:
            raise EetError(f"a decode step takes one token per row, got {seq}")
        ctx = self.contexts[self.DECODE if decode else self.CONTEXT]
        slot = self._staging.take()
        last = self._last
        if last is not None and last.stream is not ctx.stream and not last.done:
            ctx.stream.wait_for_event(last.slot.event)  # profiles run on their own streams: keep the order
        h = slot.host
        if ids is None:
            self.device.cuda.memcpy_dtod_async(self.buffers["input_ids"], self.buffers["next_token"],
                                               batch * 4, ctx.stream)
        else:
            h["input_ids"][: batch * seq] = ids.reshape(-1)
            self.upload(ctx, "input_ids", h["input_ids"][: batch * seq])
        if not decode:
            h["pad_lengths"][:batch] = pads
            self.upload(ctx, "pad_lengths", h["pad_lengths"][:batch])
        h["step"][0] = step
        self.upload(ctx, "step", h["step"])
        for name in self.sampling_inputs:
            h[name][:batch] = (extra or {})[name]
            self.upload(ctx, name, h[name][:batch])
        shapes = {"input_ids": (batch, seq), "pad_lengths": (batch,)}
        shapes.update({name: (batch, *self.cache_geometry) for name in self.cache_names})
        shapes.update({name: (batch,) for name in self.sampling_inputs})
        ctx.set_shapes(shapes)
        if decode and self.graphs == "stream":
            self._launch_graphed(ctx, batch)  # the decode step's graph per batch size
        else:
            ctx.execute()
        self.download(ctx, "next_token", h["next_token"][:batch])
        if self.want_logits:
            self.download(ctx, "logits", h["logits"][: batch * self.limits.vocab_size])
        self._last = self._staging.issue(slot, ctx.stream, batch=batch, logits=self.want_logits)
        return self._last

    def collect(self, handle: InFlight):
        """Wait for a submitted step; (next_token int32 [B], float32 logits [B, V] or None)."""
        h, batch = self._staging.wait(handle, "step"), handle.batch
        logits = (h["logits"][: batch * self.limits.vocab_size].reshape(batch, -1).astype(np.float32)
                  if handle.logits else None)
        return h["next_token"][:batch].copy(), logits

    def drain(self) -> None:
        """Wait for every submitted step (their results stay collectable)."""
        self._staging.drain()

    # ---- warm-up (Engine.warm_up)
    def bucket_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """What :meth:`warm_up` runs, per batch bucket: the context phase at each prompt width of
        :func:`~eet.runtime.generation.bucket_shapes` ([rows, width] token ids), and after its first width the
        decode step ([rows, 1]: a plain run, the CUDA graph's capture and a replay)."""
        shapes, seen = [], set()
        for rows, width in generation_bucket_shapes(self.limits):
            shapes.append(("context", (rows, width)))
            if rows not in seen:
                seen.add(rows)
                shapes.append(("decode", (rows, 1)))
        return shapes

    def _run_shape(self, profile: str, shape: tuple[int, ...]) -> None:
        rows, width = shape
        extra = GREEDY.feeds(np.random.default_rng(0), rows) if self.sampling_inputs else None
        pads = np.zeros(rows, np.int32)  # token id 0 everywhere; the outputs are dropped
        if profile == "context":
            self(np.zeros((rows, width), np.int32), pads, 0, extra)
            return
        for position in range(1, 4):
            self(np.zeros((rows, 1), np.int32), pads, min(position, self.limits.max_len - 1), extra)

    # ---- generation
    def _prepare(self, prompts, temperature: float, top_k: int, top_p: float, seed: int, eos_token_id):
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise EetError("no prompts: give at least one")
        if all(isinstance(p, str) for p in prompts):
            tokenizer = self.tokenizer()
            if tokenizer is None:
                raise EetError("this engine has no tokenizer (it was built from a config, not a model directory): "
                               "give prompts as lists of token ids")
            prompts = [tokenizer(p)["input_ids"] for p in prompts]
        elif any(isinstance(p, str) for p in prompts):
            raise EetError("give prompts either all as texts or all as token-id lists, not mixed")
        sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        if temperature > 0:
            if not self.sample_candidates:
                raise EetError("this engine samples nothing (built without --sample-candidates): use temperature 0 "
                               "(greedy) or rebuild with `eet build gpt2 --sample-candidates 64`")
            if top_k > self.sample_candidates:
                raise EetError(f"top_k {top_k} exceeds the engine's --sample-candidates {self.sample_candidates}: "
                               "lower top_k or rebuild with more candidates")
        eos = self.eos_token_id if eos_token_id == MODEL_EOS else eos_token_id
        return [[int(t) for t in p] for p in prompts], sampling, eos

    def stream(self, prompts: Sequence[Sequence[int]] | Sequence[str] | str, max_new_tokens: int = 32, *,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
               eos_token_id: int | None | str = MODEL_EOS, return_logits: bool = False) -> Iterator[StepTokens]:
        """Yield each step's tokens as soon as they exist (:class:`~eet.runtime.generation.StepTokens`: the new
        token of every row, -1 for rows already finished). Arguments as :meth:`generate`."""
        self._require_open()
        prompts, sampling, eos = self._prepare(prompts, temperature, top_k, top_p, seed, eos_token_id)
        self.want_logits = return_logits
        try:
            # iterate() checks the prompts against the limits before it pads them to this width
            width = rows = None
            if self.shape_buckets:
                width = prompt_width(max(map(len, prompts)), max_new_tokens, self.limits)
                rows = batch_bucket(len(prompts), self.limits)
            yield from iterate(self, prompts, max_new_tokens, self.limits, eos, sampling, width, rows)
        finally:
            self.want_logits = False

    def generate(self, prompts: Sequence[Sequence[int]] | Sequence[str] | str, max_new_tokens: int = 32, *,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 eos_token_id: int | None | str = MODEL_EOS, return_logits: bool = False,
                 on_step: Callable[[StepTokens], None] | None = None) -> Generation:
        """Generate for a batch of prompts (left-padded, one engine call per step for the whole batch).

        Args:
            prompts: token-id lists, or texts when the engine has a tokenizer; at most ``limits.max_batch``.
            max_new_tokens: tokens to generate per prompt (longest prompt + this <= the engine's --max-len).
            temperature: 0 (default) is greedy; > 0 samples (engines built with --sample-candidates K).
            top_k: keep the k most likely (0: off, at most K); top_p: nucleus mass in (0, 1] (1: off).
            seed: seed of the host generator that draws one uniform number per row and step.
            eos_token_id: a row stops after producing it; default the model's, None never stops early.
            return_logits: also return each step's logits [B, V] (a device-to-host copy per step).
            on_step: called with each :class:`StepTokens` as soon as it is known (streaming).

        Raises:
            EetError: empty batch, a prompt or size beyond what the engine was built for, sampling options the
                engine cannot honour, texts without a tokenizer.
        """
        import time

        t0 = time.perf_counter()
        tokens: list[list[int]] = []
        logits, steps = [], 0
        for out in self.stream(prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                               seed=seed, eos_token_id=eos_token_id, return_logits=return_logits):
            if not tokens:
                tokens = [[] for _ in out.tokens]
            for row, t in enumerate(out.tokens.tolist()):
                if t >= 0:
                    tokens[row].append(t)
            if out.logits is not None:
                logits.append(out.logits)
            steps += 1
            if on_step is not None:
                on_step(out)
        tokenizer = self.tokenizer()
        texts = [tokenizer.decode(t) for t in tokens] if tokenizer is not None else None
        return Generation(tokens, texts, logits, steps, time.perf_counter() - t0)
