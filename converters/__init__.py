"""Exporters, one module per target (ONNX, ExecuTorch, Core ML, GGUF), behind one `export` entry point.

Each exporter registers itself in `TARGETS`; `d2m-export --target NAME` looks it up here.
"""
TARGETS: dict = {}
