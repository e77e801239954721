"""Run a rewritten ONNX model (with EET plugin nodes) on the CPU: ``onnx.reference.ReferenceEvaluator`` with
each plugin's NumPy reference as a custom op of domain ``eet``."""
from __future__ import annotations

from eet.plugins.reference import REFERENCES
from eet.plugins.spec import PLUGINS, PluginSpec


def _op_class(spec: PluginSpec):
    from onnx.reference.op_run import OpRun

    reference = REFERENCES[spec.name]

    def _run(self, *inputs, **attrs):
        # OpRun passes every node attribute as a keyword (plugin_version / plugin_namespace too)
        out = reference(*inputs, **spec.node_attrs(attrs))
        return tuple(out) if isinstance(out, tuple) else (out,)

    return type(spec.name, (OpRun,), {"op_domain": spec.namespace, "_run": _run})


def evaluator(model, verbose: int = 0):
    """A ``ReferenceEvaluator`` for ``model`` (an ``onnx.ModelProto`` or path) that runs every EET node with
    its reference implementation."""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model, new_ops=[_op_class(s) for s in PLUGINS.values()], verbose=verbose)
