"""A decoder-only LM as an ONNX graph, built node by node from a transformers state dict.

One graph serves prefill and decode. Its interface is optimum's (`input_ids`, `attention_mask`,
`position_ids`, `past_key_values.N.key/value` -> `logits`, `present.N.key/value`, caches in
BNSH layout), and every operator has an ONNX Runtime CPU kernel:

- attention is `com.microsoft.GroupQueryAttention` (rotary inside, causal, grouped KV heads). It
  also accepts one preallocated cache buffer bound as both `past_key_values.N.*` and
  `present.N.*`: the new keys are written in place, nothing is concatenated or copied per step.
  Then `attention_mask` is as long as the valid sequence (past + new), not as the buffer;
- an MoE layer is one `com.microsoft.MoE` (fp32) or `QMoE` node (`moe_lowering="sparse"`, the
  default): the kernel takes the raw router logits, does softmax -> top-k -> renormalise, and runs
  only the selected experts. `moe_lowering="switch"` puts each distinct expert in an `If` whose branch
  owns that expert's weights (so ONNX Runtime prepacks them, as it does a dense MLP's): a decode step
  runs its chosen experts' MatMuls on all threads and skips the rest; a branch weights every row of a
  prompt by its routing weight, so prompts are exact too. `moe_lowering="gather"` routes in plain ONNX instead: ArgMax (top-1,
  renormalised) or Softmax -> TopK, then per expert NonZero + GatherND of the rows that chose it,
  that expert's own MatMuls, ScatterND back — no contrib op, every MatMul on all threads, but a
  dozen nodes per expert on every step; on SmolLM2 LF-UC@0.8 it decodes 7-13% slower than the
  kernel (`bench/results/moe_lowering_onnx_*.md`).
  None of them has a shared expert, so Qwen2-MoE's shared expert is an ordinary MLP beside it, gated
  by sigmoid(shared_expert_gate(x)) — folded into its down-projection when that gate is zero;
- RMSNorm and the residual adds are `SkipSimplifiedLayerNormalization`.

Gemma 3 adds, all exact: embeddings times √hidden; norms that scale by (1 + w) (stored as 1 + w);
a norm on the attention output and one on the MLP output before their residual adds; GeGLU
(`Gelu` with tanh); a query scale of query_pre_attn_scalar^-½; and on sliding-window layers
GroupQueryAttention's `local_window_size` with their own (local-base) RoPE tables.

The kernel's SwiGLU is `G * sigmoid(alpha * G) * (L + beta)`; alpha = 1, beta = 0 and no clamp
make it silu(gate) * up, with gate/up rows interleaved in fc1 (`swiglu_fusion=1`).

GroupQueryAttention needs a head size that is a multiple of 16. Smaller heads are padded: each
half of a rotary head goes to the start of the corresponding half of the padded head, so the
rotate-half pairing is kept; the padding rows of q/k/v are zero and the matching o_proj columns
are zero, and the softmax scale stays 1/sqrt(real head size). The result is exact.

`moe_lowering="dense"` replaces the MoE node by what optimum-onnx exports: every expert computed on
every token and weighted by a mask that is zero outside the top-k (two MatMuls over all experts'
stacked weights). Same outputs, all expert weights read per token; kept for comparison.

Weights enter through `Linears` (`converters.onnx_ops`), which decides how each projection is stored (fp32
MatMul, or a quantized MatMulNBits / QMoE, see `converters.onnx_quant`); the MoE lowerings are in
`converters.onnx_moe`.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from converters.onnx_moe import moe_block
from converters.onnx_ops import MS, Graph, Linears, Spec
from d2m_export.architectures import ARCHITECTURES, rope_keys
from d2m_export.errors import UserError

OPSET = 23


ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}    # transformers' name -> ours


def spec_of(config, max_positions: int) -> Spec:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    act = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", "silu")
    if act not in ACTIVATIONS:
        raise UserError(f"the onnx target supports SiLU and tanh-GELU MLPs; this model uses {act!r}")
    if getattr(config, "attn_logit_softcapping", None) or getattr(config, "final_logit_softcapping", None):
        raise UserError("logit soft-capping is not supported by the onnx target yet")
    if getattr(config, "use_sliding_window", False):
        raise UserError("models with sliding-window attention are not supported by the onnx target yet")
    if getattr(config, "mlp_bias", False):
        raise UserError("models with MLP biases are not supported by the onnx target yet")
    if head_dim % 2:
        raise UserError(f"head size {head_dim} is odd; rotary embeddings need an even head size")
    return Spec(num_layers=config.num_hidden_layers, hidden=config.hidden_size, heads=heads,
                kv_heads=config.num_key_value_heads or heads, head_dim=head_dim, vocab=config.vocab_size,
                eps=float(config.rms_norm_eps), max_positions=max_positions,
                moe_top_k=int(getattr(config, "num_experts_per_tok", 0) or 0),
                norm_topk_prob=bool(getattr(config, "norm_topk_prob", True)), rope_keys=tuple(rope_keys(config)),
                output_norms_only=ARCHITECTURES[config.model_type].attn_norm is None, **gemma_spec(config))


def gemma_spec(config) -> dict:
    if config.model_type != "gemma3_text":
        return {}
    return dict(activation=ACTIVATIONS[config.hidden_activation], embed_scale=float(config.hidden_size ** 0.5),
                query_scale=float(config.query_pre_attn_scalar ** -0.5), sandwich_norms=True,
                sliding_window=int(config.sliding_window), layer_types=tuple(config.layer_types))


def rotary_tables(model, spec: Spec, layer_type: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin caches [max_positions, head_dim_padded / 2], computed by the model's own rotary module
    (so every RoPE variant transformers implements, with its attention scaling, comes out as it does);
    `layer_type` is the layer's RoPE key (`architectures.rope_keys`): the table of a family with one per layer
    type (Gemma 3's local and global bases), or the identity of a layer without RoPE (SmolLM3's NoPE layers)."""
    import torch

    from d2m_export.architectures import rotary_cos_sin

    rope = model.model.rotary_emb
    if getattr(rope, "rope_type", "default") == "dynamic":
        raise UserError("dynamic RoPE scaling depends on the sequence length; the onnx target does not support it")
    with torch.no_grad():
        pos = torch.arange(spec.max_positions)[None]
        x = torch.zeros(1, dtype=torch.float32)
        cos, sin = rotary_cos_sin(rope, x, pos, layer_type)
    half, halfp = spec.head_dim // 2, spec.head_dim_padded // 2
    cos_t = np.ones((spec.max_positions, halfp), np.float32)
    sin_t = np.zeros((spec.max_positions, halfp), np.float32)
    cos_t[:, :half] = cos[0, :, :half].float().numpy()
    sin_t[:, :half] = sin[0, :, :half].float().numpy()
    return cos_t, sin_t


