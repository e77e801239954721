"""eet.runtime.tokens: a batch of token-id sequences as one flat int64 array and its lengths."""
import numpy as np
import pytest

from eet.errors import EetError
from eet.runtime.tokens import flatten, sequence_problems


def test_flatten_lists_arrays_and_mixed(rng):
    lengths = rng.integers(0, 20, size=6)
    arrays = [rng.integers(0, 1000, n) for n in lengths]
    for seqs in (arrays, [a.tolist() for a in arrays], [a if i % 2 else a.tolist() for i, a in enumerate(arrays)],
                 [a.astype(np.int32) for a in arrays]):
        flat, got = flatten(seqs)
        assert flat.dtype == np.int64 and got.dtype == np.int64
        assert got.tolist() == lengths.tolist()
        assert flat.tolist() == np.concatenate(arrays).tolist()


def test_flatten_empty_batch_and_empty_sequences():
    flat, lengths = flatten([])
    assert flat.size == 0 and lengths.size == 0
    flat, lengths = flatten([[], []])
    assert flat.size == 0 and lengths.tolist() == [0, 0]


@pytest.mark.parametrize("seqs,bad", [
    ([[1, 2], [3.0]], 1),                        # a float, even a whole one
    ([[1], np.array([0.5])], 1),
    ([[1], [[2]]], 1),                           # nested
    ([np.array([1]), np.array([[1, 2]])], 1),    # 2-D array
    ([[1], "ab"], 1),                            # a string is not a list of ids
    ([[1], None], 1),
    ([7], 0),                                    # a bare id instead of a sequence
])
def test_flatten_names_the_first_bad_sequence(seqs, bad):
    with pytest.raises(EetError, match=f"prompt {bad} is not a list of integer token ids"):
        flatten(seqs, "prompt")


def test_sequence_problems_lists_the_first_of_each_kind():
    flat, lengths = flatten([[1, 2], [], [5] * 9, [1, 99], [], [1] * 9])
    found = sequence_problems(flat, lengths, max_len=8, vocab_size=50, what="prompt", limit="--max-prompt")
    assert sorted(found) == [1, 2, 3]
    assert found[1].startswith("prompt 1 is empty")
    assert found[2].startswith("prompt 2 has 9 tokens, over the engine's --max-prompt 8")
    assert found[3] == "prompt 3 holds token id 99, outside the vocabulary [0, 50)"
    flat, lengths = flatten([[1, 2], [3]])
    assert sequence_problems(flat, lengths, max_len=8, vocab_size=50) == {}
