"""Build TensorRT engines from rewritten ONNX (:mod:`eet.runtime.build`) and describe them in a JSON sidecar
(:mod:`eet.runtime.sidecar`)."""
