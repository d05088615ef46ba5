"""Choose a plan from the redundancy analysis: by active-parameter ratio, by a decode-latency
budget on a device (roofline), or by a threshold δ.

Candidates are blocks (host, donors right after it). Greedy and non-overlapping: a block's key
is its angular distance per fraction of active parameters it saves, so that long cheap blocks
are not passed over for short ones that save little; the last block is the most redundant one
that reaches the target.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from d2m_export.errors import UserError
from d2m_export.sources.params import param_counts
from d2m_export.plan import Block, Options, Plan

if TYPE_CHECKING:   # for annotations only: the caller passes the method in (the convert stage comes later)
    from d2m_export.methods.base import Method


def active_ratio(method: Method, dense_config, plan: Plan) -> float:
    return param_counts(method.output_config(dense_config, plan)).active / param_counts(dense_config).active


def _candidates(method, dense_config, table, options, max_block, min_mlp_cos):
    num_layers = dense_config.num_hidden_layers
    out = []
    for host in range(num_layers):
        for n in range(1, max_block):
            if host + n >= num_layers:
                break
            block = Block(host, list(range(host + 1, host + 1 + n)))
            saved = 1.0 - active_ratio(method, dense_config, Plan(method.name, num_layers, [block], options))
            if saved <= 0:
                continue
            scored = table[method.scored_block(host, n)]
            if table[host, n + 1]["mlp_input_cos"] < min_mlp_cos:
                continue
            out.append((scored["angular_distance"], saved, block))
    return out


def _greedy(method: Method, dense_config, table: dict, options: Options, measure, target: float,
            max_block: int, min_mlp_cos: float) -> Plan:
    """Add blocks until measure(plan) ≤ target (measure falls as blocks are added)."""
    num_layers = dense_config.num_hidden_layers
    plan = Plan(method.name, num_layers, [], options)
    candidates = _candidates(method, dense_config, table, options, max_block, min_mlp_cos)
    used: set[int] = set()
    while measure(plan) > target + 1e-9:
        free = [c for c in candidates if not {c[2].host, *c[2].donors} & used]
        if not free:
            break
        # Once a single block can close the gap, take the most redundant such block (no overshoot
        # for its own sake); until then, the one that buys the most savings per unit of distance.
        closers = [c for c in free if measure(Plan(method.name, num_layers, plan.blocks + [c[2]], options)) <= target + 1e-9]
        score, _, block = min(closers, key=lambda c: c[0]) if closers else min(free, key=lambda c: c[0] / c[1])
        plan.blocks.append(block)
        used |= {block.host, *block.donors}
    plan.blocks.sort(key=lambda b: b.host)
    return plan


def plan_by_ratio(method: Method, dense_config, table: dict, target: float, options: Options,
                  max_block: int = 4, min_mlp_cos: float = -1.0) -> Plan:
    if not 0 < target <= 1:
        raise UserError(f"--target-active-ratio must be in (0, 1], not {target}")
    measure = lambda plan: active_ratio(method, dense_config, plan)  # noqa: E731
    plan = _greedy(method, dense_config, table, options, measure, target, max_block, min_mlp_cos)
    if measure(plan) > target + 1e-9:
        raise UserError(f"{method.name} cannot reach active ratio {target} on this model (best {measure(plan):.3f} "
                        f"with blocks of at most {max_block} layers); raise --max-block or the ratio")
    return plan


def plan_by_latency(method: Method, dense_config, table: dict, budget_ms: float, latency_ms, options: Options,
                    max_block: int = 4, min_mlp_cos: float = -1.0) -> Plan:
    """The plan that fuses least while latency_ms(config) — the roofline on a device — meets the budget."""
    if not budget_ms > 0:
        raise UserError(f"--latency-budget-ms must be positive, not {budget_ms}")
    measure = lambda plan: latency_ms(method.output_config(dense_config, plan))  # noqa: E731
    dense_ms = measure(Plan(method.name, dense_config.num_hidden_layers, [], options))
    if dense_ms <= budget_ms:
        raise UserError(f"the dense model already meets {budget_ms} ms/token on this device "
                        f"({dense_ms:.4g} ms predicted); nothing to fuse")
    plan = _greedy(method, dense_config, table, options, measure, budget_ms, max_block, min_mlp_cos)
    if measure(plan) > budget_ms + 1e-9:
        raise UserError(f"{method.name} cannot meet {budget_ms} ms/token on this device (best {measure(plan):.4g} ms "
                        f"with blocks of at most {max_block} layers); raise the budget, --max-block, or quantize "
                        f"(--precision)")
    return plan


def plan_by_threshold(method: Method, dense_config, table: dict, delta: float, options: Options,
                      max_block: int = 4, min_mlp_cos: float = -1.0) -> Plan:
    plan = Plan(method.name, dense_config.num_hidden_layers, [], options)
    used: set[int] = set()
    candidates = _candidates(method, dense_config, table, options, max_block, min_mlp_cos)
    for score, saved, block in sorted(candidates, key=lambda c: c[0] / c[1]):
        layers = {block.host, *block.donors}
        if score <= delta and not layers & used:
            plan.blocks.append(block)
            used |= layers
    plan.blocks.sort(key=lambda b: b.host)
    return plan
