"""Batches of token-id sequences as NumPy: one conversion for the whole batch, with a clear error for anything
that is not a list of integers (shared by BERT's ``encode()`` and GPT-2's ``generate()``)."""
from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from eet.errors import EetError


def flatten(seqs: Sequence[Sequence[int]], what: str = "sequence") -> tuple[np.ndarray, np.ndarray]:
    """(flat int64 [T], lengths int64 [B]): integer lists (or 1-D integer NumPy arrays) back to back, converted
    once. Raises :class:`EetError` naming the first ``what`` that is not a list of integers (a float id such as
    3.7 would otherwise be truncated without a word)."""
    def bad(i: int) -> EetError:
        return EetError(f"{what} {i} is not a list of integer token ids: give one list of ints per {what}")

    try:
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    except TypeError:
        raise bad(next(i for i, s in enumerate(seqs) if not hasattr(s, "__len__"))) from None
    flat = None
    if lengths.size and all(isinstance(s, np.ndarray) for s in seqs):
        if all(s.ndim == 1 for s in seqs):
            flat = np.concatenate(seqs)
    else:
        try:
            flat = np.array(list(itertools.chain.from_iterable(seqs)))
        except (TypeError, ValueError, OverflowError):
            pass
    if flat is None or flat.ndim != 1 or (flat.size and flat.dtype.kind not in "iub"):
        for i, seq in enumerate(seqs):
            try:
                arr = np.asarray(seq)
            except (TypeError, ValueError, OverflowError):
                raise bad(i) from None
            if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iub"):
                raise bad(i)
        raise EetError(f"the {what}s do not hold integer token ids")
    return flat.astype(np.int64, copy=False), lengths


def first_failing(bad: np.ndarray, starts: np.ndarray) -> int | None:
    """The index of the sequence holding the first True of the flat mask ``bad`` (``starts``: each sequence's
    first flat index, as from ``np.cumsum(lengths) - lengths``), or None."""
    hits = np.flatnonzero(bad)
    return None if hits.size == 0 else int(np.searchsorted(starts, hits[0], side="right") - 1)


def sequence_problems(flat: np.ndarray, lengths: np.ndarray, *, max_len: int, vocab_size: int,
                      what: str = "sequence", limit: str = "--max-seq") -> dict[int, str]:
    """The first problem of each failing sequence of a :func:`flatten`ed batch, checked in the order: empty,
    over ``max_len`` tokens (the engine's ``limit`` option), an id outside [0, ``vocab_size``). Only the first
    failing sequence of each kind is listed: ``{index: message}``; the caller raises the lowest index."""
    found: dict[int, str] = {}
    empty = np.flatnonzero(lengths == 0)
    if empty.size:
        found[int(empty[0])] = f"{what} {int(empty[0])} is empty: every {what} needs at least one token"
    long = np.flatnonzero(lengths > max_len)
    if long.size and int(long[0]) not in found:
        i = int(long[0])
        found[i] = (f"{what} {i} has {int(lengths[i])} tokens, over the engine's {limit} {max_len}; truncate it or "
                    f"rebuild with a larger {limit}")
    outside = (flat < 0) | (flat >= vocab_size)
    i = first_failing(outside, np.cumsum(lengths) - lengths)
    if i is not None and i not in found:
        found[i] = (f"{what} {i} holds token id {int(flat[np.flatnonzero(outside)[0]])}, outside the vocabulary "
                    f"[0, {vocab_size})")
    return found
