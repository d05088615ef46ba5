"""The tensors of a GGUF file for llama.cpp: HF names -> GGUF names and layouts, each tensor's GGML type,
and the identity layer step35 gets with llama3 RoPE (all described in converters/gguf.py)."""
from __future__ import annotations

import gguf
import numpy as np

from converters.gguf_rope import rope_attention_factor, rope_freq_factors
from d2m_export.errors import UserError

Q = gguf.GGMLQuantizationType
T = gguf.MODEL_TENSOR
QTYPES = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}

# HF name inside a layer -> GGUF tensor (one table owns the mapping)
LAYER_TENSORS = {
    "input_layernorm": T.ATTN_NORM, "post_attention_layernorm": T.FFN_NORM,
    "self_attn.q_proj": T.ATTN_Q, "self_attn.k_proj": T.ATTN_K, "self_attn.v_proj": T.ATTN_V,
    "self_attn.o_proj": T.ATTN_OUT, "self_attn.q_norm": T.ATTN_Q_NORM, "self_attn.k_norm": T.ATTN_K_NORM,
    "mlp.gate_proj": T.FFN_GATE, "mlp.up_proj": T.FFN_UP, "mlp.down_proj": T.FFN_DOWN,
    "mlp.gate": T.FFN_GATE_INP,
    "mlp.shared_expert.gate_proj": T.FFN_GATE_SHEXP, "mlp.shared_expert.up_proj": T.FFN_UP_SHEXP,
    "mlp.shared_expert.down_proj": T.FFN_DOWN_SHEXP,
}
# Gemma 3 norms around attention and MLP (where Llama's post-attention norm is the MLP's input norm)
GEMMA3_NORMS = {"post_attention_layernorm": T.ATTN_POST_NORM, "pre_feedforward_layernorm": T.FFN_NORM,
                "post_feedforward_layernorm": T.FFN_POST_NORM}
# OLMo 2 norms on the attention and MLP outputs (it has none on their inputs)
OLMO2_NORMS = {"post_attention_layernorm": T.ATTN_POST_NORM, "post_feedforward_layernorm": T.FFN_POST_NORM}
OUTPUT_NORMS = {"gemma3": GEMMA3_NORMS, "olmo2": OLMO2_NORMS}
REQUIRES_OUTPUT = ("step35", "olmo2")   # llama.cpp architectures whose loader needs output.weight (no tied fallback)
GLOBAL_TENSORS = {"model.embed_tokens": T.TOKEN_EMBD, "model.norm": T.OUTPUT_NORM, "lm_head": T.OUTPUT}


def tname(kind, bid: int | None = None, suffix: str = ".weight") -> str:
    return gguf.TENSOR_NAMES[kind].format(bid=bid) + suffix


def tensor_type(name: str, shape: tuple[int, ...], quant: str, head: str) -> tuple[Q, str | None]:
    """The GGML type of one tensor (numpy shape), and why it differs from `quant`, if it does.

    As llama.cpp's converter: 1-D tensors, norms, biases and the router stay f32. For q4_0 the
    output head (`head`) is kept at q8_0, as llama.cpp's quantizer keeps it above 4 bits. Block
    types need rows that are a multiple of 32 values; other tensors fall back to f16."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name or not name.endswith(".weight"):
        return Q.F32, None
    want, why = QTYPES[quant], None
    if quant == "q4_0" and name == head:
        want, why = Q.Q8_0, "output head kept at q8_0"
    if want in (Q.Q8_0, Q.Q4_0) and shape[-1] % gguf.GGML_QUANT_SIZES[want][0]:
        return Q.F16, f"row size {shape[-1]} is not a multiple of {gguf.GGML_QUANT_SIZES[want][0]}"
    return want, why


def stored_layout(shape: tuple[int, ...], qtype: Q) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, numpy dtype, bytes) of a tensor of `shape` once quantized to `qtype`, as the GGUF
    writer's tensor info takes it: block types as uint8 rows of blocks."""
    if qtype == Q.F32:
        return shape, np.dtype(np.float32), 4 * int(np.prod(shape))
    if qtype == Q.F16:
        return shape, np.dtype(np.float16), 2 * int(np.prod(shape))
    byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))


