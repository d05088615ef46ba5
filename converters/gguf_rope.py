"""RoPE for the gguf target: what stock llama.cpp runs exactly for each architecture, Gemma 3's fixed
layer pattern, and Llama 3's per-dimension frequency divisors (`rope_freqs.weight`). The layout they serve
is described in converters/gguf.py."""
from __future__ import annotations

import numpy as np

from d2m_export.errors import UserError

MIXED_MOE = ("step35", "hy_v3")   # architectures whose layers are each dense or MoE
GEMMA3_PATTERN = 6        # llama.cpp's gemma3: layer i is global when i % 6 == 5, else sliding
GEMMA3_LOCAL_THETA = 10000.0
SMOLLM3_NO_ROPE_STEP = 4  # llama.cpp's smollm3: layer i applies no RoPE when (i + 1) % 4 == 0
# RoPE types llama.cpp takes as per-dimension frequency divisors (`rope_freqs.weight`; longrope's short factors,
# exact within its original context), with the attention factor that scales cos and sin folded into q and k
# (`rope_attention_factor`), and the architectures here whose llama.cpp graph applies them to every layer
FREQ_FACTOR_ROPE = ("llama3", "yarn", "longrope")
FREQ_FACTOR_ARCHS = ("llama", "step35")


def check_gemma3(cfg) -> dict:
    """The global layers' RoPE parameters, after checking what llama.cpp's gemma3 fixes."""
    n = cfg.num_hidden_layers
    want = ["full_attention" if i % GEMMA3_PATTERN == GEMMA3_PATTERN - 1 else "sliding_attention" for i in range(n)]
    if list(cfg.layer_types) != want:
        differ = [i for i in range(n) if cfg.layer_types[i] != want[i]]
        raise UserError(f"llama.cpp's gemma3 makes every {GEMMA3_PATTERN}th layer global and the others sliding; "
                        f"this model's layer types differ at layers {differ[:6]} (pruning shifts them), and no "
                        "stock llama.cpp architecture takes Gemma 3 layers in another order: export it to onnx, "
                        "executorch or coreml instead")
    local = cfg.rope_parameters.get("sliding_attention", {})
    if local.get("rope_type", "default") != "default" or float(local.get("rope_theta", 0)) != GEMMA3_LOCAL_THETA:
        raise UserError(f"llama.cpp's gemma3 fixes the sliding layers' RoPE at base {GEMMA3_LOCAL_THETA:g}; "
                        f"this model's is {local}")
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "attn_logit_softcapping", None):
        raise UserError("Gemma 3 with logit soft-capping is not supported by the gguf target")
    return dict(cfg.rope_parameters["full_attention"])


def check_smollm3(no_rope_layers: list[int]) -> None:
    """llama.cpp's smollm3 applies no RoPE in every fourth layer, fixed; refuse a model whose NoPE layers
    (`no_rope_layers`: 1 where a layer applies RoPE) differ."""
    n = len(no_rope_layers)
    want = [int((i + 1) % SMOLLM3_NO_ROPE_STEP != 0) for i in range(n)]
    have = [int(bool(f)) for f in no_rope_layers]
    if have != want:
        differ = [i for i in range(n) if have[i] != want[i]]
        raise UserError(f"llama.cpp's smollm3 applies no RoPE in every {SMOLLM3_NO_ROPE_STEP}th layer and RoPE in the "
                        f"others; this model's layers differ at {differ[:6]} (pruning shifts them), and no stock "
                        "llama.cpp architecture takes NoPE layers in another order: export it to onnx, executorch or "
                        "coreml instead")


def rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def rope_supported(kind: str, arch: str) -> bool:
    return (kind == "default" or (kind == "linear" and arch not in MIXED_MOE)
            or (kind in FREQ_FACTOR_ROPE and arch in FREQ_FACTOR_ARCHS))


def check_rope(cfg, arch: str) -> dict:
    if arch == "smollm3":
        check_smollm3(cfg.no_rope_layers)
    params = check_gemma3(cfg) if arch == "gemma3" else dict(getattr(cfg, "rope_parameters", None) or {})
    kind = params.get("rope_type", "default")
    if rope_supported(kind, arch):
        return params
    raise UserError(f"RoPE type {kind!r} is not supported by the gguf target for {cfg.model_type} models")


def rope_attention_factor(cfg) -> float:
    """The factor transformers scales RoPE's cos and sin by (yarn's and longrope's attention factor), 1 for the
    others: llama.cpp applies none with `rope_freqs`, so the writer folds it into q and k (q·k by its square)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kind = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    return float(ROPE_INIT_FUNCTIONS[kind](cfg)[1]) if kind in FREQ_FACTOR_ROPE else 1.0


def rope_freq_factors(cfg) -> np.ndarray | None:
    """llama.cpp's per-dimension frequency divisors (`rope_freqs.weight`, [head_dim / 2]) for RoPE types that
    rescale each frequency on its own (llama3, yarn, longrope's short factors), else None: transformers' default
    inverse frequencies over the ones transformers' own init for this RoPE type computes, so llama.cpp's
    θ_i / f_i is transformers' frequency (llama3: a frequency kept is divided by exactly 1, a scaled one by
    exactly `factor`)."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(cfg, "rope_parameters", None) or {}
    kind = params.get("rope_type", "default")
    if kind not in FREQ_FACTOR_ROPE:
        return None
    inv_freq, _ = ROPE_INIT_FUNCTIONS[kind](cfg)
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    base = float(params["rope_theta"])
    default = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if inv_freq.shape != default.shape:
        raise UserError(f"RoPE type {kind!r} over part of the head is not supported by the gguf target yet")
    return (default / inv_freq.float()).numpy().astype(np.float32)
