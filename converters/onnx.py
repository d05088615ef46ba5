"""ONNX Runtime: one decoder graph for prefill and decode; only the selected experts of an MoE layer run.

The graph is built directly from the weights (`converters.onnx_graph`): a decoder of this kind is
about ten node types, and building it by hand keeps every operator one that ONNX Runtime's CPU
provider runs natively: GroupQueryAttention (in-place KV cache), MoE layers as one `If` per expert
(`switch`, the fp32/fp16 default) or one MoE/QMoE node (`sparse`, the int8/int4 default; `--moe-lowering`
picks; `gather` routes in plain ONNX), SkipSimplifiedLayerNormalization, MatMul or MatMulNBits.

Files: `model.onnx` (the graph), `model.onnx.data` (its weights, as ONNX external data, so the
2 GB protobuf limit never applies; a tied embedding / LM head is stored once) and
`genai_config.json`, with which ONNX Runtime GenAI runs the same folder (`converters.onnx_genai`).
"""
from __future__ import annotations

import logging
from pathlib import Path


from converters.base import Exporter, exact, lossy, register_target
from converters.phases import phase
from converters.onnx_genai import write_genai_config
from d2m_export.errors import UserError
from d2m_export.sources.models import read_config

log = logging.getLogger(__name__)
GRAPH_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
MAX_POSITIONS = 32768      # rotary table rows (and so the longest sequence) at most
MIN_MAX_SEQ_LEN = 64       # the parity check decodes ~60 positions
# MoE lowering by precision, as measured on SmolLM2 LF-UC@0.8 (bench/results/moe_lowering_onnx_*.md): the fp32
# MoE kernel runs one token's expert on one thread with unpacked weights, so fp32/fp16 route with `switch` (each
# expert's prepacked MatMuls in its own If branch); block-wise QMoE prepacks and threads a single expert, as fast
# as a dense MLP of MatMulNBits, so int8/int4 keep the one kernel node
DEFAULT_LOWERING = {"fp32": "switch", "fp16": "switch", "int8": "sparse", "int4": "sparse"}
# MoE model type -> the dense family with the same attention, named in the export's config.json
FAMILIES = ("llama", "qwen2", "qwen3", "gemma3_text", "smollm3", "olmo2", "qwen2_moe", "qwen3_moe", "mixtral")
OPTIMUM_ATTENTION_FAMILY = {"qwen2_moe": "qwen2", "qwen3_moe": "qwen3", "mixtral": "mistral"}


@register_target("onnx")
class OnnxExporter(Exporter):
    description = "ONNX Runtime (CPU): decoder graph with KV cache; MoE layers as com.microsoft.MoE / QMoE"
    quants = ("fp32", "fp16", "int8", "int4")
    default_quant = "fp32"
    # fp32 runs the same arithmetic in another order: exact. Lossy quants are gated on the fixed text
    # (converters.parity): top-1 agreement where the reference is decisive about 0.1 below the worst of
    # SmolLM2-135M dense, LF-UC 0.8 unhealed and healed, mean KL about twice the worst (at least 0.005
    # nats); bench/results/parity_gates_smollm2.md. Worst: fp16 1.0 / 0.0005 nats, int8 1.0 / 0.030,
    # int4 0.678 / 0.705 (unhealed LF-UC; dense 0.828 / 0.387, a quarter of it the int4 LM head).
    artifact_bytes_per_param = {"fp32": 4.0, "fp16": 2.0, "int8": 1.1, "int4": 0.6}
    tolerances = {"fp32": exact(1e-2), "fp16": lossy(0.9, 0.005), "int8": lossy(0.9, 0.06), "int4": lossy(0.55, 1.4)}
    options = ("max_seq_len", "moe_lowering", "head_bits")
    other_runtimes = ("onnxruntime-genai",)

    def export(self, model_dir: Path, quant: str, out_tmp: Path, max_seq_len: int | None = None,
               moe_lowering: str | None = None, head_bits: int | None = None) -> list[str]:
        import onnx

        model_type = read_config(model_dir).get("model_type")
        if model_type not in FAMILIES:
            raise UserError(f"the onnx target exports {', '.join(FAMILIES)} models, not {model_type!r}")
        if head_bits is not None and quant not in ("int8", "int4"):
            raise UserError(f"--head-bits applies to --quant int8 and int4, not {quant}")
        from converters.onnx_ops import ExternalData

        out_tmp = Path(out_tmp)
        data = ExternalData(out_tmp / DATA_FILE)
        try:
            proto = build_model(model_dir, quant, max_seq_len, moe_lowering or DEFAULT_LOWERING[quant], head_bits,
                                data)
        finally:
            data.close()
        with phase("write"):
            onnx.save_model(proto, out_tmp / GRAPH_FILE)        # its weights are in DATA_FILE already
            onnx.checker.check_model(str(out_tmp / GRAPH_FILE))
            genai = write_genai_config(out_tmp, model_dir, GRAPH_FILE, self.details(out_tmp, [GRAPH_FILE]))
        return [GRAPH_FILE, DATA_FILE, genai]

    def check_options(self, config: dict, options: dict) -> dict:
        from d2m_export.architectures import check_table_rope

        n = options.get("max_seq_len")
        check_table_rope(config, "onnx", n)   # the graph's cos/sin tables come from transformers' rotary module
        if n is not None and n < MIN_MAX_SEQ_LEN:
            raise UserError(f"--max-seq-len must be at least {MIN_MAX_SEQ_LEN} (the parity check decodes ~60 "
                            f"positions), not {n}")
        from converters.onnx_moe import LOWERINGS
        if options.get("head_bits") not in (None, 4, 8):
            raise UserError(f"--head-bits must be 4 or 8, not {options['head_bits']}")
        lowering = options.get("moe_lowering")
        if lowering is not None and lowering not in LOWERINGS:
            raise UserError(f"--moe-lowering for onnx must be one of {', '.join(LOWERINGS)}, not {lowering!r}")
        return options

    def adapt_config(self, out_tmp: Path) -> None:
        """optimum's ORTModelForCausalLM sizes the empty KV cache of the first step from config.json, with
        `num_key_value_heads` only for a list of model types (qwen2, llama, mistral, ...) and with
        `num_attention_heads` otherwise, so for an MoE type (qwen2_moe) it feeds 9 heads where the graph
        has 3 and the first run fails. The graph is self-contained and its attention is the dense
        family's, so config.json here names that family; the MoE's own type is kept beside it."""
        import json

        path = Path(out_tmp) / "config.json"
        config = json.loads(path.read_text())
        family = OPTIMUM_ATTENTION_FAMILY.get(config.get("model_type"))
        if family is not None:
            config = {**config, "model_type": family, "d2m_model_type": config["model_type"]}
            path.write_text(json.dumps(config, indent=2) + "\n")

    def details(self, out_tmp: Path, files: list[str]) -> dict:
        return graph_details(Path(out_tmp) / files[0], files[0])


