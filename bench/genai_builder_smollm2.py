"""ONNX Runtime GenAI on SmolLM2: our ONNX export against ONNX Runtime GenAI's own model builder.

- The builder (`python -m onnxruntime_genai.models.builder -p fp32|int4 -e cpu`) and our
  `--target onnx` on the same dense SmolLM2 folder; at int4 ours also with `--head-bits 8` (the LM
  head, and so the tied embedding, kept at int8; by default it is int4, as the builder stores it).
- Every folder run by onnxruntime-genai (`d2m-export bench --runtime onnxruntime-genai`), 2 threads:
  prefill and decode tok/s side by side in rounds, each run in its own process; decode also
  interleaved in one process (short bursts in turn, `runtimes.bench.interleaved`), which holds
  small differences on a noisy machine. Our exports also through our own ONNX Runtime runner.
- File size, and greedy agreement: each folder teacher-forced in onnxruntime-genai on the parity
  prompts against transformers fp32 (argmax agreement, max |logit error|).

Rerun:  python bench/genai_builder_smollm2.py   (writes bench/results/genai_builder_smollm2.md and .json)
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sidebyside import ROOT, bench_export, done, export, median, publish, ratio, rounds, sh  # noqa: E402

from d2m_export.sources.models import DEFAULT_MODEL, resolve_model  # noqa: E402

GENAI = "onnxruntime-genai"


def builder(model_dir: Path, precision: str, out: Path) -> Path:
    """ONNX Runtime GenAI's model builder on `model_dir`; a manifest.json is added so our tools load the folder."""
    if not done(out, "manifest.json"):
        tmp = out.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        sh([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", "HuggingFaceTB/SmolLM2-135M-Instruct",
            "-i", model_dir, "-o", tmp, "-p", precision, "-e", "cpu", "-c", out.parent / "builder-cache"],
           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        (tmp / "manifest.json").write_text(json.dumps({
            "target": "onnx", "files": ["model.onnx", "model.onnx.data"], "quant": precision,
            "generator": "onnxruntime_genai.models.builder"}, indent=2) + "\n")
        tmp.rename(out)
    return out


def size_mb(folder: Path) -> float:
    return round(sum((folder / f).stat().st_size for f in ("model.onnx", "model.onnx.data")) / 2**20, 1)


def agreement(model_dir: Path, folders: dict[str, Path], new_tokens: int = 32) -> dict:
    """Teacher-forced argmax agreement with transformers fp32 (the parity prompts), in onnxruntime-genai."""
    import numpy as np

    from converters.parity import PROMPTS, reference_greedy, runtime_forced
    from d2m_export.sources.models import load_model
    from runtimes.base import load_runner

    model, tokenizer, _ = load_model(model_dir)
    encoded = [tokenizer(p)["input_ids"] for p in PROMPTS]
    refs = [reference_greedy(model, ids, new_tokens) for ids in encoded]
    out = {}
    for name, folder in folders.items():
        with load_runner(folder, threads=2, runtime=GENAI, n_ctx=max(map(len, encoded)) + new_tokens + 8) as runner:
            got = [runtime_forced(runner, ids, ref[0]) for ids, ref in zip(encoded, refs)]
        out[name] = {"greedy_match": int(sum((g.argmax(-1) == np.array(r[0])).sum() for g, r in zip(got, refs))),
                     "greedy_total": sum(len(r[0]) for r in refs),
                     "max_abs_logit_err": round(float(max(np.abs(g - r[1]).max() for g, r in zip(got, refs))), 4)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="whole-process rounds (prefill and decode)")
    ap.add_argument("--interleaved-rounds", type=int, default=20, help="in-process decode bursts per folder")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "genai_builder")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "genai_builder_smollm2")
    args = ap.parse_args()
    t_start = time.time()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    dense = resolve_model(DEFAULT_MODEL)

    folders = {
        "builder fp32": builder(dense, "fp32", work / "builder-fp32"),
        "ours fp32": work / "ours-fp32",
        "builder int4": builder(dense, "int4", work / "builder-int4"),
        "ours int4": work / "ours-int4",
        "ours int4 head8": work / "ours-int4-head8",
    }
    manifests = {"ours fp32": export(DEFAULT_MODEL, "onnx", folders["ours fp32"]),
                 "ours int4": export(DEFAULT_MODEL, "onnx", folders["ours int4"], "--quant", "int4"),
                 "ours int4 head8": export(DEFAULT_MODEL, "onnx", folders["ours int4 head8"], "--quant", "int4",
                                           "--head-bits", "8")}

    def runs_in(folder: Path, runtime: str | None):
        tag = f"{folder.name}-{runtime or 'onnx'}"
        return lambda r: bench_export(folder, work / "bench" / f"{tag}-{r}.json", args.prompt_tokens, args.new_tokens,
                                      args.threads, runtime)

    variants = {f"{name} (genai)": runs_in(folder, GENAI) for name, folder in folders.items()}
    variants.update({f"{name} (our runner)": runs_in(folders[name], None) for name in manifests})
    rows = rounds(variants, args.rounds)

    from runtimes.bench import interleaved
    burst = {p: interleaved({n: (f, GENAI) for n, f in folders.items() if p in n}, rounds=args.interleaved_rounds,
                            tokens=16, prompt_tokens=args.prompt_tokens, threads=args.threads) for p in ("fp32", "int4")}
    agree = agreement(dense, folders)

    table = {}
    for name, folder in folders.items():
        v = f"{name} (genai)"
        table[name] = {"decode_tokens_per_s": median(rows, v), "prefill_tokens_per_s": median(rows, v, "prefill_tokens_per_s"),
                       "decode_ms_per_token_interleaved": burst["fp32" if "fp32" in name else "int4"]["variants"][name][
                           "decode_ms_per_token"],
                       "file_mb": size_mb(folder), **agree[name]}
    for name in manifests:
        table[name]["our_runner_decode_tokens_per_s"] = median(rows, f"{name} (our runner)")
        table[name]["our_runner_prefill_tokens_per_s"] = median(rows, f"{name} (our runner)", "prefill_tokens_per_s")
    ratios = {}
    for p, ours_names in (("fp32", ["ours fp32"]), ("int4", ["ours int4", "ours int4 head8"])):
        for o in ours_names:
            ratios[f"{o} / builder {p}"] = {
                "decode (rounds)": ratio(rows, f"{o} (genai)", f"builder {p} (genai)"),
                "decode (interleaved)": burst[p]["speedups"][f"{o} over builder {p}"],
                "prefill (rounds)": ratio(rows, f"{o} (genai)", f"builder {p} (genai)", "prefill_tokens_per_s"),
                "file size": round(table[o]["file_mb"] / table[f"builder {p}"]["file_mb"], 3)}
    result = {"model": DEFAULT_MODEL, "threads": args.threads, "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "rounds": args.rounds, "interleaved_rounds": args.interleaved_rounds,
              "table": table, "ratios": ratios, "interleaved": burst, "rows": rows,
              "wall_s": round(time.time() - t_start, 1)}
    publish(args.results, result, render)


