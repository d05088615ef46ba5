"""MoE → dense (KRAFTON "moe-to-dense", DESIGN.md §1): score experts on calibration data, keep K,
merge them into k groups, and concatenate each MoE layer into one dense SwiGLU MLP.

A SwiGLU MLP is a sum over hidden neurons, so stacking gate/up rows and down columns gives
one MLP equal to Σ_e c_e·E_e(x). Shared experts go in unscaled (times their mean gate where
they have one: Qwen2-MoE's sigmoid, exactly 0.5 for our zero-gated LF-UC hosts); routed groups
are scaled (`--scaling`) by their mean routing weight when selected (`score`, the default) or by
1/k (`uniform`, the paper's default). Layers that were dense already are zero-padded to the
common width, since dense configs have one intermediate size. How each MoE family stores its
router, experts and shared expert, and which dense family holds it, is its module in
`d2m_export.architectures`.

Scores (`--score`, per expert, over the calibration tokens): `sf` selection frequency; `cp` mean
routing weight when selected; `acp` cp × RMS of the expert's output; `do-acp` the K experts
that maximise a quality (acp) × diversity (output cosine) determinant; `pp` mean router
probability before top-k; `random` a seeded random order (a control).
Grouping when K > k (`--grouping`): `score` (each kept expert joins the most similar of the k
best, merged weighted by score), `frequency` (the same groups, merged weighted by selection
frequency), `kmeans` (k-means on the experts' flattened weights, seeded by the best expert and
then farthest points, merged as a plain mean).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from d2m_export.architectures import ARCHITECTURES, MoeInput
from d2m_export.errors import UserError
from d2m_export.methods.base import instantiate

SCORES = ("sf", "cp", "acp", "do-acp", "pp", "random")
GROUPINGS = ("score", "frequency", "kmeans")
SCALINGS = ("score", "uniform")


@dataclass
class LayerStats:
    tokens: int
    selected: torch.Tensor      # [E] tokens that picked each expert
    weight_sum: torch.Tensor    # [E] sum of its routing weight over those tokens
    sq_norm_sum: torch.Tensor   # [E] Σ_t ‖f_e(x_t)‖² over all tokens
    gram: torch.Tensor          # [E, E] Σ_t <f_i(x_t), f_j(x_t)>
    shared_gate_sum: float      # Σ_t the shared expert's gate at x_t (1 where ungated), 0 without one
    prob_sum: torch.Tensor      # [E] Σ_t softmax(router(x_t)), before top-k

    def scores(self) -> dict[str, torch.Tensor]:
        sf = self.selected / self.tokens
        cp = torch.where(self.selected > 0, self.weight_sum / self.selected.clamp_min(1), torch.zeros_like(sf))
        acp = cp * (self.sq_norm_sum / self.tokens).sqrt()
        return {"sf": sf, "cp": cp, "acp": acp, "pp": self.prob_sum / self.tokens}

    def similarity(self) -> torch.Tensor:
        d = self.gram.diagonal().clamp_min(1e-12).sqrt()
        return self.gram / (d[:, None] * d[None, :])


def _family(model) -> MoeInput | None:
    arch = ARCHITECTURES.get(model.config.model_type)
    return arch if isinstance(arch, MoeInput) else None


def moe_layers(model) -> list[int]:
    arch = _family(model)
    if arch is None:
        return []
    return [i for i, layer in enumerate(model.model.layers) if arch.moe_block(layer) is not None]


def _experts(block):
    e = block.experts
    return e.gate_up_proj.detach().float(), e.down_proj.detach().float(), e.act_fn


@torch.no_grad()
def routing_stats(model, input_ids: torch.Tensor, batch_size: int = 4, progress: bool = True) -> dict[int, LayerStats]:
    arch, layers = _family(model), moe_layers(model)
    stats: dict[int, LayerStats] = {}
    seen: dict[int, dict] = {i: {} for i in layers}
    hooks = []
    for i in layers:
        block = arch.moe_block(model.model.layers[i])
        hooks.append(block.register_forward_pre_hook(lambda m, args, i=i: seen[i].__setitem__("x", args[0])))
        hooks.append(arch.router(block).register_forward_hook(
            lambda m, args, out, i=i: seen[i].__setitem__("route", out)))
    from tqdm import tqdm
    try:
        for start in tqdm(range(0, len(input_ids), batch_size), desc="routing statistics", unit="batch",
                          disable=not progress):
            model(input_ids=input_ids[start:start + batch_size], use_cache=False)
            for i in layers:
                _accumulate(stats, i, arch, model.model.layers[i], seen[i])
    finally:
        for h in hooks:
            h.remove()
    return stats


def _accumulate(stats, i, arch: MoeInput, layer, seen):
    block = arch.moe_block(layer)
    x = seen["x"].reshape(-1, seen["x"].shape[-1]).float()
    _, weights, index = seen["route"]
    gate_up, down, act = _experts(block)
    n = gate_up.shape[0]
    outs = []
    for e in range(n):
        g, u = (x @ gate_up[e].T).chunk(2, dim=-1)
        outs.append((act(g) * u) @ down[e].T)
    f = torch.stack(outs)                                              # [E, T, H]
    chosen = torch.zeros(x.shape[0], n).scatter_(1, index, weights.float())
    shared = 0.0
    if arch.always_on(layer, block) is not None:
        gate = arch.always_on_gate(block, x)
        shared = float(gate.float().sum()) if gate is not None else float(x.shape[0])
    probs = arch.router_probs(x @ arch.router(block).weight.detach().float().T).sum(0)
    part = LayerStats(x.shape[0], (chosen > 0).sum(0).float(), chosen.sum(0), f.pow(2).sum((1, 2)),
                      torch.einsum("ith,jth->ij", f, f), shared, probs)
    if i in stats:
        s = stats[i]
        part = LayerStats(s.tokens + part.tokens, s.selected + part.selected, s.weight_sum + part.weight_sum,
                          s.sq_norm_sum + part.sq_norm_sum, s.gram + part.gram, s.shared_gate_sum + part.shared_gate_sum,
                          s.prob_sum + part.prob_sum)
    stats[i] = part


def select(stats: LayerStats, score: str, kept: int, seed: int = 0) -> tuple[list[int], torch.Tensor]:
    """Indices of the experts kept (best first) and the per-expert score used."""
    scores = stats.scores()
    if score == "random":
        s = torch.rand(len(stats.selected), generator=torch.Generator().manual_seed(seed))
        return s.argsort(descending=True)[:kept].tolist(), s
    if score in scores:
        s = scores[score]
        return s.argsort(descending=True)[:kept].tolist(), s
    # DO-ACP: quality (ACP) × diversity (cosine of outputs) kernel, greedy log-det.
    acp = scores["acp"]
    kernel = (acp[:, None] * acp[None, :]).sqrt() * stats.similarity()
    lam = float(kernel.diagonal().mean()) / kept
    chosen: list[int] = []
    for _ in range(kept):
        best, best_val = None, -float("inf")
        for e in range(len(acp)):
            if e in chosen:
                continue
            idx = chosen + [e]
            val = torch.logdet(kernel[idx][:, idx].double() + lam * torch.eye(len(idx), dtype=torch.float64))
            if val > best_val:
                best, best_val = e, float(val)
        chosen.append(best)
    return chosen, acp


def group(kept: list[int], score: torch.Tensor, similarity: torch.Tensor, groups: int) -> list[list[int]]:
    """k groups: the k best experts seed them; each other kept expert joins its most similar seed."""
    seeds = kept[:groups]
    members = {s: [s] for s in seeds}
    for e in kept[groups:]:
        members[max(seeds, key=lambda s: float(similarity[e, s]))].append(e)
    return [members[s] for s in seeds]


def kmeans_groups(kept: list[int], flat: torch.Tensor, groups: int, iters: int = 20) -> list[list[int]]:
    """k-means on the kept experts' flattened weights `flat` [E, D]. Seeds: the best expert, then each
    time the kept expert farthest from the seeds so far (near copies never seed two groups). Groups
    list their members best first, in the order of their best member."""
    points = flat[kept]
    seeds = [0]
    while len(seeds) < groups:
        seeds.append(int(torch.cdist(points, points[seeds]).min(1).values.argmax()))
    centres = points[seeds].clone()
    for _ in range(iters):
        dist = torch.cdist(points, centres)
        assign = dist.argmin(1)
        for g in range(groups):
            if not (assign == g).any():       # an emptied group takes the point worst served by its own
                far = int(dist.gather(1, assign[:, None]).squeeze(1).argmax())
                assign[far] = g
        centres = torch.stack([points[assign == g].mean(0) for g in range(groups)])
    members = [[e for e, a in zip(kept, assign.tolist()) if a == g] for g in range(groups)]
    return sorted(members, key=lambda m: kept.index(m[0]))


def merge_weights(members: list[int], stats: LayerStats, score: torch.Tensor, grouping: str) -> list[float]:
    """How a group's members are averaged: by score, by selection frequency, or plainly (k-means)."""
    if grouping == "kmeans":
        return [1.0 / len(members)] * len(members)
    w = (stats.scores()["sf"] if grouping == "frequency" else score)[members].clamp_min(1e-12)
    return (w / w.sum()).tolist()


