"""Reading a saved Core ML program back, and checking it has what the model needs.

Core ML cannot run on Linux, so an export is checked by what its saved program contains: the
inputs, outputs and states an app will use; one state write per attention layer and cache (the
in-place KV update: `coreml_update_state` in MIL, saved as `write_state`); every MoE layer with all its experts (the stacked expert weights,
their shapes, and the `gather` that selects among them); the weight compression (which
`constexpr_*` op produces each weight matrix, with what element type).

Weight names follow the traced module (`converters.coreml_module`): a parameter
`layers.3.moe.gate_up_proj` becomes the constant `layers_3_moe_gate_up_proj_to_fp16`, and
`..._to_fp16_quantized` once compressed.
"""
from __future__ import annotations

import re
from pathlib import Path

from converters.coreml_module import INPUTS, OUTPUT, STATES

WEIGHT_SUFFIX = re.compile(r"(_to_fp16)?(_quantized|_palettized)?$")
EXPERT = re.compile(r"layers_(\d+)_moe_(gate_up_proj|down_proj|router)$")
SPEC_TARGETS = {7: "iOS16", 8: "iOS17", 9: "iOS18", 10: "iOS26"}
LARGE = 2048         # elements: smaller constants are not weights worth compressing (coremltools' default too)


def weight_key(name: str) -> str:
    """The traced module's parameter name (dots as underscores) behind a program constant."""
    return WEIGHT_SUFFIX.sub("", name)


def _dtype(code: int) -> str:
    """An ML program element type (MIL.proto DataType) by name: fp16, fp32, int8, int4, ..."""
    from coremltools.proto import MIL_pb2

    name = MIL_pb2.DataType.Name(code).lower()
    return {"float16": "fp16", "float32": "fp32"}.get(name, name)


def _tensor(value_type) -> dict:
    t = value_type.tensorType
    dims = [d.constant.size if d.WhichOneof("dimension") == "constant" else None for d in t.dimensions]
    return {"dtype": _dtype(t.dataType), "shape": dims}


def _feature(f) -> dict:
    kind = f.type.WhichOneof("Type")
    if kind == "stateType":
        a = f.type.stateType.arrayType
    else:
        a = f.type.multiArrayType
    from coremltools.proto import FeatureTypes_pb2

    name = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(a.dataType).lower()
    dtype = {"float16": "fp16", "float32": "fp32"}.get(name, name)
    shape = list(a.shape)
    ranges = None
    if kind == "multiArrayType" and a.WhichOneof("ShapeFlexibility") == "shapeRange":
        ranges = [[r.lowerBound, r.upperBound] for r in a.shapeRange.sizeRanges]
    return {"dtype": dtype, "shape": shape, **({"ranges": ranges} if ranges else {})}


def read_program(package: Path) -> dict:
    """What the saved .mlpackage holds: interface, op counts, state writes, experts, compression."""
    return _read(package)[0]


def _read(package: Path) -> tuple[dict, dict]:
    """(report, {constant name: {op, shape, dtype, stored}} for every const / constexpr output)."""
    import coremltools as ct

    package = Path(package)
    spec = ct.utils.load_spec(str(package))
    fn = spec.mlProgram.functions["main"]
    ops = list(fn.block_specializations[fn.opset].operations)
    counts: dict[str, int] = {}
    producers: dict[str, dict] = {}          # output name -> {op, shape, dtype of the stored data}
    state_writes = {s: 0 for s in STATES}
    gathered: set[str] = set()
    for op in ops:
        counts[op.type] = counts.get(op.type, 0) + 1
        if op.type == "const" or op.type.startswith("constexpr_"):
            out = op.outputs[0]
            info = {"op": op.type, **_tensor(out.type)}
            if op.type.startswith("constexpr_"):
                data = [a for k in ("data", "indices") if k in op.inputs for a in op.inputs[k].arguments]
                if data and data[0].WhichOneof("binding") == "value":
                    info["stored"] = _dtype(data[0].value.type.tensorType.dataType)
            producers[out.name] = info
        elif op.type in ("write_state", "coreml_update_state"):    # saved programs hold write_state
            for arg in op.inputs["input" if "input" in op.inputs else "state"].arguments:
                if arg.name in state_writes:
                    state_writes[arg.name] += 1
        elif op.type == "gather":
            gathered.update(a.name for a in op.inputs["x"].arguments)
    weights = {name: p for name, p in producers.items()
               if len(p["shape"]) >= 2 and _size(p["shape"]) >= LARGE}
    experts: dict[int, dict] = {}
    for name, p in producers.items():
        m = EXPERT.match(weight_key(name))
        if m:
            e = experts.setdefault(int(m.group(1)), {})
            e[m.group(2)] = {"shape": p["shape"], "op": p["op"], "gathered": name in gathered,
                             **({"stored": p["stored"]} if "stored" in p else {})}
    compressed = {n: p for n, p in weights.items() if p["op"].startswith("constexpr_")}
    weight_file = package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    report = {
        "specification_version": spec.specificationVersion,
        "deployment_target": SPEC_TARGETS.get(spec.specificationVersion, f"spec {spec.specificationVersion}"),
        "opset": fn.opset,
        "inputs": {f.name: _feature(f) for f in spec.description.input},
        "outputs": {f.name: _feature(f) for f in spec.description.output},
        "states": {f.name: _feature(f) for f in spec.description.state},
        "function_states": [i.name for i in fn.inputs if i.type.WhichOneof("type") == "stateType"],
        "ops": dict(sorted(counts.items())),
        "state_writes": state_writes,
        "moe_layers": {str(i): {"experts": (e.get("gate_up_proj") or {}).get("shape", [None])[0], **e}
                       for i, e in sorted(experts.items())},
        "compression": {
            "ops": {k: v for k, v in counts.items() if k.startswith("constexpr_")},
            "weights_compressed": len(compressed),
            "weights_total": len(weights),
            "stored_types": sorted({p.get("stored", "fp16") for p in weights.values()}),
            "uncompressed": sorted(n for n in weights if n not in compressed),
        },
        "weight_file_mb": round(weight_file.stat().st_size / 2**20, 2) if weight_file.is_file() else None,
    }
    return report, producers


