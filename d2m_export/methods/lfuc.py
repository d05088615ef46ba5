"""Layer Fusion UpCycling (Dense2MoE, DESIGN.md §1-§2).

Each plan block keeps its host layer's attention; the donors lose attention and input norm and
their MLPs become routed experts of the host's FFN:

    y = x + Attn_h(x) + α·MLP_h(u) + β·Σ_{i∈TopK} g_i(u)·min(k, D)·E_i(u),   u = γ_h ⊙ rms_norm(x + Attn_h(x))

The result is in the dense family's MoE family (`architectures/`: Qwen2-MoE for Llama and Qwen2,
Qwen3-MoE for Qwen3): unfused layers are `mlp_only_layers`; in `--host-mode shared` the host MLP is
always on (the shared expert, or folded into every expert where the family has none); and
each donor keeps its own RMSNorm scale by folding γ_donor / γ_host into its gate/up columns.
The routed mix is scaled (see `routed_scale`) so that a uniform router adds each selected expert
at weight β; with every expert selected and α = β = 1 a zero router reproduces "donor attention
removed, donor MLPs fed the host's input" exactly.
"""
from __future__ import annotations

import logging

import torch

from d2m_export.errors import UserError
from d2m_export.sources.lazy_weights import LazyState
from d2m_export.methods.base import (Method, check_convertible, experts_names, moe_config, moe_mlp_state, register,
                                     shared_state)
from d2m_export.plan import Block, Plan

log = logging.getLogger(__name__)


def routed_layers(block: Block, host_mode: str) -> list[int]:
    return ([block.host] if host_mode == "routed" else []) + list(block.donors)


@register
class LayerFusionUpcycling(Method):
    name = "lfuc"
    description = "fuse redundant layers: donors lose attention, their MLPs become routed experts of the host"
    calibrates_router = True

    def num_experts(self, plan: Plan) -> int:
        o = plan.options
        widest = max((len(routed_layers(b, o.host_mode)) for b in plan.blocks), default=1)
        n = o.num_experts or max(widest, o.top_k)
        if n < widest:
            raise UserError(f"--num-experts {n} is below the {widest} experts the widest plan block needs")
        return n

    def output_config(self, dense_config, plan: Plan):
        check_convertible(dense_config)
        kept = [i for i in range(plan.num_layers) if i not in set(plan.donors)]
        hosts = {b.host for b in plan.blocks}
        shared = dense_config.intermediate_size if plan.options.host_mode == "shared" else 0
        return moe_config(dense_config, num_layers=len(kept),
                          mlp_only_layers=[i for i, layer in enumerate(kept) if layer not in hosts],
                          num_experts=self.num_experts(plan), top_k=plan.options.top_k, shared_size=shared)

    def convert_state(self, dense_config, src, plan: Plan, acts=None, dtype=torch.float32):
        config = self.output_config(dense_config, plan)
        o = plan.options
        kept = [i for i in range(plan.num_layers) if i not in set(plan.donors)]
        state = LazyState(dtype)
        state.copy(src, shared_state(src, kept, skip_mlp_of={b.host for b in plan.blocks}))
        if o.router_init == "calibrated" and plan.blocks and acts is None:
            raise UserError("--router-init calibrated needs calibration data")
        for block in plan.blocks:
            prefix = f"model.layers.{kept.index(block.host)}.mlp."
            state.add(experts_names(dense_config, prefix, o.host_mode == "shared"),
                      lambda block=block, prefix=prefix: self._fused_mlp(dense_config, config, src, block, prefix, o, acts,
                                                                         dtype))
        return config, state

    def _fused_mlp(self, dense_config, config, src, block: Block, prefix: str, o, acts, dtype) -> dict:
        """One host's MoE FFN: its routed experts (donor MLPs, the host's too in routed mode), router and
        shared expert. Each expert is folded in fp32 and then kept in `dtype`."""
        h, n = config.hidden_size, config.num_experts
        host_mlp = _mlp(src, block.host)
        shared = (host_mlp["gate"], host_mlp["up"], host_mlp["down"] * o.alpha) if o.host_mode == "shared" else None
        layers = routed_layers(block, o.host_mode)
        order = [i % len(layers) for i in range(n)]     # replicate cyclically up to N experts
        experts = [self._expert(src, layer, block.host, o.alpha if layer == block.host else 1.0)
                   * routed_scale(o.beta, o.top_k, n, len(layers), order.count(e)) for e, layer in enumerate(layers)]
        experts = [Expert(gate_up.to(dtype), down.to(dtype)) for gate_up, down in experts]
        router = torch.zeros(len(experts), h)
        if o.router_init == "calibrated":
            router = fit_router(acts.mlp_input(block.host), experts, dense_config.hidden_act)
        return moe_mlp_state(dense_config, prefix, torch.stack([experts[i][0] for i in order]),
                             torch.stack([experts[i][1] for i in order]), router[order], shared)

    @staticmethod
    def _expert(src: dict, layer: int, host: int, weight: float) -> "Expert":
        mlp = _mlp(src, layer)
        fold = _norm_ratio(src, layer, host)
        return Expert(torch.cat([mlp["gate"] * fold, mlp["up"] * fold]), mlp["down"] * weight)


