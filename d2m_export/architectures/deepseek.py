"""DeepSeek-V2 and -V3: read as MoE inputs of moe2dense. Multi-head latent attention, leading dense
layers (`first_k_dense_replace`), shared experts added at weight 1, routed weights times
`routed_scaling_factor`; V2 routes by softmax, V3 by sigmoid with a bias used only for choosing.

No other family holds MLA, so the dense model is the same family with every layer dense
(`first_k_dense_replace` = the number of layers), which transformers loads as it is.
"""
from __future__ import annotations

import copy

import torch

from d2m_export.architectures import MoeInput, register


class DeepSeek(MoeInput):
    def always_on(self, layer, block):
        sh = block.shared_experts
        if not sh.gate_proj.weight.shape[0]:
            return None
        return sh.gate_proj.weight, sh.up_proj.weight, sh.down_proj.weight

    def dense_model(self, moe_config, width, state):
        config = copy.deepcopy(moe_config)
        config.intermediate_size, config.first_k_dense_replace = width, moe_config.num_hidden_layers
        return config, state


class DeepSeekV3(DeepSeek):
    def router_probs(self, logits):
        return torch.sigmoid(logits)


register(DeepSeek("deepseek_v2", is_moe=True, params_from_modules=True))
register(DeepSeekV3("deepseek_v3", is_moe=True, params_from_modules=True))
