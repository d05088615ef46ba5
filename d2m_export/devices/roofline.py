"""Roofline model of batch-1 decode and prefill, from a model's exact active bytes.

Per decode token at context c (tokens already in the KV cache): bytes = weights actually read (at their
precision) + the KV cache read, c positions per attention layer (a sliding-window layer reads at most its
window); flops = 2 per weight read + attention over the same positions.
Time = max(bytes / bandwidth, flops / compute), divided by a runtime's measured efficiency (the
KV-cache reads optionally by a second one, measured at a long context).
"""
from __future__ import annotations

from dataclasses import dataclass

from d2m_export.sources.params import _get, param_counts

BYTES_PER_WEIGHT = {
    "fp32": 4.0, "f32": 4.0, "fp16": 2.0, "f16": 2.0, "bf16": 2.0,
    "q8_0": 34 / 32, "int8": 1.0 + 4 / 32, "8da8w": 1.0 + 4 / 32,
    "q4_0": 18 / 32, "int4": 0.5 + 4 / 32, "8da4w": 0.5 + 4 / 32,
    # llama.cpp's k-quant super-blocks of 256 (Q4_K 144 B, Q5_K 176 B, Q6_K 210 B); the _m mixes keep
    # some tensors a notch higher, which this nominal figure leaves out
    "q4_k_m": 144 / 256, "q5_k_m": 176 / 256, "q6_k": 210 / 256,
}
COMPUTE_CLASS = {"fp32": "fp32", "f32": "fp32", "fp16": "fp16", "f16": "fp16", "bf16": "fp16",
                 "q8_0": "int8", "int8": "int8", "8da8w": "int8", "q4_0": "int8", "int4": "int8", "8da4w": "int8",
                 "q4_k_m": "int8", "q5_k_m": "int8", "q6_k": "int8"}


@dataclass(frozen=True)
class StepCost:
    bytes: float              # all bytes read: weights + KV cache
    flops: float
    kv_bytes: float = 0.0     # the KV-cache part of `bytes`

    def seconds(self, bandwidth_gbs: float, compute_gflops: float, efficiency: float = 1.0,
                kv_efficiency: float | None = None) -> float:
        """Roofline time ÷ a runtime's efficiency. With `kv_efficiency`, the KV-cache reads get their
        own (attention kernels at long context fall further from the bandwidth limit than matmuls)."""
        kv_eff = efficiency if kv_efficiency is None else kv_efficiency
        bw = bandwidth_gbs * 1e9
        memory = (self.bytes - self.kv_bytes) / bw / efficiency + self.kv_bytes / bw / kv_eff
        return max(memory, self.flops / (compute_gflops * 1e9) / efficiency)


def _attention_layers(cfg) -> int:
    return _get(cfg, "num_hidden_layers")


def kv_bytes_per_token(cfg, kv_bytes: float = 4.0) -> float:
    """KV cache bytes one token position occupies, over every layer with attention."""
    return _kv_bytes_per_layer_position(cfg, kv_bytes) * _attention_layers(cfg)


def _kv_bytes_per_layer_position(cfg, kv_bytes: float) -> float:
    heads = _get(cfg, "num_attention_heads")
    kv = _get(cfg, "num_key_value_heads") or heads
    hd = _get(cfg, "head_dim") or _get(cfg, "hidden_size") // heads
    return 2 * kv * hd * kv_bytes


def kv_positions_read(cfg, context: int) -> int:
    """Cached positions one decode step attends to at `context`, summed over the attention layers: all
    of them, or at most the window in sliding-window layers (Gemma 3's local layers)."""
    if context < 1:
        raise ValueError(f"context must be at least 1, not {context}")
    window = _get(cfg, "sliding_window")
    sliding = sum(t == "sliding_attention" for t in _get(cfg, "layer_types") or []) if window else 0
    return (sliding * min(context, window) if sliding else 0) + (_attention_layers(cfg) - sliding) * context


def decode_cost(cfg, precision: str = "fp32", context: int = 512, kv_bytes: float = 4.0) -> StepCost:
    """Bytes and flops of one decode step with `context` tokens already cached."""
    active = param_counts(cfg).active
    heads = _get(cfg, "num_attention_heads")
    hd = _get(cfg, "head_dim") or _get(cfg, "hidden_size") // heads
    positions = kv_positions_read(cfg, context)
    attn_flops = 4 * heads * hd * positions       # q·K and p·V
    kv = _kv_bytes_per_layer_position(cfg, kv_bytes) * positions
    return StepCost(bytes=active * BYTES_PER_WEIGHT[precision] + kv, flops=2 * active + attn_flops, kv_bytes=kv)


def prefill_cost(cfg, tokens: int, precision: str = "fp32", kv_bytes: float = 4.0) -> StepCost:
    active = param_counts(cfg).active
    heads = _get(cfg, "num_attention_heads")
    hd = _get(cfg, "head_dim") or _get(cfg, "hidden_size") // heads
    attn_flops = 2 * heads * hd * tokens * tokens * _attention_layers(cfg)
    return StepCost(bytes=active * BYTES_PER_WEIGHT[precision] + kv_bytes_per_token(cfg, kv_bytes) * tokens,
                    flops=2 * active * tokens + attn_flops)


def decode_ms(cfg, device, precision: str = "fp16", context: int = 512, efficiency: float = 1.0,
              kv_efficiency: float | None = None) -> float:
    """Roofline milliseconds per decode token of `cfg` on a DeviceProfile."""
    cost = decode_cost(cfg, precision, context)
    return 1e3 * cost.seconds(device.memory_bandwidth_gbs, device.compute_gflops[COMPUTE_CLASS[precision]],
                              efficiency, kv_efficiency)


@dataclass(frozen=True)
class DecodeLatency:
    """ms per decode token of a config on one device, roofline × a runtime's measured efficiency."""
    profile: object           # profiles.DeviceProfile
    precision: str
    context: int
    efficiency: float = 1.0
    kv_efficiency: float | None = None

    def __call__(self, cfg) -> float:
        return decode_ms(cfg, self.profile, self.precision, self.context, self.efficiency, self.kv_efficiency)


def predicted_speedup(dense_cfg, moe_cfg, precision: str = "fp32", context: int = 512) -> float:
    """Decode speed-up the roofline predicts (memory-bound: the ratio of bytes read per token)."""
    return decode_cost(dense_cfg, precision, context).bytes / decode_cost(moe_cfg, precision, context).bytes
