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
from runtimes.base import load_runner, load_tokenizer, read_manifest

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
          repeats: int = 3, runtime: str | None = None) -> dict:
    if prompt_tokens < 1 or new_tokens < 1 or repeats < 1:
        raise UserError("--prompt-tokens, --new-tokens and repeats must be at least 1")
    export_dir = Path(export_dir)
    ids = prompt_ids(export_dir, prompt_tokens)
    with load_runner(export_dir, threads=threads, runtime=runtime, n_ctx=prompt_tokens + new_tokens + 8) as runner:
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
        manifest, settings, name = runner.manifest, runner.settings, runner.runtime
    return {
        "target": manifest["target"], "runtime": name, "quant": manifest.get("quant"), "threads": threads,
        "model": manifest.get("model"), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
        "repeats": repeats,
        "prefill_tokens_per_s": round(prompt_tokens / statistics.median(prefill_s), 2),
        "decode_tokens_per_s": round(new_tokens / statistics.median(decode_s), 2),
        "decode_ms_per_token_p50": round(statistics.median(step_ms), 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "runtime_settings": settings,
        "artifact_mb": round(sum(path_bytes(export_dir / f) for f in manifest.get("files", [])) / 2**20, 1),
    }


def _burst(runner, prompt: list[int], tokens: int) -> float:
    """ms per decoded token after a fresh prefill of `prompt` (the same context every round)."""
    runner.reset()
    logits = runner.prefill(prompt)
    t0 = time.perf_counter()
    for _ in range(tokens):
        logits = runner.decode(int(logits.argmax()))
    return (time.perf_counter() - t0) * 1000 / tokens


def interleaved(exports: dict[str, Path | tuple[Path, str]], rounds: int = 20, tokens: int = 16,
                prompt_tokens: int = 64, threads: int = 2) -> dict:
    """Decode speed of several exports, for small differences on a noisy machine: all loaded in this
    process, each round decodes a short burst with every export in turn (the order reversed every other
    round). Per export the median ms/token over rounds and its spread; per pair the median of the
    per-round ratios and their spread. An export given as (directory, runtime) runs in that runtime."""
    if rounds < 3:
        raise UserError(f"interleaved rounds must be at least 3, not {rounds}")
    names = list(exports)
    exports = {n: (e, None) if isinstance(e, (str, Path)) else e for n, e in exports.items()}
    runners = [load_runner(exports[n][0], threads=threads, runtime=exports[n][1]) for n in names]
    try:
        prompt = prompt_ids(exports[names[0]][0], prompt_tokens)
        for r in runners:                                   # warm-up
            _burst(r, prompt, tokens)
        times: dict[str, list[float]] = {n: [] for n in names}
        for i in range(rounds):
            for n in (names if i % 2 == 0 else names[::-1]):
                times[n].append(_burst(runners[names.index(n)], prompt, tokens))
    finally:
        for r in runners:
            r.close()

    def ratio(a, b):
        per_round = [y / x for x, y in zip(times[a], times[b])]     # speed of a over b
        return {"median": round(statistics.median(per_round), 3),
                "spread": [round(min(per_round), 3), round(max(per_round), 3)]}
    return {"threads": threads, "rounds": rounds, "tokens_per_burst": tokens, "prompt_tokens": prompt_tokens,
            "variants": {n: {"target": read_manifest(exports[n][0])["target"], "runtime": exports[n][1] or
                             read_manifest(exports[n][0])["target"], "quant": read_manifest(exports[n][0]).get("quant"),
                             "decode_ms_per_token": round(statistics.median(times[n]), 3),
                             "spread_ms": [round(min(times[n]), 3), round(max(times[n]), 3)]} for n in names},
            "speedups": {f"{a} over {b}": ratio(a, b) for a in names for b in names if a != b}}
