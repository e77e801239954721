"""``eet build bert``: Hugging Face BERT -> ONNX -> padding-free ONNX with EET plugins -> TensorRT plan.

Writes into ``--out``: ``original.onnx`` (the plain export, the accuracy reference), ``model.onnx`` (the
rewritten graph), ``engine.plan`` and ``engine.json`` (the sidecar), plus ``tokenizer/`` when the model
has one.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from eet.errors import EetError


@dataclass
class BertBuildOptions:
    """Options of ``eet build bert`` (see ``--help``); sizes are validated by :meth:`validate`."""

    model: str | None = None
    config: str | None = None
    out: str = "eet-bert"
    dtype: str = "fp16"
    max_batch: int = 32
    max_tokens: int = 8192
    max_seq: int = 512
    opt_tokens: int | None = None
    export_form: str = "sdpa"
    seed: int = 0
    tf32: bool = False
    verbose: bool = False

    def validate(self, max_positions: int | None = None) -> None:
        """Raise :class:`EetError` for non-positive or inconsistent sizes."""
        for name in ("max_batch", "max_tokens", "max_seq"):
            if getattr(self, name) <= 0:
                raise EetError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.opt_tokens is not None and not 1 <= self.opt_tokens <= self.max_tokens:
            raise EetError(f"--opt-tokens must be between 1 and --max-tokens ({self.max_tokens}), "
                           f"got {self.opt_tokens}")
        if self.max_tokens < self.max_seq:
            raise EetError(f"--max-tokens {self.max_tokens} is below --max-seq {self.max_seq}: one sequence of "
                           "the longest length would not fit; raise --max-tokens or lower --max-seq")
        if self.max_tokens > self.max_batch * self.max_seq:
            raise EetError(f"--max-tokens {self.max_tokens} exceeds --max-batch x --max-seq = "
                           f"{self.max_batch * self.max_seq}, which no batch can reach; lower --max-tokens")
        if max_positions is not None and self.max_seq > max_positions:
            raise EetError(f"--max-seq {self.max_seq} exceeds the model's max_position_embeddings "
                           f"{max_positions}; lower --max-seq")
        if self.dtype not in ("fp16", "fp32"):
            raise EetError(f"--dtype must be fp16 or fp32, got {self.dtype!r}")

    @property
    def opt(self) -> int:
        return self.opt_tokens if self.opt_tokens is not None else min(self.max_tokens, 2048)


def bert_profiles(o: BertBuildOptions):
    """The one optimization profile of a packed BERT engine."""
    from eet.exporter.rewrite import CU_SEQLENS, MAX_SEQLEN, PACKED_INPUTS
    from eet.runtime.build import Profile

    opt_seq = min(o.max_seq, 128)
    opt_batch = max(1, min(o.max_batch, o.opt // opt_seq))
    tokens = ((1,), (o.opt,), (o.max_tokens,))
    shapes = {name: tokens for name in PACKED_INPUTS}
    shapes[CU_SEQLENS] = ((2,), (opt_batch + 1,), (o.max_batch + 1,))
    shapes[MAX_SEQLEN] = ((1,), (opt_seq,), (o.max_seq,))
    return [Profile("packed", shapes)]


def weights_fingerprint(model) -> str:
    """sha256 over the model's parameters (names, shapes, float32 bytes): lets `eet check` prove it rebuilt
    the same random weights."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def _prepare_out_dir(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".eet-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise EetError(f"cannot write to the output directory {out} ({exc.strerror or exc}); "
                       "choose another --out") from exc
    return out


