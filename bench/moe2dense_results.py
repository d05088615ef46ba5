"""The table of bench/moe2dense_smollm2.py: evaluations cached in its work folder (seeded from the
committed table, carried over to a MoE rebuilt on another CPU), and the Markdown and JSON written after
each step."""
from __future__ import annotations

import json
from pathlib import Path

from d2m_export.outputs import write_json

TASKS = ["arc_easy", "hellaswag", "piqa"]


def seed_caches(moes: dict, work: Path) -> None:
    """Write the committed table's results into the work folder's caches, keyed by weight digest, so
    that a fresh checkout reruns only what the table lacks. A model rebuilt with other weights (its
    digest differs) finds no cache here; `carry_over` decides what it keeps."""
    for moe_name, rows in moes.items():
        for name, r in rows.items():
            digest = r["weights"]["digest"]
            caches = {f"ppl-{moe_name}-{digest}.json": {"value": r["ppl"]} if "K" in r and "ppl" in r else None,
                      **{file: r.get(phase) for phase, file in eval_files(moe_name, digest)}}
            for file, value in caches.items():
                if value is not None and not (work / file).exists():
                    write_json(work / file, value)


def known_builds(table: dict) -> dict:
    """Every build of each MoE seen so far (its weight digest), with each option's weights and
    perplexity on it: a rerun on a build seen before (on the same kind of CPU) remakes no option."""
    builds = table.get("builds", {})
    for moe_name, rows in table["moes"].items():
        if "MoE (teacher)" in rows:
            builds.setdefault(moe_name, {}).setdefault(rows["MoE (teacher)"]["weights"]["digest"], {
                label: {**r["weights"], "ppl": r["ppl"]} for label, r in rows.items() if "K" in r})
    return builds


def eval_files(moe_name: str, digest: str) -> tuple:
    """(phase, cache file) of a model's evaluations before and after distillation."""
    return (("before", f"eval-{moe_name}-{digest}.json"), ("after", f"eval-{moe_name}-{digest}-distilled.json"))


def depends_on_moe(row: dict, phase: str) -> bool:
    """Whether this evaluation depends on the MoE's build: a distillation from it, or an option made from it."""
    return phase == "after" or "K" in row


def fill_from_caches(moe_name: str, rows: dict, work: Path) -> None:
    """Each row's evaluations before and after distillation, from the work folder's caches."""
    build = rows["MoE (teacher)"]["weights"]["digest"]
    for r in rows.values():
        digest = r["weights"]["digest"]
        for phase, file in eval_files(moe_name, digest):
            if (work / file).is_file() and r is not rows["MoE (teacher)"]:
                r[phase] = json.loads((work / file).read_text())
                if phase == "before" and r.get("ppl") is None:
                    r["ppl"] = r["before"]["perplexity"]["value"]
                if depends_on_moe(r, phase):
                    r.setdefault("measured_on", {}).setdefault(phase, build)


def carry_over(earlier: dict, rows: dict, moe_name: str, work: Path, tolerance: float) -> None:
    """Keep the table's evaluations for this build of the MoE. Built on another CPU, the MoE differs in
    float rounding: every option made from it gets another digest, and an option whose expert choice
    rests on a near-tie may pick other experts. Where an option's perplexity matches the table's to
    within `tolerance` (relative), its evaluations are taken over (cached under the new digest) and
    `measured_on` names the build each was measured on; the others are evaluated again."""
    old_teacher, teacher = earlier.get("MoE (teacher)"), rows["MoE (teacher)"]
    if old_teacher is None:
        return
    old_build, build = old_teacher["weights"]["digest"], teacher["weights"]["digest"]
    teacher["earlier_builds"] = dict(old_teacher.get("earlier_builds", {}))
    if old_build != build:
        teacher["earlier_builds"][old_build] = old_teacher["ppl"]
    for label, r in rows.items():
        old = earlier.get(label)
        if old is None or r is teacher:
            continue
        same = old["weights"]["digest"] == r["weights"]["digest"]
        if not same and ("K" not in r or abs(r["ppl"] - old["ppl"]) > tolerance * old["ppl"]):
            continue
        digest = r["weights"]["digest"]
        for phase, file in eval_files(moe_name, digest):
            if phase in old and depends_on_moe(r, phase):
                r[phase] = old[phase]
                r.setdefault("measured_on", {})[phase] = old.get("measured_on", {}).get(phase, old_build)
                if not (work / file).exists():
                    write_json(work / file, old[phase])


