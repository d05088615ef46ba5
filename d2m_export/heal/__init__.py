"""Local healing: the stage between convert and train (checkpoint → healed checkpoint); `convert`
runs it by default before writing (`--no-heal` skips it).

Each fused layer is fitted to what the original dense layers produced at its block's end, on
calibration text (training corpora only): a closed-form fit of output scales and router, then a
short block-wise distillation. The same stage serves the baselines so comparisons stay fair:
a pruned model's host layers absorb the dropped run after them (LLM-Streamline-style), and an
upcycled model's routers are spread over the calibration inputs (its experts are exact copies,
so its output is unchanged).
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from d2m_export.errors import UserError
from d2m_export.plan import Block, Plan

HEALABLE = ("lfuc", "prune", "upcycle")
WINDOW = 256


@dataclass
class HealConfig:
    calib_tokens: int = 8192
    steps: int = 150                 # distillation steps per block (0: closed form only)
    corpora: list[str] = field(default_factory=lambda: ["calibration"])
    lr: float = 1e-4
    attention: bool = False          # also train the host's attention and norms
    held_out: float = 0.125          # fraction of the calibration windows kept for early stopping
    seed: int = 0

    def validate(self, flags: dict[str, str] | None = None) -> None:
        """`flags` names the command-line flag of each field in messages (`heal`'s own by default)."""
        flag = {"calib_tokens": "--calib-tokens", "steps": "--steps", "lr": "--lr", **(flags or {})}
        if self.calib_tokens < 2 * WINDOW:
            raise UserError(f"{flag['calib_tokens']} must be at least {2 * WINDOW} (one window to fit, one held "
                            f"out), not {self.calib_tokens}")
        if self.steps < 0:
            raise UserError(f"{flag['steps']} must be 0 or more, not {self.steps}")
        if not self.lr > 0:
            raise UserError(f"{flag['lr']} must be positive, not {self.lr}")
        if not self.corpora:
            raise UserError("--calib-corpus: give at least one training corpus")
        from d2m_export.sources.corpora import CORPORA
        for name in self.corpora:
            if name in CORPORA and CORPORA[name].role != "train":
                raise UserError(f"calibration corpus {name!r} is held out for evaluation and is never fitted on; "
                                f"use a training corpus ({', '.join(n for n, s in CORPORA.items() if s.role == 'train')})")


def calibration_windows(tokenizer, cfg: HealConfig) -> torch.Tensor:
    from d2m_export.sources.corpora import token_windows
    from d2m_export.sources.data import read_source

    text = "\n\n".join(doc for source in cfg.corpora for doc in read_source(source))
    ids = token_windows(tokenizer, text, WINDOW, cfg.calib_tokens)
    if len(ids) < 2:
        raise UserError(f"calibration text {', '.join(cfg.corpora)} gives {len(ids)} window(s) of {WINDOW} tokens; "
                        "healing needs at least 2")
    return ids


@dataclass
class HealTargets:
    """What the dense model gives healing: the calibration windows and each block's input and output.
    Made before the converted model is loaded, so the two models are never in memory together."""
    ids: torch.Tensor
    blocks: list
    seconds: float


def heal_targets(dense, tokenizer, plan: Plan, method: str, cfg: HealConfig, progress: bool = True) -> HealTargets:
    from d2m_export.heal.blocks import collect_blocks

    t0 = time.time()
    ids = calibration_windows(tokenizer, cfg)
    if method == "upcycle":     # every upcycled layer, as a block of its own
        layers = [b.host for b in plan.blocks] if plan.blocks else list(range(plan.num_layers))
        plan = Plan(plan.method, plan.num_layers, [Block(i, []) for i in layers], plan.options)
    blocks = collect_blocks(dense, plan, ids, progress=progress) if plan.blocks else []
    return HealTargets(ids, blocks, time.time() - t0)


def heal_model(model, dense, tokenizer, plan: Plan, method: str, cfg: HealConfig, progress: bool = True) -> dict:
    """Heal `model` (the conversion of `dense` by `method` under `plan`) in place; returns the record."""
    model.to(dense.device)
    return heal_with(model, heal_targets(dense, tokenizer, plan, method, cfg, progress), method, cfg, progress)


def heal_with(model, targets: HealTargets, method: str, cfg: HealConfig, progress: bool = True) -> dict:
    """Heal `model` in place on `targets`; returns the record. Each layer is fitted in fp32 (a bf16
    model's layer is upcast while it is fitted: Adam's small steps vanish in bf16 weights)."""
    from d2m_export.heal.fit import distill, fit_closed_form, relative_error
    from d2m_export.heal.layer import LayerRunner

    t0 = time.time() - targets.seconds
    torch.manual_seed(cfg.seed)
    ids = targets.ids
    held_windows = max(1, round(len(ids) * cfg.held_out))
    record = {"calibration_corpora": cfg.corpora, "calibration_tokens": int(ids.numel()),
              "held_out_tokens": held_windows * WINDOW, **{k: v for k, v in asdict(cfg).items()
                                                           if k in ("steps", "lr", "attention")}}
    if method == "upcycle":
        record["blocks"] = _spread_routers(model, targets.blocks)
        record["wall_s"] = round(time.time() - t0, 1)
        return record
    blocks = targets.blocks
    results = []
    bar = _bar(len(blocks) * max(cfg.steps, 1), progress)
    for i, data in enumerate(blocks, 1):
        fit, held = data.split(held_windows)
        runner = LayerRunner(model, data.layer)
        stored = _upcast(runner.layer)
        entry = {"host": data.block.host, "donors": data.block.donors, "layer": data.layer}
        before = relative_error(runner, held)
        converted = copy.deepcopy(runner.layer.state_dict())
        entry["closed_form"] = fit_closed_form(runner, fit)
        after_cf = relative_error(runner, held)
        if after_cf > before:       # a fit that does not carry over to held-out tokens is dropped
            runner.layer.load_state_dict(converted)
            entry["closed_form"] = {"kept": "conversion", "held_out_error": round(after_cf, 5)}
            after_cf = before
        if cfg.steps:
            entry["distill"] = distill(runner, fit, held, cfg.steps, lr=cfg.lr, attention=cfg.attention,
                                       seed=cfg.seed, on_step=bar.update if bar else None)
        entry["error"] = {"before": round(before, 5), "closed_form": round(after_cf, 5),
                          "after": round(relative_error(runner, held), 5)}
        if bar is not None:        # early stopping skips steps: the bar jumps to the block's end
            bar.n = i * max(cfg.steps, 1)
            bar.set_postfix(block=data.block.host, error=f"{before:.3f}→{entry['error']['after']:.3f}")
            bar.refresh()
        runner.layer.to(stored)
        results.append(entry)
    if bar is not None:
        bar.close()
    record["blocks"] = results
    record["error"] = "held-out Σ‖layer(x) − y‖² / Σ‖y − x‖² per block (x, y: the dense block's input and output)"
    record["wall_s"] = round(time.time() - t0, 1)
    return record


def _upcast(layer) -> torch.dtype:
    """Fit `layer` in fp32 (a bf16 model's small Adam steps would vanish); returns its dtype to restore."""
    stored = next(layer.parameters()).dtype
    layer.float()
    return stored


def _bar(total: int, progress: bool):
    if not progress or not total:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc="healing blocks", unit="step")


