"""Decode speed of several exports, interleaved finely in one process: for small differences.

On a shared machine a whole-process benchmark per variant drifts by ±20% between rounds. Here
every export is loaded once (its own runtime session, same thread count), and each round
decodes a short burst of tokens with every variant in turn, many rounds; the figure per variant
is the median ms/token over rounds and each pair's ratio is the median of its per-round ratios.

    python bench/decode_ab.py runs/bench_onnx/lfuc-fp32 runs/bench_onnx/prune-fp32 --rounds 30
    python bench/decode_ab.py A B C --out bench/results/decode_ab_moe_lowering.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from runtimes.base import load_runner, read_manifest  # noqa: E402


def burst(runner, prompt: list[int], tokens: int) -> float:
    """ms per decoded token after a fresh prefill of `prompt` (the context stays the same every round)."""
    runner.reset()
    logits = runner.prefill(prompt)
    t0 = time.perf_counter()
    for _ in range(tokens):
        logits = runner.decode(int(logits.argmax()))
    return (time.perf_counter() - t0) * 1000 / tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("exports", nargs="+", type=Path)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=16, help="decoded tokens per burst")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="JSON results")
    args = ap.parse_args()
    names = [p.name for p in args.exports]
    runners = [load_runner(p, threads=args.threads) for p in args.exports]
    prompt = list(range(1000, 1000 + args.prompt_tokens))
    for r in runners:                                   # warm-up
        burst(r, prompt, args.tokens)
    times = {n: [] for n in names}
    for i in range(args.rounds):
        order = names if i % 2 == 0 else names[::-1]    # neither variant always runs first
        for n in order:
            times[n].append(burst(runners[names.index(n)], prompt, args.tokens))
    for r in runners:
        r.close()
    result = {"threads": args.threads, "rounds": args.rounds, "tokens_per_burst": args.tokens,
              "prompt_tokens": args.prompt_tokens,
              "variants": {n: {"target": read_manifest(p)["target"], "quant": read_manifest(p).get("quant"),
                               "decode_ms_per_token": round(statistics.median(times[n]), 3),
                               "spread_ms": [round(min(times[n]), 3), round(max(times[n]), 3)]}
                           for n, p in zip(names, args.exports)},
              "ratios": {f"{a} ÷ {b}": round(statistics.median(x / y for x, y in zip(times[a], times[b])), 3)
                         for a in names for b in names if a < b}}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
