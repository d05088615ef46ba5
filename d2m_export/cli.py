"""`d2m-export`: the command line. Each subcommand is a thin shell over `pipeline`."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from d2m_export import __version__
from d2m_export.cli_args import (CALIB_TOKENS, FINITE, FRACTION, HEAL_TOKENS, NON_NEGATIVE, NON_NEGATIVE_FLOAT, POSITIVE,
                                 POSITIVE_FLOAT, PPL_TOKENS, RATIO, OneLineParser, float_in)
from d2m_export.errors import ParityError, UserError

DEFAULT_TASKS = ["arc_easy", "hellaswag", "piqa"]


def _options(args):
    from d2m_export.plan import Options

    return Options(host_mode=args.host_mode, top_k=args.top_k, num_experts=args.num_experts,
                   router_init=args.router_init, alpha=args.alpha, beta=args.beta)


def cmd_analyze(args) -> int:
    from d2m_export.pipeline import analyze

    result = analyze(args.model, Path(args.out), calib_tokens=args.calib_tokens)
    best = sorted((b for b in result["blocks"] if b["length"] > 1), key=lambda b: b["angular_distance"])[:5]
    print(f"wrote {args.out}/similarity.json and similarity.png ({result['calibration_tokens']} calibration tokens)")
    for b in best:
        print(f"  layers {b['start']}..{b['start'] + b['length'] - 1}: angular distance {b['angular_distance']:.3f}, "
              f"MLP-input cos {b['mlp_input_cos']:.3f}")
    return 0


def cmd_convert(args) -> int:
    from d2m_export.pipeline import convert, moe_to_dense

    heal = _heal_config(args)
    if args.method == "moe2dense":
        if args.experts_kept is None:
            raise UserError("--method moe2dense needs --experts-kept K")
        record = moe_to_dense(args.model, Path(args.out), args.experts_kept, args.groups, args.score,
                              calib_tokens=args.calib_tokens, grouping=args.grouping, scaling=args.scaling,
                              dtype=args.dtype, not_healed="--no-heal" if args.no_heal else None)
        p = record["params"]
        print(f"moe2dense: wrote {record['architecture']} to {args.out} in {record['wall_s']} s; "
              f"{p['active'] / 1e6:.1f}M params (MoE: {p['moe_active'] / 1e6:.1f}M active, "
              f"{p['moe_total'] / 1e6:.1f}M total)")
        if p["zero_padding"]:
            print(f"  {p['zero_padding'] / 1e6:.1f}M of them are zeros: layers that were dense are padded to the "
                  "merged width (one MLP width per Llama/Qwen2 config); runtimes still store and read them")
        print_heal_status(record["heal"])
        return 0

    record = convert(args.model, Path(args.out), method_name=args.method, plan_file=args.plan,
                     target_ratio=args.target_active_ratio, threshold=args.threshold, options=_options(args),
                     analysis=args.analysis, calib_tokens=args.calib_tokens, max_block=args.max_block,
                     min_mlp_cos=args.min_mlp_cos, latency_budget_ms=args.latency_budget_ms, device=args.device,
                     precision=args.precision, context=args.context, runtime=args.runtime,
                     plan_search=args.plan_search, search_tokens=args.search_tokens, heal=heal,
                     dtype=args.dtype, not_healed="--no-heal")
    p = record["params"]
    blocks = ", ".join(f"{b['host']}←{b['donors']}" for b in record["plan"]["blocks"]) or "none"
    print(f"{record['method']}: wrote {record['architecture']} to {args.out} in {record['wall_s']} s")
    print(f"  blocks (host←donors): {blocks}")
    print(f"  active params {p['active'] / 1e6:.1f}M of dense {p['dense_active'] / 1e6:.1f}M "
          f"(ratio {p['active_ratio']:.3f}); total {p['total'] / 1e6:.1f}M")
    if "latency" in record:
        lat = record["latency"]
        print(f"  decode on {lat['device']} ({lat['precision']}, context {lat['context']}, roofline"
              f"{' × ' + str(lat['efficiency']) if lat['runtime'] else ''}): {lat['predicted_ms']:.2f} ms/token "
              f"(dense {lat['dense_ms']:.2f}; budget {lat['budget_ms']})")
    if "plan_search" in record:
        ps = record["plan_search"]
        print(f"  plan search by loss: calibration KL {ps['kl']:.4f} nats/token on {ps['tokens']} tokens "
              f"({ps['wall_s']} s)")
    print_heal_status(record["heal"])
    if "healing" in record:
        print_healing(record["healing"])
    return 0


def _heal_config(args):
    """`convert` heals by default; `--no-heal` skips it. Returns the HealConfig, or None when skipped."""
    budget_flags = [f for f, v in (("--heal-tokens", args.heal_tokens), ("--heal-steps", args.heal_steps))
                    if v is not None]
    if args.no_heal:
        if budget_flags:
            raise UserError(f"--no-heal skips healing; drop {' and '.join(budget_flags)} (the healing budget) "
                            "or --no-heal")
        return None
    if args.method == "moe2dense":
        if args.heal or budget_flags:
            from d2m_export.pipeline import MOE2DENSE_NOT_HEALED
            raise UserError(f"{'--heal' if args.heal else budget_flags[0]}: {MOE2DENSE_NOT_HEALED}")
        return None
    from d2m_export.heal import HealConfig
    return HealConfig(**{k: v for k, v in (("calib_tokens", args.heal_tokens), ("steps", args.heal_steps))
                         if v is not None})


def print_heal_status(status: dict) -> None:
    """One line from d2m_plan.json's `heal`: healed or not, and with what budget or why not."""
    if status["healed"]:
        b = status["budget"]
        print(f"  healed (convert heals by default; --no-heal skips it): budget {b['calib_tokens']} calibration "
              f"tokens, {b['steps']} distillation steps per block")
    else:
        print(f"  not healed: {status['reason']}")


