"""The stages, each with a serialisable hand-off: analysis JSON → plan → checkpoint → eval JSON."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from d2m_export.architectures import dense_families
from d2m_export.errors import UserError
from d2m_export.sources.lazy_weights import SourceWeights, release_memory, source_weights, write_checkpoint
from d2m_export.sources.memory import check_memory, check_model_stage, logits_bytes, weight_bytes
from d2m_export.sources.models import compute_dtype, load_model, model_label, read_config, resolve_model, stored_dtype
from d2m_export.outputs import atomic_dir, check_output_dir, check_output_file, write_json
from d2m_export.sources.params import param_counts
from d2m_export.plan import Options, Plan, read_plan_file

DEFAULT_RATIO = 0.8
OUTPUT_DTYPES = {"auto": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}   # convert --dtype
DTYPE_NAMES = {v: k for k, v in OUTPUT_DTYPES.items() if v}
MOE2DENSE_NOT_HEALED = ("--method moe2dense has nothing to heal: healing fits the layers a dense → MoE conversion "
                        "(lfuc, prune, upcycle) fused to the dense layers they replace, and moe2dense fuses no "
                        "dense layers")


def heal_status(heal, not_healed: str | None) -> dict:
    """d2m_plan.json's `heal`: whether convert healed the model, with what budget, or why not."""
    if heal is None:
        return {"healed": False, "reason": not_healed or "not asked (convert(heal=None))"}
    return {"healed": True, "stage": "convert", "budget": {"calib_tokens": heal.calib_tokens, "steps": heal.steps}}


def analyze(model_spec, out: Path, calib_tokens: int = 2048, progress: bool = True) -> dict:
    from d2m_export.plan.analysis import plot_heatmap, score_blocks
    from d2m_export.plan.calibration import calibration_ids, collect

    check_output_dir(out)
    model_dir = resolve_model(model_spec)
    _check_convert_memory(model_dir, compute_dtype(model_dir), calib_tokens, in_memory=False, stage="analyze")
    model, tokenizer, _ = load_model(model_spec)
    acts = collect(model, calibration_ids(tokenizer, calib_tokens), progress=progress, keep_streams=False)
    result = {"model": model_label(model_spec), "num_layers": len(acts.r), "calibration_tokens": acts.tokens,
              "calibration_corpus": "brown", "blocks": score_blocks(acts)}
    with atomic_dir(out) as tmp:
        (tmp / "similarity.json").write_text(json.dumps(result, indent=1) + "\n")
        plot_heatmap(result["blocks"], result["num_layers"],
                     f"{result['model']}: block redundancy on {acts.tokens} calibration tokens",
                     tmp / "similarity.png")
    return result


