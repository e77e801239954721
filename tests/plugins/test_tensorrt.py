"""The TensorRT adapters of the EET plugins (``eet.plugins.tensorrt``) on the CPU: what ``configure_plugin``,
``on_shape_change`` and ``enqueue`` hand the launchers for a fused ``qkv`` input, with the launchers replaced by a
recorder after ``on_shape_change`` (no GPU needed). Shapes and addresses are drawn fresh for every run; the GPU
files (``tests/runtime/test_single_plugin_gpu.py``) run the same adapters inside engines."""
import random
import types

import pytest

from eet.plugins import _lib

H_CHOICES, D_CHOICES = (1, 2, 4, 12), (32, 64, 80, 96, 128)


@pytest.fixture(scope="module")
def trt_classes():
    trt = pytest.importorskip("eet.trt")
    try:
        flavour = trt.load()
    except Exception as exc:  # no TensorRT flavour installed
        pytest.skip(f"needs TensorRT or TensorRT-RTX: {exc}")
    from eet.plugins.tensorrt import make_classes

    return flavour.module, make_classes(flavour.module)


class Recorder:
    """Stands in for eet.plugins._lib at enqueue time: keeps a snapshot of every parameter struct launched."""

    def __init__(self):
        self.launches = []

    def _record(self, name, params, stream):
        fields = {f: getattr(params, f) for f, _ in params._fields_}
        self.launches.append((name, fields, stream))

    def varlen_attention(self, params, stream):
        self._record("varlen", params, stream)

    def prepad_attention(self, params, stream):
        self._record("prepad", params, stream)


def desc(dims, dtype=None):
    return types.SimpleNamespace(dims=tuple(dims), type=dtype)


def draw(seed):
    rnd = random.Random(seed)
    heads, head_dim = rnd.choice(H_CHOICES), rnd.choice(D_CHOICES)
    return rnd, heads, head_dim, dict(num_heads=heads, head_dim=head_dim, scale=head_dim ** -0.5)


@pytest.mark.parametrize("fp16", [True, False])
@pytest.mark.parametrize("leading", [(), (1,)])
def test_varlen_adapter_reads_the_thirds_of_qkv(trt_classes, fp16, leading):
    """q, k, v are qkv + 0, + hidden, + 2 * hidden elements, row stride 3 * hidden; T is every axis but the last."""
    trt, classes = trt_classes
    rnd, heads, head_dim, attrs = draw(random.randrange(1 << 30))
    hidden = heads * head_dim
    batch, tokens, max_seqlen = rnd.randint(1, 9), rnd.randint(1, 4000), rnd.randint(1, 512)
    plugin = classes["EetVarlenAttention"][0](attrs)
    dtype = trt.DataType.HALF if fp16 else trt.DataType.FLOAT
    inputs = [desc(leading + (tokens, 3 * hidden), dtype), desc((batch + 1,)), desc((max_seqlen,))]
    plugin.on_shape_change(inputs, [desc(leading + (tokens, hidden), dtype)])
    plugin._lib = rec = Recorder()
    qkv, cu, carrier, out, stream = (rnd.randrange(1, 1 << 40) * 256 for _ in range(5))
    plugin.enqueue(None, None, [qkv, cu, carrier], [out], 0, stream)
    ((name, p, got_stream),) = rec.launches
    size = 2 if fp16 else 4
    assert name == "varlen" and got_stream == stream
    assert (p["q"], p["k"], p["v"]) == (qkv, qkv + hidden * size, qkv + 2 * hidden * size)
    assert (p["cu_seqlens"], p["out"]) == (cu, out)
    assert (p["q_row_stride"], p["k_row_stride"], p["v_row_stride"], p["out_row_stride"]) == (3 * hidden,) * 3 + (
        hidden,)
    assert (p["batch"], p["max_seqlen"], p["total_tokens"], p["num_heads"], p["head_dim"]) == (
        batch, max_seqlen, tokens, heads, head_dim)
    assert p["dtype"] == (_lib.DTYPE_FP16 if fp16 else _lib.DTYPE_FP32)
    assert p["scale"] == pytest.approx(head_dim ** -0.5)