@torch.no_grad()
def _spread_routers(model, blocks: list) -> list[dict]:
    """Upcycled layers: every expert is the same MLP, so any routing gives the same output; a router
    pointing at k-means centroids of the layer's FFN inputs spreads tokens evenly before training."""
    from d2m_export.heal.layer import LayerRunner

    out = []
    for data in blocks:
        runner = LayerRunner(model, data.block.host)
        stored = _upcast(runner.layer)
        u = runner.ffn_input(runner.attention(data.x)).reshape(-1, data.x.shape[-1])
        n = runner.layer.mlp.gate.weight.shape[0]
        centroids = _kmeans(torch.nn.functional.normalize(u, dim=-1), n)
        runner.layer.mlp.gate.weight.copy_(centroids * 10.0)
        load = torch.bincount(runner.routed_choice(u), minlength=n).float() / len(u)
        runner.layer.to(stored)
        out.append({"layer": data.block.host, "router_load": [round(float(x), 4) for x in load]})
    return out


def _kmeans(x: torch.Tensor, k: int, iters: int = 25) -> torch.Tensor:
    """Spherical k-means; returns unit centroids [k, H]."""
    c = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:k]].clone()
    for _ in range(iters):
        assign = (x @ c.T).argmax(-1)
        for j in range(k):
            members = x[assign == j]
            if len(members):
                c[j] = torch.nn.functional.normalize(members.mean(0), dim=0)
    return c


