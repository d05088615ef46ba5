"""The decoder that `--target executorch` exports: explicit KV buffers, ExecuTorch's LLM ops, sparse MoE.

One `forward(tokens [1, T], input_pos [1]) -> logits [1, vocab]` serves prefill (T dynamic,
1..max_seq_len) and decode (T = 1), as ExecuTorch's LLM runner calls it; `input_pos` holds the
start position and the logits are those of the last position.

- Attention: each layer owns `k_cache`/`v_cache` buffers [1, max_seq_len, kv_heads, head_dim],
  written in place by `llama::update_cache` and read by `llama::custom_sdpa` (causal, bounded by
  the start position, GQA), the ops of ExecuTorch's own Llama export. RoPE tables are precomputed
  from the model's own rotary module, so every rope type transformers knows is reproduced.
  Sliding-window layers (Gemma 3) pass custom_sdpa a banded causal mask instead, [T, max_seq_len],
  built per call from the positions, and use their own RoPE table (Gemma 3's local base).
- MoE layers (Qwen2MoE: router → softmax → top-k → renormalise; shared expert gated by a sigmoid):
  `lowering="cond"` (default) lowers every distinct routed expert to its own XNNPACK delegate
  before the model is exported, then picks experts at run time with a binary tree of `cond` on the
  expert index: a decode step runs (and reads the weights of) only the k selected experts, one
  tree walk per selected slot, each adding weight × expert(x). Prefill (T > 1) runs every expert
  delegate on all tokens and mixes them with the routing weights (zero where not selected). The
  choice between the two is itself a `cond` on T == 1, so one method serves both.
  `lowering="dense"` is the fallback for comparison: all experts on every token, one-hot weights,
  lowered by the ordinary partitioner (exact, reads every expert's weights each step).

Why `torch.ops.higher_order.cond` and not `torch.cond`: the partitioner does not look inside
`cond` branches (weights there are branch operands, not constants), so the experts must already be
delegates when the model is exported. `torch.cond` traces its branches with dynamo, which cannot
trace a call into a pre-lowered delegate; the higher-order op that `torch.cond` itself emits traces
it directly. The expert index is always a branch *operand* (a captured tensor would be baked in as
a constant).
"""
from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from converters.zero_neurons import live_neurons

log = logging.getLogger(__name__)
LOWERINGS = ("cond", "dense")