def print_healing(healing: dict) -> None:
    print(f"  healed on {healing['calibration_tokens']} calibration tokens in {healing['wall_s']} s; "
          f"held-out block error (1.0 = the block's whole contribution missing):")
    for b in healing["blocks"]:
        if "error" in b:
            e = b["error"]
            print(f"    {b['host']}←{b['donors']}: {e['before']:.3f} → closed form {e['closed_form']:.3f} "
                  f"→ distilled {e['after']:.3f}")
        else:
            print(f"    layer {b['layer']}: router load {b['router_load']}")


def cmd_heal(args) -> int:
    from d2m_export.heal import HealConfig, heal

    cfg = HealConfig(calib_tokens=args.calib_tokens, steps=args.steps, lr=args.lr, attention=args.attention,
                     corpora=args.calib_corpus or ["calibration"])
    record = heal(args.model, Path(args.out), cfg, dense_spec=args.dense)
    print(f"{record['method']}: wrote the healed model to {args.out}")
    print_healing(record["healing"])
    return 0


def cmd_eval(args) -> int:
    from d2m_export.pipeline import evaluate

    result = evaluate(args.model, Path(args.out) if args.out else None, tasks=args.tasks, limit=args.limit,
                      ppl_tokens=args.ppl_tokens, batch_size=args.batch_size)
    ppl = result["perplexity"]
    print(f"{result['model']}: perplexity {ppl['value']:.2f} ({ppl['corpus']}, {ppl['tokens']} tokens)")
    for name, r in result["tasks"].items():
        print(f"  {name:<14} acc {r['acc']:.3f}  acc_norm {r['acc_norm']:.3f}  (n={r['n']})")
    return 0


def cmd_tokenize(args) -> int:
    from transformers import AutoTokenizer

    from d2m_export.data import iter_source
    from d2m_export.models import model_label, resolve_model
    from d2m_export.outputs import check_output_dir
    from d2m_export.shards import write_shards

    out = Path(args.out)
    check_output_dir(out)
    if out.exists():
        raise UserError(f"--out {out} already exists; token shards are written to a new directory")
    sources = [str(c) for c in args.corpora]
    for source in sources:      # every source checked before any work: a bad last one fails now
        next(iter_source(source), None)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    index = write_shards(tokenizer, (doc for source in sources for doc in iter_source(source)), out,
                         shard_tokens=args.shard_tokens, sources=sources, model=model_label(args.model))
    print(f"tokenized {index['documents']} documents into {index['tokens']} tokens ({index['dtype']}, "
          f"{len(index['shards'])} shard{'s' if len(index['shards']) != 1 else ''}) in {out}")
    return 0


