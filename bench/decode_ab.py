"""Decode speed of several exports, interleaved finely in one process: for small differences.

On a shared machine a whole-process benchmark per variant drifts by ±20% between rounds. Here
every export is loaded once (its own runtime session, same thread count), and each round
decodes a short burst of tokens with every variant in turn, many rounds; the figure per variant
is the median ms/token over rounds and each pair's speed-up is the median of its per-round ratios
(`runtimes.bench.interleaved`, which the main job uses for its printed speed-up too).

    python bench/decode_ab.py runs/bench_onnx/lfuc-fp32 runs/bench_onnx/prune-fp32 --rounds 30
    python bench/decode_ab.py A B C --out bench/results/decode_ab_moe_lowering.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from runtimes.bench import interleaved  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("exports", nargs="+", type=Path)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=16, help="decoded tokens per burst")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="JSON results")
    args = ap.parse_args()
    result = interleaved({p.name: p for p in args.exports}, args.rounds, args.tokens, args.prompt_tokens, args.threads)
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
