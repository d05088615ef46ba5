"""Export time: our dense export against each runtime's own tool ("anchor"), same model, same machine.

Rows per model: gguf q4_0 and q4_k_m against llama.cpp's convert_hf_to_gguf.py (f16, then llama.cpp's
quantizer, as `llama-quantize`; both timed), onnx int4 against onnxruntime-genai's model builder (int4, cpu),
executorch 8da4w against optimum-executorch's `optimum-cli export executorch` (xnnpack, 8da4w), coreml int4
against coremltools' documented flow as a user writes it (bench/coreml_anchor.py; coremltools ships no
converter for a causal LM). Each command runs in its own process; wall time and peak RSS
come from `os.wait4` (bench/scale.py `run_stage`). Ours is the whole `d2m-export --target ...` process,
parity check included (on by default), and is broken down by the phases its manifest records (`timings_s`).
Models: SmolLM2 (the embedded default) and the bench/scale.py shapes (random bf16 weights).

Every finished side of a row is kept under --work (rows/*.json), so a rerun continues; the table names the
rows not run yet. No network: HF_HUB_OFFLINE=1 for every process.

    python bench/export_time.py --models smollm2 --targets gguf,onnx
    python bench/export_time.py --models llama-3.2-1b
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sidebyside import ROOT, publish  # noqa: E402

MODELS = ("smollm2", "llama-3.2-1b", "qwen2.5-3b")
ROWS = (("gguf", "q4_0"), ("gguf", "q4_k_m"), ("onnx", "int4"), ("executorch", "8da4w"), ("coreml", "int4"),
        ("onnx+gguf", "int4+q4_0"))
# onnx+gguf: one run, `--target onnx,gguf --quant int4,q4_0`, against the two single-target runs above it
SIDES = ("ours", "anchor")
EXPORT_PHASES = ("load", "convert", "quantize", "write")
PARITY_PHASES = ("parity_reference", "runtime_check")
TOP_PHASES = ("prepare", "export", "manifest", "parity", "checksums")
THREADS = 2
WITHIN = 1.5            # the wall-time ratio to the anchor the issue asks ours to stay within
QUIET_LOAD = 2.5        # the highest 1-minute load at a command's start called quiet


def source(name: str, work: Path) -> Path:
    if name == "smollm2":
        from d2m_export.sources.models import DEFAULT_MODEL, resolve_model
        return resolve_model(DEFAULT_MODEL)
    from scale import make_model
    return make_model(name, work / "models" / name)


def clear(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def timed(parts: list[tuple[str, list]]) -> dict:
    """Each part in its own process, in turn (stopping at a failure): walls added, the largest peak RSS."""
    from scale import run_stage

    runs = []
    for label, argv in parts:
        print(f"$ {' '.join(str(a) for a in argv)}", flush=True)
        runs.append({"part": label, **run_stage(argv, prefix=()),
                     "command": " ".join(str(a) for a in argv)})
        if runs[-1]["rc"] != 0:
            break
    failed = next((r for r in runs if r["rc"] != 0), None)
    return {"rc": failed["rc"] if failed else 0, "wall_s": round(sum(r["wall_s"] for r in runs), 1),
            "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
            "error": f"{failed['part']}: {failed['error']}" if failed else None, "parts": runs}


def phases(timings: dict, wall_s: float) -> dict:
    """The manifest's flat `timings_s` as a breakdown whose parts add up to the process's wall time."""
    t = {k: float(v) for k, v in timings.items()}
    out = {"prepare": t.get("prepare", 0.0)}
    out |= {p: t.get(p, 0.0) for p in EXPORT_PHASES}
    out["export, rest"] = t.get("export", 0.0) - sum(t.get(p, 0.0) for p in EXPORT_PHASES)
    out["manifest"] = t.get("manifest", 0.0)
    out |= {p: t.get(p, 0.0) for p in PARITY_PHASES}
    out["parity, rest"] = t.get("parity", 0.0) - sum(t.get(p, 0.0) for p in PARITY_PHASES)
    out["checksums"] = t.get("checksums", 0.0)
    out["verification and rest"] = t.get("total", 0.0) - sum(t.get(p, 0.0) for p in TOP_PHASES)
    out["process start and exit"] = wall_s - t.get("total", 0.0)
    return {k: round(max(v, 0.0), 2) for k, v in out.items()}


def shown(text: str, model_dir: Path, model: str) -> str:
    """Commands and errors as recorded: the model by its name, paths inside the repository relative to it."""
    text = text.replace(str(model_dir), model).replace(sys.executable, "python")
    return text.replace(str(ROOT) + "/", "").replace(str(ROOT), ".")


def run_side(side: str, model: str, model_dir: Path, target: str, quant: str, out: Path, work: Path) -> dict:
    from converters.executorch import DEFAULT_MAX_SEQ_LEN
    from export_anchors import LABELS, PARTS, NoAnchor
    from scale import dir_gb

    max_seq_len = DEFAULT_MAX_SEQ_LEN      # ours' default KV cache (executorch), given to the anchor too
    load = os.getloadavg()[0]
    if side == "ours":
        parts = [("d2m-export", [sys.executable, "-m", "d2m_export.cli", "--target", target.replace("+", ","),
                                 "--model", model_dir, "--quant", quant.replace("+", ","), "--threads", THREADS,
                                 "--out", out])]
        tool = "d2m-export"
    elif "+" in target:
        return {"rc": None, "tool": "the single-target runs", "why_none": "compared with the single-target runs"}
    else:
        tool = LABELS[target]
        try:
            parts = PARTS[target](model_dir, quant, out, work, max_seq_len)
        except NoAnchor as why:
            return {"rc": None, "tool": tool, "why_none": str(why)}
        out.mkdir(parents=True, exist_ok=True)   # the gguf parts write files into it
    result = json.loads(shown(json.dumps(timed(parts)), model_dir, model))
    result = {"tool": tool, **result, "load_avg_1min": [round(load, 2)]}
    result["load_avg_1min"].append(round(os.getloadavg()[0], 2))
    if result["rc"] == 0:
        result["output_gb"] = dir_gb(out)
        if side == "anchor":                 # an anchor that times its own steps prints them last, as JSON
            try:
                steps = json.loads(result["parts"][-1].get("last_line") or "null")
            except json.JSONDecodeError:
                steps = None
            if isinstance(steps, dict) and isinstance(steps.get("steps_s"), dict):
                result["toolchain_s"] = steps["steps_s"]
        if side == "ours" and "+" in target:      # one folder per target, each with its own manifest
            manifests = {t: json.loads((out / t / "manifest.json").read_text()) for t in target.split("+")}
            result["targets"] = {t: {"timings_s": m.get("timings_s", {}), "parity": m.get("parity") is not None,
                                     "reference_shared": (m.get("parity") or {}).get("reference_shared")}
                                 for t, m in manifests.items()}
        elif side == "ours":
            manifest = json.loads((out / "manifest.json").read_text())
            result["timings_s"] = manifest.get("timings_s", {})
            # the steps the exporter times itself (executorch: in its worker process; coreml)
            steps = manifest.get(target, {}).get("wall_s") or (manifest.get("verification") or {}).get("export_wall_s")
            if isinstance(steps, dict):
                result["toolchain_s"] = {k: round(v, 1) for k, v in steps.items()}
            result["phases_s"] = phases(result["timings_s"], result["wall_s"])
            p = manifest.get("parity") or {}
            result["parity"] = ({k: p.get(k) for k in ("greedy_match", "greedy_total", "max_abs_logit_err")}
                                if p else None)
    return result


def row_file(work: Path, model: str, target: str, quant: str, side: str) -> Path:
    return work / "rows" / f"{model}-{target}-{quant}-{side}.json"


def run(args) -> None:
    from d2m_export.outputs import write_json

    work = args.work.resolve()
    for model in args.models:
        model_dir = source(model, work)
        for target, quant in ROWS:
            if target not in args.targets:
                continue
            for side in SIDES:
                path = row_file(work, model, target, quant, side)
                if path.is_file() and not (args.retry_failed and json.loads(path.read_text())["rc"] not in (0, None)):
                    continue
                out = work / "out" / f"{model}-{target}-{quant}-{side}"
                clear(out)
                print(f"== {model}: {target} {quant} {side}", flush=True)
                result = {"model": model, "target": target, "quant": quant, "side": side,
                          **run_side(side, model, model_dir, target, quant, out, work)}
                clear(out)                 # up to several GB each at 3B
                clear(work / "builder-cache")
                write_json(path, result)


def parity_s(ours: dict) -> float:
    return sum(v for k, v in ours["phases_s"].items() if k in PARITY_PHASES or k == "parity, rest")


def ratio(ours: dict | None, anchor: dict | None, less_parity: bool = False) -> float | None:
    if not ours or not anchor or ours.get("rc") != 0 or anchor.get("rc") != 0:
        return None
    return round((ours["wall_s"] - (parity_s(ours) if less_parity else 0)) / anchor["wall_s"], 2)


def single_runs(work: Path, model: str, target: str, quant: str, ours: dict | None) -> dict:
    """A several-target run against the single-target runs of the same exports: their walls added."""
    singles = [row_file(work, model, t, q, "ours") for t, q in zip(target.split("+"), quant.split("+"))]
    walls = [json.loads(f.read_text()).get("wall_s") if f.is_file() else None for f in singles]
    if None in walls or not ours or ours.get("rc") != 0:
        return {"single_runs_wall_s": None, "over_single_runs": None}
    return {"single_runs_wall_s": round(sum(walls), 1), "over_single_runs": round(ours["wall_s"] / sum(walls), 2)}


def collect(work: Path) -> dict:
    rows, missing = [], []
    for model in MODELS:
        for target, quant in ROWS:
            sides = {s: json.loads(p.read_text()) if (p := row_file(work, model, target, quant, s)).is_file() else None
                     for s in SIDES}
            if not any(sides.values()):
                missing.append(f"{model} {target} {quant}")
                continue
            missing += [f"{model} {target} {quant} ({s})" for s, r in sides.items() if r is None]
            if "+" in target:
                rows.append({"model": model, "target": target, "quant": quant, **sides,
                             **single_runs(work, model, target, quant, sides["ours"])})
                continue
            rows.append({"model": model, "target": target, "quant": quant, **sides,
                         "ours_over_anchor_wall": ratio(sides["ours"], sides["anchor"]),
                         "ours_less_parity_over_anchor_wall": ratio(sides["ours"], sides["anchor"], less_parity=True)})
    return {"machine": {"cpus": os.cpu_count(), "memory_gb": round(os.sysconf("SC_PAGE_SIZE")
                                                                   * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
            "threads": THREADS, "rows": rows, "missing": missing}


def side_cells(r: dict | None) -> str:
    if r is None:
        return "not run | | "
    if r["rc"] is None:
        return f"{r['why_none']} | | "
    if r["rc"] != 0:
        return f"failed (exit {r['rc']}): {r['error']} | {r['wall_s']} | {r['peak_rss_gb']}"
    return f"ok | {r['wall_s']} | {r['peak_rss_gb']}"


def load_note(result: dict) -> str:
    """What the machine was doing: the 1-minute load at the start of each command (the table has each)."""
    loads = [r[s]["load_avg_1min"][0] for r in result["rows"] for s in SIDES if (r[s] or {}).get("load_avg_1min")]
    if loads and max(loads) <= QUIET_LOAD:
        return (f"The machine was otherwise quiet: the 1-minute load average at the start of each command, in the "
                f"table, was {min(loads)}–{max(loads)} (two cores: a load of 2 is the command itself).")
    return ("The machine is shared and was at times busy with other work: the 1-minute load average at the start "
            "of each command is in the table (start and end in the JSON, `load_avg_1min`); at a load of 6–9 on 2 "
            "cores a command took up to 5× its time at a load near 1, so ratios of commands started at different "
            "loads are rough.")


def render(result: dict) -> str:
    from export_anchors import COREML_ANCHOR_DTYPE, GGUF_INTERMEDIATE

    m = result["machine"]
    lines = ["# Export time: our dense export against each runtime's own tool", "",
             f"Same machine ({m['cpus']} cores, {m['memory_gb']} GiB), same model, each command in its own process "
             "(wall time and peak RSS by `os.wait4`), ours and the anchor run one after the other. " + load_note(result),
             "",
             f"- ours: `d2m-export --target T --model M --quant Q --threads {result['threads']}`, the whole "
             "process, parity check included (it is on by default: transformers reference + the export run in "
             "its runtime).",
             f"- gguf anchor: llama.cpp's `convert_hf_to_gguf.py --outtype {GGUF_INTERMEDIATE}` (the llama.cpp "
             "of the installed llama-cpp-python) then llama.cpp's quantizer to the type, as `llama-quantize` "
             "(two processes: walls added, the larger peak RSS).",
             "- onnx anchor: `python -m onnxruntime_genai.models.builder -i M -o D -p int4 -e cpu`.",
             "- executorch anchor: `optimum-cli export executorch --task text-generation --recipe xnnpack "
             "--qlinear 8da4w --qlinear_group_size 32 --use_custom_sdpa --use_custom_kv_cache --max_seq_len` "
             "(ours' KV cache length), optimum-executorch 1.1.0 in its own venv.",
             f"- coreml anchor: `bench/coreml_anchor.py --quant int4 --dtype {COREML_ANCHOR_DTYPE}`, coremltools' "
             "documented flow as a user writes it (coremltools has no converter for a causal LM): transformers "
             f"loads the model in {COREML_ANCHOR_DTYPE}, `torch.jit.trace` without a KV cache (less work than "
             "ours, which converts a stateful cache), `ct.convert` (iOS 18, fp16), "
             "`ct.optimize.coreml.linear_quantize_weights` (int4, blocks of 32, as ours), `save`. From float32 "
             "weights the same script was killed for memory at the 3B shape (peak 23.1 GB after 99 s).",
             "- No anchor runs a parity check; ours ÷ anchor is the wall-time ratio, and beside it ours less "
             "its parity phases (what `--no-parity` would leave, within the process's own overheads).", ""]
    for model in MODELS:
        rows = [r for r in result["rows"] if r["model"] == model and "+" not in r["target"]]
        multi = [r for r in result["rows"] if r["model"] == model and "+" in r["target"]]
        if not rows:
            continue
        lines += [f"## {model}", "", "| target | quant | ours | wall s | peak RSS GB | wall less parity s | anchor tool "
                  "| anchor | wall s | peak RSS GB | ours ÷ anchor (wall) | less parity ÷ anchor | load at start: ours, anchor |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            tool = (r["anchor"] or {}).get("tool", "")
            ours = r["ours"] or {}
            less = round(ours["wall_s"] - parity_s(ours), 1) if ours.get("phases_s") else ""
            lines.append(f"| {r['target']} | {r['quant']} | {side_cells(r['ours'])} | {less} | {tool} | "
                         f"{side_cells(r['anchor'])} | {r['ours_over_anchor_wall'] or ''} | "
                         f"{r.get('ours_less_parity_over_anchor_wall') or ''} | "
                         + ", ".join(str((x or {}).get("load_avg_1min", [""])[0]) for x in (r["ours"], r["anchor"])) + " |")
        timed_rows = [r for r in rows if r["ours"] and r["ours"].get("phases_s")]
        if timed_rows:
            names = list(timed_rows[0]["ours"]["phases_s"])
            lines += ["", f"Ours by phase, seconds (manifest `timings_s`; they add up to the wall time):", "",
                      "| target | quant | " + " | ".join(names) + " | largest |", "|---|---|" + "---|" * (len(names) + 1)]
            for r in timed_rows:
                ph, wall = r["ours"]["phases_s"], r["ours"]["wall_s"]
                top = max(ph, key=ph.get)
                lines.append(f"| {r['target']} | {r['quant']} | " + " | ".join(str(ph[n]) for n in names)
                             + f" | {top} ({ph[top] / wall:.0%}) |")
            for r in timed_rows:
                if steps := r["ours"].get("toolchain_s"):
                    lines += ["", f"{r['target']} {r['quant']}: the steps its exporter times itself (in the manifest): "
                              + ", ".join(f"{k} {v} s" for k, v in steps.items()) + "."]
                if steps := (r["anchor"] or {}).get("toolchain_s"):
                    lines += ["", f"{r['target']} {r['quant']} anchor: the steps it times itself: "
                              + ", ".join(f"{k} {v} s" for k, v in steps.items()) + "."]
        over = [r for r in rows if (r["ours_over_anchor_wall"] or 0) > WITHIN]
        if over:
            lines += ["", f"Over {WITHIN}× of the anchor, and the phase that holds each:"]
        for r in over:
            ph, less = r["ours"]["phases_s"], r["ours_less_parity_over_anchor_wall"]
            check = (f"reference {ph['parity_reference']} s, runtime check {ph['runtime_check']} s, the rest of the "
                     f"check {ph['parity, rest']} s")
            if less is not None and less <= WITHIN:
                lines.append(f"- {r['target']} {r['quant']}: {r['ours_over_anchor_wall']}×, held by the parity check "
                             f"({check}); without it {less}×.")
            else:
                other = max((k for k in ph if k not in PARITY_PHASES and k != "parity, rest"), key=ph.get)
                lines.append(f"- {r['target']} {r['quant']}: {r['ours_over_anchor_wall']}×; without the parity check "
                             f"({check}) still {less}×, its largest other phase {other} ({ph[other]} s).")
        for r in multi:
            ours, q = r["ours"] or {}, r["quant"].replace("+", ",")
            if ours.get("rc") == 0 and r["single_runs_wall_s"]:
                lines += ["", f"One run, `--target {r['target'].replace('+', ',')} --quant {q}`: {ours['wall_s']} s "
                          f"(peak RSS {ours['peak_rss_gb']} GB, load {ours['load_avg_1min'][0]} at its start), "
                          f"against {r['single_runs_wall_s']} s for the single-target runs above added: "
                          f"**{r['over_single_runs']}×**; each folder has its own parity record, the later "
                          "target's with `reference_shared: true`."]
            elif ours.get("rc") not in (0, None):
                lines += ["", f"One run, `--target {r['target'].replace('+', ',')}`: failed (exit {ours['rc']}): "
                          f"{ours['error']}"]
        lines.append("")
    missing = result["missing"]
    lines += ["Rows not run yet: " + (", ".join(missing) if missing else "none."), "",
              "Rerun: `python bench/export_time.py [--models ...] [--targets ...]` (finished rows are kept under "
              "--work; `--render-only` rewrites this table from them).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help=", ".join(MODELS))
    ap.add_argument("--targets", default=",".join(dict.fromkeys(t for t, _ in ROWS)))
    ap.add_argument("--retry-failed", action="store_true", help="run again the sides that failed")
    ap.add_argument("--render-only", action="store_true", help="write the table from the rows kept under --work")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "export_time")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "export_time.md")
    args = ap.parse_args()
    args.models = [m for m in args.models.split(",") if m]
    args.targets = [t for t in args.targets.split(",") if t]
    if bad := [m for m in args.models if m not in MODELS] + [t for t in args.targets if t not in dict(ROWS)]:
        sys.exit(f"unknown model(s)/target(s) {bad}; models: {', '.join(MODELS)}; targets: "
                 f"{', '.join(dict.fromkeys(t for t, _ in ROWS))}")
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    t0 = time.time()
    if not args.render_only:
        run(args)
    print(f"run took {time.time() - t0:.0f} s", flush=True)
    publish(args.out, collect(args.work.resolve()), render)


if __name__ == "__main__":
    main()