def _analysis_table(path: Path, num_layers: int) -> dict:
    from d2m_export.plan.analysis import block_table

    try:
        data = json.loads(Path(path).read_text())
        blocks = data["blocks"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--analysis {path} is not a similarity.json written by `d2m-export analyze` ({e})") from None
    if data.get("num_layers") != num_layers:
        raise UserError(f"--analysis {path} describes {data.get('num_layers')} layers, the model has {num_layers}")
    return block_table(blocks)


def convert(model_spec, out: Path, method_name: str = "lfuc", plan_file: Path | None = None,
            target_ratio: float | None = None, threshold: float | None = None, options: Options | None = None,
            analysis: Path | None = None, calib_tokens: int = 2048, max_block: int = 4,
            min_mlp_cos: float = -1.0, progress: bool = True, latency_budget_ms: float | None = None,
            device: str | None = None, precision: str = "fp16", context: int = 512, runtime: str | None = None,
            plan_search: str = "metric", search_tokens: int = 1024, heal=None, dtype: str = "auto",
            not_healed: str | None = None) -> dict:
    """`heal`: a HealConfig to heal the conversion before it is written (the command line's default), or
    None; `not_healed` then says why, in d2m_plan.json's `heal`."""
    from d2m_export.methods import get_method
    from d2m_export.plan.planner import active_ratio, plan_by_latency, plan_by_ratio, plan_by_threshold

    if method_name == "moe2dense":
        raise UserError("use moe_to_dense() for --method moe2dense")
    method = get_method(method_name)
    options = options or Options()
    options.validate()
    if sum(x is not None for x in (plan_file, target_ratio, threshold, latency_budget_ms)) > 1:
        raise UserError("give at most one of --plan, --target-active-ratio, --threshold, --latency-budget-ms")
    if method_name == "upcycle" and latency_budget_ms is not None:
        raise UserError("--latency-budget-ms picks a fusion plan; upcycle fuses nothing (use lfuc or prune)")
    if plan_search not in ("metric", "loss"):
        raise UserError(f"--plan-search must be metric or loss, not {plan_search!r}")
    if plan_search == "loss":
        if method_name not in ("lfuc", "prune"):
            raise UserError(f"--plan-search loss picks blocks for lfuc and prune; --method {method_name} has no plan")
        if plan_file is not None or analysis is not None:
            raise UserError("--plan-search loss searches the plan itself; drop --plan/--analysis")
        if search_tokens < 256:
            raise UserError(f"--search-tokens must be at least 256 (one window), not {search_tokens}")
    if target_ratio is not None and not 0 < target_ratio <= 1:
        raise UserError(f"--target-active-ratio must be in (0, 1], not {target_ratio}")
    if heal is not None:
        heal.validate({"calib_tokens": "--heal-tokens", "steps": "--heal-steps"})
    latency_ms = _latency_model(latency_budget_ms, device, precision, context, runtime)
    plan_data = read_plan_file(plan_file) if plan_file else None
    if plan_data is not None:
        Plan.from_dict(plan_data, method=method.name, num_layers=1)    # its structure, before the model loads
    check_output_dir(out)
    if dtype not in OUTPUT_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(OUTPUT_DTYPES)}, not {dtype!r}")
    t0 = time.time()
    model_dir = resolve_model(model_spec)
    out_dtype = stored_dtype(model_dir) if dtype == "auto" else OUTPUT_DTYPES[dtype]
    compute = "float32" if out_dtype == "float32" else compute_dtype(model_dir)
    _check_convert_memory(model_dir, compute, calib_tokens, in_memory=heal is not None or plan_search == "loss",
                          healing=heal is not None)
    model, tokenizer, _ = load_model(model_spec, dtype=compute)
    dense_config = model.config
    num_layers = dense_config.num_hidden_layers
    if dense_config.model_type not in dense_families():
        raise UserError(f"convert --method {method_name} needs a dense model ({', '.join(dense_families())}); "
                        f"{model_label(model_spec)} is {dense_config.model_type}")
    if method.writes_moe:
        from d2m_export.methods.base import moe_family
        moe_family(dense_config)      # a family with no exact MoE form is refused before calibrating

    from d2m_export.plan.analysis import block_table, score_blocks
    from d2m_export.plan.calibration import calibration_ids, collect

    given = Plan.from_dict(plan_data, method=method.name, num_layers=num_layers) if plan_data is not None else None
    router_options = given.options if given is not None and plan_data.get("options") is not None else options
    metric_plan = plan_data is None and method.name != "upcycle" and plan_search == "metric"
    needs_acts = (metric_plan and not analysis) or (method.calibrates_router and router_options.router_init == "calibrated")
    acts = collect(model, calibration_ids(tokenizer, calib_tokens), progress=progress, keep_streams=False) \
        if needs_acts else None
    src = source_weights(model, model_dir)
    keep_model = heal is not None or plan_search == "loss"
    if not keep_model and isinstance(src, SourceWeights):
        del model            # weights are read from the checkpoint as they are written: one copy at most
        release_memory()

    table = search = None
    if metric_plan:
        table = _analysis_table(analysis, num_layers) if analysis else block_table(score_blocks(acts))
    if given is not None:
        plan = given
        if plan_data.get("options") is None:
            plan.options = options
    elif method.name == "upcycle":
        plan = Plan(method.name, num_layers, [], options)
    elif plan_search == "loss":
        plan, search = _loss_plan(method, model, tokenizer, options, target_ratio, threshold, latency_budget_ms,
                                  latency_ms, max_block, search_tokens, progress)
    elif latency_budget_ms is not None:
        plan = plan_by_latency(method, dense_config, table, latency_budget_ms, latency_ms, options, max_block,
                               min_mlp_cos)
    elif threshold is not None:
        plan = plan_by_threshold(method, dense_config, table, threshold, options, max_block, min_mlp_cos)
    else:
        plan = plan_by_ratio(method, dense_config, table, target_ratio or DEFAULT_RATIO, options,
                             max_block, min_mlp_cos)
    plan.validate(allow_empty_donors=method.allow_empty_donors)
    if not plan.blocks or plan.options.router_init != "calibrated":
        acts = None

    config, state = method.convert_state(dense_config, src, plan, acts, dtype=getattr(torch, out_dtype))
    healing = converted = None
    if heal is not None:
        from d2m_export.heal import heal_model
        from d2m_export.methods.base import instantiate
        converted = instantiate(config, state.materialize())
        healing = heal_model(converted, model, tokenizer, plan, method.name, heal, progress=progress)
    dense, new = param_counts(dense_config), param_counts(config)
    record = {
        "base_model": model_label(model_spec), "method": method.name, "plan": plan.to_dict(),
        "params": {"dense_active": dense.active, "dense_total": dense.total, "active": new.active,
                   "total": new.total, "active_ratio": round(active_ratio(method, dense_config, plan), 6)},
        "architecture": AutoModelForCausalLM._model_mapping[type(config)].__name__,
        "dtype": DTYPE_NAMES[out_dtype],
        "scores": [table[method.scored_block(b.host, len(b.donors))] for b in plan.blocks if b.donors] if table else None,
        "wall_s": None,
    }
    if search is not None:
        record["plan_search"] = search
    record["heal"] = heal_status(heal, not_healed)
    if healing is not None:
        record["healing"] = healing
    if latency_ms is not None:
        record["latency"] = {"device": device, "budget_ms": latency_budget_ms, "precision": precision,
                             "context": context, "runtime": runtime, "efficiency": latency_ms.efficiency,
                             "kv_efficiency": latency_ms.kv_efficiency,
                             "dense_ms": round(latency_ms(dense_config), 6),
                             "predicted_ms": round(latency_ms(config), 6)}
    with atomic_dir(out) as tmp:
        if converted is not None:
            converted.to(getattr(torch, out_dtype)).save_pretrained(tmp)
        else:
            write_checkpoint(config, state, tmp, getattr(torch, out_dtype), progress=progress)
        tokenizer.save_pretrained(tmp)
        record["wall_s"] = round(time.time() - t0, 1)
        (tmp / "d2m_plan.json").write_text(json.dumps({"generator": "d2m-export", **record}, indent=2) + "\n")
    return record


