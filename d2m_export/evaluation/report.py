"""The latency-versus-accuracy report over variant run directories (sweep outputs).

A run directory holds `variant.json` (name, method, ratio, cpt_tokens, base_model), the model
in `model/`, `eval.json` from `d2m-export eval`, and any number of `bench-*.json` from
`d2m-export bench`. The report plots accuracy against decode latency measured per runtime on
this host, and against the roofline-projected latency on each device profile, with the Pareto
frontier highlighted, at each decode context asked for (tokens already in the KV cache; default 64
and 2048): projected at every context, measured where a bench ran at it. A series is named
"<runtime or device> @ <context>". It writes pareto.png, report.md, report.json and a
self-contained report.html.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from d2m_export.errors import UserError
from d2m_export.outputs import atomic_dir
from d2m_export.devices.profiles import available, load_profile
from d2m_export.devices.roofline import decode_cost

PROJECTION_PRECISION = "fp16"
CONTEXTS = (64, 2048)
BENCH_DEFAULT_CONTEXT = 64        # what `bench` used before its results named their context


def series(name: str, context: int) -> str:
    return f"{name} @ {context}"


def bench_context(b: dict) -> int:
    return int(b.get("context") or b.get("prompt_tokens") or BENCH_DEFAULT_CONTEXT)


def load_run(run: Path) -> dict:
    run = Path(run)
    try:
        variant = json.loads((run / "variant.json").read_text())
        ev = json.loads((run / "eval.json").read_text())
        config = json.loads((run / "model" / "config.json").read_text())
    except FileNotFoundError as e:
        raise UserError(f"{run} is not a sweep run directory (missing {Path(e.filename).name})") from None
    except ValueError as e:
        raise UserError(f"{run}: corrupt JSON ({e})") from None
    try:
        benches = [json.loads(p.read_text()) for p in sorted(run.glob("bench-*.json"))]
    except ValueError as e:
        raise UserError(f"{run}: corrupt bench JSON ({e})") from None
    tasks = ev.get("tasks", {})
    mean_acc = sum(t["acc"] for t in tasks.values()) / len(tasks) if tasks else None
    return {"dir": str(run), **variant, "config": config, "perplexity": (ev.get("perplexity") or {}).get("value"),
            "tasks": tasks, "mean_acc": mean_acc, "active_params": ev.get("params", {}).get("active"),
            "measured": {series(f"{b['target']} {b.get('quant')}", bench_context(b)): 1000.0 / b["decode_tokens_per_s"]
                         for b in benches}}


def pareto(points: list[tuple[float, float, str]]) -> list[str]:
    """Names of the points no other point beats on both latency (lower) and accuracy (higher)."""
    front = []
    for lat, acc, name in points:
        if not any((l2 <= lat and a2 >= acc) and (l2 < lat or a2 > acc) for l2, a2, _ in points):
            front.append(name)
    return front


def expand(paths: list[Path]) -> list[Path]:
    """Run directories, with a sweep directory standing for the runs inside it."""
    out = []
    for p in map(Path, paths):
        inner = sorted(c for c in p.iterdir() if (c / "variant.json").is_file()) if p.is_dir() else []
        out += inner if not (p / "variant.json").is_file() and inner else [p]
    return out


def check_contexts(contexts, runs: list[dict]) -> list[int]:
    """The contexts asked for, each within every run's positions; by default 64 and 2048, those that fit."""
    limits = [int(r["config"]["max_position_embeddings"]) for r in runs if r["config"].get("max_position_embeddings")]
    if contexts is None:
        return [c for c in CONTEXTS if not limits or c <= min(limits)] or [min(limits)]
    contexts = list(dict.fromkeys(int(c) for c in contexts))
    if not contexts or min(contexts) < 1:
        raise UserError(f"--context takes positive token counts, not {' '.join(map(str, contexts)) or 'none'}")
    for r in runs:
        limit = r["config"].get("max_position_embeddings")
        if limit and max(contexts) > limit:
            raise UserError(f"--context {max(contexts)} is beyond the {limit} positions of {r['dir']}'s model")
    return contexts


