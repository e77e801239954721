"""`eet run`, `eet bench` and `eet check --engine` on a machine that cannot execute engines (CI: no GPU, no
PyCUDA): clear errors, and the check falls back to the reference path and says so. Their GPU behaviour is in
test_cmd_gpu.py."""
import numpy as np
import pytest

from eet.cli import main
from eet.commands import bench, run
from eet.errors import EetError


def cuda_runtime_available() -> bool:
    try:
        import pycuda.driver as cuda

        cuda.init()
        return cuda.Device.count() > 0
    except Exception:
        return False


needs_no_gpu = pytest.mark.skipif(cuda_runtime_available(), reason="this machine can execute engines")


@needs_no_gpu
@pytest.mark.parametrize("command", [["run", "--random", "2"], ["bench", "--iters", "2"],
                                     ["check", "--engine", "yes"], ["warm"]])
def test_commands_that_need_the_engine_fail_clearly(sidecar_only_gpt2, command, capsys):
    argv = [command[0], str(sidecar_only_gpt2), *command[1:]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and ("PyCUDA" in err or "kernel library" in err or "GPU" in err), err


def test_warm_needs_a_cache_file(sidecar_only_gpt2, capsys):
    """`eet warm` keeps what it compiles only in the runtime cache file: --runtime-cache none is refused before
    anything loads; `eet --help` lists the command."""
    assert main(["warm", str(sidecar_only_gpt2), "--runtime-cache", "none"]) == 2
    assert "with --runtime-cache none they would be lost" in capsys.readouterr().err
    assert main(["--help"]) == 0 and "warm DIR" in capsys.readouterr().out


def test_run_inputs_from_arguments():
    class Fake:
        family = "gpt2"

        class limits:
            max_prompt, vocab_size = 64, 100

    args = run.parser().parse_args(["d", "--ids", "1 2, 3", "--ids", "7"])
    assert run.inputs_from_args(args, Fake) == [[1, 2, 3], [7]]
    args = run.parser().parse_args(["d", "--random", "4", "--seed", "3"])
    batch = run.inputs_from_args(args, Fake)
    assert len(batch) == 4 and all(1 <= len(p) <= 32 and max(p) < 100 for p in batch)
    assert batch == run.inputs_from_args(args, Fake)  # seeded
    for argv, match in ((["d"], "exactly one of"), (["d", "--ids", "1", "--random", "2"], "exactly one of"),
                        (["d", "--ids", "1 x"], "space-separated integers"), (["d", "--ids", " "], "empty list")):
        with pytest.raises(EetError, match=match):
            run.inputs_from_args(run.parser().parse_args(argv), Fake)


def test_bench_table_and_median():
    rows = [{"case": "a", "ms": 2.0, "real_tokens_per_s": 1000.0, "speedup_vs_hf": 1.5},
            {"case": "b", "ms": 3.0, "speedup_vs_hf": 1.0}]
    text = bench.table(rows).splitlines()
    assert text[0] == "| case | time (ms) | real tokens/s | x Hugging Face |"
    assert text[2] == "| a | 2.000 | 1,000 | 1.50x |" and text[3] == "| b | 3.000 | - | 1.00x |"
    calls = []
    ticks = iter(np.arange(0, 100, 0.001))
    import time

    real = time.perf_counter
    try:
        time.perf_counter = lambda: float(next(ticks))
        ms = bench.median_ms(lambda: calls.append(1), iters=5, warmup=2, sync=lambda: None)
    finally:
        time.perf_counter = real
    assert len(calls) == 7 and ms == pytest.approx(1.0)
