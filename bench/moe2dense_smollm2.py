"""MoE → dense on SmolLM2: which expert score keeps most, at two K, before and after a short distillation.

Two MoEs we can make here: LF-UC @0.8 after CPT (bench/cpt_smollm2.py's model; rebuilt with the
same recipe if missing) and sparsely upcycled SmolLM2 (4 copies of every MLP, top-2) after a short
CPT that lets its router and experts drift apart. Each is turned dense with `convert --method
moe2dense` for every score × K, evaluated, distilled from its MoE with `train --distill-from`, and
evaluated again. The baseline is dense SmolLM2 layer-pruned to the same number of non-zero weights,
given the same distillation. Every step is a CLI call or a cached JSON, so a rerun resumes.
Writes bench/results/moe2dense_smollm2.md (and .json). Rerun:  python bench/moe2dense_smollm2.py
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors import safe_open

from sidebyside import CLI, done, sh
from d2m_export.models import resolve_model
from d2m_export.outputs import write_json
from d2m_export.pipeline import evaluate

TASKS = ["arc_easy", "hellaswag", "piqa"]
DENSE = "smollm2-135m"


def weight_counts(model_dir: Path) -> dict:
    """Stored and non-zero weights (moe2dense pads dense layers with zero neurons to one width)."""
    stored = nonzero = 0
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                stored += t.numel()
                nonzero += int((t != 0).sum())
    return {"stored": stored, "nonzero": nonzero}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--moes", default="lfuc-cpt,upcycled", help="which MoEs: lfuc-cpt, upcycled")
    ap.add_argument("--kept", default="1,2", help="values of K (experts kept per layer)")
    ap.add_argument("--scores", default="sf,cp,acp,do-acp")
    ap.add_argument("--distill-tokens", type=int, default=16_384, help="short distillation budget per model")
    ap.add_argument("--upcycled-distill-tokens", type=int, default=8_192,
                    help="the same for the upcycled MoE's models (its top-2-of-4 teacher is twice as slow)")
    ap.add_argument("--upcycle-cpt-tokens", type=int, default=24_576, help="CPT of the upcycled MoE")
    ap.add_argument("--lfuc-cpt", type=Path, default=Path("runs/bench_cpt/lfuc-0.8-cpt"),
                    help="LF-UC @0.8 after CPT (made by bench/cpt_smollm2.py; rebuilt here if missing)")
    ap.add_argument("--limit", type=int, default=100, help="documents per task")
    ap.add_argument("--work", type=Path, default=Path("runs/bench_moe2dense"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "moe2dense_smollm2.md")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "moes": {}}
    budget = lambda name: args.upcycled_distill_tokens if name.startswith("upcycled") else args.distill_tokens  # noqa: E731

    def evaluated(name: str, model: Path | str) -> dict:
        path = work / f"eval-{name}.json"
        if not path.exists():
            evaluate(str(model), path, tasks=TASKS, limit=args.limit)
        return json.loads(path.read_text())

    def distilled(name: str, model: Path, teacher: Path) -> Path:
        out = work / f"{name}-distilled"
        if not done(out, "config.json"):
            sh([*CLI, "train", "--model", model, "--distill-from", teacher, "--tokens", budget(name),
                "--seq-len", 256, "--micro-batch", 4, "--global-batch", 8, "--lr", "1e-4",
                "--save-every", 10**9, "--out", out])
        return out

    def row(name: str, model: Path, teacher: Path | None, **extra) -> dict:
        r = {**extra, "weights": weight_counts(model), "before": evaluated(name, model)}
        if teacher is not None:
            r["after"] = evaluated(f"{name}-distilled", distilled(name, model, teacher))
        return r

    dense_weights = weight_counts(resolve_model(DENSE))
    for moe_name in args.moes.split(","):
        moe = make_moe(moe_name, args, work)
        rows = {"MoE (teacher)": row(f"{moe_name}-moe", moe, None)}
        for k in [int(x) for x in args.kept.split(",")]:
            for score in args.scores.split(","):
                out = work / f"{moe_name}-k{k}-{score}"
                if not done(out, "d2m_plan.json"):
                    sh([*CLI, "convert", "--method", "moe2dense", "--model", moe, "--experts-kept", k,
                        "--score", score, "--out", out])
                rows[f"K={k} {score}"] = row(out.name, out, moe, kept=k, score=score)
                save(results, moe_name, rows, args)
            # The baseline: dense SmolLM2 with whole layers dropped down to the same non-zero size.
            target = rows[f"K={k} {args.scores.split(',')[0]}"]["weights"]["nonzero"] / dense_weights["nonzero"]
            if target >= 1.0:       # as large as SmolLM2 itself: the baseline is SmolLM2
                rows[f"K={k} baseline: dense SmolLM2"] = row(f"{moe_name}-dense", resolve_model(DENSE), moe,
                                                             kept=k, score="dense")
            else:
                out = work / f"{moe_name}-k{k}-prune"
                if not done(out, "d2m_plan.json"):
                    sh([*CLI, "convert", "--method", "prune", "--target-active-ratio", f"{target:.3f}", "--out", out])
                rows[f"K={k} baseline: layer-pruned dense"] = row(out.name, out, moe, kept=k, score="prune")
            save(results, moe_name, rows, args)
    print(args.out.read_text())


def make_moe(name: str, args, work: Path) -> Path:
    if name == "lfuc-cpt":
        if done(args.lfuc_cpt, "config.json"):
            return args.lfuc_cpt
        fused = work / "lfuc-0.8"
        if not done(fused, "d2m_plan.json"):
            sh([*CLI, "convert", "--method", "lfuc", "--target-active-ratio", 0.8, "--out", fused])
        trained = work / "lfuc-0.8-cpt"
        if not done(trained, "config.json"):   # bench/cpt_smollm2.py's recipe
            sh([*CLI, "train", "--model", fused, "--distill-from", DENSE, "--tokens", 163_840, "--lr", "2e-4",
                "--save-every", 10**9, "--out", trained])
        return trained
    if name == "upcycled":
        upcycled = work / "upcycled"
        if not done(upcycled, "d2m_plan.json"):
            sh([*CLI, "convert", "--method", "upcycle", "--num-experts", 4, "--top-k", 2, "--out", upcycled])
        trained = work / "upcycled-cpt"
        if not done(trained, "config.json"):
            sh([*CLI, "train", "--model", upcycled, "--distill-from", DENSE, "--tokens", args.upcycle_cpt_tokens,
                "--lr", "2e-4", "--save-every", 10**9, "--out", trained])
        return trained
    raise SystemExit(f"--moes: unknown MoE {name!r} (lfuc-cpt, upcycled)")


def save(results: dict, moe_name: str, rows: dict, args) -> None:
    results["moes"][moe_name] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(results, args))
    write_json(args.out.with_suffix(".json"), results)


def _cells(r: dict) -> list[str]:
    accs = [r["tasks"][t]["acc"] for t in TASKS]
    return [f"{r['perplexity']['value']:.2f}", *(f"{a:.3f}" for a in accs), f"{sum(accs) / len(accs):.3f}"]


def render(results: dict, args) -> str:
    head = ["model", "non-zero / stored weights", "ppl", *TASKS, "mean",
            "ppl distilled", *(f"{t} distilled" for t in TASKS), "mean distilled"]
    lines = ["# MoE → dense on SmolLM2-135M", "",
             f"Austen perplexity (10,220 held-out tokens) and zero-shot accuracy on the first {args.limit} "
             "documents per task (±0.05 at this n). Distillation: Brown + CoQA/SQuAD passages, loss "
             "0.5·CE + 0.5·KL to the MoE, lr 1e-4 cosine, batch 8 × 256 tokens.", ""]
    for moe_name, rows in results["moes"].items():
        tokens = args.upcycled_distill_tokens if moe_name == "upcycled" else args.distill_tokens
        lines += [f"## {moe_name} (distillation: {tokens} tokens)", "", "| " + " | ".join(head) + " |",
                  "|" + "---|" * len(head)]
        for name, r in rows.items():
            w = r["weights"]
            cells = [name, f"{w['nonzero'] / 1e6:.1f}M / {w['stored'] / 1e6:.1f}M", *_cells(r["before"])]
            cells += _cells(r["after"]) if "after" in r else ["–"] * 5
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