def build(run_dirs: list[Path], profiles: list[str] | None = None, contexts: list[int] | None = None) -> dict:
    runs = [load_run(r) for r in expand(run_dirs)]
    if not runs:
        raise UserError("report needs at least one run directory")
    bases = {r.get("base_model") for r in runs}
    if len(bases) > 1:
        raise UserError(f"runs come from different base models ({', '.join(sorted(map(str, bases)))}); "
                        "report one base model at a time")
    contexts = check_contexts(contexts, runs)
    devices = [load_profile(p) for p in (profiles or available())]
    for r in runs:
        r["projected_ms"] = {}
        for c in contexts:
            ms = decode_cost(r["config"], PROJECTION_PRECISION, c).seconds
            r["projected_ms"].update({series(d.key, c): 1000 * ms(d.memory_bandwidth_gbs, d.compute_gflops["fp16"])
                                      for d in devices})
        # measured at the contexts asked for, in their order
        r["measured"] = {k: r["measured"][k] for c in contexts for k in sorted(r["measured"]) if k.endswith(f" @ {c}")}
    runtimes = [k for c in contexts for k in sorted({k for r in runs for k in r["measured"]}) if k.endswith(f" @ {c}")]
    fronts = {}
    for c in contexts:
        fronts.update({f"measured {rt}": pareto([(r["measured"][rt], r["mean_acc"], r["name"]) for r in runs
                                                 if rt in r["measured"] and r["mean_acc"] is not None])
                       for rt in runtimes if rt.endswith(f" @ {c}")})
        fronts.update({f"projected {series(d.key, c)}": pareto([(r["projected_ms"][series(d.key, c)], r["mean_acc"],
                                                                 r["name"]) for r in runs if r["mean_acc"] is not None])
                       for d in devices})
    return {"base_model": bases.pop(), "contexts": contexts, "runtimes": runtimes,
            "devices": {d.key: d.name for d in devices},
            "projection": {"precision": PROJECTION_PRECISION, "contexts": contexts},
            "runs": [{k: v for k, v in r.items() if k != "config"} for r in runs], "pareto": fronts}


