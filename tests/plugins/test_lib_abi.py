"""CPU-only checks of the kernel library's C ABI and its ctypes binding (plugins/_lib.py).

The header checks need nothing built. The library checks need libeet_kernels.so (installed next to
eet/plugins/_lib.py, or named by $EET_KERNELS_LIB) and skip without it; they make no CUDA call, since
eet_varlen_attention and eet_prepad_attention validate their parameters before touching the CUDA
runtime, so they run without a GPU or driver.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEADER = REPO / "plugins" / "csrc" / "eet_attention.h"


from eet.plugins import _lib  # noqa: E402

SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 128)

# C type in the header -> ctypes type of the binding.
_C_TO_CTYPES = {
    "int64_t": ctypes.c_int64,
    "int32_t": ctypes.c_int32,
    "float": ctypes.c_float,
}


# Every parameter struct of the header and its ctypes mirror.
STRUCTS = {
    "EetVarlenAttentionParams": _lib.VarlenAttentionParams,
    "EetPrepadAttentionParams": _lib.PrepadAttentionParams,
}


def _header_struct_fields(struct):
    """[(name, c_type, is_pointer)] of the header's `typedef struct <struct> {...} <struct>;`, in
    declaration order (one declarator per declaration, as the header writes them)."""
    text = HEADER.read_text()
    name = re.escape(struct)
    match = re.search(rf"typedef\s+struct\s+{name}\s*\{{(.*?)\}}\s*{name}\s*;", text, re.S)
    assert match, f"{struct} not found in eet_attention.h"
    body = re.sub(r"//[^\n]*", "", match.group(1))
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    fields = []
    for decl in body.split(";"):
        decl = " ".join(decl.split())
        if not decl:
            continue
        m = re.fullmatch(r"(?:const\s+)?(\w+)\s*(\*?)\s*(\w+)", decl)
        assert m, f"unparsed field declaration: {decl!r}"
        fields.append((m.group(3), m.group(1), m.group(2) == "*"))
    return fields


def _expected_ctype(c_type, is_pointer):
    return ctypes.c_void_p if is_pointer else _C_TO_CTYPES[c_type]


def test_header_structs_are_all_mirrored():
    declared = set(re.findall(r"typedef\s+struct\s+(\w+)\s*\{", HEADER.read_text()))
    assert declared == set(STRUCTS)


@pytest.mark.parametrize("struct", sorted(STRUCTS))
def test_struct_fields_match_header(struct):
    header = _header_struct_fields(struct)
    binding = STRUCTS[struct]._fields_
    assert [name for name, *_ in header] == [name for name, _ in binding]
    for (name, c_type, is_pointer), (_, ctype) in zip(header, binding):
        assert ctype is _expected_ctype(c_type, is_pointer), (name, c_type, is_pointer, ctype)


@pytest.mark.parametrize(
    "struct, size",
    [
        # 5 pointers, 4 int64, 5 int32, 1 float, 1 int32 on an LP64 ABI: 100 bytes padded to 104.
        ("EetVarlenAttentionParams", 104),
        # 8 pointers, 4 int64, 5 int32, 1 float, 1 int32 (124 bytes, padded to 128), 1 pointer, 1 int64.
        ("EetPrepadAttentionParams", 144),
    ],
)
def test_struct_layout_is_natural(struct, size):
    mirror = STRUCTS[struct]
    offset = 0
    for name, c_type, is_pointer in _header_struct_fields(struct):
        ctype = _expected_ctype(c_type, is_pointer)
        field_size = ctypes.sizeof(ctype)
        offset = (offset + field_size - 1) // field_size * field_size
        assert getattr(mirror, name).offset == offset, name
        offset += field_size
    align = max(ctypes.alignment(t) for _, t in mirror._fields_)
    assert ctypes.sizeof(mirror) == (offset + align - 1) // align * align
    if ctypes.sizeof(ctypes.c_void_p) == 8:
        assert ctypes.sizeof(mirror) == size


def _cuda_include_dir():
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    for root in candidates:
        if root and (Path(root) / "include" / "cuda_runtime_api.h").is_file():
            return Path(root) / "include"
    return None


def test_struct_layout_matches_c_compiler(tmp_path):
    """offsetof/sizeof from a C compiler agree with ctypes (skipped without cc or CUDA headers)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    include = _cuda_include_dir()
    if cc is None or include is None:
        pytest.skip("needs a C compiler and the CUDA toolkit headers")
    body = ""
    for struct in STRUCTS:
        body += f'  printf("{struct}.sizeof %zu\\n", sizeof({struct}));\n'
        body += "".join(
            f'  printf("{struct}.{n} %zu\\n", offsetof({struct}, {n}));\n'
            for n, *_ in _header_struct_fields(struct)
        )
    src = tmp_path / "layout.c"
    src.write_text(
        "#include <stddef.h>\n#include <stdio.h>\n#include \"eet_attention.h\"\n"
        "int main(void) {\n"
        + body
        + '  printf("EET_DTYPE_FP32 %d\\nEET_DTYPE_FP16 %d\\n", (int)EET_DTYPE_FP32, '
        "(int)EET_DTYPE_FP16);\n"
        "  return 0;\n}\n"
    )
    exe = tmp_path / "layout"
    subprocess.run(
        [cc, "-std=c99", f"-I{HEADER.parent}", f"-I{include}", str(src), "-o", str(exe)],
        check=True,
        capture_output=True,
    )
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    values = dict(line.split() for line in out.splitlines())
    for struct, mirror in STRUCTS.items():
        assert int(values[f"{struct}.sizeof"]) == ctypes.sizeof(mirror), struct
        for name, *_ in _header_struct_fields(struct):
            assert int(values[f"{struct}.{name}"]) == getattr(mirror, name).offset, (struct, name)
    assert int(values["EET_DTYPE_FP32"]) == _lib.DTYPE_FP32
    assert int(values["EET_DTYPE_FP16"]) == _lib.DTYPE_FP16


