"""Hugging Face model -> ONNX (``torch.onnx``) -> rewritten ONNX with EET plugin nodes (onnx-graphsurgeon).

- :mod:`eet.exporter.bert`: load a BERT (embedded default, local directory or config) and export it.
- :mod:`eet.exporter.rewrite`: the graph passes (attention -> ``EetVarlenAttention``, packed inputs and
  outputs, fp16 with fp32 LayerNorm).
"""
