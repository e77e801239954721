"""GPU tests of eet_varlen_attention (plugins/csrc/varlen_attention.cu) against a float64 reference.

Skipped without torch or without a CUDA device. With a GPU, libeet_kernels.so must be loadable (next
to eet/plugins/_lib.py after `pip install .`, or named by $EET_KERNELS_LIB); a missing library fails
the tests rather than skipping them.

Inputs are random; the seed is printed by every test (shown by pytest on failure) and in every
assertion message. Set EET_TEST_SEED=<n> to replay a run.
"""

from __future__ import annotations

import math
import os
import random
import zlib

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402

pytestmark = pytest.mark.gpu



from eet.plugins import _lib  # noqa: E402

SEED = int(os.environ.get("EET_TEST_SEED") or random.SystemRandom().randrange(2**31))
HEAD_DIMS = (32, 64, 80, 96, 128)
DTYPES = {"fp32": (_lib.DTYPE_FP32, torch.float32), "fp16": (_lib.DTYPE_FP16, torch.float16)}
SENTINEL = 777.0  # exact in fp16 and fp32; marks output memory the kernel must not write
PAD_ROWS = 3  # rows before and after the T token rows of every buffer


@pytest.fixture(scope="module", autouse=True)
def library():
    try:
        _lib.load_library()
    except RuntimeError as exc:  # a GPU is here, so the library should be too
        pytest.fail(str(exc))
    print(f"EET_TEST_SEED={SEED}")


def _generator(*key) -> torch.Generator:
    """A CPU generator seeded from SEED and the test's parameters (stable for a given seed)."""
    gen = torch.Generator()
    gen.manual_seed(zlib.crc32(repr((SEED,) + tuple(str(k) for k in key)).encode()))
    return gen


def _ctx(**kw) -> str:
    return f"EET_TEST_SEED={SEED} " + " ".join(f"{k}={v}" for k, v in kw.items())


def _ragged_lengths(gen, max_seqlen, n_random, extra=()):
    lengths = [1, max_seqlen, 0, *extra]
    lengths += [int(x) for x in torch.randint(1, max_seqlen + 1, (n_random,), generator=gen)]
    order = torch.randperm(len(lengths), generator=gen).tolist()
    return [lengths[i] for i in order]


def _cu_seqlens(lengths):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device="cuda")


class Buffers:
    """Q, K, V ([T, H*D] views, unit column stride) and an output view inside a larger buffer."""

    def __init__(self, layout, total, num_heads, head_dim, dtype, gen):
        hd = num_heads * head_dim
        self.total, self.num_heads, self.head_dim = total, num_heads, head_dim

        def randn(*shape):
            return torch.randn(*shape, generator=gen).to(dtype).cuda()

        if layout == "separate":  # three contiguous [T, H, D] tensors
            self.q, self.k, self.v = (randn(total, num_heads, head_dim).view(total, hd) for _ in "qkv")
            out_cols, out_col0 = hd + 8, 0
        elif layout == "fused":  # column slices of one [T, 3*H*D] tensor (row stride 3*H*D)
            qkv = randn(total, 3 * hd)
            self.q, self.k, self.v = qkv[:, :hd], qkv[:, hd : 2 * hd], qkv[:, 2 * hd :]
            out_cols, out_col0 = hd + 8, 0
        elif layout == "padded_misaligned":
            # Slices of a NaN-filled buffer with gap columns and rows around them, at odd element
            # offsets and an odd row stride: the kernel takes its scalar (unaligned) path, and any
            # read outside its own rows/columns turns the output into NaN.
            stride = 3 * hd + 5
            buf = torch.full((total + 2 * PAD_ROWS, stride), float("nan"), dtype=dtype, device="cuda")
            rows = slice(PAD_ROWS, PAD_ROWS + total)
            views = []
            for i in range(3):
                c0 = 1 + i * (hd + 1)
                view = buf[rows, c0 : c0 + hd]
                view.copy_(randn(total, hd))
                views.append(view)
            self.q, self.k, self.v = views
            self.keep_alive = buf
            out_cols, out_col0 = hd + 3, 1
        else:
            raise ValueError(layout)
        self.out_buf = torch.full(
            (total + 2 * PAD_ROWS, out_cols), SENTINEL, dtype=dtype, device="cuda"
        )
        self.out_col0 = out_col0
        self.out = self.out_buf[PAD_ROWS : PAD_ROWS + total, out_col0 : out_col0 + hd]
        self.out.fill_(float("nan"))  # poison: every element must be written

    def heads(self, x):
        return x.unflatten(1, (self.num_heads, self.head_dim))  # [T, H, D] view

    def check_untouched(self, ctx):
        mask = torch.ones_like(self.out_buf, dtype=torch.bool)
        col0 = self.out_col0
        mask[PAD_ROWS : PAD_ROWS + self.total, col0 : col0 + self.out.shape[1]] = False
        outside = self.out_buf[mask]
        assert torch.all(outside == SENTINEL), f"output written outside its rows/columns: {ctx}"


