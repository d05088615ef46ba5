"""MoE → dense on SmolLM2: every expert score × grouping × scaling, at K = 1 and 2, before and after a
short distillation, against dense layer pruning at the same size.

Two MoEs we can make here: LF-UC @0.8 after CPT and sparsely upcycled SmolLM2 (4 copies of every MLP,
top-2) after a short CPT that lets its router and experts drift apart. Each is turned dense with
`convert --method moe2dense` for every option: K experts kept per layer, merged into k groups (k = K,
and k = 1 when K > 1, where the grouping matters), under each scaling. Options that give the very
same weights (the same experts chosen, say) are evaluated and distilled once. The baseline is dense
SmolLM2 layer-pruned to the same number of non-zero weights, given the same distillation.

Every option gets its perplexity, made in memory from one calibration of the MoE (nothing saved);
the best option per (K, k) (`--full best`, or every option with `--full all`), the MoE and the
baselines also get the zero-shot tasks, then a short distillation and both evaluations again.
Every step is a CLI call or a cached JSON, so a rerun resumes where it stopped, and the table is
rewritten after each step with what is done. Writes bench/results/moe2dense_smollm2.md (and .json).
Rerun:  python bench/moe2dense_smollm2.py
Two processes side by side (the same options in each; the second starts from a copy of the table),
then the whole table from both:
        cp bench/results/moe2dense_smollm2.json runs/shard1.json
        OMP_NUM_THREADS=1 python bench/moe2dense_smollm2.py --full all --shard 0/2 &
        OMP_NUM_THREADS=1 python bench/moe2dense_smollm2.py --full all --shard 1/2 --out runs/shard1.md
        python bench/moe2dense_smollm2.py --full all --from-cache
On 2 cores this gained about 10% over one process, and each process peaks near 10 GB while it distils
a K = 2 model from the upcycled MoE: on 24 GB, two of those side by side were killed for memory.
A MoE rebuilt on another CPU differs in float rounding; see `carry_over` for what is kept.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

from safetensors import safe_open

from sidebyside import CLI, done, sh
from moe2dense_results import (TASKS, carry_over, depends_on_moe, fill_from_caches, known_builds, save,
                               seed_caches)
from d2m_export.sources.models import resolve_model
from d2m_export.outputs import write_json
from d2m_export.pipeline import evaluate

DENSE = "smollm2-135m"
RESULTS = Path(__file__).parent / "results" / "moe2dense_smollm2.md"


def weight_summary(model_dir: Path) -> dict:
    """Stored and non-zero weights (moe2dense pads dense layers with zero neurons to one width), and a
    digest of the weights themselves, so options that give the same model share its evaluation."""
    stored = nonzero = 0
    digest = hashlib.sha256()
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for name in sorted(f.keys()):
                t = f.get_tensor(name)
                stored += t.numel()
                nonzero += int((t != 0).sum())
                digest.update(name.encode())
                digest.update(t.float().contiguous().numpy().tobytes())
    return {"stored": stored, "nonzero": nonzero, "digest": digest.hexdigest()[:12]}


def options(kept: list[int], scores: list[str], groupings: list[str], scalings: list[str]):
    """(K, k, score, grouping, scaling), most telling first: K = k (pure selection), then merges."""
    for k in kept:
        for score in scores:
            for scaling in scalings:
                yield k, k, score, "-", scaling
    for k in kept:
        if k > 1:
            for score in scores:
                for grouping in groupings:
                    for scaling in scalings:
                        yield k, 1, score, grouping, scaling


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--moes", default="upcycled,lfuc-cpt", help="which MoEs: lfuc-cpt, upcycled")
    ap.add_argument("--kept", default="1,2", help="values of K (experts kept per layer)")
    ap.add_argument("--scores", default="sf,cp,acp,do-acp,pp,random")
    ap.add_argument("--groupings", default="score,frequency,kmeans", help="used where k < K")
    ap.add_argument("--scalings", default="score,uniform")
    ap.add_argument("--full", default="best", help="which options also get tasks and distillation: best (the "
                    "lowest perplexity per K, k) or all")
    ap.add_argument("--phases", default="ppl,before,after",
                    help="ppl: every option's perplexity; before: tasks; after: distil, then evaluate")
    ap.add_argument("--distill-tokens", type=int, default=16_384, help="short distillation budget per model")
    ap.add_argument("--upcycled-distill-tokens", type=int, default=8_192,
                    help="the same for the upcycled MoE's models (its top-2-of-4 teacher is twice as slow)")
    ap.add_argument("--upcycle-cpt-tokens", type=int, default=24_576, help="CPT of the upcycled MoE")
    ap.add_argument("--lfuc-cpt-tokens", type=int, default=40_960, help="CPT (distillation from SmolLM2) of LF-UC @0.8")
    ap.add_argument("--limit", type=int, default=100, help="documents per task")
    ap.add_argument("--work", type=Path, default=Path("runs/bench_moe2dense"))
    ap.add_argument("--keep-weights", action="store_true", help="keep each option's dense model and its "
                    "distilled copy once evaluated (by default they go, ~2 GB a model; the evaluations stay)")
    ap.add_argument("--shard", default="0/1", help="I/N: distil and evaluate only every N-th model, from the "
                    "I-th (0-based), to run N processes side by side (OMP_NUM_THREADS=1 each); all but one with "
                    "its own --out, then --from-cache writes the whole table")
    ap.add_argument("--from-cache", action="store_true", help="rewrite --out from its rows and the evaluations "
                    "cached in --work, loading no model (merges --shard runs)")
    ap.add_argument("--carry-tolerance", type=float, default=1e-3, help="a MoE rebuilt on another CPU differs "
                    "from the table's in float rounding; an option whose perplexity matches the table's to within "
                    "this relative tolerance keeps the table's evaluations (marked †)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    try:
        shard, shards = (int(x) for x in args.shard.split("/"))
        assert 0 <= shard < shards
    except (ValueError, AssertionError):
        ap.error(f"--shard: expected I/N with 0 <= I < N, got {args.shard!r}")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    kept = [int(x) for x in split(args.kept)]
    grid = list(options(kept, split(args.scores), split(args.groupings), split(args.scalings)))
    phases = split(args.phases)
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "moes": {}}
    # Rows of MoEs not rerun now stay in the table; a new --out (a shard's) starts from the committed one's.
    earlier_json = next((p for p in (args.out.with_suffix(".json"), RESULTS.with_suffix(".json")) if p.is_file()), None)
    if earlier_json:
        earlier = json.loads(earlier_json.read_text())
        results["moes"] = {m: rows for m, rows in earlier.get("moes", {}).items()
                           if all("digest" in r["weights"] for r in rows.values())}
        results["builds"] = known_builds({**earlier, "moes": results["moes"]})
    seed_caches(results["moes"], work)
    if args.from_cache:
        for moe_name, rows in results["moes"].items():
            fill_from_caches(moe_name, rows, work)
            save(results, moe_name, rows, args)
        print(args.out.read_text())
        return
    budget = lambda name: args.upcycled_distill_tokens if name.startswith("upcycled") else args.distill_tokens  # noqa: E731

    def evaluated(name: str, weights: Callable[[], Path]) -> dict:
        path = work / f"eval-{name}.json"
        if not path.exists():
            evaluate(str(weights()), path, tasks=TASKS, limit=args.limit)
        return json.loads(path.read_text())

    def distilled(name: str, model: Path, teacher: Path) -> Path:
        out = work / f"{name}-distilled"
        if not done(out, "config.json"):     # a run cut short resumes from its last checkpoint, if it made one
            resume = any((out / "checkpoints").glob("step-*"))
            if out.exists() and not resume:
                shutil.rmtree(out)
            sh([*CLI, "train", "--model", model, "--distill-from", teacher, "--tokens", budget(name),
                "--seq-len", 256, "--micro-batch", 4, "--global-batch", 8, "--lr", "1e-4",
                "--save-every", 4, "--keep-last", 1, "--out", out, *(["--resume"] if resume else [])])
        return out

    dense_weights = weight_summary(resolve_model(DENSE))
    for moe_name in split(args.moes):
        moe = make_moe(moe_name, args, work)
        teacher = {"weights": weight_summary(moe)}
        teacher["before"] = evaluated(f"{moe_name}-{teacher['weights']['digest']}", lambda: moe)
        teacher["ppl"] = teacher["before"]["perplexity"]["value"]
        earlier_rows = results["moes"].get(moe_name, {})
        rows: dict = {"MoE (teacher)": teacher}
        calibrated = Calibrated(moe)
        made = results.setdefault("builds", {}).setdefault(moe_name, {}).setdefault(teacher["weights"]["digest"], {})
        for option in grid:                       # every option's perplexity, in memory (nothing saved)
            k, groups, score, grouping, scaling = option
            label = f"K={k} k={groups} {score} {grouping} {scaling}"
            if label not in made:
                digest, w, ppl = calibrated.perplexity(option, str(work / f"ppl-{moe_name}-{{}}.json"))
                made[label] = {**w, "digest": digest, "ppl": ppl}
            w = dict(made[label])
            rows[label] = {"K": k, "k": groups, "score": score, "grouping": grouping, "scaling": scaling,
                           "ppl": w.pop("ppl"), "weights": w}
            save(results, moe_name, rows, args)
        models: dict[str, Callable[[], Path]] = {}    # digest -> the weights, saved when first needed
        chosen = [r for r in rows.values() if "K" in r]
        if args.full == "best":
            best: dict = {}
            for r in chosen:
                if (r["K"], r["k"]) not in best or r["ppl"] < best[(r["K"], r["k"])]["ppl"]:
                    best[(r["K"], r["k"])] = r
            chosen = list(best.values())
        for r in chosen:
            models[r["weights"]["digest"]] = functools.partial(
                calibrated.saved, r, work / f"{moe_name}-{r['weights']['digest']}")
        for size in sorted({r["weights"]["nonzero"] for r in rows.values() if "K" in r}):
            # The baseline: dense SmolLM2 with whole layers dropped down to the same non-zero size.
            target = size / dense_weights["nonzero"]
            if target >= 1.0:       # as large as SmolLM2 itself: the baseline is SmolLM2
                out, name = resolve_model(DENSE), "baseline: dense SmolLM2"
            else:
                out, name = work / f"{moe_name}-prune-{size}", f"baseline: layer-pruned dense, {size / 1e6:.1f}M"
                if not done(out, "d2m_plan.json"):
                    sh([*CLI, "convert", "--method", "prune", "--target-active-ratio", f"{target:.3f}", "--out", out])
            w = weight_summary(out)
            models[w["digest"]] = functools.partial(Path, out)
            rows[name] = {"baseline": True, "weights": w}
        carry_over(earlier_rows, rows, moe_name, work, args.carry_tolerance)
        for phase in [p for p in phases if p != "ppl"]:       # tasks, then distil and evaluate again
            for digest, weights in list(models.items())[shard::shards]:
                name = f"{moe_name}-{digest}"
                if phase == "before":
                    result = evaluated(name, weights)
                else:
                    result = evaluated(f"{name}-distilled", lambda: distilled(name, weights(), moe))
                for r in rows.values():
                    if r["weights"]["digest"] == digest:
                        r[phase] = result
                        if depends_on_moe(r, phase):
                            r.setdefault("measured_on", {}).setdefault(phase, teacher["weights"]["digest"])
                        r.setdefault("ppl", result["perplexity"]["value"] if phase == "before" else None)
                save(results, moe_name, rows, args)
                if not args.keep_weights:     # the evaluations hold what the table needs; a model is remade in seconds
                    shutil.rmtree(work / name, ignore_errors=True)
                    if phase == "after":
                        shutil.rmtree(work / f"{name}-distilled", ignore_errors=True)
        calibrated.release()
        save(results, moe_name, rows, args)
    print(args.out.read_text())


class Calibrated:
    """One MoE, loaded and calibrated once: each option's dense model made in memory from the same
    routing statistics (`convert --method moe2dense` would calibrate every time)."""

    def __init__(self, moe: Path):
        self.moe = moe

    @functools.cached_property
    def calibration(self):
        """(model, tokenizer, routing statistics), made when an option's weights are first needed."""
        from d2m_export.methods import moe2dense
        from d2m_export.plan.calibration import calibration_ids
        from d2m_export.sources.models import load_model

        model, tokenizer, _ = load_model(str(self.moe))
        return model, tokenizer, moe2dense.routing_stats(model, calibration_ids(tokenizer, 2048))

    def dense(self, option):
        from d2m_export.methods import moe2dense

        model, _, stats = self.calibration
        k, groups, score, grouping, scaling = option
        dense, _ = moe2dense.convert(model, stats, k, groups, score,
                                     "score" if grouping == "-" else grouping, scaling)
        digest = hashlib.sha256()
        for name, p in sorted(dense.named_parameters()):
            digest.update(name.encode())
            digest.update(p.detach().float().contiguous().numpy().tobytes())
        params = list(dense.parameters())
        weights = {"stored": sum(p.numel() for p in params), "nonzero": sum(int((p != 0).sum()) for p in params)}
        return dense, digest.hexdigest()[:12], weights

    def perplexity(self, option, cache: str) -> tuple[str, dict, float]:
        from d2m_export.evaluation import perplexity

        dense, digest, weights = self.dense(option)
        path = Path(cache.format(digest))
        if not path.is_file():
            write_json(path, perplexity(dense, self.calibration[1], tokens=10240, batch_size=8, progress=False))
        return digest, weights, json.loads(path.read_text())["value"]

    def saved(self, row: dict, out: Path) -> Path:
        from d2m_export.outputs import atomic_dir

        if not done(out, "config.json"):
            dense, digest, _ = self.dense((row["K"], row["k"], row["score"], row["grouping"], row["scaling"]))
            assert digest == row["weights"]["digest"]
            with atomic_dir(out) as tmp:
                dense.save_pretrained(tmp)
                self.calibration[1].save_pretrained(tmp)
        return out

    def release(self):
        self.__dict__.pop("calibration", None)