def rotary_tables_by_type(model, spec: Spec) -> dict[str | None, tuple[np.ndarray, np.ndarray]]:
    """One table per RoPE the layers use: keyed by layer type where RoPE is given per type, else by None."""
    return {t: rotary_tables(model, spec, t) for t in sorted(set(rope_keys(model.config)), key=str)}


def head_slots(spec: Spec) -> np.ndarray:
    """Where each real head dimension goes in the padded head (identity when no padding is needed)."""
    half, halfp = spec.head_dim // 2, spec.head_dim_padded // 2
    return np.concatenate([np.arange(half), halfp + np.arange(half)])


def pad_heads_rows(w: np.ndarray, n_heads: int, spec: Spec) -> np.ndarray:
    """[n_heads * head_dim, ...] rows -> [n_heads * head_dim_padded, ...], zero rows in the padding."""
    hd, hdp = spec.head_dim, spec.head_dim_padded
    if hd == hdp:
        return w
    out = np.zeros((n_heads, hdp) + w.shape[1:], w.dtype)
    out[:, head_slots(spec)] = w.reshape((n_heads, hd) + w.shape[1:])
    return out.reshape((n_heads * hdp,) + w.shape[1:])


def pad_heads_cols(w: np.ndarray, n_heads: int, spec: Spec) -> np.ndarray:
    return pad_heads_rows(w.T, n_heads, spec).T



