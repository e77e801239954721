"""One EET plugin alone in a TensorRT engine, the way an engine runs it: TensorRT calls the plugin's Python
``enqueue`` on every ``execute_async_v3``. ``scripts/bench_kernels.py --engine`` times it against the bare
launcher (host overhead per call, with and without a CUDA graph) and the GPU tests check that it computes what
the launcher computes.

The plan is built in a child process with no GPU visible (``CUDA_VISIBLE_DEVICES=""``), as a CPU-only machine
builds it, so a GPU the TensorRT flavour does not list does not stop the build. Buffers belong to the caller:
:meth:`SingleNodeEngine.run` takes device addresses (``tensor.data_ptr()``) and a stream handle.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

from eet.errors import EetError
from eet.plugins.spec import PluginSpec

_ONNX_TYPES = {"float16": 10, "float32": 1, "int32": 6}  # onnx.TensorProto values


def one_node_onnx(spec: PluginSpec, inputs: Sequence[tuple[str, str, Sequence]], outputs: Sequence[tuple[str, str,
                  Sequence]], attrs: Mapping):
    """An ``onnx.ModelProto`` whose graph is one node of plugin ``spec``.

    Args:
        inputs: ``(name, dtype, dims)`` per plugin input in spec order; dtype ``"float16"`` / ``"float32"`` /
            ``"int32"``; a dim is an int or a name (dynamic).
        outputs: the same for the first ``len(outputs)`` plugin outputs, which become graph outputs (the rest,
            e.g. aliased caches, get internal names).
        attrs: the spec's attributes.
    """
    from onnx import helper

    if len(inputs) != len(spec.inputs) or not 1 <= len(outputs) <= len(spec.outputs):
        raise EetError(f"{spec.name} takes {len(spec.inputs)} inputs and up to {len(spec.outputs)} outputs, "
                       f"got {len(inputs)} and {len(outputs)}")
    values = [helper.make_tensor_value_info(n, _ONNX_TYPES[d], list(dims)) for n, d, dims in inputs]
    outs = [helper.make_tensor_value_info(n, _ONNX_TYPES[d], list(dims)) for n, d, dims in outputs]
    names = [o[0] for o in outputs] + [f"{spec.outputs[i].name}_internal" for i in range(len(outputs),
                                                                                         len(spec.outputs))]
    node = helper.make_node(spec.name, [n for n, _, _ in inputs], names, domain=spec.namespace,
                            plugin_version=spec.version, plugin_namespace=spec.namespace,
                            **spec.check_attrs(attrs))
    return helper.make_model(helper.make_graph([node], spec.name, values, outs),
                             opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(spec.namespace, 1)])


def build_plan_without_gpu(onnx_path: Path, shapes: Mapping[str, tuple], plan_path: Path, aliased_io: bool) -> None:
    """Build ``onnx_path`` into ``plan_path`` (one profile, ``shapes``: name -> (min, opt, max)) in a child
    process that sees no GPU. Raises :class:`EetError` with the child's output when the build fails."""
    job = {"onnx": str(onnx_path), "plan": str(plan_path), "aliased_io": aliased_io,
           "shapes": {k: [list(s) for s in v] for k, v in shapes.items()}}
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    root = Path(__file__).resolve().parents[1]
    if (root / "eet" / "__init__.py").is_file():  # a source checkout: the child imports eet from it too
        env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    done = subprocess.run([sys.executable, "-m", "eet.runtime.single_plugin", json.dumps(job)], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0 or not plan_path.is_file():
        raise EetError(f"building the one-plugin engine failed (exit {done.returncode}):\n{done.stdout}{done.stderr}")


class SingleNodeEngine:
    """One plugin node built into a plan (without a GPU) and deserialized here, with one execution context.

    Args:
        spec, inputs, outputs, attrs: as :func:`one_node_onnx`.
        shapes: the optimization profile, input name -> (min, opt, max) shapes.
        deserialize_hook: a context manager factory around deserialization (the GPU tests' shim), or None.
    """

    def __init__(self, spec: PluginSpec, inputs, outputs, attrs, shapes, deserialize_hook=None):
        import contextlib

        import onnx

        from eet import trt as trt_compat
        from eet.plugins.tensorrt import register

        with tempfile.TemporaryDirectory() as tmp:
            model_path, plan_path = Path(tmp) / "node.onnx", Path(tmp) / "node.plan"
            onnx.save(one_node_onnx(spec, inputs, outputs, attrs), str(model_path))
            build_plan_without_gpu(model_path, shapes, plan_path, aliased_io=bool(spec.aliases))
            plan = plan_path.read_bytes()
        self.trt = trt_compat.load()
        register(self.trt)
        self._logger = trt_compat.logger(self.trt)
        self._runtime = self.trt.module.Runtime(self._logger)
        with (deserialize_hook or contextlib.nullcontext)():
            self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EetError(f"{self.trt.flavour} {self.trt.version} could not deserialize the one-plugin plan on "
                           "this GPU")
        self.context = self.engine.create_execution_context()
        self.input_names = [n for n, _, _ in inputs]

    def bind(self, shapes: Mapping[str, Sequence[int]], addresses: Mapping[str, int]) -> None:
        """Set the input shapes and every I/O tensor's device address (all engine I/O names must be given)."""
        for name, shape in shapes.items():
            if not self.context.set_input_shape(name, tuple(int(d) for d in shape)):
                raise EetError(f"input {name!r}: shape {tuple(shape)} is outside the profile")
        for name, address in addresses.items():
            if not self.context.set_tensor_address(name, int(address)):
                raise EetError(f"TensorRT refused the address of {name!r}")

    def run(self, stream: int) -> None:
        """``execute_async_v3`` on ``stream`` (a cudaStream_t as an int)."""
        if not self.context.execute_async_v3(stream):
            raise EetError("execute_async_v3 failed (see TensorRT's log above)")


def _build_job(job: dict) -> int:
    from eet.runtime.build import Profile, build_engine

    shapes = {k: tuple(tuple(s) for s in v) for k, v in job["shapes"].items()}
    built = build_engine(job["onnx"], [Profile("single", shapes)], aliased_io=job["aliased_io"])
    Path(job["plan"]).write_bytes(built.plan)
    return 0


if __name__ == "__main__":
    sys.exit(_build_job(json.loads(sys.argv[1])))
