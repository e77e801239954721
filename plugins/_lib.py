"""ctypes binding of libeet_kernels.so, the C ABI of ``plugins/csrc/eet_attention.h``.

The library is loaded lazily (first use), from ``$EET_KERNELS_LIB`` when that is set, else from
``libeet_kernels.so`` next to this file (where ``pip install .`` puts it: ``eet/plugins/``).

This module imports neither torch nor tensorrt: pointers and streams are plain integers
(``tensor.data_ptr()``, ``torch.cuda.current_stream().cuda_stream``).

Hot path (a TensorRT plugin's enqueue): build one :class:`VarlenAttentionParams` up front, update its
pointer fields (``q``, ``k``, ``v``, ``out``, ``cu_seqlens``) and ``total_tokens`` per call, and call
:func:`varlen_attention`::

    params = make_varlen_params(dtype=DTYPE_FP16, num_heads=12, head_dim=64, ...)
    ...
    params.q, params.out = q_ptr, out_ptr
    varlen_attention(params, stream)

Pre-padding attention with a KV cache (GPT-2 generation) works the same way with
:class:`PrepadAttentionParams`, :func:`make_prepad_params` and :func:`prepad_attention`; the step is a
device ``int32`` (``params.step``), so one params object (or a captured CUDA graph) serves every decode
step::

    params = make_prepad_params(dtype=DTYPE_FP16, num_heads=12, head_dim=64, batch=8, seq=1,
                                max_len=1024, k_cache=..., v_cache=..., pad_lengths=..., step=...)
    params.q, params.k, params.v, params.out = q_ptr, k_ptr, v_ptr, out_ptr
    prepad_attention(params, stream)
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import threading
from pathlib import Path

__all__ = [
    "ABI_VERSION",
    "DTYPE_FP16",
    "DTYPE_FP32",
    "ENV_VAR",
    "LIBRARY_NAME",
    "PrepadAttentionParams",
    "VarlenAttentionParams",
    "abi_version",
    "cuda_error_name",
    "last_error_message",
    "library_path",
    "load_library",
    "make_prepad_params",
    "make_varlen_params",
    "prepad_attention",
    "prepad_supported",
    "prepad_workspace_size",
    "supported",
    "varlen_attention",
]

ABI_VERSION = 3  # eet_abi_version() this binding is written for (3: the decode workspace)
LIBRARY_NAME = "libeet_kernels.so"
ENV_VAR = "EET_KERNELS_LIB"

# EetDtype
DTYPE_FP32 = 0
DTYPE_FP16 = 1

CUDA_ERROR_INVALID_VALUE = 1


class VarlenAttentionParams(ctypes.Structure):
    """Field-for-field mirror of ``EetVarlenAttentionParams`` (same order, same types).

    Pointers are ``c_void_p`` (ABI-identical to the C pointer types) so that integers from
    ``tensor.data_ptr()`` can be assigned directly. Strides are in elements.
    """

    _fields_ = [
        ("q", ctypes.c_void_p),
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("cu_seqlens", ctypes.c_void_p),  # const int32_t*
        ("q_row_stride", ctypes.c_int64),
        ("k_row_stride", ctypes.c_int64),
        ("v_row_stride", ctypes.c_int64),
        ("out_row_stride", ctypes.c_int64),
        ("batch", ctypes.c_int32),
        ("num_heads", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
        ("max_seqlen", ctypes.c_int32),
        ("total_tokens", ctypes.c_int32),
        ("scale", ctypes.c_float),
        ("dtype", ctypes.c_int32),
    ]


class PrepadAttentionParams(ctypes.Structure):
    """Field-for-field mirror of ``EetPrepadAttentionParams`` (same order, same types).

    Pointers are ``c_void_p``; strides are in elements. ``pad_lengths`` ([batch] int32) and ``step``
    ([1] int32) are device pointers: the kernels read them on the GPU.
    """

    _fields_ = [
        ("q", ctypes.c_void_p),
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("k_cache", ctypes.c_void_p),
        ("v_cache", ctypes.c_void_p),
        ("pad_lengths", ctypes.c_void_p),  # const int32_t*
        ("step", ctypes.c_void_p),  # const int32_t*
        ("q_row_stride", ctypes.c_int64),
        ("k_row_stride", ctypes.c_int64),
        ("v_row_stride", ctypes.c_int64),
        ("out_row_stride", ctypes.c_int64),
        ("batch", ctypes.c_int32),
        ("seq", ctypes.c_int32),
        ("num_heads", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
        ("max_len", ctypes.c_int32),
        ("scale", ctypes.c_float),
        ("dtype", ctypes.c_int32),
        ("workspace", ctypes.c_void_p),  # decode split scratch without clusters (before sm_90), or NULL
        ("workspace_bytes", ctypes.c_int64),
    ]


# cudaError_t names of the codes this library can plausibly return (driver_types.h, CUDA 12/13).
_CUDA_ERROR_NAMES = {
    0: "cudaSuccess",
    1: "cudaErrorInvalidValue",
    2: "cudaErrorMemoryAllocation",
    3: "cudaErrorInitializationError",
    4: "cudaErrorCudartUnloading",
    9: "cudaErrorInvalidConfiguration",
    34: "cudaErrorStubLibrary",
    35: "cudaErrorInsufficientDriver",
    36: "cudaErrorCallRequiresNewerDriver",
    46: "cudaErrorDevicesUnavailable",
    98: "cudaErrorInvalidDeviceFunction",
    100: "cudaErrorNoDevice",
    101: "cudaErrorInvalidDevice",
    200: "cudaErrorInvalidKernelImage",
    201: "cudaErrorDeviceUninitialized",
    209: "cudaErrorNoKernelImageForDevice",
    218: "cudaErrorInvalidPtx",
    222: "cudaErrorUnsupportedPtxVersion",
    400: "cudaErrorInvalidResourceHandle",
    700: "cudaErrorIllegalAddress",
    701: "cudaErrorLaunchOutOfResources",
    702: "cudaErrorLaunchTimeout",
    709: "cudaErrorContextIsDestroyed",
    716: "cudaErrorMisalignedAddress",
    719: "cudaErrorLaunchFailure",
    900: "cudaErrorStreamCaptureUnsupported",
    901: "cudaErrorStreamCaptureInvalidated",
    906: "cudaErrorStreamCaptureImplicit",
    999: "cudaErrorUnknown",
}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_varlen_fn = None  # cached eet_varlen_attention: the hot path skips the attribute lookup
_prepad_fn = None  # cached eet_prepad_attention
_last_error_fn = None


def cuda_error_name(code: int) -> str:
    """The cudaError_t name of ``code`` ("cudaErrorInvalidValue"), or "cudaError(<code>)"."""
    return _CUDA_ERROR_NAMES.get(code, f"cudaError({code})")


def library_path() -> Path:
    """Where :func:`load_library` looks: ``$EET_KERNELS_LIB`` if set, else next to this file, else (when
    ``eet`` is imported from a source checkout) the installed package's ``eet/plugins/`` on ``sys.path``."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent / LIBRARY_NAME
    if not here.is_file():
        for entry in sys.path:
            installed = Path(entry or ".") / "eet" / "plugins" / LIBRARY_NAME
            if installed.is_file():
                return installed
    return here


