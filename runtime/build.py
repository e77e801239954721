"""ONNX (with EET plugin nodes) -> serialized TensorRT engine, with dynamic-shape optimization profiles."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from eet import trt as trt_compat
from eet.errors import EetError

Shape = Sequence[int]


@dataclass(frozen=True)
class Profile:
    """One optimization profile: for each input, its (min, opt, max) shapes."""

    name: str
    shapes: Mapping[str, tuple[Shape, Shape, Shape]]

    def to_json(self) -> dict:
        return {"name": self.name,
                "shapes": {k: {"min": list(a), "opt": list(b), "max": list(c)} for k, (a, b, c) in self.shapes.items()}}


@dataclass
class BuiltEngine:
    """The result of :func:`build_engine`.

    Attributes:
        plan: the serialized engine.
        sha256: hex digest of ``plan``.
        plugin_layers: plugin layer count by plugin name, read off the parsed network.
        inputs, outputs: ``{name, dtype, shape}`` of the network's I/O (-1 for dynamic axes).
        tensorrt: ``{flavour, version}``.
    """

    plan: bytes
    sha256: str
    plugin_layers: dict[str, int]
    inputs: list[dict]
    outputs: list[dict]
    tensorrt: dict = field(default_factory=dict)


def _tensor_info(tensor) -> dict:
    return {"name": tensor.name, "dtype": str(tensor.dtype).split(".")[-1].lower(), "shape": list(tensor.shape)}


def build_engine(onnx_path: str | Path, profiles: Sequence[Profile], *, tf32: bool = False,
                 aliased_io: bool = False, verbose: bool = False,
                 progress: Callable[[str], None] = lambda s: None) -> BuiltEngine:
    """Parse ``onnx_path`` with TensorRT's ONNX parser (EET plugins registered) and build a plan.

    The network is strongly typed: every precision comes from the ONNX dtypes. ``tf32=False`` (default)
    keeps float32 GEMMs in full float32 (TensorRT would otherwise use TF32's 10-bit mantissa).
    ``aliased_io`` enables plugins that update an input in place (``PreviewFeature.ALIASED_PLUGIN_IO_10_03``).

    Raises:
        EetError: TensorRT missing, parse errors, a profile naming an unknown input, a failed build.
    """
    from eet.plugins.tensorrt import CREATE_ERRORS, register

    trt = trt_compat.load()
    t = trt.module
    register(trt)
    log = trt_compat.logger(trt, verbose)
    builder = t.Builder(log)
    network = builder.create_network(trt.strongly_typed_flags)
    parser = t.OnnxParser(network, log)
    progress(f"parsing {onnx_path} with {trt.flavour} {trt.version}")
    CREATE_ERRORS.clear()
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n  ".join([str(parser.get_error(i)) for i in range(parser.num_errors)] + CREATE_ERRORS)
        raise EetError(f"TensorRT's ONNX parser rejected {onnx_path}:\n  {errors}")
    plugin_layers: dict[str, int] = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == t.LayerType.PLUGIN_V3:
            layer.__class__ = t.IPluginV3Layer  # get_layer() returns the base ILayer
            core = layer.plugin.get_capability_interface(t.PluginCapabilityType.CORE)
            plugin_layers[core.plugin_name] = plugin_layers.get(core.plugin_name, 0) + 1
    inputs = [_tensor_info(network.get_input(i)) for i in range(network.num_inputs)]
    outputs = [_tensor_info(network.get_output(i)) for i in range(network.num_outputs)]
    config = builder.create_builder_config()
    if hasattr(t.BuilderFlag, "TF32"):
        (config.set_flag if tf32 else config.clear_flag)(t.BuilderFlag.TF32)
    if aliased_io:
        feature = getattr(t.PreviewFeature, "ALIASED_PLUGIN_IO_10_03", None)
        if feature is None:
            raise EetError(f"{trt.flavour} {trt.version} lacks aliased plugin I/O (in-place KV cache); "
                           "TensorRT >= 10.3 or TensorRT-RTX >= 1.0 is needed")
        config.set_preview_feature(feature, True)
    names = {i["name"] for i in inputs}
    for profile in profiles:
        unknown = set(profile.shapes) - names
        dynamic = {i["name"] for i in inputs if -1 in i["shape"]}
        if unknown or dynamic - set(profile.shapes):
            raise EetError(f"profile {profile.name!r}: unknown inputs {sorted(unknown)}, "
                           f"dynamic inputs without shapes {sorted(dynamic - set(profile.shapes))}")
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.shapes.items():
            p.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
        config.add_optimization_profile(p)
    progress(f"building the engine ({network.num_layers} layers, "
             f"{sum(plugin_layers.values())} plugin layers, {len(profiles)} profile(s))")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EetError("TensorRT failed to build the engine (run with --verbose for TensorRT's log)")
    data = bytes(memoryview(plan))
    return BuiltEngine(plan=data, sha256=hashlib.sha256(data).hexdigest(), plugin_layers=plugin_layers,
                       inputs=inputs, outputs=outputs,
                       tensorrt={"flavour": trt.flavour, "version": trt.version})
