"""NumPy reference implementations of the EET plugins, bound to their specs.

They define what the CUDA kernels must compute, run the rewritten ONNX on a machine without a GPU
(:mod:`eet.plugins.onnx_reference`) and are the oracle of the kernel tests.
"""
from __future__ import annotations

import numpy as np

from eet.plugins.spec import HEAD_DIMS, VARLEN_ATTENTION


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


def varlen_attention(query: np.ndarray, key: np.ndarray, value: np.ndarray, cu_seqlens: np.ndarray,
                     max_seqlen: np.ndarray | int, *, num_heads: int, head_dim: int, scale: float,
                     accumulate=np.float64) -> np.ndarray:
    """Reference of ``EetVarlenAttention`` (see :data:`eet.plugins.spec.VARLEN_ATTENTION`).

    Args:
        query, key, value: float arrays [..., T, num_heads * head_dim] (the leading axes multiply to T).
        cu_seqlens: int32 [B + 1].
        max_seqlen: the shape carrier [S] (only its length is used) or S itself.
        num_heads, head_dim, scale: the node's attributes.
        accumulate: the dtype of the arithmetic (float64 for an oracle, float32 to mimic the kernel).

    Returns:
        The context, same shape and dtype as ``query``.
    """
    hidden = num_heads * head_dim
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} is not supported; supported: {HEAD_DIMS}")
    if query.shape[-1] != hidden or key.shape != query.shape or value.shape != query.shape:
        raise ValueError(f"query/key/value must share the shape [..., T, {hidden}], got "
                         f"{query.shape}, {key.shape}, {value.shape}")
    total = int(np.prod(query.shape[:-1]))
    limit = max_seqlen if isinstance(max_seqlen, (int, np.integer)) else np.asarray(max_seqlen).shape[0]
    lengths = check_cu_seqlens(cu_seqlens, total, int(limit))
    q = query.reshape(total, num_heads, head_dim).astype(accumulate)
    k = key.reshape(total, num_heads, head_dim).astype(accumulate)
    v = value.reshape(total, num_heads, head_dim).astype(accumulate)
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
    return out.reshape(query.shape).astype(query.dtype)


REFERENCES = {VARLEN_ATTENTION.name: varlen_attention}
"""Reference function of each plugin, by name; called as ``f(*inputs, **attributes)``."""
