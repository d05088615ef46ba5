"""The healing study on the embedded SmolLM2: does LF-UC pay off against layer pruning?

Grid: active ratio × method × plan search × healing × CPT budget. Each cell is a sweep-style
run directory (variant.json, eval.json, model/config.json, bench-*.json), so `d2m-export
report` draws its Pareto front. Every step is a d2m-export command whose output, once there, is
never redone: rerun the same command after an interruption and it resumes.

    python bench/heal_study_smollm2.py                     # the whole grid, here
    python bench/heal_study_smollm2.py --cells base        # no CPT (the quick part)
    D2M_DEVICE=cuda python bench/heal_study_smollm2.py --workers 6   # on a GPU (figures kept apart)
    python bench/heal_study_smollm2.py --latency           # measured decode at contexts 64 and 2048
    python bench/heal_study_smollm2.py --report            # tables + Pareto from what is there

Work (models) goes to --work; results (small JSON, the report) to --results.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "d2m_export.cli"]
TASKS = ["arc_easy", "hellaswag", "piqa"]
RUNTIMES = ("onnx", "gguf", "executorch")       # measured decode, fp32 / f32
CONTEXTS = (64, 2048)                            # tokens in the KV cache when the timed decode starts
MAX_SEQ_LEN = 2048 + 64                          # exports' positions: the longest context and its bursts
DENSE = "smollm2-135m"
METHODS = {                      # study name -> convert flags
    "lfuc": ["--method", "lfuc", "--host-mode", "routed"],
    "lfuc-shared": ["--method", "lfuc", "--host-mode", "shared"],
    "prune": ["--method", "prune"],
}
CPT = {"lr": "2e-4", "distill_weight": "0.5", "seq_len": "256", "global_batch": "16"}


def cells(args) -> list[dict]:
    out = []
    for ratio in args.ratios:
        for method in args.methods:
            for search in args.searches:
                for heal in args.heals:
                    base = f"{method}-{ratio}-{search}-{heal}"
                    for cpt in args.cpt:
                        out.append({"name": base if not cpt else f"{base}-cpt{cpt // 1000}k", "base": base,
                                    "method": method, "ratio": ratio, "plan_search": search, "heal": heal,
                                    "cpt_tokens": cpt})
    # the cells the verdict needs most come first: 0.8, then the others; no CPT before CPT
    return sorted(out, key=lambda c: (c["cpt_tokens"] > 0, c["ratio"] != 0.8, c["cpt_tokens"]))


def run(cmd: list, log: Path) -> float:
    t0 = time.time()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        subprocess.run([str(c) for c in cmd], check=True, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return round(time.time() - t0, 1)


def model_dir(args, cell) -> Path:
    return args.work / cell["name"] / "model"


def make_model(args, cell) -> float | None:
    """Convert (and heal), or train the converted model with the CPT budget; seconds, or None if done."""
    out = model_dir(args, cell)
    if (out / "config.json").is_file():
        return None
    if cell["cpt_tokens"]:
        base = args.work / cell["base"] / "model"
        return run([*CLI, "train", "--model", base, "--out", out, "--tokens", cell["cpt_tokens"],
                    "--distill-from", DENSE, "--lr", CPT["lr"], "--distill-weight", CPT["distill_weight"],
                    "--seq-len", CPT["seq_len"], "--global-batch", CPT["global_batch"], "--save-every", 10**6,
                    *(["--dtype", "bf16"] if os.environ.get("D2M_DEVICE", "cpu") != "cpu" else [])],
                   args.work / cell["name"] / "log.txt")
    cmd = [*CLI, "convert", "--model", DENSE, *METHODS[cell["method"]], "--target-active-ratio", cell["ratio"],
           "--plan-search", cell["plan_search"], "--out", out]
    cmd += ["--heal", "--heal-steps", args.heal_steps] if cell["heal"] == "local" else ["--no-heal"]
    return run(cmd, args.work / cell["name"] / "log.txt")


def evaluate(args, name: str, model: str) -> None:
    dest = args.results / name / "eval.json"
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        run([*CLI, "eval", "--model", model, "--tasks", *TASKS, "--limit", args.limit, "--batch-size", args.batch_size,
             "--out", dest], args.work / name / "log.txt")


def record(args, cell, seconds) -> None:
    """variant.json and model/config.json beside the eval, so the report reads the cell without its weights."""
    res = args.results / cell["name"]
    res.mkdir(parents=True, exist_ok=True)
    src = model_dir(args, cell)
    (res / "model").mkdir(exist_ok=True)
    shutil.copy(src / "config.json", res / "model" / "config.json")
    plan = json.loads((src / "d2m_plan.json").read_text())
    variant = {"name": cell["name"], "method": cell["method"], "ratio": cell["ratio"],
               "cpt_tokens": cell["cpt_tokens"] or None, "plan_search": cell["plan_search"], "heal": cell["heal"],
               "base_model": DENSE, "plan": plan.get("plan", {}).get("blocks"),
               "device": os.environ.get("D2M_DEVICE", "cpu")}
    path = res / "variant.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    variant["wall_s"] = {**old.get("wall_s", {}), **({"model": seconds} if seconds is not None else {})}
    for key in ("plan_search", "healing", "training"):
        if isinstance(plan.get(key), dict):
            variant["wall_s"][key] = plan[key].get("wall_s")
    if "plan_search" in plan:
        variant["search_kl"] = plan["plan_search"].get("kl")
    if "healing" in plan:
        variant["heal_errors"] = [b.get("error") for b in plan["healing"]["blocks"]]
    path.write_text(json.dumps(variant, indent=2) + "\n")


def do_cell(args, cell) -> str:
    try:
        return _do_cell(args, cell)
    except subprocess.CalledProcessError:     # its log says why; the other cells go on
        return f"{cell['name']} FAILED (see {args.work / cell['name'] / 'log.txt'})"


def _do_cell(args, cell) -> str:
    seconds = make_model(args, cell)
    res = args.results / cell["name"]
    if seconds is not None and (res / "eval.json").is_file() and (res / "variant.json").is_file():
        # an evaluated cell whose model was deleted, rebuilt only as a CPT start: its record stays that
        # of the evaluated model; the rebuild is noted apart
        (res / "rebuilt.json").write_text(json.dumps({"device": os.environ.get("D2M_DEVICE", "cpu"),
                                                      "wall_s": seconds}) + "\n")
        return cell["name"] + " (rebuilt as a CPT start)"
    record(args, cell, seconds)
    evaluate(args, cell["name"], str(model_dir(args, cell)))
    if not args.keep_models and cell["cpt_tokens"]:
        shutil.rmtree(model_dir(args, cell), ignore_errors=True)   # CPT models are not exported
    return cell["name"]


def run_grid(args) -> None:
    todo = cells(args)
    dense = args.results / "dense"
    if not (dense / "eval.json").is_file():
        evaluate(args, "dense", DENSE)
        dense.joinpath("variant.json").write_text(json.dumps(
            {"name": "dense", "method": "dense", "ratio": 1.0, "cpt_tokens": None, "base_model": DENSE}, indent=2))
    bases = [c for c in todo if not c["cpt_tokens"]]
    trained = [c for c in todo if c["cpt_tokens"]]
    for stage in (bases, trained):
        with ThreadPoolExecutor(args.workers) as pool:
            for name in pool.map(lambda c: do_cell(args, c), stage):
                print(f"done {name}", flush=True)
    write_report(args)


# --- measured latency: one export per model structure (healing and CPT keep the structure) --------

def measure_latency(args) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from sidebyside import export

    from runtimes.bench import interleaved

    structures = {}
    for cell in cells(args):
        if not cell["cpt_tokens"] and cell["heal"] == args.heals[0]:
            structures.setdefault(f"{cell['method']}-{cell['ratio']}-{cell['plan_search']}", cell)
    variants = {"dense": DENSE, **{k: str(model_dir(args, c)) for k, c in structures.items()}}
    for name, model in variants.items():
        if name != "dense" and not (Path(model) / "config.json").is_file():
            make_model(args, structures[name])
    quants = {"onnx": "fp32", "gguf": "f32", "executorch": "fp32"}
    for target in args.runtimes:
        exports = {name: args.work / "exports" / f"{name}-{target}" for name in variants}
        for name, model in variants.items():
            export(model, target, exports[name], *(("--max-seq-len", MAX_SEQ_LEN) if target != "gguf" else ()))
        for context in [] if args.prepare else args.contexts:
            # one process, every structure loaded, short decode bursts in turn: a whole-process benchmark
            # per structure drifts by ±20% between rounds on a shared machine, this by a few percent
            ab = interleaved(exports, rounds=args.rounds, tokens=16, context=context, threads=2)
            (args.results / "latency").mkdir(parents=True, exist_ok=True)
            for name, v in ab["variants"].items():
                out = {"generator": "d2m-export", "target": target, "quant": quants[target], "threads": 2,
                       "decode_tokens_per_s": round(1000.0 / v["decode_ms_per_token"], 2), **v,
                       "method": "interleaved", "rounds": args.rounds, "context": context, "tokens_per_burst": 16,
                       "speedup_over": {k.split(" over ")[1]: r for k, r in ab["speedups"].items()
                                        if k.startswith(f"{name} over ")}}
                (args.results / "latency" / f"{name}-{target}-{context}.json").write_text(
                    json.dumps(out, indent=2) + "\n")
    if not args.prepare:
        write_report(args)


# --- report --------------------------------------------------------------------------------------

def write_report(args) -> None:
    from d2m_export.evaluation import report

    runs = sorted(p for p in args.results.iterdir() if (p / "variant.json").is_file() and (p / "eval.json").is_file())
    for run_dir in runs:         # the measured latency of each cell's structure
        v = json.loads((run_dir / "variant.json").read_text())
        key = "dense" if v["method"] == "dense" else f"{v['method']}-{v['ratio']}-{v['plan_search']}"
        for old in run_dir.glob("bench-*.json"):
            old.unlink()
        for f in (args.results / "latency").glob(f"{key}-*.json") if (args.results / "latency").is_dir() else []:
            shutil.copy(f, run_dir / f"bench-{f.stem[len(key) + 1:]}.json")
        if v["method"] == "dense" and not (run_dir / "model" / "config.json").is_file():
            (run_dir / "model").mkdir(exist_ok=True)
            from d2m_export.sources.models import resolve_model
            shutil.copy(resolve_model(DENSE) / "config.json", run_dir / "model" / "config.json")
    table = study_table(args, runs)
    (args.results / "study.md").write_text(table)
    print(table)
    rep = args.work / "report"       # Pareto fronts: measured where benched, roofline-projected for every cell
    report.write(runs, rep)
    for f in ("pareto.png", "report.md", "report.json"):
        shutil.copy(rep / f, args.results / f)


def study_table(args, runs) -> str:
    rows = []
    for run_dir in runs:
        v = json.loads((run_dir / "variant.json").read_text())
        ev = json.loads((run_dir / "eval.json").read_text())
        tasks = ev.get("tasks", {})
        mean = sum(t["acc"] for t in tasks.values()) / len(tasks) if tasks else float("nan")
        lat = {(t, c): json.loads(f.read_text())["decode_tokens_per_s"] for t in RUNTIMES for c in CONTEXTS
               for f in [run_dir / f"bench-{t}-{c}.json"] if f.is_file()}
        rows.append((v, ev, tasks, mean, lat))
    rows.sort(key=lambda r: (-r[0]["ratio"], r[0]["method"], r[0].get("plan_search", ""), r[0].get("heal", ""),
                             r[0].get("cpt_tokens") or 0))
    head = ("| ratio | method | plan | heal | CPT tokens | ppl | arc_easy | hellaswag | piqa | mean acc "
            "| ONNX ms/tok @64 | @2048 | llama.cpp ms/tok @64 | @2048 | ExecuTorch ms/tok @64 | @2048 "
            "| wall s (model) | run on |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for v, ev, tasks, mean, lat in rows:
        ppl = (ev.get("perplexity") or {}).get("value")
        cells_ = [f"{v['ratio']}", v["method"], v.get("plan_search", "-"), v.get("heal", "-"),
                  f"{v.get('cpt_tokens') or 0:,}", f"{ppl:.2f}" if ppl else "-",
                  *(f"{tasks[t]['acc']:.3f}" if t in tasks else "-" for t in TASKS), f"{mean:.3f}",
                  *(f"{1000 / lat[t, c]:.2f}" if (t, c) in lat else "-" for t in RUNTIMES for c in CONTEXTS),
                  f"{sum(x for x in v.get('wall_s', {}).values() if x):.0f}" if v.get("wall_s") else "-",
                  v.get("device", "cpu")]
        lines.append("| " + " | ".join(cells_) + " |")
    n = next((t["n"] for _, _, tasks, _, _ in rows for t in tasks.values()), "?")
    lines += ["", "## Head to head: LF-UC against pruning under the same plan search, healing and CPT budget", "",
              "| ratio | plan | heal | CPT tokens | ppl LF-UC / prune | mean acc LF-UC / prune |", "|---|---|---|---|---|---|"]
    by_key = {(v["ratio"], v["method"], v.get("plan_search"), v.get("heal"), v.get("cpt_tokens") or 0): (ev, mean)
              for v, ev, _, mean, _ in rows}
    for (ratio, method, search, heal, cpt), (ev, mean) in sorted(by_key.items(), key=lambda kv: (-kv[0][0], kv[0][4],
                                                                                              kv[0][2], kv[0][3])):
        other = by_key.get((ratio, "prune", search, heal, cpt))
        if method != "lfuc" or other is None:
            continue
        lines.append(f"| {ratio} | {search} | {heal} | {cpt:,} | {ev['perplexity']['value']:.2f} / "
                     f"{other[0]['perplexity']['value']:.2f} | {mean:.3f} / {other[1]:.3f} |")
    return ("# Healing study, SmolLM2-135M\n\nAusten perplexity (10,240 held-out tokens); zero-shot accuracy, "
            f"n = {n} per task; decode ms/token measured on this host, 2 threads, at contexts of 64 and 2048 tokens: "
            "every structure's export loaded in one process and decoded in 16-token bursts in turn, median of the "
            "rounds (`runtimes.bench.interleaved`; the same structure's export for every healing and CPT budget). "
            "Wall time: the cell's model (convert "
            "and heal, or CPT), on the machine in the last column (cuda: one H200, so not comparable with the cpu "
            "rows: 2 cores here).\n\n" + "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    floats = lambda s: [float(x) for x in s.split(",")]  # noqa: E731
    ap.add_argument("--ratios", type=floats, default=[0.9, 0.8, 0.7])
    ap.add_argument("--methods", type=lambda s: s.split(","), default=["lfuc", "prune"])
    ap.add_argument("--searches", type=lambda s: s.split(","), default=["metric", "loss"])
    ap.add_argument("--heals", type=lambda s: s.split(","), default=["none", "local"])
    ap.add_argument("--cpt", type=lambda s: [int(x) for x in s.split(",")], default=[0, 163_840, 655_360])
    ap.add_argument("--cells", choices=["all", "base"], default="all", help="base: only the cells without CPT")
    ap.add_argument("--heal-steps", type=int, default=150)
    ap.add_argument("--limit", type=int, default=300, help="documents per task")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=1, help="cells run at once (a GPU takes several)")
    ap.add_argument("--keep-models", action="store_true", help="keep the CPT models (large)")
    ap.add_argument("--latency", action="store_true", help="export each structure and measure decode")
    ap.add_argument("--rounds", type=int, default=20, help="with --latency: interleaved decode bursts per structure")
    ap.add_argument("--runtimes", type=lambda s: s.split(","), default=list(RUNTIMES),
                    help="with --latency: onnx, gguf, executorch (fp32 / f32 each)")
    ap.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=list(CONTEXTS),
                    help=f"with --latency: decode contexts, of {','.join(map(str, CONTEXTS))}")
    ap.add_argument("--prepare", action="store_true",
                    help="with --latency: only convert and export (no timing): that part needs no quiet machine")
    ap.add_argument("--report", action="store_true", help="only rebuild the tables and the report")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "heal_study")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "heal_study")
    args = ap.parse_args()
    if args.cells == "base":
        args.cpt = [0]
    args.results.mkdir(parents=True, exist_ok=True)
    if args.report:
        write_report(args)
    elif args.latency:
        measure_latency(args)
    else:
        run_grid(args)


if __name__ == "__main__":
    main()
