"""The whole grid: methods × active ratios (× CPT) → convert, eval, export, bench → report.

Every variant lives in its own run directory; a step whose output exists is not redone, so an
interrupted sweep picks up where it stopped.
"""
from __future__ import annotations

import json
from pathlib import Path

from d2m_export.errors import UserError
from d2m_export.sources.models import model_label, resolve_model


def variants(methods: list[str], ratios: list[float], cpt_tokens: int | None) -> list[dict]:
    out = []
    if any(r >= 1.0 for r in ratios):
        out.append({"name": "dense", "method": "dense", "ratio": 1.0, "cpt_tokens": None})
    for method in methods:
        for ratio in sorted((r for r in ratios if r < 1.0), reverse=True):
            out.append({"name": f"{method}-{ratio}", "method": method, "ratio": ratio, "cpt_tokens": None})
            if cpt_tokens:
                out.append({"name": f"{method}-{ratio}-cpt", "method": method, "ratio": ratio,
                            "cpt_tokens": cpt_tokens, "from": f"{method}-{ratio}"})
    return out


def run_sweep(model: str | None, out: Path, ratios: list[float], methods: list[str], targets: list[str],
              cpt_tokens: int | None = None, tasks: list[str] | None = None, limit: int | None = 100,
              threads: int = 2, profiles: list[str] | None = None) -> dict:
    from converters.base import export, get_target
    from d2m_export.evaluation import report
    from d2m_export.methods import get_method
    from d2m_export.pipeline import analyze, convert, evaluate
    from d2m_export.outputs import write_json
    from d2m_export.train import TrainConfig, train
    from runtimes.bench import bench

    for m in methods:
        get_method(m)
    for t in targets:
        get_target(t)
    if not ratios or any(not 0 < r <= 1 for r in ratios):
        raise UserError(f"--ratios must be in (0, 1], got {ratios}")
    base = model_label(model)
    base_dir = resolve_model(model)
    out.mkdir(parents=True, exist_ok=True)
    grid = variants(methods, ratios, cpt_tokens)
    steps = [(v, s) for v in grid for s in ("model", "eval", *[f"export {t}" for t in targets])]
    analysis = out / "analysis" / "similarity.json"
    for i, (v, step) in enumerate(steps, 1):
        run = out / v["name"]
        run.mkdir(exist_ok=True)
        print(f"[{i}/{len(steps)}] {v['name']}: {step}", flush=True)
        if step == "model":
            if (run / "model" / "config.json").exists():
                continue
            if v["method"] == "dense":
                (run / "model").symlink_to(base_dir.resolve(), target_is_directory=True)
            elif v["cpt_tokens"]:
                train(TrainConfig(model=str(out / v["from"] / "model"), out=str(run / "model"),
                                  tokens=v["cpt_tokens"], distill_from=str(base_dir), save_every=10**9))
            else:
                if not analysis.exists():
                    analyze(model, analysis.parent)
                convert(model, run / "model", method_name=v["method"], target_ratio=v["ratio"], analysis=analysis)
            (run / "variant.json").write_text(json.dumps({**v, "base_model": base}, indent=2))
        elif step == "eval":
            if not (run / "eval.json").exists():
                evaluate(str(run / "model"), run / "eval.json", tasks=tasks or ["arc_easy", "hellaswag", "piqa"],
                         limit=limit)
        else:
            target = step.split()[1]
            exp = run / "exports" / target
            if not (exp / "manifest.json").exists():
                export(target, str(run / "model"), None, exp, threads=threads)
            quant = json.loads((exp / "manifest.json").read_text())["quant"]
            result_file = run / f"bench-{target}-{quant}.json"
            if not result_file.exists():
                write_json(result_file, bench(exp, threads=threads))
    return report.write([out / v["name"] for v in grid], out / "report", profiles)
