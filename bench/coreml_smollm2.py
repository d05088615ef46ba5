"""Core ML exports of the embedded SmolLM2 and its LF-UC conversion: sizes, conversion time, verification.

Core ML predicts only on macOS, so there is no speed here: each export (fp16 and int4, dense and
LF-UC at --ratio) is converted with `d2m-export --target coreml` in its own process and the
figures are read back from its manifest.json — package size, wall time, the saved program's
structure, and the three checks made without Core ML (the traced lowered module in fp32, the
package's stored weights in fp32, and an fp16-compute proxy on PyTorch's CPU kernels).
Writes bench/results/coreml_smollm2.md (and .json). Rerun:  python bench/coreml_smollm2.py
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from d2m_export.outputs import write_json

QUANTS = ("fp16", "int4")


def run(cmd: list[str]) -> float:
    t = time.time()
    subprocess.run(cmd, check=True)
    return round(time.time() - t, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.8, help="LF-UC target active ratio")
    ap.add_argument("--lfuc", type=Path, default=Path("runs/bench_coreml/lfuc"),
                    help="an LF-UC conversion of SmolLM2 (made with `d2m-export convert` if missing)")
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--quants", nargs="+", default=list(QUANTS))
    ap.add_argument("--work", type=Path, default=Path("runs/bench_coreml"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "coreml_smollm2.md")
    args = ap.parse_args()
    cli = [sys.executable, "-m", "d2m_export.cli"]
    timings = {}
    if not (args.lfuc / "config.json").exists():
        timings["lfuc_convert_s"] = run([*cli, "convert", "--target-active-ratio", str(args.ratio), "--out", str(args.lfuc)])
    rows = []
    for label, model in (("dense", "smollm2-135m"), (f"LF-UC {args.ratio}", str(args.lfuc))):
        for quant in args.quants:
            out = args.work / f"{label.split()[0].lower()}-{quant}"
            if not (out / "manifest.json").exists():
                wall = run([*cli, "--target", "coreml", "--model", model, "--quant", quant,
                            "--max-seq-len", str(args.max_seq_len), "--out", str(out)])
            else:
                wall = None
            manifest = json.loads((out / "manifest.json").read_text())
            rows.append({"model": label, "quant": quant, "dir": str(out), "process_wall_s": wall, "manifest": manifest})
    plan = json.loads((args.lfuc / "d2m_plan.json").read_text())
    write_json(args.out.with_suffix(".json"), {
        "ratio": args.ratio, "max_seq_len": args.max_seq_len, "timings": timings, "lfuc_plan": plan.get("plan"),
        "lfuc_params": plan.get("params"), "cpu_count": os.cpu_count(),
        "exports": [{k: v for k, v in r.items() if k != "manifest"} | {
            "sizes_mb": r["manifest"]["sizes_mb"], "wall_s": r["manifest"]["wall_s"], "coreml": r["manifest"]["coreml"],
            "parity": {k: v for k, v in r["manifest"]["parity"].items() if k != "prompts"},
            "verification": r["manifest"]["verification"]} for r in rows]})
    args.out.write_text(render(rows, plan, args))
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


def render(rows: list[dict], plan: dict, args) -> str:
    def fig(check: dict) -> str:
        return f"{check['greedy_match']}/{check['greedy_total']}, {check['max_abs_logit_err']:.2g}"

    lines = [
        "# Core ML exports of SmolLM2-135M (dense and LF-UC)",
        "",
        "Made by `python bench/coreml_smollm2.py` (`d2m-export --target coreml`, one process per export) on a "
        f"{os.cpu_count()}-core Linux machine shared with other jobs: wall times are indicative only. Core ML "
        "cannot predict on Linux, so there are no speed figures; every check below ran without Core ML "
        "(manifest `parity.checked_on: pytorch-lowered-module` and `verification`).",
        "",
        f"LF-UC: `d2m-export convert --target-active-ratio {args.ratio}`; blocks (host ← donors) "
        + ", ".join(f"{b['host']} ← {b['donors']}" for b in plan["plan"]["blocks"])
        + f"; {plan['params']['active'] / 1e6:.1f}M active of {plan['params']['total'] / 1e6:.1f}M parameters "
        f"(dense {plan['params']['dense_active'] / 1e6:.1f}M). KV cache length (`--max-seq-len`) {args.max_seq_len}.",
        "",
        "| model | quant | .mlpackage MB | weight file MB | layers (MoE: experts) | export s | checks s "
        "| fp32 lowered module: greedy, max err | stored weights fp32: greedy, max err | fp16 proxy: greedy, max err |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["manifest"]
        v, info = m["verification"], m["coreml"]
        moe = info["moe_layers"]
        layers = info["states"]["key_cache"]["shape"][0]
        moe_s = f"{layers} ({len(moe)}: {'/'.join(str(e) for e in moe.values())})" if moe else f"{layers} (0)"
        lines.append(
            f"| {r['model']} | {r['quant']} | {sum(m['sizes_mb'].values()):.1f} | {info['weight_file_mb']:.1f} | {moe_s} "
            f"| {m['wall_s']['export']} | {m['wall_s']['parity']} | {fig(m['parity'])} | {fig(v['stored_weights'])} "
            f"| {fig(v['fp16_compute_proxy'])} |")
    lines += [
        "",
        "- *export s*: load, lower, trace, convert (coremltools), compress, save and read back the program; "
        "*checks s*: the transformers reference (2 prompts × 32 greedy tokens) and the three checks.",
        "- *fp32 lowered module*: the TorchScript graph handed to coremltools, run in fp32 against transformers "
        "(teacher-forced; free-running greedy decoding is also required to be identical). This gates the export.",
        "- *stored weights fp32*: the weights as the package stores them (fp16, or int4 decompressed) loaded into the "
        "same module, fp32 compute: the quantization's own effect. Gated like other targets' lossy quants.",
        "- *fp16 proxy*: the same in fp16 on PyTorch's CPU kernels. Core ML's kernels may accumulate differently; "
        "recorded, not gated.",
        "",
    ]
    first = rows[-1]["manifest"]
    v = first["verification"]
    lines += [f"## Verification report ({rows[-1]['model']}, {rows[-1]['quant']})", "", "Checked:", ""]
    lines += [f"- {s}" for s in v["checked"]]
    lines += ["", "Not checked (needs a Mac or an iPhone):", ""] + [f"- {s}" for s in v["not_checked"]]
    info = first["coreml"]
    lines += ["", "## Interface (every export)", "",
              "| name | kind | dtype | shape |", "|---|---|---|---|"]
    for kind in ("inputs", "outputs", "states"):
        for name, t in info[kind].items():
            shape = t["shape"] if "ranges" not in t else [f"{lo}..{hi}" if lo != hi else lo for lo, hi in t["ranges"]]
            lines.append(f"| `{name}` | {kind[:-1]} | {t['dtype']} | {shape} |")
    lines += ["", f"Ops in the {rows[-1]['model']} {rows[-1]['quant']} program: "
              + ", ".join(f"{k} {n}" for k, n in info["ops"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
