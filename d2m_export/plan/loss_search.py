"""Loss-aware planning (`--plan-search loss`, SLEB-style): grow the plan one donor layer at a time,
each time taking the layer whose removal costs least calibration loss, KL(dense ‖ candidate).

A candidate is scored as the dense model with the plan's donor layers skipped: exactly the pruned
model, and exactly a routed-host LF-UC model whose router sends every token to the host's own MLP
(where its healing starts); a shared-host LF-UC model adds a routed expert on top. Each step
reruns only the layers from the new donor on, from cached residual streams, so a step costs
about one forward pass per candidate over the later half of the model.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from d2m_export.plan import Block, Options, Plan


class PlanLoss:
    """KL to the dense model's next-token distribution with a set of layers skipped."""

    def __init__(self, dense, input_ids: torch.Tensor, batch_size: int = 4):
        self.model = dense.model
        self.head = dense.lm_head
        self.ids = input_ids.to(dense.device)
        self.batch = batch_size
        t = input_ids.shape[1]
        self.pos = torch.arange(t, device=dense.device).unsqueeze(0)
        self.mask = torch.full((t, t), float("-inf"), device=dense.device).triu(1)[None, None]
        with torch.no_grad():
            emb = self.model.embed_tokens(self.ids)
            self.pe = self.model.rotary_emb(emb[:1], self.pos)
            self.states = self._run(emb, 0, frozenset(), keep=True)    # entering each layer, dense
            self.teacher = [self._logp(self.states[-1][i:i + self.batch]) for i in range(0, len(emb), self.batch)]

    def _run(self, h: torch.Tensor, start: int, skip, keep: bool = False):
        states = [None] * start + [h] if keep else None
        for i in range(start, len(self.model.layers)):
            if i not in skip:
                h = self.model.layers[i](h, attention_mask=self.mask, position_ids=self.pos,
                                         position_embeddings=self.pe)
            if keep:
                states.append(h)
        return states if keep else h

    def _logp(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.model.norm(h)).float().log_softmax(-1)

    @torch.no_grad()
    def kl(self, skip: frozenset[int], first_change: int) -> float:
        """Mean KL per token with `skip` (a superset of the current skip set, differing from layer
        `first_change` on)."""
        total = 0.0
        for j, i in enumerate(range(0, len(self.ids), self.batch)):
            h = self._run(self.states[first_change][i:i + self.batch], first_change, skip)
            logp = self._logp(h)
            total += F.kl_div(logp, self.teacher[j], log_target=True, reduction="sum").item()
        return total / self.ids.numel()

    @torch.no_grad()
    def commit(self, skip: frozenset[int], first_change: int) -> None:
        """Make `skip` current: refresh the cached streams from `first_change` on."""
        pieces = [self._run(self.states[first_change][i:i + self.batch], first_change, skip, keep=True)
                  for i in range(0, len(self.ids), self.batch)]
        for layer in range(first_change + 1, len(self.states)):
            self.states[layer] = torch.cat([p[layer] for p in pieces])


def add_donor(plan: Plan, layer: int, max_block: int) -> Plan | None:
    """The plan with `layer` a donor too: it joins the block that ends right before it, or a new
    block hosted by the layer before it; a host that becomes a donor brings its own donors along
    (blocks merge). None when that is not possible (layer 0, a donor already, a block too long)."""
    if layer < 1 or any(layer in b.donors for b in plan.blocks):
        return None
    own = next((b for b in plan.blocks if b.host == layer), None)      # `layer` hosts a block
    before = next((b for b in plan.blocks if (b.donors[-1] if b.donors else b.host) == layer - 1), None)
    tail = [layer] + (own.donors if own else [])
    blocks = [Block(b.host, list(b.donors)) for b in plan.blocks if b is not own and b is not before]
    merged = Block(before.host, before.donors + tail) if before else Block(layer - 1, tail)
    if 1 + len(merged.donors) > max_block:
        return None
    blocks.append(merged)
    blocks.sort(key=lambda b: b.host)
    return Plan(plan.method, plan.num_layers, blocks, plan.options)


def plan_by_loss(method_name: str, num_layers: int, scorer: PlanLoss, options: Options, measure=None,
                 target: float | None = None, max_kl: float | None = None, max_block: int = 4,
                 progress: bool = True) -> tuple[Plan, dict]:
    """Greedy: until measure(plan) ≤ target (or, with max_kl, while the best step stays within it).

    A step's key is the KL it adds per unit of `measure` it saves; once a single step reaches the
    target, the lowest-KL such step is taken."""
    t0 = time.time()
    plan = Plan(method_name, num_layers, [], options)
    current_kl, steps = 0.0, []
    from tqdm import tqdm
    bar = tqdm(desc="plan search (loss)", unit="layer", disable=not progress)
    while measure is None or measure(plan) > target + 1e-9:
        now = measure(plan) if measure else 0.0
        candidates = []
        for layer in range(1, num_layers):
            new = add_donor(plan, layer, max_block)
            if new is None:
                continue
            saved = (now - measure(new)) if measure else 1.0
            if saved <= 0:
                continue
            candidates.append((layer, new, saved))
        if not candidates:
            break
        scored = [(scorer.kl(frozenset(new.donors), layer), layer, new, saved) for layer, new, saved in candidates]
        if measure is None:
            kl, layer, new, _ = min(scored, key=lambda c: c[0])
            if kl > max_kl:
                break
        else:
            closers = [c for c in scored if measure(c[2]) <= target + 1e-9]
            kl, layer, new, _ = (min(closers, key=lambda c: c[0]) if closers
                                 else min(scored, key=lambda c: (c[0] - current_kl) / c[3]))
        scorer.commit(frozenset(new.donors), layer)
        plan, current_kl = new, kl
        steps.append({"donor": layer, "kl": round(kl, 5)})
        bar.update(1)
        bar.set_postfix(layer=layer, kl=f"{kl:.3f}")
    bar.close()
    return plan, {"plan_search": "loss", "tokens": int(scorer.ids.numel()), "kl": round(current_kl, 5),
                  "steps": steps, "wall_s": round(time.time() - t0, 1)}
