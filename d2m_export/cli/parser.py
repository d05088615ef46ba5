"""The parser: every command, its flags and its help."""
from __future__ import annotations

import argparse
from pathlib import Path

from d2m_export._version import __version__
from d2m_export.api import DEFAULT_TASKS
from d2m_export.cli.args import (CALIB_TOKENS, FINITE, FRACTION, HEAL_TOKENS, NON_NEGATIVE, NON_NEGATIVE_FLOAT, POSITIVE,
                                 PORT, POSITIVE_FLOAT, PPL_TOKENS, RATIO, OneLineParser, float_in)
from d2m_export.cli.stages import cmd_analyze, cmd_convert, cmd_eval, cmd_heal, cmd_tokenize, cmd_train
from d2m_export.cli.studies import cmd_demo, cmd_profile, cmd_report, cmd_sweep
from d2m_export.cli.targets import cmd_bench, cmd_generate, cmd_serve
from d2m_export.errors import UserError


RUNTIME_HELP = ("the runtime that runs the export (default: the target's own); onnx exports also run in onnxruntime-genai, "
                "web exports in web-wasm (transformers.js on onnxruntime-web's WebAssembly build, in Node)")


def _add_model(p):
    p.add_argument("--model", default=None, help="embedded name (smollm2-135m, the default), a Hugging Face folder, a .gguf file or a Hub id org/name")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="d2m-export", description=(
        "Turn dense LLMs into faster Mixture-of-Experts models and export them to edge runtimes."))
    parser.add_argument("--version", action="version", version=f"d2m-export {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    export = parser.add_argument_group("export (when no COMMAND is given)")
    export.add_argument("--target", dest="export_target", help="export target: gguf, onnx, coreml, executorch, web "
                        "(executorch alone, without --model/--out: convert, export, check and bench the default "
                        "model); several, comma-separated (onnx,gguf,executorch): one run writes OUT/onnx/, "
                        "OUT/gguf/, ..., each a complete export with its own manifest.json and parity check, sharing "
                        "the model's load and the parity reference (computed once); options go to the targets that "
                        "take them; a target failing its parity check leaves no folder, the others are kept, exit 1")
    export.add_argument("--model", dest="export_model", default=None,
                        help="embedded name (smollm2-135m, the default), a Hugging Face folder, a .gguf file or a Hub id org/name")
    export.add_argument("--quant", dest="export_quant", default=None, help="gguf: f32 (default) | f16 | q8_0 | q4_0 | q4_k_m | q5_k_m | q6_k (k-quants by llama.cpp's quantizer); onnx: fp32 (default) | fp16 | int8 | int4; coreml: fp16 (default) | int8 | int4; executorch: fp32 (default) | 8da4w | 8da8w; web: fp32 (default) | fp16 | q8 | q4 (transformers.js's dtypes). With several targets: omitted, each target's default; one quant, which every target must take; or one per target, comma-separated in --target's order (an empty entry: that target's default), e.g. --target onnx,gguf --quant int4,q4_0")
    export.add_argument("--out", dest="export_out", help="output directory (artifact, tokenizer, manifest.json)")
    export.add_argument("--threads", dest="export_threads", type=POSITIVE, default=None,
                        help="runtime threads for the parity check")
    export.add_argument("--no-parity", dest="export_no_parity", action="store_true",
                        help="skip the parity check against transformers (on by default; it is what vouches for the "
                             "export): manifest.json records \"parity\": null and \"parity_skipped\": true, and "
                             "a warning is printed")
    export.add_argument("--max-seq-len", dest="export_max_seq_len", type=POSITIVE, default=None,
                        help="onnx, web, coreml, executorch: KV cache length (onnx, web: rotary table), the longest sequence the export runs "
                             "(default: the model's context, at most 4160 for coreml and executorch, whose static KV "
                             "cache is allocated whole; at most 32768 for onnx)")
    export.add_argument("--moe-lowering", dest="export_moe_lowering", default=None,
                        help="how MoE layers are lowered. executorch: cond (default; decode runs only the selected "
                             "experts) | dense (every expert, masked; for comparison). onnx: sparse (the default at int8/int4; "
                             "one com.microsoft.MoE/QMoE node) | switch (the default at fp32/fp16; one If per expert "
                             "holding its own weights; a decode step runs only its chosen experts' prepacked MatMuls) | gather (routed in plain "
                             "ONNX, each expert's own MatMuls on the rows that chose it; no contrib op, slower) | "
                             "dense (every expert, masked; fp32 only)")
    export.add_argument("--head-bits", dest="export_head_bits", type=POSITIVE, default=None,
                        help="onnx int4/int8: bits of the LM head and (tied) embedding; default: the --quant's own, "
                             "as ONNX Runtime GenAI's builder; --head-bits 8 with int4 keeps the head at int8, as "
                             "llama.cpp keeps it above 4 bits (larger, slower, a little more exact)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("analyze", help="score layer blocks for redundancy (JSON + heatmap)")
    _add_model(p)
    p.add_argument("--calib-tokens", type=CALIB_TOKENS, default=2048, help="calibration tokens (Brown corpus; default 2048)")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("convert", help="convert a dense model: lfuc (default), prune or upcycle; healed unless --no-heal")
    _add_model(p)
    p.add_argument("--method", default="lfuc", help="lfuc | prune | upcycle | moe2dense")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--plan", type=Path, help="YAML/JSON plan: blocks: [{host: 10, donors: [11, 12]}]")
    how.add_argument("--target-active-ratio", type=RATIO, help="active decode weights ÷ dense (default 0.8)")
    how.add_argument("--threshold", type=POSITIVE_FLOAT, help="fuse every block whose angular distance is at most δ")
    how.add_argument("--latency-budget-ms", type=POSITIVE_FLOAT,
                     help="fuse as little as meets this roofline decode time per token on --device")
    p.add_argument("--device", help="with --latency-budget-ms: a profile in device_profiles/ or a YAML path")
    p.add_argument("--precision", default="fp16", help="with --latency-budget-ms: weight precision deployed "
                   "(fp32, fp16, int8, int4, q8_0, q4_0, 8da4w, …; default fp16)")
    p.add_argument("--context", type=POSITIVE, default=512, help="with --latency-budget-ms: context length (default 512)")
    p.add_argument("--runtime", help="with --latency-budget-ms: scale by the profile's measured efficiency "
                   "for RUNTIME:PRECISION (e.g. onnx)")
    p.add_argument("--plan-search", default="metric",
                   help="metric (default: angular-distance greedy) | loss (lfuc, prune: grow the plan one layer at a "
                        "time by the calibration KL to the dense model; with --threshold, δ is that KL)")
    p.add_argument("--search-tokens", type=CALIB_TOKENS, default=1024, help="with --plan-search loss: calibration tokens "
                   "(default 1024)")
    healing = p.add_mutually_exclusive_group()
    healing.add_argument("--heal", action="store_true", help="heal the converted model locally before writing it "
                         "(the default; the `heal` stage: closed-form fit, then block-wise distillation)")
    healing.add_argument("--no-heal", action="store_true", help="write the conversion unhealed (faster; "
                         "`d2m-export heal` can heal it later)")
    p.add_argument("--heal-tokens", type=HEAL_TOKENS, default=None, help="healing's calibration tokens (default 8192)")
    p.add_argument("--heal-steps", type=NON_NEGATIVE, default=None, help="healing's distillation steps per block "
                   "(default 150; 0: closed form only)")
    p.add_argument("--analysis", type=Path, help="reuse a similarity.json from `analyze` instead of recalibrating")
    p.add_argument("--calib-tokens", type=CALIB_TOKENS, default=2048)
    p.add_argument("--max-block", type=POSITIVE, default=4, help="longest block considered, in layers (default 4)")
    p.add_argument("--min-mlp-cos", type=float_in(-1, 1), default=-1.0, help="skip blocks whose MLP-input cosine is lower")
    p.add_argument("--host-mode", default="routed", help="routed (default: the host MLP is one of the routed "
                   "experts, active parameters as pruning's) | shared (an always-on shared expert)")
    p.add_argument("--top-k", type=POSITIVE, default=1, help="routed experts per token (default 1)")
    p.add_argument("--num-experts", type=POSITIVE, default=None, help="experts per MoE layer (replicated); default: as needed")
    p.add_argument("--router-init", default="calibrated",
                   help="calibrated (default: route to the expert with the largest output) | zero")
    p.add_argument("--alpha", type=FINITE, default=1.0, help="weight of the host MLP")
    p.add_argument("--beta", type=FINITE, default=1.0, help="weight of each selected routed expert")
    p.add_argument("--experts-kept", type=POSITIVE, help="moe2dense: experts kept per layer (K)")
    p.add_argument("--groups", type=POSITIVE, help="moe2dense: groups they merge into (k ≤ K; default K)")
    p.add_argument("--score", default="acp",
                   help="moe2dense expert score: sf | cp | acp (default) | do-acp | pp | random (a control)")
    p.add_argument("--grouping", default="score",
                   help="moe2dense, when --groups < --experts-kept: score (default) | frequency | kmeans")
    p.add_argument("--scaling", default="score",
                   help="moe2dense: each group times its mean routing weight (score, default) or 1/k (uniform)")
    p.add_argument("--dtype", default="auto", help="weights written: auto (default: as the source stores them, "
                   "bf16 in, bf16 out) | fp32 | bf16 | fp16")
    p.add_argument("--out", required=True, help="output directory (a Hugging Face checkpoint)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("heal", help="fit a converted model's fused layers to the dense blocks they replace")
    p.add_argument("--model", required=True, help="a model written by `convert` (lfuc, prune or upcycle)")
    p.add_argument("--out", required=True, help="output directory (the healed Hugging Face checkpoint)")
    p.add_argument("--calib-tokens", type=HEAL_TOKENS, default=8192, help="calibration tokens (default 8192; the last "
                   "eighth is held out for early stopping)")
    p.add_argument("--steps", type=NON_NEGATIVE, default=150, help="distillation steps per block (default 150; 0: closed "
                   "form only)")
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=1e-4, help="distillation learning rate (default 1e-4)")
    p.add_argument("--attention", action="store_true", help="also train the host's attention and norms")
    p.add_argument("--calib-corpus", action="append", default=None,
                   help="calibration text: brown, olmo-passages, calibration (default) or a .txt/.jsonl/.parquet "
                        "file (repeatable); the evaluation text is refused")
    p.add_argument("--dense", default=None, help="the dense model it was converted from (default: as recorded "
                   "in d2m_plan.json)")
    p.set_defaults(func=cmd_heal)

    p = sub.add_parser("eval", help="perplexity (Austen) and zero-shot tasks")
    _add_model(p)
    p.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS, help="tasks, space or comma separated (default: "
                   "arc_easy hellaswag piqa); none: perplexity only")
    p.add_argument("--limit", type=POSITIVE, default=None, help="first N documents per task")
    p.add_argument("--ppl-tokens", type=PPL_TOKENS, default=10240, help="held-out tokens for perplexity (default 10240)")
    p.add_argument("--batch-size", type=POSITIVE, default=8)
    p.add_argument("--out", help="write the results as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("tokenize", help="tokenize a corpus once into memory-mapped token shards for train --data")
    p.add_argument("corpora", nargs="+", metavar="CORPUS",
                   help="brown, olmo-passages, a .txt/.jsonl/.parquet file, a directory of them, or a Hugging "
                        "Face dataset saved with save_to_disk")
    p.add_argument("--model", default=None, help="the model whose tokenizer to use (default: the embedded one)")
    p.add_argument("--out", required=True, help="new directory for the shards and their index.json")
    p.add_argument("--shard-tokens", type=POSITIVE, default=100_000_000, help="tokens per shard file (default 100M)")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("train", help="continual pre-training (CPT); runs under torchrun/accelerate too")
    p.add_argument("--model", required=True, help="the checkpoint to train (a converted model, or any supported one)")
    p.add_argument("--out", required=True, help="output directory: final model, checkpoints/, logs")
    p.add_argument("--corpus", dest="corpora", action="append",
                   help="training text: brown, olmo-passages, a .txt/.jsonl/.parquet file, a directory of them or a "
                        "saved Hugging Face dataset (repeatable; default: brown and olmo-passages)")
    p.add_argument("--data", default=None, metavar="SHARDS",
                   help="token shards made by `d2m-export tokenize` (streamed from disk; instead of --corpus)")
    p.add_argument("--tokens", type=POSITIVE, default=200_000, help="training budget in tokens (default 200k)")
    p.add_argument("--seq-len", type=POSITIVE, default=256)
    p.add_argument("--micro-batch", type=POSITIVE, default=4, help="sequences per forward pass")
    p.add_argument("--global-batch", type=POSITIVE, default=16, help="sequences per optimizer step (all processes)")
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=3e-4, help="peak learning rate (default 3e-4, chosen by "
                   "bench/cpt_defaults_sweep.py)")
    p.add_argument("--min-lr-ratio", type=FRACTION, default=0.1, help="cosine floor as a fraction of --lr")
    p.add_argument("--warmup-steps", type=NON_NEGATIVE, default=None, help="default: 5%% of the steps")
    p.add_argument("--weight-decay", type=NON_NEGATIVE_FLOAT, default=0.0)
    p.add_argument("--grad-clip", type=NON_NEGATIVE_FLOAT, default=1.0)
    p.add_argument("--dtype", default="auto", help="fp32 | bf16 (autocast; with --fsdp, bf16 weights and compute) | "
                   "auto (default): bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--weights-dtype", default="auto", help="fp32 | bf16 (bf16 weights and compute, fp32 Adam "
                   "moments, stochastically rounded updates: 12 bytes per trained parameter instead of 16) | auto "
                   "(default): bf16 for a bf16 checkpoint, else fp32")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (default): CUDA when present, each "
                   "process on its LOCAL_RANK's GPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (first steps are slower)")
    p.add_argument("--peak-tflops", type=POSITIVE_FLOAT, default=None, help="one device's peak TFLOP/s for the "
                   "MFU column (default: the data sheet of known GPUs; on the CPU, a matmul probe)")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0)
    p.add_argument("--train-only", default="all", help="all | moe (experts, shared experts, routers) | router")
    p.add_argument("--balance-loss-weight", type=NON_NEGATIVE_FLOAT, default=0.01, help="Switch load-balancing loss weight")
    p.add_argument("--z-loss-weight", type=NON_NEGATIVE_FLOAT, default=0.0, help="router z-loss weight (0: off)")
    p.add_argument("--distill-from", default=None, help="teacher model: adds forward KL on logits")
    p.add_argument("--distill-weight", type=FRACTION, default=0.5, help="loss = (1-w)·CE + w·KL when distilling")
    p.add_argument("--teacher-topk", type=NON_NEGATIVE, default=0, metavar="K",
                   help="with --distill-from: run the teacher once per training chunk before training, keep its "
                        "top-K log-probabilities on disk and distill from those (reused by later runs on the "
                        "same data; 0, the default: the full teacher logits on every step)")
    p.add_argument("--teacher-cache", default=None, help="where --teacher-topk keeps them (default: the "
                   "d2m-export cache, $D2M_CACHE or ~/.cache/d2m-export)")
    p.add_argument("--save-every", type=POSITIVE, default=50, help="checkpoint every K steps")
    p.add_argument("--keep-last", type=POSITIVE, default=2, help="checkpoints kept")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--fsdp", action="store_true", help="under torchrun/accelerate launch: shard weights, gradients "
                   "and optimizer state over the processes (FSDP2; with --dtype bf16, bf16 weights and compute, "
                   "fp32 reductions); checkpoints are sharded and resume on any number of processes")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each layer's activations in the backward pass (less memory, ~1/3 more compute)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("profile", help="measure this machine (bandwidth and matmul probes) as a device profile")
    p.add_argument("--threads", type=POSITIVE, default=None, help="threads to measure with (default: all cores)")
    p.add_argument("--calibrate", nargs="+", default=None, metavar="EXPORT_DIR",
                   help="exports to bench for each runtime's efficiency (achieved ÷ roofline), e.g. dense onnx and gguf")
    p.add_argument("--long-prompt-tokens", type=POSITIVE, default=None, metavar="N",
                   help="with --calibrate: also bench at an N-token prompt, for a separate efficiency of the "
                        "KV-cache reads (e.g. 960; the exports need room for N + 64 tokens)")
    p.add_argument("--out", default="device_profiles/host.yaml")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("report", help="latency vs accuracy over sweep run directories (PNG, MD, JSON, HTML)")
    p.add_argument("run_dirs", nargs="+", help="run directories written by `sweep`")
    p.add_argument("--devices", nargs="+", default=None, help="device profiles to project onto (default: all)")
    p.add_argument("--context", type=context_list, nargs="+", default=None, metavar="N",
                   help="decode contexts (tokens already in the KV cache) to draw fronts at, space or comma "
                        "separated: the roofline projected at each, measured where a bench ran at it (default: "
                        "64 2048, those within the models' positions)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("sweep", help="methods × ratios (× CPT): convert, eval, export, bench, then report")
    _add_model(p)
    p.add_argument("--ratios", default="1.0,0.9,0.8,0.7")
    p.add_argument("--methods", default="lfuc,prune")
    p.add_argument("--targets", default="onnx")
    p.add_argument("--cpt-tokens", type=POSITIVE, default=None, help="also train each variant with this budget")
    p.add_argument("--tasks", nargs="+", default=None)
    p.add_argument("--limit", type=POSITIVE, default=100)
    p.add_argument("--threads", type=POSITIVE, default=2)
    p.add_argument("--devices", nargs="+", default=None)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("demo", help="analyze → convert (LF-UC and pruning) → eval, and print the comparison")
    _add_model(p)
    p.add_argument("--target-active-ratio", type=RATIO, default=0.8)
    p.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS)
    p.add_argument("--limit", type=POSITIVE, default=150)
    p.add_argument("--heal-steps", type=NON_NEGATIVE, default=150, help="distillation steps per healed block "
                   "(default 150; 0: closed form only)")
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("bench", help="speed of an export in its runtime (prefill, decode, peak RSS) as JSON")
    p.add_argument("dir", help="an export directory (from --target)")
    p.add_argument("--context", type=POSITIVE, default=None, metavar="N",
                   help="tokens in the KV cache when the timed decode starts: an N-token prompt, then decode "
                        "(default 64; N plus --new-tokens must fit the export's positions)")
    p.add_argument("--prompt-tokens", type=POSITIVE, default=None, help="the same as --context (its older name)")
    p.add_argument("--new-tokens", type=POSITIVE, default=64)
    p.add_argument("--threads", type=POSITIVE, default=2)
    p.add_argument("--repeats", type=POSITIVE, default=3, help="timed runs after one warm-up; medians are reported")
    p.add_argument("--runtime", default=None, help=RUNTIME_HELP)
    p.add_argument("--out", required=True, help="results JSON file")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("generate", help="greedy text generation with an export, streamed")
    p.add_argument("dir", help="an export directory (from --target)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=POSITIVE, default=64)
    p.add_argument("--context", type=POSITIVE, default=None, metavar="N",
                   help="decode with N tokens in the KV cache: the prompt preceded by filler text up to N tokens "
                        "(default: the prompt alone); the speed line on stderr names it")
    p.add_argument("--threads", type=POSITIVE, default=None)
    p.add_argument("--runtime", default=None, help=RUNTIME_HELP)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="serve a web export's page (index.html) on 127.0.0.1, to run it in a browser")
    p.add_argument("dir", help="a web export directory (from --target web)")
    p.add_argument("--port", type=PORT, default=8000, help="the port (default 8000; 0: any free one, printed)")
    p.set_defaults(func=cmd_serve)
    return parser


def context_list(text: str) -> list[int]:
    """`--context 64,2048` (one argument of several, like `--context 64 2048`): positive token counts."""
    return [POSITIVE(t) for t in text.split(",") if t.strip()] or [POSITIVE(text)]


def task_list(values: list[str]) -> list[str]:
    """`--tasks a b`, `--tasks a,b` (lm-eval's style) or both; `--tasks none`: perplexity only."""
    tasks = [t.strip() for v in values for t in v.split(",") if t.strip()]
    if "none" in tasks:
        if len(tasks) > 1:
            raise UserError("--tasks none means perplexity only; it cannot be combined with task names")
        return []
    if not tasks:
        raise UserError("--tasks needs task names (comma or space separated), or none for perplexity only")
    return tasks
