"""Choose a plan from the redundancy analysis: by active-parameter ratio or by a threshold δ.

Candidates are blocks (host, donors right after it). Greedy and non-overlapping: a block's key
is its angular distance per fraction of active parameters it saves, so that long cheap blocks
are not passed over for short ones that save little; the last block is the most redundant one
that reaches the target.
"""
from __future__ import annotations

from d2m_export.errors import UserError
from d2m_export.methods.base import Method
from d2m_export.params import param_counts
from d2m_export.plan import Block, Options, Plan


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


def plan_by_ratio(method: Method, dense_config, table: dict, target: float, options: Options,
                  max_block: int = 4, min_mlp_cos: float = -1.0) -> Plan:
    if not 0 < target <= 1:
        raise UserError(f"--target-active-ratio must be in (0, 1], not {target}")
    num_layers = dense_config.num_hidden_layers
    plan = Plan(method.name, num_layers, [], options)
    candidates = _candidates(method, dense_config, table, options, max_block, min_mlp_cos)
    used: set[int] = set()
    while active_ratio(method, dense_config, plan) > target + 1e-9:
        free = [c for c in candidates if not {c[2].host, *c[2].donors} & used]
        if not free:
            break
        # Once a single block can close the gap, take the most redundant such block (no overshoot
        # for its own sake); until then, the one that buys the most savings per unit of distance.
        ratio = lambda c: active_ratio(method, dense_config, Plan(method.name, num_layers, plan.blocks + [c[2]], options))
        closers = [c for c in free if ratio(c) <= target + 1e-9]
        score, _, block = min(closers, key=lambda c: c[0]) if closers else min(free, key=lambda c: c[0] / c[1])
        plan.blocks.append(block)
        used |= {block.host, *block.donors}
    reached = active_ratio(method, dense_config, plan)
    if reached > target + 1e-9:
        raise UserError(f"{method.name} cannot reach active ratio {target} on this model (best {reached:.3f} with "
                        f"blocks of at most {max_block} layers); raise --max-block or the ratio")
    plan.blocks.sort(key=lambda b: b.host)
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
