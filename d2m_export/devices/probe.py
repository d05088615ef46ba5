"""Measure this machine for its device profile: memory bandwidth and matmul throughput."""
from __future__ import annotations

import os
import platform
import time

import torch

from d2m_export.devices.roofline import COMPUTE_CLASS


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


def predicted_decode_ms(export_dir, profile: dict, context: int, efficiency: float = 1.0,
                        kv_efficiency: float | None = None) -> float:
    """Roofline time of one decode step of an export at `context` on `profile`, ms."""
    cost, quant = _cost(export_dir, context)
    return cost.seconds(profile["memory_bandwidth_gbs"], profile["compute_gflops"][COMPUTE_CLASS[quant]],
                        efficiency, kv_efficiency) * 1e3


def _cost(export_dir, context: int):
    """(roofline cost of one decode step at `context`, the export's quant)."""
    from d2m_export.sources.models import read_config
    from d2m_export.devices.roofline import decode_cost
    from runtimes.base import read_manifest

    manifest = read_manifest(export_dir)
    cost = decode_cost(read_config(export_dir), manifest["quant"], context,
                       kv_bytes=RUNNER_KV_BYTES.get(manifest["target"], 4.0))
    return cost, manifest["quant"]


def runtime_efficiency(export_dirs, profile: dict, threads: int, prompt_tokens: int = 64, new_tokens: int = 64,
                       long_prompt_tokens: int | None = None) -> tuple[dict, dict]:
    """Per `target:quant`, from bench runs of each export: the efficiency (roofline ÷ measured decode
    time per token) at `prompt_tokens`, and — with `long_prompt_tokens` — a second one for the
    KV-cache reads, solved from the two contexts so that both are met exactly:
        t = weight_bytes / (bw · e) + kv_bytes(context) / (bw · e_kv)."""
    from runtimes.base import read_manifest
    from runtimes.bench import bench

    eff, kv_eff = {}, {}
    bw = profile["memory_bandwidth_gbs"] * 1e9
    for d in export_dirs:
        manifest = read_manifest(d)
        key = f"{manifest['target']}:{manifest['quant']}"
        measured = lambda prompt: 1 / bench(d, prompt_tokens=prompt, new_tokens=new_tokens,  # noqa: E731
                                            threads=threads)["decode_tokens_per_s"]
        t1, (c1, _) = measured(prompt_tokens), _cost(d, prompt_tokens + new_tokens // 2)
        if long_prompt_tokens is None:
            eff[key] = round(predicted_decode_ms(d, profile, prompt_tokens + new_tokens // 2) / (t1 * 1e3), 4)
            continue
        t2, (c2, _) = measured(long_prompt_tokens), _cost(d, long_prompt_tokens + new_tokens // 2)
        solved = solve_efficiencies(c1, t1, c2, t2, bw)
        if solved is None:                          # noise swamped the context effect: one efficiency
            eff[key] = round(predicted_decode_ms(d, profile, prompt_tokens + new_tokens // 2) / (t1 * 1e3), 4)
            continue
        eff[key], kv_eff[key] = (round(x, 4) for x in solved)
    return eff, kv_eff


def solve_efficiencies(short, t_short: float, long, t_long: float, bandwidth: float) -> tuple[float, float] | None:
    """(e, e_kv) with t = weight_bytes / (bw · e) + kv_bytes / (bw · e_kv) at both contexts (memory-bound
    decode); None when the two measurements do not give positive efficiencies."""
    per_kv = (t_long - t_short) / ((long.kv_bytes - short.kv_bytes) / bandwidth)
    per_weight = (t_short - short.kv_bytes / bandwidth * per_kv) / ((short.bytes - short.kv_bytes) / bandwidth)
    return (1 / per_weight, 1 / per_kv) if per_kv > 0 and per_weight > 0 else None
