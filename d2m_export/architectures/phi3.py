"""Phi-3 and Phi-4-mini (`phi3`), read as Llama through an exact view.

Phi-3 is Llama with three differences, each held by the view:
- fused projections: `qkv_proj` rows are q, then k, then v; `gate_up_proj` rows are gate, then up. The view
  stores them apart as Llama's q/k/v_proj and gate/up_proj.
- partial rotary (Phi-4-mini: `partial_rotary_factor` 0.75): RoPE turns only the first `rot` of each head's
  dimensions, pairing i with i + rot/2; the rest pass through. Llama turns all of them, pairing j with
  j + head/2. The view permutes each q and k head's rows so that Phi's pair (i, i + rot/2) lands on Llama's
  (i, i + head/2) and the passing dimensions fill the remaining pairs (q·k is unchanged by a permutation
  applied to both), and gives those pairs a frequency of ~0 (a longrope factor of 1e30: cos 1, sin below
  fp32's resolution), with base θ^(head/rot) so that Llama's θ'^(2j/head) is Phi's θ^(2j/rot).
- `longrope` (Phi-4-mini's short and long factor lists, original context 4096 of 131072): kept as longrope,
  its factor lists padded for the passing pairs. Phi scales cos and sin of the turned dimensions by an
  attention factor (1.19 for Phi-4-mini); the view folds it into those q and k rows and sets it to 1, so the
  passing dimensions stay unscaled.
With full rotary and default RoPE (Phi-3-mini-4k) the view is Llama with the projections split. A sliding
window shorter than the positions is refused, as for Mistral.
"""
from __future__ import annotations

import torch

from d2m_export.architectures import ReadAs, register

PASS_FACTOR = 1e30      # a longrope factor that makes a pair's frequency ~0: the dimensions pass through RoPE
DROPPED = ("architectures", "model_type", "transformers_version", "auto_map", "sliding_window", "embd_pdrop",
           "resid_pdrop", "original_max_position_embeddings", "partial_rotary_factor", "rope_parameters",
           "rope_scaling", "rope_theta", "full_attn_mod", "interpolate_factor", "lm_head_bias", "head_dim")


def _dims(config) -> tuple[int, int]:
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    partial = config.rope_parameters.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    return head, int(head * (partial or 1.0))


def _phi_rope(config) -> tuple[dict, float]:
    """(Phi's RoPE parameters, the attention factor transformers scales its cos/sin by)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = dict(config.rope_parameters)
    kind = params.get("rope_type", "default")
    attention = float(ROPE_INIT_FUNCTIONS[kind](config)[1]) if kind != "default" else 1.0
    return params, attention


def head_permutation(head: int, rot: int) -> torch.Tensor:
    """view row j of a head <- Phi row perm[j]: Phi's turned pairs (i, i + rot/2) on Llama's (i, i + head/2),
    the passing dimensions rot.. in the remaining slots of each half."""
    rhalf, rest = rot // 2, (head - rot) // 2
    first = list(range(rhalf)) + list(range(rot, rot + rest))
    second = list(range(rhalf, rot)) + list(range(rot + rest, head))
    return torch.tensor(first + second)


def matched_factors(factors: list[float], theta: float, rot: int, view_theta: float, head: int) -> list[float]:
    """Longrope factors for the view's first rot/2 pairs with which transformers' float32 inverse frequencies,
    1 / (factor · θ'^(2j/head)), equal Phi's, 1 / (factor · θ^(2j/rot)), bit for bit: each factor moved by a
    few float32 steps from Phi's own where the two powers round apart (else the angles drift apart by ~1e-4
    rad at position 3000)."""
    import numpy as np

    want = 1.0 / (torch.tensor(factors, dtype=torch.float32)
                  * theta ** (torch.arange(0, rot, 2, dtype=torch.int64).float() / rot))
    power = (view_theta ** (torch.arange(0, head, 2, dtype=torch.int64).float() / head))[: rot // 2]
    base = np.array(factors, np.float32)
    best = base.copy()
    found = np.zeros(len(base), bool)
    for step in [0] + [s for k in range(1, 65) for s in (k, -k)]:
        candidate = base.view(np.int32) + step
        got = 1.0 / (torch.from_numpy(candidate.view(np.float32).copy()) * power)
        hit = (got == want).numpy() & ~found
        best[hit], found[hit] = candidate.view(np.float32)[hit], True
        if found.all():
            break
    return [float(f) for f in best]


class Phi3(ReadAs):
    def refusal(self, config):
        window, positions = getattr(config, "sliding_window", None), config.max_position_embeddings
        if window is not None and window < positions:
            return (f"phi3 with sliding_window {window} < max_position_embeddings {positions}: its attention is "
                    f"windowed to {window} positions, which the onnx, gguf, executorch and coreml targets and "
                    f"convert's outputs (llama, qwen2_moe) do not hold (they attend over all positions)")
        head, rot = _dims(config)
        if rot % 2 or (head - rot) % 2:
            return f"phi3 with {rot} of {head} head dimensions turned by RoPE: an odd split no Llama view holds"
        return None

    def view_config(self, config):
        d = {k: v for k, v in config.to_dict().items() if k not in DROPPED}
        head, rot = _dims(config)
        params, _ = _phi_rope(config)
        theta = float(params["rope_theta"])
        if rot == head and params.get("rope_type", "default") == "default":
            rope = {"rope_type": "default", "rope_theta": theta}
        else:
            n_rot, n_pass = rot // 2, (head - rot) // 2
            short = list(params.get("short_factor") or [1.0] * n_rot)
            long = list(params.get("long_factor") or short)
            original = (params.get("original_max_position_embeddings")
                        or getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings)
            view_theta = theta ** (head / rot)
            rope = {"rope_type": "longrope", "rope_theta": view_theta,
                    "short_factor": matched_factors(short, theta, rot, view_theta, head) + [PASS_FACTOR] * n_pass,
                    "long_factor": matched_factors(long, theta, rot, view_theta, head) + [PASS_FACTOR] * n_pass,
                    "original_max_position_embeddings": int(original), "attention_factor": 1.0,
                    "factor": config.max_position_embeddings / int(original)}
        return {**d, "model_type": "llama", "head_dim": head, "attention_bias": False, "mlp_bias": False,
                "rope_parameters": rope}

    def folds_weights(self, config):
        return True

    def view_tensors(self, config, name, tensor):
        if name.endswith("mlp.gate_up_proj.weight"):
            gate, up = tensor.chunk(2)
            prefix = name[: -len("gate_up_proj.weight")]
            return {f"{prefix}gate_proj.weight": gate.contiguous(), f"{prefix}up_proj.weight": up.contiguous()}
        if not name.endswith("self_attn.qkv_proj.weight"):
            return {name: tensor}
        head, rot = _dims(config)
        heads, kv = config.num_attention_heads, config.num_key_value_heads
        q, k, v = tensor.split([heads * head, kv * head, kv * head])
        perm = head_permutation(head, rot)
        _, attention = _phi_rope(config)
        scale = torch.where(perm < rot, attention, 1.0)      # the attention factor on the turned rows only

        def turned(w, n):
            w = w.reshape(n, head, -1)[:, perm].float() * scale[None, :, None]
            return w.reshape(n * head, -1).to(tensor.dtype).contiguous()

        prefix = name[: -len("qkv_proj.weight")]
        return {f"{prefix}q_proj.weight": turned(q, heads), f"{prefix}k_proj.weight": turned(k, kv),
                f"{prefix}v_proj.weight": v.contiguous()}


register(Phi3("phi3", is_moe=False, fuses_into="qwen2_moe", reads_as="llama"))
