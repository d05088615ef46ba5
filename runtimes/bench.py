"""Speed of an export in its real runtime: prefill and greedy decode, timed step by step.

The prompt is real text (the exported tokenizer on a fixed paragraph, repeated to length), so
routing in MoE layers sees the token mix it would see in use. Decode is timed per step; each
figure is the median over `repeats` runs after one warm-up run. Peak RSS is the process's
high-water mark (it includes the Python interpreter and the mapped model pages touched).
"""
from __future__ import annotations

import resource
import statistics
import sys
import time
from pathlib import Path

from converters.base import path_bytes
from d2m_export.errors import UserError
from runtimes.base import load_runner, load_tokenizer

TEXT = ("It is a truth universally acknowledged that a small model, well arranged, can answer quickly on a "
        "modest device. The weights are read once for every token, so the fewer bytes each step touches, "
        "the sooner the next word appears. ")


def prompt_ids(export_dir: Path, n: int) -> list[int]:
    ids = load_tokenizer(export_dir).encode(TEXT, add_special_tokens=False).ids
    return (ids * (n // len(ids) + 1))[:n]


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 / (1024 if sys.platform == "darwin" else 1)   # macOS reports bytes


def bench(export_dir: Path, prompt_tokens: int = 64, new_tokens: int = 64, threads: int = 2,
          repeats: int = 3) -> dict:
    if prompt_tokens < 1 or new_tokens < 1 or repeats < 1:
        raise UserError("--prompt-tokens, --new-tokens and repeats must be at least 1")
    export_dir = Path(export_dir)
    ids = prompt_ids(export_dir, prompt_tokens)
    with load_runner(export_dir, threads=threads, n_ctx=prompt_tokens + new_tokens + 8) as runner:
        prefill_s, decode_s, step_ms = [], [], []
        for run in range(repeats + 1):            # run 0 warms caches and page-ins up
            t0 = time.perf_counter()
            logits = runner.prefill(ids)
            t1 = time.perf_counter()
            steps = []
            for _ in range(new_tokens):
                token = int(logits.argmax())
                s0 = time.perf_counter()
                logits = runner.decode(token)
                steps.append(time.perf_counter() - s0)
            if run:
                prefill_s.append(t1 - t0)
                decode_s.append(sum(steps))
                step_ms.append(statistics.median(steps) * 1e3)
        manifest, settings = runner.manifest, runner.settings
    return {
        "target": manifest["target"], "quant": manifest.get("quant"), "threads": threads,
        "model": manifest.get("model"), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
        "repeats": repeats,
        "prefill_tokens_per_s": round(prompt_tokens / statistics.median(prefill_s), 2),
        "decode_tokens_per_s": round(new_tokens / statistics.median(decode_s), 2),
        "decode_ms_per_token_p50": round(statistics.median(step_ms), 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "runtime_settings": settings,
        "artifact_mb": round(sum(path_bytes(export_dir / f) for f in manifest.get("files", [])) / 2**20, 1),
    }
