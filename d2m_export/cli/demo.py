"""The main job on one model: analyze → convert and heal (LF-UC, and pruning as the baseline, healed
the same way) → eval → table."""
from __future__ import annotations

import json
import time
from pathlib import Path

from d2m_export.sources.models import DEFAULT_MODEL
from d2m_export.outputs import write_json


def run_demo(out: Path, model: str | None = None, ratio: float = 0.8, limit: int | None = 150,
             tasks: list[str] | None = None, heal_steps: int = 150) -> int:
    from d2m_export.heal import HealConfig
    from d2m_export.pipeline import analyze, convert, evaluate

    model = model or DEFAULT_MODEL
    tasks = tasks or ["arc_easy", "hellaswag", "piqa"]
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    def timed(name, fn, *a, **kw):
        print(f"== {name}", flush=True)
        t0 = time.time()
        result = fn(*a, **kw)
        timings[name] = round(time.time() - t0, 1)
        return result

    timed("analyze", analyze, model, out / "analysis")
    variants = {"dense": model}
    for method in ("lfuc", "prune"):
        dest = out / f"{method}-{ratio}"
        timed(f"convert + heal {method}", convert, model, dest, method_name=method, target_ratio=ratio,
              analysis=out / "analysis" / "similarity.json", heal=HealConfig(steps=heal_steps))
        variants[f"{method} @{ratio} healed"] = str(dest)
    rows = {}
    for name, spec in variants.items():
        rows[name] = timed(f"eval {name}", evaluate, spec, out / f"eval-{name.split()[0]}.json",
                           tasks=tasks, limit=limit)
    table = format_table(rows, tasks)
    print("\n" + table)
    (out / "summary.md").write_text(table + "\n")
    write_json(out / "summary.json", {"model": model, "ratio": ratio, "limit": limit, "timings_s": timings,
                                      "variants": rows})
    print(f"\ntimings (s): {json.dumps(timings)}\nwrote {out}/summary.md")
    return 0


def format_table(rows: dict, tasks: list[str]) -> str:
    head = ["variant", "active params", "perplexity"] + [f"{t} acc / acc_norm" for t in tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [name, f"{r['params']['active'] / 1e6:.1f}M", f"{r['perplexity']['value']:.2f}"]
        cells += [f"{r['tasks'][t]['acc']:.3f} / {r['tasks'][t]['acc_norm']:.3f}" for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    first = next(iter(rows.values()))
    lines.append(f"\nperplexity: {first['perplexity']['corpus']}, {first['perplexity']['tokens']} tokens; "
                 f"tasks zero-shot, n = {', '.join(str(first['tasks'][t]['n']) for t in tasks)}")
    return "\n".join(lines)