def _size(shape) -> int:
    n = 1
    for d in shape:
        n *= d or 1
    return n


def expected_structure(config, max_seq_len: int, quant: str, compressible: list[str] | None = None) -> dict:
    """What the program must contain for this model (a transformers config) and export."""
    moe: dict[str, int] = {}
    layers = config.num_hidden_layers
    if getattr(config, "model_type", "") in ("qwen2_moe", "qwen3_moe") and config.num_experts:
        skip = set(getattr(config, "mlp_only_layers", None) or [])
        step = getattr(config, "decoder_sparse_step", 1) or 1
        moe = {str(i): config.num_experts for i in range(layers) if i not in skip and (i + 1) % step == 0}
    elif getattr(config, "model_type", "") == "mixtral":
        moe = {str(i): config.num_local_experts for i in range(layers)}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {"attention_layers": layers, "kv_heads": config.num_key_value_heads, "head_dim": head_dim,
            "max_seq_len": int(max_seq_len), "vocab_size": config.vocab_size, "moe_layers": moe, "quant": quant,
            "compressible": sorted(compressible or [])}


def check_program(report: dict, expected: dict, producers: dict | None = None) -> list[str]:
    """Every way the saved program falls short of `expected`; empty when it is complete.

    `producers` (from `_read`) lets it check that each compressible weight is stored compressed."""
    problems = []
    if report["specification_version"] < 9:
        problems.append(f"deployment target {report['deployment_target']}: stateful models need iOS18 / macOS15")
    if sorted(report["inputs"]) != sorted(INPUTS):
        problems.append(f"inputs are {sorted(report['inputs'])}, expected {sorted(INPUTS)}")
    if list(report["outputs"]) != [OUTPUT]:
        problems.append(f"outputs are {list(report['outputs'])}, expected [{OUTPUT!r}]")
    elif report["outputs"][OUTPUT]["shape"][-1:] != [expected["vocab_size"]]:
        problems.append(f"logits shape {report['outputs'][OUTPUT]['shape']} does not end in the vocabulary size "
                        f"{expected['vocab_size']}")
    cache = [expected["attention_layers"], 1, expected["kv_heads"], expected["max_seq_len"], expected["head_dim"]]
    for name in STATES:
        state = report["states"].get(name)
        if state is None or name not in report["function_states"]:
            problems.append(f"state {name!r} is missing: the KV cache would not persist between calls")
            continue
        if state["shape"] != cache or state["dtype"] != "fp16":
            problems.append(f"state {name!r} is {state['dtype']} {state['shape']}, expected fp16 {cache}")
        if report["state_writes"].get(name, 0) != expected["attention_layers"]:
            problems.append(f"state {name!r} is updated {report['state_writes'].get(name, 0)} times, expected once "
                            f"per attention layer ({expected['attention_layers']})")
    found = report["moe_layers"]
    for layer, n in expected["moe_layers"].items():
        got = found.get(layer)
        if got is None:
            problems.append(f"MoE layer {layer}: no expert weights in the program (expected {n} experts)")
            continue
        for part in ("gate_up_proj", "down_proj", "router"):
            if part not in got:
                problems.append(f"MoE layer {layer}: {part} is missing")
            elif got[part]["shape"][0] != n:
                problems.append(f"MoE layer {layer}: {part} holds {got[part]['shape'][0]} experts, expected {n}")
            elif part != "router" and not got[part]["gathered"]:
                problems.append(f"MoE layer {layer}: {part} is not selected by a gather (experts not routed)")
    for layer in sorted(set(found) - set(expected["moe_layers"]), key=int):
        problems.append(f"layer {layer} has expert weights but the model has no MoE there")
    if expected["quant"] in ("int8", "int4") and producers is not None:
        stored = producers
        for key in expected["compressible"]:
            names = [n for n in stored if weight_key(n) == key]
            if not names:
                problems.append(f"weight {key} is missing from the program")
            elif not any(stored[n]["op"] == "constexpr_blockwise_shift_scale" and stored[n].get("stored") == expected["quant"]
                         for n in names):
                problems.append(f"weight {key} is not stored as {expected['quant']} "
                                f"({stored[names[0]]['op']}, {stored[names[0]].get('stored', 'fp16')})")
    return problems


def read_and_check(package: Path, expected: dict) -> tuple[dict, list[str]]:
    report, producers = _read(package)
    return report, check_program(report, expected, producers)


def stored_weights(package: Path) -> dict[str, "object"]:
    """{parameter key: the weight as the package stores it, decompressed (numpy fp16)} for every weight matrix."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_to_pymil

    model = ct.models.MLModel(str(package), skip_model_load=True)
    spec = model.get_spec()
    prog = milproto_to_pymil(spec, specification_version=spec.specificationVersion, file_weights_dir=model.weights_dir)
    out = {}
    for op in prog.functions["main"].operations:
        if op.op_type == "const" or op.op_type.startswith("constexpr_"):
            if op.op_type.startswith("constexpr_"):
                value = op.materialized_val_inference()
            else:
                value = op.outputs[0].val
            if value is not None and getattr(value, "ndim", 0) >= 2:
                out[weight_key(op.name)] = value
    return out
