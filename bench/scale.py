"""Every stage at the shapes people convert: wall time and peak RSS for random-weight models shaped like
Llama-3.2-1B and Qwen2.5-3B (bf16 safetensors, configs written here; SmolLM2's tokenizer, whose ids all
fall inside the larger vocabularies).

Stages, each its own process so that its peak RSS is its own (os.wait4): analyze, convert lfuc@0.8,
heal (a short one), train (one optimizer step; bf16 weights as stored, fp32 weights, and the MoE layers
alone), eval (a small
--limit), generate, and each export at its default quant and its smallest. A stage that fails is
recorded with its last error line; the table says which. Random weights say nothing about quality:
only memory and time are measured (the embedding is scaled so that greedy decoding has clear
winners, which lossy exports' parity checks need; see EMBED_STD). Each finished stage is cached in
the work folder, so a rerun resumes. Writes bench/results/scale.md (and .json).
Rerun:  python bench/scale.py [--shapes llama-3.2-1b,qwen2.5-3b] [--stages ...]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from sidebyside import CLI
from d2m_export.sources.models import resolve_model
from d2m_export.outputs import atomic_dir, write_json

SHAPES = {
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False},
    "qwen2.5-3b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 2048,
        "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
        "vocab_size": 151936, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": True, "hidden_act": "silu", "use_sliding_window": False, "sliding_window": 32768,
        "max_window_layers": 36},
}
SHARD_BYTES = 2 << 30
# With every weight at std 0.02 the tied LM head's logits are near-ties among 100k+ words, and a lossy
# export's parity check (greedy tokens against transformers) fails on noise: the embedding is scaled up
# so that each step has a clear argmax (the residual stream, and so the next token, is led by the
# current one), as a trained model has. Memory and time do not depend on the values.
EMBED_STD = 1.0
FINAL_NORM = 1 / 64     # and the final norm scaled down, so that logits stay in a trained model's range (~30)


def layer_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    d = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    shapes = {"self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
              "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
              "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i),
              "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}
    if cfg["model_type"] == "qwen2":
        shapes |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
    return shapes


def make_model(name: str, out: Path) -> Path:
    """A random bf16 checkpoint at `name`'s shape, written shard by shard (never the whole model in memory)."""
    if (out / "config.json").is_file():
        return out
    cfg = SHAPES[name]
    smollm2 = resolve_model("smollm2-135m")
    tok_cfg = json.loads((smollm2 / "config.json").read_text())
    gen = torch.Generator().manual_seed(0)

    def tensor(key, shape):
        if key.endswith("norm.weight"):
            return torch.full(shape, FINAL_NORM if key == "model.norm.weight" else 1.0, dtype=torch.bfloat16)
        std = EMBED_STD if key == "model.embed_tokens.weight" else 0.02
        return (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)

    names = [("model.embed_tokens.weight", (cfg["vocab_size"], cfg["hidden_size"]))]
    for layer in range(cfg["num_hidden_layers"]):
        names += [(f"model.layers.{layer}.{k}", s) for k, s in layer_shapes(cfg).items()]
    names.append(("model.norm.weight", (cfg["hidden_size"],)))
    with atomic_dir(out) as tmp:
        shard: dict = {}
        files: list[str] = []
        weight_map: dict[str, str] = {}

        def flush():
            files.append(f"model-{len(files) + 1:05d}.safetensors")
            save_file(shard, tmp / files[-1], metadata={"format": "pt"})
            weight_map.update({k: files[-1] for k in shard})
            shard.clear()

        for key, shape in names:
            shard[key] = tensor(key, shape)
            if sum(t.numel() * 2 for t in shard.values()) >= SHARD_BYTES:
                flush()
        if shard:
            flush()
        total = sum(torch.Size(s).numel() * 2 for _, s in names)
        write_json(tmp / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
        (tmp / "config.json").write_text(json.dumps(      # plain: a "generator" key means something to transformers
            {**cfg, "dtype": "bfloat16", "bos_token_id": tok_cfg.get("bos_token_id"),
             "eos_token_id": tok_cfg.get("eos_token_id"), "use_cache": True}, indent=2) + "\n")
        for f in smollm2.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                shutil.copy2(f, tmp / f.name)
    return out


def stages(model: Path, work: Path, which: list[str]) -> dict[str, list]:
    exports = {"gguf": ["f32", "q4_0"], "onnx": ["fp32", "int4"], "executorch": ["fp32", "8da4w"],
               "coreml": ["fp16", "int4"]}
    converted, healed = work / "lfuc", work / "healed"
    plan = {
        "analyze": ["analyze", "--model", model, "--out", work / "analyze"],
        "convert": ["convert", "--model", model, "--method", "lfuc", "--target-active-ratio", 0.8, "--no-heal",
                    "--out", converted],
        "heal": ["heal", "--model", converted, "--out", healed, "--calib-tokens", 1024, "--steps", 5],
        # one optimizer step of 2 × 256 tokens: the model, gradients and Adam state are what cost memory
        "train": ["train", "--model", converted, "--tokens", 512, "--seq-len", 256, "--micro-batch", 1,
                  "--global-batch", 2, "--save-every", 10**9, "--out", work / "trained"],
        "train fp32": ["train", "--model", converted, "--weights-dtype", "fp32", "--tokens", 512, "--seq-len", 256,
                       "--micro-batch", 1, "--global-batch", 2, "--save-every", 10**9, "--out", work / "trained-fp32"],
        # the same step training the MoE layers alone (experts, shared experts, routers): Adam's state
        # for ~27% of the weights, which is what makes the 3B shape fit
        "train moe": ["train", "--model", converted, "--train-only", "moe", "--tokens", 512, "--seq-len", 256,
                      "--micro-batch", 1, "--global-batch", 2, "--save-every", 10**9, "--out", work / "trained-moe"],
        "eval": ["eval", "--model", healed, "--tasks", "arc_easy", "--limit", 5, "--ppl-tokens", 1024,
                 "--out", work / "eval.json"],
    }
    for target, quants in exports.items():
        for quant in quants:
            plan[f"export {target} {quant}"] = ["--target", target, "--model", converted, "--quant", quant,
                                                "--threads", 2, "--out", work / f"{target}-{quant}"]
    plan["generate"] = ["generate", work / "gguf-q4_0", "--prompt", "The capital of France is",
                        "--max-new-tokens", 8]
    if not which:
        return plan
    # a stage by its name, or every stage of a kind ("export", "export gguf") where no stage has that name
    return {k: v for w in which for k, v in plan.items() if k == w or (w not in plan and k.startswith(w + " "))}


NEEDED_LATER = {"lfuc", "healed", "gguf-q4_0"}     # read by the stages after them


def run_stage(cmd: list, prefix: tuple | list = tuple(CLI)) -> dict:
    """Wall time and peak RSS of one CLI call (or, with `prefix=()`, any command) in its own process."""
    t0 = time.time()
    proc = subprocess.Popen([str(c) for c in [*prefix, *cmd]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    tail: list[str] = []
    for line in proc.stdout:
        sys.stdout.write(line)
        tail = (tail + [line.rstrip()])[-20:]
    _, status, usage = os.wait4(proc.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    last = next((t for t in reversed(tail) if t.strip()), "")
    return {"rc": rc, "wall_s": round(time.time() - t0, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),
            "error": None if rc == 0 else last[-300:], "last_line": last[-2000:]}


def dir_gb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 2**30, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help=", ".join(SHAPES))
    ap.add_argument("--stages", default="", help="analyze, convert, heal, train, eval, export, generate, or one export "
                    "('export gguf q4_0'); default all")
    ap.add_argument("--rerun", action="store_true", help="run the chosen stages again even if recorded")
    ap.add_argument("--work", type=Path, default=Path("runs/bench_scale"))
    ap.add_argument("--keep-outputs", action="store_true",
                    help="keep every stage's output (by default only those a later stage reads stay)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scale.md")
    args = ap.parse_args()
    which = [s.strip() for s in args.stages.split(",") if s.strip()]
    results = json.loads(args.out.with_suffix(".json").read_text()) if args.out.with_suffix(".json").is_file() \
        else {"shapes": {}}
    for shape in [s for s in args.shapes.split(",") if s]:
        work = args.work / shape
        model = make_model(shape, work / "model")
        row = results["shapes"].setdefault(shape, {"stages": {}})
        row["checkpoint_gb"] = dir_gb(model)
        row["params"] = sum(torch.Size(s).numel() for s in [(SHAPES[shape]["vocab_size"], SHAPES[shape]["hidden_size"])]) + \
            SHAPES[shape]["num_hidden_layers"] * sum(torch.Size(s).numel() for s in layer_shapes(SHAPES[shape]).values())
        for name, cmd in stages(model, work, which).items():
            if name in row["stages"] and row["stages"][name]["rc"] == 0 and not args.rerun:
                continue
            out_path = next((Path(c) for c, prev in zip(cmd[1:], cmd) if prev == "--out"), None)
            if out_path is not None and out_path.exists():
                shutil.rmtree(out_path) if out_path.is_dir() else out_path.unlink()
            print(f"== {shape}: {name}", flush=True)
            result = run_stage(cmd)
            if out_path is not None and out_path.exists() and result["rc"] == 0:
                result["output_gb"] = dir_gb(out_path)
                if out_path.name not in NEEDED_LATER and not args.keep_outputs:   # up to 12 GB each at 3B
                    shutil.rmtree(out_path) if out_path.is_dir() else out_path.unlink()
            row["stages"][name] = {**result, "command": "d2m-export " + " ".join(str(c) for c in cmd)}
            save(shape, row, args.out)
    print(args.out.read_text())


def save(shape: str, row: dict, out: Path) -> None:
    """Merge one shape's row into the results on disk (runs for other shapes may write beside this one)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".json")
    results = json.loads(path.read_text()) if path.is_file() else {"shapes": {}}
    results["shapes"][shape] = {**results["shapes"].get(shape, {}), **row,
                                "stages": {**results["shapes"].get(shape, {}).get("stages", {}), **row["stages"]}}
    write_json(path, results)
    lines = ["# Every stage at 1B and 3B shapes, on this machine (2 cores, 24 GiB)", "",
             "Random-weight bf16 checkpoints at the shapes of Llama-3.2-1B and Qwen2.5-3B (`bench/scale.py`). "
             "Peak RSS is each stage's own process (`os.wait4`); ratio = peak RSS ÷ checkpoint bytes. "
             "Wall times are on a shared 2-core machine. Quality is meaningless on random weights.", ""]
    for shape, row in results["shapes"].items():
        ckpt = row["checkpoint_gb"]
        lines += [f"## {shape}: {row['params'] / 1e9:.2f}B parameters, checkpoint {ckpt} GB (bf16)", "",
                  "| stage | result | wall s | peak RSS GB | ÷ checkpoint | output GB |", "|---|---|---|---|---|---|"]
        for name, r in row["stages"].items():
            result = "ok" if r["rc"] == 0 else f"failed (exit {r['rc']}): {r['error']}"
            lines.append(f"| {name} | {result} | {r['wall_s']} | {r['peak_rss_gb']} | "
                         f"{r['peak_rss_gb'] / ckpt:.2f} | {r.get('output_gb', '')} |")
        lines += [""]
    lines += ["Commands:", ""] + [f"- `{r['command']}`" for row in results["shapes"].values()
                                   for r in row["stages"].values()]
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
