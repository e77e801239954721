"""The one place that knows there are two TensorRT flavours.

``tensorrt`` (full TensorRT 10+) and ``tensorrt_rtx`` (TensorRT for RTX, which builds engines on a machine
without a GPU) share one Python API. Everything else in EET imports TensorRT through :func:`load`.

The environment variable ``EET_TENSORRT`` (``tensorrt`` or ``tensorrt_rtx``) picks one when both are installed;
otherwise full TensorRT is preferred and TensorRT-RTX is the fallback.
"""
from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from types import ModuleType

from eet.errors import EetError

FLAVOURS = ("tensorrt", "tensorrt_rtx")

INSTALL_HINT = (
    "install one of them: `pip install 'eet-trt[build]'` (TensorRT-RTX, builds engines on any machine, "
    "`pip install tensorrt-rtx-cu13==1.7.1.116`) or full TensorRT (`pip install tensorrt`)"
)


@dataclass(frozen=True)
class TensorRT:
    """A loaded TensorRT flavour.

    Attributes:
        module: the imported ``tensorrt`` or ``tensorrt_rtx`` module.
        flavour: ``"tensorrt"`` or ``"tensorrt_rtx"``.
        version: the module's ``__version__``.
    """

    module: ModuleType
    flavour: str
    version: str

    @property
    def strongly_typed_flags(self) -> int:
        """Network creation flags for a strongly typed network (TensorRT-RTX networks always are)."""
        flag = getattr(self.module.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        return 0 if flag is None else 1 << int(flag)


def _ensure_unversioned_library(module: ModuleType, flavour: str) -> None:
    """The ONNX parser dlopen()s ``libtensorrt_rtx.so`` when it meets a plugin node, but the wheel ships only
    ``libtensorrt_rtx.so.1``: add the missing link next to it (once) or say how to."""
    if flavour != "tensorrt_rtx":
        return
    try:
        libs = importlib.import_module("tensorrt_rtx_libs")
    except ImportError:
        return
    folder = os.path.dirname(os.path.abspath(libs.__file__))
    target, link = os.path.join(folder, "libtensorrt_rtx.so.1"), os.path.join(folder, "libtensorrt_rtx.so")
    if not os.path.exists(target) or os.path.exists(link):
        return
    try:
        os.symlink("libtensorrt_rtx.so.1", link)
    except OSError as exc:
        raise EetError(
            f"TensorRT-RTX's ONNX parser needs {link} to load plugins, and it could not be created ({exc}); "
            f"create it once with: ln -s libtensorrt_rtx.so.1 {link}"
        ) from exc


@functools.lru_cache(maxsize=None)
def load(flavour: str | None = None) -> TensorRT:
    """Import TensorRT.

    Args:
        flavour: ``"tensorrt"``, ``"tensorrt_rtx"`` or None (``$EET_TENSORRT``, else the first one installed).

    Raises:
        EetError: no TensorRT flavour is installed (the message says how to install one).
    """
    wanted = flavour or os.environ.get("EET_TENSORRT") or None
    if wanted is not None and wanted not in FLAVOURS:
        raise EetError(f"unknown TensorRT flavour {wanted!r}: use one of {', '.join(FLAVOURS)}")
    errors = []
    for name in [wanted] if wanted else FLAVOURS:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
            continue
        _ensure_unversioned_library(module, name)
        return TensorRT(module=module, flavour=name, version=str(getattr(module, "__version__", "unknown")))
    raise EetError(f"TensorRT is not installed ({'; '.join(errors)}); {INSTALL_HINT}")


def logger(trt: TensorRT, verbose: bool = False):
    """A TensorRT logger at WARNING (or VERBOSE) severity."""
    level = trt.module.Logger.VERBOSE if verbose else trt.module.Logger.WARNING
    return trt.module.Logger(level)