def test_dtype_constants_match_header():
    text = HEADER.read_text()
    enum = dict(re.findall(r"\b(EET_DTYPE_\w+)\s*=\s*(\d+)", text))
    assert {k: int(v) for k, v in enum.items()} == {
        "EET_DTYPE_FP32": _lib.DTYPE_FP32,
        "EET_DTYPE_FP16": _lib.DTYPE_FP16,
    }


def test_missing_library_error_names_path_and_build(monkeypatch, tmp_path):
    missing = tmp_path / "nope" / "libeet_kernels.so"
    monkeypatch.setenv(_lib.ENV_VAR, str(missing))
    monkeypatch.setattr(_lib, "_lib", None)
    with pytest.raises(RuntimeError) as info:
        _lib.load_library()
    assert str(missing) in str(info.value)
    assert "pip install ." in str(info.value)


def test_cuda_error_name():
    assert _lib.cuda_error_name(1) == "cudaErrorInvalidValue"
    assert _lib.cuda_error_name(123456) == "cudaError(123456)"


# --- with the built library (no GPU needed) -----------------------------------------------------


@pytest.fixture(scope="module")
def lib():
    try:
        return _lib.load_library()
    except RuntimeError as exc:
        pytest.skip(f"libeet_kernels.so not available: {exc}")


def _params(**overrides):
    fields = dict(
        dtype=_lib.DTYPE_FP16,
        num_heads=12,
        head_dim=64,
        batch=2,
        max_seqlen=128,
        total_tokens=100,
        # Dummy non-null "pointers": validation fails before anything would dereference them.
        q=0x1000,
        k=0x2000,
        v=0x3000,
        out=0x4000,
        cu_seqlens=0x5000,
    )
    fields.update(overrides)
    return _lib.make_varlen_params(**fields)


def test_abi_version(lib):
    assert _lib.abi_version() == 3 == _lib.ABI_VERSION
    assert lib.eet_abi_version() == 3


def test_supported_table(lib):
    for dtype in (_lib.DTYPE_FP32, _lib.DTYPE_FP16):
        for head_dim in SUPPORTED_HEAD_DIMS:
            assert _lib.supported(dtype, head_dim), (dtype, head_dim)
        for head_dim in (0, -64, 16, 48, 63, 65, 112, 256):
            assert not _lib.supported(dtype, head_dim), (dtype, head_dim)
    for head_dim in SUPPORTED_HEAD_DIMS:
        assert not _lib.supported(7, head_dim)
        assert not _lib.supported(-1, head_dim)


