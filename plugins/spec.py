"""One spec per EET plugin: name, version, namespace, inputs, outputs, attributes.

The rewriter builds ONNX nodes with :meth:`PluginSpec.make_node`, the TensorRT creator advertises
:meth:`PluginSpec.field_names` and decodes with :meth:`PluginSpec.decode_fields`, and the reference evaluator
binds inputs by :attr:`PluginSpec.inputs`; ``tests/plugins/test_spec.py`` checks that they agree.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

NAMESPACE = "eet"
"""ONNX domain of every EET node and TensorRT plugin namespace of every EET creator."""

HEAD_DIMS = (32, 64, 80, 96, 128)
"""Head sizes the CUDA kernels are built for (see ``eet_varlen_attention_supported``)."""


@dataclass(frozen=True)
class TensorSpec:
    """One plugin input or output.

    Attributes:
        name: the name used in docs, errors and the reference's keyword arguments.
        dtypes: allowed element types (``"float32"``, ``"float16"``, ``"int32"``); "same as 0" is expressed
            by ``like`` instead.
        shape: a human-readable shape, e.g. ``"[..., T, num_heads * head_dim]"``.
        like: index of the input whose element type this one must share, or None.
        doc: what it holds.
    """

    name: str
    dtypes: tuple[str, ...]
    shape: str
    doc: str
    like: int | None = None


@dataclass(frozen=True)
class AttrSpec:
    """One plugin attribute. ``kind`` is ``"int"`` (int32 in TensorRT), ``"float"`` (float32) or ``"string"``."""

    name: str
    kind: str
    doc: str


@dataclass(frozen=True)
class PluginSpec:
    """Everything the rewriter, the TensorRT adapter and the reference must agree on for one plugin."""

    name: str
    version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    attributes: tuple[AttrSpec, ...]
    doc: str = ""
    namespace: str = NAMESPACE
    aliases: tuple[tuple[int, int], ...] = ()
    """(output index, input index) pairs: the output is the input updated in place (TensorRT aliased plugin I/O,
    which needs ``PreviewFeature.ALIASED_PLUGIN_IO_10_03``)."""
    _kinds: Mapping[str, str] = field(init=False, repr=False, compare=False, default=None)  # type: ignore

    def __post_init__(self):
        object.__setattr__(self, "_kinds", {a.name: a.kind for a in self.attributes})

    @property
    def field_names(self) -> tuple[str, ...]:
        """Attribute names, in order, as the TensorRT creator advertises them."""
        return tuple(a.name for a in self.attributes)

    def check_attrs(self, attrs: Mapping[str, Any]) -> dict[str, Any]:
        """Validate and normalize attribute values (every attribute is required, no extras)."""
        missing = [n for n in self.field_names if n not in attrs]
        extra = [n for n in attrs if n not in self._kinds]
        if missing or extra:
            raise ValueError(f"{self.name}: missing attributes {missing}, unknown attributes {extra}")
        out = {}
        for name, kind in self._kinds.items():
            value = attrs[name]
            out[name] = {"int": int, "float": float, "string": str}[kind](value)
        return out

    def make_node(self, gs, inputs: Sequence, outputs: Sequence, attrs: Mapping[str, Any], name: str):
        """An onnx-graphsurgeon node of this plugin, as TensorRT's ONNX parser finds it: op_type = plugin
        name, domain = namespace, plus the string attributes ``plugin_version`` and ``plugin_namespace``."""
        if len(inputs) != len(self.inputs) or len(outputs) != len(self.outputs):
            raise ValueError(f"{self.name} takes {len(self.inputs)} inputs and {len(self.outputs)} outputs, "
                             f"got {len(inputs)} and {len(outputs)}")
        attributes = self.check_attrs(attrs)
        attributes["plugin_version"] = self.version
        attributes["plugin_namespace"] = self.namespace
        return gs.Node(op=self.name, name=name, domain=self.namespace, inputs=list(inputs),
                       outputs=list(outputs), attrs=attributes)

    def node_attrs(self, onnx_attrs: Mapping[str, Any]) -> dict[str, Any]:
        """The spec attributes of an ONNX node's attributes (drops ``plugin_version`` / ``plugin_namespace``)."""
        return self.check_attrs({k: v for k, v in onnx_attrs.items() if k in self._kinds})

    def decode_fields(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Attribute values from TensorRT ``PluginField`` data (numpy arrays: int32, float32 or NUL-terminated
        bytes)."""
        out = {}
        for name, value in fields.items():
            kind = self._kinds.get(name)
            if kind is None:
                continue
            if kind == "string":
                out[name] = bytes(value).split(b"\0", 1)[0].decode()
            else:
                out[name] = value.reshape(-1)[0].item() if hasattr(value, "reshape") else value
        return self.check_attrs(out)


VARLEN_ATTENTION = PluginSpec(
    name="EetVarlenAttention",
    version="2",
    doc=(
        "Padding-free bidirectional multi-head attention over packed sequences (EET, BERT). Sequence b owns "
        "token rows [cu_seqlens[b], cu_seqlens[b+1]); a token attends to every token of its own sequence and "
        "to nothing else. No work is spent on padding: there is none. Softmax statistics and accumulation "
        "are fp32 for fp16 inputs too. Queries, keys and values come fused in one tensor (the output of one "
        "projection with the three weights side by side), which the kernel reads in place with row stride "
        "3 * num_heads * head_dim. Version 2: version 1 took query, key and value as three inputs."
    ),
    inputs=(
        TensorSpec("qkv", ("float32", "float16"), "[..., T, 3 * num_heads * head_dim]",
                   "projected queries, keys and values, fused in the last axis: queries in [0, hidden), keys in "
                   "[hidden, 2 * hidden), values in [2 * hidden, 3 * hidden) with hidden = num_heads * head_dim, "
                   "each head-major; leading axes multiply to T tokens"),
        TensorSpec("cu_seqlens", ("int32",), "[B + 1]",
                   "cumulative sequence lengths: 0, l0, l0+l1, ..., T (non-decreasing)"),
        TensorSpec("max_seqlen", ("int32",), "[S]",
                   "shape carrier: its length S bounds every sequence length; its values are not read"),
    ),
    outputs=(
        TensorSpec("context", ("float32", "float16"), "[..., T, num_heads * head_dim]",
                   "attention output, heads concatenated in the last axis; leading axes as qkv's", like=0),
    ),
    attributes=(
        AttrSpec("num_heads", "int", "number of attention heads"),
        AttrSpec("head_dim", "int", "size of one head; one of 32, 64, 80, 96, 128"),
        AttrSpec("scale", "float", "softmax scale applied to q.k, usually 1/sqrt(head_dim)"),
    ),
)

PREPAD_ATTENTION = PluginSpec(
    name="EetPrePadAttention",
    version="2",
    doc=(
        "Pre-padding causal multi-head attention with an in-place KV cache (EET, GPT-2 generation). Prompts are "
        "left-padded so that every row of the batch is at the same cache position; row b's first pad_lengths[b] "
        "positions are padding and its keys there are skipped (no work). With s = step: the new keys/values of "
        "token i go to cache position s + i, and token i attends to cache positions [pad_lengths[b], s + i]. "
        "Context phase: S prompt tokens at step 0; decode phase: S = 1 at step = tokens so far. Softmax "
        "statistics and accumulation are fp32. Queries, keys and values come fused in one tensor (GPT-2's c_attn "
        "output), which the kernel reads in place with row stride 3 * num_heads * head_dim. Version 2: version 1 "
        "took query, key and value as three inputs."
    ),
    inputs=(
        TensorSpec("qkv", ("float32", "float16"), "[B, S, 3 * num_heads * head_dim]",
                   "projected queries, new keys and new values, fused in the last axis: queries in [0, hidden), "
                   "keys in [hidden, 2 * hidden), values in [2 * hidden, 3 * hidden) with hidden = num_heads * "
                   "head_dim, each head-major (head h at columns h * head_dim ... of its third)"),
        TensorSpec("pad_lengths", ("int32",), "[B]", "left padding of each row"),
        TensorSpec("step", ("int32",), "[1]", "cache position of the first new token"),
        TensorSpec("key_cache", ("float32", "float16"), "[B, num_heads, L, head_dim]", "key cache, updated in place",
                   like=0),
        TensorSpec("value_cache", ("float32", "float16"), "[B, num_heads, L, head_dim]",
                   "value cache, updated in place", like=0),
    ),
    outputs=(
        TensorSpec("context", ("float32", "float16"), "[B, S, num_heads * head_dim]",
                   "attention output, heads concatenated in the last axis", like=0),
        TensorSpec("key_cache_out", ("float32", "float16"), "same as key_cache", "key_cache, aliased", like=3),
        TensorSpec("value_cache_out", ("float32", "float16"), "same as value_cache", "value_cache, aliased", like=4),
    ),
    attributes=VARLEN_ATTENTION.attributes,
    aliases=((1, 3), (2, 4)),
)

PLUGINS: dict[str, PluginSpec] = {VARLEN_ATTENTION.name: VARLEN_ATTENTION, PREPAD_ATTENTION.name: PREPAD_ATTENTION}
"""Every EET plugin by name."""
