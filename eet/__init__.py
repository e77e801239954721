"""EET-TRT: Easy and Efficient Transformer attention for TensorRT.

Sub-packages (imported lazily, each pulls in only what its stage needs):

- ``eet.exporter``: Hugging Face BERT -> ONNX -> rewritten ONNX with EET plugin nodes.
- ``eet.plugins``:  plugin specs, NumPy references, TensorRT ``IPluginV3`` adapters, the CUDA library.
- ``eet.runtime``:  TensorRT engine building (``.plan`` plus JSON sidecar).
"""
import os as _os

__version__ = "0.1.0"

# In a source checkout the sub-packages live beside this folder (exporter/, plugins/, runtime/) and the
# wheel maps them under eet/: let `python -m eet` and `python -m pytest` work from the checkout too.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and _os.path.isfile(
        _os.path.join(_root, "exporter", "__init__.py")):
    __path__.append(_root)  # noqa: F821  (a package's __path__)

from eet.errors import EetError  # noqa: E402,F401
