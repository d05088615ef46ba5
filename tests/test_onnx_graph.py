"""The ONNX graph the exporter writes: each MoE lowering (gather, sparse MoE nodes, switch branches, the
dense-mask comparison) holds the experts as it says and still matches transformers; quantized graphs
quantize every expert and the LM head as asked; a lowering broken on purpose fails the parity check and
leaves nothing. Models: onnx_helpers.py (tiny random dense and LF-UC models whose routing matters).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import save_with_tokenizer, tiny_dense
from d2m_export.methods import get_method
from d2m_export.plan import Block, Options, Plan
from onnx_helpers import (MOE_VARIANTS, QWEN3_MOE_VARIANTS, hf_model, models, moe_layers, run,  # noqa: F401
                          sensitive)                                           # models: a fixture

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def graph_of(out):
    return onnx.load(str(out / "model.onnx"), load_external_data=False).graph


@pytest.mark.parametrize("variant", ["llama", "lfuc-shared-k2", "lfuc-routed-k1", "lfuc-gated-k2"])
def test_gather_lowering_routes_in_plain_onnx_with_each_experts_own_matmuls(capsys, models, tmp_path, variant):
    code, _, err = run(capsys, "--target", "onnx", "--model", models[variant], "--moe-lowering", "gather",
                       "--threads", 2, "--out", tmp_path / "e")
    assert code == 0, err
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["parity"]["greedy_match"] == manifest["parity"]["greedy_total"]
    graph = graph_of(tmp_path / "e")
    model = hf_model(models[variant])
    cfg = model.config
    assert manifest["onnx"]["moe_lowering"] == "gather" and manifest["onnx"]["moe_nodes"] == 0
    assert not [n for n in graph.node if n.op_type in ("MoE", "QMoE")]
    assert len([n for n in graph.node if n.op_type == "GroupQueryAttention"]) == cfg.num_hidden_layers
    # one scatter per expert per MoE layer, each expert's weights in their own gate_up / down pair
    experts = len(moe_layers(model)) * getattr(cfg, "num_experts", 0)
    assert len([n for n in graph.node if n.op_type == "ScatterND"]) == experts
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    expert_weights = [n for n in shapes if ".experts." in n and n.endswith(".weight_t")]
    assert len(expert_weights) == 2 * experts
    if experts:     # top-1 renormalised needs no routing weights (ArgMax); top-k goes through TopK
        picks = {n.op_type for n in graph.node if n.op_type in ("ArgMax", "TopK")}
        assert picks == ({"ArgMax"} if cfg.num_experts_per_tok == 1 else {"TopK"})
    # a tied embedding / LM head is stored once
    assert sum(1 for s in shapes.values() if cfg.vocab_size in s) == 1
    names = [i.name for i in graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert [o.name for o in graph.output][:3] == ["logits", "present.0.key", "present.0.value"]


@pytest.mark.parametrize("variant", ["lfuc-shared-k2", "lfuc-routed-k1", "lfuc-gated-k2"])
@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_sparse_lowering_has_one_moe_node_per_moe_layer_and_matches(capsys, models, tmp_path, variant, quant):
    lowering = ["--moe-lowering", "sparse"] if quant == "fp32" else []      # int4's default
    code, _, err = run(capsys, "--target", "onnx", "--model", models[variant], "--quant", quant, *lowering,
                       "--threads", 2, "--out", tmp_path / "e")
    assert code == 0, err
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["onnx"]["moe_lowering"] == "sparse"
    if quant == "fp32":
        assert manifest["parity"]["greedy_match"] == manifest["parity"]["greedy_total"]
    graph = graph_of(tmp_path / "e")
    model = hf_model(models[variant])
    cfg = model.config
    op = "MoE" if quant == "fp32" else "QMoE"
    moe_nodes = [n for n in graph.node if n.op_type == op and n.domain == "com.microsoft"]
    assert len(moe_nodes) == len(moe_layers(model)) == manifest["onnx"]["moe_nodes"]
    if quant != "fp32":
        return
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    for node in moe_nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["k"] == cfg.num_experts_per_tok and attrs["normalize_routing_weights"] == 1
        assert attrs["activation_type"] == b"swiglu" and attrs["swiglu_fusion"] == 1
        # all experts live in one fc1/fc2 pair (no per-expert subgraphs): [E, 2I, H] and [E, H, I]
        e, i, h = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        assert shapes[node.input[2]] == [e, 2 * i, h] and shapes[node.input[4]] == [e, h, i]


def branch_weights(graph) -> tuple[dict, list]:
    """Per `If` node of the switch lowering, the expert nodes of its taken branch and the names of the
    initializers that branch owns; and the expert products anywhere else (routing aside)."""
    branches = {}
    elsewhere = [n for n in graph.node if ".experts." in n.name and n.op_type in ("MatMul", "MatMulNBits", "MoE", "QMoE")
                 and not n.name.endswith(".distinct_weights")]
    for node in graph.node:
        if node.op_type == "If":
            run = next(a.g for a in node.attribute if a.name == "then_branch")
            branches[node.name] = ([n for n in run.node if ".experts." in n.name], {t.name for t in run.initializer})
    return branches, elsewhere


@pytest.mark.parametrize("variant,quant", [(v, "fp32") for v in MOE_VARIANTS + QWEN3_MOE_VARIANTS]
                         + [("lfuc-routed-k1", "int4"), ("lfuc-shared-k2-qwen3", "int4"), ("lfuc-routed-k2", "int8"),
                            ("lfuc-routed-k1", "fp16")])
def test_switch_lowering_keeps_each_experts_weights_in_its_own_branch_and_matches(capsys, models, tmp_path, variant,
                                                                                  quant):
    """Prompt and one-token steps, in onnxruntime and onnxruntime-genai: each distinct expert is one `If` whose
    branch owns its weights (so ONNX Runtime prepacks them); no expert weight lives outside its branch."""
    from converters.onnx import OnnxExporter
    from converters.parity import text_gate_failure

    code, _, err = run(capsys, "--target", "onnx", "--model", models[variant], "--moe-lowering", "switch",
                       "--quant", quant, "--threads", 2, "--out", tmp_path / "e")
    assert code == 0, err
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["onnx"]["moe_lowering"] == "switch" and manifest["onnx"]["moe_nodes"] == 0
    parity, tol = manifest["parity"], OnnxExporter.tolerances[quant]
    genai = parity["other_runtimes"]["onnxruntime-genai"]
    for checked in (parity, genai):
        assert checked["greedy_match"] == parity["greedy_total"] if quant == "fp32" else (
            text_gate_failure(checked["text"], tol) is None)
        if quant == "fp32":
            assert checked["max_abs_logit_err"] < 1e-4
    model = hf_model(models[variant])
    cfg = model.config
    graph = graph_of(tmp_path / "e")
    branches, elsewhere = branch_weights(graph)
    assert not elsewhere, [n.name for n in elsewhere]
    distinct = sum(len({(e.gate_up_proj[j].detach().numpy().tobytes(), e.down_proj[j].detach().numpy().tobytes())
                        for j in range(cfg.num_experts)})
                   for e in (model.model.layers[i].mlp.experts for i in moe_layers(model)))
    assert len(branches) == distinct                 # replicated experts share one branch
    matmul = "MatMul" if quant in ("fp32", "fp16") else "MatMulNBits"
    for nodes, owned in branches.values():
        products = [n for n in nodes if n.op_type == matmul]
        assert len(products) == 2                    # gate/up and down, each reading a weight the branch owns
        for n in products:
            weight = n.input[1]
            if quant == "fp16":                      # a Cast of the branch's own fp16 initializer
                weight = next(c.input[0] for c in nodes if c.output[0] == weight and c.op_type == "Cast")
            assert weight in owned, n.name
    main = {t.name for t in graph.initializer}
    assert not [t for t in main if ".experts." in t and ("weight" in t or "scales" in t)]


def test_switch_lowering_stores_a_replicated_expert_once(capsys, tmp_path, tokenizer_dir):
    """LF-UC replicates a short block's MLPs up to N experts: the copies share one branch, their weights add."""
    plan = Plan("lfuc", 6, [Block(1, [2, 3])], Options(host_mode="routed", top_k=2, num_experts=5, router_init="zero"))
    moe = get_method("lfuc").build(sensitive(tiny_dense("llama")), plan)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        gate = moe.model.layers[1].mlp.gate.weight
        gate.copy_(torch.randn(gate.shape, generator=g))
    model_dir = save_with_tokenizer(moe, tmp_path / "m", tokenizer_dir)
    code, _, err = run(capsys, "--target", "onnx", "--model", model_dir, "--moe-lowering", "switch", "--threads", 2,
                       "--out", tmp_path / "e")
    assert code == 0, err
    parity = json.loads((tmp_path / "e" / "manifest.json").read_text())["parity"]
    assert parity["greedy_match"] == parity["greedy_total"]
    branches, _ = branch_weights(graph_of(tmp_path / "e"))
    assert len(branches) == 3                       # 5 expert slots, 3 distinct MLPs


