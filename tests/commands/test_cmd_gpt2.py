"""`eet build gpt2` and `eet check` end to end, and the clear errors for bad input."""
import json

import pytest

from eet.cli import main
from eet.commands.build import Gpt2BuildOptions
from eet.errors import EetError

SIZES = ["--max-batch", "4", "--max-prompt", "32", "--max-len", "64"]


@pytest.fixture(scope="module")
def two_layer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    (folder / "config.json").write_text(json.dumps(dict(model_type="gpt2", vocab_size=500, n_embd=128, n_layer=2,
                                                        n_head=2, n_positions=128, initializer_range=0.1)))
    out = folder / "engine"
    stale = out / "runtime_cache" / "0123456789abcdef-sm90.bin"  # kernels of a plan built here before
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old kernels")
    assert main(["build", "gpt2", "--config", str(folder / "config.json"), "--out", str(out), "--dtype", "fp32",
                 *SIZES]) == 0
    return out


def test_build_writes_two_profiles(two_layer):
    info = json.loads((two_layer / "engine.json").read_text())
    assert info["family"] == "gpt2" and [p["name"] for p in info["profiles"]] == ["context", "decode"]
    assert info["plugins"][0] == {"name": "EetPrePadAttention", "version": "2", "namespace": "eet", "layers": 2}
    context, decode = (p["shapes"] for p in info["profiles"])
    assert context["input_ids"]["max"] == [4, 32] and decode["input_ids"]["max"] == [4, 1]
    assert context["past_key.1"]["max"] == [4, 2, 64, 64]
    assert info["generation"]["max_len"] == 64
    assert {o["name"] for o in info["io"]["outputs"]} == {"next_token", "logits"}
    assert not (two_layer / "runtime_cache").exists()  # a new plan drops the kernels compiled for the old one