def build_graph(spec: Spec, sd: dict[str, np.ndarray], rotary: dict, lin: Linears,
                tied: bool, name: str = "decoder", moe_lowering: str = "sparse",
                position_offset: int = 0, logits_to_keep: bool = False) -> onnx.ModelProto:
    """The whole decoder. `sd` maps transformers parameter names to fp32 numpy arrays, norm weights as
    the scale they apply; `rotary` maps a layer type (or None) to its (cos, sin) tables. `position_offset`
    is where the consumer's `position_ids` start (transformers.js counts Gemma 3's from 1): the graph
    subtracts it, so the rotary tables are indexed from 0 either way. `logits_to_keep` adds the scalar input
    `num_logits_to_keep` (transformers.js feeds 1 while generating, 0 otherwise): the LM head runs on the last
    that many positions only, 0 meaning all, so a long prompt never holds [prompt, vocab] logits."""
    g = lin.g
    hd, hdp = spec.head_dim, spec.head_dim_padded
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", i64, ["batch_size", "total_sequence_length"]),
              helper.make_tensor_value_info("position_ids", i64, ["batch_size", "sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch_size", "sequence_length", spec.vocab])]
    for i in range(spec.num_layers):
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", f32,
                                                        ["batch_size", spec.kv_heads, "past_sequence_length", hdp]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", f32,
                                                         ["batch_size", spec.kv_heads, "present_sequence_length", hdp]))

    # sequence bookkeeping for GroupQueryAttention: seqlens_k = valid length - 1, total = mask length
    mask_len = g.op("ReduceSum", ["attention_mask", g.const("axes_1", np.array([1], np.int64))], "mask_sum", keepdims=0)
    seqlens_k = g.op("Cast", [g.op("Sub", [mask_len, g.const("one_i64", np.array(1, np.int64))], "seqlens_minus_1")],
                     "seqlens_k", to=TensorProto.INT32)
    total = g.op("Cast", [g.op("Gather", [g.op("Shape", ["attention_mask"], "mask_shape"),
                                          g.const("idx_1", np.array(1, np.int64))], "mask_len", axis=0)],
                 "total_seq_len", to=TensorProto.INT32)
    positions = "position_ids"
    if position_offset:
        positions = g.op("Sub", [positions, g.const("position_offset", np.array(position_offset, np.int64))],
                         "positions")
    caches = {t: (g.const(f"rotary{'.' + t if t else ''}.cos", cos), g.const(f"rotary{'.' + t if t else ''}.sin", sin))
              for t, (cos, sin) in rotary.items()}

    hidden, lm_head = lin.embedding_and_head(sd["model.embed_tokens.weight"], None if tied else sd["lm_head.weight"],
                                             "input_ids")
    if spec.embed_scale != 1.0:
        hidden = g.op("Mul", [hidden, g.const("embed_scale", np.array(spec.embed_scale, np.float32))], "embed.scale")

    def rms(x, skip, weight_key, name):
        """(normed, residual sum) — the residual is x + skip when a skip is given."""
        gamma = g.const(f"{weight_key}", sd[weight_key].astype(np.float32))
        if skip is None:
            return g.op("RMSNormalization", [x, gamma], name, axis=-1, epsilon=spec.eps), x
        normed, _, _, total_sum = g.op("SkipSimplifiedLayerNormalization", [x, skip, gamma], name,
                                       outputs=[f"{name}/normed", "", "", f"{name}/sum"], domain=MS, epsilon=spec.eps)
        return normed, total_sum

    def mlp(x, prefix, name, down_scale=1.0):
        return lin.swiglu(x, *(sd[f"{prefix}{k}_proj.weight"] for k in ("gate", "up", "down")), name, down_scale,
                          spec.activation)

    def out_norm(x, weight_key, name):       # Gemma, OLMo 2: a norm on a branch's output, before its residual add
        return g.op("RMSNormalization", [x, g.const(weight_key, sd[weight_key].astype(np.float32))], name, axis=-1,
                    epsilon=spec.eps) if spec.sandwich_norms or spec.output_norms_only else x

    def add_branch(branch, residual, next_norm, name):
        """(the next block's input, the residual stream) after adding `branch`: normed by `next_norm`, or, with
        output norms only, the stream itself (the final norm still applies)."""
        if not spec.output_norms_only:
            return rms(branch, residual, next_norm, name)
        total = g.op("Add", [residual, branch], f"{name}/sum")
        return (rms(total, None, next_norm, name)[0] if next_norm == "model.norm.weight" else total), total

    if spec.output_norms_only:
        x = residual = hidden
    else:
        x, residual = rms(hidden, None, "model.layers.0.input_layernorm.weight", "layers.0.input_norm")
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        wq = pad_heads_rows(sd[a + "q_proj.weight"], spec.heads, spec)
        wk = pad_heads_rows(sd[a + "k_proj.weight"], spec.kv_heads, spec)
        wv = pad_heads_rows(sd[a + "v_proj.weight"], spec.kv_heads, spec)
        bias = None
        if a + "q_proj.bias" in sd:
            bias = np.concatenate([pad_heads_rows(sd[a + f"{n}_proj.bias"], h, spec)
                                   for n, h in (("q", spec.heads), ("k", spec.kv_heads), ("v", spec.kv_heads))])
        if a + "q_norm.weight" in sd:      # Qwen3, OLMo 2: RMSNorm on q and k, so they are projected apart
            b = np.split(bias, [len(wq), len(wq) + len(wk)]) if bias is not None else (None, None, None)
            q_k_v = [lin.linear(x, w, bw, f"layers.{i}.{n}_proj") for w, bw, n in zip((wq, wk, wv), b, "qkv")]
            qk_norm = projection_norm if sd[a + "q_norm.weight"].shape[0] != hd else head_norm
            q_k_v[0] = qk_norm(g, spec, q_k_v[0], sd[a + "q_norm.weight"], spec.heads, f"layers.{i}.q_norm")
            q_k_v[1] = qk_norm(g, spec, q_k_v[1], sd[a + "k_norm.weight"], spec.kv_heads, f"layers.{i}.k_norm")
        else:
            q_k_v = [lin.linear(x, np.concatenate([wq, wk, wv]), bias, f"layers.{i}.qkv"), "", ""]
        layer_type = spec.layer_types[i] if spec.layer_types else None
        cos_c, sin_c = caches[spec.rope_keys[i] if spec.rope_keys else None]
        window = {"local_window_size": spec.sliding_window} if layer_type == "sliding_attention" else {}
        attn, _, _ = g.op("GroupQueryAttention",
                          [*q_k_v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total,
                           cos_c, sin_c, positions], f"layers.{i}.attn",
                          outputs=[f"layers.{i}.attn/out", f"present.{i}.key", f"present.{i}.value"], domain=MS,
                          num_heads=spec.heads, kv_num_heads=spec.kv_heads, do_rotary=1, rotary_interleaved=0,
                          scale=float(spec.query_scale or hd ** -0.5), **window)
        o = lin.linear(attn, pad_heads_cols(sd[a + "o_proj.weight"], spec.heads, spec), sd.get(a + "o_proj.bias"),
                       f"layers.{i}.o_proj")
        o = out_norm(o, p + "post_attention_layernorm.weight", f"layers.{i}.post_attn_norm")
        ffn_norm = p + ("pre_feedforward_layernorm.weight" if spec.sandwich_norms else "post_attention_layernorm.weight")
        x, residual = add_branch(o, residual, ffn_norm, f"layers.{i}.ffn_norm")

        m = p + "mlp."
        if m + "experts.gate_up_proj" in sd:
            ffn = moe_block(g, lin, spec, sd, m, x, f"layers.{i}.moe", mlp, moe_lowering)
        else:
            ffn = mlp(x, m, f"layers.{i}.mlp")
        ffn = out_norm(ffn, p + "post_feedforward_layernorm.weight", f"layers.{i}.post_ffn_norm")
        last = i == spec.num_layers - 1
        norm_key = "model.norm.weight" if last else f"model.layers.{i + 1}.input_layernorm.weight"
        x, residual = add_branch(ffn, residual, norm_key, "final_norm" if last else f"layers.{i + 1}.input_norm")

    if logits_to_keep:                                    # x[:, -k:], and x[:, 0:] (all) for k = 0
        inputs.append(helper.make_tensor_value_info("num_logits_to_keep", i64, []))
        start = g.op("Neg", [g.op("Reshape", ["num_logits_to_keep", g.const("shape_1", np.array([1], np.int64))],
                                  "logits_to_keep.1d")], "logits_to_keep.start")
        x = g.op("Slice", [x, start, g.const("logits_to_keep.end", np.array([np.iinfo(np.int64).max], np.int64)),
                           g.const("logits_to_keep.axis", np.array([1], np.int64))], "logits_to_keep.slice")
    lm_head(x)                                            # writes the graph output "logits"

    graph = helper.make_graph(g.nodes, name, inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                              producer_name="d2m-export")
    model.ir_version = 10
    return model


