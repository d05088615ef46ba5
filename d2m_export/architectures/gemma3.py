"""Gemma 3 (text): per-head q/k RMSNorm, four norms per layer that scale by (1 + weight), GeGLU MLPs,
interleaved sliding-window and global layers with their own RoPE bases, embeddings scaled by √hidden.

Pruning keeps Gemma 3. No MoE class that transformers ships holds a layer-fused Gemma 3 exactly, so
LF-UC and upcycling refuse it: the Qwen MoE families lack the (1 + w) norms around the MLP and the
sliding/global layer pattern, and Gemma 4 (`gemma4_text`), the nearest, RMS-normalises the attention
values (`v_norm`) in every layer with no switch to turn that off, and makes every layer MoE or none.
"""
from d2m_export.architectures import Architecture, register

register(Architecture(
    "gemma3_text", is_moe=False, qk_norm=True, mlp_norm="pre_feedforward_layernorm", norm_offset=1.0,
    attn_out_norm="post_attention_layernorm", mlp_out_norm="post_feedforward_layernorm",
    norms_per_layer=4,
    no_fusion_reason="no MoE class in transformers holds a fused Gemma 3 exactly (Gemma 4, the nearest, "
                     "normalises attention values in every layer); use --method prune"))
