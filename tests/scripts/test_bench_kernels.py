"""CPU checks of scripts/bench_kernels.py: it imports without torch/triton work at import time, parses
its options, counts FLOPs and bytes as the issue defines them, and fails clearly without a GPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_kernels.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_kernels"] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop("bench_kernels", None)
    return module


def test_cases_are_the_issue_shapes(bench):
    c = bench.CASES
    assert [(x.kind, x.batch, x.heads, x.lo, x.hi, x.max_len, x.head_dim) for x in c.values()] == [
        ("varlen", 32, 12, 32, 512, 0, 64),
        ("varlen", 64, 16, 16, 256, 0, 64),
        ("varlen", 8, 16, 128, 2048, 0, 64),
        ("decode", 32, 12, 0, 512, 1024, 64),
        ("decode", 32, 12, 0, 2048, 4096, 64),
        ("decode", 128, 12, 0, 256, 512, 64),
        ("context", 32, 12, 16, 512, 0, 64),
    ]


def test_parse_args_defaults(bench):
    args = bench.parse_args([])
    assert args.dtype == "fp16" and args.json is None and args.seed == 0
    assert [c.name for c in args.case_list] == list(bench.CASES)


def test_parse_args_options(bench, tmp_path):
    out = tmp_path / "r.json"
    args = bench.parse_args(["--cases", "decode-1k, varlen-b8", "--dtype", "fp32", "--json", str(out),
                             "--seed", "7"])
    assert [c.name for c in args.case_list] == ["decode-1k", "varlen-b8"]
    assert args.dtype == "fp32" and args.json == str(out) and args.seed == 7


@pytest.mark.parametrize("argv", [["--cases", "nope"], ["--cases", ","], ["--dtype", "bf16"]])
def test_parse_args_rejects(bench, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_attention_flops(bench):
    # 4 * sum(len^2) * H * D bidirectional, half of it causal
    assert bench.attention_flops([1, 2, 3], heads=2, head_dim=64, causal=False) == 4 * 14 * 2 * 64
    assert bench.attention_flops([1, 2, 3], heads=2, head_dim=64, causal=True) == 2 * 14 * 2 * 64
    assert bench.attention_flops([], heads=12, head_dim=64, causal=False) == 0


def test_decode_kv_bytes(bench):
    # keys [pad, step]: 10 - 0 + 1 = 11, 11 - 4 = 7, pad past the step: 0, negative pad counts as 0
    assert bench.decode_kv_bytes([0, 4, 12, -3], step=10, heads=3, head_dim=64, elem_bytes=2) == (
        2 * (11 + 7 + 0 + 11) * 3 * 64 * 2)
    assert bench.decode_kv_bytes([5], step=5, heads=1, head_dim=32, elem_bytes=4) == 2 * 1 * 32 * 4


def test_copy_bandwidth_and_gemm(bench):
    assert bench.copy_bandwidth(1 << 30, 1.0) == 2.0 * (1 << 30)  # read + write
    assert bench.gemm_flops(8192) == 2.0 * 8192**3


def test_draw_lengths_fixed_and_in_range(bench):
    for case in bench.CASES.values():
        a, b = bench.draw_lengths(case, 0), bench.draw_lengths(case, 0)
        assert a == b and len(a) == case.batch
        if case.kind == "decode":
            assert all(case.lo <= x < case.hi for x in a)
        else:
            assert all(case.lo <= x <= case.hi for x in a)
    case = bench.CASES["varlen-b32"]
    assert bench.draw_lengths(case, 0) != bench.draw_lengths(case, 1)


def test_markdown_table(bench):
    row = {"case": "decode-1k", "ours_ms": 0.0301, "baselines": {"sdpa-cudnn": 0.0595, "sdpa-flash": "n/a (mask)"},
           "speedup": "1.98x", "tflops": "-", "bandwidth": "2500 (83.0%)", "diff": "1e-03"}
    table = bench.markdown_table([row], ["sdpa-flash", "sdpa-cudnn"]).splitlines()
    assert table[0].startswith("| case | ours (us) | sdpa-flash (us) | sdpa-cudnn (us) |")
    assert table[2] == "| decode-1k | 30.1 | n/a (mask) | 59.5 | 1.98x | - | 2500 (83.0%) | - | 1e-03 |"
    row["back_to_back"] = "28.0 us, 2896 (96.0%)"
    assert bench.markdown_table([row], ["sdpa-cudnn"]).splitlines()[2] == (
        "| decode-1k | 30.1 | 59.5 | 1.98x | - | 2500 (83.0%) | 28.0 us, 2896 (96.0%) | 1e-03 |")


def test_main_without_gpu_is_a_clear_error(bench, capsys):
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert bench.main(["--cases", "decode-1k"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: bench_kernels.py needs")


def test_rejection_reason(bench):
    msgs = ["Memory efficient kernel not used because: (Triggered internally at /pytorch/aten/x.cpp:1.)",
            "Flash attention does not support non-null attn_mask. (Triggered internally at /pytorch/y.cpp:2.)"]
    err = RuntimeError("No available kernel. Aborting execution.")
    assert bench.rejection_reason(msgs, err, "flash") == "Flash attention does not support non-null attn_mask."
    assert bench.rejection_reason(msgs, err, "cudnn") == "Memory efficient kernel not used because:"
    assert bench.rejection_reason([], err) == "RuntimeError: No available kernel. Aborting execution."
    torch_order = ["Flash attention kernel not used because: (Triggered internally at /pytorch/a.cpp:3.)", msgs[1]]
    assert bench.rejection_reason(torch_order, err, "flash") == (
        "Flash attention kernel not used because: Flash attention does not support non-null attn_mask.")


def test_engine_option_and_table(bench):
    assert bench.parse_args([]).engine is False and bench.parse_args(["--engine"]).engine is True
    rows = [{"case": "decode-1k", "ours_ms": 0.0363},  # no engine timing: no line
            {"case": "varlen-b32", "ours_ms": 0.0697,
             "engine": {"engine_ms": 0.0707, "graph_ms": 0.0706, "diff": 4.8e-4, "host_launcher_us": 4.1,
                        "host_engine_us": 48.6, "host_graph_us": 2.2}}]
    lines = bench.engine_table(rows).splitlines()
    assert len(lines) == 3 and lines[2] == "| varlen-b32 | 69.7 | 70.7 | 70.6 | 4.1 / 48.6 / 2.2 | 0.00048 |"
