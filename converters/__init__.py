"""Exporters, one module per target (ONNX, ExecuTorch, Core ML, GGUF), behind one `export` entry point.

Each exporter registers itself in `TARGETS` (`@register_target("name")` in `converters/<name>.py`);
`d2m-export --target NAME` looks it up there. See `converters/base.py`.
"""
from converters.base import TARGETS, Exporter, export, get_target, register_target  # noqa: F401
