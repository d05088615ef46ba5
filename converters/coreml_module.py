"""The PyTorch decoder that the Core ML exporter traces: static KV cache as state, MoE by gather.

`LoweredDecoder` wraps a transformers Llama / Qwen2 / Qwen2-MoE / Mixtral model (it reuses its
linear layers, norms' weights and embedding; nothing is copied) and rewrites the three parts that
Core ML cannot take as they are:

- **KV cache as state.** Two buffers, `key_cache` and `value_cache`, each
  [attention layers, 1, kv_heads, max_seq_len, head_dim], are written in place
  (`cache[i, :, :, past:end] = k`) and declared as `ct.StateType`s; Core ML turns the writes into
  `coreml_update_state`. The caller passes `causal_mask` [1, 1, q, end] (0 where a query may
  attend, -inf elsewhere): its last dimension says how many cache positions are filled after this
  call (`end`), the query length `q` comes from `input_ids` [1, q], so `past = end - q` needs no
  data-dependent input (Apple's recipe for stateful LLMs).
- **MoE by gathering the top-k experts' stacked weights.** Core ML has no MoE op. Per token the
  router's softmax → top-k → renormalise runs as in transformers; then the selected experts'
  rows of the stacked `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I] are gathered and
  applied with batched matmuls. Exact (the same arithmetic as transformers' expert loop, in
  another order), static shapes, and a decode step reads only k experts' weights — the point of
  the MoE on a memory-bound device. Unselected experts are never evaluated, so an overflow in one
  of them under fp16 cannot turn into NaN through `inf × 0` (the risk of a dense mask over
  experts). The price: a prefill of q tokens gathers q·k weight sets, so long prompts are best
  fed in chunks (the Swift loop in docs/runtimes/coreml.md does).
- **RMSNorm safe in fp16.** Core ML computes in fp16; residual streams of real models carry
  "massive activations" (SmolLM2-135M reaches |x| ≈ 22,500, whose square overflows fp16). The
  norm divides by max(|x|, 1) first: `x / sqrt(mean x² + ε) = x̃ / sqrt(mean x̃² + ε/m²)` with
  `x̃ = x / m` — the same function, no overflow.

Gemma 3: norms scale by (1 + w), the attention and MLP outputs are normed before their residual adds,
the query is scaled by query_pre_attn_scalar^-½ (folded into q), and sliding-window layers add a band
to the caller's causal mask (built in the model from the mask's shape: the interface is unchanged)
and use their own RoPE table.

Only the last position's logits are returned ([1, vocab]): decoding needs no more, and prefill
skips q-1 rows of the LM head.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from d2m_export.errors import UserError

INPUTS = ("input_ids", "causal_mask")
OUTPUT = "logits"
STATES = ("key_cache", "value_cache")


def check_supported(config) -> None:
    """Refuse configurations the lowering does not reproduce exactly (a config object or its dict)."""
    def get(key, default=None):
        return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)

    kind = get("model_type")
    if kind not in FAMILIES:
        raise UserError(f"the coreml target exports {', '.join(FAMILIES)} models, not {kind!r}")
    if get("use_sliding_window") or (kind != "gemma3_text" and "sliding_attention" in (get("layer_types") or [])) or (
            kind == "mixtral" and get("sliding_window")):
        raise UserError("sliding-window attention is not supported by the coreml target yet (except Gemma 3's)")
    act = get("hidden_act") or get("hidden_activation") or "silu"
    if act not in ("silu", "swish", "gelu_pytorch_tanh"):
        raise UserError(f"activation {act!r} is not supported by the coreml target yet")
    if get("attn_logit_softcapping") or get("final_logit_softcapping"):
        raise UserError("logit soft-capping is not supported by the coreml target yet")
    if get("mlp_bias"):
        raise UserError("MLP biases are not supported by the coreml target yet")


FAMILIES = ("llama", "qwen2", "qwen3", "gemma3_text", "smollm3", "olmo2", "qwen2_moe", "qwen3_moe", "mixtral")


class StableRMSNorm(nn.Module):
    def __init__(self, norm: nn.Module, offset: float = 0.0):
        super().__init__()
        self.weight = norm.weight
        self.offset = float(offset)           # Gemma scales by (1 + w)
        self.eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))

    def forward(self, x):
        m = x.abs().amax(dim=-1, keepdim=True).clamp(min=1.0)
        xs = x / m
        scale = self.weight + self.offset if self.offset else self.weight
        return scale * (xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + self.eps / (m * m)))


def with_window(mask, window: int):
    """The causal mask [1, 1, q, end] with keys `window` or more positions behind their query masked too."""
    q, end = mask.shape[-2], mask.shape[-1]
    behind = (torch.arange(q).unsqueeze(1) + (end - q)) - torch.arange(end).unsqueeze(0)
    return mask.masked_fill(behind >= window, float("-inf"))


def rotate_half(x, half: int):
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class GatherMoE(nn.Module):
    """Qwen2-MoE / Qwen3-MoE / Mixtral sparse block: router → top-k → gather the chosen experts' weights."""

    def __init__(self, block: nn.Module, config):
        super().__init__()
        self.router = block.gate.weight                       # [E, H]
        self.gate_up_proj = block.experts.gate_up_proj         # [E, 2I, H]
        self.down_proj = block.experts.down_proj               # [E, H, I]
        self.top_k = int(config.num_experts_per_tok)
        self.hidden = int(config.hidden_size)
        self.normalise = bool(getattr(config, "norm_topk_prob", True))   # Mixtral always renormalises
        shared = getattr(block, "shared_expert", None)
        self.shared = shared if shared is not None and shared.gate_proj.out_features > 0 else None
        self.shared_gate = getattr(block, "shared_expert_gate", None) if self.shared is not None else None

    @property
    def num_experts(self) -> int:
        return self.router.shape[0]

    def forward(self, x):                                      # x [T, H]
        probs = F.softmax(F.linear(x, self.router).float(), dim=-1)
        weights, index = torch.topk(probs, self.top_k, dim=-1)  # [T, k]
        if self.normalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        flat = index.reshape(-1)                               # [T*k]
        xs = x.unsqueeze(1).expand(-1, self.top_k, -1).reshape(-1, self.hidden, 1)    # [T*k, H, 1]
        gate, up = torch.bmm(self.gate_up_proj[flat], xs).squeeze(-1).chunk(2, dim=-1)
        hidden = (F.silu(gate) * up).unsqueeze(-1)             # [T*k, I, 1]
        out = torch.bmm(self.down_proj[flat], hidden).squeeze(-1)        # [T*k, H]
        out = (out.reshape(-1, self.top_k, self.hidden) * weights.unsqueeze(-1)).sum(dim=1)
        if self.shared is not None:
            out = out + torch.sigmoid(self.shared_gate(x)) * self.shared(x)
        return out


