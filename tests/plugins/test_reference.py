"""The NumPy references of the EET plugins against token-by-token float64 loops."""
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
    qkv = np.concatenate([q, k, v], axis=-1)  # the plugin's fused input: q, k, v thirds of the last axis
    out = varlen_attention(qkv, cu, np.zeros(max(lengths), np.int32), num_heads=heads, head_dim=dim, scale=scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(out[0], naive(q[0], k[0], v[0], lengths, heads, dim, scale), rtol=1e-10, atol=1e-12)


def test_sequences_do_not_see_each_other(rng):
    """Changing one sequence's keys/values leaves the other sequences' outputs bit-identical."""
    heads, dim, lengths = 2, 32, [4, 7, 3]
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    q, k, v = (rng.standard_normal((14, heads * dim)).astype(np.float32) for _ in range(3))
    a = varlen_attention(np.concatenate([q, k, v], axis=-1), cu, 7, num_heads=heads, head_dim=dim, scale=0.2)
    k2, v2 = k.copy(), v.copy()
    k2[4:11] += 1.0
    v2[4:11] -= 1.0
    b = varlen_attention(np.concatenate([q, k2, v2], axis=-1), cu, 7, num_heads=heads, head_dim=dim, scale=0.2)
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
    x = np.zeros((5, 3 * 64), np.float32)
    with pytest.raises(ValueError, match="exceeds max_seqlen"):
        varlen_attention(x, np.array([0, 5], np.int32), 4, num_heads=2, head_dim=32, scale=1.0)
    y = np.zeros((5, 3 * 96), np.float32)
    with pytest.raises(ValueError, match="head_dim 48"):
        varlen_attention(y, np.array([0, 5], np.int32), 8, num_heads=2, head_dim=48, scale=1.0)


def test_varlen_rejects_unfused_width():
    """qkv must hold queries, keys and values: a last axis of one hidden width (a version-1 query) is refused."""
    with pytest.raises(ValueError, match=r"qkv must be \[\.\.\., T, 3 \* 64\]"):
        varlen_attention(np.zeros((5, 64), np.float32), np.array([0, 5], np.int32), 8, num_heads=2, head_dim=32,
                         scale=1.0)


def naive_prepad(q, k, v, pads, step, kc, vc, heads, dim, scale):
    """Token-by-token float64 pre-padding attention: append, then attend over [pad, position]."""
    b, s, _ = q.shape
    kc, vc = kc.astype(np.float64).copy(), vc.astype(np.float64).copy()
    for row in range(b):
        for i in range(s):
            kc[row, :, step + i] = k[row, i].reshape(heads, dim)
            vc[row, :, step + i] = v[row, i].reshape(heads, dim)
    out = np.zeros((b, s, heads, dim))
    for row in range(b):
        for i in range(s):
            for h in range(heads):
                js = range(pads[row], step + i + 1)
                if not js:
                    continue
                sc = np.array([q[row, i].reshape(heads, dim)[h] @ kc[row, h, j] for j in js]) * scale
                p = np.exp(sc - sc.max())
                out[row, i, h] = (p / p.sum()) @ np.array([vc[row, h, j] for j in js])
    return out.reshape(b, s, heads * dim), kc, vc


@pytest.mark.parametrize("seq,step", [(7, 0), (1, 9), (3, 5)])
def test_prepad_matches_naive_loop(rng, seq, step):
    from eet.plugins.reference import prepad_attention

    heads, dim, b, length = 2, 32, 3, 16
    q, k, v = (rng.standard_normal((b, seq, heads * dim)) for _ in range(3))
    kc, vc = (rng.standard_normal((b, heads, length, dim)) for _ in range(2))
    pads = np.array([0, int(rng.integers(1, step + seq + 1)), step + seq], np.int32)  # the last row: all padding
    qkv = np.concatenate([q, k, v], axis=-1)  # the plugin's fused input: q, k, v thirds of the last axis
    out, kc2, vc2 = prepad_attention(qkv, pads, np.array([step], np.int32), kc, vc, num_heads=heads,
                                     head_dim=dim, scale=0.3)
    want, wk, wv = naive_prepad(q, k, v, pads, step, kc, vc, heads, dim, 0.3)
    np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(kc2, wk)
    np.testing.assert_array_equal(vc2, wv)
    assert (out[2] == 0).all()


def test_prepad_never_reads_padded_keys(rng):
    """Cache positions before a row's pad length may hold anything (NaN here): no effect on the output."""
    from eet.plugins.reference import prepad_attention

    heads, dim = 2, 32
    q, k, v = (rng.standard_normal((2, 1, heads * dim)).astype(np.float32) for _ in range(3))
    kc, vc = (rng.standard_normal((2, heads, 12, dim)).astype(np.float32) for _ in range(2))
    pads = np.array([4, 0], np.int32)
    qkv = np.concatenate([q, k, v], axis=-1)
    clean, _, _ = prepad_attention(qkv, pads, np.array([8], np.int32), kc, vc, num_heads=heads, head_dim=dim,
                                   scale=0.2)
    kc[0, :, :4] = np.nan
    vc[0, :, :4] = np.nan
    dirty, _, _ = prepad_attention(qkv, pads, np.array([8], np.int32), kc, vc, num_heads=heads, head_dim=dim,
                                   scale=0.2)
    np.testing.assert_array_equal(clean, dirty)


def test_prepad_rejects_overflow():
    from eet.plugins.reference import prepad_attention

    x = np.zeros((1, 3, 3 * 64), np.float32)
    c = np.zeros((1, 2, 4, 32), np.float32)
    with pytest.raises(ValueError, match="exceeds the cache length 4"):
        prepad_attention(x, np.zeros(1, np.int32), np.array([2], np.int32), c, c, num_heads=2, head_dim=32,
                         scale=1.0)


def test_prepad_rejects_unfused_width():
    """qkv must hold queries, keys and values: a last axis of one hidden width (a v1 query) is refused."""
    from eet.plugins.reference import prepad_attention

    c = np.zeros((1, 2, 4, 32), np.float32)
    with pytest.raises(ValueError, match=r"qkv must be \[B, S, 3 \* 64\]"):
        prepad_attention(np.zeros((1, 3, 64), np.float32), np.zeros(1, np.int32), np.array([0], np.int32), c, c,
                         num_heads=2, head_dim=32, scale=1.0)
