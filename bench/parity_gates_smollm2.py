"""The figures behind the lossy parity gates: SmolLM2-135M dense, LF-UC 0.8 unhealed and healed, every lossy quant.

Each export is made with its gate lifted (measured, not gated) and scored as the parity check scores it
(converters.parity): the fixed text, teacher-forced, against transformers fp32 — top-1 agreement, mean /
p99 KL(reference || export), perplexity ratio — and the prompts' greedy agreement, which no longer
gates lossy quants. Core ML is scored where its check runs (the package's stored weights in the lowered
module, fp32 compute). Two more ONNX int4 rows per LF-UC model: `--head-bits 8`, and the export with one
expert's quantization scales zeroed (what the gates can and cannot see at 4 bits).

Rerun:  python bench/parity_gates_smollm2.py      (writes bench/results/parity_gates_smollm2.md and .json)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sidebyside import ROOT, convert, publish  # noqa: E402

LOSSY = {"onnx": ("fp16", "int8", "int4"), "gguf": ("f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"),
         "executorch": ("8da8w", "8da4w"), "coreml": ("fp16", "int8", "int4")}
KEYS = ("top1_agreement", "decisive_top1_agreement", "decisive_positions", "mean_kl", "p99_kl", "ppl_ratio")


def measure(target: str, model: str, quant: str, out: Path, variant: str) -> dict:
    """One export with its gate lifted; the parity figures (run in a process of its own)."""
    import shutil

    from converters.base import export, get_target, lossy
    from converters.parity import check_parity

    exporter = get_target(target)
    exporter.tolerances = {q: lossy(0.0, float("inf")) for q in exporter.quants}
    shutil.rmtree(out, ignore_errors=True)
    manifest = export(target, model, quant, out, threads=1,
                      options={"head_bits": 8} if variant == "head-bits 8" else None)
    parity = manifest["parity"]
    if variant == "one expert zeroed":
        sys.path.insert(0, str(ROOT / "tests"))
        from test_parity_gates import zero_expert_scales

        zero_expert_scales(out, expert=0)
        parity = check_parity(exporter, Path(model), out, quant, threads=1)
    checked = manifest["verification"]["stored_weights"] if target == "coreml" else parity
    shutil.rmtree(out, ignore_errors=True)
    return {"greedy": [checked["greedy_match"], checked["greedy_total"]],
            **{k: checked["text"][k] for k in (*KEYS, "positions")}}


def render(result: dict) -> str:
    rows = result["rows"]
    lines = ["# Parity gates on SmolLM2-135M: the fixed text, teacher-forced, against transformers fp32", "",
             "Made by `python bench/parity_gates_smollm2.py`: each export scored as `converters.parity` scores it, "
             "its gate lifted. *top-1*: share of the fixed text's positions where the export's argmax is the "
             "reference's, over all positions and over those where the reference is decisive (its top token "
             "at least e times as likely as the runner-up; how many in brackets), the one gated; *KL*: "
             "KL(reference ‖ export) of the next-token distributions, nats (mean and 99th "
             "percentile); *ppl ×*: the export's perplexity on the text ÷ the reference's; *greedy*: the prompts' "
             "teacher-forced greedy agreement (reported only). LF-UC: `convert --target-active-ratio 0.8`, "
             "unhealed (`--no-heal`) and healed (the default). Reference perplexity on the text: "
             + ", ".join(f"{k} {v:.2f}" for k, v in result["ppl_reference"].items()) + ".", "",
             "| target | quant | model | variant | top-1 | top-1 decisive | mean KL | p99 KL | ppl × | greedy "
             "| gate (decisive top-1 ≥, KL ≤) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gate = result["gates"].get(f"{r['target']} {r['quant']}")
        greedy = f"{r['greedy'][0]}/{r['greedy'][1]}"
        decisive = f"{r['decisive_top1_agreement']:.3f} ({r['decisive_positions']})"
        lines.append(f"| {r['target']} | {r['quant']} | {r['model']} | {r['variant']} | {r['top1_agreement']:.3f} | "
                     f"{decisive} | {r['mean_kl']:.4f} | {r['p99_kl']:.3f} | {r['ppl_ratio']:.3f} | {greedy} | "
                     f"{f'{gate[0]:g}, {gate[1]:g}' if gate and not r['variant'] else ''} |")
    if result.get("missing"):
        lines += ["", "Not measured yet (the run was stopped; `python bench/parity_gates_smollm2.py` resumes it): "
                  + ", ".join(result["missing"]) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "parity_gates")
    ap.add_argument("--one", nargs=5, metavar=("TARGET", "MODEL", "QUANT", "OUT", "VARIANT"))
    ap.add_argument("--publish-done", action="store_true",
                    help="publish the rows measured so far (the table says which are missing); measure nothing")
    args = ap.parse_args()
    if args.one:
        target, model, quant, out, variant = args.one
        print(json.dumps(measure(target, model, quant, Path(out), variant)))
        return
    from converters.base import get_target
    from d2m_export.sources.models import DEFAULT_MODEL, resolve_model

    work = args.work
    models = {"dense": str(resolve_model(DEFAULT_MODEL)),
              "LF-UC unhealed": str(convert("lfuc", 0.8, work / "lfuc-unhealed", "--no-heal")),
              "LF-UC healed": str(convert("lfuc", 0.8, work / "lfuc-healed", "--heal"))}
    cache = work / "rows.json"
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    jobs = [(t, q, name, "") for t, quants in LOSSY.items() for q in quants for name in models]
    jobs += [("onnx", "int4", name, variant) for name in models if name != "dense"
             for variant in ("head-bits 8", "one expert zeroed")]
    missing = [f"{t} {q} {n} {v}".strip() for t, q, n, v in jobs if f"{t} {q} {n} {v}" not in done]
    for target, quant, name, variant in jobs:
        key = f"{target} {quant} {name} {variant}"
        if key not in done and not args.publish_done:
            run = subprocess.run([sys.executable, __file__, "--one", target, models[name], quant,
                                  str(work / "export"), variant or "-"], capture_output=True, text=True, cwd=ROOT)
            if run.returncode:
                sys.exit(f"{key}: {run.stderr[-2000:]}")
            done[key] = {"target": target, "quant": quant, "model": name, "variant": variant,
                         **json.loads(run.stdout.strip().splitlines()[-1])}
            cache.write_text(json.dumps(done, indent=1))
            print(key, done[key], flush=True)
            missing.remove(key.strip())
    from d2m_export.sources.models import load_fp32_compute
    import converters.parity as parity

    ppl = {}
    for name, path in models.items():
        model, tokenizer, _ = load_fp32_compute(path)
        refs = parity.reference_text(model, tokenizer, parity.TEXT_WINDOW)
        score = parity.TextScore()
        for window, logits in refs:
            for row, target in zip(logits, window[parity.TEXT_PREFILL:]):
                score.add(row, row, target)
        ppl[name] = score.result()["ppl_reference"]
    gates = {f"{t} {q}": (get_target(t).tolerances[q].min_decisive_top1_agreement, get_target(t).tolerances[q].max_mean_kl)
             for t, quants in LOSSY.items() for q in quants}
    publish(ROOT / "bench" / "results" / "parity_gates_smollm2.md",
            {"rows": list(done.values()), "gates": gates, "ppl_reference": ppl, "missing": missing}, render)


if __name__ == "__main__":
    main()
