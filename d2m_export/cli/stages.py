"""The stage commands: analyze, convert, heal, eval, tokenize, train (each a thin shell over `d2m_export.api`)."""
from __future__ import annotations

import os
from pathlib import Path

from d2m_export.errors import UserError


def cmd_analyze(args) -> int:
    from d2m_export.api import analyze

    result = analyze(args.model, Path(args.out), calib_tokens=args.calib_tokens).similarity
    best = sorted((b for b in result["blocks"] if b["length"] > 1), key=lambda b: b["angular_distance"])[:5]
    print(f"wrote {args.out}/similarity.json and similarity.png ({result['calibration_tokens']} calibration tokens)")
    for b in best:
        print(f"  layers {b['start']}..{b['start'] + b['length'] - 1}: angular distance {b['angular_distance']:.3f}, "
              f"MLP-input cos {b['mlp_input_cos']:.3f}")
    return 0


def cmd_convert(args) -> int:
    from d2m_export.api import convert

    record = convert(args.model, Path(args.out), method=args.method, plan=args.plan,
                     target_active_ratio=args.target_active_ratio, threshold=args.threshold,
                     latency_budget_ms=args.latency_budget_ms, device=args.device, precision=args.precision,
                     context=args.context, runtime=args.runtime, plan_search=args.plan_search,
                     search_tokens=args.search_tokens, analysis=args.analysis, calib_tokens=args.calib_tokens,
                     max_block=args.max_block, min_mlp_cos=args.min_mlp_cos, host_mode=args.host_mode,
                     top_k=args.top_k, num_experts=args.num_experts, router_init=args.router_init,
                     alpha=args.alpha, beta=args.beta, heal=False if args.no_heal else True if args.heal else None,
                     heal_tokens=args.heal_tokens, heal_steps=args.heal_steps, experts_kept=args.experts_kept,
                     groups=args.groups, score=args.score, grouping=args.grouping, scaling=args.scaling,
                     dtype=args.dtype).plan
    if args.method == "moe2dense":
        p = record["params"]
        print(f"moe2dense: wrote {record['architecture']} to {args.out} in {record['wall_s']} s; "
              f"{p['active'] / 1e6:.1f}M params (MoE: {p['moe_active'] / 1e6:.1f}M active, "
              f"{p['moe_total'] / 1e6:.1f}M total)")
        if p["zero_padding"]:
            print(f"  {p['zero_padding'] / 1e6:.1f}M of them are zeros: layers that were dense are padded to the "
                  "merged width (one MLP width per Llama/Qwen2 config); runtimes still store and read them")
        print_heal_status(record["heal"])
        return 0

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
    from d2m_export.api import heal

    record = heal(args.model, Path(args.out), calib_tokens=args.calib_tokens, steps=args.steps, lr=args.lr,
                  attention=args.attention, corpora=args.calib_corpus, dense=args.dense).plan
    print(f"{record['method']}: wrote the healed model to {args.out}")
    print_healing(record["healing"])
    return 0


def cmd_eval(args) -> int:
    from d2m_export.api import evaluate

    result = evaluate(args.model, Path(args.out) if args.out else None, tasks=args.tasks, limit=args.limit,
                      ppl_tokens=args.ppl_tokens, batch_size=args.batch_size).result
    ppl = result["perplexity"]
    print(f"{result['model']}: perplexity {ppl['value']:.2f} ({ppl['corpus']}, {ppl['tokens']} tokens)")
    for name, r in result["tasks"].items():
        print(f"  {name:<14} acc {r['acc']:.3f}  acc_norm {r['acc_norm']:.3f}  (n={r['n']})")
    return 0


def cmd_tokenize(args) -> int:
    from transformers import AutoTokenizer

    from d2m_export.sources.data import iter_source
    from d2m_export.sources.models import model_label, resolve_model
    from d2m_export.outputs import check_output_dir
    from d2m_export.sources.shards import write_shards

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
    from d2m_export.api import train
    from d2m_export.train import TrainConfig

    fields = {k: getattr(args, k) for k in TrainConfig.__dataclass_fields__ if hasattr(args, k)}
    checkpoint = train(fields.pop("model"), fields.pop("out"), **fields)
    if int(os.environ.get("RANK", "0")) == 0:     # one line from a torchrun/accelerate job
        result = checkpoint.plan["training"]
        print(f"trained {result['steps']} steps, {result['tokens']} tokens; model, train_log.jsonl, loss.png "
              f"in {args.out}")
    return 0
