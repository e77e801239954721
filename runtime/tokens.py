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