def validate(model, kept: int, groups: int, score: str, grouping: str = "score", scaling: str = "score") -> None:
    if score not in SCORES:
        raise UserError(f"--score must be one of {', '.join(SCORES)}, not {score!r}")
    if grouping not in GROUPINGS:
        raise UserError(f"--grouping must be one of {', '.join(GROUPINGS)}, not {grouping!r}")
    if scaling not in SCALINGS:
        raise UserError(f"--scaling must be one of {', '.join(SCALINGS)}, not {scaling!r}")
    layers = moe_layers(model)
    if not layers:
        raise UserError("moe2dense needs a Mixture-of-Experts model; this one has no MoE layers")
    n = _family(model).moe_block(model.model.layers[layers[0]]).experts.gate_up_proj.shape[0]
    if not 1 <= kept <= n:
        raise UserError(f"--experts-kept {kept} must be between 1 and the {n} experts per layer")
    if not 1 <= groups <= kept:
        raise UserError(f"--groups {groups} must be between 1 and --experts-kept {kept}")


def convert(model, stats: dict[int, LayerStats], kept: int, groups: int, score: str, grouping: str = "score",
            scaling: str = "score"):
    """Returns (dense model, record of scores/selection per layer)."""
    validate(model, kept, groups, score, grouping, scaling)
    arch = _family(model)
    ffn = tuple(f".{m}." for m in arch.ffn_modules)
    state = {k: v for k, v in model.state_dict().items() if not any(m in k for m in ffn)}
    mlps, record = {}, {}
    for i, layer in enumerate(model.model.layers):
        if i not in stats:
            mlps[i] = [arch.dense_mlp(layer)]
            continue
        block, st = arch.moe_block(layer), stats[i]
        chosen, s = select(st, score, kept, seed=i)
        gate_up, down, _ = _experts(block)
        if grouping == "kmeans":
            grouped = kmeans_groups(chosen, torch.cat([gate_up.flatten(1), down.flatten(1)], 1), groups)
        else:
            grouped = group(chosen, s, st.similarity(), groups)
        cp = st.scores()["cp"]
        parts = []
        shared = arch.always_on(layer, block)
        if shared is not None:
            gate, up, dn = shared
            parts.append((gate, up, dn * (st.shared_gate_sum / st.tokens)))
        half = gate_up.shape[1] // 2
        for members in grouped:
            w = merge_weights(members, st, s, grouping)
            gu = sum(wi * gate_up[e] for wi, e in zip(w, members))
            dn = sum(wi * down[e] for wi, e in zip(w, members))
            scale = 1.0 / len(grouped) if scaling == "uniform" else float(sum(wi * cp[e] for wi, e in zip(w, members)))
            parts.append((gu[:half], gu[half:], dn * scale))
        mlps[i] = parts
        record[i] = {"scores": {k: [round(float(x), 6) for x in v] for k, v in st.scores().items()},
                     "kept": chosen, "groups": grouped}
    width = max(sum(p[0].shape[0] for p in parts) for parts in mlps.values())
    for i, parts in mlps.items():
        g = torch.cat([p[0] for p in parts])
        u = torch.cat([p[1] for p in parts])
        d = torch.cat([p[2] for p in parts], dim=1)
        pad = width - g.shape[0]           # zero neurons: silu(0)·0 = 0, exact
        state[f"model.layers.{i}.mlp.gate_proj.weight"] = torch.cat([g, g.new_zeros(pad, g.shape[1])])
        state[f"model.layers.{i}.mlp.up_proj.weight"] = torch.cat([u, u.new_zeros(pad, u.shape[1])])
        state[f"model.layers.{i}.mlp.down_proj.weight"] = torch.cat([d, d.new_zeros(d.shape[0], pad)], dim=1)
        if pad:
            record.setdefault(i, {})["zero_padding"] = pad
    dense = instantiate(*arch.dense_model(model.config, width, state))
    return dense, record