def test_check_passes(two_layer, capsys):
    assert main(["check", str(two_layer), "--batch", "4", "--max-len", "20", "--new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and out.count("100.0%") == 4
    # on a machine that cannot execute the engine (CI), the check says so and checks the graph instead
    assert "the TensorRT engine was executed on the GPU" in out or "the engine cannot be executed here" in out


def test_check_catches_broken_pad_handling(two_layer, tmp_path, capsys):
    """Positions that ignore the left padding (pads fed as 0 to the position computation) must fail."""
    import shutil

    import onnx

    broken = tmp_path / "broken"
    shutil.copytree(two_layer, broken)
    model = onnx.load(str(broken / "model.onnx"))
    node = next(n for n in model.graph.node if n.name == "pads_to_int64")
    zero = onnx.helper.make_node("Mul", [node.output[0], "zero_pads"], ["pads_zeroed"], name="zero_pads_mul")
    model.graph.initializer.append(onnx.numpy_helper.from_array(__import__("numpy").array(0, "int64"), "zero_pads"))
    for other in model.graph.node:
        if other.name == "pads_column":
            other.input[0] = "pads_zeroed"
    model.graph.node.insert(list(model.graph.node).index(node) + 1, zero)
    onnx.save(model, str(broken / "model.onnx"))
    assert main(["check", str(broken), "--batch", "4", "--max-len", "20", "--new-tokens", "6"]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.slow
def test_default_small_build_and_check(tmp_path, capsys):
    out = tmp_path / "small"
    assert main(["build", "gpt2", "--out", str(out), "--max-batch", "4", "--max-prompt", "32", "--max-len",
                 "64"]) == 0
    info = json.loads((out / "engine.json").read_text())
    assert info["model"]["source"] == {"kind": "preset", "name": "small", "seed": 0}
    assert info["model"]["num_layers"] == 12 and info["plugins"][0]["layers"] == 12
    assert main(["check", str(out), "--batch", "3", "--max-len", "16", "--new-tokens", "4"]) == 0
    assert "FAIL" not in capsys.readouterr().out


@pytest.mark.slow
def test_medium_fp32_build_and_check(tmp_path, capsys):
    out = tmp_path / "medium"
    assert main(["build", "gpt2", "--config", "medium", "--dtype", "fp32", "--out", str(out), *SIZES]) == 0
    assert json.loads((out / "engine.json").read_text())["plugins"][0]["layers"] == 24
    assert main(["check", str(out), "--batch", "3", "--max-len", "16", "--new-tokens", "4"]) == 0
    assert "FAIL" not in capsys.readouterr().out


@pytest.mark.parametrize("changes,message", [
    (dict(max_batch=0), "--max-batch must be positive"),
    (dict(max_prompt=64, max_len=64), "leaves no room to generate"),
    (dict(dtype="int8"), "fp16 or fp32"),
])
def test_bad_sizes(changes, message):
    with pytest.raises(EetError, match=message):
        Gpt2BuildOptions(**changes).validate()


def test_max_len_beyond_positions():
    with pytest.raises(EetError, match="n_positions 1024"):
        Gpt2BuildOptions(max_len=2048).validate(max_positions=1024)


def test_bert_directory_given_to_build_gpt2(tmp_path, capsys):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "bert" / "model.safetensors").write_bytes(b"")
    assert main(["build", "gpt2", "--model", str(tmp_path / "bert"), "--out", str(tmp_path / "o")]) == 2
    assert "not GPT-2; use `eet build bert`" in capsys.readouterr().err


def test_build_with_sampling(tmp_path):
    """The sampling head (TopK, CumSum, GatherElements) parses and builds; its inputs get profile shapes."""
    (tmp_path / "config.json").write_text(json.dumps(dict(model_type="gpt2", vocab_size=500, n_embd=128, n_layer=2,
                                                          n_head=2, n_positions=128)))
    out = tmp_path / "engine"
    assert main(["build", "gpt2", "--config", str(tmp_path / "config.json"), "--out", str(out),
                 "--sample-candidates", "64", *SIZES]) == 0
    info = json.loads((out / "engine.json").read_text())
    assert info["generation"]["sample_candidates"] == 64
    assert [i["name"] for i in info["io"]["inputs"]][-4:] == ["temperature", "top_k", "top_p", "uniform"]
    assert info["profiles"][1]["shapes"]["uniform"]["max"] == [4]


@pytest.mark.parametrize("candidates,message", [(-1, "between 0"), (5000, "between 0")])
def test_bad_sample_candidates(candidates, message):
    with pytest.raises(EetError, match=message):
        Gpt2BuildOptions(sample_candidates=candidates).validate()
    with pytest.raises(EetError, match="exceeds the vocabulary"):
        Gpt2BuildOptions(sample_candidates=600).validate(vocab_size=500)


def test_build_with_plain_baseline(tmp_path):
    """--plain-baseline also builds the decode step of the plain export (KV cache in and out, no EET plugin)
    in the engine's precision: plain.onnx has no EET node and fp16 caches, plain.plan is written."""
    import onnx

    (tmp_path / "config.json").write_text(json.dumps(dict(model_type="gpt2", vocab_size=500, n_embd=128, n_layer=2,
                                                          n_head=2, n_positions=128)))
    out = tmp_path / "engine"
    assert main(["build", "gpt2", "--config", str(tmp_path / "config.json"), "--out", str(out), "--dtype", "fp16",
                 "--plain-baseline", *SIZES]) == 0
    plain = onnx.load(str(out / "plain.onnx"))
    inputs = {i.name: i.type.tensor_type.elem_type for i in plain.graph.input}
    assert inputs["past_key.1"] == onnx.TensorProto.FLOAT16 and inputs["input_ids"] == onnx.TensorProto.INT64
    assert [o.name for o in plain.graph.output] == ["logits", "present_key.0", "present_value.0", "present_key.1",
                                                    "present_value.1"]
    assert not any(n.domain == "eet" for n in plain.graph.node)
    assert (out / "plain.plan").stat().st_size > 0 and not list(out.glob("plain-export*"))
