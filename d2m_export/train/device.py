"""Where training runs and how fast it could go: the device (`--device`), the default precision
there, and the peak FLOP/s that model FLOPs utilisation (MFU) is measured against.

MFU = tokens/s × FLOPs per token ÷ (peak FLOP/s × processes), with FLOPs per token = 6 × the
parameters a token reads (active ones, for MoE) + 12 × layers × hidden × sequence length for
attention (PaLM, appendix B). A distillation teacher's forward pass is not counted.
"""
from __future__ import annotations

import os

import torch

from d2m_export.errors import UserError
from d2m_export.sources.params import param_counts

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, by a name fragment.
CUDA_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
                    "RTX 4090": 165.0, "RTX 3090": 71.0}


def resolve(device: str, dtype: str) -> tuple[str, str]:
    """(torch device, fp32 | bf16): `auto` is CUDA when present (this process's local rank's GPU),
    else the CPU; bf16 by default on CUDA, fp32 on the CPU."""
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to this process")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if dtype == "auto":
        dtype = "bf16" if device.startswith("cuda") else "fp32"
    if dtype not in ("fp32", "bf16"):
        raise UserError(f"--dtype must be auto, fp32 or bf16, not {dtype!r}")
    return device, dtype


def flops_per_token(config, seq_len: int) -> float:
    return 6.0 * param_counts(config).active + 12.0 * config.num_hidden_layers * config.hidden_size * seq_len


def peak_flops(device: str, dtype: str, given_tflops: float | None) -> tuple[float | None, str]:
    """(peak FLOP/s of one process's device, where the figure comes from); None when unknown."""
    if given_tflops:
        return given_tflops * 1e12, "--peak-tflops"
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        for fragment, tflops in CUDA_BF16_TFLOPS.items():
            if fragment in name:
                scale = 1.0 if dtype == "bf16" else 0.5      # tf32 runs at half the bf16 rate
                return tflops * 1e12 * scale, f"{name} data sheet ({dtype})"
        return None, f"{name} is not in our table of peaks: pass --peak-tflops"
    from d2m_export.devices.probe import matmul_gflops

    threads = torch.get_num_threads()
    gflops = matmul_gflops(threads, torch.bfloat16 if dtype == "bf16" else torch.float32)
    torch.set_num_threads(threads)
    return gflops * 1e9, f"measured: 1024×1024 {dtype} matmul on {threads} threads"