def _missing_library_error(path: Path, reason: str) -> RuntimeError:
    env = os.environ.get(ENV_VAR)
    where = (
        f"${ENV_VAR}={env}"
        if env
        else f"{path} (next to {Path(__file__).name}; ${ENV_VAR} is not set)"
    )
    return RuntimeError(
        f"EET kernel library {LIBRARY_NAME} could not be loaded from {where}: {reason}. "
        "Build and install it with `pip install .` from the EET-TRT repository root (needs the CUDA "
        "toolkit's nvcc and CMake >= 3.24), or build it with `cmake -S . -B build && cmake --build "
        f"build` and set {ENV_VAR} to build/{LIBRARY_NAME}."
    )


def _declare(lib: ctypes.CDLL) -> None:
    lib.eet_varlen_attention.argtypes = [ctypes.POINTER(VarlenAttentionParams), ctypes.c_void_p]
    lib.eet_varlen_attention.restype = ctypes.c_int
    lib.eet_varlen_attention_supported.argtypes = [ctypes.c_int32, ctypes.c_int32]
    lib.eet_varlen_attention_supported.restype = ctypes.c_int
    lib.eet_prepad_attention.argtypes = [ctypes.POINTER(PrepadAttentionParams), ctypes.c_void_p]
    lib.eet_prepad_attention.restype = ctypes.c_int
    lib.eet_prepad_attention_supported.argtypes = [ctypes.c_int32, ctypes.c_int32]
    lib.eet_prepad_attention_supported.restype = ctypes.c_int
    lib.eet_prepad_attention_workspace_size.argtypes = [ctypes.c_int32, ctypes.c_int32, ctypes.c_int32]
    lib.eet_prepad_attention_workspace_size.restype = ctypes.c_int64
    lib.eet_last_error_message.argtypes = []
    lib.eet_last_error_message.restype = ctypes.c_char_p


