"""Parameter counts per decode step, read off a config: what the roofline and the planner use.

"Active" means the weights one decode token reads: every attention and norm, the LM head,
dense MLPs, and for MoE layers the router, the shared expert and `top_k` routed experts.
An untied input embedding costs one row per token.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from d2m_export.architectures import ARCHITECTURES


@dataclass(frozen=True)
class ParamCounts:
    active: int
    total: int


def _get(cfg, key, default=None):
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


def param_counts(cfg) -> ParamCounts:
    arch = ARCHITECTURES.get(_get(cfg, "model_type"))
    if arch is not None and arch.params_from_modules:
        return _counts_from_modules(cfg)
    h = _get(cfg, "hidden_size")
    heads, kv = _get(cfg, "num_attention_heads"), _get(cfg, "num_key_value_heads") or _get(cfg, "num_attention_heads")
    hd = _get(cfg, "head_dim") or h // heads
    model_type = _get(cfg, "model_type")
    qkv_bias = model_type == "qwen2" or (model_type == "qwen2_moe" and _get(cfg, "qkv_bias", True))
    qk_norm = 2 * hd if arch is not None and arch.qk_norm else 0
    norms = (arch.norms_per_layer if arch is not None else 2) * h
    attn = h * heads * hd * 2 + h * kv * hd * 2 + (heads * hd + 2 * kv * hd if qkv_bias else 0) + qk_norm
    layers = _get(cfg, "num_hidden_layers")
    num_experts = _get(cfg, "num_experts", 0) or 0
    moe_layers = set()
    if model_type in ("qwen2_moe", "qwen3_moe") and num_experts:
        step = _get(cfg, "decoder_sparse_step", 1)
        skip = set(_get(cfg, "mlp_only_layers", None) or [])
        moe_layers = {i for i in range(layers) if i not in skip and (i + 1) % step == 0}
    active = total = 0
    for i in range(layers):
        active += attn + norms
        total += attn + norms
        if i in moe_layers:
            shared = 3 * h * _get(cfg, "shared_expert_intermediate_size", 0) + (h if model_type == "qwen2_moe" else 0)
            expert = 3 * h * _get(cfg, "moe_intermediate_size")
            router = num_experts * h
            active += router + shared + _get(cfg, "num_experts_per_tok") * expert
            total += router + shared + num_experts * expert
        else:
            mlp = 3 * h * _get(cfg, "intermediate_size")
            active += mlp
            total += mlp
    vocab = _get(cfg, "vocab_size")
    head = vocab * h + h                      # LM head + final norm
    embed_total = 0 if _get(cfg, "tie_word_embeddings", False) else vocab * h
    embed_active = 0 if _get(cfg, "tie_word_embeddings", False) else h
    return ParamCounts(active=active + head + embed_active, total=total + head + embed_total)


def _counts_from_modules(cfg) -> ParamCounts:
    """Counts off the model built on the meta device (no memory): every parameter once, less the
    untied embedding's unread rows and, per MoE layer, the experts a token does not use."""
    import json

    from transformers import PretrainedConfig

    key = json.dumps(cfg.to_dict() if isinstance(cfg, PretrainedConfig) else cfg, sort_keys=True, default=str)
    return _meta_counts(key)


@functools.lru_cache(maxsize=32)
def _meta_counts(config_json: str) -> ParamCounts:
    import json

    from transformers import AutoConfig

    from d2m_export.sources.models import meta_model

    fields = json.loads(config_json)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    model = meta_model(config)
    total = sum(p.numel() for p in model.parameters())
    active = total
    if not config.tie_word_embeddings:
        active -= (config.vocab_size - 1) * config.hidden_size
    for module in model.modules():
        experts = getattr(module, "experts", None)
        if experts is not None and hasattr(experts, "gate_up_proj"):
            n = experts.gate_up_proj.shape[0]
            per_expert = (experts.gate_up_proj.numel() + experts.down_proj.numel()) // n
            active -= (n - min(config.num_experts_per_tok, n)) * per_expert
    return ParamCounts(active=active, total=total)
