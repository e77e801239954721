"""The EET runtime.

- :func:`load` (``eet.runtime.load(dir)``): a built engine directory on the GPU, as a context manager:
  :class:`~eet.runtime.bert.BertEngine` (``encode()``) or :class:`~eet.runtime.gpt2.Gpt2Engine`
  (``generate()`` / ``stream()``); see :mod:`eet.runtime.engine`.
- :mod:`eet.runtime.build` builds engines from rewritten ONNX; :mod:`eet.runtime.sidecar` describes them.
- :mod:`eet.runtime.generation`: the pre-padding generation loop, independent of what runs a step.
"""


def load(directory, **kwargs):
    """Load an engine directory written by ``eet build``; see :func:`eet.runtime.engine.load`."""
    from eet.runtime.engine import load as _load

    return _load(directory, **kwargs)