class Expert(tuple):
    """(gate_up [2I, H], down [H, I]); `expert * s` scales its output."""

    def __new__(cls, gate_up, down):
        return super().__new__(cls, (gate_up, down))

    def __mul__(self, s: float) -> "Expert":
        return Expert(self[0], self[1] * s)


def routed_scale(beta: float, top_k: int, n_slots: int, n_distinct: int, copies: int) -> float:
    """Output scale of one routed expert, folded into its down_proj.

    The router's renormalised weights sum to 1 over the k selected slots; scaling by
    min(k, D) makes a uniform router add each selected expert at weight β. With every slot
    selected, an expert replicated c times out of N slots is counted c times: N / (D·c)
    evens that out, so all-selected sums each distinct expert exactly once.
    """
    return beta * min(top_k, n_distinct) * n_slots / (n_distinct * copies)


def _mlp(src: dict, layer: int) -> dict[str, torch.Tensor]:
    p = f"model.layers.{layer}.mlp."
    return {k: src[p + f"{k}_proj.weight"].float() for k in ("gate", "up", "down")}


def _norm_ratio(src: dict, layer: int, host: int) -> torch.Tensor:
    """γ_layer / γ_host per input column; columns where the host's γ is 0 carry no signal."""
    g_layer = src[f"model.layers.{layer}.post_attention_layernorm.weight"].float()
    g_host = src[f"model.layers.{host}.post_attention_layernorm.weight"].float()
    zero = g_host.abs() < 1e-12
    if zero.any() and layer != host:
        log.warning("layer %d: host %d has %d zero norm weights; the donor loses those input columns",
                    layer, host, int(zero.sum()))
    return torch.where(zero, torch.zeros_like(g_host), g_layer / torch.where(zero, torch.ones_like(g_host), g_host))


def fit_router(u: torch.Tensor, experts: list[tuple[torch.Tensor, torch.Tensor]], act: str,
               steps: int = 200, max_tokens: int = 4096) -> torch.Tensor:
    """Softmax regression from the host's MLP input to the expert whose output norm is largest."""
    from transformers.activations import ACT2FN

    act_fn = ACT2FN[act]
    u = u[torch.randperm(len(u), generator=torch.Generator().manual_seed(0))[:max_tokens]].float()
    with torch.no_grad():
        norms = []
        for gate_up, down in experts:
            g, v = (u @ gate_up.float().T).chunk(2, dim=-1)
            norms.append((act_fn(g) * v @ down.float().T).norm(dim=-1))
        target = torch.stack(norms, dim=-1).argmax(-1)
    return train_router(u, target, len(experts), steps=steps)


def train_router(u: torch.Tensor, target: torch.Tensor, num_experts: int, steps: int = 300,
                 lr: float = 1e-2) -> torch.Tensor:
    """Softmax regression from the FFN input `u` to a target expert per token; the router weight [E, H]."""
    w = torch.zeros(num_experts, u.shape[-1], device=u.device, requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(u @ w.T, target).backward()
        opt.step()
    return w.detach()
