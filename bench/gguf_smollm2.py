"""llama.cpp on SmolLM2: parity, our GGUF against llama.cpp's own converter, LF-UC speed-up, memory.

- Our exports of dense SmolLM2 and of its LF-UC conversion (--ratio) at f32, f16, q8_0, q4_0, each
  checked against transformers inside the export (greedy agreement, logit error).
- Our k-quants (q4_k_m, q5_k_m, q6_k: our f32 file through llama.cpp's quantizer, as
  `llama-quantize` does it, via llama-cpp-python).
- llama.cpp's own `convert_hf_to_gguf.py` (taken from the llama-cpp-python sdist of the installed
  version, i.e. the llama.cpp that runs the files) on the same Hugging Face folder, f16 and q8_0,
  and its f32 output through llama.cpp's quantizer for the k-quants: logits compared with ours
  under teacher forcing, decode speed side by side.
- Decode speed of every variant, side by side in rounds (bench/sidebyside.py), 2 threads, llama.cpp's
  default f16 KV cache; LF-UC ÷ dense against the roofline's bytes-per-token ratio at each quant.
- Peak RSS while decoding and file sizes, with the file's overhead over the real weights' bytes.

Rerun:  python bench/gguf_smollm2.py      (writes bench/results/gguf_smollm2.md and .json)
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sidebyside import (ROOT, bench_export, convert, done, export, median, parity_cells, publish, ratio,  # noqa: E402
                        ratio_lines, rounds, sh)  # noqa: E402

from converters.gguf import K_QUANTS, llama_quantize  # noqa: E402
from d2m_export.sources.models import DEFAULT_MODEL, read_config, resolve_model  # noqa: E402
from d2m_export.sources.params import param_counts  # noqa: E402
from d2m_export.devices.roofline import BYTES_PER_WEIGHT, decode_cost  # noqa: E402

QUANTS = ("f32", "f16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k")
REFERENCE_QUANTS = ("f16", "q8_0", "q4_k_m", "q5_k_m", "q6_k")


def llama_cpp_converter(work: Path) -> Path:
    """convert_hf_to_gguf.py of the installed llama-cpp-python's llama.cpp, from its sdist."""
    from importlib.metadata import version

    v = version("llama_cpp_python")
    root = work / f"llama.cpp-{v}"
    script = root / "convert_hf_to_gguf.py"
    if not script.is_file():
        sdist_dir = work / "sdist"
        sh([sys.executable, "-m", "pip", "download", "-q", f"llama-cpp-python=={v}", "--no-deps", "--no-binary", ":all:",
            "-d", sdist_dir])
        prefix = f"llama_cpp_python-{v}/vendor/llama.cpp/"
        tmp = work / f"llama.cpp-{v}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(next(sdist_dir.glob(f"llama_cpp_python-{v}.tar.gz"))) as tar:
            wanted = (prefix + "convert_hf_to_gguf.py", prefix + "gguf-py/", prefix + "conversion/")
            members = [m for m in tar.getmembers() if m.name.startswith(wanted)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(tmp, members=members, filter="data")
        tmp.rename(root)
    return script


def reference_export(script: Path, hf_dir: Path, quant: str, out: Path) -> Path:
    """llama.cpp's converter output, wrapped with a manifest so that our runner and bench load it."""
    if done(out, "manifest.json"):
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    name = f"llama-cpp-{quant}.gguf"
    if quant in K_QUANTS:      # the converter writes f32, llama.cpp's quantizer (as llama-quantize) makes the k-quant
        sh([sys.executable, script, hf_dir, "--outtype", "f32", "--outfile", tmp / "f32.gguf"], stderr=subprocess.DEVNULL)
        llama_quantize(tmp / "f32.gguf", tmp / name, K_QUANTS[quant])
    else:
        sh([sys.executable, script, hf_dir, "--outtype", quant, "--outfile", tmp / name], stderr=subprocess.DEVNULL)
    shutil.copy2(hf_dir / "tokenizer.json", tmp / "tokenizer.json")
    cfg = read_config(hf_dir)
    (tmp / "manifest.json").write_text(json.dumps({
        "generator": "bench/gguf_smollm2.py", "target": "gguf", "files": [name], "quant": quant,
        "model": "llama.cpp convert_hf_to_gguf.py", "context_length": cfg.get("max_position_embeddings"),
        "tokenizer": ["tokenizer.json"]}, indent=2))
    tmp.rename(out)
    return out


def teacher_forced_logits(export_dir: Path, prompt: list[int], tokens: list[int]) -> np.ndarray:
    from runtimes.base import load_runner

    with load_runner(export_dir, threads=2, kv_type="f32", n_ctx=len(prompt) + len(tokens) + 8) as runner:
        rows = [runner.prefill(prompt)]
        rows += [runner.decode(t) for t in tokens[:-1]]
    return np.stack(rows)


def compare_logits(ours: Path, reference: Path, prompt: list[int], tokens: list[int]) -> dict:
    a, b = teacher_forced_logits(ours, prompt, tokens), teacher_forced_logits(reference, prompt, tokens)
    return {"max_abs_logit_diff": float(np.abs(a - b).max()),
            "argmax_agree": int((a.argmax(-1) == b.argmax(-1)).sum()), "steps": len(tokens)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.8, help="LF-UC --target-active-ratio")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prepare-only", action="store_true", help="make the exports and stop (time them later, quietly)")
    ap.add_argument("--work", type=Path, default=Path("runs/bench_gguf"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gguf_smollm2.md")
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    hf_dense = resolve_model(DEFAULT_MODEL)
    lfuc = convert("lfuc", args.ratio, work / f"lfuc-{args.ratio}")
    exports = {}
    for q in QUANTS:
        exports[f"dense {q}"] = work / f"dense-{q}"
        exports[f"lfuc {q}"] = work / f"lfuc-{q}"
    manifests = {name: export(DEFAULT_MODEL if name.startswith("dense") else lfuc, "gguf", out, "--quant",
                              name.split()[1]) for name, out in exports.items()}
    script = llama_cpp_converter(work)
    for q in REFERENCE_QUANTS:
        exports[f"llama.cpp-converter {q}"] = reference_export(script, hf_dense, q, work / f"reference-{q}")

    from runtimes.bench import prompt_ids
    prompt = prompt_ids(exports["dense f32"], 32)
    tokens = manifests["dense f32"]["parity"]["prompts"][0]["reference_tokens"]
    logit_match = {q: compare_logits(exports[f"dense {q}"], exports[f"llama.cpp-converter {q}"], prompt, tokens)
                   for q in REFERENCE_QUANTS}

    if args.prepare_only:
        return
    variants = {name: (lambda out: lambda r: bench_export(out, work / "bench" / f"{out.name}-{r}.json",
                                                           args.prompt_tokens, args.new_tokens, args.threads))(out)
                for name, out in exports.items()}
    rows = rounds(variants, args.rounds)

    dense_cfg, lfuc_cfg = read_config(hf_dense), read_config(lfuc)
    context = args.prompt_tokens + args.new_tokens // 2

    def roofline(q):     # llama.cpp's default KV cache is f16
        return round(decode_cost(dense_cfg, q, context, kv_bytes=2).bytes / decode_cost(lfuc_cfg, q, context, kv_bytes=2).bytes, 3)

    variants_out = {}
    for name, out in exports.items():
        m = manifests.get(name)
        q = name.split()[-1]
        cfg = lfuc_cfg if name.startswith("lfuc") else dense_cfg
        file_mb = rows[0][name]["artifact_mb"]
        weights_mb = param_counts(cfg).total * BYTES_PER_WEIGHT[q] / 2**20
        variants_out[name] = {
            "decode_tokens_per_s": median(rows, name), "decode_ms_per_token_p50": median(rows, name, "decode_ms_per_token_p50"),
            "prefill_tokens_per_s": median(rows, name, "prefill_tokens_per_s"),
            "peak_rss_mb": median(rows, name, "peak_rss_mb"), "file_mb": file_mb,
            "file_overhead_vs_weights": round(file_mb / weights_mb - 1, 3),
            **({"parity": {k: m["parity"][k] for k in ("greedy_match", "greedy_total", "max_abs_logit_err")},
                "architecture": m["gguf"].get("architecture"), "export_wall_s": m["wall_s"]} if m else {}),
        }
    speedups = {}
    for q in QUANTS:
        measured = ratio(rows, f"lfuc {q}", f"dense {q}")
        speedups[f"lfuc/dense {q}"] = {"measured": measured, "roofline": roofline(q),
                                       "of_roofline": round(measured / roofline(q), 3)}
    for q in REFERENCE_QUANTS:
        speedups[f"ours/llama.cpp-converter dense {q}"] = {"measured": ratio(rows, f"dense {q}", f"llama.cpp-converter {q}")}
    result = {"model": DEFAULT_MODEL, "ratio": args.ratio, "threads": args.threads, "rounds": args.rounds,
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "active_params": {"dense": param_counts(dense_cfg).active, "lfuc": param_counts(lfuc_cfg).active},
              "plan": manifests["lfuc f32"]["plan"], "variants": variants_out, "speedups": speedups,
              "logits_vs_llama_cpp_converter": logit_match, "wall_s": round(time.time() - t_start, 1)}
    publish(args.out, result, render)


def render(r: dict) -> str:
    lines = [f"# llama.cpp (llama-cpp-python) decode on {r['model']} ({r['threads']} threads)", "",
             f"Prompt {r['prompt_tokens']} tokens, {r['new_tokens']} new tokens, f16 KV cache; medians over "
             f"{r['rounds']} rounds, each round running every variant once, side by side. LF-UC at target active "
             f"ratio {r['ratio']}: {r['active_params']['lfuc']:,} of {r['active_params']['dense']:,} parameters active.", "",
             "| variant | arch | decode tok/s | ms/token p50 | prefill tok/s | peak RSS MB | file MB | file over weights | greedy match | max abs logit err |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in r["variants"].items():
        lines.append(f"| {name} | {v.get('architecture', 'llama')} | {v['decode_tokens_per_s']} | "
                     f"{v['decode_ms_per_token_p50']} | {v['prefill_tokens_per_s']} | {v['peak_rss_mb']} | {v['file_mb']} | "
                     f"{v['file_overhead_vs_weights']:+.1%} | {parity_cells(v)} |")
    lines += ["", *ratio_lines(r["speedups"])]
    lines += ["", "Our dense export against llama.cpp's converter, teacher-forced on the same tokens (f32 KV cache):", ""]
    for q, c in r["logits_vs_llama_cpp_converter"].items():
        lines.append(f"- {q}: max |logit difference| {c['max_abs_logit_diff']:.3g}, argmax equal at "
                     f"{c['argmax_agree']}/{c['steps']} steps")
    lines += ["", f"Wall time of the whole run: {r['wall_s']:.0f} s. Rerun: `python bench/gguf_smollm2.py`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
