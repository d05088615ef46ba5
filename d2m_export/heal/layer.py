"""One decoder layer of the converted model, run on its own: the pieces healing needs.

Works for the dense layers of Llama/Qwen2 (a pruned model's hosts) and for Qwen2-/Qwen3-MoE layers
(LF-UC hosts, upcycled layers). An explicit causal mask keeps it independent of the attention
implementation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN


class LayerRunner:
    def __init__(self, model, index: int):
        self.layer = model.model.layers[index]
        self.rotary = model.model.rotary_emb
        self.act = ACT2FN[model.config.hidden_act]
        self._masks: dict[tuple, tuple] = {}

    @property
    def is_moe(self) -> bool:
        return hasattr(self.layer.mlp, "experts")

    def _pos(self, x: torch.Tensor):
        key = (x.shape[1], x.dtype, x.device)
        if key not in self._masks:
            t = x.shape[1]
            pos = torch.arange(t, device=x.device).unsqueeze(0)
            mask = torch.full((t, t), float("-inf"), device=x.device).triu(1)[None, None].to(x.dtype)
            self._masks[key] = (pos, mask, self.rotary(x, pos))
        return self._masks[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        pos, mask, pe = self._pos(x)
        return self.layer(x, attention_mask=mask, position_ids=pos, position_embeddings=pe)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """r = x + Attn(norm(x)): the residual entering the FFN."""
        pos, mask, pe = self._pos(x)
        out, _ = self.layer.self_attn(hidden_states=self.layer.input_layernorm(x), attention_mask=mask,
                                      position_ids=pos, position_embeddings=pe)
        return x + out

    def ffn_input(self, r: torch.Tensor) -> torch.Tensor:
        return self.layer.post_attention_layernorm(r)

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
        return self.layer.mlp(u)