def load_custom_ops() -> None:
    """Registers `llama::update_cache` / `llama::custom_sdpa` with PyTorch (and the runtime)."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401


# --------------------------------------------------------------------------------------------
# Quantization (torchao, as ExecuTorch's Llama export): dynamic int8 activations, int4/int8 weights
# --------------------------------------------------------------------------------------------
QUANT_GROUP = 32


def quantize_linears(module: nn.Module, quant: str, keep=lambda name: False) -> list[str]:
    """Quantize the nn.Linear layers of `module` in place, except those `keep(name)` names; return the
    names of those left in fp32 because the quantization does not fit them.

    8da4w: int4 weights in groups of 32 along the input dim (XNNPACK's blockwise kernels);
    8da8w: int8 weights per output channel. A linear whose input width is not a multiple of the
    group size stays fp32 under 8da4w."""
    if quant == "fp32":
        return []
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig, quantize_

    if quant == "8da4w":
        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(QUANT_GROUP))
    elif quant == "8da8w":
        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    else:
        raise ValueError(quant)
    skipped = [name for name, m in module.named_modules()
               if isinstance(m, nn.Linear) and quant == "8da4w" and m.in_features % QUANT_GROUP and not keep(name)]

    def wanted(m, name):
        return isinstance(m, nn.Linear) and name not in skipped and not keep(name)

    quantize_(module, config, filter_fn=wanted)
    return skipped


# --------------------------------------------------------------------------------------------
# Experts: each one its own XNNPACK delegate
# --------------------------------------------------------------------------------------------
class ExpertMLP(nn.Module):
    """A SwiGLU MLP as separate gate/up/down linears: a routed expert, or a dense MLP without its zero neurons."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, act):
        super().__init__()
        inter, hidden = gate_up.shape[0] // 2, gate_up.shape[1]
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        with torch.no_grad():
            self.gate_proj.weight.copy_(gate_up[:inter])
            self.up_proj.weight.copy_(gate_up[inter:])
            self.down_proj.weight.copy_(down)
        self.act = act

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def lower_to_xnnpack(module: nn.Module, hidden: int, max_tokens: int):
    """Export `module` ([T, hidden] -> [T, hidden], T dynamic) and lower all of it to one XNNPACK
    delegate; return the LoweredBackendModule."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from torch.export import Dim, export

    example = (torch.zeros(2, hidden),)
    ep = export(module, example, dynamic_shapes=({0: Dim("tokens", min=1, max=max_tokens)},), strict=False)
    gm = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).exported_program().graph_module
    lowered = [m for name, m in gm.named_children() if name.startswith("lowered_module")]
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ == "executorch_call_delegate"]
    others = [n for n in gm.graph.nodes if n.op == "call_function" and n not in calls and "getitem" not in str(n.target)]
    if len(lowered) != 1 or len(calls) != 1 or others:
        raise RuntimeError(f"an expert did not lower to exactly one XNNPACK delegate: {gm.graph}")
    return lowered[0]


def _delegate_out(lowered, x):
    out = lowered(x)
    return out[0] if isinstance(out, (tuple, list)) else out


def expert_tree(leaves: list, lo: int = 0, hi: int | None = None):
    """fn(x, idx) -> (leaves[idx](x),) as a binary tree of `cond` on the index tensor `idx`.

    `idx` travels as an operand into every branch: a tensor captured from the enclosing scope
    would be traced as a constant, which silently fixes the routing."""
    hi = len(leaves) if hi is None else hi
    if hi - lo == 1:
        lowered = leaves[lo]
        return lambda x, idx: (_delegate_out(lowered, x),)
    mid = (lo + hi) // 2
    left, right = expert_tree(leaves, lo, mid), expert_tree(leaves, mid, hi)
    return lambda x, idx: torch.ops.higher_order.cond(idx < mid, left, right, (x, idx))


class MoE(nn.Module):
    """Qwen2-MoE's / Qwen3-MoE's sparse block with the routed experts lowered as described in the module docstring."""

    def __init__(self, block, config, lowering: str, quant: str, max_tokens: int):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = bool(getattr(config, "norm_topk_prob", False))
        self.num_experts = config.num_experts
        self.hidden = config.hidden_size
        self.router = nn.Linear(self.hidden, self.num_experts, bias=False)
        with torch.no_grad():
            self.router.weight.copy_(block.gate.weight)
        shared = getattr(block, "shared_expert", None)          # Qwen3-MoE has none
        self.shared_expert = shared if shared is not None and shared.gate_proj.weight.numel() else None
        self.shared_expert_gate = block.shared_expert_gate if self.shared_expert is not None else None
        act = block.experts.act_fn
        gate_up, down = block.experts.gate_up_proj.detach(), block.experts.down_proj.detach()
        # Replicated experts (LF-UC fills N experts by repetition) share one module and one delegate.
        unique, self.expert_of = [], []
        for e in range(self.num_experts):
            same = next((u for u, (g, d) in enumerate(unique) if torch.equal(g, gate_up[e]) and torch.equal(d, down[e])),
                        None)
            if same is None:
                unique.append((gate_up[e], down[e]))
                same = len(unique) - 1
            self.expert_of.append(same)
        experts = [ExpertMLP(g.clone(), d.clone(), act).eval() for g, d in unique]
        self.lowering = lowering
        self.quant_skipped: list[str] = []
        for i, expert in enumerate(experts):
            self.quant_skipped += [f"expert{i}.{n}" for n in quantize_linears(expert, quant)]
        if lowering == "cond":
            self.delegates = [lower_to_xnnpack(e, self.hidden, max_tokens) for e in experts]
            self.experts = nn.ModuleList(self.delegates)       # keeps them in the module tree
            leaves = [self.delegates[u] for u in self.expert_of]
            self.select = expert_tree(leaves)
        elif lowering == "dense":
            self.experts = nn.ModuleList(experts)
        else:
            raise ValueError(lowering)

    def route(self, x):
        logits = self.router(x)
        probs = F.softmax(logits, dim=-1, dtype=torch.float)
        weights, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), idx

    def mix(self, weights, idx):
        """[T, E] routing weight of each expert (zero where not selected)."""
        onehot = F.one_hot(idx, self.num_experts).to(weights.dtype)       # [T, k, E]
        return (weights.unsqueeze(-1) * onehot).sum(dim=1)

    def forward(self, x):                       # x: [T, hidden]
        weights, idx = self.route(x)
        if self.lowering == "dense":
            mix = self.mix(weights, idx)
            y = sum(mix[:, e:e + 1] * self.experts[u](x) for e, u in enumerate(self.expert_of))
        else:
            y = torch.ops.higher_order.cond(x.shape[0] == 1, lambda *a: self._decode(*a), lambda *a: self._prefill(*a),
                                            (x, weights, idx))[0]
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y

    def _decode(self, x, weights, idx):
        """One token: for each of the k slots, walk the tree to the selected expert only."""
        y = None
        for j in range(self.top_k):
            part = weights[0, j] * self.select(x, idx[0, j])[0]
            y = part if y is None else y + part
        return (y,)

    def _prefill(self, x, weights, idx):
        """Many tokens: every distinct expert on all tokens, mixed by the routing weights."""
        mix = self.mix(weights, idx)
        y = None
        for u, lowered in enumerate(self.delegates):
            w = sum(mix[:, e:e + 1] for e in range(self.num_experts) if self.expert_of[e] == u)
            part = w * _delegate_out(lowered, x)
            y = part if y is None else y + part
        return (y,)


# --------------------------------------------------------------------------------------------
# Attention with a static KV cache, and the decoder
# --------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """RMSNorm whose mean of squares is a matmul with a 1/n row. XNNPACK does not take this `mean`, so
    each one would end a delegate and start another (Gemma 3 has six norms per layer); a linear joins
    the delegate around it. `weight` is the scale as applied (Gemma: 1 + w)."""

    def __init__(self, norm: nn.Module, offset: float = 0.0):
        super().__init__()
        weight = norm.weight.detach().float()
        self.weight = nn.Parameter(weight + offset, requires_grad=False)
        self.register_buffer("mean_row", torch.full((1, weight.shape[0]), 1.0 / weight.shape[0]), persistent=False)
        self.eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))

    def forward(self, x):
        return x * torch.rsqrt(F.linear(x * x, self.mean_row) + self.eps) * self.weight


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, attn, config, max_seq_len: int):
        super().__init__()
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        from d2m_export.architectures import ARCHITECTURES

        arch = ARCHITECTURES[config.model_type]
        self.q_norm = RMSNorm(attn.q_norm, arch.norm_offset) if hasattr(attn, "q_norm") else None  # Qwen3, Gemma 3
        self.k_norm = RMSNorm(attn.k_norm, arch.norm_offset) if hasattr(attn, "k_norm") else None
        self.qk_norm_full = arch.qk_norm_full     # OLMo 2: over the whole projection, before it is split in heads
        self.scale = float(attn.scaling)
        shape = (1, max_seq_len, self.kv_heads, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)

    def forward(self, x, cos, sin, start_pos: int, mask=None):
        t = x.shape[1]
        q, k = self.q_proj(x), self.k_proj(x)
        if self.qk_norm_full:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(1, t, self.heads, self.head_dim)
        k = k.view(1, t, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(1, t, self.kv_heads, self.head_dim)
        if self.q_norm is not None and not self.qk_norm_full:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        torch.ops.llama.update_cache(k, self.k_cache, start_pos)
        torch.ops.llama.update_cache(v, self.v_cache, start_pos)
        out = torch.ops.llama.custom_sdpa(q, self.k_cache, self.v_cache, start_pos, mask, 0.0, mask is None, self.scale)
        return self.o_proj(out.reshape(1, t, self.heads * self.head_dim))


def without_zero_neurons(mlp: nn.Module) -> nn.Module:
    """A dense SwiGLU MLP minus its exactly-zero neurons (moe2dense's padding); itself if it has none."""
    gate, up, down = (getattr(mlp, f"{k}_proj").weight.detach() for k in ("gate", "up", "down"))
    live = torch.from_numpy(live_neurons(gate.numpy(), up.numpy(), down.numpy()))
    if len(live) == gate.shape[0]:
        return mlp
    return ExpertMLP(torch.cat([gate[live], up[live]]), down[:, live], mlp.act_fn)


class Layer(nn.Module):
    def __init__(self, layer, config, max_seq_len, lowering, quant, layer_type=None):
        super().__init__()
        from d2m_export.architectures import ARCHITECTURES

        arch = ARCHITECTURES[config.model_type]
        identity = nn.Identity()
        off = arch.norm_offset
        self.input_layernorm = RMSNorm(getattr(layer, arch.attn_norm), off) if arch.attn_norm else identity
        self.ffn_norm = RMSNorm(getattr(layer, arch.mlp_norm), off) if arch.mlp_norm else identity
        self.attn_out_norm = RMSNorm(getattr(layer, arch.attn_out_norm), off) if arch.attn_out_norm else identity
        self.mlp_out_norm = RMSNorm(getattr(layer, arch.mlp_out_norm), off) if arch.mlp_out_norm else identity
        self.layer_type = layer_type
        self.self_attn = Attention(layer.self_attn, config, max_seq_len)
        self.is_moe = hasattr(layer.mlp, "experts")
        self.mlp = MoE(layer.mlp, config, lowering, quant, max_seq_len) if self.is_moe else without_zero_neurons(layer.mlp)

    def forward(self, x, cos, sin, start_pos, mask=None):
        x = x + self.attn_out_norm(self.self_attn(self.input_layernorm(x), cos, sin, start_pos, mask))
        h = self.ffn_norm(x)
        if self.is_moe:
            return x + self.mlp_out_norm(self.mlp(h[0]).unsqueeze(0))
        return x + self.mlp_out_norm(self.mlp(h))


class Decoder(nn.Module):
    """forward(tokens [1, T], input_pos [1]) -> logits of the last position [1, vocab].

    Consumes `hf_model`, which may be held in bf16: each layer is upcast to fp32 and quantized as it is
    taken, so that the build never holds the model twice (a 3B model is 12 GB in fp32)."""

    def __init__(self, hf_model, max_seq_len: int, lowering: str = "cond", quant: str = "fp32"):
        super().__init__()
        load_custom_ops()
        config = hf_model.config
        inner = hf_model.model
        self.max_seq_len = max_seq_len
        self.embed_tokens = inner.embed_tokens.float()
        t0 = time.time()
        from d2m_export.architectures import ARCHITECTURES, layer_types, rope_keys, rotary_cos_sin

        keys = rope_keys(config)                  # RoPE per layer type (Gemma 3)
        self.layers = nn.ModuleList()
        self.quant_skipped: list[str] = []
        for i, t in enumerate(keys):
            layer = Layer(inner.layers[i].float(), config, max_seq_len, lowering, quant, t)
            # Routers (and the shared-expert gate) stay fp32, as llama.cpp keeps them: they decide the
            # routing. Routed experts were quantized (and, with cond, lowered) on their own in MoE.
            skipped = quantize_linears(layer, quant, keep=lambda name: name.startswith(("mlp.router", "mlp.experts."))
                                       or name.endswith("shared_expert_gate"))
            self.quant_skipped += [f"layers.{i}.{n}" for n in skipped]
            self.layers.append(layer)
            inner.layers[i] = nn.Identity()       # what the layer does not share with ours (experts) goes now
        self.quant_skipped += [n for layer in self.layers if layer.is_moe for n in layer.mlp.quant_skipped]
        self.expert_lowering_s = time.time() - t0
        self.norm = RMSNorm(inner.norm, ARCHITECTURES[config.model_type].norm_offset)
        head = hf_model.lm_head
        self.lm_head = torch.nn.utils.skip_init(nn.Linear, head.in_features, head.out_features, bias=head.bias is not None)
        with torch.no_grad():                     # untied copy: quantizing the head leaves the embedding alone
            self.lm_head.weight.copy_(head.weight)
            if head.bias is not None:
                self.lm_head.bias.copy_(head.bias)
        self.quant_skipped += quantize_linears(self, quant, keep=lambda name: name.startswith("layers."))
        rotary = inner.rotary_emb.float()
        with torch.no_grad():
            positions = torch.arange(max_seq_len).unsqueeze(0)
            probe = torch.zeros(1, max_seq_len, config.hidden_size)
            for t in sorted(set(keys), key=str):
                cos, sin = rotary_cos_sin(rotary, probe, positions, t)
                suffix = f"_{t}" if t else ""
                self.register_buffer(f"rope_cos{suffix}", cos[0].float().contiguous(), persistent=False)  # [S, hd]
                self.register_buffer(f"rope_sin{suffix}", sin[0].float().contiguous(), persistent=False)
        self.sliding = [t == "sliding_attention" for t in layer_types(config)]
        self.window = int(config.sliding_window) if any(self.sliding) else None
        # Inference only: with gradients on, `cond` takes its autograd path, which cannot re-trace
        # a branch that calls a delegate while the start position is an unbacked symbol.
        self.requires_grad_(False)

    def forward(self, tokens, input_pos):
        t = tokens.shape[1]
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + t <= self.max_seq_len)
        tables = {}
        for layer in self.layers:
            if layer.layer_type not in tables:
                suffix = f"_{layer.layer_type}" if layer.layer_type else ""
                tables[layer.layer_type] = tuple(getattr(self, f"rope_{k}{suffix}").narrow(0, start, t).view(1, t, 1, -1)
                                                 for k in ("cos", "sin"))
        mask = None
        if self.window is not None:     # [t, whole cache]: 0 where query i sees key j (j <= i < j + window)
            i = torch.arange(t).unsqueeze(1) + start
            j = torch.arange(self.max_seq_len).unsqueeze(0)
            mask = torch.zeros(t, self.max_seq_len).masked_fill((j > i) | (i - j >= self.window), float("-inf"))
        x = self.embed_tokens(tokens)
        for layer, sliding in zip(self.layers, self.sliding):
            x = layer(x, *tables[layer.layer_type], start, mask if sliding else None)
        x = self.norm(x[:, -1, :])
        return self.lm_head(x)
