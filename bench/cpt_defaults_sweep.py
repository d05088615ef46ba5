"""Which CPT defaults pay at small budgets? A small sweep on the healed LF-UC@0.8 SmolLM2.

The start is what the product ships: `convert --method lfuc --target-active-ratio 0.8 --heal`.
Each run distils from the dense model with the same budget, data and seed; only the learning
rate, the distillation weight and the warm-up change. The teacher's top-64 log-probabilities
are computed once (`--teacher-topk 64`) and every run reads them from the cache; one extra run
repeats the best setting with the full teacher logits, to show what the cache changes.

Runs are chosen by the perplexity on validation chunks of the training corpora that no run
trains on (never by the evaluation text); Austen perplexity is reported beside it.
Resumes: a finished run is never redone. Writes bench/results/cpt_defaults.md (and .json).

    python bench/cpt_defaults_sweep.py                     # the sweep, ~45 min on 2 cores
    python bench/cpt_defaults_sweep.py --tokens 16384      # quicker, noisier
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "d2m_export.cli"]
DENSE = "smollm2-135m"
SEQ, BATCH, VAL_CHUNKS = 256, 8, 40


def grid(args) -> list[dict]:
    runs = [{"lr": lr, "distill_weight": w, "warmup": "5%"} for lr in args.lrs for w in args.weights]
    return runs


def name_of(run: dict) -> str:
    return f"lr{run['lr']:g}-w{run['distill_weight']:g}-warm{run['warmup'].rstrip('%')}" + \
        ("-fullteacher" if run.get("full_teacher") else "")


def sh(cmd, log: Path) -> float:
    t0 = time.time()
    with open(log, "a") as fh:
        subprocess.run([str(c) for c in cmd], check=True, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    return time.time() - t0


def train_run(args, start: Path, run: dict) -> Path:
    out = args.work / name_of(run)
    if (out / "config.json").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    steps = args.tokens // (BATCH * SEQ)
    warmup = max(1, steps // 20) if run["warmup"] == "5%" else 0
    cmd = [*CLI, "train", "--model", start, "--out", out, "--tokens", args.tokens, "--seq-len", SEQ,
           "--global-batch", BATCH, "--micro-batch", 4, "--lr", run["lr"], "--warmup-steps", warmup,
           "--distill-from", DENSE, "--distill-weight", run["distill_weight"], "--save-every", 10**6]
    if not run.get("full_teacher"):
        cmd += ["--teacher-topk", 64, "--teacher-cache", args.work / "teacher_cache"]
    sh(cmd, args.work / "log.txt")
    return out


@torch.no_grad()
def scores(model_dir: Path, val: torch.Tensor) -> dict:
    from d2m_export.evaluation import perplexity
    from d2m_export.sources.models import load_model

    model, tokenizer, _ = load_model(str(model_dir))
    nll, n = 0.0, 0
    for i in range(0, len(val), 4):
        ids = val[i:i + 4]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        n += ids[:, 1:].numel()
    return {"val_ppl": math.exp(nll / n), "val_tokens": n,
            "austen_ppl": perplexity(model, tokenizer, progress=False)["value"]}


def validation_chunks(args, tokenizer) -> torch.Tensor:
    """Chunks of the training corpora that no run draws: the tail of the first epoch's permutation."""
    from d2m_export.sources.data import DEFAULT_TRAIN_CORPORA, batch_indices, pack

    chunks = pack(tokenizer, list(DEFAULT_TRAIN_CORPORA), SEQ)
    used = set(torch.cat([batch_indices(len(chunks), s, BATCH, 0) for s in range(args.tokens // (BATCH * SEQ))]).tolist())
    val = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(0))[-VAL_CHUNKS:].tolist()
    assert not used & set(val), "the validation chunks overlap the training chunks: lower --tokens"
    return chunks[val]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    floats = lambda s: [float(x) for x in s.split(",")]  # noqa: E731
    ap.add_argument("--tokens", type=int, default=32_768, help="CPT budget per run (16 steps of 8 × 256)")
    ap.add_argument("--lrs", type=floats, default=[1e-4, 3e-4, 1e-3])
    ap.add_argument("--weights", type=floats, default=[0.5, 1.0], help="distillation weights")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "cpt_defaults")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    from d2m_export.sources.models import load_model

    start = args.work / "start"
    if not (start / "config.json").is_file():
        shutil.rmtree(start, ignore_errors=True)
        sh([*CLI, "convert", "--model", DENSE, "--method", "lfuc", "--target-active-ratio", 0.8, "--heal",
            "--out", start], args.work / "log.txt")
    val = validation_chunks(args, load_model(DENSE)[1])
    state_file = args.work / "results.json"
    results = json.loads(state_file.read_text()) if state_file.is_file() else {}

    def measure(name: str, model_dir: Path, run: dict | None) -> None:
        if name not in results:
            results[name] = {"run": run, **scores(model_dir, val)}
            if run is not None:
                training = json.loads((model_dir / "d2m_plan.json").read_text())["training"]
                results[name].update(wall_s=training["wall_s"], teacher_topk=training.get("teacher_topk"))
            state_file.write_text(json.dumps(results, indent=2) + "\n")
        print(f"{name}: {results[name]['val_ppl']:.2f} val, {results[name]['austen_ppl']:.2f} Austen", flush=True)

    measure("start (healed, no CPT)", start, None)
    for run in grid(args):
        measure(name_of(run), train_run(args, start, run), run)
    swept = [r for r in results.values() if r["run"] and not r["run"].get("full_teacher")]
    best = min(swept, key=lambda r: r["val_ppl"])["run"]
    for extra in ({**best, "warmup": "0%"}, {**best, "full_teacher": True}):
        measure(name_of(extra), train_run(args, start, extra), extra)
    write(args, results)


def write(args, results: dict) -> None:
    rows = sorted(results.items(), key=lambda kv: kv[1]["val_ppl"])
    best = next(name for name, r in rows if r["run"])
    lines = ["# CPT defaults: a small sweep on the healed LF-UC@0.8 SmolLM2", "",
             f"Budget per run: {args.tokens:,} tokens (global batch {BATCH} × {SEQ}), distilled from the dense model, "
             "seed 0, fp32 on 2 CPU cores. Teacher: top-64 log-probabilities cached once (except the full-teacher "
             f"row). Chosen by validation perplexity ({VAL_CHUNKS} chunks of the training corpora that no run trains "
             "on); Austen (the evaluation text) only reported.", "",
             "| run | lr | distill weight | warm-up | val ppl | Austen ppl | wall s | teacher |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        run = r["run"] or {}
        teacher = "-" if not run else ("full logits" if run.get("full_teacher") else
                                        f"top-64 cache (mass {r['teacher_topk']['mass']:.3f}, "
                                        f"{r['teacher_topk']['chunks_computed']} chunks computed)")
        lines.append(f"| {name} | {run.get('lr', '-')} | {run.get('distill_weight', '-')} | {run.get('warmup', '-')} | "
                     f"{r['val_ppl']:.2f} | {r['austen_ppl']:.2f} | {r.get('wall_s', '-')} | {teacher} |")
    lines += ["", f"Best: **{best}**."]
    (args.results / "cpt_defaults.md").write_text("\n".join(lines) + "\n")
    (args.results / "cpt_defaults.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