def _check_convert_memory(model_dir, compute: str, calib_tokens: int, in_memory: bool, stage: str = "convert",
                          healing: bool = False) -> None:
    """The dense model in `compute` dtype and its calibration activations; healing and the loss search
    also hold the converted model, in fp32."""
    cfg = read_config(model_dir)
    weights = weight_bytes(model_dir, compute)
    # the MLP inputs of every layer are kept; the residual streams only one batch at a time
    acts = (cfg["num_hidden_layers"] * calib_tokens + (cfg["num_hidden_layers"] + 1) * 1024) * cfg["hidden_size"] \
        * (4 if compute == "float32" else 2)
    how = f"the model in {compute} and {calib_tokens} calibration tokens"
    other_ways = ""
    if in_memory:
        weights += weight_bytes(model_dir, "float32")
        how += ", and the converted model in memory for healing/--plan-search loss"
        if healing:
            other_ways = "convert with --no-heal and heal after (`d2m-export heal`: one model at a time)"
    check_memory(model_dir, stage, weights + acts, how, other_ways)


def _loss_plan(method, model, tokenizer, options, target_ratio, threshold, latency_budget_ms, latency_ms,
               max_block, search_tokens, progress):
    from d2m_export.plan.calibration import calibration_ids
    from d2m_export.plan.loss_search import PlanLoss, plan_by_loss
    from d2m_export.plan.planner import active_ratio

    scorer = PlanLoss(model, calibration_ids(tokenizer, search_tokens))
    num_layers = model.config.num_hidden_layers
    if threshold is not None:
        if not threshold > 0:
            raise UserError(f"--threshold with --plan-search loss is the calibration KL (nats/token) the plan may "
                            f"reach; it must be positive, not {threshold}")
        return plan_by_loss(method.name, num_layers, scorer, options, max_kl=threshold, max_block=max_block,
                            progress=progress)
    if latency_budget_ms is not None:
        measure = lambda plan: latency_ms(method.output_config(model.config, plan))  # noqa: E731
        target, what = latency_budget_ms, f"{latency_budget_ms} ms/token on this device"
    else:
        target = target_ratio or DEFAULT_RATIO
        measure = lambda plan: active_ratio(method, model.config, plan)  # noqa: E731
        what = f"active ratio {target}"
    plan, search = plan_by_loss(method.name, num_layers, scorer, options, measure=measure, target=target,
                                max_block=max_block, progress=progress)
    if measure(plan) > target + 1e-9:
        raise UserError(f"{method.name} cannot reach {what} on this model (best {measure(plan):.4g} with blocks of "
                        f"at most {max_block} layers); raise --max-block or the target")
    return plan, search


