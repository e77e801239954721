"""Generation control that needs no GPU: left padding, limits and their errors."""
import numpy as np
import pytest

from eet.errors import EetError
from eet.runtime.generation import Limits, greedy, left_pad

LIMITS = Limits(max_batch=4, max_prompt=8, max_len=16, vocab_size=100)


def test_left_pad():
    ids, pads = left_pad([[5, 6, 7], [9], [1, 2]])
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9], [0, 1, 2]] and pads.tolist() == [0, 2, 1]
    assert ids.dtype == np.int32 and pads.dtype == np.int32


@pytest.mark.parametrize("prompts,new,message", [
    ([], 4, "no prompts"),
    ([[1]] * 5, 4, "5 prompts exceed the engine's --max-batch 4"),
    ([[1], []], 4, "prompt 1 is empty"),
    ([[1] * 9], 4, "prompt 0 has 9 tokens, over the engine's --max-prompt 8"),
    ([[1, 100]], 4, "token id 100, outside the vocabulary"),
    ([[1, -1]], 4, "token id -1, outside the vocabulary"),
    ([[1] * 8], 9, "8 tokens\\) \\+ 9 new tokens = 17 exceeds the engine's --max-len 16"),
    ([[1]], 0, "max_new_tokens must be >= 1"),
])
def test_limits(prompts, new, message):
    with pytest.raises(EetError, match=message):
        LIMITS.check(prompts, new)


def test_greedy_drives_context_then_decode():
    """A fake step function records what the loop feeds it: one context step, then S = 1 steps."""
    calls = []

    def step(ids, pads, position, extra):
        calls.append((ids.copy(), pads.copy(), position))
        token = (ids[:, -1] + 1).astype(np.int32)
        return token, np.zeros((ids.shape[0], 100), np.float32)

    tokens, logits = greedy(step, [[5, 6], [9]], 3, LIMITS, eos_token_id=11)
    assert [c[2] for c in calls] == [0, 2, 3]
    assert calls[0][0].tolist() == [[5, 6], [0, 9]] and calls[1][0].shape == (2, 1)
    assert tokens == [[7, 8, 9], [10, 11]] and len(logits) == 3


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_k=-2), "top_k must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
])
def test_bad_sampling(kwargs, message):
    from eet.runtime.generation import Sampling

    with pytest.raises(EetError, match=message):
        Sampling(**kwargs)