def _call_raw(lib, params):
    rc = lib.eet_varlen_attention(ctypes.byref(params), None)
    return rc, _lib.last_error_message()


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(head_dim=48), ["head_dim", "48", "32, 64, 80, 96, 128"]),
        (dict(head_dim=256, dtype=_lib.DTYPE_FP32), ["head_dim", "256", "fp32"]),
        (dict(dtype=7), ["dtype", "7", "fp16"]),
        (dict(batch=0), ["batch"]),
        (dict(num_heads=0), ["num_heads"]),
        (dict(max_seqlen=0), ["max_seqlen"]),
        (dict(total_tokens=-1), ["total_tokens"]),
        (dict(scale=float("inf")), ["scale"]),
        (dict(q_row_stride=12 * 64 - 1), ["q_row_stride", "767", "768"]),
        (dict(k_row_stride=0), ["k_row_stride"]),
        (dict(v_row_stride=5), ["v_row_stride"]),
        (dict(out_row_stride=100), ["out_row_stride"]),
        (dict(q=None), ["q is NULL"]),
        (dict(k=None), ["k is NULL"]),
        (dict(v=None), ["v is NULL"]),
        (dict(out=None), ["out is NULL"]),
        (dict(cu_seqlens=None), ["cu_seqlens is NULL"]),
    ],
)
def test_invalid_params_are_rejected_before_any_cuda_call(lib, overrides, words):
    rc, message = _call_raw(lib, _params(**overrides))
    assert rc == _lib.CUDA_ERROR_INVALID_VALUE == 1
    for word in words:
        assert word in message, (word, message)
    with pytest.raises(RuntimeError) as info:
        _lib.varlen_attention(_params(**overrides), 0)
    text = str(info.value)
    assert text.startswith("eet_varlen_attention: cudaErrorInvalidValue: ")
    assert message in text


def test_unsupported_head_dim_with_null_pointers(lib):
    params = _params(head_dim=48, q=None, k=None, v=None, out=None, cu_seqlens=None)
    rc, message = _call_raw(lib, params)
    assert rc == 1
    assert "head_dim" in message


def test_null_params(lib):
    assert lib.eet_varlen_attention(None, None) == 1
    assert "params" in _lib.last_error_message()


def test_zero_tokens_is_a_no_op(lib):
    # Nothing is launched, so this succeeds without a GPU; empty tensors may have NULL pointers.
    params = _params(total_tokens=0, q=None, k=None, v=None, out=None, cu_seqlens=None)
    assert _call_raw(lib, params) == (0, "")
    _lib.varlen_attention(params, 0)


def test_message_is_reset_by_the_next_call(lib):
    assert _call_raw(lib, _params(head_dim=48))[0] == 1
    assert _lib.last_error_message() != ""
    assert _call_raw(lib, _params(total_tokens=0))[0] == 0
    assert _lib.last_error_message() == ""


def test_params_can_be_reused_with_new_pointers(lib):
    params = _params(head_dim=48)
    for ptr in (0x10, 0x20):
        params.q = ptr
        assert params.q == ptr
        with pytest.raises(RuntimeError, match="head_dim"):
            _lib.varlen_attention(params, 0)


# --- eet_prepad_attention (no GPU needed either) --------------------------------------------------


def _prepad_params(**overrides):
    fields = dict(
        dtype=_lib.DTYPE_FP16,
        num_heads=12,
        head_dim=64,
        batch=2,
        seq=16,
        max_len=128,
        # Dummy non-null "pointers": validation fails before anything would dereference them.
        q=0x1000,
        k=0x2000,
        v=0x3000,
        out=0x4000,
        k_cache=0x5000,
        v_cache=0x6000,
        pad_lengths=0x7000,
        step=0x8000,
    )
    fields.update(overrides)
    return _lib.make_prepad_params(**fields)


def _prepad_raw(lib, params):
    rc = lib.eet_prepad_attention(ctypes.byref(params), None)
    return rc, _lib.last_error_message()


def test_prepad_supported_table(lib):
    for dtype in (_lib.DTYPE_FP32, _lib.DTYPE_FP16):
        for head_dim in SUPPORTED_HEAD_DIMS:
            assert _lib.prepad_supported(dtype, head_dim), (dtype, head_dim)
        for head_dim in (0, -64, 16, 48, 63, 65, 112, 256):
            assert not _lib.prepad_supported(dtype, head_dim), (dtype, head_dim)
    for head_dim in SUPPORTED_HEAD_DIMS:
        assert not _lib.prepad_supported(7, head_dim)
        assert not _lib.prepad_supported(-1, head_dim)


def test_workspace_size_agrees_with_the_library(lib):
    """The plugin sizes its TensorRT workspace with the Python formula (no library at build time)."""
    for batch, heads, head_dim in ((1, 1, 32), (32, 12, 64), (7, 3, 80), (128, 25, 128), (0, 12, 64), (4, -1, 64)):
        assert _lib.prepad_workspace_size(batch, heads, head_dim) == \
            lib.eet_prepad_attention_workspace_size(batch, heads, head_dim), (batch, heads, head_dim)


