"""ExecuTorch on SmolLM2: parity, sparse-routing speed-up against the roofline, optimum-executorch.

- Our `.pte` exports of dense SmolLM2 and its LF-UC conversion (--ratio), fp32 and 8da4w, MoE lowered
  with `cond` (decode runs only the selected experts); LF-UC fp32 also with the `dense` lowering
  (every expert, masked) for comparison. Parity, export wall time and peak memory from each manifest.
- `optimum-cli export executorch --recipe xnnpack --use_custom_sdpa --use_custom_kv_cache` of the same
  dense model (optimum-executorch pins its own transformers: it gets its own venv, made here from the
  package registry), timed through its ExecuTorchModelForCausalLM; the same venv checks that
  ExecuTorchModelForCausalLM loads our bundles and generates.
- Decode speed of every variant side by side in rounds (bench/sidebyside.py), 2 threads.

Rerun:  python bench/executorch_smollm2.py      (writes bench/results/executorch_smollm2.md and .json)
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sidebyside import (ROOT, bench_export, convert, done, export, make_venv, median, parity_cells, publish, ratio,  # noqa: E402
                        ratio_lines, rounds, run_in_venv, sh)  # noqa: E402

from d2m_export.sources.models import DEFAULT_MODEL, read_config, resolve_model  # noqa: E402
from d2m_export.sources.params import param_counts  # noqa: E402
from d2m_export.devices.roofline import predicted_speedup  # noqa: E402

OPTIMUM_PINS = ["optimum-executorch==1.1.0"]


def optimum_venv(work: Path) -> Path:
    from importlib.metadata import version
    return make_venv(work / "optimum-et-venv", *OPTIMUM_PINS, f"executorch=={version('executorch')}")


def optimum_run(venv: Path, model_dir: Path, prompt: list[int], args, *extra) -> dict:
    return run_in_venv(venv, "optimum_et_decode.py", model_dir, prompt, args.new_tokens, args.threads, *extra)


def llm_runner_check(bundle: Path, text: str, new_tokens: int = 32) -> dict:
    """ExecuTorch's own LLM runner (the C++ TextLLMRunner that llama_main and the Android LlmModule
    wrap) on our bundle, greedy, against our runner's greedy tokens decoded."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (llama::custom_sdpa, as an app links them)
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    from runtimes.base import load_runner, load_tokenizer

    pieces: list[str] = []
    TextLLMRunner(str(bundle / "model.pte"), str(bundle / "tokenizer.json")).generate(
        text, GenerationConfig(echo=False, max_new_tokens=new_tokens, temperature=0.0), pieces.append)
    tokenizer = load_tokenizer(bundle)
    with load_runner(bundle, threads=2) as runner:
        eos = runner.manifest["executorch"]["metadata"].get("get_eos_ids", [])
        ours = tokenizer.decode(runner.generate(tokenizer.encode(text).ids, new_tokens, stop_ids=eos))
    theirs = "".join(pieces)
    return {"llm_runner_text": theirs, "our_runner_text": ours, "equal": theirs == ours}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.8, help="LF-UC --target-active-ratio")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prepare-only", action="store_true", help="make the exports and stop (time them later, quietly)")
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--work", type=Path, default=Path("runs/bench_executorch"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "executorch_smollm2.md")
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    hf_dense = resolve_model(DEFAULT_MODEL)
    lfuc = convert("lfuc", args.ratio, work / f"lfuc-{args.ratio}")
    msl = ("--max-seq-len", args.max_seq_len)
    exports = {"dense fp32": (DEFAULT_MODEL, work / "dense-fp32", msl),
               "lfuc fp32": (lfuc, work / "lfuc-fp32", msl),
               "lfuc fp32 dense-lowering": (lfuc, work / "lfuc-fp32-dense", (*msl, "--moe-lowering", "dense")),
               "dense 8da4w": (DEFAULT_MODEL, work / "dense-8da4w", (*msl, "--quant", "8da4w")),
               "lfuc 8da4w": (lfuc, work / "lfuc-8da4w", (*msl, "--quant", "8da4w"))}
    manifests = {name: export(model, "executorch", out, *extra) for name, (model, out, extra) in exports.items()}

    venv = optimum_venv(work)
    optimum_dir = work / "optimum-dense-fp32"
    if not done(optimum_dir, "model.pte"):
        tmp = work / "optimum-dense-fp32.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.time()
        sh([venv / "bin" / "optimum-cli", "export", "executorch", "--model", hf_dense, "--task", "text-generation",
            "--recipe", "xnnpack", "--use_custom_sdpa", "--use_custom_kv_cache", "--max_seq_len", args.max_seq_len,
            "--output_dir", tmp])
        (tmp / "export_wall_s.txt").write_text(f"{time.time() - t0:.1f}\n")
        tmp.rename(optimum_dir)
    from runtimes.bench import prompt_ids
    prompt = prompt_ids(exports["dense fp32"][1], args.prompt_tokens)
    optimum_loads = {}
    for name in ("dense fp32", "lfuc fp32"):
        optimum_loads[name] = res = optimum_run(venv, exports[name][1], prompt[:16], args, "--load-only")
        if res.get("tokens"):        # optimum's own greedy loop against ours, on the same bundle
            from runtimes.base import load_runner
            with load_runner(exports[name][1], threads=2) as runner:
                ours = runner.generate(prompt[:16], len(res["tokens"]))
            res["same_tokens_as_our_runner"] = ours == res["tokens"]

    if args.prepare_only:
        return
    llm_runner = {name: llm_runner_check(exports[name][1], "Once upon a time, in a small village by the sea,")
                  for name in ("dense fp32", "lfuc fp32")}

    variants = {name: (lambda out: lambda r: bench_export(out, work / "bench" / f"{out.name}-{r}.json",
                                                           args.prompt_tokens, args.new_tokens, args.threads))(out)
                for name, (_, out, _) in exports.items()}
    variants["dense fp32 optimum-executorch"] = lambda r: optimum_run(venv, optimum_dir, prompt, args)
    rows = rounds(variants, args.rounds)

    dense_cfg, lfuc_cfg = read_config(hf_dense), read_config(lfuc)
    context = args.prompt_tokens + args.new_tokens // 2
    out_variants = {}
    for name in rows[0]:
        m = manifests.get(name)
        et = (m or {}).get("executorch", {})
        out_variants[name] = {
            "decode_tokens_per_s": median(rows, name), "decode_ms_per_token_p50": median(rows, name, "decode_ms_per_token_p50"),
            "prefill_tokens_per_s": median(rows, name, "prefill_tokens_per_s"),
            **({"peak_rss_mb": median(rows, name, "peak_rss_mb"), "pte_mb": rows[0][name]["artifact_mb"],
                "parity": {k: m["parity"][k] for k in ("greedy_match", "greedy_total", "max_abs_logit_err")},
                "export_s": et.get("export_s"), "export_peak_rss_mb": et.get("peak_rss_mb"),
                "export_and_parity_wall_s": m["wall_s"]} if m else
               {"export_s": float((optimum_dir / "export_wall_s.txt").read_text())}),
        }
    speedups = {}
    for q, rq in (("fp32", "fp32"), ("8da4w", "8da4w")):
        measured = ratio(rows, f"lfuc {q}", f"dense {q}")
        roof = round(predicted_speedup(dense_cfg, lfuc_cfg, rq, context), 3)
        speedups[f"lfuc/dense {q}"] = {"measured": measured, "roofline": roof, "of_roofline": round(measured / roof, 3)}
    speedups["lfuc dense-lowering/dense fp32"] = {"measured": ratio(rows, "lfuc fp32 dense-lowering", "dense fp32")}
    speedups["ours/optimum-executorch dense fp32"] = {"measured": ratio(rows, "dense fp32", "dense fp32 optimum-executorch")}
    result = {"model": DEFAULT_MODEL, "ratio": args.ratio, "threads": args.threads, "rounds": args.rounds,
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "max_seq_len": args.max_seq_len,
              "active_params": {"dense": param_counts(dense_cfg).active, "lfuc": param_counts(lfuc_cfg).active},
              "plan": manifests["lfuc fp32"]["plan"], "variants": out_variants, "speedups": speedups,
              "optimum_executorch_loads_our_bundles": optimum_loads,
              "executorch_llm_runner_on_our_bundles": llm_runner, "wall_s": round(time.time() - t_start, 1)}
    publish(args.out, result, render)


