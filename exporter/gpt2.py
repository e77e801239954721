"""Load a Hugging Face GPT-2 and export it to ONNX.

The export is the plain language model without a KV cache: inputs ``input_ids``, ``attention_mask``,
``position_ids`` (int64 [B, S]), output ``logits`` (float32 [B, S, V]). It runs as is in ONNX Runtime and is
the accuracy reference; :func:`eet.exporter.rewrite.rewrite_gpt2` turns it into the pre-padding generation
graph (in-place KV cache, last-position LM head, next token on the GPU).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eet.errors import EetError
from eet.exporter.common import (EXPORT_FORMS, cache_kwargs, cache_tensors, check_model_directory, export,
                                 output_cache, quiet_transformers, random_config, set_attention)
from eet.plugins.spec import HEAD_DIMS

PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(n_embd=768, n_layer=12, n_head=12),
    "medium": dict(n_embd=1024, n_layer=24, n_head=16),
    "large": dict(n_embd=1280, n_layer=36, n_head=20),
    "xl": dict(n_embd=1600, n_layer=48, n_head=25),
}
"""GPT-2's published shapes (vocabulary 50257, 1024 positions); random weights."""

INPUT_NAMES = ("input_ids", "attention_mask", "position_ids")
OUTPUT_NAME = "logits"


@dataclass
class LoadedGpt2:
    """A GPT-2 ready to export: ``model`` (``GPT2LMHeadModel``, eval, float32, CPU), its ``config``, where it
    came from (``source``) and a tokenizer directory or None."""

    model: Any
    config: Any
    source: dict = field(default_factory=dict)
    tokenizer_dir: str | None = None

    @property
    def head_dim(self) -> int:
        return self.config.n_embd // self.config.n_head


def check_supported(config) -> None:
    """Raise :class:`EetError` for a GPT-2 the EET kernels cannot run."""
    if config.n_head <= 0 or config.n_embd % config.n_head:
        raise EetError(f"n_embd {config.n_embd} is not divisible by n_head {config.n_head}")
    head_dim = config.n_embd // config.n_head
    if head_dim not in HEAD_DIMS:
        raise EetError(f"unsupported head size {head_dim} (n_embd {config.n_embd} / {config.n_head} heads): the "
                       f"EET attention kernels support head sizes {', '.join(map(str, HEAD_DIMS))}")
    if getattr(config, "add_cross_attention", False):
        raise EetError("GPT-2 with cross-attention is not supported")


