"""Fitting one fused layer to the dense block it replaces.

The target of the layer's FFN is what the dense block added past the host's attention:
`d = y − r`, with `r = x + Attn_host(x)`. Two stages:

1. Closed form (`fit_closed_form`): each routed expert (and the shared expert, or a pruned
   host's MLP) gets one output scale by least squares, and the router learns to send each token
   to the expert that best reconstructs its `d` (alternating: assign, refit scales; the scales
   are refitted last under the router's own choices, since that is what runs).
2. Block-wise distillation (`distill`): Adam on the layer's FFN (and optionally its attention)
   against `y`, relative MSE, early stopping on held-out windows, the best state kept. Top-1
   routing with renormalised weights gives the router no gradient, so the router also learns,
   by cross-entropy, the expert that reconstructs each token best under the current weights.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from d2m_export.heal.blocks import BlockData
from d2m_export.heal.layer import LayerRunner
from d2m_export.methods.lfuc import train_router

CHUNK = 2048   # tokens per piece when every expert runs on every token
# Output scales stay in [0, MAX_SCALE]: fitted on the dense model's inputs, a negative or large
# scale (seen: −5.4 on a pruned host, 61.8 on a rarely routed expert) wins a little
# on those inputs and wrecks the model on its own, shifted ones.
MAX_SCALE = 3.0


@torch.no_grad()
def relative_error(runner: LayerRunner, data: BlockData, batch: int = 8) -> float:
    """Σ‖layer(x) − y‖² / Σ‖y − x‖²: 1.0 is as bad as adding nothing; 0 is the dense block exactly."""
    num = den = 0.0
    for i in range(0, len(data.x), batch):
        x, y = data.x[i:i + batch], data.y[i:i + batch]
        num += (runner(x) - y).pow(2).sum().item()
        den += (y - x).pow(2).sum().item()
    return num / max(den, 1e-30)


@torch.no_grad()
def _ffn_problem(runner: LayerRunner, data: BlockData, batch: int = 8):
    """Flattened (u, d, shared output) over the data's tokens."""
    us, ds, ss = [], [], []
    for i in range(0, len(data.x), batch):
        x, y = data.x[i:i + batch], data.y[i:i + batch]
        r = runner.attention(x)
        u = runner.ffn_input(r)
        us.append(u.reshape(-1, u.shape[-1]))
        ds.append((y - r).reshape(-1, u.shape[-1]))
        ss.append((runner.shared(u) if runner.is_moe else runner.mlp(u)).reshape(-1, u.shape[-1]))
    return torch.cat(us), torch.cat(ds), torch.cat(ss)


@torch.no_grad()
def _expert_stats(runner, u, d, s):
    """Per slot and token: ⟨d, E⟩, ‖E‖², ⟨s, E⟩ (experts at routing weight 1); per token ‖d‖², ⟨d, s⟩,
    ‖s‖². Every expert runs on every token, in chunks of tokens."""
    dots, sq, sdots = [], [], []
    for i in range(0, len(u), CHUNK):
        e = runner.experts(u[i:i + CHUNK])                                   # [E, t, H]
        dots.append((e * d[i:i + CHUNK]).sum(-1))
        sq.append(e.pow(2).sum(-1))
        sdots.append((e * s[i:i + CHUNK]).sum(-1))
    # the per-token statistics are small: the scale and assignment algebra runs on the CPU
    dots, sq, sdots = (torch.cat(t, 1).cpu() for t in (dots, sq, sdots))      # [E, T]
    dd, ds_, ss = (t.cpu() for t in (d.pow(2).sum(-1), (d * s).sum(-1), s.pow(2).sum(-1)))   # [T]
    return dots, sq, sdots, dd, ds_, ss


def _squared_errors(stats, alpha: float, scales: torch.Tensor) -> torch.Tensor:
    """‖d − α·s − c_e·E_e‖² for every slot e and token: [E, T]."""
    dots, sq, sdots, dd, ds_, ss = stats
    return (dd - 2 * alpha * ds_ + alpha ** 2 * ss)[None] - 2 * scales[:, None] * (dots - alpha * sdots) \
        + scales[:, None] ** 2 * sq


def _solve_scales(stats, assign, has_shared: bool):
    """Least squares for (α, c_1..c_E) given each token's slot."""
    dots, sq, sdots, _, ds_, ss = stats
    n = dots.shape[0]
    onehot = F.one_hot(assign, n).T.to(dots.dtype)                            # [E, T]
    g = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    b = torch.zeros(n + 1, dtype=torch.float64)
    g[0, 0], b[0] = ss.sum(), ds_.sum()
    g[0, 1:] = g[1:, 0] = (sdots * onehot).sum(1)
    g[1:, 1:] = torch.diag((sq * onehot).sum(1))
    b[1:] = (dots * onehot).sum(1)
    idx = list(range(0 if has_shared else 1, n + 1))
    sub = g[idx][:, idx] + 1e-6 * torch.eye(len(idx), dtype=torch.float64) * g.diagonal()[idx].clamp_min(1e-12)
    sol = torch.linalg.solve(sub, b[idx])
    unused = g.diagonal()[1:] == 0
    alpha = _bounded(float(sol[0])) if has_shared else 1.0
    scales = (sol[1:] if has_shared else sol).clamp(0.0, MAX_SCALE)
    return alpha, torch.where(unused, torch.ones_like(scales), scales).float()