def render(r: dict) -> str:
    lines = [f"# ONNX Runtime GenAI on {r['model']}: our export against ONNX Runtime GenAI's model builder", "",
             f"Dense SmolLM2-135M, CPU, {r['threads']} threads; every folder run by onnxruntime-genai. Prefill: "
             f"{r['prompt_tokens']}-token prompt; decode: {r['new_tokens']} tokens; medians over {r['rounds']} rounds, "
             f"each round running every variant once in its own process; 'interleaved': decode in one process, "
             f"{r['interleaved_rounds']} rounds of 16-token bursts in turn. Greedy agreement: teacher-forced argmax "
             "against transformers fp32 on the parity prompts.", "",
             "| folder | decode tok/s | decode ms/token (interleaved) | prefill tok/s | file MB | greedy agreement "
             "| max abs logit err | our runner: decode / prefill tok/s |", "|---|---|---|---|---|---|---|---|"]
    for name, t in r["table"].items():
        own = (f"{t['our_runner_decode_tokens_per_s']} / {t['our_runner_prefill_tokens_per_s']}"
               if "our_runner_decode_tokens_per_s" in t else "")
        lines.append(f"| {name} | {t['decode_tokens_per_s']} | {t['decode_ms_per_token_interleaved']} | "
                     f"{t['prefill_tokens_per_s']} | {t['file_mb']} | {t['greedy_match']}/{t['greedy_total']} | "
                     f"{t['max_abs_logit_err']} | {own} |")
    lines += ["", "| ours ÷ builder | decode (rounds) | decode (interleaved, spread) | prefill (rounds) | file size |",
              "|---|---|---|---|---|"]
    for name, x in r["ratios"].items():
        i = x["decode (interleaved)"]
        lines.append(f"| {name} | {x['decode (rounds)']} | {i['median']} ({i['spread'][0]}–{i['spread'][1]}) | "
                     f"{x['prefill (rounds)']} | {x['file size']} |")
    lines += ["", f"Wall time of the whole run: {r['wall_s']:.0f} s. Rerun: `python bench/genai_builder_smollm2.py`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
