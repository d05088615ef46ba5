"""OLMoE: read as an MoE input of moe2dense (every layer MoE, softmax top-k, no shared expert).

No dense family holds OLMoE's attention: its q/k RMSNorms span all heads at once (OLMo 2 has
those, but normalises after attention and MLP instead of before). The dense model is therefore
OLMoE itself with one expert per layer: the router's softmax over a single expert is 1, so the
layer is exactly that expert, a dense MLP.
"""
from __future__ import annotations

import copy

import torch

from d2m_export.architectures import MoeInput, register


class Olmoe(MoeInput):
    def dense_model(self, moe_config, width, state):
        config = copy.deepcopy(moe_config)
        config.intermediate_size, config.num_experts, config.num_experts_per_tok = width, 1, 1
        out = {k: v for k, v in state.items() if ".mlp." not in k}
        for i in range(config.num_hidden_layers):
            mlp = f"model.layers.{i}.mlp."
            gate, up, down = (state[mlp + f"{n}_proj.weight"] for n in ("gate", "up", "down"))
            out[mlp + "experts.gate_up_proj"] = torch.cat([gate, up])[None]
            out[mlp + "experts.down_proj"] = down[None]
            out[mlp + "gate.weight"] = gate.new_zeros(1, gate.shape[1])
        return config, out


register(Olmoe("olmoe", is_moe=True, params_from_modules=True))
