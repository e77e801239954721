"""One spec per plugin: the rewriter's nodes, the TensorRT creator and the reference all agree with it."""
import inspect

import numpy as np
import pytest

from eet.plugins.reference import REFERENCES
from eet.plugins.spec import PLUGINS, VARLEN_ATTENTION


@pytest.mark.parametrize("spec", PLUGINS.values(), ids=lambda s: s.name)
def test_reference_signature_follows_spec(spec):
    params = inspect.signature(REFERENCES[spec.name]).parameters
    positional = [p.name for p in params.values() if p.kind == p.POSITIONAL_OR_KEYWORD]
    keyword = {p.name for p in params.values() if p.kind == p.KEYWORD_ONLY and p.default is p.empty}
    assert positional == [t.name for t in spec.inputs]
    assert keyword == set(spec.field_names)


def test_rewriter_nodes_follow_spec(exported):
    import onnx

    from eet.exporter.rewrite import rewrite_bert

    loaded, path = exported("sdpa")
    model = rewrite_bert(onnx.load(str(path)), num_layers=2, num_heads=2, head_dim=64)
    nodes = [n for n in model.graph.node if n.domain == VARLEN_ATTENTION.namespace]
    assert len(nodes) == 2
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert node.op_type == VARLEN_ATTENTION.name
        assert attrs.pop("plugin_version") == VARLEN_ATTENTION.version.encode()
        assert attrs.pop("plugin_namespace") == VARLEN_ATTENTION.namespace.encode()
        assert set(attrs) == set(VARLEN_ATTENTION.field_names)
        assert len(node.input) == len(VARLEN_ATTENTION.inputs) and len(node.output) == len(VARLEN_ATTENTION.outputs)
    assert any(o.domain == VARLEN_ATTENTION.namespace for o in model.opset_import)


@pytest.mark.parametrize("spec", PLUGINS.values(), ids=lambda s: s.name)
def test_tensorrt_creator_follows_spec(spec):
    trt = pytest.importorskip("eet.trt").load()
    from eet.plugins.tensorrt import register

    assert spec.name in register(trt)
    creator = trt.module.get_plugin_registry().get_creator(spec.name, spec.version, spec.namespace)
    assert creator is not None
    assert [f.name for f in creator.field_names] == list(spec.field_names)


@pytest.mark.parametrize("spec", PLUGINS.values(), ids=lambda s: s.name)
def test_likes_and_aliases_name_inputs(spec):
    """``like`` indexes the inputs; an aliased output is its input, updated in place."""
    for tensor in spec.inputs + spec.outputs:
        assert tensor.like is None or 0 <= tensor.like < len(spec.inputs), tensor.name
    for out, inp in spec.aliases:
        assert spec.outputs[out].like == inp
        assert spec.outputs[out].shape == f"same as {spec.inputs[inp].name}"


def test_decode_fields_roundtrip():
    fields = {"num_heads": np.array([12], np.int32), "head_dim": np.array([64], np.int32),
              "scale": np.array([0.125], np.float32), "ignored": np.array([1], np.int32)}
    assert VARLEN_ATTENTION.decode_fields(fields) == {"num_heads": 12, "head_dim": 64, "scale": 0.125}
    with pytest.raises(ValueError, match="missing attributes"):
        VARLEN_ATTENTION.decode_fields({"num_heads": np.array([1], np.int32)})