def plot(report: dict, path: Path) -> None:
    """One row of panels per context: measured on this host (left), roofline-projected (right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    runs = [r for r in report["runs"] if r["mean_acc"] is not None]
    contexts = report["contexts"]
    fig, axes = plt.subplots(len(contexts), 2, figsize=(15, 5.5 * len(contexts)), constrained_layout=True,
                             squeeze=False)
    for row, c in zip(axes, contexts):
        measured = [rt for rt in report["runtimes"] if rt.endswith(f" @ {c}")]
        panels = [(row[0], f"measured on this host, context {c}",
                   [(rt.removesuffix(f" @ {c}"), f"measured {rt}", lambda r, rt=rt: r["measured"].get(rt))
                    for rt in measured], "measured"),
                  (row[1], f"roofline-projected ({report['projection']['precision']} weights), context {c}",
                   [(name, f"projected {series(k, c)}", lambda r, k=series(k, c): r["projected_ms"][k])
                    for k, name in report["devices"].items()], "projected")]
        for ax, title, lines, kind in panels:
            for label, key, get in lines:
                pts = sorted((get(r), r["mean_acc"], r["name"]) for r in runs if get(r) is not None)
                if not pts:
                    continue
                front = [p for p in pts if p[2] in report["pareto"].get(key, [])]
                line = ax.plot([p[0] for p in front], [p[1] for p in front], "-", lw=1.5, alpha=0.6)[0]
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=line.get_color(), label=label, zorder=3)
                if kind == "measured" or label == lines[-1][0]:   # label one projected series only
                    for x, y, name in pts:
                        ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            if kind == "projected":
                ax.set_xscale("log")
                for axis in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
                    axis(FormatStrFormatter("%g"))
            if kind == "measured" and not measured:
                ax.text(0.5, 0.5, f"no bench at context {c}", ha="center", va="center", transform=ax.transAxes)
            ax.set_xlabel("decode latency (ms / token)")
            ax.set_ylabel("mean zero-shot accuracy")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8, **({"loc": "upper left", "bbox_to_anchor": (1.0, 1.0)} if kind == "projected"
                                         else {}))
    fig.suptitle(f"{report['base_model']}: accuracy vs decode latency (lines: Pareto frontier)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tables(report: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, head, rows): accuracy with measured latency, then the projection at each context."""
    tasks = sorted({t for r in report["runs"] for t in r["tasks"]})
    head = ["variant", "active params", "perplexity", *tasks, "mean acc",
            *[f"{rt} ms/tok" for rt in report["runtimes"]]]
    rows = []
    for r in report["runs"]:
        rows.append([r["name"], f"{(r['active_params'] or 0) / 1e6:.1f}M",
                     f"{r['perplexity']:.2f}" if r["perplexity"] else "-",
                     *[f"{r['tasks'][t]['acc']:.3f}" if t in r["tasks"] else "-" for t in tasks],
                     f"{r['mean_acc']:.3f}" if r["mean_acc"] is not None else "-",
                     *[f"{r['measured'][rt]:.2f}" if rt in r["measured"] else "-" for rt in report["runtimes"]]])
    out = [("Accuracy and measured decode latency (runtime @ context)", head, rows)]
    for c in report["contexts"]:
        out.append((f"Roofline-projected decode latency (ms/token, {report['projection']['precision']} weights, "
                    f"context {c})", ["variant", *report["devices"].values()],
                    [[r["name"], *[f"{r['projected_ms'][series(k, c)]:.2f}" for k in report["devices"]]]
                     for r in report["runs"]]))
    return out


def write(run_dirs: list[Path], out: Path, profiles: list[str] | None = None,
          contexts: list[int] | None = None) -> dict:
    report = build(run_dirs, profiles, contexts)
    tabs = tables(report)
    md = [f"# {report['base_model']}: latency vs accuracy", "",
          f"Decode latency at a context of {' and '.join(map(str, report['contexts']))} tokens already in the KV "
          "cache (a series `X @ N` is at context N).", ""]
    for title, head, rows in tabs:
        md += [f"## {title}", "", _md(head, rows), ""]
    md += ["## Pareto frontiers", ""]
    md += [f"- {k}: {', '.join(v)}" for k, v in report["pareto"].items()]
    with atomic_dir(out) as tmp:
        plot(report, tmp / "pareto.png")
        (tmp / "report.md").write_text("\n".join(md) + "\n")
        (tmp / "report.json").write_text(json.dumps({"generator": "d2m-export", **report}, indent=2) + "\n")
        png = base64.b64encode((tmp / "pareto.png").read_bytes()).decode()
        (tmp / "report.html").write_text(_html(report, png, tabs))
    return report


def _md(head, rows) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                     ["| " + " | ".join(r) + " |" for r in rows])


def _html(report, png_b64, tabs) -> str:
    def table(head, rows, tid):
        th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
        return f'<table id="{tid}"><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>'
    fronts = "".join(f"<li>{html.escape(k)}: {html.escape(', '.join(v))}</li>" for k, v in report["pareto"].items())
    ids = ["accuracy", *[f"projection-{c}" for c in report["contexts"]]]
    sections = "\n".join(f"<h2>{html.escape(title)}</h2>{table(head, rows, tid)}"
                          for (title, head, rows), tid in zip(tabs, ids))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(report['base_model'])}: latency vs accuracy</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}
img{{max-width:100%}}</style></head><body>
<h1>{html.escape(report['base_model'])}: latency vs accuracy</h1>
<img id="pareto" alt="Pareto plot" src="data:image/png;base64,{png_b64}">
{sections}
<h2>Pareto frontiers</h2><ul>{fronts}</ul>
</body></html>
"""