@pytest.mark.parametrize("fp16", [True, False])
def test_prepad_adapter_reads_the_thirds_of_qkv(trt_classes, fp16):
    """The same thirds for EetPrePadAttention, with its caches, pad lengths, step and TensorRT's workspace."""
    trt, classes = trt_classes
    rnd, heads, head_dim, attrs = draw(random.randrange(1 << 30))
    hidden = heads * head_dim
    batch, seq, max_len = rnd.randint(1, 40), rnd.choice([1, rnd.randint(2, 300)]), rnd.randint(300, 2048)
    plugin = classes["EetPrePadAttention"][0](attrs)
    dtype = trt.DataType.HALF if fp16 else trt.DataType.FLOAT
    cache = desc((batch, heads, max_len, head_dim), dtype)
    inputs = [desc((batch, seq, 3 * hidden), dtype), desc((batch,)), desc((1,)), cache, cache]
    plugin.on_shape_change(inputs, [desc((batch, seq, hidden), dtype), cache, cache])
    plugin._lib = rec = Recorder()
    qkv, pads, step, k_cache, v_cache, out, workspace, stream = (rnd.randrange(1, 1 << 40) * 256 for _ in range(8))
    plugin.enqueue(None, None, [qkv, pads, step, k_cache, v_cache], [out, k_cache, v_cache], workspace, stream)
    plugin.enqueue(None, None, [qkv, pads, step, k_cache, v_cache], [out, k_cache, v_cache], 0, stream)
    (_, p, got_stream), (_, p_no_ws, _) = rec.launches
    size = 2 if fp16 else 4
    assert got_stream == stream
    assert (p["q"], p["k"], p["v"]) == (qkv, qkv + hidden * size, qkv + 2 * hidden * size)
    assert (p["pad_lengths"], p["step"], p["k_cache"], p["v_cache"], p["out"]) == (pads, step, k_cache, v_cache, out)
    assert (p["q_row_stride"], p["k_row_stride"], p["v_row_stride"], p["out_row_stride"]) == (3 * hidden,) * 3 + (
        hidden,)
    assert (p["batch"], p["seq"], p["max_len"], p["num_heads"], p["head_dim"]) == (
        batch, seq, max_len, heads, head_dim)
    assert p["dtype"] == (_lib.DTYPE_FP16 if fp16 else _lib.DTYPE_FP32)
    assert (p["workspace"], p["workspace_bytes"]) == (workspace, _lib.prepad_workspace_size(batch, heads, head_dim))
    assert p_no_ws["workspace"] is None  # TensorRT gave none: the launcher gets NULL


def test_adapters_refuse_a_qkv_that_is_not_three_hiddens(trt_classes):
    """At build time (static widths; -1 passes) and at a new shape, with the expected shape in the message."""
    trt, classes = trt_classes
    _, heads, head_dim, attrs = draw(random.randrange(1 << 30))
    hidden = heads * head_dim
    varlen = classes["EetVarlenAttention"][0](attrs)
    prepad = classes["EetPrePadAttention"][0](attrs)
    half = trt.DataType.HALF

    def built(dims):
        return [types.SimpleNamespace(desc=desc(dims))]

    varlen.configure_plugin(built((-1, -1)), [])
    varlen.configure_plugin(built((-1, 3 * hidden)), [])
    prepad.configure_plugin(built((-1, -1, 3 * hidden)), [])
    with pytest.raises(ValueError, match=rf"expected \[\.\.\., T, 3 \* {hidden}\]"):
        varlen.configure_plugin(built((-1, hidden)), [])
    with pytest.raises(ValueError, match=rf"expected \[B, S, 3 \* {hidden}\]"):
        prepad.configure_plugin(built((-1, 3 * hidden)), [])  # rank 2
    with pytest.raises(ValueError, match=rf"expected \[\.\.\., T, 3 \* {hidden}\]"):
        varlen.on_shape_change([desc((10, 2 * hidden), half), desc((3,)), desc((7,))], [])
    cache = desc((2, heads + 1, 64, head_dim), half)  # one head too many
    with pytest.raises(ValueError, match="do not match"):
        prepad.on_shape_change([desc((2, 1, 3 * hidden), half), desc((2,)), desc((1,)), cache, cache], [])


def test_unsupported_head_dim_is_refused_by_both(trt_classes):
    _, classes = trt_classes
    for name in ("EetVarlenAttention", "EetPrePadAttention"):
        with pytest.raises(ValueError, match=f"{name}: head_dim 48 is not supported"):
            classes[name][0](dict(num_heads=2, head_dim=48, scale=0.1))

