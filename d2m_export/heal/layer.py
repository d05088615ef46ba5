"""One decoder layer of the converted model, run on its own: the pieces healing needs.

Works for the dense layers of Llama/Qwen2/Qwen3/Gemma 3 (a pruned model's hosts) and for Qwen2-/Qwen3-MoE
layers (LF-UC hosts, upcycled layers). An explicit causal mask (banded on sliding-window layers) keeps it
independent of the attention implementation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from d2m_export.architectures import ARCHITECTURES, layer_types, rope_keys, rotary_cos_sin


class LayerRunner:
    def __init__(self, model, index: int):
        config = model.config
        self.arch = ARCHITECTURES[config.model_type]
        self.layer = model.model.layers[index]
        self.rotary = model.model.rotary_emb
        self.act = ACT2FN[getattr(config, "hidden_act", None) or config.hidden_activation]
        self.layer_type = rope_keys(config)[index]
        self.window = config.sliding_window if layer_types(config)[index] == "sliding_attention" else None
        self._masks: dict[tuple, tuple] = {}

    def _norm(self, name: str | None, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.layer, name)(x) if name else x

    @property
    def is_moe(self) -> bool:
        return hasattr(self.layer.mlp, "experts")

    def _pos(self, x: torch.Tensor):
        key = (x.shape[1], x.dtype, x.device)
        if key not in self._masks:
            t = x.shape[1]
            pos = torch.arange(t, device=x.device).unsqueeze(0)
            blocked = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
            if self.window:     # token i sees the `window` tokens ending at i
                blocked |= torch.ones_like(blocked).tril(-self.window)
            mask = torch.zeros(t, t, device=x.device).masked_fill(blocked, float("-inf"))[None, None].to(x.dtype)
            pe = rotary_cos_sin(self.rotary, x, pos, self.layer_type)
            self._masks[key] = (pos, mask, pe)
        return self._masks[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        pos, mask, pe = self._pos(x)
        return self.layer(x, attention_mask=mask, position_ids=pos, position_embeddings=pe)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """r = x + Attn(norm(x)): the residual entering the FFN."""
        pos, mask, pe = self._pos(x)
        out, _ = self.layer.self_attn(hidden_states=self._norm(self.arch.attn_norm, x), attention_mask=mask,
                                      position_ids=pos, position_embeddings=pe)
        return x + self._norm(self.arch.attn_out_norm, out)

    def ffn_input(self, r: torch.Tensor) -> torch.Tensor:
        return self._norm(self.arch.mlp_norm, r)

    def ffn_parameters(self) -> list[torch.nn.Parameter]:
        """What the FFN branch owns: its MLP and the norm on the MLP's output, if the family has one."""
        out_norm = [getattr(self.layer, self.arch.mlp_out_norm).weight] if self.arch.mlp_out_norm else []
        return list(self.layer.mlp.parameters()) + out_norm

    # --- MoE pieces (Qwen2-MoE layout) ---------------------------------------------------

    def shared(self, u: torch.Tensor) -> torch.Tensor:
        """The always-on part: the shared expert behind its sigmoid gate (zero when it has no width)."""
        mlp = self.layer.mlp
        if not hasattr(mlp, "shared_expert") or mlp.shared_expert.down_proj.weight.shape[1] == 0:
            return torch.zeros_like(u)
        return torch.sigmoid(mlp.shared_expert_gate(u)) * mlp.shared_expert(u)

    def experts(self, u: torch.Tensor) -> torch.Tensor:
        """Every routed expert's output at routing weight 1: [E, tokens, H]."""
        e = self.layer.mlp.experts
        gate, up = torch.einsum("th,eih->eti", u, e.gate_up_proj).chunk(2, dim=-1)
        return torch.einsum("eti,ehi->eth", self.act(gate) * up, e.down_proj)

    def router_logits(self, u: torch.Tensor) -> torch.Tensor:
        return F.linear(u, self.layer.mlp.gate.weight)

    def routed_choice(self, u: torch.Tensor) -> torch.Tensor:
        """The slot top-1 routing picks (top-k > 1 is fitted on its first choice)."""
        return self.router_logits(u).argmax(-1)

    # --- dense MLP ----------------------------------------------------------------------

    def mlp(self, u: torch.Tensor) -> torch.Tensor:
        """The FFN branch's output, added to the residual (after the output norm, if any)."""
        return self._norm(self.arch.mlp_out_norm, self.layer.mlp(u))

    @torch.no_grad()
    def scale_mlp(self, alpha: float) -> None:
        """Multiply the FFN branch's output by `alpha`: through its output norm's scale where there is
        one ((offset + w) → α·(offset + w)), else through the down projection."""
        if self.arch.mlp_out_norm:
            w = getattr(self.layer, self.arch.mlp_out_norm).weight
            w.copy_(alpha * (w + self.arch.norm_offset) - self.arch.norm_offset)
        else:
            self.layer.mlp.down_proj.weight.mul_(alpha)
