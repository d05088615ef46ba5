"""Decode speed against context on SmolLM2: dense, prune@0.8 and LF-UC@0.8 (routed and shared host) in every runtime.

One cell per (runtime, precision, context): the four models' exports are loaded in one process and decode
16-token bursts in turn at positions `context`.., `--rounds` rounds, order reversed every other round
(`runtimes.bench.interleaved`: the prompt is prefilled once and the KV cache rewound to it after each
burst); the figures are medians over rounds and the ratios medians of per-round ratios. Beside them: the roofline ratio LF-UC ÷ dense (weights read at the export's precision +
KV cache read at that context, `d2m_export.devices.roofline.decode_cost`), each export's files in MB, and the peak
RSS of decoding it alone at that context (`d2m-export bench`, its own process).

Every finished cell is kept under `--work` (`cells/*.json`), so a rerun resumes where the last one stopped;
`--only` restricts the run to some runtimes, `--contexts` to some contexts.

    python bench/decode_context_smollm2.py --only onnx --contexts 64,2048
    python bench/decode_context_smollm2.py --prepare # the exports only, on a busy machine
    python bench/decode_context_smollm2.py           # every cell (an hour or two on 2 cores)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sidebyside import CLI, ROOT, convert, export, publish, sh  # noqa: E402

MODELS = ("dense", "prune", "lfuc", "lfuc-shared")
# runtime -> (target, precisions, runtime the export runs in)
RUNTIMES = {"onnx": ("onnx", ("fp32", "int4"), None), "genai": ("onnx", ("int4",), "onnxruntime-genai"),
            "llama.cpp": ("gguf", ("f16", "q8_0", "q4_0", "q4_k_m"), None),
            "executorch": ("executorch", ("fp32", "8da4w"), None)}
KV_BYTES = {"gguf": 2.0}        # llama.cpp's default f16 KV cache; the others keep fp32
CONTEXTS = (64, 512, 2048, 4096)
MAX_SEQ_LEN = 4096 + 64


def models(work: Path, ratio: float, heal: bool) -> dict[str, Path]:
    from d2m_export.sources.models import DEFAULT_MODEL, resolve_model

    extra = () if heal else ("--no-heal",)
    return {"dense": resolve_model(DEFAULT_MODEL),
            "prune": convert("prune", ratio, work / f"prune-{ratio}", *extra),
            "lfuc": convert("lfuc", ratio, work / f"lfuc-{ratio}", *extra),
            "lfuc-shared": convert("lfuc", ratio, work / f"lfuc-shared-{ratio}", "--host-mode", "shared", *extra)}


def exports_of(work: Path, sources: dict[str, Path], target: str, quant: str) -> dict[str, Path]:
    seq = ("--max-seq-len", MAX_SEQ_LEN) if target != "gguf" else ()
    dirs = {}
    for m in MODELS:
        dirs[m] = work / "exports" / f"{m}-{target}-{quant}"
        export(sources[m], target, dirs[m], "--quant", quant, *seq)
    return dirs


def files_mb(path: Path) -> float:
    from converters.base import path_bytes

    files = json.loads((path / "manifest.json").read_text())["files"]
    return round(sum(path_bytes(path / f) for f in files) / 1e6, 1)


def roofline_bytes(model_dir: Path, precision: str, context: int, kv_bytes: float) -> float:
    from d2m_export.sources.models import read_config
    from d2m_export.devices.roofline import decode_cost

    return decode_cost(read_config(Path(model_dir)), precision, context, kv_bytes).bytes


def peak_rss(path: Path, runtime: str | None, context: int, work: Path) -> float:
    out = work / "rss" / f"{path.name}-{runtime or 'own'}-{context}.json"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        sh([*CLI, "bench", path, "--context", context, "--new-tokens", 16, "--repeats", 1, "--threads", 2,
            "--out", out, *(["--runtime", runtime] if runtime else [])])
    return json.loads(out.read_text())["peak_rss_mb"]


def cell(work: Path, sources: dict, runtime: str, quant: str, context: int, rounds: int, redo: bool = False) -> dict:
    from runtimes.bench import interleaved

    path = work / "cells" / f"{runtime}-{quant}-{context}.json"
    if path.is_file() and not redo:
        return json.loads(path.read_text())
    target, _, runs_in = RUNTIMES[runtime]
    dirs = exports_of(work, sources, target, quant)
    load = round(os.getloadavg()[0], 2)             # other work on the machine when the timing started
    timing = interleaved({m: (d, runs_in) for m, d in dirs.items()}, rounds=rounds, tokens=16, context=context)
    roof = {m: roofline_bytes(sources[m], quant, context, KV_BYTES.get(target, 4.0)) for m in MODELS}
    rows = {}
    for m in MODELS:
        speed = timing["speedups"]
        rows[m] = {"ms_per_token": timing["variants"][m]["decode_ms_per_token"], "files_mb": files_mb(dirs[m]),
                   "peak_rss_mb": peak_rss(dirs[m], runs_in, context, work)}
        if m != "dense":
            over_dense = speed[f"{m} over dense"]["median"]
            rows[m].update({"over_prune": speed[f"{m} over prune"]["median"] if m != "prune" else 1.0,
                            "over_dense": over_dense, "roofline_over_dense": round(roof["dense"] / roof[m], 3),
                            "of_roofline": round(over_dense / (roof["dense"] / roof[m]), 3)})
    result = {"runtime": runtime, "quant": quant, "context": context, "rounds": rounds, "load_1min": load, "models": rows,
              "speedups": timing["speedups"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def render(result: dict) -> str:
    lines = ["# Decode speed against context: SmolLM2 dense, prune@0.8, LF-UC@0.8 (routed and shared host)", "",
             result["about"], "",
             "| runtime | precision | context | model | ms/token | ÷ prune | ÷ dense | roofline ÷ dense | of roofline "
             "| files MB | decode peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["cells"]:
        for m, r in c["models"].items():
            lines.append(f"| {c['runtime']} | {c['quant']} | {c['context']} | {m} | {r['ms_per_token']} | "
                         f"{r.get('over_prune', '')} | {r.get('over_dense', '')} | {r.get('roofline_over_dense', '')} | "
                         f"{r.get('of_roofline', '')} | {r['files_mb']} | {r['peak_rss_mb']} |")
    missing = result["missing"]
    loads = {f"{c['runtime']} {c['quant']} @{c['context']}": c.get("load_1min", "not recorded") for c in result["cells"]}
    lines += ["", "1-minute load average when each cell's timing began (2 cores): "
              + ", ".join(f"{k} {v}" for k, v in loads.items()) + "."]
    if result.get("note"):
        lines += ["", result["note"]]
    lines += ["", "Cells not run yet: " + (", ".join(missing) if missing else "none."), "",
              f"Rerun: `python bench/decode_context_smollm2.py {result['argv']}`", ""]
    return "\n".join(lines)


def rerun_args(argv: list[str]) -> list[str]:
    """The command line to print under the table, without its --note."""
    out, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--note="):
            skip = False
            continue
        skip = arg == "--note"
        if not skip:
            out.append(arg)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.8)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    ap.add_argument("--only", default=",".join(RUNTIMES), help=f"runtimes, of {', '.join(RUNTIMES)}")
    ap.add_argument("--note", default="", help="a remark printed under the table (e.g. what else ran)")
    ap.add_argument("--prepare", action="store_true",
                    help="only convert and export (no timing): that part needs no quiet machine")
    ap.add_argument("--no-heal", action="store_true", help="convert without healing (speed does not depend on it)")
    ap.add_argument("--redo", action="store_true", help="time the cells asked for again (a finished cell is kept "
                                                         "otherwise, so an interrupted run resumes)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "decode_context")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "decode_context_smollm2.md")
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    only = args.only.split(",")
    if unknown := [r for r in only if r not in RUNTIMES]:
        sys.exit(f"unknown runtime(s) {unknown}; choose from {list(RUNTIMES)}")
    work = args.work.resolve()
    sources = models(work, args.ratio, heal=not args.no_heal)
    if args.prepare:
        for runtime in only:
            target, quants, _ = RUNTIMES[runtime]
            for quant in quants:
                exports_of(work, sources, target, quant)
        return
    cells, missing = [], []
    for runtime, (_, quants, _) in RUNTIMES.items():
        for quant in quants:
            for context in CONTEXTS:
                key = f"{runtime} {quant} @{context}"
                if runtime in only and context in contexts:
                    cells.append(cell(work, sources, runtime, quant, context, args.rounds, args.redo))
                elif (work / "cells" / f"{runtime}-{quant}-{context}.json").is_file():
                    cells.append(json.loads((work / "cells" / f"{runtime}-{quant}-{context}.json").read_text()))
                else:
                    missing.append(key)
    rounds = "/".join(str(r) for r in sorted({c["rounds"] for c in cells})) or str(args.rounds)
    about = (f"2 threads; {rounds} rounds of 16-token bursts at positions `context`.. (a `context`-token prompt "
             "prefilled once, the KV cache rewound to it after each burst), all four models in turn in one process. "
             f"Models {'not ' if args.no_heal else ''}healed (speed depends on the layout only). ÷ prune / ÷ dense: "
             "median of per-round speed ratios; roofline ÷ dense: dense's bytes per step over the model's (weights at the precision + KV cache at the context); of roofline: measured ÷ "
             "roofline.")
    publish(args.out, {"about": about, "note": args.note, "cells": cells, "missing": missing, "argv": " ".join(rerun_args(sys.argv[1:]))}, render)


if __name__ == "__main__":
    main()