def build_bert(o: BertBuildOptions, progress: Callable[[str], None] = print) -> Path:
    """Run the whole pipeline; returns the output directory."""
    import onnx

    from eet import __version__
    from eet import trt as trt_compat
    from eet.exporter import bert, rewrite
    from eet.plugins.spec import VARLEN_ATTENTION
    from eet.runtime import sidecar
    from eet.runtime.build import build_engine

    o.validate()
    out = _prepare_out_dir(o.out)
    trt = trt_compat.load()  # fail before the slow export when TensorRT is missing
    if o.export_form not in bert.EXPORT_FORMS:
        raise EetError(f"unknown --export-form {o.export_form!r}: use one of {', '.join(bert.EXPORT_FORMS)}")
    steps, t0 = 5, time.perf_counter()

    def stage(i, text):
        progress(f"[{i}/{steps}] {text} ({time.perf_counter() - t0:.1f} s)")

    what = o.model or (f"config {o.config}" if o.config else f"default {bert.DEFAULT_MODEL_NAME}")
    stage(1, f"loading {what}")
    impl, opset = bert.EXPORT_FORMS[o.export_form]
    loaded = bert.load_bert(o.model, o.config, attn_implementation=impl, seed=o.seed)
    cfg = loaded.config
    o.validate(max_positions=cfg.max_position_embeddings)

    stage(2, f"exporting to ONNX ({o.export_form} form, opset {opset})")
    original = out / "original.onnx"
    bert.export_onnx(loaded, original, o.export_form)

    stage(3, f"rewriting {cfg.num_hidden_layers} attention layers into {VARLEN_ATTENTION.name} ({o.dtype})")
    model = rewrite.rewrite_bert(onnx.load(str(original)), num_layers=cfg.num_hidden_layers,
                                 num_heads=cfg.num_attention_heads, head_dim=loaded.head_dim, dtype=o.dtype)
    rewritten = out / "model.onnx"
    onnx.save(model, str(rewritten), save_as_external_data=model.ByteSize() > 1_800_000_000)

    stage(4, f"building the TensorRT engine with {trt.flavour} {trt.version}")
    profiles = bert_profiles(o)
    built = build_engine(rewritten, profiles, tf32=o.tf32, verbose=o.verbose,
                         progress=lambda s: progress(f"      {s}"))
    if built.plugin_layers.get(VARLEN_ATTENTION.name, 0) != cfg.num_hidden_layers:
        raise EetError(f"the engine has {built.plugin_layers} plugin layers, expected "
                       f"{cfg.num_hidden_layers} x {VARLEN_ATTENTION.name}")
    (out / "engine.plan").write_bytes(built.plan)

    stage(5, "writing the sidecar")
    tokenizer = None
    if loaded.tokenizer_dir:
        tokenizer = "tokenizer"
        (out / tokenizer).mkdir(exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            src = Path(loaded.tokenizer_dir) / name
            if src.is_file():
                shutil.copy(src, out / tokenizer / name)
    options = asdict(o)
    options["opt_tokens"] = o.opt
    sidecar.write(out, {
        "family": "bert",
        "eet_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {
            "source": loaded.source,
            "config": cfg.to_dict(),
            "num_layers": cfg.num_hidden_layers, "num_heads": cfg.num_attention_heads,
            "head_dim": loaded.head_dim, "hidden_size": cfg.hidden_size,
            "weights_sha256": weights_fingerprint(loaded.model),
        },
        "dtype": o.dtype,
        "io": {"inputs": built.inputs, "outputs": built.outputs,
               "doc": {"input_ids": "int32 [T] packed token ids", "token_type_ids": "int32 [T]",
                       "position_ids": "int32 [T], restarting at 0 for each sequence",
                       "cu_seqlens": "int32 [B+1], 0, l0, l0+l1, ..., T",
                       "max_seqlen": "int32 [S], shape carrier: S >= every length, values unused",
                       "hidden_states": "[T, H] packed last hidden states",
                       "first_token_states": "[B, H] hidden state of each sequence's first token"}},
        "profiles": [p.to_json() for p in profiles],
        "plugins": [{"name": VARLEN_ATTENTION.name, "version": VARLEN_ATTENTION.version,
                     "namespace": VARLEN_ATTENTION.namespace, "layers": built.plugin_layers.get(
                         VARLEN_ATTENTION.name, 0)}],
        "tensorrt": built.tensorrt,
        "build": {**options, "export_opset": opset},
        "files": {"original_onnx": original.name, "onnx": rewritten.name, "plan": "engine.plan",
                  "tokenizer": tokenizer},
        "plan_sha256": built.sha256,
    })
    progress(f"done in {time.perf_counter() - t0:.1f} s: {out}/engine.plan ({len(built.plan) / 1e6:.1f} MB), "
             f"{built.plugin_layers.get(VARLEN_ATTENTION.name, 0)} x {VARLEN_ATTENTION.name}")
    return out


def parser() -> argparse.ArgumentParser:
    d = BertBuildOptions()
    p = argparse.ArgumentParser(prog="eet build bert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="DIR", help="local Hugging Face BERT directory (default: the embedded "
                     "all-MiniLM-L6-v2)")
    src.add_argument("--config", metavar="JSON|PRESET", help="config.json or a preset (bert-tiny, bert-mini, "
                     "bert-small, bert-base, bert-large): random weights")
    p.add_argument("--out", default=d.out, metavar="DIR", help=f"output directory (default {d.out})")
    p.add_argument("--dtype", choices=("fp16", "fp32"), default=d.dtype, help="engine precision (default fp16; "
                   "LayerNorm statistics and softmax stay fp32)")
    p.add_argument("--max-batch", type=int, default=d.max_batch, metavar="N", help="most sequences per call")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, metavar="T", help="most packed tokens per call")
    p.add_argument("--max-seq", type=int, default=d.max_seq, metavar="S", help="longest sequence")
    p.add_argument("--opt-tokens", type=int, default=None, metavar="T",
                   help="token count TensorRT optimizes for (default min(max-tokens, 2048))")
    p.add_argument("--export-form", default=d.export_form, choices=("sdpa", "eager", "onnx-attention"),
                   help="how attention is exported (default sdpa)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of random weights (--config)")
    p.add_argument("--tf32", action="store_true", help="let fp32 GEMMs use TF32 (faster, ~1e-3 relative error)")
    p.add_argument("--verbose", action="store_true", help="TensorRT's verbose log")
    return p


def main(argv: list[str] | None = None) -> int:
    """``eet build bert ...``"""
    argv = list(argv or [])
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: eet build bert [options]   (`eet build bert --help`)")
        return 0 if argv else 2
    family, rest = argv[0], argv[1:]
    if family == "gpt2":
        raise EetError("`eet build gpt2` is not available yet; this version builds BERT engines")
    if family != "bert":
        raise EetError(f"unknown model family {family!r}: use `eet build bert`")
    args = parser().parse_args(rest)
    build_bert(BertBuildOptions(**vars(args)))
    return 0
