"""The NumPy reference of EetVarlenAttention against a token-by-token float64 loop."""
import numpy as np
import pytest

from eet.plugins.reference import check_cu_seqlens, varlen_attention


def naive(q, k, v, lengths, heads, dim, scale):
    """Attention of each token over its own sequence, one token and head at a time (float64)."""
    t = q.shape[0]
    q, k, v = (x.reshape(t, heads, dim).astype(np.float64) for x in (q, k, v))
    out = np.zeros_like(q)
    start = 0
    for n in lengths:
        for i in range(start, start + n):
            for h in range(heads):
                s = np.array([q[i, h] @ k[j, h] for j in range(start, start + n)]) * scale
                p = np.exp(s - s.max())
                out[i, h] = (p / p.sum()) @ v[start:start + n, h]
        start += n
    return out.reshape(t, heads * dim)


@pytest.mark.parametrize("heads,dim", [(2, 32), (3, 64), (1, 80)])
def test_matches_naive_loop(rng, heads, dim):
    lengths = [int(x) for x in rng.integers(0, 12, size=5)] + [1]
    t = sum(lengths)
    q, k, v = (rng.standard_normal((1, t, heads * dim)) for _ in range(3))
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    scale = float(rng.uniform(0.05, 0.3))
    out = varlen_attention(q, k, v, cu, np.zeros(max(lengths), np.int32), num_heads=heads, head_dim=dim,
                           scale=scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(out[0], naive(q[0], k[0], v[0], lengths, heads, dim, scale), rtol=1e-10, atol=1e-12)


def test_sequences_do_not_see_each_other(rng):
    """Changing one sequence's keys/values leaves the other sequences' outputs bit-identical."""
    heads, dim, lengths = 2, 32, [4, 7, 3]
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    q, k, v = (rng.standard_normal((14, heads * dim)).astype(np.float32) for _ in range(3))
    a = varlen_attention(q, k, v, cu, 7, num_heads=heads, head_dim=dim, scale=0.2)
    k2, v2 = k.copy(), v.copy()
    k2[4:11] += 1.0
    v2[4:11] -= 1.0
    b = varlen_attention(q, k2, v2, cu, 7, num_heads=heads, head_dim=dim, scale=0.2)
    assert np.array_equal(a[:4], b[:4]) and np.array_equal(a[11:], b[11:])
    assert not np.allclose(a[4:11], b[4:11])


@pytest.mark.parametrize("cu,total,message", [
    ([0], 0, "at least 2"),
    ([1, 3], 3, "start at 0"),
    ([0, 5, 3], 3, "non-decreasing"),
    ([0, 2, 4], 5, "end at the token count"),
])
def test_bad_cu_seqlens(cu, total, message):
    with pytest.raises(ValueError, match=message):
        check_cu_seqlens(np.array(cu, np.int32), total)


def test_too_long_and_bad_head_dim():
    x = np.zeros((5, 64), np.float32)
    with pytest.raises(ValueError, match="exceeds max_seqlen"):
        varlen_attention(x, x, x, np.array([0, 5], np.int32), 4, num_heads=2, head_dim=32, scale=1.0)
    y = np.zeros((5, 96), np.float32)
    with pytest.raises(ValueError, match="head_dim 48"):
        varlen_attention(y, y, y, np.array([0, 5], np.int32), 8, num_heads=2, head_dim=48, scale=1.0)