def _launch(bufs, cu, *, dtype_code, batch, max_seqlen, scale, stream=None, params=None):
    for t in (bufs.q, bufs.k, bufs.v, bufs.out):
        assert t.stride(1) == 1
    p = params or _lib.VarlenAttentionParams()
    p.q, p.k, p.v = bufs.q.data_ptr(), bufs.k.data_ptr(), bufs.v.data_ptr()
    p.out, p.cu_seqlens = bufs.out.data_ptr(), cu.data_ptr()
    p.q_row_stride, p.k_row_stride = bufs.q.stride(0), bufs.k.stride(0)
    p.v_row_stride, p.out_row_stride = bufs.v.stride(0), bufs.out.stride(0)
    p.batch, p.num_heads, p.head_dim = batch, bufs.num_heads, bufs.head_dim
    p.max_seqlen, p.total_tokens, p.scale, p.dtype = max_seqlen, bufs.total, scale, dtype_code
    stream = stream if stream is not None else torch.cuda.current_stream()
    _lib.varlen_attention(p, stream.cuda_stream)
    return p


def _reference(bufs, lengths, scale):
    """float64 attention per sequence: [T, H, D]."""
    q, k, v = (bufs.heads(x).double() for x in (bufs.q, bufs.k, bufs.v))
    out = torch.zeros_like(q)
    start = 0
    for n in lengths:
        if n:
            qs, ks, vs = (x[start : start + n].transpose(0, 1) for x in (q, k, v))  # [H, n, D]
            p = torch.softmax((qs @ ks.transpose(1, 2)) * scale, dim=-1)
            out[start : start + n] = (p @ vs).transpose(0, 1)
        start += n
    return out


def _torch_fp16_error(bufs, lengths, scale, ref):
    """max |torch SDPA in fp16 - float64 reference|: what PyTorch itself gets in fp16."""
    q, k, v = (bufs.heads(x) for x in (bufs.q, bufs.k, bufs.v))
    err = 0.0
    start = 0
    for n in lengths:
        if n:
            # Fresh (aligned, contiguous) copies: PyTorch's fused fp16 kernels whatever the layout
            # under test. Not .contiguous(): a one-row view counts as contiguous and would keep the
            # odd element offset of the padded_misaligned layout, which PyTorch's kernels fault on.
            qs, ks, vs = (
                x[start : start + n].transpose(0, 1)[None].clone(memory_format=torch.contiguous_format)
                for x in (q, k, v)
            )
            o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)[0].transpose(0, 1)
            err = max(err, (o.double() - ref[start : start + n]).abs().max().item())
        start += n
    return err


def _check(bufs, lengths, scale, dtype_name, ctx):
    torch.cuda.synchronize()
    out = bufs.heads(bufs.out)
    assert torch.isfinite(out).all(), f"non-finite (unwritten or NaN) output: {ctx}"
    bufs.check_untouched(ctx)
    ref = _reference(bufs, lengths, scale)
    err = (out.double() - ref).abs().max().item()
    ref_max = ref.abs().max().item()
    if dtype_name == "fp32":
        bound = 1e-4 * max(1.0, ref_max)
    else:
        e_torch = _torch_fp16_error(bufs, lengths, scale, ref)
        bound = 2 * e_torch + 1e-3
    print(f"{ctx}: max err {err:.3g} (bound {bound:.3g}, max |ref| {ref_max:.3g})")
    assert err <= bound, f"max |out - ref| = {err:.4g} > {bound:.4g}: {ctx}"


