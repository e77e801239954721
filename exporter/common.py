"""What the BERT and GPT-2 exporters share: reading Hugging Face directories, choosing how attention is
written, and running ``torch.onnx.export`` quietly."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Sequence

from eet.errors import EetError

EXPORT_FORMS = {
    "sdpa": ("sdpa", 18),           # SDPA decomposed by the exporter into MatMul/Softmax
    "eager": ("eager", 18),         # Hugging Face's eager MatMul/Softmax chain
    "onnx-attention": ("sdpa", 23),  # SDPA as the ONNX Attention op (opset 23+)
}
"""How attention reaches the ONNX graph: name -> (Hugging Face attn_implementation, ONNX opset)."""


def read_config_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise EetError(f"cannot read the model config {path}: {exc}") from exc


def weights_present(path: Path) -> bool:
    names = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
             "pytorch_model.bin.index.json")
    return any((Path(path) / n).is_file() for n in names)


def check_model_directory(path: Path, family: str) -> dict:
    """Validate a Hugging Face directory of ``family`` (``"bert"`` / ``"gpt2"``) and return its config."""
    if not path.is_dir():
        raise EetError(f"--model {path} is not a directory")
    if not (path / "config.json").is_file():
        raise EetError(f"{path} has no config.json: --model must be a Hugging Face model directory")
    data = read_config_json(path / "config.json")
    model_type = data.get("model_type")
    if model_type != family:
        other = {"bert": "gpt2", "gpt2": "bert"}[family]
        hint = f"; use `eet build {other}`" if model_type == other else ""
        raise EetError(f"{path} holds a {model_type!r} model, not {_NAMES[family]}{hint}")
    if not weights_present(path):
        raise EetError(f"{path} has no weights (model.safetensors or pytorch_model.bin); to build with "
                       "random weights pass --config instead")
    return data


def random_config(config: str | os.PathLike, presets: dict, family: str, seed: int) -> tuple[dict, dict]:
    """Keyword arguments of a random-weight model's config (a preset name or a ``config.json`` of
    ``family``) and the source record for the sidecar."""
    if str(config) in presets:
        return dict(presets[str(config)]), {"kind": "preset", "name": str(config), "seed": seed}
    path = Path(config)
    if not path.is_file():
        raise EetError(f"--config {str(config)!r} is neither a preset ({', '.join(presets)}) nor a JSON file")
    data = read_config_json(path)
    model_type = data.pop("model_type", family)
    if model_type != family:
        other = {"bert": "gpt2", "gpt2": "bert"}[family]
        raise EetError(f"{path} describes a {model_type!r} model, not {_NAMES[family]}"
                       + (f"; use `eet build {other}`" if model_type == other else ""))
    return data, {"kind": "config", "path": str(path.resolve()), "seed": seed}


_NAMES = {"bert": "BERT", "gpt2": "GPT-2"}


def quiet_transformers() -> None:
    """No load reports or progress bars in the CLI's output."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def set_attention(model, impl: str) -> None:
    """Make Hugging Face write attention as ``impl`` (``"sdpa"`` or ``"eager"``) on the next forward."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # transformers < 4.54
        model.config._attn_implementation = impl


def cache_kwargs(model, cache) -> dict:
    """How to hand a KV cache to a Hugging Face model's ``forward``: ``cache=`` where its signature has it
    (newer transformers; ``past_key_values`` is deprecated there), else ``past_key_values=``."""
    import inspect

    return {"cache": cache} if "cache" in inspect.signature(model.forward).parameters else {"past_key_values": cache}


def output_cache(out):
    """The KV cache a Hugging Face model output carries (``cache``, or ``past_key_values`` before)."""
    keys = out.keys()
    return out["cache"] if "cache" in keys else out["past_key_values"]


def cache_tensors(cache) -> list:
    """``[key 0, value 0, key 1, value 1, ...]`` of a Hugging Face KV cache, whatever its form: a ``Cache`` with
    ``layers`` (transformers >= 4.56), one with ``key_cache`` / ``value_cache`` lists (before), or the legacy
    tuple of (key, value) pairs (which GPT-2 returns under ``torch.export`` in transformers 4.48)."""
    if hasattr(cache, "layers"):
        return [t for layer in cache.layers for t in (layer.keys, layer.values)]
    if hasattr(cache, "key_cache"):
        return [t for pair in zip(cache.key_cache, cache.value_cache) for t in pair]
    return [t for pair in cache for t in pair[:2]]


def export_hint(exc: BaseException) -> str:
    """A fix for the export failures whose cause is known (with a trailing newline), else ""."""
    missing = re.search(r"No module named '(onnxscript\._framework_apis\.torch_[\d_]+)'", str(exc))
    if missing:
        import torch

        return (f"This torch ({torch.__version__}) needs {missing.group(1)}, which this onnxscript lacks: "
                "upgrade it (pip install -U 'onnxscript>=0.6').\n")
    return ""


def export(module, args: tuple, path: str | os.PathLike, input_names: Sequence[str], output_names: Sequence[str],
           form: str, what: str, dynamic_shapes=None) -> Path:
    """``torch.onnx.export(dynamo=True)`` of ``module`` with every input's axes 0 and 1 dynamic (or
    ``dynamic_shapes`` as ``torch.export`` takes it).

    Args:
        module: a ``torch.nn.Module`` whose attention was set to ``form``'s implementation.
        args: example inputs (int64 [B, S] each).
        path: the ``.onnx`` to write (weights beside it when over ~1.8 GB).
        form: a key of :data:`EXPORT_FORMS` (gives the opset).
        what: the model's name, for errors.
    """
    import torch

    _, opset = EXPORT_FORMS[form]
    path = Path(path)
    auto = torch.export.Dim.AUTO
    dynamic = dynamic_shapes or {name: {0: auto, 1: auto} for name in input_names}
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    log = io.StringIO()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" etc.
    try:
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(path), input_names=list(input_names),
                              output_names=list(output_names), dynamic_shapes=dynamic, opset_version=opset,
                              dynamo=True, external_data=size > 1_800_000_000)
    except Exception as exc:  # the exporter's errors are many and version-specific
        raise EetError(f"torch.onnx.export failed for the {what} ({form} form, opset {opset}): {exc}\n"
                       f"{export_hint(exc)}{log.getvalue()[-2000:]}") from exc
    return path
