"""Quantized storage for the onnx target (placeholder until int8/int4 land)."""
from __future__ import annotations

from d2m_export.errors import UserError


def quantized_linears(g, quant: str):
    raise UserError(f"--quant {quant} for the onnx target is not implemented yet; use fp32")