def cmd_train(args) -> int:
    from d2m_export.train import TrainConfig, train

    fields = {k: getattr(args, k) for k in TrainConfig.__dataclass_fields__ if hasattr(args, k)}
    if fields.get("corpora") and fields.get("data"):
        raise UserError("give either --corpus (text, tokenized now) or --data (token shards), not both")
    if not fields.get("corpora"):
        fields.pop("corpora", None)
    result = train(TrainConfig(**fields))
    if int(os.environ.get("RANK", "0")) == 0:     # one line from a torchrun/accelerate job
        print(f"trained {result['steps']} steps, {result['tokens']} tokens; model, train_log.jsonl, loss.png "
              f"in {args.out}")
    return 0


def cmd_profile(args) -> int:
    import yaml

    from d2m_export.probe import host_profile

    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name such as device_profiles/host.yaml")
    if out.exists() and "measured" not in out.read_text():
        raise UserError(f"--out {out} exists and is not a measured profile; pick another path")
    profile = host_profile(args.threads)
    if args.calibrate:
        from d2m_export.probe import runtime_efficiency
        from runtimes.base import read_manifest

        long_prompt = args.long_prompt_tokens
        for d in args.calibrate:            # clear errors before any measuring
            context = read_manifest(Path(d)).get("context_length") or 0
            if long_prompt is not None and not 64 + 64 < long_prompt + 64 <= context:
                raise UserError(f"--long-prompt-tokens {long_prompt}: must be above 64 and leave room for 64 new "
                                f"tokens in {d}'s context of {context}")
        profile["runtime_efficiency"], kv = runtime_efficiency([Path(d) for d in args.calibrate], profile,
                                                               threads=profile["threads"],
                                                               long_prompt_tokens=long_prompt)
        names = ", ".join(Path(d).name for d in args.calibrate)
        profile["sources"]["runtime_efficiency"] = (
            "measured: roofline ÷ measured decode time per token (prompt 64, 64 new tokens) of " + names
            if long_prompt is None else "measured: decode time per token of " + names + f" at prompts 64 and "
            f"{long_prompt} (64 new tokens), solved for the efficiency of the weight reads and (runtime_kv_efficiency) "
            "of the KV-cache reads")
        if kv:
            profile["runtime_kv_efficiency"] = kv
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(yaml.safe_dump(profile, sort_keys=False, allow_unicode=True))
    tmp.replace(out)
    print(f"{profile['name']}: {profile['memory_bandwidth_gbs']} GB/s read bandwidth, "
          f"{profile['compute_gflops']['fp32']} GFLOPS fp32 matmul; wrote {out}")
    for key, eff in profile.get("runtime_efficiency", {}).items():
        kv = profile.get("runtime_kv_efficiency", {}).get(key)
        print(f"  {key}: {eff:.0%} of the roofline" + (f" (KV-cache reads: {kv:.0%})" if kv else ""))
    return 0


def cmd_report(args) -> int:
    from d2m_export.report import write

    contexts = None if args.context is None else [c for group in args.context for c in group]
    report = write([Path(d) for d in args.run_dirs], Path(args.out), args.devices, contexts=contexts)
    print(f"wrote {args.out}/report.html, report.md, report.json and pareto.png ({len(report['runs'])} variants)")
    for k, names in report["pareto"].items():
        print(f"  frontier {k}: {', '.join(names)}")
    return 0


def cmd_sweep(args) -> int:
    from d2m_export.sweep import run_sweep

    def floats(text):
        try:
            return [float(x) for x in text.split(",") if x]
        except ValueError:
            raise UserError(f"--ratios takes comma-separated numbers, not {text!r}") from None

    report = run_sweep(args.model, Path(args.out), floats(args.ratios), args.methods.split(","),
                       args.targets.split(","), cpt_tokens=args.cpt_tokens, tasks=args.tasks, limit=args.limit,
                       threads=args.threads, profiles=args.devices)
    print(f"report: {args.out}/report/report.html ({len(report['runs'])} variants)")
    return 0


