"""NumPy reference implementations of the EET plugins, bound to their specs.

They define what the CUDA kernels must compute, run the rewritten ONNX on a machine without a GPU
(:mod:`eet.plugins.onnx_reference`) and are the oracle of the kernel tests.
"""
from __future__ import annotations

import numpy as np

from eet.plugins.spec import HEAD_DIMS, PREPAD_ATTENTION, VARLEN_ATTENTION


def check_cu_seqlens(cu_seqlens: np.ndarray, total_tokens: int, max_seqlen: int | None = None) -> np.ndarray:
    """Validate packed-sequence offsets and return the lengths.

    Args:
        cu_seqlens: int array [B + 1], 0 first, non-decreasing, ``total_tokens`` last.
        total_tokens: T, the number of packed token rows.
        max_seqlen: if given, every length must be <= it.

    Raises:
        ValueError: naming what is wrong.
    """
    cu = np.asarray(cu_seqlens).reshape(-1)
    if cu.size < 2:
        raise ValueError(f"cu_seqlens needs at least 2 entries (one sequence), got {cu.size}")
    if cu[0] != 0 or cu[-1] != total_tokens:
        raise ValueError(f"cu_seqlens must start at 0 and end at the token count {total_tokens}, "
                         f"got {int(cu[0])} ... {int(cu[-1])}")
    lengths = np.diff(cu.astype(np.int64))
    if (lengths < 0).any():
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu.tolist()}")
    if max_seqlen is not None and lengths.max() > max_seqlen:
        raise ValueError(f"a sequence of {int(lengths.max())} tokens exceeds max_seqlen {max_seqlen}")
    return lengths


def varlen_attention(qkv: np.ndarray, cu_seqlens: np.ndarray, max_seqlen: np.ndarray | int, *, num_heads: int,
                     head_dim: int, scale: float, accumulate=np.float64) -> np.ndarray:
    """Reference of ``EetVarlenAttention`` (see :data:`eet.plugins.spec.VARLEN_ATTENTION`).

    Args:
        qkv: float array [..., T, 3 * hidden] (hidden = num_heads * head_dim; the leading axes multiply to T):
            queries, keys, values in that order along the last axis, each head-major.
        cu_seqlens: int32 [B + 1].
        max_seqlen: the shape carrier [S] (only its length is used) or S itself.
        num_heads, head_dim, scale: the node's attributes.
        accumulate: the dtype of the arithmetic (float64 for an oracle, float32 to mimic the kernel).

    Returns:
        The context [..., T, hidden] (qkv's leading axes) in qkv's dtype.
    """
    hidden = num_heads * head_dim
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} is not supported; supported: {HEAD_DIMS}")
    if qkv.ndim < 2 or qkv.shape[-1] != 3 * hidden:
        raise ValueError(f"qkv must be [..., T, 3 * {hidden}] (queries, keys, values of {num_heads} heads of "
                         f"{head_dim}), got {qkv.shape}")
    total = int(np.prod(qkv.shape[:-1]))
    limit = max_seqlen if isinstance(max_seqlen, (int, np.integer)) else np.asarray(max_seqlen).shape[0]
    lengths = check_cu_seqlens(cu_seqlens, total, int(limit))
    rows = qkv.reshape(total, 3, num_heads, head_dim).astype(accumulate)
    q, k, v = rows[:, 0], rows[:, 1], rows[:, 2]
    out = np.empty_like(q)
    start = 0
    for length in lengths.tolist():
        sl = slice(start, start + length)
        start += length
        if length == 0:
            continue
        scores = np.einsum("qhd,khd->hqk", q[sl], k[sl]) * accumulate(scale)
        scores -= scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)
        out[sl] = np.einsum("hqk,khd->qhd", p, v[sl])
    return out.reshape(*qkv.shape[:-1], hidden).astype(qkv.dtype)


def prepad_attention(qkv: np.ndarray, pad_lengths: np.ndarray, step: np.ndarray, key_cache: np.ndarray,
                     value_cache: np.ndarray, *, num_heads: int, head_dim: int, scale: float,
                     accumulate=np.float64):
    """Reference of ``EetPrePadAttention`` (see :data:`eet.plugins.spec.PREPAD_ATTENTION`).

    Args:
        qkv: [B, S, 3 * hidden] (hidden = num_heads * head_dim): queries, new keys, new values in that order
            along the last axis, each head-major.
        pad_lengths: int [B]; step: int [1] (s).
        key_cache, value_cache: [B, num_heads, L, head_dim]; not modified (new arrays are returned).

    Returns:
        (context [B, S, hidden] in qkv's dtype, new key cache, new value cache).

    Raises:
        ValueError: shapes that disagree, s + S > L, a negative pad length.
    """
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} is not supported; supported: {HEAD_DIMS}")
    hidden = num_heads * head_dim
    if qkv.ndim != 3 or qkv.shape[-1] != 3 * hidden:
        raise ValueError(f"qkv must be [B, S, 3 * {hidden}] (queries, keys, values of {num_heads} heads of "
                         f"{head_dim}), got {qkv.shape}")
    b, s_new, _ = qkv.shape
    query, key, value = qkv[..., :hidden], qkv[..., hidden:2 * hidden], qkv[..., 2 * hidden:]
    cache_len = key_cache.shape[2]
    if key_cache.shape != (b, num_heads, cache_len, head_dim) or value_cache.shape != key_cache.shape:
        raise ValueError(f"caches must be [{b}, {num_heads}, L, {head_dim}], got {key_cache.shape}, "
                         f"{value_cache.shape}")
    start = int(np.asarray(step).reshape(-1)[0])
    pads = np.asarray(pad_lengths).reshape(-1).astype(np.int64)
    if start < 0 or start + s_new > cache_len:
        raise ValueError(f"step {start} + {s_new} new tokens exceeds the cache length {cache_len}")
    if pads.shape != (b,) or (pads < 0).any():
        raise ValueError(f"pad_lengths must be {b} non-negative values, got {pads.tolist()}")
    kc, vc = key_cache.copy(), value_cache.copy()
    kc[:, :, start:start + s_new] = key.reshape(b, s_new, num_heads, head_dim).transpose(0, 2, 1, 3)
    vc[:, :, start:start + s_new] = value.reshape(b, s_new, num_heads, head_dim).transpose(0, 2, 1, 3)
    q = query.reshape(b, s_new, num_heads, head_dim).astype(accumulate)
    out = np.zeros((b, s_new, num_heads, head_dim), accumulate)
    for row in range(b):
        for i in range(s_new):
            p = start + i
            lo = int(pads[row])
            if lo > p:
                continue
            k = kc[row, :, lo:p + 1].astype(accumulate)  # [H, n, D]
            v = vc[row, :, lo:p + 1].astype(accumulate)
            scores = np.einsum("hd,hnd->hn", q[row, i], k) * accumulate(scale)
            scores -= scores.max(axis=-1, keepdims=True)
            w = np.exp(scores)
            w /= w.sum(axis=-1, keepdims=True)
            out[row, i] = np.einsum("hn,hnd->hd", w, v)
    return out.reshape(b, s_new, hidden).astype(qkv.dtype), kc, vc


REFERENCES = {VARLEN_ATTENTION.name: varlen_attention, PREPAD_ATTENTION.name: prepad_attention}
"""Reference function of each plugin, by name; called as ``f(*inputs, **attributes)``; returns one array or a
tuple with one array per output."""
