"""A one-plugin engine executed by TensorRT on the GPU computes what the launcher computes: the plan is built
without a GPU (eet.runtime.single_plugin), TensorRT calls the plugin's Python enqueue, and the outputs (and,
for pre-padding attention, the KV caches it updates in place) equal the launcher's bit for bit on the same
random inputs. On an H100/H200 with TensorRT-RTX this needs the test shim (EET_CC_SHIM, tests/conftest.py)."""
import pytest

from conftest import skip_unless_engine_gpu

pytestmark = pytest.mark.gpu
skip_unless_engine_gpu()

import torch  # noqa: E402

from eet.plugins import _lib  # noqa: E402
from eet.plugins.spec import PREPAD_ATTENTION, VARLEN_ATTENTION  # noqa: E402
from eet.runtime.single_plugin import SingleNodeEngine  # noqa: E402

H, D = 4, 64
DT = {"fp16": (torch.float16, "float16", _lib.DTYPE_FP16), "fp32": (torch.float32, "float32", _lib.DTYPE_FP32)}
ATTRS = dict(num_heads=H, head_dim=D, scale=D ** -0.5)


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_varlen_engine_equals_launcher(dtype, deserialize_hook, rng):
    """The one-node engine reads q, k, v as the thirds of its fused qkv input [T, 3 * hidden] (row stride
    3 * hidden); the launcher gets three contiguous copies of them: bit-identical outputs."""
    tdt, name, code = DT[dtype]
    lengths = [int(n) for n in rng.integers(1, 200, size=5)]
    T, S, hidden = sum(lengths), max(lengths), H * D
    qkv = torch.from_numpy(rng.standard_normal((T, 3 * hidden), dtype="float32")).to(tdt).cuda()
    q, k, v = (qkv[:, i * hidden:(i + 1) * hidden].contiguous() for i in range(3))
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device="cuda")
    carrier = torch.empty(S, dtype=torch.int32, device="cuda")
    want, got = torch.full_like(q, float("nan")), torch.full_like(q, float("nan"))
    _lib.varlen_attention(_lib.make_varlen_params(dtype=code, num_heads=H, head_dim=D, batch=len(lengths),
                                                  max_seqlen=S, total_tokens=T, q=q.data_ptr(), k=k.data_ptr(),
                                                  v=v.data_ptr(), out=want.data_ptr(), cu_seqlens=cu.data_ptr()), 0)
    inputs = [("qkv", name, ["t", 3 * hidden]), ("cu_seqlens", "int32", ["b1"]), ("max_seqlen", "int32", ["s"])]
    shapes = {"qkv": (T, 3 * hidden), "cu_seqlens": (len(lengths) + 1,), "max_seqlen": (S,)}
    profile = {n: ((1,) + s[1:], s, s) if n == "qkv" else ((1,), s, s) for n, s in shapes.items()}
    eng = SingleNodeEngine(VARLEN_ATTENTION, inputs, [("context", name, ["t", hidden])], ATTRS, profile,
                           deserialize_hook=deserialize_hook)
    eng.bind(shapes, {"qkv": qkv.data_ptr(), "cu_seqlens": cu.data_ptr(), "max_seqlen": carrier.data_ptr(),
                      "context": got.data_ptr()})
    stream = torch.cuda.Stream()
    eng.run(stream.cuda_stream)
    stream.synchronize()
    torch.cuda.synchronize()
    assert torch.isfinite(want).all() and torch.equal(got, want), f"lengths {lengths}"


