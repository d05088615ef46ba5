"""Where ONNX Runtime spends a decode step: time per operator type for dense, prune@0.8 and LF-UC@0.8
SmolLM2, from ONNX Runtime's own profiler, and which operators hold LF-UC's difference from prune and
each model's distance from dense × its roofline.

The exports are `bench/decode_context_smollm2.py`'s (its `--work`, `exports/{model}-onnx-{quant}`). Each
model is profiled in turn, `--rounds` times, in one process: a `--context`-token prompt, then `--tokens`
greedy decode steps; only the decode steps' node times are counted (the profiler's `model_run` spans
after the prompt's). Per-node times include the profiler's own overhead (a few µs per node), so the
table's totals are above the unprofiled ms/token; the differences between models are what it is for.

Rerun: python bench/profile_decode_onnx.py --quant int4 --context 64
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sidebyside import ROOT, publish  # noqa: E402

MODELS = ("dense", "prune", "lfuc")


def decode_profile(export_dir: Path, context: int, tokens: int, threads: int, prefix: Path) -> dict:
    """{op type: ms per decode step}, plus "(model_run)": the whole step as the session saw it."""
    from runtimes.base import load_runner

    with load_runner(export_dir, threads=threads, profile=prefix, n_ctx=context + tokens + 8) as runner:
        logits = runner.prefill([(7 * i) % 1000 + 100 for i in range(context)])
        for _ in range(tokens):
            logits = runner.decode(int(logits.argmax()))
        trace = json.loads(runner.end_profiling().read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace if e.get("cat") == "Session" and e["name"] == "model_run")
    decode_runs = runs[1:]                      # the first run is the prompt
    start = decode_runs[0][0]
    per_op = defaultdict(float)
    for e in trace:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            per_op[e["args"]["op_name"]] += e["dur"]
    steps = len(decode_runs)
    out = {op: us / 1000 / steps for op, us in per_op.items()}
    out["(model_run)"] = sum(b - a for a, b in decode_runs) / 1000 / steps
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "decode_context_healed")
    ap.add_argument("--quant", default="int4", choices=["fp32", "int4"])
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--exports", default="", help="other onnx exports to compare, as dense=DIR,prune=DIR,lfuc=DIR "
                                                   "(e.g. the healing study's at another ratio)")
    ap.add_argument("--label", default="", help="what --exports are, for the table's title and file name")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    exports = {m: args.work / "exports" / f"{m}-onnx-{args.quant}" for m in MODELS}
    for item in filter(None, args.exports.split(",")):
        name, _, path = item.partition("=")
        if name not in MODELS:
            sys.exit(f"--exports takes {', '.join(MODELS)}, not {name!r}")
        exports[name] = Path(path)
    if missing := [str(p) for p in exports.values() if not (p / "manifest.json").is_file()]:
        sys.exit(f"no export at {', '.join(missing)}: run bench/decode_context_smollm2.py --prepare --only onnx "
                 f"--work {args.work} first")
    samples = {m: [] for m in MODELS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for m in MODELS:
                samples[m].append(decode_profile(exports[m], args.context, args.tokens, args.threads,
                                                 Path(tmp) / f"{m}-{r}"))
                print(f"round {r + 1}/{args.rounds} {m}: {samples[m][-1]['(model_run)']:.2f} ms/step", flush=True)
    ops = sorted({op for rows in samples.values() for row in rows for op in row})
    table = {m: {op: round(statistics.median(row.get(op, 0.0) for row in samples[m]), 4) for op in ops}
             for m in MODELS}
    suffix = f"_{args.label}" if args.label else ""
    out = args.out or ROOT / "bench" / "results" / f"profile_decode_onnx_{args.quant}_{args.context}{suffix}.md"
    argv = f"--quant {args.quant} --context {args.context}" + (
        f" --exports {args.exports} --label {args.label}" if args.exports else "")
    publish(out, {"quant": args.quant, "context": args.context, "tokens": args.tokens, "rounds": args.rounds,
                  "threads": args.threads, "ms_per_step": table, "label": args.label,
                  "exports": {m: str(p) for m, p in exports.items()}, "argv": argv}, render)


def render(result: dict) -> str:
    t = result["ms_per_step"]
    ops = sorted((op for op in t["dense"] if op != "(model_run)"), key=lambda op: -t["dense"].get(op, 0.0))
    what = f" ({result['label']})" if result.get("label") else ""
    lines = [f"# ONNX Runtime decode profile: SmolLM2 {result['quant']}, context {result['context']}{what}", "",
             f"ONNX Runtime's profiler, {result['threads']} threads, {result['tokens']} greedy decode steps after a "
             f"{result['context']}-token prompt, median of {result['rounds']} rounds; ms per decode step by operator "
             "type (the profiler's per-node overhead included, so totals exceed unprofiled ms/token).", "",
             "| operator | dense | prune | LF-UC | LF-UC − prune | dense − prune |", "|---|---|---|---|---|---|"]
    for op in [*ops, "(model_run)"]:
        d, p, lf = (t[m].get(op, 0.0) for m in MODELS)
        lines.append(f"| {op} | {d:.3f} | {p:.3f} | {lf:.3f} | {lf - p:+.3f} | {d - p:+.3f} |")
    node_sum = {m: sum(v for k, v in t[m].items() if k != "(model_run)") for m in MODELS}
    lines += ["", "Sum of nodes / whole step (the rest is the session's own work between nodes): " + ", ".join(
        f"{m} {node_sum[m]:.2f} / {t[m]['(model_run)']:.2f} ms" for m in MODELS),
              "", f"Rerun: `python bench/profile_decode_onnx.py {result['argv']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
