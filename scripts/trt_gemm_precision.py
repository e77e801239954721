"""How precise are TensorRT's own GEMMs? One-MatMul engines, built as on a CPU-only machine, against float64
and against torch on the same GPU. Explains the tolerances of tests/runtime/test_engine_gpu.py.

    python scripts/trt_gemm_precision.py          # on a GPU machine; EET_CC_SHIM for TensorRT-RTX on an H100

Measured on an H100 with TensorRT-RTX 1.7.1.116 (2026-11-26): fp32 2048x512x512, TF32 flag cleared and set:
relative error 2.9e-4 both (TF32-like; full fp32 would be ~1e-7). fp16 2048x2048x512: TensorRT-RTX 1.67e-3,
torch 2.08e-4.
"""
import os
import subprocess
import sys
import tempfile

import numpy as np

if os.environ.get("EET_CC_SHIM"):  # tests and benchmarks only: see tests/conftest.py
    sys.path.insert(0, os.environ["EET_CC_SHIM"])
    import cc_shim

    cc_shim.load()
    FAKE = cc_shim.faked_capability
else:
    import contextlib

    FAKE = contextlib.nullcontext

CASES = {"fp32-tf32-cleared": (np.float32, 512, False), "fp32-tf32-set": (np.float32, 512, True),
         "fp16": (np.float16, 2048, False)}


def build(case: str, folder: str) -> None:
    """Child process (no GPU visible): ONNX with one MatMul -> plan."""
    import onnx
    from onnx import helper

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from eet import trt as trt_compat

    dtype, k, tf32 = CASES[case]
    w = (np.random.default_rng(0).standard_normal((k, 512)) * 0.05).astype(dtype)
    np.save(os.path.join(folder, f"{case}.npy"), w)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", elem, ["t", k])],
                              [helper.make_tensor_value_info("y", elem, ["t", 512])],
                              [onnx.numpy_helper.from_array(w, "w")])
    path = os.path.join(folder, f"{case}.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    trt = trt_compat.load()
    t = trt.module
    log = trt_compat.logger(trt)
    builder = t.Builder(log)
    network = builder.create_network(trt.strongly_typed_flags)
    parser = t.OnnxParser(network, log)
    assert parser.parse_from_file(path)
    config = builder.create_builder_config()
    (config.set_flag if tf32 else config.clear_flag)(t.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, k), (2048, k), (4096, k))
    config.add_optimization_profile(profile)
    with open(os.path.join(folder, f"{case}.plan"), "wb") as f:
        f.write(builder.build_serialized_network(network, config))


def main() -> None:
    import torch
    from polygraphy.backend.trt import TrtRunner

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from eet import trt as trt_compat

    trt = trt_compat.load()
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as folder:
        for case, (dtype, k, _) in CASES.items():
            subprocess.run([sys.executable, __file__, "--build", case, folder], check=True,
                           env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
            w = np.load(os.path.join(folder, f"{case}.npy"))
            x = rng.standard_normal((2048, k)).astype(dtype)
            ref = x.astype(np.float64) @ w.astype(np.float64)
            runtime = trt.module.Runtime(trt_compat.logger(trt))
            with FAKE():
                engine = runtime.deserialize_cuda_engine(open(os.path.join(folder, f"{case}.plan"), "rb").read())
            with TrtRunner(engine) as runner:
                y = np.asarray(runner.infer({"x": x})["y"], dtype=np.float64)
            torch.backends.cuda.matmul.allow_tf32 = False
            yt = (torch.from_numpy(x).cuda() @ torch.from_numpy(w).cuda()).cpu().numpy().astype(np.float64)
            rel = lambda v: np.linalg.norm(v - ref) / np.linalg.norm(ref)  # noqa: E731
            print(f"{case:<18} 2048x{k}x512: {trt.flavour} relative error {rel(y):.2e}, torch (no TF32) {rel(yt):.2e}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--build":
        build(sys.argv[2], sys.argv[3])
    else:
        main()