def test_make_prepad_params_defaults():
    p = _lib.make_prepad_params(dtype=_lib.DTYPE_FP32, num_heads=12, head_dim=64)
    assert (p.q_row_stride, p.k_row_stride, p.v_row_stride, p.out_row_stride) == (768,) * 4
    assert (p.batch, p.seq, p.max_len) == (1, 1, 1)
    assert p.scale == pytest.approx(0.125)
    assert p.q is None and p.step is None and p.pad_lengths is None
    assert p.workspace is None and p.workspace_bytes == 0


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(head_dim=48), ["head_dim", "48", "32, 64, 80, 96, 128"]),
        (dict(head_dim=256, dtype=_lib.DTYPE_FP32), ["head_dim", "256", "fp32"]),
        (dict(dtype=7), ["dtype", "7", "fp16"]),
        (dict(batch=0), ["batch"]),
        (dict(num_heads=0), ["num_heads"]),
        (dict(num_heads=65536), ["num_heads", "65535"]),
        (dict(max_len=0), ["max_len"]),
        (dict(seq=-1), ["seq", "-1"]),
        (dict(seq=129), ["seq", "129", "max_len", "128"]),
        (dict(scale=float("inf")), ["scale"]),
        (dict(scale=float("nan")), ["scale"]),
        (dict(q_row_stride=12 * 64 - 1), ["q_row_stride", "767", "768"]),
        (dict(k_row_stride=0), ["k_row_stride"]),
        (dict(v_row_stride=5), ["v_row_stride"]),
        (dict(out_row_stride=100), ["out_row_stride"]),
        (dict(q_row_stride=2**62), ["q_row_stride", "overflow"]),
        (dict(batch=2**30, num_heads=2**15, max_len=2**30, seq=1), ["caches", "overflow"]),
        (dict(q=None), ["q is NULL"]),
        (dict(k=None), ["k is NULL"]),
        (dict(v=None), ["v is NULL"]),
        (dict(out=None), ["out is NULL"]),
        (dict(k_cache=None), ["k_cache is NULL"]),
        (dict(v_cache=None), ["v_cache is NULL"]),
        (dict(pad_lengths=None), ["pad_lengths is NULL"]),
        (dict(step=None), ["step is NULL"]),
        (dict(workspace=0x1008, workspace_bytes=1 << 20), ["workspace", "16-byte aligned"]),
        (dict(workspace=0x1000, workspace_bytes=-1), ["workspace_bytes", "-1"]),
    ],
)
def test_prepad_invalid_params_are_rejected_before_any_cuda_call(lib, overrides, words):
    rc, message = _prepad_raw(lib, _prepad_params(**overrides))
    assert rc == _lib.CUDA_ERROR_INVALID_VALUE == 1
    for word in words:
        assert word in message, (word, message)
    with pytest.raises(RuntimeError) as info:
        _lib.prepad_attention(_prepad_params(**overrides), 0)
    text = str(info.value)
    assert text.startswith("eet_prepad_attention: cudaErrorInvalidValue: ")
    assert message in text


def test_prepad_unsupported_head_dim_with_null_pointers(lib):
    nulls = dict(q=None, k=None, v=None, out=None, k_cache=None, v_cache=None, pad_lengths=None,
                 step=None)
    rc, message = _prepad_raw(lib, _prepad_params(head_dim=48, **nulls))
    assert rc == 1
    assert "head_dim" in message and "48" in message


def test_prepad_null_params(lib):
    assert lib.eet_prepad_attention(None, None) == 1
    assert "params" in _lib.last_error_message()


def test_prepad_zero_seq_is_a_no_op(lib):
    # Nothing is launched, so this succeeds without a GPU; empty tensors may have NULL pointers.
    params = _prepad_params(seq=0, q=None, k=None, v=None, out=None, k_cache=None, v_cache=None,
                            pad_lengths=None, step=None)
    assert _prepad_raw(lib, params) == (0, "")
    _lib.prepad_attention(params, 0)


def test_message_is_shared_and_reset_by_either_launcher(lib):
    # One thread-local message: each launcher resets it on entry and sets it on failure.
    assert _prepad_raw(lib, _prepad_params(head_dim=48))[0] == 1
    assert "head_dim" in _lib.last_error_message()
    assert _call_raw(lib, _params(total_tokens=0))[0] == 0
    assert _lib.last_error_message() == ""
    assert _call_raw(lib, _params(head_dim=48))[0] == 1
    assert "head_dim" in _lib.last_error_message()
    assert _prepad_raw(lib, _prepad_params(seq=0))[0] == 0
    assert _lib.last_error_message() == ""


def test_prepad_params_can_be_reused_with_new_pointers(lib):
    params = _prepad_params(head_dim=48)
    for ptr in (0x10, 0x20):
        params.step = ptr
        assert params.step == ptr
        with pytest.raises(RuntimeError, match="head_dim"):
            _lib.prepad_attention(params, 0)
