"""``eet build bert`` / ``eet build gpt2``: Hugging Face model -> ONNX -> rewritten ONNX with EET plugins ->
TensorRT plan.

Writes into ``--out``: ``original.onnx`` (the plain export, the accuracy reference), ``model.onnx`` (the
rewritten graph), ``engine.plan`` and ``engine.json`` (the sidecar), plus ``tokenizer/`` when the model
has one.
"""
from __future__ import annotations

import argparse
import functools
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
    plain_baseline: bool = False
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
    """The one optimization profile of a packed BERT engine: --max-batch sequences and --max-tokens tokens plus
    room for the runtime's bucket fillers (one sequence, and --max-batch tokens rounded up so that the largest
    token count is a multiple of 64; see :mod:`eet.runtime.bert`), so that ``encode()`` puts --max-batch real
    sequences in a bucketed call."""
    from eet.exporter.rewrite import CU_SEQLENS, MAX_SEQLEN, PACKED_INPUTS
    from eet.runtime.build import Profile

    opt_seq = min(o.max_seq, 128)
    opt_batch = max(1, min(o.max_batch, o.opt // opt_seq))
    tokens = ((1,), (o.opt,), (-(-(o.max_tokens + o.max_batch) // 64) * 64,))
    shapes = {name: tokens for name in PACKED_INPUTS}
    shapes[CU_SEQLENS] = ((2,), (opt_batch + 1,), (o.max_batch + 2,))
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


class _Stages:
    """Prints ``[i/n] text (elapsed s)`` lines."""

    def __init__(self, total: int, progress: Callable[[str], None]):
        self.total, self.progress, self.t0 = total, progress, time.perf_counter()

    def __call__(self, i: int, text: str) -> None:
        self.progress(f"[{i}/{self.total}] {text} ({self.elapsed:.1f} s)")

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def _copy_tokenizer(src: str | None, out: Path) -> str | None:
    """Copy the tokenizer files of a model directory into ``out/tokenizer``; its name in ``out``, or None."""
    if not src:
        return None
    (out / "tokenizer").mkdir(exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                 "special_tokens_map.json"):
        if (Path(src) / name).is_file():
            shutil.copy(Path(src) / name, out / "tokenizer" / name)
    return "tokenizer"


def _export_and_rewrite(stage, loaded, out: Path, exporter, rewrite_fn, form: str, dtype: str, spec):
    """Stages 2 and 3: ``original.onnx`` and ``model.onnx``; returns (rewritten path, export opset)."""
    import onnx

    _, opset = exporter.EXPORT_FORMS[form]
    stage(2, f"exporting to ONNX ({form} form, opset {opset})")
    original = out / "original.onnx"
    exporter.export_onnx(loaded, original, form)
    layers = loaded.model.config.num_hidden_layers
    stage(3, f"rewriting {layers} attention layers into {spec.name} ({dtype})")
    model = rewrite_fn(onnx.load(str(original)), num_layers=layers,
                       num_heads=loaded.model.config.num_attention_heads, head_dim=loaded.head_dim, dtype=dtype)
    rewritten = out / "model.onnx"
    onnx.save(model, str(rewritten), save_as_external_data=model.ByteSize() > 1_800_000_000)
    return rewritten, opset


def _write_engine(stage, out: Path, rewritten: Path, profiles, spec, layers: int, **build_args):
    """Stage 4: build ``engine.plan``, checking one plugin layer of ``spec`` per model layer."""
    from eet import trt as trt_compat
    from eet.runtime.build import build_engine
    from eet.runtime.engine import RUNTIME_CACHE_DIR

    trt = trt_compat.load()
    stage(4, f"building the TensorRT engine with {trt.flavour} {trt.version}")
    built = build_engine(rewritten, profiles, progress=lambda s: stage.progress(f"      {s}"), **build_args)
    if built.plugin_layers.get(spec.name, 0) != layers:
        raise EetError(f"the engine has {built.plugin_layers} plugin layers, expected {layers} x {spec.name}")
    (out / "engine.plan").write_bytes(built.plan)
    shutil.rmtree(out / RUNTIME_CACHE_DIR, ignore_errors=True)  # kernels compiled for a previous plan
    return built


def _sidecar(out: Path, *, family: str, loaded, dtype: str, built, profiles, spec, options: dict, opset: int,
             tokenizer: str | None, extra: dict) -> None:
    """Stage 5: ``engine.json``."""
    from eet import __version__
    from eet.runtime import sidecar

    cfg = loaded.model.config
    sidecar.write(out, {
        "family": family,
        "eet_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"source": loaded.source, "config": cfg.to_dict(), "num_layers": cfg.num_hidden_layers,
                  "num_heads": cfg.num_attention_heads, "head_dim": loaded.head_dim,
                  "hidden_size": cfg.hidden_size, "weights_sha256": weights_fingerprint(loaded.model)},
        "dtype": dtype,
        "io": {"inputs": built.inputs, "outputs": built.outputs, "doc": extra.pop("io_doc")},
        "profiles": [p.to_json() for p in profiles],
        "plugins": [{"name": spec.name, "version": spec.version, "namespace": spec.namespace,
                     "layers": built.plugin_layers.get(spec.name, 0)}],
        "tensorrt": built.tensorrt,
        "build": {**options, "export_opset": opset},
        "files": {"original_onnx": "original.onnx", "onnx": "model.onnx", "plan": "engine.plan",
                  "tokenizer": tokenizer},
        "plan_sha256": built.sha256,
        **extra,
    })


def build_bert(o: BertBuildOptions, progress: Callable[[str], None] = print) -> Path:
    """``eet build bert``: export, rewrite padding-free (packed tokens, ``EetVarlenAttention``), build the
    engine; returns the output directory."""
    from eet import trt as trt_compat
    from eet.exporter import bert, rewrite
    from eet.plugins.spec import VARLEN_ATTENTION

    o.validate()
    out = _prepare_out_dir(o.out)
    trt_compat.load()  # fail before the slow export when TensorRT is missing
    if o.export_form not in bert.EXPORT_FORMS:
        raise EetError(f"unknown --export-form {o.export_form!r}: use one of {', '.join(bert.EXPORT_FORMS)}")
    stage = _Stages(5, progress)
    what = o.model or (f"config {o.config}" if o.config else f"default {bert.DEFAULT_MODEL_NAME}")
    stage(1, f"loading {what}")
    loaded = bert.load_bert(o.model, o.config, attn_implementation=bert.EXPORT_FORMS[o.export_form][0],
                            seed=o.seed)
    cfg = loaded.config
    o.validate(max_positions=cfg.max_position_embeddings)
    rewritten, opset = _export_and_rewrite(stage, loaded, out, bert, rewrite.rewrite_bert, o.export_form,
                                           o.dtype, VARLEN_ATTENTION)
    profiles = bert_profiles(o)
    built = _write_engine(stage, out, rewritten, profiles, VARLEN_ATTENTION, cfg.num_hidden_layers, tf32=o.tf32,
                          verbose=o.verbose)
    if o.plain_baseline:
        plain = build_plain_bert(out / "original.onnx", out, o)
        progress(f"      plain baseline (no EET rewrite): {plain.name} ({plain.stat().st_size / 1e6:.1f} MB)")
    stage(5, "writing the sidecar")
    options = asdict(o)
    options["opt_tokens"] = o.opt
    _sidecar(out, family="bert", loaded=loaded, dtype=o.dtype, built=built, profiles=profiles,
             spec=VARLEN_ATTENTION, options=options, opset=opset, tokenizer=_copy_tokenizer(loaded.tokenizer_dir, out),
             extra={"io_doc": {
                 "input_ids": "int32 [T] packed token ids", "token_type_ids": "int32 [T]",
                 "position_ids": "int32 [T], restarting at 0 for each sequence",
                 "cu_seqlens": "int32 [B+1], 0, l0, l0+l1, ..., T",
                 "max_seqlen": "int32 [S], shape carrier: S >= every length, values unused",
                 "hidden_states": "[T, H] packed last hidden states",
                 "first_token_states": "[B, H] hidden state of each sequence's first token"}})
    progress(f"done in {stage.elapsed:.1f} s: {out}/engine.plan ({len(built.plan) / 1e6:.1f} MB), "
             f"{built.plugin_layers.get(VARLEN_ATTENTION.name, 0)} x {VARLEN_ATTENTION.name}")
    return out


def build_plain(source: Path, out: Path, dtype: str, shapes: dict, tf32: bool = False) -> Path:
    """The peer to beat: a plain export (no EET plugin) built as a TensorRT engine in the same precision
    (``plain.onnx``, ``plain.plan``), one profile of ``shapes`` (input name -> (min, opt, max)). fp16: the same
    conversion as the EET graph (LayerNorm in fp32), with float constants clamped to the fp16 range first
    (a mask's finfo(float32).min would become -inf)."""
    import numpy as np
    import onnx
    import onnx_graphsurgeon as gs

    from eet.exporter.rewrite import forget_intermediate_shapes, to_fp16
    from eet.runtime.build import Profile, build_engine

    graph = gs.import_onnx(onnx.load(str(source)))
    if dtype == "fp16":
        limit = float(np.finfo(np.float16).max)
        for tensor in graph.tensors().values():
            if isinstance(tensor, gs.Constant) and tensor.values.dtype == np.float32:
                tensor.values = np.clip(tensor.values, -limit, limit)
        for node in graph.nodes:
            value = node.attrs.get("value") if node.op in ("Constant", "ConstantOfShape") else None
            if isinstance(value, gs.Constant) and value.values.dtype == np.float32:
                value.values = np.clip(value.values, -limit, limit)
        to_fp16(graph)
    forget_intermediate_shapes(graph)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    path = out / "plain.onnx"
    onnx.save(gs.export_onnx(graph), str(path))
    built = build_engine(path, [Profile("plain", shapes)], tf32=tf32)
    plan = out / "plain.plan"
    plan.write_bytes(built.plan)
    return plan


def build_plain_bert(original: Path, out: Path, o: BertBuildOptions) -> Path:
    """``original.onnx`` (padded [B, S] inputs with the attention mask) as a plain engine, up to
    ``max_batch`` x ``max_seq`` (see :func:`build_plain`)."""
    import onnx

    opt_seq = min(o.max_seq, 128)
    rows = ((1, 1), (max(1, min(o.max_batch, o.opt // opt_seq)), opt_seq), (o.max_batch, o.max_seq))
    names = [i.name for i in onnx.load(str(original), load_external_data=False).graph.input]
    return build_plain(original, out, o.dtype, {name: rows for name in names}, o.tf32)


@dataclass
class Gpt2BuildOptions:
    """Options of ``eet build gpt2`` (see ``--help``)."""

    model: str | None = None
    config: str | None = None
    out: str = "eet-gpt2"
    dtype: str = "fp16"
    max_batch: int = 32
    max_prompt: int = 512
    max_len: int = 1024
    export_form: str = "sdpa"
    seed: int = 0
    sample_candidates: int = 0
    tf32: bool = False
    plain_baseline: bool = False
    verbose: bool = False

    def validate(self, max_positions: int | None = None, vocab_size: int | None = None) -> None:
        """Raise :class:`EetError` for non-positive or inconsistent sizes."""
        if not 0 <= self.sample_candidates <= 3840:
            raise EetError(f"--sample-candidates must be between 0 (greedy only) and 3840 (TensorRT's TopK limit), "
                           f"got {self.sample_candidates}")
        if vocab_size is not None and self.sample_candidates > vocab_size:
            raise EetError(f"--sample-candidates {self.sample_candidates} exceeds the vocabulary ({vocab_size})")
        for name in ("max_batch", "max_prompt", "max_len"):
            if getattr(self, name) <= 0:
                raise EetError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.max_prompt >= self.max_len:
            raise EetError(f"--max-prompt {self.max_prompt} leaves no room to generate within --max-len "
                           f"{self.max_len}; raise --max-len or lower --max-prompt")
        if max_positions is not None and self.max_len > max_positions:
            raise EetError(f"--max-len {self.max_len} exceeds the model's n_positions {max_positions}; "
                           "lower --max-len")
        if self.dtype not in ("fp16", "fp32"):
            raise EetError(f"--dtype must be fp16 or fp32, got {self.dtype!r}")


GPT2_PROFILES = ("context", "decode")
"""Optimization profile names, in profile-index order."""


def gpt2_profiles(o: Gpt2BuildOptions, num_layers: int, num_heads: int, head_dim: int):
    """Profile 0 ``context`` (B x S prompt tokens), profile 1 ``decode`` (B x 1); caches fixed at max_len."""
    from eet.runtime.build import Profile

    opt_b = max(1, o.max_batch // 2)
    rows = ((1,), (opt_b,), (o.max_batch,))
    cache = tuple((b[0], num_heads, o.max_len, head_dim) for b in rows)
    common = {"pad_lengths": rows}
    if o.sample_candidates:
        common.update({name: rows for name in ("temperature", "top_k", "top_p", "uniform")})
    for layer in range(num_layers):
        common[f"past_key.{layer}"] = common[f"past_value.{layer}"] = cache
    context = {"input_ids": ((1, 1), (opt_b, min(o.max_prompt, 128)), (o.max_batch, o.max_prompt)), **common}
    decode = {"input_ids": ((1, 1), (opt_b, 1), (o.max_batch, 1)), **common}
    return [Profile("context", context), Profile("decode", decode)]


def build_gpt2(o: Gpt2BuildOptions, progress: Callable[[str], None] = print) -> Path:
    """``eet build gpt2``: export, rewrite (pre-padding attention, in-place KV cache, last-position LM head,
    greedy next token), build one engine with the context and decode profiles; returns the output directory."""
    from eet import trt as trt_compat
    from eet.exporter import gpt2, rewrite
    from eet.plugins.spec import PREPAD_ATTENTION

    o.validate()
    out = _prepare_out_dir(o.out)
    trt_compat.load()
    if o.export_form not in gpt2.EXPORT_FORMS:
        raise EetError(f"unknown --export-form {o.export_form!r}: use one of {', '.join(gpt2.EXPORT_FORMS)}")
    stage = _Stages(5, progress)
    stage(1, f"loading {o.model or ('config ' + o.config if o.config else 'the GPT-2 small configuration')}"
             f"{'' if o.model else ' (seeded random weights)'}")
    loaded = gpt2.load_gpt2(o.model, o.config, attn_implementation=gpt2.EXPORT_FORMS[o.export_form][0],
                            seed=o.seed)
    cfg = loaded.config
    o.validate(max_positions=cfg.n_positions, vocab_size=cfg.vocab_size)
    rewrite_fn = functools.partial(rewrite.rewrite_gpt2, sampling_candidates=o.sample_candidates)
    rewritten, opset = _export_and_rewrite(stage, loaded, out, gpt2, rewrite_fn, o.export_form, o.dtype,
                                           PREPAD_ATTENTION)
    profiles = gpt2_profiles(o, cfg.n_layer, cfg.n_head, loaded.head_dim)
    built = _write_engine(stage, out, rewritten, profiles, PREPAD_ATTENTION, cfg.n_layer, tf32=o.tf32,
                          aliased_io=True, verbose=o.verbose)
    if o.plain_baseline:
        plain = build_plain_gpt2(loaded, out, o)
        progress(f"      plain baseline (no EET rewrite): {plain.name} ({plain.stat().st_size / 1e6:.1f} MB)")
    stage(5, "writing the sidecar")
    _sidecar(out, family="gpt2", loaded=loaded, dtype=o.dtype, built=built, profiles=profiles,
             spec=PREPAD_ATTENTION, options=asdict(o), opset=opset,
             tokenizer=_copy_tokenizer(loaded.tokenizer_dir, out),
             extra={"io_doc": {
                 "input_ids": "int32 [B, S] left-padded prompt tokens (context) or the last tokens [B, 1] (decode)",
                 "pad_lengths": "int32 [B] left padding of each row",
                 "step": "int32 [1] cache position of the first of the S tokens (0 for the context phase)",
                 "past_key.<l>/past_value.<l>": "[B, heads, max_len, head_dim] KV cache of layer l, owned by the "
                                                "caller, updated in place",
                 "next_token": "int32 [B] next token (greedy, or sampled where temperature > 0)",
                 "logits": "[B, V] logits of the last position",
                 "temperature/top_k/top_p/uniform": "[B] sampling inputs, only with --sample-candidates"},
                 "generation": {"max_batch": o.max_batch, "max_prompt": o.max_prompt, "max_len": o.max_len,
                                "sample_candidates": o.sample_candidates,
                                "vocab_size": cfg.vocab_size, "eos_token_id": cfg.eos_token_id,
                                "profiles": list(GPT2_PROFILES),
                                "cache": {"layers": cfg.n_layer, "heads": cfg.n_head, "head_dim": loaded.head_dim,
                                          "names": ["past_key.<l>", "past_value.<l>"]}}})
    progress(f"done in {stage.elapsed:.1f} s: {out}/engine.plan ({len(built.plan) / 1e6:.1f} MB), "
             f"{built.plugin_layers.get(PREPAD_ATTENTION.name, 0)} x {PREPAD_ATTENTION.name}, profiles "
             f"{', '.join(GPT2_PROFILES)}")
    return out


def build_plain_gpt2(loaded, out: Path, o: Gpt2BuildOptions) -> Path:
    """The decode step as a TensorRT user writes it without EET: the export with the KV cache as inputs and
    outputs (:func:`eet.exporter.gpt2.export_onnx_with_past`), the past concatenated with the new keys every
    step and the cache copied out, built as a plain engine for one token per row and a past of 1 ..
    ``max_len - 1`` (see :func:`build_plain`)."""
    from eet.exporter import gpt2

    cfg = loaded.config
    source = gpt2.export_onnx_with_past(loaded, out / "plain-export.onnx")
    opt_b, opt_past = max(1, o.max_batch // 2), min(512, o.max_len - 1)
    token = ((1, 1), (opt_b, 1), (o.max_batch, 1))
    shapes = {"input_ids": token, "position_ids": token,
              "attention_mask": ((1, 2), (opt_b, opt_past + 1), (o.max_batch, o.max_len))}
    for name in gpt2.past_names(cfg.n_layer):
        shapes[name] = ((1, cfg.n_head, 1, loaded.head_dim), (opt_b, cfg.n_head, opt_past, loaded.head_dim),
                        (o.max_batch, cfg.n_head, o.max_len - 1, loaded.head_dim))
    try:
        return build_plain(source, out, o.dtype, shapes, o.tf32)
    finally:
        for leftover in out.glob("plain-export.onnx*"):
            leftover.unlink()


def gpt2_parser() -> argparse.ArgumentParser:
    d = Gpt2BuildOptions()
    p = argparse.ArgumentParser(prog="eet build gpt2", description=build_gpt2.__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="DIR", help="local Hugging Face GPT-2 directory (default: the GPT-2 small "
                     "configuration with seeded random weights)")
    src.add_argument("--config", metavar="small|medium|large|xl|JSON", help="a GPT-2 size or config.json: random "
                     "weights")
    p.add_argument("--out", default=d.out, metavar="DIR", help=f"output directory (default {d.out})")
    p.add_argument("--dtype", choices=("fp16", "fp32"), default=d.dtype, help="engine precision (default fp16)")
    p.add_argument("--max-batch", type=int, default=d.max_batch, metavar="N", help="most prompts per batch")
    p.add_argument("--max-prompt", type=int, default=d.max_prompt, metavar="S", help="longest prompt")
    p.add_argument("--max-len", type=int, default=d.max_len, metavar="L",
                   help="KV cache length: prompt + generated tokens")
    p.add_argument("--export-form", default=d.export_form, choices=("sdpa", "eager", "onnx-attention"))
    p.add_argument("--seed", type=int, default=d.seed, help="seed of random weights")
    p.add_argument("--sample-candidates", type=int, default=d.sample_candidates, metavar="K",
                   help="also sample in the engine (temperature / top-k / top-p) among the K most likely tokens; "
                   "0 (default): greedy only")
    p.add_argument("--tf32", action="store_true", help="let fp32 GEMMs use TF32")
    p.add_argument("--plain-baseline", action="store_true", help="also build the decode step of the plain export "
                   "with the KV cache as inputs/outputs (no EET rewrite) as plain.plan, the baseline `eet bench` "
                   "compares with")
    p.add_argument("--verbose", action="store_true", help="TensorRT's verbose log")
    return p


def parser() -> argparse.ArgumentParser:
    d = BertBuildOptions()
    p = argparse.ArgumentParser(prog="eet build bert", description=build_bert.__doc__,
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
    p.add_argument("--plain-baseline", action="store_true", help="also build the plain export (padded batch, "
                   "no EET rewrite) as plain.plan, the baseline `eet bench` compares with")
    p.add_argument("--verbose", action="store_true", help="TensorRT's verbose log")
    return p


def main(argv: list[str] | None = None) -> int:
    """``eet build bert ...``"""
    argv = list(argv or [])
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: eet build {bert,gpt2} [options]   (`eet build bert --help`, `eet build gpt2 --help`)")
        return 0 if argv else 2
    family, rest = argv[0], argv[1:]
    if family == "gpt2":
        build_gpt2(Gpt2BuildOptions(**vars(gpt2_parser().parse_args(rest))))
    elif family == "bert":
        build_bert(BertBuildOptions(**vars(parser().parse_args(rest))))
    else:
        raise EetError(f"unknown model family {family!r}: use `eet build bert` or `eet build gpt2`")
    return 0