def quantize_in_rows(data: np.ndarray, qtype: Q, chunk_bytes: int = 64 << 20) -> np.ndarray:
    """gguf-py's quantization, a block of rows at a time: its numpy temporaries are several times the
    tensor, and a 150k-row embedding would cost gigabytes at once. Blocks never span rows, so the
    bytes are the same."""
    if qtype == Q.F32:
        return data
    rows = data.reshape(-1, data.shape[-1])
    step = max(1, chunk_bytes // (4 * rows.shape[1]))
    parts = [gguf.quants.quantize(rows[i:i + step], qtype) for i in range(0, len(rows), step)]
    return np.concatenate(parts).reshape(*data.shape[:-1], parts[0].shape[-1])


ROTATE_PAIRS = ("llama", "smollm3")      # llama.cpp architectures that rotate adjacent elements (its NORM RoPE)


def rope_rows_to_pairs(w: np.ndarray, heads: int) -> np.ndarray:
    """Llama q/k rows: HF's rotate-half order (first half, second half of each head) -> llama.cpp's
    interleaved pairs (its `llama` architecture rotates adjacent elements)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def layer_tensors(state: dict, cfg, arch: str):
    """(GGUF name, array) for every layer tensor, experts split and shared expert folded."""
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    table = {**LAYER_TENSORS, **OUTPUT_NORMS.get(arch, {})}
    attention = rope_attention_factor(cfg)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        # RoPE's attention factor goes where q and k are last scaled before RoPE: their norms, else projections
        scaled = (("self_attn.q_norm", "self_attn.k_norm") if p + "self_attn.q_norm.weight" in state
                  else ("self_attn.q_proj", "self_attn.k_proj")) if attention != 1.0 else ()
        for hf, kind in table.items():
            for suffix in (".weight", ".bias"):
                w = state.get(p + hf + suffix)
                if w is None:
                    continue
                if hf in scaled:
                    w = w * np.float32(attention)
                if arch in ROTATE_PAIRS and hf in ("self_attn.q_proj", "self_attn.k_proj"):
                    w = rope_rows_to_pairs(w, heads if hf.endswith("q_proj") else kv_heads)
                if arch == "gemma3" and hf == "self_attn.q_norm":
                    w = w * gemma3_query_fold(cfg)
                if hf == "mlp.shared_expert.down_proj":
                    w = w * _shared_gate_scale(state, p)
                if hf.startswith("mlp.shared_expert.") and w.size == 0:   # routed host: zero width-1 expert
                    w = np.zeros((1, w.shape[1]) if w.shape[0] == 0 else (w.shape[0], 1), np.float32)
                yield tname(kind, i, suffix), w
        if p + "mlp.gate.weight" in state and p + "mlp.shared_expert.down_proj.weight" not in state:
            h = state[p + "mlp.gate.weight"].shape[1]          # Qwen3-MoE has no shared expert: see 5. in gguf.py
            yield tname(T.FFN_GATE_SHEXP, i), np.zeros((1, h), np.float32)
            yield tname(T.FFN_UP_SHEXP, i), np.zeros((1, h), np.float32)
            yield tname(T.FFN_DOWN_SHEXP, i), np.zeros((h, 1), np.float32)
        if p + "mlp.experts.gate_up_proj" in state:
            gate_up = p + "mlp.experts.gate_up_proj"
            n_ff = state.shape(gate_up)[1] // 2                   # [E, 2I, H]: gate rows, then up rows
            yield tname(T.FFN_GATE_EXP, i), state.part(gate_up, (slice(None), slice(None, n_ff)))
            yield tname(T.FFN_UP_EXP, i), state.part(gate_up, (slice(None), slice(n_ff, None)))
            yield tname(T.FFN_DOWN_EXP, i), state[p + "mlp.experts.down_proj"]   # [E, H, I]


def _shared_gate_scale(state: dict, prefix: str) -> float:
    gate = state.get(prefix + "mlp.shared_expert_gate.weight")
    if gate is None:
        return 1.0
    if np.any(gate != 0):
        raise UserError(f"{prefix}mlp.shared_expert_gate is not zero: an input-dependent shared-expert gate "
                        "has no stock llama.cpp equivalent in a mixed dense/MoE model")
    return 0.5                                                    # sigmoid(0)


def all_tensors(state: dict, cfg, arch: str):
    for hf, kind in GLOBAL_TENSORS.items():
        w = state.get(hf + ".weight")
        if kind == T.OUTPUT and cfg.tie_word_embeddings:
            if arch not in REQUIRES_OUTPUT:
                continue                                          # the others fall back to token_embd
            w = state["model.embed_tokens.weight"]
        if w is not None:
            yield tname(kind), w
    factors = rope_freq_factors(cfg)
    if factors is not None:
        yield tname(T.ROPE_FREQS), factors
    yield from layer_tensors(state, cfg, arch)
    if identity_swa_layer(cfg, arch):
        yield from identity_layer_tensors(cfg, cfg.num_hidden_layers)


def identity_swa_layer(cfg, arch: str) -> bool:
    """Whether a step35 file gets an appended identity layer as its SWA-flagged layer (see gguf.py):
    when RoPE needs per-dimension divisors, which step35 does not apply to SWA layers."""
    return arch == "step35" and rope_freq_factors(cfg) is not None


def identity_layer_tensors(cfg, i: int):
    """Layer `i`, adding exactly 0: one head, zero norms and attention output, no FFN weights."""
    h = cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    zeros = {T.ATTN_NORM: (h,), T.ATTN_Q: (head_dim, h), T.ATTN_K: (head_dim, h), T.ATTN_V: (head_dim, h),
             T.ATTN_OUT: (h, head_dim), T.FFN_NORM: (h,)}
    for kind, shape in zeros.items():
        yield tname(kind, i), np.zeros(shape, np.float32)


def gemma3_query_fold(cfg) -> float:
    """What the q norm is multiplied by so that llama.cpp's fixed softmax scale gives transformers'
    query_pre_attn_scalar^-½ (RoPE rotates, so a scale on q commutes with it)."""
    head_dim = cfg.head_dim
    fixed = (cfg.hidden_size / cfg.num_attention_heads) ** -0.5 if cfg.num_hidden_layers == 62 else head_dim ** -0.5
    return float(cfg.query_pre_attn_scalar ** -0.5 / fixed)       # llama.cpp reads 62 layers as the 27B
