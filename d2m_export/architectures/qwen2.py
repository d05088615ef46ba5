"""Qwen2 / Qwen2.5 (q/k/v biases) and Qwen2-MoE, the family Llama and Qwen2 models are converted into.

Qwen2-MoE mixes dense layers (`mlp_only_layers`) and MoE layers freely, and has a shared expert
behind a sigmoid gate: the always-on host MLP is that shared expert with a zero gate, sigmoid(0) =
0.5 undone by doubling its down_proj.
"""
from __future__ import annotations

import torch

from d2m_export.architectures import Architecture, MoeInput, _common, _dense_common, register


class Qwen2Moe(MoeInput):
    def moe_config(self, dense_config, *, num_layers, mlp_only_layers, num_experts, top_k, shared_size):
        from transformers import Qwen2MoeConfig

        from d2m_export.architectures import ARCHITECTURES
        return Qwen2MoeConfig(**_common(dense_config), num_hidden_layers=num_layers,
                              qkv_bias=ARCHITECTURES[dense_config.model_type].qkv_bias,
                              moe_intermediate_size=dense_config.intermediate_size,
                              shared_expert_intermediate_size=shared_size, num_experts=num_experts,
                              num_experts_per_tok=top_k, norm_topk_prob=True, mlp_only_layers=mlp_only_layers,
                              decoder_sparse_step=1, router_aux_loss_coef=0.01)

    def moe_mlp_state(self, experts_gate_up, experts_down, router, shared):
        h = router.shape[1]
        gate, up, down = shared if shared is not None else (torch.zeros(0, h), torch.zeros(0, h), torch.zeros(h, 0))
        return {"experts.gate_up_proj": experts_gate_up, "experts.down_proj": experts_down, "gate.weight": router,
                "shared_expert.gate_proj.weight": gate, "shared_expert.up_proj.weight": up,
                "shared_expert.down_proj.weight": down * 2.0, "shared_expert_gate.weight": torch.zeros(1, h)}

    def always_on(self, layer, block):
        sh = block.shared_expert
        return (sh.gate_proj.weight, sh.up_proj.weight, sh.down_proj.weight) if sh.gate_proj.weight.shape[0] else None

    def always_on_gate(self, block, x):
        return torch.sigmoid(block.shared_expert_gate(x.to(block.shared_expert_gate.weight.dtype))).squeeze(-1)

    def dense_model(self, moe_config, width, state):
        """Qwen2 (q/k/v biases) when the MoE has them, else Llama."""
        from transformers import LlamaConfig, Qwen2Config

        common = _dense_common(moe_config, width)
        if getattr(moe_config, "qkv_bias", False):
            return Qwen2Config(**{k: v for k, v in common.items() if k != "head_dim"}, use_sliding_window=False), state
        return LlamaConfig(**common, attention_bias=False, mlp_bias=False), state


register(Architecture("qwen2", is_moe=False, qkv_bias=True, fuses_into="qwen2_moe"))
register(Qwen2Moe("qwen2_moe", is_moe=True, qkv_bias=True))