def projection_norm(g: Graph, spec: Spec, x: str, gamma: np.ndarray, n_heads: int, name: str) -> str:
    """RMSNorm over the whole [B, S, n_heads·head_dim_padded] projection (OLMo 2's q/k norms). The padding's
    zeros add nothing to the sum of squares but count in the mean: γ scaled by sqrt(hd/hdp), ε by hd/hdp."""
    ratio = spec.head_dim / spec.head_dim_padded
    gamma = pad_heads_rows(gamma.astype(np.float32), n_heads, spec) * np.float32(np.sqrt(ratio))
    return g.op("RMSNormalization", [x, g.const(f"{name}.weight", gamma)], name, axis=-1, epsilon=spec.eps * ratio)


def head_norm(g: Graph, spec: Spec, x: str, gamma: np.ndarray, n_heads: int, name: str) -> str:
    """RMSNorm over each head of [B, S, n_heads·head_dim_padded]. Over a padded head the mean of squares
    is hd/hdp of the true one; scaling γ by sqrt(hd/hdp) and ε by hd/hdp makes it exact."""
    ratio = spec.head_dim / spec.head_dim_padded
    gamma = pad_heads_rows(gamma.astype(np.float32), 1, spec) * np.float32(np.sqrt(ratio))
    heads = g.op("Reshape", [x, g.const(f"{name}.heads_shape", np.array([0, 0, n_heads, spec.head_dim_padded],
                                                                         np.int64))], f"{name}.heads")
    normed = g.op("RMSNormalization", [heads, g.const(f"{name}.weight", gamma)], name, axis=-1,
                  epsilon=spec.eps * ratio)
    return g.op("Reshape", [normed, g.const(f"{name}.flat_shape", np.array([0, 0, -1], np.int64))], f"{name}.flat")