@pytest.mark.parametrize("variant", ["lfuc-shared-k2", "lfuc-routed-k1"])
def test_dense_mask_lowering_computes_every_expert_and_matches(capsys, models, tmp_path, variant):
    """The comparison lowering (optimum's way): no MoE node, all experts' weights in two MatMuls, same tokens."""
    code, _, err = run(capsys, "--target", "onnx", "--model", models[variant], "--moe-lowering", "dense",
                       "--threads", 2, "--out", tmp_path / "dense")
    assert code == 0, err
    manifest = json.loads((tmp_path / "dense" / "manifest.json").read_text())
    assert manifest["onnx"]["moe_lowering"] == "dense" and manifest["onnx"]["moe_nodes"] == 0
    assert manifest["parity"]["greedy_match"] == manifest["parity"]["greedy_total"]
    cfg = hf_model(models[variant]).config
    shapes = {t.name: list(t.dims) for t in onnx.load(str(tmp_path / "dense" / "model.onnx"),
                                                       load_external_data=False).graph.initializer}
    e, i, h = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    assert sum(1 for s in shapes.values() if s == [h, e * 2 * i]) == len(moe_layers(hf_model(models[variant])))
    code, _, err = run(capsys, "--target", "onnx", "--model", models[variant], "--moe-lowering", "dense",
                       "--quant", "int4", "--out", tmp_path / "q")
    assert code == 2 and "fp32 only" in err and not (tmp_path / "q").exists()


