"""CPT on the embedded SmolLM2: does a small training budget heal LF-UC, and does it beat pruning?

LF-UC and layer pruning, both at --ratio active parameters, each trained with the same budget
(same tokens, recipe and data), evaluated before and after against the dense model.
Writes bench/results/cpt_smollm2.md (and .json). Rerun:  python bench/cpt_smollm2.py
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from d2m_export.outputs import write_json
from d2m_export.pipeline import analyze, convert, evaluate
from d2m_export.train import TrainConfig, train

TASKS = ["arc_easy", "hellaswag", "piqa"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.8)
    ap.add_argument("--tokens", type=int, default=163_840, help="CPT budget per model (40 steps of 16 × 256)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--distill-weight", type=float, default=0.5, help="KL to the dense model (0: plain CE)")
    ap.add_argument("--limit", type=int, default=150, help="documents per task")
    ap.add_argument("--work", type=Path, default=Path("runs/bench_cpt"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpt_smollm2.md")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)

    def cached_eval(name, model):
        path = work / f"eval-{name}.json"
        if not path.exists():
            evaluate(model, path, tasks=TASKS, limit=args.limit)
        return json.loads(path.read_text())

    if not (work / "analysis" / "similarity.json").exists():
        analyze("smollm2-135m", work / "analysis")
    rows = {"dense": cached_eval("dense", "smollm2-135m")}
    timings = {}
    for method in ("lfuc", "prune"):
        converted = work / f"{method}-{args.ratio}"
        if not (converted / "config.json").exists():
            convert("smollm2-135m", converted, method_name=method, target_ratio=args.ratio,
                    analysis=work / "analysis" / "similarity.json")
        rows[f"{method} before CPT"] = cached_eval(f"{method}-before", str(converted))
        trained = work / f"{method}-{args.ratio}-cpt"
        if not (trained / "config.json").exists():
            train(TrainConfig(model=str(converted), out=str(trained), tokens=args.tokens, seq_len=args.seq_len,
                              lr=args.lr, distill_from="smollm2-135m" if args.distill_weight else None,
                              distill_weight=args.distill_weight, save_every=10**9))
        timings[method] = json.loads((trained / "d2m_plan.json").read_text())["training"]["wall_s"]
        rows[f"{method} after CPT"] = cached_eval(f"{method}-after", str(trained))
        log = [json.loads(x) for x in (trained / "train_log.jsonl").read_text().splitlines()]
        timings[f"{method}_tokens_per_s"] = round(sum(r["tokens_per_s"] for r in log) / len(log), 1)

    table = render(rows, args, timings)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    write_json(args.out.with_suffix(".json"), {"args": {k: str(v) for k, v in vars(args).items()},
                                              "timings_s": timings, "rows": rows})
    print(table)


def render(rows: dict, args, timings: dict) -> str:
    head = ["model", "active params", "Austen ppl"] + [f"{t} acc" for t in TASKS] + ["mean acc"]
    lines = [f"# CPT on SmolLM2-135M at active ratio {args.ratio}", "",
             f"Budget per model: {args.tokens} tokens of Brown + CoQA/SQuAD passages (seq {args.seq_len}), "
             f"lr {args.lr}, cosine, " + (f"loss (1-w)·CE + w·KL to the dense model, w = {args.distill_weight}"
                                          if args.distill_weight else "plain causal-LM loss") + ".",
             f"Evaluation: Austen perplexity (held out), zero-shot tasks on the first {args.limit} documents.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        accs = [r["tasks"][t]["acc"] for t in TASKS]
        cells = [name, f"{r['params']['active'] / 1e6:.1f}M", f"{r['perplexity']['value']:.2f}"]
        cells += [f"{a:.3f}" for a in accs] + [f"{sum(accs) / len(accs):.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Training wall time (s) and mean throughput (tokens/s): " + json.dumps(timings), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
