"""The pieces every ONNX graph here is made of: an external-data weights file, a graph under construction
with unique names, and `Linears`, which decides how each projection is stored (fp32 MatMul here; quantized
MatMulNBits / QMoE and fp16 in `converters.onnx_quant`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from converters.zero_neurons import live_neurons

MS = "com.microsoft"
GQA_HEAD_MULTIPLE = 16


@dataclass(frozen=True)
class Spec:
    """What the graph needs to know about the model, read off its config (`onnx_graph.spec_of`)."""
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    max_positions: int
    moe_top_k: int
    norm_topk_prob: bool
    activation: str = "silu"            # "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    embed_scale: float = 1.0            # Gemma: √hidden
    query_scale: float | None = None    # softmax scale; None: 1/√head_dim
    sandwich_norms: bool = False        # Gemma: norms on the attention and MLP outputs too
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()   # per layer, "sliding_attention" or "full_attention"; () all full
    rope_keys: tuple[str | None, ...] = ()   # per layer, the RoPE table it reads (`architectures.rope_keys`)
    output_norms_only: bool = False     # OLMo 2: norms on the attention and MLP outputs, none on their inputs

    @property
    def head_dim_padded(self) -> int:
        return -(-self.head_dim // GQA_HEAD_MULTIPLE) * GQA_HEAD_MULTIPLE


class ExternalData:
    """The weights file beside the graph, written as initializers are made: a large initializer is on
    disk (ONNX external data, page-aligned like onnx's own converter aligns it) before the next is made,
    so building the graph never holds the model's weights in memory.

    With `chunk_bytes`, no file grows past that size: the weights go on into `{path}_1`, `{path}_2`, ...
    (transformers.js's names for the chunks of `model.onnx_data`; a browser holds each in one buffer)."""
    THRESHOLD = 1024            # bytes: smaller initializers stay inside the graph, as onnx.save_model keeps them
    ALIGN, ALIGN_ABOVE = 4096, 1 << 20

    def __init__(self, path: Path, chunk_bytes: int | None = None):
        self.path = Path(path)
        self.chunk_bytes = chunk_bytes
        self.paths = [self.path]
        self.file = open(self.path, "wb")

    def _room_for(self, nbytes: int) -> None:
        """Start the next chunk file when this tensor would take the current one past `chunk_bytes`."""
        if self.chunk_bytes is None or self.file.tell() + self.ALIGN + nbytes <= self.chunk_bytes:
            return
        if nbytes + self.ALIGN > self.chunk_bytes:
            from d2m_export.errors import UserError
            raise UserError(f"one weight of {nbytes / 2**20:.0f} MiB does not fit a {self.chunk_bytes / 2**20:.0f} MiB "
                            f"external data file")
        if self.file.tell() == 0:
            return
        self.file.close()
        self.paths.append(self.path.with_name(f"{self.path.name}_{len(self.paths)}"))
        self.file = open(self.paths[-1], "wb")

    def tensor(self, array: np.ndarray, name: str) -> TensorProto:
        proto = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        self._room_for(array.nbytes)
        offset = self.file.tell()
        if array.nbytes > self.ALIGN_ABOVE and offset % self.ALIGN:
            self.file.write(b"\0" * (self.ALIGN - offset % self.ALIGN))
            offset = self.file.tell()
        self.file.write(array.tobytes())
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.paths[-1].name), ("offset", str(offset)), ("length", str(array.nbytes))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        return proto

    def close(self) -> None:
        self.file.close()


@dataclass
class Graph:
    """Nodes and initializers, with unique names; large initializers go straight to `data` when given.
    `inline_branches`: an If branch's own initializers stay in the graph file whatever their size
    (onnxruntime-web reads no external data inside a branch)."""
    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    names: set = field(default_factory=set)
    data: ExternalData | None = None
    inline_branches: bool = False

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def const(self, name: str, array: np.ndarray) -> str:
        name = self.fresh(name)
        array = np.ascontiguousarray(array)
        if self.data is not None and array.nbytes >= ExternalData.THRESHOLD:
            self.initializers.append(self.data.tensor(array, name))
        else:
            self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, outputs: int | list[str] = 1, domain: str = "",
           **attrs) -> str | list[str]:
        """Add one node; return its output name (or names, when `outputs` > 1 or a list)."""
        node_name = self.fresh(name)
        outs = outputs if isinstance(outputs, list) else [f"{node_name}/out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=node_name, domain=domain or None, **attrs))
        return outs[0] if len(outs) == 1 else outs


def interleave_gate_up(gate_up: np.ndarray) -> np.ndarray:
    """[E, 2I, H] as [gate; up] -> rows interleaved g0, u0, g1, u1, ... (the kernel's swiglu_fusion=1)."""
    e, two_i, h = gate_up.shape
    i = two_i // 2
    return np.stack([gate_up[:, :i], gate_up[:, i:]], axis=2).reshape(e, two_i, h)


class Linears:
    """fp32 storage of projections: y = x @ W.T (+ b). Quantized variants override `matmul` and `moe`."""
    quant = "fp32"

    def __init__(self, g: Graph):
        self.g = g

    def matmul(self, x: str, weight: np.ndarray, name: str, output: str | None = None) -> str:
        """x [..., in] times weight [out, in] transposed."""
        return self.g.op("MatMul", [x, self.g.const(f"{name}.weight_t", weight.T.astype(np.float32))], name,
                         outputs=[output] if output else 1)

    def linear(self, x: str, weight: np.ndarray, bias: np.ndarray | None, name: str) -> str:
        y = self.matmul(x, weight, name)
        if bias is not None:
            y = self.g.op("Add", [y, self.g.const(f"{name}.bias", bias.astype(np.float32))], f"{name}.add_bias")
        return y

    def swiglu(self, x: str, gate_w: np.ndarray, up_w: np.ndarray, down_w: np.ndarray, name: str,
               down_scale: float = 1.0, activation: str = "silu") -> str:
        """down(act(gate(x)) * up(x)), without the neurons whose weights are all zero; act is silu
        (SwiGLU) or tanh-approximated GELU (GeGLU)."""
        g = self.g
        live = live_neurons(gate_w, up_w, down_w)
        gate_w, up_w, down_w = gate_w[live], up_w[live], down_w[:, live]
        gu = self.matmul(x, np.concatenate([gate_w, up_w]), f"{name}.gate_up")
        gate, up = g.op("Split", [gu], f"{name}.split", outputs=2, axis=-1, num_outputs=2)
        if activation == "gelu_tanh":
            gated = g.op("Gelu", [gate], f"{name}.gelu", approximate="tanh")
        else:
            gated = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{name}.sigmoid")], f"{name}.silu")
        act = g.op("Mul", [gated, up], f"{name}.act")
        return self.matmul(act, down_w * down_scale, f"{name}.down")

    def moe(self, x: str, router_logits: str, fc1: np.ndarray, fc2: np.ndarray, k: int, normalize: bool,
            name: str) -> str:
        """Routed experts in one kernel node: fc1 [E, 2I, H] (gate/up interleaved), fc2 [E, H, I]."""
        g = self.g
        return g.op("MoE", [x, router_logits, g.const(f"{name}.fc1", fc1.astype(np.float32)), "",
                            g.const(f"{name}.fc2", fc2.astype(np.float32))], name, domain=MS,
                    **moe_attrs(k, normalize))

    def embedding_and_head(self, embed: np.ndarray, lm_head: np.ndarray | None, input_ids: str):
        """The token embedding of `input_ids` and a function x -> logits. A tied head (`lm_head` None) is
        stored once, as [H, V] for the MatMul; the embedding gathers its columns."""
        g = self.g
        if lm_head is not None:
            hidden = g.op("Gather", [g.const("embed_tokens.weight", embed.astype(np.float32)), input_ids], "embed", axis=0)
            return hidden, lambda x: self.matmul(x, lm_head, "lm_head", output="logits")
        head = g.const("lm_head.weight_t", embed.T.astype(np.float32))
        hidden = g.op("Transpose", [g.op("Gather", [head, input_ids], "embed.gather", axis=1)], "embed.transpose",
                      perm=[1, 2, 0])
        return hidden, lambda x: g.op("MatMul", [x, head], "lm_head", outputs=["logits"])

    def describe(self) -> dict:
        return {"weights": "fp32"}


def moe_attrs(k: int, normalize: bool) -> dict:
    return dict(k=int(k), activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                normalize_routing_weights=int(normalize))