def graph_details(path: Path, graph: str) -> dict:
    """What the manifest says about a decoder graph built here (`graph`: its name in the export), read back
    from the file: opsets, op counts, KV cache shape, positions, MoE lowering, weight storage."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        key = f"{node.domain}.{node.op_type}" if node.domain else node.op_type
        ops[key] = ops.get(key, 0) + 1
    meta = {p.key: p.value for p in proto.metadata_props}
    past = [i for i in proto.graph.input if i.name.startswith("past_key_values.")]
    dims = [d.dim_value for d in past[0].type.tensor_type.shape.dim] if past else []
    return {"graph": graph, "opset": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
            "ops": dict(sorted(ops.items())), "moe_nodes": ops.get("com.microsoft.MoE", 0) + ops.get("com.microsoft.QMoE", 0),
            "num_layers": len(past) // 2, "kv_heads": dims[1] if dims else None,
            "kv_head_dim": dims[3] if dims else None,
            "max_positions": int(meta.get("max_positions", 0)) or None,
            "moe_lowering": meta.get("moe_lowering", "sparse"),
            "weights": meta.get("weights")}


def build_model(model_dir: Path, quant: str, max_seq_len: int | None = None, moe_lowering: str = "switch",
                head_bits: int | None = None, data=None, position_offset: int = 0, logits_to_keep: bool = False,
                plain_embedding: bool = False, inline_branches: bool = False):
    """The ONNX ModelProto for a Hugging Face folder, at `quant`; positions up to `max_seq_len` (default:
    the model's context, at most MAX_POSITIONS); MoE layers `switch` (an If per expert), `sparse` (one MoE/QMoE node), `gather` (routed
    in-graph, per-expert MatMuls) or `dense` (every expert, masked). Large weights go to `data` (an
    `ExternalData` file) as they are made, when given; `position_offset`: where the consumer's position_ids
    start; `logits_to_keep`: a `num_logits_to_keep` input (see `build_graph`); `plain_embedding`: a quantized
    embedding looked up in standard ops (onnxruntime-web has no GatherBlockQuantized); `inline_branches`: the
    `switch` lowering's expert weights in the graph file, not in `data` (onnxruntime-web's need). The model is held in its stored dtype and each weight converted to fp32 only when the graph takes it."""
    import onnx

    from d2m_export.sources.lazy_weights import Float32Arrays
    from d2m_export.sources.models import load_model
    from converters.onnx_graph import build_graph, rotary_tables_by_type, spec_of
    from converters.onnx_ops import Graph, Linears
    from converters.onnx_quant import quantized_linears
    from d2m_export.architectures import table_positions

    with phase("load"):
        model, _, _ = load_model(model_dir)       # any load failure is a one-line UserError
    config = model.config
    spec = spec_of(config, max_positions=min(table_positions(config), max_seq_len or MAX_POSITIONS))
    rotary = rotary_tables_by_type(model, spec)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    sd = Float32Arrays(model)
    g = Graph(data=data, inline_branches=inline_branches)
    lin = Linears(g) if quant == "fp32" else quantized_linears(g, quant, head_bits, plain_embedding)
    if moe_lowering == "dense" and quant != "fp32":
        raise UserError("--moe-lowering dense is offered at fp32 only (it is there for comparison)")
    with phase("convert"):        # int8/int4 weights are quantized here, as the graph takes them
        proto = build_graph(spec, sd, rotary, lin, tied=tied, moe_lowering=moe_lowering,
                            position_offset=position_offset, logits_to_keep=logits_to_keep)
    onnx.helper.set_model_props(proto, {"max_positions": str(spec.max_positions), "weights": lin.describe()["weights"],
                                        "model_type": config.model_type, "moe_lowering": moe_lowering})
    return proto
