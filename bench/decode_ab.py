"""Decode speed of several exports, interleaved finely in one process: for small differences.

On a shared machine a whole-process benchmark per variant drifts by ±20% between rounds. Here
every export is loaded once (its own runtime session, same thread count), and each round
decodes a short burst of tokens with every variant in turn, many rounds; the figure per variant
is the median ms/token over rounds and each pair's speed-up is the median of its per-round ratios
(`runtimes.bench.interleaved`, which the main job uses for its printed speed-up too).

    python bench/decode_ab.py runs/bench_onnx/lfuc-fp32 runs/bench_onnx/prune-fp32 --rounds 30
    python bench/decode_ab.py A B C --context 2048 --out bench/results/moe_lowering_onnx.md

`--context N`: N tokens are in the KV cache when the timed decode starts (an N-token prompt, then
the burst); `--prompt-tokens` is its older name. Bad input is one `d2m-export: error:` line, exit 2.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from d2m_export.cli.args import POSITIVE, OneLineParser  # noqa: E402
from d2m_export.errors import UserError  # noqa: E402
from runtimes.bench import interleaved  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(prog="decode_ab.py", description=__doc__.splitlines()[0])
    ap.add_argument("exports", nargs="+", type=Path)
    ap.add_argument("--rounds", type=POSITIVE, default=30)
    ap.add_argument("--tokens", type=POSITIVE, default=16, help="decoded tokens per burst")
    ap.add_argument("--context", type=POSITIVE, default=None, metavar="N",
                    help="tokens in the KV cache when the timed bursts start (default 64)")
    ap.add_argument("--prompt-tokens", type=POSITIVE, default=None, help="the same as --context (its older name)")
    ap.add_argument("--threads", type=POSITIVE, default=2)
    ap.add_argument("--out", type=Path, default=None, help="results: a .md table, with the JSON beside it")
    ap.add_argument("--title", default="Decode, interleaved in one process")
    args = ap.parse_args(argv)
    try:
        result = interleaved({p.name: p for p in args.exports}, args.rounds, args.tokens, args.prompt_tokens,
                             args.threads, context=args.context)
    except UserError as e:
        print(f"d2m-export: error: {e}", file=sys.stderr)
        return 2
    table = render(result, args.title, " ".join(sys.argv[1:] if argv is None else argv))
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        args.out.with_suffix(".md").write_text(table)
    return 0


def render(r: dict, title: str, argv: str) -> str:
    names = list(r["variants"])
    context = r.get("context", r["prompt_tokens"])
    lines = [f"# {title}", "", f"{r['threads']} threads; context {context} (after a {context}-token prompt), bursts of "
             f"{r['tokens_per_burst']} decoded tokens, every export in turn, {r['rounds']} rounds in one process "
             "(order reversed every other round). Medians over rounds; spread = min–max.", "",
             "| export | target | quant | decode ms/token | spread ms | tok/s |", "|---|---|---|---|---|---|"]
    for n, v in r["variants"].items():
        lines.append(f"| {n} | {v['target']} | {v['quant']} | {v['decode_ms_per_token']} | "
                     f"{v['spread_ms'][0]}–{v['spread_ms'][1]} | {1000 / v['decode_ms_per_token']:.1f} |")
    lines += ["", "Speed of the row's export over the column's (median of per-round ratios):", "",
              "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for a in names:
        cells = ["-" if a == b else f"{r['speedups'][f'{a} over {b}']['median']:.3f}" for b in names]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    lines += ["", f"Rerun: `python bench/decode_ab.py {argv}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
