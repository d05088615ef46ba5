"""Measure this machine for its device profile: memory bandwidth and matmul throughput."""
from __future__ import annotations

import os
import platform
import time

import torch


def _best(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bandwidth_gbs(threads: int, mb: int = 512, repeats: int = 5) -> float:
    """Read bandwidth: summing a buffer far larger than the caches, with `threads` threads."""
    torch.set_num_threads(threads)
    x = torch.ones(mb * 2**20 // 4, dtype=torch.float32)
    return x.numel() * 4 / _best(lambda: x.sum(), repeats) / 1e9


def matmul_gflops(threads: int, dtype=torch.float32, n: int = 1024, repeats: int = 5) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / _best(lambda: a @ b, repeats) / 1e9


def host_profile(threads: int | None = None) -> dict:
    threads = threads or os.cpu_count() or 1
    bw = bandwidth_gbs(threads)
    fp32 = matmul_gflops(threads)
    bf16 = matmul_gflops(threads, torch.bfloat16)
    return {
        "name": f"this host ({platform.machine()}, {threads} threads)",
        "memory_bandwidth_gbs": round(bw, 2),
        "compute_gflops": {"fp32": round(fp32, 1), "fp16": round(bf16, 1), "int8": round(fp32, 1)},
        "usable_ram_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 * 0.8, 1),
        "sources": {
            "memory_bandwidth_gbs": f"measured: sum over a 512 MB fp32 buffer, {threads} threads, best of 5",
            "compute_gflops": f"measured: 1024x1024 matmul, {threads} threads, best of 5 (fp16 column: bf16 matmul; "
                              "int8 column: no int8 probe, the fp32 figure is used)",
            "usable_ram_gb": "80% of physical memory",
        },
        "threads": threads,
    }


# KV cache element bytes each runner keeps by default (llama.cpp: f16; the others: f32)
RUNNER_KV_BYTES = {"gguf": 2.0}


def predicted_decode_ms(export_dir, profile: dict, context: int, efficiency: float = 1.0) -> float:
    """Roofline time of one decode step of an export at `context` on `profile`, ms."""
    from d2m_export.models import read_config
    from d2m_export.roofline import COMPUTE_CLASS, decode_cost
    from runtimes.base import read_manifest

    manifest = read_manifest(export_dir)
    quant = manifest["quant"]
    cost = decode_cost(read_config(export_dir), quant, context, kv_bytes=RUNNER_KV_BYTES.get(manifest["target"], 4.0))
    return cost.seconds(profile["memory_bandwidth_gbs"], profile["compute_gflops"][COMPUTE_CLASS[quant]], efficiency) * 1e3


def runtime_efficiency(export_dirs, profile: dict, threads: int, prompt_tokens: int = 64, new_tokens: int = 64) -> dict:
    """Per `target:quant`: roofline ÷ measured decode time per token, from a bench run of each export."""
    from runtimes.base import read_manifest
    from runtimes.bench import bench

    out = {}
    for d in export_dirs:
        result = bench(d, prompt_tokens=prompt_tokens, new_tokens=new_tokens, threads=threads)
        manifest = read_manifest(d)
        measured_ms = 1e3 / result["decode_tokens_per_s"]
        roofline_ms = predicted_decode_ms(d, profile, prompt_tokens + new_tokens // 2)
        out[f"{manifest['target']}:{manifest['quant']}"] = round(roofline_ms / measured_ms, 4)
    return out