def _run_case(layout, dtype_name, head_dim, lengths, *, num_heads=3, max_seqlen=None, scale=None,
              gen=None, fill=None):
    dtype_code, dtype = DTYPES[dtype_name]
    gen = gen or _generator(layout, dtype_name, head_dim)
    total = sum(lengths)
    max_seqlen = max_seqlen or max(max(lengths), 1)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    bufs = Buffers(layout, total, num_heads, head_dim, dtype, gen)
    if fill is not None:
        fill(bufs)
    cu = _cu_seqlens(lengths)
    ctx = _ctx(layout=layout, dtype=dtype_name, head_dim=head_dim, heads=num_heads,
               max_seqlen=max_seqlen, scale=scale, lengths=lengths)
    print(ctx)
    _launch(bufs, cu, dtype_code=dtype_code, batch=len(lengths), max_seqlen=max_seqlen, scale=scale)
    _check(bufs, lengths, scale, dtype_name, ctx)


@pytest.mark.parametrize("layout", ["separate", "fused", "padded_misaligned"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype_name", ["fp32", "fp16"])
def test_ragged_batch(layout, dtype_name, head_dim):
    gen = _generator("ragged", layout, dtype_name, head_dim)
    if layout == "separate":
        max_seqlen = 1024
    elif layout == "fused":
        max_seqlen = 512
    else:
        max_seqlen = 300
    # Tile edges of the kernel (64 query rows, 32 keys) and their neighbours, 1 and max_seqlen, an
    # empty sequence, and random lengths.
    lengths = _ragged_lengths(gen, max_seqlen, 4, extra=(31, 32, 33, 63, 64, 65, 2))
    bound = max_seqlen + 37 if layout == "padded_misaligned" else max_seqlen  # a loose bound too
    _run_case(layout, dtype_name, head_dim, lengths, max_seqlen=bound, gen=gen)


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16"])
def test_bert_base_shape(dtype_name):
    gen = _generator("bert", dtype_name)
    lengths = [int(x) for x in torch.randint(1, 513, (24,), generator=gen)] + [512, 1]
    _run_case("fused", dtype_name, 64, lengths, num_heads=12, max_seqlen=512, gen=gen)


@pytest.mark.parametrize("pattern", ["random_sharp", "increasing", "decreasing"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype_name", ["fp32", "fp16"])
def test_large_logits_online_softmax(dtype_name, head_dim, pattern):
    """Peaked softmax, and running maxima that change on every key tile (or never)."""
    gen = _generator("logits", dtype_name, head_dim, pattern)
    lengths = [700, 1, 97, 256, 33]
    _, dtype = DTYPES[dtype_name]
    scale = 1.0 / math.sqrt(head_dim)

    def fill(bufs):
        if pattern == "random_sharp":
            bufs.q.mul_(4.0)  # logits ~ N(0, 64): weights span many orders of magnitude
            bufs.k.mul_(2.0)
            return
        h, d = bufs.num_heads, bufs.head_dim
        u = torch.randn(h, d, generator=gen)
        u = u / u.norm(dim=-1, keepdim=True)
        q = 3.0 * u + 0.05 * torch.randn(bufs.total, h, d, generator=gen)
        ramp = torch.cat([torch.arange(n, dtype=torch.float32) / max(n - 1, 1) for n in lengths])
        if pattern == "decreasing":
            ramp = 1.0 - ramp
        # logit(i, j) ~ 40 * ramp(j) (natural-log units) plus noise
        k = (40.0 / (3.0 * scale)) * ramp[:, None, None] * u + 0.3 * torch.randn(
            bufs.total, h, d, generator=gen
        )
        bufs.q.copy_(q.reshape(bufs.total, h * d).to(dtype))
        bufs.k.copy_(k.reshape(bufs.total, h * d).to(dtype))

    _run_case("fused", dtype_name, head_dim, lengths, scale=scale, gen=gen, fill=fill)


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16"])
def test_many_single_token_sequences(dtype_name):
    """batch > 65535 (more than one grid z-slice); a length-1 sequence's output is exactly its V."""
    dtype_code, dtype = DTYPES[dtype_name]
    gen = _generator("many", dtype_name)
    lengths = [1] * 70000
    lengths[123] = 0
    lengths[69000] = 5
    total = sum(lengths)
    bufs = Buffers("separate", total, 2, 32, dtype, gen)
    cu = _cu_seqlens(lengths)
    ctx = _ctx(test="many_single_token", dtype=dtype_name)
    _launch(bufs, cu, dtype_code=dtype_code, batch=len(lengths), max_seqlen=5, scale=0.125)
    torch.cuda.synchronize()
    bufs.check_untouched(ctx)
    single = torch.ones(total, dtype=torch.bool, device="cuda")
    single[69000 - 1 : 69000 - 1 + 5] = False  # the 5-token sequence starts after one empty one
    assert torch.isfinite(bufs.out).all(), ctx
    assert torch.equal(bufs.out[single], bufs.v[single]), ctx
    q, k, v = (bufs.heads(x)[~single].double().transpose(0, 1) for x in (bufs.q, bufs.k, bufs.v))
    ref = (torch.softmax((q @ k.transpose(1, 2)) * 0.125, dim=-1) @ v).transpose(0, 1)
    err = (bufs.heads(bufs.out)[~single].double() - ref).abs().max().item()
    assert err <= (1e-5 if dtype_name == "fp32" else 4e-3), (err, ctx)


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16"])
def test_zero_tokens(dtype_name):
    dtype_code, dtype = DTYPES[dtype_name]
    out = torch.full((4, 64), SENTINEL, dtype=dtype, device="cuda")
    params = _lib.make_varlen_params(dtype=dtype_code, num_heads=1, head_dim=64, batch=3,
                                     max_seqlen=8, total_tokens=0, out=out.data_ptr())
    _lib.varlen_attention(params, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert torch.all(out == SENTINEL)


def test_side_stream_and_params_reuse():
    """The kernel runs on the stream it is given; one params object serves several calls."""
    dtype_code, dtype = DTYPES["fp16"]
    gen = _generator("stream")
    params = None
    side = torch.cuda.Stream()
    for trial in range(3):
        lengths = _ragged_lengths(gen, 256, 3)
        bufs = Buffers("fused", sum(lengths), 4, 64, dtype, gen)
        cu = _cu_seqlens(lengths)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            params = _launch(bufs, cu, dtype_code=dtype_code, batch=len(lengths), max_seqlen=256,
                             scale=0.125, stream=side, params=params)
        torch.cuda.current_stream().wait_stream(side)
        _check(bufs, lengths, 0.125, "fp16", _ctx(test="side_stream", trial=trial, lengths=lengths))


@pytest.mark.parametrize("head_dim", [64, 128])  # 128 needs the > 48 KB shared-memory opt-in
def test_cuda_graph_capture(head_dim):
    dtype_code, dtype = DTYPES["fp16"]
    gen = _generator("graph", head_dim)
    lengths = [200, 1, 64, 130]
    bufs = Buffers("fused", sum(lengths), 2, head_dim, dtype, gen)
    cu = _cu_seqlens(lengths)
    kw = dict(dtype_code=dtype_code, batch=len(lengths), max_seqlen=256, scale=0.1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        _launch(bufs, cu, stream=side, **kw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _launch(bufs, cu, **kw)
    new = torch.randn(bufs.q.shape, generator=gen).to(dtype).cuda()
    bufs.q.copy_(new)
    bufs.out.fill_(float("nan"))
    graph.replay()
    _check(bufs, lengths, 0.1, "fp16", _ctx(test="graph", head_dim=head_dim))


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype_name", ["fp32", "fp16"])
def test_long_sequences(dtype_name, head_dim):
    """Sequences past 2048 tokens, lengths off every tile multiple (64 and 128 query rows, 64 keys):
    the fp16 kernel's 128-row tiles (max_seqlen >= 1024) and its longest-first block order."""
    gen = _generator("long", dtype_name, head_dim)
    lengths = [2100, 1, 1090, 127, 129, 2049]
    _run_case("fused", dtype_name, head_dim, lengths, num_heads=2, gen=gen)


@pytest.mark.parametrize("head_dim,scale", [(64, -0.125), (64, 0.0), (96, -0.1), (96, 0.0)])
@pytest.mark.parametrize("dtype_name", ["fp32", "fp16"])
def test_non_positive_scale(dtype_name, head_dim, scale):
    """Any finite scale is allowed; with a negative one the row maximum of the scores is not that of
    Q K^T, with zero every key weighs the same. fp16, head_dim 64 scales inside the exponentials (Q's
    sign flipped for a negative scale); head_dim 96 scales the scores first. (PyTorch computes these
    scales nearly exactly, so the fp16 bound is about its 1e-3 floor: |scale| is 1 / sqrt(head_dim),
    whose fp16 P rounding stays well below it; the sharper -0.3 measured 0.92e-3 to 1.01e-3 on an H100.)"""
    gen = _generator("scale", dtype_name, head_dim)
    lengths = [300, 1, 65, 64]
    _run_case("fused", dtype_name, head_dim, lengths, scale=scale, gen=gen)