def render(r: dict) -> str:
    lines = [f"# ExecuTorch (XNNPACK) decode on {r['model']} ({r['threads']} threads)", "",
             f"Prompt {r['prompt_tokens']} tokens, {r['new_tokens']} new tokens, max_seq_len {r['max_seq_len']}; "
             f"medians over {r['rounds']} rounds, each round running every variant once, side by side. LF-UC at "
             f"target active ratio {r['ratio']}: {r['active_params']['lfuc']:,} of {r['active_params']['dense']:,} "
             "parameters active.", "",
             "| variant | decode tok/s | ms/token p50 | prefill tok/s | peak RSS MB | .pte MB | export s | export peak RSS MB | greedy match | max abs logit err |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in r["variants"].items():
        lines.append(f"| {name} | {v['decode_tokens_per_s']} | {v['decode_ms_per_token_p50']} | {v['prefill_tokens_per_s']} | "
                     f"{v.get('peak_rss_mb', '')} | {v.get('pte_mb', '')} | {v.get('export_s', '')} | "
                     f"{v.get('export_peak_rss_mb', '')} | {parity_cells(v)} |")
    lines += ["", *ratio_lines(r["speedups"])]
    lines += ["", "optimum-executorch `ExecuTorchModelForCausalLM.from_pretrained` on our bundles:", ""]
    for name, res in r["optimum_executorch_loads_our_bundles"].items():
        lines.append(f"- {name}: " + (f"loads and generates {len(res.get('tokens', []))} tokens, "
                                        + ("the same as our runner" if res.get("same_tokens_as_our_runner") else "NOT the same as our runner")
                                        if res.get("loads") and res.get("runs", True)
                                        else f"does not load: {res.get('error')}" if not res.get("loads")
                                        else f"loads, does not run: {res.get('error')}"))
    lines += ["", "ExecuTorch's LLM runner (`TextLLMRunner`, what `llama_main` and Android's `LlmModule` wrap), greedy, "
              "32 tokens, against our runner:", ""]
    for name, res in r["executorch_llm_runner_on_our_bundles"].items():
        lines.append(f"- {name}: " + ("same text" if res["equal"] else "DIFFERENT text") + f": {res['llm_runner_text']!r}")
    lines += ["", f"Wall time of the whole run: {r['wall_s']:.0f} s. Rerun: `python bench/executorch_smollm2.py`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