def _latency_model(budget_ms, device, precision, context, runtime):
    from d2m_export.devices.profiles import load_profile
    from d2m_export.devices.roofline import BYTES_PER_WEIGHT, DecodeLatency

    if budget_ms is None:
        if device is not None:
            raise UserError("--device goes with --latency-budget-ms (the budget to meet on that device)")
        return None
    if device is None:
        raise UserError("--latency-budget-ms needs --device NAME (a profile in device_profiles/, or a YAML path)")
    if precision not in BYTES_PER_WEIGHT:
        raise UserError(f"--precision must be one of {', '.join(BYTES_PER_WEIGHT)}, not {precision!r}")
    if context < 1:
        raise UserError(f"--context must be a positive number of tokens, not {context}")
    profile = load_profile(device)
    efficiency, kv_efficiency = 1.0, None
    if runtime is not None:
        key = f"{runtime}:{precision}"
        if key not in profile.runtime_efficiency:
            raise UserError(f"{profile.key} has no measured efficiency for {key!r} (it has: "
                            f"{', '.join(profile.runtime_efficiency) or 'none'}); drop --runtime for the bare roofline")
        efficiency = profile.runtime_efficiency[key]
        kv_efficiency = profile.runtime_kv_efficiency.get(key)
    return DecodeLatency(profile, precision, context, efficiency, kv_efficiency)


def evaluate(model_spec, out: Path | None, tasks: list[str], limit: int | None, ppl_tokens: int = 10240,
             batch_size: int = 8) -> dict:
    from d2m_export import evaluation

    unknown = [t for t in tasks if t not in evaluation.available_tasks()]
    if unknown:
        raise UserError(f"unknown task {unknown[0]!r}; available: {', '.join(evaluation.available_tasks())}")
    if out:
        check_output_file(out)
    model_dir = resolve_model(model_spec)
    compute = compute_dtype(model_dir)
    check_model_stage(model_dir, "eval", compute, logits_bytes(model_dir, batch_size, 512, compute),
                      f"the model in {compute} and a batch of {batch_size} × 512-token logits")
    model, tokenizer, model_dir = load_model(model_spec)
    t0 = time.time()
    result = evaluation.evaluate(model, tokenizer, tasks=tasks, limit=limit, ppl_tokens=ppl_tokens,
                                 batch_size=batch_size)
    result = {"model": model_label(model_spec), **result,
              "params": param_counts(model.config).__dict__, "wall_s": round(time.time() - t0, 1)}
    if out:
        write_json(out, result)
    return result


def moe_to_dense(model_spec, out: Path, experts_kept: int, groups: int | None = None, score: str = "acp",
                 calib_tokens: int = 2048, progress: bool = True, grouping: str = "score",
                 scaling: str = "score", dtype: str = "auto", not_healed: str | None = None) -> dict:
    from d2m_export.methods import moe2dense
    from d2m_export.plan.calibration import calibration_ids

    check_output_dir(out)
    if dtype not in OUTPUT_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(OUTPUT_DTYPES)}, not {dtype!r}")
    t0 = time.time()
    model, tokenizer, model_dir = load_model(model_spec)
    out_dtype = stored_dtype(model_dir) if dtype == "auto" else OUTPUT_DTYPES[dtype]
    groups = groups or experts_kept
    if not moe2dense.moe_layers(model):
        raise UserError(f"--method moe2dense needs a Mixture-of-Experts model; {model_label(model_spec)} "
                        f"({model.config.model_type}) has no MoE layers")
    moe2dense.validate(model, experts_kept, groups, score, grouping, scaling)   # before the (slow) calibration
    stats = moe2dense.routing_stats(model, calibration_ids(tokenizer, calib_tokens), progress=progress)
    dense, layers = moe2dense.convert(model, stats, experts_kept, groups, score, grouping, scaling)
    moe, new = param_counts(model.config), param_counts(dense.config)
    record = {"base_model": model_label(model_spec), "method": "moe2dense",
              "plan": {"experts_kept": experts_kept, "groups": groups, "score": score, "grouping": grouping,
                       "scaling": scaling, "calibration_tokens": int(next(iter(stats.values())).tokens)},
              "layers": {str(k): v for k, v in layers.items()},
              "params": {"moe_active": moe.active, "moe_total": moe.total, "active": new.active, "total": new.total,
                         "zero_padding": 3 * dense.config.hidden_size * sum(v.get("zero_padding", 0) for v in layers.values())},
              "architecture": type(dense).__name__, "dtype": DTYPE_NAMES[out_dtype],
              "heal": heal_status(None, not_healed or MOE2DENSE_NOT_HEALED)}
    with atomic_dir(out) as tmp:
        dense.to(getattr(torch, out_dtype)).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record["wall_s"] = round(time.time() - t0, 1)
        (tmp / "d2m_plan.json").write_text(json.dumps({"generator": "d2m-export", **record}, indent=2) + "\n")
    return record