def load_gpt2(model_dir: str | os.PathLike | None = None, config: str | os.PathLike | None = None,
              attn_implementation: str = "sdpa", seed: int = 0) -> LoadedGpt2:
    """Load a GPT-2 language model.

    Args:
        model_dir: a local Hugging Face GPT-2 directory (``config.json`` plus weights).
        config: a preset (:data:`PRESETS`) or a ``config.json`` path, random weights
            (``torch.manual_seed(seed)``). Default when both are None: the ``small`` preset (GPT-2 124M shapes;
            no public GPT-2 weights are reachable offline).
        attn_implementation: ``"sdpa"`` or ``"eager"``.

    Raises:
        EetError: not a GPT-2, missing weights, unsupported head size, unreadable config.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    quiet_transformers()
    if model_dir is not None and config is not None:
        raise EetError("give either --model DIR (weights) or --config (random weights), not both")
    if model_dir is None:
        kwargs, source = random_config("small" if config is None else config, PRESETS, "gpt2", seed)
        cfg = GPT2Config(**kwargs)
        check_supported(cfg)
        cfg._attn_implementation = attn_implementation
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(cfg)
        tokenizer_dir = None
    else:
        path = Path(model_dir)
        check_model_directory(path, "gpt2")
        cfg = GPT2Config.from_pretrained(str(path))
        check_supported(cfg)
        try:
            model = GPT2LMHeadModel.from_pretrained(str(path), attn_implementation=attn_implementation,
                                                    torch_dtype=torch.float32)
        except (OSError, ValueError, RuntimeError) as exc:
            raise EetError(f"cannot load the weights in {path}: {exc}") from exc
        source = {"kind": "directory", "path": str(path.resolve())}
        tokenizer_dir = str(path) if any((path / n).is_file() for n in ("tokenizer.json", "vocab.json")) else None
    model.eval()
    return LoadedGpt2(model=model, config=model.config, source=source, tokenizer_dir=tokenizer_dir)


class _Wrapper:
    """``forward(input_ids, attention_mask, position_ids) -> logits`` without a KV cache."""

    def __new__(cls, model):
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask, position_ids):
                return self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).logits

        return Wrapper(model).eval()


def example_inputs(batch: int = 2, seq: int = 8, vocab: int = 100):
    """Tracing inputs (int64 [batch, seq]); the second row is left-padded."""
    import torch

    ids = torch.randint(0, vocab, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[1:, : seq // 2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


class _PastWrapper:
    """``forward(input_ids, attention_mask, position_ids, *past) -> (last-position logits, *presents)``: one
    step with the KV cache as plain tensors, ``past`` = key, value of layer 0, then layer 1, ..."""

    def __new__(cls, model):
        import torch
        from transformers import DynamicCache

        layers = model.config.n_layer

        class Wrapper(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask, position_ids, *past):
                cache = DynamicCache()
                for layer in range(layers):
                    cache.update(past[2 * layer], past[2 * layer + 1], layer)
                out = self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=True, **cache_kwargs(self.m, cache))
                return (out.logits[:, -1], *cache_tensors(output_cache(out)))

        return Wrapper(model).eval()


def past_names(num_layers: int, prefix: str = "past") -> list[str]:
    """``past_key.0, past_value.0, past_key.1, ...`` (or ``present_...``)."""
    return [f"{prefix}_{kind}.{layer}" for layer in range(num_layers) for kind in ("key", "value")]


def export_onnx_with_past(loaded: LoadedGpt2, path: str | os.PathLike) -> Path:
    """The export a TensorRT user writes without EET, for the decode step: inputs ``input_ids``,
    ``position_ids`` (int64 [B, S]), ``attention_mask`` (int64 [B, P + S]) and per layer ``past_key.l`` /
    ``past_value.l`` (float32 [B, heads, P, head_dim]); outputs the last position's ``logits`` [B, V] and
    ``present_key.l`` / ``present_value.l`` [B, heads, P + S, head_dim] (the past concatenated with the new
    keys and values). Eager attention: the SDPA form does not export with a dynamic past (``is_causal``
    becomes symbolic)."""
    import torch

    set_attention(loaded.model, "eager")
    cfg = loaded.config
    ids, mask, positions = example_inputs(vocab=min(cfg.vocab_size, 100))
    batch, past_len = ids.shape[0], 5
    past = tuple(torch.randn(batch, cfg.n_head, past_len, loaded.head_dim) for _ in range(2 * cfg.n_layer))
    mask = torch.cat([torch.ones(batch, past_len, dtype=torch.int64), mask], dim=1)
    auto = torch.export.Dim.AUTO
    dynamic = ({0: auto, 1: auto}, {0: auto, 1: auto}, {0: auto, 1: auto}, tuple({0: auto, 2: auto} for _ in past))
    return export(_PastWrapper(loaded.model), (ids, mask, positions + past_len, *past), path,
                  [*INPUT_NAMES, *past_names(cfg.n_layer)], [OUTPUT_NAME, *past_names(cfg.n_layer, "present")],
                  "eager", "GPT-2 with past", dynamic_shapes=dynamic)


def export_onnx(loaded: LoadedGpt2, path: str | os.PathLike, form: str = "sdpa") -> Path:
    """Export ``loaded`` (no KV cache) to ONNX; dynamic batch and sequence axes."""
    if form not in EXPORT_FORMS:
        raise EetError(f"unknown export form {form!r}: use one of {', '.join(EXPORT_FORMS)}")
    set_attention(loaded.model, EXPORT_FORMS[form][0])
    return export(_Wrapper(loaded.model), example_inputs(vocab=min(loaded.config.vocab_size, 100)), path,
                  INPUT_NAMES, [OUTPUT_NAME], form, "GPT-2")