def save(results: dict, moe_name: str, rows: dict, args) -> None:
    results["moes"][moe_name] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(results, args))
    write_json(args.out.with_suffix(".json"), results)


def _tasks(r: dict | None) -> list[str]:
    if r is None:
        return ["…"] * (len(TASKS) + 1)
    accs = [r["tasks"][t]["acc"] for t in TASKS]
    return [*(f"{a:.3f}" for a in accs), f"{sum(accs) / len(accs):.3f}"]


def render(results: dict, args) -> str:
    head = ["K", "k", "score", "grouping", "scaling", "non-zero weights", "same weights as", "ppl", *TASKS, "mean",
            "ppl distilled", *(f"{t} distilled" for t in TASKS), "mean distilled"]
    lines = ["# MoE → dense on SmolLM2-135M", "",
             "Austen perplexity (10,220 held-out tokens) for every option; zero-shot accuracy (first "
             f"{args.limit} documents per task, ±0.05 at this n) and a short distillation for the "
             f"{'best option (lowest perplexity) per K, k' if args.full == 'best' else 'options'}, the MoE "
             "and the baselines. K experts kept per layer, merged into k groups; grouping applies where "
             "k < K. Options that give identical weights are one model (\"same weights as\" names the "
             "first). Distillation: Brown + CoQA/SQuAD passages, loss 0.5·CE + 0.5·KL to the MoE, lr 1e-4 "
             "cosine, batch 8 × 256 tokens. \"…\": not run.", "",
             f"MoEs: upcycled SmolLM2 (4 experts, top-2) after {args.upcycle_cpt_tokens} tokens of CPT; "
             f"LF-UC @0.8 after {args.lfuc_cpt_tokens} tokens of CPT (distilled from SmolLM2).", ""]
    for moe_name, rows in results["moes"].items():
        tokens = args.upcycled_distill_tokens if moe_name == "upcycled" else args.distill_tokens
        lines += [f"## {moe_name} (distillation: {tokens} tokens)", "", "| " + " | ".join(head) + " |",
                  "|" + "---|" * len(head)]
        first: dict[str, str] = {}
        build = rows["MoE (teacher)"]["weights"]["digest"]
        marked = 0
        for name, r in rows.items():
            w = r["weights"]
            label = f"K={r['K']} k={r['k']} {r['score']} {r['grouping']} {r['scaling']}" if "K" in r else name
            same = first.setdefault(w["digest"], label)
            option = [str(r["K"]), str(r["k"]), r["score"], r["grouping"], r["scaling"]] if "K" in r \
                else [name, "", "", "", ""]
            ppl = r.get("ppl")
            before, after = _tasks(r.get("before")), r.get("after")
            elsewhere = {p for p, b in r.get("measured_on", {}).items() if b != build and p in r}
            before[-1] += " †" if "before" in elsewhere else ""
            cells = [*option, f"{w['nonzero'] / 1e6:.1f}M", "" if same == label else same,
                     f"{ppl:.2f}" if ppl is not None else "…", *before]
            cells += ["–"] * (len(TASKS) + 2) if name == "MoE (teacher)" else \
                [(f"{after['perplexity']['value']:.2f}" if after else "…") + (" †" if "after" in elsewhere else ""),
                 *_tasks(after)]
            marked += bool(elsewhere)
            lines.append("| " + " | ".join(cells) + " |")
        earlier = rows["MoE (teacher)"].get("earlier_builds", {})
        if marked and earlier:
            builds = ", ".join(f"weights {d}, ppl {p:.3f}" for d, p in earlier.items())
            lines += ["", f"†: measured on an earlier build of this MoE ({builds}), not this one (weights {build}, "
                      f"ppl {rows['MoE (teacher)']['ppl']:.3f}): the same recipe on another CPU, whose float rounding "
                      "differs. An evaluation is kept where the option's perplexity on the two builds agrees to within "
                      f"{args.carry_tolerance:.1%}; the other options were evaluated again. {marked} rows carry a †."]
        lines.append("")
    return "\n".join(lines)
