"""Quantized storage for the onnx target: block-wise int8/int4 weights that ONNX Runtime's CPU kernels read directly.

- projections: `com.microsoft.MatMulNBits` (B [N, k_blocks, block·bits/8] uint8, one fp32 scale per block,
  zero point 2^(bits-1), i.e. symmetric), 4-bit values packed low nibble first;
- routed experts: `com.microsoft.QMoE` with the same per-block layout per expert ([E, N, K·bits/8]);
- the embedding: `com.microsoft.GatherBlockQuantized` over the same bytes, so a tied embedding /
  LM head is stored once also when quantized (the head's MatMulNBits reads it through a Reshape
  that ONNX Runtime folds at load); for the web, the same lookup in standard ops (`plain_embedding`).

The web's q8 is another form (`DynamicInt8Linears`): `com.microsoft.DynamicQuantizeMatMul`, int8 weights
with one scale per output channel and activations quantized as the kernel runs, which onnxruntime-web's
WebAssembly build runs several times faster than 8-bit MatMulNBits.

Kept in fp32: norms, biases, the routers (routing decisions are sensitive and the routers tiny), the
rotary tables. The LM head (and so a tied embedding) is stored at the projections' bits, as ONNX
Runtime GenAI's model builder does; `head_bits=8` keeps it at int8 under int4, as llama.cpp keeps
the output head above 4 bits (`bench/results/genai_builder_smollm2.md` measures both).

`accuracy_level` is MatMulNBits' own knob: 4 lets the kernels quantize activations to int8 (the fast
integer dot-product path), 0 keeps fp32 activations. Block-wise 8-bit experts in QMoE always use
int8 activations.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from converters.onnx_ops import MS, Graph, Linears, moe_attrs

BITS = {"int8": 8, "int4": 4}
BLOCK = 32
ACCURACY_LEVEL = 4      # MatMulNBits/QMoE: int8 activations in the kernels (their fastest CPU path)
# DynamicInt8Linears: at most this many input channels per DynamicQuantizeMatMul, each block of an activation
# quantized with its own scale. On SmolLM2's parity text one scale per whole activation costs 0.04-0.08 nats
# of mean KL (LF-UC: over the q8 gate's 0.06), blocks of 128 0.02-0.04, for 6-10% of WebAssembly decode speed.
ACTIVATION_BLOCK = 128


def quantize_blocks(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """w [N, K] -> (packed uint8 [N, k_blocks, block·bits/8], scales float32 [N, k_blocks]), symmetric.

    K is zero-padded up to a whole number of blocks (the kernels take K separately)."""
    n, k = w.shape
    kb = -(-k // block)
    padded = np.zeros((n, kb * block), np.float32)
    padded[:, :k] = w
    blocks = padded.reshape(n, kb, block)
    # As llama.cpp's q4_0: the block's largest-magnitude value maps to -2^(bits-1) exactly, so all
    # 2^bits levels are used (a scale of absmax / (2^(bits-1) - 1) would leave one unused).
    half = 2 ** (bits - 1)
    extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]
    scale = extreme / -half
    scale[scale == 0] = 1.0
    q = (np.clip(np.rint(blocks / scale[..., None]), -half, half - 1) + half).astype(np.uint8)
    if bits == 4:
        q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return q, scale.astype(np.float32)


def dequantize_blocks(q: np.ndarray, scale: np.ndarray, bits: int, k: int) -> np.ndarray:
    """The inverse of `quantize_blocks` (for tests and error reports)."""
    if bits == 4:
        q = np.stack([q & 0x0F, q >> 4], axis=-1).reshape(*q.shape[:-1], -1)
    w = (q.astype(np.float32) - 2 ** (bits - 1)) * scale[..., None]
    return w.reshape(w.shape[0], -1)[:, :k]


# LM head (and tied embedding) bits by default: int4 stores it in int4 as ONNX Runtime GenAI's builder
# does; on SmolLM2 that keeps the greedy agreement (42 vs 43 of 64 tokens with an int8 head) and
# makes the file 14% smaller and decode 1.15x faster (bench/results/genai_builder_smollm2.md)
HEAD_BITS = {"int8": 8, "int4": 4}


class NBitsLinears(Linears):
    """`plain_embedding`: the quantized embedding's lookup in standard ONNX ops instead of GatherBlockQuantized,
    which onnxruntime-web's browser build has no kernel for (the web target)."""

    def __init__(self, g: Graph, quant: str, accuracy_level: int = ACCURACY_LEVEL, head_bits: int | None = None,
                 plain_embedding: bool = False):
        super().__init__(g)
        self.quant = quant
        self.bits = BITS[quant]
        self.head_bits = head_bits or HEAD_BITS[quant]
        self.accuracy_level = accuracy_level
        self.plain_embedding = plain_embedding

    def _nbits(self, x: str, q: str, scales: str, n: int, k: int, bits: int, name: str, output=None) -> str:
        return self.g.op("MatMulNBits", [x, q, scales], name, outputs=[output] if output else 1, domain=MS,
                         K=k, N=n, bits=bits, block_size=BLOCK, accuracy_level=self.accuracy_level)

    def matmul(self, x: str, weight: np.ndarray, name: str, output: str | None = None, bits: int | None = None) -> str:
        bits = bits or self.bits
        q, s = quantize_blocks(weight, bits, BLOCK)
        return self._nbits(x, self.g.const(f"{name}.weight_q{bits}", q), self.g.const(f"{name}.scales", s),
                           weight.shape[0], weight.shape[1], bits, name, output)

    def moe(self, x, router_logits, fc1, fc2, k, normalize, name):
        g = self.g
        e, two_i, h = fc1.shape
        block = next((b for b in (BLOCK, 16) if h % b == 0 and (two_i // 2) % b == 0), None)
        if block is None:                        # per-row scales: the kernel's "column-wise" mode
            q1, s1 = zip(*(quantize_blocks(fc1[j], self.bits, h) for j in range(e)))
            q2, s2 = zip(*(quantize_blocks(fc2[j], self.bits, two_i // 2) for j in range(e)))
            extra = {}
            s1, s2 = [np.stack(s)[..., 0] for s in (s1, s2)]
        else:
            q1, s1 = zip(*(quantize_blocks(fc1[j], self.bits, block) for j in range(e)))
            q2, s2 = zip(*(quantize_blocks(fc2[j], self.bits, block) for j in range(e)))
            extra = {"block_size": block}
            s1, s2 = np.stack(s1), np.stack(s2)
        q1 = np.stack([q.reshape(two_i, -1) for q in q1])
        q2 = np.stack([q.reshape(h, -1) for q in q2])
        return g.op("QMoE", [x, router_logits, g.const(f"{name}.fc1_q{self.bits}", q1), g.const(f"{name}.fc1_scales", s1), "",
                             g.const(f"{name}.fc2_q{self.bits}", q2), g.const(f"{name}.fc2_scales", s2)], name,
                    domain=MS, expert_weight_bits=self.bits, accuracy_level=self.accuracy_level,
                    **extra, **moe_attrs(k, normalize))

    def embedding_and_head(self, embed, lm_head, input_ids):
        g = self.g
        v, h = embed.shape
        if h % BLOCK:                           # the gather needs whole blocks: keep that model's embedding fp32
            return super().embedding_and_head(embed, lm_head, input_ids) if lm_head is None else (
                g.op("Gather", [g.const("embed_tokens.weight", embed.astype(np.float32)), input_ids], "embed", axis=0),
                lambda x: self.matmul(x, lm_head, "lm_head", output="logits", bits=self.head_bits))
        bits = self.head_bits
        q, s = quantize_blocks(embed, bits, BLOCK)
        data = g.const(f"embed_tokens.weight_q{bits}", q.reshape(v, -1))
        scales = g.const("embed_tokens.scales", s)
        hidden = self._gather_rows(data, scales, input_ids, bits, h) if self.plain_embedding else g.op(
            "GatherBlockQuantized", [data, input_ids, scales], "embed", domain=MS, bits=bits, block_size=BLOCK,
            gather_axis=0, quantize_axis=1)
        if lm_head is not None:
            return hidden, lambda x: self.matmul(x, lm_head, "lm_head", output="logits", bits=bits)
        head = g.op("Reshape", [data, g.const("lm_head.packed_shape", np.array(q.shape, np.int64))], "lm_head.packed")
        return hidden, lambda x: self._nbits(x, head, scales, v, h, bits, "lm_head", output="logits")

    def _gather_rows(self, data: str, scales: str, input_ids: str, bits: int, h: int) -> str:
        """GatherBlockQuantized's result from Gather, Cast and arithmetic: the looked-up rows' bytes and block
        scales only (never the whole table), 4-bit values unpacked low nibble first, as `quantize_blocks` packs."""
        g = self.g
        f32 = lambda name, v: g.const(name, np.array(v, np.float32))     # noqa: E731
        shape = lambda name, dims: g.const(name, np.array(dims, np.int64))   # noqa: E731
        rows = g.op("Cast", [g.op("Gather", [data, input_ids], "embed.rows", axis=0)], "embed.rows_f32",
                    to=TensorProto.FLOAT)                                      # [B, S, H·bits/8]
        if bits == 4:
            high = g.op("Floor", [g.op("Mul", [rows, f32("embed.one_16th", 1 / 16)], "embed.rows_16th")], "embed.high")
            low = g.op("Sub", [rows, g.op("Mul", [high, f32("embed.sixteen", 16)], "embed.high_16")], "embed.low")
            last = shape("embed.last_axis", [-1])
            rows = g.op("Concat", [g.op("Unsqueeze", [low, last], "embed.low_1"),
                                   g.op("Unsqueeze", [high, last], "embed.high_1")], "embed.nibbles", axis=-1)
        values = g.op("Sub", [rows, f32("embed.zero_point", 2 ** (bits - 1))], "embed.centered")
        blocks = g.op("Reshape", [values, shape("embed.block_shape", [0, 0, -1, BLOCK])], "embed.blocks")
        row_scales = g.op("Unsqueeze", [g.op("Gather", [scales, input_ids], "embed.row_scales", axis=0),
                                        shape("embed.scale_axis", [-1])], "embed.row_scales_1")
        return g.op("Reshape", [g.op("Mul", [blocks, row_scales], "embed.scaled"), shape("embed.hidden_shape", [0, 0, h])],
                    "embed")

    def describe(self) -> dict:
        return {"weights": f"{self.quant}: MatMulNBits/QMoE block {BLOCK}, symmetric; LM head and embedding "
                           f"int{self.head_bits}; accuracy_level {self.accuracy_level}; norms, biases, routers fp32"}


def quantize_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [N, K] -> (int8 [N, K], float32 scales [N]): symmetric, one scale per output channel (row), the
    extreme at ±127, as onnxruntime's `quantize_dynamic(per_channel=True, weight_type=QInt8)` quantizes a
    MatMul's weight."""
    scale = np.abs(w).max(axis=1) / 127
    scale[scale == 0] = 1.0
    return np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8), scale.astype(np.float32)


class DynamicInt8Linears(Linears):
    """The web's q8: `com.microsoft.DynamicQuantizeMatMul`, the node onnxruntime fuses `quantize_dynamic`'s
    DynamicQuantizeLinear + MatMulInteger + Cast + Mul into at load (transformers.js's q8 models are made
    so). Weights int8, one scale per output channel; the kernel quantizes its activation input to uint8
    with one scale as it runs and multiplies in integers. Each ACTIVATION_BLOCK input channels are their
    own node (Split, one DynamicQuantizeMatMul per block, Sum), so each block of an activation gets its own
    scale: a few large channels then coarsen only their block.

    The embedding is looked up in standard ops from the same int8 bytes (a tied LM head's columns, an
    untied embedding's rows), each token's vector with its own scale. (`quantize_dynamic` would quantize
    a Gather's table with one scale for the whole vocabulary, and the tied head with it.)"""
    quant = "int8_dynamic"

    def matmul(self, x: str, weight: np.ndarray, name: str, output: str | None = None,
               bias: np.ndarray | None = None) -> str:
        q, scale = quantize_columns(weight)
        blocks = self._weight_blocks(q.T, f"{name}.weight_t_int8")
        bias_name = None if bias is None else self.g.const(f"{name}.bias", bias.astype(np.float32))
        return self._blocked_matmul(x, blocks, self.g.const(f"{name}.scales", scale), name, output, bias_name)

    def linear(self, x: str, weight: np.ndarray, bias: np.ndarray | None, name: str) -> str:
        return self.matmul(x, weight, name, bias=bias)

    def _weight_blocks(self, b: np.ndarray, name: str) -> list[tuple[str, int]]:
        """B [K, N] as (initializer, rows) per block of about ACTIVATION_BLOCK input channels."""
        k = b.shape[0]
        n_blocks = -(-k // ACTIVATION_BLOCK)
        bounds = [k * j // n_blocks for j in range(n_blocks + 1)]
        if n_blocks == 1:
            return [(self.g.const(name, b), k)]
        return [(self.g.const(f"{name}.{j}", b[lo:hi]), hi - lo) for j, (lo, hi) in enumerate(zip(bounds, bounds[1:]))]

    def _blocked_matmul(self, x: str, blocks: list[tuple[str, int]], scales: str, name: str, output: str | None,
                        bias: str | None) -> str:
        g = self.g
        outputs = [output] if output else 1
        if len(blocks) == 1:
            return g.op("DynamicQuantizeMatMul", [x, blocks[0][0], scales, *(["", bias] if bias else [])], name,
                        outputs=outputs, domain=MS)
        parts = g.op("Split", [x, g.const(f"{name}.block_sizes", np.array([k for _, k in blocks], np.int64))],
                     f"{name}.blocks", outputs=len(blocks), axis=-1)
        partial = [g.op("DynamicQuantizeMatMul", [part, b, scales, *(["", bias] if bias and j == 0 else [])],
                        f"{name}.block{j}", domain=MS) for j, (part, (b, _)) in enumerate(zip(parts, blocks))]
        return g.op("Sum", partial, name, outputs=outputs)

    def embedding_and_head(self, embed: np.ndarray, lm_head: np.ndarray | None, input_ids: str):
        g = self.g
        q, scale = quantize_columns(embed)                  # [V, H]: one scale per token
        scales = g.const("embed_tokens.scales", scale)
        if lm_head is not None:
            rows = g.op("Gather", [g.const("embed_tokens.weight_int8", q), input_ids], "embed.rows", axis=0)
            return self._scaled(rows, scales, input_ids), lambda x: self.matmul(x, lm_head, "lm_head", output="logits")
        blocks = self._weight_blocks(q.T, "lm_head.weight_t_int8")     # the head's B [H, V] by rows
        columns = [g.op("Gather", [b, input_ids], f"embed.columns{j}", axis=1) for j, (b, _) in enumerate(blocks)]
        if len(columns) > 1:
            columns = [g.op("Concat", columns, "embed.columns", axis=0)]
        rows = g.op("Transpose", columns, "embed.rows", perm=[1, 2, 0])                # [H, B, S] -> [B, S, H]
        return self._scaled(rows, scales, input_ids), lambda x: self._blocked_matmul(x, blocks, scales, "lm_head",
                                                                                     "logits", None)

    def _scaled(self, rows: str, scales: str, input_ids: str) -> str:
        """int8 rows [B, S, H] -> float32, times each token's scale."""
        g = self.g
        token_scales = g.op("Unsqueeze", [g.op("Gather", [scales, input_ids], "embed.token_scales", axis=0),
                                          g.const("embed.scale_axis", np.array([-1], np.int64))], "embed.token_scales_1")
        return g.op("Mul", [g.op("Cast", [rows], "embed.rows_f32", to=TensorProto.FLOAT), token_scales], "embed")

    def describe(self) -> dict:
        return {"weights": f"int8 dynamic: DynamicQuantizeMatMul, weights int8 per output channel, symmetric; "
                           f"activations uint8, quantized as the kernel runs, one scale per block of at most "
                           f"{ACTIVATION_BLOCK} input channels; embedding and LM head int8; norms, biases, routers fp32"}


def quantized_linears(g: Graph, quant: str, head_bits: int | None = None, plain_embedding: bool = False) -> Linears:
    if quant == "int8_dynamic":
        return DynamicInt8Linears(g)
    return Fp16Linears(g) if quant == "fp16" else NBitsLinears(g, quant, head_bits=head_bits,
                                                               plain_embedding=plain_embedding)


class Fp16Linears(Linears):
    """fp16 storage: every projection, expert and the embedding / LM head kept as fp16 initializers,
    each followed by a Cast to fp32. The file halves; the CPU provider (whose MoE and MatMul kernels
    are fp32) folds the casts when it loads the graph, so memory and speed stay those of fp32."""
    quant = "fp16"

    def weight(self, name: str, array: np.ndarray) -> str:
        return self.g.op("Cast", [self.g.const(name, array.astype(np.float16))], f"{name}.cast", to=TensorProto.FLOAT)

    def matmul(self, x: str, weight: np.ndarray, name: str, output: str | None = None) -> str:
        return self.g.op("MatMul", [x, self.weight(f"{name}.weight_t", weight.T)], name,
                         outputs=[output] if output else 1)

    def moe(self, x: str, router_logits: str, fc1: np.ndarray, fc2: np.ndarray, k: int, normalize: bool,
            name: str) -> str:
        return self.g.op("MoE", [x, router_logits, self.weight(f"{name}.fc1", fc1), "", self.weight(f"{name}.fc2", fc2)],
                         name, domain=MS, **moe_attrs(k, normalize))

    def embedding_and_head(self, embed: np.ndarray, lm_head: np.ndarray | None, input_ids: str):
        g = self.g
        if lm_head is not None:
            hidden = g.op("Gather", [self.weight("embed_tokens.weight", embed), input_ids], "embed", axis=0)
            return hidden, lambda x: self.matmul(x, lm_head, "lm_head", output="logits")
        head = self.weight("lm_head.weight_t", embed.T)
        hidden = g.op("Transpose", [g.op("Gather", [head, input_ids], "embed.gather", axis=1)], "embed.transpose",
                      perm=[1, 2, 0])
        return hidden, lambda x: g.op("MatMul", [x, head], "lm_head", outputs=["logits"])

    def describe(self) -> dict:
        return {"weights": "fp16"}
