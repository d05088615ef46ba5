"""Qwen3 (per-head q/k RMSNorm, no biases) and Qwen3-MoE, the family Qwen3 models are converted into.

Qwen3-MoE keeps q/k norms and mixes dense (`mlp_only_layers`) and MoE layers, but has no shared
expert. An always-on host MLP is therefore folded into every routed expert (their intermediate
widths concatenated): under renormalised top-k the selected weights sum to 1, so
Σ w_i·(E_i + H) = Σ w_i·E_i + H exactly. It costs the host's width in every expert.
"""
from __future__ import annotations

import torch

from d2m_export.architectures import Architecture, MoeInput, _common, _dense_common, register


class Qwen3Moe(MoeInput):
    def moe_config(self, dense_config, *, num_layers, mlp_only_layers, num_experts, top_k, shared_size):
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(**_common(dense_config), num_hidden_layers=num_layers, attention_bias=False,
                              moe_intermediate_size=dense_config.intermediate_size + shared_size,
                              num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=True,
                              mlp_only_layers=mlp_only_layers, decoder_sparse_step=1, router_aux_loss_coef=0.01)

    def moe_mlp_state(self, experts_gate_up, experts_down, router, shared):
        if shared is not None:
            n = experts_gate_up.shape[0]
            gate, up = experts_gate_up.chunk(2, dim=1)
            s_gate, s_up, s_down = (w.expand(n, -1, -1) for w in shared)
            experts_gate_up = torch.cat([gate, s_gate, up, s_up], dim=1)
            experts_down = torch.cat([experts_down, s_down], dim=2)
        return {"experts.gate_up_proj": experts_gate_up, "experts.down_proj": experts_down, "gate.weight": router}

    def dense_model(self, moe_config, width, state):
        from transformers import Qwen3Config

        return Qwen3Config(**_dense_common(moe_config, width), attention_bias=False, use_sliding_window=False), state


register(Architecture("qwen3", is_moe=False, qk_norm=True, fuses_into="qwen3_moe"))
register(Qwen3Moe("qwen3_moe", is_moe=True, qk_norm=True))
