"""Engine building on the CPU with TensorRT-RTX (or TensorRT) and the sidecar's validation."""
import json

import onnx
import pytest

from eet.errors import EetError
from eet.plugins.spec import VARLEN_ATTENTION
from eet.runtime import sidecar


@pytest.fixture(scope="module")
def rewritten(exported, tmp_path_factory):
    from eet.exporter.rewrite import rewrite_bert

    loaded, path = exported("sdpa")
    out = tmp_path_factory.mktemp("rw") / "model.onnx"
    onnx.save(rewrite_bert(onnx.load(str(path)), num_layers=2, num_heads=2, head_dim=64, dtype="fp16"), str(out))
    return out


def test_build_has_plugin_layers_and_profile(rewritten):
    pytest.importorskip("eet.trt").load()
    from eet.commands.build import BertBuildOptions, bert_profiles
    from eet.runtime.build import build_engine

    profiles = bert_profiles(BertBuildOptions(max_batch=4, max_tokens=256, max_seq=64))
    built = build_engine(rewritten, profiles)
    assert built.plugin_layers == {"EetVarlenAttention": 2}
    assert len(built.plan) > 100_000 and built.plan.count(b"EetVarlenAttention") >= 2
    assert {i["name"]: i["dtype"] for i in built.inputs}["cu_seqlens"] == "int32"
    assert {o["name"]: o["dtype"] for o in built.outputs} == {"hidden_states": "half", "first_token_states": "half"}


def test_profile_errors(rewritten):
    pytest.importorskip("eet.trt").load()
    from eet.runtime.build import Profile, build_engine

    with pytest.raises(EetError, match="dynamic inputs without shapes"):
        build_engine(rewritten, [Profile("p", {"input_ids": ((1,), (2,), (3,))})])


def test_parser_rejects_unsupported_head_dim(tmp_path):
    """A plugin node with a head size the kernels lack fails at parse time, naming it."""
    trt = pytest.importorskip("eet.trt").load()
    from onnx import TensorProto, helper

    from eet.runtime.build import Profile, build_engine

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["t", 3 * 96])
    cu = helper.make_tensor_value_info("cu", TensorProto.INT32, ["b"])
    s = helper.make_tensor_value_info("s", TensorProto.INT32, ["s"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["t", 96])
    node = helper.make_node("EetVarlenAttention", ["x", "cu", "s"], ["y"], domain="eet", num_heads=2,
                            head_dim=48, scale=0.1, plugin_version=VARLEN_ATTENTION.version, plugin_namespace="eet")
    model = helper.make_model(helper.make_graph([node], "g", [x, cu, s], [y]),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("eet", 1)])
    onnx.save(model, str(tmp_path / "m.onnx"))
    shapes = {"x": ((1, 288), (8, 288), (16, 288)), "cu": ((2,), (3,), (5,)), "s": ((1,), (8,), (16,))}
    with pytest.raises(Exception, match="head_dim 48"):
        build_engine(tmp_path / "m.onnx", [Profile("p", shapes)])
    assert trt.flavour in ("tensorrt", "tensorrt_rtx")


def _prepad_alone(tmp_path, width):
    """Build a network of one EetPrePadAttention node (2 heads of 64) whose qkv input is [B, S, width]."""
    from onnx import TensorProto, helper

    from eet.plugins.spec import PREPAD_ATTENTION
    from eet.runtime.build import Profile, build_engine

    heads, dim, max_len = 2, 64, 16
    hidden, half = heads * dim, TensorProto.FLOAT16
    io = [helper.make_tensor_value_info("qkv", half, ["b", "s", width]),
          helper.make_tensor_value_info("pad_lengths", TensorProto.INT32, ["b"]),
          helper.make_tensor_value_info("step", TensorProto.INT32, [1]),
          helper.make_tensor_value_info("past_key", half, ["b", heads, max_len, dim]),
          helper.make_tensor_value_info("past_value", half, ["b", heads, max_len, dim])]
    node = helper.make_node(PREPAD_ATTENTION.name, [i.name for i in io], ["context", "present_key", "present_value"],
                            domain="eet", num_heads=heads, head_dim=dim, scale=0.125,
                            plugin_version=PREPAD_ATTENTION.version, plugin_namespace="eet")
    context = helper.make_tensor_value_info("context", half, ["b", "s", hidden])
    model = helper.make_model(helper.make_graph([node], "g", io, [context]),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("eet", 1)])
    onnx.save(model, str(tmp_path / "m.onnx"))
    cache = ((1, heads, max_len, dim), (2, heads, max_len, dim), (4, heads, max_len, dim))
    shapes = {"qkv": ((1, 1, width), (2, 8, width), (4, max_len, width)),
              "pad_lengths": ((1,), (2,), (4,)), "past_key": cache, "past_value": cache}
    return build_engine(tmp_path / "m.onnx", [Profile("p", shapes)], aliased_io=True)


