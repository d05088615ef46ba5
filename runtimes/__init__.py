"""Runners, one module per runtime, behind one interface (load an export, prefill, decode, generate).

Each runner registers itself in `RUNNERS` by export target (`@register_runner("gguf")`); see
`runtimes/base.py`.
"""
from runtimes.base import RUNNERS, Runner, load_runner, register_runner  # noqa: F401