def make_moe(name: str, args, work: Path) -> Path:
    if name == "lfuc-cpt":
        fused = work / "lfuc-0.8"
        if not done(fused, "d2m_plan.json"):
            sh([*CLI, "convert", "--method", "lfuc", "--target-active-ratio", 0.8, "--out", fused])
        trained = work / f"lfuc-0.8-cpt{args.lfuc_cpt_tokens}"
        if not done(trained, "config.json"):   # bench/cpt_smollm2.py's recipe, shorter
            sh([*CLI, "train", "--model", fused, "--distill-from", DENSE, "--tokens", args.lfuc_cpt_tokens,
                "--lr", "2e-4", "--save-every", 10**9, "--out", trained])
        return trained
    if name == "upcycled":
        upcycled = work / "upcycled"
        if not done(upcycled, "d2m_plan.json"):
            sh([*CLI, "convert", "--method", "upcycle", "--num-experts", 4, "--top-k", 2, "--out", upcycled])
        trained = work / f"upcycled-cpt{args.upcycle_cpt_tokens}"
        if not done(trained, "config.json"):
            sh([*CLI, "train", "--model", upcycled, "--distill-from", DENSE, "--tokens", args.upcycle_cpt_tokens,
                "--lr", "2e-4", "--save-every", 10**9, "--out", trained])
        return trained
    raise SystemExit(f"--moes: unknown MoE {name!r} (lfuc-cpt, upcycled)")


if __name__ == "__main__":
    main()