def heal(model_spec, out: Path, cfg: HealConfig, dense_spec: str | None = None, progress: bool = True) -> dict:
    """`d2m-export heal`: read a converted checkpoint and its d2m_plan.json, heal, write a new checkpoint."""
    from d2m_export.sources.models import load_model, model_label, resolve_model
    from d2m_export.outputs import atomic_dir, check_output_dir

    cfg.validate()
    model_dir = resolve_model(model_spec)
    record = _read_record(model_dir)
    check_output_dir(out)
    if Path(out).resolve() == Path(model_dir).resolve():
        raise UserError(f"--out {out} is the model being healed; write the healed model to a new folder")
    plan = Plan.from_dict(record["plan"], method=record["method"])
    dense_spec = dense_spec or record.get("base_model")
    from d2m_export.sources.lazy_weights import release_memory
    from d2m_export.sources.memory import check_model_stage
    from d2m_export.sources.models import compute_dtype

    compute = compute_dtype(model_dir)
    check_model_stage(model_dir, "heal", compute, how=f"one model at a time in {compute}")
    t0 = time.time()
    try:
        dense, tokenizer, _ = load_model(dense_spec)
    except UserError as e:
        raise UserError(f"healing needs the dense model {model_label(model_spec)} was converted from ({e}); "
                        f"give it with --dense") from None
    if dense.config.num_hidden_layers != plan.num_layers:
        raise UserError(f"--dense has {dense.config.num_hidden_layers} layers; the plan was made for {plan.num_layers}")
    targets = heal_targets(dense, tokenizer, plan, record["method"], cfg, progress)
    del dense             # the dense model's part is done: never both models in memory
    release_memory()
    model, tokenizer, _ = load_model(model_dir)
    healing = heal_with(model, targets, record["method"], cfg, progress)
    record["healing"] = {**healing, "healed_from": model_label(model_spec), "dense": str(dense_spec)}
    record["heal"] = {"healed": True, "stage": "heal", "budget": {"calib_tokens": cfg.calib_tokens, "steps": cfg.steps}}
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record["healing"]["wall_s"] = round(time.time() - t0, 1)
        (tmp / "d2m_plan.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _read_record(model_dir: Path) -> dict:
    from d2m_export.sources.models import RECORD, read_record

    record = read_record(model_dir)
    if record is None:
        raise UserError(f"{model_dir} has no {RECORD}: heal works on models written by `d2m-export convert` "
                        f"(--method {', '.join(HEALABLE)})")
    method, plan = record.get("method"), record.get("plan")
    if "method" not in record or not isinstance(plan, dict) or "num_layers" not in plan:
        raise UserError(f"{Path(model_dir) / RECORD} is corrupt (no method or plan); convert the model again")
    if method not in HEALABLE:
        raise UserError(f"{model_dir} was made by --method {method}; heal fits {', '.join(HEALABLE)} conversions")
    return record