def cmd_demo(args) -> int:
    from d2m_export.demo import run_demo

    return run_demo(Path(args.out), model=args.model, ratio=args.target_active_ratio, limit=args.limit,
                    tasks=args.tasks, heal_steps=args.heal_steps)


def cmd_export(args) -> int:
    from converters.base import export

    if not args.export_out:
        raise UserError("--target needs --out DIR")
    manifest = export(args.export_target, args.export_model, args.export_quant, Path(args.export_out),
                      threads=args.export_threads, options={"max_seq_len": args.export_max_seq_len,
                                                            "moe_lowering": args.export_moe_lowering,
                                                            "head_bits": args.export_head_bits})
    p, sizes = manifest["parity"], manifest["sizes_mb"]
    print(f"{manifest['target']} {manifest['quant']}: wrote {', '.join(f'{f} ({mb:.1f} MB)' for f, mb in sizes.items())} "
          f"to {args.export_out}")
    print(f"  parity vs transformers: greedy {p['greedy_match']}/{p['greedy_total']} tokens, "
          f"max |logit error| {p['max_abs_logit_err']:.3g}")
    return 0


def cmd_executorch_job(args) -> int:
    """`d2m-export --target executorch` alone: the whole main job on the embedded default model."""
    from converters.executorch import main_job

    main_job(Path("runs/executorch"), quant=args.export_quant, threads=args.export_threads or 2)
    return 0


def cmd_bench(args) -> int:
    from d2m_export.outputs import check_output_file, write_json
    from runtimes.bench import bench

    if Path(args.dir).resolve() in Path(args.out).resolve().parents:
        raise UserError(f"--out {args.out} is inside the export {args.dir}; write the results beside it")
    check_output_file(Path(args.out))
    result = bench(Path(args.dir), prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                   threads=args.threads, repeats=args.repeats, runtime=args.runtime, context=args.context)
    write_json(Path(args.out), result)
    print(f"{result['runtime']} {result['quant']}, {result['threads']} threads, context {result['context']}: "
          f"prefill "
          f"{result['prefill_tokens_per_s']:.1f} tok/s, decode {result['decode_tokens_per_s']:.1f} tok/s "
          f"(p50 {result['decode_ms_per_token_p50']:.2f} ms), peak RSS {result['peak_rss_mb']:.0f} MB")
    return 0


