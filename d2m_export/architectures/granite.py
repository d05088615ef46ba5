"""Granite-MoE and Granite-MoE-shared: read as MoE inputs of moe2dense, made dense as Llama.

Granite is Llama with four multipliers, each folded into a weight exactly:
- `embedding_multiplier` m scales the input embeddings: into the embedding matrix;
- `attention_multiplier` a replaces 1/√head_dim: q_proj times a·√head_dim;
- `residual_multiplier` r scales each block's output before the residual add: into o_proj and the
  dense MLP's down_proj;
- `logits_scaling` s divides the logits: into the LM head, or, when it is the (scaled) embedding
  matrix, into the final norm as 1/(m·s).
The MoE block is `block_sparse_moe` (router `router`); the shared expert, `shared_mlp`, sits beside
it at weight 1, its gate and up projections stacked in `input_linear`.
"""
from __future__ import annotations

import math

from d2m_export.architectures import MoeInput, _dense_common, register


class Granite(MoeInput):
    ffn_modules = ("block_sparse_moe", "shared_mlp")

    def moe_block(self, layer):
        return layer.block_sparse_moe

    def router(self, block):
        return block.router

    def always_on(self, layer, block):
        shared = getattr(layer, "shared_mlp", None)
        if shared is None:
            return None
        gate, up = shared.input_linear.weight.chunk(2)
        return gate, up, shared.output_linear.weight

    def dense_model(self, moe_config, width, state):
        from transformers import LlamaConfig

        c = moe_config
        common = _dense_common(c, width)
        config = LlamaConfig(**common, attention_bias=c.attention_bias, mlp_bias=False)
        m, a, r, s = c.embedding_multiplier, c.attention_multiplier, c.residual_multiplier, c.logits_scaling
        q = a * math.sqrt(common["head_dim"])
        out = {}
        for k, v in state.items():
            if k == "model.embed_tokens.weight":
                v = v * m
            elif ".self_attn.q_proj." in k:
                v = v * q
            elif ".self_attn.o_proj." in k or k.endswith(".mlp.down_proj.weight"):
                v = v * r
            elif k == "lm_head.weight" and not c.tie_word_embeddings:
                v = v / s
            elif k == "model.norm.weight" and c.tie_word_embeddings:
                v = v / (m * s)
            out[k] = v
        return config, out


register(Granite("granitemoe", is_moe=True, params_from_modules=True))
register(Granite("granitemoeshared", is_moe=True, params_from_modules=True))
