"""The SmolLM2 Pareto sweep: does LF-UC dominate layer pruning on this model?

Runs `d2m-export sweep` (dense, lfuc and prune at active ratios 0.9/0.8/0.7; eval, ONNX export,
bench), optionally a second sweep that adds CPT variants at --cpt-ratios, then `d2m-export report`
over every run into bench/results/sweep_smollm2/ (pareto.png, report.md/.json/.html) and writes
summary.md: method against method at each ratio, on perplexity, accuracy and measured latency.
Rerun:  python bench/sweep_smollm2.py [--cpt-tokens 163840 --cpt-ratios 0.8]
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from sidebyside import CLI, sh

DEVICES = ["pixel-8-pro", "galaxy-s24-ultra", "iphone-15-pro", "raspberry-pi-5", "jetson-orin-nano",
           "macbook-air-m3", "host"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="1.0,0.9,0.8,0.7")
    ap.add_argument("--limit", type=int, default=150, help="documents per task")
    ap.add_argument("--cpt-tokens", type=int, default=0, help="also train lfuc/prune at --cpt-ratios (0: no CPT)")
    ap.add_argument("--cpt-ratios", default="0.8")
    ap.add_argument("--work", type=Path, default=Path("runs/sweep_smollm2"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sweep_smollm2")
    args = ap.parse_args()
    common = ["--model", "smollm2-135m", "--methods", "lfuc,prune", "--targets", "onnx", "--limit", args.limit,
              "--threads", 2, "--devices", *DEVICES, "--out", args.work]
    sh([*CLI, "sweep", "--ratios", args.ratios, *common])
    if args.cpt_tokens:
        sh([*CLI, "sweep", "--ratios", args.cpt_ratios, "--cpt-tokens", args.cpt_tokens, *common])
    if args.out.exists():
        shutil.rmtree(args.out)
    sh([*CLI, "report", args.work, "--devices", *DEVICES, "--out", args.out])
    report = json.loads((args.out / "report.json").read_text())
    summary = render(report, args)
    (args.out / "summary.md").write_text(summary)
    print(summary)


def verdicts(runs: dict) -> list[str]:
    """LF-UC against pruning at each ratio (and CPT state) both were run at."""
    out = []
    for name, lf in sorted(runs.items()):
        if not name.startswith("lfuc-") or name.replace("lfuc-", "prune-", 1) not in runs:
            continue
        pr = runs[name.replace("lfuc-", "prune-", 1)]
        better = {"perplexity": lf["perplexity"] < pr["perplexity"], "mean accuracy": lf["mean_acc"] > pr["mean_acc"]}
        lat = {k: (lf["measured"][k], pr["measured"][k]) for k in lf["measured"] if k in pr["measured"]}
        better.update({f"{k} latency": a < b for k, (a, b) in lat.items()})
        wins = [k for k, v in better.items() if v]
        losses = [k for k, v in better.items() if not v]
        what = ("dominates" if not losses else "is dominated by" if not wins else "trades with")
        out.append(f"- {name} {what} {pr['name']}: ppl {lf['perplexity']:.1f} vs {pr['perplexity']:.1f}, "
                   f"mean acc {lf['mean_acc']:.3f} vs {pr['mean_acc']:.3f}, "
                   + ", ".join(f"{k} {a:.2f} vs {b:.2f} ms" for k, (a, b) in lat.items())
                   + (f" (LF-UC better on: {', '.join(wins)})" if wins and losses else ""))
    return out


def render(report: dict, args) -> str:
    runs = {r["name"]: r for r in report["runs"]}
    lines = ["# SmolLM2-135M: LF-UC vs layer pruning across active ratios", "",
             "`python bench/sweep_smollm2.py`. "
             f"Zero-shot accuracy on the first {args.limit} documents of arc_easy, hellaswag and piqa "
             f"(mean ± ~0.025 at this n), Austen perplexity over 10,220 held-out tokens, ONNX Runtime fp32 "
             "decode (2 threads) measured one variant after another on a quiet machine. Plots and every "
             "figure: report.md / report.html / pareto.png beside this file.", "",
             "## Method against method at the same active ratio", "", *verdicts(runs), "",
             "## Pareto frontiers (accuracy vs latency)", "",
             *[f"- {k}: {', '.join(v)}" for k, v in report["pareto"].items()], ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
