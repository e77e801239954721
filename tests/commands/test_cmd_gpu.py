"""`eet check` executing the engine, `eet run` and `eet bench`, on a GPU.

On an H100/H200 with TensorRT-RTX the plans are deserialized through the test shim (EET_CC_SHIM, see
tests/conftest.py), handed to the commands' ``deserialize_hook`` seam."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import GPU_CONFIGS, build_like_cpu, skip_unless_engine_gpu

pytestmark = pytest.mark.gpu
skip_unless_engine_gpu()
pytest.importorskip("pycuda")

BERT = GPU_CONFIGS["bert"]
CPU_ONLY = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # build like a CPU-only machine


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmd")
    sizes = {"bert": ["--max-batch", "8", "--max-tokens", "2048", "--max-seq", "256", "--plain-baseline"],
             "gpt2": ["--max-batch", "8", "--max-prompt", "64", "--max-len", "128"]}
    return {(family, dtype): build_like_cpu(root, family, dtype, *extra) for family, extra in sizes.items()
            for dtype in ("fp32", "fp16")}


@pytest.mark.parametrize("family", ["bert", "gpt2"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_check_executes_the_engine(engines, family, dtype, deserialize_hook, capsys):
    from eet.commands import check

    code = check.main([str(engines[family, dtype]), "--engine", "yes"], deserialize_hook=deserialize_hook)
    text = capsys.readouterr().out
    print(text)
    assert code == 0 and "the TensorRT engine was executed on the GPU" in text and "FAIL" not in text


def test_check_fails_on_a_broken_engine(engines, tmp_path, deserialize_hook, capsys):
    """A wrong softmax scale in one plugin node, rebuilt into the plan, turns the engine check red."""
    import onnx

    from eet.commands import check
    from eet.runtime import sidecar

    broken = tmp_path / "broken"
    shutil.copytree(engines["bert", "fp32"], broken)
    model = onnx.load(str(broken / "model.onnx"))
    node = next(n for n in model.graph.node if n.op_type == "EetVarlenAttention")
    next(a for a in node.attribute if a.name == "scale").f *= 1.5
    onnx.save(model, str(broken / "model.onnx"))
    info = json.loads((broken / "engine.json").read_text())
    code = ("import sys, json; from eet.commands.build import bert_profiles, BertBuildOptions; "
            "from eet.runtime.build import build_engine; o = BertBuildOptions(**json.loads(sys.argv[2])); "
            "open(sys.argv[1] + '/engine.plan', 'wb').write(build_engine(sys.argv[1] + '/model.onnx', "
            "bert_profiles(o)).plan)")
    options = {k: v for k, v in info["build"].items() if k != "export_opset"}
    subprocess.run([sys.executable, "-c", code, str(broken), json.dumps(options)], check=True, env=CPU_ONLY)
    info["plan_sha256"] = sidecar.sha256_file(broken / "engine.plan")
    (broken / "engine.json").write_text(json.dumps(info))
    assert check.main([str(broken), "--engine", "yes"], deserialize_hook=deserialize_hook) == 1
    assert "FAIL" in capsys.readouterr().out


def test_run_command(engines, deserialize_hook, capsys, tmp_path):
    import numpy as np

    from eet.commands import run

    assert run.main([str(engines["bert", "fp16"]), "--random", "5", "--save", str(tmp_path / "o.npz")],
                    deserialize_hook=deserialize_hook) == 0
    saved = np.load(tmp_path / "o.npz")
    assert saved["first_token"].shape == (5, BERT["hidden_size"]) and np.isfinite(saved["first_token"]).all()
    assert run.main([str(engines["gpt2", "fp16"]), "--ids", "5 6 7", "--ids", "9", "--max-new-tokens", "6",
                     "--eos", "-1"], deserialize_hook=deserialize_hook) == 0
    text = capsys.readouterr().out
    print(text)
    assert "[0] [" in text and "[1] [" in text and "12 new tokens in 6 steps" in text


def test_bench_command(engines, deserialize_hook, capsys, tmp_path):
    from eet.commands import bench

    assert bench.main([str(engines["bert", "fp16"]), "--batch", "8", "--max-len", "256", "--iters", "10",
                       "--json", str(tmp_path / "b.json")], deserialize_hook=deserialize_hook) == 0
    rows = json.loads((tmp_path / "b.json").read_text())
    assert {r["case"].split(" (")[0] for r in rows} >= {
        "EET engine", "plain TensorRT engine", "EET encode() end to end", "EET encode(output='torch') end to end",
        "Hugging Face end to end"}
    assert all(r["ms"] > 0 for r in rows)
    assert bench.main([str(engines["gpt2", "fp16"]), "--batch", "8", "--max-len", "64", "--past", "64",
                       "--new-tokens", "16", "--iters", "10"], deserialize_hook=deserialize_hook) == 0
    print(capsys.readouterr().out)


def test_warm_command(engines, deserialize_hook, capsys, tmp_path):
    """`eet warm DIR` runs every shape bucket (GPT-2 --max-batch 8, --max-prompt 64: rows 1, 2, 4, 8 at width
    64, a decode step each) and writes DIR/runtime_cache/; run again, it reads that file, which then keeps its
    size (TensorRT-RTX's serialization of a read-back cache differs from the file in a byte, not in content)."""
    from eet.commands import warm

    folder = tmp_path / "gpt2"
    shutil.copytree(engines["gpt2", "fp16"], folder)
    shutil.rmtree(folder / "runtime_cache", ignore_errors=True)
    assert warm.main([str(folder)], deserialize_hook=deserialize_hook) == 0
    text = capsys.readouterr().out
    print(text)
    files = list((folder / "runtime_cache").iterdir())
    assert "none yet" in text and len(files) == 1 and f"{files[0].stat().st_size:,} B after the warm-up (0 B" in text
    assert [line.split(":")[0] for line in text.splitlines() if line.startswith("  ")] == [
        f"  {profile} {rows} x {width}" for rows in (1, 2, 4, 8) for profile, width in (("context", 64), ("decode", 1))]
    assert warm.main([str(folder)], deserialize_hook=deserialize_hook) == 0
    text = capsys.readouterr().out
    print(text)
    size = files[0].stat().st_size
    assert f"read {size:,} B" in text and f"{size:,} B after the warm-up ({size:,} B before)" in text
