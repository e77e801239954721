"""TensorRT ``IPluginV3`` adapters of the EET plugins, driven by their specs.

``register()`` adds one creator per plugin to TensorRT's registry under namespace ``eet``; TensorRT's ONNX
parser then turns every node of op_type = plugin name and domain ``eet`` into a plugin layer. ``enqueue``
calls the CUDA library (``libeet_kernels.so``) through its C ABI, so it is only needed on a GPU; building an
engine never calls it.
"""
from __future__ import annotations

import numpy as np

from eet import trt as trt_compat
from eet.plugins.spec import HEAD_DIMS, PREPAD_ATTENTION, VARLEN_ATTENTION, PluginSpec

_DTYPES = {"float32": "FLOAT", "float16": "HALF", "int32": "INT32"}
_REGISTERED: dict[tuple[int, str], object] = {}  # (id of the TensorRT module, plugin) -> its creator, kept alive
_LIVE: list = []
"""Every plugin object handed to TensorRT (create_plugin, clone, attach_to_context). TensorRT holds them by
raw pointer; without a Python reference the garbage collector may free one TensorRT still calls (seen as heap
corruption after a GPT-2 greedy loop on an H100). A handful per engine and context."""
CREATE_ERRORS: list[str] = []
"""Why create_plugin() failed, newest last: TensorRT's parser only reports "Could not create the plugin"."""


def _field_type(trt, kind: str):
    return {"int": trt.PluginFieldType.INT32, "float": trt.PluginFieldType.FLOAT32,
            "string": trt.PluginFieldType.CHAR}[kind]


def _field_array(kind: str, value) -> np.ndarray:
    if kind == "int":
        return np.array([value], dtype=np.int32)
    if kind == "float":
        return np.array([value], dtype=np.float32)
    return np.frombuffer(str(value).encode() + b"\0", dtype=np.int8).copy()


