"""BERT engines: :meth:`BertEngine.encode` packs a batch of sequences back to back (no padding), runs the
engine, and returns each sequence's hidden states and first-token vector.

Packing (:func:`pack`), splitting a batch into engine calls (:func:`plan_calls`) and rounding a call up to a
shape bucket (:func:`fill_to_bucket`) are plain NumPy, so they are tested without a GPU.

Shape buckets: TensorRT-RTX prepares every input shape it has not met before, which costs 0.1-1.7 s per new
shape on an H100 (BERT-base: an ``encode()`` of 31 fresh sequences took 87-1725 ms, against 11 ms for shapes it
had met). Packed calls would meet a new token count almost every time, so by default each call is rounded up to
a few shapes: the token count to :func:`token_bucket` (56 buckets up to 16,384 tokens) and the sequence count to
what the engine's profile takes, by filler sequences after the real ones whose outputs are dropped; the
``max_seqlen`` carrier is always --max-seq long. Once a bucket has been met, calls in it run at full speed.
``eet build bert`` gives the profile room for the filler (one sequence beyond --max-batch, and --max-batch tokens
beyond --max-tokens rounded up to a multiple of 64), so a bucketed call still carries --max-batch real sequences;
on a plan whose profile is exactly --max-batch / --max-tokens (built before that room existed) a bucketed call
carries one sequence fewer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from eet.errors import EetError
from eet.runtime.engine import Engine, InFlight, Staging
from eet.runtime.tokens import first_failing, flatten, sequence_problems


@dataclass(frozen=True)
class BertLimits:
    """What a packed BERT engine takes per call: ``max_batch`` sequences, ``max_tokens`` tokens in all, each
    sequence at most ``max_seq`` tokens, token ids below ``vocab_size``, token types below ``type_vocab``."""

    max_batch: int
    max_tokens: int
    max_seq: int
    vocab_size: int
    type_vocab: int = 2


def check_flat(flat: np.ndarray, lengths: np.ndarray, limits: BertLimits, types: np.ndarray | None = None,
               type_lengths: np.ndarray | None = None) -> None:
    """:func:`check_batch` on :func:`flatten`'s output (``types`` / ``type_lengths``: the token types flattened
    the same way). Names the first sequence the engine cannot take, and the first of its problems in the order:
    empty, over --max-seq, an id outside the vocabulary, token types."""
    if len(lengths) == 0:
        raise EetError("empty batch: give at least one sequence")
    found = sequence_problems(flat, lengths, max_len=limits.max_seq, vocab_size=limits.vocab_size)
    if types is not None:
        if len(type_lengths) != len(lengths):
            raise EetError(f"token_type_ids has {len(type_lengths)} sequences for {len(lengths)}: give one list per "
                           "sequence")
        mismatch = np.flatnonzero(type_lengths != lengths)
        if mismatch.size:
            i = int(mismatch[0])
            found.setdefault(i, f"token_type_ids of sequence {i} has {type_lengths[i]} entries for {lengths[i]} "
                                "tokens")
        i = first_failing((types < 0) | (types >= limits.type_vocab), np.cumsum(type_lengths) - type_lengths)
        if i is not None:
            found.setdefault(i, f"token_type_ids of sequence {i} leave [0, {limits.type_vocab})")
    if found:
        raise EetError(found[min(found)])


def check_batch(ids: Sequence[Sequence[int]], limits: BertLimits, token_types: Sequence[Sequence[int]] | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Raise :class:`EetError` naming the first sequence that the engine cannot take; else the batch as
    :func:`flatten` gives it, (flat ids [T], lengths [B], flat token types [T] or None), for :func:`pack_flat`."""
    flat, lengths = flatten(ids)
    types, type_lengths = (None, None) if token_types is None else flatten(token_types, "token_type_ids sequence")
    check_flat(flat, lengths, limits, types, type_lengths)
    return flat, lengths, types


def plan_calls(lengths: Sequence[int], limits: BertLimits) -> list[tuple[int, int]]:
    """Split sequences (in order) into engine calls: [(start, end), ...] with at most ``max_batch`` sequences
    and ``max_tokens`` tokens per call. Every length must already be <= ``max_seq`` (<= ``max_tokens``)."""
    calls, start, tokens = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and (i - start == limits.max_batch or tokens + n > limits.max_tokens):
            calls.append((start, i))
            start, tokens = i, 0
        tokens += n
    calls.append((start, len(lengths)))
    return calls


