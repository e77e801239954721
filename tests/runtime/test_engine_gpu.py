"""The plan runs on the GPU: a plan built the way a CPU machine builds it (no GPU visible to the builder) is
executed by Polygraphy's TensorRT runner on a ragged batch and matches ONNX Runtime on the original export.

On an H100/H200 with TensorRT-RTX this needs the test shim (EET_CC_SHIM, see tests/conftest.py)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import cuda_available

pytestmark = pytest.mark.gpu
if not cuda_available():
    pytest.skip("needs an NVIDIA GPU", allow_module_level=True)

# (atol, rtol) against ONNX Runtime fp32 (fp32 engines are built without TF32).
TOLERANCES = {"fp32": (1e-3, 1e-3), "fp16": (2e-2, 2e-2)}
CONFIGS = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256),
    # the "other sizes": 4 layers, 8 heads, hidden 512
    "h512": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048),
    # all-MiniLM-L6-v2's shape (head size 32), random weights
    "minilm-shape": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
}


def build_on_cpu_path(tmp_path, name, dtype):
    # wide init: peaked attention, so a wrong scale, mask or sequence boundary shows in the outputs
    cfg = dict(CONFIGS[name], vocab_size=2000, max_position_embeddings=512, model_type="bert", initializer_range=0.1)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / f"{name}-{dtype}"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # build like a CPU-only machine
    subprocess.run([sys.executable, "-m", "eet", "build", "bert", "--config", str(tmp_path / "config.json"),
                    "--out", str(out), "--dtype", dtype, "--max-batch", "16", "--max-tokens", "4096",
                    "--max-seq", "512"], check=True, env=env)
    return out


@pytest.mark.parametrize("name,dtype", [("tiny", "fp32"), ("tiny", "fp16"), ("h512", "fp16"),
                                        ("h512", "fp32"), ("minilm-shape", "fp16")])
def test_plan_matches_onnxruntime(tmp_path, name, dtype, deserialize_hook, rng):
    import onnxruntime as ort
    from polygraphy.backend.trt import TrtRunner

    from eet import trt as trt_compat
    from eet.commands.check import ragged_batch
    from eet.plugins.tensorrt import register

    out = build_on_cpu_path(tmp_path, name, dtype)
    trt = trt_compat.load()
    register(trt)
    runtime = trt.module.Runtime(trt_compat.logger(trt))
    with deserialize_hook():
        engine = runtime.deserialize_cuda_engine((out / "engine.plan").read_bytes())
    assert engine is not None
    rb = ragged_batch(rng, batch=12, max_len=384, vocab=2000)
    sess = ort.InferenceSession(str(out / "original.onnx"), providers=["CPUExecutionProvider"])
    (ref,) = sess.run(None, {"input_ids": rb.ids, "attention_mask": rb.mask, "token_type_ids": rb.token_types,
                             "position_ids": rb.positions})
    with TrtRunner(engine) as runner:
        outputs = runner.infer(rb.packed_feeds(max_seqlen=int(rb.lengths.max())))
        outputs2 = runner.infer(rb.packed_feeds(max_seqlen=512))  # a larger carrier changes nothing
    atol, rtol = TOLERANCES[dtype]
    hidden = np.asarray(outputs["hidden_states"], dtype=np.float64)
    first = np.asarray(outputs["first_token_states"], dtype=np.float64)
    want_h, want_f = rb.unpad(ref), ref[:, 0]
    err_h, err_f = np.abs(hidden - want_h).max(), np.abs(first - want_f).max()
    print(f"{name} {dtype}: lengths {rb.lengths.tolist()} ({rb.lengths.sum()} tokens); max abs error "
          f"hidden_states {err_h:.3e}, first_token_states {err_f:.3e} (atol {atol}, rtol {rtol})")
    assert np.isfinite(hidden).all()
    np.testing.assert_allclose(hidden, want_h, atol=atol, rtol=rtol)
    np.testing.assert_allclose(first, want_f, atol=atol, rtol=rtol)
    np.testing.assert_array_equal(np.asarray(outputs2["hidden_states"]), np.asarray(outputs["hidden_states"]))
