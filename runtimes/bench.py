"""Speed of an export in its real runtime: prefill and greedy decode, timed step by step.

The prompt is real text (the exported tokenizer on a fixed paragraph, repeated to length), so
routing in MoE layers sees the token mix it would see in use. Decode is timed per step; each
figure is the median over `repeats` runs after one warm-up run. Peak RSS is the process's
high-water mark (it includes the Python interpreter and the mapped model pages touched).

The context of a measurement is the number of tokens already in the KV cache when the timed decode
steps start: a prompt of that length, then decode. `prompt_tokens` is its older name (kept in the
results beside `context`).
"""
from __future__ import annotations

import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from converters.base import path_bytes
from d2m_export.errors import UserError
from runtimes.base import load_runner, load_tokenizer, read_manifest, runner_class

DEFAULT_CONTEXT = 64       # tokens in the KV cache when the timed decode starts, unless asked otherwise
TEXT = ("It is a truth universally acknowledged that a small model, well arranged, can answer quickly on a "
        "modest device. The weights are read once for every token, so the fewer bytes each step touches, "
        "the sooner the next word appears. ")


def prompt_ids(export_dir: Path, n: int) -> list[int]:
    ids = load_tokenizer(export_dir).encode(TEXT, add_special_tokens=False).ids
    return (ids * (n // len(ids) + 1))[:n]


def peak_rss_mb() -> float:
    """This process's peak resident memory. On Linux from /proc (VmHWM): getrusage's ru_maxrss survives
    exec, so a process started by a large parent would report the parent's peak as its own."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 / (1024 if sys.platform == "darwin" else 1)   # macOS reports bytes


def resolve_context(context: int | None, prompt_tokens: int | None) -> int:
    """The decode context from `--context` and its older name `--prompt-tokens` (the same quantity)."""
    if context is not None and prompt_tokens is not None and context != prompt_tokens:
        raise UserError(f"--context {context} and --prompt-tokens {prompt_tokens} disagree; they name the same "
                        "number (tokens in the KV cache when decoding starts): give one")
    value = next((v for v in (context, prompt_tokens) if v is not None), DEFAULT_CONTEXT)
    if value < 1:
        raise UserError(f"--context must be at least 1, not {value}")
    return value


def export_positions(export_dir: Path) -> int | None:
    """The longest sequence an export runs (its manifest's `context_length`: KV cache or position table)."""
    limit = read_manifest(export_dir).get("context_length")
    return int(limit) if limit else None


def check_context(export_dir: Path, context: int, new_tokens: int, runtime: str | None = None) -> int | None:
    """Refuses, before any model is loaded, a context the export has no positions for (or a runtime this machine
    cannot run: that first, as no context would help); returns the limit."""
    runner_class(read_manifest(export_dir)["target"], runtime).check_host(export_dir)
    limit = export_positions(export_dir)
    if limit is not None and context + new_tokens > limit:
        raise UserError(f"--context {context} plus {new_tokens} decoded tokens is beyond the {limit} positions of "
                        f"{export_dir} (its manifest's context_length)")
    return limit


def n_ctx_for(context: int, new_tokens: int, limit: int | None) -> int:
    """The runner's sequence length: the context, the new tokens and a little room, within the export's limit."""
    return min(context + new_tokens + 8, limit) if limit else context + new_tokens + 8


def bench(export_dir: Path, prompt_tokens: int | None = None, new_tokens: int = 64, threads: int = 2,
          repeats: int = 3, runtime: str | None = None, context: int | None = None) -> dict:
    """Prefill of a `context`-token prompt, then `new_tokens` greedy decode steps, timed."""
    context = resolve_context(context, prompt_tokens)
    if new_tokens < 1 or repeats < 1:
        raise UserError("--new-tokens and repeats must be at least 1")
    export_dir = Path(export_dir)
    limit = check_context(export_dir, context, new_tokens, runtime)
    ids = prompt_ids(export_dir, context)
    with load_runner(export_dir, threads=threads, runtime=runtime,
                     n_ctx=n_ctx_for(context, new_tokens, limit)) as runner:
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
        "model": manifest.get("model"), "context": context, "prompt_tokens": context, "new_tokens": new_tokens,
        "repeats": repeats,
        "prefill_tokens_per_s": round(context / statistics.median(prefill_s), 2),
        "decode_tokens_per_s": round(new_tokens / statistics.median(decode_s), 2),
        "decode_ms_per_token_p50": round(statistics.median(step_ms), 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "runtime_settings": settings,
        "artifact_mb": round(sum(path_bytes(export_dir / f) for f in manifest.get("files", [])) / 2**20, 1),
    }


def _burst(runner, prompt: list[int], tokens: int, after_prompt: np.ndarray | None) -> tuple[float, np.ndarray]:
    """ms per decoded token at positions len(prompt).. (the same context every round), and the logits after
    the prompt: given those (`after_prompt`), the sequence is rewound to the prompt where the runtime can drop
    the end of its KV cache; else the prompt is prefilled again."""
    try:
        if after_prompt is None:
            raise NotImplementedError
        runner.rewind(len(prompt))
    except NotImplementedError:
        runner.reset()
        after_prompt = runner.prefill(prompt)
    logits = after_prompt
    t0 = time.perf_counter()
    for _ in range(tokens):
        logits = runner.decode(int(logits.argmax()))
    return (time.perf_counter() - t0) * 1000 / tokens, after_prompt


def interleaved(exports: dict[str, Path | tuple[Path, str]], rounds: int = 20, tokens: int = 16,
                prompt_tokens: int | None = None, threads: int = 2, context: int | None = None) -> dict:
    """Decode speed of several exports, for small differences on a noisy machine: all loaded in this
    process, each round decodes a short burst with every export in turn (the order reversed every other
    round) at a context of `context` tokens (prefilled once, rewound each round: see _burst). Per export
    the median ms/token over rounds and its spread; per pair the median of the per-round ratios and their
    spread. An export given as (directory, runtime) runs in that runtime."""
    context = resolve_context(context, prompt_tokens)
    if rounds < 3:
        raise UserError(f"interleaved rounds must be at least 3, not {rounds}")
    if tokens < 1:
        raise UserError(f"interleaved bursts need at least 1 token, not {tokens}")
    names = list(exports)
    exports = {n: (e, None) if isinstance(e, (str, Path)) else e for n, e in exports.items()}
    limits = {n: check_context(Path(exports[n][0]), context, tokens, exports[n][1]) for n in names}
    runners = []
    try:
        for n in names:
            runners.append(load_runner(exports[n][0], threads=threads, runtime=exports[n][1],
                                       n_ctx=n_ctx_for(context, tokens, limits[n])))
        prompt = prompt_ids(exports[names[0]][0], context)
        after_prompt = [_burst(r, prompt, tokens, None)[1] for r in runners]     # warm-up
        times: dict[str, list[float]] = {n: [] for n in names}
        for i in range(rounds):
            for n in (names if i % 2 == 0 else names[::-1]):
                k = names.index(n)
                times[n].append(_burst(runners[k], prompt, tokens, after_prompt[k])[0])
    finally:
        for r in runners:
            r.close()

    def ratio(a, b):
        per_round = [y / x for x, y in zip(times[a], times[b])]     # speed of a over b
        return {"median": round(statistics.median(per_round), 3),
                "spread": [round(min(per_round), 3), round(max(per_round), 3)]}
    return {"threads": threads, "rounds": rounds, "tokens_per_burst": tokens, "context": context,
            "prompt_tokens": context,
            "variants": {n: {"target": read_manifest(exports[n][0])["target"], "runtime": exports[n][1] or
                             read_manifest(exports[n][0])["target"], "quant": read_manifest(exports[n][0]).get("quant"),
                             "decode_ms_per_token": round(statistics.median(times[n]), 3),
                             "spread_ms": [round(min(times[n]), 3), round(max(times[n]), 3)]} for n in names},
            "speedups": {f"{a} over {b}": ratio(a, b) for a in names for b in names if a != b}}