def token_bucket(tokens: int, max_tokens: int, max_seq: int) -> int:
    """The packed length a call of ``tokens`` tokens is rounded up to: a multiple of
    ``g = 2 ** (floor(log2(tokens)) - 3)`` clamped to [64, max_seq] (eight buckets per octave: at most 1/8 more
    tokens from 512 tokens up, multiples of 64 below), and at most ``max_tokens``. E.g. (max_seq 512):
    100 -> 128, 1000 -> 1024, 1100 -> 1152, 9120 -> 9216."""
    g = min(max(64, 1 << max(int(tokens).bit_length() - 4, 0)), max_seq)
    return min(-(-tokens // g) * g, max_tokens)


def bucket_limits(limits: BertLimits) -> BertLimits | None:
    """The per-call limits of real sequences when calls of an engine that takes ``limits`` per call (its profile's
    maxima) are filled to buckets: one sequence slot and ``max_batch - 1`` tokens stay free for the fillers. None
    when the engine is too small for that (then calls keep their exact shapes)."""
    if limits.max_batch < 2 or limits.max_tokens - (limits.max_batch - 1) < limits.max_seq:
        return None
    return BertLimits(limits.max_batch - 1, limits.max_tokens - (limits.max_batch - 1), limits.max_seq,
                      limits.vocab_size, limits.type_vocab)


def fill_to_bucket(feeds: dict, limits: BertLimits) -> dict:
    """``feeds`` (from :func:`pack`, at most :func:`bucket_limits` sequences and tokens) extended to a bucket
    shape of an engine that takes ``limits`` per call: filler sequences (token id 0, type 0, each 1..max_seq
    tokens) after the real ones, so that there are ``max_batch`` sequences and :func:`token_bucket` tokens in
    all, and ``max_seqlen`` = ``max_seq``. The first T tokens and B sequences of the call's outputs are the real
    ones."""
    t, b = feeds["input_ids"].size, feeds["cu_seqlens"].size - 1
    fillers = limits.max_batch - b
    total = token_bucket(t + fillers, limits.max_tokens, limits.max_seq)
    if fillers < 1 or total - t > fillers * limits.max_seq:
        raise EetError(f"a call of {b} sequences and {t} tokens does not fit a bucket of {limits}: plan it with "
                       "bucket_limits()")
    extra = total - t
    lengths = np.full(fillers, extra // fillers, np.int64)
    lengths[: extra % fillers] += 1
    cat = np.zeros(extra, np.int32)
    return {"input_ids": np.concatenate([feeds["input_ids"], cat]),
            "token_type_ids": np.concatenate([feeds["token_type_ids"], cat]),
            "position_ids": np.concatenate([feeds["position_ids"]] + [np.arange(n, dtype=np.int32) for n in lengths]),
            "cu_seqlens": np.concatenate([feeds["cu_seqlens"], t + np.cumsum(lengths)]).astype(np.int32),
            "max_seqlen": limits.max_seq}


def bucket_token_counts(limits: BertLimits) -> list[int]:
    """Every packed token count a bucketed call of an engine that takes ``limits`` per call (its profile's
    maxima, :func:`profile_limits`) can have: :func:`token_bucket` of every count from one token per sequence up,
    as far as ``max_batch`` sequences of at most ``max_seq`` tokens reach. Ascending."""
    reach = min(limits.max_tokens, limits.max_batch * limits.max_seq)
    counts = {token_bucket(n, limits.max_tokens, limits.max_seq) for n in range(limits.max_batch, reach + 1)}
    return sorted(c for c in counts if c <= reach)


def pack(ids: Sequence[Sequence[int]], token_types: Sequence[Sequence[int]] | None = None) -> dict[str, np.ndarray]:
    """The packed engine inputs of one call (int32): ``input_ids``, ``token_type_ids``, ``position_ids`` [T]
    (positions restart at 0 for each sequence), ``cu_seqlens`` [B+1]; plus ``max_seqlen``, the longest length
    (the size of the [S] shape-carrier input)."""
    flat, lengths = flatten(ids)
    return pack_flat(flat, lengths, None if token_types is None else flatten(token_types)[0])


def pack_flat(flat: np.ndarray, lengths: np.ndarray, types: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """:func:`pack` of sequences already flattened (:func:`flatten`): ``flat`` [T] ids, ``lengths`` [B],
    ``types`` [T] or None (all 0)."""
    ends = np.cumsum(lengths)
    starts = ends - lengths
    positions = np.arange(int(ends[-1]) if len(ends) else 0, dtype=np.int64) - np.repeat(starts, lengths)
    ids = flat.astype(np.int32)
    return {"input_ids": ids,
            "token_type_ids": np.zeros_like(ids) if types is None else types.astype(np.int32),
            "position_ids": positions.astype(np.int32),
            "cu_seqlens": np.concatenate([[0], ends]).astype(np.int32),
            "max_seqlen": int(lengths.max())}


@dataclass
class Encoding:
    """The result of :meth:`BertEngine.encode`, in input order.

    Attributes:
        hidden_states: per sequence, [L_i, H] last hidden states in the engine's dtype (float16 for fp16
            engines; views of one [T, H] array): NumPy arrays, or with ``output="torch"`` CUDA tensors.
        first_token: float32 [B, H], each sequence's first-token ([CLS]) hidden state (NumPy, or a CUDA tensor).
        lengths: int [B] tokens per sequence (NumPy).
        calls: engine calls made (batches beyond the engine's limits are split).
    """

    hidden_states: list
    first_token: object
    lengths: np.ndarray
    calls: int = 1

    def mean_pooled(self):
        """float32 [B, H]: mean of each sequence's hidden states (sentence-transformers' pooling); NumPy or a CUDA
        tensor, as the hidden states."""
        if isinstance(self.first_token, np.ndarray):
            return np.stack([h.mean(axis=0, dtype=np.float32) for h in self.hidden_states])
        import torch

        return torch.stack([h.float().mean(dim=0) for h in self.hidden_states])


COPY_THREADS = 4
"""Threads that copy a large result out of the pinned staging buffer (H100 machine, 16 cores: 14 MB of BERT-base
hidden states in 1.31 ms on one thread, 0.76 / 0.55 / 0.68 ms on 2 / 4 / 8; NumPy releases the GIL while copying)."""

_COPY_MIN_BYTES = 1 << 20  # below this one thread copies: handing out the chunks would cost more
_copy_pool = None


def copy_rows(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src`` for two arrays of the same shape, in :data:`COPY_THREADS` row chunks at once when large."""
    global _copy_pool
    if src.nbytes < _COPY_MIN_BYTES or len(src) < COPY_THREADS:
        np.copyto(dst, src)
        return
    if _copy_pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _copy_pool = ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="eet-copy")
    cuts = np.linspace(0, len(src), COPY_THREADS + 1).astype(int)
    for done in [_copy_pool.submit(np.copyto, dst[a:b], src[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]:
        done.result()


ENCODE_OUTPUTS = ("numpy", "torch")
"""What :meth:`BertEngine.encode` returns: host NumPy arrays, or PyTorch CUDA tensors on the engine's GPU."""


def torch_on(device_index: int):
    """(torch, its ``torch.device``) for GPU ``device_index``: what ``encode(output="torch")`` returns tensors on.
    Raises :class:`EetError` with the fix when PyTorch or its CUDA is missing."""
    try:
        import torch
    except ImportError as exc:
        raise EetError(f"encode(output='torch') needs PyTorch, which is not installed ({exc}): install a CUDA build "
                       "of torch, or use output='numpy'") from exc
    if not torch.cuda.is_available():
        raise EetError(f"encode(output='torch') needs PyTorch with CUDA, and torch {torch.__version__} sees no GPU "
                       "(a CPU build?): install a CUDA build of torch, or use output='numpy'")
    if device_index >= torch.cuda.device_count():
        raise EetError(f"the engine runs on GPU {device_index}, which PyTorch does not see "
                       f"({torch.cuda.device_count()} GPU(s)): use output='numpy'")
    return torch, torch.device("cuda", device_index)


def profile_limits(info: dict) -> BertLimits:
    """What one call of the engine described by the sidecar ``info`` takes: its profile's largest ``cu_seqlens``
    and ``input_ids`` (the build's --max-batch / --max-tokens plus the room left for bucket fillers)."""
    build, cfg = info["build"], info["model"]["config"]
    shapes = info["profiles"][0]["shapes"]
    return BertLimits(shapes["cu_seqlens"]["max"][0] - 1, shapes["input_ids"]["max"][0], build["max_seq"],
                      cfg["vocab_size"], cfg.get("type_vocab_size", 2))


class BertEngine(Engine):
    """A packed BERT engine built by ``eet build bert``; make one with :func:`eet.runtime.load`.

    Attributes:
        limits: what :meth:`encode` puts in one call (the build's --max-batch, --max-tokens, --max-seq).
        call_limits: what one engine call takes (:func:`profile_limits`; :meth:`run_packed` feeds up to this).
    """

    family = "bert"
    auto_graphs = "stream"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        build, cfg = self.info["build"], self.info["model"]["config"]
        self.limits = BertLimits(build["max_batch"], build["max_tokens"], build["max_seq"], cfg["vocab_size"],
                                 cfg.get("type_vocab_size", 2))
        self.call_limits = profile_limits(self.info)
        self.hidden_size = int(self.info["model"]["hidden_size"])
        d = self.device
        self._staging = Staging(d, self._host_buffers)  # encode() packs and submits call i + 1 while call i runs
        ctx = self.contexts[0]
        d.cuda.memset_d8_async(self.buffers["max_seqlen"], 0, self.io["max_seqlen"].nbytes, ctx.stream)
        ctx.stream.synchronize()

    def _runtime_config(self, profile: int):
        config = super()._runtime_config(profile)
        if config is not None and self.graphs == "engine":
            config.cuda_graph_strategy = self.trt.module.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
        return config

    def graphed(self) -> bool:
        """Whether calls run from CUDA graphs captured per shape (``cuda_graphs`` ``stream`` or ``auto``, with shape
        buckets: without them every call may meet a new shape, and a graph per shape would not pay)."""
        return self.graphs == "stream" and self.shape_buckets

    def _execute(self, ctx, shape: tuple[int, int, int]) -> None:
        """Run the engine once at the input shapes set on ``ctx`` (``shape``: tokens, sequences, longest): from
        the shape's CUDA graph with :meth:`graphed` (:meth:`Engine._launch_graphed`), else plainly. (H100,
        BERT-base fp16, ``encode()`` of 1 x 128 tokens: 3.3-3.5 ms without graphs, 1.2-1.3 ms with; the 12
        plugins' Python ``enqueue``s had the GPU waiting.)"""
        if self.graphed():
            self._launch_graphed(ctx, shape)
        else:
            ctx.execute()

    def _host_buffers(self) -> dict:
        """One set of pinned staging buffers for a call (packed inputs, both outputs)."""
        d, lim = self.device, self.call_limits
        bufs = {name: d.pinned(lim.max_tokens, np.int32) for name in ("input_ids", "token_type_ids", "position_ids")}
        bufs["cu_seqlens"] = d.pinned(lim.max_batch + 1, np.int32)
        bufs["hidden_states"] = d.pinned(lim.max_tokens * self.hidden_size, self.io["hidden_states"].dtype)
        bufs["first_token_states"] = d.pinned(lim.max_batch * self.hidden_size, self.io["first_token_states"].dtype)
        return bufs

    def run_packed(self, feeds: dict, copy: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """One engine call on packed inputs (see :func:`pack`): (hidden_states [T, H], first_token_states
        [B, H]) in the engine's dtype; copies, or with ``copy=False`` views of the pinned staging buffers that
        the call after next overwrites."""
        return self.collect_packed(self.submit_packed(feeds), copy)

    def submit_packed(self, feeds: dict, download: bool = True) -> InFlight:
        """Enqueue one engine call on packed inputs without waiting for it; :meth:`collect_packed` takes the
        handle. Two calls may be in flight; submitting a third waits for the oldest (whose results then can no
        longer be collected). ``download=False`` leaves the outputs in the engine's device buffers (the next
        call overwrites them; there is then nothing to collect)."""
        self._require_open()
        ctx = self.contexts[0]
        slot = self._staging.take()
        h = slot.host
        t, b = feeds["input_ids"].size, feeds["cu_seqlens"].size - 1
        for name in ("input_ids", "token_type_ids", "position_ids"):
            h[name][:t] = feeds[name]
            self.upload(ctx, name, h[name][:t])
        h["cu_seqlens"][: b + 1] = feeds["cu_seqlens"]
        self.upload(ctx, "cu_seqlens", h["cu_seqlens"][: b + 1])
        carrier = feeds["max_seqlen"]  # the longest length, or an [S] array as the engine input itself
        longest = int(carrier) if np.ndim(carrier) == 0 else len(carrier)
        ctx.set_shapes({"input_ids": (t,), "token_type_ids": (t,), "position_ids": (t,), "cu_seqlens": (b + 1,),
                        "max_seqlen": (longest,)})
        self._execute(ctx, (t, b, longest))
        if download:
            self.download(ctx, "hidden_states", h["hidden_states"][: t * self.hidden_size])
            self.download(ctx, "first_token_states", h["first_token_states"][: b * self.hidden_size])
        return self._staging.issue(slot, ctx.stream, tokens=t, batch=b)

    def collect_packed(self, call: InFlight, copy: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Wait for a submitted call: (hidden_states [T, H], first_token_states [B, H]) as :meth:`run_packed`."""
        h, t, b = self._staging.wait(call), call.tokens, call.batch
        hidden = h["hidden_states"][: t * self.hidden_size].reshape(t, self.hidden_size)
        first = h["first_token_states"][: b * self.hidden_size].reshape(b, self.hidden_size)
        return (hidden.copy(), first.copy()) if copy else (hidden, first)

    def bucket_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """What :meth:`warm_up` runs: one packed call per token count of :func:`bucket_token_counts`, each with
        the profile's sequence count (as :func:`fill_to_bucket` makes every bucketed call)."""
        if bucket_limits(self.call_limits) is None:
            raise EetError(f"this engine's profile ({self.call_limits.max_batch} sequences, "
                           f"{self.call_limits.max_tokens} tokens per call) leaves no room for bucket fillers, so "
                           "encode() runs every call at its exact shape and there are no buckets to warm up; "
                           "rebuild with `eet build bert` (which leaves the room)")
        return [("packed", (t, self.call_limits.max_batch)) for t in bucket_token_counts(self.call_limits)]

    def _run_shape(self, profile: str, shape: tuple[int, ...]) -> None:
        tokens, batch = shape  # token id 0 everywhere, lengths as even as they come
        lengths = np.full(batch, tokens // batch, np.int64)
        lengths[: tokens % batch] += 1
        feeds = pack([[0] * int(n) for n in lengths])
        feeds["max_seqlen"] = self.call_limits.max_seq
        for _ in range(2 if self.graphed() else 1):  # a plain run, then the CUDA graph's capture and a replay
            self.run_packed(feeds, copy=False)

    def tokenize(self, texts: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids and token types of ``texts`` with the model's tokenizer, truncated to --max-seq."""
        tokenizer = self.tokenizer()
        if tokenizer is None:
            raise EetError("this engine has no tokenizer (it was built from a config, not a model directory): "
                           "give token-id lists instead of texts")
        enc = tokenizer(list(texts), truncation=True, max_length=self.limits.max_seq)
        types = enc.get("token_type_ids") or [[0] * len(i) for i in enc["input_ids"]]
        return enc["input_ids"], types

    def encode(self, batch: Sequence[Sequence[int]] | Sequence[str] | str,
               token_type_ids: Sequence[Sequence[int]] | None = None, *, output: str = "numpy") -> Encoding:
        """Encode a batch of sequences, packed without padding.

        Args:
            batch: token-id lists (each 1..--max-seq tokens), or texts (tokenized with the model's tokenizer
                and truncated to --max-seq). Batches beyond the engine's --max-batch / --max-tokens are split
                into several calls.
            token_type_ids: per sequence, like ``batch`` (default all 0); only with token-id lists.
            output: ``"numpy"`` (default): host arrays. ``"torch"``: PyTorch CUDA tensors on the engine's GPU,
                copied there from the engine's outputs (no trip through host memory); they are ready in the order
                of PyTorch's current stream (the call returns without waiting for the GPU).

        Raises:
            EetError: empty batch or sequence, a sequence over --max-seq, ids outside the vocabulary, texts without
                a tokenizer, an unknown ``output``, ``output="torch"`` without PyTorch's CUDA.
        """
        if output not in ENCODE_OUTPUTS:
            raise EetError(f"output={output!r} is not one of {', '.join(map(repr, ENCODE_OUTPUTS))}")
        if isinstance(batch, str):
            batch = [batch]
        batch = list(batch)
        if batch and all(isinstance(s, str) for s in batch):
            if token_type_ids is not None:
                raise EetError("token_type_ids go with token-id lists; texts get theirs from the tokenizer")
            batch, token_type_ids = self.tokenize(batch)
        elif any(isinstance(s, str) for s in batch):
            raise EetError("give sequences either all as texts or all as token-id lists, not mixed")
        # every sequence converted to NumPy once: checked as a whole, then sliced per engine call
        flat, lengths, types = check_batch(batch, self.limits, token_type_ids)
        # with shape buckets, each call leaves room for its fillers (None: the engine is too small for one)
        bucketed = bucket_limits(self.call_limits) if self.shape_buckets else None
        calls = plan_calls(lengths.tolist(), bucketed or self.limits)
        rows = np.concatenate([[0], np.cumsum(lengths)])

        def submit(span, download=True):
            start, end = span
            lo, hi = rows[start], rows[end]
            feeds = pack_flat(flat[lo:hi], lengths[start:end], None if types is None else types[lo:hi])
            return self.submit_packed(fill_to_bucket(feeds, self.call_limits) if bucketed else feeds, download)

        if output == "torch":
            return self._encode_to_torch(submit, calls, rows, lengths)
        # one [T, H] array in the engine's dtype (no float32 conversion on the host: numpy's fp16 casts are slow),
        # split into per-sequence views
        hidden = np.empty((int(rows[-1]), self.hidden_size), self.io["hidden_states"].dtype)
        first = np.empty((len(lengths), self.hidden_size), np.float32)
        # Call i + 1 is packed and submitted before call i's results are copied out: the host's work of one call
        # overlaps the GPU's work of the next.
        pending = None
        for span in [*calls, None]:
            submitted = None if span is None else (submit(span), *span)
            if pending is not None:
                call, s0, s1 = pending
                h, f = self.collect_packed(call, copy=False)  # with buckets, the fillers' rows come last
                copy_rows(hidden[rows[s0]:rows[s1]], h[: rows[s1] - rows[s0]])
                first[s0:s1] = f[: s1 - s0]
            pending = submitted
        return Encoding(np.split(hidden, rows[1:-1]), first, lengths, len(calls))

    def _encode_to_torch(self, submit, calls, rows, lengths) -> Encoding:
        """encode(output="torch"): each call's outputs copied device to device into one [T, H] tensor (and a
        [B, H] one), on the engine's stream, ordered after PyTorch's current stream and before it."""
        torch, dev = torch_on(self.device.info.index)
        ctx, cuda, h = self.contexts[0], self.device.cuda, self.hidden_size
        dtype = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}
        hidden = torch.empty((int(rows[-1]), h), dtype=dtype[self.io["hidden_states"].dtype], device=dev)
        first = torch.empty((len(lengths), h), dtype=dtype[self.io["first_token_states"].dtype], device=dev)
        engine_stream = torch.cuda.ExternalStream(ctx.stream.handle, device=dev)
        user_stream = torch.cuda.current_stream(dev)
        engine_stream.wait_stream(user_stream)  # PyTorch may hand out memory that its stream still uses
        for span in calls:
            submit(span, download=False)
            s0, s1 = span
            n = int(rows[s1] - rows[s0])  # with buckets, the fillers' rows come last
            cuda.memcpy_dtod_async(hidden.data_ptr() + int(rows[s0]) * h * hidden.element_size(),
                                   self.buffers["hidden_states"], n * h * hidden.element_size(), ctx.stream)
            cuda.memcpy_dtod_async(first.data_ptr() + s0 * h * first.element_size(),
                                   self.buffers["first_token_states"], (s1 - s0) * h * first.element_size(),
                                   ctx.stream)
        user_stream.wait_stream(engine_stream)
        return Encoding(list(torch.split(hidden, lengths.tolist())), first.float(), lengths, len(calls))
