"""The plan runs on the GPU: a plan built the way a CPU machine builds it (no GPU visible to the builder) is
executed by Polygraphy's TensorRT runner on a ragged batch and matches ONNX Runtime on the original export.

On an H100/H200 with TensorRT-RTX this needs the test shim (EET_CC_SHIM, see tests/conftest.py)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import skip_unless_engine_gpu

pytestmark = pytest.mark.gpu
skip_unless_engine_gpu()

# The bound is relative to what PyTorch itself gets in the same precision on the same GPU, both measured
# against ONNX Runtime fp32 on the CPU: engine error <= RATIO x PyTorch's error + FLOOR.
# fp32 engines are compared with Hugging Face fp32 with TF32 matmuls: TensorRT-RTX 1.7 runs fp32 GEMMs in
# TF32 whatever the TF32 builder flag says (scripts/trt_gemm_precision.py, H100: relative error 2.9e-4 on a
# 2048x512x512 MatMul with the flag cleared and with it set). fp16 engines are compared with Hugging Face
# fp16, and TensorRT-RTX's fp16 GEMMs are less accurate than PyTorch's (same script: a 2048x2048x512 fp16
# MatMul has relative error 1.7e-3 against torch's 2.1e-4, as with fp16 accumulation), which puts the
# engine's error at 1.4x-3.2x PyTorch fp16's on these models (fp32: 0.9x-1.0x; H100, 2026-11-26).
RATIO, FLOOR = {"fp32": 1.5, "fp16": 4.0}, 1e-3
CONFIGS = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256),
    # the "other sizes": 4 layers, 8 heads, hidden 512
    "h512": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048),
    # all-MiniLM-L6-v2's shape (head size 32), random weights
    "minilm-shape": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
}


def torch_error(config_path, rb, dtype, want):
    """Max abs error of Hugging Face PyTorch on this GPU in ``dtype`` against ONNX Runtime's ``want``."""
    import torch

    from eet.exporter.bert import load_bert
    from eet.exporter.common import set_attention

    model = load_bert(config=config_path, seed=0).model.cuda()  # the weights `eet build` drew
    set_attention(model, "sdpa")
    if dtype == "fp16":
        model = model.half()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype == "fp32"
    try:
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(rb.ids).cuda(), attention_mask=torch.from_numpy(rb.mask).cuda(),
                        token_type_ids=torch.from_numpy(rb.token_types).cuda(),
                        position_ids=torch.from_numpy(rb.positions).cuda()).last_hidden_state
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return float(np.abs(rb.unpad(out.float().cpu().numpy()).astype(np.float64) - want).max())


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
    hidden = np.asarray(outputs["hidden_states"], dtype=np.float64)
    first = np.asarray(outputs["first_token_states"], dtype=np.float64)
    want_h, want_f = rb.unpad(ref).astype(np.float64), ref[:, 0].astype(np.float64)
    err_h, err_f = np.abs(hidden - want_h).max(), np.abs(first - want_f).max()
    err_torch = torch_error(tmp_path / "config.json", rb, dtype, want_h)
    bound = RATIO[dtype] * err_torch + FLOOR
    print(f"{name} {dtype}: lengths {rb.lengths.tolist()} ({rb.lengths.sum()} tokens); max abs error vs "
          f"ONNX Runtime fp32: engine hidden_states {err_h:.3e}, first_token_states {err_f:.3e}; PyTorch "
          f"{dtype}{' (TF32)' if dtype == 'fp32' else ''} {err_torch:.3e}; bound {bound:.3e}")
    assert np.isfinite(hidden).all() and np.isfinite(first).all()
    assert err_h <= bound and err_f <= bound
    np.testing.assert_array_equal(np.asarray(outputs2["hidden_states"]), np.asarray(outputs["hidden_states"]))
