"""SmolLM3 (`smollm3`): Llama whose every fourth layer applies no RoPE (NoPE; `no_rope_layers`, 0 there).

Every stage reads it as itself; the export targets give a NoPE layer the identity table (cos 1, sin 0,
`architectures.NO_ROPE`), and llama.cpp's own `smollm3` fixes the NoPE layers at every fourth. No
Mixture-of-Experts class transformers ships has layers without RoPE, so LF-UC and upcycling refuse it;
pruning keeps the family (and each kept layer's RoPE or NoPE).
"""
from d2m_export.architectures import Architecture, register

register(Architecture(
    "smollm3", is_moe=False,
    no_fusion_reason="no Mixture-of-Experts class transformers ships holds SmolLM3's layers without RoPE (every "
                     "fourth): Qwen2-MoE and Qwen3-MoE apply RoPE in every layer; prune keeps SmolLM3"))
