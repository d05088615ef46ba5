"""Granite 3.x dense (`granite`), read as Llama; Granite-MoE and Granite-MoE-shared, read as MoE inputs of
moe2dense and made dense as Llama.

Granite is Llama with four multipliers, each folded into a weight exactly (`fold_multipliers`):
- `embedding_multiplier` m scales the input embeddings: into the embedding matrix;
- `attention_multiplier` a replaces 1/√head_dim: q_proj times a·√head_dim;
- `residual_multiplier` r scales each block's output before the residual add: into o_proj and the
  dense MLP's down_proj;
- `logits_scaling` s divides the logits: into the LM head, or, when it is the (scaled) embedding
  matrix, into the final norm as 1/(m·s).
Each product is computed in fp32 and stored in the weight's dtype: equal to Granite's logits at fp32
rounding for fp32 weights; a bf16 checkpoint's folded weights are rounded to bf16 once.
The MoE block is `block_sparse_moe` (router `router`); the shared expert, `shared_mlp`, sits beside it at
weight 1, its gate and up projections stacked in `input_linear`.
"""
from __future__ import annotations

import math

import torch

from d2m_export.architectures import MoeInput, ReadAs, _dense_common, register

MULTIPLIERS = ("embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling")


def fold_multipliers(config, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Tensor `name` of a Granite(-MoE) model with its share of the multipliers folded in, in its own dtype:
    the same tensor of the Llama that computes what the Granite model computes."""
    c = config
    m, s = c.embedding_multiplier, c.logits_scaling
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    factor = 1.0
    if name == "model.embed_tokens.weight":
        factor = m
    elif ".self_attn.q_proj." in name:
        factor = c.attention_multiplier * math.sqrt(head_dim)
    elif ".self_attn.o_proj." in name or ".mlp.down_proj." in name:
        factor = c.residual_multiplier
    elif name == "lm_head.weight" and not c.tie_word_embeddings:
        factor = 1.0 / s
    elif name == "model.norm.weight" and c.tie_word_embeddings:
        factor = 1.0 / (m * s)
    return tensor if factor == 1.0 else (tensor.float() * factor).to(tensor.dtype)


class GraniteDense(ReadAs):
    def view_config(self, config):
        d = {k: v for k, v in config.to_dict().items()
             if k not in (*MULTIPLIERS, "architectures", "model_type", "transformers_version")}
        return {**d, "model_type": "llama", "head_dim": config.hidden_size // config.num_attention_heads}

    def folds_weights(self, config):
        return True

    def view_tensor(self, config, name, tensor):
        return fold_multipliers(config, name, tensor)


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

        config = LlamaConfig(**_dense_common(moe_config, width), attention_bias=moe_config.attention_bias,
                             mlp_bias=False)
        return config, {k: fold_multipliers(moe_config, k, v) for k, v in state.items()}


register(GraniteDense("granite", is_moe=False, fuses_into="qwen2_moe", reads_as="llama"))
register(Granite("granitemoe", is_moe=True, params_from_modules=True))
register(Granite("granitemoeshared", is_moe=True, params_from_modules=True))