def _bounded(scale: float) -> float:
    return min(max(scale, 0.0), MAX_SCALE)


@torch.no_grad()
def fit_closed_form(runner: LayerRunner, fit: BlockData, max_tokens: int = 8192, rounds: int = 4) -> dict:
    """Scale the FFN's parts and (MoE) refit the router; returns what was fitted."""
    u, d, s = _ffn_problem(runner, fit)
    if len(u) > max_tokens:
        keep = torch.randperm(len(u), generator=torch.Generator().manual_seed(0))[:max_tokens]
        u, d, s = u[keep], d[keep], s[keep]
    if not runner.is_moe:       # a dense host (pruning): one scale on its MLP
        alpha = _bounded(float((d * s).sum() / s.pow(2).sum().clamp_min(1e-30)))
        runner.scale_mlp(alpha)
        return {"mlp_scale": round(alpha, 4)}
    mlp = runner.layer.mlp
    has_shared = hasattr(mlp, "shared_expert") and mlp.shared_expert.down_proj.weight.shape[1] > 0
    n = mlp.experts.down_proj.shape[0]
    stats = _expert_stats(runner, u, d, s)
    err = _squared_errors(stats, 1.0, torch.ones(n))
    for _ in range(rounds):
        alpha, scales = _solve_scales(stats, err.argmin(0), has_shared)
        err = _squared_errors(stats, alpha, scales)
    with torch.enable_grad():
        router = train_router(u, err.argmin(0).to(u.device), n)
    chosen = (u @ router.T).argmax(-1).cpu()
    alpha, scales = _solve_scales(stats, chosen, has_shared)
    mlp.gate.weight.copy_(router)
    mlp.experts.down_proj.mul_(scales.to(u.device)[:, None, None])
    if has_shared:
        mlp.shared_expert.down_proj.weight.mul_(alpha)
    load = torch.bincount(chosen, minlength=n).float() / len(chosen)
    return {"shared_scale": round(alpha, 4) if has_shared else None,
            "expert_scales": [round(float(c), 4) for c in scales],
            "router_load": [round(float(x), 4) for x in load],
            "router_agreement": round(float((chosen == err.argmin(0)).float().mean()), 4)}


def trainable(runner: LayerRunner, attention: bool) -> list[torch.nn.Parameter]:
    layer = runner.layer
    # The shared expert's gate stays at zero: exporters fold its constant sigmoid(0) = 0.5 into the
    # shared expert (llama.cpp has no such gate), and the shared expert's own scale learns the rest.
    gate = {id(p) for name, p in layer.mlp.named_parameters() if name.startswith("shared_expert_gate")}
    params = [p for p in runner.ffn_parameters() if id(p) not in gate]
    if attention:       # and the attention, with every norm outside the FFN branch
        ffn = {id(p) for p in runner.ffn_parameters()}
        params += [p for p in layer.parameters() if id(p) not in ffn]
    return [p for p in params if p.numel()]


def distill(runner: LayerRunner, fit: BlockData, held: BlockData, steps: int, lr: float = 1e-4,
            attention: bool = False, batch: int = 4, eval_every: int = 20, patience: int = 3,
            router_weight: float = 1.0, seed: int = 0, on_step=None) -> dict:
    """Block-wise distillation of the layer towards the dense block output; keeps the best held-out state."""
    layer = runner.layer
    params = trainable(runner, attention)
    saved = {p: p.requires_grad for p in layer.parameters()}
    for p in layer.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    scale = (fit.y - fit.x).pow(2).mean().item()
    g = torch.Generator().manual_seed(seed)
    best = relative_error(runner, held)
    best_state, since, done = copy.deepcopy(layer.state_dict()), 0, 0
    history = [(0, round(best, 5))]
    layer.train()
    try:
        for step in range(1, steps + 1):
            idx = torch.randint(len(fit.x), (min(batch, len(fit.x)),), generator=g)
            x, y = fit.x[idx], fit.y[idx]
            loss = (runner(x) - y).pow(2).mean() / scale
            if runner.is_moe and router_weight:
                loss = loss + router_weight * _router_loss(runner, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            done = step
            if on_step:
                on_step()
            if step % eval_every == 0 or step == steps:
                layer.eval()
                err = relative_error(runner, held)
                layer.train()
                history.append((step, round(err, 5)))
                if err < best - 1e-6:
                    best, best_state, since = err, copy.deepcopy(layer.state_dict()), 0
                else:
                    since += 1
                    if since >= patience:
                        break
    finally:
        layer.eval()
        layer.load_state_dict(best_state)
        for p, flag in saved.items():
            p.requires_grad_(flag)
    return {"steps": done, "lr": lr, "attention": attention, "held_out_error": history}


def _router_loss(runner: LayerRunner, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the router towards the slot whose output best completes the block."""
    with torch.no_grad():
        r = runner.attention(x)
        u = runner.ffn_input(r).reshape(-1, x.shape[-1])
        d = (y - r).reshape(-1, x.shape[-1]) - runner.shared(u)
        err = (runner.experts(u) - d[None]).pow(2).sum(-1)                   # [E, T]
    return F.cross_entropy(runner.router_logits(u), err.argmin(0)) / math.log(max(2, err.shape[0]))