def load_library() -> ctypes.CDLL:
    """Loads (once) and returns the kernel library, its functions' argtypes/restypes declared.

    Raises RuntimeError naming the path searched and how to build the library when it is missing,
    cannot be loaded, or was built for another ABI version.
    """
    global _lib, _varlen_fn, _prepad_fn, _last_error_fn
    lib = _lib
    if lib is not None:
        return lib
    with _lock:
        if _lib is not None:
            return _lib
        path = library_path()
        if not path.is_file():
            raise _missing_library_error(path, "no such file")
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            raise _missing_library_error(path, str(exc)) from exc
        try:
            lib.eet_abi_version.argtypes = []
            lib.eet_abi_version.restype = ctypes.c_int32
        except AttributeError as exc:
            raise _missing_library_error(path, f"not an EET kernel library ({exc})") from exc
        # The version first: an older library lacks the newer functions that _declare names.
        version = int(lib.eet_abi_version())
        if version != ABI_VERSION:
            raise RuntimeError(
                f"{path} has ABI version {version}, but this binding ({__file__}) expects "
                f"{ABI_VERSION}: rebuild the library (`pip install .` from the repository root)."
            )
        try:
            _declare(lib)
        except AttributeError as exc:
            raise _missing_library_error(path, f"not an EET kernel library ({exc})") from exc
        _varlen_fn = lib.eet_varlen_attention
        _prepad_fn = lib.eet_prepad_attention
        _last_error_fn = lib.eet_last_error_message
        _lib = lib
        return lib


def abi_version() -> int:
    """eet_abi_version() of the loaded library."""
    return int(load_library().eet_abi_version())


def supported(dtype: int, head_dim: int) -> bool:
    """Whether eet_varlen_attention is built for (dtype, head_dim)."""
    return bool(load_library().eet_varlen_attention_supported(int(dtype), int(head_dim)))


def prepad_supported(dtype: int, head_dim: int) -> bool:
    """Whether eet_prepad_attention is built for (dtype, head_dim)."""
    return bool(load_library().eet_prepad_attention_supported(int(dtype), int(head_dim)))


def prepad_workspace_size(batch: int, num_heads: int, head_dim: int) -> int:
    """Bytes of ``workspace`` the decode split of eet_prepad_attention may use (without clusters, before
    sm_90): ``batch * num_heads * 8 * (head_dim + 2) * 4``, as eet_prepad_attention_workspace_size() says.
    Pure Python, so that an engine build needs no library; ``tests/plugins/test_lib_abi.py`` checks the two
    agree."""
    if min(batch, num_heads, head_dim) <= 0:
        return 0
    return batch * num_heads * 8 * (head_dim + 2) * 4


def last_error_message() -> str:
    """eet_last_error_message() of the calling thread ("" if none)."""
    if _last_error_fn is None:
        load_library()
    raw = _last_error_fn()
    return raw.decode("utf-8", "replace") if raw else ""