def test_prepad_plugin_alone_builds(tmp_path):
    """One EetPrePadAttention node: its fused qkv input [B, S, 3 * hidden] gives a context of [B, S, hidden]
    (a constant last axis), in qkv's precision; the caches stay in place (aliased)."""
    pytest.importorskip("eet.trt").load()
    built = _prepad_alone(tmp_path, 3 * 128)
    assert built.plugin_layers == {"EetPrePadAttention": 1}
    assert built.outputs == [{"name": "context", "dtype": "half", "shape": [-1, -1, 128]}]


def test_prepad_plugin_refuses_an_unfused_input(tmp_path, capfd):
    """A qkv of one hidden width (version 1's query) fails the build, the plugin naming the expected shape."""
    pytest.importorskip("eet.trt").load()
    with pytest.raises(EetError, match="failed to build"):
        _prepad_alone(tmp_path, 128)
    assert "expected [B, S, 3 * 128]" in capfd.readouterr().err


def _varlen_alone(tmp_path, width):
    """Build a network of one EetVarlenAttention node (2 heads of 64) whose qkv input is [T, width]."""
    from onnx import TensorProto, helper

    from eet.runtime.build import Profile, build_engine

    half = TensorProto.FLOAT16
    io = [helper.make_tensor_value_info("qkv", half, ["t", width]),
          helper.make_tensor_value_info("cu_seqlens", TensorProto.INT32, ["b1"]),
          helper.make_tensor_value_info("max_seqlen", TensorProto.INT32, ["s"])]
    node = helper.make_node(VARLEN_ATTENTION.name, [i.name for i in io], ["context"], domain="eet", num_heads=2,
                            head_dim=64, scale=0.125, plugin_version=VARLEN_ATTENTION.version,
                            plugin_namespace="eet")
    context = helper.make_tensor_value_info("context", half, ["t", 128])
    model = helper.make_model(helper.make_graph([node], "g", io, [context]),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("eet", 1)])
    onnx.save(model, str(tmp_path / "m.onnx"))
    shapes = {"qkv": ((1, width), (64, width), (256, width)), "cu_seqlens": ((2,), (3,), (9,)),
              "max_seqlen": ((1,), (32,), (64,))}
    return build_engine(tmp_path / "m.onnx", [Profile("p", shapes)])


def test_varlen_plugin_alone_builds(tmp_path):
    """One EetVarlenAttention node: its fused qkv input [T, 3 * hidden] gives a context of [T, hidden]."""
    pytest.importorskip("eet.trt").load()
    built = _varlen_alone(tmp_path, 3 * 128)
    assert built.plugin_layers == {"EetVarlenAttention": 1}
    assert built.outputs == [{"name": "context", "dtype": "half", "shape": [-1, 128]}]


def test_varlen_plugin_refuses_an_unfused_input(tmp_path, capfd):
    """A qkv of one hidden width (version 1's query) fails the build, the plugin naming the expected shape."""
    pytest.importorskip("eet.trt").load()
    with pytest.raises(EetError, match="failed to build"):
        _varlen_alone(tmp_path, 128)
    assert "expected [..., T, 3 * 128]" in capfd.readouterr().err


def _write(tmp_path, plan=b"plan-bytes", **changes):
    (tmp_path / "engine.plan").write_bytes(plan)
    data = {"family": "bert", "model": {}, "dtype": "fp16", "io": {}, "profiles": [], "plugins": [],
            "tensorrt": {}, "build": {}, "files": {"plan": "engine.plan"},
            "plan_sha256": sidecar.sha256_file(tmp_path / "engine.plan")}
    data.update(changes)
    sidecar.write(tmp_path, data)


def test_sidecar_roundtrip_and_errors(tmp_path):
    with pytest.raises(EetError, match="no engine.json"):
        sidecar.read(tmp_path)
    _write(tmp_path)
    assert sidecar.read(tmp_path)["family"] == "bert"
    (tmp_path / "engine.plan").write_bytes(b"other-bytes")
    with pytest.raises(EetError, match="does not match its sidecar"):
        sidecar.read(tmp_path)
    (tmp_path / "engine.plan").unlink()
    with pytest.raises(EetError, match="engine.plan is missing"):
        sidecar.read(tmp_path)
    data = json.loads((tmp_path / "engine.json").read_text())
    data["schema"] = "something/else"
    (tmp_path / "engine.json").write_text(json.dumps(data))
    with pytest.raises(EetError, match="schema"):
        sidecar.read(tmp_path)
    (tmp_path / "engine.json").write_text("{not json")
    with pytest.raises(EetError, match="not valid JSON"):
        sidecar.read(tmp_path)