@pytest.mark.parametrize("breakage", ["gate_up_not_interleaved", "routing_not_renormalised",
                                      "gather_not_renormalised", "gather_experts_swapped",
                                      "switch_not_renormalised", "switch_experts_swapped"])
def test_a_wrong_moe_export_fails_parity_and_leaves_nothing(capsys, models, tmp_path, monkeypatch, breakage):
    import converters.onnx_moe as graph
    import converters.onnx_ops as ops

    lowering, variant = "sparse", "lfuc-shared-k2"
    if breakage == "gate_up_not_interleaved":
        monkeypatch.setattr(graph, "interleave_gate_up", lambda w: w)
    elif breakage == "routing_not_renormalised":
        original = ops.moe_attrs
        monkeypatch.setattr(ops, "moe_attrs", lambda k, normalize: original(k, False))
    else:                       # the in-graph lowerings: switch or gather
        lowering = breakage.split("_")[0]
        function = {"switch": "switched_experts", "gather": "gathered_experts"}[lowering]
        original = getattr(graph, function)
        if breakage.endswith("not_renormalised"):
            monkeypatch.setattr(graph, function, lambda *a: original(*a[:-2], False, a[-1]))
        else:       # top-1 routed host: expert j's rows run through expert j+1's weights
            variant = "lfuc-routed-k1"
            monkeypatch.setattr(graph, function, lambda g, lin, x, logits, gu, down, *a: original(
                g, lin, x, logits, np.roll(gu, 1, axis=0), np.roll(down, 1, axis=0), *a))
    code, _, err = run(capsys, "--target", "onnx", "--model", models[variant], "--moe-lowering", lowering,
                       "--out", tmp_path / "o")
    assert code == 1 and "parity check failed" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_gather_lowering_quantizes_every_expert_and_passes_its_floor(capsys, models, tmp_path, quant):
    """MatMulNBits per expert; a decode step leaves most experts with zero rows, which the kernels must take."""
    from converters.onnx import OnnxExporter
    from converters.parity import text_gate_failure

    code, _, err = run(capsys, "--target", "onnx", "--model", models["lfuc-routed-k1"], "--moe-lowering", "gather",
                       "--quant", quant, "--threads", 2, "--out", tmp_path / "q")
    assert code == 0, err
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    parity = manifest["parity"]
    tol = OnnxExporter.tolerances[quant]
    assert text_gate_failure(parity["text"], tol) is None
    model = hf_model(models["lfuc-routed-k1"])
    experts = len(moe_layers(model)) * model.config.num_experts
    nbits = [n.name for n in graph_of(tmp_path / "q").node if n.op_type == "MatMulNBits"]
    assert len([n for n in nbits if ".experts." in n]) == 2 * experts


@pytest.mark.parametrize("head_bits", [None, 8])
def test_int4_head_bits_follow_the_quant_unless_asked(capsys, models, tmp_path, head_bits):
    """int4 stores the tied LM head / embedding in int4 (as ONNX Runtime GenAI's builder); --head-bits 8 keeps it at int8."""
    argv = ["--head-bits", str(head_bits)] if head_bits else []
    code, _, err = run(capsys, "--target", "onnx", "--model", models["llama"], "--quant", "int4", *argv,
                       "--threads", 2, "--out", tmp_path / "q")
    assert code == 0, err
    nodes = {n.name: n for n in graph_of(tmp_path / "q").node}
    bits = {a.name: a.i for a in nodes["embed"].attribute}["bits"]
    head = {a.name: a.i for a in nodes["lm_head"].attribute}["bits"]
    assert nodes["embed"].op_type == "GatherBlockQuantized" and bits == head == (head_bits or 4)
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["parity"]["other_runtimes"]["onnxruntime-genai"]["greedy_match"] >= 0.5 * manifest["parity"]["greedy_total"]
