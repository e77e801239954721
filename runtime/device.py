"""The CUDA side of the runtime, through PyCUDA: the device's primary context (shared with PyTorch and anything
else in the process), streams, device and pinned host buffers, events, and CUDA graphs (captured through the
driver API, which PyCUDA does not wrap).

Everything here imports PyCUDA lazily; :func:`open_device` raises :class:`EetError` with the fix when PyCUDA
or a GPU is missing.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from eet.errors import EetError

PYCUDA_HINT = "install it with `pip install 'eet-trt[runtime]'` (or `pip install pycuda`)"


def _pycuda():
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise EetError(f"running an engine needs PyCUDA, which is not installed ({exc}); {PYCUDA_HINT}") from exc
    return cuda


@dataclass(frozen=True)
class GpuInfo:
    """What the runtime reports about a GPU: ``name``, ``capability`` (major, minor), ``index``."""

    index: int
    name: str
    capability: tuple[int, int]

    def __str__(self) -> str:
        return f"GPU {self.index} ({self.name}, compute capability {self.capability[0]}.{self.capability[1]})"


class Device:
    """The primary CUDA context of one GPU, made current on this thread while the device is open.

    Args:
        index: CUDA device ordinal (default 0).

    Raises:
        EetError: PyCUDA missing, no CUDA driver or GPU, or ``index`` out of range.
    """

    def __init__(self, index: int = 0):
        cuda = _pycuda()
        self.cuda = cuda
        try:
            cuda.init()
            count = cuda.Device.count()
        except cuda.Error as exc:
            raise EetError(f"no usable CUDA driver or GPU on this machine ({exc}); running an engine needs an "
                           "NVIDIA GPU (building one does not)") from exc
        if count == 0:
            raise EetError("no CUDA GPU is visible (CUDA_VISIBLE_DEVICES?); running an engine needs an NVIDIA GPU")
        if not 0 <= index < count:
            raise EetError(f"GPU index {index} is out of range: {count} GPU(s) visible")
        device = cuda.Device(index)
        self.info = GpuInfo(index, device.name(), tuple(device.compute_capability()))
        self._context = device.retain_primary_context()
        self._context.push()
        self._open = True

    def stream(self):
        """A new non-default stream (``.handle`` is the ``cudaStream_t``)."""
        return self.cuda.Stream()

    def alloc(self, nbytes: int):
        """Device memory of ``nbytes`` (at least 1 byte); ``int(buffer)`` is its address."""
        try:
            return self.cuda.mem_alloc(max(int(nbytes), 1))
        except self.cuda.MemoryError as exc:
            raise EetError(f"out of GPU memory allocating {nbytes / 2**20:.1f} MiB on {self.info}; build the engine "
                           "with smaller --max-batch / --max-tokens / --max-len") from exc

    def pinned(self, shape, dtype) -> np.ndarray:
        """Page-locked host memory (fast, truly asynchronous copies)."""
        return self.cuda.pagelocked_empty(shape, dtype)

    def event(self):
        return self.cuda.Event()

    def close(self) -> None:
        if self._open:
            self._open = False
            self._context.pop()
            self._context.detach()


# ---- CUDA graphs through the driver API ------------------------------------------------------------------------

_CAPTURE_MODE_RELAXED = 2  # CU_STREAM_CAPTURE_MODE_RELAXED: other threads (TensorRT's JIT) may keep working


def _driver():
    lib = ctypes.CDLL("libcuda.so.1")
    for name, args in (("cuStreamBeginCapture_v2", [ctypes.c_void_p, ctypes.c_int]),
                       ("cuStreamEndCapture", [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]),
                       ("cuGraphInstantiateWithFlags", [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p,
                                                        ctypes.c_ulonglong]),
                       ("cuGraphLaunch", [ctypes.c_void_p, ctypes.c_void_p]),
                       ("cuGraphExecDestroy", [ctypes.c_void_p]),
                       ("cuGraphDestroy", [ctypes.c_void_p]),
                       ("cuGetErrorName", [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)])):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    return lib


def _check(lib, code: int, what: str) -> None:
    if code != 0:
        name = ctypes.c_char_p()
        lib.cuGetErrorName(code, ctypes.byref(name))
        raise EetError(f"{what} failed: CUDA error {code} ({(name.value or b'?').decode()})")


class CudaGraph:
    """Work enqueued on a stream by ``record()``, captured once and replayed by :meth:`launch`.

    Captured work keeps its device addresses and launch shapes: replay it only while the buffers it reads and
    writes stay where they were (values may change: the pre-padding plugin reads ``step`` on the device).

    Args:
        stream_handle: the ``cudaStream_t`` to capture on and launch into (not the legacy default stream).
        record: enqueues the work on that stream; its return value is checked (``False`` fails the capture).
    """

    def __init__(self, stream_handle: int, record):
        self._lib = lib = _driver()
        self.stream = ctypes.c_void_p(stream_handle)
        graph, self._exec = ctypes.c_void_p(), ctypes.c_void_p()
        _check(lib, lib.cuStreamBeginCapture_v2(self.stream, _CAPTURE_MODE_RELAXED), "cuStreamBeginCapture")
        ok = False
        try:
            ok = record()
        finally:
            code = lib.cuStreamEndCapture(self.stream, ctypes.byref(graph))
        _check(lib, code, "capturing the engine into a CUDA graph (cuStreamEndCapture)")
        try:
            if ok is False:
                raise EetError("the work to capture into a CUDA graph reported failure")
            _check(lib, lib.cuGraphInstantiateWithFlags(ctypes.byref(self._exec), graph, 0), "cuGraphInstantiate")
        finally:
            lib.cuGraphDestroy(graph)

    def launch(self) -> None:
        _check(self._lib, self._lib.cuGraphLaunch(self._exec, self.stream), "cuGraphLaunch")

    def close(self) -> None:
        if self._exec:
            self._lib.cuGraphExecDestroy(self._exec)
            self._exec = ctypes.c_void_p()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