def make_classes(trt):
    """The plugin and creator classes for one TensorRT module (``tensorrt`` or ``tensorrt_rtx``)."""

    # IPluginV3OneBuildV2 (TensorRT >= 10.3) adds get_aliased_input, for in-place outputs
    build_base = getattr(trt, "IPluginV3OneBuildV2", trt.IPluginV3OneBuild)

    class _SpecPlugin(trt.IPluginV3, trt.IPluginV3OneCore, build_base, trt.IPluginV3OneRuntime):
        """Everything but ``enqueue``: I/O types and shapes, attributes and serialization, from ``SPEC``."""

        SPEC: PluginSpec

        def __init__(self, attrs: dict):
            # all four base initializers must run before any attribute is set
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            build_base.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            spec = self.SPEC
            self.plugin_name = spec.name
            self.plugin_namespace = spec.namespace
            self.plugin_version = spec.version
            self.num_outputs = len(spec.outputs)
            self.timing_cache_id = ""
            self.attrs = spec.check_attrs(attrs)
            self._serialized = None

        # --- core ---
        def get_capability_interface(self, capability_type):
            return self

        def clone(self):
            twin = type(self)(self.attrs)
            _LIVE.append(twin)
            return twin

        def get_fields_to_serialize(self):
            # PluginField does not keep its array alive: hold the arrays on self
            arrays = [(a.name, a.kind, _field_array(a.kind, self.attrs[a.name])) for a in self.SPEC.attributes]
            self._serialized = arrays
            return trt.PluginFieldCollection(
                [trt.PluginField(n, arr, _field_type(trt, kind)) for n, kind, arr in arrays])

        # --- build ---
        def get_output_data_types(self, input_types):
            return [input_types[o.like] for o in self.SPEC.outputs]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            return [trt.DimsExprs(inputs[o.like]) for o in self.SPEC.outputs]

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            tensor = (self.SPEC.inputs + self.SPEC.outputs)[pos]
            if tensor.like is not None:
                return desc.type == in_out[tensor.like].desc.type
            return any(desc.type == getattr(trt.DataType, _DTYPES[d]) for d in tensor.dtypes)

        def configure_plugin(self, inputs, outputs):
            pass

        def get_aliased_input(self, output_index):
            return dict(self.SPEC.aliases).get(output_index, -1)

        def get_workspace_size(self, inputs, outputs):
            return 0

        def get_valid_tactics(self):
            return []

        def set_tactic(self, tactic):
            pass

        # --- runtime ---
        def attach_to_context(self, context):
            return self.clone()

    class _FusedQkvPlugin(_SpecPlugin):
        """A plugin whose input 0 is ``qkv`` [..., 3 * hidden]: queries, keys and values side by side in the last
        axis, which the kernel reads in place as three column slices with row stride 3 * hidden (hidden =
        num_heads * head_dim). ``QKV_SHAPE`` names the expected shape in errors; ``QKV_RANK`` is its rank (None:
        any rank >= 2)."""

        QKV_SHAPE: str
        QKV_RANK: int | None = None

        def __init__(self, attrs: dict):
            super().__init__(attrs)
            if self.attrs["head_dim"] not in HEAD_DIMS:
                raise ValueError(f"{self.SPEC.name}: head_dim {self.attrs['head_dim']} is not supported "
                                 f"(supported: {HEAD_DIMS})")
            self._params = None
            self._lib = None
            self._k_offset = self._v_offset = 0  # bytes from qkv to its keys / values

        @property
        def _hidden(self) -> int:
            return self.attrs["num_heads"] * self.attrs["head_dim"]

        def _qkv_fits(self, dims: tuple, last_ok: tuple) -> bool:
            rank_ok = len(dims) >= 2 if self.QKV_RANK is None else len(dims) == self.QKV_RANK
            return rank_ok and dims[-1] in last_ok

        def configure_plugin(self, inputs, outputs):
            # build time: a static last axis that is not 3 * hidden (e.g. a version-1 query) fails here, not
            # in on_shape_change on the GPU
            dims = tuple(inputs[0].desc.dims)
            if not self._qkv_fits(dims, (-1, 3 * self._hidden)):
                raise self._qkv_refused(dims)

        def _qkv_refused(self, dims: tuple) -> ValueError:
            return ValueError(f"{self.SPEC.name}: qkv is {dims}, expected {self.QKV_SHAPE.format(self._hidden)} "
                              f"(queries, keys and values of {self.attrs['num_heads']} heads of "
                              f"{self.attrs['head_dim']})")

        def _qkv_params(self, qkv) -> dict:
            """At a new shape: sets the k / v byte offsets in qkv (by ``qkv.type``'s element size) and loads the
            library; returns the launcher parameters that every fused-qkv plugin shares (dtype, heads, head_dim,
            scale, the row strides of 3 * hidden)."""
            from eet.plugins import _lib

            fp16 = qkv.type == trt.DataType.HALF
            hidden = self._hidden
            self._k_offset = hidden * (2 if fp16 else 4)
            self._v_offset = 2 * self._k_offset
            self._lib = _lib
            return dict(dtype=_lib.DTYPE_FP16 if fp16 else _lib.DTYPE_FP32, num_heads=self.attrs["num_heads"],
                        head_dim=self.attrs["head_dim"], scale=self.attrs["scale"], q_row_stride=3 * hidden,
                        k_row_stride=3 * hidden, v_row_stride=3 * hidden)

    class VarlenAttentionPlugin(_FusedQkvPlugin):
        """``EetVarlenAttention``: inputs qkv [..., T, 3 * hidden] (queries, keys, values fused in the last axis),
        cu_seqlens [B+1] int32, max_seqlen carrier [S]; output [..., T, hidden]. The kernel reads q, k and v in
        place: three column slices of qkv with row stride 3 * hidden."""

        SPEC = VARLEN_ATTENTION
        QKV_SHAPE = "[..., T, 3 * {}]"

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            qkv = inputs[0]
            hidden = expr_builder.constant(self._hidden)
            return [trt.DimsExprs([qkv[i] for i in range(len(qkv) - 1)] + [hidden])]

        def on_shape_change(self, inputs, outputs):
            qkv = inputs[0]
            dims = tuple(int(d) for d in qkv.dims)
            hidden = self._hidden
            if not self._qkv_fits(dims, (3 * hidden,)):
                raise self._qkv_refused(dims)
            common = self._qkv_params(qkv)  # loads self._lib
            self._params = self._lib.make_varlen_params(
                **common, batch=int(inputs[1].dims[0]) - 1, max_seqlen=int(inputs[2].dims[0]),
                total_tokens=int(np.prod(dims[:-1])))

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            p = self._params
            qkv = inputs[0]
            p.q, p.k, p.v, p.cu_seqlens = qkv, qkv + self._k_offset, qkv + self._v_offset, inputs[1]
            p.out = outputs[0]
            self._lib.varlen_attention(p, stream)

    class PrePadAttentionPlugin(_FusedQkvPlugin):
        """``EetPrePadAttention``: inputs qkv [B, S, 3 * hidden] (queries, keys, values fused in the last axis),
        pad_lengths [B] int32, step [1] int32, key/value caches [B, heads, L, head_dim]; outputs context
        [B, S, hidden] and the two caches, updated in place (aliased). The kernel reads q, k and v in place:
        three column slices of qkv with row stride 3 * hidden."""

        SPEC = PREPAD_ATTENTION
        QKV_SHAPE = "[B, S, 3 * {}]"
        QKV_RANK = 3

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            qkv = inputs[0]
            hidden = expr_builder.constant(self._hidden)
            return [trt.DimsExprs([qkv[0], qkv[1], hidden]), trt.DimsExprs(inputs[3]), trt.DimsExprs(inputs[4])]

        def get_workspace_size(self, inputs, outputs):
            # the decode split's scratch where there are no clusters (before sm_90), for the largest batch
            from eet.plugins._lib import prepad_workspace_size

            return prepad_workspace_size(max(int(inputs[0].max[0]), 1), self.attrs["num_heads"],
                                         self.attrs["head_dim"])

        def on_shape_change(self, inputs, outputs):
            qkv, cache = inputs[0], inputs[3]
            heads, head_dim = self.attrs["num_heads"], self.attrs["head_dim"]
            hidden = self._hidden
            dims = tuple(int(d) for d in qkv.dims)
            if not self._qkv_fits(dims, (3 * hidden,)) or tuple(cache.dims)[1::2] != (heads, head_dim):
                raise ValueError(f"EetPrePadAttention: qkv {dims} / cache {tuple(cache.dims)} do not match "
                                 f"[B, S, 3 * {hidden}] / [B, {heads}, L, {head_dim}] ({heads} heads of {head_dim})")
            common = self._qkv_params(qkv)  # loads self._lib
            self._params = self._lib.make_prepad_params(
                **common, batch=dims[0], seq=dims[1], max_len=int(cache.dims[2]),
                workspace_bytes=self._lib.prepad_workspace_size(dims[0], heads, head_dim))

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            p = self._params
            qkv = inputs[0]
            p.q, p.k, p.v = qkv, qkv + self._k_offset, qkv + self._v_offset
            p.pad_lengths, p.step, p.k_cache, p.v_cache = inputs[1], inputs[2], inputs[3], inputs[4]
            p.out = outputs[0]
            p.workspace = workspace or None
            self._lib.prepad_attention(p, stream)

    def creator_class(plugin_cls):
        spec = plugin_cls.SPEC

        class Creator(trt.IPluginCreatorV3One):
            def __init__(self):
                trt.IPluginCreatorV3One.__init__(self)
                self.name = spec.name
                self.plugin_namespace = spec.namespace
                self.plugin_version = spec.version
                self._empty = [np.array([], dtype=np.int32) for _ in spec.attributes]
                self.field_names = trt.PluginFieldCollection(
                    [trt.PluginField(a.name, arr, _field_type(trt, a.kind))
                     for a, arr in zip(spec.attributes, self._empty)])

            def create_plugin(self, name, fc, phase):
                try:
                    fields = {f.name: np.asarray(f.data) for f in fc}
                    plugin = plugin_cls(spec.decode_fields(fields))
                    _LIVE.append(plugin)
                    return plugin
                except Exception as exc:
                    CREATE_ERRORS.append(f"node {name!r}: {exc}")
                    raise

        Creator.__name__ = f"{spec.name}Creator"
        return Creator

    plugins = (VarlenAttentionPlugin, PrePadAttentionPlugin)
    return {cls.SPEC.name: (cls, creator_class(cls)) for cls in plugins}


def register(trt=None) -> list[str]:
    """Register every EET plugin creator with TensorRT's plugin registry (idempotent).

    Args:
        trt: a :class:`eet.trt.TensorRT`; default :func:`eet.trt.load`.

    Returns:
        the registered plugin names.
    """
    trt = trt or trt_compat.load()
    module = trt.module
    registry = module.get_plugin_registry()
    if not any(key[0] == id(module) for key in _REGISTERED):
        for name, (plugin_cls, creator_cls) in make_classes(module).items():
            creator = creator_cls()
            if not registry.register_creator(creator, plugin_cls.SPEC.namespace):
                raise RuntimeError(f"TensorRT refused to register the plugin creator {name}")
            _REGISTERED[(id(module), name)] = creator
    return [name for key_module, name in _REGISTERED if key_module == id(module)]
