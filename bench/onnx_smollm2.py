"""ONNX Runtime on SmolLM2: parity, sparse-routing speed-up against the roofline, optimum and llama.cpp.

Everything is timed side by side: each round benchmarks every variant once (its own process, 2
threads), in turn, and ratios are taken within a round, then the median over rounds — the machine
is shared and noisy, ratios are what hold. Variants:

- dense fp32, LF-UC fp32 (at --ratio, one `com.microsoft.MoE` node per MoE layer, the default),
  the same LF-UC routed in plain ONNX (`--moe-lowering gather`) and with the dense-mask lowering
  optimum-onnx uses (every expert computed), layer pruning at the same active ratio (LF-UC's
  baseline: the same attention layers and active weights, no routing), and dense, LF-UC (QMoE and
  gather) and pruned int4;
- `optimum-cli export onnx --task text-generation-with-past` of the same dense model, run by
  optimum's ORTModelForCausalLM under the same onnxruntime (optimum-onnx pins an older
  transformers, so it gets its own venv, made here from the package registry);
- llama.cpp f32 (our GGUF export, llama-cpp-python) of the same weights.

`--ci` is the short version `.ci/run` uses (a tiny random model, dense and LF-UC SmolLM2 fp32;
fewer rounds) and writes reports/onnxruntime_latency.md and .json. It fails only when an export
fails its parity check (the export exits 1), never on a noisy time.

Rerun:  python bench/onnx_smollm2.py            (writes bench/results/onnx_smollm2.md and .json)
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

OPTIMUM_PINS = ["optimum-onnx==0.1.0", "transformers==4.57.6"]


def make_tiny(work: Path) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer: exercises the whole path in seconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = work / "tiny"
    if done(out, "config.json"):
        return out
    smol = resolve_model(DEFAULT_MODEL)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
    tmp = work / "tiny.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (smol / f).is_file():
            shutil.copy2(smol / f, tmp / f)
    tmp.rename(out)
    return out


def optimum_venv(work: Path) -> Path:
    import onnxruntime
    return make_venv(work / "optimum-venv", *OPTIMUM_PINS, f"onnxruntime=={onnxruntime.__version__}")


def optimum_run(venv: Path, model_dir: Path, prompt: list[int], args, *extra) -> dict:
    return run_in_venv(venv, "optimum_ort_decode.py", model_dir, prompt, args.new_tokens, args.threads, *extra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.8, help="LF-UC --target-active-ratio")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("runs/bench_onnx"))
    ap.add_argument("--ci", action="store_true", help="short run for CI: writes reports/onnxruntime_latency.*")
    ap.add_argument("--out", type=Path, default=None, help="markdown file (a .json is written beside it)")
    args = ap.parse_args()
    if args.ci:
        args.rounds = min(args.rounds, 3)
    out_md = args.out or (ROOT / "reports" / "onnxruntime_latency.md" if args.ci else
                          ROOT / "bench" / "results" / "onnx_smollm2.md")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    dense = resolve_model(DEFAULT_MODEL)
    # CI's short run times the layouts, which healing does not change: it skips convert's default healing
    unhealed = ("--no-heal",) if args.ci else ()
    lfuc = convert("lfuc", args.ratio, work / f"lfuc-{args.ratio}", *unhealed)
    prune = convert("prune", args.ratio, work / f"prune-{args.ratio}", *unhealed)

    exports = {"dense fp32": (DEFAULT_MODEL, "onnx", work / "dense-fp32", ()),
               "lfuc fp32": (lfuc, "onnx", work / "lfuc-fp32", ())}
    if args.ci:
        exports = {"tiny fp32": (make_tiny(work), "onnx", work / "tiny-fp32", ()), **exports}
    else:
        exports.update({
            "lfuc fp32 gather": (lfuc, "onnx", work / "lfuc-fp32-gather", ("--moe-lowering", "gather")),
            "lfuc fp32 dense-mask": (lfuc, "onnx", work / "lfuc-fp32-dense-mask", ("--moe-lowering", "dense")),
            "prune fp32": (prune, "onnx", work / "prune-fp32", ()),
            "dense int4": (DEFAULT_MODEL, "onnx", work / "dense-int4", ("--quant", "int4")),
            "lfuc int4": (lfuc, "onnx", work / "lfuc-int4", ("--quant", "int4")),
            "lfuc int4 gather": (lfuc, "onnx", work / "lfuc-int4-gather", ("--quant", "int4", "--moe-lowering", "gather")),
            "prune int4": (prune, "onnx", work / "prune-int4", ("--quant", "int4")),
            "dense llama.cpp f32": (DEFAULT_MODEL, "gguf", work / "dense-gguf-f32", ("--quant", "f32")),
        })
    manifests = {name: export(m, target, out, *extra) for name, (m, target, out, extra) in exports.items()}

    venv = optimum_dir = None
    optimum_loads = {}
    if not args.ci:
        venv = optimum_venv(work)
        optimum_dir = work / "optimum-dense"
        if not done(optimum_dir, "model.onnx"):
            tmp = work / "optimum-dense.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            sh([venv / "bin" / "optimum-cli", "export", "onnx", "--model", dense, "--task", "text-generation-with-past",
                tmp])
            tmp.rename(optimum_dir)
    from runtimes.bench import prompt_ids
    prompt = prompt_ids(work / "dense-fp32", args.prompt_tokens)
    if venv is not None:
        for name in ("dense fp32", "lfuc fp32"):
            optimum_loads[name] = optimum_run(venv, exports[name][2], prompt[:16], args, "--load-only")

    def ours(out):
        return lambda r: bench_export(out, work / "bench" / f"{out.name}-{r}.json", args.prompt_tokens,
                                      args.new_tokens, args.threads)

    variants = {name: ours(out) for name, (_, _, out, _) in exports.items()}
    if venv is not None:
        variants["dense optimum-onnx"] = lambda r: optimum_run(venv, optimum_dir, prompt, args)
    rows = rounds(variants, args.rounds)

    dense_cfg, lfuc_cfg = read_config(dense), read_config(lfuc)
    context = args.prompt_tokens + args.new_tokens // 2
    roofline = {q: round(predicted_speedup(dense_cfg, lfuc_cfg, q, context), 3) for q in ("fp32", "int4")}
    variants = {}
    for name in rows[0]:
        m = manifests.get(name)
        variants[name] = {
            "decode_tokens_per_s": median(rows, name),
            "decode_ms_per_token_p50": median(rows, name, "decode_ms_per_token_p50"),
            **({"prefill_tokens_per_s": median(rows, name, "prefill_tokens_per_s"),
                "peak_rss_mb": median(rows, name, "peak_rss_mb"), "artifact_mb": rows[0][name]["artifact_mb"]} if m else {}),
            **({"parity": {k: m["parity"][k] for k in ("greedy_match", "greedy_total", "max_abs_logit_err")},
                "export_wall_s": m["wall_s"]} if m else {}),
        }
    speedups = {"lfuc/dense fp32": {"measured": ratio(rows, "lfuc fp32", "dense fp32"), "roofline": roofline["fp32"]}}
    if not args.ci:
        speedups.update({
            "lfuc dense-mask/dense fp32": {"measured": ratio(rows, "lfuc fp32 dense-mask", "dense fp32")},
            "lfuc gather/dense fp32": {"measured": ratio(rows, "lfuc fp32 gather", "dense fp32")},
            "lfuc/lfuc gather fp32": {"measured": ratio(rows, "lfuc fp32", "lfuc fp32 gather")},
            "lfuc/prune fp32": {"measured": ratio(rows, "lfuc fp32", "prune fp32")},
            "lfuc/dense int4": {"measured": ratio(rows, "lfuc int4", "dense int4"), "roofline": roofline["int4"]},
            "lfuc/lfuc gather int4": {"measured": ratio(rows, "lfuc int4", "lfuc int4 gather")},
            "lfuc/prune int4": {"measured": ratio(rows, "lfuc int4", "prune int4")},
            "dense int4/fp32": {"measured": ratio(rows, "dense int4", "dense fp32")},
            "ours/optimum-onnx dense fp32": {"measured": ratio(rows, "dense fp32", "dense optimum-onnx")},
            "ours/llama.cpp dense f32": {"measured": ratio(rows, "dense fp32", "dense llama.cpp f32")},
        })
    for s in speedups.values():
        if "roofline" in s:
            s["of_roofline"] = round(s["measured"] / s["roofline"], 3)
    result = {"model": DEFAULT_MODEL, "ratio": args.ratio, "threads": args.threads, "rounds": args.rounds,
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "active_params": {"dense": param_counts(dense_cfg).active, "lfuc": param_counts(lfuc_cfg).active},
              "plan": manifests["lfuc fp32"]["plan"], "variants": variants, "speedups": speedups,
              "optimum_loads_our_exports": optimum_loads, "wall_s": round(time.time() - t_start, 1)}
    publish(out_md, result, render)


def render(r: dict) -> str:
    lines = [f"# ONNX Runtime decode on {r['model']} ({r['threads']} threads)", "",
             f"Prompt {r['prompt_tokens']} tokens, {r['new_tokens']} new tokens; medians over {r['rounds']} rounds, "
             f"each round running every variant once, side by side. LF-UC at target active ratio {r['ratio']}: "
             f"{r['active_params']['lfuc']:,} of {r['active_params']['dense']:,} parameters active.", "",
             "| variant | decode tok/s | ms/token p50 | prefill tok/s | peak RSS MB | artifact MB | greedy match | max abs logit err |",
             "|---|---|---|---|---|---|---|---|"]
    for name, v in r["variants"].items():
        lines.append(f"| {name} | {v['decode_tokens_per_s']} | {v['decode_ms_per_token_p50']} | "
                     f"{v.get('prefill_tokens_per_s', '')} | {v.get('peak_rss_mb', '')} | {v.get('artifact_mb', '')} | "
                     f"{parity_cells(v)} |")
    lines += ["", *ratio_lines(r["speedups"])]
    if r["optimum_loads_our_exports"]:
        lines += ["", "optimum `ORTModelForCausalLM.from_pretrained` on our exports:", ""]
        for name, res in r["optimum_loads_our_exports"].items():
            lines.append(f"- {name}: " + ("loads and generates" if res.get("loads") and res.get("runs", True) else
                                            f"does not load: {res.get('error')}" if not res.get("loads") else
                                            f"loads, does not run: {res.get('error')}"))
    lines += ["", f"Wall time of the whole run: {r['wall_s']:.0f} s. Rerun: `python bench/onnx_smollm2.py"
              + (" --ci`" if "tiny fp32" in r["variants"] else "`"), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
