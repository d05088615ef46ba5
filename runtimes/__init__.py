"""Runners, one module per runtime, behind one interface (load an export, prefill, decode, generate)."""
RUNNERS: dict = {}