def run_prepad_both_ways(dtype, B, S, L, step, pads, deserialize_hook, workspace=False):
    """The same pre-padding attention call through the launcher and through a one-node engine, on copies of
    one random cache: (launcher output, engine output, their caches after, the caches before, the
    launcher's workspace or None). With ``workspace`` the launcher gets a NaN-filled one of
    prepad_workspace_size bytes; the engine always gets TensorRT's."""
    tdt, name, code = DT[dtype]
    hidden = H * D
    pads = torch.tensor(pads, dtype=torch.int32, device="cuda")
    step_dev = torch.tensor([step], dtype=torch.int32, device="cuda")
    qkv = torch.randn((B, S, 3 * hidden), device="cuda").to(tdt)
    caches = torch.randn((2, B, H, L, D), device="cuda").to(tdt)
    want_caches, got_caches = caches.clone(), caches.clone()
    want = torch.full((B, S, hidden), float("nan"), dtype=tdt, device="cuda")
    got = want.clone()
    ws = torch.full((_lib.prepad_workspace_size(B, H, D) // 4,), float("nan"), device="cuda") if workspace else None
    elem = qkv.element_size()
    _lib.prepad_attention(_lib.make_prepad_params(
        dtype=code, num_heads=H, head_dim=D, batch=B, seq=S, max_len=L, q=qkv.data_ptr(),
        k=qkv.data_ptr() + hidden * elem, v=qkv.data_ptr() + 2 * hidden * elem, out=want.data_ptr(),
        k_cache=want_caches[0].data_ptr(), v_cache=want_caches[1].data_ptr(), pad_lengths=pads.data_ptr(),
        step=step_dev.data_ptr(), q_row_stride=3 * hidden, k_row_stride=3 * hidden, v_row_stride=3 * hidden,
        workspace=None if ws is None else ws.data_ptr(), workspace_bytes=0 if ws is None else ws.numel() * 4), 0)
    cache = ["b", H, L, D]
    inputs = [("qkv", name, ["b", "s", 3 * hidden]), ("pad_lengths", "int32", ["b"]), ("step", "int32", [1]),
              ("past_key", name, cache), ("past_value", name, cache)]
    shapes = {"qkv": (B, S, 3 * hidden), "pad_lengths": (B,), "past_key": (B, H, L, D), "past_value": (B, H, L, D)}
    eng = SingleNodeEngine(PREPAD_ATTENTION, inputs, [("context", name, ["b", "s", hidden])], ATTRS,
                           {k: (v, v, v) for k, v in shapes.items()}, deserialize_hook=deserialize_hook)
    eng.bind(shapes, {"qkv": qkv.data_ptr(), "pad_lengths": pads.data_ptr(), "step": step_dev.data_ptr(),
                      "past_key": got_caches[0].data_ptr(), "past_value": got_caches[1].data_ptr(),
                      "context": got.data_ptr()})
    stream = torch.cuda.Stream()
    eng.run(stream.cuda_stream)
    stream.synchronize()
    torch.cuda.synchronize()
    return want, got, want_caches, got_caches, caches, ws


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("phase", ["context", "decode"])
def test_prepad_engine_equals_launcher(dtype, phase, deserialize_hook, rng):
    B, L = 6, 96
    S, step = (40, 0) if phase == "context" else (1, int(rng.integers(40, L - 1)))
    pads = rng.integers(0, 30, size=B).tolist()
    torch.manual_seed(int(rng.integers(2**31)))
    want, got, want_caches, got_caches, caches, _ = run_prepad_both_ways(dtype, B, S, L, step, pads, deserialize_hook)
    assert torch.isfinite(want).all(), f"pads {pads} step {step}"
    assert torch.equal(got, want) and torch.equal(got_caches, want_caches), f"pads {pads} step {step}"
    assert not torch.equal(got_caches, caches)  # the engine did append in place


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_prepad_engine_hands_its_workspace_to_the_decode_split(dtype, deserialize_hook, rng, monkeypatch):
    """The split that GPUs without clusters run (forced here by EET_DECODE_SPLIT_MODE=workspace) works from
    the TensorRT workspace the plugin asks for: the engine equals the launcher given its own workspace, bit
    for bit, on a long cache (several blocks per row)."""
    monkeypatch.setenv("EET_DECODE_SPLIT_MODE", "workspace")
    L = 2048
    step = int(rng.integers(1500, L - 1))
    pads = rng.integers(0, 1000, size=3).tolist()
    torch.manual_seed(int(rng.integers(2**31)))
    want, got, want_caches, got_caches, _, ws = run_prepad_both_ways(dtype, 3, 1, L, step, pads, deserialize_hook,
                                                                     workspace=True)
    assert torch.isfinite(ws).any(), "the launcher did not split"
    assert torch.isfinite(want).all(), f"pads {pads} step {step}"
    assert torch.equal(got, want) and torch.equal(got_caches, want_caches), f"pads {pads} step {step}"
