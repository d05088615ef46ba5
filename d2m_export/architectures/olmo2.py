"""OLMo 2 (`olmo2`): norms on the outputs of attention and MLP, before each residual add, and none on
their inputs; RMSNorm on q and k over the whole projection (every head at once), before RoPE.

Every stage reads it as itself. No Mixture-of-Experts class transformers ships has that layout (FlexOlmo,
the nearest, has no dense layers), so LF-UC and upcycling refuse it; pruning keeps the family.
"""
from d2m_export.architectures import Architecture, register

register(Architecture(
    "olmo2", is_moe=False, qk_norm=True, qk_norm_full=True, attn_norm=None, mlp_norm=None,
    attn_out_norm="post_attention_layernorm", mlp_out_norm="post_feedforward_layernorm", params_from_modules=True,
    no_fusion_reason="no Mixture-of-Experts class transformers ships mixes dense layers with MoE ones in OLMo 2's "
                     "layout (norms on the attention and MLP outputs only, q/k norms over the whole projection); "
                     "prune keeps OLMo 2"))
