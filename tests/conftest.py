"""Shared fixtures: small random BERTs exported once per session in each export form."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

# GPU runs only: TensorRT-RTX 1.7 refuses to deserialize plans on compute capability 9.0 (H100/H200). The test
# shim (../shared/device/cc-shim, see its cc_shim.py) stands in for libcuda and can report a listed capability
# while a plan is deserialized. It must load before anything initializes CUDA, hence here. The product never
# loads it; tests pass it to eet through deserialization hooks.
CC_SHIM = None
if os.environ.get("EET_CC_SHIM"):
    sys.path.insert(0, os.environ["EET_CC_SHIM"])
    import cc_shim as CC_SHIM  # noqa: N812

    CC_SHIM.load()


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


TENSORRT_MISSING = ("needs TensorRT or TensorRT-RTX (pip install tensorrt-rtx-cu13==1.7.1.116, or full TensorRT); "
                    "on the device machine: . /root/eet-env.sh")


def tensorrt_available() -> bool:
    """Whether eet.trt finds a TensorRT flavour (GPU engine tests skip without one instead of failing)."""
    try:
        from eet import trt

        trt.load()
    except Exception:  # EetError (none installed) or a broken install
        return False
    return True


def skip_unless_engine_gpu():
    """Skips the calling GPU engine test module unless an NVIDIA GPU and a TensorRT flavour are both there."""
    if not cuda_available():
        pytest.skip("needs an NVIDIA GPU", allow_module_level=True)
    if not tensorrt_available():
        pytest.skip(TENSORRT_MISSING, allow_module_level=True)


# Small random models for the GPU engine tests (wide init: peaked attention, so a wrong scale or mask shows).
GPU_CONFIGS = {
    "bert": dict(model_type="bert", vocab_size=2000, hidden_size=256, num_hidden_layers=3, num_attention_heads=4,
                 intermediate_size=1024, max_position_embeddings=512, initializer_range=0.1),
    "gpt2": dict(model_type="gpt2", vocab_size=2000, n_embd=256, n_layer=4, n_head=4, n_positions=256,
                 initializer_range=0.1),
}


def build_like_cpu(folder, family: str, dtype: str, *args):
    """``eet build FAMILY`` of ``GPU_CONFIGS[family]`` into ``folder/FAMILY-DTYPE``, with no GPU visible to the
    builder (as on a CPU-only machine); returns the engine directory."""
    import json
    import subprocess

    config = folder / f"{family}.json"
    config.write_text(json.dumps(GPU_CONFIGS[family]))
    out = folder / f"{family}-{dtype}"
    subprocess.run([sys.executable, "-m", "eet", "build", family, "--config", str(config), "--out", str(out),
                    "--dtype", dtype, *args], check=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    return out


@pytest.fixture(scope="session")
def deserialize_hook():
    """A context manager factory to wrap plan deserialization (the shim's faked capability, or nothing)."""
    import contextlib

    return CC_SHIM.faked_capability if CC_SHIM is not None else contextlib.nullcontext


@pytest.fixture(scope="session")
def tiny_config():
    """A 2-layer BERT (hidden 128, 2 heads of 64, 1000-token vocabulary): exports in seconds. Weights drawn
    5x wider than BERT's init so that attention is peaked, not near-uniform (a wrong scale or mask shows)."""
    from transformers import BertConfig

    return BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=256, max_position_embeddings=128, initializer_range=0.1)


@pytest.fixture(scope="session")
def tiny_config_file(tmp_path_factory, tiny_config):
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_text(tiny_config.to_json_string())
    return path


@pytest.fixture(scope="session")
def exported(tmp_path_factory, tiny_config_file):
    """form -> (LoadedBert, path of its ONNX export), exported on first use."""
    from eet.exporter import bert

    cache = {}

    def get(form: str):
        if form not in cache:
            impl, _ = bert.EXPORT_FORMS[form]
            loaded = bert.load_bert(config=str(tiny_config_file), attn_implementation=impl, seed=1)
            path = tmp_path_factory.mktemp(f"export-{form}") / "original.onnx"
            bert.export_onnx(loaded, path, form)
            cache[form] = (loaded, path)
        return cache[form]

    return get


@pytest.fixture
def rng():
    """Fresh randomness every run; the seed is printed so a failure can be replayed (EET_TEST_SEED=N)."""
    seed = int(os.environ.get("EET_TEST_SEED") or np.random.SeedSequence().entropy % 2**32)
    print(f"seed {seed}")
    return np.random.default_rng(seed)


@pytest.fixture
def sidecar_only_gpt2(tmp_path):
    """A GPT-2 engine directory whose sidecar passes every check (installed TensorRT flavour and version, the
    plugins' versions, the plan's sha256) but whose plan is 4 bytes: for the checks that come before
    deserialization."""
    from eet import trt as trt_compat
    from eet.plugins.spec import PREPAD_ATTENTION
    from eet.runtime import sidecar

    pytest.importorskip("tensorrt_rtx")
    trt = trt_compat.load()
    folder = tmp_path / "sidecar-only"
    folder.mkdir()
    (folder / "engine.plan").write_bytes(b"plan")
    sidecar.write(folder, {
        "family": "gpt2", "tensorrt": {"flavour": trt.flavour, "version": trt.version},
        "plugins": [{"name": PREPAD_ATTENTION.name, "version": PREPAD_ATTENTION.version, "namespace": "eet"}],
        "model": {}, "dtype": "fp32", "io": {}, "profiles": [], "build": {}, "files": {"plan": "engine.plan"},
        "plan_sha256": sidecar.sha256_file(folder / "engine.plan")})
    return folder
