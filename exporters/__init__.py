"""Exporters: ONNX (baked), verification against torch; TensorRT and swappable packs build on these."""