class Attention(nn.Module):
    def __init__(self, attn: nn.Module, config, index: int, offset: float = 0.0):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.q_norm = StableRMSNorm(attn.q_norm, offset) if hasattr(attn, "q_norm") else None     # Qwen3, Gemma 3
        self.k_norm = StableRMSNorm(attn.k_norm, offset) if hasattr(attn, "k_norm") else None
        from d2m_export.architectures import ARCHITECTURES

        self.qk_norm_full = ARCHITECTURES[config.model_type].qk_norm_full   # OLMo 2: before the split in heads
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # SDPA scales by 1/√head_dim; a model that scales otherwise (Gemma 3) gets the ratio on q
        self.q_scale = float(attn.scaling) * self.head_dim ** 0.5
        self.index = index

    def forward(self, x, cos, sin, mask, key_cache, value_cache):     # x [1, q, H]
        past, end = mask.shape[-1] - x.shape[1], mask.shape[-1]
        q, k = self.q_proj(x), self.k_proj(x)
        if self.qk_norm_full:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(1, -1, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(1, -1, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(1, -1, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and not self.qk_norm_full:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        half = self.head_dim // 2                              # a constant: traced sizes would become ops
        q = q * cos + rotate_half(q, half) * sin
        k = k * cos + rotate_half(k, half) * sin
        key_cache[self.index, :, :, past:end, :] = k
        value_cache[self.index, :, :, past:end, :] = v
        keys = key_cache[self.index, :, :, :end, :]            # [1, kv, end, d]
        values = value_cache[self.index, :, :, :end, :]
        groups = self.heads // self.kv_heads
        if groups > 1:
            keys = keys.unsqueeze(2).expand(-1, -1, groups, -1, -1).reshape(1, self.heads, -1, self.head_dim)
            values = values.unsqueeze(2).expand(-1, -1, groups, -1, -1).reshape(1, self.heads, -1, self.head_dim)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(1, -1, self.heads * self.head_dim))


class Layer(nn.Module):
    def __init__(self, layer: nn.Module, config, index: int, layer_type: str | None = None):
        super().__init__()
        from d2m_export.architectures import ARCHITECTURES

        arch = ARCHITECTURES[config.model_type]
        off = arch.norm_offset
        identity = nn.Identity()
        self.input_norm = StableRMSNorm(getattr(layer, arch.attn_norm), off) if arch.attn_norm else identity
        self.attn = Attention(layer.self_attn, config, index, off)
        self.post_norm = StableRMSNorm(getattr(layer, arch.mlp_norm), off) if arch.mlp_norm else identity  # MLP's input
        self.attn_out_norm = StableRMSNorm(getattr(layer, arch.attn_out_norm), off) if arch.attn_out_norm else identity
        self.mlp_out_norm = StableRMSNorm(getattr(layer, arch.mlp_out_norm), off) if arch.mlp_out_norm else identity
        self.layer_type = layer_type
        self.window = int(config.sliding_window) if layer_type == "sliding_attention" else None
        mlp = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe")
        self.moe = GatherMoE(mlp, config) if hasattr(mlp, "experts") else None
        self.mlp = None if self.moe is not None else mlp

    def forward(self, x, cos, sin, mask, key_cache, value_cache):
        if self.window is not None:
            mask = with_window(mask, self.window)
        x = x + self.attn_out_norm(self.attn(self.input_norm(x), cos, sin, mask, key_cache, value_cache))
        u = self.post_norm(x)
        if self.moe is not None:
            return x + self.mlp_out_norm(self.moe(u[0]).unsqueeze(0))
        return x + self.mlp_out_norm(self.mlp(u))


class LoweredDecoder(nn.Module):
    """input_ids [1, q] (int32), causal_mask [1, 1, q, end] → logits of the last position [1, vocab]."""

    def __init__(self, model: nn.Module, max_seq_len: int):
        super().__init__()
        config = model.config
        check_supported(config)
        self.config = config
        self.max_seq_len = int(max_seq_len)
        from d2m_export.architectures import ARCHITECTURES, layer_types, rope_keys, rotary_cos_sin

        self.embed = model.model.embed_tokens
        types = layer_types(config)
        self.layers = nn.ModuleList(Layer(layer, config, i, t) for i, (layer, t) in enumerate(zip(model.model.layers, types)))
        self.norm = StableRMSNorm(model.model.norm, ARCHITECTURES[config.model_type].norm_offset)
        self.lm_head = model.lm_head
        a = self.layers[0].attn
        shape = (len(self.layers), 1, a.kv_heads, self.max_seq_len, a.head_dim)
        self.register_buffer("key_cache", torch.zeros(shape))
        self.register_buffer("value_cache", torch.zeros(shape))
        # transformers' own rotary embedding (any RoPE type it supports), in fp32; one table per layer
        # type where RoPE is given per type (Gemma 3's local and global bases)
        self.rope_keys = rope_keys(config)
        with torch.no_grad():
            positions = torch.arange(self.max_seq_len).unsqueeze(0)
            for t in sorted(set(self.rope_keys), key=str):
                probe = torch.zeros(1, dtype=torch.float32)
                cos, sin = rotary_cos_sin(model.model.rotary_emb, probe, positions, t)
                suffix = f"_{t}" if t else ""
                self.register_buffer(f"rope_cos{suffix}", cos[0].float().clone(), persistent=False)   # [S, d]
                self.register_buffer(f"rope_sin{suffix}", sin[0].float().clone(), persistent=False)

    @property
    def moe_layers(self) -> dict[int, int]:
        """{layer index: number of experts} for every MoE layer."""
        return {i: layer.moe.num_experts for i, layer in enumerate(self.layers) if layer.moe is not None}

    def tensors_by_key(self) -> dict[str, torch.Tensor]:
        """Every parameter and constant buffer, by the name its constant gets in the Core ML program."""
        out: dict[str, torch.Tensor] = {}
        for name, t in [*self.named_parameters(), *self.named_buffers()]:
            if name not in STATES:
                out.setdefault(name.replace(".", "_"), t)
        return out

    def compressible(self) -> list[str]:
        """The weight matrices int8/int4 compress: linear, embedding and expert weights (not routers, gates,
        norms, biases or the RoPE tables)."""
        return sorted(k for k, t in self.tensors_by_key().items()
                      if isinstance(t, nn.Parameter) and t.ndim >= 2 and not k.endswith(("_router", "_shared_gate_weight")))

    def reset(self) -> None:
        with torch.no_grad():
            self.key_cache.zero_()
            self.value_cache.zero_()

    def forward(self, input_ids, causal_mask):
        q_len, end = input_ids.shape[1], causal_mask.shape[-1]
        past = end - q_len
        x = self.embed(input_ids)
        tables = {}
        for key in self.rope_keys:
            if key not in tables:
                suffix = f"_{key}" if key else ""
                tables[key] = tuple(getattr(self, f"rope_{k}{suffix}")[past:end].to(x.dtype) for k in ("cos", "sin"))
        mask = causal_mask.to(x.dtype)
        for layer, key in zip(self.layers, self.rope_keys):
            x = layer(x, *tables[key], mask, self.key_cache, self.value_cache)
        return self.lm_head(self.norm(x[:, -1, :]))


def causal_mask(past: int, q_len: int, dtype=torch.float32) -> torch.Tensor:
    """[1, 1, q, past + q]: 0 where query i (at position past + i) may attend, -inf elsewhere."""
    end = past + q_len
    allowed = torch.arange(end).unsqueeze(0) <= (past + torch.arange(q_len)).unsqueeze(1)
    return torch.zeros(q_len, end, dtype=dtype).masked_fill(~allowed, float("-inf")).view(1, 1, q_len, end)


class TorchRunner:
    """prefill/decode over a lowered module (eager or traced), for the parity check.

    The same calls a Core ML app makes: one `input_ids` chunk and its `causal_mask` per call."""

    def __init__(self, module, max_seq_len: int, reset):
        self.module, self.max_seq_len, self._reset, self.length = module, max_seq_len, reset, 0

    def _run(self, ids: list[int]):
        import numpy as np

        if self.length + len(ids) > self.max_seq_len:
            raise UserError(f"sequence of {self.length + len(ids)} tokens exceeds --max-seq-len {self.max_seq_len}")
        with torch.no_grad():
            logits = self.module(torch.tensor([ids], dtype=torch.int32), causal_mask(self.length, len(ids)))
        self.length += len(ids)
        return logits[0].float().numpy().astype(np.float32)

    def prefill(self, token_ids):
        self._reset()
        self.length = 0
        return self._run(list(token_ids))

    def decode(self, token_id):
        return self._run([int(token_id)])