def cmd_generate(args) -> int:
    import time

    from runtimes.base import load_runner, load_tokenizer
    from runtimes.bench import check_context, n_ctx_for, prompt_ids

    tokenizer = load_tokenizer(Path(args.dir))
    ids = tokenizer.encode(args.prompt).ids
    if not ids:
        raise UserError("--prompt is empty after tokenization")
    context = len(ids) if args.context is None else args.context
    if context < len(ids):
        raise UserError(f"--context {context} is shorter than the prompt ({len(ids)} tokens)")
    limit = check_context(Path(args.dir), context, args.max_new_tokens)
    # the bench's filler text ahead of the prompt, so that decoding starts with `context` tokens cached
    filler = prompt_ids(Path(args.dir), context - len(ids)) if context > len(ids) else []
    from runtimes.base import STOP_TOKENS
    stop = [i for i in (tokenizer.token_to_id(t) for t in STOP_TOKENS) if i is not None]
    out: list[int] = []
    shown = ""

    def show(token: int) -> None:
        nonlocal shown
        out.append(token)
        text = tokenizer.decode(out)
        if not text.endswith("\ufffd"):      # wait for the rest of a multi-byte character
            print(text[len(shown):], end="", flush=True)
            shown = text

    decode_s: list[float] = []
    with load_runner(Path(args.dir), threads=args.threads, runtime=args.runtime,
                     n_ctx=n_ctx_for(context, args.max_new_tokens, limit)) as runner:
        decode = runner.decode

        def timed_decode(token: int):        # the runner's own step, timed apart from printing
            t0 = time.perf_counter()
            logits = decode(token)
            decode_s.append(time.perf_counter() - t0)
            return logits

        runner.decode = timed_decode
        print(args.prompt, end="", flush=True)      # once the runner loaded: an error is then the only output
        runner.generate(filler + ids, args.max_new_tokens, stop_ids=stop, on_token=show)
    print()
    if decode_s:    # on stderr: stdout is the text alone
        import statistics
        ms = statistics.median(decode_s) * 1e3
        print(f"decode {1000 / ms:.1f} tok/s ({ms:.2f} ms/token, median of {len(decode_s)} steps) at a context of "
              f"{context} tokens" + (f" ({len(filler)} of them filler text before the prompt)" if filler else ""),
              file=sys.stderr)
    return 0


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
                        "(executorch alone, without --model/--out: convert, export, check and bench the default model)")
    export.add_argument("--model", dest="export_model", default=None,
                        help="embedded name (smollm2-135m, the default), a Hugging Face folder, a .gguf file or a Hub id org/name")
    export.add_argument("--quant", dest="export_quant", default=None, help="gguf: f32 (default) | f16 | q8_0 | q4_0 | q4_k_m | q5_k_m | q6_k (k-quants by llama.cpp's quantizer); onnx: fp32 (default) | fp16 | int8 | int4; coreml: fp16 (default) | int8 | int4; executorch: fp32 (default) | 8da4w | 8da8w; web: fp32 (default) | fp16 | q8 | q4 (transformers.js's dtypes)")
    export.add_argument("--out", dest="export_out", help="output directory (artifact, tokenizer, manifest.json)")
    export.add_argument("--threads", dest="export_threads", type=POSITIVE, default=None,
                        help="runtime threads for the parity check")
    export.add_argument("--max-seq-len", dest="export_max_seq_len", type=POSITIVE, default=None,
                        help="onnx, web, coreml, executorch: KV cache length (onnx, web: rotary table), the longest sequence the export runs "
                             "(default: the model's context, at most 4160 for coreml and executorch, whose static KV "
                             "cache is allocated whole; at most 32768 for onnx)")
    export.add_argument("--moe-lowering", dest="export_moe_lowering", default=None,
                        help="how MoE layers are lowered. executorch: cond (default; decode runs only the selected "
                             "experts) | dense (every expert, masked; for comparison). onnx: sparse (default; one "
                             "com.microsoft.MoE/QMoE node) | switch (one If per expert holding its own weights; a "
                             "decode step runs only its chosen experts' prepacked MatMuls) | gather (routed in plain "
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:          # --help, --version, or a bad flag (one line already printed): its exit code
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    from runtimes.base import show_native_logs
    show_native_logs(args.verbose)
    warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
    if not args.verbose:    # third-party noise met on every run: torchao's import, ExecuTorch's lowering
        for name in ("torchao", "torch.utils._pytree"):
            logging.getLogger(name).setLevel(logging.ERROR)
        for message in ("_check_is_size will be removed", r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                        "Mutation on a buffer in the model is detected"):   # the KV cache: its start is never read
            warnings.filterwarnings("ignore", message=message)
    if not getattr(args, "func", None):
        if args.export_target is None:
            parser.print_help()
            return 2
        main_job = args.export_target == "executorch" and args.export_model is None and args.export_out is None
        args.func = cmd_executorch_job if main_job else cmd_export
    try:
        if getattr(args, "tasks", None) is not None:
            args.tasks = task_list(args.tasks)
        return args.func(args)
    except UserError as e:
        _close_progress_bars()
        print(f"d2m-export: error: {e}", file=sys.stderr)
        return 2
    except ParityError as e:
        _close_progress_bars()
        print(f"d2m-export: parity check failed: {e}", file=sys.stderr)
        return 1
    except OSError as e:       # an unwritable or impossible output path, a full disk
        _close_progress_bars()
        print(f"d2m-export: error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 2


def _close_progress_bars() -> None:
    """A bar still open when an error stops the work would put the error on the bar's own line."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