def make_varlen_params(
    *,
    dtype: int,
    num_heads: int,
    head_dim: int,
    batch: int = 1,
    max_seqlen: int = 1,
    total_tokens: int = 0,
    q: int | None = None,
    k: int | None = None,
    v: int | None = None,
    out: int | None = None,
    cu_seqlens: int | None = None,
    q_row_stride: int | None = None,
    k_row_stride: int | None = None,
    v_row_stride: int | None = None,
    out_row_stride: int | None = None,
    scale: float | None = None,
) -> VarlenAttentionParams:
    """A filled :class:`VarlenAttentionParams`; row strides default to ``num_heads * head_dim``
    (contiguous [tokens, heads, head_dim]) and ``scale`` to ``1 / sqrt(head_dim)``."""
    return _filled(VarlenAttentionParams, num_heads, head_dim, scale,
                   (q_row_stride, k_row_stride, v_row_stride, out_row_stride),
                   q=q, k=k, v=v, out=out, cu_seqlens=cu_seqlens, batch=batch, max_seqlen=max_seqlen,
                   total_tokens=total_tokens, dtype=dtype)


def _filled(cls, num_heads: int, head_dim: int, scale: float | None, row_strides: tuple, **fields):
    """A ``cls`` params struct: row strides default to ``num_heads * head_dim`` (contiguous heads), ``scale``
    to ``1 / sqrt(head_dim)``, every other field from ``fields``."""
    row = num_heads * head_dim
    p = cls()
    for name, stride in zip(("q_row_stride", "k_row_stride", "v_row_stride", "out_row_stride"), row_strides):
        setattr(p, name, row if stride is None else stride)
    p.num_heads, p.head_dim = num_heads, head_dim
    p.scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    for name, value in fields.items():
        setattr(p, name, value)
    return p


def _launch(name: str, fn, params, stream: int) -> None:
    rc = fn(ctypes.byref(params), stream)
    if rc:
        raise RuntimeError(f"{name}: {cuda_error_name(rc)}: {last_error_message()}")


def varlen_attention(params: VarlenAttentionParams, stream: int) -> None:
    """Launches eet_varlen_attention on ``stream`` (a cudaStream_t as an int; 0 = default stream).

    Raises RuntimeError("eet_varlen_attention: <cuda error name>: <message>") on a non-zero return.
    """
    fn = _varlen_fn
    if fn is None:
        load_library()
        fn = _varlen_fn
    _launch("eet_varlen_attention", fn, params, stream)


def make_prepad_params(
    *,
    dtype: int,
    num_heads: int,
    head_dim: int,
    batch: int = 1,
    seq: int = 1,
    max_len: int = 1,
    q: int | None = None,
    k: int | None = None,
    v: int | None = None,
    out: int | None = None,
    k_cache: int | None = None,
    v_cache: int | None = None,
    pad_lengths: int | None = None,
    step: int | None = None,
    workspace: int | None = None,
    workspace_bytes: int = 0,
    q_row_stride: int | None = None,
    k_row_stride: int | None = None,
    v_row_stride: int | None = None,
    out_row_stride: int | None = None,
    scale: float | None = None,
) -> PrepadAttentionParams:
    """A filled :class:`PrepadAttentionParams`; row strides default to ``num_heads * head_dim``
    (contiguous [batch, seq, heads, head_dim]) and ``scale`` to ``1 / sqrt(head_dim)``."""
    return _filled(PrepadAttentionParams, num_heads, head_dim, scale,
                   (q_row_stride, k_row_stride, v_row_stride, out_row_stride),
                   q=q, k=k, v=v, out=out, k_cache=k_cache, v_cache=v_cache, pad_lengths=pad_lengths, step=step,
                   batch=batch, seq=seq, max_len=max_len, dtype=dtype, workspace=workspace,
                   workspace_bytes=workspace_bytes)


def prepad_attention(params: PrepadAttentionParams, stream: int) -> None:
    """Launches eet_prepad_attention on ``stream`` (a cudaStream_t as an int; 0 = default stream).

    Raises RuntimeError("eet_prepad_attention: <cuda error name>: <message>") on a non-zero return.
    """
    fn = _prepad_fn
    if fn is None:
        load_library()
        fn = _prepad_fn
    _launch("eet_prepad_attention", fn, params, stream)
