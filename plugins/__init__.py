"""EET plugins: one spec per plugin (:mod:`eet.plugins.spec`) drives the ONNX rewriter, the TensorRT
``IPluginV3`` adapter (:mod:`eet.plugins.tensorrt`), the NumPy reference (:mod:`eet.plugins.reference`) and the
ONNX reference evaluator ops (:mod:`eet.plugins.onnx_reference`). The CUDA kernels live in ``csrc/`` and are
loaded through :mod:`eet.plugins._lib`. Nothing here imports torch or TensorRT at import time."""

from eet.plugins.spec import PLUGINS, VARLEN_ATTENTION, PluginSpec  # noqa: F401
