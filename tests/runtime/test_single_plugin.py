"""eet.runtime.single_plugin on the CPU: the one-node model follows the spec and builds into a plan in a child
process that sees no GPU; a wrong input count is refused."""
import onnx
import pytest

from eet.errors import EetError
from eet.plugins.spec import PREPAD_ATTENTION, VARLEN_ATTENTION
from eet.runtime.single_plugin import build_plan_without_gpu, one_node_onnx

ATTRS = dict(num_heads=2, head_dim=64, scale=0.125)
VARLEN_IO = ([("qkv", "float16", ["t", 3 * 128]), ("cu_seqlens", "int32", ["b1"]), ("max_seqlen", "int32", ["s"])],
             [("context", "float16", ["t", 128])])


def test_one_node_model_follows_the_spec():
    model = one_node_onnx(VARLEN_ATTENTION, *VARLEN_IO, ATTRS)
    onnx.checker.check_model(model)
    (node,) = model.graph.node
    assert (node.op_type, node.domain) == (VARLEN_ATTENTION.name, VARLEN_ATTENTION.namespace)
    assert list(node.input) == [t.name for t in VARLEN_ATTENTION.inputs]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["plugin_version"] == VARLEN_ATTENTION.version.encode() and attrs["num_heads"] == 2


def test_one_node_model_refuses_a_wrong_input_count():
    with pytest.raises(EetError, match="takes 5 inputs"):
        one_node_onnx(PREPAD_ATTENTION, VARLEN_IO[0], VARLEN_IO[1], ATTRS)


def test_plan_builds_without_a_gpu(tmp_path):
    pytest.importorskip("eet.trt").load()
    onnx.save(one_node_onnx(VARLEN_ATTENTION, *VARLEN_IO, ATTRS), str(tmp_path / "m.onnx"))
    t, b = ((1, 384), (64, 384), (512, 384)), ((2,), (3,), (9,))
    shapes = {"qkv": t, "cu_seqlens": b, "max_seqlen": ((1,), (32,), (256,))}
    build_plan_without_gpu(tmp_path / "m.onnx", shapes, tmp_path / "m.plan", aliased_io=False)
    assert (tmp_path / "m.plan").stat().st_size > 0
    with pytest.raises(EetError, match="failed"):
        build_plan_without_gpu(tmp_path / "m.onnx", {"qkv": t}, tmp_path / "bad.plan", aliased_io=False)
